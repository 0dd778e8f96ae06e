/* test-wire.c - Check tests of the sans-I/O NBD codec (wire.h): the byte
 * buffer, the handshake state machine, request parsing and checking, and
 * the reply builders.
 *
 * Every expectation here agrees with doc/proto.md of NetworkBlockDevice/nbd.
 * Behaviour of the library that contradicts the spec is not asserted here;
 * it is demonstrated by test-wire-bugs.c instead.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "wire-test-util.h"
#include "unit-main.h"

#define CF_FIXED XNBD_FLAG_C_FIXED_NEWSTYLE
#define CF_NOZ XNBD_FLAG_C_NO_ZEROES
#define CF_BOTH (CF_FIXED | CF_NOZ)

#define MAXOPT XNBD__HS_MAX_OPTION

static struct fake_catalog fc;

static const struct xnbd__hs_catalog *catalog(void)
{
	fake_catalog_init(&fc, test_exports, N_TEST_EXPORTS);
	return &fc.cat;
}

static void begin(struct xnbd__hs *hs, uint32_t cflags)
{
	hs_begin(hs, catalog(), cflags);
}

static const struct xnbd__hs_export *exp_(int i)
{
	return &test_exports[i];
}

/* Negotiate structured replies (checked). */
static void structured(struct xnbd__hs *hs)
{
	hs_opt(hs, XNBD_OPT_STRUCTURED_REPLY, NULL, 0);
	expect_one_reply(hs, XNBD_OPT_STRUCTURED_REPLY, XNBD_REP_ACK);
	ck_assert(hs->structured);
}

/* Send INFO or GO for name with the given information requests. */
static void send_info(struct xnbd__hs *hs, uint32_t opt, const char *name,
                      size_t nreq, const uint16_t *reqs)
{
	static struct obuf d;
	ob_reset(&d);
	ob_info(&d, name, nreq, reqs);
	hs_opt_ob(hs, opt, &d);
}

static void send_meta(struct xnbd__hs *hs, uint32_t opt, const char *name,
                      size_t nq, const char *const *queries)
{
	static struct obuf d;
	ob_reset(&d);
	ob_meta(&d, name, nq, queries);
	hs_opt_ob(hs, opt, &d);
}

/* GO to name with no information requests; checks success. */
static void go(struct xnbd__hs *hs, const char *name)
{
	send_info(hs, XNBD_OPT_GO, name, 0, NULL);
	struct rcur rc;
	struct info_set is;
	rc_init(&rc, &hs->out);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_GO, &is), XNBD_REP_ACK);
	rc_end(&rc);
	ck_assert_int_eq(hs->state, XNBD__HS_DONE);
	xnbd__buf_reset(&hs->out);
}

/* LIST (checked: one NBD_REP_SERVER per export, then ACK). */
static void check_list(struct rcur *rc)
{
	struct orep r;
	for (int i = 0; i < N_TEST_EXPORTS; i++) {
		const struct xnbd__hs_export *e = exp_(i);
		size_t nl = strlen(e->name);
		size_t dl = e->description ? strlen(e->description) : 0;
		rc_expect(rc, XNBD_OPT_LIST, XNBD_REP_SERVER, &r);
		ck_assert_uint_eq(r.len, 4 + nl + dl);
		ck_assert_uint_eq(xnbd__get32(r.data), nl);
		ck_assert_mem_eq(r.data + 4, e->name, nl);
		if (dl)
			ck_assert_mem_eq(r.data + 4 + nl, e->description, dl);
	}
	rc_expect(rc, XNBD_OPT_LIST, XNBD_REP_ACK, NULL);
}

static void list_works(struct xnbd__hs *hs)
{
	hs_opt(hs, XNBD_OPT_LIST, NULL, 0);
	struct rcur rc;
	rc_init(&rc, &hs->out);
	check_list(&rc);
	rc_end(&rc);
	ck_assert_int_eq(hs->state, XNBD__HS_OPT_HEADER);
	xnbd__buf_reset(&hs->out);
}

/* ======================================================================== */
/* xnbd__buf and the byte-order helpers                                     */
/* ======================================================================== */

START_TEST(buf_init_is_empty)
{
	struct xnbd__buf b;
	memset(&b, 0xa5, sizeof(b));
	xnbd__buf_init(&b);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(b.len, 0);
	ck_assert_uint_eq(b.cap, 0);
	ck_assert(!b.failed);
}
END_TEST

START_TEST(buf_append_grows_and_keeps_bytes)
{
	struct xnbd__buf b;
	uint8_t want[5000];
	for (size_t i = 0; i < sizeof(want); i++)
		want[i] = (uint8_t)(i * 7 + 3);
	xnbd__buf_init(&b);
	size_t off = 0, step = 1;
	while (off < sizeof(want)) {
		size_t n =
		    step < sizeof(want) - off ? step : sizeof(want) - off;
		xnbd__buf_append(&b, want + off, n);
		off += n;
		step = step * 3 + 1;
		ck_assert_uint_eq(b.len, off);
		ck_assert_uint_ge(b.cap, b.len);
	}
	ck_assert(!b.failed);
	ck_assert_mem_eq(b.data, want, sizeof(want));
	xnbd__buf_free(&b);
	ck_assert_ptr_null(b.data);
	ck_assert_uint_eq(b.len, 0);
}
END_TEST

START_TEST(buf_append_nothing)
{
	struct xnbd__buf b;
	xnbd__buf_init(&b);
	xnbd__buf_append(&b, "abc", 3);
	xnbd__buf_append(&b, NULL, 0);
	ck_assert_uint_eq(b.len, 3);
	ck_assert(!b.failed);
	ck_assert_mem_eq(b.data, "abc", 3);
	xnbd__buf_free(&b);
}
END_TEST

START_TEST(buf_push_reserves_at_end)
{
	struct xnbd__buf b;
	xnbd__buf_init(&b);
	xnbd__buf_append(&b, "abc", 3);
	uint8_t *p = xnbd__buf_push(&b, 4);
	ck_assert_ptr_nonnull(p);
	ck_assert_ptr_eq(p, b.data + 3);
	ck_assert_uint_eq(b.len, 7);
	memcpy(p, "defg", 4);
	/* A push that must grow the storage keeps what was there. */
	p = xnbd__buf_push(&b, 1000);
	ck_assert_ptr_nonnull(p);
	ck_assert_ptr_eq(p, b.data + 7);
	ck_assert_uint_eq(b.len, 1007);
	ck_assert_uint_ge(b.cap, 1007);
	ck_assert_mem_eq(b.data, "abcdefg", 7);
	xnbd__buf_free(&b);
}
END_TEST

START_TEST(buf_reset_keeps_storage)
{
	struct xnbd__buf b;
	xnbd__buf_init(&b);
	xnbd__buf_append(&b, "hello", 5);
	uint8_t *d = b.data;
	size_t cap = b.cap;
	xnbd__buf_reset(&b);
	ck_assert_uint_eq(b.len, 0);
	ck_assert_ptr_eq(b.data, d);
	ck_assert_uint_eq(b.cap, cap);
	xnbd__buf_append(&b, "xyz", 3);
	ck_assert_uint_eq(b.len, 3);
	ck_assert_mem_eq(b.data, "xyz", 3);
	xnbd__buf_free(&b);
}
END_TEST

START_TEST(buf_failure_is_sticky)
{
	struct xnbd__buf b;
	xnbd__buf_init(&b);
	xnbd__buf_append(&b, "ab", 2);
	ck_assert_ptr_null(xnbd__buf_push(&b, SIZE_MAX));
	ck_assert(b.failed);
	ck_assert_uint_eq(b.len, 2);
	xnbd__buf_append(&b, "cd", 2);
	ck_assert_uint_eq(b.len, 2);
	ck_assert_ptr_null(xnbd__buf_push(&b, 1));
	ck_assert_uint_eq(b.len, 2);
	ck_assert_mem_eq(b.data, "ab", 2);
	xnbd__buf_free(&b);
	ck_assert(!b.failed);
	ck_assert_ptr_null(b.data);
}
END_TEST

START_TEST(put_get_big_endian)
{
	uint8_t b[8];
	xnbd__put16(b, 0x1234);
	ck_assert_mem_eq(b, "\x12\x34", 2);
	ck_assert_uint_eq(xnbd__get16(b), 0x1234);
	xnbd__put32(b, 0x89abcdefU);
	ck_assert_mem_eq(b, "\x89\xab\xcd\xef", 4);
	ck_assert_uint_eq(xnbd__get32(b), 0x89abcdefU);
	xnbd__put64(b, 0xf102030405060708ULL);
	ck_assert_mem_eq(b, "\xf1\x02\x03\x04\x05\x06\x07\x08", 8);
	ck_assert_uint_eq(xnbd__get64(b), 0xf102030405060708ULL);
}
END_TEST

/* ======================================================================== */
/* Handshake: greeting, client flags, oldstyle                              */
/* ======================================================================== */

START_TEST(hs_greeting_bytes)
{
	static const uint8_t want[18] = {
	    0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43, /* NBDMAGIC */
	    0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, /* IHAVEOPT */
	    0x00, 0x03, /* FIXED_NEWSTYLE | NO_ZEROES */
	};
	struct xnbd__hs hs;
	xnbd__hs_init(&hs, catalog(), false);
	ck_assert_int_eq(hs.state, XNBD__HS_CLIENT_FLAGS);
	ck_assert_uint_eq(hs.out.len, sizeof(want));
	ck_assert_mem_eq(hs.out.data, want, sizeof(want));
	ck_assert_ptr_null(hs.export);
	ck_assert_uint_eq(xnbd__hs_input(&hs, NULL, 0), 0);
	ck_assert_int_eq(hs.state, XNBD__HS_CLIENT_FLAGS);
	xnbd__hs_free(&hs);
}
END_TEST

/* _i = the client flags (0..3): every combination of the two known bits. */
START_TEST(hs_client_flags_known)
{
	struct xnbd__hs hs;
	begin(&hs, (uint32_t)_i); /* checks: OPT_HEADER, nothing sent */
	ck_assert(hs.fixed == ((_i & 1) != 0));
	ck_assert(hs.no_zeroes == ((_i & 2) != 0));
	xnbd__hs_free(&hs);
}
END_TEST

static const uint32_t bad_client_flags[] = {
    1U << 2, 1U << 3, 1U << 31, 0xffffffffU, CF_BOTH | (1U << 2),
};

