//! The kernel-side request parser, run in the kernel through
//! `BPF_PROG_TEST_RUN` on the socket filter with crafted segments.
//!
//! Each case is a first data segment; its outcome is read back from the
//! filter's `flows` decision and the `counters` map. Needs root (CAP_BPF).
//! BPF_PROG_TEST_RUN takes at most one page per packet: large first segments
//! are exercised end to end by the integration tests.

use std::net::IpAddr;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SocketFilter, TestRun, TestRunOptions},
    Ebpf,
};
use sticky_common::{
    Balance, Config, Decision, FlowKey, Mode, Session, SidHasher, SidKey, COUNTERS, NO_WORKER,
    SID_HASH_TEST_KEY, SID_HASH_VECTORS,
};
use sticky_fuzz::Parse;

mod common;
use common::{flow_key, segment, server_for};

#[derive(Debug, PartialEq, Clone, Copy)]
enum Outcome {
    /// Routed to this worker.
    Owner(u32),
    /// Well-formed sid, no owner: balanced.
    Unknown,
    /// sid parameter present but malformed: balanced.
    Invalid,
    /// HTTP request line without a sid: balanced.
    NoSid,
    /// Starts with A-Z but is no request line: balanced.
    NotHttp,
    /// Not even looked at (no payload or not starting with A-Z): balanced.
    Ignored,
}
use Outcome::*;

struct Harness {
    ebpf: Ebpf,
    config: Array<MapData, Config>,
    sessions: HashMap<MapData, u64, Session>,
    flows: HashMap<MapData, FlowKey, Decision>,
    counters: PerCpuArray<MapData, u64>,
    next_port: u16,
}

