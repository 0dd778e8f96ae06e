/* test-control.c - the control channel: word encoding, error names, the
 * socket file's lifecycle, and a real control server on a loop thread
 * driven by the blocking client and by raw sockets. */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "xnbd/control.h"

#include "ctlwire.h"
#include "unit-main.h"

/* ---- the codec ------------------------------------------------------------------ */

START_TEST(encode_escapes_exactly_what_it_must)
{
	const char *in = "a b%\n\x7f\xff~!\t";
	const char *want = "a%20b%25%0A%7F%FF~!%09";
	char out[64];
	ck_assert_uint_eq(xnbd__ctl_encoded_len(in), strlen(want));
	size_t n = xnbd__ctl_encode(out, in);
	out[n] = '\0';
	ck_assert_str_eq(out, want);
	ck_assert_uint_eq(xnbd__ctl_encoded_len(""), 0);
}
END_TEST

START_TEST(every_byte_round_trips)
{
	char in[256], enc[256 * 3 + 1], dec[256];
	for (int i = 1; i < 256; i++)
		in[i - 1] = (char)i;
	in[255] = '\0';
	size_t n = xnbd__ctl_encode(enc, in);
	ck_assert_uint_eq(n, xnbd__ctl_encoded_len(in));
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)enc[i];
		ck_assert(c > 0x20 && c < 0x7f);
	}
	ck_assert_int_eq(xnbd__ctl_decode(dec, enc, n), 255);
	ck_assert_mem_eq(dec, in, 256);
}
END_TEST

START_TEST(decode_rejects_malformed_words)
{
	static const char *const bad[] = {
	    "%",    "%4",   "ab%4", "%4G",  "%G4",         "%00",  "a b",
	    "a\tb", "a\nb", "\x7f", "\x80", "caf\xc3\xa9", "%%41",
	};
	char out[32];
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		ck_assert_msg(xnbd__ctl_decode(out, bad[i], strlen(bad[i])) ==
		                  -EINVAL,
		              "accepted \"%s\"", bad[i]);
	/* Lower-case hex and needless escapes are understood. */
	ck_assert_int_eq(xnbd__ctl_decode(out, "%7e%41%c3%A9", 12), 4);
	ck_assert_str_eq(out, "~A\xc3\xa9");
	ck_assert_int_eq(xnbd__ctl_decode(out, "", 0), 0);
	ck_assert_str_eq(out, "");
}
END_TEST

START_TEST(split_keeps_empty_words_and_bounds_their_number)
{
	char *argv[XNBD__CTL_MAX_WORDS + 1];
	char l1[] = "a  b ";
	ck_assert_int_eq(xnbd__ctl_split(l1, strlen(l1), argv, 8), 4);
	ck_assert_str_eq(argv[0], "a");
	ck_assert_str_eq(argv[1], "");
	ck_assert_str_eq(argv[2], "b");
	ck_assert_str_eq(argv[3], "");
	ck_assert_ptr_null(argv[4]);

	char l2[] = "x%20y z%0A";
	ck_assert_int_eq(xnbd__ctl_split(l2, strlen(l2), argv, 8), 2);
	ck_assert_str_eq(argv[0], "x y");
	ck_assert_str_eq(argv[1], "z\n");

	char l3[] = "ok %zz";
	ck_assert_int_eq(xnbd__ctl_split(l3, strlen(l3), argv, 8), -EINVAL);

	char l4[2 * (XNBD__CTL_MAX_WORDS + 1)];
	memset(l4, ' ', sizeof(l4));
	/* 256 words: 255 spaces; 257: 256 spaces. */
	l4[255] = '\0';
	ck_assert_int_eq(xnbd__ctl_split(l4, 255, argv, XNBD__CTL_MAX_WORDS),
	                 XNBD__CTL_MAX_WORDS);
	memset(l4, ' ', sizeof(l4));
	l4[256] = '\0';
	ck_assert_int_eq(xnbd__ctl_split(l4, 256, argv, XNBD__CTL_MAX_WORDS),
	                 -E2BIG);
}
END_TEST

START_TEST(fit_shortens_without_cutting_characters)
{
	ck_assert_uint_eq(xnbd__ctl_fit("abc", 2), 2);
	ck_assert_uint_eq(xnbd__ctl_fit("abc", 10), 3);
	ck_assert_uint_eq(xnbd__ctl_fit("a b", 3), 1); /* " " takes 3 */
	ck_assert_uint_eq(xnbd__ctl_fit("a b", 4), 2);
	/* "é" is two bytes, six when encoded: all or nothing. */
	ck_assert_uint_eq(xnbd__ctl_fit("x\xc3\xa9y", 4), 1);
	ck_assert_uint_eq(xnbd__ctl_fit("x\xc3\xa9y", 6), 1);
	ck_assert_uint_eq(xnbd__ctl_fit("x\xc3\xa9y", 7), 3);
	ck_assert_uint_eq(xnbd__ctl_fit("x\xc3\xa9", 7), 3);
}
END_TEST

START_TEST(errno_names_map_both_ways)
{
	static const char *const names[] = {
	    "EINVAL",   "ENOENT",       "EBUSY",        "EPERM",   "EIO",
	    "ENOSYS",   "EEXIST",       "EADDRINUSE",   "EAGAIN",  "ECANCELED",
	    "ENOTCONN", "EALREADY",     "ESHUTDOWN",    "ENOSPC",  "ENOMEM",
	    "EPROTO",   "ETIMEDOUT",    "ECONNREFUSED", "ENODATA", "EOVERFLOW",
	    "EACCES",   "ENAMETOOLONG", "ENOTSUP",      "E2BIG",   "EMSGSIZE",
	    "EROFS",    "ECONNRESET",   "EPIPE",
	};
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		int v = xnbd__ctl_errno_value(names[i]);
		ck_assert_int_lt(v, 0);
		ck_assert_str_eq(xnbd__ctl_errno_name(v), names[i]);
	}
	ck_assert_int_eq(xnbd__ctl_errno_value("EINVAL"), -EINVAL);
	ck_assert_int_eq(xnbd__ctl_errno_value("ENOSPC"), -ENOSPC);
	/* Aliases: understood, never sent. */
	ck_assert_int_eq(xnbd__ctl_errno_value("EWOULDBLOCK"), -EAGAIN);
	ck_assert_int_eq(xnbd__ctl_errno_value("EOPNOTSUPP"), -ENOTSUP);
	ck_assert_str_eq(xnbd__ctl_errno_name(-EOPNOTSUPP), "ENOTSUP");
	/* Unknown names are an I/O error; unknown numbers have no name. */
	ck_assert_int_eq(xnbd__ctl_errno_value("EFROMTHEFUTURE"), -EIO);
	ck_assert_int_eq(xnbd__ctl_errno_value(""), -EIO);
	ck_assert_int_eq(xnbd__ctl_errno_value("einval"), -EIO);
	ck_assert_ptr_null(xnbd__ctl_errno_name(-ENOTBLK));
	ck_assert_ptr_null(xnbd__ctl_errno_name(0));
	ck_assert_ptr_null(xnbd__ctl_errno_name(EINVAL));
}
END_TEST

