// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * Steering: the two programs that place every TCP connection on the listener
 * of the worker owning its session.
 *
 * - sticky_select (SK_REUSEPORT, select-or-migrate) makes every placement:
 *   SYN -> the sorting listener; a request socket migrating with its first
 *   data segment -> parse the sid here and pick the owner (softirq path);
 *   a queued child migrating at rotation -> the socket filter's decision
 *   (queue path); a non-SYN segment with no socket at all (SYN cookies) ->
 *   the sink if it is a pure ACK, else parse and pick the owner (cookie
 *   path); during a SYN flood (config.flood), and always in cookie mode,
 *   SYN -> the overflow listener.
 * - sticky_sort (SOCKET_FILTER on the sorting listeners, inherited by their
 *   children) records that decision from the first data segment.
 *
 * Invariants:
 * - sticky_sort never trims, and drops only a first data segment that
 *   would race a rotation on another CPU (struct sticky_handoff): the
 *   client retransmits it. Otherwise it returns the full length.
 * - sticky_select always selects a slot explicitly; if nothing else works it
 *   selects the 503 listener. Returning SK_PASS without a selection would let
 *   the kernel pick any socket of the group by hash, including the spare
 *   sorting listener.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sticky.h"
#include "parse.h"

#define AF_INET 2
#define AF_INET6 10
/* Request sockets report this state (include/net/tcp_states.h). */
#define TCP_NEW_SYN_RECV 12
#define EEXIST 17


char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, STICKY_SLOTS);
	__type(key, __u32);
	__type(value, __u32); /* aya expects 4-byte values here */
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sticky_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STICKY_MAX_WORKERS);
	__type(key, __u32);
	__type(value, struct sticky_worker);
} workers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, STICKY_SESSIONS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64); /* sticky_sid_hash() of the sid */
	__type(value, struct sticky_session);
} sessions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STICKY_FLOWS_MAX);
	__type(key, struct sticky_flow);
	__type(value, struct sticky_decision);
} flows SEC(".maps");

/* Round-robin cursor (also the tie-breaker for least-connection). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} cursor SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STICKY_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STICKY_MAX_CPUS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct sticky_handoff);
} handoff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STICKY_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} syn_slot SEC(".maps");

/*
 * Per sorting CPU, a ring buffer that only serves as a doorbell: the
 * selector writes to it at each SYN, waking that CPU's sorter so it rotates
 * before the client's first data arrives (the data then migrates in
 * softirq, straight to its worker). The kernel wakes the reader only when it
 * has caught up, so a burst of SYNs costs one wake-up. User space creates
 * the inner rings.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, STICKY_MAX_CPUS);
	__type(key, __u32);
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_RINGBUF);
		__uint(max_entries, STICKY_DOORBELL_BYTES);
	});
} doorbells SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, STICKY_PLACED_MAX);
	__type(key, struct sticky_flow);
	__type(value, struct sticky_placed);
} placed_flows SEC(".maps");

/*
 * Entry 0: the socket filter's; 1: the selector's; 2: sticky_learn's;
 * 3: sticky_watch's.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		*v += 1; /* per-CPU: no atomic needed */
}

static __always_inline int worker_live(__u32 w)
{
	struct sticky_worker *st = bpf_map_lookup_elem(&workers, &w);

	return st && st->live;
}

#include "foreign.h"

/*
 * Balancing for connections without a known sid, over the ACCEPTING workers
 * only: a draining generation (after a reload) keeps its own sessions but
 * gets no new ones. NO_WORKER if no worker accepts.
 *
 * Two generations interleave their slots (generation parity p uses slots
 * 2i + p, see supervisor::slot_of), so "the first accepting slot from a
 * uniform start" stays uniform: each accepting slot follows exactly one
 * draining or empty slot. Contiguous halves would hand the whole draining
 * half's share to the first accepting slot.
 */
static __always_inline __u32 pick_worker(const struct sticky_config *cfg)
{
	__u32 n = cfg->worker_count, zero = 0, start, j;
	__u32 best = STICKY_NO_WORKER, best_sessions = 0xffffffffu;
	__u32 *cur = NULL;

	if (n == 0 || n > STICKY_MAX_WORKERS)
		return STICKY_NO_WORKER;
	if (cfg->balance == STICKY_BALANCE_RANDOM) {
		start = bpf_get_prandom_u32() % n;
	} else {
		cur = bpf_map_lookup_elem(&cursor, &zero);
		if (!cur)
			return STICKY_NO_WORKER;
		start = __sync_fetch_and_add(cur, 1) % n;
	}
	for (j = 0; j < STICKY_MAX_WORKERS; j++) {
		__u32 w = start + j;
		struct sticky_worker *st;

		if (j >= n)
			break;
		if (w >= n)
			w -= n;
		st = bpf_map_lookup_elem(&workers, &w);
		if (!st || st->live != STICKY_WORKER_ACCEPTING)
			continue;
		if (cfg->balance != STICKY_BALANCE_LEAST_CONNECTION) {
			/*
			 * Round-robin: the cursor skips the empty or draining
			 * slots passed over, so the next connection starts after
			 * this pick (two generations' interleaved slots: 0, 2, 4,
			 * 0, not 0, 2, 2, 4).
			 */
			if (cur && j)
				__sync_fetch_and_add(cur, j);
			return w;
		}
		/* Strictly fewer: ties go to the first from the rotating start. */
		if (st->sessions < best_sessions) {
			best = w;
			best_sessions = st->sessions;
		}
	}
	return best;
}

