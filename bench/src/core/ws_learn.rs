//! `sticky-bench --ws-learn`: what session learning costs on messages over
//! an established WebSocket.
//!
//! With learning on, two programs run on every packet of sticky's cgroup,
//! WebSocket frames included: `sticky_learn` (egress; on a connection past
//! its first answer segments it stops at the socket's segment count) and
//! `sticky_watch` (ingress; it stops at the first payload bytes unless they
//! start a request). This measures both: a `sticky run --learn on` and a
//! `--learn off` (programs not attached) side by side, each with
//! `super::WORKERS` plain socketioxide workers (no sticky code) and each in
//! a cgroup of its own (`BenchCgroup`), as on a server whose clients are
//! elsewhere: otherwise the programs would also run on the benchmark
//! clients' packets, and on the other cluster's. A client opens one
//! Socket.IO session over WebSocket only on each cluster before the clock
//! starts, then sends acknowledged `echo` events back to back, alternating
//! between the two sessions, each timed from its write to the ack's last
//! byte: both columns see the machine at the same moments, so the load of
//! the rest of the machine cancels out of the ratio. Clients, both
//! stickies and their workers run on one CPU (`super::Pinning`), so
//! whatever the programs add shows in full. Fresh clusters each round.
//!
//! The client speaks just enough RFC 6455 and Socket.IO v5 for that: a
//! fixed handshake key, masked text frames out, unfragmented frames in.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Barrier;
use std::time::Instant;

use super::cgroup::BenchCgroup;
use super::{Cluster, Mode, Opts, Pinning};
use crate::measure::Stats;

/// (name, clients). One client: with several on one CPU alternating
/// between two clusters, the scheduler makes one cluster's latencies
/// bimodal (seen here: 74 or 200 µs p50 by round), which no ratio survives.
const WORKLOADS: [(&str, usize); 1] = [("serial", 1)];