START_TEST(hs_client_flags_unknown_close)
{
	struct xnbd__hs hs;
	struct obuf ob;
	xnbd__hs_init(&hs, catalog(), false);
	xnbd__buf_reset(&hs.out);
	ob_reset(&ob);
	ob_put32(&ob, bad_client_flags[_i]);
	ob_option(&ob, XNBD_OPT_LIST, NULL, 0); /* must not be read */
	ck_assert_uint_eq(hs_feed(&hs, &ob), 4);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, 0);
	ck_assert_uint_eq(xnbd__hs_input(&hs, ob.d + 4, ob.len - 4), 0);
	ck_assert_uint_eq(hs.out.len, 0);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_oldstyle_greeting)
{
	uint8_t want[152];
	memset(want, 0, sizeof(want));
	memcpy(want, "NBDMAGIC", 8);
	memcpy(want + 8, "\x00\x00\x42\x02\x81\x86\x12\x53",
	       8); /* cliserv_magic */
	xnbd__put64(want + 16, DEFAULT_SIZE);
	xnbd__put32(want + 24, DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	/* 124 zero bytes follow. */

	struct xnbd__hs hs;
	xnbd__hs_init(&hs, catalog(), true);
	ck_assert_uint_eq(hs.out.len, sizeof(want));
	ck_assert_mem_eq(hs.out.data, want, sizeof(want));
	ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	ck_assert_ptr_eq(hs.export, exp_(EXP_DEFAULT));
	ck_assert_uint_eq(hs.tflags, DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	ck_assert_uint_eq(hs.contexts, 0);
	uint8_t more[4] = {0, 0, 0, 3};
	ck_assert_uint_eq(xnbd__hs_input(&hs, more, sizeof(more)), 0);
	ck_assert_uint_eq(hs.out.len, sizeof(want));
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_oldstyle_empty_catalog_closes)
{
	struct fake_catalog empty;
	struct xnbd__hs hs;
	fake_catalog_init(&empty, test_exports, 0);
	xnbd__hs_init(&hs, &empty.cat, true);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, 0);
	ck_assert_ptr_null(hs.export);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: NBD_OPT_EXPORT_NAME                                           */
/* ======================================================================== */

START_TEST(hs_export_name_sends_zeroes)
{
	struct xnbd__hs hs;
	uint8_t want[10 + 124];
	memset(want, 0, sizeof(want));
	xnbd__put64(want, DISK2_SIZE);
	xnbd__put16(want + 8, DISK2_TFLAGS | XNBD_FLAG_HAS_FLAGS);

	begin(&hs, CF_FIXED);
	hs_opt(&hs, XNBD_OPT_EXPORT_NAME, "disk2", 5);
	ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	ck_assert_uint_eq(hs.out.len, sizeof(want));
	ck_assert_mem_eq(hs.out.data, want, sizeof(want));
	ck_assert_ptr_eq(hs.export, exp_(EXP_DISK2));
	ck_assert_uint_eq(hs.tflags, DISK2_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	xnbd__hs_free(&hs);
}
END_TEST

/* _i: 0 = NO_ZEROES with FIXED_NEWSTYLE, 1 = NO_ZEROES alone. */
START_TEST(hs_export_name_no_zeroes)
{
	struct xnbd__hs hs;
	uint8_t want[10];
	xnbd__put64(want, DEFAULT_SIZE);
	xnbd__put16(want + 8, DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS);

	begin(&hs, _i ? CF_NOZ : CF_BOTH);
	hs_opt(&hs, XNBD_OPT_EXPORT_NAME, NULL, 0); /* "" = default export */
	ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	ck_assert_uint_eq(hs.out.len, sizeof(want));
	ck_assert_mem_eq(hs.out.data, want, sizeof(want));
	ck_assert_ptr_eq(hs.export, exp_(EXP_DEFAULT));
	xnbd__hs_free(&hs);
}
END_TEST

static const char *const unknown_names[] = {"nope", "disk", "disk2x", "DISK2",
                                            " disk2"};

START_TEST(hs_export_name_unknown_closes)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	const char *n = unknown_names[_i];
	hs_opt(&hs, XNBD_OPT_EXPORT_NAME, n, (uint32_t)strlen(n));
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, 0);
	ck_assert_ptr_null(hs.export);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_export_name_leaves_transmission_bytes)
{
	struct xnbd__hs hs;
	struct obuf ob;
	begin(&hs, CF_BOTH);
	ob_reset(&ob);
	ob_option(&ob, XNBD_OPT_EXPORT_NAME, "disk2", 5);
	size_t optlen = ob.len;
	ob_put32(&ob, XNBD_MAGIC_REQUEST); /* first request header */
	ob_zeroes(&ob, XNBD_REQUEST_SIZE - 4);
	ck_assert_uint_eq(hs_feed(&hs, &ob), optlen);
	ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	ck_assert_uint_eq(hs.out.len, 10);
	ck_assert_uint_eq(xnbd__hs_input(&hs, ob.d + optlen, ob.len - optlen),
	                  0);
	ck_assert_uint_eq(hs.out.len, 10);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: ABORT, LIST, STARTTLS                                         */
/* ======================================================================== */

START_TEST(hs_abort_acks_then_closes)
{
	static const uint8_t ack[20] = {
	    0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, /* reply magic */
	    0x00, 0x00, 0x00, 0x02,                         /* NBD_OPT_ABORT */
	    0x00, 0x00, 0x00, 0x01,                         /* NBD_REP_ACK */
	    0x00, 0x00, 0x00, 0x00,                         /* no data */
	};
	struct xnbd__hs hs;
	struct obuf ob;
	begin(&hs, CF_BOTH);
	ob_reset(&ob);
	ob_option(&ob, XNBD_OPT_ABORT, NULL, 0);
	ob_option(&ob, XNBD_OPT_LIST, NULL, 0); /* never read */
	ck_assert_uint_eq(hs_feed(&hs, &ob), XNBD_OPTION_HEADER_SIZE);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, sizeof(ack));
	ck_assert_mem_eq(hs.out.data, ack, sizeof(ack));
	ck_assert_ptr_null(hs.export);
	xnbd__hs_free(&hs);
}
END_TEST

/* The spec: the server SHOULD ignore data sent with NBD_OPT_ABORT. */
START_TEST(hs_abort_ignores_data)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs_opt(&hs, XNBD_OPT_ABORT, "junk!", 5);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	expect_one_reply(&hs, XNBD_OPT_ABORT, XNBD_REP_ACK);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_list_exports)
{
	/* The first NBD_REP_SERVER reply, byte by byte. */
	static const uint8_t first[20 + 4 + 14] = {
	    0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65,
	    0xa9, 0x00, 0x00, 0x00, 0x03, /* NBD_OPT_LIST */
	    0x00, 0x00, 0x00, 0x02,       /* NBD_REP_SERVER */
	    0x00, 0x00, 0x00, 0x12,       /* 4 + 0 + 14 */
	    0x00, 0x00, 0x00, 0x00,       /* name "" */
	    'd',  'e',  'f',  'a',  'u',  'l',  't',
	    ' ',  'e',  'x',  'p',  'o',  'r',  't',
	};
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs_opt(&hs, XNBD_OPT_LIST, NULL, 0);
	ck_assert_uint_ge(hs.out.len, sizeof(first));
	ck_assert_mem_eq(hs.out.data, first, sizeof(first));
	struct rcur rc;
	rc_init(&rc, &hs.out);
	check_list(&rc);
	rc_end(&rc);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_list_with_data_is_invalid)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs_opt(&hs, XNBD_OPT_LIST, "abcd", 4);
	expect_one_reply(&hs, XNBD_OPT_LIST, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	list_works(&hs); /* the state machine still takes options */
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_starttls_refused_by_policy)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs_opt(&hs, XNBD_OPT_STARTTLS, NULL, 0);
	expect_one_reply(&hs, XNBD_OPT_STARTTLS, XNBD_REP_ERR_POLICY);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	/* With data it is invalid. */
	hs_opt(&hs, XNBD_OPT_STARTTLS, "x", 1);
	expect_one_reply(&hs, XNBD_OPT_STARTTLS, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	list_works(&hs);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: INFO and GO                                                   */
/* ======================================================================== */

static void check_info_export(const struct info_set *is, uint64_t size,
                              uint16_t tflags)
{
	ck_assert_uint_eq(is->count[XNBD_INFO_EXPORT], 1);
	const struct orep *r = &is->rep[XNBD_INFO_EXPORT];
	ck_assert_uint_eq(r->len, 12);
	ck_assert_uint_eq(xnbd__get16(r->data), XNBD_INFO_EXPORT);
	ck_assert_uint_eq(xnbd__get64(r->data + 2), size);
	ck_assert_uint_eq(xnbd__get16(r->data + 10), tflags);
}

static void check_info_block(const struct info_set *is, uint32_t min,
                             uint32_t pref, uint32_t max)
{
	ck_assert_uint_eq(is->count[XNBD_INFO_BLOCK_SIZE], 1);
	const struct orep *r = &is->rep[XNBD_INFO_BLOCK_SIZE];
	ck_assert_uint_eq(r->len, 14);
	ck_assert_uint_eq(xnbd__get16(r->data), XNBD_INFO_BLOCK_SIZE);
	ck_assert_uint_eq(xnbd__get32(r->data + 2), min);
	ck_assert_uint_eq(xnbd__get32(r->data + 6), pref);
	ck_assert_uint_eq(xnbd__get32(r->data + 10), max);
}

static void check_info_string(const struct info_set *is, uint16_t type,
                              const char *s)
{
	ck_assert_uint_eq(is->count[type], 1);
	const struct orep *r = &is->rep[type];
	ck_assert_uint_eq(r->len, 2 + strlen(s));
	ck_assert_uint_eq(xnbd__get16(r->data), type);
	ck_assert_mem_eq(r->data + 2, s, strlen(s));
}

/* _i: 0 = NBD_OPT_INFO, 1 = NBD_OPT_GO. */
START_TEST(hs_info_default_export)
{
	uint32_t opt = _i ? XNBD_OPT_GO : XNBD_OPT_INFO;
	struct xnbd__hs hs;
	struct rcur rc;
	struct info_set is;
	begin(&hs, CF_FIXED); /* no NO_ZEROES: GO must not pad anyway */
	send_info(&hs, opt, "", 0, NULL);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, opt, &is), XNBD_REP_ACK);
	rc_end(&rc); /* in particular: no zero padding after GO's ACK */
	check_info_export(&is, DEFAULT_SIZE,
	                  DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	check_info_block(&is, 1, 4096, 32U * 1024 * 1024);
	ck_assert_uint_eq(is.count[XNBD_INFO_NAME], 0);
	ck_assert_uint_eq(is.count[XNBD_INFO_DESCRIPTION], 0);
	ck_assert_uint_eq(is.unknown, 0);
	if (opt == XNBD_OPT_GO) {
		ck_assert_int_eq(hs.state, XNBD__HS_DONE);
		ck_assert_ptr_eq(hs.export, exp_(EXP_DEFAULT));
		ck_assert_uint_eq(hs.tflags,
		                  DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS);
		uint8_t more[8] = {0};
		ck_assert_uint_eq(xnbd__hs_input(&hs, more, sizeof(more)), 0);
	} else {
		ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
		ck_assert_ptr_null(hs.export);
		xnbd__buf_reset(&hs.out);
		list_works(&hs);
	}
	xnbd__hs_free(&hs);
}
END_TEST

