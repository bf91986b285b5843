//! The sorting loops: per CPU, rotate sorting listeners through that CPU's
//! sorting slot so that every connection reaches its worker (DESIGN.md,
//! mechanism).
//!
//! At any moment one sorting listener of a CPU (`current`) sits in the CPU's
//! slot, taking the SYNs processed on that CPU, and a fresh one (`spare`)
//! listens, ready. A rotation:
//! 1. put the spare in the slot: new SYNs go there;
//! 2. `shutdown(current, SHUT_RD)`: the kernel migrates its accept queue
//!    through the selector, which uses the socket filter's decisions (queue
//!    path);
//! 3. close it: its request sockets stay attached to a closed listener, so
//!    their first data segment migrates in softirq straight to the owner
//!    (softirq path), with no user-space step;
//! 4. make the next spare (after the migration: off the connections' path);
//! 5. if the queue was not empty, wake the worker listeners' waiters
//!    (`wake_waiters`): some kernels do not after a migration.
//!
//! Rotations happen when the CPU's doorbell rings (the selector rings it at
//! each SYN: rotating before the client's data arrives sends that data down
//! the softirq path), when `current` becomes readable (a connection is
//! queued: migrate it now), and every `period` while SYNs keep arriving (a
//! fallback, should a doorbell wake-up be missed). With `--rotation-batch`
//! a busy CPU rotates at most once per window instead (`pacing`).
//!
//! Why one loop per CPU, pinned: a child that completes on a listener while
//! another CPU shuts that listener is reset by the kernel (the state check
//! in `inet_csk_reqsk_queue_add`). Softirq work and a syscall on the same
//! CPU never interleave, and a flow's segments are normally processed on one
//! CPU (RSS/RPS, or the sending CPU on loopback). The loops also ask for
//! SCHED_FIFO: a rotation is a few syscalls, and queued connections wait
//! for it.

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{ArrayOfMaps, MapData, ReusePortSockArray};
use sticky_common::{counter, Handoff, HANDOFF_GRACE_NS, SORTING_SLOT};

mod pacing;

use crate::{
    listeners::{sorting_listener, stop_listening, wake_waiters},
    log,
    steering::{monotonic_ns, Counters, Doorbell, HandoffMap},
};

/// Ticks back off up to this multiple of the period while a CPU sees no SYN.
const IDLE_BACKOFF: u32 = 64;

/// The listener slots, shared by the sorters and the supervisor.
pub type SockArray = Arc<Mutex<ReusePortSockArray<MapData>>>;

/// The worker listeners now in the slots, owned with the supervisor (which
/// replaces one when it hands a crash-looping worker's queue off); the
/// sorters wake their waiters after a migration.
pub type WorkerListeners = Arc<Mutex<Vec<OwnedFd>>>;

struct SortingLoop {
    cpu: usize,
    addr: SocketAddr,
    filter: Arc<OwnedFd>,
    listeners: SockArray,
    workers: WorkerListeners,
    current: OwnedFd,
    spare: OwnedFd,
    doorbell: Doorbell,
    period: Duration,
    rotate_on_clock: bool,
    batch: Option<Duration>,
    counters: Arc<Counters>,
    handoff: Arc<HandoffMap>,
    stop: Arc<AtomicBool>,
}

/// What the sorting loops are given: the slots they rotate in, the
/// listeners they wake, and the kernel objects they read.
pub struct Sorting {
    pub slots: SockArray,
    pub workers: WorkerListeners,
    pub addr: SocketAddr,
    /// `sticky_sort`, attached to every sorting listener.
    pub filter: OwnedFd,
    /// One sorting loop (and slot) per CPU.
    pub cpus: usize,
    /// Fallback rotation period while SYNs arrive.
    pub period: Duration,
    /// Whether to rotate on that clock at all: not in cookie mode, where
    /// SYNs go to the overflow listener (counted, but never on a sorting
    /// listener); its loops then rotate only when a listener is readable.
    pub rotate_on_clock: bool,
    /// `--rotation-batch`: while busy, at most one rotation per this
    /// window (`pacing`); `None`: one at every doorbell.
    pub batch: Option<Duration>,
    pub counters: Arc<Counters>,
    pub handoff: HandoffMap,
    pub doorbells: ArrayOfMaps<MapData, MapData>,
}

