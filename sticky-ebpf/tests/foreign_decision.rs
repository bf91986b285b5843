//! The foreign-request decision of `sticky_watch`, run in the kernel through
//! `BPF_PROG_TEST_RUN` with crafted client requests on a connection placed
//! on worker 0. Needs root (CAP_BPF).
//!
//! BPF_PROG_TEST_RUN gives a cgroup_skb program a fresh dummy socket (full,
//! not listening, local port 0) for each run: the connection's storage is
//! created there from a `placed_flows` entry marked idle (as for a
//! connection placed without data), so every run is that connection's
//! first request. What happens on a real connection's later segments is
//! tests/tests/foreign.rs.

use std::net::IpAddr;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupSkb, TestRun, TestRunOptions},
    Ebpf,
};
use sticky_common::{
    Balance, Config, FlowKey, Foreign, Mode, Placed, ResetEvent, Session, SidHasher, WorkerState,
    COUNTERS,
};

mod common;
use common::{flow_key, segment, server_for};

const OWN: &str = "ownSessionOfWorker00";
const FOREIGN: &str = "sessionOfWorker1xxxx";

struct Watch {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    workers: Array<MapData, WorkerState>,
    placed: HashMap<MapData, FlowKey, Placed>,
    counters: PerCpuArray<MapData, u64>,
    resets: RingBuf<MapData>,
    next_port: u16,
}

impl Watch {
    fn new(foreign: Foreign) -> Watch {
        let mut ebpf =
            Ebpf::load(sticky_ebpf::steer_object()).expect("loading the object (are you root?)");
        let prog: &mut CgroupSkb = ebpf
            .program_mut(sticky_ebpf::WATCH_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts sticky_watch");
        let take = |e: &mut Ebpf, n| e.take_map(n).unwrap();
        let mut w = Watch {
            config: take(&mut ebpf, "config").try_into().unwrap(),
            workers: take(&mut ebpf, "workers").try_into().unwrap(),
            placed: take(&mut ebpf, "placed_flows").try_into().unwrap(),
            counters: take(&mut ebpf, "counters").try_into().unwrap(),
            resets: take(&mut ebpf, "resets").try_into().unwrap(),
            ebpf,
            next_port: 40000,
        };
        let mut sessions: HashMap<MapData, u64, Session> =
            take(&mut w.ebpf, "sessions").try_into().unwrap();
        sessions
            .insert(key_of(OWN), Session::registered(0), 0)
            .unwrap();
        sessions
            .insert(key_of(FOREIGN), Session::registered(1), 0)
            .unwrap();
        w.set_foreign(foreign);
        w.set_live(0, true);
        w.set_live(1, true);
        w
    }

    fn set_foreign(&mut self, foreign: Foreign) {
        let mut cfg = Config::new(2, 1, Balance::RoundRobin, Mode::Sticky, "sid")
            .with_sid_key(SID_KEY)
            .learning(0);
        cfg.foreign = foreign as u32;
        self.config.set(0, cfg, 0).unwrap();
    }

    fn set_live(&mut self, worker: u32, live: bool) {
        let st = WorkerState {
            live: live as u32,
            sessions: 1,
        };
        self.workers.set(worker, st, 0).unwrap();
    }

    /// A connection placed on worker 0 (`idle`: without data), from `client`.
    fn connection(&mut self, client: IpAddr, idle: bool) -> (IpAddr, u16) {
        self.next_port += 1;
        let key = flow_key(server_for(client), client, self.next_port);
        let placed = Placed {
            worker: 0,
            segments: 0,
            idle: idle as u32,
        };
        self.placed.insert(key, placed, 0).unwrap();
        (client, self.next_port)
    }

    /// sticky_watch's verdict on `payload` from `conn`: true = passed.
    fn passes(&self, conn: (IpAddr, u16), payload: &[u8]) -> bool {
        let packet = segment(conn, (server_for(conn.0), 0), payload);
        let prog: &CgroupSkb = self
            .ebpf
            .program(sticky_ebpf::WATCH_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        match result.return_value {
            1 => true,
            0 => false,
            other => panic!("sticky_watch returned {other}"),
        }
    }

    fn counter(&self, name: &str) -> u64 {
        let i = COUNTERS.iter().position(|c| *c == name).unwrap() as u32;
        self.counters.get(&i, 0).unwrap().iter().sum()
    }

    fn events(&mut self) -> Vec<ResetEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.resets.next() {
            assert_eq!(item.len(), size_of::<ResetEvent>());
            // SAFETY: the kernel wrote a struct sticky_reset (size checked).
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        out
    }
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n")
        .into_bytes()
}

fn clients() -> [IpAddr; 2] {
    ["10.1.2.3".parse().unwrap(), "2001:db8::7".parse().unwrap()]
}

#[test]
fn a_request_with_another_workers_sid_is_dropped_and_its_reset_queued() {
    let mut w = Watch::new(Foreign::Reset);
    for client in clients() {
        let conn = w.connection(client, true);
        let target = format!("/socket.io/?EIO=4&transport=polling&sid={FOREIGN}");
        assert!(!w.passes(conn, &get(&target)), "{client}: GET dropped");
        let post = format!(
            "POST /socket.io/?EIO=4&transport=polling&sid={FOREIGN} HTTP/1.1\r\n\
             Content-Length: 2\r\n\r\n42"
        );
        assert!(!w.passes(conn, post.as_bytes()), "{client}: POST dropped");
        let events = w.events();
        assert_eq!(events.len(), 2, "{client}: one reset per dropped request");
        let key = flow_key(server_for(client), client, conn.1);
        for ev in events {
            assert_eq!((ev.flow, ev.worker, ev.owner), (key, 0, 1), "{client}");
            assert_ne!(ev.cookie, 0, "{client}: the socket's cookie");
        }
    }
    assert_eq!(w.counter("foreign_dropped"), 4);
    println!("foreign GET and POST, IPv4 and IPv6: 4 dropped, 4 resets queued");
}

#[test]
fn everything_else_passes_untouched() {
    let mut w = Watch::new(Foreign::Reset);
    let client = clients()[0];
    let conn = w.connection(client, true);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "own sid",
            get(&format!("/?EIO=4&transport=polling&sid={OWN}")),
        ),
        ("no sid", get("/app.js")),
        ("unknown sid", get("/?sid=AAAAAAAAAAAAAAAAAAAA")),
        ("malformed sid", get(&format!("/?sid={FOREIGN}%00"))),
        ("empty sid", get("/?sid=&x=1")),
        ("not a request line", b"\x81\x85abcdehello".to_vec()),
        ("sid of another worker in a header only", {
            let r = format!("GET / HTTP/1.1\r\nReferer: /?sid={FOREIGN}\r\n\r\n");
            r.into_bytes()
        }),
        (
            "other method",
            format!("PUT /?sid={FOREIGN} HTTP/1.1\r\n\r\n").into_bytes(),
        ),
        ("three bytes", b"GET".to_vec()),
    ];
    for (what, payload) in &cases {
        assert!(w.passes(conn, payload), "{what} must pass");
    }
    // A foreign sid whose owner is not live: the selector would balance
    // it anyway, so the connection's worker may as well answer it.
    w.set_live(1, false);
    assert!(
        w.passes(conn, &get(&format!("/?sid={FOREIGN}"))),
        "dead owner"
    );
    assert!(w.events().is_empty());
    assert_eq!(w.counter("foreign_dropped"), 0);
    println!(
        "{} kinds of request passed, no reset queued",
        cases.len() + 1
    );
}

