//! The listening sockets, all bound to one address:port with `SO_REUSEPORT`.
//!
//! - one per worker, slot `i` of the sockarray, inherited by worker `i` only;
//! - per CPU, a sorting listener (`TCP_DEFER_ACCEPT`, socket filter) in that
//!   CPU's sorting slot, replaced by a fresh one at each rotation (made here
//!   by [`sorting_listener`], rotated by `sorter`);
//! - the 503 listener, answered by the supervisor when no worker is alive;
//! - the sink, whose classic socket filter drops every segment: pure ACKs
//!   carrying SYN cookies are sent there to vanish (see `sticky_select`).
//!
//! Every socket is `CLOEXEC`: a copy held by another process would keep a
//! sorting listener open and stop migration (DESIGN.md, pitfalls).

use std::{
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

/// Accept queue length of every listener; capped by `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;
/// Seconds a connection may stay silent after its handshake before it is
/// queued anyway (and then balanced): the kernel counts SYN-ACK retransmits.
const DEFER_ACCEPT_SECS: i32 = 10;

pub struct ListenerGroup {
    pub addr: SocketAddr,
    pub workers: Vec<OwnedFd>,
    pub reject: TcpListener,
    pub sink: OwnedFd,
}

impl ListenerGroup {
    /// Creates, binds and listens on the worker and 503 listeners.
    pub fn bind(addr: SocketAddr, workers: usize) -> Result<ListenerGroup> {
        refuse_if_in_use(addr)?;
        let first = reuseport_socket(addr)?;
        // Port 0: the kernel picked one; everyone else joins that port.
        let addr = local_addr(&first)?;
        let mut worker_fds = vec![first];
        for _ in 1..workers {
            worker_fds.push(reuseport_socket(addr)?);
        }
        for fd in &worker_fds {
            listen(fd)?;
        }
        let reject = worker_listener(addr)?;
        let sink = sink_listener(addr)?;
        Ok(ListenerGroup {
            addr,
            workers: worker_fds,
            reject: TcpListener::from(reject),
            sink,
        })
    }
}

/// A fresh listening socket joining the group on `addr`: a worker's
/// listener (or the 503 one), not yet in any slot.
pub fn worker_listener(addr: SocketAddr) -> Result<OwnedFd> {
    let fd = reuseport_socket(addr)?;
    listen(&fd)?;
    Ok(fd)
}

/// The sink: a listener whose filter drops every segment (see the module
/// docs).
fn sink_listener(addr: SocketAddr) -> Result<OwnedFd> {
    let fd = reuseport_socket(addr)?;
    drop_everything(&fd)?;
    listen(&fd)?;
    Ok(fd)
}

impl ListenerGroup {
    /// Like `bind`, on a port that adopted workers still hold: `adopted[i]`
    /// is worker `i`'s listener taken from its process, or None for a fresh
    /// one. The new sockets join the same reuseport group.
    pub fn with_adopted(addr: SocketAddr, adopted: Vec<Option<OwnedFd>>) -> Result<ListenerGroup> {
        let workers = adopted
            .into_iter()
            .map(|fd| fd.map_or_else(|| worker_listener(addr), Ok))
            .collect::<Result<Vec<_>>>()?;
        let reject = worker_listener(addr)?;
        let sink = sink_listener(addr)?;
        Ok(ListenerGroup {
            addr,
            workers,
            reject: TcpListener::from(reject),
            sink,
        })
    }
}

/// A new sorting listener: bound, `TCP_DEFER_ACCEPT`, the socket filter
/// attached, listening. Always a fresh socket: re-listening a shut one would
/// leave the kernel's fast bind path (it refuses sockets already in a
/// reuseport group) and scan every connection and TIME_WAIT on the port.
pub fn sorting_listener(addr: SocketAddr, filter: &impl AsRawFd) -> Result<OwnedFd> {
    sorting_listener_with_backlog(addr, filter, BACKLOG)
}

/// A sorting listener with a backlog of 0: its request queue is always
/// full, so the kernel answers the SYNs it takes with SYN cookies (the
/// overflow listener, used during a SYN flood; see `sorter`).
pub fn overflow_listener(addr: SocketAddr, filter: &impl AsRawFd) -> Result<OwnedFd> {
    sorting_listener_with_backlog(addr, filter, 0)
}

/// Cookie mode's overflow listener: a backlog of PLUGS - 1, for the plugs
/// (`plug.rs`) to fill its request queue.
pub fn plugged_overflow_listener(addr: SocketAddr, filter: &impl AsRawFd) -> Result<OwnedFd> {
    sorting_listener_with_backlog(addr, filter, sticky_common::PLUGS as i32 - 1)
}

fn sorting_listener_with_backlog(
    addr: SocketAddr,
    filter: &impl AsRawFd,
    backlog: i32,
) -> Result<OwnedFd> {
    let fd = reuseport_socket(addr)?;
    setsockopt_int(
        &fd,
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        DEFER_ACCEPT_SECS,
    )
    .context("TCP_DEFER_ACCEPT on a sorting listener")?;
    setsockopt_int(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_BPF,
        filter.as_raw_fd(),
    )
    .context("attaching the socket filter (SO_ATTACH_BPF)")?;
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } < 0 {
        return Err(io::Error::last_os_error()).context("listen()");
    }
    Ok(fd)
}

