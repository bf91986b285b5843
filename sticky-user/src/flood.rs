//! The SYN flood guard.
//!
//! A plain listener keeps at most its backlog of request sockets (half-open
//! handshakes) and answers further SYNs with SYN cookies. sticky's sorting
//! listeners are replaced at every rotation, so none of their request
//! queues ever fills: without this guard a flood of spoofed SYNs would
//! leave one request socket per SYN, for about a minute each.
//!
//! The guard samples the counters every `TICK`: handshakes started (`syn`)
//! minus connections placed (`placed_softirq`, `placed_queue`,
//! `placed_cookie`) over the last `WINDOW` is the number still open. Above
//! `ENTER` (the backlog a plain listener would allow) it sets
//! `config.flood`: the selector then sends every SYN to the overflow
//! listener, whose backlog is 0, so the kernel answers with cookies and
//! keeps nothing; the selector places each cookie connection by sid on its
//! first data segment. Below `LEAVE` it clears the flag. The overflow
//! listener is replaced whenever a connection is queued on it (one that got
//! a request socket just before the queue filled), which migrates it.
//!
//! In cookie mode (`--placement cookie`) every SYN goes to the overflow
//! listener anyway: the guard only keeps it plugged (`plug.rs`), replacing
//! it with the spare, plugged beforehand, before its plugs expire and
//! whenever a connection is queued on it (a SYN reusing a TIME_WAIT
//! connection's 4-tuple), after `COOKIE_BATCH`; then it plugs a new spare.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use sticky_common::{counter, Config, Mode, OVERFLOW_SLOT};

use crate::{
    listeners::{overflow_listener, plugged_overflow_listener, stop_listening},
    log,
    plug::Plugs,
    sorter::{readable, SockArray},
    steering::Counters,
};

const TICK: Duration = Duration::from_millis(100);
const WINDOW: Duration = Duration::from_secs(3);
/// Open handshakes that start flood mode: a plain listener's backlog.
const ENTER: u64 = 4096;
/// ... and end it.
const LEAVE: u64 = 1024;
/// Cookie mode: the longest a connection queued on the overflow listener
/// waits for its migration, so that one replacement takes several.
const COOKIE_BATCH: Duration = Duration::from_millis(1);
/// Cookie mode: how long a replaced overflow listener stays open for SYNs
/// already sent its way.
const SHUT_DELAY: Duration = Duration::from_millis(2);

pub struct SynFloodGuard {
    addr: SocketAddr,
    filter: Arc<OwnedFd>,
    listeners: SockArray,
    overflow: OwnedFd,
    config: Array<MapData, Config>,
    settings: Config,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Cookie mode: the overflow listener's request queue kept full.
    plugs: Option<Plugs>,
    /// Cookie mode: the next overflow listener, plugged (None: plugging it
    /// failed; tried again at the next replacement).
    spare: Option<OwnedFd>,
    /// (when, handshakes started, connections placed), oldest first.
    samples: VecDeque<(Instant, u64, u64)>,
}

impl SynFloodGuard {
    /// Puts an overflow listener in its slot; `settings` is the config
    /// currently in the kernel.
    pub fn new(
        addr: SocketAddr,
        filter: Arc<OwnedFd>,
        listeners: SockArray,
        config: Array<MapData, Config>,
        settings: Config,
        counters: Arc<Counters>,
        stop: Arc<AtomicBool>,
    ) -> Result<SynFloodGuard> {
        let mut config = config;
        let mut settings = settings;
        let mut plugs = (settings.mode == Mode::Cookie as u32).then(|| Plugs::new(addr));
        let overflow = match plugs.as_mut() {
            Some(plugs) => {
                let first = plugged_overflow_listener(addr, &*filter)?;
                plug_or_say_why(plugs.prepare(&first, &listeners, &mut config, &mut settings));
                plugs.flip(&mut config, &mut settings)?;
                first
            }
            None => {
                let overflow = overflow_listener(addr, &*filter)?;
                listeners
                    .lock()
                    .unwrap()
                    .set(OVERFLOW_SLOT, &overflow, 0)
                    .context("placing the overflow listener in its slot")?;
                overflow
            }
        };
        let mut guard = SynFloodGuard {
            plugs,
            spare: None,
            addr,
            filter,
            listeners,
            overflow,
            config,
            settings,
            counters,
            stop,
            samples: VecDeque::new(),
        };
        if guard.plugs.is_some() {
            guard.plug_spare()?;
        }
        Ok(guard)
    }

