//! `cargo xtask kernels [--quick | --kernel VERSION] [--kvm] [--tests NAME,...]`:
//! boots the distribution kernels users deploy on under qemu and runs sticky
//! inside each, then prints (and writes into README.md) a matrix.
//!
//! Everything comes from Debian's archive through apt, cached under
//! `target/kernels/`:
//! - kernels: `linux-image-cloud-amd64` of bullseye (5.10, the "too old"
//!   path), bookworm (6.1, and 6.1.170 pinned) and trixie (6.12); only
//!   `vmlinuz` is kept, since everything the guest needs (BPF, cgroup2,
//!   loopback, serial console, initramfs) is built into Debian's cloud
//!   kernels, plus `inet_diag` and `tcp_diag` (modules there, loaded by the
//!   guest's /init: sticky's connection resets use sock_diag);
//! - a root filesystem: `debootstrap --variant=minbase bookworm` plus
//!   python3 (scripted test workers) and busybox-static (`ip`), packed once
//!   into an uncompressed initramfs. The whole guest lives in RAM: no disk
//!   image, no 9p, no modules, and it unpacks in about a second.
//!
//! Per run, a second archive is appended: the guest's `/init`, the
//! direct check (`guest/probe.py`), `sticky`, the demo worker and the test
//! binaries (built on the host; glibc of host and guest is bookworm's).
//! The guest writes its results to a second serial port, parsed here.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{cargo, is_root, root_dir, status};

/// The kernels of the matrix: Debian suite and the version it ships.
const KERNELS: &[Kernel] = &[
    Kernel {
        series: "6.12",
        suite: "trixie",
        image: None,
        users: "Debian 13",
    },
    Kernel {
        series: "6.1",
        suite: "bookworm",
        image: None,
        users: "Debian 12",
    },
    // The previous Debian 12 kernel, still in the archive: it predates the
    // kernel's own wake-up after a migration, so it shows sticky's.
    Kernel {
        series: "6.1.170",
        suite: "bookworm",
        image: Some("linux-image-6.1.0-47-cloud-amd64"),
        users: "Debian 12 until 6.1.176",
    },
    Kernel {
        series: "5.10",
        suite: "bullseye",
        image: None,
        users: "Debian 11 (below 5.14: must refuse)",
    },
];

/// `--quick` boots this one: Debian 12's, the oldest kernel sticky supports,
/// and runs the direct check plus the kernel-side program tests (the
/// verifier of that kernel), which fit CI's time.
const QUICK: &str = "6.1";
const QUICK_TESTS: &[&str] = &["parser", "learner", "foreign_decision"];

const MIRROR: &str = "http://deb.debian.org/debian";
const README_BEGIN: &str = "<!-- kernels:begin -->";
const README_END: &str = "<!-- kernels:end -->";

struct Kernel {
    /// What `--kernel` takes; also the cache directory's name.
    series: &'static str,
    suite: &'static str,
    /// The image package; None: the suite's current `linux-image-cloud-amd64`.
    image: Option<&'static str>,
    users: &'static str,
}

struct Options {
    kernels: Vec<&'static Kernel>,
    kvm: bool,
    /// Names of the test executables to run in the guest (all when empty).
    tests: Vec<String>,
}