/* ---- a server on a loop thread ------------------------------------------------ */

static char dir[] = "/tmp/xnbd-ctl-XXXXXX";
static char path[256];

static struct {
	uv_loop_t loop;
	uv_async_t stop;
	pthread_t thread;
	struct xnbd_control *ctl;
	bool running;
} S;

static atomic_int gone_count, jobs_stopped, hangs_started;

static void setup(void)
{
	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/ctl.sock", dir);
	atomic_store(&gone_count, 0);
	atomic_store(&jobs_stopped, 0);
	atomic_store(&hangs_started, 0);
	memset(&S, 0, sizeof(S));
}

static void teardown(void)
{
	unlink(path);
	rmdir(dir);
	strcpy(dir, "/tmp/xnbd-ctl-XXXXXX");
}

/* Poll until *v reaches want; false after 10 seconds. */
static bool wait_for(atomic_int *v, int want)
{
	for (int i = 0; i < 10000; i++) {
		if (atomic_load(v) >= want)
			return true;
		usleep(1000);
	}
	return false;
}

/* echo WORD...: one `info arg WORD` per word. */
static atomic_int echo_calls;

static void cmd_echo(struct xnbd_control_req *req, int argc, char **argv,
                     void *ud)
{
	atomic_fetch_add(&echo_calls, 1);
	ck_assert_ptr_null(argv[argc]);
	for (int i = 1; i < argc; i++) {
		int r = xnbd_control_info(req, "arg", argv[i]);
		if (r < 0) {
			xnbd_control_finish(req, r, NULL);
			return;
		}
	}
	xnbd_control_finish(req, 0, NULL);
}

/* size WORD...: `info bytes N`, the decoded length of the words. */
static void cmd_size(struct xnbd_control_req *req, int argc, char **argv,
                     void *ud)
{
	size_t n = 0;
	char b[32];
	for (int i = 1; i < argc; i++)
		n += strlen(argv[i]);
	snprintf(b, sizeof(b), "%zu", n);
	xnbd_control_info(req, "bytes", b);
	xnbd_control_finish(req, 0, NULL);
}

/* count N: N progress lines, one a millisecond, from a timer. */
struct job {
	uv_timer_t t;
	struct xnbd_control_req *req;
	uint64_t i, n;
};

static void job_close_cb(uv_handle_t *h)
{
	free(h->data);
}

static void job_tick(uv_timer_t *t)
{
	struct job *j = t->data;
	j->i++;
	ck_assert_int_eq(xnbd_control_progress(j->req, j->i, j->n), 0);
	if (j->i == j->n) {
		xnbd_control_finish(j->req, 0, NULL);
		uv_close((uv_handle_t *)&j->t, job_close_cb);
	}
}

static void job_gone(struct xnbd_control_req *req, void *ud)
{
	struct job *j = ud;
	atomic_fetch_add(&gone_count, 1);
	/* The client has left: lines have nowhere to go. */
	ck_assert_int_eq(xnbd_control_progress(req, 0, 1), -EPIPE);
	ck_assert_int_eq(xnbd_control_info(req, "k", "v"), -EPIPE);
	uv_timer_stop(&j->t);
	uv_close((uv_handle_t *)&j->t, job_close_cb);
	xnbd_control_finish(req, -ECANCELED, NULL);
	atomic_fetch_add(&jobs_stopped, 1);
}

static void cmd_count(struct xnbd_control_req *req, int argc, char **argv,
                      void *ud)
{
	if (argc != 2) {
		xnbd_control_finish(req, -EINVAL, "usage: count N");
		return;
	}
	struct job *j = calloc(1, sizeof(*j));
	ck_assert_ptr_nonnull(j);
	j->req = req;
	j->n = strtoull(argv[1], NULL, 10);
	uv_timer_init(ud, &j->t);
	j->t.data = j;
	uv_timer_start(&j->t, job_tick, 1, 1);
	xnbd_control_on_gone(req, job_gone, j);
}

/* hang: never finishes unless the client leaves. */
static void hang_gone(struct xnbd_control_req *req, void *ud)
{
	atomic_fetch_add(&gone_count, 1);
	xnbd_control_finish(req, 0, NULL); /* only frees the request now */
}

static void cmd_hang(struct xnbd_control_req *req, int argc, char **argv,
                     void *ud)
{
	xnbd_control_on_gone(req, hang_gone, NULL);
	atomic_fetch_add(&hangs_started, 1);
}

static void cmd_fail(struct xnbd_control_req *req, int argc, char **argv,
                     void *ud)
{
	if (argc > 1 && strcmp(argv[1], "null") == 0)
		xnbd_control_finish(req, -ENOENT, NULL);
	else if (argc > 1 && strcmp(argv[1], "odd") == 0)
		xnbd_control_finish(req, -ENOTBLK, "no name for this one");
	else if (argc > 1 && strcmp(argv[1], "long") == 0) {
		char *m = malloc(20001);
		ck_assert_ptr_nonnull(m);
		memset(m, 'm', 20000);
		m[20000] = '\0';
		xnbd_control_finish(req, -EIO, m);
		free(m);
	} else
		xnbd_control_finish(req, -EBUSY, "busy right now, try later");
}

