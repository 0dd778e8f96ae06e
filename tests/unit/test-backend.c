/* test-backend.c - the plain file backend driven through the public API:
 * small writes queued on its write lane (many at once, in order, their
 * failures reported one by one), small writes made on the loop thread and
 * the choice between the two, and the I/O around them.  The test runs the
 * loop itself; every I/O is checked for its status and its data.  Tests
 * other than those of the choice keep small writes on the lane
 * (open_backend), where they exercise the pool and its channel. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <sys/statfs.h>
#include <unistd.h>

#include "xnbd/backend.h"

#include "backend.h"
#include "pool.h"
#include "unit-main.h"

#define IMG_SIZE (4U * 1024U * 1024U)
#define NIO 600U

static uv_loop_t loop;
static char img_path[64];
static struct xnbd_backend *backend;

struct op {
	struct xnbd_io io;
	int ncalls;
	uint8_t data[8192];
};

static int completed;
static bool loop_closed;

static void op_done(struct xnbd_io *io)
{
	struct op *o = io->user_data;
	o->ncalls++;
	completed++;
}

#define STALL_NS (10ULL * 1000 * 1000) /* the backend's default */
#define NO_STALL UINT64_MAX /* so that a slow machine cannot make one */

static void open_backend(void)
{
	ck_assert_int_eq(xnbd_backend_file_open(&loop, img_path, 0, &backend),
	                 0);
	xnbd__file_write_place(backend, true, NO_STALL);
}

static void setup(void)
{
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	snprintf(img_path, sizeof(img_path), "/tmp/xnbd-backend-%d.img",
	         (int)getpid());
	int fd = open(img_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, IMG_SIZE), 0);
	close(fd);
	open_backend();
	completed = 0;
	loop_closed = false;
}

static void teardown(void)
{
	if (backend)
		xnbd_backend_free(backend);
	backend = NULL;
	unlink(img_path);
	if (loop_closed)
		return;
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
}

/* Set o up for an I/O (from buf, or the op's own data), not called yet. */
static void op_init(struct op *o, uint32_t type, uint32_t flags, uint64_t off,
                    uint64_t len, void *buf)
{
	memset(&o->io, 0, sizeof(o->io));
	o->ncalls = 0;
	o->io.type = type;
	o->io.flags = flags;
	o->io.offset = off;
	o->io.length = len;
	o->io.buf = buf ? buf : o->data;
	o->io.done = op_done;
	o->io.user_data = o;
}

/* Submit (from buf, or the op's own data); an I/O finished inline counts
 * as done at once. */
static void submit_buf(struct op *o, uint32_t type, uint32_t flags,
                       uint64_t off, uint64_t len, void *buf)
{
	op_init(o, type, flags, off, len, buf);
	int r = xnbd_backend_submit(backend, &o->io);
	ck_assert_int_ge(r, 0);
	if (r == XNBD_IO_COMPLETED) {
		o->ncalls++;
		completed++;
	}
}

static void submit(struct op *o, uint32_t type, uint64_t off, uint64_t len)
{
	submit_buf(o, type, 0, off, len, NULL);
}

/* The file fd holds data (len bytes) at off. */
static void file_holds(int fd, uint64_t off, const void *data, size_t len)
{
	uint8_t *got = malloc(len);
	ck_assert_ptr_nonnull(got);
	ck_assert_int_eq(pread(fd, got, len, (off_t)off), (ssize_t)len);
	ck_assert(memcmp(got, data, len) == 0);
	free(got);
}

static void fill(uint8_t *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(seed * 131u + i * 7u + (i >> 9));
}

/* Many small writes submitted before the loop runs once: they queue on
 * the lane while its first batch is written; every one completes once,
 * and where two overlap the later one's data is in the image. */
START_TEST(lane_writes_all_land_in_order)
{
	static struct op ops[NIO];
	uint8_t *model = calloc(1, IMG_SIZE);
	ck_assert_ptr_nonnull(model);
	srand(20261203);
	for (unsigned i = 0; i < NIO; i++) {
		/* Sizes of 1 byte to 8 KiB, unaligned; every fourth write goes
		 * over the range of the one before it. */
		uint64_t len = 1 + (uint64_t)(rand() % 8192);
		uint64_t off = (i % 4 == 3)
		                   ? ops[i - 1].io.offset + 1
		                   : (uint64_t)(rand() % (IMG_SIZE - 8192));
		fill(ops[i].data, len, i);
		submit(&ops[i], XNBD_IO_WRITE, off, len);
		memcpy(model + off, ops[i].data, len);
		/* A batch may finish meanwhile. */
		if (i == NIO / 2)
			uv_run(&loop, UV_RUN_NOWAIT);
	}
	uv_run(&loop, UV_RUN_DEFAULT);
	for (unsigned i = 0; i < NIO; i++) {
		ck_assert_int_eq(ops[i].ncalls, 1);
		ck_assert_int_eq(ops[i].io.status, 0);
	}
	ck_assert_int_eq(completed, (int)NIO);
	/* Read back through the backend and through the file. */
	static struct op rd;
	for (uint64_t off = 0; off < IMG_SIZE; off += sizeof(rd.data)) {
		submit(&rd, XNBD_IO_READ, off, sizeof(rd.data));
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(rd.io.status, 0);
		ck_assert_msg(
		    memcmp(rd.data, model + off, sizeof(rd.data)) == 0,
		    "backend read at %llu differs", (unsigned long long)off);
	}
	int fd = open(img_path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	uint8_t *file = malloc(IMG_SIZE);
	ck_assert_ptr_nonnull(file);
	ck_assert_int_eq(pread(fd, file, IMG_SIZE, 0), (ssize_t)IMG_SIZE);
	close(fd);
	ck_assert(memcmp(file, model, IMG_SIZE) == 0);
	free(file);
	free(model);
}
END_TEST

/* A write the file refuses (here: past the process's file size limit, on
 * an image file truncated under the backend) fails alone; the writes
 * queued with it on the lane succeed, and the lane goes on. */
START_TEST(lane_write_failure_is_reported_alone)
{
	static struct op ops[64];
	int fd = open(img_path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, IMG_SIZE / 2), 0);
	close(fd);
	signal(SIGXFSZ, SIG_IGN);
	struct rlimit rl = {IMG_SIZE / 2, IMG_SIZE / 2};
	ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
	for (unsigned i = 0; i < 64; i++) {
		/* Odd ones past the limit. */
		uint64_t off = (i % 2 ? IMG_SIZE / 2 + 4096 : 0) + i * 4096;
		fill(ops[i].data, 4096, i);
		submit(&ops[i], XNBD_IO_WRITE, off, 4096);
	}
	uv_run(&loop, UV_RUN_DEFAULT);
	for (unsigned i = 0; i < 64; i++) {
		ck_assert_int_eq(ops[i].ncalls, 1);
		if (i % 2)
			ck_assert_int_eq(ops[i].io.status, -EFBIG);
		else
			ck_assert_int_eq(ops[i].io.status, 0);
	}
	static struct op rd;
	for (unsigned i = 0; i < 64; i += 2) {
		submit(&rd, XNBD_IO_READ, i * 4096, 4096);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(rd.io.status, 0);
		ck_assert(memcmp(rd.data, ops[i].data, 4096) == 0);
	}
	/* And the lane takes new writes. */
	fill(ops[0].data, 4096, 99);
	submit(&ops[0], XNBD_IO_WRITE, 8192, 4096);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(ops[0].io.status, 0);
}
END_TEST

