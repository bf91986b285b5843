//! Starting a worker process with socket activation (the systemd
//! convention): its listener as fd 3, `LISTEN_FDS=1`, `LISTEN_PID=<its pid>`,
//! `LISTEN_FDNAMES=sticky`, plus `STICKY_WORKER`, `STICKY_GENERATION` and
//! `STICKY_CONTROL`.
//!
//! Hand-rolled fork/exec because `LISTEN_PID` must hold the child's own pid,
//! known only after fork: everything is allocated before fork, and the child
//! only writes the pid's digits into a prepared buffer (async-signal-safe;
//! the supervisor is multi-threaded). Every other descriptor is made
//! `CLOEXEC` in the child, so fd 0-2 and 3 are all a worker inherits; plus,
//! for a Node.js worker (`--ipc`), fd 4: its end of a Node IPC channel to
//! the relay (`NODE_CHANNEL_FD=4`, `NODE_CHANNEL_SERIALIZATION_MODE=advanced`).
//!
//! With `--user`, the child also takes the worker identity before exec
//! (`privileges::drop_in_child`: groups, gid, an empty bounding set, uid, no
//! capabilities, `no_new_privs`), from ids resolved at startup.

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{bail, Result};

use crate::{identity::RunAs, privileges, relay::Relay};

/// `close_range(2)` flag: set CLOEXEC instead of closing.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// Room for the decimal pid in `LISTEN_PID=`.
const PID_DIGITS: usize = 20;
const LISTEN_PID: &[u8] = b"LISTEN_PID=";
/// Where a worker finds its Node IPC channel, if it has one.
const NODE_CHANNEL_FD: i32 = 4;

/// The worker command, resolved once at startup.
#[derive(Clone)]
pub struct WorkerCommand {
    program: CString,
    argv: Vec<CString>,
    pub display: String,
    /// The broadcast relay: `STICKY_RELAY`, and the Node IPC channels.
    relay: Option<Arc<Relay>>,
    node_ipc: bool,
    /// More `STICKY_*` variables for every worker (`NAME=value`).
    extra_env: Vec<Vec<u8>>,
    /// `--user`/`--group`: who the workers run as.
    run_as: Option<RunAs>,
}

/// Which worker a process is: its slot, its `STICKY_WORKER` index and its
/// reload generation.
#[derive(Clone, Copy)]
pub struct SpawnedWorker {
    pub slot: usize,
    pub index: usize,
    pub generation: u64,
}

