//! Who the workers are and which sessions each owns, in the kernel maps
//! the selector reads (`sessions`, `workers`).
//!
//! Sessions come two ways: registered over the control socket, or learned
//! by the kernel from a worker's Engine.IO open packet (`sticky_learn`).
//! Both live only in the kernel `sessions` map, keyed by the sid's hash
//! (`SidHasher`), each entry saying its worker and whether it was
//! registered: user space keeps no copy of the sids, it asks the map who
//! owns one. Explicit registration wins: `open` replaces a learned entry,
//! `close` removes either kind.
//!
//! Invariants:
//! - a slot's `sessions` counts the registered entries of its worker in the
//!   kernel map (changed only here, under the table's lock: the kernel
//!   never writes a registered entry);
//! - `workers[i].sessions` in the kernel is worker `i`'s registered sessions
//!   plus its open learned ones as of the last `expire_learned`
//!   (least-connection reads it);
//! - a worker's sessions are forgotten when its process exits, and the
//!   generation bump makes its old control connections stale;
//! - slots hold two reload generations of workers (see
//!   `supervisor::slot_of`); the kernel `workers[i].live` says whether slot
//!   `i` takes new sessions (accepting), only its own (draining) or none.

use std::time::{Duration, Instant};

use crate::{batch, steering::monotonic_ns};
use anyhow::Result;
use aya::maps::{Array, HashMap, IterableMap, MapData, MapError};
use sticky_common::{
    Session, SidHasher, WorkerState, WORKER_ACCEPTING, WORKER_DOWN, WORKER_DRAINING,
};

/// A worker as seen by the control socket: its slot and which incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerId {
    pub index: usize,
    pub generation: u64,
}

/// What the selector may send to a slot's running worker.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub enum Role {
    /// Its own sessions and balanced new ones.
    #[default]
    Accepting,
    /// Its own sessions only: an old generation after a reload.
    Draining,
    /// Nothing: it has been asked to exit.
    Retiring,
}

#[derive(Default)]
struct Slot {
    pid: Option<u32>,
    /// Incarnation counter: control connections of an earlier process are stale.
    generation: u64,
    /// Processes started (or adopted) in this slot.
    starts: u64,
    sessions: u32,
    learned: u32,
    role: Role,
    /// The reload generation of the process in this slot (0 before any
    /// reload); None while the slot was never used.
    reload_generation: Option<u64>,
}

pub struct SessionTable {
    kernel_sessions: HashMap<MapData, u64, Session>,
    kernel_workers: Array<MapData, WorkerState>,
    /// The map's keys are hashes of the sids.
    hasher: SidHasher,
    slots: Vec<Slot>,
    /// Worker processes per generation (`--workers`).
    per_generation: usize,
    /// The reload generation that takes new sessions.
    current: u64,
    /// max_entries of the kernel `sessions` map.
    capacity: usize,
    /// Shutting down: no worker is live for the selector anymore.
    stopping: bool,
    /// When the last pass over the kernel map ended, and how long it took.
    last_pass: Option<(Instant, Duration)>,
}

/// A drain's recount waits at least this many times the last pass's duration.
const RECOUNT_BUDGET: u32 = 20;

impl SessionTable {
    pub fn new(
        kernel_sessions: HashMap<MapData, u64, Session>,
        kernel_workers: Array<MapData, WorkerState>,
        hasher: SidHasher,
        workers: usize,
        capacity: usize,
    ) -> SessionTable {
        SessionTable {
            kernel_sessions,
            kernel_workers,
            hasher,
            slots: (0..crate::supervisor::slot_count(workers))
                .map(|_| Slot::default())
                .collect(),
            per_generation: workers,
            current: 0,
            capacity,
            stopping: false,
            last_pass: None,
        }
    }

    /// A process of reload generation `generation` started in slot `index`,
    /// accepting.
    pub fn worker_started(&mut self, index: usize, pid: u32, generation: u64) -> Result<()> {
        let slot = &mut self.slots[index];
        slot.pid = Some(pid);
        slot.generation += 1;
        slot.role = Role::Accepting;
        // A reload's new generation in a slot is a start, not a restart.
        if slot.reload_generation != Some(generation) {
            slot.starts = 0;
        }
        slot.reload_generation = Some(generation);
        slot.starts += 1;
        self.publish(index)
    }

