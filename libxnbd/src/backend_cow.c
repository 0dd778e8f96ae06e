/* backend_cow.c - a copy-on-write layer: writes land in an overlay file,
 * never in the backend below.
 *
 * Notes on the design:
 * - Granularity XNBD_COW_BLOCK (4096 bytes).  A bit per block says whether
 *   the overlay holds the block; the bitmap lives in memory, because the
 *   overlay lives only as long as the process (an unlinked file by
 *   default), so nothing needs to survive a crash.
 * - A bit is set only after the overlay write it vouches for completed;
 *   until then reads of the block go to the layer below, which still holds
 *   the old contents.
 * - Writes (WRITE, WRITE_ZEROES, TRIM) hold a lock on the blocks they
 *   touch, and overlapping writes wait for each other.  That is what keeps a
 *   copy-up (read the whole block below, merge the new bytes, write the
 *   block) from ever overwriting a concurrent write's data with old bytes.
 *   Reads take no lock.
 * - Every request is split into runs of blocks served by one layer; the
 *   runs are sub-I/Os on the two backends, so whatever the layers do
 *   asynchronously (the file backend's thread pool, later a proxy's
 *   network) composes.
 * - TRIM is done as WRITE_ZEROES: after it the blocks read as zeroes and
 *   the layer below is untouched.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "list.h"
#include "pool.h"

#define BS XNBD_COW_BLOCK

struct cow {
	struct xnbd_backend base;
	struct xnbd_backend *lower;   /* not owned */
	struct xnbd_backend *overlay; /* owned */
	uint64_t *bits;
	struct xnbd_list locked;  /* write ops holding their blocks */
	struct xnbd_list waiting; /* write ops waiting for blocks */
	struct xnbd__chan jobs;   /* starts waiters from the loop */
	/* Finished ops kept for the next requests (loop thread only): a
	 * request allocates nothing once the layer has warmed up. */
	struct xnbd_list spare;
	unsigned nspare;
	uint64_t op_allocs; /* ops taken from malloc (tests) */
};

struct cow_op;

struct cow_sub {
	struct xnbd_io io;
	bool overlay;
};

struct cow_op {
	struct xnbd_list link;
	struct cow *c;
	struct xnbd_io *io;
	uint64_t b0, b1; /* blocks touched, inclusive */
	uint64_t span;   /* bytes from io->offset that the runs cover */
	unsigned pending;
	int status;
	int stage;
	int *inline_done;      /* set while inside xnbd_backend_submit() */
	int pipe_fd;           /* a WRITE's data is in this pipe, or -1 */
	struct xnbd__job wake; /* to start a waiter from the loop */
	/* writes */
	uint8_t *bounce; /* two blocks: head and tail copy-ups */
	bool cu[2];      /* copy-up of head / tail block */
	uint64_t cu_block[2];
	/* block status */
	struct xnbd_extent *ext; /* extents of all subs */
	uint32_t nsub;
	struct cow_sub sub[];
};

static bool bit_get(const struct cow *c, uint64_t b)
{
	return (c->bits[b / 64] >> (b % 64)) & 1;
}

static void bit_set(struct cow *c, uint64_t b)
{
	c->bits[b / 64] |= 1ULL << (b % 64);
}

static uint64_t block_len(const struct cow *c, uint64_t b)
{
	uint64_t end = (b + 1) * BS;
	return end > c->base.size ? c->base.size - b * BS : BS;
}

/* A block status request looks at this many runs at most and answers
 * for the part they cover (a shorter reply is allowed), so a query over a
 * fragmented overlay costs bounded memory and work. */
#define MAX_STATUS_RUNS 64U

/* Runs of blocks served by one layer, within [off, off+len), counting at
 * most `max` runs; *len_out is the length they cover. */
static uint32_t count_runs(const struct cow *c, uint64_t off, uint64_t len,
                           uint32_t max, uint64_t *len_out)
{
	uint64_t b0 = off / BS, b1 = (off + len - 1) / BS;
	uint32_t n = 1;
	*len_out = len;
	for (uint64_t b = b0 + 1; b <= b1; b++)
		if (bit_get(c, b) != bit_get(c, b - 1)) {
			if (n == max) {
				*len_out = b * BS - off;
				break;
			}
			n++;
		}
	return n;
}

