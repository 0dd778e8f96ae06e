/* test-client.c - the NBD client's time limit on connecting: a server that
 * accepts connections but never speaks (or speaks half a greeting) ends
 * the attempt with -ETIMEDOUT instead of a wait without end, a limit of 0
 * waits on, the limit cannot change during a connection, and a client
 * freed while it waits calls nothing and leaks nothing.  And its sending:
 * the requests submitted in one loop iteration go out together at its
 * end, in order; requests still queued when the client is freed complete
 * once, with an error.  And its receiving: large replies, which go from
 * the socket straight into the request's buffer, land whole and only
 * there, however the server's bytes are cut. */
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "xnbd/client.h"
#include "xnbd/xnbd.h"
#include "backend.h"
#include "unit-main.h"

static uv_loop_t loop;
static int lfd = -1;
static char port[16];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A listening socket on 127.0.0.1 that nobody serves: connections
 * complete in the kernel's backlog and then hear nothing. */
static void setup(void)
{
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	ck_assert_int_ge(lfd, 0);
	struct sockaddr_in sa = {0};
	sa.sin_family = AF_INET;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(lfd, 8), 0);
	socklen_t len = sizeof(sa);
	ck_assert_int_eq(getsockname(lfd, (struct sockaddr *)&sa, &len), 0);
	snprintf(port, sizeof(port), "%u", ntohs(sa.sin_port));
}

static void teardown(void)
{
	close(lfd);
	ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
}

struct result {
	int calls;
	int status;
	double at;
};

static void connected(struct xnbd_client *c, int status, void *ud)
{
	(void)c;
	struct result *r = ud;
	r->calls++;
	r->status = status;
	r->at = now();
}

/* Run the loop until the callback came or `limit` seconds passed. */
static void run_until(struct result *r, double limit)
{
	double end = now() + limit;
	while (!r->calls && now() < end) {
		uv_run(&loop, UV_RUN_NOWAIT);
		usleep(1000);
	}
}

/* A client connecting to the silent listener with a time limit of ms
 * (none set when ms is UINT64_MAX: the default applies). */
static struct xnbd_client *start(struct result *r, uint64_t ms)
{
	struct xnbd_client *c;
	ck_assert_int_eq(xnbd_client_new(&loop, &c), 0);
	if (ms != UINT64_MAX)
		ck_assert_int_eq(xnbd_client_set_connect_timeout(c, ms), 0);
	ck_assert_int_eq(
	    xnbd_client_connect(c, "127.0.0.1", port, "", connected, r), 0);
	return c;
}

START_TEST(silent_server_times_out)
{
	struct result r = {0};
	double t0 = now();
	struct xnbd_client *c = start(&r, 200);
	/* The limit is for the next connection, not this one. */
	ck_assert_int_eq(xnbd_client_set_connect_timeout(c, 0), -EALREADY);
	run_until(&r, 5);
	ck_assert_int_eq(r.calls, 1);
	ck_assert_int_eq(r.status, -ETIMEDOUT);
	ck_assert(r.at - t0 >= 0.19);
	ck_assert(r.at - t0 < 3);
	ck_assert_uint_eq(xnbd_client_size(c), 0);
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r.calls, 1);
}
END_TEST

/* Half a greeting, then silence: still the time limit. */
START_TEST(half_greeting_times_out)
{
	struct result r = {0};
	struct xnbd_client *c = start(&r, 300);
	int fd = -1;
	double end = now() + 5;
	while (fd < 0 && now() < end) {
		uv_run(&loop, UV_RUN_NOWAIT);
		fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
		if (fd < 0)
			usleep(1000);
	}
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(send(fd, "NBDMAGIC", 8, 0), 8);
	run_until(&r, 5);
	ck_assert_int_eq(r.calls, 1);
	ck_assert_int_eq(r.status, -ETIMEDOUT);
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	close(fd);
}
END_TEST

/* Without a limit the client waits as long as the server is silent. */
START_TEST(no_limit_waits)
{
	struct result r = {0};
	struct xnbd_client *c = start(&r, 0);
	run_until(&r, 0.5);
	ck_assert_int_eq(r.calls, 0);
	/* Freed while it waits: its callback is never called. */
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r.calls, 0);
}
END_TEST