/// Runs both workloads with learning on and off and reports the ratios.
pub fn run(opts: &Opts) -> Result<(), String> {
    let worker = opts
        .worker
        .with_file_name("sticky-plain-socketioxide-worker");
    if !worker.is_file() {
        return Err(format!(
            "{} not found (build with `cargo xtask build`)",
            worker.display()
        ));
    }
    // One cgroup per cluster: each cluster's programs see only its own
    // packets, not the other's nor the clients'.
    let cgroups = [BenchCgroup::create("on"), BenchCgroup::create("off")];
    let own_cgroups = cgroups.iter().all(Result::is_ok);
    if let Some(Err(e)) = cgroups.iter().find(|c| c.is_err()) {
        eprintln!("note: sticky runs in this process's cgroup, so its programs also see the clients' packets: {e}");
    }
    let pinning = Pinning::pick();
    let cpus = pinning.as_ref().map(Pinning::cpus);
    let workloads = WORKLOADS;
    // [workload][0: learn on, 1: learn off]
    let mut results: Vec<[Stats; 2]> = workloads.iter().map(|_| Default::default()).collect();
    for round in 1..=opts.rounds {
        let mut clusters = Vec::new();
        for (learn, cgroup) in [true, false].into_iter().zip(&cgroups) {
            let cluster_opts = Opts {
                worker: worker.clone(),
                learn,
                cgroup: cgroup.as_ref().ok().map(|c| c.0.clone()),
                ..opts.clone()
            };
            clusters.push(Cluster::start(&cluster_opts, Mode::Sticky, cpus)?);
        }
        if clusters[0].learning() != Some(true) {
            return Err(format!(
                "sticky runs without its session learner: nothing to measure\n{}",
                clusters[0].log_tail()
            ));
        }
        let mut line = format!("round {round}/{}:", opts.rounds);
        for (w, &(name, clients)) in workloads.iter().enumerate() {
            let addrs = [clusters[0].addr, clusters[1].addr];
            let paired = run_paired(addrs, clients, opts.duration, cpus);
            for (column, mut stats) in paired.into_iter().enumerate() {
                stats.latencies.sort_unstable();
                line += &format!(
                    " {name} learn {} p50 {:.1} µs ({} errors);",
                    ["on", "off"][column],
                    stats.percentile_us(0.50),
                    stats.errors
                );
                results[w][column].merge(stats);
            }
        }
        for cluster in clusters {
            cluster.check_alive()?;
        }
        eprintln!("{}", line.trim_end_matches(';'));
    }
    for r in &mut results {
        for s in r.iter_mut() {
            s.latencies.sort_unstable();
            if let Some(e) = &s.first_error {
                eprintln!("first error: {e}");
            }
        }
    }
    let report = table(opts, &workloads, &results, pinning.as_ref(), own_cgroups);
    print!("{report}");
    if let Some(path) = &opts.readme {
        super::report::replace_between_markers(
            path,
            "<!-- bench-ws-learn:begin -->",
            "<!-- bench-ws-learn:end -->",
            &report,
        )?;
        eprintln!("updated {}", path.display());
    }
    if let Some(path) = &opts.json {
        // Next to the main benchmark's file of the day, not over it.
        let path = path.with_file_name(format!(
            "{}-ws-learn.json",
            path.file_stem().and_then(|s| s.to_str()).unwrap_or("bench")
        ));
        std::fs::write(&path, json(opts, &workloads, &results))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `clients` threads, each with one Socket.IO session over WebSocket on
/// each cluster of `addrs` (learn on, learn off), sending acknowledged
/// echoes back to back for `duration`, alternating between the two
/// sessions (and which goes first): both columns see the same machine at
/// the same moments, so the load of the rest of the machine cancels out.
pub(super) fn run_paired(
    addrs: [SocketAddr; 2],
    clients: usize,
    duration: std::time::Duration,
    cpus: Option<&[usize]>,
) -> [Stats; 2] {
    let barrier = Barrier::new(clients);
    let per_thread: Vec<[Stats; 2]> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut stats: [Stats; 2] = Default::default();
                    let pinned = cpus.map_or(Ok(()), crate::measure::pin);
                    let mut sessions = [0, 1].map(|i| {
                        stats[i].connections = 1;
                        if let Err(e) = &pinned {
                            stats[i].fail(format!("cannot pin a client: {e}"));
                            return None;
                        }
                        SocketIoWebSocket::connect(addrs[i])
                            .map_err(|e| stats[i].fail(format!("WebSocket session: {e}")))
                            .ok()
                    });
                    barrier.wait();
                    let start = Instant::now();
                    let mut turn = 0;
                    while start.elapsed() < duration && sessions.iter().all(Option::is_some) {
                        turn += 1;
                        for i in [turn % 2, (turn + 1) % 2] {
                            let session = sessions[i].as_mut().expect("checked above");
                            let begin = Instant::now();
                            match session.echo() {
                                Ok(done) => {
                                    stats[i].latencies.push((done - begin).as_nanos() as u64)
                                }
                                Err(e) => {
                                    stats[i].fail(format!("echo: {e}"));
                                    sessions[i] = None;
                                    break;
                                }
                            }
                        }
                    }
                    for s in &mut stats {
                        s.elapsed = start.elapsed();
                    }
                    stats
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Threads ran side by side: the wall time is the longest one, not the sum.
    let elapsed = [0, 1].map(|i| per_thread.iter().map(|s| s[i].elapsed).max());
    let mut total: [Stats; 2] = Default::default();
    for [on, off] in per_thread {
        total[0].merge(on);
        total[1].merge(off);
    }
    for (t, e) in total.iter_mut().zip(elapsed) {
        t.elapsed = e.unwrap_or_default();
    }
    total
}

/// One Socket.IO session (namespace `/`) over a WebSocket connection.
struct SocketIoWebSocket {
    stream: TcpStream,
    /// Bytes received and not yet consumed.
    buf: Vec<u8>,
    next_ack: u64,
}

impl SocketIoWebSocket {
    /// Upgrades a new connection, reads the Engine.IO open packet, joins
    /// namespace `/` and waits for its CONNECT answer.
    fn connect(addr: SocketAddr) -> io::Result<SocketIoWebSocket> {
        let mut stream = crate::http::connect(addr, None)?;
        stream.write_all(
            b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n\
              Upgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )?;
        let mut ws = SocketIoWebSocket {
            stream,
            buf: Vec::with_capacity(4096),
            next_ack: 0,
        };
        let head_end = loop {
            if let Some(pos) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
            ws.fill()?;
        };
        if !ws.buf.starts_with(b"HTTP/1.1 101") {
            return Err(invalid(format!(
                "upgrade refused: {}",
                String::from_utf8_lossy(&ws.buf[..head_end])
                    .lines()
                    .next()
                    .unwrap_or("")
            )));
        }
        ws.buf.drain(..head_end);
        let open = ws.read_text()?;
        if !open.starts_with(b"0{") {
            return Err(invalid("no Engine.IO open packet".into()));
        }
        ws.send_text(b"40")?;
        while !ws.read_text()?.starts_with(b"40") {}
        Ok(ws)
    }

    /// Sends `echo` with an ack id and returns when its ack has arrived.
    /// Other packets (the worker's `hello`, pings) are handled in passing.
    fn echo(&mut self) -> io::Result<Instant> {
        let id = self.next_ack;
        self.next_ack += 1;
        self.send_text(format!("42{id}[\"echo\",\"message {id}\"]").as_bytes())?;
        let ack = format!("43{id}[");
        loop {
            let packet = self.read_text()?;
            if packet.starts_with(ack.as_bytes()) {
                return Ok(Instant::now());
            }
            if packet == b"2" {
                self.send_text(b"3")?; // Engine.IO ping: pong
            }
        }
    }

    /// One masked text frame (clients must mask; the key need not be secret).
    fn send_text(&mut self, payload: &[u8]) -> io::Result<()> {
        const KEY: [u8; 4] = [0x12, 0x34, 0x56, 0x78];
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(0x81);
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&KEY);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        self.stream.write_all(&frame)
    }

    /// The payload of the next text frame (control frames but close are
    /// skipped).
    fn read_text(&mut self) -> io::Result<Vec<u8>> {
        loop {
            while self.buf.len() < 2 {
                self.fill()?;
            }
            let opcode = self.buf[0] & 0x0f;
            let (len, header) = match self.buf[1] & 0x7f {
                126 => {
                    while self.buf.len() < 4 {
                        self.fill()?;
                    }
                    (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                }
                127 => return Err(invalid("frame too large for this client".into())),
                n => (n as usize, 2),
            };
            while self.buf.len() < header + len {
                self.fill()?;
            }
            let payload: Vec<u8> = self.buf.drain(..header + len).skip(header).collect();
            match opcode {
                0x1 => return Ok(payload),
                0x8 => return Err(invalid("the server closed the WebSocket".into())),
                _ => continue,
            }
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk)? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            )),
            n => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// learn on / learn off ratios of p50 and p99 (the rates are equal by
/// construction: the two sessions take turns).
fn ratios(r: &[Stats; 2]) -> [f64; 2] {
    let [on, off] = r;
    [
        crate::measure::ratio(on.percentile_us(0.50), off.percentile_us(0.50)),
        crate::measure::ratio(on.percentile_us(0.99), off.percentile_us(0.99)),
    ]
}

fn table(
    opts: &Opts,
    workloads: &[(&str, usize)],
    results: &[[Stats; 2]],
    pinning: Option<&Pinning>,
    own_cgroup: bool,
) -> String {
    let mut out = format!(
        "\n### Session learning on vs off: Socket.IO messages over an established WebSocket\n\n\
         Two clusters side by side (`--learn on`, `--learn off`), {} plain socketioxide workers each; \
         {} round(s) of {:.1} s; one client with a session opened over WebSocket on each cluster \
         before the clock starts, sending acknowledged `echo` events back to back, alternating \
         between its two sessions, each timed from its write to the ack; {}; {}.\n\n\
         | workload | learn | messages | p50 (µs) | p99 (µs) | max (µs) | errors |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
        super::WORKERS,
        opts.rounds,
        opts.duration.as_secs_f64(),
        pinning.map_or("unpinned".into(), Pinning::describe),
        if own_cgroup {
            "each sticky in a cgroup of its own (its programs see only its server side)"
        } else {
            "sticky in the clients' cgroup (its programs also see the clients' packets)"
        },
    );
    for (&(name, _), r) in workloads.iter().zip(results) {
        for (learn, s) in ["on", "off"].iter().zip(r) {
            out += &format!(
                "| {name} | {learn} | {} | {:.1} | {:.1} | {:.1} | {} |\n",
                s.latencies.len(),
                s.percentile_us(0.50),
                s.percentile_us(0.99),
                s.percentile_us(1.0),
                s.errors,
            );
        }
    }
    out += "\n| workload | p50 on/off | p99 on/off |\n|---|---:|---:|\n";
    for (&(name, _), r) in workloads.iter().zip(results) {
        let [p50, p99] = ratios(r);
        out += &format!("| {name} | {p50:.3} | {p99:.3} |\n");
    }
    out
}

fn json(opts: &Opts, workloads: &[(&str, usize)], results: &[[Stats; 2]]) -> String {
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".into()
        }
    };
    let stats = |s: &Stats| {
        format!(
            "{{\"messages\": {}, \"p50_us\": {}, \"p99_us\": {}, \"errors\": {}}}",
            s.latencies.len(),
            num(s.percentile_us(0.50)),
            num(s.percentile_us(0.99)),
            s.errors
        )
    };
    let rows: Vec<String> = workloads
        .iter()
        .zip(results)
        .map(|(&(name, clients), r)| {
            let [p50, p99] = ratios(r);
            format!(
                "    {{\"workload\": {}, \"clients\": {clients}, \"learn_on\": {}, \"learn_off\": {}, \"ratio_on_off\": {{\"p50\": {}, \"p99\": {}}}}}",
                crate::host::quote(name),
                stats(&r[0]),
                stats(&r[1]),
                num(p50),
                num(p99)
            )
        })
        .collect();
    format!(
        "{{\n  \"benchmark\": \"websocket echo, session learning on vs off\",\n  \"rounds\": {},\n  \"seconds_per_round\": {},\n  \"workloads\": [\n{}\n  ]\n}}\n",
        opts.rounds,
        num(opts.duration.as_secs_f64()),
        rows.join(",\n")
    )
}