/* Every op has room for this many subs at least, so that any op can serve
 * the common requests again (a read of one run, a write); up to SPARE_MAX
 * of them are kept. */
#define SPARE_SUBS 3U
#define SPARE_MAX 64U

static struct cow_op *op_new(struct cow *c, struct xnbd_io *io, uint32_t nsub)
{
	struct cow_op *op;
	if (nsub <= SPARE_SUBS && !xnbd_list_empty(&c->spare)) {
		op = xnbd_container_of(c->spare.next, struct cow_op, link);
		xnbd_list_remove(&op->link);
		c->nspare--;
		memset(op, 0,
		       sizeof(*op) + SPARE_SUBS * sizeof(struct cow_sub));
	} else {
		uint32_t room = nsub > SPARE_SUBS ? nsub : SPARE_SUBS;
		op = calloc(1, sizeof(*op) + room * sizeof(struct cow_sub));
		if (!op)
			return NULL;
		c->op_allocs++;
	}
	op->c = c;
	op->io = io;
	op->nsub = nsub;
	op->pipe_fd = -1;
	xnbd_list_init(&op->link);
	if (io->length) {
		op->b0 = io->offset / BS;
		op->b1 = (io->offset + io->length - 1) / BS;
	}
	return op;
}

static void op_run(struct cow_op *op);

static void sub_done(struct xnbd_io *sio)
{
	struct cow_op *op = sio->user_data;
	if (sio->status && !op->status)
		op->status = sio->status;
	if (--op->pending == 0)
		op_run(op);
}

/* Submit a sub-I/O; counts it as pending unless it finished at once. */
static void sub_submit(struct cow_op *op, struct cow_sub *s, uint32_t type,
                       uint32_t flags, uint64_t off, uint64_t len, void *buf,
                       struct xnbd_extent *ext)
{
	struct cow *c = op->c;
	s->io = (struct xnbd_io){.type = type,
	                         .flags = flags,
	                         .offset = off,
	                         .length = len,
	                         .buf = buf,
	                         .extents = ext,
	                         .max_extents = ext ? 1 : 0,
	                         .done = sub_done,
	                         .user_data = op};
	struct xnbd_backend *b = s->overlay ? c->overlay : c->lower;
	op->pending++;
	/* A write of whole blocks from a pipe goes on to the overlay as it
	 * came (cow_pipe_ok): the only write of the op, from io->buf's place. */
	bool piped = op->pipe_fd >= 0 && type == XNBD_IO_WRITE && s->overlay;
	int r = piped ? xnbd__backend_submit_pipe(b, &s->io, op->pipe_fd)
	              : xnbd_backend_submit(b, &s->io);
	if (r == XNBD_IO_PENDING)
		return;
	op->pending--;
	int st = r == XNBD_IO_COMPLETED ? s->io.status : r;
	if (st && !op->status)
		op->status = st;
}

/* ---- locks ------------------------------------------------------------- */

static bool conflicts(const struct cow *c, const struct cow_op *op)
{
	xnbd_list_for_each(l, &c->locked)
	{
		const struct cow_op *o =
		    xnbd_container_of(l, struct cow_op, link);
		if (op->b0 <= o->b1 && o->b0 <= op->b1)
			return true;
	}
	return false;
}

/* Take the op's blocks, or queue it; returns whether it may run now.  A
 * waiting op that overlaps this one is ahead of it, so order is kept. */
static bool lock_or_wait(struct cow *c, struct cow_op *op)
{
	bool blocked = conflicts(c, op);
	xnbd_list_for_each(l, &c->waiting)
	{
		const struct cow_op *o =
		    xnbd_container_of(l, struct cow_op, link);
		if (op->b0 <= o->b1 && o->b0 <= op->b1)
			blocked = true;
	}
	xnbd_list_insert(blocked ? c->waiting.prev : c->locked.prev, &op->link);
	return !blocked;
}

