/* test-server.c - the engine's exports at run time: adding while serving,
 * removing with clients connected (they are served to the end, the
 * callback comes after the last one), the handshake of a session that
 * asks for a removed export, and the order of removal and shutdown
 * callbacks.  Clients are raw sockets of a socketpair handed to the
 * server with xnbd_server_serve_fd(); the test drives the loop itself. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "xnbd/server.h"
#include "unit-main.h"

#define IMG_SIZE (64 * 1024)

static uv_loop_t loop;
static char img_path[64];
static struct xnbd_backend *backend;
static struct xnbd_server *srv;

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)(v >> 32));
	put32(p + 4, (uint32_t)v);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Run the loop until n bytes came from the server on fd. */
static void recv_n(int fd, void *buf, size_t n)
{
	size_t have = 0;
	double end = now() + 5;
	while (have < n) {
		uv_run(&loop, UV_RUN_NOWAIT);
		ssize_t k =
		    recv(fd, (uint8_t *)buf + have, n - have, MSG_DONTWAIT);
		if (k > 0)
			have += (size_t)k;
		ck_assert_msg(k != 0, "server closed the connection");
		ck_assert_msg(now() < end, "no reply from the server");
	}
}

static void send_all(int fd, const void *p, size_t n)
{
	ck_assert_int_eq(send(fd, p, n, 0), (ssize_t)n);
}

/* Run the loop a few times without waiting. */
static void spin(int n)
{
	for (int i = 0; i < n; i++)
		uv_run(&loop, UV_RUN_NOWAIT);
}

/* A client: connected, greeted, flags sent (fixed newstyle, no zeroes). */
static int client(void)
{
	int sv[2];
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv),
	                 0);
	ck_assert_int_eq(xnbd_server_serve_fd(srv, sv[1], 0), 0);
	uint8_t g[18];
	recv_n(sv[0], g, sizeof(g));
	uint8_t f[4];
	put32(f, XNBD_FLAG_C_FIXED_NEWSTYLE | XNBD_FLAG_C_NO_ZEROES);
	send_all(sv[0], f, 4);
	return sv[0];
}

static void send_opt(int fd, uint32_t opt, const void *data, uint32_t len)
{
	uint8_t h[16];
	put64(h, XNBD_MAGIC_OPTS);
	put32(h + 8, opt);
	put32(h + 12, len);
	send_all(fd, h, 16);
	if (len)
		send_all(fd, data, len);
}

/* Read one option reply; returns its type, the data in buf (up to cap). */
static uint32_t opt_reply(int fd, uint8_t *buf, size_t cap, uint32_t *len)
{
	uint8_t h[20];
	recv_n(fd, h, 20);
	uint32_t n = get32(h + 16);
	ck_assert_uint_le(n, cap);
	if (n)
		recv_n(fd, buf, n);
	*len = n;
	return get32(h + 12);
}

/* NBD_OPT_GO to `name`: the final reply type. */
static uint32_t go(int fd, const char *name)
{
	uint8_t d[64], r[512];
	uint32_t nl = (uint32_t)strlen(name), len;
	put32(d, nl);
	memcpy(d + 4, name, nl);
	d[4 + nl] = d[5 + nl] = 0;
	send_opt(fd, XNBD_OPT_GO, d, nl + 6);
	uint32_t t;
	while ((t = opt_reply(fd, r, sizeof(r), &len)) == XNBD_REP_INFO)
		;
	return t;
}

/* NBD_OPT_LIST: the names, joined with ',' into out. */
static void list(int fd, char *out, size_t cap)
{
	uint8_t r[512];
	uint32_t len, t;
	out[0] = '\0';
	send_opt(fd, XNBD_OPT_LIST, NULL, 0);
	while ((t = opt_reply(fd, r, sizeof(r), &len)) == XNBD_REP_SERVER) {
		uint32_t nl = get32(r);
		if (out[0])
			strncat(out, ",", cap - strlen(out) - 1);
		strncat(out, (const char *)r + 4,
		        nl < cap - strlen(out) - 1 ? nl
		                                   : cap - strlen(out) - 1);
	}
	ck_assert_uint_eq(t, XNBD_REP_ACK);
}

