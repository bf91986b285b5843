//! `cargo xtask fresh`: proves that the README's two commands set up a
//! fresh machine by themselves. In a clean `debootstrap --variant=minbase
//! bookworm` root (the kernel matrix's recipe, `kernels::debootstrap`) with
//! only the Rust toolchain added, it runs `cargo xtask run` (until the demo
//! answers over HTTP) and then `cargo xtask test`, and prints how long each
//! took.
//!
//! "The Rust toolchain" is the host's rustc/cargo (bind-mounted read-only)
//! plus what rustup itself asks a user to have: a C linker (`gcc`,
//! `libc6-dev`) and `ca-certificates` to reach crates.io. The sources are
//! the committed tree (`git archive HEAD`). The root runs under `chroot`
//! with the host's /proc, /sys, /dev and network (apt, npm and pip reach
//! their registries). Everything lives under `target/fresh/`.
//!
//! It is the last step of `cargo xtask test` (18 to 33 minutes here, which
//! fits CI's budget; README "A fresh machine"), skipped inside the fresh
//! root itself, when not root, or with `STICKY_SKIP_FRESH=1`. `cargo
//! xtask fresh` runs it alone and records the result in README.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{deps, is_root, kernels, root_dir, status, Tally};

/// What the toolchain needs beyond rustc and cargo (see the module doc).
const TOOLCHAIN_PACKAGES: &[&str] = &["gcc", "libc6-dev", "ca-certificates"];
/// Certificate settings passed into the root as they are on the host: a
/// network that intercepts TLS (as this project's CI machines' does) gives
/// its CA through these. The bundle they name is copied in too.
const CA_ENV: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
];
/// How long `cargo xtask run` may take to build and answer.
const RUN_TIMEOUT: Duration = Duration::from_secs(3600);

/// Set inside the fresh root, so that its `cargo xtask test` does not
/// start another one.
const INSIDE: &str = "STICKY_FRESH_ROOT";
/// `STICKY_SKIP_FRESH=1 cargo xtask test` leaves this run out.
const SKIP: &str = "STICKY_SKIP_FRESH";

/// `cargo xtask test`'s last step: one test, or one skipped with a reason.
pub fn in_test_run(tally: &mut Tally, subset: bool) -> Result<(), String> {
    let skip = if subset {
        Some("cargo test arguments given: a subset of the tests".to_owned())
    } else if std::env::var_os(INSIDE).is_some() {
        Some("inside the fresh root itself".to_owned())
    } else if std::env::var_os(SKIP).is_some_and(|v| v == "1") {
        Some(format!("{SKIP}=1"))
    } else if !is_root() {
        Some("needs root (debootstrap, chroot)".to_owned())
    } else if !is_git_checkout() {
        Some("not a git checkout (the root gets `git archive HEAD`)".to_owned())
    } else {
        None
    };
    if let Some(why) = skip {
        println!("fresh: skipped: {why}");
        tally.skipped += 1;
        return Ok(());
    }
    let result = fresh(false);
    match result {
        Ok(()) => tally.passed += 1,
        Err(_) => tally.failed += 1,
    }
    result
}

pub fn run(_args: &[String]) -> Result<(), String> {
    fresh(true)
}