pub fn run(args: &[String]) -> Result<(), String> {
    let options = parse_args(args)?;
    if !is_root() {
        return Err("cargo xtask kernels needs root (debootstrap, apt): run it with sudo".into());
    }
    let started = Instant::now();
    let cache = root_dir().join("target/kernels");
    fs::create_dir_all(&cache).map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
    super::deps::for_kernels()?;
    let kernels = fetch_kernels(&cache, &options.kernels)?;
    let base = base_initramfs(&cache)?;
    let payload = build_payload(&cache, &options.tests)?;
    eprintln!("kernels: prepared in {:.0?}", started.elapsed());

    let mut rows = Vec::new();
    for (kernel, vmlinuz) in options.kernels.iter().zip(&kernels) {
        let boot = Instant::now();
        eprintln!("kernels: booting {} ({})", kernel.series, vmlinuz.display());
        let output = boot_guest(&cache, kernel, vmlinuz, &base, &payload, options.kvm)?;
        let mut row = Row::from_guest(kernel, &output, boot.elapsed());
        row.subset = options.tests.clone();
        eprintln!("{}", row.summary());
        rows.push(row);
    }
    let table = Row::table(&rows);
    println!("{table}");
    update_readme(&root_dir().join("README.md"), &rows)?;
    eprintln!("kernels: done in {:.0?}", started.elapsed());
    if rows.iter().all(Row::as_expected) {
        Ok(())
    } else {
        Err("some kernels did not behave as expected (see the matrix above)".into())
    }
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        kernels: KERNELS.iter().collect(),
        kvm: false,
        tests: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                options.kernels = vec![kernel(QUICK)?];
                if options.tests.is_empty() {
                    options.tests = QUICK_TESTS.iter().map(|t| t.to_string()).collect();
                }
            }
            "--kernel" => {
                let v = args.next().ok_or("--kernel needs a version (5.10, 6.1, 6.12)")?;
                options.kernels = vec![kernel(v)?];
            }
            "--kvm" => options.kvm = true,
            "--tests" => {
                let names = args.next().ok_or("--tests needs names, e.g. steering,parser")?;
                options.tests = names.split(',').map(str::to_owned).collect();
            }
            other => {
                return Err(format!(
                    "unknown argument {other}: usage: cargo xtask kernels [--quick | --kernel VERSION] [--kvm] [--tests NAME,...]"
                ))
            }
        }
    }
    Ok(options)
}

fn kernel(series: &str) -> Result<&'static Kernel, String> {
    KERNELS.iter().find(|k| k.series == series).ok_or_else(|| {
        let known: Vec<_> = KERNELS.iter().map(|k| k.series).collect();
        format!(
            "unknown kernel {series}: choose one of {}",
            known.join(", ")
        )
    })
}

/// apt with its own sources, lists and cache under `dir`, so the host's
/// configuration stays untouched whatever suites it has.
fn apt(dir: &Path, tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
    for (key, path) in [
        ("Dir::Etc::sourcelist", dir.join("sources.list")),
        ("Dir::Etc::sourceparts", dir.join("sources.list.d")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ] {
        cmd.arg("-o").arg(opt(key, &path));
    }
    // Only package lists, no translations or AppStream metadata; no
    // privilege drop to _apt (it cannot write into target/).
    cmd.args([
        "-o",
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
        "-o",
        "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
        "-o",
        "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
        "-o",
        "Acquire::Languages=none",
        "-o",
        "APT::Sandbox::User=root",
        "-qq",
    ]);
    cmd
}

/// The `vmlinuz` of each kernel, downloaded and extracted when not cached.
/// The sock_diag modules a kernel's guest loads (`<series>/modules/`).
const DIAG_MODULES: &[&str] = &["inet_diag", "tcp_diag"];

fn modules_dir(cache: &Path, k: &Kernel) -> PathBuf {
    cache.join(k.series).join("modules")
}

fn fetch_kernels(cache: &Path, kernels: &[&Kernel]) -> Result<Vec<PathBuf>, String> {
    let vmlinuz = |k: &Kernel| cache.join(k.series).join("vmlinuz");
    let complete = |k: &Kernel| vmlinuz(k).exists() && modules_dir(cache, k).exists();
    if kernels.iter().all(|k| complete(k)) {
        return Ok(kernels.iter().map(|k| vmlinuz(k)).collect());
    }
    let dir = cache.join("apt");
    for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut suites: Vec<&str> = kernels.iter().map(|k| k.suite).collect();
    suites.sort();
    suites.dedup();
    let sources: String = suites
        .iter()
        .map(|suite| format!("deb {MIRROR} {suite} main\n"))
        .collect();
    fs::write(dir.join("sources.list"), sources).map_err(|e| format!("{e}"))?;
    let mut update = apt(&dir, "apt-get");
    update.arg("update");
    status(update, "apt-get update (Debian kernel suites)")?;
    for k in kernels {
        if complete(k) {
            continue;
        }
        let target = cache.join(k.series);
        fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        // The metapackage names the suite's current image package.
        let image = match k.image {
            Some(image) => image.to_owned(),
            None => depends_of(
                &dir,
                &format!("linux-image-cloud-amd64/{}", k.suite),
                &target,
            )?,
        };
        let deb = download(&dir, &format!("{image}/{}", k.suite), &target)?;
        eprintln!("kernels: extracting {}", deb.display());
        let mut tarball = Command::new("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(&deb)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run dpkg-deb: {e}"))?;
        let mut tar = Command::new("tar");
        tar.arg("-x")
            .arg("-C")
            .arg(&target)
            .args(["--wildcards", "./boot/vmlinuz-*"])
            .args(
                DIAG_MODULES
                    .iter()
                    // ./lib/modules (Debian 12) or ./usr/lib/modules
                    // (Debian 13, merged /usr): `*` matches `/` too.
                    .map(|m| format!("*/modules/*/kernel/net/ipv4/{m}.ko*")),
            )
            .stdin(tarball.stdout.take().expect("piped"));
        let extracted = status(tar, "extracting vmlinuz and the sock_diag modules");
        let _ = tarball.wait();
        extracted?;
        keep_modules(&target, &modules_dir(cache, k))?;
        let boot = target.join("boot");
        let found = fs::read_dir(&boot)
            .map_err(|e| format!("{}: {e}", boot.display()))?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
            .ok_or_else(|| format!("no vmlinuz in {}", deb.display()))?;
        fs::rename(found.path(), vmlinuz(k)).map_err(|e| format!("{e}"))?;
        let _ = fs::remove_dir_all(&boot);
        let _ = fs::remove_file(&deb);
    }
    Ok(kernels.iter().map(|k| vmlinuz(k)).collect())
}

