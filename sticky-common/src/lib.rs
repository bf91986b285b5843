//! The Rust mirror of `sticky-ebpf/include/sticky.h`: every map key, value
//! and constant that user space shares with the kernel programs.
//!
//! The kernel side is C (see `sticky-ebpf`), so nothing checks these layouts
//! at compile time. `tests/layout.rs` compiles the header with the C compiler
//! and compares every size and offset with the definitions here: change both
//! files together and that test tells you if they drifted.

/// Worker listeners occupy slots `0..MAX_WORKERS` of the listener sockarray.
pub const MAX_WORKERS: u32 = 256;
/// One sorting listener per CPU, up to this many CPUs.
pub const MAX_CPUS: u32 = 256;
/// Slot of CPU 0's sorting listener; CPU `c` uses `SORTING_SLOT + c`.
pub const SORTING_SLOT: u32 = MAX_WORKERS;
/// Slot of the supervisor's 503 listener, used when no worker is alive.
pub const REJECT_SLOT: u32 = MAX_WORKERS + MAX_CPUS;
/// Slot of the sink, which silently drops pure ACKs carrying SYN cookies.
pub const SINK_SLOT: u32 = REJECT_SLOT + 1;
/// Slot of the overflow listener, taking the SYNs during a SYN flood.
pub const OVERFLOW_SLOT: u32 = SINK_SLOT + 1;
/// Slot of cookie mode's next overflow listener while it is plugged.
pub const PLUG_SLOT: u32 = OVERFLOW_SLOT + 1;
/// Plugs per cookie-mode overflow listener (its backlog: one less).
pub const PLUGS: u32 = 17;
pub const SLOTS: u32 = PLUG_SLOT + 1;
/// Longest session id, in bytes.
pub const SID_MAX: usize = 64;
/// Longest `name=` of the sid query parameter, in bytes.
pub const PARAM_MAX: usize = 16;
/// Bytes of the first data segment the kernel parser looks at.
pub const SCAN_MAX: usize = 1024;
pub const NO_WORKER: u32 = u32::MAX;
pub const SESSIONS_MAX: u32 = 1 << 20;
pub const FLOWS_MAX: u32 = 65536;

/// How connections without a known sid are spread (`enum sticky_balance`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    Random = 0,
    RoundRobin = 1,
    LeastConnection = 2,
}

/// `enum sticky_mode`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every SYN to the sorting listener, placement by sid.
    Sticky = 0,
    /// Balance at SYN time with no stickiness: the benchmark floor.
    SynBalance = 1,
    /// Every SYN answered with a SYN cookie, placement by sid on the first
    /// data segment in softirq: no user-space step per connection.
    Cookie = 2,
}

/// `struct sticky_config`, the one entry of the `config` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub worker_count: u32,
    pub balance: u32,
    pub mode: u32,
    pub param_len: u32,
    pub sorting_count: u32,
    /// 1 while a SYN flood is detected: SYNs go to the overflow listener.
    pub flood: u32,
    pub param_word: [u64; 2],
    pub param_mask: [u64; 2],
    /// The listening port, host byte order.
    pub port: u32,
    /// 1: learn sessions from the workers' Engine.IO open packets.
    pub learn: u32,
    /// Cookie mode: SYNs from client ports `plug_port..+PLUGS` are plugs (0: none).
    pub plug_port: u32,
    /// What `sticky_watch` does with a foreign request (`Foreign`).
    pub foreign: u32,
    /// Cookie mode: 1 when the overflow listener is in `PLUG_SLOT`.
    pub overflow_alt: u16,
    /// Cookie mode: 1 when plugs go to `OVERFLOW_SLOT`.
    pub plug_alt: u16,
    pub pad: u32,
    /// The SipHash key of the session maps' keys ([`SidHasher`]).
    pub sid_key: [u64; 2],
}

/// `enum sticky_foreign`: what happens to a request whose sid another live
/// worker owns, on a connection placed on this one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// Counted, passed to the connection's worker.
    Pass = 0,
    /// Dropped, and the connection reset (user space destroys it).
    Reset = 1,
    /// Not looked for (no socket storage at all): the benchmark's control.
    Off = 2,
}