/* Writes that bypass the lane (large ones, FUA ones) interleave with
 * lane writes; a flush after they completed finds all of them in the
 * file. */
#define BIG (256U * 1024U)
START_TEST(lane_and_pool_writes_mix)
{
	static struct op small[32], big[4], fua[4], fl;
	uint8_t *bigbuf = malloc(4 * BIG);
	ck_assert_ptr_nonnull(bigbuf);
	for (unsigned i = 0; i < 32; i++) {
		uint64_t base = (uint64_t)i * 65536;
		fill(small[i].data, 4096, i + 1);
		submit(&small[i], XNBD_IO_WRITE, base, 4096);
		if (i % 8 == 0) {
			unsigned k = i / 8;
			fill(bigbuf + k * BIG, BIG, 200 + k);
			submit_buf(&big[k], XNBD_IO_WRITE, 0,
			           2U * 1024 * 1024 + k * BIG, BIG,
			           bigbuf + k * BIG);
			fill(fua[k].data, 4096, 300 + k);
			submit_buf(&fua[k], XNBD_IO_WRITE, XNBD_IO_FUA,
			           base + 8192, 4096, NULL);
		}
	}
	uv_run(&loop, UV_RUN_DEFAULT);
	submit(&fl, XNBD_IO_FLUSH, 0, 0);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(fl.io.status, 0);
	int fd = open(img_path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	uint8_t *buf = malloc(BIG);
	ck_assert_ptr_nonnull(buf);
	for (unsigned i = 0; i < 32; i++) {
		ck_assert_int_eq(small[i].ncalls, 1);
		ck_assert_int_eq(small[i].io.status, 0);
		file_holds(fd, (uint64_t)i * 65536, small[i].data, 4096);
	}
	for (unsigned k = 0; k < 4; k++) {
		ck_assert_int_eq(big[k].ncalls, 1);
		ck_assert_int_eq(big[k].io.status, 0);
		ck_assert_int_eq(
		    pread(fd, buf, BIG, 2 * 1024 * 1024 + (off_t)k * BIG),
		    (ssize_t)BIG);
		ck_assert(memcmp(buf, bigbuf + k * BIG, BIG) == 0);
		ck_assert_int_eq(fua[k].ncalls, 1);
		ck_assert_int_eq(fua[k].io.status, 0);
		ck_assert_int_eq(
		    pread(fd, buf, 4096, (off_t)k * 8 * 65536 + 8192), 4096);
		ck_assert(memcmp(buf, fua[k].data, 4096) == 0);
	}
	close(fd);
	free(buf);
	free(bigbuf);
}
END_TEST

/* Large writes take the lane too, spliced or copied (the file system
 * would make them one at a time anyway, and pool threads meeting on the
 * inode's lock spin); FUA writes and reads go to the pool. */
START_TEST(large_writes_take_the_lane)
{
	static struct op big[3], fua, piped, rd;
	uint8_t *buf = malloc(4 * BIG);
	ck_assert_ptr_nonnull(buf);
	uint64_t n0 = xnbd__file_lane_ios(backend);
	for (unsigned k = 0; k < 3; k++) {
		fill(buf + k * BIG, BIG, 40 + k);
		submit_buf(&big[k], XNBD_IO_WRITE, 0, (uint64_t)k * BIG, BIG,
		           buf + k * BIG);
	}
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), n0 + 3);
	fill(fua.data, 4096, 50);
	submit_buf(&fua, XNBD_IO_WRITE, XNBD_IO_FUA, 3 * BIG, 4096, NULL);
	submit_buf(&rd, XNBD_IO_READ, 0, IMG_SIZE - BIG, BIG, buf + 3 * BIG);
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), n0 + 3);

	/* A payload in a pipe, as the server splices it from the socket. */
	int p[2];
	ck_assert_int_eq(pipe(p), 0);
	ck_assert_int_ge(fcntl(p[1], F_SETPIPE_SZ, (int)BIG), (int)BIG);
	uint8_t *pbuf = malloc(BIG);
	ck_assert_ptr_nonnull(pbuf);
	fill(pbuf, BIG, 60);
	ck_assert_int_eq(write(p[1], pbuf, BIG), (ssize_t)BIG);
	memset(&piped.io, 0, sizeof(piped.io));
	piped.io.type = XNBD_IO_WRITE;
	piped.io.offset = IMG_SIZE - 2 * BIG;
	piped.io.length = BIG;
	piped.io.buf = malloc(BIG); /* for a file that refuses splice */
	piped.io.done = op_done;
	piped.io.user_data = &piped;
	ck_assert_int_eq(xnbd__backend_submit_pipe(backend, &piped.io, p[0]),
	                 XNBD_IO_PENDING);
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), n0 + 4);
	uv_run(&loop, UV_RUN_DEFAULT);

	int fd = open(img_path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	for (unsigned k = 0; k < 3; k++) {
		ck_assert_int_eq(big[k].ncalls, 1);
		ck_assert_int_eq(big[k].io.status, 0);
		file_holds(fd, (uint64_t)k * BIG, buf + k * BIG, BIG);
	}
	ck_assert_int_eq(fua.io.status, 0);
	ck_assert_int_eq(rd.io.status, 0);
	ck_assert_int_eq(piped.ncalls, 1);
	ck_assert_int_eq(piped.io.status, 0);
	file_holds(fd, IMG_SIZE - 2 * BIG, pbuf, BIG);
	close(fd);
	close(p[0]);
	close(p[1]);
	free(piped.io.buf);
	free(pbuf);
	free(buf);
}
END_TEST

/* The API lets the backend be freed in the callback of its last I/O, and
 * the loop be closed right after, without another iteration: the lane
 * must have nothing left open by then (no job, no handle). */
