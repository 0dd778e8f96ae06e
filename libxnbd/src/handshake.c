/* handshake.c - the NBD handshake as a sans-I/O state machine.
 *
 * The engine feeds received bytes to xnbd__hs_input() and sends whatever
 * lands in hs->out.  Options are collected whole (bounded by
 * XNBD__HS_MAX_OPTION) before they are acted on; longer option data is
 * skipped byte by byte and refused, so the stream stays in sync and no
 * client can make us buffer more than that bound.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static const uint8_t zeroes[124];

void xnbd__buf_init(struct xnbd__buf *b)
{
	memset(b, 0, sizeof(*b));
}

void xnbd__buf_free(struct xnbd__buf *b)
{
	free(b->data);
	xnbd__buf_init(b);
}

void xnbd__buf_reset(struct xnbd__buf *b)
{
	b->len = 0;
}

uint8_t *xnbd__buf_push(struct xnbd__buf *b, size_t n)
{
	if (b->failed)
		return NULL;
	if (n > b->cap - b->len) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap - b->len < n) {
			if (cap > SIZE_MAX / 2) {
				b->failed = true;
				return NULL;
			}
			cap *= 2;
		}
		uint8_t *d = realloc(b->data, cap);
		if (!d) {
			b->failed = true;
			return NULL;
		}
		b->data = d;
		b->cap = cap;
	}
	uint8_t *p = b->data + b->len;
	b->len += n;
	return p;
}

void xnbd__buf_append(struct xnbd__buf *b, const void *p, size_t n)
{
	uint8_t *d = xnbd__buf_push(b, n);
	if (d && n)
		memcpy(d, p, n);
}

/* ---- replies ------------------------------------------------------------ */

static void opt_reply(struct xnbd__hs *hs, uint32_t type, const void *data,
                      size_t len)
{
	uint8_t *p = xnbd__buf_push(&hs->out, XNBD_OPTION_REPLY_HEADER_SIZE);
	if (!p)
		return;
	xnbd__put64(p, XNBD_MAGIC_REP);
	xnbd__put32(p + 8, hs->opt);
	xnbd__put32(p + 12, type);
	xnbd__put32(p + 16, (uint32_t)len);
	xnbd__buf_append(&hs->out, data, len);
}

static void opt_error(struct xnbd__hs *hs, uint32_t type, const char *msg)
{
	opt_reply(hs, type, msg, strlen(msg));
}

static void send_export_info(struct xnbd__hs *hs,
                             const struct xnbd__hs_export *e)
{
	uint8_t b[12];
	xnbd__put16(b, XNBD_INFO_EXPORT);
	xnbd__put64(b + 2, e->size);
	xnbd__put16(b + 10, hs->tflags);
	opt_reply(hs, XNBD_REP_INFO, b, sizeof(b));
}

static void send_block_size(struct xnbd__hs *hs,
                            const struct xnbd__hs_export *e)
{
	uint8_t b[14];
	xnbd__put16(b, XNBD_INFO_BLOCK_SIZE);
	xnbd__put32(b + 2, e->min_block);
	xnbd__put32(b + 6, e->pref_block);
	xnbd__put32(b + 10, e->max_block);
	opt_reply(hs, XNBD_REP_INFO, b, sizeof(b));
}

static void send_info_string(struct xnbd__hs *hs, uint16_t type, const char *s)
{
	size_t n = strlen(s);
	if (n > XNBD_MAX_STRING)
		n = XNBD_MAX_STRING;
	uint8_t *p =
	    xnbd__buf_push(&hs->out, XNBD_OPTION_REPLY_HEADER_SIZE + 2 + n);
	if (!p)
		return;
	xnbd__put64(p, XNBD_MAGIC_REP);
	xnbd__put32(p + 8, hs->opt);
	xnbd__put32(p + 12, XNBD_REP_INFO);
	xnbd__put32(p + 16, (uint32_t)(2 + n));
	xnbd__put16(p + 20, type);
	memcpy(p + 22, s, n);
}

static uint16_t tflags_for(const struct xnbd__hs *hs,
                           const struct xnbd__hs_export *e)
{
	uint16_t f = e->tflags | XNBD_FLAG_HAS_FLAGS;
	if (hs->structured)
		f |= XNBD_FLAG_SEND_DF;
	return f;
}

/* Enter transmission with export e.  Meta contexts chosen for another
 * export do not carry over. */
