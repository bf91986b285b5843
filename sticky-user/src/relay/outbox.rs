//! A member's bounded outgoing queue and the thread that writes it.
//!
//! Publishers only ever push here, never write to a member's socket: a
//! member that stops reading fills its own queue, then its messages are
//! dropped (counted, logged) while everyone else is unaffected.

use std::{
    collections::VecDeque,
    io::Write,
    os::unix::net::UnixStream,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use super::Stats;
use crate::log;

/// Bytes queued for one member before its messages are dropped.
pub const QUEUE_BYTES: usize = 16 << 20;
/// Frames smaller than this are gathered into one write.
const GATHER_BYTES: usize = 256 << 10;
/// At most one "is not reading" line per member per this long.
const DROP_LOG_EVERY: Duration = Duration::from_secs(5);

/// One frame, shared by every member it is sent to.
pub type Frame = Arc<[u8]>;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: bool,
    dropped: u64,
    dropped_bytes: u64,
    logged_at: Option<Instant>,
}

pub struct Outbox {
    /// Who this is, for the log: "worker 2 (node channel)".
    name: String,
    queue: Mutex<Queue>,
    ready: Condvar,
    stats: Arc<Stats>,
}

impl Outbox {
    /// Starts the writer thread for `stream`; it ends when the stream fails
    /// or the outbox is closed.
    pub fn start(name: String, stream: UnixStream, stats: Arc<Stats>) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox {
            name,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            stats,
        });
        let writer = outbox.clone();
        let spawned = std::thread::Builder::new()
            .name("relay-writer".into())
            .spawn(move || writer.write_loop(stream));
        if let Err(e) = spawned {
            log!("relay: cannot start the writer for {}: {e}", outbox.name);
            outbox.close();
        }
        outbox
    }

    /// Queues a frame; false if it was dropped (queue full or closed). A
    /// frame larger than the whole budget still passes into an empty queue.
    pub fn push(&self, frame: Frame) -> bool {
        let mut q = self.queue.lock().unwrap();
        if q.closed {
            return false;
        }
        if q.bytes > 0 && q.bytes + frame.len() > QUEUE_BYTES {
            q.dropped += 1;
            q.dropped_bytes += frame.len() as u64;
            self.stats.dropped.inc();
            let due = q.logged_at.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY);
            if due {
                q.logged_at = Some(Instant::now());
                log!(
                    "relay: {} is not reading: {} messages ({} bytes) dropped so far",
                    self.name,
                    q.dropped,
                    q.dropped_bytes
                );
            }
            return false;
        }
        q.bytes += frame.len();
        q.frames.push_back(frame);
        drop(q);
        self.ready.notify_one();
        self.stats.delivered.inc();
        true
    }

    pub fn close(&self) {
        let mut q = self.queue.lock().unwrap();
        q.closed = true;
        q.frames.clear();
        q.bytes = 0;
        drop(q);
        self.ready.notify_one();
    }

    pub fn is_closed(&self) -> bool {
        self.queue.lock().unwrap().closed
    }

    fn write_loop(&self, mut stream: UnixStream) {
        let mut gathered = Vec::with_capacity(GATHER_BYTES);
        loop {
            let frames: Vec<Frame> = {
                let mut q = self.queue.lock().unwrap();
                while q.frames.is_empty() && !q.closed {
                    q = self.ready.wait(q).unwrap();
                }
                if q.closed {
                    break;
                }
                q.bytes = 0;
                q.frames.drain(..).collect()
            };
            let mut result = Ok(());
            for frame in &frames {
                if frame.len() >= GATHER_BYTES {
                    result =
                        flush(&mut stream, &mut gathered).and_then(|()| stream.write_all(frame));
                } else {
                    if gathered.len() + frame.len() > GATHER_BYTES {
                        result = flush(&mut stream, &mut gathered);
                    }
                    gathered.extend_from_slice(frame);
                }
                if result.is_err() {
                    break;
                }
            }
            if let Err(e) = result.and_then(|()| flush(&mut stream, &mut gathered)) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    log!("relay: writing to {}: {e}; leaving it", self.name);
                }
                break;
            }
        }
        self.close();
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

fn flush(stream: &mut UnixStream, gathered: &mut Vec<u8>) -> std::io::Result<()> {
    if gathered.is_empty() {
        return Ok(());
    }
    let result = stream.write_all(gathered);
    gathered.clear();
    result
}