/// The loops, their listeners and doorbells made, no thread started yet:
/// making a doorbell creates a map, which needs CAP_BPF, and the
/// supervisor drops its privileges before it starts any thread.
pub struct Prepared {
    loops: Vec<SortingLoop>,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    filter: Arc<OwnedFd>,
    listeners: SockArray,
}

/// Makes one loop per CPU, each with its sorting listeners on `addr`
/// carrying the socket filter `filter`; `Prepared::start` runs them.
pub fn prepare(sorting: Sorting) -> Result<Prepared> {
    let Sorting {
        slots: listeners,
        workers,
        addr,
        filter,
        cpus,
        period,
        rotate_on_clock,
        batch,
        counters,
        handoff,
        mut doorbells,
    } = sorting;
    let handoff = Arc::new(handoff);
    let filter = Arc::new(filter);
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for cpu in 0..cpus {
        let current = sorting_listener(addr, &*filter)?;
        let spare = sorting_listener(addr, &*filter)?;
        let doorbell = Doorbell::install(&mut doorbells, cpu)?;
        listeners
            .lock()
            .unwrap()
            .set(SORTING_SLOT + cpu as u32, &current, 0)
            .context("placing a sorting listener in its slot")?;
        loops.push(SortingLoop {
            cpu,
            addr,
            filter: filter.clone(),
            listeners: listeners.clone(),
            workers: workers.clone(),
            current,
            spare,
            doorbell,
            period,
            rotate_on_clock,
            batch,
            counters: counters.clone(),
            handoff: handoff.clone(),
            stop: stop.clone(),
        });
    }
    Ok(Prepared {
        loops,
        stop,
        addr,
        filter,
        listeners,
    })
}

impl Prepared {
    /// Starts a thread per loop.
    pub fn start(self) -> Result<SortingHandle> {
        let mut threads = Vec::new();
        for mut sorting in self.loops {
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sorter-{}", sorting.cpu))
                    .spawn(move || sorting.run())
                    .context("spawning a sorting thread")?,
            );
        }
        Ok(SortingHandle {
            stop: self.stop,
            threads,
            addr: self.addr,
            filter: self.filter,
            listeners: self.listeners,
        })
    }
}

impl SortingLoop {
    fn run(&mut self) {
        if let Err(e) = pin_to_cpu(self.cpu) {
            log!(
                "sorter for CPU {} cannot be pinned ({e}); connections on that CPU may rarely be reset",
                self.cpu
            );
        }
        set_realtime();
        match self.batch {
            Some(window) => self.run_batched(window),
            None => self.run_per_syn(),
        }
    }

