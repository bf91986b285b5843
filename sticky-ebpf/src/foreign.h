/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Foreign requests: every request of a session reaches its worker, whatever
 * keep-alive connection it arrives on. Included by steer.bpf.c after its maps
 * (it uses `sessions`, `placed_flows`, `counters` and worker_live()).
 *
 * - conn_of() gives an accepted connection's `struct sticky_conn` (socket
 *   storage: lives and dies with the socket, never evicted), creating it
 *   from the `placed_flows` entry the selector wrote. That entry only has
 *   to bridge placement and the worker's first answer (sticky_learn, egress)
 *   or, for a connection placed without data, its first request
 *   (sticky_watch, ingress): microseconds.
 * - foreign_check() (sticky_watch) drops a request line whose sid another
 *   live worker owns, marks the connection doomed and asks user space to
 *   destroy the socket (`resets` ring): the kernel answers the client with
 *   a RST before any answer byte, and the client resends the request on a
 *   new connection, which the selector places by its sid.
 *
 * Facts this rests on (seen on 6.1 and 6.18): the first data segment's
 * cgroup ingress runs with skb->sk = the listener (tcp_filter before
 * tcp_check_req), later segments on the child; so the first request of a
 * connection, the one that placed it, is never checked. On HTTP/1.1 the
 * worker's first answer (egress, where the storage is written) precedes
 * the client's second request.
 *
 * Invariants: no sid, an unknown sid, a malformed request line, the
 * connection's own worker's sid, a dead owner: passed untouched. A
 * connection whose worker is unknown (adopted from an earlier sticky, or
 * its placement evicted before it was used) is never checked (counted).
 * A segment is dropped only if its reset was queued (ring full: passed and
 * counted), so a doomed connection never hangs waiting for a reset.
 */
#ifndef STICKY_FOREIGN_H
#define STICKY_FOREIGN_H

#define TCP_LISTEN 10

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sticky_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, STICKY_RESETS_BYTES);
} resets SEC(".maps");

/* The accepted connection a cgroup_skb program runs for, or NULL (a listener, a request socket). */
static __always_inline struct bpf_sock *accepted_sock(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return NULL;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->state == TCP_LISTEN)
		return NULL;
	return sk;
}

/*
 * The connection's storage; created from `placed` when it has none yet
 * (NULL `placed`: only looked up).
 */
static __always_inline struct sticky_conn *conn_of(struct bpf_sock *sk,
						   const struct sticky_placed *placed)
{
	struct sticky_conn init = { .worker = STICKY_NO_WORKER };

	if (!placed)
		return bpf_sk_storage_get(&conns, sk, 0, 0);
	init.worker = placed->worker;
	return bpf_sk_storage_get(&conns, sk, &init, BPF_SK_STORAGE_GET_F_CREATE);
}

/*
 * Egress, an answer segment of at least 12 bytes at `off`: a `101
 * Switching Protocols` status line ends request parsing for good.
 */
#define HTTP_1_1 0x312e312f50545448ULL /* "HTTP/1.1" little-endian */
#define HTTP_1_0 0x302e312f50545448ULL
#define SP_101 0x31303120U           /* " 101" */
static __always_inline void note_upgrade(struct __sk_buff *skb, __u32 off,
					 struct sticky_conn *conn)
{
	struct {
		__u64 version;
		__u32 status;
	} head;

	if (bpf_skb_load_bytes(skb, off, &head, 12))
		return;
	if ((head.version == HTTP_1_1 || head.version == HTTP_1_0) && head.status == SP_101)
		conn->flags |= STICKY_CONN_UPGRADED;
}

/*
 * Ingress, before parsing: 0 drops the segment (doomed connection), 1
 * passes it untouched (upgraded), 2 goes on.
 */
#define CONN_GO_ON 2
static __always_inline int conn_gate(struct sticky_conn *conn)
{
	if (!conn)
		return CONN_GO_ON;
	if (conn->flags & STICKY_CONN_DOOMED) {
		count(STICKY_CNT_DOOMED_SEGMENTS);
		return 0;
	}
	if (conn->flags & STICKY_CONN_UPGRADED)
		return 1;
	return CONN_GO_ON;
}

/*
 * Ingress, a request line carrying a sid owned by `owner`, on accepted
 * connection `sk` (storage `conn`, maybe NULL yet): 0 to drop it, 1 to pass.
 */
static __always_inline int foreign_check(struct __sk_buff *skb,
					 const struct sticky_config *cfg,
					 struct bpf_sock *sk, struct sticky_conn *conn,
					 const struct sticky_flow *key, __u32 owner)
{
	struct sticky_placed *placed;
	struct sticky_reset *ev;

	if (!conn) {
		/*
		 * No answer yet on this connection: only one placed without
		 * data gets here with its first request (a preconnected
		 * socket). Anything else (a request split over segments
		 * before its connection was migrated) is left alone: a stale
		 * placement of an earlier connection on the same 4-tuple must
		 * never doom a new one.
		 */
		placed = bpf_map_lookup_elem(&placed_flows, key);
		if (placed && placed->idle)
			conn = conn_of(sk, placed);
	}
	if (!conn || conn->worker == STICKY_NO_WORKER) {
		count(STICKY_CNT_UNMAPPED);
		return 1;
	}
	if (owner == conn->worker || !worker_live(owner))
		return 1;
	if (cfg->foreign != STICKY_FOREIGN_RESET) {
		count(STICKY_CNT_FOREIGN_PASSED);
		return 1;
	}
	ev = bpf_ringbuf_reserve(&resets, sizeof(*ev), 0);
	if (!ev) {
		count(STICKY_CNT_FOREIGN_PASSED); /* user space behind: never hang */
		return 1;
	}
	ev->cookie = bpf_get_socket_cookie(skb);
	ev->flow = *key;
	ev->worker = conn->worker;
	ev->owner = owner;
	conn->flags |= STICKY_CONN_DOOMED;
	bpf_ringbuf_submit(ev, 0);
	count(STICKY_CNT_FOREIGN_DROPPED);
	return 0;
}

#endif /* STICKY_FOREIGN_H */
