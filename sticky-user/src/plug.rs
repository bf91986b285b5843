//! Cookie mode's plugs: they keep the overflow listener's request queue
//! full, so that the kernel answers every SYN with a SYN cookie.
//!
//! A listener with a backlog of 0 still takes one request socket on kernels
//! whose `inet_csk_reqsk_queue_is_full` compares with `>` (6.18 here, and
//! the stable kernels that took that change; older ones compare `>=` and
//! send cookies from the first SYN). A real client's SYN that got that
//! place would take the queue path (a user-space step), and while its
//! connection waits in the overflow listener's accept queue (backlog 0:
//! full) the kernel drops every other SYN: clients retry after a second.
//!
//! So every overflow listener is plugged before it takes SYNs: it waits in
//! the plug slot, where the selector sends only SYNs from the plugs' client
//! ports (`config.plug_port` and the next `PLUGS - 1`). A plug is sticky's
//! own client socket whose socket filter drops every segment reaching it:
//! its SYN takes a place (on loopback the SYN is processed within
//! `connect()`), the SYN-ACK never reaches it, so it never ACKs, and the
//! request socket stays until its SYN-ACK retries run out (63 s with
//! `tcp_synack_retries` 5). `PLUGS` of them fill a backlog of `PLUGS - 1`;
//! only then does the listener move to the overflow slot. The backlog is
//! not 0 because a SYN that reuses the ports of a TIME_WAIT connection
//! skips the cookie check and always gets a request socket: those
//! connections are placed by the queue path, and wait in the overflow
//! listener's accept queue meanwhile, which a backlog of 0 would fill
//! (every other SYN is then dropped until the guard migrates it). Before the plug's request
//! socket can expire, the guard (`flood.rs`) replaces the overflow listener
//! with a freshly plugged one (`Plugs::due`).
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
use aya::maps::{Array, MapData};
use sticky_common::{Config, PLUGS, PLUG_SLOT};

use crate::{
    listeners::{drop_everything, setsockopt_int, sockaddr, socket},
    sorter::SockArray,
};

pub struct Plugs {
    target: SocketAddr,
    /// How often the overflow listener gets a fresh plug.
    every: Duration,
    /// Open plugs, oldest first, with their creation time.
    open: VecDeque<(Instant, Vec<OwnedFd>)>,
}

impl Plugs {
    /// Plugs for the group listening on `listen`.
    pub fn new(listen: SocketAddr) -> Plugs {
        let mut target = listen;
        if target.ip().is_unspecified() {
            // 0.0.0.0 and [::] (dual stack) both take loopback IPv4.
            target = (Ipv4Addr::LOCALHOST, listen.port()).into();
        }
        Plugs {
            target,
            every: renewal_period(),
            open: VecDeque::new(),
        }
    }

    /// Whether the last plug is old enough that its request socket may
    /// soon expire: time for a freshly plugged overflow listener.
    pub fn due(&self) -> bool {
        self.open
            .back()
            .is_none_or(|(t, _)| t.elapsed() >= self.every)
    }

    /// Plugs `listener`, not yet the overflow listener: puts it in the plug
    /// slot, points the selector at the new plugs' ports (in `settings`,
    /// the config in the kernel) and sends their SYNs.
    pub fn plug(
        &mut self,
        listener: &OwnedFd,
        slots: &SockArray,
        config: &mut Array<MapData, Config>,
        settings: &mut Config,
    ) -> Result<()> {
        // The previous listener's plugs keep it full until it is replaced
        // (after this); older ones have done their work: their request
        // sockets stay with their closed listeners until they expire.
        while self.open.len() > 1 {
            self.open.pop_front();
        }
        let (base, plugs) = self.bind_plugs()?;
        settings.plug_port = u32::from(base);
        config
            .set(0, *settings, 0)
            .context("telling the selector the plugs' ports")?;
        slots
            .lock()
            .unwrap()
            .set(PLUG_SLOT, listener, 0)
            .context("placing the next overflow listener in the plug slot")?;
        let (addr, len) = sockaddr(self.target);
        for fd in &plugs {
            // SAFETY: addr/len describe a valid sockaddr for the socket's family.
            let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
            let err = io::Error::last_os_error();
            if rc < 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err).with_context(|| format!("connecting a plug to {}", self.target));
            }
        }
        self.open.push_back((Instant::now(), plugs));
        Ok(())
    }

    /// PLUGS deaf, non-blocking sockets bound to consecutive client ports
    /// from the returned one (an ephemeral port the kernel picks, and the
    /// next ones if free; else another try).
    fn bind_plugs(&self) -> Result<(u16, Vec<OwnedFd>)> {
        // From the target's own address: a port is then taken only if a
        // socket is bound to that address (or the wildcard) there, not by
        // every client connection of the host; SO_REUSEADDR lets a port
        // whose only users are in TIME_WAIT be used.
        let from = |port: u16| SocketAddr::new(self.target.ip(), port);
        let deaf_socket = |port: u16| -> Result<OwnedFd> {
            let fd = socket(self.target)?;
            drop_everything(&fd).context("making a SYN cookie plug deaf")?;
            set_nonblocking(&fd)?;
            setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
            let (addr, len) = sockaddr(from(port));
            // SAFETY: addr/len describe a valid sockaddr for the socket's family.
            if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
                return Err(io::Error::last_os_error()).context("binding a plug");
            }
            Ok(fd)
        };
        for _ in 0..200 {
            let first = deaf_socket(0)?;
            let base = local_port(&first)?;
            if u32::from(base) + PLUGS > 65535 {
                continue;
            }
            let rest: Result<Vec<OwnedFd>> =
                (1..PLUGS as u16).map(|i| deaf_socket(base + i)).collect();
            if let Ok(mut plugs) = rest {
                plugs.insert(0, first);
                return Ok((base, plugs));
            }
        }
        anyhow::bail!("no {PLUGS} consecutive free client ports for the SYN cookie plugs")
    }
}

impl Plugs {
    /// Empties the plug slot, once the plug's SYN has been processed: a
    /// socket sits in one slot at a time, and the plugged listener goes on
    /// to the overflow slot.
    pub fn unplug_slot(&self, slots: &SockArray) -> Result<()> {
        slots
            .lock()
            .unwrap()
            .clear_index(&PLUG_SLOT)
            .context("emptying the plug slot")
    }
}

/// Half the life of a request socket that is never answered: its SYN-ACK
/// is retransmitted `tcp_synack_retries` times (1, 2, 4 ... s apart) and
/// it expires one more doubling later; at most 30 s, at least 1 s.
fn renewal_period() -> Duration {
    let retries: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_synack_retries")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(5);
    let life_s = (1u64 << (retries.min(10) + 1)) - 1;
    Duration::from_secs((life_s / 2).clamp(1, 30))
}

fn local_port(fd: &OwnedFd) -> Result<u16> {
    // SAFETY: all-zero is a valid sockaddr_storage; the kernel fills it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid fd and buffer of `len` bytes.
    if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut addr).cast(), &mut len) } < 0 {
        return Err(io::Error::last_os_error()).context("getsockname() of a plug");
    }
    // sin_port and sin6_port sit at the same offset, network byte order.
    // SAFETY: the storage holds a sockaddr_in or sockaddr_in6.
    let sin = unsafe { &*(&raw const addr).cast::<libc::sockaddr_in>() };
    Ok(u16::from_be(sin.sin_port))
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