/// The whole proof; `record`: write the result into README.
fn fresh(record: bool) -> Result<(), String> {
    if !is_root() {
        return Err(
            "cargo xtask fresh needs root (debootstrap, chroot, mounts): run it with sudo".into(),
        );
    }
    let started = Instant::now();
    deps::for_fresh()?;
    let cache = root_dir().join("target/fresh");
    let pristine = cache.join("pristine");
    if !pristine.join("usr/bin/apt-get").exists() {
        kernels::debootstrap(&pristine, &[])?;
    }
    let root = cache.join("root");
    if root.exists() {
        unmount_below(&root);
        // Never delete through a bind mount of the host's /dev or toolchain.
        if !mount_points_below(&root).is_empty() {
            return Err(format!(
                "{} still has mounts; unmount them first",
                root.display()
            ));
        }
        fs::remove_dir_all(&root).map_err(|e| format!("removing {}: {e}", root.display()))?;
    }
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(&pristine).arg(&root);
    status(cp, "cp -a (fresh root)")?;
    let mounts = Mounts::set_up(&root)?;
    let commit = copy_sources(&root.join("src"))?;
    eprintln!(
        "fresh: clean bookworm root {} ready in {:.0?}; sources at {commit}",
        root.display(),
        started.elapsed()
    );

    let toolchain = Instant::now();
    in_root(
        &root,
        &format!(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {} >/dev/null",
            TOOLCHAIN_PACKAGES.join(" ")
        ),
        "the toolchain's packages",
    )?;
    let toolchain = toolchain.elapsed();
    trust_host_ca(&root)?;

    let run = Instant::now();
    run_demo(&root)?;
    let run = run.elapsed();

    let test = Instant::now();
    let summary = run_tests(&root);
    let test = test.elapsed();
    drop(mounts);
    let result = format!(
        "Debian 12 minbase + {}, sources at {commit}: toolchain packages {:.0?}; `cargo xtask run` built and served in {:.0?}; `cargo xtask test` {} in {:.0?}; total {:.0?} (on {}).",
        rust_version(),
        toolchain,
        run,
        match &summary {
            Ok(line) => format!("passed ({line})"),
            Err(e) => format!("FAILED ({e})"),
        },
        test,
        started.elapsed(),
        super::today()
    );
    println!("fresh: {result}");
    if record {
        record_in_readme(&result)?;
    }
    summary.map(drop)
}

const README_BEGIN: &str = "<!-- fresh:begin -->";
const README_END: &str = "<!-- fresh:end -->";

/// Replaces the result between README's fresh markers.
fn record_in_readme(result: &str) -> Result<(), String> {
    let readme = root_dir().join("README.md");
    let text = fs::read_to_string(&readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let (Some(begin), Some(end)) = (text.find(README_BEGIN), text.find(README_END)) else {
        return Err(format!(
            "README.md has no {README_BEGIN} ... {README_END} markers"
        ));
    };
    let new = format!(
        "{}\nLast run: {result}\n{}",
        &text[..begin + README_BEGIN.len()],
        &text[end..]
    );
    fs::write(&readme, new).map_err(|e| format!("{}: {e}", readme.display()))
}

fn is_git_checkout() -> bool {
    Command::new("git")
        .current_dir(root_dir())
        .args(["rev-parse", "--verify", "-q", "HEAD"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The committed tree, unpacked at `dest`; returns the commit.
fn copy_sources(dest: &Path) -> Result<String, String> {
    fs::create_dir_all(dest).map_err(|e| format!("{e}"))?;
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root_dir())
            .args(args)
            .output()
            .map_err(|e| format!("git: {e}"))
    };
    let head = git(&["rev-parse", "--short", "HEAD"])?;
    let commit = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    if !git(&["status", "--porcelain", "--untracked-files=no"])?
        .stdout
        .is_empty()
    {
        eprintln!("fresh: note: uncommitted changes are not part of the run (HEAD {commit} is)");
    }
    let archive = git(&["archive", "--format=tar", "HEAD"])?;
    let mut tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    tar.stdin
        .take()
        .expect("piped")
        .write_all(&archive.stdout)
        .map_err(|e| format!("tar: {e}"))?;
    if !tar.wait().map_err(|e| format!("tar: {e}"))?.success() {
        return Err("unpacking the sources failed".into());
    }
    Ok(commit)
}

/// A shell command in the root, as root, with the toolchain on PATH and
/// nothing of the host's environment.
fn chroot(root: &Path, script: &str) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root)
        .args(["/bin/bash", "-c", script])
        .env_clear()
        .env(
            "PATH",
            "/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .env("CARGO_HOME", "/root/.cargo")
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .env(INSIDE, "1");
    for var in CA_ENV {
        if let Some(value) = std::env::var_os(var) {
            cmd.env(var, value);
        }
    }
    cmd
}

/// The host's CA bundle (`/etc/ssl/certs/ca-certificates.crt`, which holds
/// the network's own CA where TLS is intercepted) replaces the root's.
fn trust_host_ca(root: &Path) -> Result<(), String> {
    let bundle = "etc/ssl/certs/ca-certificates.crt";
    fs::copy(Path::new("/").join(bundle), root.join(bundle))
        .map(drop)
        .map_err(|e| format!("copying the host's CA bundle: {e}"))
}

fn in_root(root: &Path, script: &str, what: &str) -> Result<(), String> {
    status(chroot(root, script), what)
}

/// `cargo xtask run` on a free port until the demo answers `GET /` with
/// 200, then SIGINT.
fn run_demo(root: &Path) -> Result<(), String> {
    eprintln!("fresh: cargo xtask run");
    let mut cmd = chroot(
        root,
        "cd /src && exec cargo xtask run -- --listen 127.0.0.1:0 --workers 2",
    );
    cmd.stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("chroot: {e}"))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if let Some(port) = listening_port(&line) {
                let _ = tx.send(port);
            }
        }
    });
    let outcome = rx
        .recv_timeout(RUN_TIMEOUT)
        .map_err(|_| "cargo xtask run never said where it listens".to_owned())
        .and_then(answers_ok);
    let _ = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status();
    let exited = child.wait().map_err(|e| format!("{e}"))?;
    eprintln!("fresh: cargo xtask run stopped ({exited})");
    outcome
}

