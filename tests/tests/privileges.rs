//! Least privilege (README "Least privilege"): workers under `--user nobody
//! --group nogroup` run with that identity, no capabilities and
//! no_new_privs, their replacements after a crash too; placement and
//! learning still work for them; a worker cannot reach the supervisor's
//! descriptors nor another worker's sessions; the supervisor keeps only the
//! capabilities the README lists; a non-root sticky given just CAP_BPF,
//! CAP_NET_ADMIN and CAP_PERFMON (as systemd's AmbientCapabilities would)
//! works.

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::{MetadataExt, PermissionsExt},
    process::{Command, Stdio},
    time::Duration,
};

use sticky_tests::{
    assert_one_line, demo_worker_bin, python3_bin, random_sid, reachable_by_others, run_sticky,
    setpriv_missing, sticky_bin, Cluster, TempDir,
};

const NOBODY: u32 = 65534;
const USER: &[&str] = &["--user", "nobody", "--group", "nogroup"];

/// capability.h numbers of the capabilities the README names.
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_NICE: u32 = 23;
const CAP_BPF: u32 = 39;

/// What workers running as nobody exec: this build's, or copies it can
/// reach (a repository under a private home directory).
struct ForNobody {
    dir: TempDir,
}

impl ForNobody {
    fn new() -> ForNobody {
        ForNobody {
            dir: TempDir::new(),
        }
    }

    fn demo_worker(&self) -> String {
        let path = reachable_by_others(&demo_worker_bin(), &self.dir);
        path.to_str().unwrap().to_owned()
    }