/// Moves the extracted sock_diag modules (`[usr/]lib/modules/*/.../NAME.ko`,
/// or `.ko.xz`, decompressed: busybox insmod reads plain ones) to `to`.
fn keep_modules(extracted: &Path, to: &Path) -> Result<(), String> {
    fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let lib = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| extracted.join(d))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| extracted.join("lib/modules"));
    let version = fs::read_dir(&lib)
        .map_err(|e| format!("{}: {e}", lib.display()))?
        .filter_map(Result::ok)
        .next()
        .ok_or_else(|| format!("no modules in {}", lib.display()))?;
    let dir = version.path().join("kernel/net/ipv4");
    for m in DIAG_MODULES {
        let plain = dir.join(format!("{m}.ko"));
        let xz = dir.join(format!("{m}.ko.xz"));
        if xz.exists() {
            let mut unxz = Command::new("xz");
            unxz.args(["-d", "-k"]).arg(&xz);
            status(unxz, "decompressing a module")?;
        }
        fs::rename(&plain, to.join(format!("{m}.ko")))
            .map_err(|e| format!("{}: {e}", plain.display()))?;
    }
    let _ = fs::remove_dir_all(extracted.join("lib"));
    let _ = fs::remove_dir_all(extracted.join("usr"));
    Ok(())
}

/// A small archive with the kernel's sock_diag modules at /modules/.
fn modules_cpio(cache: &Path, k: &Kernel) -> Result<PathBuf, String> {
    let path = cache.join(k.series).join("modules.cpio");
    let mut cpio = Cpio::create(&path)?;
    cpio.dir("modules")?;
    for m in DIAG_MODULES {
        cpio.copy(
            &modules_dir(cache, k).join(format!("{m}.ko")),
            &format!("modules/{m}.ko"),
        )?;
    }
    cpio.finish()?;
    Ok(path)
}

/// Downloads `spec` (`package/suite`) into `dir`, returns the .deb's path.
fn download(apt_dir: &Path, spec: &str, dir: &Path) -> Result<PathBuf, String> {
    let package = spec.split('/').next().unwrap_or(spec);
    let mut cmd = apt(apt_dir, "apt-get");
    cmd.arg("download").arg(spec).current_dir(dir);
    status(cmd, &format!("apt-get download {spec}"))?;
    fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
        })
        .ok_or_else(|| format!("apt-get download {spec} left no .deb"))
}

