//! Least privilege: the supervisor drops every capability it no longer
//! needs once start-up is done (programs loaded and attached, workers
//! adopted, sockets bound), and each worker started with `--user` drops all
//! of them between fork and exec (`drop_in_child`).
//!
//! Capabilities are per thread: the serving set is applied while the
//! supervisor is still single-threaded (checked), so every thread it starts
//! afterwards inherits it. The bounding set is cut down to the same set, so
//! no exec (of a worker running as root, or of the supervisor itself) gets
//! the rest back.
//!
//! What stays, and why (README "Least privilege" lists the same):
//! - `CAP_BPF` only where the kernel asks for it to read and update maps
//!   (before Linux 6.5 the `bpf()` syscall itself required it when
//!   `kernel.unprivileged_bpf_disabled` is set): measured at start by a map
//!   read without it;
//! - `CAP_NET_ADMIN`: sock_diag `SOCK_DESTROY` of connections;
//! - `CAP_NET_BIND_SERVICE` when the port is privileged: every rotation
//!   binds a fresh sorting listener, and a crash-looping worker gets a fresh
//!   listener;
//! - with `--user`: `CAP_SETUID`, `CAP_SETGID` (starting replacement
//!   workers as that user, with their groups), `CAP_SETPCAP` (emptying each
//!   worker's bounding set) and `CAP_KILL` (signalling workers that run as
//!   another user).
//!
//! Not needed once serving, so dropped: `CAP_SYS_ADMIN` (finding the old
//! selector by id at adoption), `CAP_SYS_PTRACE` (`pidfd_getfd` of adopted
//! listeners), `CAP_DAC_OVERRIDE`, `CAP_CHOWN` (the control socket),
//! `CAP_PERFMON` (the verifier), `CAP_SYS_NICE` (the sorters inherit
//! SCHED_FIFO from the main thread, `InheritedRealtime`).

use anyhow::{bail, Result};

use crate::caps::{
    bit, capget, capset, last_cap, name, CapSets, CAP_BPF, CAP_KILL, CAP_NET_ADMIN,
    CAP_NET_BIND_SERVICE, CAP_SETGID, CAP_SETPCAP, CAP_SETUID,
};

/// When a capability is kept for serving.
enum When {
    Always,
    /// The kernel refuses map access without it (measured).
    MapsNeedIt,
    PrivilegedPort,
    WithUser,
}

struct Keep {
    cap: u32,
    when: When,
    why: &'static str,
}

/// The serving set. A feature that needs another capability at run time
/// adds one line here (and to README's list).
const SERVING: &[Keep] = &[
    Keep {
        cap: CAP_BPF,
        when: When::MapsNeedIt,
        why: "map reads and updates (this kernel checks bpf() itself)",
    },
    Keep {
        cap: CAP_NET_ADMIN,
        when: When::Always,
        why: "sock_diag SOCK_DESTROY of connections",
    },
    Keep {
        cap: CAP_NET_BIND_SERVICE,
        when: When::PrivilegedPort,
        why: "fresh sorting listeners on a port below 1024",
    },
    Keep {
        cap: CAP_SETUID,
        when: When::WithUser,
        why: "starting workers as --user",
    },
    Keep {
        cap: CAP_SETGID,
        when: When::WithUser,
        why: "setting the workers' groups",
    },
    Keep {
        cap: CAP_SETPCAP,
        when: When::WithUser,
        why: "emptying each worker's bounding set",
    },
    Keep {
        cap: CAP_KILL,
        when: When::WithUser,
        why: "signalling workers that run as another user",
    },
];

/// What the serving set depends on.
pub struct Serving {
    pub port: u16,
    pub with_user: bool,
}

/// The sorting threads run SCHED_FIFO priority 1; asking for that needs
/// CAP_SYS_NICE, which serving does not keep. So the main thread takes the
/// policy before the drop (`begin`), the sorting threads inherit it when
/// they are created, and the main thread goes back to SCHED_OTHER (`end`,
/// allowed without privilege) before it starts any other thread.
pub struct InheritedRealtime {
    active: bool,
}

impl InheritedRealtime {
    pub fn begin() -> InheritedRealtime {
        let param = libc::sched_param { sched_priority: 1 };
        // SAFETY: plain syscall on the calling thread.
        let active = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0;
        InheritedRealtime { active }
    }

    pub fn end(self) {
        if self.active {
            let param = libc::sched_param { sched_priority: 0 };
            unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
        }
    }
}

