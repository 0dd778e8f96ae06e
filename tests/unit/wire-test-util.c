/* wire-test-util.c - see wire-test-util.h. */
#include <string.h>

#include "wire-test-util.h"

const struct xnbd__hs_export test_exports[N_TEST_EXPORTS] = {
    [EXP_DEFAULT] =
        {
            .name = "",
            .description = DEFAULT_DESC,
            .size = DEFAULT_SIZE,
            .tflags = DEFAULT_TFLAGS,
            .contexts = XNBD__CTX_BASE_ALLOCATION,
            .min_block = 1,
            .pref_block = 4096,
            .max_block = XNBD_MAX_PAYLOAD,
        },
    [EXP_DISK2] =
        {
            .name = "disk2",
            .description = NULL,
            .size = DISK2_SIZE,
            .tflags = DISK2_TFLAGS,
            .contexts = 0,
            .min_block = 512,
            .pref_block = 65536,
            .max_block = 1024 * 1024,
        },
    [EXP_BOTH] =
        {
            .name = "both",
            .description = "two contexts",
            .size = BOTH_SIZE,
            .tflags = XNBD_FLAG_SEND_FLUSH,
            .contexts = XNBD__CTX_BASE_ALLOCATION | XNBD__CTX_XNBD_CACHE,
            .min_block = 1,
            .pref_block = 4096,
            .max_block = XNBD_MAX_PAYLOAD,
        },
};

/* ---- fake catalog ------------------------------------------------------- */

static size_t fc_count(void *ud)
{
	const struct fake_catalog *fc = ud;
	return fc->n;
}

static const struct xnbd__hs_export *fc_get(void *ud, size_t i)
{
	const struct fake_catalog *fc = ud;
	ck_assert_msg(i < fc->n, "catalog get(%zu) past the end (%zu)", i,
	              fc->n);
	return &fc->v[i];
}

static const struct xnbd__hs_export *fc_find(void *ud, const char *name,
                                             size_t len)
{
	struct fake_catalog *fc = ud;
	fc->find_calls++;
	for (size_t i = 0; i < fc->n; i++)
		if (strlen(fc->v[i].name) == len &&
		    memcmp(fc->v[i].name, name, len) == 0)
			return &fc->v[i];
	return NULL;
}

void fake_catalog_init(struct fake_catalog *fc, const struct xnbd__hs_export *v,
                       size_t n)
{
	memset(fc, 0, sizeof(*fc));
	fc->v = v;
	fc->n = n;
	fc->cat.count = fc_count;
	fc->cat.get = fc_get;
	fc->cat.find = fc_find;
	fc->cat.ud = fc;
}

/* ---- client bytes ------------------------------------------------------- */

void ob_reset(struct obuf *ob)
{
	ob->len = 0;
}

void ob_bytes(struct obuf *ob, const void *p, size_t n)
{
	ck_assert_msg(n <= OB_CAP - ob->len, "test buffer overflow");
	if (n)
		memcpy(ob->d + ob->len, p, n);
	ob->len += n;
}

void ob_zeroes(struct obuf *ob, size_t n)
{
	ck_assert_msg(n <= OB_CAP - ob->len, "test buffer overflow");
	memset(ob->d + ob->len, 0, n);
	ob->len += n;
}

void ob_put16(struct obuf *ob, uint16_t v)
{
	uint8_t b[2] = {(uint8_t)(v >> 8), (uint8_t)v};
	ob_bytes(ob, b, sizeof(b));
}

void ob_put32(struct obuf *ob, uint32_t v)
{
	ob_put16(ob, (uint16_t)(v >> 16));
	ob_put16(ob, (uint16_t)v);
}

void ob_put64(struct obuf *ob, uint64_t v)
{
	ob_put32(ob, (uint32_t)(v >> 32));
	ob_put32(ob, (uint32_t)v);
}

void ob_option(struct obuf *ob, uint32_t opt, const void *data, uint32_t len)
{
	ob_put64(ob, XNBD_MAGIC_OPTS);
	ob_put32(ob, opt);
	ob_put32(ob, len);
	ob_bytes(ob, data, len);
}

void ob_info(struct obuf *ob, const char *name, size_t nreq,
             const uint16_t *reqs)
{
	ob_put32(ob, (uint32_t)strlen(name));
	ob_bytes(ob, name, strlen(name));
	ob_put16(ob, (uint16_t)nreq);
	for (size_t i = 0; i < nreq; i++)
		ob_put16(ob, reqs[i]);
}

void ob_meta(struct obuf *ob, const char *name, size_t nq,
             const char *const *queries)
{
	ob_put32(ob, (uint32_t)strlen(name));
	ob_bytes(ob, name, strlen(name));
	ob_put32(ob, (uint32_t)nq);
	for (size_t i = 0; i < nq; i++) {
		ob_put32(ob, (uint32_t)strlen(queries[i]));
		ob_bytes(ob, queries[i], strlen(queries[i]));
	}
}

/* ---- driving the handshake ---------------------------------------------- */

void hs_begin(struct xnbd__hs *hs, const struct xnbd__hs_catalog *cat,
              uint32_t client_flags)
{
	static const uint8_t greeting[18] = {
	    'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C',  'I',
	    'H', 'A', 'V', 'E', 'O', 'P', 'T', 0x00, 0x03,
	};
	xnbd__hs_init(hs, cat, false);
	ck_assert_int_eq(hs->state, XNBD__HS_CLIENT_FLAGS);
	ck_assert_uint_eq(hs->out.len, sizeof(greeting));
	ck_assert_mem_eq(hs->out.data, greeting, sizeof(greeting));
	xnbd__buf_reset(&hs->out);

	uint8_t f[4];
	xnbd__put32(f, client_flags);
	ck_assert_uint_eq(xnbd__hs_input(hs, f, 4), 4);
	ck_assert_int_eq(hs->state, XNBD__HS_OPT_HEADER);
	ck_assert_uint_eq(hs->out.len, 0);
}

