//! What happens when the supervisor itself is killed (SIGKILL: no clean-up).

use std::time::{Duration, Instant};

use sticky_tests::Cluster;

#[test]
fn workers_keep_serving_after_the_supervisor_is_killed() {
    let mut cluster = Cluster::start(3, &[]);
    let sessions = cluster.sessions_on_every_worker(3, 1);
    let pids: Vec<u32> = (0..3).map(|i| cluster.worker_pid(i).unwrap()).collect();
    let supervisor = cluster.pid();
    unsafe { libc::kill(supervisor as i32, libc::SIGKILL) };
    // Reap it so its descriptors are gone for sure.
    cluster.terminate(Duration::from_secs(5));

    // New connections are still placed (balanced: nobody sorts anymore), and
    // answered by the same worker processes.
    let mut seen = std::collections::HashSet::new();
    for (sid, _) in sessions.iter().cycle().take(30) {
        let r = cluster.get(&format!("/?sid={sid}"));
        assert_eq!(r.status, 200);
        seen.insert(r.pid.unwrap());
    }
    println!("after SIGKILL of the supervisor: 30/30 answered by pids {seen:?}");
    assert!(seen.iter().all(|p| pids.contains(p)));

    // Once the last worker is gone, the port is free again: a new sticky
    // can start on it.
    for pid in &pids {
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let start = Instant::now();
    while std::net::TcpListener::bind(cluster.addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "port still taken after the workers died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = sticky_tests::demo_worker_bin();
    let again = Cluster::start_with(
        &cluster.addr.to_string(),
        2,
        &[],
        &[worker.to_str().unwrap()],
    );
    assert_eq!(again.get("/").status, 200);
    println!(
        "a new sticky started on {} after the old workers exited",
        again.addr
    );
}
