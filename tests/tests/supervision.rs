//! Supervision, end to end: workers that crash, get killed or are stopped,
//! socket activation as a worker sees it, shutdown, and startup errors.
//! Real `sticky run`, real processes, real sockets, real kernel programs.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use sticky_tests::{
    assert_one_line, demo_worker_bin, proc_state, process_exists, read_response, request,
    run_sticky, run_to_end, setpriv_missing, signal, sticky_bin, Cluster, Ran, TempDir,
};

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// "200ms", "1.6s", "3.2s" (Duration's Debug format) as milliseconds.
fn debug_duration_ms(s: &str) -> f64 {
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse().unwrap()
    } else if let Some(us) = s.strip_suffix("µs") {
        us.parse::<f64>().unwrap() / 1000.0
    } else {
        s.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0
    }
}

/// Per worker index, the delays of its "restarting in ..." log lines.
fn restart_delays(log: &str) -> BTreeMap<usize, Vec<f64>> {
    let mut delays: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for line in log.lines() {
        let (Some(rest), Some(delay)) = (
            line.strip_prefix("sticky: worker "),
            line.split("; restarting in ").nth(1),
        ) else {
            continue;
        };
        let index = rest.split(' ').next().unwrap().parse().unwrap();
        delays
            .entry(index)
            .or_default()
            .push(debug_duration_ms(delay.trim()));
    }
    delays
}

