/* backend_file.c - a plain image: a regular file or a block device.
 *
 * Notes on the design:
 * - Only positional I/O (preadv2/pwritev2): many connections and worker
 *   threads share one descriptor, and no file offset is ever shared state.
 * - The loop thread never waits on a disk.  Reads, and writes without FUA,
 *   are first tried with RWF_NOWAIT, which the kernel serves from the page
 *   cache or refuses with EAGAIN; whatever is left goes to the worker pool
 *   (pool.h: libxnbd's own, not libuv's, whose completion signal spins).
 *   Small writes where the file system has no RWF_NOWAIT writes (ext4,
 *   tmpfs), and spliced ones, are made on the loop thread, and a stall
 *   sends them away for a while (write_here); the rest, and large writes
 *   from a buffer, go to the write lane, the pool's serial queue (see
 *   lane_takes).
 *   Flushes, FUA writes, trims, zeroing and extent queries always go to
 *   the pool.
 * - Reads the server may send straight from the descriptor (sendfile, no
 *   copy through user space) are those cachestat(2) finds wholly in the
 *   page cache: sendfile cannot be told not to wait for a disk, and the
 *   loop thread must not.  Where cachestat is missing (Linux before 6.5)
 *   or refused, every read goes through submit as before.
 * - Large writes may come in a pipe the server spliced from the socket
 *   (write_pipe): the pipe is spliced into the file, so the data is
 *   copied once, into the page cache, never through user space.  Where
 *   the file refuses splice, the pipe is read into the request's buffer
 *   and written as usual.  The splice is made on the loop thread where a
 *   small write would be (since 2026-12-06: the lane's hand-offs cost a
 *   tenth of the CPU and bought no speed), else on the lane.
 * - Writes to a descriptor opened with O_DIRECT (a proxy's stores into
 *   its cache) go to the kernel through an io_uring of the backend's own
 *   where liburing was built in and the kernel lets one be made: the
 *   kernel starts the write at once and posts its completion to the
 *   channel's eventfd, so that no worker is woken and none wakes the
 *   loop (see ring_take).  Where a write cannot go that way it goes to
 *   the pool as before.
 * - Snapshots: a reflink (FICLONE) where the file system has one, else a
 *   copy-before-write.  While a copy runs every write goes through the
 *   pool, and before it changes a chunk that the copier has not reached it
 *   copies that chunk's old contents into the snapshot first.  Chunk state
 *   (pending, copying, done) sits under one mutex, so a chunk is copied
 *   exactly once and never after a write touched it.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifdef XNBD_HAVE_URING
#include <liburing.h>
#endif

#include "backend.h"
#include "list.h"
#include "pool.h"

#define SNAP_CHUNK (1024U * 1024U)
#define ALLOC_CHUNK (1024U * 1024U)        /* see alloc_ahead */
#define ALLOC_MARGIN (64ULL * ALLOC_CHUNK) /* free space it never takes */
#define ALLOC_SPAN_MAX 32U /* chunks one fallocate takes at most */
#define EXT4_MAGIC 0xEF53
#define XFS_MAGIC 0x58465342
/* Largest I/O from a buffer tried on the loop thread (a spliced write of
 * any size may be made there: file_write_pipe). */
#define INLINE_MAX (128U * 1024U)
#define SNAPSHOT_DONE 0xffffffffU /* io type of a snapshot's end */
#define RING_DEPTH 256U           /* entries of a backend's io_uring */

/* Where small and spliced writes run (file_submit, file_write_pipe): on
 * the loop thread.  An inline
 * write that took PLACE_STALL_NS or more sends the writes to the lane for
 * a hold that starts at PLACE_HOLD_MIN_NS and doubles, up to
 * PLACE_HOLD_MAX_NS, while the stalls keep coming. */
#define MS_NS (1000U * 1000U)
#define PLACE_STALL_NS (10U * MS_NS)
#define PLACE_HOLD_MIN_NS (1000ULL * MS_NS)
#define PLACE_HOLD_MAX_NS (64000ULL * MS_NS)

enum { CHUNK_PENDING = 0, CHUNK_COPYING = 1, CHUNK_DONE = 2 };

struct snapshot {
	struct file_backend *fb;
	int fd;
	char *path;
	char *tmp_path;
	uint64_t nchunks;
	uint8_t *state;
	uint64_t ndone;    /* chunks DONE, under mu */
	uint64_t ncopying; /* chunks COPYING, under mu */
	bool stopped;      /* no new copies may start, under mu */
	bool cloning;      /* a reflink is being tried, under mu */
	atomic_int cancel;
	int status;
	unsigned users; /* loop thread: the copier plus writes holding it */
	int go;         /* under mu: 1 the copier may start, -1 it must not */
	uv_mutex_t mu;
	uv_cond_t cond;
	/* The copier's end, handed to the loop through the backend's channel
	 * (type SNAPSHOT_DONE). */
	struct xnbd_io done_io;
	xnbd_snapshot_cb cb;
	void *ud;
};

/* The chunks of a file allocated ahead (alloc_ahead): a bit per
 * ALLOC_CHUNK, set once a write allocated the chunk (or found it could
 * not).  One per file, shared by the backends that write it (a proxy's
 * cache, buffered and direct), so that neither allocates what the other
 * did: fallocate waits for every direct write in flight to the file. */
struct alloc_map {
	atomic_uint refs;
	atomic_bool ok; /* cleared for good once the file system refused */
	atomic_uint_fast64_t allocated; /* chunks fallocated (tests) */
	uint64_t nchunks;
	_Atomic uint64_t bits[];
};

static struct alloc_map *alloc_map_new(uint64_t size)
{
	uint64_t nchunks = (size + ALLOC_CHUNK - 1) / ALLOC_CHUNK;
	struct alloc_map *m =
	    calloc(1, sizeof(*m) + (nchunks + 63) / 64 * sizeof(m->bits[0]));
	if (!m)
		return NULL;
	atomic_init(&m->refs, 1);
	atomic_init(&m->ok, true);
	atomic_init(&m->allocated, 0);
	m->nchunks = nchunks;
	return m;
}

static void alloc_map_unref(struct alloc_map *m)
{
	if (m && atomic_fetch_sub(&m->refs, 1) == 1)
		free(m);
}