static int free_after;

static void free_when_last(struct xnbd_io *io)
{
	op_done(io);
	if (completed == free_after) {
		xnbd_backend_free(backend);
		backend = NULL;
	}
}

START_TEST(backend_freed_in_last_callback)
{
	static struct op ops[50];
	for (int round = 0; round < 3; round++) {
		if (round) { /* a new loop and backend each round */
			ck_assert_int_eq(uv_loop_init(&loop), 0);
			open_backend();
		}
		completed = 0;
		free_after = 10 + 20 * round;
		for (int i = 0; i < free_after; i++) {
			fill(ops[i].data, 4096, (unsigned)i);
			submit(&ops[i], XNBD_IO_WRITE, (uint64_t)i * 4096,
			       4096);
			ops[i].io.done = free_when_last;
			if (round == 2 && i == 5)
				uv_run(&loop, UV_RUN_NOWAIT);
		}
		while (backend)
			uv_run(&loop, UV_RUN_ONCE);
		ck_assert_int_eq(uv_loop_close(&loop), 0);
		loop_closed = true;
		for (int i = 0; i < free_after; i++)
			ck_assert_int_eq(ops[i].ncalls, 1);
	}
}
END_TEST

/* I/O submitted while the backend's completion handle is closing (from a
 * check handle, which runs after the poll phase and before the close
 * callbacks), and from completion callbacks: every one completes once,
 * in a loop that then closes at once. */
#define NCHAIN 400
static struct op chain_ops[NCHAIN];
static int chain_next, check_rounds;

static void chain_done(struct xnbd_io *io);

static void chain_free_when_all(void)
{
	if (completed == NCHAIN && backend) {
		xnbd_backend_free(backend);
		backend = NULL;
	}
}

static void chain_submit(void)
{
	struct op *o = &chain_ops[chain_next];
	memset(&o->io, 0, sizeof(o->io));
	o->ncalls = 0;
	/* Lane writes, FUA writes (the pool) and reads, in turn. */
	o->io.type = (chain_next % 3 == 2) ? XNBD_IO_READ : XNBD_IO_WRITE;
	o->io.flags = (chain_next % 3 == 1) ? XNBD_IO_FUA : 0;
	o->io.offset = (uint64_t)(chain_next % 64) * 4096;
	o->io.length = 4096;
	o->io.buf = o->data;
	o->io.done = chain_done;
	o->io.user_data = o;
	fill(o->data, 4096, (unsigned)chain_next);
	chain_next++;
	int r = xnbd_backend_submit(backend, &o->io);
	ck_assert_int_ge(r, 0);
	if (r == XNBD_IO_COMPLETED) {
		o->ncalls++;
		completed++;
		chain_free_when_all();
	}
}

static void chain_done(struct xnbd_io *io)
{
	op_done(io);
	ck_assert_int_eq(io->status, 0);
	if (chain_next < NCHAIN && chain_next % 2)
		chain_submit();
	chain_free_when_all();
}

static void chain_check(uv_check_t *h)
{
	check_rounds++;
	if (chain_next < NCHAIN)
		chain_submit();
	else
		uv_close((uv_handle_t *)h, NULL);
}

START_TEST(io_submitted_while_the_handle_closes)
{
	uv_check_t check;
	ck_assert_int_eq(uv_check_init(&loop, &check), 0);
	ck_assert_int_eq(uv_check_start(&check, chain_check), 0);
	chain_next = 0;
	check_rounds = 0;
	chain_submit();
	while (backend)
		uv_run(&loop, UV_RUN_ONCE);
	uv_run(&loop, UV_RUN_NOWAIT); /* the check handle's close */
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	loop_closed = true;
	ck_assert_int_eq(chain_next, NCHAIN);
	for (int i = 0; i < NCHAIN; i++)
		ck_assert_int_eq(chain_ops[i].ncalls, 1);
	ck_assert_int_gt(check_rounds, 10);
}
END_TEST

/* Many slow I/Os at once start no more than the pool's 16 threads, and
 * all complete. */
START_TEST(pool_threads_are_bounded)
{
	static struct op ops[200];
	for (int i = 0; i < 200; i++) {
		fill(ops[i].data, 4096, (unsigned)i);
		submit_buf(&ops[i], XNBD_IO_WRITE, XNBD_IO_FUA,
		           (uint64_t)i * 4096, 4096, NULL);
	}
	while (completed < 200)
		uv_run(&loop, UV_RUN_ONCE);
	for (int i = 0; i < 200; i++) {
		ck_assert_int_eq(ops[i].ncalls, 1);
		ck_assert_int_eq(ops[i].io.status, 0);
	}
	unsigned n = xnbd__pool_threads();
	ck_assert_uint_ge(n, 1);
	ck_assert_uint_le(n, 16);
}
END_TEST

/* After fork() (a daemon's start) the child has no worker of the parent's:
 * its I/O must still complete, and parent and child, going on at once,
 * must not take each other's wake-ups (they would share the eventfd). */
static int fork_round(int base)
{
	static struct op ops[60];
	int target = completed + 60;
	for (int i = 0; i < 60; i++) {
		fill(ops[i].data, 4096, (unsigned)(base + i));
		/* lane writes, pool (FUA) writes and reads */
		submit_buf(&ops[i], i % 3 == 2 ? XNBD_IO_READ : XNBD_IO_WRITE,
		           i % 3 == 1 ? XNBD_IO_FUA : 0,
		           (uint64_t)(base + i) * 4096, 4096, NULL);
	}
	while (completed < target)
		uv_run(&loop, UV_RUN_ONCE);
	for (int i = 0; i < 60; i++)
		if (ops[i].ncalls != 1 || ops[i].io.status != 0)
			return -1;
	return 0;
}

/* fork(); in the child (0 returned) the loop is ready to run again and
 * an alarm ends it after 20 s. */
static pid_t fork_child(void)
{
	pid_t pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		alarm(20);
		if (uv_loop_fork(&loop) != 0)
			_exit(2);
	}
	return pid;
}

/* Wait for the child pid, which must exit 0. */
static void child_ok(pid_t pid)
{
	int st;
	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0,
	              "child: status %#x", st);
}

START_TEST(io_goes_on_after_fork)
{
	ck_assert_int_eq(fork_round(0), 0); /* the pool has threads now */
	pid_t pid = fork_child();
	if (pid == 0) {
		for (int k = 0; k < 20; k++)
			if (fork_round(100 + (k % 4) * 64) != 0)
				_exit(3);
		_exit(0);
	}
	for (int k = 0; k < 20; k++)
		ck_assert_int_eq(fork_round(400 + (k % 4) * 64), 0);
	child_ok(pid);
}
END_TEST