/// The first dependency of a metapackage: the package it stands for.
fn depends_of(apt_dir: &Path, spec: &str, dir: &Path) -> Result<String, String> {
    let deb = download(apt_dir, spec, dir)?;
    let out = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends")
        .output()
        .map_err(|e| format!("cannot run dpkg-deb: {e}"))?;
    let _ = fs::remove_file(&deb);
    let depends = String::from_utf8_lossy(&out.stdout);
    depends
        .split([',', ' '])
        .find(|s| s.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| format!("{spec} depends on no linux-image: {depends}"))
}

/// The root filesystem as an initramfs, built once.
fn base_initramfs(cache: &Path) -> Result<PathBuf, String> {
    let cpio = cache.join("rootfs.cpio");
    if cpio.exists() {
        return Ok(cpio);
    }
    let rootfs = cache.join("rootfs");
    if !rootfs.join("usr/bin/python3").exists() {
        debootstrap(&rootfs, &["python3", "busybox-static"])?;
    }
    // Documentation, locales and apt's caches are dead weight in RAM.
    for dir in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        let _ = fs::remove_dir_all(rootfs.join(dir));
    }
    let partial = cache.join("rootfs.cpio.partial");
    let mut archive = Cpio::create(&partial)?;
    archive.add_tree(&rootfs, "")?;
    archive.finish()?;
    fs::rename(&partial, &cpio).map_err(|e| format!("{e}"))?;
    Ok(cpio)
}

/// A `debootstrap --variant=minbase bookworm` root filesystem at `rootfs`
/// (replaced), with `include` added.
pub fn debootstrap(rootfs: &Path, include: &[&str]) -> Result<(), String> {
    eprintln!("debootstrap bookworm into {}", rootfs.display());
    let _ = fs::remove_dir_all(rootfs);
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg("bookworm")
        .arg(rootfs)
        .arg(MIRROR)
        .stdout(Stdio::null());
    status(cmd, "debootstrap")
}

/// The per-run archive: init, the direct check, sticky and the tests.
fn build_payload(cache: &Path, tests: &[String]) -> Result<PathBuf, String> {
    let mut build = cargo();
    build.args(["build", "--workspace", "--bins"]);
    status(build, "cargo build")?;
    let mut binaries = test_binaries()?;
    if !tests.is_empty() {
        binaries.retain(|(name, _)| tests.contains(name));
        if binaries.len() != tests.len() {
            let known: Vec<_> = test_binaries()?.into_iter().map(|(n, _)| n).collect();
            return Err(format!("--tests: choose among {}", known.join(", ")));
        }
    }
    let bin = root_dir().join("target/debug");
    let path = cache.join("payload.cpio");
    let mut archive = Cpio::create(&path)?;
    archive.dir("kernels")?;
    archive.dir("kernels/tests")?;
    archive.file("init", 0o755, include_bytes!("../guest/init.sh"))?;
    archive.file(
        "kernels/probe.py",
        0o644,
        include_bytes!("../guest/probe.py"),
    )?;
    // One test at a time: two emulated CPUs, and tests that count workers'
    // connections must not share them.
    let env = "export STICKY_BIN=/kernels/sticky STICKY_DEMO_WORKER=/kernels/sticky-demo-worker\n\
               export TEST_TIMEOUT=600 TEST_ARGS='--test-threads=1 --color=never'\n";
    archive.file("kernels/run.env", 0o644, env.as_bytes())?;
    for name in ["sticky", "sticky-demo-worker"] {
        archive.copy(&bin.join(name), &format!("kernels/{name}"))?;
    }
    for (name, path) in &binaries {
        archive.copy(path, &format!("kernels/tests/{name}"))?;
    }
    // Files the tests find through their build-time path: the scripted
    // workers, and the fuzz corpus the parser test replays in the kernel.
    for dir in ["tests/workers", "fuzz/corpus"] {
        archive.add_at_build_path(&root_dir().join(dir))?;
    }
    archive.finish()?;
    Ok(path)
}

