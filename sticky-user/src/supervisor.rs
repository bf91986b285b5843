//! Worker processes: start them, restart them with backoff when they exit,
//! stop them gracefully on SIGINT/SIGTERM.
//!
//! A worker's listener outlives the process: connections waiting in its
//! accept queue when it dies are served by its replacement. Its sessions are
//! forgotten at once (the selector balances their requests meanwhile). A
//! worker that keeps crashing has no replacement to serve its queue soon:
//! from its second quick exit on, its queue is handed to the live workers.

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use signal_hook::{
    consts::{SIGCHLD, SIGINT, SIGTERM},
    iterator::Signals,
};

use crate::{
    adoption,
    listeners::{stop_listening, worker_listener},
    log,
    sessions::SessionTable,
    sorter::{SockArray, WorkerListeners},
    spawn::WorkerCommand,
};

/// First restart delay after a crash; doubles per quick crash.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that ran this long was healthy: its next crash restarts fast.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// A worker of a dead supervisor, taken over (see `adoption`): running,
/// already marked live, but not our child.
pub struct Adopted {
    pub index: usize,
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// Sent on the signal channel when an adopted worker's pidfd says it exited.
const ADOPTED_EXITED: i32 = 0;

struct Worker {
    pid: Option<u32>,
    /// Set for an adopted worker: waitpid cannot see it, its pidfd can.
    pidfd: Option<Arc<OwnedFd>>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

/// The worker listeners and where they live: their address and slots.
pub struct Listeners {
    pub addr: SocketAddr,
    pub slots: SockArray,
    /// Worker `i`'s listener, in slot `i`; shared with the sorters, which
    /// may have to wake its waiters.
    pub workers: WorkerListeners,
}

pub struct Supervisor {
    command: WorkerCommand,
    addr: SocketAddr,
    slots: SockArray,
    listeners: WorkerListeners,
    control: PathBuf,
    sessions: Arc<Mutex<SessionTable>>,
    workers: Vec<Worker>,
    grace: Duration,
    signals: mpsc::Receiver<i32>,
    /// Clones of the signal channel's sender, for adopted workers' watchers.
    notify: mpsc::Sender<i32>,
}

impl Supervisor {
    /// Installs the signal handlers (before any worker exists, so no exit is
    /// missed) and starts every worker but the adopted ones.
    pub fn start(
        command: WorkerCommand,
        listeners: Listeners,
        control: PathBuf,
        sessions: Arc<Mutex<SessionTable>>,
        grace: Duration,
        adopted: Vec<Adopted>,
    ) -> Result<Supervisor> {
        let (tx, rx) = mpsc::channel();
        let notify = tx.clone();
        let mut signals =
            Signals::new([SIGINT, SIGTERM, SIGCHLD]).context("installing signal handlers")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if tx.send(sig).is_err() {
                        break;
                    }
                }
            })?;
        let now = Instant::now();
        let count = listeners.workers.lock().unwrap().len();
        let workers = (0..count)
            .map(|_| Worker {
                pid: None,
                pidfd: None,
                started: now,
                backoff: BACKOFF_MIN,
                restart_at: None,
            })
            .collect();
        let mut sup = Supervisor {
            command,
            addr: listeners.addr,
            slots: listeners.slots,
            listeners: listeners.workers,
            control,
            sessions,
            workers,
            grace,
            signals: rx,
            notify,
        };
        for a in adopted {
            sup.watch_adopted(a);
        }
        for i in 0..sup.workers.len() {
            if sup.workers[i].pid.is_some() {
                continue;
            }
            let pid = sup
                .spawn(i)
                .with_context(|| format!("cannot start worker `{}`", sup.command.display))?;
            log!("worker {i} started (pid {pid})");
        }
        Ok(sup)
    }

    /// Supervises until SIGINT or SIGTERM, then stops the workers.
    pub fn run(mut self) -> Result<()> {
        loop {
            let now = Instant::now();
            let next = self.workers.iter().filter_map(|w| w.restart_at).min();
            let timeout = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(3600));
            match self.signals.recv_timeout(timeout) {
                Ok(SIGCHLD) => self.reap(true),
                Ok(ADOPTED_EXITED) => self.reap_adopted(true),
                Ok(sig) => return self.stop(sig),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.stop(SIGTERM),
            }
            self.restart_due();
        }
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<u32> {
        // A copy: the lock is not held across fork and exec.
        let listener = self.listeners.lock().unwrap()[i].try_clone()?;
        let pid = self.command.spawn(&listener, i, &self.control)?;
        let w = &mut self.workers[i];
        w.pid = Some(pid);
        w.started = Instant::now();
        w.restart_at = None;
        if let Err(e) = self.sessions.lock().unwrap().worker_started(i, pid) {
            log!("worker {i}: cannot mark it live in the kernel map: {e:#}");
        }
        Ok(pid)
    }

    /// Collects every exited child; schedules restarts unless stopping.
    fn reap(&mut self, restart: bool) {
        loop {
            let mut status = 0;
            // SAFETY: plain syscall.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let Some(i) = self.workers.iter().position(|w| w.pid == Some(pid as u32)) else {
                continue;
            };
            self.exited(i, pid as u32, &describe(status), restart);
        }
    }

    /// Watches an adopted worker's pidfd on a thread of its own; its exit
    /// comes back as `ADOPTED_EXITED` on the signal channel.
    fn watch_adopted(&mut self, a: Adopted) {
        let pidfd = Arc::new(a.pidfd);
        let w = &mut self.workers[a.index];
        w.pid = Some(a.pid);
        w.pidfd = Some(pidfd.clone());
        w.started = Instant::now();
        let notify = self.notify.clone();
        let watcher = std::thread::Builder::new()
            .name(format!("adopted-{}", a.index))
            .spawn(move || {
                adoption::wait_exit(&pidfd);
                let _ = notify.send(ADOPTED_EXITED);
            });
        if let Err(e) = watcher {
            log!("worker {}: cannot watch the adopted process: {e}", a.index);
        }
    }

    /// Handles every adopted worker whose pidfd says it exited.
    fn reap_adopted(&mut self, restart: bool) {
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            let (Some(pid), Some(pidfd)) = (w.pid, &w.pidfd) else {
                continue;
            };
            if adoption::has_exited(pidfd) {
                self.workers[i].pidfd = None;
                self.exited(i, pid, "(adopted) exited, status unknown", restart);
            }
        }
    }

    /// Worker `i` (process `pid`) is gone: forget its sessions, and restart
    /// it with backoff unless stopping.
    fn exited(&mut self, i: usize, pid: u32, how: &str, restart: bool) {
        if let Err(e) = self.sessions.lock().unwrap().worker_exited(i) {
            log!("worker {i}: cannot mark it down in the kernel map: {e:#}");
        }
        let w = &mut self.workers[i];
        w.pid = None;
        if !restart {
            log!("worker {i} (pid {pid}) {how}");
            return;
        }
        let lived = w.started.elapsed();
        if lived >= HEALTHY_AFTER {
            w.backoff = BACKOFF_MIN;
        }
        let delay = w.backoff;
        w.backoff = (w.backoff * 2).min(BACKOFF_MAX);
        w.restart_at = Some(Instant::now() + delay);
        log!("worker {i} (pid {pid}) {how} after {lived:.1?}; restarting in {delay:?}");
        if delay > BACKOFF_MIN {
            if let Err(e) = self.hand_off_queue(i) {
                log!("worker {i}: cannot hand its queue to the other workers: {e:#}");
            }
        }
    }

    /// Gives worker `i` a fresh listener and shuts its old one: the kernel
    /// migrates the old queue through the selector, which balances it over
    /// the live workers (or answers 503 if none is). `i` must be marked down.
    fn hand_off_queue(&mut self, i: usize) -> Result<()> {
        let fresh = worker_listener(self.addr)?;
        self.slots
            .lock()
            .unwrap()
            .set(i as u32, &fresh, 0)
            .context("placing the fresh listener in its slot")?;
        let old = std::mem::replace(&mut self.listeners.lock().unwrap()[i], fresh);
        stop_listening(&old).context("shutting the old listener")?;
        Ok(())
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.workers.len() {
            if self.workers[i].restart_at.is_some_and(|t| t <= now) {
                match self.spawn(i) {
                    Ok(pid) => log!("worker {i} restarted (pid {pid})"),
                    Err(e) => {
                        let w = &mut self.workers[i];
                        w.backoff = (w.backoff * 2).min(BACKOFF_MAX);
                        w.restart_at = Some(now + w.backoff);
                        log!(
                            "worker {i}: restart failed: {e}; retrying in {:?}",
                            w.backoff
                        );
                    }
                }
            }
        }
    }

    /// SIGTERM to every worker's process group, SIGKILL after the grace
    /// period (or at a second signal).
    fn stop(mut self, sig: i32) -> Result<()> {
        log!(
            "{} received: stopping workers (grace {:?})",
            signal_name(sig),
            self.grace
        );
        // New connections now get the 503 listener: no worker would take
        // them. Those already queued stay, for workers that drain their
        // queue before exiting.
        if let Err(e) = self.sessions.lock().unwrap().stop_placing() {
            log!("cannot mark the workers down in the kernel map: {e:#}");
        }
        self.signal_all(libc::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while self.workers.iter().any(|w| w.pid.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.signals.recv_timeout(left) {
                Ok(SIGCHLD) => self.reap(false),
                Ok(ADOPTED_EXITED) => self.reap_adopted(false),
                Ok(_) => {
                    log!("second signal: killing workers");
                    self.signal_all(libc::SIGKILL);
                }
                Err(_) => {
                    log!("grace period over: killing workers");
                    self.signal_all(libc::SIGKILL);
                    std::thread::sleep(Duration::from_millis(100));
                    self.reap(false);
                    break;
                }
            }
        }
        Ok(())
    }

    fn signal_all(&self, sig: i32) {
        for pid in self.workers.iter().filter_map(|w| w.pid) {
            // SAFETY: plain syscall; the group is the worker's own (setpgid).
            unsafe { libc::kill(-(pid as i32), sig) };
        }
    }
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("was killed by {}", signal_name(libc::WTERMSIG(status)))
    } else {
        format!("stopped (status {status:#x})")
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}