impl Foreign {
    /// As `--foreign-requests` and `STICKY_FOREIGN_REQUESTS` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Foreign::Pass => "pass",
            Foreign::Reset => "reset",
            Foreign::Off => "off",
        }
    }
}

impl Config {
    /// Builds the config, encoding `param` ("sid") as the masked words the
    /// kernel compares against. `param` must be 1..=15 bytes.
    pub fn new(
        worker_count: u32,
        sorting_count: u32,
        balance: Balance,
        mode: Mode,
        param: &str,
    ) -> Config {
        let mut name = param.as_bytes().to_vec();
        name.push(b'=');
        assert!(name.len() <= PARAM_MAX, "sid parameter name too long");
        let mut bytes = [0u8; PARAM_MAX];
        let mut mask = [0u8; PARAM_MAX];
        bytes[..name.len()].copy_from_slice(&name);
        mask[..name.len()].fill(0xff);
        let word = |b: &[u8; PARAM_MAX], i: usize| {
            u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
        };
        Config {
            worker_count,
            balance: balance as u32,
            mode: mode as u32,
            param_len: name.len() as u32,
            sorting_count,
            flood: 0,
            param_word: [word(&bytes, 0), word(&bytes, 1)],
            param_mask: [word(&mask, 0), word(&mask, 1)],
            port: 0,
            learn: 0,
            plug_port: 0,
            foreign: Foreign::Pass as u32,
            overflow_alt: 0,
            plug_alt: 0,
            pad: 0,
            sid_key: [0; 2],
        }
    }

    /// Keys the `sessions` map with `sid_key` (see [`SidHasher`]).
    pub fn with_sid_key(mut self, sid_key: [u64; 2]) -> Config {
        self.sid_key = sid_key;
        self
    }

    /// Turns on session learning for answers sent from `port`.
    pub fn learning(mut self, port: u16) -> Config {
        self.port = port as u32;
        self.learn = 1;
        self
    }
}

/// `sticky_worker.live`: no process in the slot.
pub const WORKER_DOWN: u32 = 0;
/// `sticky_worker.live`: takes its own sessions and balanced new ones.
pub const WORKER_ACCEPTING: u32 = 1;
/// `sticky_worker.live`: an old generation's worker after a reload: takes
/// its own sessions only.
pub const WORKER_DRAINING: u32 = 2;

/// `struct sticky_worker`: one entry per worker slot of the `workers` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerState {
    /// `WORKER_DOWN`, `WORKER_ACCEPTING` or `WORKER_DRAINING`.
    pub live: u32,
    pub sessions: u32,
}

/// `struct sticky_sid`: a session id zero padded, the message whose
/// [`SidHasher`] hash keys the `sessions` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SidKey {
    pub bytes: [u8; SID_MAX],
}

impl SidKey {
    /// Validates a session id: 1..=64 bytes of `[A-Za-z0-9_-]`.
    pub fn new(sid: &str) -> Result<SidKey, SidError> {
        let b = sid.as_bytes();
        if b.is_empty() {
            return Err(SidError::Empty);
        }
        if b.len() > SID_MAX {
            return Err(SidError::TooLong);
        }
        if !b
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            return Err(SidError::BadByte);
        }
        let mut bytes = [0u8; SID_MAX];
        bytes[..b.len()].copy_from_slice(b);
        Ok(SidKey { bytes })
    }

    pub fn as_str(&self) -> &str {
        let len = self.bytes.iter().position(|&b| b == 0).unwrap_or(SID_MAX);
        std::str::from_utf8(&self.bytes[..len]).unwrap_or("")
    }
}

/// The key of the `sessions` map: SipHash-2-4, keyed by
/// `config.sid_key`, of the sid zero padded to [`SID_MAX`] bytes (kernel
/// side: `sticky-ebpf/src/siphash.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SidHasher {
    pub key: [u64; 2],
}

impl SidHasher {
    /// The map key of `sid`, validated as [`SidKey::new`] does.
    pub fn key_of(&self, sid: &str) -> Result<u64, SidError> {
        Ok(self.hash(&SidKey::new(sid)?))
    }

    pub fn hash(&self, sid: &SidKey) -> u64 {
        siphash24(self.key, &sid.bytes)
    }
}