/* The default applies to a client that did not set one, and a refused
 * connection is reported as such long before it. */
START_TEST(refused_is_not_a_timeout)
{
	struct result r = {0};
	close(lfd);
	lfd = -1;
	struct xnbd_client *c = start(&r, UINT64_MAX);
	run_until(&r, 5);
	ck_assert_int_eq(r.calls, 1);
	ck_assert_int_eq(r.status, -ECONNREFUSED);
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
}
END_TEST

/* Ports are decimal 1 to 65535 and nothing else: getaddrinfo would take
 * 70000 as 4464 and "nbd" as a service.  A refused one starts nothing. */
START_TEST(sizes_parse_as_the_programs_take_them)
{
	static const struct {
		const char *s;
		uint64_t v;
	} good[] = {{"0", 0},
	            {"4096", 4096},
	            {"2M", 2ULL << 20},
	            {"2m", 2ULL << 20},
	            {"3K", 3072},
	            {"1G", 1ULL << 30},
	            {"17179869183G", 17179869183ULL << 30},
	            {"18446744073709551615", UINT64_MAX}};
	static const char *const bad[] = {
	    "",     "-1",   "+1",           " 1",
	    "1 ",   "M",    "12Q",          "1MB",
	    "1.5M", "0x10", "17179869184G", "18446744073709551616"};
	for (size_t i = 0; i < sizeof(good) / sizeof(*good); i++) {
		uint64_t v = 1;
		ck_assert_msg(xnbd_parse_size(good[i].s, &v) == 0, "%s refused",
		              good[i].s);
		ck_assert_msg(v == good[i].v, "%s: %llu", good[i].s,
		              (unsigned long long)v);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++) {
		uint64_t v = 7;
		ck_assert_msg(xnbd_parse_size(bad[i], &v) == -EINVAL,
		              "'%s' taken", bad[i]);
		ck_assert_msg(v == 7, "'%s' wrote its result", bad[i]);
	}
	ck_assert_int_eq(xnbd_parse_size(NULL, &(uint64_t){0}), -EINVAL);
}
END_TEST

START_TEST(ports_outside_1_to_65535_are_refused)
{
	const char *good[] = {"1", "8520", "65535", "010"};
	const char *bad[] = {"",
	                     "0",
	                     "65536",
	                     "70000",
	                     "-1",
	                     "+80",
	                     " 80",
	                     "80 ",
	                     "nbd",
	                     "0x50",
	                     "99999999999999999999"};
	for (size_t i = 0; i < sizeof(good) / sizeof(*good); i++)
		ck_assert_msg(xnbd_port_valid(good[i]), "%s refused", good[i]);
	for (size_t i = 0; i < sizeof(bad) / sizeof(*bad); i++)
		ck_assert_msg(!xnbd_port_valid(bad[i]), "'%s' taken", bad[i]);
	ck_assert(!xnbd_port_valid(NULL));
	struct result r = {0};
	struct xnbd_client *c;
	ck_assert_int_eq(xnbd_client_new(&loop, &c), 0);
	ck_assert_int_eq(
	    xnbd_client_connect(c, "127.0.0.1", "70000", "", connected, &r),
	    -EINVAL);
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	ck_assert_int_eq(r.calls, 0);
}
END_TEST

/* ---- sending ---------------------------------------------------------- */

struct done {
	int calls;
	int status;
};

static void io_done(struct xnbd_io *io)
{
	struct done *d = io->user_data;
	d->calls++;
	d->status = io->status;
}

/* Submit an I/O to the client's backend; it must be pending. */
static void submit_pending(struct xnbd_backend *b, struct xnbd_io *io,
                           uint32_t type, uint64_t off, uint64_t len, void *buf,
                           struct done *d)
{
	*io = (struct xnbd_io){.type = type,
	                       .offset = off,
	                       .length = len,
	                       .buf = buf,
	                       .done = io_done,
	                       .user_data = d};
	ck_assert_int_eq(xnbd_backend_submit(b, io), XNBD_IO_PENDING);
}

