/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Map keys, values and constants shared by the kernel programs and user space.
 *
 * User space mirrors every item here in `sticky-common` (Rust, #[repr(C)]);
 * `sticky-common`'s layout test compiles this header with the C compiler and
 * checks every size and offset against the Rust side. Change both together.
 *
 * Only fixed-width types, explicit padding, no bitfields.
 */
#ifndef STICKY_H
#define STICKY_H

#ifdef __BPF__
#include <linux/types.h>
#else
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
#endif

/* Workers occupy slots 0..STICKY_MAX_WORKERS-1 of the listener sockarray. */
#define STICKY_MAX_WORKERS 256
/*
 * One sorting listener (TCP_DEFER_ACCEPT + socket filter) per CPU takes the
 * SYNs processed on that CPU: slot STICKY_SORTING_SLOT + cpu. Its rotation
 * runs on a thread pinned to that CPU, so it never races the softirq work
 * of that CPU (a child completing on a listener being shut is reset).
 */
#define STICKY_MAX_CPUS 256
#define STICKY_SORTING_SLOT STICKY_MAX_WORKERS
/* The supervisor's own listener, answering 503 when no worker is alive. */
#define STICKY_REJECT_SLOT (STICKY_MAX_WORKERS + STICKY_MAX_CPUS)
/*
 * The sink: a listener whose socket filter drops everything. A pure ACK
 * carrying a SYN cookie is sent there and vanishes without a child or a
 * RST (see sticky_select), so the connection is made by its first data.
 */
#define STICKY_SINK_SLOT (STICKY_REJECT_SLOT + 1)
/*
 * The overflow listener: a sorting listener with a backlog of 0, never
 * rotated by doorbells. During a SYN flood (config.flood) every SYN goes
 * there; its request queue is always full, so the kernel answers with SYN
 * cookies instead of keeping request sockets, and the selector places each
 * cookie connection on its first data segment.
 */
#define STICKY_OVERFLOW_SLOT (STICKY_SINK_SLOT + 1)
/*
 * Cookie mode's plug slot: where the next overflow listener waits while
 * the supervisor's plugs (client sockets that never answer, from client
 * ports config.plug_port ..) fill its request queue, before it becomes the
 * overflow listener: from then on every SYN reaching it is answered with a
 * cookie (see plug.rs). In cookie mode the two slots alternate
 * (config.overflow_alt, config.plug_alt).
 */
#define STICKY_PLUG_SLOT (STICKY_OVERFLOW_SLOT + 1)
/*
 * Plugs per cookie-mode overflow listener, from client ports plug_port ..
 * plug_port + STICKY_PLUGS - 1; its backlog is STICKY_PLUGS - 1, so that
 * connections the kernel must still give a request socket (a SYN reusing a
 * TIME_WAIT connection's ports skips the cookie check) can wait there for
 * the supervisor without filling its accept queue.
 */
#define STICKY_PLUGS 17
#define STICKY_SLOTS (STICKY_PLUG_SLOT + 1)

/* Session ids: 1..64 bytes of [A-Za-z0-9_-], zero padded in the map key. */
#define STICKY_SID_MAX 64
/* Query parameter name plus its '=': at most 16 bytes (compared as 2 words). */
#define STICKY_PARAM_MAX 16
/* How many bytes of the first data segment the parser looks at. Power of 2. */
#define STICKY_SCAN_MAX 1024

#define STICKY_NO_WORKER 0xffffffffu

#define STICKY_SESSIONS_MAX (1u << 20)
/* Upper bounds; user space sizes `flows` and `placed_flows` by CPUs. */
#define STICKY_FLOWS_MAX 65536

enum sticky_balance {
	STICKY_BALANCE_RANDOM = 0,
	STICKY_BALANCE_ROUND_ROBIN = 1,
	STICKY_BALANCE_LEAST_CONNECTION = 2,
};

enum sticky_mode {
	/* Every SYN goes to the sorting listener; placement by sid. */
	STICKY_MODE_STICKY = 0,
	/* Benchmark floor: balance at SYN time, no stickiness, no sorting. */
	STICKY_MODE_SYN_BALANCE = 1,
	/*
	 * Every SYN to the overflow listener, answered with a SYN cookie; the
	 * first data segment is placed by sid in softirq (the cookie path):
	 * no request socket, no rotation, no user-space step per connection.
	 */
	STICKY_MODE_COOKIE = 2,
};

/* The one entry of the `config` array map, written by user space. */
struct sticky_config {
	__u32 worker_count; /* slots 0..worker_count-1 may hold workers */
	__u32 balance;      /* enum sticky_balance */
	__u32 mode;         /* enum sticky_mode */
	__u32 param_len;    /* length of "name=" in param_word, 2..16 */
	__u32 sorting_count; /* sorting slots in use, one per CPU */
	__u32 flood;         /* 1: SYNs go to the overflow listener */
	/* "name=" as two little words, masked by param_mask: no loop to compare. */
	__u64 param_word[2];
	__u64 param_mask[2];
	__u32 port;  /* the listening port, host byte order (sticky_learn) */
	__u32 learn; /* 1: learn sessions from the workers' answers */
	__u32 plug_port; /* cookie mode: SYNs from client ports plug_port.. (STICKY_PLUGS, host order) are plugs; 0: none */
	__u32 foreign; /* enum sticky_foreign: what sticky_watch does with one */
	/*
	 * Cookie mode: the overflow and plug slots alternate. overflow_alt 1:
	 * the overflow listener is in STICKY_PLUG_SLOT; plug_alt 1: plugs go
	 * to STICKY_OVERFLOW_SLOT. A fresh listener is plugged in the slot not
	 * taking SYNs, then overflow_alt flips to it; plugs keep going there.
	 */
	__u16 overflow_alt;
	__u16 plug_alt;
	__u32 pad;
	/*
	 * The SipHash key of the `sessions` map's keys (siphash.h):
	 * random, chosen at start (kept by a supervisor adopting the maps).
	 */
	__u64 sid_key[2];
};

/*
 * A foreign request: on a connection placed on worker A, a request line
 * whose sid is owned by another live worker B (a browser or a proxy reused
 * a keep-alive connection). RESET: sticky_watch drops it and every later
 * segment of that connection, and asks user space (the `resets` ring) to
 * destroy the socket, so the client resends it on a new connection. PASS:
 * counted only (no socket destroy on this kernel, or `pass` asked). OFF:
 * not looked for at all.
 */
enum sticky_foreign {
	STICKY_FOREIGN_PASS = 0,
	STICKY_FOREIGN_RESET = 1,
	/* Not even looked at: no socket storage, as before (benchmark control). */
	STICKY_FOREIGN_OFF = 2,
};

/*
 * Values of sticky_worker.live. A reload (`sticky reload`) starts a new
 * generation of workers in other slots and marks the old ones DRAINING:
 * requests carrying their sids still reach them, balancing skips them.
 */
#define STICKY_WORKER_DOWN 0
#define STICKY_WORKER_ACCEPTING 1 /* takes its sessions and new ones */
#define STICKY_WORKER_DRAINING 2  /* takes its own sessions only */

/* One entry per worker slot of the `workers` array map, written by user space. */
struct sticky_worker {
	__u32 live;     /* STICKY_WORKER_*: nonzero while the process runs */
	__u32 sessions; /* live sessions it owns, for least-connection */
};

/*
 * A sid zero padded, the message hashed into the key of the `sessions`
 * map: a __u64, sticky_sid_hash() in siphash.h.
 */
struct sticky_sid {
	__u8 bytes[STICKY_SID_MAX];
};

/*
 * Key of the `flows` LRU map: the socket filter's decision for a connection
 * queued on the sorting listener, looked up when that child is migrated.
 * Addresses in network byte order; IPv4 (also IPv4-mapped IPv6) uses word 0
 * only, family AF_INET. The local port is the same for every listener.
 */
struct sticky_flow {
	__u32 local[4];
	__u32 remote[4];
	__u16 remote_port; /* network byte order */
	__u16 family;
};

/*
 * Value of the `flows` LRU map: the decision for one connection, taken on its
 * first data segment only. A queued child keeps the sorting listener's
 * socket filter, so it sees every later segment too (headers written
 * separately, pipelined requests): those must not change the decision.
 * A connection is told apart from a later one on the same 4-tuple by the
 * ACK its client sends, the server's ISN + 1, constant until the server
 * sends data, which it cannot do before the child is accepted; its first
 * data segment by `seq` (a retransmission of it repeats the same seq).
 */
struct sticky_decision {
	__u32 owner;    /* worker index, or STICKY_NO_WORKER: balance */
	__u32 placed;   /* 1 once the selector has used it: later segments skip */
	__u32 ack;      /* TCP ack of the first data segment, network order */
	__u32 seq;      /* TCP seq of the first data segment, network order */
	__u32 with_sid; /* 1: the request named a sid (see sticky_placed) */
};

/*
 * One entry per sorting CPU of the `handoff` array map, mmapped by user
 * space. It closes the one race per-CPU rotation leaves: a connection whose
 * SYN was processed on CPU c (its request socket lives on c's sorting
 * listener) but whose first data segment is processed on CPU d != c, while
 * c's sorter shuts that listener: the kernel would reset the new child.
 * Dekker-style, both sides write their flag with a full barrier, then read
 * the other's:
 * - sticky_sort on CPU d stores busy_ns = now, then reads closing: if set,
 *   it drops the segment (the client retransmits it, and it then migrates
 *   from the closed listener in softirq);
 * - the sorter stores closing = 1, then reads busy_ns; while it is not yet
 *   STICKY_HANDOFF_GRACE_NS old, it clears closing, sleeps and tries again
 *   (after 10 ms it keeps closing set and waits); then it shuts the
 *   listener and stores closing = 0.
 */
struct sticky_handoff {
	__u64 closing;
	__u64 busy_ns; /* bpf_ktime_get_ns(), i.e. CLOCK_MONOTONIC */
};
/*
 * 5 ms: measured, not derived. Under emulation (the kernel matrix) 100 us
 * let a few children per thousand complete after the shutdown, which the
 * kernel answers with a reset; 5 ms showed none. The sorter sleeps, not
 * spins, through it, with `closing` clear (see close_handoff in sorter.rs).
 */
#define STICKY_HANDOFF_GRACE_NS 5000000

/*
 * Value of the `placed_flows` LRU map (key: struct sticky_flow): which worker
 * a connection was placed on, so that sticky_learn can attribute the
 * Engine.IO open packet it finds in that worker's answer.
 *
 * `segments` starts at STICKY_LEARN_SEGMENTS, the search done before it
 * began, when the placing request named a sid (valid or not) and the
 * foreign-request check is on: only a request without a sid is a
 * handshake, so only its answer carries an open packet, and a handshake
 * later on the same connection is learned through the connection's
 * storage (STICKY_CONN_LEARN), as on any reused connection. Without the
 * check connections have no storage: the search runs as before.
 */
struct sticky_placed {
	__u32 worker;
	__u32 segments; /* answer segments looked at so far */
	__u32 idle;     /* 1: placed without data (TCP_DEFER_ACCEPT gave up) */
};
#define STICKY_PLACED_MAX 65536
/* Answer segments of a connection searched for an open packet. */
#define STICKY_LEARN_SEGMENTS 4
/* Bytes of each such segment searched. Power of 2. */
#define STICKY_LEARN_SCAN 512

/*
 * Value of the `sessions` hash map (key: the sid's hash, siphash.h): the
 * worker owning the session, and how it came. Registered over the control
 * socket (registered 1): user space adds and removes it, it never expires.
 * Learned by sticky_learn from a worker's answer (registered 0):
 * sticky_watch (and the placement paths) refresh last_seen whenever a
 * request carries the sid; 0 means the client closed the session. User
 * space forgets idle and closed ones. One map for both: each entry costs
 * the kernel's hash element header (about 56 bytes) once.
 */
struct sticky_session {
	__u32 worker;
	__u32 registered;   /* 1: registered by its worker; 0: learned */
	__u64 last_seen_ns; /* learned: bpf_ktime_get_ns(); 0: closed */
};

/*
 * Value of the `conns` socket storage (BPF_MAP_TYPE_SK_STORAGE) of every
 * accepted connection of the port: its worker, for as long as the socket
 * lives (no LRU). Written from `placed_flows` the first time sticky_learn
 * sees the worker answer on it (or, for a connection placed without data,
 * when sticky_watch sees its first request).
 */
struct sticky_conn {
	__u32 worker;
	__u32 flags;    /* STICKY_CONN_* */
	__u32 segments; /* answer segments searched since STICKY_CONN_LEARN was set */
	__u32 pad;
};
/* A foreign request was dropped: drop every later segment, reset pending. */
#define STICKY_CONN_DOOMED 1
/* The worker answered 101 Switching Protocols: never parsed again. */
#define STICKY_CONN_UPGRADED 2
/*
 * A request without a sid (maybe an Engine.IO handshake) on a connection
 * past its first answers: search the next STICKY_LEARN_SEGMENTS answer
 * segments for an open packet, as on a new connection.
 */
#define STICKY_CONN_LEARN 4

/* An entry of the `resets` ring buffer: a connection for user space to destroy. */
struct sticky_reset {
	__u64 cookie;            /* SO_COOKIE of the connection */
	struct sticky_flow flow; /* local = the server; IPv4-mapped as IPv4 */
	__u32 worker;            /* the connection's worker */
	__u32 owner;             /* the worker owning the request's sid; STICKY_NO_WORKER:
				  * a request without a sid to a draining worker */
};
#define STICKY_RESETS_BYTES (64 * 1024)

/* Size of each sorting CPU's doorbell ring (see `doorbells`). */
#define STICKY_DOORBELL_BYTES 4096

/* Entries of the `syn_slot` array: per client port, the sorting slot index
 * (CPU) its last SYN went to, or STICKY_NO_WORKER once placed. */
#define STICKY_PORTS 65536

/* Indices of the `counters` per-CPU array map. */
enum sticky_counter {
	STICKY_CNT_SYN = 0,          /* SYNs sent to the sorting listener */
	STICKY_CNT_PLACED_SOFTIRQ,   /* placed on first data segment, in softirq */
	STICKY_CNT_PLACED_QUEUE,     /* migrated from the sorting queue */
	STICKY_CNT_ABSORBED,         /* pure ACK / timer of a request, re-homed */
	STICKY_CNT_BY_SID,           /* placed on the owner of its sid */
	STICKY_CNT_BALANCED,         /* placed by the balancing method */
	STICKY_CNT_REJECTED,         /* no live worker: sent to the 503 listener */
	STICKY_CNT_SID_UNKNOWN,      /* well-formed sid that no worker owns */
	STICKY_CNT_SID_INVALID,      /* sid parameter present but malformed */
	STICKY_CNT_NO_SID,           /* HTTP request line without a sid */
	STICKY_CNT_NOT_HTTP,         /* first bytes are not an HTTP request line */
	STICKY_CNT_SELECT_FAILED,    /* bpf_sk_select_reuseport refused a slot */
	STICKY_CNT_FILTER_DECISIONS, /* decisions recorded by the socket filter */
	STICKY_CNT_SYN_BALANCED,     /* SYN_BALANCE mode placements */
	STICKY_CNT_CROSS_CPU,        /* first data on another CPU than its SYN */
	STICKY_CNT_HANDOFF_DROPS,    /* of those, dropped during a rotation */
	STICKY_CNT_LEARNED,          /* sessions learned from open packets */
	STICKY_CNT_LEARN_KNOWN,      /* open packets for an already known sid */
	STICKY_CNT_LEARN_FULL,       /* open packets not learned: sessions map full */
	STICKY_CNT_PLACED_COOKIE,    /* syncookie connections placed on first data */
	STICKY_CNT_LEARN_CLOSED,     /* learned sessions closed by their client */
	STICKY_CNT_FOREIGN_DROPPED,  /* foreign requests dropped, reset asked */
	STICKY_CNT_FOREIGN_PASSED,   /* foreign requests passed (PASS, ring full) */
	STICKY_CNT_DOOMED_SEGMENTS,  /* later segments of doomed connections dropped */
	STICKY_CNT_UNMAPPED,         /* sid requests on a connection of unknown worker */
	STICKY_CNT_DRAIN_DROPPED,    /* no-sid requests to a draining worker dropped, reset asked */
	STICKY_COUNTERS,
};

/* Parser outcomes (sticky_parse in parse.h). */
enum sticky_parse_result {
	STICKY_PARSE_SID = 0,
	STICKY_PARSE_NO_SID,
	STICKY_PARSE_INVALID,
	STICKY_PARSE_NOT_HTTP,
};

/*
 * --placement bpf-cookie (reqsk.bpf.c): the one entry of `reqsk_config`.
 * SYN cookies of sticky's own, answered by a tc ingress program; the
 * first data segment gets a request socket from bpf_sk_assign_tcp_reqsk()
 * and is then placed by sticky_select like a kernel cookie's.
 */
#define STICKY_REQSK_KEYS 2 /* the current cookie key, then the previous one */
/* Bits of sticky_reqsk_config.options: what the stack's sysctls allow. */
#define STICKY_REQSK_WSCALE 1     /* net.ipv4.tcp_window_scaling */
#define STICKY_REQSK_SACK 2       /* net.ipv4.tcp_sack */
#define STICKY_REQSK_TIMESTAMPS 4 /* net.ipv4.tcp_timestamps */
#define STICKY_REQSK_ECN 8        /* net.ipv4.tcp_ecn 1 or 2: accept it */
#define STICKY_REQSK_IPV4 16      /* the listeners take IPv4 (an IPv4 or a dual-stack address) */
#define STICKY_REQSK_IPV6 32      /* the listeners take IPv6 */
struct sticky_reqsk_config {
	__u32 port;  /* the listening port, host byte order */
	__u32 addr4; /* the listening IPv4 address, network order; 0: any */
	__u32 options;    /* STICKY_REQSK_* bits */
	__u32 rcv_wscale; /* the window scale sticky's SYN-ACK announces */
	__u32 addr6[4];   /* the listening IPv6 address, network order; all 0: any */
	__u64 key[STICKY_REQSK_KEYS][2]; /* SipHash keys, rotated by user space */
};

/* Indices of the `reqsk_counters` per-CPU array map. */
enum sticky_reqsk_counter {
	STICKY_REQSK_SYN_ANSWERED = 0, /* SYNs answered with a cookie SYN-ACK */
	STICKY_REQSK_SYN_PASSED,       /* SYNs left to the stack (a socket has the 4-tuple, TFO, options) */
	STICKY_REQSK_ACK_ABSORBED,     /* cookie ACKs without data, dropped */
	STICKY_REQSK_ASSIGNED,         /* first data segments given a request socket */
	STICKY_REQSK_FORGED,           /* ACKs to no connection with a wrong cookie, dropped */
	STICKY_REQSK_ASSIGN_FAILED,    /* bpf_sk_assign_tcp_reqsk() refused (dropped) */
	STICKY_REQSK_COUNTERS,
};

#endif /* STICKY_H */
