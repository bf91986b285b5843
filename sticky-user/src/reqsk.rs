//! `--placement bpf-cookie`: sticky's own SYN cookies, answered by
//! `sticky_reqsk` (tc ingress, `sticky-ebpf/src/reqsk.bpf.c`), whose first
//! data segment gets a request socket from `bpf_sk_assign_tcp_reqsk()`
//! (Linux 6.9+) and is placed by `sticky_select` like a kernel cookie's.
//! IPv4 and IPv6.
//!
//! This module finds the kfunc in the kernel's BTF, writes its id into the
//! object's placeholder call (aya 0.14 resolves no kfuncs), loads the
//! program, attaches it to the ingress of the interfaces the service's
//! clients arrive on (through TCX links, 6.6+: they go when sticky exits)
//! and rotates the cookie key. Without the kfunc [`Cookies::attach`] says
//! why in one line and the caller places as by default.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::log;
use aya::{
    maps::{Array, MapData, PerCpuArray},
    programs::{tc::TcAttachType, SchedClassifier},
    Btf, Ebpf, EbpfLoader,
};
use sticky_common::{ReqskConfig, REQSK_COUNTER_NAMES};
use sticky_ebpf::{REQSK_CONFIG_MAP, REQSK_COUNTERS_MAP, REQSK_KFUNC_MARKER, REQSK_PROGRAM};

const KFUNC: &str = "bpf_sk_assign_tcp_reqsk";

/// The window scale the SYN-ACK announces: Linux's own for its default
/// receive buffers (net.ipv4.tcp_rmem's 6 MiB maximum).
const RCV_WSCALE: u32 = 7;

/// The loaded and attached program; dropping it detaches everything.
pub struct Cookies {
    _ebpf: Ebpf,
    config: Array<MapData, ReqskConfig>,
    current: ReqskConfig,
    pub interfaces: Vec<String>,
}

/// `--placement bpf-cookie` if asked for and this kernel has it; else one
/// line saying why, and `None` (`settings` then say so): the default
/// placement serves.
pub fn attach_if_asked(
    settings: &mut crate::cli::Settings,
    listen: SocketAddr,
) -> Option<(Cookies, CookieCounters)> {
    if !settings.bpf_cookie {
        return None;
    }
    match Cookies::attach(listen) {
        Ok(attached) => {
            log!(
                "bpf-cookie: sticky's SYN cookies on the ingress of {}",
                attached.0.interfaces.join(", ")
            );
            Some(attached)
        }
        Err(e) => {
            log!("--placement bpf-cookie: {e:#}; placing by rotation (--placement sticky) instead");
            settings.bpf_cookie = false;
            None
        }
    }
}

/// Rotates the key every `period` (`--cookie-key-period`) for as long as
/// sticky runs (the thread owns the program: it lives until the process
/// exits). A cookie stays valid for one more period under the previous
/// key: between one and two periods in all.
pub fn rotate_keys(mut cookies: Cookies, period: Duration) -> Result<()> {
    std::thread::Builder::new()
        .name("cookie-keys".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            if let Err(e) = cookies.rotate_key() {
                log!("bpf-cookie: cannot rotate the cookie key ({e:#}); keeping the current one");
            }
        })
        .context("starting the cookie key rotation")?;
    Ok(())
}

/// `reqsk_counters`, summed over CPUs, for `sticky stats`.
pub struct CookieCounters {
    map: PerCpuArray<MapData, u64>,
}

impl CookieCounters {
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        REQSK_COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let v = self
                    .map
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*name, v)
            })
            .collect()
    }
}