/* The block sizes are the export's, whatever they are; _i as above. */
START_TEST(hs_info_block_size_from_export)
{
	uint32_t opt = _i ? XNBD_OPT_GO : XNBD_OPT_INFO;
	static const uint16_t req[] = {XNBD_INFO_BLOCK_SIZE};
	struct xnbd__hs hs;
	struct rcur rc;
	struct info_set is;
	begin(&hs, CF_BOTH);
	send_info(&hs, opt, "disk2", 1, req);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, opt, &is), XNBD_REP_ACK);
	rc_end(&rc);
	check_info_block(&is, 512, 65536, 1024 * 1024);
	check_info_export(&is, DISK2_SIZE, DISK2_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	ck_assert_int_eq(hs.state, _i ? XNBD__HS_DONE : XNBD__HS_OPT_HEADER);
	ck_assert_ptr_eq(hs.export, _i ? exp_(EXP_DISK2) : NULL);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_info_name_and_description)
{
	static const uint16_t req[] = {XNBD_INFO_DESCRIPTION,
	                               0x7fff /* unknown */, XNBD_INFO_NAME};
	struct xnbd__hs hs;
	struct rcur rc;
	struct info_set is;
	begin(&hs, CF_BOTH);

	send_info(&hs, XNBD_OPT_INFO, "", 3, req);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &is), XNBD_REP_ACK);
	rc_end(&rc);
	check_info_string(&is, XNBD_INFO_NAME, "");
	check_info_string(&is, XNBD_INFO_DESCRIPTION, DEFAULT_DESC);
	check_info_export(&is, DEFAULT_SIZE,
	                  DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	ck_assert_uint_eq(is.unknown, 0);
	xnbd__buf_reset(&hs.out);

	send_info(&hs, XNBD_OPT_INFO, "both", 3, req);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &is), XNBD_REP_ACK);
	rc_end(&rc);
	check_info_string(&is, XNBD_INFO_NAME, "both");
	check_info_string(&is, XNBD_INFO_DESCRIPTION, "two contexts");
	check_info_export(&is, BOTH_SIZE,
	                  XNBD_FLAG_SEND_FLUSH | XNBD_FLAG_HAS_FLAGS);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	xnbd__hs_free(&hs);
}
END_TEST

/* An export without a description: the request is answered without one. */
START_TEST(hs_info_no_description)
{
	static const uint16_t req[] = {XNBD_INFO_DESCRIPTION};
	struct xnbd__hs hs;
	struct rcur rc;
	struct info_set is;
	begin(&hs, CF_BOTH);
	send_info(&hs, XNBD_OPT_INFO, "disk2", 1, req);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &is), XNBD_REP_ACK);
	rc_end(&rc);
	ck_assert_uint_eq(is.count[XNBD_INFO_DESCRIPTION], 0);
	ck_assert_uint_eq(is.count[XNBD_INFO_NAME], 0);
	check_info_export(&is, DISK2_SIZE, DISK2_TFLAGS | XNBD_FLAG_HAS_FLAGS);
	xnbd__hs_free(&hs);
}
END_TEST

/* _i: 0 = INFO, 1 = GO. */
START_TEST(hs_info_unknown_export)
{
	uint32_t opt = _i ? XNBD_OPT_GO : XNBD_OPT_INFO;
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	for (size_t i = 0; i < sizeof(unknown_names) / sizeof(unknown_names[0]);
	     i++) {
		send_info(&hs, opt, unknown_names[i], 0, NULL);
		expect_one_reply(&hs, opt, XNBD_REP_ERR_UNKNOWN); /* no INFO */
		ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
		ck_assert_ptr_null(hs.export);
	}
	go(&hs, "disk2");
	ck_assert_ptr_eq(hs.export, exp_(EXP_DISK2));
	xnbd__hs_free(&hs);
}
END_TEST

/* Malformed INFO/GO data, one case per call. */
#define N_BAD_INFO 9
static void bad_info_data(int which, struct obuf *d)
{
	ob_reset(d);
	switch (which) {
	case 0: /* empty */
		break;
	case 1: /* shorter than name length + request count */
		ob_zeroes(d, 5);
		break;
	case 2: /* name length > option length - 6 */
		ob_put32(d, 10);
		ob_bytes(d, "disk2", 5);
		ob_put16(d, 0);
		break;
	case 3: /* one request announced, none sent */
		ob_put32(d, 0);
		ob_put16(d, 1);
		break;
	case 4: /* trailing bytes after the requests */
		ob_put32(d, 0);
		ob_put16(d, 0);
		ob_put16(d, XNBD_INFO_NAME);
		break;
	case 5: /* two requests announced, one sent */
		ob_put32(d, 0);
		ob_put16(d, 2);
		ob_put16(d, XNBD_INFO_NAME);
		break;
	case 6: /* NUL in the name */
		ob_put32(d, 3);
		ob_bytes(d, "a\0b", 3);
		ob_put16(d, 0);
		break;
	case 7: /* huge name length */
		ob_put32(d, 0xffffffffU);
		ob_put16(d, 0);
		break;
	case 8: /* name longer than the 4096-byte string limit */
		ob_put32(d, XNBD_MAX_STRING + 1);
		for (unsigned i = 0; i <= XNBD_MAX_STRING; i++)
			ob_bytes(d, "a", 1);
		ob_put16(d, 0);
		break;
	}
}

/* _i: case * 2 + (0 = INFO, 1 = GO). */
START_TEST(hs_info_bad_lengths)
{
	uint32_t opt = (_i & 1) ? XNBD_OPT_GO : XNBD_OPT_INFO;
	static struct obuf d;
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	bad_info_data(_i / 2, &d);
	hs_opt_ob(&hs, opt, &d);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert_ptr_null(hs.export);
	go(&hs, ""); /* still in sync */
	ck_assert_ptr_eq(hs.export, exp_(EXP_DEFAULT));
	xnbd__hs_free(&hs);
}
END_TEST

/* INFO then GO with the same parameters give the same information. */
START_TEST(hs_info_then_go_same_information)
{
	static const uint16_t req[] = {XNBD_INFO_NAME, XNBD_INFO_BLOCK_SIZE,
	                               XNBD_INFO_DESCRIPTION};
	struct xnbd__hs hs;
	struct rcur rc;
	struct info_set a, b;
	begin(&hs, CF_BOTH);
	send_info(&hs, XNBD_OPT_INFO, "both", 3, req);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &a), XNBD_REP_ACK);
	rc_end(&rc);
	/* The replies point into hs.out: keep a copy. */
	struct xnbd__buf first;
	xnbd__buf_init(&first);
	xnbd__buf_append(&first, hs.out.data, hs.out.len);
	rc_init(&rc, &first);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &a), XNBD_REP_ACK);
	xnbd__buf_reset(&hs.out);

	send_info(&hs, XNBD_OPT_GO, "both", 3, req);
	rc_init(&rc, &hs.out);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_GO, &b), XNBD_REP_ACK);
	rc_end(&rc);
	for (int t = 0; t < N_INFO_TYPES; t++) {
		ck_assert_uint_eq(a.count[t], 1);
		ck_assert_uint_eq(b.count[t], 1);
		ck_assert_uint_eq(a.rep[t].len, b.rep[t].len);
		ck_assert_mem_eq(a.rep[t].data, b.rep[t].data, a.rep[t].len);
	}
	ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	ck_assert_ptr_eq(hs.export, exp_(EXP_BOTH));
	xnbd__buf_free(&first);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: STRUCTURED_REPLY and SEND_DF                                  */
/* ======================================================================== */

START_TEST(hs_structured_reply)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	ck_assert(!hs.structured);
	hs_opt(&hs, XNBD_OPT_STRUCTURED_REPLY, NULL, 0);
	expect_one_reply(&hs, XNBD_OPT_STRUCTURED_REPLY, XNBD_REP_ACK);
	ck_assert(hs.structured);
	/* A second time: refused, still negotiated. */
	hs_opt(&hs, XNBD_OPT_STRUCTURED_REPLY, NULL, 0);
	expect_one_reply(&hs, XNBD_OPT_STRUCTURED_REPLY, XNBD_REP_ERR_INVALID);
	ck_assert(hs.structured);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_structured_reply_with_data_is_invalid)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs_opt(&hs, XNBD_OPT_STRUCTURED_REPLY, "\0", 1);
	expect_one_reply(&hs, XNBD_OPT_STRUCTURED_REPLY, XNBD_REP_ERR_INVALID);
	ck_assert(!hs.structured);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	/* and it can still be negotiated properly */
	structured(&hs);
	xnbd__hs_free(&hs);
}
END_TEST

/* _i bit 0: structured replies negotiated; bit 1: EXPORT_NAME, else INFO
 * then GO.  SEND_DF is in the transmission flags exactly when structured
 * replies were negotiated. */
START_TEST(hs_send_df_only_after_structured)
{
	bool sr = _i & 1;
	uint16_t want =
	    DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS | (sr ? XNBD_FLAG_SEND_DF : 0);
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	if (sr)
		structured(&hs);
	if (_i & 2) {
		hs_opt(&hs, XNBD_OPT_EXPORT_NAME, NULL, 0);
		ck_assert_uint_eq(hs.out.len, 10);
		ck_assert_uint_eq(xnbd__get16(hs.out.data + 8), want);
	} else {
		struct rcur rc;
		struct info_set is;
		send_info(&hs, XNBD_OPT_INFO, "", 0, NULL);
		rc_init(&rc, &hs.out);
		ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &is),
		                  XNBD_REP_ACK);
		check_info_export(&is, DEFAULT_SIZE, want);
		xnbd__buf_reset(&hs.out);
		send_info(&hs, XNBD_OPT_GO, "", 0, NULL);
		rc_init(&rc, &hs.out);
		ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_GO, &is),
		                  XNBD_REP_ACK);
		check_info_export(&is, DEFAULT_SIZE, want);
	}
	ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	ck_assert_uint_eq(hs.tflags, want);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: meta contexts                                                 */
