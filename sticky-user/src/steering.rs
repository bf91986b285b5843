//! Loads the steering object (`sticky-ebpf`), attaches its programs and
//! hands out its maps, typed.
//!
//! Attach points: `sticky_select` on the reuseport group (through any of its
//! listening sockets), `sticky_sort` on each sorting listener, and with
//! learning on `sticky_learn` / `sticky_watch` on sticky's cgroup (egress /
//! ingress). Nothing is pinned: when the supervisor's sockets close, the kernel drops it all.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, ReusePortSockArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SkReuseport, SocketFilter},
    Ebpf, EbpfLoader,
};
use sticky_common::{Config, Handoff, Session, WorkerState, DOORBELL_BYTES, MAX_CPUS};
use sticky_ebpf::{maps, LEARN_PROGRAM, SELECT_PROGRAM, SORT_PROGRAM, WATCH_PROGRAM};

/// Socket migration through a select-or-migrate program arrived in 5.14.
const MIN_KERNEL: (u32, u32) = (5, 14);

pub struct Steering {
    ebpf: Ebpf,
}

/// The maps user space writes or reads, taken out of the loaded object.
pub struct SteeringMaps {
    pub listeners: ReusePortSockArray<MapData>,
    pub config: Array<MapData, Config>,
    pub workers: Array<MapData, WorkerState>,
    /// Keyed by the sid's hash (`sticky_common::SidHasher`).
    pub sessions: HashMap<MapData, u64, Session>,
    pub counters: Counters,
    pub handoff: HandoffMap,
    pub doorbells: ArrayOfMaps<MapData, MapData>,
    /// Connections `sticky_watch` doomed, for `resets.rs` to destroy.
    pub resets: RingBuf<MapData>,
}

/// Entries of the LRU maps of connections in flight, `flows` (a queued
/// connection's decision, from its first data to the rotation that
/// migrates it) and `placed_flows` (a placed connection, until its worker's
/// first answers): preallocated, about 120 bytes each. What they must hold
/// grows with the connections in flight, so with the CPUs: a sorting
/// listener's accept queue (`listeners::BACKLOG`, 4,096) per CPU, at least
/// 16,384 (four CPUs' full queues at once; rotation keeps them near
/// empty), at most the sticky.h bound (65,536, sixteen CPUs' worth).
fn in_flight_entries(cpus: usize) -> u32 {
    let per_cpu = crate::listeners::BACKLOG as u32;
    (per_cpu.saturating_mul(cpus as u32)).clamp(
        16_384,
        sticky_common::FLOWS_MAX.min(sticky_common::PLACED_MAX),
    )
}

impl Steering {
    /// Checks the kernel and privileges, then loads both programs into the
    /// kernel (verifying them) without attaching anything.
    /// `max_sessions` sizes the `sessions` map, `cpus` (sorting CPUs) the
    /// maps of connections in flight (`in_flight_entries`).
    pub fn load(max_sessions: u32, cpus: usize) -> Result<Steering> {
        check_kernel()?;
        raise_memlock();
        let in_flight = in_flight_entries(cpus);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SESSIONS, max_sessions)
            .map_max_entries(maps::FLOWS, in_flight)
            .map_max_entries(maps::PLACED_FLOWS, in_flight)
            .load(sticky_ebpf::steer_object())
            .map_err(|e| load_error(e.into()))?;
        let select: &mut SkReuseport = program(&mut ebpf, SELECT_PROGRAM)?;
        select.load().map_err(|e| load_error(e.into()))?;
        let sort: &mut SocketFilter = program(&mut ebpf, SORT_PROGRAM)?;
        sort.load().map_err(|e| load_error(e.into()))?;
        for name in [LEARN_PROGRAM, WATCH_PROGRAM] {
            let prog: &mut CgroupSkb = program(&mut ebpf, name)?;
            prog.load().map_err(|e| load_error(e.into()))?;
        }
        Ok(Steering { ebpf })
    }

    pub fn take_maps(&mut self) -> Result<SteeringMaps> {
        Ok(SteeringMaps {
            listeners: self.take(maps::LISTENERS)?,
            config: self.take(maps::CONFIG)?,
            workers: self.take(maps::WORKERS)?,
            sessions: self.take(maps::SESSIONS)?,
            counters: Counters {
                kernel: self.take(maps::COUNTERS)?,
                rotations: AtomicU64::new(0),
            },
            doorbells: self.take(maps::DOORBELLS)?,
            resets: self.take(maps::RESETS)?,
            handoff: HandoffMap::new(
                self.ebpf
                    .take_map(maps::HANDOFF)
                    .ok_or_else(|| anyhow!("map handoff missing"))?,
            )?,
        })
    }

    /// Makes `sticky_select` decide for the reuseport group `socket` is in.
    pub fn attach_selector(&mut self, socket: impl AsFd) -> Result<()> {
        let select: &mut SkReuseport = program(&mut self.ebpf, SELECT_PROGRAM)?;
        select
            .attach(socket)
            .context("attaching the selector to the listeners (SO_ATTACH_REUSEPORT_EBPF)")
    }

    /// Runs `sticky_learn` on the egress and `sticky_watch` on the ingress
    /// of `cgroup` (a cgroup v2 directory): the supervisor's own, which every
    /// socket it creates, and every connection accepted from them, carries.
    /// Detached when sticky exits.
    pub fn attach_learner(&mut self, cgroup: &std::path::Path) -> Result<()> {
        for (name, direction) in [
            (LEARN_PROGRAM, CgroupSkbAttachType::Egress),
            (WATCH_PROGRAM, CgroupSkbAttachType::Ingress),
        ] {
            let dir = std::fs::File::open(cgroup)
                .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
            let prog: &mut CgroupSkb = program(&mut self.ebpf, name)?;
            // A bpf_link (aya uses one on 5.7+) always coexists with other
            // programs; its flags must be 0, which `Single` maps to.
            prog.attach(dir, direction, CgroupAttachMode::Single)
                .with_context(|| {
                    format!(
                        "attaching the session learner ({name}) to cgroup {}",
                        cgroup.display()
                    )
                })?;
        }
        Ok(())
    }

    /// A descriptor of `sticky_sort`, for attaching it to each new sorting
    /// listener (SO_ATTACH_BPF).
    pub fn sort_program(&mut self) -> Result<OwnedFd> {
        let sort: &mut SocketFilter = program(&mut self.ebpf, SORT_PROGRAM)?;
        let fd = sort.fd().context("sticky_sort is not loaded")?;
        Ok(fd.as_fd().try_clone_to_owned()?)
    }

    fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        &mut self,
        name: &str,
    ) -> Result<T> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// The `counters` per-CPU map, summed over CPUs, and the counters user