/// Drops every capability but the serving set (above) from all sets,
/// bounding and ambient included. `maps_work` performs a map read and
/// says whether it succeeded: run once without CAP_BPF in the effective set,
/// it decides whether CAP_BPF stays. Returns what was kept and why.
pub fn drop_for_serving(
    serving: &Serving,
    maps_work: impl Fn() -> bool,
) -> Result<Vec<(u32, &'static str)>> {
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
    if threads != 1 {
        bail!("internal: {threads} threads started before privileges were dropped");
    }
    let now = capget()?;
    let wanted = |k: &Keep| match k.when {
        When::Always | When::MapsNeedIt => true,
        When::PrivilegedPort => serving.port != 0 && serving.port < unprivileged_port_start(),
        When::WithUser => serving.with_user,
    };
    let mut kept: Vec<&Keep> = SERVING
        .iter()
        .filter(|k| wanted(k) && now.permitted & bit(k.cap) != 0)
        .collect();
    // Measure whether maps still work without CAP_BPF (nor CAP_SYS_ADMIN,
    // which older kernels accept instead): effective set only, reversible.
    if kept.iter().any(|k| matches!(k.when, When::MapsNeedIt)) {
        let without: u64 = kept
            .iter()
            .filter(|k| !matches!(k.when, When::MapsNeedIt))
            .fold(0, |m, k| m | bit(k.cap));
        let trial = CapSets {
            effective: without & now.permitted,
            ..now
        };
        let works = capset(trial) == 0 && maps_work();
        if capset(now) != 0 {
            bail!(
                "cannot restore capabilities after the map probe: {}",
                std::io::Error::last_os_error()
            );
        }
        if works {
            kept.retain(|k| !matches!(k.when, When::MapsNeedIt));
        }
    }
    let keep: u64 = kept.iter().fold(0, |m, k| m | bit(k.cap));
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // may be about to go.
    if now.effective & bit(CAP_SETPCAP) != 0 {
        for cap in 0..=last_cap() {
            if keep & bit(cap) == 0 {
                // SAFETY: plain prctl.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
        }
    }
    // Ambient capabilities (a non-root sticky given them by systemd) would
    // pass to every worker's exec.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let sets = CapSets {
        effective: keep,
        permitted: keep,
        inheritable: 0,
    };
    if capset(sets) != 0 {
        bail!(
            "cannot drop capabilities: {}",
            std::io::Error::last_os_error()
        );
    }
    // Not dumpable: processes of the same uid (workers without --user, or
    // a non-root sticky's workers) cannot ptrace it or open its /proc fds.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    Ok(kept.iter().map(|k| (k.cap, k.why)).collect())
}

/// One log line: what the supervisor serves with.
pub fn describe(kept: &[(u32, &str)]) -> String {
    if kept.is_empty() {
        return "serving with no capabilities".to_owned();
    }
    let list: Vec<String> = kept
        .iter()
        .map(|(cap, why)| format!("{} ({why})", name(*cap)))
        .collect();
    format!("serving with {} only", list.join(", "))
}

/// `--user` needs CAP_SETGID (the groups) and CAP_SETUID (unless it names
/// ourselves).
pub fn check_can_become(uid: libc::uid_t) -> Result<()> {
    // SAFETY: plain getter.
    let euid = unsafe { libc::geteuid() };
    let sets = capget()?;
    let missing: Vec<String> = [(CAP_SETUID, uid != euid), (CAP_SETGID, true)]
        .into_iter()
        .filter(|&(cap, needed)| needed && sets.effective & bit(cap) == 0)
        .map(|(cap, _)| name(cap))
        .collect();
    if !missing.is_empty() {
        bail!(
            "--user needs {} to start workers as another user: run sticky as root or grant them (systemd: AmbientCapabilities=)",
            missing.join(" and ")
        );
    }
    Ok(())
}

fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// A worker's identity change, run between fork and exec: only raw
/// syscalls (async-signal-safe), everything prepared by the parent.
/// Returns the failing step's errno, or 0.
///
/// # Safety
/// Call only in the forked child; `groups` must stay valid.
pub unsafe fn drop_in_child(uid: libc::uid_t, gid: libc::gid_t, groups: &[libc::gid_t]) -> i32 {
    let errno = || *libc::__errno_location();
    if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) < 0 {
        return errno();
    }
    if libc::syscall(libc::SYS_setresgid, gid, gid, gid) < 0 {
        return errno();
    }
    // Empty the bounding set while CAP_SETPCAP is still effective (the
    // supervisor keeps it for this); past the last cap the kernel says
    // EINVAL, which ends the loop.
    for cap in 0..64 {
        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno() == libc::EINVAL {
            break;
        }
    }
    if libc::syscall(libc::SYS_setresuid, uid, uid, uid) < 0 {
        return errno();
    }
    // setresuid away from root already cleared these; also for uid 0.
    if capset(CapSets::default()) < 0 {
        return errno();
    }
    libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    );
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
        return errno();
    }
    0
}
