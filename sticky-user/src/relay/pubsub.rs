//! The relay socket (`$STICKY_RELAY`): pub/sub between workers, for
//! libraries whose cluster support is a pub/sub backend (python-socketio's
//! `AsyncPubSubManager`, socketioxide-redis's `Driver`).
//!
//! Frames both ways: a 4-byte big-endian length of what follows, an op
//! byte, its body. Channels are byte strings of 1..=`MAX_CHANNEL` bytes.
//!
//! | from | op | body | meaning |
//! |---|---|---|---|
//! | worker | `s` | channel | subscribe this connection |
//! | worker | `u` | channel | unsubscribe |
//! | worker | `p` | u16 channel length, channel, payload | publish to every subscribed connection, the sender's own included (Redis semantics) |
//! | worker | `n` | u32 request id, channel | how many connections subscribe to the channel |
//! | worker | `w` | u16 channel length, channel, payload | a will: published as by `p` when this connection ends (its process died, or closed it) |
//! | sticky | `m` | u16 channel length, channel, payload | a published message |
//! | sticky | `n` | u32 request id, u32 count | the answer to `n` |
//! | sticky | `e` | text | refused (not a worker, too many connections), then closed; a bad frame closes the connection (logged) |
//!
//! Peers are identified by `SO_PEERCRED` like on the control socket: only a
//! worker, a process of its group or a descendant may connect.

