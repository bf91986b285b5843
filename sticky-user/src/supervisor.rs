//! Worker processes: start them, restart them with backoff when they exit,
//! stop them gracefully on SIGINT/SIGTERM.
//!
//! A worker's listener outlives the process: connections waiting in its
//! accept queue when it dies are served by its replacement. Its sessions are
//! forgotten at once (the selector balances their requests meanwhile). A
//! worker that keeps crashing has no replacement to serve its queue soon:
//! from its second quick exit on, its queue is handed to the live workers.
//!
//! `sticky reload` (or SIGHUP) starts a new generation of workers in the
//! other slot of each worker's pair while the old one drains: see `reload`.

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use signal_hook::{
    consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use sticky_common::MAX_WORKERS;

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
    /// Its slot (see `slot_of`).
    pub index: usize,
    pub generation: u64,
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// `Worker::generation` of a slot no process ever used.
const NEVER: u64 = u64::MAX;

mod reload;

/// Kernel slots for `workers` workers per generation: two generations'
/// worth when they fit in `MAX_WORKERS` (a reload needs both), else one.
pub fn slot_count(workers: usize) -> usize {
    if 2 * workers <= MAX_WORKERS as usize {
        2 * workers
    } else {
        workers
    }
}

/// The slot of worker `index` (`STICKY_WORKER`) of reload generation
/// `generation`: even generations use the even slots, odd ones the odd
/// slots, so the old generation keeps its slots (and its sessions, which
/// name them) while the new one starts. Interleaved rather than in halves:
/// the selector's balancing stays uniform (see `pick_worker`).
pub fn slot_of(index: usize, generation: u64, workers: usize) -> usize {
    if slot_count(workers) == 2 * workers {
        2 * index + (generation % 2) as usize
    } else {
        index
    }
}

/// The worker index (`STICKY_WORKER`) of `slot`.
pub fn index_of(slot: usize, workers: usize) -> usize {
    if slot_count(workers) == 2 * workers {
        slot / 2
    } else {
        slot
    }
}

/// What the supervisor's loop waits for.
pub enum Event {
    Signal(i32),
    /// An adopted worker's pidfd says it exited.
    AdoptedExited,
    /// `reload` from the control socket (answered on the sender) or SIGHUP.
    Reload(Option<mpsc::Sender<String>>),
}

/// Both ends of the supervisor's event channel: the control socket keeps a
/// sender, to ask for reloads.
pub fn events() -> (mpsc::Sender<Event>, mpsc::Receiver<Event>) {
    mpsc::channel()
}

/// How the workers are run.
pub struct WorkerSettings {
    pub command: WorkerCommand,
    pub control: PathBuf,
    /// Workers per generation (`--workers`).
    pub workers: usize,
    /// SIGTERM to SIGKILL.
    pub grace: Duration,
    /// Longest time an old generation may keep serving after a reload.
    pub drain: Duration,
}

struct Worker {
    pid: Option<u32>,
    /// Reload generation of the process in (or due in) this slot.
    generation: u64,
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
    /// One per kernel slot: `slot_count(per_generation)`.
    workers: Vec<Worker>,
    per_generation: usize,
    /// The reload generation that takes new sessions.
    generation: u64,
    grace: Duration,
    drain: Duration,
    /// The old generation of a reload in progress.
    draining: Option<reload::Draining>,
    /// Processes sent SIGTERM by a drain or a rollback, not yet exited.
    retiring: Vec<reload::Retiring>,
    events: mpsc::Receiver<Event>,
    /// Clones of the event channel's sender, for adopted workers' watchers.
    notify: mpsc::Sender<Event>,
}

impl Supervisor {
    /// Installs the signal handlers (before any worker exists, so no exit is
    /// missed) and starts every worker of the current generation but the
    /// adopted ones. `events` comes from [`events`].
    pub fn start(
        settings: WorkerSettings,
        listeners: Listeners,
        sessions: Arc<Mutex<SessionTable>>,
        adopted: Vec<Adopted>,
        events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
    ) -> Result<Supervisor> {
        let (tx, rx) = events;
        let notify = tx.clone();
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGCHLD, SIGHUP])
            .context("installing signal handlers")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let event = match sig {
                        SIGHUP => Event::Reload(None),
                        sig => Event::Signal(sig),
                    };
                    if tx.send(event).is_err() {
                        break;
                    }
                }
            })?;
        let now = Instant::now();
        let count = listeners.workers.lock().unwrap().len();
        let workers = (0..count)
            .map(|_| Worker {
                pid: None,
                generation: NEVER,
                pidfd: None,
                started: now,
                backoff: BACKOFF_MIN,
                restart_at: None,
            })
            .collect();
        let mut sup = Supervisor {
            command: settings.command,
            addr: listeners.addr,
            slots: listeners.slots,
            listeners: listeners.workers,
            control: settings.control,
            sessions,
            workers,
            per_generation: settings.workers,
            generation: 0,
            grace: settings.grace,
            drain: settings.drain,
            draining: None,
            retiring: Vec::new(),
            events: rx,
            notify,
        };
        sup.adopt(adopted);
        for index in 0..sup.per_generation {
            let slot = slot_of(index, sup.generation, sup.per_generation);
            if sup.workers[slot].pid.is_some() {
                continue;
            }
            sup.workers[slot].generation = sup.generation;
            let pid = sup
                .spawn(slot)
                .with_context(|| format!("cannot start worker `{}`", sup.command.display))?;
            log!("{} started (pid {pid})", sup.name(slot));
        }
        Ok(sup)
    }

    /// Supervises until SIGINT or SIGTERM, then stops the workers.
    pub fn run(mut self) -> Result<()> {
        loop {
            let now = Instant::now();
            let mut next = self.workers.iter().filter_map(|w| w.restart_at).min();
            if self.draining.is_some() || !self.retiring.is_empty() {
                let tick = now + reload::TICK;
                next = Some(next.map_or(tick, |t| t.min(tick)));
            }
            let timeout = next
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(3600));
            match self.events.recv_timeout(timeout) {
                Ok(Event::Signal(SIGCHLD)) => self.reap(true),
                Ok(Event::AdoptedExited) => self.reap_adopted(true),
                Ok(Event::Signal(sig)) => return self.stop(sig),
                Ok(Event::Reload(reply)) => {
                    let answer = match self.reload() {
                        Ok(done) => format!("ok {done}\n"),
                        Err(why) => {
                            log!("reload refused: {why}");
                            format!("err {why}\n")
                        }
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(answer);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.stop(SIGTERM),
            }
            self.restart_due();
            self.drain_tick();
        }
    }

    /// How logs name the worker in `slot`: `worker I` before any reload (as
    /// always), `worker I of generation G` after.
    fn name(&self, slot: usize) -> String {
        let index = index_of(slot, self.per_generation);
        match self.workers[slot].generation {
            0 => format!("worker {index}"),
            g => format!("worker {index} of generation {g}"),
        }
    }

    /// Starts the process of `slot`, of the generation recorded there.
    fn spawn(&mut self, slot: usize) -> std::io::Result<u32> {
        // A copy: the lock is not held across fork and exec.
        let listener = self.listeners.lock().unwrap()[slot].try_clone()?;
        let generation = self.workers[slot].generation;
        let index = index_of(slot, self.per_generation);
        let pid = self.command.spawn(
            &listener,
            crate::spawn::SpawnedWorker {
                slot,
                index,
                generation,
            },
            &self.control,
        )?;
        let w = &mut self.workers[slot];
        w.pid = Some(pid);
        w.started = Instant::now();
        w.restart_at = None;
        let marked = self
            .sessions
            .lock()
            .unwrap()
            .worker_started(slot, pid, generation);
        if let Err(e) = marked {
            log!(
                "{}: cannot mark it live in the kernel map: {e:#}",
                self.name(slot)
            );
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
                let _ = notify.send(Event::AdoptedExited);
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

    /// The worker in slot `i` (process `pid`) is gone: forget its sessions,
    /// and restart it with backoff unless stopping, or unless it belongs to
    /// an old generation (or a reload is rolled back because of it).
    fn exited(&mut self, i: usize, pid: u32, how: &str, restart: bool) {
        let name = self.name(i);
        if let Err(e) = self.sessions.lock().unwrap().worker_exited(i) {
            log!("{name}: cannot mark it down in the kernel map: {e:#}");
        }
        self.retiring.retain(|r| r.slot != i);
        self.workers[i].pid = None;
        if !restart {
            log!("{name} (pid {pid}) {how}");
            return;
        }
        let lived = self.workers[i].started.elapsed();
        if self.workers[i].generation != self.generation {
            self.old_exited(i, pid, how);
            return;
        }
        if self.rolled_back(i, pid, how, lived) {
            return;
        }
        let w = &mut self.workers[i];
        if lived >= HEALTHY_AFTER {
            w.backoff = BACKOFF_MIN;
        }
        let delay = w.backoff;
        w.backoff = (w.backoff * 2).min(BACKOFF_MAX);
        w.restart_at = Some(Instant::now() + delay);
        log!("{name} (pid {pid}) {how} after {lived:.1?}; restarting in {delay:?}");
        if delay > BACKOFF_MIN {
            if let Err(e) = self.hand_off_queue(i) {
                log!("{name}: cannot hand its queue to the other workers: {e:#}");
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
                    Ok(pid) => log!("{} restarted (pid {pid})", self.name(i)),
                    Err(e) => {
                        let w = &mut self.workers[i];
                        w.backoff = (w.backoff * 2).min(BACKOFF_MAX);
                        w.restart_at = Some(now + w.backoff);
                        let backoff = w.backoff;
                        log!(
                            "{}: restart failed: {e}; retrying in {backoff:?}",
                            self.name(i)
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
            match self.events.recv_timeout(left) {
                Ok(Event::Signal(SIGCHLD)) => self.reap(false),
                Ok(Event::AdoptedExited) => self.reap_adopted(false),
                Ok(Event::Reload(reply)) => {
                    if let Some(reply) = reply {
                        let _ = reply.send("err sticky is stopping\n".into());
                    }
                }
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