static uint64_t be64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | p[i];
	return v;
}

/* A client connected to this test, which plays an oldstyle server of
 * 1 MiB on *fd (blocking). */
static struct xnbd_client *connect_oldstyle(int *fd)
{
	struct result r = {0};
	struct xnbd_client *c = start(&r, 5000);
	*fd = -1;
	double end = now() + 5;
	while (*fd < 0 && now() < end) {
		uv_run(&loop, UV_RUN_NOWAIT);
		*fd = accept4(lfd, NULL, NULL, 0);
		if (*fd < 0)
			usleep(1000);
	}
	ck_assert_int_ge(*fd, 0);
	uint8_t hello[8 + 8 + 8 + 4 + 124] = "NBDMAGIC";
	static const uint8_t old[8] = {0,    0,    0x42, 0x02,
	                               0x81, 0x86, 0x12, 0x53};
	memcpy(hello + 8, old, 8);
	hello[16 + 5] = 0x10; /* 1 MiB */
	hello[24 + 3] = 1;    /* HAS_FLAGS */
	ck_assert_int_eq(send(*fd, hello, sizeof(hello), 0),
	                 (ssize_t)sizeof(hello));
	run_until(&r, 5);
	ck_assert_int_eq(r.calls, 1);
	ck_assert_int_eq(r.status, 0);
	return c;
}

/* Run the loop until each of the n I/Os completed (5 s at most); each
 * must have completed once, successfully. */
static void wait_all_done(const struct done *d, int n)
{
	double end = now() + 5;
	int left = n;
	while (left && now() < end) {
		uv_run(&loop, UV_RUN_NOWAIT);
		left = 0;
		for (int i = 0; i < n; i++)
			left += !d[i].calls;
	}
	for (int i = 0; i < n; i++) {
		ck_assert_int_eq(d[i].calls, 1);
		ck_assert_int_eq(d[i].status, 0);
	}
}

static int pending_bytes(int fd)
{
	int n = -1;
	ck_assert_int_eq(ioctl(fd, FIONREAD, &n), 0);
	return n;
}

#define NREQ 8
START_TEST(requests_of_one_iteration_go_out_together)
{
	int fd;
	struct xnbd_client *c = connect_oldstyle(&fd);
	struct xnbd_backend *b = xnbd_client_backend(c);
	static uint8_t bufs[NREQ][4096];
	struct xnbd_io io[NREQ];
	struct done d[NREQ] = {{0}};
	for (int i = 0; i < NREQ; i++) {
		memset(bufs[i], i == 3 ? 0xab : 0, sizeof(bufs[i]));
		submit_pending(b, &io[i], i == 3 ? XNBD_IO_WRITE : XNBD_IO_READ,
		               (uint64_t)(NREQ - i) * 4096, 4096, bufs[i],
		               &d[i]);
	}
	/* Nothing is sent while the iteration that submitted them runs... */
	ck_assert_int_eq(pending_bytes(fd), 0);
	/* ...and all of it, in order, at its end. */
	uv_run(&loop, UV_RUN_NOWAIT);
	const int total = NREQ * 28 + 4096;
	ck_assert_int_eq(pending_bytes(fd), total);
	static uint8_t got[NREQ * 28 + 4096];
	ck_assert_int_eq(recv(fd, got, sizeof(got), MSG_WAITALL), total);
	const uint8_t *q = got;
	uint8_t handles[NREQ][8];
	for (int i = 0; i < NREQ; i++) {
		ck_assert_uint_eq(q[6] << 8 | q[7], i == 3 ? 1 : 0);
		ck_assert_uint_eq(be64(q + 16), (uint64_t)(NREQ - i) * 4096);
		memcpy(handles[i], q + 8, 8);
		q += 28;
		if (i == 3) {
			ck_assert_uint_eq(q[0], 0xab);
			ck_assert_uint_eq(q[4095], 0xab);
			q += 4096;
		}
	}
	/* Simple replies, the last request's first: each lands in its own. */
	for (int i = NREQ - 1; i >= 0; i--) {
		static uint8_t rep[16 + 4096];
		static const uint8_t magic[4] = {0x67, 0x44, 0x66, 0x98};
		memset(rep, 0, sizeof(rep));
		memcpy(rep, magic, 4);
		memcpy(rep + 8, handles[i], 8);
		memset(rep + 16, 0x10 + i, 4096);
		size_t n = i == 3 ? 16 : sizeof(rep);
		ck_assert_int_eq(send(fd, rep, n, 0), (ssize_t)n);
	}
	wait_all_done(d, NREQ);
	for (int i = 0; i < NREQ; i++) {
		if (i != 3)
			ck_assert_uint_eq(bufs[i][100], 0x10 + i);
	}
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	close(fd);
}
END_TEST

