/* wire-test-util.h - shared helpers for the Check tests of the wire codec:
 * a fake export catalog, builders for client bytes (options, INFO/GO and
 * meta context payloads) and a parser for the option replies that the
 * handshake appends to hs->out.
 */
#ifndef WIRE_TEST_UTIL_H
#define WIRE_TEST_UTIL_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "wire.h"

/* ---- fake catalog ------------------------------------------------------- */

/* Index of each export in test_exports[]. */
enum { EXP_DEFAULT, EXP_DISK2, EXP_BOTH, N_TEST_EXPORTS };

/* "" (default): writable, base:allocation, blocks 1/4096/32 MiB, described.
 * "disk2": read-only, no contexts, blocks 512/65536/1 MiB, no description.
 * "both": writable, base:allocation and the second context. */
extern const struct xnbd__hs_export test_exports[N_TEST_EXPORTS];

#define DEFAULT_SIZE 0x0011223344556677ULL
#define DEFAULT_TFLAGS \
	(XNBD_FLAG_SEND_FLUSH | XNBD_FLAG_SEND_FUA | XNBD_FLAG_SEND_TRIM | \
	 XNBD_FLAG_SEND_WRITE_ZEROES | XNBD_FLAG_SEND_CACHE | \
	 XNBD_FLAG_SEND_FAST_ZERO | XNBD_FLAG_CAN_MULTI_CONN)
#define DEFAULT_DESC "default export"
#define DISK2_SIZE 0x00000000A1B2C300ULL
#define DISK2_TFLAGS \
	(XNBD_FLAG_READ_ONLY | XNBD_FLAG_SEND_FLUSH | XNBD_FLAG_ROTATIONAL)
#define BOTH_SIZE 0x0000000000100000ULL

struct fake_catalog {
	const struct xnbd__hs_export *v;
	size_t n;
	unsigned find_calls;
	struct xnbd__hs_catalog cat;
};

void fake_catalog_init(struct fake_catalog *fc, const struct xnbd__hs_export *v,
                       size_t n);

/* ---- client bytes ------------------------------------------------------- */

#define OB_CAP 65536

struct obuf {
	uint8_t d[OB_CAP];
	size_t len;
};

void ob_reset(struct obuf *ob);
void ob_put16(struct obuf *ob, uint16_t v);
void ob_put32(struct obuf *ob, uint32_t v);
void ob_put64(struct obuf *ob, uint64_t v);
void ob_bytes(struct obuf *ob, const void *p, size_t n);
void ob_zeroes(struct obuf *ob, size_t n);
/* An option: IHAVEOPT, opt, len, then len bytes of data. */
void ob_option(struct obuf *ob, uint32_t opt, const void *data, uint32_t len);
/* The data of NBD_OPT_INFO / NBD_OPT_GO. */
void ob_info(struct obuf *ob, const char *name, size_t nreq,
             const uint16_t *reqs);
/* The data of NBD_OPT_{LIST,SET}_META_CONTEXT. */
void ob_meta(struct obuf *ob, const char *name, size_t nq,
             const char *const *queries);

/* ---- driving the handshake ---------------------------------------------- */

/* hs_init (newstyle), check the 18-byte greeting, send client flags, check
 * the state is OPT_HEADER, and clear hs->out. */
void hs_begin(struct xnbd__hs *hs, const struct xnbd__hs_catalog *cat,
              uint32_t client_flags);
/* Feed the whole buffer; returns what was consumed. */
size_t hs_feed(struct xnbd__hs *hs, const struct obuf *ob);
/* Send one option and check that all its bytes were consumed. */
void hs_opt(struct xnbd__hs *hs, uint32_t opt, const void *data, uint32_t len);
/* Send one option whose data is in ob. */
void hs_opt_ob(struct xnbd__hs *hs, uint32_t opt, const struct obuf *data);

/* ---- parsing option replies out of hs->out ------------------------------- */

struct orep {
	uint32_t opt;
	uint32_t type;
	uint32_t len;
	const uint8_t *data;
};

struct rcur {
	const struct xnbd__buf *b;
	size_t off;
};

void rc_init(struct rcur *rc, const struct xnbd__buf *b);
bool rc_at_end(const struct rcur *rc);
/* Parse the next reply (checks magic and that the data is all there). */
void rc_next(struct rcur *rc, struct orep *r);
/* Parse the next reply and check its option and type. */
void rc_expect(struct rcur *rc, uint32_t opt, uint32_t type, struct orep *r);
void rc_end(const struct rcur *rc);

/* hs->out holds exactly one reply, to opt, of that type (an error reply
 * may carry a message).  The output is cleared afterwards. */
void expect_one_reply(struct xnbd__hs *hs, uint32_t opt, uint32_t type);

/* NBD_REP_INFO replies of one INFO/GO answer, by information type. */
#define N_INFO_TYPES 4
struct info_set {
	unsigned count[N_INFO_TYPES];
	struct orep rep[N_INFO_TYPES];
	unsigned unknown;
};

/* Read NBD_REP_INFO replies to opt, then the final reply; returns the final
 * reply's type. */
uint32_t rc_infos(struct rcur *rc, uint32_t opt, struct info_set *is);

/* NBD_REP_META_CONTEXT replies, then the final reply. */
#define MAX_CTX 8
struct ctx_set {
	size_t n;
	uint32_t id[MAX_CTX];
	char name[MAX_CTX][64];
};

uint32_t rc_contexts(struct rcur *rc, uint32_t opt, struct ctx_set *cs);
/* Index of a context name in cs, or -1. */
int ctx_find(const struct ctx_set *cs, const char *name);

/* ---- transmission ------------------------------------------------------- */

uint32_t check_req(const struct xnbd__tx *tx, uint16_t type, uint16_t flags,
                   uint64_t offset, uint32_t length);

#endif