    /// The reload generation that takes new sessions (for `summary`).
    pub fn set_current_generation(&mut self, generation: u64) {
        self.current = generation;
    }

    /// Sets what the selector may send to slot `index`'s running worker.
    pub fn set_role(&mut self, index: usize, role: Role) -> Result<()> {
        self.slots[index].role = role;
        self.publish(index)
    }

    /// Sessions the worker in slot `index` owns, registered and learned (as
    /// of the last expiry scan).
    pub fn owned(&self, index: usize) -> u32 {
        let slot = &self.slots[index];
        slot.sessions + slot.learned
    }

    /// Takes over sessions from a dead supervisor's map (`adoption`), for
    /// workers already marked started. Keys are copied as they are: the
    /// new map uses the old one's SipHash key.
    pub fn carry_over(&mut self, carried: Vec<(u64, Session)>) -> Result<()> {
        for (key, session) in carried {
            self.kernel_sessions.insert(key, session, 0)?;
            let slot = &mut self.slots[session.worker as usize];
            if session.is_registered() {
                slot.sessions += 1;
            } else {
                slot.learned += u32::from(session.last_seen_ns != 0);
            }
        }
        for i in 0..self.slots.len() {
            self.publish(i)?;
        }
        Ok(())
    }

    /// Shutdown: every worker is down for the selector from now on (new
    /// connections get the 503 listener), while workers keep their sessions
    /// and control connections until they exit.
    pub fn stop_placing(&mut self) -> Result<()> {
        self.stopping = true;
        for i in 0..self.slots.len() {
            self.publish(i)?;
        }
        Ok(())
    }

    /// Marks the worker dead and forgets its sessions, registered and
    /// learned: one pass over the kernel map (1,000,000 sessions: about
    /// 0.25 s, plus about 2 µs per session deleted). Not while shutting
    /// down: nothing is placed any more, and the map goes with us.
    pub fn worker_exited(&mut self, index: usize) -> Result<()> {
        let slot = &mut self.slots[index];
        slot.pid = None;
        slot.generation += 1;
        slot.sessions = 0;
        slot.learned = 0;
        if !self.stopping {
            self.forget(|s| s.worker as usize == index);
        }
        self.publish(index)
    }

    /// Finds the live worker a pid belongs to: the worker itself, or any
    /// process in its process group or below it in the process tree (e.g.
    /// `npm start` spawning node).
    pub fn identify(&self, pid: u32) -> Option<WorkerId> {
        let by_pid = |p: u32| {
            self.slots
                .iter()
                .position(|s| s.pid == Some(p))
                .map(|index| WorkerId {
                    index,
                    generation: self.slots[index].generation,
                })
        };
        let mut current = pid;
        for _ in 0..64 {
            if let Some(id) = by_pid(current) {
                return Some(id);
            }
            let (ppid, pgrp) = proc_parent_and_group(current)?;
            if let Some(id) = by_pid(pgrp) {
                return Some(id);
            }
            if ppid <= 1 {
                return None;
            }
            current = ppid;
        }
        None
    }

    pub fn is_current(&self, id: WorkerId) -> bool {
        let slot = &self.slots[id.index];
        slot.pid.is_some() && slot.generation == id.generation
    }