/// SipHash-2-4 (Aumasson and Bernstein) of `msg` under `key`.
pub fn siphash24(key: [u64; 2], msg: &[u8]) -> u64 {
    let mut v = [
        0x736f6d6570736575 ^ key[0],
        0x646f72616e646f6d ^ key[1],
        0x6c7967656e657261 ^ key[0],
        0x7465646279746573 ^ key[1],
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        round(v);
        round(v);
        v[0] ^= m;
    };
    let words = msg.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        compress(&mut v, u64::from_le_bytes(w.try_into().unwrap()));
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    last[7] = msg.len() as u8;
    compress(&mut v, u64::from_le_bytes(last));
    v[2] ^= 0xff;
    for _ in 0..4 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// The key of [`SID_HASH_VECTORS`]: bytes 00..0f, as in SipHash's paper.
pub const SID_HASH_TEST_KEY: [u64; 2] = [0x0706050403020100, 0x0f0e0d0c0b0a0908];
/// Session ids and their map keys under [`SID_HASH_TEST_KEY`], computed
/// with an independent SipHash-2-4 (Rust's `std::hash::SipHasher`). The one
/// definition both sides are checked against: sticky-common's tests (this
/// crate's code) and the parser test in `sticky-ebpf` (the kernel's).
pub const SID_HASH_VECTORS: &[(&str, u64)] = &[
    ("a", 0x58f5e2db9a684af7),
    ("sid", 0x7941f60ea593dfbc),
    ("abc_DEF-019", 0x3ca3450ad398dd33),
    ("Xy3_-9zQ0aB1cD2eF3gH", 0x561d1b26c34f9816),
    (
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        0x66ed995e80b60d79,
    ),
    (
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-",
        0x82cb27596359fa19,
    ),
];

/// Why a session id was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidError {
    Empty,
    TooLong,
    BadByte,
}

impl std::fmt::Display for SidError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SidError::Empty => "empty session id",
            SidError::TooLong => "session id longer than 64 bytes",
            SidError::BadByte => "session id must be [A-Za-z0-9_-] only",
        })
    }
}

/// `struct sticky_handoff`: one entry per sorting CPU of the mmapped
/// `handoff` map (see sticky.h for the protocol).
#[repr(C)]
#[derive(Debug, Default)]
pub struct Handoff {
    pub closing: std::sync::atomic::AtomicU64,
    pub busy_ns: std::sync::atomic::AtomicU64,
}

/// How long after a cross-CPU first segment announced itself its child is
/// surely queued (`STICKY_HANDOFF_GRACE_NS`).
pub const HANDOFF_GRACE_NS: u64 = 5_000_000;

/// `struct sticky_decision`: value of the `flows` map, the socket filter's
/// decision for one queued connection (TCP fields in network byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub owner: u32,
    pub placed: u32,
    pub ack: u32,
    pub seq: u32,
    /// 1: the request named a sid, so its answer is searched for no
    /// open packet.
    pub with_sid: u32,
}

/// `struct sticky_placed`: value of the `placed_flows` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    pub worker: u32,
    pub segments: u32,
    /// 1: placed without data (TCP_DEFER_ACCEPT gave up on it).
    pub idle: u32,
}

/// `struct sticky_conn`: value of the `conns` socket storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub worker: u32,
    pub flags: u32,
    /// Answer segments searched since `CONN_LEARN` was set.
    pub segments: u32,
    pub pad: u32,
}
pub const CONN_DOOMED: u32 = 1;
pub const CONN_UPGRADED: u32 = 2;
pub const CONN_LEARN: u32 = 4;

/// `struct sticky_reset`: an entry of the `resets` ring buffer, a
/// connection that user space must destroy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetEvent {
    /// SO_COOKIE of the connection.
    pub cookie: u64,
    /// local = the server; IPv4-mapped addresses as IPv4 (family AF_INET).
    pub flow: FlowKey,
    pub worker: u32,
    pub owner: u32,
}
pub const RESETS_BYTES: u32 = 64 * 1024;

/// `struct sticky_session`: value of the `sessions` map, registered or
/// learned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub worker: u32,
    /// 1: registered over the control socket; 0: learned by the kernel.
    pub registered: u32,
    /// Learned: CLOCK_MONOTONIC nanoseconds of the last request carrying
    /// the sid; 0 once its client sent the Engine.IO close packet.
    pub last_seen_ns: u64,
}