    fn script(&self, name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("workers")
            .join(name);
        reachable_by_others(&path, &self.dir)
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// The scripts use only the standard library: the system interpreter
    /// does when the project's is out of nobody's reach.
    fn python(&self) -> String {
        let python = python3_bin();
        let copy = reachable_by_others(&python, &self.dir);
        if copy == python {
            python.to_str().unwrap().to_owned()
        } else {
            "/usr/bin/python3".to_owned()
        }
    }

    fn cluster(&self, workers: usize, extra: &[&str]) -> Cluster {
        let args = [USER, extra].concat();
        Cluster::start_with("127.0.0.1:0", workers, &args, &[&self.demo_worker()])
    }
}

fn status(path: &str) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// A thread's status fields; empty if it has ended.
fn status_of_task(task: &std::path::Path) -> HashMap<String, String> {
    std::fs::read_to_string(task.join("status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn caps(status: &HashMap<String, String>, set: &str) -> u64 {
    u64::from_str_radix(&status[set], 16).unwrap()
}

fn bits(mask: u64) -> BTreeSet<u32> {
    (0..64).filter(|b| mask & (1 << b) != 0).collect()
}

/// The groups `initgroups("nobody", nogroup)` sets, per the group database.
fn nobody_groups() -> BTreeSet<u32> {
    let out = Command::new("id").args(["-G", "nobody"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect()
}

/// Checks everything a worker process must be under `--user nobody`.
fn assert_unprivileged(pid: u32) {
    let s = status(&format!("/proc/{pid}/status"));
    println!(
        "worker pid {pid}: Uid {} | Gid {} | Groups {} | CapInh {} CapPrm {} CapEff {} CapBnd {} CapAmb {} | NoNewPrivs {}",
        s["Uid"], s["Gid"], s["Groups"], s["CapInh"], s["CapPrm"], s["CapEff"], s["CapBnd"], s["CapAmb"], s["NoNewPrivs"]
    );
    for ids in ["Uid", "Gid"] {
        let all: Vec<u32> = s[ids]
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(all, vec![NOBODY; 4], "{ids} of {pid}");
    }
    let groups: BTreeSet<u32> = s["Groups"]
        .split_whitespace()
        .map(|g| g.parse().unwrap())
        .collect();
    assert_eq!(groups, nobody_groups(), "supplementary groups of {pid}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(caps(&s, set), 0, "{set} of {pid}");
    }
    assert_eq!(s["NoNewPrivs"], "1", "no_new_privs of {pid}");
}

fn worker_pids(cluster: &Cluster, workers: usize) -> Vec<u32> {
    cluster.wait_for("every worker up", Duration::from_secs(20), |c| {
        (0..workers).all(|i| c.worker_pid(i).is_some())
    });
    (0..workers)
        .map(|i| cluster.worker_pid(i).unwrap())
        .collect()
}

#[test]
fn workers_run_as_nobody_with_nothing_even_after_a_crash() {
    let nobody = ForNobody::new();
    let cluster = nobody.cluster(2, &[]);
    let pids = worker_pids(&cluster, 2);
    for &pid in &pids {
        assert_unprivileged(pid);
    }
    // The control socket: the workers' group, nobody else but root.
    let meta = std::fs::metadata(&cluster.control).unwrap();
    println!(
        "control socket: mode {:o}, uid {} gid {}",
        meta.mode() & 0o777,
        meta.uid(),
        meta.gid()
    );
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o660, 0, NOBODY)
    );

    // Another unprivileged user cannot even connect.
    if !setpriv_missing() {
        let out = Command::new("setpriv")
            .args(["--reuid=12345", "--regid=12345", "--clear-groups", "--"])
            .args(["/usr/bin/python3", "-c"])
            .arg("import socket,sys\ntry:\n socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('connected')\nexcept OSError as e: print(type(e).__name__)")
            .arg(&cluster.control)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!("uid 12345 connecting to the control socket: {said}");
        assert_eq!(said, "PermissionError");
    }

    // Registration over the control socket, from workers running as nobody.
    let sessions = cluster.sessions_on_every_worker(2, 2);
    let placed = |c: &Cluster| {
        sessions
            .iter()
            .flat_map(|(sid, owner)| (0..5).map(move |_| (sid, owner)))
            .filter(|(sid, owner)| c.get(&format!("/?sid={sid}")).worker == Some(**owner))
            .count()
    };
    let on_owner = placed(&cluster);
    println!(
        "as nobody: {on_owner}/{} sid requests on their owner",
        sessions.len() * 5
    );
    assert_eq!(on_owner, sessions.len() * 5);

    // A crash: the replacement is just as unprivileged.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    cluster.wait_for("worker 0 replaced", Duration::from_secs(10), |c| {
        c.worker_pid(0).is_some_and(|p| p != pids[0])
    });
    let replacement = cluster.worker_pid(0).unwrap();
    println!(
        "worker 0 (pid {}) killed, replaced by pid {replacement}",
        pids[0]
    );
    assert_unprivileged(replacement);
    assert!(cluster.counter("restarts") >= 1);
}

#[test]
fn the_supervisor_keeps_only_what_the_readme_lists() {
    let nobody = ForNobody::new();
    let cluster = nobody.cluster(1, &[]);
    worker_pids(&cluster, 1);
    let log = cluster.log.lock().unwrap().clone();
    // CAP_BPF stays only where the kernel checks bpf() itself (before 6.5):
    // sticky measures that at start and says so.
    let bpf_kept = log.contains("CAP_BPF (");
    let mut expected: BTreeSet<u32> =
        [CAP_NET_ADMIN, CAP_SETUID, CAP_SETGID, CAP_SETPCAP, CAP_KILL].into();
    if bpf_kept {
        expected.insert(CAP_BPF);
    }
    // Short-lived threads (one per control connection) may end meanwhile:
    // only those still there are read.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", cluster.pid()))
        .unwrap()
        .map(|t| t.unwrap().path())
        .filter(|t| !status_of_task(t).is_empty())
        .collect();
    for task in &tasks {
        let s = status_of_task(task);
        if s.is_empty() {
            continue;
        }
        let (eff, prm, bnd) = (caps(&s, "CapEff"), caps(&s, "CapPrm"), caps(&s, "CapBnd"));
        println!(
            "supervisor thread {} ({}): CapEff {eff:016x} CapPrm {prm:016x} CapBnd {bnd:016x} CapAmb {}",
            task.file_name().unwrap().to_string_lossy(),
            s["Name"],
            s["CapAmb"]
        );
        assert_eq!(bits(eff), expected, "effective set of {}", s["Name"]);
        assert_eq!(bits(prm), expected, "permitted set of {}", s["Name"]);
        assert_eq!(bits(bnd), expected, "bounding set of {}", s["Name"]);
        assert_eq!(caps(&s, "CapAmb"), 0);
        for gone in [CAP_SYS_ADMIN, CAP_DAC_OVERRIDE, CAP_SYS_PTRACE] {
            assert!(eff & (1 << gone) == 0);
        }
    }
    println!(
        "{} threads, each with {expected:?} (CAP_BPF kept: {bpf_kept})",
        tasks.len()
    );
    assert!(
        tasks.len() > 3,
        "the sorters, control and signal threads too"
    );
    // The sorting threads still run SCHED_FIFO (inherited), the others not.
    let own = status("/proc/self/status");
    if caps(&own, "CapEff") & (1 << CAP_SYS_NICE) != 0 {
        for task in &tasks {
            let Some(name) = status_of_task(task).get("Name").cloned() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("{}/stat", task.display())) else {
                continue;
            };
            // Field 41 (policy), counted after the parenthesised name.
            let policy: u32 = stat[stat.rfind(')').unwrap() + 2..]
                .split(' ')
                .nth(41 - 3)
                .unwrap()
                .parse()
                .unwrap();
            println!("thread {name}: scheduling policy {policy}");
            let fifo = u32::from(name.starts_with("sorter-"));
            assert_eq!(policy, fifo, "scheduling policy of {name}");
        }
    }

    // Without --user: only what serving itself needs.
    let plain = Cluster::start(1, &[]);
    let s = status(&format!("/proc/{}/status", plain.pid()));
    let mut plain_expected: BTreeSet<u32> = [CAP_NET_ADMIN].into();
    if bpf_kept {
        plain_expected.insert(CAP_BPF);
    }
    println!("without --user: CapEff {}", s["CapEff"]);
    assert_eq!(bits(caps(&s, "CapEff")), plain_expected);
}