static __always_inline int select_slot(struct sk_reuseport_md *md, __u32 slot)
{
	if (bpf_sk_select_reuseport(md, &listeners, &slot, 0) == 0)
		return 1;
	count(STICKY_CNT_SELECT_FAILED);
	return 0;
}

/*
 * The cgroup programs (sticky_learn, sticky_watch) run for session
 * learning, for the foreign-request check, or both: the check needs each
 * connection's worker whether or not sessions are learned (workers that
 * register their sessions share keep-alive connections too).
 */
static __always_inline int watching(const struct sticky_config *cfg)
{
	return cfg->learn || foreign_mode(cfg) != STICKY_FOREIGN_OFF;
}

/*
 * Remembers which worker a connection went to, for sticky_learn (which
 * reads the worker's answers on it, and keeps the worker in the
 * connection's storage). Only while the cgroup programs run, and only for
 * migrated sockets (key->family set).
 */
static __always_inline void note_placement(const struct sticky_config *cfg,
					   const struct sticky_flow *key,
					   struct sticky_placed *note, __u32 worker)
{
	note->worker = worker;
	if (watching(cfg) && key->family)
		bpf_map_update_elem(&placed_flows, key, note, BPF_ANY);
}

/*
 * Places a connection on `owner` if it is a live worker (accepting or
 * draining: its own sessions), else balances, else sends it to the 503
 * listener.
 */
static __always_inline int place(struct sk_reuseport_md *md,
				 const struct sticky_config *cfg, __u32 owner,
				 const struct sticky_flow *key, struct sticky_placed *note)
{
	__u32 w;

	if (owner < STICKY_MAX_WORKERS && worker_live(owner) &&
	    select_slot(md, owner)) {
		count(STICKY_CNT_BY_SID);
		note_placement(cfg, key, note, owner);
		return SK_PASS;
	}
	w = pick_worker(cfg);
	if (w != STICKY_NO_WORKER && select_slot(md, w)) {
		count(STICKY_CNT_BALANCED);
		note_placement(cfg, key, note, w);
		return SK_PASS;
	}
	count(STICKY_CNT_REJECTED);
	select_slot(md, STICKY_REJECT_SLOT);
	return SK_PASS;
}

/*
 * Did the parsed request name a sid (valid or not)? Then it is no
 * handshake, and its answer carries no open packet (struct sticky_placed).
 */
static __always_inline int names_sid(int result)
{
	return result == STICKY_PARSE_SID || result == STICKY_PARSE_INVALID;
}

/* Maps a parse result to the owning worker, counting the outcome. */
static __always_inline __u32 owner_of(struct scratch *s, int result)
{
	struct sticky_session *e;

	switch (result) {
	case STICKY_PARSE_SID:
		e = bpf_map_lookup_elem(&sessions, &s->hash);
		if (e) {
			/* Learned and open (0: closed, stays so): refreshed. */
			if (!e->registered && e->last_seen_ns)
				e->last_seen_ns = bpf_ktime_get_ns();
			return e->worker;
		}
		count(STICKY_CNT_SID_UNKNOWN);
		return STICKY_NO_WORKER;
	case STICKY_PARSE_INVALID:
		count(STICKY_CNT_SID_INVALID);
		break;
	case STICKY_PARSE_NOT_HTTP:
		count(STICKY_CNT_NOT_HTTP);
		break;
	default:
		count(STICKY_CNT_NO_SID);
	}
	return STICKY_NO_WORKER;
}

/* Index of this CPU's sorting listener (see STICKY_MAX_CPUS in sticky.h). */
static __always_inline __u32 sorting_index(const struct sticky_config *cfg)
{
	__u32 cpu = bpf_get_smp_processor_id();

	if (cpu >= cfg->sorting_count && cfg->sorting_count)
		cpu %= cfg->sorting_count; /* CPU brought online after start */
	return cpu & (STICKY_MAX_CPUS - 1);
}

static __always_inline void forget_syn_slot(__u16 port_be)
{
	__u32 port = bpf_ntohs(port_be), none = STICKY_NO_WORKER;

	bpf_map_update_elem(&syn_slot, &port, &none, BPF_ANY);
}

/* Remembers (or forgets) which sorting listener the client port's SYN took. */
static __always_inline void note_syn_slot(struct sk_reuseport_md *md, __u32 index)
{
	__u16 sport;

	if (bpf_skb_load_bytes(md, 0, &sport, sizeof(sport)))
		return;
	if (index == STICKY_NO_WORKER) {
		forget_syn_slot(sport);
	} else {
		__u32 port = bpf_ntohs(sport);

		bpf_map_update_elem(&syn_slot, &port, &index, BPF_ANY);
	}
}

/*
 * The flow key of a migrating request or child socket, as sticky_sort and
 * sticky_learn build it from packet headers.
 */
static __always_inline void flow_of(struct bpf_sock *sk, struct sticky_flow *key)
{
	__u32 family = sk->family;

	if (family == AF_INET6) {
		key->local[0] = sk->src_ip6[0];
		key->local[1] = sk->src_ip6[1];
		key->local[2] = sk->src_ip6[2];
		key->local[3] = sk->src_ip6[3];
		key->remote[0] = sk->dst_ip6[0];
		key->remote[1] = sk->dst_ip6[1];
		key->remote[2] = sk->dst_ip6[2];
		key->remote[3] = sk->dst_ip6[3];
		key->family = AF_INET6;
		/* IPv4-mapped (::ffff:a.b.c.d): packets carry an IPv4 header. */
		if (key->remote[0] == 0 && key->remote[1] == 0 &&
		    key->remote[2] == bpf_htonl(0xffff)) {
			key->local[0] = key->local[3];
			key->remote[0] = key->remote[3];
			key->local[1] = key->local[2] = key->local[3] = 0;
			key->remote[1] = key->remote[2] = key->remote[3] = 0;
			key->family = AF_INET;
		}
	} else {
		key->local[0] = sk->src_ip4;
		key->remote[0] = sk->dst_ip4;
		key->family = AF_INET;
	}
	key->remote_port = (__u16)sk->dst_port; /* network byte order */
}