impl Session {
    pub fn registered(worker: u32) -> Session {
        Session {
            worker,
            registered: 1,
            last_seen_ns: 0,
        }
    }

    pub fn is_registered(&self) -> bool {
        self.registered != 0
    }
}

pub const PLACED_MAX: u32 = 65536;
pub const LEARN_SEGMENTS: u32 = 4;
pub const LEARN_SCAN: usize = 512;

/// Size of each sorting CPU's doorbell ring (`STICKY_DOORBELL_BYTES`).
pub const DOORBELL_BYTES: u32 = 4096;

/// `struct sticky_flow`: key of the `flows` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub local: [u32; 4],
    pub remote: [u32; 4],
    pub remote_port: u16,
    pub family: u16,
}

/// Indices of the `counters` per-CPU map (`enum sticky_counter`), with the
/// names `sticky` reports them under.
pub const COUNTERS: &[&str] = &[
    "syn",
    "placed_softirq",
    "placed_queue",
    "absorbed",
    "by_sid",
    "balanced",
    "rejected",
    "sid_unknown",
    "sid_invalid",
    "no_sid",
    "not_http",
    "select_failed",
    "filter_decisions",
    "syn_balanced",
    "cross_cpu",
    "handoff_drops",
    "learned",
    "learn_known",
    "learn_full",
    "placed_cookie",
    "learn_closed",
    "foreign_dropped",
    "foreign_passed",
    "doomed_segments",
    "unmapped",
    "drain_dropped",
];

/// `enum sticky_counter` indices used by user space.
pub mod counter {
    pub const SYN: u32 = 0;
    pub const PLACED_SOFTIRQ: u32 = 1;
    pub const PLACED_QUEUE: u32 = 2;
    pub const BY_SID: u32 = 4;
    pub const BALANCED: u32 = 5;
    pub const REJECTED: u32 = 6;
    pub const LEARNED: u32 = 16;
    pub const PLACED_COOKIE: u32 = 19;
    pub const FOREIGN_DROPPED: u32 = 21;
    pub const FOREIGN_PASSED: u32 = 22;
    pub const DOOMED_SEGMENTS: u32 = 23;
    pub const UNMAPPED: u32 = 24;
}

/// `struct sticky_reqsk_config`, the one entry of `reqsk_config`
/// (`--placement bpf-cookie`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqskConfig {
    /// The listening port, host byte order.
    pub port: u32,
    /// The listening IPv4 address in network order (the octets in memory
    /// order); 0: any.
    pub addr4: u32,
    /// `REQSK_*` bits: the options the stack's sysctls allow.
    pub options: u32,
    /// The window scale sticky's SYN-ACK announces.
    pub rcv_wscale: u32,
    /// The listening IPv6 address in network order (the octets in memory
    /// order); all 0: any.
    pub addr6: [u32; 4],
    /// SipHash keys of the cookies: the current one, then the previous.
    pub key: [[u64; 2]; REQSK_KEYS],
}

pub const REQSK_KEYS: usize = 2;
pub const REQSK_WSCALE: u32 = 1;
pub const REQSK_SACK: u32 = 2;
pub const REQSK_TIMESTAMPS: u32 = 4;
pub const REQSK_ECN: u32 = 8;
pub const REQSK_IPV4: u32 = 16;
pub const REQSK_IPV6: u32 = 32;

/// Indices of `reqsk_counters` (`enum sticky_reqsk_counter`), with the
/// names `sticky stats` reports them under.
pub const REQSK_COUNTER_NAMES: &[&str] = &[
    "cookie_syn_answered",
    "cookie_syn_passed",
    "cookie_ack_absorbed",
    "cookie_assigned",
    "cookie_forged",
    "cookie_assign_failed",
];

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ReqskConfig {}
    // SAFETY: plain #[repr(C)] data with no padding holes that matter to the
    // kernel (layouts checked by tests/layout.rs) and no pointers.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::WorkerState {}
    unsafe impl aya::Pod for super::SidKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Placed {}
    unsafe impl aya::Pod for super::Decision {}
    unsafe impl aya::Pod for super::Session {}
    unsafe impl aya::Pod for super::Conn {}
}
