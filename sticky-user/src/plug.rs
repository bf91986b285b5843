//! Cookie mode's plugs: they keep the overflow listener's request queue
//! full, so that the kernel answers every SYN with a SYN cookie.
//!
//! A listener with a backlog of 0 still takes one request socket on kernels
//! whose `inet_csk_reqsk_queue_is_full` compares with `>` (6.18 here, and
//! the stable kernels that took that fix; older ones compare `>=` and send
//! cookies from the first SYN). The first SYN after that place frees up
//! would get a request socket and go down the queue path, a user-space
//! step. A plug takes the place instead: sticky's own client socket to the
//! listening address, whose socket filter drops every segment reaching it.
//! Its SYN gets the request socket; the SYN-ACK never reaches the plug, so
//! it never ACKs, and the request socket waits out its SYN-ACK retries
//! (about a minute with `tcp_synack_retries` 5). The plug retransmits its
//! SYN (after 1, 3, 7, 15, 31, 63 s), which takes the place again whenever
//! it is free; a new plug every `EVERY`, and one after each replacement of
//! the overflow listener (`flood.rs`), keep it taken.
//!
//! Nothing depends on the plug for correctness: a real client that finds
//! the place free gets the request socket and is placed by the queue path
//! (the guard migrates it), as during a flood.

use std::{
    collections::VecDeque,
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::listeners::{drop_everything, sockaddr, socket};

/// A new plug this often.
const EVERY: Duration = Duration::from_secs(10);
/// A plug is closed after this long: its SYN retries are over (the last is
/// sent 63 s after the first, and the connect fails at about 127 s).
const LIFE: Duration = Duration::from_secs(130);

pub struct Plugs {
    target: SocketAddr,
    /// Open plugs, oldest first, with their creation time.
    open: VecDeque<(Instant, OwnedFd)>,
}

impl Plugs {
    /// Plugs for the group listening on `listen`; the first is sent now.
    pub fn new(listen: SocketAddr) -> Result<Plugs> {
        let mut target = listen;
        if target.ip().is_unspecified() {
            // 0.0.0.0 and [::] (dual stack) both take loopback IPv4.
            target = (Ipv4Addr::LOCALHOST, listen.port()).into();
        }
        let mut plugs = Plugs {
            target,
            open: VecDeque::new(),
        };
        plugs.add().context("sending the first SYN cookie plug")?;
        Ok(plugs)
    }

    /// Sends a new plug if `now` asks for one (the overflow listener was
    /// replaced) or the last is `EVERY` old; closes plugs past `LIFE`.
    pub fn keep_up(&mut self, now: bool) -> Result<()> {
        while self.open.front().is_some_and(|(t, _)| t.elapsed() > LIFE) {
            self.open.pop_front();
        }
        let due = self.open.back().is_none_or(|(t, _)| t.elapsed() >= EVERY);
        if now || due {
            self.add()?;
        }
        Ok(())
    }

    fn add(&mut self) -> Result<()> {
        let fd = socket(self.target)?;
        drop_everything(&fd).context("making a SYN cookie plug deaf")?;
        set_nonblocking(&fd)?;
        let (addr, len) = sockaddr(self.target);
        // SAFETY: addr/len describe a valid sockaddr for the socket's family.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        let err = io::Error::last_os_error();
        if rc < 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err).with_context(|| format!("connecting a plug to {}", self.target));
        }
        self.open.push_back((Instant::now(), fd));
        Ok(())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    // SAFETY: plain fcntl calls on a valid fd.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error()).context("O_NONBLOCK on a plug");
        }
    }
    Ok(())
}
