//! `cargo xtask`: the project's developer tasks, in Rust so they need nothing
//! but cargo (the alias lives in `.cargo/config.toml`).
//!
//! - `cargo xtask build`               release build of every binary
//! - `cargo xtask run [-- ARGS]`       demo cluster on 127.0.0.1:3000
//! - `cargo xtask test [-- ARGS]`      debug build, then `cargo test --workspace`
//! - `cargo xtask deps`                install what run and test need (deps.rs)
//! - `cargo xtask fresh`               run and test in a clean Debian 12 root (fresh.rs)
//! - `cargo xtask bench [--core | --broadcast | --fronts] [--quick] [ARGS]`  benchmarks (bench.rs), results in bench/results/
//! - `cargo xtask fuzz [--seconds N]`  libFuzzer on the request parser (fuzz.rs)
//! - `cargo xtask soak [--minutes N] [--sessions N]`  long Socket.IO run with worker restarts (soak.rs)
//! - `cargo xtask deploy [--sessions N]`  sessions cut and messages lost by a deploy: reload vs restarts (deploy.rs)
//! - `cargo xtask kernels [--quick]`   sticky under qemu on Debian's kernels (kernels.rs)
//!
//! Loading BPF programs needs root, so `run` and `bench` go through `sudo`
//! when not root (only the final binary: the build stays the user's, so
//! `target/` does not become root-owned).

mod bench;
mod deploy;
mod deps;
mod flags;
mod fresh;
mod fuzz;
mod kernels;
mod soak;

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask <build | run [-- STICKY_ARGS] | test [-- CARGO_TEST_ARGS] | deps | fresh | bench [--core | --broadcast | --fronts] [--quick] [BENCH_ARGS] | fuzz [--seconds N] | soak [--minutes N] [--sessions N] | deploy [--sessions N] [--workers N] | kernels [--quick | --kernel VERSION]>";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => build_release(),
        Some("run") => run(extra(&args[1..])),
        Some("test") => test(extra(&args[1..])),
        Some("deps") => deps::for_test().map(drop),
        Some("fresh") => fresh::run(extra(&args[1..])),
        Some("bench") => bench::run(extra(&args[1..])),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("soak") => soak::soak(extra(&args[1..])),
        Some("deploy") => deploy::deploy(extra(&args[1..])),
        Some("kernels") => kernels::run(extra(&args[1..])),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        std::process::exit(1);
    }
}

/// Arguments after the subcommand, with one leading `--` dropped.
fn extra(args: &[String]) -> &[String] {
    match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    }
}

fn root_dir() -> PathBuf {
    // xtask/ sits in the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd =
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(root_dir());
    cmd
}

/// Runs `cmd` to completion; a failure becomes a one-line error.
fn status(mut cmd: Command, what: &str) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

fn build_release() -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--workspace", "--bins"]);
    status(cmd, "cargo build --release")
}

fn run(extra: &[String]) -> Result<(), String> {
    deps::for_run()?;
    build_release()?;
    let bin = root_dir().join("target/release");
    let mut args: Vec<OsString> = vec!["run".into()];
    // Defaults the caller's own flags replace.
    for (flag, value) in [("--listen", "127.0.0.1:3000"), ("--workers", "3")] {
        if !extra
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        {
            args.extend([flag.into(), value.into()]);
        }
    }
    args.extend(extra.iter().map(OsString::from));
    args.push("--".into());
    // Real Socket.IO workers (demo/, npm) where Node.js is installed; the
    // std-only demo worker otherwise. Both answer the curl examples.
    let demo = root_dir().join("demo");
    let node_demo = find_in_path("node").is_some() && demo.join("node_modules").exists();
    if node_demo {
        args.push("node".into());
        args.push(demo.join("worker.js").into());
        eprintln!("Socket.IO demo page: open http://127.0.0.1:3000/ in several browser tabs.");
    } else {
        args.push(bin.join("sticky-demo-worker").into());
    }
    eprintln!(
        "sticky demo on 127.0.0.1:3000 (Ctrl-C stops it). Try, from another terminal:\n  \
         curl http://127.0.0.1:3000/\n  \
         curl 'http://127.0.0.1:3000/register?sid=demo123'\n  \
         curl 'http://127.0.0.1:3000/?sid=demo123'   (repeatedly: always the same worker)\n"
    );
    exec_as_root(&bin.join("sticky"), &args)
}