/* ---- jobs: the library's own work, and calls deferred to the loop ---- */

#define NJOBS 300
static struct job_rec {
	struct xnbd__job j;
	int ncalls;
	bool work_ran, work_on_loop, done_on_loop;
} jobs[NJOBS];
static struct xnbd__chan *jobs_chan;
static pthread_t loop_thread;
static int jobs_done;

static void job_work_fn(struct xnbd__job *j)
{
	struct job_rec *r = (struct job_rec *)j;
	r->work_ran = true;
	r->work_on_loop = pthread_equal(pthread_self(), loop_thread);
	if ((r - jobs) % 7 == 0)
		usleep(200); /* some finish after others queued behind them */
}

static void job_done_fn(struct xnbd__job *j)
{
	struct job_rec *r = (struct job_rec *)j;
	r->ncalls++;
	r->done_on_loop = pthread_equal(pthread_self(), loop_thread);
	if (++jobs_done == NJOBS) {
		/* The owner goes in the last callback: nothing may be left open. */
		xnbd__chan_destroy(jobs_chan);
		free(jobs_chan);
		jobs_chan = NULL;
	}
}

/* Jobs with work run it on a worker, the others on no thread at all; each
 * done runs once, on the loop thread, never inside the submit; the
 * channel freed in the last done leaves a loop that closes at once. */
START_TEST(jobs_run_once_and_the_last_may_free_their_channel)
{
	uv_loop_t l;
	ck_assert_int_eq(uv_loop_init(&l), 0);
	loop_thread = pthread_self();
	jobs_chan = malloc(sizeof(*jobs_chan));
	ck_assert_int_eq(xnbd__jobs_init(jobs_chan, &l), 0);
	jobs_done = 0;
	memset(jobs, 0, sizeof(jobs));
	for (int i = 0; i < NJOBS; i++) {
		jobs[i].j.work = i % 3 ? job_work_fn : NULL;
		jobs[i].j.done = job_done_fn;
		ck_assert_int_eq(xnbd__job_submit(jobs_chan, &jobs[i].j), 0);
		ck_assert_int_eq(jobs[i].ncalls, 0); /* later, from the loop */
		if (i % 50 == 49)
			uv_run(&l, UV_RUN_NOWAIT);
	}
	while (jobs_chan)
		uv_run(&l, UV_RUN_ONCE);
	ck_assert_int_eq(uv_loop_close(&l), 0);
	for (int i = 0; i < NJOBS; i++) {
		ck_assert_int_eq(jobs[i].ncalls, 1);
		ck_assert(jobs[i].done_on_loop);
		ck_assert(jobs[i].work_ran == (i % 3 != 0));
		ck_assert(!jobs[i].work_on_loop);
	}
}
END_TEST

/* A snapshot (a copy here: /tmp may have no reflinks) holds the image as it
 * was, and the backend freed in its callback leaves a loop that closes at
 * once: the copier's end comes back through the backend's channel. */
static char snap_path[80];
static int snap_status = 1;

static void snap_done(struct xnbd_backend *b, int status, const char *path,
                      void *ud)
{
	(void)path;
	(void)ud;
	snap_status = status;
	xnbd_backend_free(b);
	backend = NULL;
}

