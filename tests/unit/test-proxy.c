/* test-proxy.c - the proxy backend driven through the public API, against
 * an upstream served in the same process (a file backend behind an
 * xnbd_server on 127.0.0.1).  Here: the syncs of the cache, a proxy
 * freed from the callback of one while the next is queued, requests that
 * reuse the proxy's ops, and a cold read answered before its store. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "xnbd/backend.h"
#include "xnbd/proxy.h"
#include "xnbd/server.h"
#include "backend.h"
#include "unit-main.h"

#define IMG_SIZE (4U * 1024U * 1024U)

static uv_loop_t loop;
static char dir[64], up_path[96], cache_path[96], bitmap_path[96];
static char port[16];
static struct xnbd_backend *up_backend;
static struct xnbd_export *up_export;
static struct xnbd_server *up_server;
static bool up_down;

static void on_up_down(struct xnbd_server *s, void *ud)
{
	(void)s;
	(void)ud;
	up_down = true;
}

/* A port nobody listens on now (bound to 0, then let go). */
static void pick_port(void)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	socklen_t len = sizeof(a);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0);
	snprintf(port, sizeof(port), "%u", (unsigned)ntohs(a.sin_port));
	close(fd);
}

static void setup(void)
{
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	snprintf(dir, sizeof(dir), "/tmp/xnbd-proxy-test-XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(up_path, sizeof(up_path), "%s/up.img", dir);
	snprintf(cache_path, sizeof(cache_path), "%s/cache.img", dir);
	snprintf(bitmap_path, sizeof(bitmap_path), "%s/cache.bitmap", dir);
	int fd = open(up_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, IMG_SIZE), 0);
	close(fd);
	ck_assert_int_eq(xnbd_backend_file_open(&loop, up_path, 0, &up_backend),
	                 0);
	ck_assert_int_eq(xnbd_export_new("", up_backend, 0, &up_export), 0);
	ck_assert_int_eq(xnbd_server_new(&loop, &up_server), 0);
	ck_assert_int_eq(xnbd_server_add_export(up_server, up_export), 0);
	int r = -EADDRINUSE;
	for (int i = 0; i < 5 && r == -EADDRINUSE; i++) {
		pick_port();
		r = xnbd_server_listen(up_server, "127.0.0.1", port);
	}
	ck_assert_int_eq(r, 0);
	up_down = false;
}

static void teardown(void)
{
	ck_assert_int_eq(
	    xnbd_server_shutdown(up_server, 1000, on_up_down, NULL), 0);
	while (!up_down)
		uv_run(&loop, UV_RUN_ONCE);
	xnbd_server_free(up_server);
	xnbd_export_free(up_export);
	xnbd_backend_free(up_backend);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	unlink(up_path);
	unlink(cache_path);
	unlink(bitmap_path);
	rmdir(dir);
}

static int open_status = 1;

static void on_open(struct xnbd_proxy *p, int status, void *ud)
{
	(void)p;
	(void)ud;
	open_status = status;
}

static struct xnbd_proxy *open_proxy(void)
{
	struct xnbd_proxy *p;
	ck_assert_int_eq(xnbd_proxy_new(&loop, &p), 0);
	open_status = 1;
	ck_assert_int_eq(xnbd_proxy_open(p, "127.0.0.1", port, "", cache_path,
	                                 bitmap_path, 0, on_open, NULL),
	                 0);
	while (open_status == 1)
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(open_status, 0);
	return p;
}

/* Freeing the proxy from the answer to one sync, while another waits for
 * the next round: the next round still runs (the free waits for it), its
 * caller gets an answer, and the bitmap is closed only after it. */
static int sync_calls, sync_status[2];
static bool freed_in_cb;

static void on_sync(struct xnbd_proxy *p, int status, void *ud)
{
	int k = (int)(intptr_t)ud;
	sync_status[k] = status;
	sync_calls++;
	if (k == 0) {
		xnbd_proxy_free(p);
		freed_in_cb = true;
	}
}

