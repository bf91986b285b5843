//! Compiles the fair-floor worker (`workers/fair_worker.c`), a C program
//! the `core` benchmark runs behind every placement mode, into OUT_DIR;
//! its path reaches the bench as `STICKY_FAIR_WORKER`. `CC` picks the
//! compiler (default `cc`; clang works too).

use std::{env, path::PathBuf, process::Command};

const SOURCE: &str = "workers/fair_worker.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CC");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("sticky-fair-worker");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&out)
        .arg(SOURCE)
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{cc}` ({e}) to build {SOURCE}: install a C compiler (clang or gcc) or set CC"));
    assert!(status.success(), "`{cc}` failed to compile {SOURCE}");
    println!("cargo:rustc-env=STICKY_FAIR_WORKER={}", out.display());
}
