// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * --placement bpf-cookie: SYN cookies of sticky's own, that keep every TCP
 * option, with no request socket until the first data segment.
 *
 * sticky_reqsk (tc ingress, on the interfaces the service's clients come
 * from), for TCP segments to the service's port:
 * - a SYN with no socket on its 4-tuple: answered here with a SYN-ACK
 *   whose sequence number is a cookie (layout below), sent back out of the
 *   interface it came from (bpf_redirect). The stack never sees it.
 * - an ACK with no socket on its 4-tuple (only the listener): its cookie
 *   (ack_seq - 1) is checked against the current and the previous key. A
 *   wrong cookie is dropped. A right one without data (the client's pure
 *   ACK) is dropped too: the client's first data carries the same cookie.
 *   With data, bpf_sk_assign_tcp_reqsk() (6.9+) gives the segment a request
 *   socket holding the options the cookie encodes; the stack then looks
 *   the listener up through the reuseport group (6.5+: a socket assigned
 *   from tc still goes through SO_REUSEPORT selection), so sticky_select
 *   places it by sid exactly like a kernel SYN cookie's first data
 *   ("not a SYN, no socket", counted placed_cookie), and the child is
 *   created on the owner's listener with that data.
 * - anything else (a socket exists: established, TIME_WAIT, a request
 *   socket of the queue path; RST; SYN-ACK; TFO SYNs with data): passed
 *   on unchanged with TC_ACT_UNSPEC, never TC_ACT_OK: under TCX, OK
 *   (TCX_PASS) would end the chain, and another sticky's program on the
 *   same interface (another port) would never see its own SYNs. A SYN
 *   reusing a TIME_WAIT 4-tuple therefore takes the default path (sorting
 *   listener, rotation), as today.
 *
 * Cookie (the SYN-ACK's ISN): | 31..9 hash | 8..6 MSS class | 5 ECN |
 * 4 SACK | 3..0 client window scale, 15: none |. hash: the top 23 bits of
 * SipHash-2-4 (key from user space, rotated) of the addresses, ports and
 * the client's ISN. The option bits are not authenticated: only a client
 * that saw the SYN-ACK can alter them, for its own connection.
 *
 * Invariants:
 * - Never creates a socket for a segment whose 4-tuple has one: the
 *   lookup comes first, and ties go to the stack (TC_ACT_UNSPEC).
 * - Drops only ACKs to no connection: forged or stale cookies (the stack
 *   would answer a RST) and the pure ACK of a valid cookie.
 * - Loaded only where the kfunc exists (user space checks the kernel's
 *   BTF first and falls back to the default placement otherwise).
 * - IPv4 without IP options, IPv6 without extension headers; other
 *   traffic goes to the stack.
 * - Packets start with an Ethernet header (ETH_HLEN_): user space attaches
 *   the program only to loopback and Ethernet devices, never to L3 ones
 *   (tun, WireGuard), whose packets start at the IP header.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sticky.h"
#include "siphash.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* include/net/tcp_states.h */
#define TCP_LISTEN 10
#define ETH_HLEN_ 14
#define IP_DF 0x4000
/* TCP option kinds and lengths (RFC 9293, 7323, 2018; include/net/tcp.h). */
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCPOPT_WINDOW 3
#define TCPOPT_SACK_PERM 4
#define TCPOPT_TIMESTAMP 8
#define TCPOLEN_MSS 4
#define TCPOLEN_WINDOW 3
#define TCPOLEN_SACK_PERM 2
#define TCPOLEN_TIMESTAMP 10

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sticky_reqsk_config);
} reqsk_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STICKY_REQSK_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} reqsk_counters SEC(".maps");

/*
 * net/core/filter.c's struct bpf_tcp_req_attrs (6.9+); the kfunc refuses
 * any other size.
 */
struct tcp_req_attrs {
	__u32 rcv_tsval;
	__u32 rcv_tsecr;
	__u16 mss;
	__u8 rcv_wscale;
	__u8 snd_wscale;
	__u8 ecn_ok;
	__u8 wscale_ok;
	__u8 sack_ok;
	__u8 tstamp_ok;
	__u8 usec_ts_ok;
	__u8 reserved[3];
};
_Static_assert(sizeof(struct tcp_req_attrs) == 20, "struct bpf_tcp_req_attrs");