impl Harness {
    fn new() -> Harness {
        let mut ebpf =
            Ebpf::load(sticky_ebpf::steer_object()).expect("loading the object (are you root?)");
        let prog: &mut SocketFilter = ebpf
            .program_mut(sticky_ebpf::SORT_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts sticky_sort");
        let take = |e: &mut Ebpf, n| e.take_map(n).unwrap();
        let config: Array<MapData, Config> = take(&mut ebpf, "config").try_into().unwrap();
        let sessions = take(&mut ebpf, "sessions").try_into().unwrap();
        let flows = take(&mut ebpf, "flows").try_into().unwrap();
        let counters = take(&mut ebpf, "counters").try_into().unwrap();
        let mut h = Harness {
            ebpf,
            config,
            sessions,
            flows,
            counters,
            next_port: 40000,
        };
        h.set_param("sid");
        h
    }

    fn set_param(&mut self, param: &str) {
        self.config
            .set(
                0,
                Config::new(4, 1, Balance::RoundRobin, Mode::Sticky, param)
                    .with_sid_key(SID_HASH_TEST_KEY),
                0,
            )
            .unwrap();
    }

    fn own(&mut self, sid: &str, worker: u32) {
        self.sessions
            .insert(key_of(sid), Session::registered(worker), 0)
            .unwrap();
    }

    fn counter(&self, name: &str) -> u64 {
        let i = COUNTERS.iter().position(|c| *c == name).unwrap() as u32;
        self.counters.get(&i, 0).unwrap().iter().sum()
    }

    /// Runs the filter on one segment from `client` and reports the outcome.
    fn run(&mut self, client: IpAddr, payload: &[u8]) -> Outcome {
        self.next_port += 1;
        let port = self.next_port;
        let packet = segment((client, port), (server_for(client), 3000), payload);
        let names = ["sid_unknown", "sid_invalid", "no_sid", "not_http"];
        let before: Vec<u64> = names.iter().map(|n| self.counter(n)).collect();
        let prog: &SocketFilter = self
            .ebpf
            .program(sticky_ebpf::SORT_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        // The filter must never trim or drop: it returns >= the packet length.
        assert!(
            result.return_value as usize >= packet.len() - 14,
            "filter trimmed the segment"
        );
        if let Ok(d) = self
            .flows
            .get(&flow_key(server_for(client), client, port), 0)
        {
            if d.owner != NO_WORKER {
                return Owner(d.owner);
            }
        }
        let changed: Vec<&str> = names
            .iter()
            .zip(&before)
            .filter(|(n, b)| self.counter(n) != **b)
            .map(|(n, _)| *n)
            .collect();
        match changed.as_slice() {
            [] => Ignored,
            ["sid_unknown"] => Unknown,
            ["sid_invalid"] => Invalid,
            ["no_sid"] => NoSid,
            ["not_http"] => NotHttp,
            other => panic!("several outcomes at once: {other:?}"),
        }
    }
}

const HASHER: SidHasher = SidHasher {
    key: SID_HASH_TEST_KEY,
};

/// The `sessions` key of `sid`, as user space computes it.
fn key_of(sid: &str) -> u64 {
    HASHER.key_of(sid).unwrap()
}

/// The kernel hashes each sid as sticky-common's vectors say: a session
/// keyed by the vector's hash (not by user space's own function) is found.
#[test]
fn kernel_sid_hash_matches_the_shared_vectors() {
    let mut h = Harness::new();
    for (i, &(sid, hash)) in SID_HASH_VECTORS.iter().enumerate() {
        let worker = 2 + (i as u32 % 2);
        h.sessions
            .insert(hash, Session::registered(worker), 0)
            .unwrap();
        let request = format!("GET /socket.io/?EIO=4&sid={sid}&transport=polling HTTP/1.1\r\n");
        let got = h.run(v4(), request.as_bytes());
        println!("sid {sid:?}, key {hash:#018x}: {got:?}");
        assert_eq!(got, Owner(worker), "{sid}");
        h.sessions.remove(&hash).unwrap();
    }
    // Another key: the same sid no longer finds its session.
    let (sid, hash) = SID_HASH_VECTORS[0];
    h.sessions.insert(hash, Session::registered(2), 0).unwrap();
    h.config
        .set(
            0,
            Config::new(4, 1, Balance::RoundRobin, Mode::Sticky, "sid").with_sid_key([1, 2]),
            0,
        )
        .unwrap();
    let request = format!("GET /?sid={sid} HTTP/1.1\r\n");
    assert_eq!(h.run(v4(), request.as_bytes()), Unknown);
}

fn v4() -> IpAddr {
    "10.1.2.3".parse().unwrap()
}

#[test]
fn first_segments_have_defined_outcomes() {
    let mut h = Harness::new();
    let sid20 = "AbCdEfGhIjKlMnOpQrSt";
    let sid64 = "x".repeat(64);
    h.own(sid20, 2);
    h.own("other_1", 1);
    h.own("third-3", 3);
    h.own(&sid64, 0);

    let long_path = format!("GET /{}?sid={sid20} HTTP/1.1\r\n\r\n", "p".repeat(2000));
    let late_sid = format!("GET /x?{}&sid={sid20} HTTP/1.1\r\n\r\n", "a=b&".repeat(260));
    let big = format!(
        "POST /x?sid={sid20} HTTP/1.1\r\nContent-Length: 2800\r\n\r\n{}",
        "z".repeat(2800)
    );
    let cases: Vec<(String, Outcome)> = vec![
        (
            format!(
                "GET /socket.io/?EIO=4&transport=polling&sid={sid20} HTTP/1.1\r\nHost: x\r\n\r\n"
            ),
            Owner(2),
        ),
        (
            format!("GET /socket.io/?sid={sid20}&EIO=4 HTTP/1.1\r\n\r\n"),
            Owner(2),
        ),
        (
            format!("POST /?sid={sid20}#frag HTTP/1.1\r\n\r\n"),
            Owner(2),
        ),
        (
            format!("GET /?EIO=4&sid={sid64} HTTP/1.1\r\n\r\n"),
            Owner(0),
        ),
        (
            format!("GET /?sid=other_1&sid={sid20} HTTP/1.1\r\n\r\n"),
            Owner(1),
        ), // first wins
        ("GET /?&&sid=third-3 HTTP/1.0\r\n\r\n".to_string(), Owner(3)),
        (format!("GET /?sid={sid20}\r\n"), Owner(2)), // HTTP/0.9-style line end
        (big, Owner(2)),
        (
            "GET /?sid=NoSuchSession1234 HTTP/1.1\r\n\r\n".into(),
            Unknown,
        ),
        (format!("GET /?sid={}x HTTP/1.1\r\n\r\n", sid64), Invalid), // 65 bytes
        ("GET /?sid=abc.def HTTP/1.1\r\n\r\n".into(), Invalid),
        ("GET /?sid=ab%2Dcd HTTP/1.1\r\n\r\n".into(), Invalid), // percent-encoded value
        (format!("GET /?sid={sid20}"), Invalid), // line split: value not terminated yet
        ("GET /?sid= HTTP/1.1\r\n\r\n".into(), NoSid),
        ("GET /?sid=&EIO=4 HTTP/1.1\r\n\r\n".into(), NoSid),
        (
            "GET /?EIO=4&transport=polling HTTP/1.1\r\n\r\n".into(),
            NoSid,
        ),
        (format!("GET /?xsid={sid20} HTTP/1.1\r\n\r\n"), NoSid),
        (format!("GET /?SID={sid20} HTTP/1.1\r\n\r\n"), NoSid),
        (format!("GET /?%73id={sid20} HTTP/1.1\r\n\r\n"), NoSid),
        (format!("GET /sid={sid20}/x HTTP/1.1\r\n\r\n"), NoSid), // in the path
        (format!("GET /x#?sid={sid20} HTTP/1.1\r\n\r\n"), NoSid), // in the fragment
        (
            format!("GET /x HTTP/1.1\r\nCookie: sid={sid20}\r\n\r\n"),
            NoSid,
        ), // in a header
        ("GET /x?EIO=4&si".into(), NoSid),                       // request line split mid-name
        ("GET /socket.io/".into(), NoSid),
        ("GET".into(), NoSid),
        (long_path, NoSid),                          // sid beyond the 1 KiB window
        (late_sid, NoSid),                           // likewise, deep in the query
        ("GETPOSTPUTDELETEPATCH /".into(), NotHttp), // method longer than 15
        (" GET /?sid=x HTTP/1.1".into(), Ignored),
        ("get /?sid=x HTTP/1.1".into(), Ignored),
        ("\u{16}\u{3}\u{1}\u{2}\u{0}\u{1}".into(), Ignored), // TLS ClientHello start
        ("G\u{0}T /?sid=x".into(), NotHttp),
        ("".into(), Ignored), // pure ACK
    ];
    let mut failures = Vec::new();
    for (payload, want) in &cases {
        let got = h.run(v4(), payload.as_bytes());
        if got != *want {
            failures.push(format!(
                "{:?}: want {want:?}, got {got:?}",
                &payload[..payload.len().min(60)]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "parser outcomes differ:\n{}",
        failures.join("\n")
    );
}

/// The outcome the filter must give `payload`, according to the reference
/// model; owns the sid (worker 1) when the model finds one.
fn reference_outcome(h: &mut Harness, param: &str, payload: &[u8]) -> Outcome {
    if !payload.first().is_some_and(u8::is_ascii_uppercase) {
        return Ignored; // the filter's cheap exit: never a request line
    }
    match sticky_fuzz::parse(payload, param.as_bytes()) {
        Parse::Sid(sid) => {
            let mut key = SidKey {
                bytes: [0; sticky_common::SID_MAX],
            };
            key.bytes[..sid.len()].copy_from_slice(&sid);
            h.sessions
                .insert(HASHER.hash(&key), Session::registered(1), 0)
                .unwrap();
            Owner(1)
        }
        Parse::NoSid => NoSid,
        Parse::Invalid => Invalid,
        Parse::NotHttp => NotHttp,
    }
}

/// Runs fuzz inputs (selector byte + segment, see sticky-fuzz) through the
/// loaded filter; returns the disagreements with the reference model.
fn disagreements(h: &mut Harness, inputs: impl Iterator<Item = (String, Vec<u8>)>) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, input) in inputs {
        let Some((param, payload)) = sticky_fuzz::split_input(&input) else {
            continue;
        };
        h.set_param(param);
        let want = reference_outcome(h, param, payload);
        let got = h.run(v4(), payload);
        if got != want {
            failures.push(format!(
                "{name}: param {param:?}, {:?}: kernel {got:?}, reference {want:?}",
                String::from_utf8_lossy(&payload[..payload.len().min(80)])
            ));
        }
    }
    h.set_param("sid");
    failures
}

/// The committed fuzz corpus (crash inputs kept as regressions), plus the
/// corpus a `cargo xtask fuzz` run grew when it points
/// STICKY_FUZZ_CORPUS at it: the kernel build must agree with the
/// reference model that the host build was fuzzed against.
#[test]
fn fuzz_corpus_agrees_with_the_reference_parser() {
    // The workspace root without `..`: the kernel-matrix guest has the
    // corpus at this path but no sticky-ebpf directory.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let mut dirs = vec![root.join("fuzz/corpus")];
    dirs.extend(std::env::var_os("STICKY_FUZZ_CORPUS").map(Into::into));
    let mut inputs = Vec::new();
    for dir in &dirs {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            inputs.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    let mut h = Harness::new();
    let count = inputs.len();
    let failures = disagreements(&mut h, inputs.into_iter());
    println!(
        "fuzz corpus: {count} inputs run in the kernel, {} disagreements",
        failures.len()
    );
    assert!(count >= 10, "the committed corpus is missing");
    assert!(
        failures.is_empty(),
        "kernel and reference disagree:\n{}",
        failures.join("\n")
    );
}

#[test]
fn random_bytes_never_crash_or_trim() {
    let mut h = Harness::new();
    // xorshift: deterministic, no dependency.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"GETPOS /?&=#sidAZaz09_-.%\r\n\0\xff";
    let inputs: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|round| {
            let len = (next() % 1500) as usize;
            // Selector byte 0: the parameter "sid" (see sticky-fuzz).
            let mut input: Vec<u8> = std::iter::once(0)
                .chain((0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]))
                .collect();
            if round % 4 == 0 && len > 10 {
                input[1..11].copy_from_slice(b"GET /?sid=");
            } else if round % 2 == 0 && len > 8 {
                input[1..5].copy_from_slice(b"GET ");
            }
            (format!("round {round}"), input)
        })
        .collect();
    // Harness::run asserts the filter never trims.
    let routed_before = h.counter("filter_decisions");
    let failures = disagreements(&mut h, inputs.into_iter());
    assert!(
        failures.is_empty(),
        "kernel and reference disagree:\n{}",
        failures.join("\n")
    );
    let routed = h.counter("filter_decisions") - routed_before;
    println!("2000 random segments: {routed} carried a well-formed sid, all agreed");
    assert!(routed > 0, "no random segment exercised the sid path");
}

#[test]
fn ipv6_segments_and_custom_param_names() {
    let mut h = Harness::new();
    h.own("v6session", 3);
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    assert_eq!(h.run(v6, b"GET /?sid=v6session HTTP/1.1\r\n\r\n"), Owner(3));

    h.set_param("session_id");
    assert_eq!(h.run(v4(), b"GET /?sid=v6session HTTP/1.1\r\n\r\n"), NoSid);
    assert_eq!(
        h.run(v4(), b"GET /?a=1&session_id=v6session HTTP/1.1\r\n\r\n"),
        Owner(3)
    );
    assert_eq!(
        h.run(v4(), b"GET /?session_idx=v6session HTTP/1.1\r\n\r\n"),
        NoSid
    );
    h.set_param("abcdefghijklmno"); // 15 bytes: the longest name
    assert_eq!(
        h.run(v4(), b"GET /?abcdefghijklmno=v6session HTTP/1.1\r\n\r\n"),
        Owner(3)
    );
    assert_eq!(
        h.run(v4(), b"GET /?abcdefghijklmnO=v6session HTTP/1.1\r\n\r\n"),
        NoSid
    );
}