START_TEST(snapshot_ends_through_the_channel)
{
	static struct op ops[64];
	for (int i = 0; i < 64; i++) {
		fill(ops[i].data, 4096, (unsigned)i);
		submit(&ops[i], XNBD_IO_WRITE, (uint64_t)i * 65536, 4096);
	}
	while (completed < 64)
		uv_run(&loop, UV_RUN_ONCE);
	snprintf(snap_path, sizeof(snap_path), "%s.snap", img_path);
	unlink(snap_path);
	snap_status = 1;
	ck_assert_int_eq(
	    xnbd_backend_snapshot(backend, snap_path, snap_done, NULL), 0);
	ck_assert_int_eq(xnbd_backend_snapshot_running(backend), 1);
	while (backend)
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(snap_status, 0);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	loop_closed = true;
	int fd = open(snap_path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	uint8_t buf[4096], want[4096];
	for (int i = 0; i < 64; i++) {
		ck_assert_int_eq(pread(fd, buf, 4096, (off_t)i * 65536), 4096);
		fill(want, 4096, (unsigned)i);
		ck_assert_int_eq(memcmp(buf, want, 4096), 0);
	}
	close(fd);
	unlink(snap_path);
}
END_TEST

/* ---- where small writes are made ------------------------------------------ */

static bool file_is(const void *want, uint64_t off, uint64_t len)
{
	int fd = open(img_path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	uint8_t *buf = malloc(len);
	ck_assert_ptr_nonnull(buf);
	ck_assert_int_eq(pread(fd, buf, len, (off_t)off), (ssize_t)len);
	close(fd);
	bool same = memcmp(buf, want, len) == 0;
	free(buf);
	return same;
}

/* cachestat(2) here (Linux 6.5; not under valgrind 3.19)? */
static bool have_cachestat(void)
{
	int fd = open(img_path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	int r = xnbd__fd_cached(fd, 0, 4096);
	close(fd);
	return r >= 0;
}

/* A large buffered write into pages not in the page cache is made in
 * pieces of 64 KiB, so that the file system makes small folios for them
 * (WRITE_PIECE in backend_file.c); the same range again, cached by then,
 * is written whole.  The data lands either way. */
START_TEST(large_writes_into_uncached_pages_go_in_pieces)
{
	if (!have_cachestat())
		return; /* no way to tell: every write is made whole */
	static struct op o;
	uint8_t *buf = malloc(BIG);
	ck_assert_ptr_nonnull(buf);
	uint64_t n0 = xnbd__file_pieced_writes(backend);
	for (unsigned k = 0; k < 2; k++) {
		fill(buf, BIG, 70 + k);
		submit_buf(&o, XNBD_IO_WRITE, 0, 2 * BIG, BIG, buf);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(o.ncalls, 1);
		ck_assert_int_eq(o.io.status, 0);
		ck_assert(file_is(buf, 2 * BIG, BIG));
		ck_assert_uint_eq(xnbd__file_pieced_writes(backend), n0 + 1);
	}
	free(buf);
}
END_TEST

static uint64_t allocated_bytes(void)
{
	struct stat st;
	ck_assert_int_eq(stat(img_path, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

static uint64_t file_size(void)
{
	struct stat st;
	ck_assert_int_eq(stat(img_path, &st), 0);
	return (uint64_t)st.st_size;
}

/* Write len bytes of a pattern from buf (or the op's own data) at off
 * through the backend, and find them in the file. */
static void write_buf_and_check(struct op *o, uint8_t *buf, uint64_t off,
                                uint64_t len, int seed)
{
	buf = buf ? buf : o->data;
	fill(buf, len, seed);
	submit_buf(o, XNBD_IO_WRITE, 0, off, len, buf);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o->ncalls, 1);
	ck_assert_int_eq(o->io.status, 0);
	ck_assert(file_is(buf, off, len));
}

static void write_and_check(struct op *o, uint64_t off, uint64_t len, int seed)
{
	write_buf_and_check(o, NULL, off, len, seed);
}

/* Is the image on ext4 or XFS, where files of ours are allocated ahead? */
static bool allocates_ahead_here(void)
{
	struct statfs sfs;
	ck_assert_int_eq(statfs(img_path, &sfs), 0);
	return sfs.f_type == 0xEF53 || sfs.f_type == 0x58465342;
}

/* Open the image again as a file of ours (XNBD__OPEN_ALLOC_AHEAD), its
 * writes on the lane. */
static void open_allocating_ahead(void)
{
	xnbd_backend_free(backend);
	int fd = open(img_path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(xnbd__backend_file_from_fd(
	                     &loop, fd, XNBD__OPEN_ALLOC_AHEAD, &backend),
	                 0);
	xnbd__file_write_place(backend, true, NO_STALL); /* the lane */
}

/* Along a sequential run the allocation goes further ahead: a write into
 * a chunk not allocated takes as many chunks more as the allocated run
 * right before it holds (1, 1, 2, 4, 8 ...), a write away from the others
 * one.  A direct twin of the backend (a proxy's stores) shares what was
 * allocated, writes what it is given, and outlives the backend. */
START_TEST(sequential_writers_allocate_further_ahead)
{
	static struct op o;
	const uint64_t C = 1024 * 1024, size = 64 * C;
	if (!allocates_ahead_here())
		return;
	ck_assert_int_eq(truncate(img_path, (off_t)size), 0);
	open_allocating_ahead();
	/* chunk written -> chunks allocated in all */
	static const uint64_t seq[][2] = {{0, 1},  {1, 2},   {2, 4},  {4, 8},
	                                  {8, 16}, {40, 17}, {12, 17}};
	for (unsigned i = 0; i < sizeof(seq) / sizeof(seq[0]); i++) {
		write_and_check(&o, seq[i][0] * C + 4096, 4096, (int)i);
		ck_assert_uint_eq(xnbd__file_chunks_allocated(backend),
		                  seq[i][1]);
	}
	ck_assert_uint_ge(allocated_bytes(), 17 * C);
	ck_assert_uint_lt(allocated_bytes(), 18 * C);

	struct xnbd_backend *twin = NULL, *file = backend;
	int r = xnbd__backend_file_direct_twin(file, &twin);
	if (r == -EINVAL)
		return; /* no O_DIRECT here */
	ck_assert_int_eq(r, 0);
	uint8_t *buf = NULL;
	ck_assert_int_eq(posix_memalign((void **)&buf, 4096, 65536), 0);
	/* Chunk 16 follows a run of 16: chunks 16 to 31 at once. */
	backend = twin;
	write_buf_and_check(&o, buf, 16 * C, 65536, 9);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(twin), 33);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(file), 33);
	/* The buffered backend finds chunk 20 allocated. */
	backend = file;
	write_and_check(&o, 20 * C, 4096, 10);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(file), 33);
	/* The twin goes on alone. */
	xnbd_backend_free(file);
	backend = twin;
	write_buf_and_check(&o, buf, 48 * C, 65536, 11);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(twin), 34);
	ck_assert_uint_ge(allocated_bytes(), 34 * C);
	ck_assert_uint_lt(allocated_bytes(), 35 * C);
	free(buf);
}
END_TEST

/* Would a direct twin's writes go through io_uring here?  Built with
 * liburing, on a kernel that lets this process make rings (the sysctl
 * io_uring_disabled is 0 or missing). */
static bool ring_expected(void)
{
#ifdef XNBD_HAVE_URING
	FILE *f = fopen("/proc/sys/kernel/io_uring_disabled", "r");
	int v = 0;
	if (f) {
		if (fscanf(f, "%d", &v) != 1)
			v = 0;
		fclose(f);
	}
	return v == 0;
#else
	return false;
#endif
}

/* A direct twin's writes (a proxy's stores) into allocated blocks go
 * through its io_uring, 32 at once, each completing once with its data
 * in the file; a write into blocks not yet allocated, a FUA write, and
 * every write of a twin that first wrote under XNBD_IO_URING=0 or in a
 * child of fork() take the pool; and the twin may be freed at once after its last write (no
 * handle is left). */
#define NRING 32
START_TEST(direct_writes_go_through_the_ring)
{
	const uint64_t C = 1024 * 1024, size = 64 * C;
	if (!allocates_ahead_here())
		return;
	ck_assert_int_eq(truncate(img_path, (off_t)size), 0);
	open_allocating_ahead();
	struct xnbd_backend *file = backend, *twin = NULL;
	int r = xnbd__backend_file_direct_twin(file, &twin);
	if (r == -EINVAL)
		return; /* no O_DIRECT here */
	ck_assert_int_eq(r, 0);
	backend = twin;
	static struct op o[NRING];
	uint8_t *buf = NULL;
	ck_assert_int_eq(posix_memalign((void **)&buf, 4096, NRING * 65536), 0);
	/* Chunk 0 is not allocated: the pool allocates 0 (and no more). */
	write_buf_and_check(&o[0], buf, 0, 65536, 1);
	ck_assert_uint_eq(xnbd__file_ring_ios(twin), 0);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(twin), 1);
	/* And chunk 1, by the pool too. */
	write_buf_and_check(&o[0], buf, C, 65536, 2);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(twin), 2);
	ck_assert_uint_eq(xnbd__file_ring_ios(twin), 0);
	/* Now 32 writes at once into chunks 0 and 1, each its own
	 * pattern. */
	completed = 0;
	for (int i = 0; i < NRING; i++) {
		fill(buf + i * 65536, 65536, 100 + i);
		submit_buf(&o[i], XNBD_IO_WRITE, 0, (uint64_t)i * 65536, 65536,
		           buf + i * 65536);
	}
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(completed, NRING);
	for (int i = 0; i < NRING; i++) {
		ck_assert_int_eq(o[i].ncalls, 1);
		ck_assert_int_eq(o[i].io.status, 0);
		ck_assert(file_is(buf + i * 65536, (uint64_t)i * 65536, 65536));
	}
	uint64_t ring = xnbd__file_ring_ios(twin);
	ck_assert_uint_eq(ring, ring_expected() ? NRING : 0);
	/* A child of fork() leaves the ring it shares with its parent alone:
	 * its writes take the pool, and land. */
	pid_t pid = fork_child();
	if (pid == 0) {
		fill(buf, 65536, 77);
		o[0].ncalls = 0;
		submit_buf(&o[0], XNBD_IO_WRITE, 0, 0, 65536, buf);
		uv_run(&loop, UV_RUN_DEFAULT);
		_exit(o[0].ncalls == 1 && o[0].io.status == 0 &&
		              file_is(buf, 0, 65536) &&
		              xnbd__file_ring_ios(twin) == ring
		          ? 0
		          : 3);
	}
	child_ok(pid);
	/* FUA waits for the disk on the pool. */
	submit_buf(&o[0], XNBD_IO_WRITE, XNBD_IO_FUA, 0, 65536, buf);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o[0].ncalls, 1);
	ck_assert_int_eq(o[0].io.status, 0);
	ck_assert_uint_eq(xnbd__file_ring_ios(twin), ring);
	/* Freed right after: nothing is left open on the loop (teardown
	 * closes it). */
	xnbd_backend_free(twin);
	/* Under XNBD_IO_URING=0 a twin keeps to the pool (the variable is
	 * read at its first write). */
	ck_assert_int_eq(setenv("XNBD_IO_URING", "0", 1), 0);
	ck_assert_int_eq(xnbd__backend_file_direct_twin(file, &twin), 0);
	backend = twin;
	write_buf_and_check(&o[0], buf, 65536, 65536, 3);
	unsetenv("XNBD_IO_URING");
	write_buf_and_check(&o[0], buf, 2 * 65536, 65536, 4);
	ck_assert_uint_eq(xnbd__file_ring_ios(twin), 0);
	xnbd_backend_free(twin);
	backend = file;
	free(buf);
}
END_TEST