static void wake_done(struct xnbd__job *j)
{
	op_run(xnbd_container_of(j, struct cow_op, wake));
}

static void unlock(struct cow *c, struct cow_op *op)
{
	xnbd_list_remove(&op->link);
	/* Start waiters that no longer conflict with a holder or an earlier
	 * waiter.  They start from the loop, never inside this call, so no
	 * callback of theirs runs inside somebody's submit. */
	struct xnbd_list *l = c->waiting.next, *n;
	for (; l != &c->waiting; l = n) {
		n = l->next;
		struct cow_op *w = xnbd_container_of(l, struct cow_op, link);
		bool blocked = conflicts(c, w);
		for (struct xnbd_list *e = c->waiting.next; e != l && !blocked;
		     e = e->next) {
			struct cow_op *o =
			    xnbd_container_of(e, struct cow_op, link);
			if (w->b0 <= o->b1 && o->b0 <= w->b1)
				blocked = true;
		}
		if (blocked)
			continue;
		xnbd_list_remove(&w->link);
		xnbd_list_insert(c->locked.prev, &w->link);
		w->wake.work = NULL;
		w->wake.done = wake_done;
		if (xnbd__job_submit(&c->jobs, &w->wake) < 0)
			op_run(w); /* cannot defer: run now */
	}
}

/* ---- finishing ---------------------------------------------------------- */

static void op_release(struct cow *c, struct cow_op *op)
{
	free(op->bounce);
	free(op->ext);
	if (op->nsub <= SPARE_SUBS && c->nspare < SPARE_MAX) {
		xnbd_list_insert(&c->spare, &op->link);
		c->nspare++;
	} else {
		free(op);
	}
}

uint64_t xnbd__cow_op_allocs(const struct xnbd_backend *b)
{
	return ((const struct cow *)b)->op_allocs;
}

static void op_finish(struct cow_op *op)
{
	struct cow *c = op->c;
	struct xnbd_io *io = op->io;
	io->status = op->status;
	bool writes = io->type == XNBD_IO_WRITE || io->type == XNBD_IO_ZERO ||
	              io->type == XNBD_IO_TRIM;
	if (writes)
		unlock(c, op);
	int *inl = op->inline_done;
	op_release(c, op);
	if (inl)
		*inl = 1;
	else
		xnbd__io_complete(&c->base, io);
}

/* ---- reads and block status ------------------------------------------------ */

static void start_runs(struct cow_op *op)
{
	struct cow *c = op->c;
	struct xnbd_io *io = op->io;
	uint64_t pos = io->offset, end = io->offset + op->span;
	uint32_t i = 0;
	while (pos < end) {
		uint64_t b = pos / BS;
		bool in_overlay = bit_get(c, b);
		uint64_t e = (b + 1) * BS;
		while (e < end && bit_get(c, e / BS) == in_overlay)
			e += BS;
		if (e > end)
			e = end;
		if (i == op->nsub)
			break;
		struct cow_sub *s = &op->sub[i++];
		s->overlay = in_overlay;
		if (io->type == XNBD_IO_READ) {
			sub_submit(op, s, XNBD_IO_READ, 0, pos, e - pos,
			           (uint8_t *)io->buf + (pos - io->offset),
			           NULL);
		} else if (!in_overlay && !(xnbd_backend_caps(c->lower) &
		                            XNBD_CAP_BLOCK_STATUS)) {
			/* Nothing known below: one allocated extent. */
			s->io.n_extents = 1;
			s->io.extents = &op->ext[i - 1];
			s->io.offset = pos;
			s->io.length = e - pos;
			op->ext[i - 1] = (struct xnbd_extent){e - pos, 0};
		} else {
			sub_submit(op, s, XNBD_IO_BLOCK_STATUS, 0, pos, e - pos,
			           NULL, &op->ext[i - 1]);
		}
		pos = e;
	}
}

/* Merge each run's first extent into the caller's array.  One extent per
 * run keeps the merge simple; runs are at most as many as blocks. */
