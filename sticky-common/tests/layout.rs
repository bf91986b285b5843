//! Proves the Rust mirror and `sticky.h` agree: compiles a C program that
//! prints every size, offset and constant of the header, and compares.

use std::{collections::HashMap, mem::offset_of, path::PathBuf, process::Command};

use sticky_common::*;

const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include "sticky.h"
#define S(t) printf("sizeof %s %zu\n", #t, sizeof(struct t));
#define O(t, f) printf("offset %s.%s %zu\n", #t, #f, offsetof(struct t, f));
#define C(c) printf("const %s %llu\n", #c, (unsigned long long)(c));
int main(void) {
    S(sticky_config) O(sticky_config, worker_count) O(sticky_config, balance)
    O(sticky_config, mode) O(sticky_config, param_len) O(sticky_config, sorting_count) O(sticky_config, flood) O(sticky_config, param_word)
    O(sticky_config, param_mask) O(sticky_config, port) O(sticky_config, learn) O(sticky_config, plug_port) O(sticky_config, overflow_alt) O(sticky_config, plug_alt) O(sticky_config, sid_key)
    O(sticky_config, foreign) C(STICKY_FOREIGN_PASS) C(STICKY_FOREIGN_RESET) C(STICKY_FOREIGN_OFF)
    S(sticky_placed) O(sticky_placed, worker) O(sticky_placed, segments) O(sticky_placed, idle)
    S(sticky_conn) O(sticky_conn, worker) O(sticky_conn, flags) O(sticky_conn, segments)
    C(STICKY_CONN_DOOMED) C(STICKY_CONN_UPGRADED) C(STICKY_CONN_LEARN)
    S(sticky_reset) O(sticky_reset, cookie) O(sticky_reset, flow) O(sticky_reset, worker)
    O(sticky_reset, owner) C(STICKY_RESETS_BYTES)
    S(sticky_decision) O(sticky_decision, owner) O(sticky_decision, placed)
    O(sticky_decision, ack) O(sticky_decision, seq) O(sticky_decision, with_sid)
    S(sticky_session) O(sticky_session, worker) O(sticky_session, registered) O(sticky_session, last_seen_ns)
    C(STICKY_PLACED_MAX) C(STICKY_LEARN_SEGMENTS) C(STICKY_LEARN_SCAN)
    S(sticky_worker) O(sticky_worker, live) O(sticky_worker, sessions)
    S(sticky_sid)
    S(sticky_handoff) O(sticky_handoff, closing) O(sticky_handoff, busy_ns)
    C(STICKY_HANDOFF_GRACE_NS) C(STICKY_DOORBELL_BYTES)
    S(sticky_flow) O(sticky_flow, local) O(sticky_flow, remote)
    O(sticky_flow, remote_port) O(sticky_flow, family)
    C(STICKY_MAX_WORKERS) C(STICKY_MAX_CPUS) C(STICKY_SORTING_SLOT) C(STICKY_REJECT_SLOT) C(STICKY_SINK_SLOT) C(STICKY_OVERFLOW_SLOT) C(STICKY_PLUG_SLOT) C(STICKY_PLUGS) C(STICKY_SLOTS)
    C(STICKY_SID_MAX) C(STICKY_PARAM_MAX) C(STICKY_SCAN_MAX) C(STICKY_NO_WORKER)
    C(STICKY_WORKER_DOWN) C(STICKY_WORKER_ACCEPTING) C(STICKY_WORKER_DRAINING)
    C(STICKY_SESSIONS_MAX) C(STICKY_FLOWS_MAX) C(STICKY_COUNTERS)
    C(STICKY_BALANCE_RANDOM) C(STICKY_BALANCE_ROUND_ROBIN) C(STICKY_BALANCE_LEAST_CONNECTION)
    C(STICKY_MODE_STICKY) C(STICKY_MODE_SYN_BALANCE) C(STICKY_MODE_COOKIE)
    C(STICKY_CNT_SYN) C(STICKY_CNT_PLACED_SOFTIRQ) C(STICKY_CNT_PLACED_QUEUE)
    C(STICKY_CNT_BY_SID) C(STICKY_CNT_BALANCED) C(STICKY_CNT_REJECTED) C(STICKY_CNT_PLACED_COOKIE)
    C(STICKY_CNT_FOREIGN_DROPPED) C(STICKY_CNT_FOREIGN_PASSED) C(STICKY_CNT_DOOMED_SEGMENTS)
    C(STICKY_CNT_UNMAPPED) C(STICKY_CNT_LEARNED)
    S(sticky_reqsk_config) O(sticky_reqsk_config, port) O(sticky_reqsk_config, addr4)
    O(sticky_reqsk_config, options) O(sticky_reqsk_config, rcv_wscale) O(sticky_reqsk_config, addr6) O(sticky_reqsk_config, key)
    C(STICKY_REQSK_KEYS) C(STICKY_REQSK_WSCALE) C(STICKY_REQSK_SACK) C(STICKY_REQSK_TIMESTAMPS)
    C(STICKY_REQSK_ECN) C(STICKY_REQSK_IPV4) C(STICKY_REQSK_IPV6) C(STICKY_REQSK_COUNTERS)
    return 0;
}
"#;

