//! `--metrics ADDR:PORT`: `GET /metrics` in the Prometheus (OpenMetrics)
//! text format, encoded by `prometheus-client` from the same snapshot as
//! `stats` (`stats::snapshot`), so every counter of `sticky stats` is
//! there, plus per-worker series.
//!
//! One thread answers one scrape at a time (scrapes are rare; a slow or
//! idle client is cut off after `CLIENT_TIMEOUT`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    control::ControlState,
    log,
    stats::{self, Kind},
};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8 * 1024;
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics listener, bound at start-up (a port below 1024 needs a
/// capability the supervisor drops later).
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub fn bind(addr: SocketAddr) -> Result<MetricsServer> {
        let listener = TcpListener::bind(addr).with_context(|| {
            format!("binding --metrics {addr} (in use, or not an address of this host?)")
        })?;
        Ok(MetricsServer { listener })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Answers scrapes on a thread of its own, forever.
    pub fn serve(self, state: ControlState) {
        let mut registry = Registry::with_prefix("sticky");
        registry.register_collector(Box::new(StickyCollector(state)));
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in self.listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if let Err(e) = answer(stream, &registry) {
                        log!("metrics: {e}");
                    }
                }
            })
            .expect("spawning the metrics thread");
    }
}

fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => ("200 OK", CONTENT_TYPE, body),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n".into(),
                ),
            }
        }
        (b"GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics only\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// A per-worker series: name, help, kind, and its value for a worker.
type PerWorker = (
    &'static str,
    &'static str,
    Kind,
    fn(&stats::WorkerStat) -> u64,
);

/// Encodes a fresh snapshot at each scrape.
struct StickyCollector(ControlState);

impl std::fmt::Debug for StickyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StickyCollector")
    }
}

/// One value of the stats list, under its own name and help.
fn encode_stat(
    encoder: &mut DescriptorEncoder,
    stat: &stats::Stat,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(stat.name, stat.help, None, metric.metric_type())?)
}

impl Collector for StickyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = stats::snapshot(&self.0);
        for stat in &snapshot.values {
            match stat.kind {
                Kind::Counter => encode_stat(&mut encoder, stat, ConstCounter::new(stat.value))?,
                Kind::Gauge => encode_stat(&mut encoder, stat, ConstGauge::new(stat.value as i64))?,
            }
        }
        // Per worker process, labelled worker="N" (`STICKY_WORKER`) and
        // generation="G" (two live side by side during a reload's drain).
        let labels: Vec<[(&str, String); 2]> = snapshot
            .workers
            .iter()
            .map(|w| {
                [
                    ("worker", w.index.to_string()),
                    ("generation", w.generation.to_string()),
                ]
            })
            .collect();
        let per_worker: [PerWorker; 4] = [
            (
                "worker_up",
                "1 while the slot's worker process runs",
                Kind::Gauge,
                |w| u64::from(w.pid.is_some()),
            ),
            (
                "worker_sessions",
                "sessions registered by the worker",
                Kind::Gauge,
                |w| u64::from(w.sessions),
            ),
            (
                "worker_learned_sessions",
                "sessions learned for the worker",
                Kind::Gauge,
                |w| u64::from(w.learned),
            ),
            (
                "worker_restarts",
                "restarts of the slot's worker",
                Kind::Counter,
                |w| w.restarts,
            ),
        ];
        for (name, help, kind, value) in per_worker {
            let metric_type = match kind {
                Kind::Counter => ConstCounter::new(0u64).metric_type(),
                Kind::Gauge => ConstGauge::new(0i64).metric_type(),
            };
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for (worker, label) in snapshot.workers.iter().zip(&labels) {
                let sample = family.encode_family(label)?;
                match kind {
                    Kind::Counter => ConstCounter::new(value(worker)).encode(sample)?,
                    Kind::Gauge => ConstGauge::new(value(worker) as i64).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}
