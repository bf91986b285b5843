//! Broadcasting between socketioxide workers through sticky's relay: a
//! [`Driver`] for socketioxide-redis's adapter whose pub/sub is the relay
//! socket sticky gives every worker (`$STICKY_RELAY`), so no Redis is
//! needed on one machine:
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! use socketioxide::SocketIo;
//! use socketioxide_redis::{CustomRedisAdapter, RedisAdapterConfig, RedisAdapterCtr};
//! use sticky_socketioxide::RelayDriver;
//!
//! let driver = RelayDriver::connect_env().await?;
//! let adapter = RedisAdapterCtr::new_with_driver(driver, RedisAdapterConfig::default());
//! let (layer, io) = SocketIo::builder()
//!     .with_adapter::<CustomRedisAdapter<_, RelayDriver>>(adapter)
//!     .build_layer();
//! # Ok(()) }
//! ```
//!
//! Wire protocol (README, "Broadcasting between workers"): frames of a
//! 4-byte big-endian length and an op byte. `s`/`u` + channel subscribe and
//! unsubscribe, `p` + u16 channel length + channel + payload publishes,
//! `n` + u32 id + channel asks how many connections subscribe to it
//! (`num_serv`); sticky sends `m` frames laid out like `p` and answers `n`
//! with u32 id + u32 count. A lost connection (sticky restarted, or a new
//! sticky adopted this worker) is retried every 500 ms and every channel is
//! subscribed again; what is published meanwhile fails.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{unix::OwnedWriteHalf, UnixStream},
    sync::{mpsc, oneshot},
};

const RETRY: Duration = Duration::from_millis(500);
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// A socketioxide-redis [`Driver`] over sticky's relay socket. Clones share
/// one connection.
#[derive(Clone)]
pub struct RelayDriver {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    handlers: Mutex<HashMap<String, mpsc::Sender<ChanItem>>>,
    counts: Mutex<HashMap<u32, oneshot::Sender<u32>>>,
    next_count: AtomicU32,
}

impl RelayDriver {
    /// Connects to `$STICKY_RELAY` (set by `sticky run`).
    pub async fn connect_env() -> io::Result<RelayDriver> {
        let path = std::env::var_os("STICKY_RELAY").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "STICKY_RELAY is not set: run under `sticky run`, or use RelayDriver::connect(path)",
            )
        })?;
        RelayDriver::connect(Path::new(&path)).await
    }

    /// Connects to the relay socket at `path`; keeps reconnecting if it is
    /// lost later.
    pub async fn connect(path: &Path) -> io::Result<RelayDriver> {
        let stream = UnixStream::connect(path).await?;
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            writer: tokio::sync::Mutex::new(None),
            handlers: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            next_count: AtomicU32::new(1),
        });
        let (reader, writer) = stream.into_split();
        *inner.writer.lock().await = Some(writer);
        tokio::spawn(read_loop(inner.clone(), reader));
        Ok(RelayDriver { inner })
    }

    async fn send(&self, op: u8, parts: &[&[u8]]) -> io::Result<()> {
        let frame = frame(op, parts);
        let mut writer = self.inner.writer.lock().await;
        match writer.as_mut() {
            Some(w) => {
                let result = w.write_all(&frame).await;
                if result.is_err() {
                    *writer = None; // the reader reconnects
                }
                result
            }
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "sticky relay connection lost; reconnecting",
            )),
        }
    }
}

impl Driver for RelayDriver {
    type Error = io::Error;

    async fn publish(&self, chan: String, val: Vec<u8>) -> io::Result<()> {
        let len = u16::try_from(chan.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "channel name too long"))?;
        self.send(b'p', &[&len.to_be_bytes(), chan.as_bytes(), &val])
            .await
    }

    async fn subscribe(&self, chan: String, size: usize) -> io::Result<MessageStream<ChanItem>> {
        let (tx, rx) = mpsc::channel(size.max(1));
        self.inner.handlers.lock().unwrap().insert(chan.clone(), tx);
        self.send(b's', &[chan.as_bytes()]).await?;
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> io::Result<()> {
        self.inner.handlers.lock().unwrap().remove(&chan);
        self.send(b'u', &[chan.as_bytes()]).await
    }

    async fn num_serv(&self, chan: &str) -> io::Result<u16> {
        let id = self.inner.next_count.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.counts.lock().unwrap().insert(id, tx);
        let sent = self.send(b'n', &[&id.to_be_bytes(), chan.as_bytes()]).await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(COUNT_TIMEOUT, rx).await,
            Err(e) => {
                self.inner.counts.lock().unwrap().remove(&id);
                return Err(e);
            }
        };
        self.inner.counts.lock().unwrap().remove(&id);
        match answer {
            Ok(Ok(n)) => Ok(u16::try_from(n).unwrap_or(u16::MAX)),
            _ => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "sticky relay did not answer a subscriber count",
            )),
        }
    }
}

/// Reads frames until the connection ends, then reconnects and subscribes
/// every channel again, forever.
async fn read_loop(inner: Arc<Inner>, mut reader: tokio::net::unix::OwnedReadHalf) {
    loop {
        if let Err(e) = read_frames(&inner, &mut reader).await {
            eprintln!(
                "sticky-socketioxide: relay {}: {e}; reconnecting",
                inner.path.display()
            );
        }
        *inner.writer.lock().await = None;
        reader = loop {
            tokio::time::sleep(RETRY).await;
            let Ok(stream) = UnixStream::connect(&inner.path).await else {
                continue;
            };
            let (r, mut w) = stream.into_split();
            let channels: Vec<String> = inner.handlers.lock().unwrap().keys().cloned().collect();
            let mut ok = true;
            for chan in channels {
                ok &= w.write_all(&frame(b's', &[chan.as_bytes()])).await.is_ok();
            }
            if ok {
                *inner.writer.lock().await = Some(w);
                eprintln!(
                    "sticky-socketioxide: relay {} reached again",
                    inner.path.display()
                );
                break r;
            }
        };
    }
}

async fn read_frames(
    inner: &Inner,
    reader: &mut tokio::net::unix::OwnedReadHalf,
) -> io::Result<()> {
    loop {
        let n = reader.read_u32().await? as usize;
        let mut body = vec![0u8; n];
        reader.read_exact(&mut body).await?;
        match body.split_first() {
            Some((b'm', rest)) if rest.len() >= 2 => {
                let clen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let Some(chan) = rest.get(2..2 + clen) else {
                    continue;
                };
                let chan = String::from_utf8_lossy(chan).into_owned();
                let payload = rest[2 + clen..].to_vec();
                let tx = inner.handlers.lock().unwrap().get(&chan).cloned();
                if let Some(tx) = tx {
                    if tx.try_send((chan, payload)).is_err() {
                        eprintln!("sticky-socketioxide: relay message dropped: stream full");
                    }
                }
            }
            Some((b'n', rest)) if rest.len() == 8 => {
                let id = u32::from_be_bytes(rest[..4].try_into().unwrap());
                let count = u32::from_be_bytes(rest[4..].try_into().unwrap());
                if let Some(tx) = inner.counts.lock().unwrap().remove(&id) {
                    let _ = tx.send(count);
                }
            }
            Some((b'e', reason)) => {
                return Err(io::Error::other(
                    String::from_utf8_lossy(reason).into_owned(),
                ));
            }
            _ => {}
        }
    }
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
