//! One list of everything sticky reports, read by both the control
//! socket's `stats` answer (and so `sticky stats`) and `/metrics`
//! (`metrics`): a counter added here, or to the kernel's `COUNTERS`, shows
//! up in both.

use sticky_common::COUNTERS;

use crate::control::ControlState;

/// How a value behaves, for Prometheus.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// Only grows (from 0 at sticky's start).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One named value of `stats`.
pub struct Stat {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub value: u64,
}

/// One worker slot.
pub struct WorkerStat {
    pub pid: Option<u32>,
    /// Registered over the control socket.
    pub sessions: u32,
    /// Learned from Engine.IO handshakes.
    pub learned: u32,
    pub restarts: u64,
}

pub struct Snapshot {
    pub values: Vec<Stat>,
    pub workers: Vec<WorkerStat>,
}

/// Everything, now.
pub fn snapshot(state: &ControlState) -> Snapshot {
    let mut values: Vec<Stat> = COUNTERS
        .iter()
        .enumerate()
        .map(|(i, name)| Stat {
            name,
            kind: Kind::Counter,
            help: kernel_help(name),
            value: state.counters.get(i as u32),
        })
        .collect();
    let table = state.sessions.lock().unwrap();
    let workers = table.worker_stats();
    let restarts = workers.iter().map(|w| w.restarts).sum();
    let rotations = state
        .counters
        .rotations
        .load(std::sync::atomic::Ordering::Relaxed);
    values.extend([
        stat(
            "live_workers",
            Kind::Gauge,
            "worker processes running",
            table.live_workers() as u64,
        ),
        stat(
            "sessions",
            Kind::Gauge,
            "sessions registered over the control socket",
            table.session_count() as u64,
        ),
        stat(
            "learned_sessions",
            Kind::Gauge,
            "sessions learned from Engine.IO handshakes",
            table.learned_count() as u64,
        ),
        stat(
            "rotations",
            Kind::Counter,
            "sorting listener rotations",
            rotations,
        ),
        stat(
            "restarts",
            Kind::Counter,
            "worker processes restarted after an exit",
            restarts,
        ),
    ]);
    Snapshot { values, workers }
}

/// What a kernel counter counts (README "Counters"); counters added later
/// get the generic line until they get theirs.
fn kernel_help(name: &str) -> &'static str {
    match name {
        "syn" => "SYNs sent to a sorting listener",
        "placed_softirq" => "connections placed in softirq (first segment migrated)",
        "placed_queue" => "connections placed from a sorting queue",
        "placed_cookie" => "SYN-cookie connections placed on their first data segment",
        "absorbed" => "pure ACKs and timers of requests whose listener rotated away",
        "by_sid" => "connections placed on their sid's owner",
        "balanced" => "connections placed by the balancing method",
        "rejected" => "connections sent to the 503 listener (no live worker)",
        "sid_unknown" => "sids no live worker owns (balanced)",
        "sid_invalid" => "malformed sids (balanced)",
        "no_sid" => "requests without a sid (balanced)",
        "not_http" => "first segments that are not an HTTP request line (balanced)",
        "select_failed" => "slots the kernel refused",
        "filter_decisions" => "owners recorded by the socket filter for the queue path",
        "syn_balanced" => "placements in --placement syn mode",
        "cross_cpu" => "first segments processed on another CPU than their SYN",
        "handoff_drops" => "cross-CPU first segments dropped for retransmission",
        "learned" => "sessions learned from Engine.IO open packets",
        "learn_known" => "open packets whose sid was already registered",
        "learn_full" => "open packets not learned: session table full",
        "learn_closed" => "learned sessions closed by their client",
        _ => "counter of sticky's kernel programs (README: Counters)",
    }
}

fn stat(name: &'static str, kind: Kind, help: &'static str, value: u64) -> Stat {
    Stat {
        name,
        kind,
        help,
        value,
    }
}

impl Snapshot {
    /// The `stats` answer's body: `name=value ...`, then
    /// `workerN=pid:P,sessions:S,learned:L` (or `workerN=down`) per slot.
    pub fn line(&self) -> String {
        let values = self
            .values
            .iter()
            .map(|s| format!("{}={}", s.name, s.value));
        let workers = self.workers.iter().enumerate().map(|(i, w)| match w.pid {
            Some(pid) => format!(
                "worker{i}=pid:{pid},sessions:{},learned:{}",
                w.sessions, w.learned
            ),
            None => format!("worker{i}=down"),
        });
        values.chain(workers).collect::<Vec<_>>().join(" ")
    }
}
