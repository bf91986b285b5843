//! `sticky-bench --ws-learn`: what session learning costs on messages over
//! an established WebSocket.
//!
//! The session learner (`sticky_learn`, cgroup_skb egress) runs on every
//! packet sticky's cgroup sends, WebSocket frames included; on a connection
//! it is done with (open packet found, or its first answer segments seen)
//! it stops at a map lookup. This measures that: `sticky run --learn on`
//! against `--learn off`, alternating round by round, each with
//! `super::WORKERS` plain socketioxide workers (no sticky code). Each client
//! opens one Socket.IO session over WebSocket only before the clock starts,
//! then sends acknowledged `echo` events back to back, each timed from its
//! write to the ack's last byte. Clients, sticky and its workers run on one
//! CPU (`super::Pinning`), so whatever the learner adds shows in full.
//!
//! The client speaks just enough RFC 6455 and Socket.IO v5 for that: a
//! fixed handshake key, masked text frames out, unfragmented frames in.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use super::{Cluster, Mode, Opts, Pinning, Stats};

/// Concurrent clients of the second workload, one WebSocket each.
const CLIENTS: usize = 8;

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
    let pinning = Pinning::pick();
    let cpus = pinning.as_ref().map(Pinning::cpus);
    let workloads = [("serial", 1), ("8 clients", CLIENTS)];
    // [workload][0: learn on, 1: learn off]
    let mut results: Vec<[Stats; 2]> = workloads.iter().map(|_| Default::default()).collect();
    for round in 1..=opts.rounds {
        for (column, learn) in [(0, true), (1, false)] {
            let cluster_opts = Opts {
                worker: worker.clone(),
                learn,
                ..opts.clone()
            };
            let cluster = Cluster::start(&cluster_opts, Mode::Sticky, cpus)?;
            if learn && cluster.learning() != Some(true) {
                return Err(format!(
                    "sticky runs without its session learner: nothing to measure\n{}",
                    cluster.log_tail()
                ));
            }
            let mut line = format!(
                "round {round}/{} learn {:3}:",
                opts.rounds,
                if learn { "on" } else { "off" }
            );
            for (w, &(name, clients)) in workloads.iter().enumerate() {
                let mut stats = run_echoes(cluster.addr, clients, opts.duration, cpus);
                stats.latencies.sort_unstable();
                line += &format!(
                    " {name} {} msg p50 {:.1} µs ({} errors);",
                    stats.latencies.len(),
                    stats.percentile_us(0.50),
                    stats.errors
                );
                results[w][column].merge(stats);
            }
            cluster.check_alive()?;
            eprintln!("{}", line.trim_end_matches(';'));
        }
    }
    for r in &mut results {
        for s in r.iter_mut() {
            s.latencies.sort_unstable();
            if let Some(e) = &s.first_error {
                eprintln!("first error: {e}");
            }
        }
    }
    let report = table(opts, &workloads, &results, pinning.as_ref());
    print!("{report}");
    if let Some(path) = &opts.readme {
        super::replace_between_markers(
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

/// `clients` threads, each with one Socket.IO session over WebSocket,
/// sending acknowledged echoes back to back for `duration`.
fn run_echoes(
    addr: SocketAddr,
    clients: usize,
    duration: std::time::Duration,
    cpus: Option<&[usize]>,
) -> Stats {
    super::run_clients(clients, cpus, |_, barrier| {
        let mut stats = Stats {
            connections: 1,
            ..Stats::default()
        };
        let mut session = SocketIoWebSocket::connect(addr)
            .map_err(|e| stats.fail(format!("WebSocket session: {e}")))
            .ok();
        barrier.wait();
        let start = Instant::now();
        while start.elapsed() < duration {
            let Some(s) = session.as_mut() else {
                break; // counted above; the other clients keep measuring
            };
            let begin = Instant::now();
            match s.echo() {
                Ok(done) => stats.latencies.push((done - begin).as_nanos() as u64),
                Err(e) => {
                    stats.fail(format!("echo: {e}"));
                    session = None;
                }
            }
        }
        stats.elapsed = start.elapsed();
        stats
    })
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
        let mut stream = super::connect(addr)?;
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

/// learn on / learn off ratios of p50, p99 and rate.
fn ratios(r: &[Stats; 2]) -> [f64; 3] {
    let [on, off] = r;
    [
        super::ratio(on.percentile_us(0.50), off.percentile_us(0.50)),
        super::ratio(on.percentile_us(0.99), off.percentile_us(0.99)),
        super::ratio(on.rate(), off.rate()),
    ]
}

fn table(
    opts: &Opts,
    workloads: &[(&str, usize)],
    results: &[[Stats; 2]],
    pinning: Option<&Pinning>,
) -> String {
    let mut out = format!(
        "\n## Session learning on vs off: Socket.IO messages over an established WebSocket\n\n\
         {} plain socketioxide workers; {} round(s) of {:.1} s per workload and mode, alternating; \
         each client's session is opened over WebSocket before the clock starts, then acknowledged \
         `echo` events back to back, each timed from its write to the ack; {}.\n\n\
         | workload | learn | messages | rate (msg/s) | p50 (µs) | p99 (µs) | max (µs) | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
        super::WORKERS,
        opts.rounds,
        opts.duration.as_secs_f64(),
        pinning.map_or("unpinned".into(), Pinning::describe),
    );
    for (&(name, _), r) in workloads.iter().zip(results) {
        for (learn, s) in ["on", "off"].iter().zip(r) {
            out += &format!(
                "| {name} | {learn} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |\n",
                s.latencies.len(),
                s.rate(),
                s.percentile_us(0.50),
                s.percentile_us(0.99),
                s.percentile_us(1.0),
                s.errors,
            );
        }
    }
    out += "\n| workload | p50 on/off | p99 on/off | rate on/off |\n|---|---:|---:|---:|\n";
    for (&(name, _), r) in workloads.iter().zip(results) {
        let [p50, p99, rate] = ratios(r);
        out += &format!("| {name} | {p50:.3} | {p99:.3} | {rate:.3} |\n");
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
            "{{\"messages\": {}, \"rate\": {}, \"p50_us\": {}, \"p99_us\": {}, \"errors\": {}}}",
            s.latencies.len(),
            num(s.rate()),
            num(s.percentile_us(0.50)),
            num(s.percentile_us(0.99)),
            s.errors
        )
    };
    let rows: Vec<String> = workloads
        .iter()
        .zip(results)
        .map(|(&(name, clients), r)| {
            let [p50, p99, rate] = ratios(r);
            format!(
                "    {{\"workload\": {}, \"clients\": {clients}, \"learn_on\": {}, \"learn_off\": {}, \"ratio_on_off\": {{\"p50\": {}, \"p99\": {}, \"rate\": {}}}}}",
                super::quote(name),
                stats(&r[0]),
                stats(&r[1]),
                num(p50),
                num(p99),
                num(rate)
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