struct file_backend {
	struct xnbd_backend base;
	int fd;
	bool blockdev;
	/* Writes go on the lane: a regular file, buffered (direct I/O to a
	 * file is not serialised the same way, and gains from depth). */
	bool use_lane;
	/* Largest piece of a write into pages not cached: WRITE_PIECE where
	 * the page cache takes it, no limit with O_DIRECT (write_piece). */
	uint64_t piece;
	atomic_uint_fast64_t pieced; /* writes made in pieces (tests) */
	atomic_bool nowait_read;
	atomic_bool nowait_write;
	atomic_bool punch_ok;
	atomic_bool zero_range_ok;
	atomic_bool cachestat_ok; /* cachestat may be asked (range_cached) */
	/* XNBD__OPEN_ALLOC_AHEAD: which chunks are allocated (alloc_ahead);
	 * NULL without.  Shared with a direct twin of the same file. */
	struct alloc_map *alloc;
	struct snapshot *snap; /* running snapshot, loop thread only */
	struct { /* where small writes run (write_here); loop thread only */
		/* Writes, trims and zeroings on the lane or the pool, not yet
		 * completed: they may hold the inode's lock. */
		unsigned writes_out;
		uint64_t hold_until, hold_ns;
		uint64_t fsize_limit; /* RLIMIT_FSIZE at the open: no inline
		                         write past it (SIGXFSZ) */
		uint64_t stall_ns;    /* PLACE_STALL_NS but in tests */
		/* The clock that times inline writes (place_now): the coarse
		 * one where its tick is well under stall_ns, else the precise
		 * one. */
		clockid_t clock;
		bool lane_only;    /* tests */
		uint64_t lane_ios; /* I/Os the lane took (tests) */
		/* When a buffered write off the loop thread last took stall_ns
		 * or more (0: never), on the same clock; set by the workers. */
		atomic_uint_fast64_t stalled_at;
	} place;
	/* Pool work comes back through it; writes take its serial queue,
	 * the write lane (see lane_takes). */
	struct xnbd__chan chan;
#ifdef XNBD_HAVE_URING
	struct { /* direct writes through io_uring (ring_take); loop thread */
		struct io_uring ring;
		bool tried, ok;
		unsigned gen;      /* xnbd__fork_generation() when made */
		unsigned inflight; /* submitted, completion not reaped */
	} uring;
#endif
	uint64_t ring_ios; /* I/Os that went through the ring (tests) */
};

static const unsigned char zero_chunk[64 * 1024];

/* ---- blocking helpers, run on worker threads ----------------------------- */