/*
 * The flow key of a segment that has no socket yet (a SYN-cookie ACK), from
 * its IP and TCP headers: the same key sticky_learn builds on egress.
 */
static __always_inline void flow_of_packet(struct sk_reuseport_md *md,
					   struct sticky_flow *key)
{
	__u8 version;

	if (bpf_skb_load_bytes_relative(md, 0, &version, 1, BPF_HDR_START_NET))
		return;
	if (version >> 4 == 4 &&
	    !bpf_skb_load_bytes_relative(md, 12, &key->remote[0], 4, BPF_HDR_START_NET) &&
	    !bpf_skb_load_bytes_relative(md, 16, &key->local[0], 4, BPF_HDR_START_NET))
		key->family = AF_INET;
	else if (version >> 4 == 6 &&
		 !bpf_skb_load_bytes_relative(md, 8, key->remote, 16, BPF_HDR_START_NET) &&
		 !bpf_skb_load_bytes_relative(md, 24, key->local, 16, BPF_HDR_START_NET))
		key->family = AF_INET6;
	if (bpf_skb_load_bytes(md, 0, &key->remote_port, 2))
		key->family = 0; /* no key: not noted for learning */
}

/*
 * Decides where a connection goes: the sorting slot (SORT) or a worker
 * (`owner`, NO_WORKER to balance), filling `key` (family 0 if there is no
 * socket yet). Split from sticky_select so that place() and its balancing
 * loop are inlined, and verified, once.
 */
#define SORT 0xfffffffeu
#define SINK 0xfffffffdu
#define OVERFLOW 0xfffffffcu
#define PLUG 0xfffffffbu
#define TCPHDR_ACK 0x10
#define TCPHDR_SYN 0x02

/*
 * Copies the start of the payload of the segment being looked up (md->data
 * is its TCP header) into the selector's scratch; false if it has none.
 */
static __always_inline int first_payload(struct sk_reuseport_md *md,
					 struct scratch **out)
{
	__u32 one = 1, doff_len, len;
	struct scratch *s;
	__u8 doff;

	if (md->len < sizeof(struct tcphdr) ||
	    bpf_skb_load_bytes(md, 12, &doff, 1))
		return 0;
	doff_len = (doff >> 4) * 4;
	if (md->len <= doff_len)
		return 0;
	s = bpf_map_lookup_elem(&scratch, &one);
	if (!s)
		return 0;
	len = copy_len(md->len - doff_len, STICKY_SCAN_MAX);
	if (len == 0 || bpf_skb_load_bytes(md, doff_len, s->buf, len))
		return 0;
	s->len = len;
	*out = s;
	return 1;
}

/*
 * Notes for sticky_learn that the placing request named a sid: no answer
 * to search (struct sticky_placed). Only where connections get their
 * storage (the foreign-request check on): without it, a handshake later on
 * the connection is learned only within the placement record's search.
 */
static __always_inline void note_request(const struct sticky_config *cfg,
					 struct sticky_placed *note, int with_sid)
{
	if (with_sid && foreign_mode(cfg) != STICKY_FOREIGN_OFF)
		note->segments = STICKY_LEARN_SEGMENTS;
}

/* owner_of() the request in `s`, with note_request(). */
static __always_inline __u32 owner_noted(const struct sticky_config *cfg, struct scratch *s,
					 int result, struct sticky_placed *note)
{
	note_request(cfg, note, names_sid(result));
	return owner_of(s, result);
}

static __always_inline __u32 decide(struct sk_reuseport_md *md,
				    const struct sticky_config *cfg,
				    struct sticky_flow *key, struct sticky_placed *note)
{
	__u32 state, owner, index;
	void *ring;
	struct bpf_sock *sk;
	struct scratch *s;
	struct sticky_decision *decision;
	__u16 sport;
	__u8 flags;

	if (cfg->mode == STICKY_MODE_SYN_BALANCE) {
		count(STICKY_CNT_SYN_BALANCED);
		return STICKY_NO_WORKER;
	}