/// The integration tests (real sticky, real workers) and the kernel-side
/// program tests (BPF_PROG_TEST_RUN: the guest kernel's verifier and
/// helpers), as (name, path) of the compiled test executables.
fn test_binaries() -> Result<Vec<(String, PathBuf)>, String> {
    let out = cargo()
        .args([
            "test",
            "-p",
            "sticky-tests",
            "-p",
            "sticky-ebpf",
            "--no-run",
        ])
        .args(["--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo test --no-run: {e}"))?;
    if !out.status.success() {
        return Err("cargo test --no-run failed".into());
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Each artifact is one JSON object; the executable and target name
        // are plain strings, so a field lookup needs no JSON parser.
        let (Some(exe), Some(name)) = (json_field(line, "executable"), json_field(line, "name"))
        else {
            continue;
        };
        if line.contains("\"test\":true") && exe != "null" {
            found.push((name, PathBuf::from(exe)));
        }
    }
    if found.is_empty() {
        return Err("cargo test --no-run listed no test executables".into());
    }
    Ok(found)
}

/// The string value of the first `"key":"value"` in `json`.
fn json_field(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_owned())
}

/// Boots `vmlinuz` with base + payload as its initramfs; returns what the
/// guest wrote to its result port.
fn boot_guest(
    cache: &Path,
    kernel: &Kernel,
    vmlinuz: &Path,
    base: &Path,
    payload: &Path,
    kvm: bool,
) -> Result<String, String> {
    // The kernel unpacks concatenated archives in order: payload files
    // (/init) are added to the root filesystem's.
    let initrd = cache.join("initrd.cpio");
    let modules = modules_cpio(cache, kernel)?;
    concatenate(&[base, payload, &modules], &initrd)?;
    let results = cache.join(format!("results-{}.txt", kernel.series));
    let console = cache.join(format!("console-{}.log", kernel.series));
    let _ = fs::remove_file(&results);
    let accel = if kvm { "kvm" } else { "tcg,thread=multi" };
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", accel, "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-nodefaults", "-no-reboot", "-net", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = qemu
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    // Hard limit: a guest that hangs (a test waiting forever) is stopped.
    let limit = Duration::from_secs(45 * 60);
    let start = Instant::now();
    loop {
        if child
            .try_wait()
            .map_err(|e| format!("qemu: {e}"))?
            .is_some()
        {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("kernels: guest stopped after {limit:?}");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(&results) {
        let mut raw = Vec::new();
        let _ = f.read_to_end(&mut raw);
        text = String::from_utf8_lossy(&raw).replace('\r', "");
    }
    if text.is_empty() {
        return Err(format!(
            "the guest wrote no results; its console is in {}",
            console.display()
        ));
    }
    Ok(text)
}

fn concatenate(parts: &[&Path], to: &Path) -> Result<(), String> {
    let mut out = fs::File::create(to).map_err(|e| format!("{}: {e}", to.display()))?;
    for part in parts {
        let mut f = fs::File::open(part).map_err(|e| format!("{}: {e}", part.display()))?;
        std::io::copy(&mut f, &mut out).map_err(|e| format!("{}: {e}", to.display()))?;
    }
    Ok(())
}

/// One kernel's line of the matrix.
struct Row {
    kernel: String,
    users: &'static str,
    /// `sticky run` came up; when not, its error line(s).
    loads: Option<bool>,
    error: Vec<String>,
    places: Option<bool>,
    wakeup: Option<bool>,
    /// What sticky does with foreign requests there: `reset` or `pass`.
    foreign: Option<String>,
    passed: usize,
    failed: Vec<String>,
    /// Test binaries that did not finish (exit code 124: timeout).
    finished: bool,
    below_minimum: bool,
    took: Duration,
    /// The test executables run, when not all of them (`--quick`, `--tests`).
    subset: Vec<String>,
}

impl Row {
    fn from_guest(kernel: &Kernel, output: &str, took: Duration) -> Row {
        let release = output
            .lines()
            .find_map(|l| l.strip_prefix("kernel "))
            .unwrap_or(kernel.series)
            .to_owned();
        let probe: BTreeMap<&str, &str> = output
            .lines()
            .filter_map(|l| l.strip_prefix("probe ")?.split_once('='))
            .filter(|(k, _)| *k != "error")
            .collect();
        let yes = |key: &str| probe.get(key).map(|v| *v == "yes");
        let mut passed = 0;
        let mut failed = Vec::new();
        for line in output.lines() {
            // libtest: "test NAME ... ok" / "... FAILED"
            if let Some(rest) = line.strip_prefix("test ") {
                if rest.ends_with(" ... ok") {
                    passed += 1;
                } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                    failed.push(name.to_owned());
                }
            }
        }
        let series_major_minor = |s: &str| -> (u32, u32) {
            let mut it = s
                .split(|c: char| !c.is_ascii_digit())
                .map(|n| n.parse().unwrap_or(0));
            (it.next().unwrap_or(0), it.next().unwrap_or(0))
        };
        Row {
            kernel: release,
            users: kernel.users,
            loads: yes("loads"),
            error: output
                .lines()
                .filter_map(|l| l.strip_prefix("probe error="))
                .map(str::to_owned)
                .collect(),
            places: yes("places"),
            wakeup: yes("wakeup"),
            foreign: probe.get("foreign").map(|v| v.to_string()),
            passed,
            failed,
            finished: output.contains("guest done")
                && !output.lines().any(|l| l == "binary-exit 124"),
            below_minimum: series_major_minor(kernel.series) < (5, 14),
            took,
            subset: Vec::new(),
        }
    }

    /// Works fully, or (below 5.14) refuses with one clear line.
    fn as_expected(&self) -> bool {
        if self.below_minimum {
            self.loads == Some(false) && self.refusal_is_one_clear_line()
        } else {
            self.loads == Some(true)
                && self.places == Some(true)
                && self.wakeup == Some(true)
                && self.failed.is_empty()
                && self.finished
        }
    }

    fn refusal_is_one_clear_line(&self) -> bool {
        self.error.len() == 1 && self.error[0].contains("5.14")
    }

    fn summary(&self) -> String {
        format!(
            "kernels: {}: loads {}, places by sid {}, wake-up {}, tests {} passed {} failed, {:.0?}",
            self.kernel,
            mark(self.loads),
            mark(self.places),
            mark(self.wakeup),
            self.passed,
            self.failed.len(),
            self.took
        )
    }

    fn cells(&self) -> String {
        let loads = match (self.loads, self.below_minimum) {
            (Some(false), true) if self.refusal_is_one_clear_line() => {
                format!("refuses (as required): `{}`", self.error[0])
            }
            (Some(false), _) => format!("no: `{}`", self.error.join(" / ")),
            (other, _) => mark(other).to_owned(),
        };
        let tests = if self.below_minimum {
            "n/a".to_owned()
        } else if self.failed.is_empty() {
            format!(
                "{} passed, 0 failed{}",
                self.passed,
                if self.finished { "" } else { " (timed out)" }
            )
        } else {
            format!(
                "{} passed, {} failed: {}",
                self.passed,
                self.failed.len(),
                self.failed.join(", ")
            )
        };
        let tests = if self.subset.is_empty() || self.below_minimum {
            tests
        } else {
            format!("{tests} (only {})", self.subset.join(", "))
        };
        let (places, wakeup) = if self.below_minimum {
            ("n/a", "n/a")
        } else {
            (mark(self.places), mark(self.wakeup))
        };
        let foreign = match (self.below_minimum, self.foreign.as_deref()) {
            (true, _) => "n/a",
            (_, Some("reset")) => "reset (SOCK_DESTROY)",
            (_, Some("pass")) => "passed (no SOCK_DESTROY)",
            _ => "not reached",
        };
        format!(
            "| {} | {} | {loads} | {places} | {wakeup} | {foreign} | {tests} |",
            self.kernel, self.users
        )
    }

    fn table(rows: &[Row]) -> String {
        let mut lines = vec![
            "| kernel | deployed by | loads | places by sid | migration wake-up | foreign requests | tests in the guest |"
                .to_owned(),
            "|---|---|---|---|---|---|---|".to_owned(),
        ];
        lines.extend(rows.iter().map(Row::cells));
        lines.join("\n")
    }
}

fn mark(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "not reached",
    }
}

