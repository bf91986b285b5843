//! Resets the connections `sticky_watch` doomed: a request carrying another
//! worker's session arrived on a keep-alive connection, the kernel dropped
//! it and queued the connection in the `resets` ring (see
//! `sticky-ebpf/src/foreign.h`). Here each one is destroyed with sock_diag
//! `SOCK_DESTROY`: the kernel aborts the socket (`tcp_abort`) and sends the
//! client a RST before any answer byte, so the client resends the request
//! on a new connection, which the selector places by its sid.
//!
//! `SOCK_DESTROY` needs `CONFIG_INET_DIAG_DESTROY` (and the `tcp_diag`
//! module): [`probe`] tries it at start on a throwaway loopback connection
//! of our own, and without it foreign requests are passed as before.

use std::{
    io::{self, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use sticky_common::ResetEvent;

use crate::log;

/// More resets than this in one `WINDOW` get one log line naming the usual cause.
const FREQUENT_RESETS: u64 = 50;
const WINDOW: Duration = Duration::from_secs(10);

/// What `sticky stats` reports of the resets.
#[derive(Default)]
pub struct ResetStats {
    /// What happens to foreign requests: `reset`, `pass` (asked so, or this
    /// kernel cannot reset) or `off`.
    pub mode: &'static str,
    pub reset: AtomicU64,
    pub failed: AtomicU64,
}

impl ResetStats {
    pub fn new(mode: &'static str) -> ResetStats {
        ResetStats {
            mode,
            ..ResetStats::default()
        }
    }
}

/// One TCP socket as sock_diag names it: addresses as the kernel stores
/// them (network order words, IPv4 in word 0), ports in host order.
#[derive(Clone, Copy, Debug)]
struct Socket {
    family: u8,
    local: [u32; 4],
    local_port: u16,
    remote: [u32; 4],
    remote_port: u16,
    cookie: u64,
}

impl Socket {
    fn from_event(ev: &ResetEvent, local_port: u16) -> Socket {
        Socket {
            family: ev.flow.family as u8,
            local: ev.flow.local,
            local_port,
            remote: ev.flow.remote,
            remote_port: u16::from_be(ev.flow.remote_port),
            cookie: ev.cookie,
        }
    }

    fn from_stream(s: &TcpStream) -> io::Result<Socket> {
        let (local, local_port, family) = words(s.local_addr()?);
        let (remote, remote_port, _) = words(s.peer_addr()?);
        Ok(Socket {
            family,
            local,
            local_port,
            remote,
            remote_port,
            cookie: so_cookie(s.as_raw_fd())?,
        })
    }
}

fn words(addr: SocketAddr) -> ([u32; 4], u16, u8) {
    let mut w = [0u32; 4];
    match addr {
        SocketAddr::V4(a) => {
            w[0] = u32::from_ne_bytes(a.ip().octets());
            (w, a.port(), libc::AF_INET as u8)
        }
        SocketAddr::V6(a) => {
            for (i, chunk) in a.ip().octets().chunks(4).enumerate() {
                w[i] = u32::from_ne_bytes(chunk.try_into().unwrap());
            }
            (w, a.port(), libc::AF_INET6 as u8)
        }
    }
}

fn so_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A NETLINK_SOCK_DIAG socket.
struct SockDiag {
    fd: OwnedFd,
    seq: u32,
}

const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;

impl SockDiag {
    fn open() -> io::Result<SockDiag> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SockDiag { fd, seq: 0 })
    }

    /// SOCK_DESTROY of exactly this socket (tuple and cookie), and the kernel's answer.
    fn destroy(&mut self, s: &Socket) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        // struct nlmsghdr (16 bytes), then struct inet_diag_req_v2 (56).
        let mut msg = [0u8; 72];
        msg[0..4].copy_from_slice(&72u32.to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        let req = &mut msg[16..];
        req[0] = s.family;
        req[1] = libc::IPPROTO_TCP as u8;
        req[4..8].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
                                                            // struct inet_diag_sockid: sport, dport (big endian), src, dst, if, cookie.
        req[8..10].copy_from_slice(&s.local_port.to_be_bytes());
        req[10..12].copy_from_slice(&s.remote_port.to_be_bytes());
        for i in 0..4 {
            req[12 + 4 * i..16 + 4 * i].copy_from_slice(&s.local[i].to_ne_bytes());
            req[28 + 4 * i..32 + 4 * i].copy_from_slice(&s.remote[i].to_ne_bytes());
        }
        req[48..52].copy_from_slice(&(s.cookie as u32).to_ne_bytes());
        req[52..56].copy_from_slice(&((s.cookie >> 32) as u32).to_ne_bytes());
        // SAFETY: a send of a buffer we own to the kernel (address unset: the kernel).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answer = [0u8; 128];
        loop {
            // SAFETY: a receive into a buffer we own.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    answer.as_mut_ptr().cast(),
                    answer.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n < 20 {
                return Err(io::Error::other("short sock_diag answer"));
            }
            let kind = u16::from_ne_bytes([answer[4], answer[5]]);
            let seq = u32::from_ne_bytes(answer[8..12].try_into().unwrap());
            if kind != NLMSG_ERROR || seq != self.seq {
                continue; // not the answer to this request
            }
            let errno = i32::from_ne_bytes(answer[16..20].try_into().unwrap());
            return if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            };
        }
    }
}