/// space keeps beside it.
pub struct Counters {
    kernel: PerCpuArray<MapData, u64>,
    /// Sorting listener rotations, all CPUs.
    pub rotations: AtomicU64,
}

impl Counters {
    pub fn get(&self, index: u32) -> u64 {
        self.kernel
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// One CPU's share of a counter.
    pub fn get_cpu(&self, index: u32, cpu: usize) -> u64 {
        self.kernel
            .get(&index, 0)
            .ok()
            .and_then(|v| v.get(cpu).copied())
            .unwrap_or(0)
    }
}

/// One sorting CPU's doorbell: a ring buffer the selector writes to at each
/// SYN processed on that CPU. Only its readability matters.
pub struct Doorbell {
    ring: RingBuf<MapData>,
}

impl Doorbell {
    /// Creates the ring and installs it as CPU `cpu`'s doorbell.
    pub fn install(doorbells: &mut ArrayOfMaps<MapData, MapData>, cpu: usize) -> Result<Doorbell> {
        let fd = create_ringbuf(DOORBELL_BYTES).context("creating a doorbell ring buffer")?;
        let data = MapData::from_fd(fd)?;
        doorbells
            .set(cpu as u32, &data, 0)
            .context("installing a doorbell")?;
        let ring = RingBuf::try_from(aya::maps::Map::RingBuf(data))?;
        Ok(Doorbell { ring })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }

    /// Consumes every pending ring; true if there was any.
    pub fn drain(&mut self) -> bool {
        let mut rang = false;
        while self.ring.next().is_some() {
            rang = true;
        }
        rang
    }
}

/// BPF_MAP_CREATE of a ring buffer (aya cannot create standalone rings).
fn create_ringbuf(bytes: u32) -> std::io::Result<OwnedFd> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    // union bpf_attr, map-create part: type, key size, value size, entries.
    let mut attr = [0u32; 32];
    attr[0] = BPF_MAP_TYPE_RINGBUF;
    attr[3] = bytes;
    // SAFETY: attr is a zeroed bpf_attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The `handoff` array, mmapped: the sorters and the socket filter share it
/// without syscalls (protocol in sticky.h, `struct sticky_handoff`).
pub struct HandoffMap {
    _map: MapData,
    base: *mut Handoff,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for HandoffMap {}
unsafe impl Sync for HandoffMap {}

impl HandoffMap {
    fn new(map: aya::maps::Map) -> Result<HandoffMap> {
        let aya::maps::Map::Array(map) = map else {
            bail!("map handoff is not an array")
        };
        let len = MAX_CPUS as usize * size_of::<Handoff>();
        // SAFETY: mapping a BPF_F_MMAPABLE array of exactly `len` bytes.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the handoff map");
        }
        Ok(HandoffMap {
            _map: map,
            base: base.cast(),
            len,
        })
    }