fn c_layout() -> HashMap<String, u64> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sticky-ebpf/include");
    let src = dir.join("layout_probe.c");
    let bin = dir.join("layout_probe");
    std::fs::write(&src, PROBE).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .status()
        .expect("a C compiler (cc) is needed to check the header layout");
    assert!(status.success(), "compiling the layout probe failed");
    let out = Command::new(&bin).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut parts = l.split(' ');
            let (_, name, value) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn rust_mirror_matches_sticky_h() {
    let c = c_layout();
    let expect = |name: &str, rust: usize| {
        assert_eq!(
            c[name], rust as u64,
            "{name}: C says {}, Rust says {rust}",
            c[name]
        );
    };
    expect("sticky_config", size_of::<Config>());
    expect(
        "sticky_config.worker_count",
        offset_of!(Config, worker_count),
    );
    expect("sticky_config.balance", offset_of!(Config, balance));
    expect("sticky_config.mode", offset_of!(Config, mode));
    expect("sticky_config.param_len", offset_of!(Config, param_len));
    expect(
        "sticky_config.sorting_count",
        offset_of!(Config, sorting_count),
    );
    expect("sticky_config.flood", offset_of!(Config, flood));
    expect("sticky_config.param_word", offset_of!(Config, param_word));
    expect("sticky_config.param_mask", offset_of!(Config, param_mask));
    expect("sticky_config.port", offset_of!(Config, port));
    expect("sticky_config.learn", offset_of!(Config, learn));
    expect("sticky_config.plug_port", offset_of!(Config, plug_port));
    expect(
        "sticky_config.overflow_alt",
        offset_of!(Config, overflow_alt),
    );
    expect("sticky_config.plug_alt", offset_of!(Config, plug_alt));
    expect("sticky_config.sid_key", offset_of!(Config, sid_key));
    expect("sticky_placed", size_of::<Placed>());
    expect("sticky_placed.worker", offset_of!(Placed, worker));
    expect("sticky_placed.segments", offset_of!(Placed, segments));
    expect("sticky_placed.idle", offset_of!(Placed, idle));
    expect("sticky_config.foreign", offset_of!(Config, foreign));
    expect("STICKY_FOREIGN_PASS", Foreign::Pass as usize);
    expect("STICKY_FOREIGN_RESET", Foreign::Reset as usize);
    expect("STICKY_FOREIGN_OFF", Foreign::Off as usize);
    expect("sticky_conn", size_of::<Conn>());
    expect("sticky_conn.worker", offset_of!(Conn, worker));
    expect("sticky_conn.flags", offset_of!(Conn, flags));
    expect("sticky_conn.segments", offset_of!(Conn, segments));
    expect("STICKY_CONN_LEARN", CONN_LEARN as usize);
    expect("STICKY_CONN_DOOMED", CONN_DOOMED as usize);
    expect("STICKY_CONN_UPGRADED", CONN_UPGRADED as usize);
    expect("sticky_reset", size_of::<ResetEvent>());
    expect("sticky_reset.cookie", offset_of!(ResetEvent, cookie));
    expect("sticky_reset.flow", offset_of!(ResetEvent, flow));
    expect("sticky_reset.worker", offset_of!(ResetEvent, worker));
    expect("sticky_reset.owner", offset_of!(ResetEvent, owner));
    expect("STICKY_RESETS_BYTES", RESETS_BYTES as usize);
    expect("sticky_decision", size_of::<Decision>());
    expect("sticky_decision.owner", offset_of!(Decision, owner));
    expect("sticky_decision.placed", offset_of!(Decision, placed));
    expect("sticky_decision.ack", offset_of!(Decision, ack));
    expect("sticky_decision.seq", offset_of!(Decision, seq));
    expect("sticky_decision.with_sid", offset_of!(Decision, with_sid));
    expect("sticky_session", size_of::<Session>());
    expect("sticky_session.worker", offset_of!(Session, worker));
    expect("sticky_session.registered", offset_of!(Session, registered));
    expect(
        "sticky_session.last_seen_ns",
        offset_of!(Session, last_seen_ns),
    );
    expect("STICKY_PLACED_MAX", PLACED_MAX as usize);
    expect("STICKY_LEARN_SEGMENTS", LEARN_SEGMENTS as usize);
    expect("STICKY_LEARN_SCAN", LEARN_SCAN);
    expect("sticky_worker", size_of::<WorkerState>());
    expect("sticky_worker.live", offset_of!(WorkerState, live));
    expect("sticky_worker.sessions", offset_of!(WorkerState, sessions));
    expect("sticky_sid", size_of::<SidKey>());
    expect("sticky_handoff", size_of::<Handoff>());
    expect("sticky_handoff.closing", offset_of!(Handoff, closing));
    expect("sticky_handoff.busy_ns", offset_of!(Handoff, busy_ns));
    expect("STICKY_HANDOFF_GRACE_NS", HANDOFF_GRACE_NS as usize);
    expect("STICKY_DOORBELL_BYTES", DOORBELL_BYTES as usize);
    expect("sticky_reqsk_config", size_of::<ReqskConfig>());
    expect("sticky_reqsk_config.port", offset_of!(ReqskConfig, port));
    expect("sticky_reqsk_config.addr4", offset_of!(ReqskConfig, addr4));
    expect(
        "sticky_reqsk_config.options",
        offset_of!(ReqskConfig, options),
    );
    expect(
        "sticky_reqsk_config.rcv_wscale",
        offset_of!(ReqskConfig, rcv_wscale),
    );
    expect("sticky_reqsk_config.addr6", offset_of!(ReqskConfig, addr6));
    expect("sticky_reqsk_config.key", offset_of!(ReqskConfig, key));
    expect("STICKY_REQSK_IPV4", REQSK_IPV4 as usize);
    expect("STICKY_REQSK_IPV6", REQSK_IPV6 as usize);
    expect("STICKY_REQSK_KEYS", REQSK_KEYS);
    expect("STICKY_REQSK_WSCALE", REQSK_WSCALE as usize);
    expect("STICKY_REQSK_SACK", REQSK_SACK as usize);
    expect("STICKY_REQSK_TIMESTAMPS", REQSK_TIMESTAMPS as usize);
    expect("STICKY_REQSK_ECN", REQSK_ECN as usize);
    expect("STICKY_REQSK_COUNTERS", REQSK_COUNTER_NAMES.len());
    expect("sticky_flow", size_of::<FlowKey>());
    expect("sticky_flow.local", offset_of!(FlowKey, local));
    expect("sticky_flow.remote", offset_of!(FlowKey, remote));
    expect("sticky_flow.remote_port", offset_of!(FlowKey, remote_port));
    expect("sticky_flow.family", offset_of!(FlowKey, family));

    expect("STICKY_MAX_WORKERS", MAX_WORKERS as usize);
    expect("STICKY_MAX_CPUS", MAX_CPUS as usize);
    expect("STICKY_SORTING_SLOT", SORTING_SLOT as usize);
    expect("STICKY_REJECT_SLOT", REJECT_SLOT as usize);
    expect("STICKY_SINK_SLOT", SINK_SLOT as usize);
    expect("STICKY_OVERFLOW_SLOT", OVERFLOW_SLOT as usize);
    expect("STICKY_PLUG_SLOT", PLUG_SLOT as usize);
    expect("STICKY_PLUGS", PLUGS as usize);
    expect("STICKY_SLOTS", SLOTS as usize);
    expect("STICKY_SID_MAX", SID_MAX);
    expect("STICKY_PARAM_MAX", PARAM_MAX);
    expect("STICKY_SCAN_MAX", SCAN_MAX);
    expect("STICKY_NO_WORKER", NO_WORKER as usize);
    expect("STICKY_WORKER_DOWN", WORKER_DOWN as usize);
    expect("STICKY_WORKER_ACCEPTING", WORKER_ACCEPTING as usize);
    expect("STICKY_WORKER_DRAINING", WORKER_DRAINING as usize);
    expect("STICKY_SESSIONS_MAX", SESSIONS_MAX as usize);
    expect("STICKY_FLOWS_MAX", FLOWS_MAX as usize);
    expect("STICKY_COUNTERS", COUNTERS.len());
    expect("STICKY_BALANCE_RANDOM", Balance::Random as usize);
    expect("STICKY_BALANCE_ROUND_ROBIN", Balance::RoundRobin as usize);
    expect(
        "STICKY_BALANCE_LEAST_CONNECTION",
        Balance::LeastConnection as usize,
    );
    expect("STICKY_MODE_STICKY", Mode::Sticky as usize);
    expect("STICKY_MODE_SYN_BALANCE", Mode::SynBalance as usize);
    expect("STICKY_MODE_COOKIE", Mode::Cookie as usize);
    expect("STICKY_CNT_SYN", counter::SYN as usize);
    expect(
        "STICKY_CNT_PLACED_SOFTIRQ",
        counter::PLACED_SOFTIRQ as usize,
    );
    expect("STICKY_CNT_PLACED_QUEUE", counter::PLACED_QUEUE as usize);
    expect("STICKY_CNT_BY_SID", counter::BY_SID as usize);
    expect("STICKY_CNT_BALANCED", counter::BALANCED as usize);
    expect("STICKY_CNT_REJECTED", counter::REJECTED as usize);
    expect("STICKY_CNT_PLACED_COOKIE", counter::PLACED_COOKIE as usize);
    expect(
        "STICKY_CNT_FOREIGN_DROPPED",
        counter::FOREIGN_DROPPED as usize,
    );
    expect(
        "STICKY_CNT_FOREIGN_PASSED",
        counter::FOREIGN_PASSED as usize,
    );
    expect(
        "STICKY_CNT_DOOMED_SEGMENTS",
        counter::DOOMED_SEGMENTS as usize,
    );
    expect("STICKY_CNT_UNMAPPED", counter::UNMAPPED as usize);
    expect("STICKY_CNT_LEARNED", counter::LEARNED as usize);
}