/* A READ of n bytes at off in transmission (simple replies). */
static void read_at(int fd, uint64_t off, uint32_t n, uint8_t *out)
{
	uint8_t q[28], h[16];
	put32(q, XNBD_MAGIC_REQUEST);
	q[4] = q[5] = 0;
	q[6] = 0;
	q[7] = XNBD_CMD_READ;
	put64(q + 8, 42);
	put64(q + 16, off);
	put32(q + 24, n);
	send_all(fd, q, sizeof(q));
	recv_n(fd, h, 16);
	ck_assert_uint_eq(get32(h), XNBD_MAGIC_SIMPLE_REPLY);
	ck_assert_uint_eq(get32(h + 4), 0);
	recv_n(fd, out, n);
}

struct calls {
	int removed;
	struct xnbd_export *which;
	int order; /* the value of `step` when called */
};
static int step;

static void on_removed(struct xnbd_server *s, struct xnbd_export *e, void *ud)
{
	struct calls *c = ud;
	c->removed++;
	c->which = e;
	c->order = ++step;
}

static void setup(void)
{
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	snprintf(img_path, sizeof(img_path), "/tmp/xnbd-test-server.XXXXXX");
	int fd = mkstemp(img_path);
	ck_assert_int_ge(fd, 0);
	uint8_t buf[IMG_SIZE];
	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i * 13 + 5);
	ck_assert_int_eq(write(fd, buf, sizeof(buf)), (ssize_t)sizeof(buf));
	close(fd);
	ck_assert_int_eq(xnbd_backend_file_open(&loop, img_path, 0, &backend),
	                 0);
	ck_assert_int_eq(xnbd_server_new(&loop, &srv), 0);
	step = 0;
}

static int down;
static int down_order;

static void on_down(struct xnbd_server *s, void *ud)
{
	down = 1;
	down_order = ++step;
}

/* Stop and free the server; the test then frees its exports, and
 * teardown() the rest. */
static void stop_server(void)
{
	if (!down) {
		ck_assert_int_eq(xnbd_server_shutdown(srv, 0, on_down, NULL),
		                 0);
		while (!down)
			uv_run(&loop, UV_RUN_ONCE);
	}
	xnbd_server_free(srv);
	srv = NULL;
}

static void teardown(void)
{
	xnbd_backend_free(backend);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	unlink(img_path);
	down = 0;
}

static struct xnbd_export *add(const char *name)
{
	struct xnbd_export *e;
	ck_assert_int_eq(xnbd_export_new(name, backend, 0, &e), 0);
	ck_assert_int_eq(xnbd_server_add_export(srv, e), 0);
	return e;
}

/* Export names are UTF-8 of at most 4096 bytes; xnbd_export_new refuses
 * what xnbd_export_name_check refuses. */
START_TEST(export_names_are_checked)
{
	static const char *const good[] = {"",
	                                   "disk",
	                                   "caf\xc3\xa9",
	                                   "\xe2\x82\xac",
	                                   "\xf0\x9f\x92\xbe",
	                                   "\xef\xbf\xbf",
	                                   "\xf4\x8f\xbf\xbf"};
	static const char *const bad[] = {
	    "\xff",
	    "a\x80",
	    "\xc0\x80", /* stray, overlong NUL */
	    "\xe0\x80\x80",
	    "\xf0\x80\x80\x80", /* overlong */
	    "\xed\xa0\x80",     /* a surrogate */
	    "\xf4\x90\x80\x80", /* past U+10FFFF */
	    "\xc3",
	    "x\xe2\x82"}; /* cut short */
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
		ck_assert_msg(xnbd_export_name_check(good[i]) == 0, "good %zu",
		              i);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ck_assert_msg(xnbd_export_name_check(bad[i]) == -EINVAL,
		              "bad %zu", i);
		struct xnbd_export *e = NULL;
		ck_assert_int_eq(xnbd_export_new(bad[i], backend, 0, &e),
		                 -EINVAL);
	}
	static char name[4098];
	memset(name, 'n', 4096);
	ck_assert_int_eq(xnbd_export_name_check(name), 0);
	name[4096] = 'n';
	ck_assert_int_eq(xnbd_export_name_check(name), -EINVAL);
	ck_assert_int_eq(xnbd_export_name_check(NULL), -EINVAL);
	stop_server();
	teardown();
}
END_TEST

