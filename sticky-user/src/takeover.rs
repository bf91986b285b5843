//! Starting on a port where a killed supervisor left its workers running:
//! what `sticky run` takes over (`adoption` finds it), step by step in the
//! order the start-up needs it. With no such workers every step is a no-op
//! and the listeners are bound fresh.

use std::{net::SocketAddr, os::fd::OwnedFd};

use anyhow::Result;

use crate::{
    adoption::{self, OldSteering},
    listeners::ListenerGroup,
    log,
    sessions::SessionTable,
    supervisor::Adopted,
};

pub struct Takeover {
    /// Each adopted worker's listener (its fd 3), by slot, until the
    /// listener group takes them.
    listeners: Vec<Option<OwnedFd>>,
    adopted: Vec<Adopted>,
    /// The old selector and its maps, released once ours is attached.
    old: Option<OldSteering>,
    /// `--workers` (see `supervisor::index_of`).
    per_generation: usize,
}

impl Takeover {
    /// Finds the orphaned workers on `addr`'s port (an error names any
    /// other process holding it) and the old selector they were placed by.
    pub fn find(addr: SocketAddr, workers: usize) -> Result<Takeover> {
        let orphans = adoption::find_orphans(addr, workers)?;
        let old = if orphans.is_empty() {
            None
        } else {
            let pids: Vec<u32> = orphans.iter().map(|o| o.pid).collect();
            Some(OldSteering::find(addr.port(), &pids)?)
        };
        let slots = crate::supervisor::slot_count(workers);
        let mut listeners: Vec<Option<OwnedFd>> = (0..slots).map(|_| None).collect();
        let mut adopted = Vec::new();
        for o in orphans {
            listeners[o.index] = Some(o.listener);
            adopted.push(Adopted {
                index: o.index,
                generation: o.generation,
                pid: o.pid,
                pidfd: o.pidfd,
            });
        }
        Ok(Takeover {
            listeners,
            adopted,
            old,
            per_generation: workers,
        })
    }

    /// The SipHash key of the adopted maps' session keys, if any: the new
    /// maps must use it, their keys are copied, not rehashed.
    pub fn sid_key(&self) -> Option<[u64; 2]> {
        self.old.as_ref().map(|o| o.sid_key)
    }

    /// The listeners: the adopted workers' own, fresh ones for the rest.
    pub fn listener_group(&mut self, addr: SocketAddr) -> Result<ListenerGroup> {
        if self.adopted.is_empty() {
            ListenerGroup::bind(addr, self.listeners.len())
        } else {
            ListenerGroup::with_adopted(addr, std::mem::take(&mut self.listeners))
        }
    }

    /// Marks the adopted workers live and copies their sessions, registered
    /// and learned, before the new selector replaces the old one: no
    /// connection sees them down.
    pub fn carry_sessions(&mut self, table: &mut SessionTable) -> Result<()> {
        for a in &self.adopted {
            table.worker_started(a.index, a.pid, a.generation)?;
        }
        let Some(old) = self.old.as_mut() else {
            return Ok(());
        };
        let indices: Vec<usize> = self.adopted.iter().map(|a| a.index).collect();
        let carried = old.sessions(&indices)?;
        let registered = carried.iter().filter(|(_, s)| s.is_registered()).count();
        let learned = carried.len() - registered;
        table.carry_over(carried)?;
        for a in &self.adopted {
            old.release_slot(a.index)?;
            let index = crate::supervisor::index_of(a.index, self.per_generation);
            let generation = match a.generation {
                0 => String::new(),
                g => format!(" of generation {g}"),
            };
            log!(
                "adopted worker {index}{generation} (pid {}) and its listener from an earlier sticky",
                a.pid
            );
        }
        log!("kept {registered} registered and {learned} learned sessions of the adopted workers");
        Ok(())
    }

    /// Once the new selector is attached the old one is detached: dropping
    /// our handles frees its maps. The adopted workers go to the supervisor.
    pub fn finish(self) -> Vec<Adopted> {
        drop(self.old);
        self.adopted
    }
}