    /// Registers `sid` for `id`. Idempotent for the same worker.
    pub fn open(&mut self, id: WorkerId, sid: &str) -> Result<(), String> {
        let key = self.hasher.key_of(sid).map_err(|e| e.to_string())?;
        if !self.is_current(id) {
            return Err("worker restarted; reconnect".into());
        }
        let before = self.kernel_sessions.get(&key, 0).ok();
        match before {
            Some(s) if s.is_registered() && s.worker as usize == id.index => return Ok(()),
            Some(s) if s.is_registered() => return Err("sid owned by another worker".into()),
            _ => {}
        }
        // The kernel map holds learned sessions too: it may fill first.
        let full = format!("session table full ({} sessions)", self.capacity);
        if self.session_count() >= self.capacity {
            return Err(full);
        }
        // Explicit registration wins over what the kernel learned: the
        // entry is overwritten, whatever the kernel did meanwhile.
        let entry = Session::registered(id.index as u32);
        match self.kernel_sessions.insert(key, entry, 0) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                return Err(full)
            }
            Err(e) => return Err(format!("kernel map update failed: {e}")),
            Ok(()) => {}
        }
        if let Some(learned) = before {
            if learned.last_seen_ns != 0 {
                let slot = &mut self.slots[learned.worker as usize];
                slot.learned = slot.learned.saturating_sub(1);
                let _ = self.publish(learned.worker as usize);
            }
        }
        self.slots[id.index].sessions += 1;
        self.publish(id.index).map_err(|e| e.to_string())
    }

    /// Unregisters `sid`, registered or learned, if `id` owns it. Closing
    /// an unknown sid is fine (already gone).
    pub fn close(&mut self, id: WorkerId, sid: &str) -> Result<(), String> {
        let key = self.hasher.key_of(sid).map_err(|e| e.to_string())?;
        if !self.is_current(id) {
            return Err("worker restarted; reconnect".into());
        }
        let Ok(session) = self.kernel_sessions.get(&key, 0) else {
            return Ok(());
        };
        if session.worker as usize != id.index {
            return Err("sid owned by another worker".into());
        }
        let _ = self.kernel_sessions.remove(&key);
        let slot = &mut self.slots[id.index];
        if session.is_registered() {
            slot.sessions -= 1;
        } else if session.last_seen_ns != 0 {
            slot.learned = slot.learned.saturating_sub(1);
        }
        self.publish(id.index).map_err(|e| e.to_string())
    }

    /// Forgets learned sessions idle for `idle` (no request carried their
    /// sid) or closed by their client (`last_seen_ns` 0, set by
    /// `sticky_watch`), recounts each worker's open learned sessions and
    /// publishes the counts. One batched pass over the kernel map.
    pub fn expire_learned(&mut self, idle: Duration) -> Pass {
        let now = monotonic_ns();
        let idle = idle.as_nanos() as u64;
        self.forget(|s| {
            !s.is_registered() && (s.last_seen_ns == 0 || now.saturating_sub(s.last_seen_ns) > idle)
        })
    }

    /// Recounts each worker's open learned sessions (closed ones, not yet
    /// forgotten, do not count) and publishes the counts that changed: a
    /// drain that must know when an old worker has no session left. Not
    /// again within `RECOUNT_BUDGET` times the last pass's duration (with
    /// 1,000,000 sessions a pass takes about 250 ms): at most about 5% of
    /// a CPU however often a drain asks.
    pub fn recount_learned(&mut self) {
        if let Some((end, took)) = self.last_pass {
            if end.elapsed() < took * RECOUNT_BUDGET {
                return;
            }
        }
        self.forget(|_| false);
    }

    /// Removes the entries matching `doomed` from the kernel map, then
    /// recounts the open learned sessions of each worker from what is left
    /// and publishes the counts that changed.
    fn forget(&mut self, doomed: impl Fn(&Session) -> bool) -> Pass {
        let start = Instant::now();
        let mut gone = Vec::new();
        let mut counts = vec![0u32; self.slots.len()];
        let mut learned_left = 0;
        let scan = batch::for_each(self.kernel_sessions.map(), |key: u64, s: Session| {
            if doomed(&s) {
                gone.push(key);
                return;
            }
            learned_left += usize::from(!s.is_registered());
            if let Some(c) = counts.get_mut(s.worker as usize) {
                *c += u32::from(!s.is_registered() && s.last_seen_ns != 0);
            }
        });
        if let Err(e) = scan {
            crate::log!("cannot read the sessions map: {e}");
            return Pass::default();
        }
        if let Err(e) = batch::delete(self.kernel_sessions.map(), &gone) {
            crate::log!("cannot remove sessions from the kernel map: {e}");
        }
        for (i, learned) in counts.into_iter().enumerate() {
            if self.slots[i].learned != learned {
                self.slots[i].learned = learned;
                let _ = self.publish(i);
            }
        }
        self.last_pass = Some((Instant::now(), start.elapsed()));
        Pass { learned_left }
    }

    pub fn learned_count(&self) -> usize {
        self.slots.iter().map(|s| s.learned as usize).sum()
    }

    pub fn live_workers(&self) -> usize {
        self.slots.iter().filter(|s| s.pid.is_some()).count()
    }

    /// Registered sessions (learned ones: `learned_count`).
    pub fn session_count(&self) -> usize {
        self.slots.iter().map(|s| s.sessions as usize).sum()
    }

    /// Per worker: `pid` (or `down`), sessions owned, reload generation and
    /// role. The current generation's worker `I` is `workerI`, as before any
    /// reload; an older generation's still running is `workerI_generationG`.
    /// Then per generation running: its workers and sessions.
    pub fn summary(&self) -> String {
        let mut fields = Vec::new();
        let mut generations: std::collections::BTreeMap<u64, (usize, u32, u32, Role)> =
            Default::default();
        for (slot, s) in self.slots.iter().enumerate() {
            let Some(generation) = s.reload_generation else {
                continue;
            };
            let index = crate::supervisor::index_of(slot, self.per_generation);
            let key = if generation == self.current {
                format!("worker{index}")
            } else {
                format!("worker{index}_generation{generation}")
            };
            let Some(pid) = s.pid else {
                if generation == self.current {
                    fields.push(format!("{key}=down"));
                }
                continue;
            };
            let role = role_name(s.role);
            fields.push(format!(
                "{key}=pid:{pid},sessions:{},learned:{},generation:{generation},state:{role}",
                s.sessions, s.learned,
            ));
            let g = generations.entry(generation).or_insert((0, 0, 0, s.role));
            g.0 += 1;
            g.1 += s.sessions;
            g.2 += s.learned;
            if s.role == Role::Accepting {
                g.3 = Role::Accepting;
            }
        }
        for (generation, (workers, sessions, learned, role)) in generations {
            fields.push(format!(
                "generation{generation}=workers:{workers},sessions:{sessions},learned:{learned},state:{}",
                role_name(role)
            ));
        }
        fields.join(" ")
    }

    /// Per worker slot in use: its process, sessions and restarts (the
    /// metrics' per-worker families).
    pub fn worker_stats(&self) -> Vec<crate::stats::WorkerStat> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                Some(crate::stats::WorkerStat {
                    index: crate::supervisor::index_of(slot, self.per_generation),
                    generation: s.reload_generation?,
                    pid: s.pid,
                    sessions: s.sessions,
                    learned: s.learned,
                    // Every process of the slot after its first is a restart.
                    restarts: s.starts.saturating_sub(1),
                })
            })
            .collect()
    }

    fn publish(&mut self, index: usize) -> Result<()> {
        let slot = &self.slots[index];
        let live = match (slot.pid, slot.role) {
            _ if self.stopping => WORKER_DOWN,
            (None, _) | (_, Role::Retiring) => WORKER_DOWN,
            (Some(_), Role::Accepting) => WORKER_ACCEPTING,
            (Some(_), Role::Draining) => WORKER_DRAINING,
        };
        let state = WorkerState {
            live,
            sessions: slot.sessions + slot.learned,
        };
        self.kernel_workers.set(index as u32, state, 0)?;
        Ok(())
    }
}

/// What one pass over the kernel `sessions` map did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pass {
    /// Learned entries left, open or closed.
    pub learned_left: usize,
}

/// A fresh SipHash key for the session maps, from the kernel's random
/// source: a client who does not know it cannot aim for a collision.
pub fn fresh_sid_key() -> Result<[u64; 2]> {
    let mut bytes = [0u8; 16];
    // SAFETY: writes at most bytes.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        anyhow::bail!(
            "getrandom failed ({}): cannot choose the session key",
            std::io::Error::last_os_error()
        );
    }
    Ok([
        u64::from_ne_bytes(bytes[..8].try_into().unwrap()),
        u64::from_ne_bytes(bytes[8..].try_into().unwrap()),
    ])
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Accepting => "accepting",
        Role::Draining => "draining",
        Role::Retiring => "stopping",
    }
}

/// Parent pid and process group of `pid`, from /proc/<pid>/stat.
fn proc_parent_and_group(pid: u32) -> Option<(u32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}
