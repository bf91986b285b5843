//! Memory with many live sessions: what the kernel maps and the supervisor
//! hold for them.
//!
//! Two fresh clusters (fair-floor workers, sticky's default placement):
//! - registered: one worker pipelines `open` lines for `registered` sids
//!   over the control socket (`/register-many` of the fair worker);
//! - learned: 64 clients open `learned` Engine.IO sessions (a handshake per
//!   new connection, answered by the fair worker with a fresh sid), which
//!   `sticky_learn` puts in the maps; `--learn-idle 60m` keeps them.
//!
//! With the sessions held: the kernel's own account of every map the
//! supervisor holds (`memlock` in /proc/PID/fdinfo: the memory in use on
//! kernels >= 6.4, the worst case before), the supervisor's RSS, and its
//! CPU time over `HOLD` while nothing happens (the learned-session expiry
//! scan walks the map).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::report::num;
use super::{Cluster, Mode, Opts};
use crate::host::quote;
use crate::measure::{run_clients, Stats};

/// How long the sessions are held, idle, while the supervisor's CPU is
/// sampled: at least one whole expiry cycle with 1,000,000 sessions (its
/// passes are at least 200 times their own duration apart, about a minute).
const HOLD: Duration = Duration::from_secs(70);
const CLIENTS: usize = 64;

/// One kind of session, held.
pub struct Held {
    what: &'static str,
    asked: usize,
    /// Sessions the supervisor reports (`sticky stats`).
    held: u64,
    fill_s: f64,
    sessions_map_kib: u64,
    all_maps_kib: u64,
    maps_before_kib: u64,
    rss_kib: u64,
    rss_before_kib: u64,
    /// Supervisor CPU over HOLD, in ms per second.
    idle_cpu_ms_per_s: f64,
}

impl Held {
    fn total_mib(&self) -> f64 {
        (self.all_maps_kib + self.rss_kib) as f64 / 1024.0
    }
}

pub struct Memory {
    held: Vec<Held>,
}

pub fn measure(opts: &Opts, registered: usize, learned: usize) -> Result<Memory, String> {
    let mut held = Vec::new();
    eprintln!("memory: registering {registered} sessions over the control socket");
    held.push(hold(opts, "registered", registered, |c| {
        let body = slow_get(c, &format!("/register-many?n={registered}&prefix=m"))?;
        let oks: usize = body
            .trim()
            .parse()
            .map_err(|_| format!("/register-many answered {body:?}"))?;
        if oks != registered {
            eprintln!("memory: {oks} of {registered} registrations answered ok");
        }
        Ok(())
    })?);
    eprintln!("memory: learning {learned} sessions from Engine.IO handshakes");
    held.push(hold(opts, "learned", learned, |c| {
        let stats = handshakes(c, learned);
        match stats.errors {
            0 => Ok(()),
            n => Err(format!(
                "{n} handshakes failed: {}",
                stats.first_error.unwrap_or_default()
            )),
        }
    })?);
    Ok(Memory { held })
}