/* ======================================================================== */

static uint32_t meta_opt(int i)
{
	return i ? XNBD_OPT_SET_META_CONTEXT : XNBD_OPT_LIST_META_CONTEXT;
}

/* _i: 0 = LIST, 1 = SET. */
START_TEST(hs_meta_needs_structured)
{
	static const char *const q[] = {"base:allocation"};
	uint32_t opt = meta_opt(_i);
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	send_meta(&hs, opt, "", 1, q);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert_uint_eq(hs.contexts, 0);
	structured(&hs);
	go(&hs, "");
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* Run one meta option and collect its contexts; checks the final reply. */
static void meta(struct xnbd__hs *hs, uint32_t opt, const char *name, size_t nq,
                 const char *const *q, uint32_t final, struct ctx_set *cs)
{
	struct rcur rc;
	send_meta(hs, opt, name, nq, q);
	rc_init(&rc, &hs->out);
	ck_assert_uint_eq(rc_contexts(&rc, opt, cs), final);
	rc_end(&rc);
	ck_assert_int_eq(hs->state, XNBD__HS_OPT_HEADER);
	xnbd__buf_reset(&hs->out);
}

START_TEST(hs_list_meta_exact)
{
	static const char *const q[] = {"base:allocation"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_str_eq(cs.name[0], "base:allocation");
	ck_assert_uint_eq(cs.id[0], 0);    /* reserved in LIST replies */
	ck_assert_uint_eq(hs.contexts, 0); /* listing selects nothing */
	go(&hs, "");
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* "base:" is a wildcard for LIST: exactly the base: contexts. */
START_TEST(hs_list_meta_namespace)
{
	static const char *const q[] = {"base:"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_str_eq(cs.name[0], "base:allocation");
	ck_assert_uint_eq(cs.id[0], 0);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "both", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_str_eq(cs.name[0], "base:allocation");
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "disk2", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* No queries: LIST returns every context of the export. */
START_TEST(hs_list_meta_no_queries_returns_all)
{
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "", 0, NULL, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_str_eq(cs.name[0], "base:allocation");
	ck_assert_uint_eq(cs.id[0], 0);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "disk2", 0, NULL, XNBD_REP_ACK,
	     &cs);
	ck_assert_uint_eq(cs.n, 0);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "both", 0, NULL, XNBD_REP_ACK,
	     &cs);
	ck_assert_uint_eq(cs.n, 2);
	ck_assert_int_ge(ctx_find(&cs, "base:allocation"), 0);
	ck_assert_str_ne(cs.name[0], cs.name[1]);
	ck_assert_uint_eq(cs.id[0], 0);
	ck_assert_uint_eq(cs.id[1], 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* No queries: SET selects nothing. */
START_TEST(hs_set_meta_no_queries_selects_none)
{
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 0, NULL, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 0);
	ck_assert_uint_eq(hs.contexts, 0);
	go(&hs, "");
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_set_meta_exact)
{
	static const char *const q[] = {"base:allocation"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_str_eq(cs.name[0], "base:allocation");
	ck_assert_uint_ne(cs.id[0], 0);
	ck_assert_uint_eq(hs.contexts, XNBD__CTX_BASE_ALLOCATION);
	ck_assert_ptr_eq(hs.ctx_export, exp_(EXP_DEFAULT));
	go(&hs, "");
	ck_assert_uint_eq(hs.contexts, XNBD__CTX_BASE_ALLOCATION);
	xnbd__hs_free(&hs);
}
END_TEST

/* "base:" selects nothing in SET (the spec: MUST be ignored). */
START_TEST(hs_set_meta_namespace_selects_nothing)
{
	static const char *const q[] = {"base:"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "both", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 0);
	ck_assert_uint_eq(hs.contexts, 0);
	go(&hs, "both");
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* Unknown namespaces and unknown base: leaves are ignored; _i: LIST/SET. */
START_TEST(hs_meta_unknown_queries_ignored)
{
	static const char *const unknown[] = {"x-foo:bar", "base:nothing",
	                                      "qemu:dirty-bitmap:x", "foo:"};
	static const char *const mixed[] = {"x-foo:bar", "base:allocation",
	                                    "base:nothing"};
	uint32_t opt = meta_opt(_i);
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, opt, "", 4, unknown, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 0);
	ck_assert_uint_eq(hs.contexts, 0);
	meta(&hs, opt, "", 3, mixed, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_str_eq(cs.name[0], "base:allocation");
	if (_i)
		ck_assert_uint_ne(cs.id[0], 0);
	else
		ck_assert_uint_eq(cs.id[0], 0);
	ck_assert_uint_eq(hs.contexts, _i ? XNBD__CTX_BASE_ALLOCATION : 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* A query without "namespace:" is refused; _i: query * 2 + LIST/SET. */
static const char *const malformed_queries[] = {"allocation", ":allocation",
                                                ""};

START_TEST(hs_meta_malformed_query)
{
	const char *const q[] = {"base:allocation", malformed_queries[_i / 2]};
	uint32_t opt = meta_opt(_i & 1);
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	send_meta(&hs, opt, "", 2, q);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert_uint_eq(hs.contexts, 0);
	list_works(&hs);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_meta_unknown_export)
{
	static const char *const q[] = {"base:allocation"};
	uint32_t opt = meta_opt(_i);
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	send_meta(&hs, opt, "nope", 1, q);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_UNKNOWN);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

#define N_BAD_META 9
static void bad_meta_data(int which, struct obuf *d)
{
	ob_reset(d);
	switch (which) {
	case 0: /* empty */
		break;
	case 1: /* 7 bytes */
		ob_zeroes(d, 7);
		break;
	case 2: /* name length beyond the option */
		ob_put32(d, 100);
		ob_put32(d, 0);
		break;
	case 3: /* one query announced, nothing follows */
		ob_put32(d, 0);
		ob_put32(d, 1);
		break;
	case 4: /* query length beyond the option */
		ob_put32(d, 0);
		ob_put32(d, 1);
		ob_put32(d, 16);
		ob_bytes(d, "base:", 5);
		break;
	case 5: /* trailing byte, no query */
		ob_put32(d, 0);
		ob_put32(d, 0);
		ob_bytes(d, "x", 1);
		break;
	case 6: /* trailing bytes after a query */
		ob_put32(d, 0);
		ob_put32(d, 1);
		ob_put32(d, 15);
		ob_bytes(d, "base:allocation", 15);
		ob_bytes(d, "xyz", 3);
		break;
	case 7: /* absurd query count */
		ob_put32(d, 0);
		ob_put32(d, 0xffffffffU);
		break;
	case 8: /* NUL in the export name */
		ob_put32(d, 2);
		ob_bytes(d, "a\0", 2);
		ob_put32(d, 0);
		break;
	}
}

/* _i: case * 2 + LIST/SET. */
START_TEST(hs_meta_bad_lengths)
{
	uint32_t opt = meta_opt(_i & 1);
	static struct obuf d;
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	bad_meta_data(_i / 2, &d);
	hs_opt_ob(&hs, opt, &d);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert_uint_eq(hs.contexts, 0);
	list_works(&hs);
	xnbd__hs_free(&hs);
}
END_TEST

/* SET selecting two contexts: distinct, non-zero IDs.  The names are taken
 * from LIST, so this does not depend on what the second context is called. */
START_TEST(hs_set_meta_ids_unique_nonzero)
{
	struct xnbd__hs hs;
	struct ctx_set all, set;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_LIST_META_CONTEXT, "both", 0, NULL, XNBD_REP_ACK,
	     &all);
	ck_assert_uint_eq(all.n, 2);
	const char *q[2] = {all.name[0], all.name[1]};
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "both", 2, q, XNBD_REP_ACK, &set);
	ck_assert_uint_eq(set.n, 2);
	ck_assert_uint_ne(set.id[0], 0);
	ck_assert_uint_ne(set.id[1], 0);
	ck_assert_uint_ne(set.id[0], set.id[1]);
	ck_assert_uint_eq(hs.contexts,
	                  XNBD__CTX_BASE_ALLOCATION | XNBD__CTX_XNBD_CACHE);
	go(&hs, "both");
	ck_assert_uint_eq(hs.contexts,
	                  XNBD__CTX_BASE_ALLOCATION | XNBD__CTX_XNBD_CACHE);
	xnbd__hs_free(&hs);
}
END_TEST

/* A context the export does not have is not selected. */
START_TEST(hs_set_meta_export_without_context)
{
	static const char *const q[] = {"base:allocation"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "disk2", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 0);
	ck_assert_uint_eq(hs.contexts, 0);
	go(&hs, "disk2");
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* Contexts set for "" are dropped when another export is chosen, even one
 * that has the same context.  _i: 0 GO "both", 1 EXPORT_NAME "both",
 * 2 GO "disk2". */
START_TEST(hs_contexts_dropped_for_other_export)
{
	static const char *const q[] = {"base:allocation"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 1);
	ck_assert_uint_eq(hs.contexts, XNBD__CTX_BASE_ALLOCATION);
	if (_i == 0) {
		go(&hs, "both");
	} else if (_i == 1) {
		hs_opt(&hs, XNBD_OPT_EXPORT_NAME, "both", 4);
		ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	} else {
		go(&hs, "disk2");
	}
	ck_assert_ptr_eq(hs.export, _i == 2 ? exp_(EXP_DISK2) : exp_(EXP_BOTH));
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* _i: 0 GO "", 1 EXPORT_NAME "". */
START_TEST(hs_contexts_kept_for_same_export)
{
	static const char *const q[] = {"base:allocation"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	if (_i == 0) {
		go(&hs, "");
	} else {
		hs_opt(&hs, XNBD_OPT_EXPORT_NAME, NULL, 0);
		ck_assert_int_eq(hs.state, XNBD__HS_DONE);
	}
	ck_assert_ptr_eq(hs.export, exp_(EXP_DEFAULT));
	ck_assert_uint_eq(hs.contexts, XNBD__CTX_BASE_ALLOCATION);
	xnbd__hs_free(&hs);
}
END_TEST

/* A later successful SET replaces the earlier selection. */
START_TEST(hs_set_meta_replaces)
{
	static const char *const q[] = {"base:allocation"};
	struct xnbd__hs hs;
	struct ctx_set cs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(hs.contexts, XNBD__CTX_BASE_ALLOCATION);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 0, NULL, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(hs.contexts, 0);
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(hs.contexts, XNBD__CTX_BASE_ALLOCATION);
	/* Now for an export without it, then GO to the first one. */
	meta(&hs, XNBD_OPT_SET_META_CONTEXT, "disk2", 1, q, XNBD_REP_ACK, &cs);
	ck_assert_uint_eq(cs.n, 0);
	ck_assert_uint_eq(hs.contexts, 0);
	go(&hs, "");
	ck_assert_uint_eq(hs.contexts, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: unknown options, over-long options, bad magic                 */
/* ======================================================================== */

static const uint32_t unknown_opts[] = {
    99, XNBD_OPT_EXTENDED_HEADERS, XNBD_OPT_PEEK_EXPORT, 0, 12, 0xffffffffU,
};

/* _i: option * 2 + (0 = no data, 1 = 7 bytes of data). */
START_TEST(hs_unknown_option_unsupported)
{
	uint32_t opt = unknown_opts[_i / 2];
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	if (_i & 1)
		hs_opt(&hs, opt, "1234567", 7);
	else
		hs_opt(&hs, opt, NULL, 0);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_UNSUP);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	list_works(&hs);
	go(&hs, "");
	xnbd__hs_free(&hs);
}
END_TEST

/* Option data of exactly XNBD__HS_MAX_OPTION bytes is still taken in. */
START_TEST(hs_option_at_limit_is_processed)
{
	static struct obuf d;
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	ob_reset(&d);
	ob_zeroes(&d, MAXOPT);
	hs_opt_ob(&hs, 99, &d);
	expect_one_reply(&hs, 99, XNBD_REP_ERR_UNSUP);
	hs_opt_ob(&hs, XNBD_OPT_LIST, &d);
	expect_one_reply(&hs, XNBD_OPT_LIST, XNBD_REP_ERR_INVALID);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	xnbd__hs_free(&hs);
}
END_TEST

static const uint32_t overlong_opts[] = {
    XNBD_OPT_LIST,
    XNBD_OPT_STRUCTURED_REPLY,
    XNBD_OPT_GO,
    XNBD_OPT_SET_META_CONTEXT,
    99,
};

/* Over-long option data is counted off without being stored, answered
 * with NBD_REP_ERR_TOO_BIG, and the next option is read correctly. */
START_TEST(hs_overlong_option_skipped)
{
	uint32_t opt = overlong_opts[_i];
	static uint8_t junk[1000];
	struct xnbd__hs hs;
	struct obuf hdr;
	static struct obuf tail;
	memset(junk, 0xab, sizeof(junk));
	begin(&hs, CF_BOTH);
	ob_reset(&hdr);
	ob_put64(&hdr, XNBD_MAGIC_OPTS);
	ob_put32(&hdr, opt);
	ob_put32(&hdr, MAXOPT + 1);
	ck_assert_uint_eq(hs_feed(&hs, &hdr), XNBD_OPTION_HEADER_SIZE);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_SKIP);
	ck_assert_ptr_null(hs.data); /* nothing buffered */
	ck_assert_uint_eq(hs.out.len, 0);
	size_t left = MAXOPT;
	while (left) {
		size_t n = left < sizeof(junk) ? left : sizeof(junk);
		ck_assert_uint_eq(xnbd__hs_input(&hs, junk, n), n);
		left -= n;
		ck_assert_int_eq(hs.state, XNBD__HS_OPT_SKIP);
		ck_assert_uint_eq(hs.out.len, 0);
	}
	ck_assert_ptr_null(hs.data);
	/* Last data byte and the next option in one go. */
	ob_reset(&tail);
	ob_bytes(&tail, junk, 1);
	ob_option(&tail, XNBD_OPT_LIST, NULL, 0);
	ck_assert_uint_eq(hs_feed(&hs, &tail), tail.len);
	struct rcur rc;
	rc_init(&rc, &hs.out);
	rc_expect(&rc, opt, XNBD_REP_ERR_TOO_BIG, NULL);
	check_list(&rc);
	rc_end(&rc);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert(!hs.structured);
	ck_assert_ptr_null(hs.export);
	xnbd__hs_free(&hs);
}
END_TEST

/* A 4 GiB option: only its header is held; data flows through. */
START_TEST(hs_huge_option_not_buffered)
{
	static uint8_t junk[65536];
	struct xnbd__hs hs;
	struct obuf hdr;
	begin(&hs, CF_BOTH);
	ob_reset(&hdr);
	ob_option(&hdr, 99, NULL, 0);
	xnbd__put32(hdr.d + 12, 0xffffffffU);
	ck_assert_uint_eq(hs_feed(&hs, &hdr), XNBD_OPTION_HEADER_SIZE);
	for (int i = 0; i < 64; i++) /* 4 MiB */
		ck_assert_uint_eq(xnbd__hs_input(&hs, junk, sizeof(junk)),
		                  sizeof(junk));
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_SKIP);
	ck_assert_ptr_null(hs.data);
	ck_assert_uint_eq(hs.out.len, 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* EXPORT_NAME cannot carry an error: an over-long one closes at once. */
START_TEST(hs_overlong_export_name_closes)
{
	struct xnbd__hs hs;
	struct obuf ob;
	begin(&hs, CF_BOTH);
	ob_reset(&ob);
	ob_option(&ob, XNBD_OPT_EXPORT_NAME, NULL, 0);
	xnbd__put32(ob.d + 12, MAXOPT + 1);
	ob_zeroes(&ob, 100);
	ck_assert_uint_eq(hs_feed(&hs, &ob), XNBD_OPTION_HEADER_SIZE);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, 0);
	xnbd__hs_free(&hs);
}
END_TEST

static const uint64_t bad_magics[] = {
    0x49484156454F5055ULL, /* IHAVEOPU */
    XNBD_MAGIC_REP,
    XNBD_MAGIC_INIT,
    0,
    0x54504F4556414849ULL /* IHAVEOPT byte-swapped */,
};

START_TEST(hs_bad_option_magic_closes)
{
	struct xnbd__hs hs;
	struct obuf ob;
	begin(&hs, CF_BOTH);
	ob_reset(&ob);
	ob_put64(&ob, bad_magics[_i]);
	ob_put32(&ob, XNBD_OPT_LIST);
	ob_put32(&ob, 0);
	ob_option(&ob, XNBD_OPT_LIST, NULL, 0); /* never read */
	ck_assert_uint_eq(hs_feed(&hs, &ob), XNBD_OPTION_HEADER_SIZE);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, 0);
	ck_assert_uint_eq(xnbd__hs_input(&hs, ob.d + 16, ob.len - 16), 0);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Handshake: split input                                                   */
/* ======================================================================== */

static void build_script(struct obuf *ob, size_t *script_len)
{
	static const uint16_t req[] = {XNBD_INFO_NAME, XNBD_INFO_DESCRIPTION,
	                               XNBD_INFO_BLOCK_SIZE};
	static const char *const q[] = {"base:allocation"};
	static struct obuf d;
	ob_reset(ob);
	ob_put32(ob, CF_BOTH);
	ob_option(ob, XNBD_OPT_STRUCTURED_REPLY, NULL, 0);
	ob_option(ob, XNBD_OPT_LIST, NULL, 0);
	ob_reset(&d);
	ob_info(&d, "both", 3, req);
	ob_option(ob, XNBD_OPT_INFO, d.d, (uint32_t)d.len);
	ob_reset(&d);
	ob_meta(&d, "both", 0, NULL);
	ob_option(ob, XNBD_OPT_LIST_META_CONTEXT, d.d, (uint32_t)d.len);
	ob_reset(&d);
	ob_meta(&d, "", 1, q);
	ob_option(ob, XNBD_OPT_SET_META_CONTEXT, d.d, (uint32_t)d.len);
	ob_option(ob, 99, "abcde", 5);
	ob_option(ob, XNBD_OPT_STARTTLS, NULL, 0);
	ob_option(ob, XNBD_OPT_LIST, "zz", 2);
	ob_reset(&d);
	ob_info(&d, "", 1, req + 2);
	ob_option(ob, XNBD_OPT_GO, d.d, (uint32_t)d.len);
	*script_len = ob->len;
	/* The first transmission request follows at once. */
	ob_put32(ob, XNBD_MAGIC_REQUEST);
	ob_zeroes(ob, XNBD_REQUEST_SIZE - 4);
}

static const size_t chunk_sizes[] = {1, 2, 3, 7, 16, 17, 100};

/* Feeding the bytes in pieces of any size gives the same result as
 * feeding them at once. */
START_TEST(hs_split_input_same_result)
{
	static struct obuf script;
	size_t slen;
	struct xnbd__hs a, b;
	build_script(&script, &slen);

	xnbd__hs_init(&a, catalog(), false);
	ck_assert_uint_eq(hs_feed(&a, &script), slen);
	ck_assert_int_eq(a.state, XNBD__HS_DONE);

	xnbd__hs_init(&b, catalog(), false);
	size_t chunk = chunk_sizes[_i], off = 0, used = 0;
	while (off < script.len) {
		size_t n = chunk < script.len - off ? chunk : script.len - off;
		size_t u = xnbd__hs_input(&b, script.d + off, n);
		ck_assert_uint_le(u, n);
		if (u < n) /* only the transmission bytes are left over */
			ck_assert_int_eq(b.state, XNBD__HS_DONE);
		used += u;
		off += n;
	}
	ck_assert_uint_eq(used, slen);
	ck_assert_int_eq(b.state, XNBD__HS_DONE);
	ck_assert_uint_eq(b.out.len, a.out.len);
	ck_assert_mem_eq(b.out.data, a.out.data, a.out.len);
	ck_assert_ptr_eq(b.export, exp_(EXP_DEFAULT));
	ck_assert_ptr_eq(a.export, exp_(EXP_DEFAULT));
	ck_assert_uint_eq(a.contexts, XNBD__CTX_BASE_ALLOCATION);
	ck_assert_uint_eq(b.contexts, a.contexts);
	ck_assert_uint_eq(a.tflags, DEFAULT_TFLAGS | XNBD_FLAG_HAS_FLAGS |
	                                XNBD_FLAG_SEND_DF);
	ck_assert_uint_eq(b.tflags, a.tflags);
	ck_assert(b.structured && a.structured);

	/* And the replies are the ones expected, in order. */
	struct rcur rc;
	struct info_set is;
	struct ctx_set cs;
	rc_init(&rc, &a.out);
	ck_assert_uint_ge(a.out.len, 18);
	rc.off = 18; /* greeting */
	rc_expect(&rc, XNBD_OPT_STRUCTURED_REPLY, XNBD_REP_ACK, NULL);
	check_list(&rc);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_INFO, &is), XNBD_REP_ACK);
	check_info_string(&is, XNBD_INFO_NAME, "both");
	ck_assert_uint_eq(rc_contexts(&rc, XNBD_OPT_LIST_META_CONTEXT, &cs),
	                  XNBD_REP_ACK);
	ck_assert_uint_eq(cs.n, 2);
	ck_assert_uint_eq(rc_contexts(&rc, XNBD_OPT_SET_META_CONTEXT, &cs),
	                  XNBD_REP_ACK);
	ck_assert_uint_eq(cs.n, 1);
	rc_expect(&rc, 99, XNBD_REP_ERR_UNSUP, NULL);
	rc_expect(&rc, XNBD_OPT_STARTTLS, XNBD_REP_ERR_POLICY, NULL);
	rc_expect(&rc, XNBD_OPT_LIST, XNBD_REP_ERR_INVALID, NULL);
	ck_assert_uint_eq(rc_infos(&rc, XNBD_OPT_GO, &is), XNBD_REP_ACK);
	check_info_export(&is, DEFAULT_SIZE, a.tflags);
	rc_end(&rc);

	xnbd__hs_free(&a);
	xnbd__hs_free(&b);
}
END_TEST

/* ======================================================================== */
/* Handshake: server shutting down                                          */
/* ======================================================================== */

static const uint32_t shutdown_opts[] = {
    XNBD_OPT_LIST,
    XNBD_OPT_STARTTLS,
    XNBD_OPT_INFO,
    XNBD_OPT_GO,
    XNBD_OPT_STRUCTURED_REPLY,
    XNBD_OPT_LIST_META_CONTEXT,
    XNBD_OPT_SET_META_CONTEXT,
    99,
    XNBD_OPT_EXTENDED_HEADERS,
};

START_TEST(hs_shutdown_errors_options)
{
	uint32_t opt = shutdown_opts[_i];
	static struct obuf d;
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	structured(&hs);
	hs.shutting_down = true;
	ob_reset(&d);
	if (opt == XNBD_OPT_INFO || opt == XNBD_OPT_GO)
		ob_info(&d, "", 0, NULL);
	else if (opt == XNBD_OPT_LIST_META_CONTEXT ||
	         opt == XNBD_OPT_SET_META_CONTEXT)
		ob_meta(&d, "", 0, NULL);
	hs_opt_ob(&hs, opt, &d);
	expect_one_reply(&hs, opt, XNBD_REP_ERR_SHUTDOWN);
	ck_assert_int_eq(hs.state, XNBD__HS_OPT_HEADER);
	ck_assert_ptr_null(hs.export);
	/* Still answers the next one the same way. */
	hs_opt(&hs, XNBD_OPT_LIST, NULL, 0);
	expect_one_reply(&hs, XNBD_OPT_LIST, XNBD_REP_ERR_SHUTDOWN);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_shutdown_abort_acked)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs.shutting_down = true;
	hs_opt(&hs, XNBD_OPT_ABORT, NULL, 0);
	expect_one_reply(&hs, XNBD_OPT_ABORT, XNBD_REP_ACK);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	xnbd__hs_free(&hs);
}
END_TEST

START_TEST(hs_shutdown_export_name_closes)
{
	struct xnbd__hs hs;
	begin(&hs, CF_BOTH);
	hs.shutting_down = true;
	hs_opt(&hs, XNBD_OPT_EXPORT_NAME, NULL, 0);
	ck_assert_int_eq(hs.state, XNBD__HS_CLOSE);
	ck_assert_uint_eq(hs.out.len, 0);
	ck_assert_ptr_null(hs.export);
	xnbd__hs_free(&hs);
}
END_TEST

/* ======================================================================== */
/* Transmission: request parsing                                            */
/* ======================================================================== */

START_TEST(req_parse_fields)
{
	static const uint8_t p[XNBD_REQUEST_SIZE] = {
	    0x25, 0x60, 0x95, 0x13,                         /* magic */
	    0x00, 0x05,                                     /* flags */
	    0x00, 0x01,                                     /* type */
	    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, /* cookie */
	    0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, /* offset */
	    0xa1, 0xa2, 0xa3, 0xa4,                         /* length */
	};
	struct xnbd__request r;
	memset(&r, 0, sizeof(r));
	ck_assert_int_eq(xnbd__request_parse(p, &r), 0);
	ck_assert_uint_eq(r.flags, 0x0005);
	ck_assert_uint_eq(r.type, 0x0001);
	ck_assert_uint_eq(r.cookie, 0x0102030405060708ULL);
	ck_assert_uint_eq(r.offset, 0x1112131415161718ULL);
	ck_assert_uint_eq(r.length, 0xa1a2a3a4U);
	ck_assert(xnbd__request_has_payload(&r));
}
END_TEST

static const uint32_t bad_request_magics[] = {
    0x12560953U, /* historic */
    0x13956025U, /* byte-swapped */
    XNBD_MAGIC_SIMPLE_REPLY,
    0,
    0x25609514U,
};

START_TEST(req_parse_bad_magic)
{
	uint8_t p[XNBD_REQUEST_SIZE];
	memset(p, 0, sizeof(p));
	xnbd__put32(p, bad_request_magics[_i]);
	struct xnbd__request r;
	ck_assert_int_eq(xnbd__request_parse(p, &r), -EPROTO);
}
END_TEST

START_TEST(req_only_write_has_payload)
{
	for (uint16_t t = 0; t <= 10; t++) {
		struct xnbd__request r = {.type = t, .length = 512};
		ck_assert(xnbd__request_has_payload(&r) ==
		          (t == XNBD_CMD_WRITE));
	}
}
END_TEST

/* ======================================================================== */
/* Transmission: request checks                                             */
/* ======================================================================== */

#define TX_SIZE (1ULL << 30)
#define MAXP XNBD_MAX_PAYLOAD

/* Everything advertised and negotiated. */
static struct xnbd__tx full_tx(void)
{
	struct xnbd__tx tx = {
	    .size = TX_SIZE,
	    .tflags = XNBD_FLAG_HAS_FLAGS | XNBD_FLAG_SEND_FLUSH |
	              XNBD_FLAG_SEND_FUA | XNBD_FLAG_SEND_TRIM |
	              XNBD_FLAG_SEND_WRITE_ZEROES | XNBD_FLAG_SEND_DF |
	              XNBD_FLAG_SEND_CACHE | XNBD_FLAG_SEND_FAST_ZERO,
	    .structured = true,
	    .contexts = XNBD__CTX_BASE_ALLOCATION,
	};
	return tx;
}

struct req_case {
	uint16_t type;
	uint16_t flags;
	uint64_t offset;
	uint32_t length;
};

static const struct req_case ok_reqs[] = {
    {XNBD_CMD_READ, 0, 0, 4096},
    {XNBD_CMD_READ, 0, TX_SIZE - 512, 512},
    {XNBD_CMD_READ, XNBD_CMD_FLAG_DF, 0, 65536},
    {XNBD_CMD_READ, 0, TX_SIZE, 0},
    {XNBD_CMD_WRITE, 0, 512, 4096},
    {XNBD_CMD_WRITE, XNBD_CMD_FLAG_FUA, TX_SIZE - 1, 1},
    {XNBD_CMD_DISC, 0, 0, 0},
    {XNBD_CMD_FLUSH, 0, 0, 0},
    {XNBD_CMD_TRIM, 0, 0, 1 << 20},
    {XNBD_CMD_TRIM, XNBD_CMD_FLAG_FUA, 4096, 4096},
    {XNBD_CMD_CACHE, 0, 0, 1 << 20},
    {XNBD_CMD_WRITE_ZEROES, 0, 0, 1 << 20},
    {XNBD_CMD_WRITE_ZEROES,
     XNBD_CMD_FLAG_FUA | XNBD_CMD_FLAG_NO_HOLE | XNBD_CMD_FLAG_FAST_ZERO, 0,
     1 << 20},
    {XNBD_CMD_BLOCK_STATUS, 0, 0, 1},
    {XNBD_CMD_BLOCK_STATUS, XNBD_CMD_FLAG_REQ_ONE, TX_SIZE - 1, 1},
};

START_TEST(req_valid_accepted)
{
	struct xnbd__tx tx = full_tx();
	const struct req_case *c = &ok_reqs[_i];
	ck_assert_uint_eq(
	    check_req(&tx, c->type, c->flags, c->offset, c->length), 0);
}
END_TEST

static const uint16_t ranged_cmds[] = {
    XNBD_CMD_READ,  XNBD_CMD_WRITE,        XNBD_CMD_TRIM,
    XNBD_CMD_CACHE, XNBD_CMD_WRITE_ZEROES, XNBD_CMD_BLOCK_STATUS,
};

static uint32_t past_end_error(uint16_t type)
{
	/* The spec: ENOSPC for writes (and write zeroes) beyond the end,
	 * EINVAL for reads, trims and block status. */
	return (type == XNBD_CMD_WRITE || type == XNBD_CMD_WRITE_ZEROES)
	           ? XNBD_ENOSPC
	           : XNBD_EINVAL;
}

START_TEST(req_past_end)
{
	uint16_t t = ranged_cmds[_i];
	uint32_t e = past_end_error(t);
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE - 512, 512), 0);
	ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE - 511, 512), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE, 1), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE + 1, 1), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE * 2, 4096), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE - 4096, 8192), e);
	if (t != XNBD_CMD_BLOCK_STATUS) /* BLOCK_STATUS needs a length */
		ck_assert_uint_eq(check_req(&tx, t, 0, TX_SIZE + 1, 0), e);
}
END_TEST