static void merge_extents(struct cow_op *op)
{
	struct xnbd_io *io = op->io;
	uint32_t n = 0;
	for (uint32_t i = 0; i < op->nsub; i++) {
		struct cow_sub *s = &op->sub[i];
		struct xnbd_extent e = op->ext[i];
		if (e.length == 0)
			break;
		if (n > 0 && io->extents[n - 1].flags == e.flags) {
			io->extents[n - 1].length += e.length;
		} else {
			if (n == io->max_extents)
				break;
			io->extents[n++] = e;
		}
		/* A run described only in part ends the reply there. */
		if (e.length < s->io.length)
			break;
	}
	io->n_extents = n;
}

/* ---- writes ------------------------------------------------------------------ */

/* Stage 0: read the blocks to copy up.  Stage 1: merge and write.  Stage 2:
 * set the bits. */
static void write_stage(struct cow_op *op)
{
	struct cow *c = op->c;
	struct xnbd_io *io = op->io;
	uint64_t off = io->offset, end = io->offset + io->length;
	bool zero = io->type != XNBD_IO_WRITE;
	uint32_t wflags = io->flags & XNBD_IO_FUA;
	/* TRIM is done as zeroing, without the zeroing-only flags. */
	uint32_t zflags =
	    io->type == XNBD_IO_ZERO
	        ? io->flags & (XNBD_IO_NO_HOLE | XNBD_IO_FAST_ZERO)
	        : 0;

	if (op->stage == 0) {
		uint64_t blocks[2] = {op->b0, op->b1};
		for (int k = 0; k < 2; k++) {
			uint64_t b = blocks[k];
			if (k == 1 && b == op->b0)
				break;
			bool whole =
			    off <= b * BS && end >= b * BS + block_len(c, b);
			if (whole || bit_get(c, b))
				continue;
			op->cu[k] = true;
			op->cu_block[k] = b;
		}
		if (!op->cu[0] && !op->cu[1])
			return;
		if (zflags & XNBD_IO_FAST_ZERO) {
			op->status = -ENOTSUP; /* a copy-up is not fast */
			return;
		}
		op->bounce = malloc(2 * BS);
		if (!op->bounce) {
			op->status = -ENOMEM;
			return;
		}
		for (int k = 0; k < 2; k++)
			if (op->cu[k]) {
				uint64_t b = op->cu_block[k];
				op->sub[k].overlay = false;
				sub_submit(op, &op->sub[k], XNBD_IO_READ, 0,
				           b * BS, block_len(c, b),
				           op->bounce + k * BS, NULL);
			}
		return;
	}

	if (op->stage == 1) {
		uint64_t ws = off, we = end;
		for (int k = 0; k < 2; k++) {
			if (!op->cu[k])
				continue;
			uint64_t b = op->cu_block[k], bs = b * BS,
			         bl = block_len(c, b);
			uint64_t s0 = off > bs ? off : bs;
			uint64_t s1 = end < bs + bl ? end : bs + bl;
			uint8_t *dst = op->bounce + k * BS + (s0 - bs);
			if (zero)
				memset(dst, 0, s1 - s0);
			else
				memcpy(dst, (uint8_t *)io->buf + (s0 - off),
				       s1 - s0);
			op->sub[k].overlay = true;
			sub_submit(op, &op->sub[k], XNBD_IO_WRITE, wflags, bs,
			           bl, op->bounce + k * BS, NULL);
			/* The copied-up blocks are at the ends of the range. */
			if (bs <= ws)
				ws = bs + bl < we ? bs + bl : we;
			else if (bs + bl >= we)
				we = bs > ws ? bs : ws;
		}
		if (ws < we) {
			struct cow_sub *s = &op->sub[2];
			s->overlay = true;
			if (zero)
				sub_submit(op, s, XNBD_IO_ZERO, wflags | zflags,
				           ws, we - ws, NULL, NULL);
			else
				sub_submit(
				    op, s, XNBD_IO_WRITE, wflags, ws, we - ws,
				    (uint8_t *)io->buf + (ws - off), NULL);
		}
		return;
	}

	/* Stage 2: everything landed; now the overlay vouches for the blocks. */
	for (uint64_t b = op->b0; b <= op->b1; b++)
		bit_set(c, b);
}