/// A fresh cluster, `fill`ed, then measured.
fn hold(
    opts: &Opts,
    what: &'static str,
    asked: usize,
    fill: impl FnOnce(&Cluster) -> Result<(), String>,
) -> Result<Held, String> {
    let cluster = Cluster::start_with(opts, Mode::Sticky, None, &["--learn-idle", "60m"])?;
    let pid = cluster.pid();
    let (maps_before_kib, _) = map_memory(pid);
    let rss_before_kib = rss_kib(pid);
    let start = Instant::now();
    fill(&cluster).map_err(|e| {
        let stats = std::process::Command::new(&opts.sticky)
            .args(["stats", "--listen", &cluster.addr.to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
            .unwrap_or_default();
        format!("{e}\nsticky's log:\n{}\nstats: {stats}", cluster.log_tail())
    })?;
    let fill_s = start.elapsed().as_secs_f64();
    let cpu0 = cluster.cpu_seconds();
    std::thread::sleep(HOLD);
    let idle_cpu_ms_per_s = (cluster.cpu_seconds() - cpu0) * 1e3 / HOLD.as_secs_f64();
    let (all_maps_kib, sessions_map_kib) = map_memory(pid);
    let stats = sticky_stats(opts, &cluster);
    let held = stats("sessions") + stats("learned_sessions");
    let h = Held {
        what,
        asked,
        held,
        fill_s,
        sessions_map_kib,
        all_maps_kib,
        maps_before_kib,
        rss_kib: rss_kib(pid),
        rss_before_kib,
        idle_cpu_ms_per_s,
    };
    eprintln!(
        "memory: {held} {what} sessions held ({:.1} s to fill): maps {:.1} MiB, supervisor RSS {:.1} MiB, {:.1} MiB in all; idle supervisor {:.0} ms CPU/s",
        h.fill_s,
        h.all_maps_kib as f64 / 1024.0,
        h.rss_kib as f64 / 1024.0,
        h.total_mib(),
        h.idle_cpu_ms_per_s
    );
    cluster.check_alive()?;
    Ok(h)
}

/// `count` Engine.IO handshakes (new connection each) from CLIENTS clients.
fn handshakes(cluster: &Cluster, count: usize) -> Stats {
    const REQUEST: &[u8] =
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let left = AtomicUsize::new(count);
    let addr = cluster.addr;
    run_clients(CLIENTS, None, |t, barrier| {
        let mut stats = Stats::default();
        barrier.wait();
        let start = Instant::now();
        while left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            stats.connections += 1;
            match crate::http::exchange(addr, Some(super::client_address(t)), REQUEST) {
                Ok(r) if r.status == 200 && r.body.starts_with(b"0{\"sid\":\"") => {}
                Ok(r) => stats.fail(format!("handshake: status {}", r.status)),
                Err(e) => stats.fail(format!("handshake: {e}")),
            }
        }
        stats.elapsed = start.elapsed();
        stats
    })
}

/// A GET whose answer may take minutes (the bench's usual timeout is 5 s).
fn slow_get(cluster: &Cluster, target: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(cluster.addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    // One write: the fair worker reads a request in one read, and `write!`
    // on a socket sends each formatted piece as a segment of its own.
    let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(|e| format!("{target}: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("{target}: {e}"))?;
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body.to_string())
}

/// `sticky stats` of the cluster, as a lookup (0 for a missing counter).
fn sticky_stats(opts: &Opts, cluster: &Cluster) -> impl Fn(&str) -> u64 {
    let out = std::process::Command::new(&opts.sticky)
        .args(["stats", "--listen", &cluster.addr.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    move |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// (every map, the sessions map) of process `pid`, KiB, from
/// /proc/PID/fdinfo (each map once, by id). The sessions map is the hash
/// with 8-byte keys (the sid's hash) and 16-byte values (`struct
/// sticky_session`).
fn map_memory(pid: u32) -> (u64, u64) {
    let mut seen = std::collections::BTreeSet::new();
    let (mut all, mut sessions) = (0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        let kib = memlock / 1024;
        all += kib;
        if (field("key_size:"), field("value_size:")) == (Some(8), Some(16)) {
            sessions += kib;
        }
    }
    (all, sessions)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

impl Memory {
    pub fn table(&self) -> String {
        let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
        let mut out = String::from(
            "\nMemory with sessions held (one fresh cluster each; kernel figures are the maps' `memlock` in /proc/PID/fdinfo; target: maps + RSS <= 128 MiB at 1,000,000):\n\n| sessions | held | fill (s) | `sessions` map (MiB) | all maps (MiB, empty: before) | supervisor RSS (MiB, empty: before) | maps + RSS (MiB) | per session (bytes) | idle supervisor CPU (ms/s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for h in &self.held {
            let grown =
                (h.all_maps_kib + h.rss_kib).saturating_sub(h.maps_before_kib + h.rss_before_kib);
            out += &format!(
                "| {} ({}) | {} | {:.1} | {} | {} ({}) | {} ({}) | {:.1} | {:.0} | {:.0} |\n",
                h.what,
                h.asked,
                h.held,
                h.fill_s,
                mib(h.sessions_map_kib),
                mib(h.all_maps_kib),
                mib(h.maps_before_kib),
                mib(h.rss_kib),
                mib(h.rss_before_kib),
                h.total_mib(),
                grown as f64 * 1024.0 / h.held.max(1) as f64,
                h.idle_cpu_ms_per_s,
            );
        }
        out
    }

    pub fn json(&self) -> String {
        let items: Vec<String> = self
            .held
            .iter()
            .map(|h| {
                format!(
                    "{{\"what\": {}, \"asked\": {}, \"held\": {}, \"fill_s\": {}, \"sessions_map_kib\": {}, \"all_maps_kib\": {}, \"maps_before_kib\": {}, \"supervisor_rss_kib\": {}, \"supervisor_rss_before_kib\": {}, \"total_mib\": {}, \"idle_supervisor_cpu_ms_per_s\": {}}}",
                    quote(h.what),
                    h.asked,
                    h.held,
                    num(h.fill_s),
                    h.sessions_map_kib,
                    h.all_maps_kib,
                    h.maps_before_kib,
                    h.rss_kib,
                    h.rss_before_kib,
                    num(h.total_mib()),
                    num(h.idle_cpu_ms_per_s),
                )
            })
            .collect();
        format!("[{}]", items.join(", "))
    }
}