    pub fn entry(&self, cpu: usize) -> &Handoff {
        assert!(cpu < MAX_CPUS as usize);
        // SAFETY: in bounds of the live mapping; Handoff is two atomics.
        unsafe { &*self.base.add(cpu) }
    }
}

impl Drop for HandoffMap {
    fn drop(&mut self) {
        // SAFETY: unmapping what new() mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn check_kernel() -> Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    check_kernel_release(release.trim())
}

fn check_kernel_release(release: &str) -> Result<()> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < MIN_KERNEL {
        bail!(
            "kernel {release} is too old: sticky needs Linux {}.{} or newer for socket migration \
             (BPF_SK_REUSEPORT_SELECT_OR_MIGRATE)",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    Ok(())
}

/// The cgroup v2 directory this process belongs to (`0::/path` in
/// /proc/self/cgroup, under the cgroup2 mount point).
pub fn own_cgroup() -> Result<std::path::PathBuf> {
    let cgroups =
        std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process is in no cgroup v2 hierarchy")?;
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    // mountinfo: id parent major:minor root mountpoint opts... - fstype source opts
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2")
                .then(|| left.split(' ').nth(4).map(str::to_owned))?
        })
        .context("no cgroup2 file system is mounted")?;
    Ok(std::path::Path::new(&mount).join(path.trim_start_matches('/')))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct; failure is harmless on 5.11+.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Turns the usual load failures into one line that says what to do.
fn load_error(e: anyhow::Error) -> anyhow::Error {
    // A program the verifier walked and refused (EACCES, like a missing
    // privilege): name the kernel and the verifier's reason, not sudo.
    let refused = e
        .chain()
        .find_map(|c| match c.downcast_ref::<aya::programs::ProgramError>() {
            Some(aya::programs::ProgramError::LoadError { verifier_log, .. }) => {
                verifier_reason(&verifier_log.to_string()).map(str::to_owned)
            }
            _ => None,
        });
    if let Some(reason) = refused {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        return anyhow!(
            "the BPF verifier of Linux {} refused sticky's kernel programs ({reason}): \
             see README's kernel matrix for the kernels sticky is tested on",
            release.trim()
        );
    }
    let text = format!("{e:#}");
    let denied = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .map(|io| matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)))
            .unwrap_or(false)
    }) || text.contains("Operation not permitted");
    if denied {
        anyhow!("loading the kernel programs was refused: sticky needs root (CAP_BPF and CAP_NET_ADMIN); run it with sudo")
    } else {
        e.context("loading the kernel programs failed")
    }
}

/// The verifier's reason for refusing a program: the first line after the
/// last instruction it walked (`175: (85) call bpf_skb_load_bytes#26`).
fn verifier_reason(log: &str) -> Option<&str> {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let last_insn = lines.iter().rposition(|l| {
        l.split_once(':')
            .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    })?;
    lines.get(last_insn + 1).copied()
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain vDSO call with a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::{check_kernel_release, verifier_reason};

    #[test]
    fn the_verifier_reason_is_the_line_after_the_last_instruction() {
        // Tail of Debian 6.1's log for a size that may be 0.
        let log = "0: R1=ctx(off=0,imm=0) R10=fp0\n\
                   ; int sticky_sort(struct __sk_buff *skb)\n\
                   174: (bc) w4 = w7 ; R4_w=scalar(umax=1023)\n\
                   175: (85) call bpf_skb_load_bytes#26\n\
                   invalid access to map value, value_size=2136 off=0 size=0\n\
                   R3 min value is outside of the allowed memory range\n\
                   verification time 4526757 usec\n\
                   processed 102591 insns (limit 1000000) max_states_per_insn 4\n";
        assert_eq!(
            verifier_reason(log),
            Some("invalid access to map value, value_size=2136 off=0 size=0")
        );
        assert_eq!(verifier_reason(""), None);
    }

    #[test]
    fn kernels_before_5_14_are_refused_with_the_reason() {
        for old in [
            "5.10.0-28-amd64",
            "5.13.19",
            "4.19.0",
            "3.10.0-1160.el7.x86_64",
        ] {
            let e = check_kernel_release(old).unwrap_err().to_string();
            assert!(e.contains("too old") && e.contains("5.14"), "{old}: {e}");
        }
        for ok in [
            "5.14.0-427.el9.x86_64",
            "5.15.0-91-generic",
            "6.1.0-18-amd64",
            "6.18.44-fc-v669",
        ] {
            assert!(check_kernel_release(ok).is_ok(), "{ok}");
        }
    }
}