/*
 * The instruction `call bpf_sk_assign_tcp_reqsk` (a kfunc call: src_reg
 * BPF_PSEUDO_KFUNC_CALL, imm the function's BTF id in vmlinux). aya 0.14
 * resolves no kfuncs, so the object carries this marker as imm and user
 * space (reqsk.rs) writes the id found in /sys/kernel/btf/vmlinux over it
 * before loading. Arguments in r1-r4 as the calling convention has them.
 */
#define REQSK_KFUNC_MARKER 0x5ec00c1e
static __always_inline long assign_tcp_reqsk(struct __sk_buff *skb, void *listener,
					     struct tcp_req_attrs *attrs)
{
	register long r1 asm("r1") = (long)skb;
	register long r2 asm("r2") = (long)listener;
	register long r3 asm("r3") = (long)attrs;
	register long r4 asm("r4") = sizeof(*attrs);
	register long r0 asm("r0");

	asm volatile(".byte 0x85, 0x20, 0, 0, 0x1e, 0x0c, 0xc0, 0x5e"
		     : "=r"(r0), "+r"(r1), "+r"(r2), "+r"(r3), "+r"(r4)
		     :
		     : "r5", "memory");
	return r0;
}

/*
 * MSS classes (3 bits): the client's MSS is rounded down to one of these.
 * Beside the usual Internet values, jumbo frames and loopback's (MTU
 * 65,536: 65,495 over IPv4, 65,476 over IPv6).
 */
static __always_inline __u16 mss_of(__u32 cls, int v6)
{
	switch (cls & 7) {
	case 1: return v6 ? 1280 : 1300;
	case 2: return v6 ? 1420 : 1440;
	case 3: return v6 ? 1440 : 1460;
	case 4: return v6 ? 4016 : 4036;
	case 5: return v6 ? 8940 : 8960;
	case 6: return v6 ? 16324 : 16344;
	case 7: return v6 ? 65476 : 65495;
	default: return v6 ? 1220 : 536; /* the kfunc's minimum per family */
	}
}

/* The largest class not above the client's MSS (the smallest at least). */
static __always_inline __u32 mss_class(__u16 mss, int v6)
{
	__u32 cls = 0, i;

#pragma unroll
	for (i = 1; i < 8; i++)
		if (mss >= mss_of(i, v6))
			cls = i;
	return cls;
}
#define COOKIE_NO_WSCALE 15
#define COOKIE_SACK (1u << 4)
#define COOKIE_ECN (1u << 5)
#define COOKIE_MSS_SHIFT 6
#define COOKIE_HASH_MASK 0xfffffe00u

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&reqsk_counters, &idx);

	if (c)
		*c += 1;
}

/* What a segment's TCP options say (only what cookies need). */
struct tcp_opts {
	__u16 mss;
	__u8 wscale; /* COOKIE_NO_WSCALE: absent */
	__u8 sack;
	__u8 ts;
	__u32 tsval;
	__u32 tsecr;
};

#define OPT_BUF 64
struct opt_walk {
	__u8 buf[OPT_BUF];
	__u32 i;   /* offset of the next option in buf */
	__u32 len; /* bytes of options */
	struct tcp_opts o;
};

static __always_inline __u32 be32_at(const __u8 *buf, __u32 a)
{
	return (__u32)buf[a & 63] << 24 | (__u32)buf[(a + 1) & 63] << 16 |
	       (__u32)buf[(a + 2) & 63] << 8 | buf[(a + 3) & 63];
}

