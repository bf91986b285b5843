/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * The key of the `sessions` map: SipHash-2-4, keyed by config.sid_key
 * (random, chosen by the supervisor at start), of the sid zero padded to
 * STICKY_SID_MAX bytes (struct sticky_sid). A sid never holds a NUL byte,
 * so padding maps distinct sids to distinct messages.
 *
 * User space computes the same function (`sticky_common::SidHasher`);
 * `sticky_common::SID_HASH_VECTORS` are its test vectors, checked against
 * this code by the parser test (BPF_PROG_TEST_RUN) and against an
 * independent SipHash by sticky-common's tests.
 *
 * Verifier: a fixed message length, so no loop depends on the sid: eight
 * message words, each two rounds, then the length word and the four
 * finalization rounds; straight-line code after unrolling. A function of
 * its own (a BPF-to-BPF call), not inlined: its spilled registers would
 * add to every caller's stack frame (sticky_learn's went past 512 bytes).
 */
#ifndef STICKY_SIPHASH_H
#define STICKY_SIPHASH_H

#include "sticky.h"

#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND(v0, v1, v2, v3)                                             \
	do {                                                                  \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32); \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                      \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                      \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32); \
	} while (0)
/* The state from the key, one message word (2 compression rounds), and
 * the length word with the 4 finalization rounds: the hash. */
#define SIP_INIT(v0, v1, v2, v3, key)                                         \
	__u64 v0 = 0x736f6d6570736575ULL ^ (key)[0];                          \
	__u64 v1 = 0x646f72616e646f6dULL ^ (key)[1];                          \
	__u64 v2 = 0x6c7967656e657261ULL ^ (key)[0];                          \
	__u64 v3 = 0x7465646279746573ULL ^ (key)[1]
#define SIP_WORD(v0, v1, v2, v3, m)                                           \
	do {                                                                  \
		v3 ^= (m);                                                    \
		SIP_ROUND(v0, v1, v2, v3);                                    \
		SIP_ROUND(v0, v1, v2, v3);                                    \
		v0 ^= (m);                                                    \
	} while (0)
#define SIP_FINISH(v0, v1, v2, v3, len)                                       \
	({                                                                    \
		SIP_WORD(v0, v1, v2, v3, (__u64)(len) << 56);                 \
		v2 ^= 0xff;                                                   \
		SIP_ROUND(v0, v1, v2, v3);                                    \
		SIP_ROUND(v0, v1, v2, v3);                                    \
		SIP_ROUND(v0, v1, v2, v3);                                    \
		SIP_ROUND(v0, v1, v2, v3);                                    \
		v0 ^ v1 ^ v2 ^ v3;                                            \
	})

static __noinline __attribute__((unused)) __u64 sticky_sid_hash(const struct sticky_sid *sid,
					const __u64 *key)
{
	SIP_INIT(v0, v1, v2, v3, key);
	__u64 m;
	int i;

#pragma unroll
	for (i = 0; i < STICKY_SID_MAX / 8; i++) {
		__builtin_memcpy(&m, &sid->bytes[i * 8], 8); /* little-endian */
		SIP_WORD(v0, v1, v2, v3, m);
	}
	return SIP_FINISH(v0, v1, v2, v3, STICKY_SID_MAX); /* no tail bytes */
}
_Static_assert(STICKY_SID_MAX % 8 == 0 && STICKY_SID_MAX < 256, "whole words, one length byte");

/*
 * SipHash-2-4 of two little-endian words (16 bytes): the SYN cookies of
 * reqsk.bpf.c. Same rounds, fixed length; not inlined, for the same reason.
 */
static __noinline __attribute__((unused)) __u64 sticky_siphash_2u64(__u64 m0, __u64 m1,
								   const __u64 *key)
{
	SIP_INIT(v0, v1, v2, v3, key);

	SIP_WORD(v0, v1, v2, v3, m0);
	SIP_WORD(v0, v1, v2, v3, m1);
	return SIP_FINISH(v0, v1, v2, v3, 16);
}

#endif /* STICKY_SIPHASH_H */