/* Advance an op whose sub-I/Os have all completed. */
static void op_run(struct cow_op *op)
{
	while (op->pending == 0) {
		struct xnbd_io *io = op->io;
		if (op->status) {
			op_finish(op);
			return;
		}
		switch (io->type) {
		case XNBD_IO_READ:
		case XNBD_IO_CACHE:
		case XNBD_IO_FLUSH:
			if (op->stage++ == 0) {
				if (io->type == XNBD_IO_READ) {
					start_runs(op);
				} else {
					/* CACHE warms the layer below; FLUSH the overlay. */
					op->sub[0].overlay =
					    io->type == XNBD_IO_FLUSH;
					sub_submit(op, &op->sub[0], io->type, 0,
					           io->offset, io->length, NULL,
					           NULL);
				}
				continue;
			}
			op_finish(op);
			return;
		case XNBD_IO_BLOCK_STATUS:
			if (op->stage++ == 0) {
				start_runs(op);
				continue;
			}
			merge_extents(op);
			op_finish(op);
			return;
		default: /* WRITE, ZERO, TRIM */
			if (op->stage == 3) {
				op_finish(op);
				return;
			}
			write_stage(op);
			op->stage++;
			continue;
		}
	}
}

static int cow_start(struct cow *c, struct xnbd_io *io, int pipe_fd);

static int cow_submit(struct xnbd_backend *b, struct xnbd_io *io)
{
	return cow_start((struct cow *)b, io, -1);
}

/* Whole blocks: no copy-up, so the data need not be in memory. */
static bool cow_pipe_ok(const struct xnbd_backend *b, uint64_t off,
                        uint64_t len)
{
	const struct cow *c = (const struct cow *)b;
	uint64_t end = off + len;
	return len && off % BS == 0 && (end % BS == 0 || end == b->size) &&
	       xnbd__backend_takes_pipe(c->overlay, off, len);
}

static int cow_write_pipe(struct xnbd_backend *b, struct xnbd_io *io,
                          int pipe_fd)
{
	if (!cow_pipe_ok(b, io->offset, io->length))
		return -EOPNOTSUPP;
	return cow_start((struct cow *)b, io, pipe_fd);
}

static int cow_start(struct cow *c, struct xnbd_io *io, int pipe_fd)
{
	if (io->length == 0 && io->type != XNBD_IO_FLUSH)
		return XNBD_IO_COMPLETED;
	uint32_t nsub = 3;
	uint64_t span = io->length;
	if (io->type == XNBD_IO_READ)
		nsub = count_runs(c, io->offset, io->length, UINT32_MAX, &span);
	else if (io->type == XNBD_IO_BLOCK_STATUS)
		nsub = count_runs(c, io->offset, io->length, MAX_STATUS_RUNS,
		                  &span);
	struct cow_op *op = op_new(c, io, nsub);
	if (!op)
		return -ENOMEM;
	op->span = span;
	op->pipe_fd = pipe_fd;
	if (io->type == XNBD_IO_BLOCK_STATUS) {
		op->ext = calloc(nsub, sizeof(*op->ext));
		if (!op->ext) {
			op_release(c, op);
			return -ENOMEM;
		}
	}
	bool writes = io->type == XNBD_IO_WRITE || io->type == XNBD_IO_ZERO ||
	              io->type == XNBD_IO_TRIM;
	int done = 0;
	op->inline_done = &done;
	if (!writes || lock_or_wait(c, op))
		op_run(op);
	if (done)
		return XNBD_IO_COMPLETED;
	op->inline_done = NULL;
	return XNBD_IO_PENDING;
}

static void cow_free(struct xnbd_backend *b)
{
	struct cow *c = (struct cow *)b;
	while (!xnbd_list_empty(&c->spare)) {
		struct xnbd_list *l = c->spare.next;
		xnbd_list_remove(l);
		free(xnbd_container_of(l, struct cow_op, link));
	}
	xnbd_backend_free(c->overlay);
	xnbd__chan_destroy(&c->jobs);
	free(c->bits);
	free(c);
}