#[test]
fn sid_hash_is_siphash_2_4_and_matches_the_vectors() {
    // The SipHash paper's example: key 00..0f, message 00..0e.
    let paper: Vec<u8> = (0..15).collect();
    assert_eq!(siphash24(SID_HASH_TEST_KEY, &paper), 0xa129ca6149be45e5);
    // Against an independent implementation, every length up to 80.
    let msg: Vec<u8> = (0..80).map(|i| (i * 7 + 3) as u8).collect();
    for len in 0..=msg.len() {
        #[allow(deprecated)]
        let mut std = std::hash::SipHasher::new_with_keys(0x1234, 0xfedc_ba98_7654_3210);
        std::hash::Hasher::write(&mut std, &msg[..len]);
        assert_eq!(
            siphash24([0x1234, 0xfedc_ba98_7654_3210], &msg[..len]),
            std::hash::Hasher::finish(&std),
            "length {len}"
        );
    }
    let hasher = SidHasher {
        key: SID_HASH_TEST_KEY,
    };
    for &(sid, want) in SID_HASH_VECTORS {
        let got = hasher.key_of(sid).unwrap();
        println!("sid {sid:?}: {got:#018x}");
        assert_eq!(got, want, "{sid}");
    }
    let other = SidHasher { key: [1, 2] };
    assert_ne!(other.key_of("sid").unwrap(), hasher.key_of("sid").unwrap());
}