/* keys: what xnbd_control_info accepts, reported as one info line. */
static void cmd_keys(struct xnbd_control_req *req, int argc, char **argv,
                     void *ud)
{
	char k65[66], big[9000], rcs[128];
	memset(k65, 'k', 65);
	k65[65] = '\0';
	memset(big, 'v', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	int r1 = xnbd_control_info(req, "Upper", "x");
	int r2 = xnbd_control_info(req, "", "x");
	int r3 = xnbd_control_info(req, "a b", "x");
	int r4 = xnbd_control_info(req, k65, "x");
	int r5 = xnbd_control_info(req, "big", big);
	int r6 = xnbd_control_info(req, "a.b_c-9", "");
	snprintf(rcs, sizeof(rcs), "%d %d %d %d %d %d", r1, r2, r3, r4, r5, r6);
	xnbd_control_info(req, "rcs", rcs);
	xnbd_control_finish(req, 0, NULL);
}

/* lines N: N info lines of 1000 bytes, then ok. */
static void cmd_lines(struct xnbd_control_req *req, int argc, char **argv,
                      void *ud)
{
	char v[1001];
	memset(v, 'v', 1000);
	v[1000] = '\0';
	int n = atoi(argv[1]);
	for (int i = 0; i < n; i++)
		ck_assert_int_eq(xnbd_control_info(req, "l", v), 0);
	xnbd_control_finish(req, 0, NULL);
}

/* flood N: N progress lines at once, then ok. */
static void cmd_flood(struct xnbd_control_req *req, int argc, char **argv,
                      void *ud)
{
	uint64_t n = strtoull(argv[1], NULL, 10);
	for (uint64_t i = 1; i <= n; i++)
		ck_assert_int_eq(xnbd_control_progress(req, i, n), 0);
	xnbd_control_finish(req, 0, NULL);
}

/* later: finished by `release` on another connection.  mark: counts. */
static struct xnbd_control_req *later_req;
static int marks;

static void cmd_later(struct xnbd_control_req *req, int argc, char **argv,
                      void *ud)
{
	later_req = req;
}

static void cmd_mark(struct xnbd_control_req *req, int argc, char **argv,
                     void *ud)
{
	marks++;
	xnbd_control_finish(req, 0, NULL);
}

/* release: finish the `later` request; report whether a handler ran
 * inside that call (the request queued behind it must wait for the loop,
 * or a caller still using its state after finishing would be surprised). */
static void cmd_release(struct xnbd_control_req *req, int argc, char **argv,
                        void *ud)
{
	if (!later_req) {
		xnbd_control_finish(req, -ENOENT, "nothing to release");
		return;
	}
	int before = marks;
	xnbd_control_finish(later_req, 0, NULL);
	later_req = NULL;
	char b[16];
	snprintf(b, sizeof(b), "%d", marks - before);
	xnbd_control_info(req, "inside", b);
	xnbd_control_finish(req, 0, NULL);
}

static void stop_cb(uv_async_t *a)
{
	xnbd_control_free(S.ctl);
	uv_close((uv_handle_t *)a, NULL);
}

static void *loop_thread(void *arg)
{
	uv_run(&S.loop, UV_RUN_DEFAULT);
	return NULL;
}

static void server_start(void)
{
	ck_assert_int_eq(uv_loop_init(&S.loop), 0);
	ck_assert_int_eq(xnbd_control_new(&S.loop, &S.ctl), 0);
	ck_assert_int_eq(
	    xnbd_control_set_program(S.ctl, "test-prog/1 with space"), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "echo", cmd_echo, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "count", cmd_count, &S.loop),
	                 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "hang", cmd_hang, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "fail", cmd_fail, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "keys", cmd_keys, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "flood", cmd_flood, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "size", cmd_size, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "later", cmd_later, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "lines", cmd_lines, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "mark", cmd_mark, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(S.ctl, "release", cmd_release, NULL),
	                 0);
	later_req = NULL;
	marks = 0;
	atomic_store(&echo_calls, 0);
	ck_assert_int_eq(xnbd_control_listen(S.ctl, path), 0);
	ck_assert_int_eq(uv_async_init(&S.loop, &S.stop, stop_cb), 0);
	ck_assert_int_eq(pthread_create(&S.thread, NULL, loop_thread, NULL), 0);
	S.running = true;
}

/* Free the control server from its loop and check that every handle and
 * every request was let go: the loop must then close cleanly. */
static void server_stop(void)
{
	ck_assert(S.running);
	uv_async_send(&S.stop);
	pthread_join(S.thread, NULL);
	ck_assert_int_eq(uv_loop_close(&S.loop), 0);
	S.running = false;
}

/* ---- helpers: the blocking client, raw sockets --------------------------------- */

/* What a reply carried, as text: "i KEY VALUE\n" and "p DONE TOTAL\n". */
struct cap {
	char *text;
	size_t len;
	int nprog;
	uint64_t last_done;
	bool increasing;
	int stop_at_prog; /* return nonzero at this progress line (0: never) */
};

static int cap_cb(const struct xnbd_ctl_line *l, void *ud)
{
	struct cap *c = ud;
	char tmp[20000];
	if (strcmp(l->kind, "info") == 0) {
		ck_assert_ptr_nonnull(l->key);
		ck_assert_ptr_nonnull(l->value);
		snprintf(tmp, sizeof(tmp), "i %s %s\n", l->key, l->value);
	} else {
		ck_assert_str_eq(l->kind, "progress");
		ck_assert_ptr_null(l->key);
		snprintf(tmp, sizeof(tmp), "p %llu %llu\n",
		         (unsigned long long)l->done,
		         (unsigned long long)l->total);
		if (c->nprog && l->done <= c->last_done)
			c->increasing = false;
		c->last_done = l->done;
		c->nprog++;
		if (c->stop_at_prog && c->nprog == c->stop_at_prog)
			return 1;
	}
	size_t n = strlen(tmp);
	c->text = realloc(c->text, c->len + n + 1);
	ck_assert_ptr_nonnull(c->text);
	memcpy(c->text + c->len, tmp, n + 1);
	c->len += n;
	return 0;
}

static void cap_init(struct cap *c)
{
	memset(c, 0, sizeof(*c));
	c->increasing = true;
	c->text = strdup("");
}

static const char *cap_text(const struct cap *c)
{
	return c->text;
}

static int call(struct xnbd_ctl *c, struct cap *cap, char **msg, int argc,
                const char *const *argv)
{
	return xnbd_ctl_call(c, argc, argv, cap ? cap_cb : NULL, cap, msg);
}

#define CALL(c, cap, msg, ...) \
	call(c, cap, msg, \
	     (int)(sizeof((const char *[]){__VA_ARGS__}) / sizeof(char *)), \
	     (const char *const[]){__VA_ARGS__})

static int raw_connect(const char *p)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(fd, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, p);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	struct timeval tv = {.tv_sec = 10};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	return fd;
}

/* One line without its newline; -1 at end of stream. */
static int raw_line(int fd, char *buf, size_t cap)
{
	size_t n = 0;
	for (;;) {
		char ch;
		ssize_t r = recv(fd, &ch, 1, 0);
		if (r == 0 || (r < 0 && errno == ECONNRESET))
			return -1;
		ck_assert_int_eq(r, 1); /* a timeout fails the test */
		if (ch == '\n')
			break;
		ck_assert_uint_lt(n, cap - 1);
		buf[n++] = ch;
	}
	buf[n] = '\0';
	return (int)n;
}

static void raw_send(int fd, const char *s, size_t len)
{
	while (len) {
		ssize_t r = send(fd, s, len, MSG_NOSIGNAL);
		ck_assert_int_gt(r, 0);
		s += r;
		len -= (size_t)r;
	}
}

#define RAW_SEND(fd, s) raw_send(fd, s, strlen(s))
#define RAW_EXPECT(fd, s) \
	do { \
		char b_[XNBD_CONTROL_MAX_LINE * 2]; \
		ck_assert_int_ge(raw_line(fd, b_, sizeof(b_)), 0); \
		ck_assert_str_eq(b_, s); \
	} while (0)

static int raw_open(void)
{
	int fd = raw_connect(path);
	ck_assert_int_ge(fd, 0);
	RAW_EXPECT(fd, "xnbd-control 1 test-prog/1%20with%20space");
	return fd;
}