/// Replaces the rows of the kernels just run in README.md's matrix and
/// keeps the others (so `--quick` does not erase the full run's rows).
fn update_readme(readme: &Path, rows: &[Row]) -> Result<(), String> {
    let text = fs::read_to_string(readme).map_err(|e| format!("{}: {e}", readme.display()))?;
    let (Some(begin), Some(end)) = (text.find(README_BEGIN), text.find(README_END)) else {
        return Err(format!(
            "README.md has no {README_BEGIN} ... {README_END} markers"
        ));
    };
    let old = &text[begin + README_BEGIN.len()..end];
    // Rows are keyed by their "deployed by" cell: a kernel's point release
    // changes, its row stays one.
    let users = |line: &str| line.split(" | ").nth(1).unwrap_or("").to_owned();
    let mut kept: Vec<String> = old
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| kernel |"))
        .filter(|l| !rows.iter().any(|r| users(l) == r.users))
        .map(str::to_owned)
        .collect();
    kept.extend(rows.iter().map(Row::cells));
    kept.sort_by_key(|l| {
        let k = l[2..].split(' ').next().unwrap_or("").to_owned();
        let n: Vec<u32> = k
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        std::cmp::Reverse(n)
    });
    let header = Row::table(&[]);
    let new = format!(
        "{}\n{header}\n{}\n{}",
        &text[..begin + README_BEGIN.len()],
        kept.join("\n"),
        &text[end..]
    );
    fs::write(readme, new).map_err(|e| format!("{}: {e}", readme.display()))
}