/* One option (a bpf_loop step: verified once, not once per iteration). */
static long opt_step(__u64 index, void *ctx)
{
	struct opt_walk *w = ctx;
	__u32 i = w->i;
	__u8 kind, size;

	if (i >= w->len || i >= 40)
		return 1;
	kind = w->buf[i & (OPT_BUF - 1)];
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		w->i = i + 1;
		return 0;
	}
	if (i + 1 >= w->len)
		return 1;
	size = w->buf[(i + 1) & (OPT_BUF - 1)];
	if (size < 2 || i + size > w->len)
		return 1;
	if (kind == TCPOPT_MSS && size == TCPOLEN_MSS) {
		w->o.mss = (__u16)w->buf[(i + 2) & 63] << 8 | w->buf[(i + 3) & 63];
	} else if (kind == TCPOPT_WINDOW && size == TCPOLEN_WINDOW) {
		w->o.wscale = w->buf[(i + 2) & 63];
		if (w->o.wscale > 14) /* RFC 7323: 14 at most */
			w->o.wscale = 14;
	} else if (kind == TCPOPT_SACK_PERM && size == TCPOLEN_SACK_PERM) {
		w->o.sack = 1;
	} else if (kind == TCPOPT_TIMESTAMP && size == TCPOLEN_TIMESTAMP) {
		w->o.ts = 1;
		w->o.tsval = be32_at(w->buf, i + 2);
		w->o.tsecr = be32_at(w->buf, i + 6);
	}
	w->i = i + size;
	return 0;
}

/* Reads the options of the segment's TCP header (at `off`, `len` bytes). */
static __always_inline int parse_options(struct __sk_buff *skb, __u32 off, __u32 len,
					 struct opt_walk *w)
{
	w->o.mss = 536; /* RFC 9293: no option, 536 */
	w->o.wscale = COOKIE_NO_WSCALE;
	w->o.sack = 0;
	w->o.ts = 0;
	w->i = 0;
	w->len = len;
	if (len == 0 || len > 40)
		return 0;
	if (bpf_skb_load_bytes(skb, off, w->buf, len & 63))
		return -1;
	bpf_loop(40, opt_step, w, 0);
	return 0;
}

/* A segment to the port, either family, from its headers. */
struct seg {
	__u32 saddr[4]; /* network order; IPv4: [0] only */
	__u32 daddr[4];
	__u32 ip_len;   /* the IP header's length: 20 or 40 (no options or extensions) */
	__u32 payload;  /* TCP payload bytes */
	__u32 v6;
	struct tcphdr th;
};

/* The hash bits of a cookie for this client ISN under `key`. */
static __always_inline __u32 cookie_hash(const struct seg *g, __u32 client_isn, const __u64 *key)
{
	__u64 ports = (__u64)g->th.source << 48 | (__u64)g->th.dest << 32 | client_isn;
	__u64 h;

	if (!g->v6)
		return (__u32)sticky_siphash_2u64((__u64)g->saddr[0] << 32 | g->daddr[0], ports,
						  key) & COOKIE_HASH_MASK;
	/* 32 bytes of addresses: chained, each block under the key. */
	h = sticky_siphash_2u64((__u64)g->saddr[0] << 32 | g->saddr[1],
				(__u64)g->saddr[2] << 32 | g->saddr[3], key);
	h = sticky_siphash_2u64(h ^ ((__u64)g->daddr[0] << 32 | g->daddr[1]),
				(__u64)g->daddr[2] << 32 | g->daddr[3], key);
	return (__u32)sticky_siphash_2u64(h, ports, key) & COOKIE_HASH_MASK;
}

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

struct synack {
	struct tcphdr tcp;
	__u8 opts[20];
};

struct pseudo_header4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

struct pseudo_header6 {
	__u32 saddr[4];
	__u32 daddr[4];
	__be32 len;
	__u8 zero[3];
	__u8 next;
};

/* Appends a 32-bit option word (host order value, big-endian on the wire). */
static __always_inline __u32 put_word(struct synack *s, __u32 at, __u32 word)
{
	__be32 be = bpf_htonl(word);

	if (at <= sizeof(s->opts) - 4)
		__builtin_memcpy(&s->opts[at], &be, 4);
	return at + 4;
}