/* ---- end to end ---------------------------------------------------------------- */

START_TEST(greeting_and_words_travel_unharmed)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	ck_assert_str_eq(xnbd_ctl_server(c), "test-prog/1 with space");
	struct cap cap;
	cap_init(&cap);
	char *msg = (char *)1;
	ck_assert_int_eq(CALL(c, &cap, &msg, "echo", "a b", "", "100%",
	                      "two\nlines", "caf\xc3\xa9", "%41"),
	                 0);
	ck_assert_ptr_null(msg);
	ck_assert_str_eq(cap_text(&cap), "i arg a b\ni arg \ni arg 100%\n"
	                                 "i arg two\nlines\ni arg caf\xc3\xa9\n"
	                                 "i arg %41\n");
	free(cap.text);
	/* The connection serves request after request. */
	for (int i = 0; i < 3; i++)
		ck_assert_int_eq(CALL(c, NULL, NULL, "echo"), 0);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(deferred_request_streams_progress)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	struct cap cap;
	cap_init(&cap);
	ck_assert_int_eq(CALL(c, &cap, NULL, "count", "5"), 0);
	ck_assert_str_eq(cap_text(&cap), "p 1 5\np 2 5\np 3 5\np 4 5\np 5 5\n");
	free(cap.text);
	ck_assert_int_eq(atomic_load(&gone_count), 0);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(errors_carry_name_and_message)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	char *msg;
	ck_assert_int_eq(CALL(c, NULL, &msg, "fail"), -EBUSY);
	ck_assert_str_eq(msg, "busy right now, try later");
	free(msg);
	ck_assert_int_eq(CALL(c, NULL, &msg, "fail", "null"), -ENOENT);
	ck_assert_str_eq(msg, strerror(ENOENT));
	free(msg);
	/* An errno without a protocol name goes as EIO, message intact. */
	ck_assert_int_eq(CALL(c, NULL, &msg, "fail", "odd"), -EIO);
	ck_assert_str_eq(msg, "no name for this one");
	free(msg);
	/* A message too long for a line is shortened, not refused. */
	ck_assert_int_eq(CALL(c, NULL, &msg, "fail", "long"), -EIO);
	ck_assert_uint_eq(strlen(msg),
	                  XNBD_CONTROL_MAX_LINE - strlen("error EIO \n"));
	free(msg);
	ck_assert_int_eq(CALL(c, NULL, &msg, "no such"), -ENOSYS);
	ck_assert_ptr_nonnull(strstr(msg, "unknown command"));
	ck_assert_ptr_nonnull(strstr(msg, "no such"));
	free(msg);
	/* Without a place for the message, only the status. */
	ck_assert_int_eq(CALL(c, NULL, NULL, "fail"), -EBUSY);
	/* Errors leave the connection in step. */
	struct cap cap;
	cap_init(&cap);
	ck_assert_int_eq(CALL(c, &cap, &msg, "echo", "still"), 0);
	ck_assert_str_eq(cap_text(&cap), "i arg still\n");
	free(cap.text);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(help_lists_every_command)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	struct cap cap;
	cap_init(&cap);
	ck_assert_int_eq(CALL(c, &cap, NULL, "help"), 0);
	ck_assert_str_eq(cap_text(&cap),
	                 "i command count\ni command echo\ni command fail\n"
	                 "i command flood\ni command hang\ni command help\n"
	                 "i command keys\ni command later\ni command lines\n"
	                 "i command mark\n"
	                 "i command release\ni command size\n");
	free(cap.text);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(info_keys_and_sizes_are_checked)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	struct cap cap;
	cap_init(&cap);
	ck_assert_int_eq(CALL(c, &cap, NULL, "keys"), 0);
	char want[128];
	snprintf(want, sizeof(want), "i a.b_c-9 \ni rcs %d %d %d %d %d 0\n",
	         -EINVAL, -EINVAL, -EINVAL, -EINVAL, -EMSGSIZE);
	ck_assert_str_eq(cap_text(&cap), want);
	free(cap.text);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(client_refuses_requests_it_cannot_send)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	const char *argv[XNBD__CTL_MAX_WORDS + 1];
	for (int i = 0; i <= XNBD__CTL_MAX_WORDS; i++)
		argv[i] = "w";
	argv[0] = "echo";
	ck_assert_int_eq(
	    xnbd_ctl_call(c, XNBD__CTL_MAX_WORDS + 1, argv, NULL, NULL, NULL),
	    -E2BIG);
	ck_assert_int_eq(xnbd_ctl_call(c, 0, argv, NULL, NULL, NULL), -EINVAL);
	ck_assert_int_eq(CALL(c, NULL, NULL, ""), -EINVAL);
	char *big = malloc(XNBD_CONTROL_MAX_LINE);
	memset(big, 'b', XNBD_CONTROL_MAX_LINE - 1);
	big[XNBD_CONTROL_MAX_LINE - 1] = '\0';
	ck_assert_int_eq(CALL(c, NULL, NULL, "echo", big), -EMSGSIZE);
	/* 256 words and a line of exactly the limit still go through. */
	struct cap cap;
	cap_init(&cap);
	ck_assert_int_eq(
	    xnbd_ctl_call(c, XNBD__CTL_MAX_WORDS, argv, cap_cb, &cap, NULL), 0);
	ck_assert_uint_eq(cap.len,
	                  (XNBD__CTL_MAX_WORDS - 1) * strlen("i arg w\n"));
	free(cap.text);
	big[XNBD_CONTROL_MAX_LINE - strlen("size \n")] = '\0';
	cap_init(&cap);
	ck_assert_int_eq(CALL(c, &cap, NULL, "size", big), 0);
	ck_assert_str_eq(cap_text(&cap), "i bytes 8186\n");
	free(cap.text);
	/* The reply to echo that would be too long is an error, not cut. */
	ck_assert_int_eq(CALL(c, NULL, NULL, "echo", big), -EMSGSIZE);
	free(big);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(overlong_line_is_answered_then_closed)
{
	server_start();
	int fd = raw_open();
	/* A line of exactly 8192 bytes with its newline is fine ... */
	char *l = malloc(XNBD_CONTROL_MAX_LINE + 1000);
	memset(l, 'x', XNBD_CONTROL_MAX_LINE + 1000);
	memcpy(l, "size ", 5);
	l[XNBD_CONTROL_MAX_LINE - 1] = '\n';
	raw_send(fd, l, XNBD_CONTROL_MAX_LINE);
	char *b = malloc(2 * XNBD_CONTROL_MAX_LINE);
	RAW_EXPECT(fd, "info bytes 8186");
	RAW_EXPECT(fd, "ok");
	/* ... one byte more is not. */
	l[XNBD_CONTROL_MAX_LINE - 1] = 'x';
	l[XNBD_CONTROL_MAX_LINE] = '\n';
	raw_send(fd, l, XNBD_CONTROL_MAX_LINE + 1);
	ck_assert_int_gt(raw_line(fd, b, 2 * XNBD_CONTROL_MAX_LINE), 0);
	ck_assert_msg(strncmp(b, "error EINVAL ", 13) == 0, "got %s", b);
	ck_assert_int_eq(raw_line(fd, b, 2 * XNBD_CONTROL_MAX_LINE), -1);
	close(fd);
	free(l);
	free(b);
	/* The server goes on. */
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	ck_assert_int_eq(CALL(c, NULL, NULL, "echo"), 0);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(bad_lines_get_errors_and_empty_lines_nothing)
{
	server_start();
	int fd = raw_open();
	RAW_SEND(fd, "\n\n\necho%zz\necho a%\necho%00\nnope\n");
	RAW_EXPECT(fd,
	           "error EINVAL badly%20encoded%20word%20in%20a%20request");
	RAW_EXPECT(fd,
	           "error EINVAL badly%20encoded%20word%20in%20a%20request");
	RAW_EXPECT(fd,
	           "error EINVAL badly%20encoded%20word%20in%20a%20request");
	RAW_EXPECT(fd, "error ENOSYS unknown%20command:%20nope");
	/* Raw control bytes are not words either. */
	RAW_SEND(fd, "echo a\tb\n");
	RAW_EXPECT(fd,
	           "error EINVAL badly%20encoded%20word%20in%20a%20request");
	char many[2 * 300 + 8] = "echo";
	for (int i = 0; i < 300; i++)
		strcat(many, " w");
	strcat(many, "\n");
	RAW_SEND(fd, many);
	RAW_EXPECT(fd,
	           "error E2BIG more%20than%20256%20words%20in%20a%20request");
	/* An empty word is a word. */
	RAW_SEND(fd, "\necho  x \n");
	RAW_EXPECT(fd, "info arg ");
	RAW_EXPECT(fd, "info arg x");
	RAW_EXPECT(fd, "info arg ");
	RAW_EXPECT(fd, "ok");
	close(fd);
	server_stop();
}
END_TEST

START_TEST(pipelined_requests_are_answered_in_order)
{
	server_start();
	int fd = raw_open();
	RAW_SEND(fd, "echo a\ncount 2\necho b\nfail\nhelp\n");
	RAW_EXPECT(fd, "info arg a");
	RAW_EXPECT(fd, "ok");
	RAW_EXPECT(fd, "progress 1 2");
	RAW_EXPECT(fd, "progress 2 2");
	RAW_EXPECT(fd, "ok");
	RAW_EXPECT(fd, "info arg b");
	RAW_EXPECT(fd, "ok");
	RAW_EXPECT(fd, "error EBUSY busy%20right%20now,%20try%20later");
	for (int i = 0; i < 12; i++) {
		char b[256];
		ck_assert_int_gt(raw_line(fd, b, sizeof(b)), 0);
		ck_assert(strncmp(b, "info command ", 13) == 0);
	}
	RAW_EXPECT(fd, "ok");
	close(fd);
	server_stop();
}
END_TEST

START_TEST(finish_never_runs_the_next_request_inline)
{
	server_start();
	int a = raw_open();
	RAW_SEND(a, "later\nmark\nmark\n");
	int b = raw_open();
	/* `later` must be waiting before it is released. */
	RAW_SEND(b, "echo sync\n");
	RAW_EXPECT(b, "info arg sync");
	RAW_EXPECT(b, "ok");
	RAW_SEND(b, "release\n");
	RAW_EXPECT(b, "info inside 0");
	RAW_EXPECT(b, "ok");
	RAW_EXPECT(a, "ok"); /* later */
	RAW_EXPECT(a, "ok"); /* mark */
	RAW_EXPECT(a, "ok"); /* mark */
	close(a);
	close(b);
	server_stop();
}
END_TEST

/* A client that sends and never reads: the server stops taking its
 * requests once about 64 KiB of replies wait, instead of buffering them
 * all; once the client reads, every request is answered. */
START_TEST(client_that_does_not_read_is_not_buffered_for)
{
	server_start();
	int fd = raw_open();
	static char line[7002];
	memcpy(line, "echo ", 5);
	memset(line + 5, 'w', sizeof(line) - 6);
	line[sizeof(line) - 1] = '\n';
	int flags = fcntl(fd, F_GETFL);
	fcntl(fd, F_SETFL, flags | O_NONBLOCK);
	int sent = 0;
	size_t off = 0;
	for (int idle = 0; idle < 300 && sent < 2000;) {
		ssize_t r =
		    send(fd, line + off, sizeof(line) - off, MSG_NOSIGNAL);
		if (r < 0) {
			ck_assert(errno == EAGAIN);
			idle++;
			usleep(1000);
			continue;
		}
		idle = 0;
		off += (size_t)r;
		if (off == sizeof(line)) {
			off = 0;
			sent++;
		}
	}
	/* 7 KiB a reply: the socket's buffers hold some, 64 KiB wait in the
	 * server; far fewer than the 2000 a server that never stops takes. */
	int dispatched = atomic_load(&echo_calls);
	ck_assert_int_lt(dispatched, 400);
	ck_assert_int_lt(sent, 2000);
	/* Reading now lets everything through, in order. */
	if (off) {
		fcntl(fd, F_SETFL, flags);
		raw_send(fd, line + off, sizeof(line) - off);
		sent++;
	}
	fcntl(fd, F_SETFL, flags);
	static char b[8192];
	for (int i = 0; i < sent; i++) {
		ck_assert_int_gt(raw_line(fd, b, sizeof(b)), 0);
		ck_assert(strncmp(b, "info arg www", 12) == 0);
		RAW_EXPECT(fd, "ok");
	}
	ck_assert_int_eq(atomic_load(&echo_calls), sent);
	close(fd);
	server_stop();
}
END_TEST

/* A client that sends a request, shuts its sending side and reads the
 * reply (400 KB) only later: after the last line the server must still
 * close.  The EOF was once forgotten when the reply ended in a backlog,
 * and the client waited for ever. */
START_TEST(half_closed_client_gets_eof_after_a_large_reply)
{
	server_start();
	int fd = raw_open();
	RAW_SEND(fd, "lines 400\n");
	ck_assert_int_eq(shutdown(fd, SHUT_WR), 0);
	usleep(300 * 1000); /* the reply piles up unread meanwhile */
	static char b[8192];
	for (int i = 0; i < 400; i++)
		ck_assert_int_eq(raw_line(fd, b, sizeof(b)),
		                 1007); /* info l V */
	RAW_EXPECT(fd, "ok");
	ck_assert_int_eq(raw_line(fd, b, sizeof(b)), -1); /* EOF, no timeout */
	close(fd);
	server_stop();
}
END_TEST

START_TEST(half_closed_client_still_gets_its_replies)
{
	server_start();
	int fd = raw_open();
	RAW_SEND(fd, "count 3\necho z\n");
	ck_assert_int_eq(shutdown(fd, SHUT_WR), 0);
	RAW_EXPECT(fd, "progress 1 3");
	RAW_EXPECT(fd, "progress 2 3");
	RAW_EXPECT(fd, "progress 3 3");
	RAW_EXPECT(fd, "ok");
	RAW_EXPECT(fd, "info arg z");
	RAW_EXPECT(fd, "ok");
	char b[64];
	ck_assert_int_eq(raw_line(fd, b, sizeof(b)), -1);
	close(fd);
	ck_assert_int_eq(atomic_load(&gone_count), 0);
	server_stop();
}
END_TEST

START_TEST(client_leaving_calls_gone_and_others_are_served)
{
	server_start();
	struct xnbd_ctl *other;
	ck_assert_int_eq(xnbd_ctl_open(path, &other), 0);
	/* A request that never finishes by itself. */
	int fd = raw_open();
	RAW_SEND(fd, "hang\n");
	ck_assert(wait_for(&hangs_started, 1));
	close(fd);
	ck_assert(wait_for(&gone_count, 1));
	/* A job that would run for minutes stops when its client leaves. */
	fd = raw_open();
	RAW_SEND(fd, "count 1000000\n");
	RAW_EXPECT(fd, "progress 1 1000000");
	close(fd);
	ck_assert(wait_for(&jobs_stopped, 1));
	ck_assert_int_eq(atomic_load(&gone_count), 2);
	/* A connection open all along, and a new one, still work. */
	ck_assert_int_eq(CALL(other, NULL, NULL, "echo", "x"), 0);
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	ck_assert_int_eq(CALL(c, NULL, NULL, "count", "2"), 0);
	xnbd_ctl_close(c);
	xnbd_ctl_close(other);
	server_stop();
	ck_assert_int_eq(atomic_load(&gone_count), 2);
}
END_TEST

START_TEST(line_callback_can_abandon_a_reply)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	struct cap cap;
	cap_init(&cap);
	cap.stop_at_prog = 2;
	char *msg = (char *)1;
	ck_assert_int_eq(CALL(c, &cap, &msg, "count", "1000000"), -ECANCELED);
	ck_assert_ptr_null(msg);
	free(cap.text);
	/* The client closed the socket; the server stops the job. */
	ck_assert(wait_for(&jobs_stopped, 1));
	ck_assert_int_eq(CALL(c, NULL, NULL, "echo"), -ENOTCONN);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(free_with_requests_pending_calls_gone)
{
	server_start();
	int fd1 = raw_open(), fd2 = raw_open();
	RAW_SEND(fd1, "hang\n");
	RAW_SEND(fd2, "count 1000000\n");
	RAW_EXPECT(fd2, "progress 1 1000000");
	ck_assert(wait_for(&hangs_started, 1));
	server_stop(); /* the loop closing cleanly means all was let go */
	ck_assert_int_eq(atomic_load(&gone_count), 2);
	ck_assert_int_eq(atomic_load(&jobs_stopped), 1);
	/* The clients see the end of the stream, no final line. */
	char b[64];
	ck_assert_int_eq(raw_line(fd1, b, sizeof(b)), -1);
	for (;;) {
		int r = raw_line(fd2, b, sizeof(b));
		if (r < 0)
			break;
		ck_assert(strncmp(b, "progress ", 9) == 0);
	}
	close(fd1);
	close(fd2);
	struct stat st;
	ck_assert_int_eq(lstat(path, &st), -1);
	ck_assert_int_eq(errno, ENOENT);
}
END_TEST

START_TEST(unread_progress_is_dropped_not_hoarded)
{
	server_start();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	struct cap cap;
	cap_init(&cap);
	ck_assert_int_eq(CALL(c, &cap, NULL, "flood", "200000"), 0);
	ck_assert_int_gt(cap.nprog, 0);
	ck_assert_int_lt(cap.nprog, 200000);
	ck_assert(cap.increasing);
	free(cap.text);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

/* ---- the socket file ------------------------------------------------------------ */

static void check_mode_0600(void)
{
	struct stat st;
	ck_assert_int_eq(lstat(path, &st), 0);
	ck_assert(S_ISSOCK(st.st_mode));
	ck_assert_int_eq(st.st_mode & 07777, 0600);
}

START_TEST(socket_is_0600_whatever_the_umask_and_removed_on_free)
{
	static const mode_t masks[] = {0, 022, 0277};
	for (size_t i = 0; i < 3; i++) {
		mode_t old = umask(masks[i]);
		server_start();
		umask(old);
		check_mode_0600();
		struct xnbd_ctl *c;
		ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
		xnbd_ctl_close(c);
		server_stop();
		struct stat st;
		ck_assert_int_eq(lstat(path, &st), -1);
		ck_assert_int_eq(errno, ENOENT);
	}
}
END_TEST

START_TEST(stale_socket_is_replaced)
{
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, path);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	close(fd); /* the file stays, nobody listens */
	ck_assert_int_eq(raw_connect(path), -ECONNREFUSED);
	server_start();
	check_mode_0600();
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	ck_assert_int_eq(CALL(c, NULL, NULL, "echo"), 0);
	xnbd_ctl_close(c);
	server_stop();
}
END_TEST

START_TEST(live_socket_is_not_taken_over)
{
	server_start();
	uv_loop_t loop;
	struct xnbd_control *ctl;
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	ck_assert_int_eq(xnbd_control_new(&loop, &ctl), 0);
	ck_assert_int_eq(xnbd_control_listen(ctl, path), -EADDRINUSE);
	xnbd_control_free(ctl);
	ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	/* The first server keeps its socket. */
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	ck_assert_int_eq(CALL(c, NULL, NULL, "echo"), 0);
	xnbd_ctl_close(c);
	/* And listening twice on one server is refused. */
	ck_assert_int_eq(xnbd_control_listen(S.ctl, path), -EALREADY);
	server_stop();
}
END_TEST

/* Listen on a private loop; the result. */
static int listen_once(const char *p)
{
	uv_loop_t loop;
	struct xnbd_control *ctl;
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	ck_assert_int_eq(xnbd_control_new(&loop, &ctl), 0);
	int r = xnbd_control_listen(ctl, p);
	xnbd_control_free(ctl);
	ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	return r;
}

START_TEST(other_files_are_left_alone)
{
	/* A regular file. */
	int fd = open(path, O_CREAT | O_WRONLY | O_EXCL, 0644);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(write(fd, "data", 4), 4);
	close(fd);
	ck_assert_int_eq(listen_once(path), -EEXIST);
	char b[8] = {0};
	fd = open(path, O_RDONLY);
	ck_assert_int_eq(read(fd, b, sizeof(b)), 4);
	close(fd);
	ck_assert_str_eq(b, "data");
	unlink(path);
	/* A directory. */
	ck_assert_int_eq(mkdir(path, 0700), 0);
	ck_assert_int_eq(listen_once(path), -EEXIST);
	ck_assert_int_eq(rmdir(path), 0);
	/* A symbolic link, even to a stale socket. */
	char target[300];
	snprintf(target, sizeof(target), "%s/stale", dir);
	int s = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, target);
	ck_assert_int_eq(bind(s, (struct sockaddr *)&sa, sizeof(sa)), 0);
	close(s);
	ck_assert_int_eq(symlink(target, path), 0);
	ck_assert_int_eq(listen_once(path), -EEXIST);
	struct stat st;
	ck_assert_int_eq(lstat(target, &st), 0);
	unlink(path);
	unlink(target);
	/* Paths a socket cannot have. */
	char lp[200];
	memset(lp, 'p', sizeof(lp) - 1);
	lp[0] = '/';
	lp[sizeof(lp) - 1] = '\0';
	ck_assert_int_eq(listen_once(lp), -ENAMETOOLONG);
	ck_assert_int_eq(listen_once(""), -EINVAL);
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(lp, &c), -ENAMETOOLONG);
}
END_TEST