#[test]
fn no_live_worker_gets_503() {
    let dir = TempDir::new();
    // A script rather than `sh -c`: once it is removed, restarts fail at
    // exec, so no worker can come alive between our check and our SYN.
    let script = dir.0.join("crash.sh");
    write_executable(&script, "#!/bin/sh\nexit 3\n");
    let cluster = Cluster::start_with("127.0.0.1:0", 2, &[], &[script.to_str().unwrap()]);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let log = cluster.log.lock().unwrap().clone();
    let delays = restart_delays(&log);
    println!(
        "restart delays (ms) over {:.1?}: {delays:?}",
        started.elapsed()
    );
    assert!(
        log.contains("exited with status 3"),
        "the log should give the exit status:\n{log}"
    );
    for w in 0..2 {
        let d = delays.get(&w).map(Vec::as_slice).unwrap_or(&[]);
        assert!(
            d.len() >= 2,
            "worker {w} should have been restarted at least twice in 3 s: {d:?}"
        );
        assert!(
            d.len() < 15,
            "worker {w} restarted {} times in 3 s: no backoff?",
            d.len()
        );
        assert!(
            d.windows(2).all(|p| p[1] >= p[0]) && d.last() > d.first(),
            "worker {w}'s restart delay should grow: {d:?}"
        );
    }

    std::fs::remove_file(&script).unwrap();
    cluster.wait_for("no live worker", Duration::from_secs(5), |c| {
        c.counter("live_workers") == 0
    });
    for n in 0..5 {
        let mut s = TcpStream::connect(cluster.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET /?n={n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        // No `Connection: close` sent: the server must close by itself.
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .expect("the 503 connection should end with EOF");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with("HTTP/1.1 503 "),
            "expected a 503, got {text:?}"
        );
        assert!(text.contains("no worker available"), "{text:?}");
    }
    println!("5/5 connections answered 503 and closed");
    assert_eq!(cluster.counter("live_workers"), 0);
}

#[test]
fn killed_worker_is_restarted_and_its_queued_connections_served() {
    let cluster = Cluster::start(2, &[]);
    let (sid, _) = cluster
        .sessions_on_every_worker(2, 1)
        .into_iter()
        .find(|(_, w)| *w == 1)
        .unwrap();
    let old = cluster.worker_pid(1).unwrap();
    signal(old, libc::SIGSTOP);
    let start = Instant::now();
    while proc_state(old) != Some('T') {
        assert!(start.elapsed() < Duration::from_secs(5), "SIGSTOP ignored");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = cluster.stats();
    let n = 20;
    let streams: Vec<TcpStream> = (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(cluster.addr).unwrap();
            s.set_nodelay(true).unwrap();
            // One write: the sid must be in the first segment.
            let req =
                format!("GET /?sid={sid}&n={i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).unwrap();
            s
        })
        .collect();
    // They are placed (by sid) on the stopped worker's listener, and wait in
    // its accept queue.
    let deltas = |c: &Cluster| {
        let s = c.stats();
        let d = |k: &str| s[k].parse::<u64>().unwrap() - before[k].parse::<u64>().unwrap();
        (d("by_sid"), d("placed_queue") + d("placed_softirq"))
    };
    let waiting = Instant::now();
    while deltas(&cluster) < (n as u64, n as u64) {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "(by_sid, placed) after 5 s: {:?}\n{:?}",
            deltas(&cluster),
            cluster.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(old, libc::SIGKILL);
    let killed = Instant::now();
    let responses: Vec<_> = streams.into_iter().map(read_response).collect();
    let served_after = killed.elapsed();
    let new = cluster.worker_pid(1).expect("worker 1 restarted");
    let mut pids = HashMap::new();
    for r in &responses {
        assert_eq!((r.status, r.worker), (200, Some(1)), "{}", r.text());
        *pids.entry(r.pid.unwrap()).or_insert(0) += 1;
    }
    println!(
        "{n} queued connections served {served_after:.1?} after SIGKILL; old pid {old}, \
         new pid {new}, answered by {pids:?}"
    );
    assert_ne!(new, old);
    assert_eq!(pids.len(), 1, "answered by several pids: {pids:?}");
    assert_eq!(pids.get(&new), Some(&n), "not answered by the replacement");
    let log = cluster.log.lock().unwrap().clone();
    assert!(
        log.contains(&format!("worker 1 (pid {old}) was killed by SIGKILL")),
        "{log}"
    );

    // The dead worker's sessions are forgotten: its sid is balanced now.
    let stats = cluster.stats();
    assert!(
        stats["worker1"].starts_with(&format!("pid:{new},sessions:0,learned:0,")),
        "{stats:?}"
    );
    let unknown = cluster.counter("sid_unknown");
    let r = cluster.get(&format!("/?sid={sid}"));
    assert_eq!(r.status, 200);
    let unknown_after = cluster.counter("sid_unknown");
    println!("sid_unknown {unknown} -> {unknown_after}");
    assert_eq!(unknown_after, unknown + 1);
}

/// What an activated worker reports (`Cluster::start_reporting`).
const ACTIVATION_SCRIPT: &str = r#"
import os, socket, fcntl

fds = live_fds()
s = socket.socket(fileno=3)
env = os.environ
lines = {
    "fds": ",".join(str(f) for f in fds),
    "pid": str(os.getpid()),
    "listen_fds": env.get("LISTEN_FDS", "-"),
    "listen_pid": env.get("LISTEN_PID", "-"),
    "listen_fdnames": env.get("LISTEN_FDNAMES", "-"),
    "sticky_worker": env.get("STICKY_WORKER", "-"),
    "sticky_control": env.get("STICKY_CONTROL", "-"),
    "acceptconn": str(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
    "type": str(int(s.type)),
    "port": str(s.getsockname()[1]),
    "inode": str(os.fstat(3).st_ino),
    "cloexec": str(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
}
write_report(lines)
"#;

/// Starts `workers` activation-script workers and collects their reports.
fn activation_reports(
    dir: &TempDir,
    workers: usize,
    configure: impl FnOnce(&mut Command),
) -> (Cluster, Vec<HashMap<String, String>>) {
    Cluster::start_reporting(dir, workers, &[], ACTIVATION_SCRIPT, configure)
}

/// For sticky's `Command`: start it with only fds 0-2, as a service
/// manager would (the test process itself may have inherited stray
/// descriptors from whatever runs the tests).
fn only_stdio(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range is async-signal-safe; CLOEXEC keeps std's own
    // exec-error pipe working.
    unsafe {
        cmd.pre_exec(|| {
            libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32);
            Ok(())
        });
    }
}

#[test]
fn socket_activation_environment_and_no_leaked_fds() {
    let dir = TempDir::new();
    let (cluster, reports) = activation_reports(&dir, 3, only_stdio);
    let mut inodes = Vec::new();
    for (w, r) in reports.iter().enumerate() {
        assert_eq!(
            r["fds"], "0,1,2,3",
            "worker {w} inherited other descriptors"
        );
        assert_eq!(r["listen_fds"], "1");
        assert_eq!(
            r["listen_pid"], r["pid"],
            "LISTEN_PID is not the worker's pid"
        );
        assert_eq!(
            r["pid"],
            cluster.worker_pid(w).unwrap().to_string(),
            "pid differs from the supervisor's view"
        );
        assert_eq!(r["listen_fdnames"], "sticky");
        assert_eq!(r["sticky_worker"], w.to_string());
        assert_eq!(r["sticky_control"], cluster.control.to_str().unwrap());
        assert_eq!(r["acceptconn"], "1", "fd 3 is not a listening socket");
        assert_eq!(r["type"], libc::SOCK_STREAM.to_string());
        assert_eq!(r["port"], cluster.addr.port().to_string());
        assert_eq!(r["cloexec"], "0");
        inodes.push(r["inode"].clone());
    }
    inodes.sort();
    inodes.dedup();
    assert_eq!(inodes.len(), 3, "workers share a listener");
}

#[test]
fn descriptors_sticky_inherited_do_not_reach_workers() {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    const STRAY: i32 = 42;
    let dir = TempDir::new();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let raw = devnull.as_raw_fd();
    let (cluster, reports) = activation_reports(&dir, 2, |cmd| {
        // SAFETY: close_range and dup2 are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32);
                // dup2 clears CLOEXEC on the copy: sticky inherits fd 42,
                // like a jobserver pipe or a lock file from its parent.
                if libc::dup2(raw, STRAY) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    assert!(
        Path::new(&format!("/proc/{}/fd/{STRAY}", cluster.pid())).exists(),
        "sticky should hold fd {STRAY}"
    );
    for (w, r) in reports.iter().enumerate() {
        assert_eq!(
            r["fds"], "0,1,2,3",
            "worker {w} inherited sticky's stray descriptor"
        );
    }
}

#[test]
fn sigterm_stops_workers_and_frees_the_port() {
    let mut cluster = Cluster::start(2, &[]);
    assert_eq!(cluster.get("/").status, 200);
    let pids: Vec<u32> = (0..2).map(|i| cluster.worker_pid(i).unwrap()).collect();
    let (addr, control) = (cluster.addr, cluster.control.clone());
    assert!(control.exists());
    let start = Instant::now();
    let status = cluster
        .terminate(Duration::from_secs(15))
        .expect("sticky did not exit within 15 s of SIGTERM");
    let took = start.elapsed();
    println!("sticky exited with {status} after {took:.1?}; workers were {pids:?}");
    assert!(status.success(), "exit status {status}");
    for &pid in &pids {
        assert!(
            !process_exists(pid),
            "worker pid {pid} still exists (state {:?})",
            proc_state(pid)
        );
    }
    let again = TcpListener::bind(addr);
    assert!(
        again.is_ok(),
        "port still taken after sticky exited: {again:?}"
    );
    assert!(
        !control.exists(),
        "control socket {} left behind",
        control.display()
    );
    let log = cluster.log.lock().unwrap().clone();
    assert!(log.contains("SIGTERM received"), "{log}");
}

#[test]
fn in_flight_requests_complete_on_sigterm() {
    let mut cluster = Cluster::start(2, &[]);
    let addr = cluster.addr;
    let started = Instant::now();
    let slow = std::thread::spawn(move || {
        let r = request(addr, "GET", "/sleep?ms=1500", b"");
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let status = cluster
        .terminate(Duration::from_secs(15))
        .expect("sticky did not exit within 15 s");
    let exited = started.elapsed();
    let (r, answered) = slow.join().unwrap();
    println!(
        "in-flight request: {} after {answered:.1?}; sticky exited ({status}) after {exited:.1?}",
        r.status
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(answered >= Duration::from_millis(1400));
    assert!(status.success());
}

/// Exit status non-zero and stderr exactly one `sticky: error:` line
/// containing every one of `words`.
fn assert_one_error_line(case: &str, ran: &Ran, words: &[&str]) {
    assert_one_line(case, ran, words);
    assert!(
        ran.stderr.starts_with("sticky: error: "),
        "{case}: {}",
        ran.stderr
    );
}

#[test]
fn startup_errors_are_one_clear_line() {
    let dir = TempDir::new();
    let control = dir.0.join("control.sock");
    let control = control.to_str().unwrap();
    let demo = demo_worker_bin();
    let demo = demo.to_str().unwrap();
    let limit = Duration::from_secs(10);
    let run = |listen: &str, extra: &[&str], command: &[&str]| {
        let mut args = vec!["run", "--listen", listen, "--control", control];
        args.extend_from_slice(extra);
        args.push("--");
        args.extend_from_slice(command);
        run_sticky(&args, limit)
    };

    let ran = run("127.0.0.1:0", &["--workers", "1"], &["/nonexistent/worker"]);
    assert_one_error_line("missing worker command", &ran, &["/nonexistent/worker"]);

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let ran = run(&addr, &["--workers", "1"], &[demo]);
    assert_one_error_line("port in use", &ran, &[&addr, "in use"]);
    // The listener that was there first is untouched.
    taken.set_nonblocking(true).unwrap();
    let mut client = TcpStream::connect(&addr).unwrap();
    let start = Instant::now();
    let mut server = loop {
        match taken.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < Duration::from_secs(5), "no connection");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    server.set_nonblocking(false).unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    let ran = run("127.0.0.1:0", &["--workers", "0"], &[demo]);
    assert_one_error_line("--workers 0", &ran, &["--workers"]);

    let ran = run(
        "127.0.0.1:0",
        &["--workers", "1", "--sid-param", "bad param"],
        &[demo],
    );
    assert_one_error_line("--sid-param 'bad param'", &ran, &["--sid-param"]);
    assert!(
        !Path::new(control).exists(),
        "a failed start left its control socket behind"
    );
}

#[test]
fn second_sticky_on_the_same_port_fails_and_leaves_the_first_alone() {
    let cluster = Cluster::start(2, &[]);
    let pids: Vec<u32> = (0..2).map(|i| cluster.worker_pid(i).unwrap()).collect();
    let dir = TempDir::new();
    let other = dir.0.join("other.sock");
    let demo = demo_worker_bin();
    let addr: SocketAddr = cluster.addr;
    let ran = run_sticky(
        &[
            "run",
            "--listen",
            &addr.to_string(),
            "--workers",
            "1",
            "--control",
            other.to_str().unwrap(),
            "--",
            demo.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert_one_error_line("second sticky", &ran, &["in use"]);
    assert!(!other.exists());
    let mut counts = [0; 2];
    for _ in 0..50 {
        let r = cluster.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        counts[r.worker.unwrap()] += 1;
    }
    println!("first sticky after the second one failed: 50 requests, per worker {counts:?}");
    let after: Vec<u32> = (0..2).map(|i| cluster.worker_pid(i).unwrap()).collect();
    assert_eq!(pids, after, "the first sticky's workers changed");
}

#[test]
fn second_sticky_on_the_same_control_socket_fails_and_leaves_it_alone() {
    let cluster = Cluster::start(1, &[]);
    let demo = demo_worker_bin();
    let ran = run_sticky(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--control",
            cluster.control.to_str().unwrap(),
            "--",
            demo.to_str().unwrap(),
        ],
        Duration::from_secs(10),
    );
    assert_one_error_line("same control socket", &ran, &["control socket", "in use"]);
    assert!(
        cluster.control.exists(),
        "the first sticky's socket was removed"
    );
    assert_eq!(cluster.counter("live_workers"), 1);
    let sid = sticky_tests::random_sid(20);
    assert_eq!(cluster.register_any(&sid), 0);
    assert_eq!(cluster.counter("sessions"), 1);
}

/// A worker that ignores SIGTERM (and has no child to leave behind).
const STUBBORN: &[&str] = &["/bin/sh", "-c", "trap '' TERM; exec sleep 1000"];

/// None of `pids` exists any more (not even as a zombie).
fn assert_workers_gone(pids: &[u32]) {
    for &pid in pids {
        assert!(
            !process_exists(pid),
            "worker {pid} survived ({:?})",
            proc_state(pid)
        );
    }
}

#[test]
fn workers_ignoring_sigterm_are_killed_after_the_grace_period() {
    let mut cluster = Cluster::start_with("127.0.0.1:0", 2, &["--grace", "1s"], STUBBORN);
    let pids: Vec<u32> = (0..2).map(|i| cluster.worker_pid(i).unwrap()).collect();
    let start = Instant::now();
    let status = cluster
        .terminate(Duration::from_secs(15))
        .expect("sticky did not exit");
    let took = start.elapsed();
    println!("grace 1s: sticky exited ({status}) after {took:.1?}");
    assert!(status.success());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_workers_gone(&pids);
    let log = cluster.log.lock().unwrap().clone();
    assert!(log.contains("grace period over: killing workers"), "{log}");
}

#[test]
fn a_second_signal_kills_workers_at_once() {
    let mut cluster = Cluster::start_with("127.0.0.1:0", 2, &["--grace", "30s"], STUBBORN);
    let pids: Vec<u32> = (0..2).map(|i| cluster.worker_pid(i).unwrap()).collect();
    let start = Instant::now();
    signal(cluster.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pids.iter().all(|&p| process_exists(p)),
        "workers ignore SIGTERM"
    );
    signal(cluster.pid(), libc::SIGINT);
    let status = cluster
        .terminate(Duration::from_secs(10))
        .expect("sticky did not exit after a second signal");
    let took = start.elapsed();
    println!("second signal: sticky exited ({status}) after {took:.1?}");
    assert!(status.success());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_workers_gone(&pids);
    let log = cluster.log.lock().unwrap().clone();
    assert!(log.contains("second signal: killing workers"), "{log}");
}

#[test]
fn missing_privileges_are_one_clear_line() {
    // Run the real binary as `nobody`: loading BPF programs is refused.
    if setpriv_missing() {
        return;
    }
    let dir = TempDir::new();
    let bin = dir.0.join("sticky");
    std::fs::copy(sticky_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut setpriv = Command::new("setpriv");
    setpriv
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--",
            "/bin/true",
        ]);
    let ran = run_to_end(&mut setpriv, Duration::from_secs(10));
    assert_one_error_line("as nobody", &ran, &["root"]);
}
