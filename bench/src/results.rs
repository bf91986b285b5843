//! What a peers run is (`Opts`) and what it measured (`Results`): the data
//! that `peers.rs` fills and `report.rs` and `plot.rs` read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::measure::Stats;
use crate::servers::{Programs, Variant};
use crate::workloads::Workload;

/// The options of one peers run.
pub struct Opts {
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub clients: usize,
    pub workers: Vec<usize>,
    pub variants: Vec<Variant>,
    pub workloads: Vec<Workload>,
    pub json: Option<PathBuf>,
    pub readme: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub programs: Programs,
    pub nginx: Option<PathBuf>,
}

/// One (variant, workers, workload), accumulated over rounds.
#[derive(Default)]
pub struct Cell {
    pub stats: Stats,
    /// CPU seconds the front used while the workload was measured.
    pub front_cpu_s: f64,
}

impl Cell {
    /// The front's CPU milliseconds per 1,000 connections opened.
    pub fn front_ms_per_1k_connections(&self) -> Option<f64> {
        per_1k(self.front_cpu_s, self.stats.connections)
    }

    /// The front's CPU milliseconds per 1,000 timed operations.
    pub fn front_ms_per_1k_ops(&self) -> Option<f64> {
        per_1k(self.front_cpu_s, self.stats.latencies.len() as u64)
    }
}

/// `cpu_s` in milliseconds per 1,000 of `n` (None when `n` is too small
/// for 10 ms clock ticks to mean anything).
pub fn per_1k(cpu_s: f64, n: u64) -> Option<f64> {
    (n >= 100).then(|| cpu_s * 1e3 / n as f64 * 1e3)
}

pub struct Results {
    pub cells: BTreeMap<(usize, usize, usize), Cell>,
    /// Servers that failed to start or died, and why.
    pub failures: Vec<String>,
    pub others: Vec<u32>,
    pub seconds_total: f64,
}

impl Results {
    pub fn get(&self, v: Variant, workers: usize, w: Workload) -> Option<&Cell> {
        self.cells.get(&key(v, workers, w))
    }
}

pub fn key(v: Variant, workers: usize, w: Workload) -> (usize, usize, usize) {
    let vi = Variant::ALL.iter().position(|x| *x == v).expect("known");
    let wi = Workload::ALL.iter().position(|x| *x == w).expect("known");
    (workers, vi, wi)
}
