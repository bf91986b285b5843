//! `cargo xtask bench`: the benchmarks, results in bench/results/.
//!
//! - `cargo xtask bench [--quick] [ARGS]`: sticky against its peers
//!   (`sticky-bench peers`, after `npm ci` in bench/peers when needed):
//!   `<date>.json`, `<date>.svg`, the README's peers section.
//! - `cargo xtask bench --core [--quick] [--learn on|off] [ARGS]`: sticky
//!   placement (rotation and cookie) against SYN-time balancing with the
//!   fair-floor C worker, distance workloads and memory with 1,000,000
//!   sessions (`sticky-bench core`): `<date>-core.json`, the README's bench
//!   section.
//!   `--learn` alone implies `--core` (it only means something there), and
//!   so does `--ws-learn` (WebSocket round trips, learning on vs off) and
//!   `--foreign` (the foreign-request check's cost, reset vs off).
//! - `cargo xtask bench --broadcast [--quick] [ARGS]`: broadcast fan-out
//!   between workers, sticky's relay vs `@socket.io/sticky` + the cluster
//!   adapter vs the Redis adapter (`bench/broadcast/run.js`, after `npm ci`
//!   there when needed): `<date>-broadcast.json`.
//! - `cargo xtask bench --fronts [--quick]`: Socket.IO round trips through
//!   HAProxy and nginx terminating TLS, to sticky and to one plain process
//!   (`e2e/bench/fronts.js`): `<date>-fronts.json`, the README's section.

use std::ffi::OsString;
use std::process::Command;

pub fn run(extra: &[String]) -> Result<(), String> {
    if extra.iter().any(|a| a == "--broadcast") {
        return broadcast(extra);
    }
    if extra.iter().any(|a| a == "--fronts") {
        return fronts(extra);
    }
    let core = extra
        .iter()
        .any(|a| a == "--core" || a == "--learn" || a == "--ws-learn" || a == "--foreign");
    let args: Vec<&String> = extra.iter().filter(|a| *a != "--core").collect();
    super::build_release()?;
    let root = super::root_dir();
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)
        .map_err(|e| format!("cannot create {}: {e}", results.display()))?;
    let date = super::today();
    let mut argv: Vec<OsString> = Vec::new();
    if core {
        argv.push("core".into());
        argv.extend(args.iter().map(OsString::from));
        argv.push("--json".into());
        argv.push(results.join(format!("{date}-core.json")).into());
    } else {
        let peers = root.join("bench/peers");
        if !peers.join("node_modules").exists() {
            let mut npm = Command::new("npm");
            npm.current_dir(&peers)
                .args(["ci", "--no-audit", "--no-fund"]);
            super::status(npm, "npm ci in bench/peers")?;
        }
        argv.push("peers".into());
        argv.extend(args.iter().map(OsString::from));
        argv.push("--peers".into());
        argv.push(peers.into());
        argv.push("--json".into());
        argv.push(results.join(format!("{date}.json")).into());
        argv.push("--plot".into());
        argv.push(results.join(format!("{date}.svg")).into());
    }
    argv.push("--readme".into());
    argv.push(root.join("README.md").into());
    super::exec_as_root(&root.join("target/release/sticky-bench"), &argv)
}

/// `--fronts`: a Node.js script, since its clients are socket.io-client
/// over TLS (e2e's lockfile).
fn fronts(extra: &[String]) -> Result<(), String> {
    super::build_release()?;
    let root = super::root_dir();
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)
        .map_err(|e| format!("cannot create {}: {e}", results.display()))?;
    let node =
        super::find_in_path("node").ok_or("node is not installed (apt-get install nodejs)")?;
    let mut argv: Vec<OsString> = vec![root.join("e2e/bench/fronts.js").into()];
    argv.extend(
        extra
            .iter()
            .filter(|a| *a != "--fronts")
            .map(OsString::from),
    );
    argv.push("--sticky".into());
    argv.push(root.join("target/release/sticky").into());
    argv.push("--json".into());
    argv.push(
        results
            .join(format!("{}-fronts.json", super::today()))
            .into(),
    );
    argv.push("--readme".into());
    argv.push(root.join("README.md").into());
    super::exec_as_root(&node, &argv)
}

/// `bench/broadcast/run.js` against the release sticky (its default path), as root.
fn broadcast(extra: &[String]) -> Result<(), String> {
    super::build_release()?;
    let root = super::root_dir();
    let dir = root.join("bench/broadcast");
    if !dir.join("node_modules").exists() {
        let mut npm = Command::new("npm");
        npm.current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]);
        super::status(npm, "npm ci in bench/broadcast")?;
    }
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)
        .map_err(|e| format!("cannot create {}: {e}", results.display()))?;
    let node = super::find_in_path("node").ok_or("node not found in PATH")?;
    let mut argv: Vec<OsString> = vec![dir.join("run.js").into()];
    argv.extend(
        extra
            .iter()
            .filter(|a| *a != "--broadcast")
            .map(OsString::from),
    );
    argv.push("--json".into());
    argv.push(
        results
            .join(format!("{}-broadcast.json", super::today()))
            .into(),
    );
    super::exec_as_root(&node, &argv)
}
