//! Compiles the kernel programs with clang into one BPF object in OUT_DIR.
//!
//! clang (19 or newer works; Debian: `apt-get install clang-19 libbpf-dev`)
//! and libbpf's headers are build prerequisites. `CLANG` overrides the
//! compiler to use.

use std::{env, path::PathBuf, process::Command};

const SOURCES: &[&str] = &["src/steer.bpf.c", "src/reqsk.bpf.c"];
const HEADERS: &[&str] = &[
    "include/sticky.h",
    "src/parse.h",
    "src/siphash.h",
    "src/foreign.h",
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let clang = env::var("CLANG").unwrap_or_else(|_| find_clang());
    for path in SOURCES.iter().chain(HEADERS) {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");

    let multiarch = format!("/usr/include/{}-linux-gnu", env::consts::ARCH);
    for src in SOURCES {
        let name = PathBuf::from(src).file_stem().unwrap().to_owned(); // "steer.bpf"
        let obj = out.join(name).with_extension("o"); // steer.bpf -> steer.o
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__BPF__"])
            .args(["-Wall", "-Werror", "-Iinclude", "-Isrc"])
            .arg(format!("-I{multiarch}"))
            .args(["-c", src, "-o"])
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `{clang}` ({e}): the kernel programs are C built with clang. \
                     Install it (Debian/Ubuntu: `apt-get install clang-19 libbpf-dev`) \
                     or point CLANG at a clang binary."
                )
            });
        assert!(status.success(), "`{clang}` failed to compile {src}");
    }
}

/// Prefers a versioned clang (Debian installs `clang-19` without `clang`).
fn find_clang() -> String {
    for candidate in ["clang", "clang-21", "clang-20", "clang-19", "clang-18"] {
        let found = Command::new(candidate)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return candidate.to_owned();
        }
    }
    "clang".to_owned()
}
