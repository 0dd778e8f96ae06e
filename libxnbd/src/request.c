/* request.c - transmission-phase codec: request headers in, reply headers
 * out, and the one place that decides whether a request is valid.
 */
#include <errno.h>

#include "wire.h"

int xnbd__request_parse(const uint8_t *p, struct xnbd__request *r)
{
	if (xnbd__get32(p) != XNBD_MAGIC_REQUEST)
		return -EPROTO;
	r->flags = xnbd__get16(p + 4);
	r->type = xnbd__get16(p + 6);
	r->cookie = xnbd__get64(p + 8);
	r->offset = xnbd__get64(p + 16);
	r->length = xnbd__get32(p + 24);
	return 0;
}

/* Command flags each command accepts, given what was advertised. */
static uint16_t allowed_flags(const struct xnbd__tx *tx, uint16_t type)
{
	/* FUA is valid on every command once advertised (the spec: "the server
	 * MUST accept all commands with this bit set (even by ignoring the
	 * bit)"); it only matters on writes. */
	uint16_t fua =
	    (tx->tflags & XNBD_FLAG_SEND_FUA) ? XNBD_CMD_FLAG_FUA : 0;
	switch (type) {
	case XNBD_CMD_READ:
		return fua |
		       ((tx->tflags & XNBD_FLAG_SEND_DF) ? XNBD_CMD_FLAG_DF
		                                         : 0);
	case XNBD_CMD_WRITE_ZEROES:
		return fua | XNBD_CMD_FLAG_NO_HOLE |
		       ((tx->tflags & XNBD_FLAG_SEND_FAST_ZERO)
		            ? XNBD_CMD_FLAG_FAST_ZERO
		            : 0);
	case XNBD_CMD_BLOCK_STATUS:
		return fua | XNBD_CMD_FLAG_REQ_ONE;
	default:
		return fua;
	}
}

/* Is this command type one the export advertised? */
static bool advertised(const struct xnbd__tx *tx, uint16_t type)
{
	switch (type) {
	case XNBD_CMD_READ:
	case XNBD_CMD_WRITE:
	case XNBD_CMD_DISC:
		return true;
	case XNBD_CMD_FLUSH:
		return tx->tflags & XNBD_FLAG_SEND_FLUSH;
	case XNBD_CMD_TRIM:
		return tx->tflags & XNBD_FLAG_SEND_TRIM;
	case XNBD_CMD_CACHE:
		return tx->tflags & XNBD_FLAG_SEND_CACHE;
	case XNBD_CMD_WRITE_ZEROES:
		return tx->tflags & XNBD_FLAG_SEND_WRITE_ZEROES;
	case XNBD_CMD_BLOCK_STATUS:
		return tx->structured && tx->contexts != 0;
	default:
		return false;
	}
}

uint32_t xnbd__request_check(const struct xnbd__tx *tx,
                             const struct xnbd__request *r)
{
	/* A read-only export refuses every kind of write with EPERM, as the
	 * spec says, although it advertises neither TRIM nor WRITE_ZEROES. */
	bool is_write = r->type == XNBD_CMD_WRITE || r->type == XNBD_CMD_TRIM ||
	                r->type == XNBD_CMD_WRITE_ZEROES;
	if (is_write && (tx->tflags & XNBD_FLAG_READ_ONLY))
		return XNBD_EPERM;
	if (!advertised(tx, r->type))
		return XNBD_EINVAL;
	if (r->flags & ~allowed_flags(tx, r->type))
		return XNBD_EINVAL;

	switch (r->type) {
	case XNBD_CMD_DISC:
		return 0;
	case XNBD_CMD_FLUSH:
		/* offset and length are reserved and must be zero. */
		return (r->offset || r->length) ? XNBD_EINVAL : 0;
	case XNBD_CMD_READ:
	case XNBD_CMD_WRITE:
	case XNBD_CMD_CACHE:
		/* Over the advertised maximum block size.  A WRITE's payload is
		 * still read (and dropped) by the caller. */
		if (r->length > XNBD_MAX_PAYLOAD)
			return XNBD_EINVAL;
		break;
	case XNBD_CMD_WRITE_ZEROES:
		/* The maximum binds zeroing too, except a FAST_ZERO request. */
		if (r->length > XNBD_MAX_PAYLOAD &&
		    !(r->flags & XNBD_CMD_FLAG_FAST_ZERO))
			return XNBD_EINVAL;
		break;
	case XNBD_CMD_BLOCK_STATUS:
		if (r->length == 0)
			return XNBD_EINVAL;
		break;
	default:
		break;
	}

	/* The range: offset + length must not pass the end (nor wrap). */
	if (r->offset > tx->size || r->length > tx->size - r->offset) {
		if (r->type == XNBD_CMD_WRITE ||
		    r->type == XNBD_CMD_WRITE_ZEROES)
			return XNBD_ENOSPC;
		return XNBD_EINVAL;
	}
	return 0;
}

void xnbd__simple_reply(uint8_t p[XNBD_SIMPLE_REPLY_SIZE], uint64_t cookie,
                        uint32_t error)
{
	xnbd__put32(p, XNBD_MAGIC_SIMPLE_REPLY);
	xnbd__put32(p + 4, error);
	xnbd__put64(p + 8, cookie);
}

void xnbd__chunk_header(uint8_t p[XNBD_STRUCTURED_REPLY_SIZE], uint16_t flags,
                        uint16_t type, uint64_t cookie, uint32_t length)
{
	xnbd__put32(p, XNBD_MAGIC_STRUCTURED_REPLY);
	xnbd__put16(p + 4, flags);
	xnbd__put16(p + 6, type);
	xnbd__put64(p + 8, cookie);
	xnbd__put32(p + 16, length);
}

uint32_t xnbd__errno_to_nbd(int err)
{
	if (err < 0)
		err = -err;
	switch (err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
	case EACCES:
		return XNBD_EPERM;
	case ENOMEM:
		return XNBD_ENOMEM;
	case EINVAL:
		return XNBD_EINVAL;
	case ENOSPC:
	case EFBIG:
	case EDQUOT:
		return XNBD_ENOSPC;
	case EOVERFLOW:
		return XNBD_EOVERFLOW;
	case ENOTSUP:
		return XNBD_ENOTSUP;
	case ESHUTDOWN:
		return XNBD_ESHUTDOWN;
	default:
		return XNBD_EIO;
	}
}

int xnbd__nbd_to_errno(uint32_t e)
{
	switch (e) {
	case XNBD_EPERM:
		return -EPERM;
	case XNBD_EIO:
		return -EIO;
	case XNBD_ENOMEM:
		return -ENOMEM;
	case XNBD_EINVAL:
		return -EINVAL;
	case XNBD_ENOSPC:
		return -ENOSPC;
	case XNBD_EOVERFLOW:
		return -EOVERFLOW;
	case XNBD_ENOTSUP:
		return -ENOTSUP;
	case XNBD_ESHUTDOWN:
		return -ESHUTDOWN;
	default:
		return -EIO;
	}
}