START_TEST(removed_export_serves_its_clients_to_the_end)
{
	struct xnbd_export *a = add("a"), *b = add("b");
	int c1 = client();
	ck_assert_uint_eq(go(c1, "a"), XNBD_REP_ACK);
	spin(3);
	ck_assert_uint_eq(xnbd_export_client_count(a), 1);

	struct calls calls = {0};
	ck_assert_int_eq(xnbd_server_remove_export(srv, a, on_removed, &calls),
	                 0);
	spin(5);
	ck_assert_int_eq(calls.removed, 0);
	ck_assert_int_eq(xnbd_server_add_export(srv, a), -EBUSY);

	/* Gone for clients that negotiate now, on a connection that stays
	 * usable; its name is free. */
	int c2 = client();
	char names[256];
	list(c2, names, sizeof(names));
	ck_assert_str_eq(names, "b");
	ck_assert_uint_eq(go(c2, "a"), XNBD_REP_ERR_UNKNOWN);
	struct xnbd_export *a2 = add("a");
	list(c2, names, sizeof(names));
	ck_assert_str_eq(names, "b,a");
	ck_assert_uint_eq(go(c2, "a"), XNBD_REP_ACK);

	/* The first client is still served. */
	uint8_t data[512];
	read_at(c1, 4096, sizeof(data), data);
	for (size_t i = 0; i < sizeof(data); i++)
		ck_assert_uint_eq(data[i], (uint8_t)((4096 + i) * 13 + 5));
	spin(3);
	ck_assert_int_eq(calls.removed, 0);

	/* Its end is the export's. */
	close(c1);
	double end = now() + 5;
	while (!calls.removed && now() < end)
		uv_run(&loop, UV_RUN_NOWAIT);
	ck_assert_int_eq(calls.removed, 1);
	ck_assert_ptr_eq(calls.which, a);
	ck_assert_uint_eq(xnbd_export_client_count(a), 0);
	xnbd_export_free(a);
	spin(5);
	ck_assert_int_eq(calls.removed, 1);

	close(c2);
	stop_server();
	xnbd_export_free(a2);
	xnbd_export_free(b);
	teardown();
}
END_TEST

START_TEST(removal_without_clients_calls_back_later)
{
	struct xnbd_export *a = add("a");
	struct calls calls = {0};
	ck_assert_int_eq(xnbd_server_remove_export(srv, a, NULL, NULL),
	                 -EINVAL);
	ck_assert_int_eq(xnbd_server_remove_export(srv, a, on_removed, &calls),
	                 0);
	ck_assert_int_eq(calls.removed, 0); /* never inside the call */
	ck_assert_int_eq(xnbd_server_remove_export(srv, a, on_removed, &calls),
	                 -ENOENT);
	uv_run(&loop, UV_RUN_NOWAIT);
	ck_assert_int_eq(calls.removed, 1);
	xnbd_export_free(a);
	stop_server();
	teardown();
}
END_TEST

START_TEST(shutdown_waits_for_removal_callbacks)
{
	struct xnbd_export *a = add("a"), *b = add("b");
	int c1 = client();
	ck_assert_uint_eq(go(c1, "a"), XNBD_REP_ACK);
	spin(3);
	struct calls calls = {0};
	ck_assert_int_eq(xnbd_server_remove_export(srv, a, on_removed, &calls),
	                 0);
	ck_assert_int_eq(xnbd_server_shutdown(srv, 1000, on_down, NULL), 0);
	close(c1);
	double end = now() + 5;
	while (!down && now() < end)
		uv_run(&loop, UV_RUN_ONCE);
	ck_assert_int_eq(down, 1);
	ck_assert_int_eq(calls.removed, 1);
	ck_assert_int_lt(calls.order, down_order);
	/* Once the server has stopped, nothing can be removed from it. */
	ck_assert_int_eq(xnbd_server_remove_export(srv, b, on_removed, &calls),
	                 -ESHUTDOWN);
	xnbd_export_free(a);
	stop_server();
	xnbd_export_free(b);
	teardown();
}
END_TEST

/* A 1 MiB READ whose reply cannot all go out at once (small socket
 * buffers, a client that does not read yet), then the image shrinks to
 * nothing before the client reads: how many bytes of the reply arrive?
 * Every byte that does arrive must be right. */