/* offset + length wrapping past 2^64 is still past the end. */
START_TEST(req_offset_overflow)
{
	uint16_t t = ranged_cmds[_i];
	uint32_t e = past_end_error(t);
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(check_req(&tx, t, 0, UINT64_MAX, 1), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, UINT64_MAX - 4095, 4096), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, UINT64_MAX - 10, 4096), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, UINT64_MAX - 511, 1024), e);
	/* The largest export there can be. */
	tx.size = UINT64_MAX;
	ck_assert_uint_eq(check_req(&tx, t, 0, UINT64_MAX - 1, 2), e);
	ck_assert_uint_eq(check_req(&tx, t, 0, UINT64_MAX - 4096, 4096), 0);
}
END_TEST

START_TEST(req_read_only)
{
	struct xnbd__tx tx = full_tx();
	tx.tflags |= XNBD_FLAG_READ_ONLY;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE, 0, 0, 512),
	                  XNBD_EPERM);
	ck_assert_uint_eq(
	    check_req(&tx, XNBD_CMD_WRITE, XNBD_CMD_FLAG_FUA, 0, 512),
	    XNBD_EPERM);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_TRIM, 0, 0, 512), XNBD_EPERM);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES, 0, 0, 512),
	                  XNBD_EPERM);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	                            XNBD_CMD_FLAG_NO_HOLE, 0, 512),
	                  XNBD_EPERM);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_READ, 0, 0, 512), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 0, 0), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_CACHE, 0, 0, 512), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 512), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_DISC, 0, 0, 0), 0);
}
END_TEST

