//! Adopting the workers of a supervisor that died without cleaning up
//! (SIGKILL, OOM kill, crash). Its workers still hold the port and serve,
//! balanced by the old selector that nobody feeds anymore. A new
//! `sticky run` on that port takes them over instead of refusing:
//!
//! - it finds every process holding a listening socket on the port (/proc)
//!   and accepts only sticky workers: `LISTEN_PID` is their own pid,
//!   `STICKY_WORKER` and `STICKY_GENERATION` name their slot (see
//!   `supervisor::slot_of`), fd 3 is one of those listeners; or
//!   processes in such a worker's process group (its children). Anything
//!   else holding the port is named in the error;
//! - it takes each worker's listener with `pidfd_getfd` (fd 3) and keeps
//!   the pidfd to learn when the process exits (not our child: no waitpid);
//! - it finds the old selector in the kernel's program list (a
//!   `sticky_select` whose config names the port), copies its sessions,
//!   registered and learned, and frees the adopted listeners from its slot
//!   array so that the new one can hold them.
//!
//! A supervisor killed during a reload's drain leaves two generations: both
//! are adopted, the newest takes new sessions, the older one drains again
//! for a full `--drain` (the new supervisor cannot know the old deadline).
//!
//! Nothing is pinned: the old program and maps are reached through their
//! ids while they are attached, and go away once the new selector replaces
//! the old one.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io::{self, BufRead, BufReader},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, Map, MapData, MapInfo, ReusePortSockArray},
    programs::loaded_programs,
};
use sticky_common::{Config, Session};
use sticky_ebpf::{maps, SELECT_PROGRAM};

/// A worker of a dead supervisor, taken over.
pub struct Orphan {
    /// Its slot.
    pub index: usize,
    pub generation: u64,
    pub pid: u32,
    /// Readable once the process has exited.
    pub pidfd: OwnedFd,
    /// Its fd 3, duplicated into this process.
    pub listener: OwnedFd,
}

/// Finds the orphaned workers holding `addr`'s port. Empty when nothing
/// listens there (or `addr` asks for port 0); an error naming the holders
/// when anything but sticky workers listens there.
pub fn find_orphans(addr: SocketAddr, workers: usize) -> Result<Vec<Orphan>> {
    if addr.port() == 0 {
        return Ok(Vec::new());
    }
    let inodes = listening_inodes(addr.port());
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let me = std::process::id();
    let holders: Vec<u32> = processes()
        .filter(|&pid| pid != me)
        .filter(|&pid| socket_fds(pid).values().any(|i| inodes.contains(i)))
        .collect();
    let mut found: StdHashMap<u32, (usize, u64)> = StdHashMap::new();
    for &pid in &holders {
        if let Some(worker) = sticky_worker(pid, &inodes) {
            found.insert(pid, worker);
        }
    }
    let strangers: Vec<String> = holders
        .iter()
        .filter(|pid| !found.contains_key(pid))
        .filter(|&&pid| !process_group(pid).is_some_and(|g| found.contains_key(&g)))
        .map(|&pid| format!("pid {pid} ({})", command_name(pid)))
        .collect();
    if !strangers.is_empty() {
        bail!(
            "{addr} is already in use by {}; stop it or pick another --listen port",
            strangers.join(", ")
        );
    }
    let mut slots: StdHashMap<usize, u32> = StdHashMap::new();
    for (&pid, &(index, generation)) in &found {
        if index >= workers {
            bail!(
                "pid {pid} is worker {index} of an earlier sticky on {addr}; \
                 pass --workers {} or more to adopt it, or stop it",
                index + 1
            );
        }
        let slot = crate::supervisor::slot_of(index, generation, workers);
        if let Some(other) = slots.insert(slot, pid) {
            bail!(
                "pids {other} and {pid} both claim worker {index} of generation {generation} \
                 on {addr}; stop one of them"
            );
        }
    }
    let mut orphans: Vec<Orphan> = Vec::new();
    for (pid, (index, generation)) in found {
        let index = crate::supervisor::slot_of(index, generation, workers);
        match take_listener(pid) {
            // The pid was reused by another process since we looked.
            Ok((_, listener)) if !inode_of(&listener).is_some_and(|i| inodes.contains(&i)) => {}
            Ok((pidfd, listener)) => orphans.push(Orphan {
                index,
                generation,
                pid,
                pidfd,
                listener,
            }),
            // Exited since we looked: its slot just gets a new worker.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot take the listener of worker {index} (pid {pid})")
                })
            }
        }
    }
    orphans.sort_by_key(|o| o.index);
    Ok(orphans)
}

/// The maps of the selector the dead supervisor left attached.
pub struct OldSteering {
    listeners: ReusePortSockArray<MapData>,
    sessions: HashMap<MapData, u64, Session>,
    /// Its maps' SipHash key: the carried keys are hashes under it.
    pub sid_key: [u64; 2],
}

