//! The CPU time of sticky's kernel programs per connection, in a pass of
//! its own after the rounds: the kernel counts each program's runs and
//! their time only while run-time statistics are on (`BPF_ENABLE_STATS`:
//! on while its fd is held, off again when it closes, unlike the
//! `kernel.bpf_stats_enabled` sysctl), and timing costs two clock reads per
//! run, which would tilt the rounds' latencies against the modes that run
//! more programs. The figures are in the fdinfo of the process holding the
//! programs (`run_time_ns`, `run_cnt`), sticky's.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use super::{register, run_new_connections, Cluster, Kind, Mode, Opts, Placing, Workload};

/// How long each workload of the pass runs (the loopback new-connection
/// ones: the delay line's are not measured here).
const PASS: Duration = Duration::from_secs(1);

/// One mode's figures: each workload's nanoseconds of program time per
/// connection (None if it could not be measured), in `workloads` order,
/// in all and by kind of program.
pub(super) struct ProgramTime {
    pub mode: Mode,
    pub ns_per_conn: Vec<Option<f64>>,
    pub by_kind: Vec<Option<[f64; KINDS.len()]>>,
}

/// The kinds of program told apart, by BPF program type: sticky_select;
/// the cgroup programs (sticky_learn and sticky_watch); anything else
/// (the sorting listeners' filter, the bpf-cookie tc program).
pub(super) const KINDS: [&str; 3] = ["selector", "cgroup", "other"];

fn kind_of(prog_type: u64) -> usize {
    const SK_REUSEPORT: u64 = 21;
    const CGROUP_SKB: u64 = 8;
    match prog_type {
        SK_REUSEPORT => 0,
        CGROUP_SKB => 1,
        _ => 2,
    }
}

/// Run-time statistics, on while this lives.
struct RunTimeStats {
    _fd: OwnedFd,
}

impl RunTimeStats {
    fn enable() -> Result<RunTimeStats, String> {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        let attr = [BPF_STATS_RUN_TIME, 0, 0, 0];
        // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            return Err(format!(
                "BPF_ENABLE_STATS: {} (needs CAP_SYS_ADMIN and Linux 5.8)",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a new descriptor the kernel just returned, owned here.
        Ok(RunTimeStats {
            _fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        })
    }
}

/// Run time of the BPF programs `pid` holds by kind (`KINDS`), each
/// program once (however many descriptors of it the process has).
fn programs_ns(pid: u32) -> [u64; KINDS.len()] {
    let mut out = [0; KINDS.len()];
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    let mut by_id = BTreeMap::new();
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(kind), Some(ns)) = (
            field("prog_id:"),
            field("prog_type:"),
            field("run_time_ns:"),
        ) {
            by_id.insert(id, (kind_of(kind), ns));
        }
    }
    for (kind, ns) in by_id.into_values() {
        out[kind] += ns;
    }
    out
}

/// Every mode's program time on the new-connection `workloads` (others get
/// None), one fresh cluster per mode.
pub(super) fn measure(opts: &Opts, workloads: &[&Workload]) -> Result<Vec<ProgramTime>, String> {
    let _stats = RunTimeStats::enable()?;
    let mut out = Vec::new();
    for &mode in &opts.modes {
        let cluster = Cluster::start(opts, mode, None)?;
        let sessions = register(cluster.addr, false)?;
        let (mut ns_per_conn, mut by_kind) = (Vec::new(), Vec::new());
        for w in workloads {
            if w.kind != Kind::NewConnection || w.line_round_trip.is_some() {
                ns_per_conn.push(None);
                by_kind.push(None);
                continue;
            }
            let before = programs_ns(cluster.pid());
            let stats = run_new_connections(cluster.addr, &sessions, w, PASS, Placing::default());
            let after = programs_ns(cluster.pid());
            let n = stats.connections as f64;
            let kinds: [f64; KINDS.len()] =
                std::array::from_fn(|k| (after[k] - before[k]) as f64 / n);
            ns_per_conn.push((n > 0.0).then(|| kinds.iter().sum()));
            by_kind.push((n > 0.0).then_some(kinds));
        }
        cluster.check_alive()?;
        out.push(ProgramTime {
            mode,
            ns_per_conn,
            by_kind,
        });
    }
    Ok(out)
}