/* The TCP checksum of `s` (`len` bytes) from `g`'s server to its client. */
static __always_inline __s64 synack_csum(const struct seg *g, struct synack *s, __u32 len)
{
	__s64 sum;

	if (g->v6) {
		struct pseudo_header6 ph = { .len = bpf_htonl(len), .next = IPPROTO_TCP };

		__builtin_memcpy(ph.saddr, g->daddr, 16);
		__builtin_memcpy(ph.daddr, g->saddr, 16);
		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	} else {
		struct pseudo_header4 ph = {
			.saddr = g->daddr[0], .daddr = g->saddr[0],
			.proto = IPPROTO_TCP, .len = bpf_htons(len),
		};

		sum = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	}
	if (sum < 0)
		return sum;
	return bpf_csum_diff(0, 0, (__be32 *)s, len & 63, sum);
}

/* Writes the SYN-ACK's IP header (addresses swapped) into the packet. */
static __always_inline int store_ip_header(struct __sk_buff *skb, const struct seg *g, __u32 len)
{
	__s64 sum;

	if (g->v6) {
		struct ipv6hdr h = {};

		h.version = 6;
		h.payload_len = bpf_htons(len);
		h.nexthdr = IPPROTO_TCP;
		h.hop_limit = 64;
		__builtin_memcpy(&h.saddr, g->daddr, 16);
		__builtin_memcpy(&h.daddr, g->saddr, 16);
		return bpf_skb_store_bytes(skb, ETH_HLEN_, &h, sizeof(h), 0);
	} else {
		struct iphdr h = {};

		h.version = 4;
		h.ihl = 5;
		h.tot_len = bpf_htons(sizeof(h) + len);
		h.frag_off = bpf_htons(IP_DF);
		h.ttl = 64;
		h.protocol = IPPROTO_TCP;
		h.saddr = g->daddr[0];
		h.daddr = g->saddr[0];
		sum = bpf_csum_diff(0, 0, (__be32 *)&h, sizeof(h), 0);
		if (sum < 0)
			return -1;
		h.check = csum_fold(sum);
		return bpf_skb_store_bytes(skb, ETH_HLEN_, &h, sizeof(h), 0);
	}
}

/*
 * Turns the SYN into the cookie SYN-ACK and sends it back where it came
 * from.
 */
static __noinline int answer_syn(struct __sk_buff *skb, const struct sticky_reqsk_config *cfg,
				 const struct seg *g)
{
	const struct tcphdr *th = &g->th;
	struct synack s = {};
	struct opt_walk w;
	struct tcp_opts o;
	__u32 isn = bpf_ntohl(th->seq), cookie, cls, at = 0, len, ip_len = g->ip_len;
	__u8 eth[12], swapped[12];
	__s64 sum;
	int ts, ws, sack, ecn;

	if (parse_options(skb, ETH_HLEN_ + ip_len + sizeof(*th), th->doff * 4 - sizeof(*th), &w))
		return TC_ACT_UNSPEC;
	o = w.o;
	cls = mss_class(o.mss, g->v6);
	ws = o.wscale != COOKIE_NO_WSCALE && (cfg->options & STICKY_REQSK_WSCALE);
	sack = o.sack && (cfg->options & STICKY_REQSK_SACK);
	ts = o.ts && (cfg->options & STICKY_REQSK_TIMESTAMPS);
	ecn = th->ece && th->cwr && (cfg->options & STICKY_REQSK_ECN);
	cookie = cookie_hash(g, isn, cfg->key[0]) | cls << COOKIE_MSS_SHIFT |
		 (ws ? o.wscale : COOKIE_NO_WSCALE) | (sack ? COOKIE_SACK : 0) |
		 (ecn ? COOKIE_ECN : 0);

	at = put_word(&s, at, TCPOPT_MSS << 24 | TCPOLEN_MSS << 16 | mss_of(cls, g->v6));
	if (ws)
		at = put_word(&s, at, TCPOPT_NOP << 24 | TCPOPT_WINDOW << 16 |
					      TCPOLEN_WINDOW << 8 | (cfg->rcv_wscale & 0xff));
	if (ts) {
		/* Any value: the kernel derives its offset from the echo. */
		__u32 tsval = (__u32)(bpf_ktime_get_ns() >> 20);

		at = put_word(&s, at, (sack ? (TCPOPT_SACK_PERM << 24 | TCPOLEN_SACK_PERM << 16) :
					      (TCPOPT_NOP << 24 | TCPOPT_NOP << 16)) |
					      TCPOPT_TIMESTAMP << 8 | TCPOLEN_TIMESTAMP);
		at = put_word(&s, at, tsval);
		at = put_word(&s, at, o.tsval);
	} else if (sack) {
		at = put_word(&s, at, TCPOPT_NOP << 24 | TCPOPT_NOP << 16 |
					      TCPOPT_SACK_PERM << 8 | TCPOLEN_SACK_PERM);
	}
	if (at > sizeof(s.opts))
		return TC_ACT_UNSPEC;

	s.tcp.source = th->dest;
	s.tcp.dest = th->source;
	s.tcp.seq = bpf_htonl(cookie);
	s.tcp.ack_seq = bpf_htonl(isn + 1);
	s.tcp.doff = (sizeof(s.tcp) + at) / 4;
	s.tcp.syn = 1;
	s.tcp.ack = 1;
	s.tcp.ece = ecn;
	s.tcp.window = bpf_htons(65535); /* SYN-ACK windows are never scaled */
	len = sizeof(s.tcp) + at;
	sum = synack_csum(g, &s, len);
	if (sum < 0)
		return TC_ACT_UNSPEC;
	s.tcp.check = csum_fold(sum);

	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)))
		return TC_ACT_UNSPEC;
	__builtin_memcpy(swapped, eth + 6, 6);
	__builtin_memcpy(swapped + 6, eth, 6);
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + ip_len + len, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, swapped, sizeof(swapped), 0) ||
	    store_ip_header(skb, g, len) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN_ + (g->v6 ? 40 : 20), &s, len & 63, 0))
		return TC_ACT_SHOT;
	count(STICKY_REQSK_SYN_ANSWERED);
	return bpf_redirect(skb->ifindex, 0);
}

