/* backend_proxy.c - a caching proxy: an upstream NBD export served
 * through a local cache image and a persistent bitmap (xnbd/proxy.h).
 *
 * Notes on the design:
 * - A block is present (its bit is set: the cache holds the right data),
 *   absent, or being fetched.  "Being fetched" is not a state of its own:
 *   a request that must fetch, and every write, holds a lock on the blocks
 *   of its range, and overlapping holders wait for each other in arrival
 *   order.  So concurrent requests for one absent block wait on one fetch
 *   (the later ones find the block present when their turn comes), and a
 *   client write never races a fetch of its block, whatever the order in
 *   which the upstream, the cache and the clients answer.  Reads of
 *   present blocks take no lock: bits are only ever set, never cleared.
 * - A bit is set only after the cache write of its block completed, and
 *   reaches the bitmap file only after the cache was synced (persist()).
 *   That ordering is what makes a crash safe: a block whose bit is on disk
 *   has its data on disk.  (The original set bits before the data came and
 *   served zeroes after a crash.)  A small cold read is answered before
 *   its stores complete (early_plan): it keeps its lock until they are
 *   done, so only the moment its bits are set moves.
 * - Work proceeds in rounds of at most ROUND_SUBS sub-I/Os: a read of many
 *   separate absent runs is served a round at a time, with bounded memory.
 *   (The original died on such reads.)  Reads fetch straight into the
 *   caller's buffer; only a partial first or last block goes through a
 *   bounce block.  CACHE requests (and the background fill) use a bounce
 *   buffer of at most CACHE_ROUND bytes, and at most MAX_CACHE_OPS of them
 *   fetch at once, so a flood of CACHE requests costs bounded memory.
 * - Upstream replies are matched by cookie in the client (client.c).
 *   When the upstream is lost, fetches wait in `upq` (holding their locks)
 *   and are sent again once a connection is back; the proxy reconnects on
 *   its own with growing pauses, or where xnbd_proxy_reconnect() says.
 * - After a switch the upstream is never asked again: absent blocks read
 *   as zeroes (only a forced switch leaves any), fetches under way for a
 *   read or CACHE are dropped, and a partial write to an absent block
 *   merges into zeroes.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "xnbd/bitmap.h"
#include "xnbd/client.h"
#include "xnbd/proxy.h"
#include "xnbd/xnbd.h"

#include "backend.h"
#include "fetchctl.h"
#include "list.h"
#include "pool.h"
#include "wire.h"

#define BS XNBD_PROXY_BLOCK
#define MAX_UP 256U               /* upstream reads in flight */
#define MAX_SEG (1U << 20)        /* longest upstream read */
#define ROUND_SUBS 64U            /* sub-I/Os of one round */
#define CACHE_ROUND (1U << 20)    /* bounce bytes of a CACHE round */
#define DIRECT_MIN (128U * 1024U) /* stores larger than this: O_DIRECT */
#define EARLY_MAX (128U * 1024U)  /* cold reads answered before their store */
#define DETACH_MAX (8U << 20)     /* bytes such stores may hold at once */
#define MAX_CACHE_OPS 8U          /* CACHE requests fetching at once */
#define FILL_OPS 4U               /* CACHE requests of a background fill */
#define FILL_CHUNK (1U << 20)     /* bytes each of them covers */
#define STATUS_SCAN (1ULL << 16)  /* blocks one cache-map query looks at */
#define PERSIST_MS 2000           /* bits wait at most this long on disk */
#define RETRY_MIN_MS 250
#define RETRY_MAX_MS 4000
#define PROGRESS_MS 250
#define SPARE_SUBS 4U            /* sub-I/Os every op has room for */
#define SPARE_MAX 32U            /* finished ops kept for the next requests */
#define SPARE_COPY (16U * 1024U) /* early-reply copy a spare op keeps */

struct pop;

typedef void (*persist_fn)(void *ud, int status);

struct persist_waiter {
	struct xnbd_list link;
	persist_fn fn;
	void *ud;
};

enum sub_kind { SUB_READ, SUB_FETCH, SUB_WRITE };

struct sub {
	struct xnbd_io io;
	struct pop *op;
	struct xnbd_list link; /* in p->upq while waiting for the upstream */
	uint8_t *buf;
	uint64_t off, len;
	uint8_t kind;
	uint8_t phase;  /* fetch: 0 upstream read, 1 cache write (3: failed,
	                   early reply: the block stays absent) */
	bool edge;      /* buf is a bounce block: copy the wanted part */
	bool inflight;  /* submitted and not yet done (sub_send) */
	uint8_t fcf;    /* fetch: its xnbd__fetchctl_sent() flags */
	uint64_t sent;  /* fetch: when it went upstream (ns) */
	uint8_t *store; /* early reply: where the fetched data is kept */
};

struct pop {
	struct xnbd_list link; /* p->locked, p->waiting or p->cacheq */
	struct xnbd_proxy *p;
	struct xnbd_io *io;      /* not to be touched once replied */
	uint32_t type;           /* io->type */
	struct xnbd_client *own; /* a fill's own upstream, or NULL */
	uint64_t b0, b1;         /* blocks touched, inclusive */
	uint64_t cursor;         /* next block a round looks at */
	unsigned pending;
	int status;
	int stage;
	bool lock;       /* holds (or waits for) its blocks */
	bool cache_slot; /* counted in p->cache_ops */
	bool round_fetched;
	/* Early reply (a small cold read): the caller gets its data when the
	 * last of it arrives, and the op stays on (holding its lock) until
	 * the fetched blocks are stored and their bits set. */
	bool early;
	bool replied;
	unsigned unreplied; /* subs whose data is not in io->buf yet */
	uint8_t *copy;      /* the stores' own copy of the fetched data */
	uint32_t copy_cap;  /* its size (kept with a spare op) */
	uint64_t copy_len;  /* bytes reserved in p->detached_bytes */
	int store_status;   /* early reply: the first failed store */
	int *inline_done;
	int pipe_fd; /* a WRITE of whole blocks: its data is in this pipe */
	struct xnbd__job wake;
	struct persist_waiter pw;
	uint8_t *bounce; /* a CACHE op's round buffer */
	uint8_t *edge;   /* two blocks: partial first and last (kept) */
	uint32_t nsub, used;
	uint32_t room;   /* subs after the op */
	struct sub *sub; /* nsub of them: after the op, or (CACHE) allocated */
};

struct xnbd_proxy_job {
	struct xnbd_list link;
	struct xnbd_proxy *p;
	unsigned flags;
	xnbd_proxy_progress_cb progress;
	xnbd_proxy_cb done;
	void *ud;
	struct xnbd_client *own;
	uint64_t cursor;
	unsigned running;
	unsigned passes;
	bool cancel;
	bool started;
	int err;
	uint64_t last_progress;
	struct xnbd__job kick; /* starts it from the loop */
	struct {
		struct xnbd_io io;
		struct xnbd_proxy_job *job;
	} fill[FILL_OPS];
};

struct xnbd_proxy {
	struct xnbd_backend base;
	uv_loop_t *loop;
	xnbd_log_fn log;
	void *log_ud;
	char *host, *port, *name;
	char *cache_path, *bitmap_path;
	unsigned flags;
	uint64_t nblocks;
	int cache_fd;
	struct xnbd_backend *cache;
	/* The same file opened with O_DIRECT, for large aligned stores of
	 * fetched blocks (NULL where the file system refuses it). */
	struct xnbd_backend *cache_direct;
	/* CACHE bounce buffers kept for the next CACHE requests: a fresh
	 * 1 MiB mapping a request costs 256 page faults. */
	uint8_t *bounce_pool[MAX_CACHE_OPS + FILL_OPS];
	unsigned nbounce;
	/* Finished ops with room for SPARE_SUBS, their edge blocks and small
	 * copies kept: a request at a time allocates nothing once warm. */
	struct xnbd_list spare;
	unsigned nspare;
	uint64_t allocs; /* ops and buffers taken from malloc (tests) */
	struct xnbd_bitmap *bm;
	/* upstream */
	struct xnbd_client *up;
	bool up_ok;
	bool switched;
	bool opened;
	bool freeing;
	bool freed;
	bool giving_up; /* aborted: nothing waits for the upstream any more */
	unsigned up_inflight;
	/* how many fetch bytes the upstream may have in flight */
	struct xnbd__fetchctl fc;
	struct xnbd_list upq; /* struct sub waiting to be sent upstream */
	uint64_t upq_len;
	bool pumping;               /* upq_pump is sending the head of upq */
	struct xnbd_client *trying; /* a connection attempt under way */
	bool trying_user;           /* ... made by xnbd_proxy_reconnect() */
	char *try_host, *try_port, *try_name;
	xnbd_proxy_cb try_cb;
	void *try_ud;
	unsigned retry_ms;
	unsigned attempts;
	/* ops answered early whose stores still run, and their copies' bytes */
	uint64_t detached, detached_bytes;
	uint64_t store_failures;
	/* locks */
	struct xnbd_list locked, waiting;
	struct xnbd_list cacheq; /* CACHE ops waiting for a slot */
	unsigned cache_ops;
	/* persistence */
	bool persisting;
	int persist_status;
	uint64_t dirty; /* bits set since the last stage */
	struct xnbd_list pw_now, pw_next;
	struct xnbd__job persist_job;
	/* Syncs run on libxnbd's pool, and deferred calls come back to the
	 * loop, through this channel. */
	struct xnbd__chan jobs_chan;
	/* jobs */
	struct xnbd_list jobs;
	/* open */
	xnbd_proxy_cb open_cb;
	void *open_ud;
	/* handles */
	uv_timer_t persist_timer, retry_timer;
	unsigned handles;
	struct xnbd__proxy_ctl_area ctl_area;
	struct xnbd_client *reap[8];
	unsigned nreap;
	uv_idle_t reaper;
	/* Stores of early-answered fetches, made at the start of the next
	 * loop iteration: after this one's replies went out (store_later). */
	struct xnbd_list later;
	uv_idle_t later_idle;
};

