//! A delay line between network namespaces, for clients that are really
//! far away: this kernel has no netem (nor fq or ETF, which could hold
//! packets to a BPF-set departure time), so a thread of this process holds
//! every frame for the one-way delay and forwards it.
//!
//! ```text
//!  clients' namespace       delay line's namespace           this namespace
//!  c0 10.77.0.2 ──veth── d0 ══ thread: hold, forward ══ d1 ──veth── s0 10.77.0.1
//!  10.80.0.0/12 local                                        sticky on 0.0.0.0
//! ```
//!
//! Every frame crosses, ARP included, unchanged: the line is a bridge that
//! takes its time. The clients bind any address of 10.80.0.0/12 (a local
//! route in their namespace), so that each connection comes from an
//! address of its own, as on loopback (`connection_address`). Unlike the
//! clients that wait after `connect()`, every segment pays the distance:
//! the SYN-ACK, the first data, the answer, the FIN.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The server's address on the line.
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const CLIENT_LINK: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Where the clients' source addresses come from: 10.80.0.0/12, a million
/// addresses.
const SOURCES: &str = "10.80.0.0/12";
const SOURCE_COUNT: u32 = 1 << 20;

pub(super) struct DelayLine {
    clients_ns: String,
    line_ns: String,
    server_if: String,
    stop: Arc<AtomicBool>,
    /// The one-way delay, in nanoseconds: half the round trip.
    one_way_ns: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    /// Frames forwarded, and frames dropped (too large or a send error).
    forwarded: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    /// The reading sockets, for the kernel's count of frames it dropped
    /// because the line did not read them in time.
    readers: Vec<Arc<OwnedFd>>,
    /// Frames the kernel dropped on them, so far.
    unread: AtomicU64,
    /// Source addresses handed out so far (`next_source`).
    sources: AtomicU32,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Moves the calling thread into the named network namespace.
fn enter(ns: &str) -> io::Result<()> {
    let path = CString::new(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: open and setns are plain syscalls; the fd is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl DelayLine {
    /// Builds the namespaces and links and starts forwarding, with no
    /// delay until `set_round_trip`.
    pub(super) fn start() -> Result<DelayLine, String> {
        let id = std::process::id();
        let mut line = DelayLine {
            clients_ns: format!("sb{id}c"),
            line_ns: format!("sb{id}d"),
            server_if: format!("sb{id}s"),
            stop: Arc::new(AtomicBool::new(false)),
            one_way_ns: Arc::new(AtomicU64::new(0)),
            threads: Vec::new(),
            forwarded: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
            readers: Vec::new(),
            unread: AtomicU64::new(0),
            sources: AtomicU32::new(0),
        };
        // From here on, Drop removes whatever was made.
        line.configure()?;
        for (from, to) in [("d0", "d1"), ("d1", "d0")] {
            let (rx, tx) = line.sockets(from, to)?;
            let rx = Arc::new(rx);
            line.readers.push(Arc::clone(&rx));
            let (stop, one_way, forwarded, dropped) = (
                Arc::clone(&line.stop),
                Arc::clone(&line.one_way_ns),
                Arc::clone(&line.forwarded),
                Arc::clone(&line.dropped),
            );
            line.threads.push(std::thread::spawn(move || {
                forward(&rx, &tx, &one_way, &stop, &forwarded, &dropped)
            }));
        }
        Ok(line)
    }

    fn configure(&self) -> Result<(), String> {
        let (c, d, s) = (&self.clients_ns, &self.line_ns, &self.server_if);
        ip(&["netns", "add", c])?;
        ip(&["netns", "add", d])?;
        ip(&[
            "link", "add", s, "type", "veth", "peer", "name", "d1", "netns", d,
        ])?;
        ip(&[
            "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "d0", "netns", d,
        ])?;
        ip(&["addr", "add", &format!("{SERVER}/24"), "dev", s])?;
        ip(&["link", "set", s, "up"])?;
        ip(&[
            "route",
            "add",
            SOURCES,
            "via",
            &CLIENT_LINK.to_string(),
            "dev",
            s,
        ])?;
        let netns = |ns: &str, args: &[&str]| {
            let mut all = vec!["-n", ns];
            all.extend_from_slice(args);
            ip(&all)
        };
        netns(
            c,
            &["addr", "add", &format!("{CLIENT_LINK}/24"), "dev", "c0"],
        )?;
        netns(c, &["link", "set", "c0", "up"])?;
        netns(c, &["link", "set", "lo", "up"])?;
        netns(c, &["route", "add", "local", SOURCES, "dev", "lo"])?;
        netns(d, &["link", "set", "d0", "up"])?;
        netns(d, &["link", "set", "d1", "up"])?;
        // The senders' checksums, computed in software: a veth leaves them
        // to the receiver (offloaded), but a frame the line sends again is
        // new to the kernel, which then checks them.
        checksum_in_software(s).map_err(|e| format!("{s}: {e}"))?;
        let clients = c.clone();
        std::thread::spawn(move || {
            enter(&clients)?;
            checksum_in_software("c0")
        })
        .join()
        .unwrap()
        .map_err(|e| format!("c0: {e}"))
    }

    /// A packet socket on `from` to read and one on `to` to write, made in
    /// the line's namespace (they stay bound to its interfaces).
    fn sockets(&self, from: &str, to: &str) -> Result<(OwnedFd, OwnedFd), String> {
        let ns = self.line_ns.clone();
        let (from, to) = (from.to_string(), to.to_string());
        // setns on a thread of its own: this one stays where it is.
        std::thread::spawn(move || -> io::Result<(OwnedFd, OwnedFd)> {
            enter(&ns)?;
            Ok((packet_socket(&from)?, packet_socket(&to)?))
        })
        .join()
        .unwrap()
        .map_err(|e| format!("delay line sockets: {e}"))
    }

    /// Every frame from now on is held for half of `round_trip` each way.
    pub(super) fn set_round_trip(&self, round_trip: Duration) {
        self.one_way_ns
            .store(round_trip.as_nanos() as u64 / 2, Ordering::Relaxed);
    }

    /// The server's address on the line, for a listener on 0.0.0.0:`port`.
    pub(super) fn server(&self, port: u16) -> SocketAddr {
        (SERVER, port).into()
    }

    /// Moves the calling thread (a client) into the clients' namespace.
    pub(super) fn enter_clients(&self) -> io::Result<()> {
        enter(&self.clients_ns)
    }

    /// A source address for a new connection: each its own, over the
    /// whole run (every mode's connections, not reusing another's 4-tuple
    /// in TIME_WAIT), until the million are used.
    pub(super) fn next_source(&self) -> Ipv4Addr {
        let j = self.sources.fetch_add(1, Ordering::Relaxed) % (SOURCE_COUNT - 2) + 1;
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 80, 0, 0)) + j)
    }

