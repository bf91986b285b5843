//! Worker faults under load: a worker SIGKILLed while 64 clients keep
//! opening sid-carrying connections, a worker crash-looping while the others
//! serve, and SIGTERM with connections waiting in accept queues. Real
//! `sticky run`, real demo workers, real sockets; the figures are printed.

use std::{
    collections::{BTreeMap, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use sticky_tests::{
    demo_worker_bin, parse_response, proc_state, signal, Cluster, Response, TempDir,
};

fn stop_and_wait(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let start = Instant::now();
    while proc_state(pid) != Some('T') {
        assert!(start.elapsed() < Duration::from_secs(5), "SIGSTOP ignored");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// TCP sockets a process holds other than fd 3 (its listener): with the
/// process stopped, exactly the connections it has accepted and not closed.
fn accepted_connections(pid: u32) -> usize {
    let tcp_inodes: std::collections::HashSet<String> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(9).map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "3")
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .filter(|inode| tcp_inodes.contains(inode))
        .count()
}

/// One `GET target` on a new connection; Err says how it failed.
fn try_get(addr: SocketAddr, target: &str) -> Result<Response, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // One write: the sid must be in the first segment.
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(format!("no response ({} bytes)", raw.len()));
    }
    Ok(parse_response(&raw))
}

/// One connection of the load run.
struct Attempt {
    owner: usize,
    started: Instant,
    result: Result<Response, String>,
}

#[test]
fn worker_killed_under_load() {
    const WORKERS: usize = 4;
    const CLIENTS: usize = 64;
    const VICTIM: usize = 1;
    let cluster = Cluster::start(WORKERS, &[]);
    let sessions = Arc::new(cluster.sessions_on_every_worker(WORKERS, 4));
    let pids: Vec<u32> = (0..WORKERS)
        .map(|i| cluster.worker_pid(i).unwrap())
        .collect();
    let old = pids[VICTIM];

    let running = Arc::new(AtomicBool::new(true));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (sessions, running, attempts) =
                (sessions.clone(), running.clone(), attempts.clone());
            let addr = cluster.addr;
            std::thread::spawn(move || {
                let mut n = c;
                while running.load(Ordering::Relaxed) {
                    let (sid, owner) = &sessions[n % sessions.len()];
                    n += 1;
                    let started = Instant::now();
                    let result = try_get(addr, &format!("/?sid={sid}&c={c}"));
                    attempts.lock().unwrap().push(Attempt {
                        owner: *owner,
                        started,
                        result,
                    });
                }
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(1000));
    // Freeze the victim for a moment so that connections for its sessions
    // pile up in its accept queue, and count what it has accepted (its
    // descriptor table cannot change while it is stopped).
    stop_and_wait(old);
    std::thread::sleep(Duration::from_millis(300));
    let accepted = accepted_connections(old);
    signal(old, libc::SIGKILL);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_millis(2000));
    running.store(false, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let new = cluster.worker_pid(VICTIM).expect("victim restarted");
    assert_ne!(new, old);

    let attempts = attempts.lock().unwrap();
    let attempted = attempts.len();
    let mut failed_by_owner: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queued_served_by_new = 0;
    let mut wrong_owner = Vec::new();
    for a in attempts.iter() {
        match &a.result {
            Err(e) => {
                *failed_by_owner.entry(a.owner).or_default() += 1;
                assert!(
                    a.owner == VICTIM && a.started < killed,
                    "a connection failed that the killed process had not accepted \
                     (owner {}, started {:?} before the kill): {e}",
                    a.owner,
                    killed.saturating_duration_since(a.started)
                );
            }
            Ok(r) => {
                assert_eq!(r.status, 200, "{}", r.text());
                if a.owner != VICTIM && (r.worker, r.pid) != (Some(a.owner), Some(pids[a.owner])) {
                    wrong_owner.push((a.owner, r.worker, r.pid));
                }
                if a.owner == VICTIM && a.started < killed && r.pid == Some(new) {
                    queued_served_by_new += 1;
                }
            }
        }
    }
    let failed: usize = failed_by_owner.values().sum();
    sticky_tests::report(&format!(
        "worker-kill-under-load: attempted {attempted} succeeded {} failed {failed} \
         (failures by owner {failed_by_owner:?}; the killed process held {accepted} accepted \
         connections; {queued_served_by_new} connections queued for it were served by its \
         replacement pid {new})",
        attempted - failed
    ));
    assert!(
        wrong_owner.is_empty(),
        "{} requests of other workers' sessions reached another worker: {:?}",
        wrong_owner.len(),
        &wrong_owner[..wrong_owner.len().min(10)]
    );
    assert!(
        failed <= accepted,
        "{failed} failures, but the killed process had accepted only {accepted} connections"
    );
    assert!(
        queued_served_by_new > 0,
        "no connection waited in the killed worker's queue: the test did not test that"
    );
    let stats = cluster.stats();
    println!("counters after the run: {stats:?}");
}

fn write_executable(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// "0.2s" / "100ms" / "1.6s" after "restarting in " as milliseconds.
fn restart_delays_of(log: &str, worker: usize) -> Vec<(String, f64)> {
    let prefix = format!("sticky: worker {worker} (pid ");
    log.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let (why, delay) = l.split_once("; restarting in ")?;
            let d = delay.trim();
            let ms = if let Some(ms) = d.strip_suffix("ms") {
                ms.parse().ok()?
            } else {
                d.strip_suffix('s')?.parse::<f64>().ok()? * 1000.0
            };
            Some((why.to_owned(), ms))
        })
        .collect()
}

#[test]
fn crash_looping_worker_leaves_the_others_serving() {
    let dir = TempDir::new();
    // Worker 0 exits at once with status 7, every time; the others are demo
    // workers.
    let script = dir.0.join("worker.sh");
    write_executable(
        &script,
        &format!(
            "#!/bin/sh\n[ \"$STICKY_WORKER\" = 0 ] && exit 7\nexec {}\n",
            demo_worker_bin().display()
        ),
    );
    let cluster = Cluster::start_with("127.0.0.1:0", 3, &[], &[script.to_str().unwrap()]);
    let started = Instant::now();
    let sessions: Vec<(String, usize)> = (0..6)
        .map(|n| {
            let sid = format!("crash{n}{}", sticky_tests::random_sid(12));
            let w = cluster.register_any(&sid);
            (sid, w)
        })
        .collect();
    let pids: HashMap<usize, u32> = [1, 2]
        .iter()
        .map(|&i| (i, cluster.worker_pid(i).unwrap()))
        .collect();
    // Keep using the others for 4 s while worker 0 crash-loops.
    let mut served = 0;
    let mut per_worker = [0usize; 3];
    while started.elapsed() < Duration::from_secs(4) {
        for (sid, owner) in &sessions {
            let r = try_get(cluster.addr, &format!("/?sid={sid}")).unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.worker, Some(*owner), "sid {sid} left its owner");
            per_worker[*owner] += 1;
            let r = try_get(cluster.addr, "/").unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            assert_ne!(
                r.worker,
                Some(0),
                "a balanced request reached the dead worker"
            );
            served += 2;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    for (&i, &pid) in &pids {
        assert_eq!(
            cluster.worker_pid(i),
            Some(pid),
            "worker {i} was restarted while worker 0 crash-looped"
        );
    }
    let log = cluster.log.lock().unwrap().clone();
    let restarts = restart_delays_of(&log, 0);
    let delays: Vec<f64> = restarts.iter().map(|r| r.1).collect();
    sticky_tests::report(&format!(
        "crash loop: worker 0 exited {} times in {elapsed:.1?} (restart delays ms {delays:?}); \
         workers 1 and 2 served {served}/{served} requests (by sid: {per_worker:?})",
        restarts.len()
    ));
    assert!(
        restarts
            .iter()
            .all(|(why, _)| why.ends_with("exited with status 7")
                || why.contains("exited with status 7 after")),
        "the log should say why: {restarts:?}"
    );
    // Backoff 0.1, 0.2, 0.4, 0.8, 1.6 s... fits at most 6 exits in 4 s; 12
    // leaves a wide margin for slow machines without allowing a busy loop.
    assert!(
        (2..=12).contains(&restarts.len()),
        "{} restarts in {elapsed:?}: {delays:?}",
        restarts.len()
    );
    assert!(
        delays.windows(2).all(|p| p[1] >= p[0]) && delays.last() > delays.first(),
        "the restart delay should grow: {delays:?}"
    );
    assert!(
        !log.contains("worker 1 (pid") && !log.contains("worker 2 (pid"),
        "{log}"
    );
}

#[test]
fn sigterm_serves_queued_connections_and_refuses_new_ones() {
    let mut cluster = Cluster::start(2, &["--grace", "10s"]);
    let (sid, _) = cluster
        .sessions_on_every_worker(2, 1)
        .into_iter()
        .find(|(_, w)| *w == 1)
        .unwrap();
    let frozen = cluster.worker_pid(1).unwrap();
    let addr = cluster.addr;
    let started = Instant::now();
    // In flight on worker 0 when SIGTERM comes.
    let slow = std::thread::spawn(move || try_get(addr, "/sleep?ms=1500"));
    // Queued on worker 1, which cannot accept them: it is stopped.
    stop_and_wait(frozen);
    let before = cluster.counter("by_sid");
    const QUEUED: u64 = 10;
    let queued: Vec<_> = (0..QUEUED)
        .map(|n| {
            let target = format!("/?sid={sid}&n={n}");
            std::thread::spawn(move || try_get(addr, &target))
        })
        .collect();
    cluster.wait_for("the queued connections", Duration::from_secs(10), |c| {
        c.counter("by_sid") >= before + QUEUED
    });
    signal(cluster.pid(), libc::SIGTERM);
    // Wait for the supervisor to take the signal (the log says so), then
    // let worker 1 run again: it gets SIGTERM and finds its queue full.
    let log = cluster.log.clone();
    let limit = Instant::now() + Duration::from_secs(10);
    while !log.lock().unwrap().contains("SIGTERM received") {
        assert!(Instant::now() < limit, "no SIGTERM in the log");
        std::thread::sleep(Duration::from_millis(10));
    }
    let late = try_get(addr, "/?late=1");
    signal(frozen, libc::SIGCONT);
    let status = cluster
        .wait_exit(Duration::from_secs(20))
        .expect("sticky did not exit within 20 s of SIGTERM");
    let exited = started.elapsed();
    let served: Vec<Response> = queued
        .into_iter()
        .map(|t| t.join().unwrap().expect("a queued connection was dropped"))
        .collect();
    let slow = slow.join().unwrap().unwrap_or_else(|e| {
        panic!(
            "the in-flight request failed: {e}\n{}",
            cluster.log.lock().unwrap()
        )
    });
    let late = late.expect("the connection opened after SIGTERM got no answer");
    sticky_tests::report(&format!(
        "SIGTERM: {}/{QUEUED} queued connections served by pid {frozen}; in-flight request {}; \
         connection opened after SIGTERM: {}; sticky exited ({status}) {exited:.1?} after start",
        served.len(),
        slow.status,
        late.status
    ));
    for r in &served {
        assert_eq!((r.status, r.pid), (200, Some(frozen)), "{}", r.text());
    }
    assert_eq!(slow.status, 200);
    assert_eq!(late.status, 503, "{}", late.text());
    assert!(status.success());
}