START_TEST(free_removes_only_its_own_file)
{
	server_start();
	/* Someone replaces the socket file while the server runs. */
	ck_assert_int_eq(unlink(path), 0);
	int fd = open(path, O_CREAT | O_WRONLY | O_EXCL, 0644);
	ck_assert_int_ge(fd, 0);
	close(fd);
	server_stop();
	struct stat st;
	ck_assert_int_eq(lstat(path, &st), 0);
	ck_assert(S_ISREG(st.st_mode));
}
END_TEST

START_TEST(registration_is_checked)
{
	uv_loop_t loop;
	struct xnbd_control *ctl;
	ck_assert_int_eq(uv_loop_init(&loop), 0);
	ck_assert_int_eq(xnbd_control_new(&loop, &ctl), 0);
	ck_assert_int_eq(xnbd_control_add(ctl, "help", cmd_echo, NULL),
	                 -EEXIST);
	ck_assert_int_eq(xnbd_control_add(ctl, "x", cmd_echo, NULL), 0);
	ck_assert_int_eq(xnbd_control_add(ctl, "x", cmd_echo, NULL), -EEXIST);
	ck_assert_int_eq(xnbd_control_add(ctl, "", cmd_echo, NULL), -EINVAL);
	ck_assert_int_eq(xnbd_control_add(ctl, "y", NULL, NULL), -EINVAL);
	char name[66];
	memset(name, 'n', 65);
	name[65] = '\0';
	ck_assert_int_eq(xnbd_control_add(ctl, name, cmd_echo, NULL), -EINVAL);
	name[64] = '\0';
	ck_assert_int_eq(xnbd_control_add(ctl, name, cmd_echo, NULL), 0);
	/* Many commands, in any order. */
	for (int i = 99; i >= 0; i--) {
		char n[16];
		snprintf(n, sizeof(n), "c%02d", i);
		ck_assert_int_eq(xnbd_control_add(ctl, n, cmd_echo, NULL), 0);
	}
	ck_assert_int_eq(xnbd_control_add(ctl, "c42", cmd_echo, NULL), -EEXIST);
	ck_assert_int_eq(xnbd_control_set_program(ctl, ""), -EINVAL);
	char prog[258];
	memset(prog, 'p', 257);
	prog[257] = '\0';
	ck_assert_int_eq(xnbd_control_set_program(ctl, prog), -EINVAL);
	prog[256] = '\0';
	ck_assert_int_eq(xnbd_control_set_program(ctl, prog), 0);
	xnbd_control_free(ctl);
	xnbd_control_free(NULL);
	ck_assert_int_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
	ck_assert_int_eq(uv_loop_close(&loop), 0);
	xnbd_ctl_close(NULL);
}
END_TEST