static const uint16_t unknown_cmds[] = {XNBD_CMD_RESIZE, 9, 100, 0x8000,
                                        0xffff};

START_TEST(req_unknown_command)
{
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(check_req(&tx, unknown_cmds[_i], 0, 0, 512),
	                  XNBD_EINVAL);
}
END_TEST

/* Flags not documented for the command are refused. */
static const struct req_case bad_flag_reqs[] = {
    {XNBD_CMD_WRITE, XNBD_CMD_FLAG_DF, 0, 512},
    {XNBD_CMD_WRITE, XNBD_CMD_FLAG_REQ_ONE, 0, 512},
    {XNBD_CMD_WRITE, XNBD_CMD_FLAG_NO_HOLE, 0, 512},
    {XNBD_CMD_WRITE, XNBD_CMD_FLAG_FAST_ZERO, 0, 512},
    {XNBD_CMD_READ, XNBD_CMD_FLAG_REQ_ONE, 0, 512},
    {XNBD_CMD_READ, XNBD_CMD_FLAG_NO_HOLE, 0, 512},
    {XNBD_CMD_READ, XNBD_CMD_FLAG_FAST_ZERO, 0, 512},
    {XNBD_CMD_TRIM, XNBD_CMD_FLAG_NO_HOLE, 0, 512},
    {XNBD_CMD_TRIM, XNBD_CMD_FLAG_DF, 0, 512},
    {XNBD_CMD_TRIM, XNBD_CMD_FLAG_FAST_ZERO, 0, 512},
    {XNBD_CMD_WRITE_ZEROES, XNBD_CMD_FLAG_DF, 0, 512},
    {XNBD_CMD_WRITE_ZEROES, XNBD_CMD_FLAG_REQ_ONE, 0, 512},
    {XNBD_CMD_BLOCK_STATUS, XNBD_CMD_FLAG_DF, 0, 512},
    {XNBD_CMD_BLOCK_STATUS, XNBD_CMD_FLAG_NO_HOLE, 0, 512},
    {XNBD_CMD_CACHE, XNBD_CMD_FLAG_DF, 0, 512},
    {XNBD_CMD_CACHE, XNBD_CMD_FLAG_REQ_ONE, 0, 512},
    {XNBD_CMD_FLUSH, XNBD_CMD_FLAG_DF, 0, 0},
    {XNBD_CMD_FLUSH, XNBD_CMD_FLAG_NO_HOLE, 0, 0},
    {XNBD_CMD_DISC, XNBD_CMD_FLAG_REQ_ONE, 0, 0},
};

