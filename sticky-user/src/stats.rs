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
    /// `STICKY_WORKER`: two reload generations' worker N share it.
    pub index: usize,
    /// The reload generation of the slot's process.
    pub generation: u64,
    pub pid: Option<u32>,
    /// Registered over the control socket.
    pub sessions: u32,
    /// Learned from Engine.IO handshakes.
    pub learned: u32,
    pub restarts: u64,
}

pub struct Snapshot {
    pub values: Vec<Stat>,
    /// Settings in effect, not numbers (`foreign_requests=reset`).
    pub modes: Vec<(&'static str, &'static str)>,
    pub workers: Vec<WorkerStat>,
    /// The `stats` line's per-worker and per-generation fields
    /// (`SessionTable::summary`).
    workers_line: String,
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
    let resets = &state.resets;
    values.extend([
        stat(
            "connections_reset",
            Kind::Counter,
            "connections reset for carrying another worker's session",
            resets.reset.load(std::sync::atomic::Ordering::Relaxed),
        ),
        stat(
            "reset_failures",
            Kind::Counter,
            "doomed connections sock_diag could not destroy",
            resets.failed.load(std::sync::atomic::Ordering::Relaxed),
        ),
    ]);
    if let Some(cookies) = &state.cookies {
        values.extend(cookies.values().into_iter().map(|(name, value)| Stat {
            name,
            kind: Kind::Counter,
            help: "bpf-cookie placement (README: --placement bpf-cookie)",
            value,
        }));
    }
    if let Some(relay) = &state.relay {
        values.extend(
            relay
                .values()
                .into_iter()
                .map(|(name, counter, help, value)| Stat {
                    name,
                    kind: if counter { Kind::Counter } else { Kind::Gauge },
                    help,
                    value,
                }),
        );
    }
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
    Snapshot {
        values,
        modes: vec![("foreign_requests", resets.mode)],
        workers,
        workers_line: table.summary(),
    }
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
        "foreign_dropped" => {
            "requests carrying another worker's sid dropped (their connection reset)"
        }
        "foreign_passed" => {
            "requests carrying another worker's sid passed to the connection's worker"
        }
        "doomed_segments" => "later segments of connections being reset, dropped",
        "unmapped" => "requests on connections whose worker is unknown (not checked)",
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
    /// The `stats` answer's body: `name=value ...`, the modes, then the
    /// workers' and generations' fields (README: Counters).
    pub fn line(&self) -> String {
        let values = self
            .values
            .iter()
            .map(|s| format!("{}={}", s.name, s.value));
        let modes = self
            .modes
            .iter()
            .map(|(name, mode)| format!("{name}={mode}"));
        values
            .chain(modes)
            .chain(std::iter::once(self.workers_line.clone()))
            .filter(|field| !field.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}