    pub fn run(&mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let queued = readable(&self.overflow, TICK);
            if queued && self.plugs.is_some() {
                // Cookie mode: only SYNs reusing a TIME_WAIT connection's
                // ports are queued here; gather them, since each
                // replacement costs PLUGS new plugs.
                std::thread::sleep(COOKIE_BATCH);
            }
            if queued || self.plugs.as_ref().is_some_and(Plugs::due) {
                if let Err(e) = self.replace_overflow() {
                    log!("overflow listener rotation failed: {e:#}");
                    std::thread::sleep(TICK);
                }
            }
            if self.plugs.is_some() {
                continue; // cookie mode: every SYN gets a cookie already
            }
            let open = self.open_handshakes();
            let flood = match self.settings.flood {
                0 if open > ENTER => 1,
                1 if open < LEAVE => 0,
                unchanged => unchanged,
            };
            if flood != self.settings.flood {
                self.settings.flood = flood;
                match self.config.set(0, self.settings, 0) {
                    Ok(()) if flood == 1 => log!(
                        "SYN flood: {open} handshakes open over {WINDOW:?}; answering SYNs with cookies"
                    ),
                    Ok(()) => log!("SYN flood over ({open} handshakes open); request sockets again"),
                    Err(e) => log!("cannot switch SYN flood mode: {e}"),
                }
            }
        }
    }

    /// Handshakes started minus connections placed over the last WINDOW.
    fn open_handshakes(&mut self) -> u64 {
        let c = &self.counters;
        let now = (
            Instant::now(),
            c.get(counter::SYN),
            c.get(counter::PLACED_SOFTIRQ)
                + c.get(counter::PLACED_QUEUE)
                + c.get(counter::PLACED_COOKIE),
        );
        self.samples.push_back(now);
        while self
            .samples
            .front()
            .is_some_and(|s| now.0.duration_since(s.0) > WINDOW)
        {
            self.samples.pop_front();
        }
        let (_, syn, placed) = self.samples[0];
        (now.1 - syn).saturating_sub(now.2 - placed)
    }

    /// A fresh overflow listener in the slot, the old one's queue migrated.
    fn replace_overflow(&mut self) -> Result<()> {
        if self.plugs.is_some() {
            return self.flip_to_spare();
        }
        let next = overflow_listener(self.addr, &*self.filter)?;
        self.listeners
            .lock()
            .unwrap()
            .set(OVERFLOW_SLOT, &next, 0)
            .context("updating the overflow slot")?;
        let old = std::mem::replace(&mut self.overflow, next);
        stop_listening(&old).context("shutting the previous overflow listener")?;
        Ok(())
    }

    /// Cookie mode: the spare takes the SYNs, a new spare is plugged in the
    /// old overflow listener's slot, the old one is shut (its queue
    /// migrates).
    fn flip_to_spare(&mut self) -> Result<()> {
        if self.spare.is_none() {
            self.plug_spare()?;
        }
        let (Some(plugs), Some(spare)) = (self.plugs.as_mut(), self.spare.take()) else {
            unreachable!("cookie mode, spare plugged above");
        };
        plugs.flip(&mut self.config, &mut self.settings)?;
        let flipped = Instant::now();
        let old = std::mem::replace(&mut self.overflow, spare);
        // Out of the map but still listening: SYNs the selector already
        // sent there still land. The next spare is plugged meanwhile.
        let plugged = self.plug_spare();
        // A SYN the selector sent to the old listener just before the
        // flip may still be on its way into it (another CPU's softirq):
        // shut at once, the listener would drop it and the client retry a
        // second later. Measured: a stall of 1 s at most renewals,
        // serially. Shutting is only needed for connections queued there,
        // which can wait that long.
        std::thread::sleep(SHUT_DELAY.saturating_sub(flipped.elapsed()));
        stop_listening(&old).context("shutting the previous overflow listener")?;
        plugged
    }

    /// Cookie mode: a new spare, plugged, in the slot taking no SYN.
    fn plug_spare(&mut self) -> Result<()> {
        let spare = plugged_overflow_listener(self.addr, &*self.filter)?;
        if let Some(plugs) = self.plugs.as_mut() {
            plug_or_say_why(plugs.prepare(
                &spare,
                &self.listeners,
                &mut self.config,
                &mut self.settings,
            ));
        }
        self.spare = Some(spare);
        Ok(())
    }
}

/// An overflow listener that could not be plugged still works: its first
/// SYN gets a request socket and takes the queue path (and a queued
/// connection makes the guard replace it, plugging again).
fn plug_or_say_why(plugged: Result<()>) {
    if let Err(e) = plugged {
        log!("SYN cookie plugs: {e:#}; until the next try, a connection may take the queue path");
    }
}