use std::{
    collections::{HashMap, HashSet},
    io::{BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Result;

use super::{outbox::Outbox, Stats};
use crate::{log, sessions::SessionTable};

const MAX_CHANNEL: usize = 1024;
const MAX_FRAME: usize = 64 << 20;
/// Relay connections one worker slot may hold (a process per namespace
/// or per server is plenty below this).
const MAX_PER_WORKER: usize = 64;
/// Connections still being identified; more are closed at once, so
/// strangers cannot make the relay spawn threads without bound.
const MAX_IDENTIFYING: usize = 64;

struct Connection {
    worker: usize,
    outbox: Arc<Outbox>,
    channels: HashSet<Vec<u8>>,
    /// `m` frames to publish when the connection ends, by channel.
    wills: Vec<(Vec<u8>, Arc<[u8]>)>,
}

/// At most this many wills per connection (one per namespace is usual).
const MAX_WILLS: usize = 64;

pub struct Broker {
    /// Bound at start-up, served (`serve`) once privileges are dropped:
    /// no thread may start before that.
    listener: Mutex<Option<UnixListener>>,
    connections: Mutex<HashMap<u64, Connection>>,
    next_id: AtomicU64,
    identifying: AtomicUsize,
    sessions: Arc<Mutex<SessionTable>>,
    stats: Arc<Stats>,
}

impl Broker {
    /// Binds `path` (replacing a stale socket file, never a live one);
    /// `serve` accepts.
    pub fn bind(
        path: &Path,
        sessions: Arc<Mutex<SessionTable>>,
        stats: Arc<Stats>,
    ) -> Result<Arc<Broker>> {
        let listener = crate::control::bind_unix_socket(path, "relay socket")?;
        Ok(Arc::new(Broker {
            listener: Mutex::new(Some(listener)),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            identifying: AtomicUsize::new(0),
            sessions,
            stats,
        }))
    }

    /// Accepts on a background thread (once; later calls do nothing).
    pub fn serve(self: &Arc<Broker>) -> Result<()> {
        let Some(listener) = self.listener.lock().unwrap().take() else {
            return Ok(());
        };
        let accepting = self.clone();
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if accepting.identifying.fetch_add(1, Ordering::Relaxed) >= MAX_IDENTIFYING {
                        accepting.identifying.fetch_sub(1, Ordering::Relaxed);
                        continue; // dropping the stream closes it
                    }
                    let broker = accepting.clone();
                    let _ = std::thread::Builder::new()
                        .name("relay-conn".into())
                        .spawn(move || broker.admit(stream));
                }
            })?;
        Ok(())
    }

    pub fn connection_count(&self) -> usize {
        self.connections.lock().unwrap().len()
    }

    fn admit(&self, mut stream: UnixStream) {
        let Some(worker) = self.identify(&stream) else {
            let _ = refuse(&mut stream, "unknown peer: not a sticky worker");
            self.identifying.fetch_sub(1, Ordering::Relaxed);
            return;
        };
        self.identifying.fetch_sub(1, Ordering::Relaxed);
        let mine = self
            .connections
            .lock()
            .unwrap()
            .values()
            .filter(|c| c.worker == worker)
            .count();
        if mine >= MAX_PER_WORKER {
            let _ = refuse(&mut stream, "too many relay connections for this worker");
            return;
        }
        let Ok(writer) = stream.try_clone() else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let outbox = Outbox::start(
            format!("worker {worker} (relay connection {id})"),
            writer,
            self.stats.clone(),
        );
        self.connections.lock().unwrap().insert(
            id,
            Connection {
                worker,
                outbox: outbox.clone(),
                channels: HashSet::new(),
                wills: Vec::new(),
            },
        );
        if let Err(reason) = self.read_loop(id, &outbox, stream) {
            log!("relay: worker {worker} (relay connection {id}): {reason}; closing it");
        }
        let gone = self.connections.lock().unwrap().remove(&id);
        if let Some(c) = gone {
            c.outbox.close();
            for (chan, out) in c.wills {
                self.publish(&chan, out);
            }
        }
    }

    /// The worker slot of the peer, asked a few times: a worker may connect
    /// before the supervisor has recorded its pid.
    fn identify(&self, stream: &UnixStream) -> Option<usize> {
        // Identified as on the control socket: by credentials.
        let cred = crate::control::peer_cred(stream).ok()?;
        let pid = u32::try_from(cred.pid).ok().filter(|&p| p > 0)?;
        for attempt in 0..20 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(id) = self.sessions.lock().unwrap().identify(pid) {
                return Some(id.index);
            }
        }
        None
    }

    fn read_loop(&self, id: u64, outbox: &Arc<Outbox>, stream: UnixStream) -> Result<(), String> {
        let mut reader = BufReader::with_capacity(256 << 10, stream);
        loop {
            let mut len = [0u8; 4];
            if reader.read_exact(&mut len).is_err() {
                return Ok(()); // closed
            }
            let n = u32::from_be_bytes(len) as usize;
            if n == 0 || n > MAX_FRAME {
                return Err(format!("frame of {n} bytes (1..={MAX_FRAME})"));
            }
            let mut body = vec![0u8; n];
            if reader.read_exact(&mut body).is_err() {
                return Ok(());
            }
            let (op, rest) = (body[0], &body[1..]);
            match op {
                b's' | b'u' => {
                    let channel = channel(rest)?;
                    let mut conns = self.connections.lock().unwrap();
                    if let Some(c) = conns.get_mut(&id) {
                        if op == b's' {
                            c.channels.insert(channel.to_vec());
                        } else {
                            c.channels.remove(channel);
                        }
                    }
                }
                b'p' | b'w' => {
                    let Some((head, tail)) = rest.split_first_chunk::<2>() else {
                        return Err("publish without channel length".into());
                    };
                    let clen = usize::from(u16::from_be_bytes(*head));
                    let chan = channel(tail.get(..clen).ok_or("publish: channel truncated")?)?;
                    // The same bytes go out, with `m` for `p` (or `w`).
                    let out: Arc<[u8]> = [&len[..], b"m", rest].concat().into();
                    if op == b'p' {
                        self.stats.received.inc();
                        self.publish(chan, out);
                    } else {
                        let mut conns = self.connections.lock().unwrap();
                        if let Some(c) = conns.get_mut(&id) {
                            if c.wills.len() >= MAX_WILLS {
                                return Err(format!("more than {MAX_WILLS} wills"));
                            }
                            c.wills.push((chan.to_vec(), out));
                        }
                    }
                }
                b'n' => {
                    let Some((request, tail)) = rest.split_first_chunk::<4>() else {
                        return Err("count without request id".into());
                    };
                    let chan = channel(tail)?;
                    let count = self
                        .connections
                        .lock()
                        .unwrap()
                        .values()
                        .filter(|c| c.channels.contains(chan))
                        .count() as u32;
                    outbox.push(frame(b'n', &[request, &count.to_be_bytes()]).into());
                }
                other => return Err(format!("unknown op {:?}", char::from(other))),
            }
        }
    }
}

impl Broker {
    /// Queues an `m` frame for every connection subscribed to `chan`.
    fn publish(&self, chan: &[u8], out: Arc<[u8]>) {
        let conns = self.connections.lock().unwrap();
        for c in conns.values().filter(|c| c.channels.contains(chan)) {
            c.outbox.push(out.clone());
        }
    }
}

fn channel(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.is_empty() || bytes.len() > MAX_CHANNEL {
        return Err(format!(
            "channel of {} bytes (1..={MAX_CHANNEL})",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// `len`, `op`, then the parts.
fn frame(op: u8, parts: &[&[u8]]) -> Vec<u8> {
    let n = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(4 + n);
    out.extend_from_slice(&(n as u32).to_be_bytes());
    out.push(op);
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// Sends `e` and closes. What the peer sent is read first (briefly): closing
/// with unread bytes would reset the connection and lose the answer.
fn refuse(stream: &mut UnixStream, reason: &str) -> std::io::Result<()> {
    stream.write_all(&frame(b'e', &[reason.as_bytes()]))?;
    stream.shutdown(std::net::Shutdown::Write)?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        if matches!(stream.read(&mut sink), Ok(0) | Err(_)) {
            break;
        }
    }
    Ok(())
}