#[test]
fn a_connection_of_unknown_worker_is_not_checked() {
    let mut w = Watch::new(Foreign::Reset);
    // Placed with data: its storage would have come from the worker's first
    // answer, which this run has not seen; never guessed from placed_flows.
    let conn = w.connection(clients()[0], false);
    assert!(w.passes(conn, &get(&format!("/?sid={FOREIGN}"))));
    // No placement at all (another sticky's connection, an evicted entry).
    let stranger = (clients()[1], 1);
    assert!(w.passes(stranger, &get(&format!("/?sid={FOREIGN}"))));
    assert!(w.events().is_empty());
    assert_eq!(w.counter("unmapped"), 2);
}

#[test]
fn pass_mode_counts_and_passes() {
    let mut w = Watch::new(Foreign::Pass);
    let conn = w.connection(clients()[0], true);
    assert!(w.passes(conn, &get(&format!("/?sid={FOREIGN}"))));
    assert!(w.events().is_empty());
    assert_eq!(
        (w.counter("foreign_passed"), w.counter("foreign_dropped")),
        (1, 0)
    );
}

/// The `sessions` key of `sid` under the tests' config (`SID_KEY`).
fn key_of(sid: &str) -> u64 {
    SidHasher { key: SID_KEY }.key_of(sid).unwrap()
}
const SID_KEY: [u64; 2] = [0x5eed, 0xc0ffee];
