//! Node.js IPC channels: the supervisor as `@socket.io/cluster-adapter`'s
//! primary. What `setupPrimary()` does, and so what this does:
//! - a message without `source: "_sio_adapter"` is ignored;
//! - the sender's `uid` (one per namespace) is remembered for that worker;
//! - a response (`requesterUid` set: FETCH_SOCKETS_RESPONSE,
//!   SERVER_SIDE_EMIT_RESPONSE, broadcast acks) goes to the worker that has
//!   announced that uid;
//! - anything else goes to every other worker.
//!
//! Frames (4-byte big-endian length, V8 serialization) are forwarded as
//! they came; `v8` reads only those fields. Beyond `setupPrimary()`: when a
//! worker's channel ends (it exited, or was killed), the other workers get
//! the `ADAPTER_CLOSE` its adapters would have sent, so they stop counting
//! it at once (fetchSockets / serverSideEmit do not wait for its answers).

use std::{
    collections::HashMap,
    io::{BufReader, Read},
    os::{fd::OwnedFd, unix::net::UnixStream},
    sync::{Arc, Mutex},
};

use super::{outbox::Outbox, v8, Stats};
use crate::log;

/// A message larger than this ends the channel (the worker sees `disconnect`).
const MAX_MESSAGE: usize = 64 << 20;

struct Channel {
    /// Which process of the slot this is: a restarted worker's old reader
    /// must not remove its successor.
    generation: u64,
    outbox: Arc<Outbox>,
    /// Adapter uids (one per namespace) seen from this worker, with their
    /// namespace.
    uids: HashMap<String, String>,
}

#[derive(Default)]
struct Slots {
    channels: Vec<Option<Channel>>,
    generations: u64,
}

#[derive(Clone)]
pub struct NodeChannels {
    slots: Arc<Mutex<Slots>>,
    stats: Arc<Stats>,
}

impl NodeChannels {
    pub fn new(stats: Arc<Stats>) -> NodeChannels {
        NodeChannels {
            slots: Arc::default(),
            stats,
        }
    }

    pub fn open(&self, index: usize) -> std::io::Result<OwnedFd> {
        // Both ends CLOEXEC: spawn dups the worker's end to fd 4.
        let (ours, theirs) = UnixStream::pair()?;
        let reader = ours.try_clone()?;
        let name = format!("worker {index} (node channel)");
        let outbox = Outbox::start(name, ours, self.stats.clone());
        let generation = {
            let mut slots = self.slots.lock().unwrap();
            slots.generations += 1;
            let generation = slots.generations;
            if slots.channels.len() <= index {
                slots.channels.resize_with(index + 1, || None);
            }
            let old = slots.channels[index].replace(Channel {
                generation,
                outbox,
                uids: HashMap::new(),
            });
            if let Some(old) = old {
                old.outbox.close();
            }
            generation
        };
        let channels = self.clone();
        std::thread::Builder::new()
            .name(format!("relay-node-{index}"))
            .spawn(move || channels.read_loop(index, generation, reader))?;
        Ok(theirs.into())
    }

    pub fn open_count(&self) -> usize {
        let slots = self.slots.lock().unwrap();
        slots
            .channels
            .iter()
            .flatten()
            .filter(|c| !c.outbox.is_closed())
            .count()
    }

    fn read_loop(&self, index: usize, generation: u64, stream: UnixStream) {
        let mut reader = BufReader::with_capacity(256 << 10, stream);
        let mut warned = false;
        loop {
            let mut len = [0u8; 4];
            if reader.read_exact(&mut len).is_err() {
                break; // the worker exited or closed its channel
            }
            let n = u32::from_be_bytes(len) as usize;
            if n > MAX_MESSAGE {
                log!("relay: worker {index} sent a {n}-byte message over its node channel (limit {MAX_MESSAGE}); closing the channel");
                break;
            }
            let mut frame = vec![0u8; 4 + n];
            frame[..4].copy_from_slice(&len);
            if reader.read_exact(&mut frame[4..]).is_err() {
                break;
            }
            self.stats.received.inc();
            let route = match v8::adapter_message(&frame[4..]) {
                Ok(Some(msg)) => Route::Adapter(msg),
                Ok(None) => continue, // not the adapter's: setupPrimary ignores it too
                Err(e) => {
                    self.stats.malformed.inc();
                    if !warned {
                        warned = true;
                        log!("relay: worker {index}: a node message did not parse ({e}); relaying such messages to every other worker");
                    }
                    Route::Others
                }
            };
            self.deliver(index, generation, route, frame.into());
        }
        let gone = {
            let mut slots = self.slots.lock().unwrap();
            let slot = slots.channels.get_mut(index);
            match slot {
                Some(slot) if slot.as_ref().is_some_and(|c| c.generation == generation) => {
                    slot.take()
                }
                _ => None,
            }
        };
        // Its successor (if already started) has new uids: announce the
        // old ones closed either way.
        if let Some(c) = gone {
            c.outbox.close();
            for (uid, nsp) in &c.uids {
                let close = v8::adapter_close(uid, nsp);
                let frame = [&(close.len() as u32).to_be_bytes()[..], &close].concat();
                self.deliver(index, 0, Route::Others, frame.into());
            }
        }
    }

    fn deliver(&self, from: usize, generation: u64, route: Route, frame: Arc<[u8]>) {
        let mut slots = self.slots.lock().unwrap();
        let route = match route {
            Route::Adapter(msg) => {
                if let (Some(uid), Some(Some(me))) = (msg.uid, slots.channels.get_mut(from)) {
                    if me.generation == generation && !me.uids.contains_key(&uid) {
                        me.uids.insert(uid, msg.nsp.unwrap_or_else(|| "/".into()));
                    }
                }
                match msg.requester_uid {
                    Some(requester) => Route::Requester(requester),
                    None => Route::Others,
                }
            }
            other => other,
        };
        match route {
            Route::Requester(uid) => {
                // Unknown requester (it restarted): dropped, as setupPrimary does.
                if let Some(c) = slots
                    .channels
                    .iter()
                    .flatten()
                    .find(|c| c.uids.contains_key(&uid))
                {
                    c.outbox.push(frame);
                }
            }
            _ => {
                for (i, c) in slots.channels.iter().enumerate() {
                    if let Some(c) = c.as_ref().filter(|_| i != from) {
                        c.outbox.push(frame.clone());
                    }
                }
            }
        }
    }
}

enum Route {
    Adapter(v8::AdapterMessage),
    Requester(String),
    Others,
}