START_TEST(req_flags_not_for_command)
{
	struct xnbd__tx tx = full_tx();
	const struct req_case *c = &bad_flag_reqs[_i];
	ck_assert_uint_eq(
	    check_req(&tx, c->type, c->flags, c->offset, c->length),
	    XNBD_EINVAL);
}
END_TEST

/* Unknown flag bits are refused on every command. */
START_TEST(req_unknown_flag_bits)
{
	struct xnbd__tx tx = full_tx();
	for (uint16_t t = XNBD_CMD_READ; t <= XNBD_CMD_BLOCK_STATUS; t++) {
		uint32_t len =
		    (t == XNBD_CMD_FLUSH || t == XNBD_CMD_DISC) ? 0 : 512;
		for (int bit = 5; bit < 16; bit++)
			ck_assert_msg(check_req(&tx, t, (uint16_t)(1U << bit),
			                        0, len) == XNBD_EINVAL,
			              "command %u with flag bit %d accepted",
			              (unsigned)t, bit);
	}
}
END_TEST

/* FUA on writes only when SEND_FUA was advertised. */
START_TEST(req_fua_needs_send_fua)
{
	static const uint16_t w[] = {XNBD_CMD_WRITE, XNBD_CMD_TRIM,
	                             XNBD_CMD_WRITE_ZEROES};
	struct xnbd__tx tx = full_tx();
	for (size_t i = 0; i < 3; i++)
		ck_assert_uint_eq(
		    check_req(&tx, w[i], XNBD_CMD_FLAG_FUA, 0, 512), 0);
	tx.tflags &= (uint16_t)~XNBD_FLAG_SEND_FUA;
	for (size_t i = 0; i < 3; i++) {
		ck_assert_uint_eq(
		    check_req(&tx, w[i], XNBD_CMD_FLAG_FUA, 0, 512),
		    XNBD_EINVAL);
		ck_assert_uint_eq(check_req(&tx, w[i], 0, 0, 512), 0);
	}
}
END_TEST

START_TEST(req_fast_zero_needs_advert)
{
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	                            XNBD_CMD_FLAG_FAST_ZERO, 0, 512),
	                  0);
	tx.tflags &= (uint16_t)~XNBD_FLAG_SEND_FAST_ZERO;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	                            XNBD_CMD_FLAG_FAST_ZERO, 0, 512),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(
	    check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	              XNBD_CMD_FLAG_FAST_ZERO | XNBD_CMD_FLAG_NO_HOLE, 0, 512),
	    XNBD_EINVAL);
	/* NO_HOLE needs nothing beyond SEND_WRITE_ZEROES. */
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	                            XNBD_CMD_FLAG_NO_HOLE, 0, 512),
	                  0);
}
END_TEST

START_TEST(req_df_needs_send_df)
{
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(
	    check_req(&tx, XNBD_CMD_READ, XNBD_CMD_FLAG_DF, 0, 512), 0);
	tx.tflags &= (uint16_t)~XNBD_FLAG_SEND_DF;
	ck_assert_uint_eq(
	    check_req(&tx, XNBD_CMD_READ, XNBD_CMD_FLAG_DF, 0, 512),
	    XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_READ, 0, 0, 512), 0);
}
END_TEST

START_TEST(req_flush_reserved_fields)
{
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 0, 0), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 1, 0), XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 0, 1), XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 4096, 4096),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, UINT64_MAX, 0),
	                  XNBD_EINVAL);
}
END_TEST

START_TEST(req_block_status_conditions)
{
	struct xnbd__tx tx = full_tx();
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 4096), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 0),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS,
	                            XNBD_CMD_FLAG_REQ_ONE, 4096, 0),
	                  XNBD_EINVAL);
	/* The length is a hint, not bound by the maximum payload. */
	tx.size = 1ULL << 40;
	ck_assert_uint_eq(
	    check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 0xffffffffU), 0);
	tx.size = TX_SIZE;
	tx.structured = false;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 4096),
	                  XNBD_EINVAL);
	tx.structured = true;
	tx.contexts = 0;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 4096),
	                  XNBD_EINVAL);
}
END_TEST

/* The maximum block size (32 MiB) binds READ, WRITE, CACHE and
 * WRITE_ZEROES without FAST_ZERO; the spec says the server SHOULD answer
 * NBD_EINVAL (and SHOULD NOT use NBD_ENOMEM). */
START_TEST(req_max_payload)
{
	struct xnbd__tx tx = full_tx();
	tx.size = 1ULL << 40;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_READ, 0, 0, MAXP), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_READ, 0, 0, MAXP + 1),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_READ, 0, 0, 0xffffffffU),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE, 0, 0, MAXP), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE, 0, 0, MAXP + 1),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE, 0, 0, 0xffffffffU),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_CACHE, 0, 0, MAXP), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_CACHE, 0, 0, MAXP + 1),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES, 0, 0, MAXP), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES, 0, 0, MAXP + 1),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	                            XNBD_CMD_FLAG_NO_HOLE, 0, MAXP + 1),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES,
	                            XNBD_CMD_FLAG_FAST_ZERO, 0, MAXP + 1),
	                  0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_TRIM, 0, 0, 0xffffffffU), 0);
}
END_TEST

/* Commands the export did not advertise are refused. */
START_TEST(req_unadvertised_commands)
{
	struct xnbd__tx tx = {
	    .size = TX_SIZE,
	    .tflags = XNBD_FLAG_HAS_FLAGS,
	    .structured = true,
	    .contexts = XNBD__CTX_BASE_ALLOCATION,
	};
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 0, 0), XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_TRIM, 0, 0, 512),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_CACHE, 0, 0, 512),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES, 0, 0, 512),
	                  XNBD_EINVAL);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_READ, 0, 0, 512), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE, 0, 0, 512), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_DISC, 0, 0, 0), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_BLOCK_STATUS, 0, 0, 512), 0);
	/* Each SEND_* flag enables exactly its command. */
	tx.tflags |= XNBD_FLAG_SEND_TRIM;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_TRIM, 0, 0, 512), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 0, 0), XNBD_EINVAL);
	tx.tflags = XNBD_FLAG_HAS_FLAGS | XNBD_FLAG_SEND_FLUSH;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_FLUSH, 0, 0, 0), 0);
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_TRIM, 0, 0, 512),
	                  XNBD_EINVAL);
	tx.tflags = XNBD_FLAG_HAS_FLAGS | XNBD_FLAG_SEND_CACHE;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_CACHE, 0, 0, 512), 0);
	tx.tflags = XNBD_FLAG_HAS_FLAGS | XNBD_FLAG_SEND_WRITE_ZEROES;
	ck_assert_uint_eq(check_req(&tx, XNBD_CMD_WRITE_ZEROES, 0, 0, 512), 0);
}
END_TEST