    fn run_per_syn(&mut self) {
        let mut syns_at_rotation = self.syns();
        let mut tick = self.period;
        let mut next_tick = Instant::now() + tick;
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let (queued, rang) = wait(&self.current, self.doorbell.fd(), timeout);
            if rang {
                self.doorbell.drain();
            }
            if !queued && !rang {
                // The clock: rotate only if SYNs came since the last rotation.
                let active;
                (active, tick) = self.clock(tick, self.syns() != syns_at_rotation);
                next_tick = Instant::now() + tick;
                if !active {
                    continue;
                }
            }
            syns_at_rotation = self.syns();
            self.rotate_or_log();
        }
    }

    /// The fallback clock, after a wait that nothing ended: whether to
    /// rotate (SYNs came since the last rotation), and the next tick: the
    /// period while SYNs come, else backing off up to `IDLE_BACKOFF` periods.
    fn clock(&self, tick: Duration, syns_came: bool) -> (bool, Duration) {
        let active = self.rotate_on_clock && syns_came;
        let next = if active {
            self.period
        } else {
            (tick * 2).min(self.period * IDLE_BACKOFF)
        };
        (active, next)
    }

    fn rotate_or_log(&mut self) {
        if let Err(e) = self.rotate() {
            log!(
                "sorting listener rotation on CPU {} failed: {e:#}",
                self.cpu
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn syns(&self) -> u64 {
        self.counters.get_cpu(counter::SYN, self.cpu)
    }

    fn rotate(&mut self) -> Result<()> {
        self.listeners
            .lock()
            .unwrap()
            .set(SORTING_SLOT + self.cpu as u32, &self.spare, 0)
            .context("updating the sorting slot")?;
        // A first segment of this CPU's listener may be completing on
        // another CPU: announce the shutdown, wait such completions out.
        let handoff = self.handoff.entry(self.cpu);
        close_handoff(handoff);
        let queued = readable(&self.current, Duration::ZERO);
        // Migrates the queue; the socket stays in the group's closed part
        // (for its request sockets) until the kernel frees it.
        let stopped = stop_listening(&self.current);
        handoff.closing.store(0, Ordering::SeqCst);
        stopped.context("shutting the previous sorting listener")?;
        if queued {
            for worker in self.workers.lock().unwrap().iter() {
                wake_waiters(worker).context("waking a worker listener's waiters")?;
            }
        }
        let next = sorting_listener(self.addr, &*self.filter)?;
        // Closes the old listener (dropped here); its request sockets live on.
        self.current = std::mem::replace(&mut self.spare, next);
        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

pub struct SortingHandle {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
    filter: Arc<OwnedFd>,
    listeners: SockArray,
}

impl SortingHandle {
    /// Starts the SYN flood guard (`flood`) next to the sorting loops;
    /// `settings` is the config in the kernel.
    pub fn guard_floods(
        &mut self,
        config: aya::maps::Array<MapData, sticky_common::Config>,
        settings: sticky_common::Config,
        counters: Arc<Counters>,
    ) -> Result<()> {
        let mut guard = crate::flood::SynFloodGuard::new(
            self.addr,
            self.filter.clone(),
            self.listeners.clone(),
            config,
            settings,
            counters,
            self.stop.clone(),
        )?;
        self.threads.push(
            std::thread::Builder::new()
                .name("flood-guard".into())
                .spawn(move || guard.run())
                .context("spawning the SYN flood guard")?,
        );
        Ok(())
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Longest a rotation is put off while cross-CPU first segments keep
/// coming; past it, `closing` stays set and new ones are dropped (their
/// clients retransmit) until the last is HANDOFF_GRACE_NS old.
const HANDOFF_POSTPONE_MAX: Duration = Duration::from_millis(10);

/// Sets `closing` once no first segment of this CPU's listener can still be
/// completing on another CPU: the last announcement is HANDOFF_GRACE_NS old
/// (usually at once: announcements are rare and the clock moves on). While
/// one is recent, `closing` is cleared again and the rotation waits, so
/// segments are dropped only in the short window of each check.
fn close_handoff(handoff: &Handoff) {
    let start = Instant::now();
    loop {
        handoff.closing.store(1, Ordering::SeqCst);
        let age = monotonic_ns().saturating_sub(handoff.busy_ns.load(Ordering::SeqCst));
        if age >= HANDOFF_GRACE_NS {
            return;
        }
        let left = Duration::from_nanos(HANDOFF_GRACE_NS - age);
        if start.elapsed() >= HANDOFF_POSTPONE_MAX {
            std::thread::sleep(left); // closing stays set: the wait ends
            continue;
        }
        handoff.closing.store(0, Ordering::SeqCst);
        std::thread::sleep(left.min(Duration::from_micros(100)));
    }
}

fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// SCHED_FIFO at the lowest real-time priority, if allowed; else stays normal.
fn set_realtime() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: plain syscall on the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

/// ppoll(2) on the listener and the doorbell, with microsecond precision:
/// (listener readable, doorbell rang).
/// Whether `listener` has a queued connection, waiting up to `timeout`.
pub fn readable(listener: &OwnedFd, timeout: Duration) -> bool {
    wait(listener, -1, timeout).0 // poll ignores a negative fd
}

fn wait(listener: &OwnedFd, doorbell: RawFd, timeout: Duration) -> (bool, bool) {
    let mut pfds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: doorbell,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: two valid pollfds, a valid timespec, no signal mask change.
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if rc <= 0 {
        return (false, false);
    }
    let readable = |p: &libc::pollfd| p.revents & libc::POLLIN != 0;
    (readable(&pfds[0]), readable(&pfds[1]))
}
