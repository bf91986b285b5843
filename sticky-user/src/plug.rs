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
//! request socket stays until its SYN-ACK retries run out (3 to 7 s: a
//! full queue is pruned, see `EVERY`). `PLUGS` of them fill a backlog of `PLUGS - 1`;
//! only then does the listener move to the overflow slot. The backlog is
//! not 0 because a SYN that reuses the ports of a TIME_WAIT connection
//! skips the cookie check and always gets a request socket: those
//! connections are placed by the queue path, and wait in the overflow
//! listener's accept queue meanwhile, which a backlog of 0 would fill
//! (every other SYN is then dropped until the guard migrates it).
//!
//! The guard (`flood.rs`) keeps a *spare*: the next overflow listener,
//! already plugged, in the slot that takes no SYN (`Plugs::prepare`).
//! Replacing the overflow listener, before its plugs' request sockets can
//! expire (`Plugs::due`) or to migrate a queued connection, is then one
//! config write (`Plugs::flip`) and a shut, with no plugging on the way;
//! the next spare is plugged after.
//!
//! Nothing depends on the plug for correctness: a real client that finds
//! the place free gets the request socket and is placed by the queue path
//! (the guard migrates it), as during a flood.

use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use sticky_common::{Config, OVERFLOW_SLOT, PLUGS, PLUG_SLOT};

use crate::{
    listeners::{drop_everything, sockaddr, socket},
    sorter::SockArray,
};

