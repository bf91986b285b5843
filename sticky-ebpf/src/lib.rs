//! sticky's kernel programs, compiled from C by this crate's build script.
//!
//! The programs are C rather than Rust because a Rust eBPF toolchain cannot
//! be built here (see DESIGN.md, "Toolchain"). Their sources live next to
//! this file:
//!
//! - `steer.bpf.c`: `sticky_select` (SK_REUSEPORT, select-or-migrate),
//!   `sticky_sort` (SOCKET_FILTER on the sorting listeners) and
//!   `sticky_learn` (CGROUP_SKB egress: learns sessions from the workers'
//!   Engine.IO open packets), `sticky_watch` (CGROUP_SKB ingress: keeps
//!   learned sessions fresh from the clients' requests, and notices their
//!   Engine.IO close), plus every map.
//! - `reqsk.bpf.c`: `sticky_reqsk` (tc ingress, `--placement bpf-cookie`):
//!   sticky's own SYN cookies, and request sockets from
//!   `bpf_sk_assign_tcp_reqsk()` for their first data.
//! - `parse.h`: the request-line parser both programs share.
//! - `../include/sticky.h`: map layouts shared with user space, mirrored in
//!   `sticky-common`.

/// Aligns the embedded object: the ELF parser reads it in place.
#[repr(C, align(32))]
struct Aligned<Bytes: ?Sized>(Bytes);

static STEER: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/steer.o")));

/// The steering object: load it with `aya::Ebpf::load`.
pub fn steer_object() -> &'static [u8] {
    &STEER.0
}

static REQSK: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/reqsk.o")));

/// The object of `--placement bpf-cookie` (`reqsk.bpf.c`): the tc ingress
/// program and its maps. Its kfunc call carries [`REQSK_KFUNC_MARKER`] until
/// the loader writes the kernel's BTF id over it.
pub fn reqsk_object() -> &'static [u8] {
    &REQSK.0
}

/// Program and map names inside [`reqsk_object`].
pub const REQSK_PROGRAM: &str = "sticky_reqsk";
pub const REQSK_CONFIG_MAP: &str = "reqsk_config";
pub const REQSK_COUNTERS_MAP: &str = "reqsk_counters";
/// The immediate of the placeholder `call` to `bpf_sk_assign_tcp_reqsk`.
pub const REQSK_KFUNC_MARKER: u32 = 0x5ec0_0c1e;

/// Program names inside [`steer_object`].
pub const SELECT_PROGRAM: &str = "sticky_select";
pub const SORT_PROGRAM: &str = "sticky_sort";
pub const LEARN_PROGRAM: &str = "sticky_learn";
pub const WATCH_PROGRAM: &str = "sticky_watch";

/// Map names inside [`steer_object`].
pub mod maps {
    pub const LISTENERS: &str = "listeners";
    pub const CONFIG: &str = "config";
    pub const WORKERS: &str = "workers";
    pub const SESSIONS: &str = "sessions";
    pub const FLOWS: &str = "flows";
    pub const COUNTERS: &str = "counters";
    pub const HANDOFF: &str = "handoff";
    pub const DOORBELLS: &str = "doorbells";
    pub const PLACED_FLOWS: &str = "placed_flows";
    pub const CONNS: &str = "conns";
    pub const RESETS: &str = "resets";
}

/// Path of the shared header, for the layout test in `sticky-common`.
pub const HEADER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