static size_t read_while_image_shrinks(unsigned flags)
{
	enum { BIG = 2 * 1024 * 1024, N = 1024 * 1024, OFF = 4096 };
	char path[64];
	snprintf(path, sizeof(path), "/tmp/xnbd-test-server-big.XXXXXX");
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	uint8_t *pat = malloc(BIG);
	ck_assert_ptr_nonnull(pat);
	for (size_t i = 0; i < BIG; i++)
		pat[i] = (uint8_t)(i * 7 + i / 4096);
	ck_assert_int_eq(write(fd, pat, BIG), BIG);
	close(fd);
	struct xnbd_backend *b;
	ck_assert_int_eq(xnbd_backend_file_open(&loop, path, 0, &b), 0);
	struct xnbd_export *e;
	ck_assert_int_eq(xnbd_export_new("big", b, 0, &e), 0);
	ck_assert_int_eq(xnbd_server_add_export(srv, e), 0);
	xnbd_server_set_flags(srv, flags);

	int sv[2], small = 16384;
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv),
	                 0);
	setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
	setsockopt(sv[0], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
	ck_assert_int_eq(xnbd_server_serve_fd(srv, sv[1], 0), 0);
	uint8_t g[18], f[4];
	recv_n(sv[0], g, sizeof(g));
	put32(f, XNBD_FLAG_C_FIXED_NEWSTYLE | XNBD_FLAG_C_NO_ZEROES);
	send_all(sv[0], f, 4);
	ck_assert_uint_eq(go(sv[0], "big"), XNBD_REP_ACK);

	uint8_t q[28];
	put32(q, XNBD_MAGIC_REQUEST);
	q[4] = q[5] = q[6] = 0;
	q[7] = XNBD_CMD_READ;
	put64(q + 8, 7);
	put64(q + 16, OFF);
	put32(q + 24, N);
	send_all(sv[0], q, sizeof(q));
	/* Until the reply has started and the socket is full. */
	int avail = 0;
	double end = now() + 5;
	while (avail == 0 && now() < end) {
		uv_run(&loop, UV_RUN_NOWAIT);
		ioctl(sv[0], FIONREAD, &avail);
	}
	ck_assert_int_gt(avail, 0);
	spin(20);
	ck_assert_int_eq(truncate(path, 0), 0);

	uint8_t *got = malloc(16 + N);
	ck_assert_ptr_nonnull(got);
	size_t have = 0;
	end = now() + 5;
	while (have < 16 + N && now() < end) {
		uv_run(&loop, UV_RUN_NOWAIT);
		ssize_t k =
		    recv(sv[0], got + have, 16 + N - have, MSG_DONTWAIT);
		if (k == 0)
			break; /* the server closed the connection */
		if (k > 0)
			have += (size_t)k;
	}
	ck_assert_uint_ge(have, 16);
	ck_assert_uint_eq(get32(got), XNBD_MAGIC_SIMPLE_REPLY);
	ck_assert_uint_eq(get32(got + 4), 0);
	for (size_t i = 16; i < have; i++)
		ck_assert_msg(got[i] == pat[OFF + i - 16],
		              "byte %zu of the reply", i - 16);
	close(sv[0]);
	struct calls calls = {0};
	ck_assert_int_eq(xnbd_server_remove_export(srv, e, on_removed, &calls),
	                 0);
	while (!calls.removed && now() < end + 5)
		uv_run(&loop, UV_RUN_NOWAIT);
	ck_assert_int_eq(calls.removed, 1);
	xnbd_export_free(e);
	xnbd_backend_free(b);
	unlink(path);
	free(got);
	free(pat);
	return have;
}

/* Large reads in the page cache go out with sendfile(), which reads the
 * image when the reply's turn comes: a reply cut off by the image
 * shrinking ends the connection rather than carry bytes the server does
 * not have.  With XNBD_SERVER_NO_SENDFILE the data is read first (the
 * whole reply arrives). */
START_TEST(large_reads_and_the_sendfile_flag)
{
	ck_assert_uint_eq(read_while_image_shrinks(XNBD_SERVER_NO_SENDFILE),
	                  16 + 1024 * 1024);
	/* Without cachestat(2) (Linux before 6.5, or refused) nothing is sent
	 * from a file: ask it about a real file, as the server does. */
	uint64_t range[2] = {0, 4096}, cs[5];
	int pfd = open(img_path, O_RDWR);
	ck_assert_int_ge(pfd, 0);
	bool cachestat = syscall(451, pfd, range, cs, 0) == 0;
	close(pfd);
	size_t n = read_while_image_shrinks(0);
	if (cachestat)
		ck_assert_uint_lt(n, 16 + 1024 * 1024);
	stop_server();
	teardown();
}
END_TEST

