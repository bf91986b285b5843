//! The machine the bench runs on: where the binaries are, free ports,
//! other `sticky run` processes that add noise, and Ctrl-C. Depends on
//! nothing else of the bench.

use std::sync::atomic::{AtomicBool, Ordering};

/// The directory of this executable, where the other binaries of the build
/// (`sticky`, the workers) are found by default.
pub fn exe_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default()
}

/// Whether this kernel has `bpf_sk_assign_tcp_reqsk()` (Linux 6.9+), which
/// `--placement bpf-cookie` needs (sticky falls back to rotation without
/// it): its name is in the kernel's BTF.
pub fn kernel_has_bpf_cookie() -> bool {
    const KFUNC: &[u8] = b"\0bpf_sk_assign_tcp_reqsk\0";
    std::fs::read("/sys/kernel/btf/vmlinux")
        .is_ok_and(|btf| btf.windows(KFUNC.len()).any(|w| w == KFUNC))
}

pub fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Set by SIGINT/SIGTERM: workloads stop, servers are stopped, the run ends.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT/SIGTERM set `interrupted()` instead of killing the bench,
/// so that every server it started is stopped.
pub fn catch_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

/// Pids of `sticky run` processes other than this benchmark's own (which
/// are its children). Their session learners, attached to their cgroup,
/// may run on this benchmark's packets too, in both columns.
pub fn other_stickies() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|&b| b == 0);
            let is_sticky = args
                .next()
                .is_some_and(|a| a == b"sticky" || a.ends_with(b"/sticky"));
            let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...: comm may hold spaces.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            is_sticky && args.next() == Some(b"run") && parent != Some(me)
        })
        .collect();
    pids.sort_unstable();
    pids
}

pub fn warn_others(pids: &[u32]) {
    if !pids.is_empty() {
        eprintln!("note: other `sticky run` processes are running (pids {pids:?}): their session learners (on their cgroup and below) may run on this benchmark's packets in both columns, and their load adds noise");
    }
}

/// A JSON string literal of `s` (the reports write JSON by hand).
pub fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if (c as u32) < 0x20 => out += &format!("\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out + "\""
}

/// CPU time of process `pid` so far, user + system of all its threads, in
/// seconds (/proc/PID/stat, clock ticks); 0 if it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // pid (comm) state ppid ...: comm may hold spaces; utime, stime are
    // fields 14 and 15, i.e. 12 and 13 after the state.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}