static void finish(struct xnbd__hs *hs, const struct xnbd__hs_export *e)
{
	hs->export = e;
	hs->tflags = tflags_for(hs, e);
	if (hs->ctx_export != e)
		hs->contexts = 0;
	hs->contexts &= e->contexts;
	hs->state = XNBD__HS_DONE;
}

/* ---- options ------------------------------------------------------------ */

static bool valid_string(const uint8_t *s, size_t n)
{
	return n <= XNBD_MAX_STRING && memchr(s, 0, n) == NULL;
}

static void opt_export_name(struct xnbd__hs *hs)
{
	if (!valid_string(hs->data, hs->opt_len)) {
		hs->close_reason = "invalid export name";
		hs->state = XNBD__HS_CLOSE;
		return;
	}
	const struct xnbd__hs_export *e = hs->catalog->find(
	    hs->catalog->ud, (const char *)hs->data, hs->opt_len);
	if (!e) {
		hs->close_reason =
		    "unknown export requested by NBD_OPT_EXPORT_NAME";
		hs->state = XNBD__HS_CLOSE;
		return;
	}
	hs->tflags = tflags_for(hs, e);
	uint8_t *p = xnbd__buf_push(&hs->out, 10);
	if (p) {
		xnbd__put64(p, e->size);
		xnbd__put16(p + 8, hs->tflags);
	}
	if (!hs->no_zeroes)
		xnbd__buf_append(&hs->out, zeroes, sizeof(zeroes));
	finish(hs, e);
}

static void opt_list(struct xnbd__hs *hs)
{
	if (hs->opt_len != 0) {
		opt_error(hs, XNBD_REP_ERR_INVALID,
		          "NBD_OPT_LIST takes no data");
		return;
	}
	size_t n = hs->catalog->count(hs->catalog->ud);
	for (size_t i = 0; i < n; i++) {
		const struct xnbd__hs_export *e =
		    hs->catalog->get(hs->catalog->ud, i);
		size_t nl = strlen(e->name);
		size_t dl = e->description ? strlen(e->description) : 0;
		uint8_t *p = xnbd__buf_push(
		    &hs->out, XNBD_OPTION_REPLY_HEADER_SIZE + 4 + nl + dl);
		if (!p)
			return;
		xnbd__put64(p, XNBD_MAGIC_REP);
		xnbd__put32(p + 8, hs->opt);
		xnbd__put32(p + 12, XNBD_REP_SERVER);
		xnbd__put32(p + 16, (uint32_t)(4 + nl + dl));
		xnbd__put32(p + 20, (uint32_t)nl);
		memcpy(p + 24, e->name, nl);
		if (dl)
			memcpy(p + 24 + nl, e->description, dl);
	}
	opt_reply(hs, XNBD_REP_ACK, NULL, 0);
}

static void opt_info_go(struct xnbd__hs *hs)
{
	const uint8_t *d = hs->data;
	uint32_t len = hs->opt_len;
	if (len < 6) {
		opt_error(hs, XNBD_REP_ERR_INVALID, "option data too short");
		return;
	}
	uint32_t nl = xnbd__get32(d);
	if (nl > len - 6) {
		opt_error(hs, XNBD_REP_ERR_INVALID,
		          "export name length exceeds option");
		return;
	}
	uint16_t nreq = xnbd__get16(d + 4 + nl);
	if ((uint64_t)4 + nl + 2 + 2ULL * nreq != len) {
		opt_error(
		    hs, XNBD_REP_ERR_INVALID,
		    "information request count does not match option length");
		return;
	}
	if (!valid_string(d + 4, nl)) {
		opt_error(hs, XNBD_REP_ERR_INVALID, "invalid export name");
		return;
	}
	const struct xnbd__hs_export *e =
	    hs->catalog->find(hs->catalog->ud, (const char *)d + 4, nl);
	if (!e) {
		opt_error(hs, XNBD_REP_ERR_UNKNOWN, "no such export");
		return;
	}
	hs->tflags = tflags_for(hs, e);
	bool want_name = false, want_desc = false;
	for (uint16_t i = 0; i < nreq; i++) {
		uint16_t t = xnbd__get16(d + 4 + nl + 2 + 2 * i);
		if (t == XNBD_INFO_NAME)
			want_name = true;
		else if (t == XNBD_INFO_DESCRIPTION)
			want_desc = true;
	}
	if (want_name)
		send_info_string(hs, XNBD_INFO_NAME, e->name);
	if (want_desc && e->description)
		send_info_string(hs, XNBD_INFO_DESCRIPTION, e->description);
	/* Our constraints (minimum 1) hold for any client, so the block sizes
	 * are sent whether or not they were asked for. */
	send_block_size(hs, e);
	send_export_info(hs, e);
	opt_reply(hs, XNBD_REP_ACK, NULL, 0);
	if (hs->opt == XNBD_OPT_GO)
		finish(hs, e);
}

