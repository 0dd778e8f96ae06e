/* pool.c - worker threads for blocking I/O and the channels by which it
 * comes back to the loop (see pool.h for why not libuv's).
 *
 * Notes on the design:
 * - One pool per process, as libuv's: up to POOL_MAX threads, started as
 *   the queue needs them and never stopped.  They block every signal.
 * - A worker posts a finished I/O to its channel's done list and writes
 *   the channel's eventfd, both under the channel's mutex, and touches the
 *   channel no more after unlocking it.  The loop drains the list under the
 *   same mutex; so once the loop has completed everything a channel had
 *   outstanding, no worker can still be inside it, and it may be freed.
 * - The serial queue (the write lane) is a list of its own in the channel,
 *   served by one runner at a time: the runner is queued in the pool when
 *   the first I/O arrives and leaves when it finds the list empty, deciding
 *   both under the channel's mutex, in the same critical section as its
 *   last post.
 */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pool.h"

#define POOL_MAX 16U
#define Q_NEXT(io) ((io)->priv.u.q.next)
#define Q_CHAN(io) ((struct xnbd__chan *)(io)->priv.u.q.chan)

_Static_assert(sizeof(((struct xnbd_io *)0)->priv.u) == sizeof(uv_work_t),
               "struct xnbd_io keeps its layout");

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cond;
	struct xnbd_io *head, *tail;
	unsigned queued, threads, idle;
	struct xnbd__chan *chans; /* every open channel, for fork() */
} pool = {PTHREAD_MUTEX_INITIALIZER,
          PTHREAD_COND_INITIALIZER,
          NULL,
          NULL,
          0,
          0,
          0,
          NULL};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* pool.threads > 0, readable without the mutex: the per-I/O check. */
static atomic_bool pool_up;

/* Forks this process has been the child of (xnbd__fork_generation). */
static atomic_uint fork_gen;

/* fork() (a daemon's start) copies channels, but no worker: the child
 * starts a fresh pool, and gives each channel an eventfd of its own under
 * the same number (the parent's would be shared with the child, and each
 * could read the other's wake-ups).  I/O in flight at the fork is lost to
 * the child: fork only with none. */
static void pool_atfork_prepare(void)
{
	pthread_mutex_lock(&pool.mu);
}

static void pool_atfork_parent(void)
{
	pthread_mutex_unlock(&pool.mu);
}

static void pool_atfork_child(void)
{
	atomic_fetch_add(&fork_gen, 1);
	pthread_mutex_init(&pool.mu, NULL);
	pthread_cond_init(&pool.cond, NULL);
	pool.head = pool.tail = NULL;
	pool.queued = pool.threads = pool.idle = 0;
	atomic_store(&pool_up, false);
	for (struct xnbd__chan *c = pool.chans; c; c = c->next_chan) {
		int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
		if (fd >= 0 && fd != c->efd) {
			(void)dup3(fd, c->efd, O_CLOEXEC);
			close(fd);
		}
		c->signalled = false;
	}
}

static void pool_atfork(void)
{
	(void)pthread_atfork(pool_atfork_prepare, pool_atfork_parent,
	                     pool_atfork_child);
}

static void append(struct xnbd_io **head, struct xnbd_io **tail,
                   struct xnbd_io *io)
{
	Q_NEXT(io) = NULL;
	if (*tail)
		Q_NEXT(*tail) = io;
	else
		*head = io;
	*tail = io;
}

static struct xnbd_io *pop(struct xnbd_io **head, struct xnbd_io **tail)
{
	struct xnbd_io *io = *head;
	if (io) {
		*head = Q_NEXT(io);
		if (!*head)
			*tail = NULL;
	}
	return io;
}

/* Under c->mu: add io to the done list and wake the loop. */
static void post_locked(struct xnbd__chan *c, struct xnbd_io *io)
{
	append(&c->done, &c->done_tail, io);
	if (!c->signalled) {
		c->signalled = true;
		uint64_t one = 1;
		/* Fails only when the counter would overflow: it is set then. */
		ssize_t n;
		do
			n = write(c->efd, &one, sizeof(one));
		while (n < 0 && errno == EINTR);
	}
}

static void run_lane(struct xnbd__chan *c)
{
	uv_mutex_lock(&c->mu);
	for (;;) {
		struct xnbd_io *io = pop(&c->lane, &c->lane_tail);
		if (!io) {
			c->lane_running = false;
			uv_mutex_unlock(&c->mu);
			return; /* c is not touched again */
		}
		uv_mutex_unlock(&c->mu);
		c->work(io);
		uv_mutex_lock(&c->mu);
		post_locked(c, io);
	}
}

