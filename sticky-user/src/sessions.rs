//! Who the workers are and which sessions each owns, in user space and in
//! the kernel maps the selector reads (`sessions`, `workers`).
//!
//! Invariants:
//! - a sid is in the kernel `sessions` map iff it is in `owners`, with the
//!   same worker;
//! - `workers[i].sessions` in the kernel equals the number of sids owned by
//!   worker `i` (least-connection reads it);
//! - a worker's sessions are forgotten when its process exits, and the
//!   generation bump makes its old control connections stale.

use std::collections::HashMap as StdHashMap;

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData};
use sticky_common::{SidKey, WorkerState, SESSIONS_MAX};

/// A worker as seen by the control socket: its slot and which incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerId {
    pub index: usize,
    pub generation: u64,
}

#[derive(Default)]
struct Slot {
    pid: Option<u32>,
    generation: u64,
    sessions: u32,
}

pub struct SessionTable {
    kernel_sessions: HashMap<MapData, SidKey, u32>,
    kernel_workers: Array<MapData, WorkerState>,
    owners: StdHashMap<SidKey, usize>,
    slots: Vec<Slot>,
}

impl SessionTable {
    pub fn new(
        kernel_sessions: HashMap<MapData, SidKey, u32>,
        kernel_workers: Array<MapData, WorkerState>,
        workers: usize,
    ) -> SessionTable {
        SessionTable {
            kernel_sessions,
            kernel_workers,
            owners: StdHashMap::new(),
            slots: (0..workers).map(|_| Slot::default()).collect(),
        }
    }

    pub fn worker_started(&mut self, index: usize, pid: u32) -> Result<()> {
        let slot = &mut self.slots[index];
        slot.pid = Some(pid);
        slot.generation += 1;
        self.publish(index)
    }

    /// Marks the worker dead and forgets its sessions.
    pub fn worker_exited(&mut self, index: usize) -> Result<()> {
        let slot = &mut self.slots[index];
        slot.pid = None;
        slot.generation += 1;
        slot.sessions = 0;
        let mine: Vec<SidKey> = self
            .owners
            .iter()
            .filter(|(_, &w)| w == index)
            .map(|(k, _)| *k)
            .collect();
        for sid in mine {
            self.owners.remove(&sid);
            let _ = self.kernel_sessions.remove(&sid);
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
        let key = SidKey::new(sid).map_err(|e| e.to_string())?;
        if !self.is_current(id) {
            return Err("worker restarted; reconnect".into());
        }
        match self.owners.get(&key) {
            Some(&w) if w == id.index => return Ok(()),
            Some(_) => return Err("sid owned by another worker".into()),
            None => {}
        }
        if self.owners.len() >= SESSIONS_MAX as usize {
            return Err(format!("session table full ({SESSIONS_MAX} sessions)"));
        }
        self.kernel_sessions
            .insert(key, id.index as u32, 0)
            .map_err(|e| format!("kernel map update failed: {e}"))?;
        self.owners.insert(key, id.index);
        self.slots[id.index].sessions += 1;
        self.publish(id.index).map_err(|e| e.to_string())
    }

    /// Unregisters `sid`. Closing an unknown sid is fine (already gone).
    pub fn close(&mut self, id: WorkerId, sid: &str) -> Result<(), String> {
        let key = SidKey::new(sid).map_err(|e| e.to_string())?;
        if !self.is_current(id) {
            return Err("worker restarted; reconnect".into());
        }
        match self.owners.get(&key) {
            None => return Ok(()),
            Some(&w) if w != id.index => return Err("sid owned by another worker".into()),
            Some(_) => {}
        }
        let _ = self.kernel_sessions.remove(&key);
        self.owners.remove(&key);
        self.slots[id.index].sessions -= 1;
        self.publish(id.index).map_err(|e| e.to_string())
    }

    pub fn live_workers(&self) -> usize {
        self.slots.iter().filter(|s| s.pid.is_some()).count()
    }

    pub fn session_count(&self) -> usize {
        self.owners.len()
    }

    /// Per worker: `pid` (or `-`) and sessions owned.
    pub fn summary(&self) -> String {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| match s.pid {
                Some(pid) => format!("worker{i}=pid:{pid},sessions:{}", s.sessions),
                None => format!("worker{i}=down"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn publish(&mut self, index: usize) -> Result<()> {
        let slot = &self.slots[index];
        let state = WorkerState {
            live: slot.pid.is_some() as u32,
            sessions: slot.sessions,
        };
        self.kernel_workers.set(index as u32, state, 0)?;
        Ok(())
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