static const char *const ctx_names[XNBD__CTX_COUNT] = {
    "base:allocation",
    "x-xnbd:cache", /* namespaces are base, nbd-server, x-* or registered */
};

/* Contexts of `avail` matched by one query; -1 if the query is malformed.
 * A namespace alone ("base:") is a wildcard when listing and selects
 * nothing when setting, as the spec says of "base:". */
static int match_query(const uint8_t *q, uint32_t n, uint32_t avail, bool set)
{
	const uint8_t *colon = memchr(q, ':', n);
	if (!colon || colon == q || !valid_string(q, n))
		return -1;
	uint32_t m = 0;
	size_t ns = (size_t)(colon - q) + 1;
	for (int i = 0; i < XNBD__CTX_COUNT; i++) {
		const char *c = ctx_names[i];
		size_t cl = strlen(c);
		bool whole_ns =
		    !set && n == ns && strncmp(c, (const char *)q, ns) == 0;
		bool exact = n == cl && memcmp(c, q, cl) == 0;
		if (whole_ns || exact)
			m |= 1U << i;
	}
	return (int)(m & avail);
}

static void send_context(struct xnbd__hs *hs, int i, uint32_t id)
{
	size_t n = strlen(ctx_names[i]);
	uint8_t *p =
	    xnbd__buf_push(&hs->out, XNBD_OPTION_REPLY_HEADER_SIZE + 4 + n);
	if (!p)
		return;
	xnbd__put64(p, XNBD_MAGIC_REP);
	xnbd__put32(p + 8, hs->opt);
	xnbd__put32(p + 12, XNBD_REP_META_CONTEXT);
	xnbd__put32(p + 16, (uint32_t)(4 + n));
	xnbd__put32(p + 20, id);
	memcpy(p + 24, ctx_names[i], n);
}

static void opt_meta_context(struct xnbd__hs *hs)
{
	const uint8_t *d = hs->data;
	uint32_t len = hs->opt_len;
	bool set = hs->opt == XNBD_OPT_SET_META_CONTEXT;

	/* SET replaces the selection even when it fails. */
	if (set) {
		hs->contexts = 0;
		hs->ctx_export = NULL;
	}

	if (len < 8) {
		opt_error(hs, XNBD_REP_ERR_INVALID, "option data too short");
		return;
	}
	uint32_t nl = xnbd__get32(d);
	if (nl > len - 8) {
		opt_error(hs, XNBD_REP_ERR_INVALID,
		          "export name length exceeds option");
		return;
	}
	uint32_t nq = xnbd__get32(d + 4 + nl);
	/* Walk the queries once to check that the lengths add up exactly. */
	uint32_t off = 8 + nl;
	for (uint32_t i = 0; i < nq; i++) {
		if (len - off < 4) {
			opt_error(hs, XNBD_REP_ERR_INVALID, "truncated query");
			return;
		}
		uint32_t ql = xnbd__get32(d + off);
		if (ql > len - off - 4) {
			opt_error(hs, XNBD_REP_ERR_INVALID,
			          "query length exceeds option");
			return;
		}
		off += 4 + ql;
	}
	if (off != len) {
		opt_error(hs, XNBD_REP_ERR_INVALID,
		          "trailing bytes after queries");
		return;
	}
	if (!hs->structured) {
		opt_error(hs, XNBD_REP_ERR_INVALID,
		          "meta contexts need structured replies first");
		return;
	}
	if (!valid_string(d + 4, nl)) {
		opt_error(hs, XNBD_REP_ERR_INVALID, "invalid export name");
		return;
	}
	const struct xnbd__hs_export *e =
	    hs->catalog->find(hs->catalog->ud, (const char *)d + 4, nl);
	if (!e) {
		opt_error(hs, XNBD_REP_ERR_UNKNOWN, "no such export");
		return;
	}
	uint32_t mask = 0;
	if (nq == 0 && !set) {
		mask = e->contexts;
	} else {
		off = 8 + nl;
		for (uint32_t i = 0; i < nq; i++) {
			uint32_t ql = xnbd__get32(d + off);
			int m = match_query(d + off + 4, ql, e->contexts, set);
			if (m < 0) {
				opt_error(hs, XNBD_REP_ERR_INVALID,
				          "malformed query");
				return;
			}
			mask |= (uint32_t)m;
			off += 4 + ql;
		}
	}
	for (int i = 0; i < XNBD__CTX_COUNT; i++)
		if (mask & (1U << i))
			send_context(hs, i, set ? (uint32_t)i + 1 : 0);
	if (set) {
		hs->contexts = mask;
		hs->ctx_export = e;
	}
	opt_reply(hs, XNBD_REP_ACK, NULL, 0);
}