/* ---- the client against scripted servers ---------------------------------------- */

struct fake {
	int lfd;
	const char *greeting; /* NULL: close at once */
	const char *reply;    /* NULL: close after the greeting */
	pthread_t thread;
};

static void *fake_thread(void *arg)
{
	struct fake *f = arg;
	int fd = accept(f->lfd, NULL, NULL);
	if (fd < 0)
		return NULL;
	if (f->greeting) {
		send(fd, f->greeting, strlen(f->greeting), MSG_NOSIGNAL);
		if (f->reply) {
			char ch;
			while (recv(fd, &ch, 1, 0) == 1 && ch != '\n')
				;
			send(fd, f->reply, strlen(f->reply), MSG_NOSIGNAL);
		}
	}
	close(fd);
	return NULL;
}

static void fake_start(struct fake *f, const char *greeting, const char *reply)
{
	f->greeting = greeting;
	f->reply = reply;
	f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, path);
	unlink(path);
	ck_assert_int_eq(bind(f->lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	ck_assert_int_eq(listen(f->lfd, 4), 0);
	ck_assert_int_eq(pthread_create(&f->thread, NULL, fake_thread, f), 0);
}

static void fake_stop(struct fake *f)
{
	pthread_join(f->thread, NULL);
	close(f->lfd);
	unlink(path);
}

static int fake_open(const char *greeting)
{
	struct fake f;
	struct xnbd_ctl *c = NULL;
	fake_start(&f, greeting, NULL);
	int r = xnbd_ctl_open(path, &c);
	xnbd_ctl_close(c);
	fake_stop(&f);
	return r;
}

START_TEST(client_refuses_other_servers_and_versions)
{
	struct xnbd_ctl *c;
	ck_assert_int_eq(xnbd_ctl_open(path, &c), -ENOENT);
	ck_assert_int_eq(fake_open("xnbd-control 2 from-the-future\n"),
	                 -EPROTONOSUPPORT);
	ck_assert_int_eq(fake_open("xnbd-control 10\n"), -EPROTONOSUPPORT);
	ck_assert_int_eq(fake_open("SSH-2.0-OpenSSH_9.2\n"), -EPROTO);
	ck_assert_int_eq(fake_open("NBDMAGIC"),
	                 -EPROTO); /* no newline: early */
	ck_assert_int_eq(fake_open("xnbd-control x\n"), -EPROTO);
	ck_assert_int_eq(fake_open("xnbd-control 1 bad%zz\n"), -EPROTO);
	ck_assert_int_eq(fake_open("xnbd-control\n"), -EPROTO);
	ck_assert_int_eq(fake_open(NULL), -EPROTO);
	/* Later version-1 servers may say more in the greeting. */
	ck_assert_int_eq(fake_open("xnbd-control 1\n"), 0);
	ck_assert_int_eq(fake_open("xnbd-control 1 prog more words\n"), 0);
	/* A stale socket file: nobody there. */
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, path);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	close(fd);
	ck_assert_int_eq(xnbd_ctl_open(path, &c), -ECONNREFUSED);
}
END_TEST