static void plog(struct xnbd_proxy *p, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void plog(struct xnbd_proxy *p, int level, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	xnbd__vlogf(p->log, p->log_ud, level, fmt, ap);
	va_end(ap);
}

static bool present(const struct xnbd_proxy *p, uint64_t b)
{
	return xnbd_bitmap_test(p->bm, b);
}

static uint64_t block_len(const struct xnbd_proxy *p, uint64_t b)
{
	uint64_t end = (b + 1) * BS;
	return end > p->base.size ? p->base.size - b * BS : BS;
}

static void set_bits(struct xnbd_proxy *p, uint64_t off, uint64_t len)
{
	for (uint64_t b = off / BS; b * BS < off + len; b++) {
		if (!present(p, b)) {
			xnbd_bitmap_set(p->bm, b);
			p->dirty++;
		}
	}
}

static bool is_write(uint32_t type)
{
	return type == XNBD_IO_WRITE || type == XNBD_IO_ZERO ||
	       type == XNBD_IO_TRIM;
}

/* ---- the upstream's clients go away from the loop, never inside their own
 * callbacks ------------------------------------------------------------------ */

static void upq_pump(struct xnbd_proxy *p);

static void reap_cb(uv_idle_t *h)
{
	struct xnbd_proxy *p = h->data;
	for (unsigned i = 0; i < p->nreap; i++)
		xnbd_client_free(p->reap[i]);
	p->nreap = 0;
	uv_idle_stop(h);
	if (p->giving_up && p->up && (p->up_inflight || p->upq_len)) {
		/* An upstream that is connected but does not answer would hold
		 * its fetches for ever: let it go; they fail below. */
		struct xnbd_client *c = p->up;
		p->up = NULL;
		p->up_ok = false;
		xnbd_client_on_disconnect(c, NULL, NULL);
		xnbd_client_free(c); /* its fetches complete with -ECANCELED */
	}
	if (p->giving_up)
		upq_pump(p); /* what waited for the upstream fails now */
}

static void reap_client(struct xnbd_proxy *p, struct xnbd_client *c)
{
	if (p->nreap == sizeof(p->reap) / sizeof(p->reap[0]))
		reap_cb(&p->reaper); /* full: the oldest are long done */
	p->reap[p->nreap++] = c;
	uv_idle_start(&p->reaper, reap_cb);
}

/* ---- persistence: group commit of cache data and bits ------------------------ */

static void maybe_free(struct xnbd_proxy *p);

static void persist_work_cb(struct xnbd__job *j)
{
	struct xnbd_proxy *p =
	    xnbd_container_of(j, struct xnbd_proxy, persist_job);
	/* The data first: a bit on disk must never vouch for data that is not. */
	if (fdatasync(p->cache_fd) != 0) {
		p->persist_status = -errno;
		return;
	}
	p->persist_status = xnbd_bitmap_write_staged(p->bm);
}

static void persist_start(struct xnbd_proxy *p);

static void persist_after(struct xnbd__job *j)
{
	struct xnbd_proxy *p =
	    xnbd_container_of(j, struct xnbd_proxy, persist_job);
	int st = p->persist_status;
	p->persisting = false;
	if (st)
		plog(p, XNBD_LOG_ERR, "cannot make the cache durable: %s",
		     strerror(-st));
	/* The next round starts before the answers go out: an answer may
	 * free the proxy (xnbd_proxy_free), which then waits for that round
	 * instead of closing the bitmap under it. */
	struct xnbd_list answered;
	xnbd_list_init(&answered);
	xnbd_list_splice(&answered, &p->pw_now);
	if (!xnbd_list_empty(&p->pw_next))
		persist_start(p);
	while (!xnbd_list_empty(&answered)) {
		struct persist_waiter *pw = xnbd_container_of(
		    answered.next, struct persist_waiter, link);
		xnbd_list_remove(&pw->link);
		pw->fn(pw->ud, st);
	}
	maybe_free(p);
}

/* Stage the bits set so far, then (on a worker) sync the cache and write
 * the staged bits.  Waiters queued before the stage are answered by it. */
static void persist_start(struct xnbd_proxy *p)
{
	if (p->persisting)
		return;
	xnbd_list_splice(&p->pw_now, &p->pw_next);
	xnbd_bitmap_stage(p->bm);
	p->dirty = 0;
	p->persisting = true;
	p->persist_job.work = persist_work_cb;
	p->persist_job.done = persist_after;
	if (xnbd__job_submit(&p->jobs_chan, &p->persist_job) < 0) {
		persist_work_cb(&p->persist_job); /* do it here, blocking */
		persist_after(&p->persist_job);
	}
}

static void persist(struct xnbd_proxy *p, struct persist_waiter *pw,
                    persist_fn fn, void *ud)
{
	pw->fn = fn;
	pw->ud = ud;
	xnbd_list_insert(p->pw_next.prev, &pw->link);
	persist_start(p);
}

static void persist_timer_cb(uv_timer_t *t)
{
	struct xnbd_proxy *p = t->data;
	if (p->dirty && !p->persisting)
		persist_start(p);
}

/* ---- locks ---------------------------------------------------------------------- */

static bool overlaps(const struct pop *a, const struct pop *b)
{
	return a->b0 <= b->b1 && b->b0 <= a->b1;
}

static bool blocked_by(const struct xnbd_list *head, const struct pop *op,
                       const struct xnbd_list *stop)
{
	for (const struct xnbd_list *l = head->next; l != head && l != stop;
	     l = l->next)
		if (overlaps(op, xnbd_container_of(l, struct pop, link)))
			return true;
	return false;
}

/* Take the op's blocks or queue it; returns whether it may go on now.  An
 * overlapping op waiting already is ahead of it. */
static bool lock_or_wait(struct xnbd_proxy *p, struct pop *op)
{
	op->lock = true;
	bool blocked = blocked_by(&p->locked, op, NULL) ||
	               blocked_by(&p->waiting, op, NULL);
	xnbd_list_insert(blocked ? p->waiting.prev : p->locked.prev, &op->link);
	return !blocked;
}

static void op_run(struct pop *op);

static void wake_done(struct xnbd__job *j)
{
	op_run(xnbd_container_of(j, struct pop, wake));
}

/* Start op from the loop, never inside the current call stack, so no
 * callback of its runs inside somebody's submit. */
static void defer_run(struct pop *op)
{
	op->wake.work = NULL;
	op->wake.done = wake_done;
	if (xnbd__job_submit(&op->p->jobs_chan, &op->wake) < 0)
		op_run(op);
}

static void unlock(struct xnbd_proxy *p, struct pop *op)
{
	xnbd_list_remove(&op->link);
	op->lock = false;
	struct xnbd_list *l = p->waiting.next, *n;
	for (; l != &p->waiting; l = n) {
		n = l->next;
		struct pop *w = xnbd_container_of(l, struct pop, link);
		if (blocked_by(&p->locked, w, NULL) ||
		    blocked_by(&p->waiting, w, l))
			continue;
		xnbd_list_remove(&w->link);
		xnbd_list_insert(p->locked.prev, &w->link);
		defer_run(w);
	}
}

/* ---- sub-I/Os --------------------------------------------------------------------- */

static void sub_done(struct xnbd_io *sio);

/* Submit to a backend, with the data from a pipe when pipe_fd >= 0; a
 * sub that finished at once is not pending. */
static void sub_send_from(struct pop *op, struct sub *s, struct xnbd_backend *b,
                          uint32_t type, uint32_t flags, int pipe_fd)
{
	s->io = (struct xnbd_io){.type = type,
	                         .flags = flags,
	                         .offset = s->off,
	                         .length = s->len,
	                         .buf = s->buf,
	                         .done = sub_done,
	                         .user_data = s};
	if (type == XNBD_IO_ZERO)
		s->io.buf = NULL;
	op->pending++;
	int r = pipe_fd >= 0 ? xnbd__backend_submit_pipe(b, &s->io, pipe_fd)
	                     : xnbd_backend_submit(b, &s->io);
	if (r == XNBD_IO_PENDING) {
		s->inflight = true;
		return;
	}
	op->pending--;
	int st = r == XNBD_IO_COMPLETED ? s->io.status : r;
	if (st && !op->status)
		op->status = st;
}

static void sub_send(struct pop *op, struct sub *s, struct xnbd_backend *b,
                     uint32_t type, uint32_t flags)
{
	sub_send_from(op, s, b, type, flags, -1);
}

static void fetch_send(struct pop *op, struct sub *s);

static bool connection_error(int st)
{
	return st == -ECONNRESET || st == -ECANCELED || st == -ENOTCONN ||
	       st == -EPIPE || st == -ESHUTDOWN || st == -ECONNABORTED ||
	       st == -ETIMEDOUT;
}

/* May a fetch of len bytes go upstream now?  One always may when none is
 * in flight, whatever its size. */
static bool up_room(struct xnbd_proxy *p, uint64_t len)
{
	return p->up_ok && p->up_inflight < MAX_UP &&
	       xnbd__fetchctl_room(&p->fc, len);
}

/* Send waiting fetches while the upstream has room.  Never called from
 * inside the op machine of an op whose fetch waits here. */
static void upq_pump(struct xnbd_proxy *p)
{
	while (!xnbd_list_empty(&p->upq)) {
		struct sub *s =
		    xnbd_container_of(p->upq.next, struct sub, link);
		if (!(p->switched || p->freeing ||
		      (p->giving_up && !p->up_ok) || up_room(p, s->len)))
			break;
		struct pop *op = s->op;
		xnbd_list_remove(&s->link);
		xnbd_list_init(&s->link);
		p->upq_len--;
		op->pending--;
		p->pumping = true;
		fetch_send(op, s);
		p->pumping = false;
		bool requeued = !xnbd_list_empty(&s->link);
		if (op->pending == 0)
			op_run(op);
		if (requeued)
			break; /* the upstream cannot take it: wait for it */
	}
}

/* An early-answered op's store of s failed: the reader has (or will
 * have) its data whatever the cache does, so this block only stays
 * absent (no bit: phase 3), and op_finish logs it. */
static void store_failed(struct pop *op, struct sub *s, int st)
{
	if (!op->store_status)
		op->store_status = st;
	s->phase = 3;
}

/* A fetch's data is in s->buf: write it to the cache. */
static void fetch_store(struct pop *op, struct sub *s)
{
	struct xnbd_proxy *p = op->p;
	s->phase = 1;
	/* Fetched data goes into the cache past the page cache: a CACHE
	 * request's is wanted by nobody now, and a read's was just handed to
	 * its client (whose own cache holds it; caching it again here would
	 * cache it twice).  So a migration's fill of a whole disk does not
	 * push out the host's page cache, and no copy into fresh page-cache
	 * memory is paid.  Reads of cached blocks stay buffered, so blocks
	 * read again are cached by the host as usual; they stay coherent:
	 * the kernel drops cached pages a direct write covers.  Large aligned
	 * stores only; the rest (and a write's merged edge blocks) go through
	 * the page cache. */
	uint32_t t = op->type;
	bool direct = p->cache_direct &&
	              (t == XNBD_IO_CACHE || t == XNBD_IO_READ) && !s->edge &&
	              s->len > DIRECT_MIN && s->len % BS == 0 &&
	              s->off % BS == 0 && (uintptr_t)s->buf % BS == 0;
	int before = op->status;
	sub_send(op, s, direct ? p->cache_direct : p->cache, XNBD_IO_WRITE, 0);
	if (op->early && op->status != before) { /* failed at once */
		store_failed(op, s, op->status);
		op->status = before;
	}
}

/* The stores of an early-answered op wait for the start of the next loop
 * iteration: the server sends the replies of this one at its end (its
 * check handle), so a cold read's answer does not wait for the write
 * into the cache, and the client's next request meets the store on the
 * other CPU rather than queueing behind it.  An idle handle runs them:
 * it keeps the poll in between from blocking, and it is stopped before
 * the next poll.  The op stays pending (and locked) meanwhile. */
static void later_cb(uv_idle_t *h)
{
	struct xnbd_proxy *p = h->data;
	uv_idle_stop(h);
	struct xnbd_list todo;
	xnbd_list_init(&todo);
	xnbd_list_splice(&todo, &p->later);
	while (!xnbd_list_empty(&todo)) {
		struct sub *s = xnbd_container_of(todo.next, struct sub, link);
		xnbd_list_remove(&s->link);
		xnbd_list_init(&s->link);
		struct pop *op = s->op;
		op->pending--;
		fetch_store(op, s);
		if (op->pending == 0)
			op_run(op); /* (the op may be gone) */
	}
}

static void store_later(struct pop *op, struct sub *s)
{
	struct xnbd_proxy *p = op->p;
	op->pending++;
	if (xnbd_list_empty(&p->later))
		uv_idle_start(&p->later_idle, later_cb);
	xnbd_list_insert(p->later.prev, &s->link);
}

/* After a switch nothing more comes from upstream: a fetch for a read
 * leaves zeroes, one for a write zeroes to merge into, one for CACHE
 * nothing at all. */
static void early_got(struct pop *op, struct sub *s);

static void fetch_switched(struct pop *op, struct sub *s)
{
	s->phase = 2;
	if (op->type == XNBD_IO_CACHE)
		return;
	memset(s->buf, 0, s->len);
	if (op->early)
		early_got(op, s);
}

/* Send a fetch upstream, or queue it until the upstream can take it. */
static void fetch_send(struct pop *op, struct sub *s)
{
	struct xnbd_proxy *p = op->p;
	s->phase = 0;
	if (p->freeing) {
		if (!op->status)
			op->status = -ECANCELED;
		return;
	}
	if (p->switched) {
		fetch_switched(op, s);
		return;
	}
	if (p->giving_up && !p->up_ok && !op->own) {
		if (!op->status)
			op->status = -ESHUTDOWN;
		return;
	}
	if (op->own) {
		sub_send(op, s, xnbd_client_backend(op->own), XNBD_IO_READ, 0);
		return;
	}
	/* (in order: a fetch that fits goes not past one waiting, unless it
	 * is small and the lane has room) */
	bool lane = p->up_ok && p->up_inflight < MAX_UP &&
	            xnbd__fetchctl_lane(&p->fc, s->len);
	if (lane ||
	    ((p->pumping || xnbd_list_empty(&p->upq)) && up_room(p, s->len))) {
		s->io = (struct xnbd_io){.type = XNBD_IO_READ,
		                         .offset = s->off,
		                         .length = s->len,
		                         .buf = s->buf,
		                         .done = sub_done,
		                         .user_data = s};
		int r = xnbd_backend_submit(xnbd_client_backend(p->up), &s->io);
		if (r == XNBD_IO_PENDING) {
			p->up_inflight++;
			s->sent = uv_hrtime();
			s->fcf = (uint8_t)xnbd__fetchctl_sent(&p->fc, s->len,
			                                      s->sent, lane);
			op->pending++;
			return;
		}
		if (r != -ENOTCONN && r != -EAGAIN) {
			if (!op->status)
				op->status = r < 0 ? r : -EIO;
			return;
		}
		/* A connection that refuses requests is gone, whether or not its
		 * disconnect callback has run yet: wait for the next one. */
		if (r == -ENOTCONN)
			p->up_ok = false;
	}
	/* Wait for the upstream; the sub stays pending meanwhile. */
	op->pending++;
	xnbd_list_insert(p->upq.prev, &s->link);
	p->upq_len++;
}

static void sub_done(struct xnbd_io *sio)
{
	struct sub *s = sio->user_data;
	struct pop *op = s->op;
	struct xnbd_proxy *p = op->p;
	int st = sio->status;
	bool pump = false;
	op->pending--;
	s->inflight = false;
	/* early_got may answer the caller from here (its callback may submit
	 * more I/O): nothing below touches op->io, and this op, whose data is
	 * all in, is reachable from nowhere else. */
	if (s->kind == SUB_READ && op->early && !st)
		early_got(op, s);
	if (s->kind == SUB_FETCH && s->phase == 1 && st && op->early) {
		store_failed(op, s, st);
		st = 0;
	}
	if (s->kind == SUB_FETCH && s->phase == 0) {
		bool own = op->own != NULL;
		if (!own) {
			p->up_inflight--;
			xnbd__fetchctl_done(&p->fc, s->len, s->sent, s->fcf,
			                    st == 0, uv_hrtime());
			pump = true;
		}
		if (st && connection_error(st) && (!own || p->switched)) {
			/* Lost with the connection: again once one is back. */
			fetch_send(op, s);
			st = 0;
		} else if (!st) {
			if (p->switched) {
				fetch_switched(op, s);
			} else if (op->early) {
				/* After early_got, s->buf is the stores' copy. */
				early_got(op, s);
				store_later(op, s);
			} else if (!is_write(op->type)) {
				fetch_store(op, s);
			}
			/* A write's edge block is stored merged, in its stage 1. */
		}
	}
	if (st && !op->status)
		op->status = st;
	if (op->pending == 0)
		op_run(op);
	/* Last: the op may be gone, and the pump may run other ops. */
	if (pump)
		upq_pump(p);
}

/* ---- finishing ------------------------------------------------------------------------ */

static void cache_slot_release(struct xnbd_proxy *p)
{
	p->cache_ops--;
	if (!xnbd_list_empty(&p->cacheq)) {
		struct pop *w =
		    xnbd_container_of(p->cacheq.next, struct pop, link);
		xnbd_list_remove(&w->link);
		xnbd_list_init(&w->link);
		w->cache_slot = true;
		p->cache_ops++;
		if (lock_or_wait(p, w))
			defer_run(w);
	}
}

/* A CACHE op's bounce buffer (aligned for direct stores, from the pool
 * when one is there) and its sub-I/Os. */
static int cache_op_buffers(struct xnbd_proxy *p, struct pop *op)
{
	void *m;
	if (p->nbounce)
		op->bounce = p->bounce_pool[--p->nbounce];
	else if (posix_memalign(&m, BS, CACHE_ROUND) == 0)
		op->bounce = m;
	else
		return -ENOMEM;
	op->sub = calloc(ROUND_SUBS, sizeof(*op->sub));
	return op->sub ? 0 : -ENOMEM;
}

/* An op with room for nsub sub-I/Os after it (none: a CACHE op's come
 * with its slot): a spare one when it has room, zeroed but for the
 * buffers it keeps. */
static struct pop *op_new(struct xnbd_proxy *p, uint32_t nsub)
{
	struct pop *op;
	if (nsub <= SPARE_SUBS && !xnbd_list_empty(&p->spare)) {
		op = xnbd_container_of(p->spare.next, struct pop, link);
		xnbd_list_remove(&op->link);
		p->nspare--;
		uint8_t *copy = op->copy, *edge = op->edge;
		uint32_t cap = op->copy_cap;
		memset(op, 0, sizeof(*op)); /* sub_take clears each sub */
		op->copy = copy;
		op->copy_cap = cap;
		op->edge = edge;
		op->room = SPARE_SUBS;
	} else {
		uint32_t room = nsub > SPARE_SUBS ? nsub : SPARE_SUBS;
		op = calloc(1, sizeof(*op) + room * sizeof(struct sub));
		if (!op)
			return NULL;
		op->room = room;
		p->allocs++;
	}
	op->p = p;
	op->sub = nsub ? (struct sub *)(op + 1) : NULL;
	xnbd_list_init(&op->link);
	return op;
}

/* Its two edge blocks, allocated on first use and kept with the op. */
static uint8_t *op_edge(struct pop *op)
{
	if (!op->edge && (op->edge = malloc(2 * BS)))
		op->p->allocs++;
	return op->edge;
}

static void op_unkeep(struct pop *op)
{
	free(op->copy);
	free(op->edge);
	free(op);
}

static void op_free(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	if (op->bounce &&
	    p->nbounce < sizeof(p->bounce_pool) / sizeof(p->bounce_pool[0]))
		p->bounce_pool[p->nbounce++] = op->bounce;
	else
		free(op->bounce);
	if (op->sub && op->sub != (struct sub *)(op + 1))
		free(op->sub);
	if (op->room != SPARE_SUBS || p->nspare >= SPARE_MAX) {
		op_unkeep(op);
		return;
	}
	if (op->copy_cap > SPARE_COPY) {
		free(op->copy);
		op->copy = NULL;
		op->copy_cap = 0;
	}
	xnbd_list_insert(&p->spare, &op->link);
	p->nspare++;
}

uint64_t xnbd__proxy_allocs(const struct xnbd_backend *b)
{
	return ((const struct xnbd_proxy *)b)->allocs;
}

bool xnbd__proxy_busy(const struct xnbd_backend *b)
{
	return b->in_flight || ((const struct xnbd_proxy *)b)->detached;
}

static void op_finish(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	struct xnbd_io *io = op->io;
	if (op->lock)
		unlock(p, op);
	if (op->cache_slot)
		cache_slot_release(p);
	p->detached_bytes -= op->copy_len;
	if (op->replied) {
		/* Answered already: only its stores were left.  A failed one is
		 * logged at the 1st, 2nd, 4th, 8th... failure (a full disk fails
		 * them all). */
		int st = op->store_status ? op->store_status : op->status;
		uint64_t n = st ? ++p->store_failures : 0;
		if (n && !(n & (n - 1)))
			plog(
			    p, XNBD_LOG_WARNING,
			    "storing fetched blocks %" PRIu64 "-%" PRIu64
			    " in the cache: %s (they will be fetched again; %" PRIu64
			    " such failure(s) so far)",
			    op->b0, op->b1, strerror(-st), p->store_failures);
		p->detached--;
		op_free(op);
		maybe_free(p);
		return;
	}
	io->status = op->status;
	int *inl = op->inline_done;
	op_free(op);
	if (inl) {
		*inl = 1;
	} else {
		xnbd__io_complete(&p->base, io);
		maybe_free(p);
	}
}

static void op_persisted(void *ud, int status)
{
	struct pop *op = ud;
	if (status && !op->status)
		op->status = status;
	op_finish(op);
}

/* ---- reads and CACHE: rounds over the range ------------------------------------------ */

static struct sub *sub_take(struct pop *op, uint8_t kind, uint64_t off,
                            uint64_t len, uint8_t *buf, bool edge)
{
	struct sub *s = &op->sub[op->used++];
	memset(s, 0, sizeof(*s));
	s->op = op;
	s->kind = kind;
	s->off = off;
	s->len = len;
	s->buf = buf;
	s->edge = edge;
	xnbd_list_init(&s->link);
	return s;
}

/* Copy the part of a fetched edge block (s->buf, a bounce) that the read
 * io asked for into its buffer. */
static void edge_copy(struct xnbd_io *io, const struct sub *s)
{
	uint64_t a = s->off > io->offset ? s->off : io->offset;
	uint64_t e = s->off + s->len;
	if (e > io->offset + io->length)
		e = io->offset + io->length;
	memcpy((uint8_t *)io->buf + (a - io->offset), s->buf + (a - s->off),
	       e - a);
}

/* Copy what the caller asked for out of a fetched bounce block, and zero
 * what an after-switch fetch left, for the part of the range a sub covers. */
static void round_finish(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	struct xnbd_io *io = op->io;
	for (uint32_t i = 0; i < op->used; i++) {
		struct sub *s = &op->sub[i];
		if (s->kind != SUB_FETCH)
			continue;
		if (s->phase == 1)
			set_bits(p, s->off,
			         s->len); /* stored: now it vouches */
		if (op->early || op->type != XNBD_IO_READ || !s->edge)
			continue; /* (an early reply's edges went out with it) */
		edge_copy(io, s);
	}
	op->used = 0;
}

/* Plan and start one round from op->cursor; returns false when the range
 * is done. */
static bool round_start(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	struct xnbd_io *io = op->io;
	bool rd = io->type == XNBD_IO_READ;
	uint64_t end = io->offset + io->length;
	uint64_t bounce_used = 0;
	op->used = 0;
	while (op->cursor <= op->b1 && op->used < op->nsub) {
		uint64_t b = op->cursor;
		bool have = present(p, b);
		/* A run: same state, at most MAX_SEG bytes, and a partial edge
		 * block of a read is a run of its own (it goes through a bounce). */
		uint64_t e = b + 1;
		bool edge_b =
		    rd && !have &&
		    ((b == op->b0 && io->offset % BS) ||
		     (b == op->b1 && end < (b + 1) * BS && end < p->base.size));
		if (!edge_b)
			while (e <= op->b1 && present(p, e) == have &&
			       (have || (e - b) * BS < MAX_SEG) &&
			       !(rd && !have && e == op->b1 &&
			         end < (e + 1) * BS && end < p->base.size))
				e++;
		uint64_t off = b * BS, len = 0;
		for (uint64_t k = b; k < e; k++)
			len += block_len(p, k);
		if (have || (p->switched && !is_write(io->type))) {
			if (rd) {
				/* Present: read the wanted part from the cache.  After a
				 * forced switch an absent block reads as zeroes. */
				uint64_t a =
				    off > io->offset ? off : io->offset;
				uint64_t z = off + len < end ? off + len : end;
				uint8_t *dst =
				    (uint8_t *)io->buf + (a - io->offset);
				if (have) {
					struct sub *s = sub_take(
					    op, SUB_READ, a, z - a, dst, false);
					sub_send(op, s, p->cache, XNBD_IO_READ,
					         0);
				} else {
					memset(dst, 0, z - a);
				}
			}
			op->cursor = e;
			continue;
		}
		/* Absent: fetch whole blocks. */
		uint8_t *buf;
		bool edge = false;
		if (!rd) {
			if (bounce_used + len > CACHE_ROUND && bounce_used)
				break;
			if (len > CACHE_ROUND)
				len = CACHE_ROUND, e = b + len / BS;
			buf = op->bounce + bounce_used;
			bounce_used += len;
		} else if (edge_b) {
			if (!op_edge(op)) {
				op->status = -ENOMEM;
				break;
			}
			buf = op->edge + (b == op->b0 ? 0 : BS);
			edge = true;
		} else {
			buf = (uint8_t *)io->buf + (off - io->offset);
		}
		struct sub *s = sub_take(op, SUB_FETCH, off, len, buf, edge);
		op->round_fetched = true;
		fetch_send(op, s);
		op->cursor = e;
	}
	return op->used > 0 || op->cursor <= op->b1;
}

/* ---- early replies ------------------------------------------------------------------------------ */

/* A small cold read need not wait for its blocks to be stored: once the
 * round that covers its whole range is planned, and what it fetches is
 * small and the stores' copies stay within DETACH_MAX, each fetched
 * piece is copied aside when it arrives (the stores write that copy) and
 * the caller is answered as soon as its buffer is whole.  The op keeps
 * its lock until the stores are done and the bits set, so a write or a
 * read of those blocks still waits for them (the notes at the top hold).
 * Shaves the store (a hand-off to a worker and a page-cache write, about
 * a third of a cold 4 KiB read at depth 1 here) off the read's latency;
 * since the store is made on the loop thread where it can be, it also
 * waits for the replies of its loop iteration to go out (store_later). */
static void early_plan(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	if (op->type != XNBD_IO_READ || op->status || op->cursor <= op->b1 ||
	    p->switched || op->own)
		return;
	uint64_t bytes = 0, edges = 0;
	unsigned waiting = 0;
	for (uint32_t i = 0; i < op->used; i++) {
		struct sub *s = &op->sub[i];
		if (s->kind == SUB_FETCH && s->phase == 0) {
			if (!s->edge)
				bytes += s->len;
			else
				edges += s->len;
			waiting++;
		} else if (s->kind == SUB_FETCH) {
			return; /* a fetch settled already (after a switch) */
		} else if (s->inflight) {
			waiting++;
		}
	}
	/* What an answered op holds: its copy, its edge blocks' bounce and
	 * itself (an op and its subs, counted as 1 KiB). */
	uint64_t held = bytes + (edges ? 2 * BS : 0) + 1024;
	if (!waiting || bytes + edges > EARLY_MAX ||
	    p->detached_bytes + held > DETACH_MAX)
		return;
	if (bytes > op->copy_cap) {
		free(op->copy);
		op->copy_cap = 0;
		if (!(op->copy = malloc(bytes)))
			return; /* then it is answered after the stores */
		op->copy_cap = (uint32_t)bytes;
		p->allocs++;
	}
	uint64_t at = 0;
	for (uint32_t i = 0; i < op->used; i++) {
		struct sub *s = &op->sub[i];
		if (s->kind == SUB_FETCH && !s->edge) {
			s->store = op->copy + at;
			at += s->len;
		}
	}
	op->copy_len = held;
	p->detached_bytes += held; /* reserved until the op ends */
	op->unreplied = waiting;
	op->early = true;
}

/* The data of sub s is in: put it in place (the wanted part of an edge
 * block; the stores' copy of the rest), and answer when all is there. */
static void early_got(struct pop *op, struct sub *s)
{
	struct xnbd_io *io = op->io;
	if (s->kind == SUB_FETCH && s->edge) {
		edge_copy(io, s);
	} else if (s->kind == SUB_FETCH && s->phase == 0) {
		/* (after a switch: not stored) */
		memcpy(s->store, s->buf, s->len);
		s->buf = s->store;
	}
	if (--op->unreplied || op->status)
		return;
	struct xnbd_proxy *p = op->p;
	op->replied = true;
	p->detached++;
	io->status = 0;
	xnbd__io_complete(&p->base, io);
}

/* ---- writes ------------------------------------------------------------------------------ */

/* Stage 0: fetch the absent edge blocks a partial write covers.  Stage 1:
 * merge and write the cache.  Stage 2: set the bits. */
static void write_stage(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	struct xnbd_io *io = op->io;
	uint64_t off = io->offset, end = io->offset + io->length;
	bool zero = io->type != XNBD_IO_WRITE;
	uint32_t wflags = io->flags & XNBD_IO_FUA;
	uint32_t zflags =
	    io->type == XNBD_IO_ZERO
	        ? io->flags & (XNBD_IO_NO_HOLE | XNBD_IO_FAST_ZERO)
	        : 0;
	if (op->stage == 0) {
		uint64_t blocks[2] = {op->b0, op->b1};
		op->used = 0;
		for (int k = 0; k < 2; k++) {
			uint64_t b = blocks[k];
			if (k == 1 && b == op->b0)
				break;
			bool whole =
			    off <= b * BS && end >= b * BS + block_len(p, b);
			if (whole || present(p, b))
				continue;
			if (zflags & XNBD_IO_FAST_ZERO) {
				op->status = -ENOTSUP; /* a fetch is not fast */
				return;
			}
			if (!op_edge(op)) {
				op->status = -ENOMEM;
				return;
			}
			struct sub *s =
			    sub_take(op, SUB_FETCH, b * BS, block_len(p, b),
			             op->edge + k * BS, true);
			s->phase = 0;
			fetch_send(op, s);
		}
		return;
	}
	if (op->stage == 1) {
		uint64_t ws = off, we = end;
		uint32_t nfetch = op->used;
		for (uint32_t k = 0; k < nfetch; k++) {
			struct sub *s = &op->sub[k];
			uint64_t bs = s->off, bl = s->len;
			uint64_t s0 = off > bs ? off : bs;
			uint64_t s1 = end < bs + bl ? end : bs + bl;
			uint8_t *dst = s->buf + (s0 - bs);
			if (zero)
				memset(dst, 0, s1 - s0);
			else
				memcpy(dst,
				       (const uint8_t *)io->buf + (s0 - off),
				       s1 - s0);
			s->kind = SUB_WRITE;
			sub_send(op, s, p->cache, XNBD_IO_WRITE, wflags);
			if (bs <= ws)
				ws = bs + bl < we ? bs + bl : we;
			else if (bs + bl >= we)
				we = bs > ws ? bs : ws;
		}
		if (ws < we) {
			struct sub *s = sub_take(
			    op, SUB_WRITE, ws, we - ws,
			    zero ? NULL : (uint8_t *)io->buf + (ws - off),
			    false);
			/* A write from a pipe is of whole blocks (proxy_pipe_ok):
			 * nothing was fetched, and this is its only write. */
			sub_send_from(op, s, p->cache,
			              zero ? XNBD_IO_ZERO : XNBD_IO_WRITE,
			              wflags | (zero ? zflags : 0),
			              op->pipe_fd);
		}
		return;
	}
	/* Stage 2: everything landed; the cache vouches for these blocks. */
	set_bits(p, op->b0 * BS, (op->b1 - op->b0 + 1) * BS);
}

/* ---- block status ---------------------------------------------------------------------- */

static void block_status(struct xnbd_proxy *p, struct xnbd_io *io)
{
	if (!(io->flags & XNBD_IO_STATUS_CACHED)) {
		/* Allocation is the upstream's business: say "data". */
		io->extents[0] = (struct xnbd_extent){io->length, 0};
		io->n_extents = 1;
		return;
	}
	uint64_t end = io->offset + io->length, pos = io->offset;
	uint64_t scanned = 0;
	uint32_t n = 0;
	while (pos < end && scanned < STATUS_SCAN) {
		uint64_t b = pos / BS;
		bool have = present(p, b);
		uint64_t e = (b + 1) * BS;
		scanned++;
		while (e < end && present(p, e / BS) == have &&
		       scanned < STATUS_SCAN) {
			e += BS;
			scanned++;
		}
		if (e > end)
			e = end;
		if (n == io->max_extents)
			break;
		io->extents[n++] =
		    (struct xnbd_extent){e - pos, have ? XNBD_STATE_CACHED : 0};
		pos = e;
	}
	io->n_extents = n;
}

/* ---- the op machine ------------------------------------------------------------------------ */

static void op_run(struct pop *op)
{
	struct xnbd_proxy *p = op->p;
	while (op->pending == 0) {
		struct xnbd_io *io = op->io;
		if (op->status) {
			op_finish(op);
			return;
		}
		switch (op->type) {
		case XNBD_IO_READ:
		case XNBD_IO_CACHE:
			if (op->type == XNBD_IO_CACHE && op->stage == 0 &&
			    cache_op_buffers(p, op) < 0) {
				op->status = -ENOMEM;
				continue;
			}
			if (op->stage > 0)
				round_finish(op);
			if (op->early) { /* one round only, stored now */
				op_finish(op);
				return;
			}
			op->stage++;
			if (round_start(op)) {
				if (op->stage == 1)
					early_plan(op);
				continue;
			}
			op_finish(op);
			return;
		case XNBD_IO_FLUSH:
			op->stage++;
			persist(p, &op->pw, op_persisted, op);
			return;
		default: /* WRITE, ZERO, TRIM */
			if (op->stage == 3) {
				if (io->flags & XNBD_IO_FUA) {
					/* The data is durable; its bits must be too. */
					op->stage++;
					persist(p, &op->pw, op_persisted, op);
					return;
				}
				op_finish(op);
				return;
			}
			write_stage(op);
			op->stage++;
			continue;
		}
	}
}

/* How many sub-I/Os a round of a read of blocks b0..b1 would use, at
 * most ROUND_SUBS: a run per change of state, absent runs split at
 * MAX_SEG, and the two edge blocks on their own. */
static uint32_t read_subs(const struct xnbd_proxy *p, uint64_t b0, uint64_t b1)
{
	uint32_t n = 2;
	uint64_t run = 0;
	bool prev = false;
	for (uint64_t b = b0; b <= b1 && n < ROUND_SUBS; b++) {
		bool have = present(p, b);
		if (b == b0 || have != prev ||
		    (!have && ++run * BS >= MAX_SEG)) {
			n++;
			run = 0;
		}
		prev = have;
	}
	return n < ROUND_SUBS ? n : ROUND_SUBS;
}

static int submit_op(struct xnbd_proxy *p, struct xnbd_io *io,
                     struct xnbd_client *own, int pipe_fd)
{
	if (io->length == 0 && io->type != XNBD_IO_FLUSH)
		return XNBD_IO_COMPLETED;
	if (io->type == XNBD_IO_BLOCK_STATUS) {
		block_status(p, io);
		return XNBD_IO_COMPLETED;
	}
	if (io->type == XNBD_IO_CACHE && p->switched)
		return XNBD_IO_COMPLETED; /* nothing to fetch from any more */
	uint64_t b0 = io->length ? io->offset / BS : 0;
	uint64_t b1 = io->length ? (io->offset + io->length - 1) / BS : 0;
	bool fetch = false; /* does it need the upstream (and a lock)? */
	if (io->type == XNBD_IO_READ || io->type == XNBD_IO_CACHE) {
		for (uint64_t b = b0; b <= b1 && !fetch; b++)
			fetch = !present(p, b);
		if (!fetch && io->type == XNBD_IO_CACHE)
			return XNBD_IO_COMPLETED;
	}
	/* Sub-I/Os a round may need: a write's two edge fetches and its
	 * middle; a read's runs (fewer only means more rounds); a CACHE op's
	 * come with its slot, so the queued ones cost a small op each. */
	uint32_t nsub = 3;
	if (io->type == XNBD_IO_READ)
		nsub = read_subs(p, b0, b1);
	else if (io->type == XNBD_IO_CACHE)
		nsub = 0;
	struct pop *op = op_new(p, nsub);
	if (!op)
		return -ENOMEM;
	if (io->type == XNBD_IO_CACHE)
		nsub = ROUND_SUBS;
	op->io = io;
	op->type = io->type;
	op->own = own;
	op->pipe_fd = pipe_fd;
	op->nsub = nsub;
	op->b0 = b0;
	op->b1 = b1;
	op->cursor = b0;
	/* Bounce memory is taken when needed: a read's or write's two edge
	 * blocks when they must be fetched, a CACHE op's round buffer with its
	 * slot (op_run), so queued requests cost only their op. */
	int done = 0;
	op->inline_done = &done;
	bool go = true;
	if (io->type == XNBD_IO_CACHE) {
		if (p->cache_ops < MAX_CACHE_OPS) {
			p->cache_ops++;
			op->cache_slot = true;
		} else {
			xnbd_list_insert(p->cacheq.prev, &op->link);
			go = false;
		}
	}
	if (go && (is_write(io->type) || fetch))
		go = lock_or_wait(p, op);
	if (go)
		op_run(op);
	if (done)
		return XNBD_IO_COMPLETED;
	op->inline_done = NULL;
	return XNBD_IO_PENDING;
}

static int proxy_submit(struct xnbd_backend *b, struct xnbd_io *io)
{
	return submit_op((struct xnbd_proxy *)b, io, NULL, -1);
}

/* A write of whole blocks needs nothing merged from the upstream, so its
 * data may go from the pipe it came in straight into the cache image. */
static bool proxy_pipe_ok(const struct xnbd_backend *b, uint64_t off,
                          uint64_t len)
{
	const struct xnbd_proxy *p = (const struct xnbd_proxy *)b;
	uint64_t end = off + len;
	return len && off % BS == 0 && (end % BS == 0 || end == b->size) &&
	       xnbd__backend_takes_pipe(p->cache, off, len);
}

static int proxy_write_pipe(struct xnbd_backend *b, struct xnbd_io *io,
                            int pipe_fd)
{
	if (!proxy_pipe_ok(b, io->offset, io->length))
		return -EOPNOTSUPP;
	return submit_op((struct xnbd_proxy *)b, io, NULL, pipe_fd);
}

static void proxy_backend_free(struct xnbd_backend *b)
{
	(void)b; /* the proxy is freed with xnbd_proxy_free() */
}

static void proxy_abort(struct xnbd_backend *b)
{
	struct xnbd_proxy *p = (struct xnbd_proxy *)b;
	if (p->giving_up || p->freeing)
		return;
	p->giving_up = true;
	if (p->upq_len)
		plog(p, XNBD_LOG_WARNING,
		     "giving up %" PRIu64 " fetch(es) waiting for the upstream",
		     p->upq_len);
	/* From the loop: the caller walks its sessions, which our failures
	 * could free. */
	uv_idle_start(&p->reaper, reap_cb);
}

/* Reads of present blocks take no lock (see the notes at the top), so one
 * wholly present may be sent straight from the cache image. */
static int proxy_read_fd(struct xnbd_backend *b, uint64_t off, uint64_t len,
                         int *fd, uint64_t *fd_off)
{
	struct xnbd_proxy *p = (struct xnbd_proxy *)b;
	uint64_t b0 = off / BS, b1 = (off + len - 1) / BS;
	/* The range's own blocks only (at most 8192): a search for the next
	 * clear bit would walk a warm bitmap to its end. */
	for (uint64_t i = b0; i <= b1; i++)
		if (!present(p, i))
			return -EAGAIN;
	return xnbd__backend_read_fd(p->cache, off, len, fd, fd_off);
}

static const struct xnbd__backend_ops proxy_ops = {
    .name = "proxy",
    .submit = proxy_submit,
    .abort = proxy_abort,
    .read_fd = proxy_read_fd,
    .write_pipe = proxy_write_pipe,
    .pipe_ok = proxy_pipe_ok,
    .free = proxy_backend_free,
};

/* ---- the upstream connection ------------------------------------------------------------------- */

static void retry_timer_cb(uv_timer_t *t);

static void upstream_lost(struct xnbd_client *c, int status, void *ud)
{
	struct xnbd_proxy *p = ud;
	if (c != p->up)
		return;
	p->up_ok = false;
	p->up = NULL;
	reap_client(p, c);
	if (p->switched || p->freeing)
		return;
	plog(p, XNBD_LOG_WARNING,
	     "upstream %s:%s lost (%s); cached blocks are still served, the "
	     "rest wait; reconnecting",
	     p->host, p->port, strerror(status < 0 ? -status : EIO));
	p->retry_ms = RETRY_MIN_MS;
	p->attempts = 0;
	if (!p->trying)
		uv_timer_start(&p->retry_timer, retry_timer_cb, p->retry_ms, 0);
}

/* Make c, connected, the upstream; the old one (if any) goes, and what it
 * had in flight is sent again on c. */
static void upstream_set(struct xnbd_proxy *p, struct xnbd_client *c)
{
	struct xnbd_client *old = p->up;
	p->up = c;
	p->up_ok = true;
	/* perhaps another way to the upstream, or another upstream */
	xnbd__fetchctl_reset(&p->fc);
	xnbd_client_on_disconnect(c, upstream_lost, p);
	uv_timer_stop(&p->retry_timer);
	if (old) {
		xnbd_client_on_disconnect(old, NULL, NULL);
		/* Its requests complete with -ECANCELED, inline, and are sent
		 * again on c. */
		xnbd_client_free(old);
	}
	upq_pump(p);
}

static int dupstr(char **dst, const char *src)
{
	char *d = strdup(src ? src : "");
	if (!d)
		return -ENOMEM;
	free(*dst);
	*dst = d;
	return 0;
}

static void try_done(struct xnbd_proxy *p, int status);

static void try_connected(struct xnbd_client *c, int status, void *ud)
{
	struct xnbd_proxy *p = ud;
	if (status == 0 && xnbd_client_size(c) != p->base.size)
		status = -EINVAL;
	if (status == 0) {
		p->trying = NULL;
		if (p->trying_user) {
			/* The new place is the upstream from now on. */
			char *h = p->host, *po = p->port, *n = p->name;
			p->host = p->try_host;
			p->port = p->try_port;
			p->name = p->try_name;
			p->try_host = h;
			p->try_port = po;
			p->try_name = n;
		}
		plog(p, XNBD_LOG_NOTICE,
		     "upstream %s:%s export \"%s\" connected", p->host, p->port,
		     p->name);
		upstream_set(p, c);
		try_done(p, 0);
		return;
	}
	p->trying = NULL;
	reap_client(p, c);
	if (status == -EINVAL)
		plog(p, XNBD_LOG_ERR,
		     "upstream %s:%s export \"%s\" has %" PRIu64
		     " bytes, not the %" PRIu64 " of this proxy: not used",
		     p->trying_user ? p->try_host : p->host,
		     p->trying_user ? p->try_port : p->port,
		     p->trying_user ? p->try_name : p->name,
		     xnbd_client_size(c), p->base.size);
	try_done(p, status);
}

static void try_done(struct xnbd_proxy *p, int status)
{
	bool user = p->trying_user;
	xnbd_proxy_cb cb = p->try_cb;
	void *ud = p->try_ud;
	p->trying_user = false;
	p->try_cb = NULL;
	if (status && !user && !p->up_ok && !p->switched && !p->freeing) {
		if (p->attempts++ % 10 == 0)
			plog(p, XNBD_LOG_WARNING,
			     "upstream %s:%s: %s; %" PRIu64
			     " requests wait; trying again",
			     p->host, p->port, strerror(-status), p->upq_len);
		p->retry_ms = p->retry_ms * 2 > RETRY_MAX_MS ? RETRY_MAX_MS
		                                             : p->retry_ms * 2;
	}
	if (!p->up_ok && !p->switched && !p->freeing && !p->trying)
		uv_timer_start(&p->retry_timer, retry_timer_cb, p->retry_ms, 0);
	if (cb)
		cb(p, status, ud);
}

static int try_connect(struct xnbd_proxy *p, const char *host, const char *port,
                       const char *name)
{
	struct xnbd_client *c;
	int r = xnbd_client_new(p->loop, &c);
	if (r < 0)
		return r;
	xnbd_client_set_log(c, p->log, p->log_ud);
	r = xnbd_client_connect(c, host, port, name, try_connected, p);
	if (r < 0) {
		xnbd_client_free(c);
		return r;
	}
	p->trying = c;
	return 0;
}

static void retry_timer_cb(uv_timer_t *t)
{
	struct xnbd_proxy *p = t->data;
	if (p->up_ok || p->trying || p->switched || p->freeing)
		return;
	int r = try_connect(p, p->host, p->port, p->name);
	if (r < 0)
		try_done(p, r);
}

int xnbd_proxy_reconnect(struct xnbd_proxy *p, const char *host,
                         const char *port, const char *name, xnbd_proxy_cb cb,
                         void *ud)
{
	if (!p->opened)
		return -EINVAL;
	if (p->switched)
		return -EALREADY;
	if (!host || !port)
		return -EINVAL;
	if (p->trying) {
		/* A user's word beats an automatic attempt; two users' collide. */
		if (p->trying_user)
			return -EBUSY;
		struct xnbd_client *c = p->trying;
		p->trying = NULL;
		xnbd_client_free(c); /* its callback does not run */
	}
	uv_timer_stop(&p->retry_timer);
	int r;
	if ((r = dupstr(&p->try_host, host)) < 0 ||
	    (r = dupstr(&p->try_port, port)) < 0 ||
	    (r = dupstr(&p->try_name, name)) < 0 ||
	    (r = try_connect(p, host, port, name ? name : "")) < 0) {
		/* Nothing started: the automatic retries go on. */
		if (!p->up_ok)
			uv_timer_start(&p->retry_timer, retry_timer_cb,
			               p->retry_ms, 0);
		return r;
	}
	p->trying_user = true;
	p->try_cb = cb;
	p->try_ud = ud;
	plog(p, XNBD_LOG_NOTICE, "reconnecting to %s:%s export \"%s\"", host,
	     port, name ? name : "");
	return 0;
}

/* ---- switch --------------------------------------------------------------------------------------- */

static void job_end(struct xnbd_proxy_job *job, int status);
static void xnbd_proxy_job_cancel_connecting(struct xnbd_proxy_job *job);

int xnbd_proxy_switch(struct xnbd_proxy *p, int force)
{
	if (!p->opened)
		return -EINVAL;
	if (p->switched)
		return -EALREADY;
	uint64_t missing = p->nblocks - xnbd_bitmap_count(p->bm);
	if (missing && !force)
		return -EBUSY;
	p->switched = true;
	/* Fills stop first: letting the upstream go below completes their
	 * fetches inline, and they must not start new ones. */
	xnbd_list_for_each(l, &p->jobs)
	{
		struct xnbd_proxy_job *j =
		    xnbd_container_of(l, struct xnbd_proxy_job, link);
		if (!j->err)
			j->err = -EALREADY;
		j->cancel = true;
	}
	plog(p, XNBD_LOG_NOTICE,
	     "switched to target mode on %s%s (%" PRIu64 " blocks missing%s)",
	     p->cache_path, force && missing ? ", forced" : "", missing,
	     missing ? ", reading as zeroes" : "");
	uv_timer_stop(&p->retry_timer);
	if (p->trying) {
		struct xnbd_client *c = p->trying;
		xnbd_proxy_cb cb = p->try_cb;
		void *ud = p->try_ud;
		p->trying = NULL;
		p->trying_user = false;
		p->try_cb = NULL;
		xnbd_client_free(c);
		if (cb)
			cb(p, -EALREADY, ud);
	}
	if (p->up) {
		struct xnbd_client *c = p->up;
		p->up = NULL;
		p->up_ok = false;
		xnbd_client_on_disconnect(c, NULL, NULL);
		/* fetches in flight end as after a switch */
		xnbd_client_free(c);
	}
	upq_pump(p);
	/* Fills that are idle end now; the others when their fetches have. */
	struct xnbd_list *l = p->jobs.next, *n;
	for (; l != &p->jobs; l = n) {
		n = l->next;
		struct xnbd_proxy_job *j =
		    xnbd_container_of(l, struct xnbd_proxy_job, link);
		if (j->running == 0 && j->started)
			job_end(j, j->err);
		else if (j->own && !j->started)
			xnbd_proxy_job_cancel_connecting(j);
	}
	return 0;
}

/* ---- background fill ---------------------------------------------------------------------------------- */

static void job_next(struct xnbd_proxy_job *job, unsigned k);

static void job_end(struct xnbd_proxy_job *job, int status)
{
	struct xnbd_proxy *p = job->p;
	if (!xnbd_list_empty(&job->link))
		xnbd_list_remove(&job->link);
	if (job->own)
		reap_client(p, job->own);
	if (status == 0 && job->progress)
		job->progress(p, xnbd_bitmap_count(p->bm), p->nblocks, job->ud);
	xnbd_proxy_cb done = job->done;
	void *ud = job->ud;
	free(job);
	if (done)
		done(p, status, ud);
	maybe_free(p);
}

static void job_progress(struct xnbd_proxy_job *job)
{
	uint64_t now = uv_now(job->p->loop);
	if (job->progress && now - job->last_progress >= PROGRESS_MS) {
		job->last_progress = now;
		job->progress(job->p, xnbd_bitmap_count(job->p->bm),
		              job->p->nblocks, job->ud);
	}
}

static void fill_done(struct xnbd_io *io)
{
	struct xnbd_proxy_job *job = io->user_data;
	unsigned k = (unsigned)(((char *)io - (char *)job->fill) /
	                        (ptrdiff_t)sizeof(job->fill[0]));
	job->running--;
	if (io->status && !job->err) {
		job->err = io->status;
		plog(job->p, XNBD_LOG_ERR,
		     "cache fill: fetch at %" PRIu64 ": %s", io->offset,
		     strerror(-io->status));
	}
	job_progress(job);
	job_next(job, k);
}

/* Give fill slot k its next chunk, or end the job when all is done. */
static void job_next(struct xnbd_proxy_job *job, unsigned k)
{
	struct xnbd_proxy *p = job->p;
	while (!job->cancel && !job->err) {
		uint64_t b = xnbd_bitmap_next_clear(p->bm, job->cursor);
		if (b >= p->nblocks)
			break;
		uint64_t off = b * BS;
		uint64_t len = p->base.size - off < FILL_CHUNK
		                   ? p->base.size - off
		                   : FILL_CHUNK;
		job->cursor = b + len / BS + (len % BS ? 1 : 0);
		struct xnbd_io *io = &job->fill[k].io;
		*io = (struct xnbd_io){.type = XNBD_IO_CACHE,
		                       .offset = off,
		                       .length = len,
		                       .done = fill_done,
		                       .user_data = job};
		p->base.in_flight++;
		int r = submit_op(p, io, job->own, -1);
		if (r == XNBD_IO_PENDING) {
			job->running++;
			return;
		}
		p->base.in_flight--;
		if (r < 0 || io->status)
			job->err = r < 0 ? r : io->status;
	}
	if (job->running)
		return;
	if (job->cancel || job->err) {
		job_end(job, job->err ? job->err : -ECANCELED);
		return;
	}
	if (xnbd_bitmap_count(p->bm) < p->nblocks) {
		/* Blocks behind the cursor stay cached, so this is not reached
		 * while the proxy fetches; after a switch nothing is fetched. */
		if (p->switched || job->passes++ >= 2) {
			job_end(job, p->switched ? -EALREADY : -EIO);
			return;
		}
		job->cursor = 0;
		job_next(job, k);
		return;
	}
	job_end(job, 0);
}

static void job_kick(struct xnbd__job *j);

static void job_start(struct xnbd_proxy_job *job)
{
	job->started = true;
	/* Held across the loop: a slot whose work all finished inline must
	 * not end (and free) the job under the loop's feet. */
	job->running++;
	for (unsigned k = 0; k < FILL_OPS && !job->cancel && !job->err; k++)
		job_next(job, k);
	if (--job->running == 0)
		job_next(job, 0); /* nothing under way: finish it there */
}

static void job_connected(struct xnbd_client *c, int status, void *ud)
{
	struct xnbd_proxy_job *job = ud;
	struct xnbd_proxy *p = job->p;
	if (status == 0 && xnbd_client_size(c) != p->base.size)
		status = -EINVAL;
	if (status || job->cancel) {
		plog(p, XNBD_LOG_ERR, "cache fill: own upstream connection: %s",
		     strerror(-(status ? status : ECANCELED)));
		job->own = NULL;
		reap_client(p, c);
		job->started = true;
		job_end(job, status     ? status
		             : job->err ? job->err
		                        : -ECANCELED);
		return;
	}
	job_start(job);
}

int xnbd_proxy_cache_all(struct xnbd_proxy *p, unsigned flags,
                         xnbd_proxy_progress_cb progress, xnbd_proxy_cb done,
                         void *ud, struct xnbd_proxy_job **out)
{
	if (!p->opened)
		return -EINVAL;
	if (p->switched)
		return -EALREADY;
	struct xnbd_proxy_job *job = calloc(1, sizeof(*job));
	if (!job)
		return -ENOMEM;
	job->p = p;
	job->flags = flags;
	job->progress = progress;
	job->done = done;
	job->ud = ud;
	for (unsigned k = 0; k < FILL_OPS; k++)
		job->fill[k].job = job;
	xnbd_list_insert(p->jobs.prev, &job->link);
	*out = job;
	if (flags & XNBD_PROXY_OWN_CONNECTION) {
		int r = xnbd_client_new(p->loop, &job->own);
		if (r == 0) {
			xnbd_client_set_log(job->own, p->log, p->log_ud);
			r = xnbd_client_connect(job->own, p->host, p->port,
			                        p->name, job_connected, job);
			if (r < 0) {
				xnbd_client_free(job->own);
				job->own = NULL;
			}
		}
		if (r < 0) {
			xnbd_list_remove(&job->link);
			free(job);
			*out = NULL;
			return r;
		}
		return 0;
	}
	/* Start from the loop, so that done never runs inside this call. */
	job->started = false;
	job->kick.work = NULL;
	job->kick.done = job_kick;
	job->running++; /* held by the start */
	if (xnbd__job_submit(&p->jobs_chan, &job->kick) < 0) {
		job->running--;
		job_start(job);
	}
	return 0;
}

static void job_kick(struct xnbd__job *j)
{
	struct xnbd_proxy_job *job =
	    xnbd_container_of(j, struct xnbd_proxy_job, kick);
	job->running--;
	if (job->cancel || job->err) {
		job->started = true;
		job_end(job, job->err ? job->err : -ECANCELED);
		return;
	}
	job_start(job);
}

/* End a fill whose own connection is still being made (its connect
 * callback will not run). */
static void xnbd_proxy_job_cancel_connecting(struct xnbd_proxy_job *job)
{
	xnbd_client_free(job->own);
	job->own = NULL;
	job->started = true;
	job_end(job, job->err ? job->err : -ECANCELED);
}

void xnbd_proxy_job_cancel(struct xnbd_proxy_job *job)
{
	if (!job || job->cancel)
		return;
	job->cancel = true;
	if (job->running == 0 && job->started)
		job_end(job, job->err ? job->err : -ECANCELED);
	else if (job->own && !job->started)
		xnbd_proxy_job_cancel_connecting(job);
}

/* ---- sync -------------------------------------------------------------------------------------------------- */

struct sync_req {
	struct persist_waiter pw;
	struct xnbd_proxy *p;
	xnbd_proxy_cb cb;
	void *ud;
};

static void sync_done(void *ud, int status)
{
	struct sync_req *r = ud;
	r->cb(r->p, status, r->ud);
	free(r);
}

int xnbd_proxy_sync(struct xnbd_proxy *p, xnbd_proxy_cb cb, void *ud)
{
	if (!p->opened)
		return -EINVAL;
	struct sync_req *r = malloc(sizeof(*r));
	if (!r)
		return -ENOMEM;
	r->p = p;
	r->cb = cb;
	r->ud = ud;
	persist(p, &r->pw, sync_done, r);
	return 0;
}

/* ---- open ----------------------------------------------------------------------------------------------------- */

/* Open the bitmap, with the messages its refusals deserve. */
static int open_bitmap(struct xnbd_proxy *p, uint64_t size)
{
	int r = xnbd_bitmap_open(
	    p->bitmap_path, size, BS,
	    (p->flags & XNBD_PROXY_CLEAR_BITMAP) ? XNBD_BITMAP_CLEAR : 0,
	    &p->bm);
	if (r == -EBADMSG)
		plog(p, XNBD_LOG_ERR,
		     "bitmap %s is not an xNBD bitmap, or is damaged; refusing "
		     "to use it, also with --clear-bitmap (it may be other "
		     "data under a mistyped name: check the paths, and remove "
		     "it by hand to start afresh)",
		     p->bitmap_path);
	else if (r == -EBUSY)
		plog(
		    p, XNBD_LOG_ERR,
		    "bitmap %s is in use (another proxy runs on it?); refusing "
		    "to use it",
		    p->bitmap_path);
	else if (r == -EINVAL)
		plog(p, XNBD_LOG_ERR,
		     "bitmap %s was made for another image (block size or "
		     "image size differ from %" PRIu64
		     " bytes in blocks of %u); refusing to use it "
		     "(--clear-bitmap starts afresh)",
		     p->bitmap_path, size, BS);
	else if (r < 0)
		plog(p, XNBD_LOG_ERR, "bitmap %s: %s", p->bitmap_path,
		     strerror(-r));
	return r;
}

/* Open the cache image and the bitmap, in an order that changes neither
 * before both are known to be what they claim: the cache file is grown to
 * the export's size only after the bitmap was accepted, and only when no
 * bit vouches for a block the file did not hold (a cache image deleted,
 * truncated or replaced while its bitmap was kept would otherwise be
 * served as zeroes).  A cache file made here is removed again if the
 * start is refused. */
static int open_cache(struct xnbd_proxy *p, uint64_t size)
{
	bool created = false;
	int fd = open(p->cache_path, O_RDWR | O_CLOEXEC);
	if (fd < 0 && errno == ENOENT) {
		fd = open(p->cache_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC,
		          0600);
		created = fd >= 0;
	}
	if (fd < 0) {
		int e = -errno;
		plog(p, XNBD_LOG_ERR, "cache image %s: %s", p->cache_path,
		     strerror(-e));
		return e;
	}
	struct stat st = {0}, bst;
	int r = fstat(fd, &st) != 0 ? -errno : 0;
	if (r == 0 && stat(p->bitmap_path, &bst) == 0 &&
	    bst.st_dev == st.st_dev && bst.st_ino == st.st_ino) {
		plog(p, XNBD_LOG_ERR,
		     "cache image %s and bitmap %s are the same file; refusing "
		     "to use them",
		     p->cache_path, p->bitmap_path);
		r = -EINVAL;
	}
	bool small = S_ISREG(st.st_mode) && (uint64_t)st.st_size < size;
	if (r == 0 && small && st.st_size > 0 &&
	    xnbd__bitmap_file_is_ours(fd)) {
		/* Growing it would ruin somebody's bitmap: CACHE and BITMAP
		 * swapped, or another proxy's bitmap named by mistake. */
		plog(
		    p, XNBD_LOG_ERR,
		    "cache image %s is an xNBD bitmap (are the cache image and "
		    "the bitmap swapped?); refusing to use it",
		    p->cache_path);
		r = -EINVAL;
	}
	if (r == 0)
		r = open_bitmap(p, size);
	if (r == 0 && small && xnbd_bitmap_count(p->bm)) {
		uint64_t b =
		    xnbd_bitmap_next_set(p->bm, (uint64_t)st.st_size / BS);
		if (b < xnbd_bitmap_blocks(p->bm)) {
			plog(
			    p, XNBD_LOG_ERR,
			    "cache image %s holds %" PRIu64
			    " bytes, but bitmap %s says block %" PRIu64
			    " (byte %" PRIu64
			    ") and maybe more are cached: the cache image was "
			    "truncated or replaced; refusing to serve what it "
			    "lacks (restore it, or start with --clear-bitmap to "
			    "fetch every block again)",
			    p->cache_path, (uint64_t)st.st_size, p->bitmap_path,
			    b, b * BS);
			r = -EUCLEAN;
		}
	}
	if (r == 0 && small && ftruncate(fd, (off_t)size) != 0) {
		r = -errno;
		plog(p, XNBD_LOG_ERR,
		     "cache image %s: cannot grow it to %" PRIu64 " bytes: %s",
		     p->cache_path, size, strerror(-r));
	}
	struct xnbd_backend *b = NULL;
	if (r == 0) {
		r = xnbd__backend_file_from_fd(p->loop, fd,
		                               XNBD__OPEN_ALLOC_AHEAD, &b);
		if (r < 0)
			plog(p, XNBD_LOG_ERR, "cache image %s: %s",
			     p->cache_path, strerror(-r));
	}
	if (r == 0 && xnbd_backend_size(b) != size) {
		uint64_t have = xnbd_backend_size(b);
		plog(p, XNBD_LOG_ERR,
		     "cache image %s has %" PRIu64
		     " bytes, more than the %" PRIu64
		     " of the upstream export (or it cannot grow); refusing to "
		     "use it",
		     p->cache_path, have, size);
		r = have > size ? -EFBIG : -ENOSPC;
	}
	if (r < 0) {
		if (b)
			xnbd_backend_free(b); /* closes fd */
		else
			close(fd);
		xnbd_bitmap_close(p->bm);
		p->bm = NULL;
		if (created)
			unlink(p->cache_path);
		return r;
	}
	p->cache = b;
	p->cache_fd = fd;
	/* The same file, for direct stores (none where the file system
	 * refuses O_DIRECT). */
	if (xnbd__backend_file_direct_twin(b, &p->cache_direct) < 0)
		p->cache_direct = NULL;
	return 0;
}

static void open_connected(struct xnbd_client *c, int status, void *ud)
{
	struct xnbd_proxy *p = ud;
	xnbd_proxy_cb cb = p->open_cb;
	void *cud = p->open_ud;
	p->open_cb = NULL;
	p->trying = NULL;
	if (status) {
		plog(p, XNBD_LOG_ERR, "upstream %s:%s export \"%s\": %s",
		     p->host, p->port, p->name, strerror(-status));
		reap_client(p, c);
		cb(p, status, cud);
		return;
	}
	uint64_t size = xnbd_client_size(c);
	int r = open_cache(p, size);
	if (r < 0) {
		reap_client(p, c);
		cb(p, r, cud);
		return;
	}
	p->base.size = size;
	p->nblocks = xnbd_bitmap_blocks(p->bm);
	p->base.caps = XNBD_CAP_FLUSH | XNBD_CAP_FUA | XNBD_CAP_TRIM |
	               XNBD_CAP_ZERO | XNBD_CAP_CACHE | XNBD_CAP_BLOCK_STATUS |
	               XNBD_CAP_CACHE_STATUS | XNBD_CAP_MULTI_CONN;
	if (p->flags & XNBD_PROXY_READONLY)
		p->base.caps |= XNBD_CAP_READ_ONLY;
	if (xnbd_backend_caps(p->cache) & XNBD_CAP_FAST_ZERO)
		p->base.caps |= XNBD_CAP_FAST_ZERO;
	p->opened = true;
	upstream_set(p, c);
	uv_timer_start(&p->persist_timer, persist_timer_cb, PERSIST_MS,
	               PERSIST_MS);
	plog(p, XNBD_LOG_INFO,
	     "proxy of %s:%s export \"%s\": %" PRIu64 " bytes, %" PRIu64
	     " of %" PRIu64 " blocks cached",
	     p->host, p->port, p->name, size, xnbd_bitmap_count(p->bm),
	     p->nblocks);
	cb(p, 0, cud);
}

int xnbd_proxy_new(uv_loop_t *loop, struct xnbd_proxy **out)
{
	struct xnbd_proxy *p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	int r = xnbd__jobs_init(&p->jobs_chan, loop);
	if (r < 0) {
		free(p);
		return r;
	}
	p->loop = loop;
	p->base.ops = &proxy_ops;
	p->base.loop = loop;
	p->cache_fd = -1;
	p->retry_ms = RETRY_MIN_MS;
	xnbd__fetchctl_init(&p->fc, (uint64_t)MAX_UP * MAX_SEG, 0);
	xnbd_list_init(&p->upq);
	xnbd_list_init(&p->locked);
	xnbd_list_init(&p->waiting);
	xnbd_list_init(&p->cacheq);
	xnbd_list_init(&p->spare);
	xnbd_list_init(&p->pw_now);
	xnbd_list_init(&p->pw_next);
	xnbd_list_init(&p->jobs);
	uv_timer_init(loop, &p->persist_timer);
	uv_timer_init(loop, &p->retry_timer);
	uv_idle_init(loop, &p->reaper);
	uv_idle_init(loop, &p->later_idle);
	xnbd_list_init(&p->later);
	p->persist_timer.data = p->retry_timer.data = p->reaper.data = p;
	p->later_idle.data = p;
	uv_unref((uv_handle_t *)&p->persist_timer);
	*out = p;
	return 0;
}

void xnbd_proxy_set_log(struct xnbd_proxy *p, xnbd_log_fn fn, void *ud)
{
	p->log = fn;
	p->log_ud = ud;
}

/* XNBD_FETCH_WINDOW in the environment fixes the fetch window (to compare
 * with the window the proxy picks, or to overrule it): bytes, with an
 * optional K, M or G; 0 for no window.  Returns 0 where unset or bad (a
 * window of its own), or the bytes (UINT64_MAX for none). */
static uint64_t fetch_window_env(struct xnbd_proxy *p)
{
	const char *e = getenv("XNBD_FETCH_WINDOW");
	if (!e || !*e)
		return 0;
	uint64_t v;
	if (xnbd_parse_size(e, &v) < 0) {
		plog(
		    p, XNBD_LOG_WARNING,
		    "XNBD_FETCH_WINDOW=%s is not a size: the proxy sizes its fetch "
		    "window itself",
		    e);
		return 0;
	}
	if (!v)
		return UINT64_MAX;
	plog(p, XNBD_LOG_INFO,
	     "fetch window fixed at %llu bytes (XNBD_FETCH_WINDOW)",
	     (unsigned long long)v);
	return v;
}

int xnbd_proxy_open(struct xnbd_proxy *p, const char *host, const char *port,
                    const char *name, const char *cache, const char *bitmap,
                    unsigned flags, xnbd_proxy_cb cb, void *ud)
{
	if (p->opened || p->open_cb || !host || !port || !cache || !bitmap ||
	    !cb)
		return -EINVAL;
	int r;
	if ((r = dupstr(&p->host, host)) < 0 ||
	    (r = dupstr(&p->port, port)) < 0 ||
	    (r = dupstr(&p->name, name)) < 0 ||
	    (r = dupstr(&p->cache_path, cache)) < 0 ||
	    (r = dupstr(&p->bitmap_path, bitmap)) < 0)
		return r;
	p->flags = flags;
	xnbd__fetchctl_init(&p->fc, (uint64_t)MAX_UP * MAX_SEG,
	                    fetch_window_env(p));
	struct xnbd_client *c;
	if ((r = xnbd_client_new(p->loop, &c)) < 0)
		return r;
	xnbd_client_set_log(c, p->log, p->log_ud);
	r = xnbd_client_connect(c, p->host, p->port, p->name, open_connected,
	                        p);
	if (r < 0) {
		xnbd_client_free(c);
		return r;
	}
	p->trying = c;
	p->open_cb = cb;
	p->open_ud = ud;
	return 0;
}

/* ---- state ---------------------------------------------------------------------------------------------------- */

uint64_t xnbd_proxy_fetch_window(const struct xnbd_proxy *p,
                                 uint64_t *latency_ns)
{
	if (latency_ns)
		*latency_ns = p->fc.base;
	return p->fc.window;
}

struct xnbd_backend *xnbd_proxy_backend(struct xnbd_proxy *p)
{
	return p->opened ? &p->base : NULL;
}

int xnbd_proxy_state(const struct xnbd_proxy *p)
{
	if (p->switched)
		return XNBD_PROXY_SWITCHED;
	return p->up_ok ? XNBD_PROXY_CONNECTED : XNBD_PROXY_WAITING;
}

uint64_t xnbd_proxy_blocks(const struct xnbd_proxy *p)
{
	return p->nblocks;
}

uint64_t xnbd_proxy_cached_blocks(const struct xnbd_proxy *p)
{
	return p->bm ? xnbd_bitmap_count(p->bm) : 0;
}

const char *xnbd_proxy_upstream_host(const struct xnbd_proxy *p)
{
	return p->host;
}

const char *xnbd_proxy_upstream_port(const struct xnbd_proxy *p)
{
	return p->port;
}

const char *xnbd_proxy_upstream_name(const struct xnbd_proxy *p)
{
	return p->name;
}

const char *xnbd_proxy_cache_path(const struct xnbd_proxy *p)
{
	return p->cache_path;
}

const char *xnbd_proxy_bitmap_path(const struct xnbd_proxy *p)
{
	return p->bitmap_path;
}

uint64_t xnbd_proxy_waiting(const struct xnbd_proxy *p)
{
	return p->upq_len;
}

struct xnbd__proxy_ctl_area *xnbd__proxy_ctl_area(struct xnbd_proxy *p)
{
	return &p->ctl_area;
}

/* ---- free ----------------------------------------------------------------------------------------------------- */

static void handle_closed(uv_handle_t *h)
{
	struct xnbd_proxy *p = h->data;
	if (--p->handles == 0) {
		xnbd__chan_destroy(&p->jobs_chan);
		free(p);
	}
}

/* The last step of xnbd_proxy_free(), once nothing runs any more. */
static void free_now(struct xnbd_proxy *p)
{
	if (p->freed)
		return;
	p->freed = true;
	if (p->bm && p->cache) {
		/* Blocking, once: the last bits become durable after their data. */
		xnbd_bitmap_stage(p->bm);
		if (fdatasync(p->cache_fd) != 0 ||
		    xnbd_bitmap_write_staged(p->bm) != 0)
			plog(
			    p, XNBD_LOG_ERR,
			    "cannot make the cache durable at exit: the blocks cached "
			    "since the last sync will be fetched again");
	}
	for (unsigned i = 0; i < p->nreap; i++)
		xnbd_client_free(p->reap[i]);
	p->nreap = 0;
	xnbd_bitmap_close(p->bm);
	while (p->nbounce)
		free(p->bounce_pool[--p->nbounce]);
	while (!xnbd_list_empty(&p->spare)) {
		struct pop *op =
		    xnbd_container_of(p->spare.next, struct pop, link);
		xnbd_list_remove(&op->link);
		op_unkeep(op);
	}
	p->nspare = 0;
	xnbd_backend_free(p->cache_direct);
	xnbd_backend_free(p->cache);
	free(p->host);
	free(p->port);
	free(p->name);
	free(p->try_host);
	free(p->try_port);
	free(p->try_name);
	free(p->cache_path);
	free(p->bitmap_path);
	p->handles = 4;
	uv_close((uv_handle_t *)&p->persist_timer, handle_closed);
	uv_close((uv_handle_t *)&p->retry_timer, handle_closed);
	uv_close((uv_handle_t *)&p->reaper, handle_closed);
	uv_close((uv_handle_t *)&p->later_idle, handle_closed);
}

static void maybe_free(struct xnbd_proxy *p)
{
	if (p->freeing && !p->persisting && p->base.in_flight == 0 &&
	    p->detached == 0 && xnbd_list_empty(&p->jobs))
		free_now(p);
}

void xnbd_proxy_free(struct xnbd_proxy *p)
{
	if (!p || p->freeing)
		return;
	p->freeing = true;
	uv_timer_stop(&p->retry_timer);
	uv_timer_stop(&p->persist_timer);
	/* Fills stop; what waits for the upstream is given up. */
	struct xnbd_list *l = p->jobs.next, *n;
	for (; l != &p->jobs; l = n) {
		n = l->next;
		xnbd_proxy_job_cancel(
		    xnbd_container_of(l, struct xnbd_proxy_job, link));
	}
	if (p->trying) {
		struct xnbd_client *c = p->trying;
		xnbd_proxy_cb cb = p->try_cb;
		void *ud = p->try_ud;
		p->trying = NULL;
		p->trying_user = false;
		p->try_cb = NULL;
		xnbd_client_free(c);
		if (cb)
			cb(p, -ECANCELED,
			   ud); /* a user's reconnect gets its answer */
	}
	if (p->up) {
		struct xnbd_client *c = p->up;
		p->up = NULL;
		p->up_ok = false;
		xnbd_client_on_disconnect(c, NULL, NULL);
		xnbd_client_free(c);
	}
	upq_pump(p);
	maybe_free(p);
}