static void process_option(struct xnbd__hs *hs)
{
	if (hs->shutting_down && hs->opt != XNBD_OPT_ABORT) {
		if (hs->opt == XNBD_OPT_EXPORT_NAME) {
			hs->close_reason = "server shutting down";
			hs->state = XNBD__HS_CLOSE;
		} else {
			opt_error(hs, XNBD_REP_ERR_SHUTDOWN,
			          "server shutting down");
		}
		return;
	}
	switch (hs->opt) {
	case XNBD_OPT_EXPORT_NAME:
		opt_export_name(hs);
		break;
	case XNBD_OPT_ABORT:
		/* A soft disconnect: acknowledge, then close. */
		opt_reply(hs, XNBD_REP_ACK, NULL, 0);
		hs->close_reason = NULL;
		hs->state = XNBD__HS_CLOSE;
		break;
	case XNBD_OPT_LIST:
		opt_list(hs);
		break;
	case XNBD_OPT_STARTTLS:
		if (hs->opt_len != 0)
			opt_error(hs, XNBD_REP_ERR_INVALID,
			          "NBD_OPT_STARTTLS takes no data");
		else
			opt_error(hs, XNBD_REP_ERR_POLICY,
			          "TLS is not offered by this server");
		break;
	case XNBD_OPT_INFO:
	case XNBD_OPT_GO:
		opt_info_go(hs);
		break;
	case XNBD_OPT_STRUCTURED_REPLY:
		if (hs->opt_len != 0)
			opt_error(hs, XNBD_REP_ERR_INVALID,
			          "NBD_OPT_STRUCTURED_REPLY takes no data");
		else if (hs->structured)
			opt_error(hs, XNBD_REP_ERR_INVALID,
			          "structured replies already negotiated");
		else {
			hs->structured = true;
			opt_reply(hs, XNBD_REP_ACK, NULL, 0);
		}
		break;
	case XNBD_OPT_LIST_META_CONTEXT:
	case XNBD_OPT_SET_META_CONTEXT:
		opt_meta_context(hs);
		break;
	default:
		opt_error(hs, XNBD_REP_ERR_UNSUP, "option not supported");
		break;
	}
	if (hs->out.failed) {
		hs->close_reason = "out of memory";
		hs->state = XNBD__HS_CLOSE;
	}
}

/* ---- the state machine -------------------------------------------------- */

void xnbd__hs_init(struct xnbd__hs *hs, const struct xnbd__hs_catalog *cat,
                   bool oldstyle)
{
	memset(hs, 0, sizeof(*hs));
	hs->catalog = cat;
	xnbd__buf_init(&hs->out);
	uint8_t *p;
	if (oldstyle) {
		if (cat->count(cat->ud) == 0) {
			hs->close_reason = "no export for an oldstyle client";
			hs->state = XNBD__HS_CLOSE;
			return;
		}
		const struct xnbd__hs_export *e = cat->get(cat->ud, 0);
		p = xnbd__buf_push(&hs->out, 28);
		if (p) {
			xnbd__put64(p, XNBD_MAGIC_INIT);
			xnbd__put64(p + 8, XNBD_MAGIC_OLDSTYLE);
			xnbd__put64(p + 16, e->size);
			xnbd__put32(p + 24, (uint32_t)(e->tflags |
			                               XNBD_FLAG_HAS_FLAGS));
		}
		xnbd__buf_append(&hs->out, zeroes, sizeof(zeroes));
		hs->ctx_export = NULL;
		finish(hs, e);
		return;
	}
	p = xnbd__buf_push(&hs->out, 18);
	if (p) {
		xnbd__put64(p, XNBD_MAGIC_INIT);
		xnbd__put64(p + 8, XNBD_MAGIC_OPTS);
		xnbd__put16(p + 16,
		            XNBD_FLAG_FIXED_NEWSTYLE | XNBD_FLAG_NO_ZEROES);
	}
	hs->state = XNBD__HS_CLIENT_FLAGS;
}

