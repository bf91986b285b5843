//! `cargo xtask fuzz [--seconds N] [-- LIBFUZZER_ARGS]`: fuzzes the kernel's
//! request parser (`sticky-ebpf/src/parse.h`) with libFuzzer.
//!
//! The same C source is compiled for the host with clang
//! (`-fsanitize=fuzzer,address,undefined`) together with `fuzz/parse_target.c`,
//! which checks every input against the Rust reference model in `sticky-fuzz`
//! (linked as a static library). The run starts from the committed corpus
//! (`fuzz/corpus/`, crash inputs kept there as regressions) and grows
//! `target/fuzz/corpus/`; that corpus is then run through the loaded kernel
//! program (BPF_PROG_TEST_RUN, needs root) by `sticky-ebpf`'s parser test,
//! so the kernel build is checked against the same model.
//!
//! `cargo xtask test` runs it for `CI_SECONDS`, or skips it with one line
//! when clang's libFuzzer runtime is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cargo, root_dir, status, Tally};

/// The bounded run inside `cargo xtask test`.
const CI_SECONDS: u64 = 20;
/// Inputs longer than this add nothing: the parser reads 1 KiB.
const MAX_LEN: &str = "1100";

pub fn fuzz(args: &[String]) -> Result<(), String> {
    let (seconds, extra) = match args {
        [flag, n, rest @ ..] if flag == "--seconds" => (
            n.parse()
                .map_err(|_| format!("--seconds wants a number, not {n:?}"))?,
            rest,
        ),
        rest => (60, rest),
    };
    let extra = crate::extra(extra);
    let clang = clang();
    let runtime = fuzzer_runtime(&clang).ok_or_else(|| missing_runtime(&clang))?;
    eprintln!("fuzz: libFuzzer runtime {}", runtime.display());
    let target = build(&clang)?;
    run(&target, seconds, extra)?;
    replay_in_kernel()
}

/// `cargo xtask test`'s bounded run: one skipped test without the runtime.
pub fn in_test_run(tally: &mut Tally) -> Result<(), String> {
    let clang = clang();
    if fuzzer_runtime(&clang).is_none() {
        println!("fuzz: skipped: {}", missing_runtime(&clang));
        tally.skipped += 1;
        return Ok(());
    }
    let result = build(&clang)
        .and_then(|target| run(&target, CI_SECONDS, &[]))
        .and_then(|()| replay_in_kernel());
    match result {
        Ok(()) => tally.passed += 1,
        Err(_) => tally.failed += 1,
    }
    result
}

fn missing_runtime(clang: &str) -> String {
    format!(
        "clang's libFuzzer runtime is not installed for `{clang}` \
         (Debian: apt-get install libclang-rt-19-dev)"
    )
}

/// The clang that builds the kernel programs (see sticky-ebpf/build.rs).
fn clang() -> String {
    if let Ok(c) = std::env::var("CLANG") {
        return c;
    }
    ["clang", "clang-21", "clang-20", "clang-19", "clang-18"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap_or("clang")
        .to_owned()
}

/// libclang_rt.fuzzer for this clang, if installed: in the per-target
/// runtime directory, or (older layout, Debian's clang-19) as
/// `lib/linux/libclang_rt.fuzzer-<arch>.a`.
fn fuzzer_runtime(clang: &str) -> Option<PathBuf> {
    let ask = |flag: &str| {
        let out = Command::new(clang).arg(flag).output().ok()?;
        Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let arch = std::env::consts::ARCH;
    [
        ask("-print-runtime-dir").map(|dir| dir.join("libclang_rt.fuzzer.a")),
        ask(&format!("-print-file-name=libclang_rt.fuzzer-{arch}.a")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_absolute() && p.exists())
}

/// Builds the reference model as a static library, then the harness.
fn build(clang: &str) -> Result<PathBuf, String> {
    let mut cmd = cargo();
    cmd.args(["rustc", "--quiet", "-p", "sticky-fuzz", "--lib"])
        .args(["--crate-type", "staticlib"]);
    status(cmd, "building the reference parser (sticky-fuzz)")?;
    let root = root_dir();
    let out = root.join("target/fuzz");
    std::fs::create_dir_all(out.join("corpus"))
        .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let target = out.join("parse_target");
    let mut cc = Command::new(clang);
    cc.current_dir(&root)
        .args(["-g", "-O1", "-fsanitize=fuzzer,address,undefined"])
        .args(["-fno-sanitize-recover=all", "-Wall", "-Werror"])
        .args(["-Isticky-ebpf/include", "-Isticky-ebpf/src"])
        .arg("fuzz/parse_target.c")
        .arg(root.join("target/debug/libsticky_fuzz.a"))
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&target);
    status(cc, "compiling the libFuzzer harness")?;
    Ok(target)
}

fn run(target: &Path, seconds: u64, extra: &[String]) -> Result<(), String> {
    let root = root_dir();
    let out = root.join("target/fuzz");
    eprintln!("fuzz: parse.h against the reference model for {seconds} s");
    let mut cmd = Command::new(target);
    cmd.current_dir(&root)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg(format!("-artifact_prefix={}/", out.display()))
        .arg("-print_final_stats=1")
        .args(extra)
        .arg(out.join("corpus"))
        .arg(root.join("fuzz/corpus"));
    let result = status(cmd, "the fuzzer");
    if result.is_err() {
        return Err(
            "the fuzzer found an input that crashes parse.h or makes it disagree with \
             the reference: see target/fuzz/crash-*; fix it, and keep the input in \
             fuzz/corpus/ as a regression"
                .into(),
        );
    }
    let found = std::fs::read_dir(out.join("corpus")).map_or(0, |d| d.count());
    println!("fuzz: no disagreement in {seconds} s; target/fuzz/corpus holds {found} inputs");
    Ok(())
}

/// The found corpus through the loaded kernel program.
fn replay_in_kernel() -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args(["test", "--quiet", "-p", "sticky-ebpf", "--test", "parser"])
        .args(["fuzz_corpus", "--", "--nocapture"])
        .env("STICKY_FUZZ_CORPUS", root_dir().join("target/fuzz/corpus"));
    status(cmd, "replaying the fuzz corpus in the kernel (needs root)")
}