	sk = md->migrating_sk;
	if (!sk && bpf_skb_load_bytes(md, 13, &flags, 1) == 0 &&
	    !(flags & TCPHDR_SYN)) {
		/*
		 * Not a SYN, and no socket: with SYN cookies in effect (a SYN
		 * flood, or tcp_syncookies=2) the kernel kept no request socket
		 * and this is the ACK carrying the cookie. A pure ACK would make
		 * the connection at once, without its data, wherever it is sent:
		 * send it to the sink, which drops it silently (as
		 * TCP_DEFER_ACCEPT would; SK_DROP would answer a RST). The
		 * client's first data carries the same cookie: place that one
		 * here, like the softirq path. The cookie is valid on any
		 * listener of the group (the overflow stamp is shared). RST,
		 * FIN, ...: the sorting listener answers as usual.
		 */
		if (first_payload(md, &s)) {
			count(STICKY_CNT_PLACED_COOKIE);
			flow_of_packet(md, key);
			return owner_noted(cfg, s, sticky_parse(s, cfg), note);
		}
		if (flags == TCPHDR_ACK) {
			count(STICKY_CNT_ABSORBED);
			return SINK;
		}
		return SORT;
	}
	if (!sk) {
		/* A SYN: no payload yet. Wait for it on the sorting listener. */
		if (cfg->plug_port && cfg->mode == STICKY_MODE_COOKIE &&
		    bpf_skb_load_bytes(md, 0, &sport, sizeof(sport)) == 0 &&
		    (__u32)bpf_ntohs(sport) - cfg->plug_port < STICKY_PLUGS)
			return PLUG; /* the supervisor's own plug: see STICKY_PLUG_SLOT */
		count(STICKY_CNT_SYN);
		if (cfg->flood || cfg->mode == STICKY_MODE_COOKIE) {
			/*
			 * Cookies instead of request sockets: see
			 * STICKY_OVERFLOW_SLOT. In cookie mode always: the
			 * first data is then placed above, with no rotation.
			 */
			note_syn_slot(md, STICKY_NO_WORKER);
			return OVERFLOW;
		}
		index = sorting_index(cfg);
		note_syn_slot(md, index);
		ring = bpf_map_lookup_elem(&doorbells, &index);
		if (ring)
			bpf_ringbuf_output(ring, &index, sizeof(index), 0);
		return SORT;
	}
	/* Verifier: copy bpf_sock fields to locals right after the NULL check. */
	state = sk->state;
	flow_of(sk, key);

	if (state == TCP_NEW_SYN_RECV) {
		/*
		 * A request socket whose listener was rotated away, migrating on
		 * one of its segments (or its timer: len 0). md->data is the TCP
		 * header. No payload: keep it with the current sorting listener,
		 * whose TCP_DEFER_ACCEPT absorbs a pure ACK.
		 */
		if (!first_payload(md, &s)) {
			count(STICKY_CNT_ABSORBED);
			return SORT;
		}
		count(STICKY_CNT_PLACED_SOFTIRQ);
		forget_syn_slot(key->remote_port);
		return owner_noted(cfg, s, sticky_parse(s, cfg), note);
	}

	/*
	 * A child from the sorting queue: established, its first data already
	 * seen by sticky_sort, which left its decision under the flow key.
	 * The entry stays, marked, so that the filter the child keeps ignores
	 * its later segments; the LRU evicts it.
	 */
	forget_syn_slot(key->remote_port);
	owner = STICKY_NO_WORKER;
	decision = bpf_map_lookup_elem(&flows, key);
	if (decision && !decision->placed) {
		owner = decision->owner;
		decision->placed = 1;
		note_request(cfg, note, decision->with_sid);
	}
	/* No decision: it sent nothing before TCP_DEFER_ACCEPT gave up. */
	note->idle = !decision;
	count(STICKY_CNT_PLACED_QUEUE);
	return owner;
}

SEC("sk_reuseport/migrate")
int sticky_select(struct sk_reuseport_md *md)
{
	__u32 zero = 0, target;
	struct sticky_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct sticky_flow key = {};
	struct sticky_placed note = {};

	if (!cfg)
		return SK_DROP; /* cannot happen: array maps always have entry 0 */
	target = decide(md, cfg, &key, &note);
	if (target == SINK && select_slot(md, STICKY_SINK_SLOT))
		return SK_PASS;
	if (target == OVERFLOW &&
	    select_slot(md, cfg->overflow_alt ? STICKY_PLUG_SLOT : STICKY_OVERFLOW_SLOT))
		return SK_PASS;
	/* Plugs go to the newest listener, even a SYN processed late. */
	if (target == PLUG &&
	    select_slot(md, cfg->plug_alt ? STICKY_OVERFLOW_SLOT : STICKY_PLUG_SLOT))
		return SK_PASS;
	if (target == SINK || target == OVERFLOW || target == PLUG)
		target = SORT; /* no such listener (supervisor gone): as before */
	if (target == SORT &&
	    select_slot(md, STICKY_SORTING_SLOT + sorting_index(cfg)))
		return SK_PASS;
	return place(md, cfg, target, &key, &note);
}

/*
 * If this segment's SYN went to another CPU's sorting listener, take part
 * in that CPU's handoff (struct sticky_handoff): announce, then return true
 * if its sorter is shutting the listener right now.
 */
static __always_inline int cross_cpu_handoff_closing(__u16 sport_be)
{
	__u32 port = bpf_ntohs(sport_be), *slot, index;
	struct sticky_handoff *h;

	slot = bpf_map_lookup_elem(&syn_slot, &port);
	if (!slot)
		return 0;
	index = *slot;
	if (index == STICKY_NO_WORKER || index == bpf_get_smp_processor_id())
		return 0; /* placed already, or same CPU: no race possible */
	h = bpf_map_lookup_elem(&handoff, &index);
	if (!h)
		return 0;
	count(STICKY_CNT_CROSS_CPU);
	/* Full barrier between the store and the load (xchg). */
	__sync_lock_test_and_set(&h->busy_ns, bpf_ktime_get_ns());
	return *(volatile __u64 *)&h->closing != 0;
}

/*
 * Runs on every segment that reaches a sorting listener or one of its
 * children (children inherit the filter). Cheap exit unless the payload
 * starts like an HTTP request line. Headers are read relative to the
 * network header, the payload relative to skb->data (see below), so the
 * same code runs under BPF_PROG_TEST_RUN.
 */
