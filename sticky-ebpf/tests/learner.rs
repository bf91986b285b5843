//! `sticky_learn`, the session learner, run in the kernel through
//! `BPF_PROG_TEST_RUN` with crafted answer segments of a worker: Engine.IO
//! open packets in polling bodies (EIO 4 and 3) and WebSocket frames, and
//! everything that must not be learned. And `sticky_watch`, with crafted
//! client requests: what refreshes a learned session and what closes it.
//! Needs root (CAP_BPF).
//!
//! Under BPF_PROG_TEST_RUN the socket has local port 0, so the config says
//! port 0.

use std::net::IpAddr;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{CgroupSkb, TestRun, TestRunOptions},
    Ebpf,
};
use sticky_common::{Balance, Config, FlowKey, Mode, Placed, Session, SidHasher, COUNTERS};

mod common;
use common::{flow_key, segment, server_for};

struct Learner {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    sessions: HashMap<MapData, u64, Session>,
    placed: HashMap<MapData, FlowKey, Placed>,
    counters: PerCpuArray<MapData, u64>,
    next_port: u16,
}

impl Learner {
    fn new() -> Learner {
        let mut ebpf =
            Ebpf::load(sticky_ebpf::steer_object()).expect("loading the object (are you root?)");
        for name in [sticky_ebpf::LEARN_PROGRAM, sticky_ebpf::WATCH_PROGRAM] {
            let prog: &mut CgroupSkb = ebpf.program_mut(name).unwrap().try_into().unwrap();
            prog.load()
                .unwrap_or_else(|e| panic!("the verifier rejects {name}: {e}"));
        }
        let take = |e: &mut Ebpf, n| e.take_map(n).unwrap();
        let mut config: Array<MapData, Config> = take(&mut ebpf, "config").try_into().unwrap();
        config
            .set(
                0,
                Config::new(2, 1, Balance::RoundRobin, Mode::Sticky, "sid")
                    .with_sid_key(SID_KEY)
                    .learning(0),
                0,
            )
            .unwrap();
        Learner {
            config,
            sessions: take(&mut ebpf, "sessions").try_into().unwrap(),
            placed: take(&mut ebpf, "placed_flows").try_into().unwrap(),
            counters: take(&mut ebpf, "counters").try_into().unwrap(),
            ebpf,
            next_port: 50000,
        }
    }

    /// A connection sticky placed on `worker`: (client address, port).
    fn placed_connection(&mut self, client: IpAddr, worker: u32) -> (IpAddr, u16) {
        self.next_port += 1;
        let key = flow_key(server_for(client), client, self.next_port);
        self.placed
            .insert(
                key,
                Placed {
                    worker,
                    segments: 0,
                    idle: 0,
                },
                0,
            )
            .unwrap();
        (client, self.next_port)
    }

    /// The worker sends `payload` on `conn` (sticky_learn sees it).
    fn answer(&mut self, conn: (IpAddr, u16), payload: &[u8]) {
        let packet = segment((server_for(conn.0), 0), conn, payload);
        self.run(sticky_ebpf::LEARN_PROGRAM, &packet);
    }

    /// The client sends `payload` on `conn` (sticky_watch sees it).
    fn request(&mut self, conn: (IpAddr, u16), payload: &[u8]) {
        let packet = segment(conn, (server_for(conn.0), 0), payload);
        self.run(sticky_ebpf::WATCH_PROGRAM, &packet);
    }

    fn run(&self, name: &str, packet: &[u8]) {
        let prog: &CgroupSkb = self.ebpf.program(name).unwrap().try_into().unwrap();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(result.return_value, 1, "{name} must never drop a packet");
    }

    /// A session learned for worker 0, last seen at clock value
    /// `last_seen_ns` (1: long ago; 0 would mean closed).
    fn learned_session(&mut self, sid: &str, last_seen_ns: u64) -> u64 {
        let key = key_of(sid);
        let learned = Session {
            worker: 0,
            registered: 0,
            last_seen_ns,
        };
        self.sessions.insert(key, learned, 0).unwrap();
        key
    }