/* ======================================================================== */
/* Reply builders and the errno mapping                                     */
/* ======================================================================== */

START_TEST(simple_reply_bytes)
{
	static const uint8_t want[16] = {
	    0x67, 0x44, 0x66, 0x98, 0x00, 0x00, 0x00, 0x16,
	    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0xf8,
	};
	uint8_t p[XNBD_SIMPLE_REPLY_SIZE];
	memset(p, 0xee, sizeof(p));
	xnbd__simple_reply(p, 0x01020304050607f8ULL, XNBD_EINVAL);
	ck_assert_mem_eq(p, want, sizeof(want));

	memset(p, 0xee, sizeof(p));
	xnbd__simple_reply(p, 0, 0);
	ck_assert_mem_eq(p, "\x67\x44\x66\x98\0\0\0\0\0\0\0\0\0\0\0\0", 16);
}
END_TEST

START_TEST(chunk_header_bytes)
{
	static const uint8_t want[20] = {
	    0x66, 0x8e, 0x33, 0xef, /* magic */
	    0x00, 0x01,             /* NBD_REPLY_FLAG_DONE */
	    0x80, 0x02,             /* NBD_REPLY_TYPE_ERROR_OFFSET */
	    0xf1, 0xe2, 0xd3, 0xc4, 0xb5, 0xa6, 0x97, 0x88, /* cookie */
	    0x11, 0x22, 0x33, 0x44,                         /* length */
	};
	uint8_t p[XNBD_STRUCTURED_REPLY_SIZE];
	memset(p, 0xee, sizeof(p));
	xnbd__chunk_header(p, XNBD_REPLY_FLAG_DONE,
	                   XNBD_REPLY_TYPE_ERROR_OFFSET, 0xf1e2d3c4b5a69788ULL,
	                   0x11223344U);
	ck_assert_mem_eq(p, want, sizeof(want));

	memset(p, 0xee, sizeof(p));
	xnbd__chunk_header(p, 0, XNBD_REPLY_TYPE_OFFSET_DATA, 7, 8 + 4096);
	ck_assert_mem_eq(p,
	                 "\x66\x8e\x33\xef\x00\x00\x00\x01"
	                 "\0\0\0\0\0\0\0\x07\x00\x00\x10\x08",
	                 20);
}
END_TEST

START_TEST(errno_mapping)
{
	static const struct {
		int err;
		uint32_t nbd;
	} map[] = {
	    {0, 0},
	    {EPERM, XNBD_EPERM},
	    {EROFS, XNBD_EPERM},
	    {EACCES, XNBD_EPERM},
	    {ENOMEM, XNBD_ENOMEM},
	    {EINVAL, XNBD_EINVAL},
	    {ENOSPC, XNBD_ENOSPC},
	    {EFBIG, XNBD_ENOSPC},  /* the spec: SHOULD map to ENOSPC */
	    {EDQUOT, XNBD_ENOSPC}, /* likewise */
	    {EOVERFLOW, XNBD_EOVERFLOW},
	    {ENOTSUP, XNBD_ENOTSUP},
	    {EOPNOTSUPP, XNBD_ENOTSUP},
	    {ESHUTDOWN, XNBD_ESHUTDOWN},
	    {EIO, XNBD_EIO},
	    {EBADF, XNBD_EIO},
	    {EAGAIN, XNBD_EIO},
	    {ENOENT, XNBD_EIO},
	    {EPROTO, XNBD_EIO},
	    {4000, XNBD_EIO},
	};
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
		ck_assert_msg(xnbd__errno_to_nbd(-map[i].err) == map[i].nbd,
		              "-%d -> %u, expected %u", map[i].err,
		              (unsigned)xnbd__errno_to_nbd(-map[i].err),
		              (unsigned)map[i].nbd);
		ck_assert_msg(xnbd__errno_to_nbd(map[i].err) == map[i].nbd,
		              "%d -> %u, expected %u", map[i].err,
		              (unsigned)xnbd__errno_to_nbd(map[i].err),
		              (unsigned)map[i].nbd);
	}
}
END_TEST

/* ======================================================================== */

#define N(a) ((int)(sizeof(a) / sizeof((a)[0])))

static Suite *wire_suite(void)
{
	Suite *s = suite_create("wire");
	TCase *tc;

	tc = tcase_create("buf");
	tcase_add_test(tc, buf_init_is_empty);
	tcase_add_test(tc, buf_append_grows_and_keeps_bytes);
	tcase_add_test(tc, buf_append_nothing);
	tcase_add_test(tc, buf_push_reserves_at_end);
	tcase_add_test(tc, buf_reset_keeps_storage);
	tcase_add_test(tc, buf_failure_is_sticky);
	tcase_add_test(tc, put_get_big_endian);
	suite_add_tcase(s, tc);

	tc = tcase_create("handshake");
	tcase_add_test(tc, hs_greeting_bytes);
	tcase_add_loop_test(tc, hs_client_flags_known, 0, 4);
	tcase_add_loop_test(tc, hs_client_flags_unknown_close, 0,
	                    N(bad_client_flags));
	tcase_add_test(tc, hs_oldstyle_greeting);
	tcase_add_test(tc, hs_oldstyle_empty_catalog_closes);
	tcase_add_test(tc, hs_export_name_sends_zeroes);
	tcase_add_loop_test(tc, hs_export_name_no_zeroes, 0, 2);
	tcase_add_loop_test(tc, hs_export_name_unknown_closes, 0,
	                    N(unknown_names));
	tcase_add_test(tc, hs_export_name_leaves_transmission_bytes);
	tcase_add_test(tc, hs_abort_acks_then_closes);
	tcase_add_test(tc, hs_abort_ignores_data);
	tcase_add_test(tc, hs_list_exports);
	tcase_add_test(tc, hs_list_with_data_is_invalid);
	tcase_add_test(tc, hs_starttls_refused_by_policy);
	tcase_add_loop_test(tc, hs_info_default_export, 0, 2);
	tcase_add_loop_test(tc, hs_info_block_size_from_export, 0, 2);
	tcase_add_test(tc, hs_info_name_and_description);
	tcase_add_test(tc, hs_info_no_description);
	tcase_add_loop_test(tc, hs_info_unknown_export, 0, 2);
	tcase_add_loop_test(tc, hs_info_bad_lengths, 0, N_BAD_INFO * 2);
	tcase_add_test(tc, hs_info_then_go_same_information);
	tcase_add_test(tc, hs_structured_reply);
	tcase_add_test(tc, hs_structured_reply_with_data_is_invalid);
	tcase_add_loop_test(tc, hs_send_df_only_after_structured, 0, 4);
	tcase_add_loop_test(tc, hs_unknown_option_unsupported, 0,
	                    N(unknown_opts) * 2);
	tcase_add_test(tc, hs_option_at_limit_is_processed);
	tcase_add_loop_test(tc, hs_overlong_option_skipped, 0,
	                    N(overlong_opts));
	tcase_add_test(tc, hs_huge_option_not_buffered);
	tcase_add_test(tc, hs_overlong_export_name_closes);
	tcase_add_loop_test(tc, hs_bad_option_magic_closes, 0, N(bad_magics));
	tcase_add_loop_test(tc, hs_split_input_same_result, 0, N(chunk_sizes));
	tcase_add_loop_test(tc, hs_shutdown_errors_options, 0,
	                    N(shutdown_opts));
	tcase_add_test(tc, hs_shutdown_abort_acked);
	tcase_add_test(tc, hs_shutdown_export_name_closes);
	suite_add_tcase(s, tc);

	tc = tcase_create("meta");
	tcase_add_loop_test(tc, hs_meta_needs_structured, 0, 2);
	tcase_add_test(tc, hs_list_meta_exact);
	tcase_add_test(tc, hs_list_meta_namespace);
	tcase_add_test(tc, hs_list_meta_no_queries_returns_all);
	tcase_add_test(tc, hs_set_meta_no_queries_selects_none);
	tcase_add_test(tc, hs_set_meta_exact);
	tcase_add_test(tc, hs_set_meta_namespace_selects_nothing);
	tcase_add_loop_test(tc, hs_meta_unknown_queries_ignored, 0, 2);
	tcase_add_loop_test(tc, hs_meta_malformed_query, 0,
	                    N(malformed_queries) * 2);
	tcase_add_loop_test(tc, hs_meta_unknown_export, 0, 2);
	tcase_add_loop_test(tc, hs_meta_bad_lengths, 0, N_BAD_META * 2);
	tcase_add_test(tc, hs_set_meta_ids_unique_nonzero);
	tcase_add_test(tc, hs_set_meta_export_without_context);
	tcase_add_loop_test(tc, hs_contexts_dropped_for_other_export, 0, 3);
	tcase_add_loop_test(tc, hs_contexts_kept_for_same_export, 0, 2);
	tcase_add_test(tc, hs_set_meta_replaces);
	suite_add_tcase(s, tc);

	tc = tcase_create("request");
	tcase_add_test(tc, req_parse_fields);
	tcase_add_loop_test(tc, req_parse_bad_magic, 0, N(bad_request_magics));
	tcase_add_test(tc, req_only_write_has_payload);
	tcase_add_loop_test(tc, req_valid_accepted, 0, N(ok_reqs));
	tcase_add_loop_test(tc, req_past_end, 0, N(ranged_cmds));
	tcase_add_loop_test(tc, req_offset_overflow, 0, N(ranged_cmds));
	tcase_add_test(tc, req_read_only);
	tcase_add_loop_test(tc, req_unknown_command, 0, N(unknown_cmds));
	tcase_add_loop_test(tc, req_flags_not_for_command, 0, N(bad_flag_reqs));
	tcase_add_test(tc, req_unknown_flag_bits);
	tcase_add_test(tc, req_fua_needs_send_fua);
	tcase_add_test(tc, req_fast_zero_needs_advert);
	tcase_add_test(tc, req_df_needs_send_df);
	tcase_add_test(tc, req_flush_reserved_fields);
	tcase_add_test(tc, req_block_status_conditions);
	tcase_add_test(tc, req_max_payload);
	tcase_add_test(tc, req_unadvertised_commands);
	suite_add_tcase(s, tc);

	tc = tcase_create("reply");
	tcase_add_test(tc, simple_reply_bytes);
	tcase_add_test(tc, chunk_header_bytes);
	tcase_add_test(tc, errno_mapping);
	suite_add_tcase(s, tc);

	return s;
}

int main(void)
{
	return xnbd_test_run(wire_suite());
}