fn test(extra: &[String]) -> Result<(), String> {
    let tools = deps::for_test()?;
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--bins"]);
    status(cmd, "cargo build")?;
    if !is_root() {
        eprintln!("xtask: note: not root; the integration tests load BPF programs and will fail without root");
    }
    let bin = root_dir().join("target/debug");
    let mut tally = Tally::default();
    let mut cmd = cargo();
    cmd.args(["test", "--workspace"])
        .args(extra)
        .env("STICKY_BIN", bin.join("sticky"))
        .env("STICKY_DEMO_WORKER", bin.join("sticky-demo-worker"))
        .env("STICKY_PYTHON", &tools.python);
    let mut result = tally.run(cmd, "cargo test");
    // The Socket.IO suites: the Node integration's unit tests, then the
    // end-to-end tests with real socket.io servers and clients (npm).
    let root = root_dir();
    let node = |dir: &str, args: &[&str]| {
        let mut cmd = Command::new("node");
        cmd.current_dir(root.join(dir))
            .args(args)
            .env("STICKY_BIN", bin.join("sticky"))
            .env("RUST_WORKER", bin.join("sticky-socketioxide-worker"))
            // The project's virtual environment (deps.rs), never the system's.
            .env("PYTHON", &tools.python)
            // Scenarios for the Node and Python workers; the Rust worker
            // runs the 200-client load test (its scenario gaps: README).
            .env("E2E_SCENARIO_LANGS", "node,python");
        cmd
    };
    if result.is_ok() {
        result = tally.run(
            node(
                "integrations/node",
                &["--test", "--test-reporter=tap", "test/"],
            ),
            "node integration tests",
        );
    }
    if result.is_ok() {
        // The Python integration's unit tests, in the project's venv
        // (unittest reports on stderr: joined to stdout for the tally).
        let mut cmd = Command::new("/bin/sh");
        cmd.current_dir(root.join("integrations/python"))
            .args(["-c", "exec \"$0\" -m unittest -v 2>&1"])
            .arg(&tools.python);
        result = tally.run(cmd, "python integration tests");
    }
    if result.is_ok() {
        let args = [
            "--test",
            "--test-concurrency=1",
            "--test-reporter=tap",
            "test/",
        ];
        result = tally.run(node("e2e", &args), "e2e tests");
    }
    if result.is_ok() {
        result = fuzz::in_test_run(&mut tally);
    }
    if result.is_ok() {
        result = fresh::in_test_run(&mut tally, !extra.is_empty());
    }
    tally.print();
    result
}

/// Test counts gathered from the runners' own summary lines, so one line at
/// the end says how the whole run went.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    skipped: u64,
    /// unittest's "Ran N tests", until its verdict line.
    unittest_ran: u64,
}

impl Tally {
    /// Runs `cmd`, echoing its stdout and counting what its runner reports.
    fn run(&mut self, mut cmd: Command, what: &str) -> Result<(), String> {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            self.count(&line);
        }
        let status = child.wait().map_err(|e| format!("{what}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{what} failed ({status})"))
        }
    }

    fn count(&mut self, line: &str) {
        let number = |text: &str, word: &str| -> u64 {
            text.split([';', ','])
                .find_map(|part| part.trim().strip_suffix(word)?.trim().parse().ok())
                .unwrap_or(0)
        };
        if let Some(rest) = line.strip_prefix("test result: ") {
            // cargo: "test result: ok. 3 passed; 0 failed; 1 ignored; ..."
            let rest = rest.split_once(". ").map_or(rest, |(_, r)| r);
            self.passed += number(rest, "passed");
            self.failed += number(rest, "failed");
            self.skipped += number(rest, "ignored");
        } else if let Some(n) = line.strip_prefix("# pass ") {
            // node --test (TAP): "# pass 12", "# fail 0", "# skipped 1"
            self.passed += n.trim().parse().unwrap_or(0);
        } else if let Some(n) = line.strip_prefix("# fail ") {
            self.failed += n.trim().parse().unwrap_or(0);
        } else if let Some(n) = line.strip_prefix("# skipped ") {
            self.skipped += n.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.strip_prefix("Ran ") {
            // Python unittest: "Ran 19 tests in 3.0s", then "OK",
            // "OK (skipped=1)" or "FAILED (failures=1, errors=2)".
            self.unittest_ran = rest
                .split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if line == "OK" || line.starts_with("OK (") || line.starts_with("FAILED (") {
            let inner = line
                .split_once('(')
                .map_or("", |(_, r)| r.trim_end_matches(')'));
            let skipped = count_of(inner, "skipped");
            let failed = count_of(inner, "failures") + count_of(inner, "errors");
            self.skipped += skipped;
            self.failed += failed;
            self.passed += self.unittest_ran.saturating_sub(skipped + failed);
            self.unittest_ran = 0;
        }
    }

    fn print(&self) {
        println!(
            "summary: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        );
    }
}

/// `key=N` in unittest's verdict, e.g. `failures=1, errors=2`.
fn count_of(text: &str, key: &str) -> u64 {
    text.split(", ")
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        .unwrap_or(0)
}

/// Replaces this process with `program args` (so its exit code and Ctrl-C
/// handling are the program's own), through sudo when not root.
fn exec_as_root(program: &Path, args: &[OsString]) -> Result<(), String> {
    let mut cmd = if is_root() {
        Command::new(program)
    } else if let Some(sudo) = find_in_path("sudo") {
        eprintln!(
            "xtask: loading BPF programs needs root: running {} under sudo",
            program.display()
        );
        let mut cmd = Command::new(sudo);
        cmd.arg(program);
        cmd
    } else {
        return Err(
            "loading BPF programs needs root, and sudo is not available: run this as root".into(),
        );
    };
    let err = cmd.args(args).exec();
    Err(format!("cannot run {}: {err}", program.display()))
}

/// Effective uid 0, read from /proc so that xtask needs no dependency.
fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Today's UTC date as YYYY-MM-DD (days-to-civil, H. Hinnant), to avoid a
/// date crate for one file name.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    date(secs)
}

fn date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unittest_verdicts_are_counted() {
        let mut tally = super::Tally::default();
        for line in ["Ran 19 tests in 3.029s", "", "OK"] {
            tally.count(line);
        }
        for line in [
            "Ran 5 tests in 1s",
            "FAILED (failures=1, errors=1, skipped=1)",
        ] {
            tally.count(line);
        }
        assert_eq!((tally.passed, tally.failed, tally.skipped), (21, 2, 1));
    }

    #[test]
    fn dates() {
        assert_eq!(super::date(0), "1970-01-01");
        assert_eq!(super::date(951_782_400), "2000-02-29");
        assert_eq!(super::date(1_795_644_177), "2026-11-25");
    }
}
