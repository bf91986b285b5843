//! The systemd unit in `deploy/sticky.service`: `systemd-analyze verify`
//! accepts it without a warning (where systemd is installed), and sticky
//! starts and serves within its `CapabilityBoundingSet` and
//! `NoNewPrivileges` (applied here with setpriv, as systemd would).

use std::{collections::BTreeSet, process::Command, time::Duration};

use sticky_tests::{
    demo_worker_bin, reachable_by_others, setpriv_missing, sticky_bin, Cluster, TempDir,
};

const UNIT: &str = include_str!("../../deploy/sticky.service");

/// The unit, with its example paths replaced by this build's binaries (the
/// verifier checks that ExecStart's program exists).
fn unit_for_this_build() -> String {
    UNIT.replace("/usr/local/bin/sticky", sticky_bin().to_str().unwrap())
        .replace(
            "/usr/bin/node /srv/app/worker.js",
            demo_worker_bin().to_str().unwrap(),
        )
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("systemd-analyze not installed (Debian: apt-get install systemd): skipped");
        return;
    }
    let dir = TempDir::new();
    let path = dir.0.join("sticky.service");
    std::fs::write(&path, unit_for_this_build()).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "systemd-analyze verify deploy/sticky.service: {} {stderr:?}",
        out.status
    );
    assert!(out.status.success());
    // verify only warns (exit 0) about unknown keys or bad values.
    assert_eq!(stderr.trim(), "", "warnings about the unit");
}

/// The unit's `CapabilityBoundingSet`, as setpriv names (`bpf`, `net_admin`).
fn unit_bounding_set() -> Vec<String> {
    UNIT.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| c.strip_prefix("CAP_").unwrap().to_ascii_lowercase())
        .collect()
}

#[test]
fn sticky_serves_within_the_units_bounding_set() {
    if setpriv_missing() {
        return;
    }
    assert!(UNIT.contains("\nNoNewPrivileges=yes\n"));
    let allowed = unit_bounding_set();
    let bounding = format!(
        "--bounding-set=-all,{}",
        allowed
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    // Workers run as nobody: the demo worker must be within its reach.
    let dir = TempDir::new();
    let worker = reachable_by_others(&demo_worker_bin(), &dir);
    let cluster = Cluster::start_custom(
        "127.0.0.1:0",
        2,
        &["--user", "nobody", "--group", "nogroup"],
        &[worker.to_str().unwrap()],
        |cmd| {
            let program = cmd.get_program().to_owned();
            *cmd = Command::new("setpriv");
            cmd.args(["--no-new-privs", &bounding, "--"]).arg(program);
        },
    );
    cluster.wait_for("both workers", Duration::from_secs(20), |c| {
        c.worker_pid(0).is_some() && c.worker_pid(1).is_some()
    });
    let sessions = cluster.sessions_on_every_worker(2, 2);
    let on_owner = sessions
        .iter()
        .filter(|(sid, owner)| cluster.get(&format!("/?sid={sid}")).worker == Some(*owner))
        .count();
    let status = std::fs::read_to_string(format!("/proc/{}/status", cluster.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    println!(
        "under the unit's bounding set ({}) and no_new_privs: {on_owner}/{} on their owner; sticky CapBnd {} NoNewPrivs {}",
        allowed.join(" "),
        sessions.len(),
        field("CapBnd:"),
        field("NoNewPrivs:")
    );
    assert_eq!(on_owner, sessions.len());
    assert_eq!(field("NoNewPrivs:"), "1");
    // Whatever sticky keeps is within the unit's set.
    let names = [
        ("bpf", 39),
        ("perfmon", 38),
        ("net_admin", 12),
        ("net_bind_service", 10),
        ("sys_admin", 21),
        ("sys_ptrace", 19),
        ("sys_nice", 23),
        ("chown", 0),
        ("setuid", 7),
        ("setgid", 6),
        ("setpcap", 8),
        ("kill", 5),
    ];
    let unit_mask: u64 = allowed
        .iter()
        .map(|c| {
            names
                .iter()
                .find(|(n, _)| n == c)
                .unwrap_or_else(|| panic!("unknown {c}"))
                .1
        })
        .fold(0, |m, b| m | 1 << b);
    let kept = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    let outside: BTreeSet<u32> = (0..64)
        .filter(|b| kept & !unit_mask & (1 << b) != 0)
        .collect();
    assert!(
        outside.is_empty(),
        "sticky holds capabilities outside the unit's set: {outside:?}"
    );

    // The sorting threads got their real-time policy within the unit's set.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", cluster.pid())).unwrap();
    let mut sorters = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sorter-") {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
        let policy = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .nth(41 - 3)
            .unwrap()
            .to_owned();
        println!("{}: scheduling policy {policy}", comm.trim());
        assert_eq!(policy, "1", "{} runs SCHED_FIFO", comm.trim());
        sorters += 1;
    }
    assert!(sorters > 0);
}