/* A batch larger than the socket takes at once: the part that fits is
 * written at once, the rest when there is room, all in order, and each
 * write completes once its reply is in.  (8 MiB of writes, to the 1 MiB
 * export again and again, against a small receive buffer: more than
 * Linux lets a socket hold, 4 MiB by default.) */
#define NBIG 128
#define BIG (64 * 1024)
START_TEST(a_batch_larger_than_the_socket_goes_out_whole)
{
	int small = 4096;
	ck_assert_int_eq(
	    setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)), 0);
	int fd;
	struct xnbd_client *c = connect_oldstyle(&fd);
	struct xnbd_backend *b = xnbd_client_backend(c);
	static uint8_t bufs[NBIG][BIG];
	struct xnbd_io io[NBIG];
	struct done d[NBIG] = {{0}};
	for (int i = 0; i < NBIG; i++) {
		for (int k = 0; k < BIG; k++)
			bufs[i][k] = (uint8_t)(i * 31 + k % 251);
		submit_pending(b, &io[i], XNBD_IO_WRITE,
		               (uint64_t)(i % 16) * BIG, BIG, bufs[i], &d[i]);
	}
	uv_run(&loop, UV_RUN_NOWAIT);
	const size_t total = NBIG * (28 + BIG);
	ck_assert_int_lt(pending_bytes(fd), (int)total);
	static uint8_t got[NBIG * (28 + BIG)];
	size_t have = 0;
	double end = now() + 10;
	while (have < total && now() < end) {
		ssize_t n = recv(fd, got + have, total - have, MSG_DONTWAIT);
		if (n > 0)
			have += (size_t)n;
		uv_run(&loop, UV_RUN_NOWAIT);
	}
	ck_assert_uint_eq(have, total);
	const uint8_t *q = got;
	for (int i = 0; i < NBIG; i++) {
		ck_assert_uint_eq(q[7], 1); /* NBD_CMD_WRITE */
		ck_assert_uint_eq(be64(q + 16), (uint64_t)(i % 16) * BIG);
		static const uint8_t magic[4] = {0x67, 0x44, 0x66, 0x98};
		uint8_t rep[16] = {0};
		memcpy(rep, magic, 4);
		memcpy(rep + 8, q + 8, 8);
		q += 28;
		ck_assert(memcmp(q, bufs[i], BIG) == 0);
		q += BIG;
		ck_assert_int_eq(send(fd, rep, sizeof(rep), 0),
		                 (ssize_t)sizeof(rep));
	}
	wait_all_done(d, NBIG);
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	close(fd);
}
END_TEST

/* Requests queued but not yet sent when the client is freed: each
 * completes once, with -ECANCELED, and nothing of them is sent. */
START_TEST(requests_queued_at_free_are_cancelled)
{
	int fd;
	struct xnbd_client *c = connect_oldstyle(&fd);
	struct xnbd_backend *b = xnbd_client_backend(c);
	static uint8_t buf[4][4096];
	struct xnbd_io io[4];
	struct done d[4] = {{0}};
	for (int i = 0; i < 4; i++) {
		submit_pending(b, &io[i], XNBD_IO_READ, 0, 4096, buf[i], &d[i]);
	}
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	for (int i = 0; i < 4; i++) {
		ck_assert_int_eq(d[i].calls, 1);
		ck_assert_int_eq(d[i].status, -ECANCELED);
	}
	/* Only the soft disconnect reached the server. */
	uint8_t got[64];
	ssize_t n = recv(fd, got, sizeof(got), MSG_WAITALL);
	ck_assert_int_eq(n, 28);
	ck_assert_uint_eq(got[7], 2); /* NBD_CMD_DISC */
	close(fd);
}
END_TEST

