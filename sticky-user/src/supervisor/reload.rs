//! Reloads: a new generation of workers, the old one drained.
//!
//! `sticky reload` (or SIGHUP) starts a new process in every worker index,
//! in the other slot of the index's pair (`slot_of`), each with the
//! listener of that slot (its own). The new processes take new sessions at
//! once; the old ones are marked draining: requests carrying their sids
//! still reach them (the `sessions` map names their slots), balancing skips
//! them. An old process gets SIGTERM (SIGKILL after `--grace`) when it owns
//! no session any more (registered, or learned and not yet closed or idle)
//! or at the drain deadline, whichever comes first; its sessions then go
//! the way of any worker that exits, and its listener is replaced by a
//! fresh one (the old queue migrates to the new generation), ready for the
//! next reload.
//!
//! - Old processes are kept for at least `SETTLE` (or the whole drain, if
//!   shorter), even without sessions: the rollback needs them.
//! - Rollback: a new-generation process that exits within `SETTLE` of its
//!   start while the old generation still has processes that were not told
//!   to stop hands new sessions back to those; the new generation is
//!   stopped. One log line says so.
//! - A reload while another one drains is refused (the control socket
//!   answers `err ...`): two generations at most, so `2 * --workers` slots
//!   bound the kernel state, and the operator sees at once that the deploy
//!   did not start. Retry once the drain ends (`sticky stats`).

use std::time::{Duration, Instant};

use super::{slot_of, Adopted, Supervisor};
use crate::{log, sessions::Role};

/// How often the drain looks at the old workers' session counts.
pub(super) const TICK: Duration = Duration::from_millis(100);
/// A new process that lives this long has started; until then the old
/// generation is kept, ready to take new sessions back.
const SETTLE: Duration = Duration::from_secs(2);
/// How often a drain recounts learned sessions (one pass over the kernel
/// map; the expiry scan's own count may be seconds old).
const RECOUNT: Duration = Duration::from_millis(500);

/// The old generation of a reload in progress.
pub(super) struct Draining {
    old_generation: u64,
    started: Instant,
    deadline: Instant,
    /// `SETTLE`, or the drain window if shorter.
    settle: Duration,
    recounted: Option<Instant>,
}

/// A process sent SIGTERM by a drain or a rollback.
pub(super) struct Retiring {
    pub(super) slot: usize,
    since: Instant,
    killed: bool,
}

impl Supervisor {
    /// Starts a new generation. Returns what the operator is told.
    pub(super) fn reload(&mut self) -> Result<String, String> {
        let n = self.per_generation;
        if super::slot_count(n) < 2 * n {
            return Err(format!(
                "a reload needs two slots per worker: at most {} workers (this sticky runs {n}); \
                 restart it instead",
                sticky_common::MAX_WORKERS / 2
            ));
        }
        if let Some(d) = &self.draining {
            let left = self.old_processes().len();
            return Err(format!(
                "generation {} is still draining ({left} workers, deadline in {:.1?}); \
                 reload again once it is done",
                d.old_generation,
                d.deadline.saturating_duration_since(Instant::now())
            ));
        }
        let next = self.generation + 1;
        let targets: Vec<usize> = (0..n).map(|i| slot_of(i, next, n)).collect();
        if targets.iter().any(|&s| self.workers[s].pid.is_some()) {
            return Err("workers of an earlier generation are still stopping; \
                        reload again in a moment"
                .into());
        }
        let mut pids = Vec::new();
        for &slot in &targets {
            self.workers[slot].generation = next;
            self.workers[slot].backoff = super::BACKOFF_MIN;
            match self.spawn(slot) {
                Ok(pid) => pids.push(pid.to_string()),
                Err(e) => {
                    // Those started already are an old generation now.
                    for &s in &targets {
                        if self.workers[s].pid.is_some() {
                            self.retire(s);
                        }
                    }
                    return Err(format!(
                        "cannot start `{}`: {e}; generation {} keeps serving",
                        self.command.display, self.generation
                    ));
                }
            }
        }
        let old = self.generation;
        let mut draining = 0;
        for slot in 0..self.workers.len() {
            if self.workers[slot].generation != old {
                continue;
            }
            // A crashed old worker is not restarted: its index has a new process.
            self.workers[slot].restart_at = None;
            if self.workers[slot].pid.is_some() {
                self.set_role(slot, Role::Draining);
                draining += 1;
            }
        }
        self.set_generation(next);
        self.begin_drain(old);
        let summary = format!(
            "generation {next} started ({n} workers, pids {}); generation {old} drains \
             ({draining} workers) for up to {:?}",
            pids.join(","),
            self.drain
        );
        log!("reload: {summary}");
        Ok(summary)
    }

    fn begin_drain(&mut self, old_generation: u64) {
        let now = Instant::now();
        self.draining = Some(Draining {
            old_generation,
            started: now,
            deadline: now + self.drain,
            settle: SETTLE.min(self.drain),
            recounted: None,
        });
    }