void xnbd__hs_free(struct xnbd__hs *hs)
{
	free(hs->data);
	hs->data = NULL;
	xnbd__buf_free(&hs->out);
}

void xnbd__hs_forget_export(struct xnbd__hs *hs,
                            const struct xnbd__hs_export *e)
{
	if (hs->ctx_export == e) {
		hs->ctx_export = NULL;
		hs->contexts = 0;
	}
}

/* Gather up to `need` bytes into dst; returns bytes taken from p. */
static size_t gather(uint8_t *dst, uint32_t *have, uint32_t need,
                     const uint8_t *p, size_t len)
{
	size_t n = need - *have;
	if (n > len)
		n = len;
	memcpy(dst + *have, p, n);
	*have += (uint32_t)n;
	return n;
}

size_t xnbd__hs_input(struct xnbd__hs *hs, const uint8_t *p, size_t len)
{
	size_t used = 0;
	while (used < len) {
		switch (hs->state) {
		case XNBD__HS_CLIENT_FLAGS: {
			used += gather(hs->hdr, &hs->hdr_have, 4, p + used,
			               len - used);
			if (hs->hdr_have < 4)
				break;
			uint32_t f = xnbd__get32(hs->hdr);
			hs->hdr_have = 0;
			if (f & ~(XNBD_FLAG_C_FIXED_NEWSTYLE |
			          XNBD_FLAG_C_NO_ZEROES)) {
				hs->close_reason = "unknown client flags";
				hs->state = XNBD__HS_CLOSE;
				return used;
			}
			hs->fixed = f & XNBD_FLAG_C_FIXED_NEWSTYLE;
			hs->no_zeroes = f & XNBD_FLAG_C_NO_ZEROES;
			hs->state = XNBD__HS_OPT_HEADER;
			break;
		}
		case XNBD__HS_OPT_HEADER:
			used += gather(hs->hdr, &hs->hdr_have,
			               XNBD_OPTION_HEADER_SIZE, p + used,
			               len - used);
			if (hs->hdr_have < XNBD_OPTION_HEADER_SIZE)
				break;
			hs->hdr_have = 0;
			if (xnbd__get64(hs->hdr) != XNBD_MAGIC_OPTS) {
				hs->close_reason = "bad option magic";
				hs->state = XNBD__HS_CLOSE;
				return used;
			}
			hs->opt = xnbd__get32(hs->hdr + 8);
			hs->opt_len = xnbd__get32(hs->hdr + 12);
			hs->opt_have = 0;
			if (hs->opt_len > XNBD__HS_MAX_OPTION) {
				if (hs->opt == XNBD_OPT_EXPORT_NAME) {
					hs->close_reason =
					    "export name too long";
					hs->state = XNBD__HS_CLOSE;
					return used;
				}
				hs->state = XNBD__HS_OPT_SKIP;
				break;
			}
			if (!hs->data) {
				hs->data = malloc(XNBD__HS_MAX_OPTION);
				if (!hs->data) {
					hs->close_reason = "out of memory";
					hs->state = XNBD__HS_CLOSE;
					return used;
				}
			}
			hs->state = XNBD__HS_OPT_DATA;
			if (hs->opt_len == 0)
				goto process;
			break;
		case XNBD__HS_OPT_DATA:
			used += gather(hs->data, &hs->opt_have, hs->opt_len,
			               p + used, len - used);
			if (hs->opt_have < hs->opt_len)
				break;
		process:
			hs->state = XNBD__HS_OPT_HEADER;
			process_option(hs);
			if (hs->state == XNBD__HS_DONE ||
			    hs->state == XNBD__HS_CLOSE)
				return used;
			break;
		case XNBD__HS_OPT_SKIP: {
			size_t n = hs->opt_len - hs->opt_have;
			if (n > len - used)
				n = len - used;
			hs->opt_have += (uint32_t)n;
			used += n;
			if (hs->opt_have == hs->opt_len) {
				hs->state = XNBD__HS_OPT_HEADER;
				/* ABORT is acknowledged whatever data came with it. */
				if (hs->opt == XNBD_OPT_ABORT) {
					process_option(hs);
					return used;
				}
				opt_error(hs, XNBD_REP_ERR_TOO_BIG,
				          "option data too long");
			}
			break;
		}
		case XNBD__HS_DONE:
		case XNBD__HS_CLOSE:
			return used;
		}
	}
	return used;
}