/* Pipes open in this process. */
static int count_pipes(void)
{
	int n = 0;
	char link[64], path[64];
	for (int fd = 0; fd < 1024; fd++) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		ssize_t k = readlink(path, link, sizeof(link) - 1);
		if (k > 0) {
			link[k] = 0;
			n += strncmp(link, "pipe:", 5) == 0;
		}
	}
	return n;
}

/* Send all of p while running the loop (the server reads as we send). */
static void send_pumped(int fd, const uint8_t *p, size_t n)
{
	double end = now() + 5;
	while (n) {
		ssize_t k = send(fd, p, n, MSG_DONTWAIT);
		if (k > 0) {
			p += k;
			n -= (size_t)k;
		}
		uv_run(&loop, UV_RUN_NOWAIT);
		ck_assert_msg(now() < end, "the server does not read");
	}
}

/* Write 1 MiB at an unaligned offset and read the image file: how many
 * pipes did the server open for it?  Needs setup(); ends with teardown(). */
static int pipes_for_a_large_write(unsigned flags)
{
	enum { N = 1024 * 1024, OFF = 4097 };
	char path[64];
	snprintf(path, sizeof(path), "/tmp/xnbd-test-server-w.XXXXXX");
	int fd = mkstemp(path);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, 2 * N), 0);
	close(fd);
	struct xnbd_backend *b;
	ck_assert_int_eq(xnbd_backend_file_open(&loop, path, 0, &b), 0);
	struct xnbd_export *e;
	ck_assert_int_eq(xnbd_export_new("", b, 0, &e), 0);
	ck_assert_int_eq(xnbd_server_add_export(srv, e), 0);
	xnbd_server_set_flags(srv, flags);
	int sv[2];
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv),
	                 0);
	ck_assert_int_eq(xnbd_server_serve_fd(srv, sv[1], 0), 0);
	uint8_t g[18], f[4];
	recv_n(sv[0], g, sizeof(g));
	put32(f, XNBD_FLAG_C_FIXED_NEWSTYLE | XNBD_FLAG_C_NO_ZEROES);
	send_all(sv[0], f, 4);
	ck_assert_uint_eq(go(sv[0], ""), XNBD_REP_ACK);
	int before = count_pipes();

	uint8_t *msg = malloc(28 + N);
	ck_assert_ptr_nonnull(msg);
	put32(msg, XNBD_MAGIC_REQUEST);
	msg[4] = msg[5] = msg[6] = 0;
	msg[7] = XNBD_CMD_WRITE;
	put64(msg + 8, 9);
	put64(msg + 16, OFF);
	put32(msg + 24, N);
	for (size_t i = 0; i < N; i++)
		msg[28 + i] = (uint8_t)(i * 31 + i / 4096 + 1);
	send_pumped(sv[0], msg, 28 + N);
	uint8_t rep[16];
	recv_n(sv[0], rep, sizeof(rep));
	ck_assert_uint_eq(get32(rep), XNBD_MAGIC_SIMPLE_REPLY);
	ck_assert_uint_eq(get32(rep + 4), 0);
	int opened = count_pipes() - before;

	uint8_t *got = malloc(N);
	ck_assert_ptr_nonnull(got);
	fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, got, N, OFF), N);
	close(fd);
	ck_assert_msg(memcmp(got, msg + 28, N) == 0,
	              "the image holds the write");
	close(sv[0]);
	stop_server();
	xnbd_export_free(e);
	xnbd_backend_free(b);
	unlink(path);
	teardown();
	free(got);
	free(msg);
	return opened;
}

/* A large write's payload goes from the socket into a pipe and from the
 * pipe into the image; XNBD_SERVER_NO_SPLICE copies it instead.  Both
 * land the same bytes. */
START_TEST(large_writes_and_the_splice_flag)
{
	ck_assert_int_eq(pipes_for_a_large_write(XNBD_SERVER_NO_SPLICE), 0);
	setup();
	ck_assert_int_eq(pipes_for_a_large_write(0), 2);
}
END_TEST

static Suite *suite(void)
{
	Suite *s = suite_create("server");
	TCase *tc = tcase_create("exports");
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, export_names_are_checked);
	tcase_add_test(tc, removed_export_serves_its_clients_to_the_end);
	tcase_add_test(tc, removal_without_clients_calls_back_later);
	tcase_add_test(tc, shutdown_waits_for_removal_callbacks);
	tcase_add_test(tc, large_reads_and_the_sendfile_flag);
	tcase_add_test(tc, large_writes_and_the_splice_flag);
	tcase_set_timeout(tc, 30);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	return xnbd_test_run(suite());
}
