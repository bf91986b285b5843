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
/// connection (None if it could not be measured), in `workloads` order.
pub(super) struct ProgramTime {
    pub mode: Mode,
    pub ns_per_conn: Vec<Option<f64>>,
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

/// Total run time of the BPF programs `pid` holds, each program once
/// (however many descriptors of it the process has).
fn programs_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
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
        if let (Some(id), Some(ns)) = (field("prog_id:"), field("run_time_ns:")) {
            by_id.insert(id, ns);
        }
    }
    by_id.values().sum()
}

/// Every mode's program time on the new-connection `workloads` (others get
/// None), one fresh cluster per mode.
pub(super) fn measure(opts: &Opts, workloads: &[&Workload]) -> Result<Vec<ProgramTime>, String> {
    let _stats = RunTimeStats::enable()?;
    let mut out = Vec::new();
    for &mode in &opts.modes {
        let cluster = Cluster::start(opts, mode, None)?;
        let sessions = register(cluster.addr, false)?;
        let mut ns_per_conn = Vec::new();
        for w in workloads {
            if w.kind != Kind::NewConnection || w.line_round_trip.is_some() {
                ns_per_conn.push(None);
                continue;
            }
            let before = programs_ns(cluster.pid());
            let stats = run_new_connections(cluster.addr, &sessions, w, PASS, Placing::default());
            let ns = programs_ns(cluster.pid()) - before;
            ns_per_conn.push((stats.connections > 0).then(|| ns as f64 / stats.connections as f64));
        }
        cluster.check_alive()?;
        out.push(ProgramTime { mode, ns_per_conn });
    }
    Ok(out)
}
