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
            help: "placement counter of the kernel programs (README: counters)",
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
