/* wire.h - the sans-I/O codec of the NBD protocol (private).
 *
 * Notes on the design: nothing in this layer does I/O or touches libuv.
 * The handshake is a state machine that is fed bytes and appends its
 * replies to an output buffer; transmission requests are parsed from a
 * byte buffer and checked against the negotiated state by a pure function.
 * Every length and offset that comes from the wire is checked here, once,
 * so the engine above can trust what it gets.  Check tests and fuzzers
 * drive these functions directly.
 */
#ifndef XNBD_WIRE_H
#define XNBD_WIRE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "xnbd/log.h"
#include "xnbd/protocol.h"

static inline void xnbd__put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void xnbd__put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static inline void xnbd__put64(uint8_t *p, uint64_t v)
{
	xnbd__put32(p, (uint32_t)(v >> 32));
	xnbd__put32(p + 4, (uint32_t)v);
}

static inline uint16_t xnbd__get16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}

static inline uint32_t xnbd__get32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	       ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline uint64_t xnbd__get64(const uint8_t *p)
{
	return ((uint64_t)xnbd__get32(p) << 32) | xnbd__get32(p + 4);
}

/* A growable byte buffer for output.  Allocation failure is sticky: once
 * `failed` is set every append is ignored and the owner closes the
 * connection, so no caller has to check each append. */
struct xnbd__buf {
	uint8_t *data;
	size_t len;
	size_t cap;
	bool failed;
};

void xnbd__buf_init(struct xnbd__buf *b);
void xnbd__buf_free(struct xnbd__buf *b);
void xnbd__buf_reset(struct xnbd__buf *b);
/* Reserve n bytes at the end and return them, or NULL after a failure. */
uint8_t *xnbd__buf_push(struct xnbd__buf *b, size_t n);
void xnbd__buf_append(struct xnbd__buf *b, const void *p, size_t n);

/* ---- Handshake ---------------------------------------------------------- */

/* Meta contexts this implementation knows; a bit each in a context mask.
 * The context ID on the wire is the bit number plus one. */
#define XNBD__CTX_BASE_ALLOCATION (1U << 0)
#define XNBD__CTX_XNBD_CACHE (1U << 1)
#define XNBD__CTX_COUNT 2

/* What the handshake needs to know of an export. */
struct xnbd__hs_export {
	const char *name;
	const char *description; /* may be NULL */
	uint64_t size;
	uint16_t tflags;    /* transmission flags, without SEND_DF */
	uint32_t contexts;  /* meta contexts the export can answer */
	uint32_t min_block; /* NBD_INFO_BLOCK_SIZE */
	uint32_t pref_block;
	uint32_t max_block;
	void *handle; /* the engine's export, passed through */
};

/* The set of exports, as seen by the handshake. */
struct xnbd__hs_catalog {
	size_t (*count)(void *ud);
	/* The i-th export for NBD_OPT_LIST. */
	const struct xnbd__hs_export *(*get)(void *ud, size_t i);
	/* The export of that name (not NUL-terminated), or NULL. */
	const struct xnbd__hs_export *(*find)(void *ud, const char *name,
	                                      size_t len);
	void *ud;
};

enum xnbd__hs_state {
	XNBD__HS_CLIENT_FLAGS, /* waiting for the 32-bit client flags */
	XNBD__HS_OPT_HEADER,   /* waiting for an option header */
	XNBD__HS_OPT_DATA,     /* collecting option data */
	XNBD__HS_OPT_SKIP,     /* discarding over-long option data */
	XNBD__HS_DONE,         /* transmission may start: see `export` */
	XNBD__HS_CLOSE,        /* the connection must be closed */
};

/* Largest option payload buffered; longer ones are skipped and refused
 * with NBD_REP_ERR_TOO_BIG without being held in memory. */
#define XNBD__HS_MAX_OPTION (XNBD_MAX_STRING * 4U + 1024U)