    /// Stops the old processes whose time has come, kills those past their
    /// grace, and ends the drain once the old generation is gone.
    pub(super) fn drain_tick(&mut self) {
        let now = Instant::now();
        for r in &mut self.retiring {
            if !r.killed && now >= r.since + self.grace {
                r.killed = true;
                if let Some(pid) = self.workers[r.slot].pid {
                    // SAFETY: plain syscall; the worker's own process group.
                    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                }
            }
        }
        let Some(d) = &mut self.draining else { return };
        let (deadline, settled) = (now >= d.deadline, now >= d.started + d.settle);
        if settled && d.recounted.is_none_or(|t| now >= t + RECOUNT) {
            d.recounted = Some(now);
            self.sessions.lock().unwrap().recount_learned();
        }

        let mut cut = 0;
        for slot in self.old_processes() {
            let owned = self.sessions.lock().unwrap().owned(slot);
            if deadline || (owned == 0 && settled) {
                cut += owned;
                if !deadline {
                    log!("{}: no session left, stopping it", self.name(slot));
                }
                self.retire(slot);
            }
        }
        if deadline && cut > 0 {
            log!("drain deadline: stopping the old generation with {cut} sessions left");
        }
        self.end_drain_if_done();
    }

    /// An old generation's process exited (drained, stopped, crashed or
    /// rolled back): no restart; its slot gets a fresh listener, the old
    /// one's queue migrating to the live workers.
    pub(super) fn old_exited(&mut self, slot: usize, pid: u32, how: &str) {
        log!("{} (pid {pid}) {how}", self.name(slot));
        if let Err(e) = self.hand_off_queue(slot) {
            log!(
                "{}: cannot hand its queue to the other workers: {e:#}",
                self.name(slot)
            );
        }
        self.end_drain_if_done();
    }

    fn end_drain_if_done(&mut self) {
        let Some(d) = &self.draining else { return };
        let old = d.old_generation;
        if self.old_processes().is_empty() && self.retiring.is_empty() {
            log!(
                "reload done: generation {old} stopped, generation {} serves",
                self.generation
            );
            self.draining = None;
        }
    }

    /// Rolls the reload back if the current generation's process in `slot`
    /// died young while old processes can still take over. True if it did.
    pub(super) fn rolled_back(
        &mut self,
        slot: usize,
        pid: u32,
        how: &str,
        lived: Duration,
    ) -> bool {
        let Some(d) = &self.draining else {
            return false;
        };
        let (settle, old, failed) = (d.settle, d.old_generation, self.generation);
        let back = self.old_processes();
        if lived >= settle || back.is_empty() {
            return false;
        }
        let name = self.name(slot);
        for &s in &back {
            self.set_role(s, Role::Accepting);
        }
        self.set_generation(old);
        self.draining = None;
        for s in 0..self.workers.len() {
            let w = &mut self.workers[s];
            if w.generation == old && w.pid.is_none() {
                // Stopped or crashed during the drain: its index serves again.
                w.restart_at = Some(Instant::now());
            }
            if w.generation == failed && w.pid.is_some() {
                self.retire(s);
            }
        }
        if let Err(e) = self.hand_off_queue(slot) {
            log!("{name}: cannot hand its queue to the other workers: {e:#}");
        }
        log!(
            "reload rolled back: {name} (pid {pid}) {how} after {lived:.1?}; \
             generation {old} takes new sessions again ({} workers)",
            back.len()
        );
        true
    }

    /// Slots of running processes of an old generation not yet told to stop.
    fn old_processes(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&s| {
                let w = &self.workers[s];
                w.generation != self.generation
                    && w.pid.is_some()
                    && !self.retiring.iter().any(|r| r.slot == s)
            })
            .collect()
    }

    /// SIGTERM to the process in `slot`, which takes no connection from now
    /// on; SIGKILL follows after the grace period (`drain_tick`).
    fn retire(&mut self, slot: usize) {
        let Some(pid) = self.workers[slot].pid else {
            return;
        };
        self.set_role(slot, Role::Retiring);
        // SAFETY: plain syscall; the worker's own process group.
        unsafe { libc::kill(-(pid as i32), libc::SIGTERM) };
        self.retiring.push(Retiring {
            slot,
            since: Instant::now(),
            killed: false,
        });
    }

    fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
        self.sessions
            .lock()
            .unwrap()
            .set_current_generation(generation);
    }

    fn set_role(&mut self, slot: usize, role: Role) {
        if let Err(e) = self.sessions.lock().unwrap().set_role(slot, role) {
            log!("{}: cannot update the kernel map: {e:#}", self.name(slot));
        }
    }

    /// Takes over the workers of a dead supervisor (`adoption`). If it died
    /// during a drain, the newest generation found is the current one and
    /// older processes drain again, for a full `--drain` from now.
    pub(super) fn adopt(&mut self, adopted: Vec<Adopted>) {
        let Some(newest) = adopted.iter().map(|a| a.generation).max() else {
            return;
        };
        self.set_generation(newest);
        let mut old = None;
        for a in adopted {
            let slot = a.index;
            self.workers[slot].generation = a.generation;
            if a.generation != newest {
                old = Some(a.generation);
                self.set_role(slot, Role::Draining);
            }
            self.watch_adopted(a);
        }
        if let Some(old) = old {
            log!(
                "generation {old} was draining: it drains again for up to {:?}",
                self.drain
            );
            self.begin_drain(old);
        }
    }
}
