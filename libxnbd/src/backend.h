/* backend.h - what every backend implementation shares (private).
 *
 * Notes on the design: the public entry points in backend.c check the
 * request against the image (range, read-only, capabilities) and count
 * I/Os in flight; an implementation only does the I/O.  It finishes an I/O
 * either inline (returning XNBD_IO_COMPLETED with io->status set) or later
 * through xnbd__io_complete() on the loop thread.  Stacked backends (CoW,
 * proxy) hold their lower backend and submit to it as any caller would.
 */
#ifndef XNBD_BACKEND_PRIV_H
#define XNBD_BACKEND_PRIV_H

#include <errno.h>
#include <stdbool.h>

#include "xnbd/backend.h"

struct xnbd__backend_ops {
	const char *name;
	int (*submit)(struct xnbd_backend *b, struct xnbd_io *io);
	int (*snapshot)(struct xnbd_backend *b, const char *path,
	                xnbd_snapshot_cb cb, void *ud);
	void (*snapshot_cancel)(struct xnbd_backend *b);
	int (*snapshot_running)(const struct xnbd_backend *b);
	/* Stop waiting: requests held for something that may never come (a
	 * proxy's lost upstream) fail now, and later ones fail instead of
	 * waiting.  The server calls it when a shutdown's grace period is
	 * over, so a stop always ends.  Completes nothing inside the call
	 * (what fails, fails from the loop).  Optional. */
	void (*abort)(struct xnbd_backend *b);
	/* May a READ of [off, off+len) be sent straight from a descriptor, now,
	 * without the loop thread waiting on a disk (the range is in the page
	 * cache)?  Then set *fd and *fd_off and return 0: the server sends the
	 * bytes later, from the loop thread, with sendfile().  The descriptor
	 * stays open as long as the backend.  Any other answer means "read it
	 * through submit".  Optional.  The range is within the image. */
	int (*read_fd)(struct xnbd_backend *b, uint64_t off, uint64_t len,
	               int *fd, uint64_t *fd_off);
	/* A WRITE whose data is in a pipe, not in io->buf: the pipe (its
	 * non-blocking read end, pipe_fd) holds exactly io->length bytes,
	 * which the backend moves into the image with splice() (one copy, no
	 * pass through user space).  io->buf points at io->length bytes the
	 * backend may use to copy through where splice cannot.  The pipe is
	 * the caller's and stays open until the I/O completes; it is empty
	 * after a success.  Returns as submit.  Optional: stacked backends
	 * need the bytes in memory. */
	int (*write_pipe)(struct xnbd_backend *b, struct xnbd_io *io,
	                  int pipe_fd);
	/* Does write_pipe take a WRITE of [off, off+len)?  Optional: without
	 * it, every range.  (A CoW layer takes whole blocks only: a partial
	 * block needs its bytes merged with the layer below.) */
	bool (*pipe_ok)(const struct xnbd_backend *b, uint64_t off,
	                uint64_t len);
	void (*free)(struct xnbd_backend *b);
};

struct xnbd_backend {
	const struct xnbd__backend_ops *ops;
	uv_loop_t *loop;
	uint64_t size;
	unsigned caps;
	size_t in_flight;
};

static inline void xnbd__backend_abort(struct xnbd_backend *b)
{
	if (b && b->ops->abort)
		b->ops->abort(b);
}

static inline int xnbd__backend_read_fd(struct xnbd_backend *b, uint64_t off,
                                        uint64_t len, int *fd, uint64_t *fd_off)
{
	if (!b->ops->read_fd || len == 0)
		return -EOPNOTSUPP;
	return b->ops->read_fd(b, off, len, fd, fd_off);
}

/* Can a WRITE of [off, off+len) be submitted from a pipe
 * (xnbd__backend_submit_pipe)? */
static inline bool xnbd__backend_takes_pipe(const struct xnbd_backend *b,
                                            uint64_t off, uint64_t len)
{
	return b->ops->write_pipe && !(b->caps & XNBD_CAP_READ_ONLY) &&
	       (!b->ops->pipe_ok || b->ops->pipe_ok(b, off, len));
}

/* xnbd_backend_submit() for a WRITE whose data is in a pipe (see
 * write_pipe above); -EOPNOTSUPP when the backend cannot take it. */
