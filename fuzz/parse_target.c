// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * libFuzzer target: the kernel's request parser (sticky-ebpf/src/parse.h),
 * compiled for the host, checked input by input against the Rust reference
 * model (sticky-fuzz, linked as a static library). `cargo xtask fuzz`
 * builds and runs it with AddressSanitizer and UBSan.
 *
 * An input is one selector byte (which parameter name to look for) and the
 * first data segment. The scratch buffer persists across inputs, as the
 * per-CPU map does in the kernel, and its tail past the copy is refilled
 * with a trap ("&sid=TRAP...") before each run: a parser reading past its
 * sentinel would find a sid there and disagree with the model.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef __always_inline /* glibc defines it already */
#define __always_inline inline __attribute__((always_inline))
#endif
#ifndef __noinline
#define __noinline __attribute__((noinline))
#endif
/* bpf_helpers.h's, for the kernel build only; a no-op for the host. */
#define barrier_var(var) asm volatile("" : "=r"(var) : "0"(var))
#include "sticky.h"
#include "parse.h"

/* From the Rust side (sticky-fuzz/src/lib.rs). */
int sticky_reference_parse(const uint8_t *segment, size_t len, const uint8_t *param,
			   size_t param_len, uint8_t *sid);
const char *sticky_fuzz_param(uint8_t selector);

static struct scratch s;

/* As sticky_common::Config::new encodes "name=". */
static void set_param(struct sticky_config *cfg, const char *name)
{
	__u8 bytes[STICKY_PARAM_MAX] = { 0 }, mask[STICKY_PARAM_MAX] = { 0 };
	size_t n = strlen(name);

	memcpy(bytes, name, n);
	bytes[n] = '=';
	memset(mask, 0xff, n + 1);
	memset(cfg, 0, sizeof(*cfg));
	cfg->param_len = n + 1;
	memcpy(cfg->param_word, bytes, sizeof(bytes));
	memcpy(cfg->param_mask, mask, sizeof(mask));
}

static const char *name_of(int r)
{
	static const char *const names[] = { "SID", "NO_SID", "INVALID", "NOT_HTTP" };
	return r >= 0 && r < 4 ? names[r] : "?";
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char trap[] = "&sid=TRAP";
	struct sticky_config cfg;
	const char *param;
	__u8 want_sid[STICKY_SID_MAX];
	size_t len, i;
	int got, want;

	if (size < 1)
		return 0;
	param = sticky_fuzz_param(data[0]);
	set_param(&cfg, param);
	data++;
	size--;

	/* What the callers copy: at most STICKY_SCAN_MAX bytes. */
	len = size < STICKY_SCAN_MAX ? size : STICKY_SCAN_MAX;
	memcpy(s.buf, data, len);
	for (i = len; i < sizeof(s.buf); i++)
		s.buf[i] = trap[i % (sizeof(trap) - 1)];
	s.len = len;

	got = sticky_parse(&s, &cfg);
	want = sticky_reference_parse(data, size, (const uint8_t *)param, strlen(param), want_sid);
	if (got != want || (got == STICKY_PARSE_SID &&
			    memcmp(s.key.bytes, want_sid, STICKY_SID_MAX) != 0)) {
		fprintf(stderr, "parse.h and the reference disagree (param \"%s\"): parse.h %s \"%.64s\", reference %s \"%.64s\"\n",
			param, name_of(got), got == STICKY_PARSE_SID ? (char *)s.key.bytes : "",
			name_of(want), want == STICKY_PARSE_SID ? (char *)want_sid : "");
		abort();
	}
	return 0;
}