impl Cookies {
    /// Loads and attaches the cookie program for a service on `listen`,
    /// or says in one line (the error) why this kernel cannot have it.
    pub fn attach(listen: SocketAddr) -> Result<(Cookies, CookieCounters)> {
        let btf = Btf::from_sys_fs().map_err(|e| {
            anyhow!("the kernel has no readable BTF (/sys/kernel/btf/vmlinux: {e})")
        })?;
        let kfunc_id = btf
            .id_by_type_name_kind(KFUNC, aya_obj::btf::BtfKind::Func)
            .map_err(|_| anyhow!("this kernel has no {KFUNC}() (Linux 6.9 or newer has it)"))?;
        let object = with_kfunc_id(sticky_ebpf::reqsk_object(), kfunc_id)?;
        let mut ebpf = EbpfLoader::new()
            .load(&object)
            .context("loading the bpf-cookie object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(REQSK_PROGRAM)
            .ok_or_else(|| anyhow!("program {REQSK_PROGRAM} missing from the object"))?
            .try_into()
            .context("program sticky_reqsk has an unexpected type")?;
        prog.load().map_err(verifier_error)?;
        let mut config: Array<MapData, ReqskConfig> = Array::try_from(
            ebpf.take_map(REQSK_CONFIG_MAP)
                .ok_or_else(|| anyhow!("map {REQSK_CONFIG_MAP} missing"))?,
        )?;
        let counters = CookieCounters {
            map: PerCpuArray::try_from(
                ebpf.take_map(REQSK_COUNTERS_MAP)
                    .ok_or_else(|| anyhow!("map {REQSK_COUNTERS_MAP} missing"))?,
            )?,
        };
        let key = crate::sessions::fresh_sid_key()?;
        let mut current = ReqskConfig {
            port: u32::from(listen.port()),
            options: stack_options(),
            rcv_wscale: RCV_WSCALE,
            key: [key, crate::sessions::fresh_sid_key()?],
            ..ReqskConfig::default()
        };
        // Octets in memory order: the packets' network order.
        match listen.ip() {
            IpAddr::V4(a) => {
                current.options |= sticky_common::REQSK_IPV4;
                current.addr4 = u32::from_ne_bytes(a.octets());
            }
            IpAddr::V6(a) => {
                current.options |= sticky_common::REQSK_IPV6;
                // The listeners are dual-stack (IPV6_V6ONLY 0): [::] takes IPv4 too.
                if a.is_unspecified() {
                    current.options |= sticky_common::REQSK_IPV4;
                }
                for (word, bytes) in current.addr6.iter_mut().zip(a.octets().chunks(4)) {
                    *word = u32::from_ne_bytes(bytes.try_into().unwrap());
                }
            }
        }
        config.set(0, current, 0)?;
        // Attached only now, configured: no segment sees a half-made entry.
        let prog: &mut SchedClassifier = ebpf
            .program_mut(REQSK_PROGRAM)
            .ok_or_else(|| anyhow!("program {REQSK_PROGRAM} missing from the object"))?
            .try_into()
            .context("program sticky_reqsk has an unexpected type")?;
        let interfaces = interfaces_for(listen.ip())?;
        for name in &interfaces {
            prog.attach(name, TcAttachType::Ingress)
                .with_context(|| format!("attaching sticky_reqsk to the ingress of {name}"))?;
        }
        Ok((
            Cookies {
                _ebpf: ebpf,
                config,
                current,
                interfaces,
            },
            counters,
        ))
    }

    /// Makes a fresh key current, keeping the last one for cookies in
    /// flight. A cookie checked while the entry is being rewritten may
    /// fail: its data segment is dropped and the client resends it.
    pub fn rotate_key(&mut self) -> Result<()> {
        self.current.key = [crate::sessions::fresh_sid_key()?, self.current.key[0]];
        self.config.set(0, self.current, 0)?;
        Ok(())
    }
}

/// The object with the placeholder call's immediate set to `id`.
fn with_kfunc_id(object: &[u8], id: u32) -> Result<Vec<u8>> {
    let mut marker = [0x85u8, 0x20, 0, 0, 0, 0, 0, 0];
    marker[4..].copy_from_slice(&REQSK_KFUNC_MARKER.to_le_bytes());
    let mut patched = object.to_vec();
    let at: Vec<usize> = patched
        .windows(8)
        .enumerate()
        .filter(|(i, w)| i % 8 == 0 && *w == marker)
        .map(|(i, _)| i)
        .collect();
    if at.is_empty() {
        bail!("the bpf-cookie object has no {KFUNC} call to resolve (build problem)");
    }
    for i in at {
        patched[i + 4..i + 8].copy_from_slice(&id.to_le_bytes());
    }
    Ok(patched)
}

/// The interfaces whose ingress carries the service's clients: loopback
/// always, plus every Ethernet interface that is up (any address) or that
/// holds `addr`.
fn interfaces_for(addr: IpAddr) -> Result<Vec<String>> {
    let mut names = vec!["lo".to_owned()];
    if addr.is_loopback() {
        return Ok(names);
    }
    // SAFETY: getifaddrs fills a list freed below with freeifaddrs.
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing the interfaces (getifaddrs)");
    }
    let mut ethernet = Vec::new(); // from the AF_PACKET entries
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: cur is an element of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null; its family says which sockaddr it is.
        let here = match unsafe { (*ifa.ifa_addr).sa_family } as i32 {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            libc::AF_PACKET => {
                let sll = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_ll) };
                if sll.sll_hatype == libc::ARPHRD_ETHER {
                    ethernet.push(name);
                }
                continue;
            }
            _ => continue,
        };
        if (addr.is_unspecified() || here == addr) && !names.contains(&name) {
            names.push(name);
        }
    }
    // SAFETY: list came from getifaddrs and is not used after this.
    unsafe { libc::freeifaddrs(list) };
    // The program reads an Ethernet header (loopback has one too); L3
    // devices (tun, WireGuard) have none and are left to the default path.
    names.retain(|n| n == "lo" || ethernet.contains(n));
    Ok(names)
}

/// The options the stack's sysctls allow (the kfunc refuses the others).
fn stack_options() -> u32 {
    let on = |name: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).is_ok_and(|v| v.trim() != "0")
    };
    let mut options = 0;
    if on("tcp_window_scaling") {
        options |= sticky_common::REQSK_WSCALE;
    }
    if on("tcp_sack") {
        options |= sticky_common::REQSK_SACK;
    }
    if on("tcp_timestamps") {
        options |= sticky_common::REQSK_TIMESTAMPS;
    }
    if on("tcp_ecn") {
        options |= sticky_common::REQSK_ECN;
    }
    options
}

fn verifier_error(e: aya::programs::ProgramError) -> anyhow::Error {
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &e {
        let log = verifier_log.to_string();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        return anyhow!(
            "the verifier refused sticky_reqsk: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        );
    }
    anyhow!(e).context("loading sticky_reqsk")
}
