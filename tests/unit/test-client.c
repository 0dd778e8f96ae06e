/* test-client.c - the NBD client's time limit on connecting: a server that
 * accepts connections but never speaks (or speaks half a greeting) ends
 * the attempt with -ETIMEDOUT instead of a wait without end, a limit of 0
 * waits on, the limit cannot change during a connection, and a client
 * freed while it waits calls nothing and leaks nothing. */
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "xnbd/client.h"
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
	ck_assert_int_eq(xnbd_client_connect(c, "127.0.0.1", port, "", connected,
	                                     r),
	                 0);
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

int main(void)
{
	Suite *s = suite_create("client");
	TCase *tc = tcase_create("connect-timeout");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, silent_server_times_out);
	tcase_add_test(tc, half_greeting_times_out);
	tcase_add_test(tc, no_limit_waits);
	tcase_add_test(tc, refused_is_not_a_timeout);
	suite_add_tcase(s, tc);
	return xnbd_test_run(s);
}