SEC("socket")
int sticky_sort(struct __sk_buff *skb)
{
	__u32 zero = 0, ip_len, tot_len, data_off, off, len;
	int result;
	struct sticky_decision decision = {}, *known;
	struct sticky_config *cfg;
	struct sticky_flow key = {};
	struct tcphdr th;
	struct scratch *s;
	__u8 first;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip, sizeof(ip),
						BPF_HDR_START_NET))
			goto out;
		if (ip.protocol != IPPROTO_TCP)
			goto out;
		ip_len = ip.ihl * 4;
		tot_len = bpf_ntohs(ip.tot_len);
		key.local[0] = ip.daddr;
		key.remote[0] = ip.saddr;
		key.family = AF_INET;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes_relative(skb, 0, &ip6, sizeof(ip6),
						BPF_HDR_START_NET))
			goto out;
		if (ip6.nexthdr != IPPROTO_TCP) /* extension headers: balanced */
			goto out;
		ip_len = sizeof(ip6);
		tot_len = sizeof(ip6) + bpf_ntohs(ip6.payload_len);
		__builtin_memcpy(key.local, &ip6.daddr, 16);
		__builtin_memcpy(key.remote, &ip6.saddr, 16);
		key.family = AF_INET6;
	} else {
		goto out;
	}
	if (bpf_skb_load_bytes_relative(skb, ip_len, &th, sizeof(th),
					BPF_HDR_START_NET))
		goto out;
	off = ip_len + th.doff * 4;
	if (tot_len <= off)
		goto out; /* no payload: SYN, pure ACK, FIN */
	len = tot_len - off;
	/*
	 * The payload is usually in page fragments, which only
	 * bpf_skb_load_bytes reads, relative to skb->data: the TCP header in
	 * the receive path, the IP header under BPF_PROG_TEST_RUN. TCP has
	 * trimmed the skb to the IP length, so the difference tells which.
	 */
	data_off = tot_len - skb->len;
	if (data_off != 0 && data_off != ip_len)
		goto out;
	off -= data_off;
	if (bpf_skb_load_bytes(skb, off, &first, 1) || first < 'A' || first > 'Z')
		goto out; /* not a request line: WebSocket frames, TLS, binary */

	cfg = bpf_map_lookup_elem(&config, &zero);
	s = bpf_map_lookup_elem(&scratch, &zero);
	if (!cfg || !s)
		goto out;
	/* A later segment of a connection already decided: see sticky_decision. */
	key.remote_port = th.source;
	known = bpf_map_lookup_elem(&flows, &key);
	if (known && known->ack == th.ack_seq &&
	    (known->placed || known->seq != th.seq))
		goto out;
	if (cross_cpu_handoff_closing(th.source)) {
		count(STICKY_CNT_HANDOFF_DROPS);
		return 0; /* dropped: see struct sticky_handoff */
	}
	len = copy_len(len, STICKY_SCAN_MAX);
	if (len == 0 || bpf_skb_load_bytes(skb, off, s->buf, len))
		goto out;
	s->len = len;

	result = sticky_parse(s, cfg);
	decision.owner = owner_of(s, result);
	decision.with_sid = names_sid(result);
	decision.ack = th.ack_seq;
	decision.seq = th.seq;
	/*
	 * Always overwrite, "balance" included: a stale decision for a reused
	 * 4-tuple must never route a new connection.
	 */
	bpf_map_update_elem(&flows, &key, &decision, BPF_ANY);
	if (decision.owner != STICKY_NO_WORKER)
		count(STICKY_CNT_FILTER_DECISIONS);
out:
	return skb->len; /* never trim: >= the segment's length */
}

/*
 * sticky_learn (cgroup_skb/egress on the supervisor's cgroup, which every
 * accepted connection carries): finds the Engine.IO open packet in a
 * worker's first answer segments on a connection sticky placed, and
 * registers its sid for that worker before the packet leaves the host.
 * With learning off (the foreign-request check alone) it only keeps the
 * connection's worker in its storage, from its first answer.
 *
 * The open packet is `0{"sid":"<id>"` in an HTTP long-polling body (EIO 4;
 * EIO 3 prefixes a length and ':'), or in the first WebSocket text frame
 * (after a 2- or 4-byte frame header). The search looks for the first
 * `0{"sid":"` in the first STICKY_LEARN_SCAN bytes of each of the
 * connection's first STICKY_LEARN_SEGMENTS answer segments, and takes it
 * only at a packet start (Socket.IO's CONNECT answer `40{"sid":"...` carries
 * a namespace socket id, not an Engine.IO session).
 *
 * Invariants: always returns 1 (never drops); an explicit registration
 * wins (BPF_NOEXIST); cheap exit for every other packet of the host.
 */
#define OPEN_WORD 0x223a22646973227bULL /* {"sid":" little-endian */

/*
 * Is buf[i] the first byte of an Engine.IO packet? The open packet is: the
 * start of an HTTP body (after CR LF CR LF) or of a segment carrying only
 * the body, right after an EIO 3 length prefix ("97:"), or right after a
 * WebSocket text frame header (0x81 and a 7- or 16-bit length).
 */