/* A CoW layer allocates no op per request once warm: one request at a
 * time (reads of one run, whole and partial writes, which copy up) all
 * use the op the first one took; and each reads back what was written. */
START_TEST(cow_requests_reuse_their_ops)
{
	static struct op w, r;
	struct xnbd_backend *file = backend, *cow = NULL;
	ck_assert_int_eq(
	    xnbd_backend_cow_new(&loop, file, "/tmp", XNBD_COW_TEMPORARY, &cow),
	    0);
	backend = cow;
	for (unsigned i = 0; i < 200; i++) {
		uint64_t off = (uint64_t)i * 8192 + (i % 10 == 0 ? 100 : 0);
		uint64_t len = i % 10 == 0 ? 300 : 4096;
		fill(w.data, len, i);
		submit(&w, XNBD_IO_WRITE, off, len);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(w.ncalls, 1);
		ck_assert_int_eq(w.io.status, 0);
		submit(&r, XNBD_IO_READ, off, len);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(r.ncalls, 1);
		ck_assert_int_eq(r.io.status, 0);
		ck_assert(memcmp(r.data, w.data, len) == 0);
	}
	ck_assert_uint_eq(xnbd__cow_op_allocs(cow), 1);
	xnbd_backend_free(cow);
	backend = file;
}
END_TEST

/* A backend opened with XNBD__OPEN_ALLOC_AHEAD (a CoW overlay, a proxy's
 * cache) on ext4 or XFS allocates each 1 MiB chunk of a sparse file before
 * the first write into it, once; the last chunk, short, without growing
 * the file.  The first write into a chunk leaves the loop thread (the
 * lane allocates), later ones may stay.  The public open, even asked,
 * leaves the holes around its writes alone. */
START_TEST(sparse_files_of_ours_are_allocated_a_chunk_ahead)
{
	static struct op o;
	const uint64_t C = 1024 * 1024, size = IMG_SIZE - 12288;
	if (!allocates_ahead_here())
		return;
	ck_assert_int_eq(truncate(img_path, (off_t)size), 0);
	xnbd_backend_free(backend);
	ck_assert_int_eq(xnbd_backend_file_open(
	                     &loop, img_path, XNBD__OPEN_ALLOC_AHEAD, &backend),
	                 0);
	write_and_check(&o, C + 8192, 4096, 1);
	ck_assert_uint_lt(allocated_bytes(), 64 * 1024);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(backend), 0);

	open_allocating_ahead();
	write_and_check(&o, C + 16384, 4096, 2);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(backend), 1);
	ck_assert_uint_ge(allocated_bytes(), C);
	ck_assert_uint_lt(allocated_bytes(), 2 * C);
	write_and_check(&o, C + 65536, 8192, 3); /* the same chunk */
	ck_assert_uint_eq(xnbd__file_chunks_allocated(backend), 1);

	xnbd__file_write_place(backend, false, NO_STALL); /* inline allowed */
	uint64_t lane0 = xnbd__file_lane_ios(backend);
	fill(o.data, 8192, 4);
	submit(&o, XNBD_IO_WRITE, 3 * C - 4096, 8192); /* chunks 2 and 3 */
	ck_assert_int_eq(o.ncalls, 0); /* not on the loop thread */
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o.ncalls, 1);
	ck_assert_int_eq(o.io.status, 0);
	ck_assert(file_is(o.data, 3 * C - 4096, 8192));
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), lane0 + 1);
	ck_assert_uint_eq(xnbd__file_chunks_allocated(backend), 3);
	ck_assert_uint_ge(allocated_bytes(), 2 * C + (size - 3 * C));

	fill(o.data, 4096, 5);
	submit(&o, XNBD_IO_WRITE, size - 4096, 4096); /* chunk 3, short */
	ck_assert_int_eq(o.ncalls, 1);                /* allocated: inline */
	ck_assert_int_eq(o.io.status, 0);
	ck_assert(file_is(o.data, size - 4096, 4096));
	ck_assert_uint_eq(xnbd__file_chunks_allocated(backend), 3);
	ck_assert_uint_eq(file_size(), size);
	/* What was written before is still there, and unwritten blocks of
	 * allocated chunks read as zeroes. */
	static const uint8_t zeroes[4096];
	ck_assert(file_is(zeroes, C + 4096, 4096));
	ck_assert(file_is(zeroes, 3 * C + 4096, 4096));
	fill(o.data, 4096, 1);
	ck_assert(file_is(o.data, C + 8192, 4096));
}
END_TEST

/* An idle backend makes a small write at once, on the caller's thread:
 * a whole page, or a piece of a page in the page cache (where cachestat
 * says so).  A piece of a page that is not in the cache would be read
 * from the disk first, so it goes to the lane; a write whose file refuses
 * it fails inline with its error. */