    fn last_seen(&self, key: &u64) -> Option<u64> {
        self.sessions.get(key, 0).ok().map(|l| l.last_seen_ns)
    }

    fn owner(&self, sid: &str) -> Option<u32> {
        self.sessions.get(&key_of(sid), 0).ok().map(|s| s.worker)
    }

    fn registered(&self, sid: &str) -> bool {
        self.sessions
            .get(&key_of(sid), 0)
            .is_ok_and(|s| s.is_registered())
    }

    fn counter(&self, name: &str) -> u64 {
        let i = COUNTERS.iter().position(|c| *c == name).unwrap() as u32;
        self.counters.get(&i, 0).unwrap().iter().sum()
    }
}

fn v4() -> IpAddr {
    "10.9.8.7".parse().unwrap()
}

const OPEN: &str =
    r#"{"upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}"#;

fn polling_answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: {}\r\nDate: Wed, 25 Nov 2026 22:00:00 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n{body}",
        body.len()
    )
}

fn ws_text_frame(text: &str) -> Vec<u8> {
    let mut f = vec![0x81];
    if text.len() < 126 {
        f.push(text.len() as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(text.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(text.as_bytes());
    f
}

#[test]
fn open_packets_are_learned_for_the_worker_the_connection_went_to() {
    let mut l = Learner::new();
    let cases: Vec<(&str, Vec<u8>)> =
        vec![
        (
            "EIO4polling000000001",
            polling_answer(&format!(
                r#"0{{"sid":"EIO4polling000000001",{}"#,
                &OPEN[1..]
            ))
            .into_bytes(),
        ),
        (
            "EIO3-polling_0000002",
            polling_answer(&format!(
                r#"97:0{{"sid":"EIO3-polling_0000002",{}"#,
                &OPEN[1..]
            ))
            .into_bytes(),
        ),
        (
            "websocketOnly0000003",
            ws_text_frame(&format!(
                r#"0{{"sid":"websocketOnly0000003",{}"#,
                &OPEN[1..]
            )),
        ),
        ("x", polling_answer(r#"0{"sid":"x"}"#).into_bytes()),
        ("bodyInItsOwnSegment1", br#"0{"sid":"bodyInItsOwnSegment1","upgrades":[]}"#.to_vec()),
        (
            "a64aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            polling_answer(
                r#"0{"sid":"a64aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#,
            )
            .into_bytes(),
        ),
    ];
    for (i, (sid, payload)) in cases.iter().enumerate() {
        let worker = (i % 2) as u32;
        let conn = l.placed_connection(v4(), worker);
        l.answer(conn, payload);
        assert_eq!(
            l.owner(sid),
            Some(worker),
            "{sid} not learned from {:?}",
            String::from_utf8_lossy(payload)
        );
        let learned = l.sessions.get(&key_of(sid), 0).unwrap();
        assert_eq!((learned.worker, learned.registered), (worker, 0));
        assert!(learned.last_seen_ns > 0, "{sid}: learned open");
        // Learned: the connection is no longer searched.
        assert!(l
            .placed
            .get(&flow_key(server_for(v4()), conn.0, conn.1), 0)
            .is_err());
    }

    // IPv6, and the open packet in the connection's second answer segment
    // (headers and body written separately).
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    let conn = l.placed_connection(v6, 1);
    l.answer(
        conn,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    l.answer(
        conn,
        &ws_text_frame(r#"0{"sid":"secondSegment6666666","upgrades":[]}"#),
    );
    assert_eq!(l.owner("secondSegment6666666"), Some(1));
}

#[test]
fn nothing_else_is_learned() {
    let mut l = Learner::new();
    let before = l.counter("learned");
    let bad: Vec<&[u8]> = vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        br#"HTTP/1.1 200 OK\r\n\r\n0{"sid":"bad.character"}"#,
        br#"HTTP/1.1 200 OK\r\n\r\n0{"sid":""}"#,
        br#"HTTP/1.1 200 OK\r\n\r\n0{"sid":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#, // 65
        br#"HTTP/1.1 200 OK\r\n\r\n0{"sid":"unterminated"#,
        br#"HTTP/1.1 200 OK\r\n\r\n4{"sid":"notAnOpenPacket1"}"#,
        br#"HTTP/1.1 200 OK\r\n\r\n0{"sid": "spaceAfterColon"}"#,
        // Socket.IO's CONNECT answer carries a namespace socket id.
        br#"HTTP/1.1 200 OK\r\nContent-Length: 31\r\n\r\n40{"sid":"namespaceSocketId01"}"#,
        br#"HTTP/1.1 200 OK\r\n\r\n2probe\x1e40{"sid":"namespaceSocketId02"}"#,
        br#"31:40{"sid":"namespaceSocketId03"}"#,
        br#"x0{"sid":"notAtAPacketStart04"}"#,
    ];
    for payload in bad {
        let conn = l.placed_connection(v4(), 0);
        l.answer(conn, payload);
    }
    // ...nor in a WebSocket frame.
    let conn = l.placed_connection(v4(), 0);
    l.answer(conn, &ws_text_frame(r#"40{"sid":"namespaceSocketId05"}"#));
    assert_eq!(
        l.counter("learned"),
        before,
        "learned something it should not"
    );

    // A connection sticky did not place: never searched.
    let stranger = (v4(), 1234);
    l.answer(
        stranger,
        &polling_answer(r#"0{"sid":"notPlacedBySticky"}"#).into_bytes(),
    );
    assert_eq!(l.owner("notPlacedBySticky"), None);

    // Only the first STICKY_LEARN_SEGMENTS answer segments are searched.
    let conn = l.placed_connection(v4(), 1);
    for _ in 0..sticky_common::LEARN_SEGMENTS {
        l.answer(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    }
    l.answer(
        conn,
        &polling_answer(r#"0{"sid":"tooLateToBeLearned"}"#).into_bytes(),
    );
    assert_eq!(l.owner("tooLateToBeLearned"), None);

    // Learning off: nothing, even on a placed connection.
    l.config
        .set(
            0,
            Config::new(2, 1, Balance::RoundRobin, Mode::Sticky, "sid").with_sid_key(SID_KEY),
            0,
        )
        .unwrap();
    let conn = l.placed_connection(v4(), 1);
    l.answer(
        conn,
        &polling_answer(r#"0{"sid":"learningIsOff"}"#).into_bytes(),
    );
    assert_eq!(l.owner("learningIsOff"), None);
}

#[test]
fn an_explicit_registration_wins() {
    let mut l = Learner::new();
    l.sessions
        .insert(key_of("registeredExplicitly"), Session::registered(1), 0)
        .unwrap();
    let conn = l.placed_connection(v4(), 0);
    l.answer(
        conn,
        &polling_answer(r#"0{"sid":"registeredExplicitly"}"#).into_bytes(),
    );
    assert_eq!(l.owner("registeredExplicitly"), Some(1));
    assert!(l.registered("registeredExplicitly"), "never overwritten");
    assert!(
        l.counter("learn_known") >= 1,
        "learn_known {} learn_full {} learned {}",
        l.counter("learn_known"),
        l.counter("learn_full"),
        l.counter("learned")
    );
}

fn post(sid: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /socket.io/?EIO=4&transport=polling&t=P1a2b3c&sid={sid} HTTP/1.1\r\nHost: example.test\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn requests_keep_learned_sessions_fresh() {
    let mut l = Learner::new();
    let key = l.learned_session("keptFreshByRequests1", 1);
    let conn = (v4(), 40001);
    // A long-poll GET on a keep-alive connection (not its first request).
    l.request(
        conn,
        b"GET /socket.io/?EIO=4&transport=polling&sid=keptFreshByRequests1 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let seen = l.last_seen(&key).unwrap();
    assert!(seen > 1, "a GET carrying the sid refreshes last_seen");
    l.request(conn, &post("keptFreshByRequests1", "3"));
    assert!(l.last_seen(&key).unwrap() >= seen, "so does a POST (pong)");
    // IPv6 too.
    let key6 = l.learned_session("keptFreshOverIpv6v6", 1);
    l.request(
        ("2001:db8::2".parse().unwrap(), 40002),
        b"GET /socket.io/?sid=keptFreshOverIpv6v6&EIO=4 HTTP/1.1\r\n\r\n",
    );
    assert!(l.last_seen(&key6).unwrap() > 1);

    // Not requests of a learned session: nothing changes, nothing is added.
    let registered = key_of("registeredNotLearned");
    l.sessions
        .insert(registered, Session::registered(1), 0)
        .unwrap();
    let untouched = l.learned_session("untouchedByOthers001", 1);
    let others: Vec<Vec<u8>> = vec![
        b"GET /socket.io/?EIO=4&transport=polling&sid=registeredNotLearned HTTP/1.1\r\n\r\n"
            .to_vec(),
        post("registeredNotLearned", "1"),
        b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n\r\n".to_vec(),
        // A WebSocket frame (masked, as clients send them) and a body segment.
        vec![0x81, 0x82, 1, 2, 3, 4, b'4' ^ 1, b'2' ^ 2],
        b"untouchedByOthers001 in a body segment".to_vec(),
        b"PUT /?sid=untouchedByOthers001 HTTP/1.1\r\n\r\n".to_vec(),
    ];
    for payload in &others {
        l.request(conn, payload);
    }
    assert_eq!(
        l.sessions.get(&registered, 0).unwrap(),
        Session::registered(1)
    );
    assert_eq!(l.last_seen(&untouched), Some(1));
}

#[test]
fn a_client_close_over_polling_closes_the_learned_session() {
    let mut l = Learner::new();
    let before = l.counter("learn_closed");
    let conn = (v4(), 40003);
    let closes: Vec<(&str, Vec<u8>)> = vec![
        ("closedByClientEio4", post("closedByClientEio4", "1")),
        // Socket.IO's disconnect and Engine.IO's close in one payload.
        ("closedAfterDisconnect", post("closedAfterDisconnect", "41\x1e1")),
        (
            "closedByClientEio3",
            b"POST /socket.io/?EIO=3&transport=polling&sid=closedByClientEio3 HTTP/1.1\r\nContent-Length: 3\r\n\r\n1:1".to_vec(),
        ),
    ];
    for (sid, payload) in &closes {
        let key = l.learned_session(sid, 1);
        l.request(conn, payload);
        assert_eq!(l.last_seen(&key), Some(0), "{sid}: closed");
        // Closed stays closed: a later request does not revive it.
        l.request(conn, &post(sid, "3"));
        assert_eq!(l.last_seen(&key), Some(0), "{sid}: still closed");
    }
    assert_eq!(l.counter("learn_closed") - before, closes.len() as u64);

    // Other bodies are not a close.
    for (i, body) in ["2", "11", "4close", "1\x1e4x", "42[\"a\",1]"]
        .iter()
        .enumerate()
    {
        let sid = format!("notClosedByBody{i}");
        let key = l.learned_session(&sid, 1);
        l.request(conn, &post(&sid, body));
        assert!(
            l.last_seen(&key).unwrap() > 1,
            "body {body:?} is not a close"
        );
    }
    assert_eq!(l.counter("learn_closed") - before, closes.len() as u64);
}

/// The `sessions` key of `sid` under the tests' config (`SID_KEY`).
fn key_of(sid: &str) -> u64 {
    SidHasher { key: SID_KEY }.key_of(sid).unwrap()
}
const SID_KEY: [u64; 2] = [0x5eed, 0xc0ffee];