/* One call against a scripted reply; the captured lines in *text. */
static int fake_call(const char *reply, char **text, char **msg, bool *usable)
{
	struct fake f;
	struct xnbd_ctl *c;
	fake_start(&f, "xnbd-control 1 fake extra\n", reply);
	ck_assert_int_eq(xnbd_ctl_open(path, &c), 0);
	ck_assert_str_eq(xnbd_ctl_server(c), "fake");
	struct cap cap;
	cap_init(&cap);
	int r = CALL(c, &cap, msg, "query");
	*text = cap.text;
	/* A second call shows whether the connection was given up. */
	*usable = CALL(c, NULL, NULL, "query") != -ENOTCONN;
	xnbd_ctl_close(c);
	fake_stop(&f);
	return r;
}

START_TEST(client_reads_replies_strictly_but_forward_compatibly)
{
	char *t, *m;
	bool usable;
	/* Unknown kinds and extra words are for later versions: ignored. */
	ck_assert_int_eq(fake_call("notice%20x something new\ninfo color blue "
	                           "extra\nprogress 1 2 x\nhint\nok trailing\n",
	                           &t, &m, &usable),
	                 0);
	ck_assert_str_eq(t, "i color blue\np 1 2\n");
	ck_assert_ptr_null(m);
	/* the fake then closes: -ECONNRESET, not -ENOTCONN */
	ck_assert(usable);
	free(t);
	ck_assert_int_eq(fake_call("progress 18446744073709551615 "
	                           "18446744073709551615\nok\n",
	                           &t, &m, &usable),
	                 0);
	ck_assert_str_eq(t, "p 18446744073709551615 18446744073709551615\n");
	free(t);
	/* An error from the future is an I/O error, with its message. */
	ck_assert_int_eq(
	    fake_call("error EFUTURE some%20thing\n", &t, &m, &usable), -EIO);
	ck_assert_str_eq(m, "some thing");
	free(m);
	free(t);
	ck_assert_int_eq(fake_call("error ENOSPC\n", &t, &m, &usable), -ENOSPC);
	ck_assert_str_eq(m, "");
	free(m);
	free(t);
	/* Broken replies: -EPROTO, and the connection is given up. */
	static const char *const broken[] = {
	    "progress x 2\nok\n",
	    "progress 1\nok\n",
	    "progress -1 2\nok\n",
	    "progress 18446744073709551616 1\nok\n",
	    "info onlykey\nok\n",
	    "info a b%4\nok\n",
	    "error\n",
	};
	for (size_t i = 0; i < sizeof(broken) / sizeof(broken[0]); i++) {
		ck_assert_int_eq(fake_call(broken[i], &t, &m, &usable),
		                 -EPROTO);
		ck_assert_ptr_null(m);
		ck_assert(!usable);
		free(t);
	}
	/* The server leaves in the middle of a reply. */
	ck_assert_int_eq(fake_call("info a b\n", &t, &m, &usable), -ECONNRESET);
	ck_assert_str_eq(t, "i a b\n");
	ck_assert(!usable);
	free(t);
}
END_TEST