impl OldSteering {
    /// The one loaded `sticky_select` whose config names `port`; `pids`
    /// (the orphans) only go into the error message.
    pub fn find(port: u16, pids: &[u32]) -> Result<OldSteering> {
        let mut found = Vec::new();
        for prog in loaded_programs().filter_map(Result::ok) {
            if prog.name_as_str() != Some(SELECT_PROGRAM) {
                continue;
            }
            let Ok(Some(ids)) = prog.map_ids() else {
                continue;
            };
            let by_name: StdHashMap<String, u32> = ids
                .into_iter()
                .filter_map(|id| {
                    let name = MapInfo::from_id(id).ok()?.name_as_str()?.to_owned();
                    Some((name, id))
                })
                .collect();
            let config: Option<Array<MapData, Config>> = open(&by_name, maps::CONFIG).ok();
            match config.and_then(|c| c.get(&0, 0).ok()) {
                Some(c) if c.port == port as u32 => found.push((by_name, c.sid_key)),
                _ => {}
            }
        }
        let [(by_name, sid_key)] = found.as_slice() else {
            let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
            bail!(
                "cannot adopt the workers on port {port} (found {} sticky selectors for it, \
                 expected one, maybe an older sticky's); stop them (kill {}) and start again",
                found.len(),
                pids.join(" ")
            );
        };
        Ok(OldSteering {
            listeners: open(by_name, maps::LISTENERS)?,
            sessions: open(by_name, maps::SESSIONS)?,
            sid_key: *sid_key,
        })
    }

    /// The sessions, registered and learned, owned by the adopted workers
    /// (others' owners are gone), keyed as in the old map.
    pub fn sessions(&self, adopted: &[usize]) -> Result<Vec<(u64, Session)>> {
        let mut carried = Vec::new();
        crate::batch::for_each(self.sessions.map(), |key: u64, s: Session| {
            if adopted.contains(&(s.worker as usize)) {
                carried.push((key, s));
            }
        })
        .context("reading the old selector's sessions")?;
        Ok(carried)
    }

    /// Takes slot `index` out of the old slot array: a socket can be in
    /// only one, and the new one must hold it.
    pub fn release_slot(&mut self, index: usize) -> Result<()> {
        match self.listeners.clear_index(&(index as u32)) {
            Ok(()) => Ok(()),
            Err(e) => Err(anyhow!(e)).context(format!("freeing slot {index} of the old selector")),
        }
    }
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(
    by_name: &StdHashMap<String, u32>,
    name: &str,
) -> Result<T> {
    let id = by_name
        .get(name)
        .ok_or_else(|| anyhow!("the old selector has no map {name}"))?;
    let map = Map::from_map_data(MapData::from_id(*id)?)?;
    T::try_from(map).with_context(|| format!("the old map {name} has an unexpected type"))
}

/// Inodes of the TCP sockets listening on `port` (IPv4 and IPv6).
///
/// The kernel lists listening sockets first in /proc/net/tcp{,6}, then
/// every other one (TIME_WAIT included: hundreds of thousands on a busy
/// host, megabytes generated as they are read), so reading stops at the
/// first line that is not LISTEN.
fn listening_inodes(port: u16) -> HashSet<u64> {
    const LISTEN: &str = "0A";
    let port_hex = format!("{port:04X}");
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        for line in BufReader::new(file).lines().skip(1).map_while(Result::ok) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&LISTEN) {
                break;
            }
            let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
            if local_port == Some(port_hex.as_str()) {
                if let Some(inode) = fields.get(9).and_then(|i| i.parse().ok()) {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

/// fd number -> socket inode, for every socket `pid` holds.
fn socket_fds(pid: u32) -> StdHashMap<i32, u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            let inode = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, inode))
        })
        .collect()
}

/// `Some((index, generation))` if `pid` is a sticky worker whose fd 3
/// listens on the port (generation 0 for a sticky that did not set it).
fn sticky_worker(pid: u32, inodes: &HashSet<u64>) -> Option<(usize, u64)> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let env: StdHashMap<&[u8], &[u8]> = environ
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let eq = kv.iter().position(|&b| b == b'=')?;
            Some((&kv[..eq], &kv[eq + 1..]))
        })
        .collect();
    let var = |k: &str| std::str::from_utf8(env.get(k.as_bytes())?).ok();
    let own = var("LISTEN_PID")?.parse::<u32>().ok()? == pid
        && var("LISTEN_FDNAMES")? == "sticky"
        && socket_fds(pid).get(&3).is_some_and(|i| inodes.contains(i));
    let generation = var("STICKY_GENERATION").map_or(Some(0), |g| g.parse().ok())?;
    own.then(|| Some((var("STICKY_WORKER")?.parse().ok()?, generation)))
        .flatten()
}

fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split(' ').nth(2)?.parse().ok()
}

fn command_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// A pidfd for `pid` and a duplicate of its fd 3.
fn take_listener(pid: u32) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain syscalls; each returned fd is fresh and owned below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), 3, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // pidfd_getfd sets CLOEXEC: no worker we start inherits another's.
    Ok((pidfd, unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// True once the process behind `pidfd` has exited.
pub fn has_exited(pidfd: &OwnedFd) -> bool {
    poll_readable(pidfd, 0)
}

/// Blocks until the process behind `pidfd` exits.
pub fn wait_exit(pidfd: &OwnedFd) {
    while !poll_readable(pidfd, -1) {}
}

/// A pidfd is readable once its process has exited.
fn poll_readable(pidfd: &OwnedFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

fn inode_of(fd: &OwnedFd) -> Option<u64> {
    // SAFETY: all-zero is a valid stat; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some(st.st_ino)
}