START_TEST(idle_small_writes_are_made_inline)
{
	static struct op o;
	xnbd__file_write_place(backend, false, NO_STALL);
	fill(o.data, 4096, 1);
	submit(&o, XNBD_IO_WRITE, 65536, 4096);
	ck_assert_int_eq(o.ncalls, 1); /* before the loop ran */
	ck_assert_int_eq(o.io.status, 0);
	ck_assert(file_is(o.data, 65536, 4096));

	fill(o.data, 100, 2); /* in the page just written: cached */
	submit(&o, XNBD_IO_WRITE, 65536 + 1000, 100);
	if (!have_cachestat())
		uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o.ncalls, 1);
	ck_assert_int_eq(o.io.status, 0);
	ck_assert(file_is(o.data, 65536 + 1000, 100));

	/* Never read nor written since the file was made: not cached. */
	fill(o.data, 100, 3);
	submit(&o, XNBD_IO_WRITE, IMG_SIZE - 8192 + 10, 100);
	ck_assert_int_eq(o.ncalls, 0);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o.ncalls, 1);
	ck_assert_int_eq(o.io.status, 0);
	ck_assert(file_is(o.data, IMG_SIZE - 8192 + 10, 100));

	signal(SIGXFSZ, SIG_IGN);
	struct rlimit rl = {IMG_SIZE / 2, IMG_SIZE / 2};
	ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
	int fd = open(img_path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, IMG_SIZE / 2), 0); /* shrunk under it */
	close(fd);
	/* past the limit */
	submit(&o, XNBD_IO_WRITE, IMG_SIZE / 2 + 4096, 4096);
	ck_assert_int_eq(o.ncalls, 1);
	ck_assert_int_eq(o.io.status, -EFBIG);
}
END_TEST

/* With a file size limit in place when the backend is opened, a write
 * past it is not made on the loop thread, where SIGXFSZ (left at its
 * default here) would end the process: it fails on the lane with EFBIG.
 * Writes below the limit are made inline as ever. */
START_TEST(writes_past_the_file_size_limit_leave_the_loop_thread)
{
	static struct op o;
	xnbd_backend_free(backend);
	signal(SIGXFSZ, SIG_DFL);
	struct rlimit rl = {IMG_SIZE / 2, IMG_SIZE / 2};
	ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &rl), 0);
	ck_assert_int_eq(xnbd_backend_file_open(&loop, img_path, 0, &backend),
	                 0);
	xnbd__file_write_place(backend, false, NO_STALL);
	fill(o.data, 4096, 1);
	submit(&o, XNBD_IO_WRITE, IMG_SIZE / 2 - 4096, 4096);
	ck_assert_int_eq(o.ncalls, 1);
	ck_assert_int_eq(o.io.status, 0);
	submit(&o, XNBD_IO_WRITE, IMG_SIZE / 2 + 4096, 4096);
	ck_assert_int_eq(o.ncalls, 0);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o.ncalls, 1);
	ck_assert_int_eq(o.io.status, -EFBIG);
}
END_TEST

/* While a write, a trim or a zeroing is out on the pool (it may hold the
 * inode's lock, a large write even through the dirty-page throttle), small
 * writes go to the lane, and after it, inline again. */
START_TEST(small_writes_leave_the_loop_while_others_are_out)
{
	static struct op big, z, o;
	static uint8_t bigdata[1U << 20];
	xnbd__file_write_place(backend, false, NO_STALL);
	fill(bigdata, sizeof(bigdata), 9);
	for (int k = 0; k < 2; k++) {
		if (k == 0)
			submit_buf(&big, XNBD_IO_WRITE, 0, 1U << 20,
			           sizeof(bigdata), bigdata);
		else
			submit(&z, XNBD_IO_ZERO, 2U << 20, 1U << 20);
		fill(o.data, 4096, 3);
		submit(&o, XNBD_IO_WRITE, 0, 4096);
		ck_assert_int_eq(o.ncalls, 0);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(o.ncalls, 1);
		ck_assert_int_eq(o.io.status, 0);
		submit(&o, XNBD_IO_WRITE, 4096, 4096);
		ck_assert_int_eq(o.ncalls, 1);
	}
	ck_assert_int_eq(big.io.status, 0);
	ck_assert_int_eq(z.io.status, 0);
	ck_assert(file_is(bigdata, 1U << 20, sizeof(bigdata)));
}
END_TEST

/* Writes and nothing else, back to back, for a quarter of a second: they
 * fill the loop thread's time, and every one is still made on it (the
 * lane would cost each a hand-off and save the loop nothing it had to do
 * meanwhile).  128 KiB, the largest small write, so that the writes and
 * not the test take the time. */
#define WBIG (128U * 1024U)
START_TEST(a_stream_of_writes_stays_on_the_loop_thread)
{
	static struct op o;
	static uint8_t data[32][WBIG];
	for (unsigned i = 0; i < 32; i++)
		fill(data[i], WBIG, i);
	/* The image's pages as large folios, where the file system makes
	 * them (ext4 since Linux 6.16): there a small write costs most, the
	 * case where moving writes off the loop thread tempts most. */
	int fd = open(img_path, O_RDWR);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(fdatasync(fd), 0);
	ck_assert_int_eq(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
	ck_assert_int_eq(pwrite(fd, data, sizeof(data), 0),
	                 (ssize_t)sizeof(data));
	close(fd);
	xnbd__file_write_place(backend, false, NO_STALL);
	/* No ck_assert in the loop: each costs a message to Check's parent,
	 * which would take a third of the time. */
	uint64_t start = uv_hrtime(), n = 0;
	for (; uv_hrtime() - start < 250ULL * 1000 * 1000; n++) {
		memset(&o.io, 0, sizeof(o.io));
		o.io.type = XNBD_IO_WRITE;
		o.io.offset = (n % 32) * WBIG;
		o.io.length = WBIG;
		o.io.buf = data[n % 32];
		o.io.done = op_done;
		o.io.user_data = &o;
		if (xnbd_backend_submit(backend, &o.io) != XNBD_IO_COMPLETED ||
		    o.io.status != 0)
			break;
	}
	ck_assert_msg(uv_hrtime() - start >= 250ULL * 1000 * 1000,
	              "write %llu went to the lane or failed",
	              (unsigned long long)n);
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), 0);
	for (unsigned i = 0; i < 32; i++)
		ck_assert(file_is(data[i], i * WBIG, WBIG));
}
END_TEST

/* An inline write that took too long (here: any) sends the next writes
 * to the lane for a second; another stall within the next minute, for two
 * seconds. */
