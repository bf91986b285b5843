//! `sticky-bench`, the load generator behind `cargo xtask bench`.
//!
//! - `sticky-bench [peers] ARGS`: sticky against the systems users would
//!   pick instead, on the same Socket.IO worker code (`peers.rs`);
//! - `sticky-bench core ARGS`: sticky placement against SYN-time balancing
//!   with a std-only worker, what placement itself costs (`core.rs`).

mod core;
mod eio;
mod http;
mod peers;
mod plot;
mod report;
mod servers;
mod session;
mod workloads;
mod ws;

/// The directory of this executable, where the other binaries of the build
/// (`sticky`, the workers) are found by default.
fn exe_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("core") => core::main(args.split_off(1)),
        Some("peers") => peers::main(args.split_off(1)),
        _ => peers::main(args),
    }
}