static __always_inline int at_packet_start(struct scratch *s, __u32 i)
{
	__u32 at = launder(s, i);
	__u8 b1, b2, b3, b4;

	if (at == 0)
		return 1;
	if (at > STICKY_LEARN_SCAN)
		return 0;
	b1 = s->buf[(at - 1) & SCAN_MASK];
	if (b1 == ':')
		return 1;
	if (at == 2 && s->buf[0] == 0x81 && b1 < 126)
		return 1;
	if (at == 4 && s->buf[0] == 0x81 && s->buf[1] == 126)
		return 1;
	if (at < 4)
		return 0;
	b2 = s->buf[(at - 2) & SCAN_MASK];
	b3 = s->buf[(at - 3) & SCAN_MASK];
	b4 = s->buf[(at - 4) & SCAN_MASK];
	return b4 == '\r' && b3 == '\n' && b2 == '\r' && b1 == '\n';
}

static __always_inline int learn_sid(struct scratch *s, __u32 worker,
				     const struct sticky_config *cfg)
{
	__u32 n = s->len, i;
	__u64 w;
	long err;
	struct sticky_session l = { .worker = worker };

	if (n == 0 || n > STICKY_LEARN_SCAN)
		return 0;
	__builtin_memset(&s->buf[n], 0, STICKY_PARAM_MAX);
	for (i = 0; i < STICKY_LEARN_SCAN; i++) {
		__builtin_memcpy(&w, &s->buf[(i + 1) & SCAN_MASK], 8);
		if (w == OPEN_WORD && s->buf[i & SCAN_MASK] == '0')
			break;
		if (i + 9 >= n)
			return 0;
	}
	if (i == STICKY_LEARN_SCAN)
		return 0;
	if (!at_packet_start(s, i))
		return 0; /* e.g. Socket.IO's CONNECT answer 40{"sid":..., not ours */
	if (copy_sid(s, i + 9) <= 0 || s->buf[s->mark & SCAN_MASK] != '"')
		return 0;
	s->hash = sticky_sid_hash(&s->key, cfg->sid_key);
	l.last_seen_ns = bpf_ktime_get_ns();
	err = bpf_map_update_elem(&sessions, &s->hash, &l, BPF_NOEXIST);
	if (err) {
		/*
		 * Registered or learned already, or the map is full. Asked of
		 * the map, not told by the error: 6.1 does not answer -EEXIST.
		 */
		count(bpf_map_lookup_elem(&sessions, &s->hash) ? STICKY_CNT_LEARN_KNOWN
							       : STICKY_CNT_LEARN_FULL);
		return 1;
	}
	count(STICKY_CNT_LEARNED);
	return 1;
}

/*
 * The TCP payload of a packet seen by a cgroup_skb program on the listening
 * port (the IP header is at offset 0 in both directions): its offset and
 * length, and the flow key as the selector built it (local = the server);
 * `*ends` tells a FIN or RST. A segment without payload (SYN, ACK, FIN)
 * gives `*len == 0`. Returns 0 for anything else.
 */
static __always_inline int cgroup_tcp_payload(struct __sk_buff *skb, int egress,
					      struct sticky_flow *key,
					      __u32 *off, __u32 *len, int *ends)
{
	/*
	 * Headers by direct packet access: they sit in the linear part of the
	 * skb (the payload often does not), and this runs on every packet of
	 * the cgroup, so no helper call on the way to a cheap exit. Copies are
	 * the fallback: a header outside the linear part, or no packet
	 * pointers at all (6.1's BPF_PROG_TEST_RUN sets none for cgroup_skb).
	 */
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ipv6hdr ip6_copy;
	struct tcphdr th_copy;
	struct iphdr ip_copy;
	__u32 ip_len, tot_len;
	struct tcphdr *th;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data;

		if ((void *)(ip + 1) > end) {
			if (bpf_skb_load_bytes(skb, 0, &ip_copy, sizeof(ip_copy)))
				return 0;
			ip = &ip_copy;
		}
		if (ip->protocol != IPPROTO_TCP)
			return 0;
		ip_len = ip->ihl * 4;
		tot_len = bpf_ntohs(ip->tot_len);
		key->local[0] = egress ? ip->saddr : ip->daddr;
		key->remote[0] = egress ? ip->daddr : ip->saddr;
		key->family = AF_INET;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data;

		if ((void *)(ip6 + 1) > end) {
			if (bpf_skb_load_bytes(skb, 0, &ip6_copy, sizeof(ip6_copy)))
				return 0;
			ip6 = &ip6_copy;
		}
		if (ip6->nexthdr != IPPROTO_TCP)
			return 0;
		ip_len = sizeof(*ip6);
		tot_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(key->local, egress ? &ip6->saddr : &ip6->daddr, 16);
		__builtin_memcpy(key->remote, egress ? &ip6->daddr : &ip6->saddr, 16);
		key->family = AF_INET6;
	} else {
		return 0;
	}
	if (ip_len < sizeof(struct iphdr) || ip_len > 60)
		return 0;
	th = data + ip_len;
	if ((void *)(th + 1) > end) {
		if (bpf_skb_load_bytes(skb, ip_len, &th_copy, sizeof(th_copy)))
			return 0;
		th = &th_copy;
	}
	key->remote_port = egress ? th->dest : th->source;
	*off = ip_len + th->doff * 4;
	*ends = th->fin || th->rst;
	*len = tot_len > *off ? tot_len - *off : 0;
	return 1;
}

/*
 * sticky_learn past a connection's first answers, or once its placement
 * record is gone (its search ended): only if sticky_watch saw
 * a request without a sid on it since (STICKY_CONN_LEARN), search the next
 * answer segments for an open packet, for the connection's worker. A
 * handshake on a reused keep-alive connection is learned like one on a new
 * connection. Otherwise one socket-storage lookup.
 */