/*
 * An ACK to no connection: checks its cookie, then drops it (wrong cookie,
 * or no data yet) or gives it a request socket on `listener`.
 */
static __noinline int check_ack(struct __sk_buff *skb, const struct sticky_reqsk_config *cfg,
				const struct seg *g, struct tcp_sock *listener)
{
	const struct tcphdr *th = &g->th;
	struct tcp_req_attrs attrs = {};
	struct opt_walk w;
	struct tcp_opts o;
	__u32 cookie = bpf_ntohl(th->ack_seq) - 1, isn = bpf_ntohl(th->seq) - 1;
	__u32 hash = cookie & COOKIE_HASH_MASK, wscale;
	long ret;

	if (hash != cookie_hash(g, isn, cfg->key[0]) && hash != cookie_hash(g, isn, cfg->key[1])) {
		count(STICKY_REQSK_FORGED);
		return TC_ACT_SHOT;
	}
	if (g->payload == 0) {
		count(STICKY_REQSK_ACK_ABSORBED);
		return TC_ACT_SHOT;
	}
	if (parse_options(skb, ETH_HLEN_ + g->ip_len + sizeof(*th), th->doff * 4 - sizeof(*th),
			  &w))
		return TC_ACT_SHOT;
	o = w.o;
	wscale = cookie & 0xf;
	attrs.mss = mss_of(cookie >> COOKIE_MSS_SHIFT, g->v6);
	if (wscale != COOKIE_NO_WSCALE) {
		attrs.wscale_ok = 1;
		attrs.snd_wscale = wscale;
		attrs.rcv_wscale = cfg->rcv_wscale;
	}
	attrs.sack_ok = !!(cookie & COOKIE_SACK);
	attrs.ecn_ok = !!(cookie & COOKIE_ECN);
	if (o.ts && (cfg->options & STICKY_REQSK_TIMESTAMPS)) {
		attrs.tstamp_ok = 1;
		attrs.rcv_tsval = o.tsval;
		attrs.rcv_tsecr = o.tsecr;
	}
	ret = assign_tcp_reqsk(skb, listener, &attrs);
	if (ret < 0) {
		count(STICKY_REQSK_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	count(STICKY_REQSK_ASSIGNED);
	return TC_ACT_OK;
}

/* Reads the headers of an IPv4 or IPv6 TCP segment; false if it is not one. */
static __always_inline int load_seg(struct __sk_buff *skb, const struct sticky_reqsk_config *cfg,
				    struct seg *g)
{
	__u32 tcp_len;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (!(cfg->options & STICKY_REQSK_IPV4) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) || ip.ihl != 5 ||
		    ip.protocol != IPPROTO_TCP || (ip.frag_off & bpf_htons(0x3fff)) ||
		    (cfg->addr4 && ip.daddr != cfg->addr4))
			return 0;
		g->saddr[0] = ip.saddr;
		g->daddr[0] = ip.daddr;
		g->ip_len = sizeof(ip);
		tcp_len = bpf_ntohs(ip.tot_len) - sizeof(ip);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip;
		int any;

		if (!(cfg->options & STICKY_REQSK_IPV6) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) ||
		    ip.nexthdr != IPPROTO_TCP)
			return 0;
		__builtin_memcpy(g->saddr, &ip.saddr, 16);
		__builtin_memcpy(g->daddr, &ip.daddr, 16);
		any = !(cfg->addr6[0] | cfg->addr6[1] | cfg->addr6[2] | cfg->addr6[3]);
		if (!any && (g->daddr[0] != cfg->addr6[0] || g->daddr[1] != cfg->addr6[1] ||
			     g->daddr[2] != cfg->addr6[2] || g->daddr[3] != cfg->addr6[3]))
			return 0;
		g->ip_len = sizeof(ip);
		g->v6 = 1;
		tcp_len = bpf_ntohs(ip.payload_len);
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, ETH_HLEN_ + g->ip_len, &g->th, sizeof(g->th)) ||
	    g->th.doff < 5 || tcp_len < g->th.doff * 4u)
		return 0;
	g->payload = tcp_len - g->th.doff * 4;
	return 1;
}