int xnbd__backend_submit_pipe(struct xnbd_backend *b, struct xnbd_io *io,
                              int pipe_fd);

/* pread all of [off, off+len) of fd into buf, across short reads and
 * EINTR: 0, -ENODATA if the file ends first, or a negative errno. */
int xnbd__pread_full(int fd, void *buf, uint64_t len, uint64_t off);

/* Is every page of [off, off+len) of fd in the page cache?  1 or 0, or a
 * negative errno (-ENOSYS before Linux 6.5). */
int xnbd__fd_cached(int fd, uint64_t off, uint64_t len);

/* Tests: where a file backend's small writes may go.  lane_only keeps
 * them all on the write lane; an inline one that takes stall_ns or more
 * counts as a stall (see write_here in backend_file.c; the default is
 * 10 ms). */
void xnbd__file_write_place(struct xnbd_backend *b, bool lane_only,
                            uint64_t stall_ns);

/* Tests: how many writes a file backend made in pieces (WRITE_PIECE). */
uint64_t xnbd__file_pieced_writes(const struct xnbd_backend *b);

/* Flag of xnbd__backend_file_from_fd: before a write into a chunk of
 * ALLOC_CHUNK bytes that no write touched yet, allocate that chunk, and
 * more ahead along a sequential run (fallocate), so that writes into
 * holes of a sparse file find blocks allocated (see alloc_ahead in
 * backend_file.c).  For files of ours that fill up: a CoW overlay, a
 * proxy's cache. */
#define XNBD__OPEN_ALLOC_AHEAD (1U << 16)

/* Tests: how many chunks a file backend allocated ahead. */
uint64_t xnbd__file_chunks_allocated(const struct xnbd_backend *b);

/* Tests: how many I/Os a file backend's write lane has taken. */
uint64_t xnbd__file_lane_ios(const struct xnbd_backend *b);
/* Writes a file backend sent through its io_uring (tests). */
uint64_t xnbd__file_ring_ios(const struct xnbd_backend *b);

/* Payload bytes an NBD client copied out of its receive buffer, rather
 * than reading them straight into the request's (tests). */
struct xnbd_client;
uint64_t xnbd__client_copied(const struct xnbd_client *c);

/* Ops a CoW layer took from malloc so far (tests: a warm layer takes none
 * for a request). */
uint64_t xnbd__cow_op_allocs(const struct xnbd_backend *b);

/* Ops, edge blocks and early-reply copies a proxy took from malloc so far
 * (tests: a warm proxy takes none for a request at a time). */
uint64_t xnbd__proxy_allocs(const struct xnbd_backend *b);
/* Whether a proxy has requests or the stores of early answers under way. */
bool xnbd__proxy_busy(const struct xnbd_backend *b);

/* A file backend over an open descriptor, which it takes over on success
 * (flags: XNBD_OPEN_* and XNBD__OPEN_ALLOC_AHEAD). */
int xnbd__backend_file_from_fd(uv_loop_t *loop, int fd, unsigned flags,
                               struct xnbd_backend **out);

/* A second backend over the same regular file as the file backend b,
 * opened with O_DIRECT, for large writes past the page cache (a proxy's
 * stores).  It shares b's allocation ahead (XNBD__OPEN_ALLOC_AHEAD), so
 * that neither allocates what the other did.  Either may be freed first.
 * Returns 0, -EINVAL (b is no file backend over a regular file), or a
 * negative errno from open(2) (-EINVAL where the file system refuses
 * O_DIRECT). */
int xnbd__backend_file_direct_twin(struct xnbd_backend *b,
                                   struct xnbd_backend **out);

/* Finish an I/O that was XNBD_IO_PENDING: set io->status first. */
void xnbd__io_complete(struct xnbd_backend *b, struct xnbd_io *io);

/* Is the whole buffer zero?  Fast on data that is not. */
int xnbd__is_zero(const void *p, size_t n);

/* Does the file open at fd start with a valid xNBD bitmap header?  (Read
 * with pread; a short file is not.) */
bool xnbd__bitmap_file_is_ours(int fd);

/* Room inside a proxy for the state of its control commands. */
struct xnbd_proxy;
struct xnbd__proxy_ctl_area {
	void *p[4];
};
struct xnbd__proxy_ctl_area *xnbd__proxy_ctl_area(struct xnbd_proxy *p);

#endif
