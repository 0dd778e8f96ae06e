/* backend.c - the public face of backends: checks, then dispatch. */
#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include "backend.h"

uint64_t xnbd_backend_size(const struct xnbd_backend *b)
{
	return b->size;
}

unsigned xnbd_backend_caps(const struct xnbd_backend *b)
{
	return b->caps;
}

size_t xnbd_backend_in_flight(const struct xnbd_backend *b)
{
	return b->in_flight;
}

static unsigned cap_needed(uint32_t type)
{
	switch (type) {
	case XNBD_IO_FLUSH:
		return XNBD_CAP_FLUSH;
	case XNBD_IO_TRIM:
		return XNBD_CAP_TRIM;
	case XNBD_IO_ZERO:
		return XNBD_CAP_ZERO;
	case XNBD_IO_CACHE:
		return XNBD_CAP_CACHE;
	case XNBD_IO_BLOCK_STATUS:
		return XNBD_CAP_BLOCK_STATUS;
	default:
		return 0;
	}
}

static int check_io(struct xnbd_backend *b, struct xnbd_io *io)
{
	if (io->type > XNBD_IO_BLOCK_STATUS)
		return -EINVAL;
	unsigned need = cap_needed(io->type);
	if (need && !(b->caps & need))
		return -ENOTSUP;
	bool writes = io->type == XNBD_IO_WRITE || io->type == XNBD_IO_TRIM ||
	              io->type == XNBD_IO_ZERO;
	if (writes && (b->caps & XNBD_CAP_READ_ONLY))
		return -EPERM;
	if (io->type != XNBD_IO_FLUSH &&
	    (io->offset > b->size || io->length > b->size - io->offset))
		return (io->type == XNBD_IO_WRITE || io->type == XNBD_IO_ZERO)
		           ? -ENOSPC
		           : -EINVAL;
	if (io->type == XNBD_IO_BLOCK_STATUS &&
	    (io->max_extents == 0 || io->extents == NULL || io->length == 0))
		return -EINVAL;
	if ((io->type == XNBD_IO_READ || io->type == XNBD_IO_WRITE) &&
	    io->length && io->buf == NULL)
		return -EINVAL;
	if ((io->flags & XNBD_IO_FAST_ZERO) && !(b->caps & XNBD_CAP_FAST_ZERO))
		return -ENOTSUP;
	io->status = 0;
	io->n_extents = 0;
	return 0;
}

int xnbd_backend_submit(struct xnbd_backend *b, struct xnbd_io *io)
{
	int r = check_io(b, io);
	if (r < 0)
		return r;
	r = b->ops->submit(b, io);
	if (r == XNBD_IO_PENDING)
		b->in_flight++;
	return r;
}

int xnbd__backend_submit_pipe(struct xnbd_backend *b, struct xnbd_io *io,
                              int pipe_fd)
{
	if (!b->ops->write_pipe || io->type != XNBD_IO_WRITE || pipe_fd < 0 ||
	    (b->ops->pipe_ok && !b->ops->pipe_ok(b, io->offset, io->length)))
		return -EOPNOTSUPP;
	int r = check_io(b, io);
	if (r < 0)
		return r;
	r = b->ops->write_pipe(b, io, pipe_fd);
	if (r == XNBD_IO_PENDING)
		b->in_flight++;
	return r;
}

void xnbd__io_complete(struct xnbd_backend *b, struct xnbd_io *io)
{
	b->in_flight--;
	io->done(io);
}

int xnbd_backend_snapshot(struct xnbd_backend *b, const char *path,
                          xnbd_snapshot_cb cb, void *user_data)
{
	if (!b->ops->snapshot)
		return -ENOTSUP;
	return b->ops->snapshot(b, path, cb, user_data);
}

void xnbd_backend_snapshot_cancel(struct xnbd_backend *b)
{
	if (b->ops->snapshot_cancel)
		b->ops->snapshot_cancel(b);
}

int xnbd_backend_snapshot_running(const struct xnbd_backend *b)
{
	return b->ops->snapshot_running ? b->ops->snapshot_running(b) : 0;
}

void xnbd_backend_free(struct xnbd_backend *b)
{
	if (b)
		b->ops->free(b);
}

int xnbd__is_zero(const void *p, size_t n)
{
	const unsigned char *c = p;
	/* Check a short head byte by byte, then compare the buffer with itself
	 * shifted by 16 bytes: memcmp is vectorised and stops at the first
	 * difference. */
	size_t head = n < 16 ? n : 16;
	for (size_t i = 0; i < head; i++)
		if (c[i])
			return 0;
	return n <= 16 || memcmp(c, c + 16, n - 16) == 0;
}