static __noinline int learn_later(struct __sk_buff *skb, const struct sticky_config *cfg)
{
	__u32 two = 2, off, len;
	int ends;
	struct sticky_flow key = {};
	struct sticky_conn *conn;
	struct bpf_sock *sk;
	struct scratch *s;

	sk = accepted_sock(skb, cfg);
	if (!sk)
		return 1;
	conn = bpf_sk_storage_get(&conns, sk, 0, 0);
	if (!conn || !(conn->flags & STICKY_CONN_LEARN))
		return 1;
	if (!cgroup_tcp_payload(skb, 1, &key, &off, &len, &ends) || len == 0)
		return 1;
	s = bpf_map_lookup_elem(&scratch, &two);
	if (!s)
		return 1;
	len = copy_len(len, STICKY_LEARN_SCAN);
	if (len == 0 || bpf_skb_load_bytes(skb, off, s->buf, len))
		return 1;
	s->len = len;
	if (learn_sid(s, conn->worker, cfg) || ends || ++conn->segments >= STICKY_LEARN_SEGMENTS)
		conn->flags &= ~STICKY_CONN_LEARN;
	return 1;
}

SEC("cgroup_skb/egress")
int sticky_learn(struct __sk_buff *skb)
{
	__u32 zero = 0, two = 2, off, len;
	int ends;
	struct sticky_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct sticky_flow key = {};
	struct sticky_placed *placed;
	struct sticky_conn *conn = NULL;
	struct bpf_sock *sk;
	struct scratch *s;

	if (!cfg || !watching(cfg) || skb->local_port != cfg->port)
		return 1;
	/*
	 * Cheap exit for established connections (every WebSocket message):
	 * past the segments searched, skip the flow lookup. Retransmissions
	 * count in both. No TCP socket under BPF_PROG_TEST_RUN: full path.
	 */
	sk = skb->sk;
	if (sk) {
		struct bpf_tcp_sock *tp = bpf_tcp_sock(sk);

		if (tp && tp->data_segs_out > STICKY_LEARN_SEGMENTS)
			return cfg->learn ? learn_later(skb, cfg) : 1;
	}
	if (!cgroup_tcp_payload(skb, 1, &key, &off, &len, &ends))
		return 1;
	if (len == 0 && !ends)
		return 1; /* a pure ACK: no answer, no end (every path below) */
	placed = bpf_map_lookup_elem(&placed_flows, &key);
	/*
	 * The connection's worker, kept for its lifetime (foreign.h). Only
	 * from an answer: data comes from the worker that accepted it, after
	 * placement; a pure ACK may come from a child still queued, with a
	 * stale `placed` of an earlier connection on the same 4-tuple.
	 */
	sk = accepted_sock(skb, cfg);
	if (sk) {
		conn = conn_of(sk, len ? placed : NULL);
		if (conn && len >= 12)
			note_upgrade(skb, off, conn);
	}
	/*
	 * The placement record goes once its search ends (a sid learned, or
	 * STICKY_LEARN_SEGMENTS segments): a handshake answered after that,
	 * before the segment count above is passed, is one on a reused
	 * connection too (armed by sticky_watch; learn_later looks again only
	 * then).
	 */
	if (!placed)
		return cfg->learn && conn && (conn->flags & STICKY_CONN_LEARN) ?
			       learn_later(skb, cfg) : 1;
	if (len == 0) {
		/* No payload. The worker's FIN or RST ends the search early. */
		if (ends)
			bpf_map_delete_elem(&placed_flows, &key);
		return 1;
	}
	if (!cfg->learn || placed->segments >= STICKY_LEARN_SEGMENTS) {
		/*
		 * Only the connection's worker was wanted (it is in `conns`
		 * now), or the request named a sid: no open packet to search.
		 */
		bpf_map_delete_elem(&placed_flows, &key);
		return 1;
	}
	s = bpf_map_lookup_elem(&scratch, &two);
	if (!s)
		return 1;
	len = copy_len(len, STICKY_LEARN_SCAN);
	if (len == 0 || bpf_skb_load_bytes(skb, off, s->buf, len))
		return 1;
	s->len = len;
	if (learn_sid(s, placed->worker, cfg) || ends ||
	    __sync_fetch_and_add(&placed->segments, 1) + 1 >= STICKY_LEARN_SEGMENTS)
		bpf_map_delete_elem(&placed_flows, &key);
	return 1;
}

/*
 * Is s->buf (the whole segment, `seg_len` bytes) a long-polling POST whose
 * body is exactly the Engine.IO close packet: `1` (EIO 4, also as the last
 * packet of a payload, after the 0x1e separator) or `1:1` (EIO 3)? A
 * client writes a request's head and a small body at once, so both are in
 * one segment.
 */
static __always_inline int is_close_request(struct scratch *s, __u32 seg_len)
{
	__u32 n = s->len;
	__u8 t[8];

	if (seg_len != n || n < 16 || n > STICKY_SCAN_MAX)
		return 0;
	if (s->buf[0] != 'P' || s->buf[1] != 'O' || s->buf[2] != 'S' ||
	    s->buf[3] != 'T' || s->buf[4] != ' ')
		return 0;
	__builtin_memcpy(t, &s->buf[(n - 8) & SCAN_MASK], 8); /* the last 8 bytes */
	if (t[7] != '1')
		return 0;
	if (t[6] == 0x1e)
		return 1;
	if (t[3] == '\r' && t[4] == '\n' && t[5] == '\r' && t[6] == '\n')
		return 1; /* "\r\n\r\n1" */
	return t[1] == '\r' && t[2] == '\n' && t[3] == '\r' && t[4] == '\n' &&
	       t[5] == '1' && t[6] == ':'; /* "\r\n\r\n1:1" */
}