    /// Frames forwarded, and frames lost (not read in time, or not sent),
    /// so far.
    pub(super) fn frames(&self) -> (u64, u64) {
        let new: u64 = self.readers.iter().map(|fd| kernel_drops(fd)).sum();
        let unread = self.unread.fetch_add(new, Ordering::Relaxed) + new;
        (
            self.forwarded.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed) + unread,
        )
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Deleting the namespaces deletes their ends of the veth pairs, and
        // with them the peers here.
        let _ = ip(&["netns", "del", &self.clients_ns]);
        let _ = ip(&["netns", "del", &self.line_ns]);
        let _ = ip(&["link", "del", &self.server_if]);
    }
}

/// Turns transmit checksum offload off on interface `name` (in the calling
/// thread's namespace), as `ethtool -K name tx off` does; segmentation
/// offloads, which depend on it, go off with it.
fn checksum_in_software(name: &str) -> io::Result<()> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: a zeroed ifreq is valid; the name fits (checked), the data
    // pointer outlives the ioctl.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Frames the kernel dropped on `fd` since the last call (its receive
/// buffer was full): PACKET_STATISTICS, which resets on reading.
fn kernel_drops(fd: &OwnedFd) -> u64 {
    let mut stats = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = size_of::<libc::tpacket_stats>() as u32;
    // SAFETY: stats is valid for len bytes.
    let ok = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    } == 0;
    if ok {
        stats.tp_drops as u64
    } else {
        0
    }
}

/// An AF_PACKET socket seeing every frame of interface `name`.
fn packet_socket(name: &str) -> io::Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscalls; the new descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = CString::new(name).unwrap();
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound < 0 {
        return Err(io::Error::last_os_error());
    }
    // Room for a burst while the line's thread waits for a CPU.
    let size: libc::c_int = 8 << 20;
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    Ok(fd)
}

/// Reads frames arriving on `rx`, sends each on `tx` `one_way_ns` later,
/// until `stop`. Frames this line sent itself show on `rx` as outgoing:
/// skipped.
fn forward(
    rx: &OwnedFd,
    tx: &OwnedFd,
    one_way_ns: &AtomicU64,
    stop: &AtomicBool,
    forwarded: &AtomicU64,
    dropped: &AtomicU64,
) {
    // Sleeps of a fraction of a millisecond: the default 50 µs slack is a
    // tenth of the delay.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1) };
    let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let wait = held.front().map_or(Duration::from_millis(20), |(due, _)| {
            due.saturating_duration_since(Instant::now())
        });
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        let mut pfd = libc::pollfd {
            fd: rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        loop {
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buf and from are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    rx.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n <= 0 {
                break;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let delay = Duration::from_nanos(one_way_ns.load(Ordering::Relaxed));
            held.push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frame) = held.pop_front().unwrap();
            // SAFETY: frame is valid for its length.
            let sent = unsafe { libc::send(tx.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            let counter = if sent == frame.len() as isize {
                forwarded
            } else {
                dropped
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