#[test]
fn a_worker_cannot_reach_the_supervisor_or_another_workers_sessions() {
    let nobody = ForNobody::new();
    let (python, script) = (nobody.python(), nobody.script("probe_worker.py"));
    // Numeric ids this time.
    let args = [
        "--user",
        "65534",
        "--group",
        "65534",
        "--balance",
        "round-robin",
    ];
    let cluster = Cluster::start_with("127.0.0.1:0", 2, &args, &[&python, &script]);
    worker_pids(&cluster, 2)
        .into_iter()
        .for_each(assert_unprivileged);
    cluster.wait_for("both probe workers answer", Duration::from_secs(20), |c| {
        let seen: BTreeSet<Option<usize>> = (0..4).map(|_| c.get("/").worker).collect();
        seen.contains(&Some(0)) && seen.contains(&Some(1))
    });
    // One session per worker.
    let mut owned: HashMap<usize, String> = HashMap::new();
    while owned.len() < 2 {
        let sid = random_sid(20);
        let r = cluster.get(&format!("/register?sid={sid}"));
        assert_eq!(r.text(), "control=ok\n");
        owned.entry(r.worker.unwrap()).or_insert(sid);
    }
    let sup = cluster.pid();
    let r = cluster.get(&format!(
        "/probe?sid={}&victim={}&sup={sup}",
        owned[&0], owned[&1]
    ));
    assert_eq!(r.worker, Some(0));
    let probe: HashMap<String, String> = r
        .text()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    println!(
        "worker 0 (as nobody) against the supervisor (pid {sup}) and worker 1's session: {probe:?}"
    );
    for what in ["list_fds", "open_fd", "pidfd_getfd", "environ"] {
        assert!(
            probe[what].starts_with("refused: E"),
            "{what}: {}",
            probe[what]
        );
    }
    assert_eq!(probe["close_other"], "err sid owned by another worker");
    assert_eq!(probe["open_own"], "ok");
    // Worker 1's session is intact.
    let r = cluster.get(&format!("/?sid={}", owned[&1]));
    assert_eq!(r.worker, Some(1));
}

#[test]
fn learning_works_for_workers_run_as_nobody() {
    let nobody = ForNobody::new();
    let (python, script) = (nobody.python(), nobody.script("engine_io_polling.py"));
    let args = [USER, &["--balance", "round-robin"]].concat();
    let cluster = Cluster::start_with("127.0.0.1:0", 3, &args, &[&python, &script]);
    worker_pids(&cluster, 3)
        .into_iter()
        .for_each(assert_unprivileged);
    let unknown = cluster.refused_polls(20, 5);
    println!(
        "as nobody: 20 learned sessions x 5 requests, {unknown} unknown; learned={}",
        cluster.counter("learned")
    );
    assert_eq!(unknown, 0);
    assert!(cluster.counter("learned") >= 20);
}

#[test]
fn an_unknown_user_is_one_clear_line() {
    let ran = run_sticky(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--user",
            "no-such-user-xyz",
            "--",
            "/bin/true",
        ],
        Duration::from_secs(10),
    );
    assert_one_line(
        "--user no-such-user-xyz",
        &ran,
        &["no such user `no-such-user-xyz`"],
    );
}

#[test]
fn non_root_with_just_bpf_net_admin_and_perfmon_works() {
    if setpriv_missing() {
        return;
    }
    // A directory nobody may create its control socket in.
    let dir = TempDir::new();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let control = dir.0.join("control.sock");
    let caps = "+bpf,+net_admin,+perfmon";
    let nobody = ForNobody::new();
    let sticky_copy = reachable_by_others(&sticky_bin(), &nobody.dir);
    let mut sticky = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg("--")
        .arg(&sticky_copy)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--control",
        ])
        .arg(&control)
        .arg("--")
        .arg(nobody.demo_worker())
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = sticky.stderr.take().unwrap();
    let sticky = StopOnDrop(sticky);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            println!("{line}");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let _ = tx.send(rest.split(' ').next().unwrap_or("").to_owned());
            }
        }
    });
    let addr: std::net::SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("non-root sticky did not start")
        .parse()
        .unwrap();
    let s = status(&format!("/proc/{}/status", sticky.0.id()));
    println!(
        "sticky as uid {} given ambient {caps}: serving with CapEff {}",
        s["Uid"], s["CapEff"]
    );
    assert!(s["Uid"].starts_with("65534"));
    // Registration and placement, as the demo workers do them.
    let mut owners: HashMap<String, usize> = HashMap::new();
    for _ in 0..6 {
        let sid = random_sid(20);
        let r = sticky_tests::request(addr, "GET", &format!("/register?sid={sid}"), b"");
        assert_eq!(r.status, 200, "{}", r.text());
        owners.insert(sid, r.worker.unwrap());
    }
    let on_owner = owners
        .iter()
        .filter(|(sid, owner)| {
            sticky_tests::request(addr, "GET", &format!("/?sid={sid}"), b"").worker == Some(**owner)
        })
        .count();
    println!(
        "non-root sticky: {on_owner}/{} sid requests on their owner",
        owners.len()
    );
    assert_eq!(on_owner, owners.len());
}

/// Stops sticky on drop: SIGTERM (it stops its workers), then reaps it.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