int xnbd__pread_full(int fd, void *buf, uint64_t len, uint64_t off)
{
	uint8_t *p = buf;
	while (len) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ENODATA; /* the image shrank under us */
		p += n;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

static int full_pread(int fd, void *buf, uint64_t len, uint64_t off)
{
	int r = xnbd__pread_full(fd, buf, len, off);
	return r == -ENODATA ? -EIO : r;
}

/* Buffered writes into pages not all cached go to the file in pieces of
 * at most WRITE_PIECE bytes (write_piece).  A larger write into pages not
 * yet cached makes the file system
 * allocate large folios (ext4 since Linux 6.16), and on a virtual machine
 * that hands free memory back to its host (free page reporting, as
 * Firecracker's balloon does), large free blocks are the ones handed
 * back: the first touch of each page faults on the host.  Measured on
 * 2026-12-04's VM, one fio thread writing a new 1 GiB file after a pause
 * of a few seconds: 1 MiB writes 316 to 392 MiB/s, 256 KiB 762, 128 KiB
 * 1465, 64 KiB 4472 to 5095, 32 KiB 3459; into pages already cached, 64
 * KiB and 1 MiB pieces made the same (4356 to 4706 MiB/s).  It is what
 * made a CoW overlay's and a proxy cache's 1 MiB sequential writes crawl
 * (833 and 336 MiB/s, the CPU all in copy_folio_from_iter_atomic).  After
 * a drop of the page cache and 8 s, CoW 1 MiB writes at depth 8 made 1296
 * to 3021 MiB/s in pieces against 564 to 785 whole.  Only writes into
 * pages not all cached are cut (write_piece): into cached ones, splicing
 * 1 MiB in 16 pieces cost xnbd-server a quarter more CPU. */
#define WRITE_PIECE (64U * 1024U)

/* Write len bytes at off, in pieces of at most piece bytes unless rwf
 * asks for a sync (each piece would sync on its own). */
static int full_pwrite(int fd, const void *buf, uint64_t len, uint64_t off,
                       int rwf, uint64_t piece)
{
	const uint8_t *p = buf;
	while (len) {
		struct iovec iov = {(void *)p,
		                    rwf || len <= piece ? len : piece};
		ssize_t n = pwritev2(fd, &iov, 1, (off_t)off, rwf);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (rwf && errno == EOPNOTSUPP) {
				/* RWF_DSYNC unknown here: write, then sync. */
				int r = full_pwrite(fd, p, len, off, 0, piece);
				return r ? r : (fdatasync(fd) ? -errno : 0);
			}
			return -errno;
		}
		p += n;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

/* xnbd__fd_cached on the image: 1, 0, or a negative errno; cachestat
 * refused once for good is not asked again.  Any thread. */
static int range_cached(struct file_backend *fb, uint64_t off, uint64_t len)
{
	if (!atomic_load_explicit(&fb->cachestat_ok, memory_order_relaxed))
		return -EOPNOTSUPP;
	int r = xnbd__fd_cached(fb->fd, off, len);
	/* ENOSYS: an older kernel; EPERM: since Linux 6.14 only for files the
	 * caller may write or owns.  Neither changes later. */
	if (r == -ENOSYS || r == -EPERM || r == -EOPNOTSUPP || r == -EINVAL)
		atomic_store_explicit(&fb->cachestat_ok, false,
		                      memory_order_relaxed);
	return r;
}

/* The piece size for a buffered write of len bytes at off: WRITE_PIECE
 * where some of its pages are not cached, so that their folios are made
 * small; whole where they all are (their folios exist), and where
 * cachestat cannot tell. */
static uint64_t write_piece(struct file_backend *fb, uint64_t off, uint64_t len)
{
	if (len <= fb->piece || range_cached(fb, off, len) != 0)
		return UINT64_MAX;
	atomic_fetch_add_explicit(&fb->pieced, 1, memory_order_relaxed);
	return fb->piece;
}

/* Writes into holes of a sparse file cost the file system more than
 * writes into blocks allocated beforehand: each new block of a buffered
 * write is reserved one by one (delayed allocation, in ext4 and XFS) and
 * allocated at writeback, and a direct write into a hole takes the inode's
 * lock for itself (ext4) and holds it until the disk has the data, so
 * such writes go one at a time.  A backend opened with
 * XNBD__OPEN_ALLOC_AHEAD on ext4 or XFS allocates the file ahead of its
 * writes with fallocate(), in chunks of ALLOC_CHUNK: the blocks come as
 * unwritten extents, and writes into them only mark what they wrote.
 * Measured through a cold proxy on 2026-12-04's VM: a 70/30 mix of 4 KiB
 * requests at depth 32 made 85k to 95k against 74k to 80k requests per
 * server CPU-second, and 1 MiB sequential writes took a fifth less server
 * CPU.
 *
 * A write into a chunk not allocated yet allocates the chunks it touches,
 * and as many more ahead as the allocated run that ends right before it
 * holds, up to ALLOC_SPAN_MAX: a writer that goes on sequentially
 * allocates 1, 1, 2, 4, ... chunks at a time, one that jumps about one.
 * That counts for direct writes (a proxy's stores), since fallocate waits
 * for every direct write in flight to the file: a chunk at a time, a cold
 * copy through the proxy stalled its stores every 1 MiB (2026-12-05: 773
 * to 799 MiB/s, against 755 to 821 with no allocation and 1002 to 1161
 * with the whole cache allocated beforehand; doc/design.md).
 *
 * For files that fill up anyway (a CoW overlay, a proxy's cache): at most
 * the chunks a write touched, or as many as were allocated right before
 * them, are allocated and not yet written; never for the user's images,
 * whose holes are theirs; never on tmpfs, where an allocated block is
 * memory.  It must never make a write fail that would have succeeded:
 * chunks are allocated only while the file system keeps ALLOC_MARGIN free
 * besides, and a fallocate refused for space or quota (which may keep what
 * it got) is the last.  Any thread: a chunk's bit is set atomically, by
 * the one write that allocates it. */
static bool chunk_set(struct alloc_map *m, uint64_t c)
{
	return atomic_load_explicit(&m->bits[c / 64], memory_order_relaxed) &
	       (1ULL << (c % 64));
}

/* Set chunk c's bit; true if this call set it. */
static bool chunk_claim(struct alloc_map *m, uint64_t c)
{
	uint64_t bit = 1ULL << (c % 64);
	return !(atomic_fetch_or_explicit(&m->bits[c / 64], bit,
	                                  memory_order_relaxed) &
	         bit);
}

static bool alloc_pending(struct file_backend *fb, uint64_t off, uint64_t len)
{
	struct alloc_map *m = fb->alloc;
	if (!m || !len || !atomic_load_explicit(&m->ok, memory_order_relaxed))
		return false;
	for (uint64_t c = off / ALLOC_CHUNK; c <= (off + len - 1) / ALLOC_CHUNK;
	     c++)
		if (!chunk_set(m, c))
			return true;
	return false;
}

static void alloc_ahead(struct file_backend *fb, uint64_t off, uint64_t len)
{
	if (!alloc_pending(fb, off, len))
		return;
	struct alloc_map *m = fb->alloc;
	uint64_t last = (off + len - 1) / ALLOC_CHUNK;
	for (uint64_t c = off / ALLOC_CHUNK; c <= last; c++) {
		if (!chunk_claim(m, c))
			continue; /* allocated, or being allocated */
		struct statvfs vs;
		if (fstatvfs(fb->fd, &vs) != 0)
			continue; /* this chunk's writes allocate as they go */
		uint64_t avail = (uint64_t)vs.f_bavail * vs.f_frsize;
		if (avail < ALLOC_MARGIN + ALLOC_CHUNK)
			continue;
		uint64_t room = (avail - ALLOC_MARGIN) / ALLOC_CHUNK;
		uint64_t run = 0;
		while (run < ALLOC_SPAN_MAX && run < c &&
		       chunk_set(m, c - 1 - run))
			run++;
		uint64_t want = last - c + 1 > run ? last - c + 1 : run;
		if (want > ALLOC_SPAN_MAX)
			want = ALLOC_SPAN_MAX;
		if (want > room)
			want = room;
		uint64_t n = 1;
		while (n < want && c + n < m->nchunks && chunk_claim(m, c + n))
			n++;
		uint64_t start = c * ALLOC_CHUNK;
		uint64_t bytes = n * ALLOC_CHUNK;
		if (bytes > fb->base.size - start)
			bytes = fb->base.size - start;
		/* Only holes are allocated, and never past the size. */
		if (fallocate(fb->fd, FALLOC_FL_KEEP_SIZE, (off_t)start,
		              (off_t)bytes) == 0)
			atomic_fetch_add_explicit(&m->allocated, n,
			                          memory_order_relaxed);
		else if (errno != EINTR)
			atomic_store_explicit(&m->ok, false,
			                      memory_order_relaxed);
		c += n - 1;
	}
}

/* Move len bytes from a non-blocking pipe holding them into fd at off,
 * at most piece bytes a call (see WRITE_PIECE); bounce (len bytes) is for
 * file systems that refuse splice. */
static int pipe_to_file(int fd, int pipe_fd, void *bounce, uint64_t len,
                        uint64_t off, uint64_t piece)
{
	while (len) {
		loff_t o = (loff_t)off;
		ssize_t n = splice(pipe_fd, NULL, fd, &o,
		                   len < piece ? len : piece, SPLICE_F_MOVE);
		if (n > 0) {
			off += (uint64_t)n;
			len -= (uint64_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0 || errno == EAGAIN)
			return -EIO; /* the pipe held less than it should */
		if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
			return -errno;
		/* No splice into this file: copy through the buffer. */
		uint8_t *p = bounce;
		for (uint64_t got = 0; got < len;) {
			ssize_t k = read(pipe_fd, p + got, len - got);
			if (k < 0 && errno == EINTR)
				continue;
			if (k <= 0)
				return -EIO;
			got += (uint64_t)k;
		}
		return full_pwrite(fd, p, len, off, 0, piece);
	}
	return 0;
}

static int copy_chunk(struct snapshot *s, uint64_t i, void *buf)
{
	uint64_t size = s->fb->base.size;
	uint64_t off = i * SNAP_CHUNK;
	uint64_t len = size - off < SNAP_CHUNK ? size - off : SNAP_CHUNK;
	int r = full_pread(s->fb->fd, buf, len, off);
	if (r)
		return r;
	/* The snapshot file starts sparse: skip zero chunks. */
	if (xnbd__is_zero(buf, len))
		return 0;
	return full_pwrite(s->fd, buf, len, off, 0, WRITE_PIECE);
}

/* Before a write changes [off, off+len), make sure the snapshot holds the
 * old contents of every chunk it touches. */
static void copy_before_write(struct snapshot *s, uint64_t off, uint64_t len)
{
	if (!s || len == 0)
		return;
	void *buf = NULL;
	uint64_t first = off / SNAP_CHUNK, last = (off + len - 1) / SNAP_CHUNK;
	for (uint64_t i = first; i <= last && i < s->nchunks; i++) {
		uv_mutex_lock(&s->mu);
		while (s->cloning || s->state[i] == CHUNK_COPYING)
			uv_cond_wait(&s->cond, &s->mu);
		if (s->state[i] == CHUNK_DONE || s->stopped) {
			uv_mutex_unlock(&s->mu);
			continue;
		}
		s->state[i] = CHUNK_COPYING;
		s->ncopying++;
		uv_mutex_unlock(&s->mu);

		if (!buf)
			buf = malloc(SNAP_CHUNK);
		int r = buf ? copy_chunk(s, i, buf) : -ENOMEM;

		uv_mutex_lock(&s->mu);
		if (r && !s->status)
			s->status = r;
		if (r)
			s->stopped = true;
		s->state[i] = CHUNK_DONE;
		s->ncopying--;
		s->ndone++;
		uv_cond_broadcast(&s->cond);
		uv_mutex_unlock(&s->mu);
	}
	free(buf);
}

static int do_zero(struct file_backend *fb, struct xnbd_io *io)
{
	off_t off = (off_t)io->offset, len = (off_t)io->length;
	if (!(io->flags & XNBD_IO_NO_HOLE) && atomic_load(&fb->punch_ok)) {
		if (fallocate(fb->fd,
		              FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off,
		              len) == 0)
			return 0;
		if (errno != EOPNOTSUPP)
			return -errno;
		atomic_store(&fb->punch_ok, false);
	}
	if (atomic_load(&fb->zero_range_ok)) {
		if (fallocate(fb->fd,
		              FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off,
		              len) == 0)
			return 0;
		if (errno != EOPNOTSUPP)
			return -errno;
		atomic_store(&fb->zero_range_ok, false);
	}
	if (io->flags & XNBD_IO_FAST_ZERO)
		return -ENOTSUP;
	uint64_t o = io->offset, left = io->length;
	while (left) {
		uint64_t n =
		    left < sizeof(zero_chunk) ? left : sizeof(zero_chunk);
		int r = full_pwrite(fb->fd, zero_chunk, n, o, 0, fb->piece);
		if (r)
			return r;
		o += n;
		left -= n;
	}
	return 0;
}

static int do_block_status(struct file_backend *fb, struct xnbd_io *io)
{
	uint64_t off = io->offset, end = io->offset + io->length;
	uint32_t n = 0;
	if (fb->blockdev) {
		io->extents[0] = (struct xnbd_extent){io->length, 0};
		io->n_extents = 1;
		return 0;
	}
	while (off < end && n < io->max_extents) {
		off_t data = lseek(fb->fd, (off_t)off, SEEK_DATA);
		uint64_t next;
		uint32_t flags;
		if (data < 0 && errno == ENXIO) {
			next = end; /* no data after off */
			flags = XNBD_STATE_HOLE | XNBD_STATE_ZERO;
		} else if (data < 0) {
			next = end; /* no hole support: all data */
			flags = 0;
		} else if ((uint64_t)data > off) {
			next = (uint64_t)data < end ? (uint64_t)data : end;
			flags = XNBD_STATE_HOLE | XNBD_STATE_ZERO;
		} else {
			off_t hole = lseek(fb->fd, (off_t)off, SEEK_HOLE);
			next = (hole < 0 || (uint64_t)hole > end)
			           ? end
			           : (uint64_t)hole;
			if (next <= off)
				next = end;
			flags = 0;
		}
		io->extents[n++] = (struct xnbd_extent){next - off, flags};
		off = next;
	}
	io->n_extents = n;
	return 0;
}

static int sync_if_fua(struct file_backend *fb, struct xnbd_io *io, int r)
{
	if (r == 0 && (io->flags & XNBD_IO_FUA) && fdatasync(fb->fd))
		return -errno;
	return r;
}

static uint64_t place_now(const struct file_backend *fb);

static void work_cb(struct xnbd_io *io)
{
	struct file_backend *fb = io->priv.a;
	struct snapshot *snap = io->priv.b;
	uint64_t done = io->priv.done_bytes;
	int r = 0;

	switch (io->type) {
	case XNBD_IO_READ:
		r = full_pread(fb->fd, (uint8_t *)io->buf + done,
		               io->length - done, io->offset + done);
		break;
	case XNBD_IO_WRITE: {
		copy_before_write(snap, io->offset, io->length);
		alloc_ahead(fb, io->offset + done, io->length - done);
		/* A buffered write without FUA that stalls here would have
		 * stalled the loop thread too (write_here): timed. */
		bool timed = fb->use_lane && !(io->flags & XNBD_IO_FUA);
		uint64_t t0 = timed ? place_now(fb) : 0;
		if (io->priv.scratch) { /* the data is in a pipe */
			r = pipe_to_file(
			    fb->fd, (int)(io->priv.scratch - 1), io->buf,
			    io->length, io->offset,
			    write_piece(fb, io->offset, io->length));
			r = sync_if_fua(fb, io, r);
		} else {
			r = full_pwrite(fb->fd, (uint8_t *)io->buf + done,
			                io->length - done, io->offset + done,
			                (io->flags & XNBD_IO_FUA) ? RWF_DSYNC
			                                          : 0,
			                write_piece(fb, io->offset + done,
			                            io->length - done));
		}
		if (timed) {
			uint64_t now = place_now(fb);
			if (now - t0 >= fb->place.stall_ns)
				atomic_store(&fb->place.stalled_at, now);
		}
		break;
	}
	case XNBD_IO_FLUSH:
		r = fdatasync(fb->fd) ? -errno : 0;
		break;
	case XNBD_IO_TRIM:
		copy_before_write(snap, io->offset, io->length);
		if (atomic_load(&fb->punch_ok) &&
		    fallocate(fb->fd,
		              FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		              (off_t)io->offset, (off_t)io->length) != 0) {
			/* Trimming is advisory: where it cannot be done, it is a no-op. */
			if (errno == EOPNOTSUPP)
				atomic_store(&fb->punch_ok, false);
			else
				r = -errno;
		}
		r = sync_if_fua(fb, io, r);
		break;
	case XNBD_IO_ZERO:
		copy_before_write(snap, io->offset, io->length);
		r = sync_if_fua(fb, io, do_zero(fb, io));
		break;
	case XNBD_IO_CACHE:
		r = -posix_fadvise(fb->fd, (off_t)io->offset, (off_t)io->length,
		                   POSIX_FADV_WILLNEED);
		break;
	case XNBD_IO_BLOCK_STATUS:
		r = do_block_status(fb, io);
		break;
	}
	io->status = r;
}

static void snapshot_unref(struct snapshot *s);
static void snapshot_done(struct snapshot *s);

/* Does io change the image (and take the inode's lock)? */
static bool is_write(const struct xnbd_io *io)
{
	return io->type == XNBD_IO_WRITE || io->type == XNBD_IO_TRIM ||
	       io->type == XNBD_IO_ZERO;
}

static void after_work_cb(struct xnbd_io *io)
{
	if (io->type == SNAPSHOT_DONE) {
		snapshot_done(xnbd_container_of(io, struct snapshot, done_io));
		return;
	}
	struct file_backend *fb = io->priv.a;
	if (io->priv.b)
		snapshot_unref(io->priv.b);
	if (is_write(io))
		fb->place.writes_out--;
	xnbd__io_complete(&fb->base, io);
}

static int queue_io(struct file_backend *fb, struct xnbd_io *io);

/* May the small write io, which the kernel would not take with RWF_NOWAIT,
 * be made on the loop thread, now?
 *
 * The lane saves the loop thread the write's time, and costs a hand-off
 * each way (a wake-up of the lane's worker while it sleeps, and of the
 * loop for the completion), and the write costs the lane's CPU what it
 * would cost the loop's.  Where writes are cheap beside the loop's other
 * work and stream in back to back, the overlap can pay (2026-12-03's
 * machine: writes alone 12% more IOPS on the lane, at a third more CPU a
 * write); where they are dear (ext4 on large folios, most of a write's
 * CPU in ext4_block_write_begin) or sparse among reads, it does not
 * (2026-12-04's: inline, 4 KiB writes at depth 32 made as many IOPS at
 * 1.3 to 1.6 times the requests per server CPU-second, and the 70/30 mix
 * as many or more; doc/design.md).  So they are made here.
 *
 * A write without RWF_NOWAIT can wait: on the dirty-page throttle, on a
 * journal, on a page it must read in.  The last is avoided (a write not
 * made of whole pages goes inline only when cachestat finds its pages
 * cached); the rest shows as a stall, which sends the writes to the lane
 * for a while.  No other write may be out on the lane or the pool: an
 * inline write never overtakes one queued before it on the lane, nor
 * waits on the inode's lock for one there (a large write can hold it
 * through the dirty-page throttle).  And no write past the file size
 * limit goes inline: SIGXFSZ would hit the loop thread (workers block
 * it). */
static bool write_here(struct file_backend *fb, const struct xnbd_io *io,
                       uint64_t now)
{
	if (fb->place.lane_only || now < fb->place.hold_until ||
	    fb->place.writes_out)
		return false;
	/* Writes still stall on the lane (the dirty-page throttle, most
	 * often): the hold lasts until they have not for PLACE_HOLD_MIN_NS. */
	uint64_t stalled = atomic_load(&fb->place.stalled_at);
	if (stalled && now < stalled + PLACE_HOLD_MIN_NS)
		return false;
	if (io->offset + io->length > fb->place.fsize_limit)
		return false;
	/* fallocate may wait for direct writes to the file (a proxy's stores)
	 * and for the journal: the loop thread leaves it to the lane. */
	if (alloc_pending(fb, io->offset, io->length))
		return false;
	uint64_t page = (uint64_t)getpagesize();
	if (((io->offset | io->length) & (page - 1)) &&
	    range_cached(fb, io->offset, io->length) != 1)
		return false;
	return true;
}

/* Nanoseconds on the clock that times inline writes.  A stall is 10 ms
 * or more, and CLOCK_MONOTONIC_COARSE (a tick of 4 ms on a kernel of HZ
 * 250) tells that well enough at a fifth of the precise clock's cost: two
 * readings a write were about 0.5% of the server's CPU in 4 KiB writes at
 * depth 32 (perf, 2026-12-05). */
static uint64_t place_now(const struct file_backend *fb)
{
	struct timespec t;
	if (clock_gettime(fb->place.clock, &t) < 0)
		return uv_hrtime();
	return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

/* Time inline writes on the coarse clock when its tick is at most half
 * of stall_ns (a write then counts as stalled after stall_ns, give or
 * take a tick), else on the precise one (tests ask for stalls of a
 * nanosecond).  Both count from the same start, so a hold set on one
 * clock holds on the other. */
static void place_clock(struct file_backend *fb)
{
	struct timespec r;
	fb->place.clock = CLOCK_MONOTONIC;
	if (clock_getres(CLOCK_MONOTONIC_COARSE, &r) == 0 &&
	    (uint64_t)r.tv_sec * 1000000000ULL + (uint64_t)r.tv_nsec <=
	        fb->place.stall_ns / 2)
		fb->place.clock = CLOCK_MONOTONIC_COARSE;
}

/* Make the write io on the loop thread (write_here said so), from its
 * buffer or, when pipe_fd >= 0, from the pipe holding its payload; t0 is
 * when write_here looked. */
static int write_inline(struct file_backend *fb, struct xnbd_io *io,
                        uint64_t t0, int pipe_fd)
{
	uint64_t done = io->priv.done_bytes;
	alloc_ahead(fb, io->offset + done, io->length - done);
	uint64_t piece = write_piece(fb, io->offset + done, io->length - done);
	io->status =
	    pipe_fd >= 0
	        ? pipe_to_file(fb->fd, pipe_fd, io->buf, io->length, io->offset,
	                       piece)
	        : full_pwrite(fb->fd, (uint8_t *)io->buf + done,
	                      io->length - done, io->offset + done, 0, piece);
	uint64_t now = place_now(fb);
	if (now - t0 >= fb->place.stall_ns) {
		/* A stall within the longest hold's time from the end of the
		 * last hold doubles it. */
		if (fb->place.hold_until &&
		    now - fb->place.hold_until < PLACE_HOLD_MAX_NS)
			fb->place.hold_ns =
			    fb->place.hold_ns * 2 > PLACE_HOLD_MAX_NS
			        ? PLACE_HOLD_MAX_NS
			        : fb->place.hold_ns * 2;
		else
			fb->place.hold_ns = PLACE_HOLD_MIN_NS;
		fb->place.hold_until = now + fb->place.hold_ns;
	}
	return XNBD_IO_COMPLETED;
}

void xnbd__file_write_place(struct xnbd_backend *b, bool lane_only,
                            uint64_t stall_ns)
{
	struct file_backend *fb = (struct file_backend *)b;
	fb->place.lane_only = lane_only;
	fb->place.stall_ns = stall_ns;
	place_clock(fb);
}

uint64_t xnbd__file_pieced_writes(const struct xnbd_backend *b)
{
	return atomic_load(&((const struct file_backend *)b)->pieced);
}

uint64_t xnbd__file_chunks_allocated(const struct xnbd_backend *b)
{
	const struct file_backend *fb = (const struct file_backend *)b;
	return fb->alloc ? atomic_load(&fb->alloc->allocated) : 0;
}

uint64_t xnbd__file_lane_ios(const struct xnbd_backend *b)
{
	return ((const struct file_backend *)b)->place.lane_ios;
}

/* Buffered writes to one file are serialised by the file system (ext4,
 * XFS and btrfs take the inode's lock for each): pool threads writing at
 * once only wait for each other, spinning on the lock and switching (a
 * fifth of the server's CPU at 4 KiB random writes, depth 32; 17% in
 * rwsem_spin_on_owner in a slow run of 1 MiB CoW writes at depth 8, 2.7%
 * in a fast one, doc/design.md).  So writes
 * without FUA, spliced or not, of any size, take the lane: one worker
 * writes them one after the other, in order, each completed as soon as
 * it is written.  Reads, FUA writes (each waits for the disk), writes
 * while a snapshot is copied (they may copy a chunk first), and the
 * writes of a block device (no inode lock) or of a descriptor opened
 * with O_DIRECT (which gains from depth) go to the pool in parallel. */
static bool lane_takes(const struct file_backend *fb, const struct xnbd_io *io)
{
	return fb->use_lane && io->type == XNBD_IO_WRITE &&
	       !(io->flags & XNBD_IO_FUA) && !fb->snap;
}

static int lane_io(struct file_backend *fb, struct xnbd_io *io)
{
	int r = xnbd__chan_submit(&fb->chan, io, true);
	if (r < 0)
		return r;
	fb->place.writes_out++;
	fb->place.lane_ios++;
	return XNBD_IO_PENDING;
}

/* ---- direct writes through io_uring ------------------------------------ */

#ifdef XNBD_HAVE_URING
/* XNBD_IO_URING=0 in the environment keeps every I/O on the pool (to
 * compare the two ways, or where a kernel's io_uring misbehaves); read
 * when a backend first wants its ring. */
static bool ring_allowed(void)
{
	const char *e = getenv("XNBD_IO_URING");
	return !(e && strcmp(e, "0") == 0);
}

static int ring_submit_rest(struct file_backend *fb, struct xnbd_io *io)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&fb->uring.ring);
	if (!sqe)
		return -EAGAIN;
	uint64_t done = io->priv.done_bytes;
	uint64_t left = io->length - done;
	/* One write takes at most what a single write(2) may (1 GiB here);
	 * the rest follows as a short write's does. */
	unsigned n = left > (1U << 30) ? (1U << 30) : (unsigned)left;
	io_uring_prep_write(sqe, fb->fd, (uint8_t *)io->buf + done, n,
	                    io->offset + done);
	io_uring_sqe_set_data(sqe, io);
	int r = io_uring_submit(&fb->uring.ring);
	if (r < 1)
		return r < 0 ? r : -EAGAIN;
	fb->uring.inflight++;
	return 0;
}

/* The channel's reap: the ring's completions.  A write the kernel took
 * only in part goes on from where it stopped; one the ring cannot go on
 * with goes to the pool. */
static struct xnbd_io *ring_reap(struct xnbd__chan *c)
{
	struct file_backend *fb =
	    xnbd_container_of(c, struct file_backend, chan);
	struct xnbd_io *head = NULL, *tail = NULL;
	struct io_uring_cqe *cqe;
	/* A child of fork() shares the ring's memory: it leaves it alone. */
	if (fb->uring.gen != xnbd__fork_generation())
		return NULL;
	while (io_uring_peek_cqe(&fb->uring.ring, &cqe) == 0) {
		struct xnbd_io *io = io_uring_cqe_get_data(cqe);
		int res = cqe->res;
		io_uring_cqe_seen(&fb->uring.ring, cqe);
		fb->uring.inflight--;
		if (res > 0 &&
		    (uint64_t)res < io->length - io->priv.done_bytes) {
			io->priv.done_bytes += (uint64_t)res;
			if (ring_submit_rest(fb, io) == 0)
				continue;
			res = -EAGAIN;
		}
		if (res == -EAGAIN || res == -EINTR) {
			if (xnbd__chan_requeue(c, io) == 0)
				continue;
			res = -EIO;
		}
		io->status = res < 0 ? res : res == 0 ? -EIO : 0;
		xnbd__chan_link(&head, &tail, io);
	}
	return head;
}

static bool ring_ready(struct file_backend *fb)
{
	if (fb->uring.tried)
		return fb->uring.ok && fb->uring.gen == xnbd__fork_generation();
	fb->uring.tried = true;
	if (!ring_allowed())
		return false;
	if (io_uring_queue_init(RING_DEPTH, &fb->uring.ring, 0) < 0)
		return false; /* no io_uring here (old kernel, seccomp, sysctl) */
	if (io_uring_register_eventfd(&fb->uring.ring, fb->chan.efd) < 0) {
		io_uring_queue_exit(&fb->uring.ring);
		return false;
	}
	fb->uring.ok = true;
	fb->uring.gen = xnbd__fork_generation();
	fb->chan.reap = ring_reap;
	return true;
}

/* Send a write to the ring when it can go: to a descriptor opened with
 * O_DIRECT (buffered writes would be punted to the kernel's own workers,
 * a hand-off again), without FUA, while no snapshot copies, from a buffer
 * and not a pipe, into allocated blocks (the pool allocates ahead; a
 * direct write into a hole would be punted too).  True when it took the
 * write (which is pending then), false when the write must take the
 * pool. */
static bool ring_take(struct file_backend *fb, struct xnbd_io *io)
{
	if (fb->piece != UINT64_MAX || io->type != XNBD_IO_WRITE ||
	    (io->flags & XNBD_IO_FUA) || fb->snap || io->priv.scratch ||
	    io->priv.done_bytes || alloc_pending(fb, io->offset, io->length))
		return false;
	if (fb->uring.inflight >= RING_DEPTH || !ring_ready(fb))
		return false;
	if (xnbd__chan_expect(&fb->chan) < 0)
		return false;
	fb->place.writes_out++;
	if (ring_submit_rest(fb, io) == 0) {
		fb->ring_ios++;
		return true;
	}
	/* Counted already: the pool finishes it, or it fails from there. */
	if (xnbd__chan_requeue(&fb->chan, io) < 0) {
		io->status = -EIO;
		xnbd__chan_post(&fb->chan, io);
	}
	return true;
}
#else
static bool ring_take(struct file_backend *fb, struct xnbd_io *io)
{
	(void)fb;
	(void)io;
	return false;
}
#endif

uint64_t xnbd__file_ring_ios(const struct xnbd_backend *b)
{
	return ((const struct file_backend *)b)->ring_ios;
}

static int file_submit(struct xnbd_backend *b, struct xnbd_io *io)
{
	struct file_backend *fb = (struct file_backend *)b;
	io->priv.a = fb;
	io->priv.b = NULL;
	io->priv.done_bytes = 0;
	io->priv.scratch = 0;

	if (io->length == 0 && io->type != XNBD_IO_FLUSH) {
		if (io->type == XNBD_IO_BLOCK_STATUS)
			return -EINVAL;
		return XNBD_IO_COMPLETED;
	}
	/* Direct writes go to the ring when they can (ring_take), even small
	 * ones: with O_DIRECT a write tried with RWF_NOWAIT still waits for
	 * the disk, on the loop thread. */
	if (ring_take(fb, io))
		return XNBD_IO_PENDING;
	/* Small I/O is served on the loop thread when the page cache allows;
	 * a large copy would hold the loop up for longer than a hand-off to
	 * the pool costs, and on the pool several copies run in parallel. */
	bool small = io->length <= INLINE_MAX;
	if (io->type == XNBD_IO_READ && small &&
	    atomic_load(&fb->nowait_read)) {
		struct iovec iov = {io->buf, io->length};
		ssize_t n =
		    preadv2(fb->fd, &iov, 1, (off_t)io->offset, RWF_NOWAIT);
		if (n == (ssize_t)io->length)
			return XNBD_IO_COMPLETED;
		if (n > 0)
			io->priv.done_bytes = (uint64_t)n;
		else if (n < 0 && errno == EOPNOTSUPP)
			atomic_store(&fb->nowait_read, false);
	} else if (io->type == XNBD_IO_WRITE && small &&
	           !(io->flags & XNBD_IO_FUA) && !fb->snap) {
		if (atomic_load(&fb->nowait_write)) {
			struct iovec iov = {io->buf, io->length};
			ssize_t n = pwritev2(fb->fd, &iov, 1, (off_t)io->offset,
			                     RWF_NOWAIT);
			if (n == (ssize_t)io->length)
				return XNBD_IO_COMPLETED;
			if (n > 0)
				io->priv.done_bytes = (uint64_t)n;
			else if (n < 0 &&
			         (errno == EOPNOTSUPP || errno == EINVAL))
				atomic_store(&fb->nowait_write, false);
		}
		/* Where the kernel has no RWF_NOWAIT writes for the file, the
		 * loop thread may make the write itself (write_here). */
		if (fb->use_lane && !atomic_load(&fb->nowait_write)) {
			uint64_t now = place_now(fb);
			if (write_here(fb, io, now))
				return write_inline(fb, io, now, -1);
		}
	}
	if (lane_takes(fb, io))
		return lane_io(fb, io);
	return queue_io(fb, io);
}

static int file_write_pipe(struct xnbd_backend *b, struct xnbd_io *io,
                           int pipe_fd)
{
	struct file_backend *fb = (struct file_backend *)b;
	io->priv.a = fb;
	io->priv.b = NULL;
	io->priv.done_bytes = 0;
	io->priv.scratch = (uint64_t)pipe_fd + 1;
	if (io->length == 0)
		return XNBD_IO_COMPLETED;
	/* Spliced on the loop thread where a small write would be made there
	 * (see write_here): the splice cannot be told not to wait, with or
	 * without RWF_NOWAIT for writes, so a stall sends the writes to the
	 * lane for a while, as for small ones.  The lane's hand-offs cost a
	 * tenth of a 1 MiB write's CPU and bought no speed (doc/design.md). */
	if (fb->use_lane && !(io->flags & XNBD_IO_FUA) && !fb->snap) {
		uint64_t now = place_now(fb);
		if (write_here(fb, io, now))
			return write_inline(fb, io, now, pipe_fd);
	}
	if (lane_takes(fb, io))
		return lane_io(fb, io);
	return queue_io(fb, io);
}

/* Hand an I/O to the pool. */
static int queue_io(struct file_backend *fb, struct xnbd_io *io)
{
	bool writes = is_write(io);
	if (writes && fb->snap) {
		io->priv.b = fb->snap;
		fb->snap->users++;
	}
	int r = xnbd__chan_submit(&fb->chan, io, false);
	if (r) {
		if (io->priv.b)
			snapshot_unref(io->priv.b);
		return r;
	}
	if (writes)
		fb->place.writes_out++;
	return XNBD_IO_PENDING;
}

/* cachestat(2), Linux 6.5; glibc 2.36 has no wrapper and no constants. */
#ifndef SYS_cachestat
#if defined(__alpha__)
#define SYS_cachestat 561
#else
#define SYS_cachestat 451 /* every other architecture */
#endif
#endif
struct cachestat_range_ {
	uint64_t off, len;
};
struct cachestat_ {
	uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted,
	    nr_recently_evicted;
};

int xnbd__fd_cached(int fd, uint64_t off, uint64_t len)
{
	long ps = sysconf(_SC_PAGESIZE); /* any thread may ask */
	uint64_t page = ps > 0 ? (uint64_t)ps : 4096;
	struct cachestat_range_ r = {off, len};
	struct cachestat_ cs;
	if (syscall(SYS_cachestat, fd, &r, &cs, 0) < 0)
		return -errno;
	uint64_t pages = (off + len + page - 1) / page - off / page;
	return cs.nr_cache >= pages;
}

static int file_read_fd(struct xnbd_backend *b, uint64_t off, uint64_t len,
                        int *fd, uint64_t *fd_off)
{
	struct file_backend *fb = (struct file_backend *)b;
	int r = range_cached(fb, off, len);
	if (r < 0)
		return r;
	if (!r)
		return -EAGAIN;
	*fd = fb->fd;
	*fd_off = off;
	return 0;
}

/* ---- snapshots ------------------------------------------------------------ */

static void snapshot_free(struct snapshot *s)
{
	uv_mutex_destroy(&s->mu);
	uv_cond_destroy(&s->cond);
	free(s->state);
	free(s->path);
	free(s->tmp_path);
	free(s);
}

static void snapshot_unref(struct snapshot *s)
{
	if (--s->users == 0)
		snapshot_free(s);
}

static void snapshot_work(struct snapshot *s)
{
	/* A reflink is point-in-time by itself and needs no copy; writes wait
	 * for the attempt (a reflink is quick), then either find every chunk
	 * done or copy before they write. */
	bool cloned = ioctl(s->fd, FICLONE, s->fb->fd) == 0;
	int tr = cloned
	             ? 0
	             : (ftruncate(s->fd, (off_t)s->fb->base.size) ? -errno : 0);
	uv_mutex_lock(&s->mu);
	if (cloned) {
		memset(s->state, CHUNK_DONE, s->nchunks);
		s->ndone = s->nchunks;
	}
	if (tr) {
		s->status = tr;
		s->stopped = true;
	}
	s->cloning = false;
	uv_cond_broadcast(&s->cond);
	uv_mutex_unlock(&s->mu);

	void *buf = cloned || tr ? NULL : malloc(SNAP_CHUNK);
	int r = tr ? tr : (cloned || buf) ? 0 : -ENOMEM;

	for (uint64_t i = 0; r == 0 && i < s->nchunks; i++) {
		if (atomic_load(&s->cancel)) {
			r = -ECANCELED;
			break;
		}
		uv_mutex_lock(&s->mu);
		bool mine = s->state[i] == CHUNK_PENDING && !s->stopped;
		if (mine) {
			s->state[i] = CHUNK_COPYING;
			s->ncopying++;
		}
		uv_mutex_unlock(&s->mu);
		if (!mine)
			continue;
		int cr = copy_chunk(s, i, buf);
		uv_mutex_lock(&s->mu);
		s->state[i] = CHUNK_DONE;
		s->ncopying--;
		s->ndone++;
		uv_cond_broadcast(&s->cond);
		uv_mutex_unlock(&s->mu);
		if (cr)
			r = cr;
	}
	free(buf);

	/* Wait for writers that are copying chunks on their own, then let no
	 * more copies start. */
	uv_mutex_lock(&s->mu);
	s->stopped = true;
	while (s->ncopying)
		uv_cond_wait(&s->cond, &s->mu);
	if (r == 0)
		r = s->status;
	if (r == 0 && s->ndone != s->nchunks)
		r = -EIO;
	uv_mutex_unlock(&s->mu);

	if (r == 0 && fsync(s->fd))
		r = -errno;
	if (close(s->fd) && r == 0)
		r = -errno;
	s->fd = -1;
	if (r == 0 && rename(s->tmp_path, s->path))
		r = -errno;
	if (r)
		unlink(s->tmp_path);
	s->status = r;
}

/* The copier: a thread of its own for the whole copy, not a worker of
 * the pool, whose threads it would hold for minutes; and writes on the
 * pool may wait for it (copy_before_write), so queued behind them it could
 * wait for ever.  It ends by posting done_io, and touches nothing after. */
static void *snapshot_thread(void *arg)
{
	struct snapshot *s = arg;
	uv_mutex_lock(&s->mu);
	while (s->go == 0)
		uv_cond_wait(&s->cond, &s->mu);
	int go = s->go;
	uv_mutex_unlock(&s->mu);
	if (go < 0) {
		snapshot_free(s); /* never started, and nobody else holds it */
		return NULL;
	}
	struct xnbd__chan *c = &s->fb->chan;
	snapshot_work(s);
	xnbd__chan_post(c, &s->done_io);
	return NULL;
}

/* Tell the copier to start (1) or to free the snapshot and leave (-1);
 * with -1, s is not to be touched after. */
static void snapshot_go(struct snapshot *s, int go)
{
	uv_mutex_lock(&s->mu);
	s->go = go;
	uv_cond_broadcast(&s->cond);
	uv_mutex_unlock(&s->mu);
}

static void snapshot_done(struct snapshot *s)
{
	struct file_backend *fb = s->fb;
	fb->snap = NULL;
	s->cb(&fb->base, s->status, s->path, s->ud);
	snapshot_unref(s);
}

static int file_snapshot(struct xnbd_backend *b, const char *path,
                         xnbd_snapshot_cb cb, void *ud)
{
	struct file_backend *fb = (struct file_backend *)b;
	if (fb->snap)
		return -EBUSY;
	if (fb->blockdev)
		return -ENOTSUP;
	if (access(path, F_OK) == 0)
		return -EEXIST;

	struct snapshot *s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->fd = -1;
	s->path = strdup(path);
	size_t tl = strlen(path) + 16;
	s->tmp_path = malloc(tl);
	s->nchunks = (b->size + SNAP_CHUNK - 1) / SNAP_CHUNK;
	s->state = calloc(s->nchunks ? s->nchunks : 1, 1);
	if (!s->path || !s->tmp_path || !s->state) {
		free(s->path);
		free(s->tmp_path);
		free(s->state);
		free(s);
		return -ENOMEM;
	}
	snprintf(s->tmp_path, tl, "%s.partial", path);
	s->fd =
	    open(s->tmp_path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	int r = s->fd < 0 ? -errno : 0;
	if (r == 0) {
		struct stat st;
		if (fstat(fb->fd, &st) == 0)
			(void)fchmod(s->fd, st.st_mode & 0777);
		/* The reflink is tried by the background job; until it is known,
		 * writers wait (see copy_before_write). */
		s->cloning = true;
	}
	if (r == 0) {
		uv_mutex_init(&s->mu);
		uv_cond_init(&s->cond);
	}
	if (r) {
		if (s->fd >= 0) {
			close(s->fd);
			unlink(s->tmp_path);
		}
		free(s->path);
		free(s->tmp_path);
		free(s->state);
		free(s);
		return r;
	}
	s->fb = fb;
	s->cb = cb;
	s->ud = ud;
	s->users = 1;
	s->done_io.type = SNAPSHOT_DONE;
	/* The thread waits for its go: if the loop cannot watch for its end,
	 * it leaves without a trace. */
	r = xnbd__thread_start(snapshot_thread, s, "xnbd-snapshot");
	int e = r ? r : xnbd__chan_expect(&fb->chan);
	if (e == 0) {
		snapshot_go(s, 1);
		fb->snap = s;
		return 0;
	}
	close(s->fd);
	s->fd = -1;
	unlink(s->tmp_path);
	if (r == 0)
		snapshot_go(s, -1); /* the thread frees it */
	else
		snapshot_free(s);
	return e;
}

static void file_snapshot_cancel(struct xnbd_backend *b)
{
	struct file_backend *fb = (struct file_backend *)b;
	if (fb->snap)
		atomic_store(&fb->snap->cancel, 1);
}

static int file_snapshot_running(const struct xnbd_backend *b)
{
	return ((const struct file_backend *)b)->snap != NULL;
}

static void file_free(struct xnbd_backend *b)
{
	struct file_backend *fb = (struct file_backend *)b;
#ifdef XNBD_HAVE_URING
	if (fb->uring.ok)
		io_uring_queue_exit(&fb->uring.ring);
#endif
	xnbd__chan_destroy(&fb->chan);
	close(fb->fd);
	alloc_map_unref(fb->alloc);
	free(fb);
}

static const struct xnbd__backend_ops file_ops = {
    .name = "file",
    .submit = file_submit,
    .snapshot = file_snapshot,
    .snapshot_cancel = file_snapshot_cancel,
    .snapshot_running = file_snapshot_running,
    .read_fd = file_read_fd,
    .write_pipe = file_write_pipe,
    .free = file_free,
};

int xnbd_backend_file_open(uv_loop_t *loop, const char *path, unsigned flags,
                           struct xnbd_backend **out)
{
	bool ro = flags & XNBD_OPEN_READONLY;
	/* O_NONBLOCK so that a FIFO given by mistake is refused instead of
	 * blocking the open; it is cleared again for the image. */
	int fd = open(path, (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		return -errno;
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		(void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
	int r = xnbd__backend_file_from_fd(
	    loop, fd, flags & ~XNBD__OPEN_ALLOC_AHEAD, out);
	if (r < 0)
		close(fd);
	return r;
}

int xnbd__backend_file_direct_twin(struct xnbd_backend *b,
                                   struct xnbd_backend **out)
{
	if (b->ops != &file_ops)
		return -EINVAL;
	struct file_backend *fb = (struct file_backend *)b;
	struct stat st;
	if (fstat(fb->fd, &st) != 0)
		return -errno;
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	/* By the descriptor, not a path, which may name another file now. */
	char self[64];
	snprintf(self, sizeof(self), "/proc/self/fd/%d", fb->fd);
	bool ro = b->caps & XNBD_CAP_READ_ONLY;
	int fd = open(self, (ro ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	int r = xnbd__backend_file_from_fd(b->loop, fd,
	                                   ro ? XNBD_OPEN_READONLY : 0, out);
	if (r < 0) {
		close(fd);
		return r;
	}
	struct file_backend *twin = (struct file_backend *)*out;
	if (fb->alloc) {
		atomic_fetch_add(&fb->alloc->refs, 1);
		twin->alloc = fb->alloc;
	}
	return 0;
}

int xnbd__backend_file_from_fd(uv_loop_t *loop, int fd, unsigned flags,
                               struct xnbd_backend **out)
{
	bool ro = flags & XNBD_OPEN_READONLY;
	struct stat st;
	if (fstat(fd, &st))
		return -errno;
	uint64_t size;
	bool blockdev = S_ISBLK(st.st_mode);
	if (S_ISREG(st.st_mode)) {
		size = (uint64_t)st.st_size;
	} else if (blockdev) {
		if (ioctl(fd, BLKGETSIZE64, &size))
			return -errno;
	} else {
		/* A directory opened read-only: said as a read-write open
		 * says it. */
		return S_ISDIR(st.st_mode) ? -EISDIR : -EINVAL;
	}
	struct file_backend *fb = calloc(1, sizeof(*fb));
	if (!fb)
		return -ENOMEM;
	fb->base.ops = &file_ops;
	fb->base.loop = loop;
	fb->base.size = size;
	fb->base.caps = XNBD_CAP_FLUSH | XNBD_CAP_FUA | XNBD_CAP_CACHE |
	                XNBD_CAP_BLOCK_STATUS | XNBD_CAP_MULTI_CONN;
	if (ro)
		fb->base.caps |= XNBD_CAP_READ_ONLY;
	else
		fb->base.caps |= XNBD_CAP_TRIM | XNBD_CAP_ZERO;
	fb->fd = fd;
	fb->blockdev = blockdev;
	int fl = fcntl(fd, F_GETFL);
	fb->use_lane = !blockdev && fl >= 0 && !(fl & O_DIRECT);
	fb->piece = fl >= 0 && (fl & O_DIRECT) ? UINT64_MAX : WRITE_PIECE;
	atomic_init(&fb->nowait_read, true);
	atomic_init(&fb->nowait_write, true);
	atomic_init(&fb->place.stalled_at, 0);
	atomic_init(&fb->punch_ok, true);
	atomic_init(&fb->pieced, 0);
	atomic_init(&fb->zero_range_ok, true);
	atomic_init(&fb->cachestat_ok, true);
	/* Allocating ahead is for writes to a regular file, on the file
	 * systems whose costs of writing into holes it spares (alloc_ahead). */
	struct statfs sfs;
	if ((flags & XNBD__OPEN_ALLOC_AHEAD) && S_ISREG(st.st_mode) && !ro &&
	    size && fstatfs(fd, &sfs) == 0 &&
	    (sfs.f_type == EXT4_MAGIC || sfs.f_type == XFS_MAGIC) &&
	    !(fb->alloc = alloc_map_new(size))) {
		free(fb);
		return -ENOMEM;
	}
	fb->place.stall_ns = PLACE_STALL_NS;
	place_clock(fb);
	struct rlimit rl;
	fb->place.fsize_limit =
	    getrlimit(RLIMIT_FSIZE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY
	        ? (uint64_t)rl.rlim_cur
	        : UINT64_MAX;
	int r = xnbd__chan_init(&fb->chan, loop, work_cb, after_work_cb);
	if (r < 0) {
		alloc_map_unref(fb->alloc);
		free(fb);
		return r;
	}

	/* FAST_ZERO is always offered: where the file system cannot punch or
	 * zero a range, such a request fails at once with ENOTSUP, which is
	 * what the flag asks for. */
	fb->base.caps |= ro ? 0 : XNBD_CAP_FAST_ZERO;
	*out = &fb->base;
	return 0;
}