/*
 * sticky_watch (cgroup_skb/ingress on the same cgroup as sticky_learn): the
 * clients' requests on every connection of the listening port. A request
 * carrying a learned sid refreshes that session's last_seen, also on a
 * keep-alive connection (the placement paths only see a connection's first
 * request); an Engine.IO close packet sent over long-polling (see
 * is_close_request) marks it closed (last_seen 0), and user space forgets
 * it at its next expiry scan instead of after the idle time.
 *
 * Not seen: a WebSocket session's end (the client closes the WebSocket, it
 * sends no close packet; its sid is never sent again anyway, so it idles
 * out); a close the server decides (ping timeout, server-side disconnect).
 *
 * It also enforces that every request reaches its session's worker: a
 * request line whose sid another live worker owns, on a connection placed
 * on this one, is dropped and its connection reset (foreign.h).
 *
 * Invariants: drops only a foreign request and the later segments of its
 * (doomed) connection, never anything else; only touches learned
 * entries (a registered session's lifetime is its worker's business); a
 * closed session stays closed; cheap exit, after one socket-storage lookup
 * on accepted connections, unless the payload starts with "GET " or "POST"
 * (WebSocket frames, TLS, body segments); an upgraded connection is never
 * parsed.
 */
#define WORD_GET 0x20544547U  /* "GET " little-endian */
#define WORD_POST 0x54534f50U /* "POST" little-endian */

/* Is this segment processed by a listener (a connection's first data)? */
static __always_inline int on_listener(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return 0;
	sk = bpf_sk_fullsock(sk);
	return sk && sk->state == TCP_LISTEN;
}

/* sticky_watch's first step: conn_gate() of the accepted connection, if any. */
static __always_inline int watch_gate(struct __sk_buff *skb, const struct sticky_config *cfg)
{
	struct bpf_sock *sk = accepted_sock(skb, cfg);

	return sk ? conn_gate(conn_of(sk, NULL)) : CONN_GO_ON;
}

SEC("cgroup_skb/ingress")
int sticky_watch(struct __sk_buff *skb)
{
	__u32 zero = 0, three = 3, off, len, word, copy;
	int ends, result;
	struct sticky_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct sticky_flow key = {};
	struct sticky_conn *conn = NULL;
	struct sticky_session *l;
	struct bpf_sock *sk;
	struct scratch *s;

	if (!cfg || !watching(cfg) || skb->local_port != cfg->port)
		return 1;
	if (!cgroup_tcp_payload(skb, 0, &key, &off, &len, &ends) || len == 0)
		return 1;
	/* A doomed connection loses every segment; an upgraded one is not ours. */
	result = watch_gate(skb, cfg);
	if (result != CONN_GO_ON)
		return result;
	if (len < 4)
		return 1;
	/* The first payload bytes: often in a page fragment, not linear. */
	if (off <= 120 && (void *)(long)skb->data + off + 4 <= (void *)(long)skb->data_end)
		word = *(__u32 *)((void *)(long)skb->data + off);
	else if (bpf_skb_load_bytes(skb, off, &word, 4))
		return 1;
	if (word != WORD_GET && word != WORD_POST)
		return 1;
	/*
	 * A connection's first request, still on the listener: the selector
	 * (or sticky_sort) placed the connection by it and refreshed its
	 * session already. Only a POST can be a close packet.
	 */
	if (word == WORD_GET && on_listener(skb))
		return 1;
	s = bpf_map_lookup_elem(&scratch, &three);
	if (!s)
		return 1;
	copy = copy_len(len, STICKY_SCAN_MAX);
	if (copy == 0 || bpf_skb_load_bytes(skb, off, s->buf, copy))
		return 1;
	s->len = copy;
	result = sticky_parse(s, cfg);
	/*
	 * Verifier: the socket and its storage are looked up again only now,
	 * so that every path enters the parser in the same state (pointers
	 * live across it would split its states: 6.1's verifier ran out of
	 * instructions).
	 */
	sk = accepted_sock(skb, cfg);
	if (sk)
		conn = conn_of(sk, NULL);
	if (result != STICKY_PARSE_SID) {
		if (result == STICKY_PARSE_NO_SID && sk && !draining_check(skb, cfg, conn, &key))
			return 0;
		/* Maybe a handshake on a reused connection: see learn_later. */
		if (conn && conn->worker != STICKY_NO_WORKER) {
			conn->flags |= STICKY_CONN_LEARN;
			conn->segments = 0;
		}
		return 1;
	}
	l = bpf_map_lookup_elem(&sessions, &s->hash);
	if (!l)
		return 1;
	/*
	 * On the listener (sk NULL) this is the connection's first request,
	 * placed by this very sid. A dropped request leaves the session alone:
	 * its resend on a new connection refreshes (or closes) it.
	 */
	if (sk && !foreign_check(skb, cfg, sk, conn, &key, l->worker))
		return 0;
	if (l->registered || !l->last_seen_ns)
		return 1;
	if (is_close_request(s, len)) {
		l->last_seen_ns = 0;
		count(STICKY_CNT_LEARN_CLOSED);
	} else {
		l->last_seen_ns = bpf_ktime_get_ns();
	}
	return 1;
}
