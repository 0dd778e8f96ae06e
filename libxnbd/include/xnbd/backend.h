/* xnbd/backend.h - asynchronous image backends.
 *
 * A backend is an image: a size, a set of capabilities, and an I/O
 * submission call that completes later through a callback.  All calls are
 * made on the thread that runs the backend's uv_loop_t.
 *
 * struct xnbd_io is public, as libuv's requests are: a caller embeds it in
 * its own request structure and pays no allocation per I/O.  The fields
 * under "set by the caller" are read by the backend; `status`,
 * `n_extents` and the `priv` area are written by it.
 */
#ifndef XNBD_BACKEND_H
#define XNBD_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "xnbd/common.h"
#include "xnbd/protocol.h"

#ifdef __cplusplus
extern "C" {
#endif

struct xnbd_backend;
struct xnbd_io;

enum xnbd_io_type {
	XNBD_IO_READ = 0,
	XNBD_IO_WRITE,
	XNBD_IO_FLUSH,
	XNBD_IO_TRIM,
	XNBD_IO_ZERO,         /* write zeroes */
	XNBD_IO_CACHE,        /* prefetch; no data returned */
	XNBD_IO_BLOCK_STATUS, /* allocation extents of the range */
};

/* Flags of struct xnbd_io. */
#define XNBD_IO_FUA (1U << 0)       /* durable before completion */
#define XNBD_IO_NO_HOLE (1U << 1)   /* ZERO: keep the range allocated */
#define XNBD_IO_FAST_ZERO (1U << 2) /* ZERO: fail with -ENOTSUP unless fast */
/* BLOCK_STATUS: describe which blocks a caching backend holds
 * (XNBD_STATE_CACHED) instead of their allocation. */
#define XNBD_IO_STATUS_CACHED (1U << 3)

/* Capabilities of a backend (xnbd_backend_caps()). */
#define XNBD_CAP_READ_ONLY (1U << 0)
#define XNBD_CAP_FLUSH (1U << 1)
#define XNBD_CAP_FUA (1U << 2)
#define XNBD_CAP_TRIM (1U << 3)
#define XNBD_CAP_ZERO (1U << 4)
#define XNBD_CAP_FAST_ZERO (1U << 5)
#define XNBD_CAP_CACHE (1U << 6)
#define XNBD_CAP_BLOCK_STATUS (1U << 7)
/* All connections see one another's writes at once, and a flush on one
 * makes everything durable (NBD_FLAG_CAN_MULTI_CONN). */
#define XNBD_CAP_MULTI_CONN (1U << 8)
/* BLOCK_STATUS takes XNBD_IO_STATUS_CACHED (a proxy's cache map). */
#define XNBD_CAP_CACHE_STATUS (1U << 9)

/* One extent of a BLOCK_STATUS result; flags are XNBD_STATE_* of
 * xnbd/protocol.h (base:allocation). */
struct xnbd_extent {
	uint64_t length;
	uint32_t flags;
};

typedef void (*xnbd_io_cb)(struct xnbd_io *io);

struct xnbd_io {
	/* Set by the caller. */
	uint32_t type;  /* enum xnbd_io_type */
	uint32_t flags; /* XNBD_IO_* */
	uint64_t offset;
	uint64_t length;
	void *buf;                   /* READ: filled; WRITE: the data */
	struct xnbd_extent *extents; /* BLOCK_STATUS: room for max_extents */
	uint32_t max_extents;
	uint32_t n_extents; /* BLOCK_STATUS: set by the backend, >= 1 */
	xnbd_io_cb done;
	void *user_data;
	/* Set by the backend before `done` runs: 0 or a negative errno. */
	int status;
	/* Owned by the backend between submission and completion. */
	struct {
		union {
			uv_work_t work; /* unused: keeps the layout of 0.1.0 */
			struct {
				void *next;
				void *chan;
			} q;
		} u;
		void *a;
		void *b;
		uint64_t done_bytes;
		uint64_t scratch;
	} priv;
};

/* Values returned by xnbd_backend_submit() besides negative errnos. */
#define XNBD_IO_PENDING 0 /* `done` will be called later */
#define XNBD_IO_COMPLETED \
	1 /* finished inline: io->status holds the result
                               and `done` is not called */

/* Flags of xnbd_backend_file_open(). */
#define XNBD_OPEN_READONLY (1U << 0) /* open and serve read-only */

/* Open a regular file or block device as an image.
 *
 * path: the image; flags: XNBD_OPEN_* below.  On success *out owns an open
 * file descriptor and must be freed with xnbd_backend_free().  Returns 0,
 * or -ENOENT, -EACCES, -EISDIR, -EINVAL (not a file or block device),
 * -ENOMEM, or another negative errno from open(2)/fstat(2).
 *
 * Small writes may be made on the loop thread.  Those that would pass the
 * file size limit (RLIMIT_FSIZE) the process has when the backend is
 * opened never are; a program that lowers the limit later should ignore
 * SIGXFSZ, as xnbd-server does, or the signal may end it.
 */
XNBD_EXPORT int xnbd_backend_file_open(uv_loop_t *loop, const char *path,
                                       unsigned flags,
                                       struct xnbd_backend **out);

/* Granularity of the copy-on-write layer, in bytes. */
#define XNBD_COW_BLOCK 4096U

/* Flags of xnbd_backend_cow_new(). */
/* `path` is a directory: the overlay is an unlinked file in it, gone when
 * the backend is freed or the process dies, however it dies. */
#define XNBD_COW_TEMPORARY (1U << 0)

/* Put a copy-on-write layer over `lower`: reads come from the overlay where
 * it holds a block and from `lower` elsewhere; writes, zeroing and trims
 * go to the overlay only (a write covering part of a block first copies
 * the rest of the block up from `lower`), so `lower` is never written and
 * may be read-only.  After a trim or zeroing the blocks read as zeroes.
 * The overlay is `path` (created; it must not exist, and it is kept), or,
 * with XNBD_COW_TEMPORARY, an unlinked file in the directory `path`; a NULL
 * path then means $TMPDIR, or /var/tmp when that is unset.
 * `lower` is not owned: free it after the CoW backend.  Returns 0,
 * -EEXIST, -ENOTDIR (the default place is not a directory), -EINVAL,
 * -ENOMEM, or another negative errno from creating the overlay. */
XNBD_EXPORT int xnbd_backend_cow_new(uv_loop_t *loop,
                                     struct xnbd_backend *lower,
                                     const char *path, unsigned flags,
                                     struct xnbd_backend **out);

/* The directory xnbd_backend_cow_new() makes a temporary overlay in when
 * given no path: $TMPDIR when set and not empty, else /var/tmp (for
 * messages that name it). */
XNBD_EXPORT const char *xnbd_backend_cow_default_dir(void);

/* Size of the image in bytes. */
XNBD_EXPORT uint64_t xnbd_backend_size(const struct xnbd_backend *b);

/* Capabilities, XNBD_CAP_*. */
XNBD_EXPORT unsigned xnbd_backend_caps(const struct xnbd_backend *b);

/* Submit an I/O.  The range must lie within the image (else -EINVAL, or
 * -ENOSPC for writes).  Returns XNBD_IO_PENDING (the callback runs later on
 * the loop thread), XNBD_IO_COMPLETED (done inline; no callback), or a
 * negative errno (-EINVAL, -EPERM on a read-only backend, -ENOTSUP for an
 * operation the backend lacks), in which case the callback never runs. */
XNBD_EXPORT int xnbd_backend_submit(struct xnbd_backend *b, struct xnbd_io *io);

/* Number of I/Os submitted and not yet completed. */
XNBD_EXPORT size_t xnbd_backend_in_flight(const struct xnbd_backend *b);

typedef void (*xnbd_snapshot_cb)(struct xnbd_backend *b, int status,
                                 const char *path, void *user_data);

/* Start a point-in-time copy of the image into a new file at `path`.
 *
 * The copy holds the image as it was when this call returned: writes
 * submitted afterwards are not in it.  Clients are not stalled for the
 * length of the copy: a reflink is tried first, and otherwise blocks are
 * copied in the background, each block a write is about to change being
 * copied first.  The file appears at `path` only once complete (written to
 * a temporary name, synced, then renamed).  cb runs on the loop thread with
 * 0 or a negative errno.  Returns 0, -EBUSY while a snapshot runs,
 * -EEXIST if path exists, -ENOTSUP for backends that cannot, or another
 * negative errno; on error cb is never called. */
XNBD_EXPORT int xnbd_backend_snapshot(struct xnbd_backend *b, const char *path,
                                      xnbd_snapshot_cb cb, void *user_data);

/* Is a snapshot still being written? */
XNBD_EXPORT int xnbd_backend_snapshot_running(const struct xnbd_backend *b);

/* Ask a running snapshot to stop; its callback then runs (later, on the
 * loop thread) with -ECANCELED and its temporary file is removed.  Does
 * nothing when no snapshot runs. */
XNBD_EXPORT void xnbd_backend_snapshot_cancel(struct xnbd_backend *b);

/* Free a backend.  No I/O and no snapshot may be running: wait for their
 * callbacks first.  Closes the image.  Accepts NULL. */
XNBD_EXPORT void xnbd_backend_free(struct xnbd_backend *b);

#ifdef __cplusplus
}
#endif

#endif