/* ---- receiving --------------------------------------------------------- */

/* Send all of p on the blocking fd in pieces of the sizes given, the
 * loop running between them so that the client reads each as it comes. */
static void send_in_pieces(int fd, const uint8_t *p, size_t len,
                           const size_t *cuts, size_t ncuts)
{
	size_t off = 0, k = 0;
	double end = now() + 10;
	while (off < len && now() < end) {
		size_t n = cuts[k++ % ncuts];
		if (n > len - off)
			n = len - off;
		size_t sent = 0;
		while (sent < n && now() < end) {
			ssize_t r =
			    send(fd, p + off + sent, n - sent, MSG_DONTWAIT);
			if (r > 0)
				sent += (size_t)r;
			uv_run(&loop, UV_RUN_NOWAIT);
		}
		off += sent;
		for (int i = 0; i < 3; i++)
			uv_run(&loop, UV_RUN_NOWAIT);
	}
	ck_assert_uint_eq(off, len);
}

#define NLARGE 4
#define LARGE (256 * 1024)
#define GUARD 4096
/* Cuts that end pieces inside headers, right after them, inside payloads
 * and a byte before their end; and one header and a byte, then all the
 * rest at once (each large payload's end comes with the next header). */
static const size_t cuts_many[] = {1,     15, 17,     40000, 3,  100000,
                                   65536, 7,  131071, 2,     16, 90001};
static const size_t cuts_two[] = {17, SIZE_MAX};

START_TEST(large_replies_cut_anywhere_land_whole)
{
	const size_t *cuts = _i ? cuts_two : cuts_many;
	size_t ncuts = _i ? 2 : sizeof(cuts_many) / sizeof(cuts_many[0]);
	int fd;
	struct xnbd_client *c = connect_oldstyle(&fd);
	struct xnbd_backend *b = xnbd_client_backend(c);
	/* Each buffer is followed by a guard no reply may touch; the last
	 * read is small (it takes the receive buffer's path). */
	static uint8_t bufs[NLARGE][LARGE + GUARD];
	static const size_t lens[NLARGE] = {LARGE, LARGE, 40000, 4096};
	struct xnbd_io io[NLARGE];
	struct done d[NLARGE] = {{0}};
	memset(bufs, 0xee, sizeof(bufs));
	for (int i = 0; i < NLARGE; i++) {
		submit_pending(b, &io[i], XNBD_IO_READ, (uint64_t)i * LARGE,
		               lens[i], bufs[i], &d[i]);
	}
	uv_run(&loop, UV_RUN_NOWAIT);
	static uint8_t got[NLARGE * 28];
	ck_assert_int_eq(recv(fd, got, sizeof(got), MSG_WAITALL),
	                 (ssize_t)sizeof(got));
	/* The replies, out of order (2, 0, 3, 1), back to back in one
	 * stream, each payload a pattern of its own. */
	static const int order[NLARGE] = {2, 0, 3, 1};
	static uint8_t stream[NLARGE * (16 + LARGE)];
	size_t len = 0;
	for (int k = 0; k < NLARGE; k++) {
		int i = order[k];
		static const uint8_t magic[4] = {0x67, 0x44, 0x66, 0x98};
		memset(stream + len, 0, 16);
		memcpy(stream + len, magic, 4);
		memcpy(stream + len + 8, got + i * 28 + 8, 8);
		len += 16;
		for (size_t j = 0; j < lens[i]; j++)
			stream[len + j] = (uint8_t)(i * 67 + j % 253);
		len += lens[i];
	}
	send_in_pieces(fd, stream, len, cuts, ncuts);
	wait_all_done(d, NLARGE);
	for (int i = 0; i < NLARGE; i++) {
		for (size_t j = 0; j < lens[i]; j++)
			if (bufs[i][j] != (uint8_t)(i * 67 + j % 253))
				ck_abort_msg("read %d: byte %zu is %u", i, j,
				             bufs[i][j]);
		for (size_t j = lens[i]; j < LARGE + GUARD; j++)
			if (bufs[i][j] != 0xee)
				ck_abort_msg("read %d: byte %zu past its end "
				             "was written",
				             i, j);
	}
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	close(fd);
}
END_TEST