START_TEST(freed_from_a_sync_answer_with_another_queued)
{
	struct xnbd_proxy *p = open_proxy();
	sync_calls = 0;
	sync_status[0] = sync_status[1] = 1;
	freed_in_cb = false;
	ck_assert_int_eq(xnbd_proxy_sync(p, on_sync, (void *)(intptr_t)0), 0);
	ck_assert_int_eq(xnbd_proxy_sync(p, on_sync, (void *)(intptr_t)1), 0);
	while (sync_calls < 2)
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert(freed_in_cb);
	ck_assert_int_eq(sync_status[0], 0);
	ck_assert_int_eq(sync_status[1], 0);
	/* Nothing of the proxy may be left open: teardown closes the loop. */
}
END_TEST

/* Syncs answered in order, every one once, also when asked from the
 * answer to the one before; then a plain free. */
static int chain_left, chain_calls;

static void on_chain(struct xnbd_proxy *p, int status, void *ud)
{
	(void)ud;
	ck_assert_int_eq(status, 0);
	chain_calls++;
	if (--chain_left > 0)
		ck_assert_int_eq(xnbd_proxy_sync(p, on_chain, NULL), 0);
}

START_TEST(syncs_asked_from_answers)
{
	struct xnbd_proxy *p = open_proxy();
	chain_left = 5;
	chain_calls = 0;
	ck_assert_int_eq(xnbd_proxy_sync(p, on_chain, NULL), 0);
	while (chain_left > 0)
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(chain_calls, 5);
	xnbd_proxy_free(p);
}
END_TEST

/* One request to the proxy's backend b, waited for; it must succeed. */
struct req {
	struct xnbd_io io;
	int ncalls;
};

static void req_done(struct xnbd_io *io)
{
	((struct req *)io->user_data)->ncalls++;
}

static void run_req(struct xnbd_backend *b, uint32_t type, uint64_t off,
                    uint64_t len, void *buf)
{
	struct req r;
	memset(&r, 0, sizeof(r));
	r.io.type = type;
	r.io.offset = off;
	r.io.length = len;
	r.io.buf = buf;
	r.io.done = req_done;
	r.io.user_data = &r;
	int st = xnbd_backend_submit(b, &r.io);
	ck_assert_int_ge(st, 0);
	if (st == XNBD_IO_COMPLETED)
		r.ncalls++;
	while (r.ncalls == 0)
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(r.ncalls, 1);
	ck_assert_int_eq(r.io.status, 0);
	/* and the stores of an early answer */
	while (xnbd__proxy_busy(b))
		uv_run(&loop, UV_RUN_ONCE);
}

static uint8_t pattern(uint64_t off)
{
	return (uint8_t)(off * 7u + (off >> 12) * 13u + (off >> 9));
}

/* The upstream image holds pattern(); so does want. */
static void fill_upstream(uint8_t *want)
{
	for (uint64_t i = 0; i < IMG_SIZE; i++)
		want[i] = pattern(i);
	int fd = open(up_path, O_WRONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pwrite(fd, want, IMG_SIZE, 0), IMG_SIZE);
	close(fd);
}

/* A proxy allocates nothing for a request once warm: cold reads of a
 * block (answered before their store, from a copy), cold partial reads
 * (through the edge blocks), partial writes (which fetch and merge) and
 * reads of cached blocks, one at a time, all reuse the first one's op,
 * edge blocks and copy; and each reads what the upstream holds, or what
 * was written. */