static void *worker(void *arg)
{
	(void)arg;
	pthread_mutex_lock(&pool.mu);
	for (;;) {
		while (!pool.head) {
			pool.idle++;
			pthread_cond_wait(&pool.cond, &pool.mu);
			pool.idle--;
		}
		struct xnbd_io *io = pop(&pool.head, &pool.tail);
		pool.queued--;
		pthread_mutex_unlock(&pool.mu);
		struct xnbd__chan *c = Q_CHAN(io);
		if (io == &c->runner) {
			run_lane(c);
		} else {
			c->work(io);
			uv_mutex_lock(&c->mu);
			post_locked(c, io);
			uv_mutex_unlock(&c->mu);
		}
		pthread_mutex_lock(&pool.mu);
	}
	return NULL;
}

int xnbd__thread_start(void *(*fn)(void *), void *arg, const char *name)
{
	pthread_attr_t attr;
	if (pthread_attr_init(&attr))
		return -ENOMEM;
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t t;
	int r = pthread_create(&t, &attr, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	/* Named here, so that it never shows with its creator's name once
	 * this returns (the thread may not have run yet). */
	if (r == 0)
		(void)pthread_setname_np(t, name);
	return -r;
}

/* Under pool.mu: one more worker. */
static int spawn_locked(void)
{
	int r = xnbd__thread_start(worker, NULL, "xnbd-io");
	if (r < 0)
		return r;
	pool.threads++;
	atomic_store(&pool_up, true);
	return 0;
}

/* Make sure a worker runs: 0, or a negative errno when none can start. */
static int pool_ready(void)
{
	if (atomic_load_explicit(&pool_up, memory_order_relaxed))
		return 0; /* workers never stop (but in a child of fork) */
	pthread_mutex_lock(&pool.mu);
	int r = pool.threads ? 0 : spawn_locked();
	pthread_mutex_unlock(&pool.mu);
	return r;
}

/* Queue io for a worker (one runs: pool_ready), starting another while
 * every one is busy. */
static void pool_queue(struct xnbd_io *io)
{
	pthread_mutex_lock(&pool.mu);
	if (pool.queued + 1 > pool.idle && pool.threads < POOL_MAX)
		(void)spawn_locked(); /* the running ones get to it otherwise */
	append(&pool.head, &pool.tail, io);
	pool.queued++;
	bool wake = pool.idle > 0;
	pthread_mutex_unlock(&pool.mu);
	/* Signalled after unlocking: a worker woken under the mutex would
	 * only block on it again, and its wake-up would cost two more futex
	 * calls.  A worker that goes idle meanwhile finds the queue first. */
	if (wake)
		pthread_cond_signal(&pool.cond);
}

unsigned xnbd__fork_generation(void)
{
	return atomic_load_explicit(&fork_gen, memory_order_relaxed);
}

unsigned xnbd__pool_threads(void)
{
	pthread_mutex_lock(&pool.mu);
	unsigned n = pool.threads;
	pthread_mutex_unlock(&pool.mu);
	return n;
}

/* ---- the loop's side ------------------------------------------------------ */

static void chan_poll_cb(uv_poll_t *h, int status, int events);
static void chan_closed_cb(uv_handle_t *h);

static int chan_open(struct xnbd__chan *c)
{
	int r = uv_poll_init(c->loop, &c->poll, c->efd);
	if (r < 0)
		return r;
	c->poll.data = c;
	/* Fails only for bad arguments (libuv 1.44 aborts where it cannot
	 * grow its tables). */
	r = uv_poll_start(&c->poll, UV_READABLE, chan_poll_cb);
	assert(r == 0);
	c->poll_open = true;
	return 0;
}

/* Complete a list of posted I/O.  The one that leaves nothing outstanding
 * waits for the handle to close (chan_closed_cb); c is not touched after
 * the completion that may free it. */
static void chan_deliver(struct xnbd__chan *c, struct xnbd_io *io)
{
	while (io) {
		struct xnbd_io *next = Q_NEXT(io);
		if (c->outstanding == 1 && c->poll_open && !c->poll_closing) {
			c->held = io; /* nothing follows it */
			c->poll_closing = true;
			uv_close((uv_handle_t *)&c->poll, chan_closed_cb);
			return;
		}
		c->outstanding--;
		c->complete(io);
		io = next;
	}
}

static void chan_poll_cb(uv_poll_t *h, int status, int events)
{
	(void)status;
	(void)events;
	struct xnbd__chan *c = h->data;
	uint64_t v;
	ssize_t n;
	do
		n = read(c->efd, &v, sizeof(v));
	while (n < 0 && errno == EINTR);
	uv_mutex_lock(&c->mu);
	struct xnbd_io *io = c->done, *tail = c->done_tail;
	c->done = c->done_tail = NULL;
	c->signalled = false;
	uv_mutex_unlock(&c->mu);
	if (c->reap) {
		struct xnbd_io *more = c->reap(c);
		if (tail)
			Q_NEXT(tail) = more;
		else
			io = more;
	}
	chan_deliver(c, io);
}

static void chan_closed_cb(uv_handle_t *h)
{
	struct xnbd__chan *c = h->data;
	struct xnbd_io *io = c->held;
	c->held = NULL;
	c->poll_open = false;
	c->poll_closing = false;
	/* Submitted while the handle closed: watch for them again.  What they
	 * posted meanwhile left the eventfd readable. */
	int r;
	if (c->outstanding > 1 && (r = chan_open(c)) < 0) {
		/* I/O under way could never complete.  The same descriptor was
		 * watched a moment ago: only a full epoll (max_user_watches)
		 * gets here. */
		fprintf(stderr,
		        "libxnbd: cannot watch the I/O channel again: %s\n",
		        uv_strerror(r));
		abort();
	}
	c->outstanding--;
	c->complete(io);
}

int xnbd__chan_init(struct xnbd__chan *c, uv_loop_t *loop,
                    void (*work)(struct xnbd_io *io),
                    void (*complete)(struct xnbd_io *io))
{
	*c = (struct xnbd__chan){
	    .loop = loop, .work = work, .complete = complete};
	c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (c->efd < 0)
		return -errno;
	if (uv_mutex_init(&c->mu) < 0) {
		close(c->efd);
		return -ENOMEM;
	}
	c->runner.priv.u.q.chan = c;
	pthread_once(&atfork_once, pool_atfork);
	pthread_mutex_lock(&pool.mu);
	c->next_chan = pool.chans;
	if (pool.chans)
		pool.chans->prev_chan = &c->next_chan;
	c->prev_chan = &pool.chans;
	pool.chans = c;
	pthread_mutex_unlock(&pool.mu);
	return 0;
}

void xnbd__chan_destroy(struct xnbd__chan *c)
{
	/* Nothing outstanding: every worker that posted here has left the
	 * mutex (the loop took its I/O under it). */
	assert(c->outstanding == 0 && !c->poll_open && !c->poll_closing);
	pthread_mutex_lock(&pool.mu);
	*c->prev_chan = c->next_chan;
	if (c->next_chan)
		c->next_chan->prev_chan = c->prev_chan;
	pthread_mutex_unlock(&pool.mu);
	uv_mutex_destroy(&c->mu);
	close(c->efd);
	c->efd = -1;
}

int xnbd__chan_expect(struct xnbd__chan *c)
{
	int r;
	if (!c->poll_open && !c->poll_closing && (r = chan_open(c)) < 0)
		return r;
	c->outstanding++;
	return 0;
}

void xnbd__chan_post(struct xnbd__chan *c, struct xnbd_io *io)
{
	io->priv.u.q.chan = c;
	uv_mutex_lock(&c->mu);
	post_locked(c, io);
	uv_mutex_unlock(&c->mu);
}

int xnbd__chan_requeue(struct xnbd__chan *c, struct xnbd_io *io)
{
	int r = pool_ready();
	if (r < 0)
		return r;
	io->priv.u.q.chan = c;
	pool_queue(io);
	return 0;
}

void xnbd__chan_link(struct xnbd_io **head, struct xnbd_io **tail,
                     struct xnbd_io *io)
{
	append(head, tail, io);
}

int xnbd__chan_submit(struct xnbd__chan *c, struct xnbd_io *io, bool serial)
{
	/* Everything that can fail, first: then nothing is to be undone. */
	int r = pool_ready();
	if (r < 0 || (r = xnbd__chan_expect(c)) < 0)
		return r;
	io->priv.u.q.chan = c;
	if (serial) {
		uv_mutex_lock(&c->mu);
		append(&c->lane, &c->lane_tail, io);
		bool start = !c->lane_running;
		c->lane_running = true;
		uv_mutex_unlock(&c->mu);
		if (start)
			pool_queue(&c->runner);
	} else {
		pool_queue(io);
	}
	return 0;
}

/* ---- jobs ----------------------------------------------------------------- */

static void job_work(struct xnbd_io *io)
{
	struct xnbd__job *j = (struct xnbd__job *)io;
	j->work(j);
}

static void job_done(struct xnbd_io *io)
{
	struct xnbd__job *j = (struct xnbd__job *)io;
	j->done(j);
}

int xnbd__jobs_init(struct xnbd__chan *c, uv_loop_t *loop)
{
	return xnbd__chan_init(c, loop, job_work, job_done);
}

int xnbd__job_submit(struct xnbd__chan *c, struct xnbd__job *j)
{
	if (j->work)
		return xnbd__chan_submit(c, &j->io, false);
	int r = xnbd__chan_expect(c);
	if (r == 0)
		xnbd__chan_post(c, &j->io);
	return r;
}