size_t hs_feed(struct xnbd__hs *hs, const struct obuf *ob)
{
	return xnbd__hs_input(hs, ob->d, ob->len);
}

void hs_opt(struct xnbd__hs *hs, uint32_t opt, const void *data, uint32_t len)
{
	static struct obuf ob;
	ob_reset(&ob);
	ob_option(&ob, opt, data, len);
	size_t used = hs_feed(hs, &ob);
	ck_assert_msg(used == ob.len, "option %u: consumed %zu of %zu bytes",
	              (unsigned)opt, used, ob.len);
}

void hs_opt_ob(struct xnbd__hs *hs, uint32_t opt, const struct obuf *data)
{
	hs_opt(hs, opt, data->d, (uint32_t)data->len);
}

/* ---- parsing option replies --------------------------------------------- */

void rc_init(struct rcur *rc, const struct xnbd__buf *b)
{
	rc->b = b;
	rc->off = 0;
}

bool rc_at_end(const struct rcur *rc)
{
	return rc->off == rc->b->len;
}

void rc_next(struct rcur *rc, struct orep *r)
{
	const struct xnbd__buf *b = rc->b;
	ck_assert_msg(
	    b->len - rc->off >= XNBD_OPTION_REPLY_HEADER_SIZE,
	    "expected an option reply at offset %zu, only %zu bytes left",
	    rc->off, b->len - rc->off);
	const uint8_t *p = b->data + rc->off;
	ck_assert_msg(xnbd__get64(p) == XNBD_MAGIC_REP,
	              "bad option reply magic at offset %zu", rc->off);
	r->opt = xnbd__get32(p + 8);
	r->type = xnbd__get32(p + 12);
	r->len = xnbd__get32(p + 16);
	ck_assert_msg(r->len <=
	                  b->len - rc->off - XNBD_OPTION_REPLY_HEADER_SIZE,
	              "option reply data (%u bytes) runs past the output",
	              (unsigned)r->len);
	r->data = p + XNBD_OPTION_REPLY_HEADER_SIZE;
	rc->off += XNBD_OPTION_REPLY_HEADER_SIZE + r->len;
}

void rc_expect(struct rcur *rc, uint32_t opt, uint32_t type, struct orep *r)
{
	struct orep tmp;
	if (!r)
		r = &tmp;
	rc_next(rc, r);
	ck_assert_msg(r->opt == opt, "reply to option %u, expected %u",
	              (unsigned)r->opt, (unsigned)opt);
	ck_assert_msg(r->type == type, "reply type 0x%08x, expected 0x%08x",
	              (unsigned)r->type, (unsigned)type);
	if (type == XNBD_REP_ACK)
		ck_assert_uint_eq(r->len, 0);
}

void rc_end(const struct rcur *rc)
{
	ck_assert_msg(rc_at_end(rc), "%zu unexpected bytes after the replies",
	              rc->b->len - rc->off);
}

void expect_one_reply(struct xnbd__hs *hs, uint32_t opt, uint32_t type)
{
	struct rcur rc;
	rc_init(&rc, &hs->out);
	rc_expect(&rc, opt, type, NULL);
	rc_end(&rc);
	xnbd__buf_reset(&hs->out);
}

uint32_t rc_infos(struct rcur *rc, uint32_t opt, struct info_set *is)
{
	memset(is, 0, sizeof(*is));
	for (;;) {
		struct orep r;
		rc_next(rc, &r);
		ck_assert_uint_eq(r.opt, opt);
		if (r.type != XNBD_REP_INFO)
			return r.type;
		ck_assert_uint_ge(r.len, 2);
		uint16_t t = xnbd__get16(r.data);
		if (t < N_INFO_TYPES) {
			is->count[t]++;
			is->rep[t] = r;
		} else {
			is->unknown++;
		}
	}
}

uint32_t rc_contexts(struct rcur *rc, uint32_t opt, struct ctx_set *cs)
{
	memset(cs, 0, sizeof(*cs));
	for (;;) {
		struct orep r;
		rc_next(rc, &r);
		ck_assert_uint_eq(r.opt, opt);
		if (r.type != XNBD_REP_META_CONTEXT)
			return r.type;
		ck_assert_uint_ge(r.len, 4);
		ck_assert_uint_lt(cs->n, MAX_CTX);
		ck_assert_uint_lt(r.len - 4, sizeof(cs->name[0]));
		cs->id[cs->n] = xnbd__get32(r.data);
		memcpy(cs->name[cs->n], r.data + 4, r.len - 4);
		cs->name[cs->n][r.len - 4] = '\0';
		cs->n++;
	}
}

int ctx_find(const struct ctx_set *cs, const char *name)
{
	for (size_t i = 0; i < cs->n; i++)
		if (strcmp(cs->name[i], name) == 0)
			return (int)i;
	return -1;
}

/* ---- transmission ------------------------------------------------------- */

uint32_t check_req(const struct xnbd__tx *tx, uint16_t type, uint16_t flags,
                   uint64_t offset, uint32_t length)
{
	struct xnbd__request r = {
	    .flags = flags,
	    .type = type,
	    .cookie = 0x0102030405060708ULL,
	    .offset = offset,
	    .length = length,
	};
	return xnbd__request_check(tx, &r);
}