impl WorkerCommand {
    /// Resolves `command[0]` like a shell would (PATH search unless it holds
    /// a '/'), so a typo fails at startup with one clear line.
    pub fn resolve(command: &[OsString]) -> Result<WorkerCommand> {
        let Some(first) = command.first() else {
            bail!("no worker command given (sticky run [OPTIONS] -- COMMAND [ARGS...])")
        };
        let path = find_program(first)?;
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| anyhow::anyhow!("NUL byte in worker command"))
        };
        Ok(WorkerCommand {
            program: cstr(path.as_os_str())?,
            argv: command.iter().map(|a| cstr(a)).collect::<Result<_>>()?,
            display: command
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            relay: None,
            node_ipc: false,
            extra_env: Vec::new(),
            run_as: None,
        })
    }

    /// Workers run as `run_as` (their replacements too).
    pub fn run_as(mut self, run_as: Option<RunAs>) -> WorkerCommand {
        self.run_as = run_as;
        self
    }

    /// Whether the program is Node.js (`node`, `nodejs`, `node20`...): what
    /// `--ipc auto` gives a Node IPC channel.
    pub fn is_node(&self) -> bool {
        let path = Path::new(OsStr::from_bytes(self.program.as_bytes()));
        let name = path.file_name().map(OsStr::as_bytes).unwrap_or_default();
        name == b"nodejs"
            || name
                .strip_prefix(b"node")
                .is_some_and(|v| v.iter().all(|c| c.is_ascii_digit()))
    }

    /// Workers get `STICKY_RELAY`, and with `node_ipc` a Node IPC channel
    /// to the relay as fd 4.
    pub fn with_relay(mut self, relay: Arc<Relay>, node_ipc: bool) -> WorkerCommand {
        self.relay = Some(relay);
        self.node_ipc = node_ipc;
        self
    }

    /// Gives every worker `name=value` (inherited `STICKY_*` variables are not).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.extra_env.push(format!("{name}={value}").into_bytes());
    }

    /// Forks and execs worker `index` of reload generation `generation`, in
    /// `slot` (its relay channel's key: two generations' worker `index`
    /// live side by side); returns its pid once exec succeeded.
    pub fn spawn(
        &self,
        listener: &OwnedFd,
        worker: SpawnedWorker,
        control: &Path,
    ) -> io::Result<u32> {
        let SpawnedWorker {
            slot,
            index,
            generation,
        } = worker;
        // Everything the child needs, built before fork.
        let mut env: Vec<Vec<u8>> = std::env::vars_os()
            .filter(|(k, _)| {
                let k = k.as_bytes();
                // NODE_CHANNEL_*: a channel sticky itself was given is not
                // the worker's (and its fd number is not fd 4 there).
                !(k.starts_with(b"LISTEN_")
                    || k.starts_with(b"STICKY_")
                    || k.starts_with(b"NODE_CHANNEL_"))
            })
            .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
            .collect();
        env.push(b"LISTEN_FDS=1".to_vec());
        env.push(b"LISTEN_FDNAMES=sticky".to_vec());
        env.push(format!("STICKY_WORKER={index}").into_bytes());
        env.push(format!("STICKY_GENERATION={generation}").into_bytes());
        env.push([b"STICKY_CONTROL=", control.as_os_str().as_bytes()].concat());
        if let Some(relay) = &self.relay {
            env.push([b"STICKY_RELAY=", relay.path().as_os_str().as_bytes()].concat());
        }
        // Dropped (our end stays with the relay) once the child has it.
        let channel = match (&self.relay, self.node_ipc) {
            (Some(relay), true) => Some(relay.node_channel(slot)?),
            _ => None,
        };
        if channel.is_some() {
            env.push(format!("NODE_CHANNEL_FD={NODE_CHANNEL_FD}").into_bytes());
            // `advanced`: V8 serialization, Buffers survive (`json` loses them).
            env.push(b"NODE_CHANNEL_SERIALIZATION_MODE=advanced".to_vec());
        }
        env.extend(self.extra_env.iter().cloned());
        let mut listen_pid = LISTEN_PID.to_vec();
        listen_pid.resize(LISTEN_PID.len() + PID_DIGITS + 1, 0);
        let env: Vec<CString> = env
            .into_iter()
            .filter_map(|e| CString::new(e).ok())
            .collect();
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(listen_pid.as_ptr().cast());
        envp.push(std::ptr::null());
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let pid_buf = listen_pid.as_mut_ptr();

        // Reports exec failure (errno) to the parent; closes on success.
        let mut pipe = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let listener_fd = listener.as_raw_fd();
        let channel_fd = channel.as_ref().map_or(-1, |c| c.as_raw_fd());

        // SAFETY: the child only makes async-signal-safe calls before exec.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = io::Error::last_os_error();
            unsafe {
                libc::close(pipe[0]);
                libc::close(pipe[1]);
            }
            return Err(e);
        }
        if pid == 0 {
            let plan = ChildPlan {
                err_fd: pipe[1],
                listener_fd,
                channel_fd,
                // SAFETY: within listen_pid, which has room for the digits.
                pid_digits: unsafe { pid_buf.add(LISTEN_PID.len()) },
                program: self.program.as_ptr(),
                argv: &argv,
                envp: &envp,
                run_as: self.run_as.as_ref(),
            };
            // SAFETY: the child, single-threaded until exec.
            unsafe { child(&plan) }
        }
        // SAFETY: plain syscalls on our own fds. setpgid here too: whichever
        // of parent and child runs first, the group exists before we signal it.
        unsafe {
            libc::setpgid(pid, pid);
            libc::close(pipe[1]);
        }
        let mut errno = [0u8; 4];
        let n = loop {
            let n = unsafe { libc::read(pipe[0], errno.as_mut_ptr().cast(), 4) };
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break n;
        };
        unsafe { libc::close(pipe[0]) };
        if n == 4 {
            // exec failed: reap the child, report why.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
        drop(env);
        Ok(pid as u32)
    }
}

