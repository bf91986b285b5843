//! `sticky-bench`, the load generator behind `cargo xtask bench`.
//!
//! - `sticky-bench [peers] ARGS`: sticky against the systems users would
//!   pick instead, on the same Socket.IO worker code (`peers.rs`);
//! - `sticky-bench core ARGS`: sticky placement against SYN-time balancing
//!   with a std-only worker, what placement itself costs (`core.rs`).

mod core;
mod eio;
mod host;
mod http;
mod measure;
mod peers;
mod plot;
mod report;
mod results;
mod servers;
mod session;
mod workloads;
mod ws;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("core") => core::main(args.split_off(1)),
        Some("peers") => peers::main(args.split_off(1)),
        _ => peers::main(args),
    }
}
