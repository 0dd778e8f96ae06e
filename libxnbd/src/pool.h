/* pool.h - worker threads for blocking I/O, and the channel by which a
 * backend's finished I/O comes back to its loop thread (private).
 *
 * Why not uv_queue_work() and uv_async_t: in libuv before 1.45, the loop
 * thread busy-waits (997 pauses, then sched_yield, over and over) for any
 * thread that is inside uv_async_send() at the moment the loop looks at the
 * handle; libuv's own thread pool signals its completions the same way.
 * On two cores the sender is often preempted right there (its eventfd
 * write just woke the loop thread), and the loop burns the rest of its
 * slice: 23% of the server's CPU at 4 KiB random writes, half of it in a
 * proxy's cold reads (perf, libuv 1.44.2 of Debian 12).  Here a worker
 * signals a plain eventfd, under the channel's mutex, and the loop reads
 * it through a uv_poll_t: nobody spins.
 *
 * A channel is opened once per backend.  Its poll handle is open only
 * while I/O is outstanding: an idle backend holds no handle, so that the
 * owner may free it in the callback of its last I/O and close the loop at
 * once (the contract of xnbd_backend_free()).  For that the last
 * completion is held back until the handle is closed, and delivered from
 * the close callback.
 *
 * An I/O in the pool uses io->priv.u.q (its link and its channel); the
 * rest of io->priv stays the backend's.
 *
 * The library's own jobs (a server's reloads, a proxy's syncs) and its
 * calls deferred to the loop use channels too (struct xnbd__job), so
 * nothing in libxnbd but name lookups runs on libuv's pool. */
#ifndef XNBD_POOL_H
#define XNBD_POOL_H

#include <stdbool.h>
#include <stddef.h>

#include "xnbd/backend.h"

struct xnbd__chan {
	uv_loop_t *loop;
	void (*work)(struct xnbd_io *io);     /* on a worker thread */
	void (*complete)(struct xnbd_io *io); /* on the loop thread */
	int efd;
	uv_mutex_t mu;
	/* Under mu: */
	/* efd written since the last drain */
	bool signalled;
	struct xnbd_io *done, *done_tail; /* worked, to complete */
	struct xnbd_io *lane, *lane_tail; /* serial I/O queued */
	bool lane_running;                /* the runner is queued or running */
	/* Loop thread only: */
	size_t outstanding; /* submitted, not yet completed */
	bool poll_open, poll_closing;
	struct xnbd_io *held; /* the last completion, waiting for the close */
	uv_poll_t poll;
	/* Optional, loop thread: I/O finished elsewhere that signals efd
	 * itself (a backend's io_uring), to complete with the done list: a
	 * list linked as the pool links I/O (xnbd__chan_link). */
	struct xnbd_io *(*reap)(struct xnbd__chan *c);
	/* The serial queue's place in the pool's queue (never submitted as
	 * I/O of its own). */
	struct xnbd_io runner;
	/* In the pool's list of channels, under its mutex. */
	struct xnbd__chan *next_chan, **prev_chan;
};

/* Open a channel on loop: 0 or a negative errno. */
int xnbd__chan_init(struct xnbd__chan *c, uv_loop_t *loop,
                    void (*work)(struct xnbd_io *io),
                    void (*complete)(struct xnbd_io *io));

/* Close it: nothing may be outstanding (every completion delivered). */
void xnbd__chan_destroy(struct xnbd__chan *c);

/* Run c->work(io) on a worker thread, then c->complete(io) on the loop
 * thread, never inside this call.  Serial I/O runs one at a time, in the
 * order submitted (the write lane); the rest in parallel.  0, or a
 * negative errno when no worker can be started or the loop cannot watch
 * the channel (nothing is queued then).
 *
 * fork(): the child starts a pool of its own and gives every channel a
 * fresh eventfd; I/O in flight at the fork never completes in the child,
 * so fork with none (a daemon's start). */
int xnbd__chan_submit(struct xnbd__chan *c, struct xnbd_io *io, bool serial);

/* For a completion that no pool worker makes (a thread of the caller's
 * own, or the loop itself): count it as outstanding (the loop thread; 0,
 * or a negative errno when the loop cannot watch the channel), then hand
 * it over exactly once with xnbd__chan_post(), from any thread.  A thread
 * must not touch the channel after its post returns. */
int xnbd__chan_expect(struct xnbd__chan *c);
void xnbd__chan_post(struct xnbd__chan *c, struct xnbd_io *io);
/* An I/O already counted (xnbd__chan_expect) that its other way could
 * not finish: run c->work on a worker after all, then c->complete as
 * usual.  0, or a negative errno when no worker can start. */
int xnbd__chan_requeue(struct xnbd__chan *c, struct xnbd_io *io);
/* For c->reap: append io to the list *head ... *tail. */
void xnbd__chan_link(struct xnbd_io **head, struct xnbd_io **tail,
                     struct xnbd_io *io);

/* Jobs: work of the library's own (a bitmap sync, a reload) on the pool,
 * or a call deferred to the loop.  A job channel runs j->work on a worker
 * and then j->done on the loop thread; with no work, j->done just runs
 * from the loop, later, with no thread involved.  As for I/O, the last
 * outstanding job's done runs only once the channel holds no handle, so
 * that it may free the channel's owner. */
struct xnbd__job {
	struct xnbd_io io; /* the channel's link: only io.priv.u.q is used */
	void (*work)(struct xnbd__job *j); /* on a worker, or NULL */
	void (*done)(struct xnbd__job *j); /* on the loop thread */
};

int xnbd__jobs_init(struct xnbd__chan *c, uv_loop_t *loop);

/* 0, or a negative errno when nothing was queued. */
int xnbd__job_submit(struct xnbd__chan *c, struct xnbd__job *j);

/* Start a detached thread named name (at most 15 bytes) that blocks
 * every signal (the loop thread takes them): 0 or a negative errno. */
int xnbd__thread_start(void *(*fn)(void *), void *arg, const char *name);

/* How many fork()s this process came out of as the child, once a
 * channel was opened (getpid() would be a system call each time): what
 * a process made before a fork is its parent's once this moves. */
unsigned xnbd__fork_generation(void);
/* Workers started so far (tests). */
unsigned xnbd__pool_threads(void);

#endif