#[test]
fn sid_keys_are_validated_and_zero_padded() {
    let k = SidKey::new("abc_DEF-019").unwrap();
    assert_eq!(k.as_str(), "abc_DEF-019");
    assert!(k.bytes[11..].iter().all(|&b| b == 0));
    assert_eq!(SidKey::new(""), Err(SidError::Empty));
    assert_eq!(SidKey::new(&"a".repeat(65)), Err(SidError::TooLong));
    assert!(SidKey::new(&"a".repeat(64)).is_ok());
    assert_eq!(SidKey::new("a.b"), Err(SidError::BadByte));
    assert_eq!(SidKey::new("a b"), Err(SidError::BadByte));
}

#[test]
fn param_words_hold_name_and_equals_sign() {
    let c = Config::new(3, 2, Balance::RoundRobin, Mode::Sticky, "sid");
    assert_eq!(c.param_len, 4);
    assert_eq!(&c.param_word[0].to_ne_bytes()[..4], b"sid=");
    assert_eq!(
        c.param_mask[0].to_ne_bytes(),
        [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]
    );
    assert_eq!(c.param_mask[1], 0);
    let long = Config::new(1, 1, Balance::Random, Mode::Sticky, "abcdefghijklmno");
    assert_eq!(long.param_len, 16);
    assert_eq!(long.param_mask, [u64::MAX, u64::MAX]);
}