/// Everything the forked child needs, prepared before fork.
struct ChildPlan<'a> {
    /// Write end of the exec-error pipe.
    err_fd: i32,
    /// To become fd 3.
    listener_fd: i32,
    /// To become fd 4, or -1: the Node IPC channel.
    channel_fd: i32,
    /// Where the digits of `LISTEN_PID=` go.
    pid_digits: *mut u8,
    program: *const libc::c_char,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    run_as: Option<&'a RunAs>,
}

/// Runs in the forked child. Never returns.
unsafe fn child(plan: &ChildPlan) -> ! {
    let fail_with = |err_fd: i32, errno: i32| -> ! {
        let bytes = errno.to_ne_bytes();
        libc::write(err_fd, bytes.as_ptr().cast(), 4);
        libc::_exit(127)
    };
    let fail = |err_fd: i32| -> ! { fail_with(err_fd, *libc::__errno_location()) };
    let pid_digits = plan.pid_digits;
    // Its own process group: signals for a worker reach its descendants too.
    libc::setpgid(0, 0);
    // Rust ignores SIGPIPE; ignored signals survive exec. Undo that, and any
    // signal mask, so the worker starts like from a shell.
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

    // Keep the error pipe off fds 3 and 4, and the channel off fd 3.
    let mut err_fd = plan.err_fd;
    if err_fd == 3 || err_fd == 4 {
        err_fd = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, 5);
    }
    let mut channel_fd = plan.channel_fd;
    if channel_fd == 3 {
        channel_fd = libc::fcntl(3, libc::F_DUPFD_CLOEXEC, 5);
    }
    let listener_fd = plan.listener_fd;
    if listener_fd == 3 {
        libc::fcntl(3, libc::F_SETFD, 0); // clear CLOEXEC
    } else if libc::dup2(listener_fd, 3) < 0 {
        fail(err_fd);
    }
    let mut first_closed = 4u32;
    if plan.channel_fd >= 0 {
        if channel_fd == NODE_CHANNEL_FD {
            libc::fcntl(NODE_CHANNEL_FD, libc::F_SETFD, 0);
        } else if libc::dup2(channel_fd, NODE_CHANNEL_FD) < 0 {
            fail(err_fd);
        }
        first_closed = 5;
    }

    // LISTEN_PID=<own pid>, written in place.
    let mut pid = libc::getpid() as u32;
    let mut digits = [0u8; PID_DIGITS];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (pid % 10) as u8;
        n += 1;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    for i in 0..n {
        *pid_digits.add(i) = digits[n - 1 - i];
    }
    *pid_digits.add(n) = 0;

    // Descriptors sticky itself inherited without CLOEXEC (from a shell or
    // a service manager) must not reach the worker either: mark every fd
    // above 3 (or 4) close-on-exec (close_range, Linux 5.11+; the error pipe
    // stays open until exec succeeds).
    libc::syscall(
        libc::SYS_close_range,
        first_closed,
        u32::MAX,
        CLOSE_RANGE_CLOEXEC,
    );

    if let Some(who) = plan.run_as {
        let errno = privileges::drop_in_child(who.uid, who.gid, &who.groups);
        if errno != 0 {
            fail_with(err_fd, errno);
        }
    }

    libc::execve(plan.program, plan.argv.as_ptr(), plan.envp.as_ptr());
    fail(err_fd)
}

fn find_program(name: &OsStr) -> Result<PathBuf> {
    let as_path = Path::new(name);
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.as_bytes().contains(&b'/') {
        if executable(as_path) {
            return Ok(as_path.to_owned());
        }
        bail!(
            "worker command {} does not exist or is not executable",
            as_path.display()
        );
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!(
        "worker command `{}` not found in PATH",
        name.to_string_lossy()
    )
}