/* A direct read of a large payload cut short leaves a tail; that tail is
 * read straight into the request's buffer too, not with the replies
 * queued behind it through the receive buffer (which would copy them). */
START_TEST(a_large_payloads_tail_is_read_straight_in)
{
	int fd;
	struct xnbd_client *c = connect_oldstyle(&fd);
	struct xnbd_backend *b = xnbd_client_backend(c);
	static uint8_t bufs[2][LARGE + GUARD];
	struct xnbd_io io[2];
	struct done d[2] = {{0}};
	memset(bufs, 0xee, sizeof(bufs));
	for (int i = 0; i < 2; i++)
		submit_pending(b, &io[i], XNBD_IO_READ, (uint64_t)i * LARGE,
		               LARGE, bufs[i], &d[i]);
	uv_run(&loop, UV_RUN_NOWAIT);
	static uint8_t got[2 * 28];
	ck_assert_int_eq(recv(fd, got, sizeof(got), MSG_WAITALL),
	                 (ssize_t)sizeof(got));
	static uint8_t stream[2 * (16 + LARGE)];
	size_t len = 0;
	for (int i = 0; i < 2; i++) {
		static const uint8_t magic[4] = {0x67, 0x44, 0x66, 0x98};
		memset(stream + len, 0, 16);
		memcpy(stream + len, magic, 4);
		memcpy(stream + len + 8, got + i * 28 + 8, 8);
		len += 16;
		for (size_t j = 0; j < LARGE; j++)
			stream[len + j] = (uint8_t)(i * 89 + j % 251);
		len += LARGE;
	}
	/* The first header alone, then all of its payload but a tail of
	 * 10000 bytes (under DIRECT_MIN), then the tail with the second
	 * reply behind it. */
	static const size_t cuts[] = {16, LARGE - 10000, SIZE_MAX};
	send_in_pieces(fd, stream, len, cuts, 3);
	wait_all_done(d, 2);
	for (int i = 0; i < 2; i++) {
		for (size_t j = 0; j < LARGE; j++)
			if (bufs[i][j] != (uint8_t)(i * 89 + j % 251))
				ck_abort_msg("read %d: byte %zu is %u", i, j,
				             bufs[i][j]);
		for (size_t j = LARGE; j < LARGE + GUARD; j++)
			ck_assert_uint_eq(bufs[i][j], 0xee);
	}
	/* At most what the small read after the first payload took of the
	 * second (4096 bytes, less its header). */
	ck_assert_uint_le(xnbd__client_copied(c), 4096 - 16);
	xnbd_client_free(c);
	uv_run(&loop, UV_RUN_DEFAULT);
	close(fd);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("client");
	TCase *tc = tcase_create("connect-timeout");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, silent_server_times_out);
	tcase_add_test(tc, ports_outside_1_to_65535_are_refused);
	tcase_add_test(tc, sizes_parse_as_the_programs_take_them);
	tcase_add_test(tc, half_greeting_times_out);
	tcase_add_test(tc, no_limit_waits);
	tcase_add_test(tc, refused_is_not_a_timeout);
	suite_add_tcase(s, tc);
	TCase *ts = tcase_create("sending");
	tcase_add_checked_fixture(ts, setup, teardown);
	tcase_add_test(ts, requests_of_one_iteration_go_out_together);
	tcase_add_test(ts, requests_queued_at_free_are_cancelled);
	tcase_add_test(ts, a_batch_larger_than_the_socket_goes_out_whole);
	suite_add_tcase(s, ts);
	TCase *tr = tcase_create("receiving");
	tcase_add_checked_fixture(tr, setup, teardown);
	tcase_add_loop_test(tr, large_replies_cut_anywhere_land_whole, 0, 2);
	tcase_add_test(tr, a_large_payloads_tail_is_read_straight_in);
	suite_add_tcase(s, tr);
	return xnbd_test_run(s);
}