/* Reads take no lock (see the notes at the top): a range served by one
 * layer may be sent straight from that layer's file. */
static int cow_read_fd(struct xnbd_backend *b, uint64_t off, uint64_t len,
                       int *fd, uint64_t *fd_off)
{
	struct cow *c = (struct cow *)b;
	uint64_t span;
	if (count_runs(c, off, len, 1, &span) != 1 || span != len)
		return -EAGAIN;
	return xnbd__backend_read_fd(
	    bit_get(c, off / BS) ? c->overlay : c->lower, off, len, fd, fd_off);
}

static const struct xnbd__backend_ops cow_ops = {
    .name = "cow",
    .submit = cow_submit,
    .read_fd = cow_read_fd,
    .write_pipe = cow_write_pipe,
    .pipe_ok = cow_pipe_ok,
    .free = cow_free,
};

const char *xnbd_backend_cow_default_dir(void)
{
	const char *t = getenv("TMPDIR");
	return t && *t ? t : "/var/tmp";
}

int xnbd_backend_cow_new(uv_loop_t *loop, struct xnbd_backend *lower,
                         const char *path, unsigned flags,
                         struct xnbd_backend **out)
{
	uint64_t size = xnbd_backend_size(lower);
	int fd;
	if (!path && (flags & XNBD_COW_TEMPORARY)) {
		/* The default place for a temporary overlay: a directory, never a
		 * file that would outlive the process. */
		path = xnbd_backend_cow_default_dir();
		struct stat st;
		if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
			return -ENOTDIR;
	}
	if (!path)
		return -EINVAL;
	if (flags & XNBD_COW_TEMPORARY) {
		/* An overlay without a name cannot outlive the process, crash or
		 * not.  Where O_TMPFILE is missing, unlink right after creating. */
		fd = open(path, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
		if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR)) {
			size_t n = strlen(path) + 32;
			char *t = malloc(n);
			if (!t)
				return -ENOMEM;
			snprintf(t, n, "%s/xnbd-cow-XXXXXX", path);
			fd = mkostemp(t, O_CLOEXEC);
			if (fd >= 0)
				unlink(t);
			free(t);
		}
	} else {
		fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	}
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)size)) {
		int e = -errno;
		close(fd);
		if (!(flags & XNBD_COW_TEMPORARY))
			unlink(path);
		return e;
	}
	struct cow *c = calloc(1, sizeof(*c));
	uint64_t nblocks = (size + BS - 1) / BS;
	uint64_t *bits = calloc((nblocks + 63) / 64 + 1, sizeof(uint64_t));
	struct xnbd_backend *ov = NULL;
	int r = (!c || !bits) ? -ENOMEM : xnbd__jobs_init(&c->jobs, loop);
	if (r == 0 && (r = xnbd__backend_file_from_fd(
	                   loop, fd, XNBD__OPEN_ALLOC_AHEAD, &ov)) < 0)
		xnbd__chan_destroy(&c->jobs);
	if (r < 0) {
		close(fd);
		if (!(flags & XNBD_COW_TEMPORARY))
			unlink(path);
		free(c);
		free(bits);
		return r;
	}
	c->base.ops = &cow_ops;
	c->base.loop = loop;
	c->base.size = size;
	c->base.caps = XNBD_CAP_FLUSH | XNBD_CAP_FUA | XNBD_CAP_TRIM |
	               XNBD_CAP_ZERO | XNBD_CAP_FAST_ZERO | XNBD_CAP_CACHE |
	               XNBD_CAP_BLOCK_STATUS | XNBD_CAP_MULTI_CONN;
	if (!(xnbd_backend_caps(lower) & XNBD_CAP_CACHE))
		c->base.caps &= ~XNBD_CAP_CACHE;
	c->lower = lower;
	c->overlay = ov;
	c->bits = bits;
	xnbd_list_init(&c->locked);
	xnbd_list_init(&c->waiting);
	xnbd_list_init(&c->spare);
	*out = &c->base;
	return 0;
}