/// A `newc` cpio archive writer: the format the kernel unpacks as an
/// initramfs (no cpio tool needed, and payload files take any guest path).
struct Cpio {
    out: BufWriter<fs::File>,
    written: u64,
    inode: u32,
}

impl Cpio {
    fn create(path: &Path) -> Result<Cpio, String> {
        let file = fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Cpio {
            out: BufWriter::new(file),
            written: 0,
            inode: 1,
        })
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), String> {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad(4)?;
        self.put(data)?;
        self.pad(4)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.out
            .write_all(bytes)
            .map_err(|e| format!("writing an initramfs: {e}"))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self, to: u64) -> Result<(), String> {
        let n = (to - self.written % to) % to;
        self.put(&vec![0; n as usize])
    }

    fn dir(&mut self, name: &str) -> Result<(), String> {
        self.entry(name, 0o040755, &[])
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), String> {
        self.entry(name, 0o100000 | perm, data)
    }

    fn copy(&mut self, from: &Path, name: &str) -> Result<(), String> {
        let data = fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
        self.file(name, 0o755, &data)
    }

    /// Adds the tree under `dir` as `prefix/...`: directories, regular files
    /// and symlinks. Device nodes are skipped: the guest mounts devtmpfs.
    /// Adds `dir` and its contents at the same absolute path in the guest,
    /// with every parent directory.
    fn add_at_build_path(&mut self, dir: &Path) -> Result<(), String> {
        let guest_path = dir.to_string_lossy().trim_start_matches('/').to_owned();
        let mut parent = String::new();
        for part in guest_path.split('/') {
            parent = if parent.is_empty() {
                part.to_owned()
            } else {
                format!("{parent}/{part}")
            };
            self.dir(&parent)?;
        }
        self.add_tree(dir, &guest_path)
    }

    fn add_tree(&mut self, dir: &Path, prefix: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let name = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let meta =
                fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let perm = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).map_err(|e| format!("{e}"))?;
                self.entry(
                    &name,
                    0o120000 | 0o777,
                    target.as_os_str().as_encoded_bytes(),
                )?;
            } else if meta.is_dir() {
                self.entry(&name, 0o040000 | perm, &[])?;
                if !matches!(name.as_str(), "dev" | "proc" | "sys") {
                    self.add_tree(&path, &name)?;
                }
            } else if meta.is_file() {
                let data = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                self.file(&name, perm, &data)?;
            }
        }
        Ok(())
    }

    /// The trailer, padded to 512 bytes so a next archive can follow.
    fn finish(mut self) -> Result<(), String> {
        self.entry("TRAILER!!!", 0, &[])?;
        self.pad(512)?;
        self.out
            .flush()
            .map_err(|e| format!("writing an initramfs: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::{kernel, update_readme, Row};
    use std::time::Duration;

    /// What a 6.1 guest wrote (abridged), and a 5.10 one.
    const GUEST_6_1: &str = "kernel 6.1.0-50-cloud-amd64\n\
        probe loads=yes\nprobe places=yes\nprobe foreign=reset\nprobe wakeup=yes\n\
        binary steering\n\nrunning 2 tests\n\
        test ipv6_listeners_place_by_sid_too ... ok\n\
        test random_uses_every_worker ... FAILED\n\
        binary-exit 101\nguest done\n";
    const GUEST_5_10: &str = "kernel 5.10.0-32-cloud-amd64\n\
        probe loads=no\nprobe exit=1\nprobe error_lines=1\n\
        probe error=sticky: error: kernel 5.10.0-32-cloud-amd64 is too old: sticky needs Linux 5.14 or newer\n\
        guest done\n";

    #[test]
    fn guest_output_becomes_a_row() {
        let row = Row::from_guest(kernel("6.1").unwrap(), GUEST_6_1, Duration::ZERO);
        assert_eq!(row.kernel, "6.1.0-50-cloud-amd64");
        assert_eq!(
            (row.loads, row.places, row.wakeup),
            (Some(true), Some(true), Some(true))
        );
        assert_eq!(
            (row.passed, row.failed.as_slice()),
            (1, &["random_uses_every_worker".to_owned()][..])
        );
        assert!(!row.as_expected(), "a failed test fails the row");

        let mut quick = Row::from_guest(kernel("6.1").unwrap(), GUEST_6_1, Duration::ZERO);
        quick.subset = vec!["steering".into()];
        assert!(quick.cells().contains("(only steering)"));
        assert!(quick.cells().contains("| reset (SOCK_DESTROY) |"));

        let old = Row::from_guest(kernel("5.10").unwrap(), GUEST_5_10, Duration::ZERO);
        assert!(
            old.as_expected(),
            "5.10 refusing in one line is what is required"
        );
        assert!(old.cells().contains("refuses (as required)"));
        let silent = Row::from_guest(
            kernel("5.10").unwrap(),
            "kernel 5.10.0\nprobe loads=no\n",
            Duration::ZERO,
        );
        assert!(!silent.as_expected(), "a refusal must say why");
    }

    #[test]
    fn the_readme_keeps_rows_of_kernels_not_run() {
        let dir = std::env::temp_dir().join(format!("xtask-kernels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        let old_row =
            "| 6.12.117+deb13-cloud-amd64 | Debian 13 | yes | yes | yes | 40 passed, 0 failed |";
        let stale = "| 6.1.0-40-cloud-amd64 | Debian 12 | no | no | no | old |";
        std::fs::write(
            &readme,
            format!(
                "# x\n<!-- kernels:begin -->\n{old_row}\n{stale}\n<!-- kernels:end -->\nrest\n"
            ),
        )
        .unwrap();
        let row = Row::from_guest(kernel("6.1").unwrap(), GUEST_6_1, Duration::ZERO);
        update_readme(&readme, &[row]).unwrap();
        let text = std::fs::read_to_string(&readme).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.contains(old_row), "{text}");
        assert!(!text.contains(stale), "{text}");
        assert!(text.contains("| 6.1.0-50-cloud-amd64 |"), "{text}");
        assert!(
            text.find("6.12.117").unwrap() < text.find("6.1.0-50").unwrap(),
            "newest first"
        );
        assert!(text.ends_with("<!-- kernels:end -->\nrest\n"), "{text}");
    }
}