START_TEST(requests_reuse_the_proxy_ops)
{
	enum { BSZ = XNBD_PROXY_BLOCK, N = 200 };
	static uint8_t want[IMG_SIZE], got[BSZ];
	fill_upstream(want);
	struct xnbd_proxy *p = open_proxy();
	struct xnbd_backend *b = xnbd_proxy_backend(p);
	for (unsigned i = 0; i < N; i++) {
		uint64_t blk = (uint64_t)i * 3 * BSZ;
		run_req(b, XNBD_IO_READ, blk, BSZ, got);
		ck_assert(memcmp(got, want + blk, BSZ) == 0);
		uint64_t off = blk + BSZ + 100 + i;
		run_req(b, XNBD_IO_READ, off, 300, got);
		ck_assert(memcmp(got, want + off, 300) == 0);
		off = blk + 2 * BSZ + 50 + i;
		memset(want + off, (int)(i + 1), 200);
		run_req(b, XNBD_IO_WRITE, off, 200, want + off);
		run_req(b, XNBD_IO_READ, blk + 2 * BSZ, BSZ, got);
		ck_assert(memcmp(got, want + blk + 2 * BSZ, BSZ) == 0);
		run_req(b, XNBD_IO_READ, blk, BSZ, got);
		ck_assert(memcmp(got, want + blk, BSZ) == 0);
	}
	ck_assert_uint_eq(xnbd__proxy_allocs(b), 3);
	xnbd_proxy_free(p);
}
END_TEST

/* A small cold read is answered before its blocks are stored, and the
 * store waits for the end of the loop iteration that answered it, where
 * a server sends its replies (check handles): so the reply does not wait
 * for the write into the cache.  Then the block is stored all the same.
 * (A read of the same 1 MiB chunk first: the store of the first block
 * into a chunk goes to the write lane, which allocates the chunk.) */
#define PROBED (2 * XNBD_PROXY_BLOCK)
static int cache_fd = -1;
static bool cache_had_it = true;
static uv_check_t probe;

static void probe_cb(uv_check_t *h)
{
	uint8_t b[XNBD_PROXY_BLOCK];
	ck_assert_int_eq(pread(cache_fd, b, sizeof(b), PROBED),
	                 (ssize_t)sizeof(b));
	cache_had_it = memcmp(b, h->data, sizeof(b)) == 0;
	uv_check_stop(h);
}

static void answered(struct xnbd_io *io)
{
	((struct req *)io->user_data)->ncalls++;
	probe.data = io->buf;
	ck_assert_int_eq(uv_check_start(&probe, probe_cb), 0);
}

START_TEST(cold_read_answered_before_its_store)
{
	static uint8_t want[IMG_SIZE], got[XNBD_PROXY_BLOCK];
	fill_upstream(want);
	struct xnbd_proxy *p = open_proxy();
	struct xnbd_backend *b = xnbd_proxy_backend(p);
	cache_fd = open(cache_path, O_RDONLY);
	ck_assert_int_ge(cache_fd, 0);
	ck_assert_int_eq(uv_check_init(&loop, &probe), 0);
	run_req(b, XNBD_IO_READ, 0, sizeof(got), got);
	struct req r;
	memset(&r, 0, sizeof(r));
	r.io = (struct xnbd_io){.type = XNBD_IO_READ,
	                        .offset = PROBED,
	                        .length = sizeof(got),
	                        .buf = got,
	                        .done = answered,
	                        .user_data = &r};
	ck_assert_int_eq(xnbd_backend_submit(b, &r.io), XNBD_IO_PENDING);
	while (r.ncalls == 0 || uv_is_active((uv_handle_t *)&probe))
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(r.io.status, 0);
	ck_assert(memcmp(got, want + PROBED, sizeof(got)) == 0);
	ck_assert(!cache_had_it);
	while (xnbd__proxy_busy(b))
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(pread(cache_fd, got, sizeof(got), PROBED),
	                 (ssize_t)sizeof(got));
	ck_assert(memcmp(got, want + PROBED, sizeof(got)) == 0);
	close(cache_fd);
	uv_close((uv_handle_t *)&probe, NULL);
	xnbd_proxy_free(p);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("proxy");
	TCase *tc = tcase_create("sync");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, freed_from_a_sync_answer_with_another_queued);
	tcase_add_test(tc, syncs_asked_from_answers);
	tcase_add_test(tc, requests_reuse_the_proxy_ops);
	tcase_add_test(tc, cold_read_answered_before_its_store);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return xnbd_test_run(suite());
}