pub struct Plugs {
    target: SocketAddr,
    /// Open plugs, oldest first: the overflow listener's, then the spare's.
    open: VecDeque<Vec<OwnedFd>>,
    /// When the overflow listener started taking SYNs.
    flipped: Option<Instant>,
    /// When the spare's plugs were sent.
    plugged: Option<Instant>,
    /// How many spares have been plugged: picks their source address.
    spares: u32,
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
            open: VecDeque::new(),
            flipped: None,
            plugged: None,
            spares: 0,
        }
    }

    /// Whether the overflow listener has taken SYNs for `EVERY`: time to
    /// flip to the spare, whose plugs are about that old, before the
    /// overflow listener's own (twice as old) may expire.
    pub fn due(&self) -> bool {
        self.flipped.is_none_or(|t| t.elapsed() >= EVERY)
    }

    /// Makes `listener` the spare overflow listener, plugged: puts it in
    /// the slot that is not taking SYNs (the overflow and plug slots
    /// alternate, `config.overflow_alt`), points the plugs there
    /// (`plug_alt`, `plug_port`, in `settings`, the config in the kernel),
    /// and sends their SYNs. `flip` then lets it take every SYN. On an
    /// error the spare may be unplugged (it still works).
    pub fn prepare(
        &mut self,
        listener: &OwnedFd,
        slots: &SockArray,
        config: &mut Array<MapData, Config>,
        settings: &mut Config,
    ) -> Result<()> {
        // The overflow listener's plugs keep it full until it is replaced;
        // older ones have done their work: their request sockets, with
        // shut listeners, go at their next SYN-ACK retry (the closed plug's
        // port answers it with a RST).
        while self.open.len() > 1 {
            self.open.pop_front();
        }
        let spare = if settings.overflow_alt == 0 {
            PLUG_SLOT
        } else {
            OVERFLOW_SLOT
        };
        slots
            .lock()
            .unwrap()
            .set(spare, listener, 0)
            .context("placing the next overflow listener in the spare slot")?;
        let sent = self.bind_plugs().and_then(|(base, plugs)| {
            settings.plug_port = u32::from(base);
            settings.plug_alt = u16::from(spare == OVERFLOW_SLOT);
            config
                .set(0, *settings, 0)
                .context("pointing the selector at the plugs")?;
            let (addr, len) = sockaddr(self.target);
            let sent = plugs.iter().try_for_each(|fd| {
                // SAFETY: addr/len describe a valid sockaddr for the socket's family.
                let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
                let err = io::Error::last_os_error();
                if rc < 0 && err.raw_os_error() != Some(libc::EINPROGRESS) {
                    return Err(err)
                        .with_context(|| format!("connecting a plug to {}", self.target));
                }
                Ok(())
            });
            self.open.push_back(plugs);
            self.plugged = Some(Instant::now());
            sent
        });
        sent
    }

    /// Sends every SYN to the spare `prepare` plugged, at least `SETTLE`
    /// after its plugs' SYNs.
    pub fn flip(
        &mut self,
        config: &mut Array<MapData, Config>,
        settings: &mut Config,
    ) -> Result<()> {
        if let Some(wait) = self.plugged.map(|t| SETTLE.saturating_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        settings.overflow_alt ^= 1;
        self.flipped = Some(Instant::now());
        config
            .set(0, *settings, 0)
            .context("sending SYNs to the new overflow listener")
    }

    /// PLUGS deaf, non-blocking sockets bound to consecutive client ports
    /// from the returned one (an ephemeral port the kernel picks, and the
    /// next ones if free; else another try).
    fn bind_plugs(&mut self) -> Result<(u16, Vec<OwnedFd>)> {
        // From addresses of their own where the target is on loopback
        // (nothing else binds there, so consecutive ports are free), else
        // from the target's own address. No SO_REUSEADDR: a port of the
        // previous plugs, still open, must not be bound again (the same
        // 4-tuple could not connect).
        //
        // Each spare's plugs from another address: closed plugs leave
        // their request sockets behind until the next SYN-ACK retry, which
        // the closed port answers with a RST (1 to 3 s), and a new plug's
        // SYN on such a 4-tuple would only reset it (`tcp_check_req`: a
        // SYN that is not a retransmission), taking no place in the
        // spare's queue. Seen: after hundreds of replacements a second,
        // spares short of plugs, their accept queue filled by clients'
        // connections, SYNs dropped (`ListenOverflows`) and resent a second
        // later. (From the target's own address there is only one: the
        // kernel's port choice is all that varies.)
        self.spares = self.spares.wrapping_add(1);
        let source = match self.target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(plug_source(self.spares)),
            ip => ip,
        };
        let from = |port: u16| SocketAddr::new(source, port);
        let deaf_socket = |port: u16| -> Result<OwnedFd> {
            let fd = socket(self.target)?;
            drop_everything(&fd).context("making a SYN cookie plug deaf")?;
            set_nonblocking(&fd)?;
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

/// How often the overflow listener is replaced by the spare. A full request
/// queue makes the kernel prune it (`reqsk_timer_handler`: once at least
/// half of a backlog's worth is waiting, old request sockets get fewer
/// SYN-ACK retries, down to 2): a plug's request socket then lives about 3
/// to 7 s after its SYN, not a minute. A spare is plugged as soon as the
/// previous one takes SYNs, so plugs serve from about `EVERY` to twice that
/// after their SYN. Measured: renewing every 30 s let the queue empty, and
/// real clients' SYNs took the queue path.
const EVERY: Duration = Duration::from_secs(1);
/// The source address of the `n`-th spare's plugs when the target is IPv4
/// loopback: any 127.0.0.0/8 address is the host's own; 127.83.0.0/16 is
/// used by nothing else. 65,024 of them in turn: at hundreds of spares a
/// second, an address comes back after minutes, when its request sockets
/// are long gone.
fn plug_source(n: u32) -> Ipv4Addr {
    let i = n % (256 * 254);
    Ipv4Addr::new(127, 83, (i / 254) as u8, 1 + (i % 254) as u8)
}
/// How long the plugs' SYNs get to be processed before the listener moves
/// from the plug slot to the overflow slot. They usually are within
/// connect(); under load the softirq may run later, on ksoftirqd (a late
/// plug still goes to its listener: `plug_alt` stays until the next spare).
const SETTLE: Duration = Duration::from_millis(2);

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