/// Can this kernel destroy a TCP socket for us? Tried on a loopback
/// connection of our own: the destroy must succeed and its peer must see
/// the RST. The error says what is missing.
pub fn probe() -> Result<(), String> {
    let attempt = || -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (mut server, _) = listener.accept()?;
        SockDiag::open()?.destroy(&Socket::from_stream(&client)?)?;
        server.set_read_timeout(Some(Duration::from_secs(2)))?;
        match server.read(&mut [0u8; 1]) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            other => Err(io::Error::other(format!(
                "the destroyed socket's peer saw {other:?}, not a reset"
            ))),
        }
    };
    attempt().map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => {
            "this kernel cannot destroy sockets (built without CONFIG_INET_DIAG_DESTROY)".into()
        }
        Some(libc::ENOENT) | Some(libc::EPROTONOSUPPORT) => {
            "sock_diag for TCP is missing (load the tcp_diag module: modprobe tcp_diag)".into()
        }
        _ => format!("destroying a socket with sock_diag failed ({e})"),
    })
}

/// Destroys every connection the kernel queues in `ring`, on a thread of
/// its own, forever. `port` is the listening port (every connection's local
/// port).
pub fn serve(ring: RingBuf<MapData>, port: u16, stats: Arc<ResetStats>) -> io::Result<()> {
    let mut diag = SockDiag::open()?;
    std::thread::Builder::new()
        .name("resets".into())
        .spawn(move || {
            let mut ring = ring;
            let mut window = Window::new();
            loop {
                wait_readable(ring.as_raw_fd());
                while let Some(item) = ring.next() {
                    if item.len() < size_of::<ResetEvent>() {
                        continue;
                    }
                    // SAFETY: the kernel wrote a struct sticky_reset (size checked).
                    let ev: ResetEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    drop(item);
                    match diag.destroy(&Socket::from_event(&ev, port)) {
                        Ok(()) => {
                            stats.reset.fetch_add(1, Ordering::Relaxed);
                            window.reset();
                        }
                        Err(e) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            window.failed(&e);
                        }
                    }
                }
            }
        })?;
    Ok(())
}

fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd; EINTR just loops.
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// Rate-limited logging: one line per WINDOW at most for frequent resets,
/// one for failures.
struct Window {
    start: Instant,
    resets: u64,
    said_resets: bool,
    said_failure: bool,
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            resets: 0,
            said_resets: false,
            said_failure: false,
        }
    }

    fn roll(&mut self) {
        if self.start.elapsed() >= WINDOW {
            *self = Window::new();
        }
    }

    fn reset(&mut self) {
        self.roll();
        self.resets += 1;
        if self.resets > FREQUENT_RESETS && !self.said_resets {
            self.said_resets = true;
            log!(
                "more than {FREQUENT_RESETS} connections reset in {} s because a request carried \
                 another worker's session: usually a front proxy that reuses server-side \
                 connections across clients (HAProxy: `http-reuse never`; nginx: no upstream \
                 `keepalive`); see README, \"Requests on reused connections\"",
                WINDOW.as_secs()
            );
        }
    }

    fn failed(&mut self, e: &io::Error) {
        self.roll();
        if !self.said_failure {
            self.said_failure = true;
            log!("could not reset a connection carrying another worker's session: {e}");
        }
    }
}
