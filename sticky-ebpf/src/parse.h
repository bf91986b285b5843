/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * The request-line parser, shared by both placement paths: the selector
 * (softirq migration, payload on the sk_reuseport_md) and the socket filter
 * (sorting queue). Both copy the start of the payload into `struct scratch`
 * first; this file only reads that copy.
 *
 * What it accepts: "METHOD SP target", METHOD of 1..15 bytes A-Z, and in the
 * target's query string (after '?', before ' ', '#', CR or LF) the first
 * parameter named exactly cfg->param ("sid=" by default). Its value must be
 * 1..64 bytes of [A-Za-z0-9_-] followed by '&', ' ', '#', CR or LF within the
 * first STICKY_SCAN_MAX bytes of the segment. Anything else is a defined
 * non-match (NO_SID, INVALID or NOT_HTTP) and the connection is balanced.
 *
 * Verifier notes: each stage is a loop over a constant bound carrying no
 * state but its index, every buffer index is masked, each stage starts from
 * a laundered offset (see launder()) and bytes are classified by a table, so
 * an iteration pushes at most two pending branches: the verifier's limit of
 * 8192 pending branches then allows a 1 KiB window.
 */
#ifndef STICKY_PARSE_H
#define STICKY_PARSE_H

#include "sticky.h"
#include "siphash.h"

/* Indices are masked with this; buf is larger, so a masked index stays inside. */
#define SCAN_MASK (2 * STICKY_SCAN_MAX - 1)

struct scratch {
	/*
	 * The copied payload, then STICKY_PARAM_MAX zero bytes (the sentinel:
	 * every stage stops at a NUL, so nothing past the copy is ever
	 * interpreted), then slack up to the mask.
	 */
	__u8 buf[2 * STICKY_SCAN_MAX + STICKY_PARAM_MAX];
	struct sticky_sid key;
	__u64 hash; /* sticky_sid_hash(key): the `sessions` key */
	__u32 len;  /* bytes copied into buf, <= STICKY_SCAN_MAX */
	__u32 mark; /* see launder() */
};

/* Byte classes, so each loop iteration has one or two branches. */
#define C_END 1   /* ends the target or the line: NUL ' ' '#' CR LF */
#define C_AMP 2   /* '&' separates query parameters */
#define C_QUERY 4 /* '?' starts the query */
#define C_SID 8   /* allowed in a session id: A-Z a-z 0-9 _ - */
#define C_UPPER 16 /* allowed in a method: A-Z */

static const __u8 byte_class[256] = {
	[0] = C_END, [' '] = C_END, ['#'] = C_END, ['\r'] = C_END,
	['\n'] = C_END, ['&'] = C_AMP, ['?'] = C_QUERY,
	['A' ... 'Z'] = C_SID | C_UPPER, ['a' ... 'z'] = C_SID,
	['0' ... '9'] = C_SID, ['_'] = C_SID, ['-'] = C_SID,
};

/*
 * Stores an offset to the map value and reads it back: the verifier then
 * treats it as an unknown scalar, so the next stage's loop is verified once
 * instead of once per offset the previous stage could stop at.
 */
static __always_inline __u32 launder(struct scratch *s, __u32 off)
{
	s->mark = off;
	return *(volatile __u32 *)&s->mark;
}

/*
 * How many payload bytes to copy: min(len, max), in a form every supported
 * verifier can prove is 1..max (bpf_skb_load_bytes refuses a size that may
 * be 0). The 6.1 verifier learns nothing from `len != 0` and loses compare
 * bounds across 32-bit register copies ("invalid access to map value ...
 * size=0"), so the size is rebuilt from a masked register: max is a power
 * of two and len - 1 < max already, so the mask changes no value.
 * 0 when there is nothing to copy.
 */
static __always_inline __u32 copy_len(__u32 len, __u32 max)
{
	__u32 last;

	if (len == 0)
		return 0;
	if (len > max)
		len = max;
	last = len - 1;
	barrier_var(last);
	return (last & (max - 1)) + 1;
}
_Static_assert((STICKY_SCAN_MAX & (STICKY_SCAN_MAX - 1)) == 0, "copy_len masks");
_Static_assert((STICKY_LEARN_SCAN & (STICKY_LEARN_SCAN - 1)) == 0, "copy_len masks");

