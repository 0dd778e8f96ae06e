/* fuzz-wire.c - fuzz target for everything the codec parses from the
 * network: the handshake state machine (fed in chunks of varying size)
 * and, once it reaches transmission, request headers and their checks.
 *
 * Built two ways: with -fsanitize=fuzzer as a libFuzzer target (meson
 * option -Dfuzz=true, clang), and always as `fuzz-wire-smoke`, whose
 * main() below replays a fixed number of generated inputs, so every test
 * run exercises the parsers under whatever sanitizers the build has.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static const struct xnbd__hs_export exports[] = {
    {"", "default", 1 << 20,
     XNBD_FLAG_HAS_FLAGS | XNBD_FLAG_SEND_FLUSH | XNBD_FLAG_SEND_FUA |
         XNBD_FLAG_SEND_TRIM | XNBD_FLAG_SEND_WRITE_ZEROES,
     XNBD__CTX_BASE_ALLOCATION, 1, 4096, 32 << 20, NULL},
    {"ro", NULL, 4096, XNBD_FLAG_HAS_FLAGS | XNBD_FLAG_READ_ONLY, 0, 1, 4096,
     32 << 20, NULL},
};

static size_t cat_count(void *ud)
{
	(void)ud;
	return 2;
}

static const struct xnbd__hs_export *cat_get(void *ud, size_t i)
{
	(void)ud;
	return &exports[i];
}

static const struct xnbd__hs_export *cat_find(void *ud, const char *n,
                                              size_t len)
{
	(void)ud;
	for (size_t i = 0; i < 2; i++)
		if (strlen(exports[i].name) == len &&
		    memcmp(exports[i].name, n, len) == 0)
			return &exports[i];
	return NULL;
}

static const struct xnbd__hs_catalog catalog = {cat_count, cat_get, cat_find,
                                                NULL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* How far inputs got, for the smoke run's report. */
static unsigned long reached_transmission, requests_checked;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size < 2)
		return 0;
	/* The first byte picks the chunk size and the greeting style. */
	size_t chunk = (data[0] & 0x3f) + 1;
	bool oldstyle = data[0] & 0x40;
	bool shutting = data[0] & 0x80;
	data++;
	size--;

	struct xnbd__hs hs;
	xnbd__hs_init(&hs, &catalog, oldstyle);
	hs.shutting_down = shutting;
	size_t pos = 0;
	while (pos < size && hs.state != XNBD__HS_DONE &&
	       hs.state != XNBD__HS_CLOSE) {
		size_t n = size - pos < chunk ? size - pos : chunk;
		size_t used = xnbd__hs_input(&hs, data + pos, n);
		if (used > n)
			abort(); /* consumed more than it was given */
		if (used == 0 && hs.state != XNBD__HS_DONE &&
		    hs.state != XNBD__HS_CLOSE)
			abort(); /* made no progress on input it should take */
		pos += used;
		/* Every reply the machine wrote must be well framed. */
		xnbd__buf_reset(&hs.out);
	}
	if (hs.state == XNBD__HS_DONE) {
		if (!hs.export)
			abort();
		reached_transmission++;
		struct xnbd__tx tx = {hs.export->size, hs.tflags, hs.structured,
		                      hs.contexts};
		while (size - pos >= XNBD_REQUEST_SIZE) {
			struct xnbd__request r;
			if (xnbd__request_parse(data + pos, &r) < 0)
				break;
			pos += XNBD_REQUEST_SIZE;
			requests_checked++;
			uint32_t err = xnbd__request_check(&tx, &r);
			if (err == 0 && r.type != XNBD_CMD_DISC &&
			    r.type != XNBD_CMD_FLUSH &&
			    ((uint64_t)r.offset + r.length > tx.size))
				abort(); /* accepted a range past the end */
			if (err == 0 &&
			    (r.type == XNBD_CMD_READ ||
			     r.type == XNBD_CMD_WRITE) &&
			    r.length > XNBD_MAX_PAYLOAD)
				abort(); /* accepted an unbounded payload */
			if (err == 0 && xnbd__request_has_payload(&r))
				pos += r.length < size - pos ? r.length
				                             : size - pos;
		}
	}
	xnbd__hs_free(&hs);
	return 0;
}

#ifndef XNBD_LIBFUZZER
/* Generated inputs: a valid fixed-newstyle conversation, mutated. */
static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static size_t put_opt(uint8_t *p, uint32_t opt, const void *d, uint32_t len)
{
	xnbd__put64(p, XNBD_MAGIC_OPTS);
	xnbd__put32(p + 8, opt);
	xnbd__put32(p + 12, len);
	if (len)
		memcpy(p + 16, d, len);
	return 16 + len;
}

int main(int argc, char **argv)
{
	long iterations = argc > 1 ? atol(argv[1]) : 200000;
	static uint8_t buf[8192];
	for (long it = 0; it < iterations; it++) {
		size_t n = 0;
		buf[n++] = (uint8_t)next();
		xnbd__put32(buf + n, 3); /* client flags */
		n += 4;
		uint8_t go[10] = {0, 0, 0, 0, 0, 1, 0, 3};
		uint8_t meta[27] = {0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15};
		memcpy(meta + 12, "base:allocation", 15);
		n += put_opt(buf + n, XNBD_OPT_STRUCTURED_REPLY, NULL, 0);
		n += put_opt(buf + n, XNBD_OPT_SET_META_CONTEXT, meta,
		             sizeof(meta));
		n += put_opt(buf + n, XNBD_OPT_GO, go, 8);
		for (int k = 0; k < 16; k++) {
			uint8_t *p = buf + n;
			xnbd__put32(p, XNBD_MAGIC_REQUEST);
			xnbd__put16(p + 4, (uint16_t)(next() & 0x1f));
			xnbd__put16(p + 6, (uint16_t)(next() % 9));
			xnbd__put64(p + 8, next());
			xnbd__put64(p + 16, next() % (2 << 20));
			xnbd__put32(p + 24, (uint32_t)(next() % (64 << 10)));
			n += XNBD_REQUEST_SIZE;
		}
		/* Mutate a few bytes, maybe truncate. */
		int muts = (int)(next() % 6);
		for (int m = 0; m < muts; m++)
			buf[1 + next() % (n - 1)] = (uint8_t)next();
		if (next() % 4 == 0)
			n = 1 + next() % n;
		LLVMFuzzerTestOneInput(buf, n);
	}
	printf(
	    "fuzz-wire-smoke: %ld generated inputs, %lu reached transmission, "
	    "%lu requests checked, no failure\n",
	    iterations, reached_transmission, requests_checked);
	/* A generator that never gets past the handshake tests little. */
	return reached_transmission > (unsigned long)iterations / 4 ? 0 : 1;
}
#endif
