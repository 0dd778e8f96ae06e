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
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pool.h"

#define POOL_MAX 16U
#define Q_NEXT(io) ((io)->priv.u.q.next)
#define Q_CHAN(io) ((struct xnbd__chan *)(io)->priv.u.q.chan)

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cond;
	struct xnbd_io *head, *tail;
	unsigned queued, threads, idle;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL,
          0, 0, 0};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* In a child of fork() no worker runs: start afresh. */
static void pool_atfork_child(void)
{
	pthread_mutex_init(&pool.mu, NULL);
	pthread_cond_init(&pool.cond, NULL);
	pool.head = pool.tail = NULL;
	pool.queued = pool.threads = pool.idle = 0;
}

static void pool_atfork(void)
{
	(void)pthread_atfork(NULL, NULL, pool_atfork_child);
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

/* Under pool.mu: one more worker, blocking every signal (the loop thread
 * takes them). */
static int spawn_locked(void)
{
	pthread_attr_t attr;
	if (pthread_attr_init(&attr))
		return -ENOMEM;
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_t t;
	int r = pthread_create(&t, &attr, worker, NULL);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&attr);
	if (r)
		return -r;
	pool.threads++;
	return 0;
}

/* Queue io for a worker; fails only when none runs and none can start. */
static int pool_queue(struct xnbd_io *io)
{
	pthread_once(&atfork_once, pool_atfork);
	pthread_mutex_lock(&pool.mu);
	if (pool.queued + 1 > pool.idle && pool.threads < POOL_MAX) {
		int r = spawn_locked();
		if (r < 0 && pool.threads == 0) {
			pthread_mutex_unlock(&pool.mu);
			return r;
		}
	}
	append(&pool.head, &pool.tail, io);
	pool.queued++;
	if (pool.idle)
		pthread_cond_signal(&pool.cond);
	pthread_mutex_unlock(&pool.mu);
	return 0;
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
	r = uv_poll_start(&c->poll, UV_READABLE, chan_poll_cb);
	if (r < 0) {
		/* Never seen: the handle is new and the descriptor valid. */
		fprintf(stderr, "libxnbd: cannot watch an eventfd: %s\n",
		        uv_strerror(r));
		abort();
	}
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
	struct xnbd_io *io = c->done;
	c->done = c->done_tail = NULL;
	c->signalled = false;
	uv_mutex_unlock(&c->mu);
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
	if (c->outstanding > 1 && chan_open(c) < 0) {
		fprintf(stderr, "libxnbd: cannot watch an eventfd again\n");
		abort();
	}
	c->outstanding--;
	c->complete(io);
}

int xnbd__chan_init(struct xnbd__chan *c, uv_loop_t *loop,
                    void (*work)(struct xnbd_io *io),
                    void (*complete)(struct xnbd_io *io))
{
	*c = (struct xnbd__chan){.loop = loop, .work = work,
	                         .complete = complete};
	c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (c->efd < 0)
		return -errno;
	if (uv_mutex_init(&c->mu) < 0) {
		close(c->efd);
		return -ENOMEM;
	}
	c->runner.priv.u.q.chan = c;
	return 0;
}

void xnbd__chan_destroy(struct xnbd__chan *c)
{
	/* Nothing outstanding: every worker that posted here has left the
	 * mutex (the loop took its I/O under it). */
	uv_mutex_destroy(&c->mu);
	close(c->efd);
	c->efd = -1;
}

int xnbd__chan_submit(struct xnbd__chan *c, struct xnbd_io *io, bool serial)
{
	io->priv.u.q.chan = c;
	int r = 0;
	if (serial) {
		uv_mutex_lock(&c->mu);
		append(&c->lane, &c->lane_tail, io);
		bool start = !c->lane_running;
		c->lane_running = true;
		uv_mutex_unlock(&c->mu);
		if (start && (r = pool_queue(&c->runner)) < 0) {
			/* No runner was running, so io was alone on the lane. */
			uv_mutex_lock(&c->mu);
			c->lane = c->lane_tail = NULL;
			c->lane_running = false;
			uv_mutex_unlock(&c->mu);
			return r;
		}
	} else if ((r = pool_queue(io)) < 0) {
		return r;
	}
	/* A worker may post before the handle watches: the eventfd stays
	 * readable until drained. */
	if (!c->poll_open && !c->poll_closing && chan_open(c) < 0) {
		fprintf(stderr, "libxnbd: cannot watch an eventfd\n");
		abort();
	}
	c->outstanding++;
	return 0;
}