SEC("classifier")
int sticky_reqsk(struct __sk_buff *skb)
{
	__u32 zero = 0;
	const struct sticky_reqsk_config *cfg = bpf_map_lookup_elem(&reqsk_config, &zero);
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *skc;
	struct tcp_sock *listener;
	struct seg g = {};
	__u32 state, tuple_len;
	int ret = TC_ACT_UNSPEC, syn;

	if (!cfg || !load_seg(skb, cfg, &g))
		return TC_ACT_UNSPEC;
	if (bpf_ntohs(g.th.dest) != cfg->port || g.th.rst)
		return TC_ACT_UNSPEC;
	syn = g.th.syn;
	if (syn && g.th.ack)
		return TC_ACT_UNSPEC;
	if (!syn && !g.th.ack)
		return TC_ACT_UNSPEC;
	/* A SYN with data (Fast Open): the stack's path, which sees its data. */
	if (syn && g.payload) {
		count(STICKY_REQSK_SYN_PASSED);
		return TC_ACT_UNSPEC;
	}

	if (g.v6) {
		__builtin_memcpy(tuple.ipv6.saddr, g.saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, g.daddr, 16);
		tuple.ipv6.sport = g.th.source;
		tuple.ipv6.dport = g.th.dest;
		tuple_len = sizeof(tuple.ipv6);
	} else {
		tuple.ipv4.saddr = g.saddr[0];
		tuple.ipv4.daddr = g.daddr[0];
		tuple.ipv4.sport = g.th.source;
		tuple.ipv4.dport = g.th.dest;
		tuple_len = sizeof(tuple.ipv4);
	}
	skc = bpf_skc_lookup_tcp(skb, &tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (!skc)
		return TC_ACT_UNSPEC; /* nobody listens: the stack answers */
	state = skc->state;
	if (state != TCP_LISTEN) {
		/* The 4-tuple has a socket (TIME_WAIT, a request, a connection). */
		if (syn)
			count(STICKY_REQSK_SYN_PASSED);
		goto release;
	}
	if (syn) {
		ret = answer_syn(skb, cfg, &g);
		goto release;
	}
	listener = bpf_skc_to_tcp_sock(skc);
	if (listener)
		ret = check_ack(skb, cfg, &g, listener);
release:
	bpf_sk_release(skc);
	return ret;
}