/* Non-zero unless "name=" starts at buf[at]: two masked word compares. */
static __always_inline __u64 param_differs(struct scratch *s, __u32 at,
					   const struct sticky_config *cfg)
{
	__u64 w0, w1;

	__builtin_memcpy(&w0, &s->buf[at & SCAN_MASK], 8);
	__builtin_memcpy(&w1, &s->buf[(at + 8) & SCAN_MASK], 8);
	return ((w0 & cfg->param_mask[0]) ^ cfg->param_word[0]) |
	       ((w1 & cfg->param_mask[1]) ^ cfg->param_word[1]);
}

/*
 * Copies the sid bytes ([A-Za-z0-9_-]) starting at buf[start] into s->key,
 * zero padded: what the key of `sessions` hashes. Returns their count, or -1 past
 * STICKY_SID_MAX; s->mark is left at the byte after them. Shared by the
 * request parser and the session learner.
 */
static __always_inline int copy_sid(struct scratch *s, __u32 start)
{
	__u32 i, at = 0;

	start = launder(s, start);
	__builtin_memset(&s->key, 0, sizeof(s->key));
	for (i = 0; i <= STICKY_SID_MAX; i++) {
		at = (start + i) & SCAN_MASK;
		if (!(byte_class[s->buf[at]] & C_SID))
			break;
		if (i == STICKY_SID_MAX)
			return -1;
		s->key.bytes[i & (STICKY_SID_MAX - 1)] = s->buf[at];
	}
	s->mark = at;
	return i;
}

/*
 * Parses s->buf[0..s->len) in four stages (method, path, query, value),
 * each a loop over a constant bound with at most two branches per byte.
 * On STICKY_PARSE_SID, s->key holds the zero-padded sid and s->hash its
 * hash, the `sessions` key.
 */
static __always_inline int sticky_parse(struct scratch *s,
					const struct sticky_config *cfg)
{
	__u32 n = s->len, i, at, start;
	__u64 not_param;
	int len;
	__u8 cls = 0;

	if (n == 0 || n > STICKY_SCAN_MAX)
		return STICKY_PARSE_NOT_HTTP;
	/* The sentinel: "name=" never contains NUL, so no match crosses it. */
	__builtin_memset(&s->buf[n], 0, STICKY_PARAM_MAX);

	/* Method: 1..15 bytes A-Z, then a space. */
	for (i = 0; i < 16; i++) {
		cls = byte_class[s->buf[i]];
		if (!(cls & C_UPPER))
			break;
	}
	if (i == 0 || i == 16 || s->buf[i] != ' ')
		return i < n ? STICKY_PARSE_NOT_HTTP : STICKY_PARSE_NO_SID;

	/* Path: up to '?'. */
	start = launder(s, i + 1);
	for (i = 0; i < STICKY_SCAN_MAX; i++) {
		at = start + i;
		cls = byte_class[s->buf[at & SCAN_MASK]];
		if (cls & (C_END | C_QUERY))
			break;
	}
	if (!(cls & C_QUERY))
		return STICKY_PARSE_NO_SID; /* no query, or line not finished */

	/* Query: the first parameter named exactly cfg->param. */
	start = launder(s, at + 1);
	not_param = 0;
	for (i = 0; i < STICKY_SCAN_MAX; i++) {
		at = start + i;
		if ((param_differs(s, at, cfg) | not_param) == 0)
			break;
		cls = byte_class[s->buf[at & SCAN_MASK]];
		if (cls & C_END)
			return STICKY_PARSE_NO_SID;
		not_param = (cls & C_AMP) ^ C_AMP;
	}
	if (i == STICKY_SCAN_MAX)
		return STICKY_PARSE_NO_SID;

	/* Value: 1..64 sid bytes, then '&' or the end of the target. */
	len = copy_sid(s, at + cfg->param_len);
	if (len < 0)
		return STICKY_PARSE_INVALID; /* longer than 64 */
	at = s->mark & SCAN_MASK;
	if (at >= n)
		return STICKY_PARSE_INVALID; /* not terminated within view */
	if (!(byte_class[s->buf[at]] & (C_AMP | C_END)))
		return STICKY_PARSE_INVALID; /* a byte outside [A-Za-z0-9_-] */
	if (len == 0)
		return STICKY_PARSE_NO_SID;
	s->hash = sticky_sid_hash(&s->key, cfg->sid_key);
	return STICKY_PARSE_SID;
}

#endif /* STICKY_PARSE_H */