struct xnbd__hs {
	enum xnbd__hs_state state;
	const struct xnbd__hs_catalog *catalog;
	bool shutting_down; /* answer options with ERR_SHUTDOWN */
	bool fixed;         /* client set FIXED_NEWSTYLE */
	bool no_zeroes;
	bool structured;
	uint32_t contexts; /* selected by SET_META_CONTEXT */
	const struct xnbd__hs_export *ctx_export; /* export they were set for */
	/* current option */
	uint32_t opt;
	uint32_t opt_len;
	uint32_t opt_have;
	uint8_t hdr[XNBD_OPTION_HEADER_SIZE];
	uint32_t hdr_have;
	uint8_t *data; /* XNBD__HS_MAX_OPTION bytes, allocated on demand */
	/* result */
	const struct xnbd__hs_export *export;
	uint16_t tflags; /* flags sent to the client at the end */
	const char *close_reason;
	struct xnbd__buf out; /* bytes to send */
};

/* Start a fixed-newstyle handshake: the server greeting is appended to
 * hs->out.  With `oldstyle`, the oldstyle greeting of the first export of
 * the catalog is sent instead and the state is DONE at once (or CLOSE when
 * the catalog is empty). */
void xnbd__hs_init(struct xnbd__hs *hs, const struct xnbd__hs_catalog *cat,
                   bool oldstyle);
void xnbd__hs_free(struct xnbd__hs *hs);
/* The export e has left the catalog: forget meta contexts selected for
 * it, so that they never carry over to an export made later at the same
 * address. */
void xnbd__hs_forget_export(struct xnbd__hs *hs,
                            const struct xnbd__hs_export *e);
/* Feed received bytes; returns how many were consumed.  Stops consuming
 * at DONE or CLOSE: bytes after DONE belong to the transmission phase. */
size_t xnbd__hs_input(struct xnbd__hs *hs, const uint8_t *p, size_t len);

/* ---- Transmission ------------------------------------------------------- */

struct xnbd__request {
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t length;
};

/* Parse a request header of XNBD_REQUEST_SIZE bytes; returns 0, or
 * -EPROTO when the magic is wrong (the stream cannot be resynchronised). */
int xnbd__request_parse(const uint8_t *p, struct xnbd__request *r);

/* The negotiated state a request is checked against. */
struct xnbd__tx {
	uint64_t size;
	uint16_t tflags; /* as sent to the client */
	bool structured;
	uint32_t contexts; /* selected meta contexts */
};

/* Check a parsed request; returns 0 or the NBD error (XNBD_E*) to reply
 * with.  A WRITE's payload must be consumed whatever this returns. */
uint32_t xnbd__request_check(const struct xnbd__tx *tx,
                             const struct xnbd__request *r);

/* Does the request carry a payload of r->length bytes? */
static inline bool xnbd__request_has_payload(const struct xnbd__request *r)
{
	return r->type == XNBD_CMD_WRITE;
}

/* Reply builders: write a header into p (which has room for it). */
void xnbd__simple_reply(uint8_t p[XNBD_SIMPLE_REPLY_SIZE], uint64_t cookie,
                        uint32_t error);
void xnbd__chunk_header(uint8_t p[XNBD_STRUCTURED_REPLY_SIZE], uint16_t flags,
                        uint16_t type, uint64_t cookie, uint32_t length);

/* Map a negative errno from a backend to the NBD error sent for it. */
uint32_t xnbd__errno_to_nbd(int err);

/* Map an NBD error from a server to a negative errno (unknown: -EIO). */
int xnbd__nbd_to_errno(uint32_t err);

/* Format a message and hand it to a log callback (nothing if fn is NULL). */
__attribute__((format(printf, 4, 5))) void
xnbd__logf(xnbd_log_fn fn, void *ud, int level, const char *fmt, ...);
/* The same with a va_list. */
__attribute__((format(printf, 4, 0))) void
xnbd__vlogf(xnbd_log_fn fn, void *ud, int level, const char *fmt, va_list ap);

#endif
