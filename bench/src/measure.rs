//! What every benchmark measures with: client threads started side by
//! side (`run_clients`), what they record (`Stats`), the arithmetic of the
//! reports (percentiles, ratios) and a small random generator for sids.
//! Depends on nothing else of the bench.

use std::io;
use std::sync::Barrier;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Measurements of one workload, accumulated over threads and rounds.
#[derive(Default)]
pub struct Stats {
    /// Request times (see `Kind`), nanoseconds.
    pub latencies: Vec<u64>,
    /// Connections opened (in the timed loop and for its set-up).
    pub connections: u64,
    pub errors: u64,
    pub wrong_worker: u64,
    /// The `latencies` of answers from the right worker, where a workload
    /// tells them apart (the peers' new-connection workloads): a wrong
    /// worker's answer may be cheaper than a right one's.
    pub right_latencies: Vec<u64>,
    pub elapsed: Duration,
    pub first_error: Option<String>,
}

impl Stats {
    pub fn merge(&mut self, other: Stats) {
        self.latencies.extend(other.latencies);
        self.right_latencies.extend(other.right_latencies);
        self.connections += other.connections;
        self.errors += other.errors;
        self.wrong_worker += other.wrong_worker;
        self.elapsed += other.elapsed;
        self.first_error = self.first_error.take().or(other.first_error);
    }
    pub fn fail(&mut self, why: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(why);
        }
    }
    pub fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Percentile in microseconds; `latencies` must be sorted.
    pub fn percentile_us(&self, q: f64) -> f64 {
        percentile_us(&self.latencies, q)
    }
}

/// Percentile of `sorted` (nanoseconds) in microseconds; NaN if empty.
pub fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// Runs `clients` threads side by side (on `cpus` if given), each running
/// `client(index, barrier)`, which sets up, waits at the barrier, then
/// measures.
pub fn run_clients(
    clients: usize,
    cpus: Option<&[usize]>,
    client: impl Fn(usize, &Barrier) -> Stats + Sync,
) -> Stats {
    let barrier = Barrier::new(clients);
    let per_thread: Vec<Stats> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let (barrier, client) = (&barrier, &client);
                scope.spawn(move || {
                    if let Some(cpus) = cpus {
                        if let Err(e) = pin(cpus) {
                            let mut stats = Stats::default();
                            stats.fail(format!("cannot pin a client to CPUs {cpus:?}: {e}"));
                            // Still at the barrier, or the others wait forever.
                            barrier.wait();
                            return stats;
                        }
                    }
                    client(t, barrier)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Threads ran side by side: the wall time is the longest one, not the sum.
    let elapsed = per_thread
        .iter()
        .map(|s| s.elapsed)
        .max()
        .unwrap_or_default();
    let mut total = Stats::default();
    for s in per_thread {
        total.merge(s);
    }
    total.elapsed = elapsed;
    total
}

pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for
    // CPUs below CPU_SETSIZE (those come from sched_getaffinity).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Pins the calling thread to `cpus`.
pub fn pin(cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: plain syscall on the calling thread with a valid set.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// xorshift64*: enough to make sids unique, no dependency needed.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from the clock and pid; `stream` separates threads started
    /// in the same nanosecond.
    pub fn seeded(stream: u64) -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let pid = u64::from(std::process::id()) << 32;
        let mut rng = Rng((t ^ pid ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
        rng.next();
        rng
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// 20 characters of the base64url alphabet, like Engine.IO's ids.
    pub fn sid(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..20)
            .map(|_| ALPHABET[(self.next() >> 58) as usize] as char)
            .collect()
    }
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}
