//! A member's bounded outgoing queue and the thread that writes it.
//!
//! Publishers never block on a member's socket: a frame for an idle member
//! is written at once without blocking (`MSG_DONTWAIT`: no thread wake-up
//! on the common path), and whatever does not fit goes to the queue, which
//! the member's writer thread drains. A member that stops reading fills its
//! own queue, then its messages are dropped (counted, logged) while
//! everyone else is unaffected.

use std::{
    collections::VecDeque,
    io::Write,
    os::{fd::AsRawFd, unix::net::UnixStream},
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
    /// Someone (a publisher inline, or the writer thread) is writing to the
    /// socket: everyone else queues, so frames keep their order.
    writing: bool,
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
    /// For the publishers' non-blocking writes; lives as long as the outbox,
    /// so its fd is never reused under them.
    socket: UnixStream,
}

impl Outbox {
    /// Starts the writer thread for `stream`; it ends when the stream fails
    /// or the outbox is closed.
    pub fn start(name: String, stream: UnixStream, stats: Arc<Stats>) -> Arc<Outbox> {
        let socket = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log!("relay: cannot start the writer for {name}: {e}");
                let outbox = Arc::new(Outbox {
                    name,
                    queue: Mutex::new(Queue::default()),
                    ready: Condvar::new(),
                    stats,
                    socket: stream,
                });
                outbox.close();
                return outbox;
            }
        };
        let outbox = Arc::new(Outbox {
            name,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            stats,
            socket,
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
        self.stats.delivered.inc();
        if q.writing || !q.frames.is_empty() {
            q.bytes += frame.len();
            q.frames.push_back(frame);
            return true;
        }
        // Idle: write it now, without blocking; queue what does not fit.
        q.writing = true;
        drop(q);
        let sent = self.send_now(&frame);
        let mut q = self.queue.lock().unwrap();
        q.writing = false;
        match sent {
            Some(n) if n == frame.len() => {}
            Some(n) => {
                let rest: Frame = frame[n..].into();
                q.bytes += rest.len();
                q.frames.push_front(rest);
            }
            None => {
                q.closed = true;
                q.frames.clear();
                q.bytes = 0;
            }
        }
        // Frames queued meanwhile, or a remainder: the writer's.
        if !q.frames.is_empty() || q.closed {
            drop(q);
            self.ready.notify_one();
        }
        true
    }

    /// Bytes written without blocking (0 if the socket is full); None if
    /// the socket is gone.
    fn send_now(&self, frame: &[u8]) -> Option<usize> {
        let mut sent = 0;
        while sent < frame.len() {
            // SAFETY: a valid buffer and our own socket.
            let n = unsafe {
                libc::send(
                    self.socket.as_raw_fd(),
                    frame[sent..].as_ptr().cast(),
                    frame.len() - sent,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Some(sent),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => None,
                };
            }
            sent += n as usize;
        }
        Some(sent)
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
                while (q.frames.is_empty() || q.writing) && !q.closed {
                    q = self.ready.wait(q).unwrap();
                }
                if q.closed {
                    break;
                }
                q.bytes = 0;
                q.writing = true;
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
            self.queue.lock().unwrap().writing = false;
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