/// The port of sticky's "listening on ADDR:PORT with ..." line.
fn listening_port(line: &str) -> Option<u16> {
    let addr = line.split("listening on ").nth(1)?.split(' ').next()?;
    addr.rsplit(':').next()?.parse().ok()
}

fn answers_ok(port: u16) -> Result<(), String> {
    // Workers start after sticky says it listens: give them a few seconds.
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.write_all(b"GET / HTTP/1.1\r\nHost: fresh\r\nConnection: close\r\n\r\n");
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        if answer.starts_with("HTTP/1.1 200") {
            eprintln!("fresh: the demo answered GET / with 200 on port {port}");
            return Ok(());
        }
    }
    Err(format!(
        "the demo on port {port} never answered GET / with 200"
    ))
}

/// `cargo xtask test`; its summary line.
fn run_tests(root: &Path) -> Result<String, String> {
    eprintln!("fresh: cargo xtask test");
    let mut child = chroot(root, "cd /src && cargo xtask test")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("chroot: {e}"))?;
    let mut summary = None;
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        if line.starts_with("summary: ") {
            summary = Some(line);
        }
    }
    let exited = child.wait().map_err(|e| format!("{e}"))?;
    let summary = summary.unwrap_or_else(|| "no summary line".into());
    if exited.success() {
        Ok(summary)
    } else {
        Err(format!("{exited}, {summary}"))
    }
}

fn rust_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The host's toolchain directory (what `rustc` on PATH runs from).
fn toolchain_dir() -> Result<PathBuf, String> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("rustc: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    fs::canonicalize(&sysroot).map_err(|e| format!("{}: {e}", sysroot.display()))
}

/// The root's mounts, undone on drop (also when a step fails).
struct Mounts(PathBuf);

impl Mounts {
    fn set_up(root: &Path) -> Result<Mounts, String> {
        let mounts = Mounts(root.to_owned());
        let toolchain = toolchain_dir()?;
        let mount = |args: &[&str], target: &str| -> Result<(), String> {
            let target = root.join(target);
            fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
            let mut cmd = Command::new("mount");
            cmd.args(args).arg(&target);
            status(cmd, &format!("mount {}", target.display()))
        };
        mount(&["-t", "proc", "proc"], "proc")?;
        mount(&["--rbind", "/sys"], "sys")?;
        mount(&["--make-rslave"], "sys")?;
        mount(&["--rbind", "/dev"], "dev")?;
        mount(&["--make-rslave"], "dev")?;
        mount(&["-t", "tmpfs", "tmpfs"], "run")?;
        let toolchain = toolchain.to_string_lossy().into_owned();
        mount(&["--bind", &toolchain], "opt/rust")?;
        mount(&["-o", "remount,bind,ro"], "opt/rust")?;
        fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
            .map_err(|e| format!("copying resolv.conf: {e}"))?;
        Ok(mounts)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        unmount_below(&self.0);
    }
}

/// Lazily unmounts everything mounted at or below `root`, deepest first.
fn unmount_below(root: &Path) {
    for point in mount_points_below(root) {
        let _ = Command::new("umount").arg("-l").arg(&point).status();
    }
}

/// Mount points at or below `root`, deepest first.
fn mount_points_below(root: &Path) -> Vec<String> {
    let table = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = root.to_string_lossy().into_owned();
    let mut points: Vec<String> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_port_sticky_listens_on() {
        let line = "sticky: listening on 127.0.0.1:41234 with 2 workers (balance: least-connection), control socket /tmp/x";
        assert_eq!(super::listening_port(line), Some(41234));
        assert_eq!(super::listening_port("sticky: worker 0 started"), None);
    }
}