/// Attaches a classic socket filter returning 0: every segment reaching
/// the socket is dropped before TCP looks at it (no child, no RST).
pub fn drop_everything(fd: &impl AsRawFd) -> Result<()> {
    let mut drop_all = [libc::sock_filter {
        code: 0x06, // BPF_RET | BPF_K
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: prog points to a valid one-instruction program.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("attaching the sink's filter");
    }
    Ok(())
}

/// A second `sticky run` on the same port would join the first one's
/// reuseport group (same uid). Binding once without `SO_REUSEPORT` fails if
/// anything listens there, whoever it is.
fn refuse_if_in_use(addr: SocketAddr) -> Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = socket(addr)?;
    setsockopt_int(&probe, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if let Err(e) = bind(&probe, addr) {
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            bail!("{addr} is already in use (another sticky or server listens there); pick another --listen port or stop it");
        }
        return Err(e).with_context(|| format!("cannot bind {addr}"));
    }
    Ok(())
}

fn reuseport_socket(addr: SocketAddr) -> Result<OwnedFd> {
    let fd = socket(addr)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    if addr.is_ipv6() {
        // [::] takes IPv4 too, as users of dual-stack servers expect.
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    bind(&fd, addr).map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            anyhow::anyhow!(
                "{addr} is already in use; pick another --listen port or stop what listens there"
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot bind {addr}"))
        }
    })?;
    Ok(fd)
}

pub fn socket(addr: SocketAddr) -> Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket()");
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn listen(fd: &impl AsRawFd) -> Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
        return Err(io::Error::last_os_error()).context("listen()");
    }
    Ok(())
}

/// `shutdown(SHUT_WR)` on a listener: changes nothing (it keeps listening,
/// children do not inherit it) but wakes its waiters (`sk_state_change`),
/// which then find the connections migrated into its queue. Kernels before
/// "tcp: call sk_data_ready() after listener migration" (upstream April
/// 2026, in Debian's 6.1.176 but not 6.1.170) leave a worker blocked in
/// epoll_wait or accept asleep next to such a connection.
pub fn wake_waiters(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `shutdown(SHUT_RD)` on a listener: stops listening and migrates its
/// accept queue through the selector (`inet_csk_listen_stop`).
pub fn stop_listening(fd: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> Result<()> {
    // SAFETY: value outlives the call; the size matches.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context(format!("setsockopt({level}, {name})"));
    }
    Ok(())
}

fn bind(fd: &impl AsRawFd, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn local_addr(fd: &OwnedFd) -> Result<SocketAddr> {
    // Borrow the fd as a std listener just to ask its address, then forget it.
    // SAFETY: the ManuallyDrop wrapper never closes the borrowed fd.
    let l = std::mem::ManuallyDrop::new(unsafe { TcpListener::from_raw_fd(fd.as_raw_fd()) });
    l.local_addr().context("getsockname()")
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