START_TEST(client_refuses_overlong_reply_lines)
{
	char *reply = malloc(XNBD_CONTROL_MAX_LINE + 16);
	memset(reply, 'v', XNBD_CONTROL_MAX_LINE + 16);
	memcpy(reply, "info k ", 7);
	strcpy(reply + XNBD_CONTROL_MAX_LINE - 1, "\nok\n");
	char *t, *m;
	bool usable;
	/* 8192 bytes with the newline: fine. */
	ck_assert_int_eq(fake_call(reply, &t, &m, &usable), 0);
	ck_assert_uint_eq(strlen(t), 4 + XNBD_CONTROL_MAX_LINE - 1 - 7 + 1);
	free(t);
	/* One more: refused. */
	memset(reply, 'v', XNBD_CONTROL_MAX_LINE + 16);
	memcpy(reply, "info k ", 7);
	strcpy(reply + XNBD_CONTROL_MAX_LINE, "\nok\n");
	ck_assert_int_eq(fake_call(reply, &t, &m, &usable), -EPROTO);
	free(t);
	free(reply);
}
END_TEST

int main(void)
{
	/* Clients that leave mid-reply are part of the tests. */
	signal(SIGPIPE, SIG_IGN);
	Suite *s = suite_create("control");

	TCase *tc = tcase_create("codec");
	tcase_add_test(tc, encode_escapes_exactly_what_it_must);
	tcase_add_test(tc, every_byte_round_trips);
	tcase_add_test(tc, decode_rejects_malformed_words);
	tcase_add_test(tc, split_keeps_empty_words_and_bounds_their_number);
	tcase_add_test(tc, fit_shortens_without_cutting_characters);
	tcase_add_test(tc, errno_names_map_both_ways);
	suite_add_tcase(s, tc);

	tc = tcase_create("server");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, registration_is_checked);
	tcase_add_test(tc, greeting_and_words_travel_unharmed);
	tcase_add_test(tc, deferred_request_streams_progress);
	tcase_add_test(tc, finish_never_runs_the_next_request_inline);
	tcase_add_test(tc, client_that_does_not_read_is_not_buffered_for);
	tcase_add_test(tc, half_closed_client_gets_eof_after_a_large_reply);
	tcase_add_test(tc, errors_carry_name_and_message);
	tcase_add_test(tc, help_lists_every_command);
	tcase_add_test(tc, info_keys_and_sizes_are_checked);
	tcase_add_test(tc, client_refuses_requests_it_cannot_send);
	tcase_add_test(tc, overlong_line_is_answered_then_closed);
	tcase_add_test(tc, bad_lines_get_errors_and_empty_lines_nothing);
	tcase_add_test(tc, pipelined_requests_are_answered_in_order);
	tcase_add_test(tc, half_closed_client_still_gets_its_replies);
	tcase_add_test(tc, client_leaving_calls_gone_and_others_are_served);
	tcase_add_test(tc, line_callback_can_abandon_a_reply);
	tcase_add_test(tc, free_with_requests_pending_calls_gone);
	tcase_add_test(tc, unread_progress_is_dropped_not_hoarded);
	suite_add_tcase(s, tc);

	tc = tcase_create("socket file");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc,
	               socket_is_0600_whatever_the_umask_and_removed_on_free);
	tcase_add_test(tc, stale_socket_is_replaced);
	tcase_add_test(tc, live_socket_is_not_taken_over);
	tcase_add_test(tc, other_files_are_left_alone);
	tcase_add_test(tc, free_removes_only_its_own_file);
	suite_add_tcase(s, tc);

	tc = tcase_create("client");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, client_refuses_other_servers_and_versions);
	tcase_add_test(tc,
	               client_reads_replies_strictly_but_forward_compatibly);
	tcase_add_test(tc, client_refuses_overlong_reply_lines);
	suite_add_tcase(s, tc);

	return xnbd_test_run(s);
}