static void write_at(struct op *o, uint64_t off, unsigned seed, bool inline_)
{
	fill(o->data, 4096, seed);
	submit(o, XNBD_IO_WRITE, off, 4096);
	ck_assert_int_eq(o->ncalls, inline_ ? 1 : 0);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(o->ncalls, 1);
	ck_assert_int_eq(o->io.status, 0);
	ck_assert(file_is(o->data, off, 4096));
}

START_TEST(a_stalled_write_sends_writes_to_the_lane_for_a_while)
{
	static struct op o;
	xnbd__file_write_place(backend, false, 1);
	write_at(&o, 0, 1, true);     /* a stall: held for 1 s */
	write_at(&o, 4096, 2, false); /* on the lane */
	usleep(1100 * 1000);
	write_at(&o, 8192, 3, true); /* after the hold; a stall: 2 s */
	usleep(1100 * 1000);
	write_at(&o, 12288, 4, false); /* still held */
	usleep(1100 * 1000);
	xnbd__file_write_place(backend, false, NO_STALL);
	write_at(&o, 16384, 5, true);
}
END_TEST

/* A write that stalls on the lane (the dirty-page throttle would) keeps
 * the writes off the loop thread for a second after it, past the end of
 * the hold an inline stall set: the throttle does not let go of a writer
 * that waited once, and each return to the loop thread would stall it
 * again. */
START_TEST(writes_stalling_on_the_lane_extend_the_hold)
{
	static struct op o;
	xnbd__file_write_place(backend, false, 1);
	write_at(&o, 0, 1, true); /* a stall: held for 1 s */
	usleep(800 * 1000);
	write_at(&o, 4096, 2, false); /* on the lane, and a stall there */
	usleep(400 * 1000);           /* the hold is over */
	xnbd__file_write_place(backend, false, NO_STALL);
	write_at(&o, 8192, 3, false); /* but the lane stalled 0.4 s ago */
	usleep(800 * 1000);
	write_at(&o, 12288, 4, true);
}
END_TEST

/* A payload in a pipe (as the server splices it from the socket) into an
 * idle backend is spliced into the file on the caller's thread, as a
 * small write is made there; a stall sends the next one to the lane, and
 * so does a FUA flag.  Each lands whole. */
static void piped_write(struct op *o, int p[2], uint8_t *data, uint64_t off,
                        unsigned seed, uint32_t flags, int expect)
{
	static uint8_t bounce[BIG]; /* for a file that refuses splice */
	fill(data, BIG, seed);
	ck_assert_int_eq(write(p[1], data, BIG), (ssize_t)BIG);
	op_init(o, XNBD_IO_WRITE, flags, off, BIG, bounce);
	ck_assert_int_eq(xnbd__backend_submit_pipe(backend, &o->io, p[0]),
	                 expect);
	if (expect == XNBD_IO_PENDING) {
		ck_assert_int_eq(o->ncalls, 0);
		uv_run(&loop, UV_RUN_DEFAULT);
		ck_assert_int_eq(o->ncalls, 1);
	}
	ck_assert_int_eq(o->io.status, 0);
	ck_assert(file_is(data, off, BIG));
	int left = -1;
	ck_assert_int_eq(ioctl(p[0], FIONREAD, &left), 0);
	ck_assert_int_eq(left, 0);
}

START_TEST(idle_spliced_writes_are_made_inline)
{
	static struct op o;
	static uint8_t data[BIG];
	int p[2];
	ck_assert_int_eq(pipe2(p, O_NONBLOCK), 0);
	ck_assert_int_ge(fcntl(p[1], F_SETPIPE_SZ, (int)BIG), (int)BIG);
	xnbd__file_write_place(backend, false, NO_STALL);
	uint64_t lane0 = xnbd__file_lane_ios(backend);
	piped_write(&o, p, data, 0, 1, 0, XNBD_IO_COMPLETED);
	piped_write(&o, p, data, 3 * BIG + 4096, 2, 0, XNBD_IO_COMPLETED);
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), lane0);
	piped_write(&o, p, data, BIG, 3, XNBD_IO_FUA, XNBD_IO_PENDING);

	xnbd__file_write_place(backend, false, 1);
	piped_write(&o, p, data, 2 * BIG, 4, 0, XNBD_IO_COMPLETED); /* stall */
	lane0 = xnbd__file_lane_ios(backend);
	piped_write(&o, p, data, 5 * BIG, 5, 0, XNBD_IO_PENDING);
	ck_assert_uint_eq(xnbd__file_lane_ios(backend), lane0 + 1);

	/* With the lane chosen for every write, none is made inline. */
	xnbd__file_write_place(backend, true, NO_STALL);
	piped_write(&o, p, data, 6 * BIG, 6, 0, XNBD_IO_PENDING);
	close(p[0]);
	close(p[1]);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("backend");
	TCase *tc = tcase_create("file");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, lane_writes_all_land_in_order);
	tcase_add_test(tc, lane_write_failure_is_reported_alone);
	tcase_add_test(tc, lane_and_pool_writes_mix);
	tcase_add_test(tc, large_writes_take_the_lane);
	tcase_add_test(tc, backend_freed_in_last_callback);
	tcase_add_test(tc, io_submitted_while_the_handle_closes);
	tcase_add_test(tc, pool_threads_are_bounded);
	tcase_add_test(tc, io_goes_on_after_fork);
	tcase_add_test(tc, jobs_run_once_and_the_last_may_free_their_channel);
	tcase_add_test(tc, snapshot_ends_through_the_channel);
	tcase_add_test(tc, large_writes_into_uncached_pages_go_in_pieces);
	tcase_add_test(tc, sparse_files_of_ours_are_allocated_a_chunk_ahead);
	tcase_add_test(tc, sequential_writers_allocate_further_ahead);
	tcase_add_test(tc, direct_writes_go_through_the_ring);
	tcase_add_test(tc, cow_requests_reuse_their_ops);
	tcase_add_test(tc, idle_small_writes_are_made_inline);
	tcase_add_test(tc,
	               writes_past_the_file_size_limit_leave_the_loop_thread);
	tcase_add_test(tc, small_writes_leave_the_loop_while_others_are_out);
	tcase_add_test(tc, a_stream_of_writes_stays_on_the_loop_thread);
	tcase_add_test(tc, idle_spliced_writes_are_made_inline);
	tcase_add_test(tc, writes_stalling_on_the_lane_extend_the_hold);
	tcase_add_test(tc,
	               a_stalled_write_sends_writes_to_the_lane_for_a_while);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return xnbd_test_run(suite());
}
