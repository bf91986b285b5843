//! The sorting loop: rotates the two sorting listeners through the sorting
//! slot so that every connection reaches its worker (DESIGN.md, mechanism).
//!
//! At any moment one sorting listener (`current`) listens and sits in the
//! sorting slot, taking every SYN; the other (`resting`) is shut. A rotation:
//! 1. `listen(resting)`: it takes back the request sockets still attached to
//!    it (their data then takes the queue path below);
//! 2. put it in the sorting slot: new SYNs go there;
//! 3. `shutdown(current, SHUT_RD)`: the kernel migrates its accept queue
//!    through the selector, which uses the socket filter's decisions (queue
//!    path). Its request sockets stay attached to a closed listener, so
//!    their first data segment migrates in softirq straight to the owner
//!    (softirq path), with no user-space step.
//!
//! Rotations happen when `current` becomes readable (a connection is
//! queued: migrate it now) and every `period` while SYNs keep arriving (so
//! that slower clients take the softirq path).

use std::{
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, ReusePortSockArray};
use sticky_common::{counter, SORTING_SLOT};

use crate::{
    listeners::{listen, stop_listening},
    steering::Counters,
};

pub struct SortingLoop {
    listeners: ReusePortSockArray<MapData>,
    current: OwnedFd,
    resting: OwnedFd,
    period: Duration,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
}

impl SortingLoop {
    /// Starts listening on the first sorting listener and puts it in the
    /// sorting slot. `sockets` must carry the socket filter already.
    pub fn start(
        mut listeners: ReusePortSockArray<MapData>,
        sockets: [OwnedFd; 2],
        period: Duration,
        counters: Arc<Counters>,
    ) -> Result<SortingLoop> {
        let [current, resting] = sockets;
        listen(&current)?;
        listeners
            .set(SORTING_SLOT, &current, 0)
            .context("placing the sorting listener in its slot")?;
        Ok(SortingLoop {
            listeners,
            current,
            resting,
            period,
            counters,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Runs the loop on its own thread until the returned handle is stopped.
    pub fn spawn(mut self) -> SortingHandle {
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("sorter".into())
            .spawn(move || self.run())
            .expect("spawning the sorting thread");
        SortingHandle {
            stop,
            thread: Some(thread),
        }
    }

    fn run(&mut self) {
        let mut syns_seen = self.counters.get(counter::SYN);
        let mut next_tick = Instant::now() + self.period;
        while !self.stop.load(Ordering::Relaxed) {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let readable = wait_readable(&self.current, timeout);
            if !readable {
                next_tick = Instant::now() + self.period;
                // Only rotate on the clock while new connections arrive.
                let syns = self.counters.get(counter::SYN);
                if syns == syns_seen {
                    continue;
                }
                syns_seen = syns;
            }
            if let Err(e) = self.rotate() {
                crate::log!("sorting listener rotation failed: {e:#}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn rotate(&mut self) -> Result<()> {
        listen(&self.resting)?;
        self.listeners
            .set(SORTING_SLOT, &self.resting, 0)
            .context("updating the sorting slot")?;
        // Migrates the queue; the socket stays a member of the group.
        stop_listening(&self.current).context("shutting the previous sorting listener")?;
        std::mem::swap(&mut self.current, &mut self.resting);
        Ok(())
    }
}

pub struct SortingHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SortingHandle {
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// ppoll(2) on one fd: true if readable before `timeout` (microsecond
/// precision, so periods below 1 ms work).
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask change.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}
