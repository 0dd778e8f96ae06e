/* control_client.c - the blocking client of the control channel, for
 * command-line tools: connect, send a line, read the reply.
 *
 * Notes on the design:
 * - No loop and no threads: plain blocking system calls, each retried on
 *   EINTR, so a tool's signal handlers do not break a call.  Sends use
 *   MSG_NOSIGNAL: a server that went away is -ECONNRESET, not SIGPIPE.
 * - The greeting must come at once: it is read with a receive timeout,
 *   and its first bytes are checked as they arrive, so a socket of some
 *   other program fails fast with -EPROTO or -ETIMEDOUT instead of
 *   hanging.  Replies have no timeout: a long job may take hours.
 * - After anything that leaves the stream out of step (a broken reply, a
 *   reply abandoned by the line callback, an I/O error) the socket is
 *   closed; the server takes that as the client leaving and stops the job.
 *   Later calls fail with -ENOTCONN.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "xnbd/control.h"

#include "ctlwire.h"

#define GREETING "xnbd-control "
#define GREETING_TIMEOUT_S 10

struct xnbd_ctl {
	int fd; /* -1 once the connection is unusable */
	char *server;
	size_t rpos, rlen;
	char rbuf[4096];
	/* One line, without its newline and NUL-terminated; also the
	 * encoded request. */
	char line[XNBD_CONTROL_MAX_LINE + 1];
	char *argv[XNBD__CTL_MAX_WORDS + 1];
};

static void broken(struct xnbd_ctl *c)
{
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
}

/* Read one line into c->line; returns its length without the newline, or
 * -ECONNRESET (end of stream or reset), -EPROTO (longer than the limit,
 * or not starting with `prefix` when that is given), -ETIMEDOUT, or
 * another negative errno. */
static int read_line(struct xnbd_ctl *c, const char *prefix)
{
	size_t n = 0, plen = prefix ? strlen(prefix) : 0;
	for (;;) {
		if (c->rpos == c->rlen) {
			ssize_t r;
			do
				r = recv(c->fd, c->rbuf, sizeof(c->rbuf), 0);
			while (r < 0 && errno == EINTR);
			if (r == 0)
				return -ECONNRESET;
			if (r < 0)
				return errno == EAGAIN || errno == EWOULDBLOCK
				           ? -ETIMEDOUT
				           : -errno;
			c->rpos = 0;
			c->rlen = (size_t)r;
		}
		char *start = c->rbuf + c->rpos;
		char *nl = memchr(start, '\n', c->rlen - c->rpos);
		size_t take = nl ? (size_t)(nl - start) : c->rlen - c->rpos;
		if (n + take > XNBD_CONTROL_MAX_LINE - 1)
			return -EPROTO;
		memcpy(c->line + n, start, take);
		n += take;
		c->rpos += take + (nl ? 1 : 0);
		if (plen && memcmp(c->line, prefix, n < plen ? n : plen) != 0)
			return -EPROTO;
		if (nl) {
			if (n < plen)
				return -EPROTO;
			c->line[n] = '\0';
			return (int)n;
		}
	}
}

static int send_all(int fd, const char *p, size_t len)
{
	while (len) {
		ssize_t r = send(fd, p, len, MSG_NOSIGNAL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno == EPIPE ? -ECONNRESET : -errno;
		}
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

static int set_rcvtimeo(int fd, int seconds)
{
	struct timeval tv = {.tv_sec = seconds};
	return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0
	           ? -errno
	           : 0;
}

/* Check the greeting in c->line: `xnbd-control VERSION PROGRAM`, with
 * possibly more words after it in later releases of version 1. */
static int parse_greeting(struct xnbd_ctl *c, size_t len)
{
	char *p = c->line + strlen(GREETING);
	char *end = c->line + len;
	unsigned long version = 0;
	char *q = p;
	while (q < end && *q >= '0' && *q <= '9' && version < 1000000)
		version = version * 10 + (unsigned long)(*q++ - '0');
	if (q == p || (q < end && *q != ' '))
		return -EPROTO;
	if (version != XNBD_CONTROL_VERSION)
		return -EPROTONOSUPPORT;
	const char *program = "";
	if (q < end) {
		q++;
		int argc = xnbd__ctl_split(q, (size_t)(end - q), c->argv,
		                           XNBD__CTL_MAX_WORDS);
		if (argc < 0)
			return -EPROTO;
		program = c->argv[0];
	}
	c->server = strdup(program);
	return c->server ? 0 : -ENOMEM;
}

int xnbd_ctl_open(const char *path, struct xnbd_ctl **out)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	size_t plen = path ? strlen(path) : 0;
	if (plen == 0)
		return -EINVAL;
	if (plen >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memcpy(sa.sun_path, path, plen + 1);
	struct xnbd_ctl *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	int r;
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		r = -errno;
		goto fail;
	}
	/* A connect interrupted by a signal goes on in the background: wait
	 * for it by calling again, which then reports EISCONN or the
	 * outcome. */
	bool retried = false;
	while (connect(c->fd, (const struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == EINTR || (retried && errno == EALREADY)) {
			retried = true;
			continue;
		}
		if (retried && errno == EISCONN)
			break;
		r = -errno;
		goto fail;
	}
	r = set_rcvtimeo(c->fd, GREETING_TIMEOUT_S);
	if (r < 0)
		goto fail;
	r = read_line(c, GREETING);
	if (r == -ECONNRESET)
		r = -EPROTO; /* it closed without greeting: not one of ours */
	if (r < 0)
		goto fail;
	r = parse_greeting(c, (size_t)r);
	if (r < 0)
		goto fail;
	r = set_rcvtimeo(c->fd, 0);
	if (r < 0)
		goto fail;
	*out = c;
	return 0;
fail:
	xnbd_ctl_close(c);
	return r;
}

const char *xnbd_ctl_server(const struct xnbd_ctl *c)
{
	return c->server;
}

/* A decimal uint64 with nothing around it. */
static bool parse_u64(const char *s, uint64_t *v)
{
	uint64_t x = 0;
	if (!*s)
		return false;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return false;
		unsigned d = (unsigned)(*s - '0');
		if (x > (UINT64_MAX - d) / 10)
			return false;
		x = x * 10 + d;
	}
	*v = x;
	return true;
}

/* Encode the request into c->line with its newline; returns the length,
 * -EINVAL or -E2BIG or -EMSGSIZE. */
static int encode_request(struct xnbd_ctl *c, int argc, const char *const *argv)
{
	if (argc < 1 || !argv)
		return -EINVAL;
	if (argc > XNBD__CTL_MAX_WORDS)
		return -E2BIG;
	/* An empty command word would make an empty line when alone, and
	 * the server ignores those: the call would wait forever. */
	if (!argv[0] || !argv[0][0])
		return -EINVAL;
	size_t len = 0;
	for (int i = 0; i < argc; i++) {
		if (!argv[i])
			return -EINVAL;
		len += xnbd__ctl_encoded_len(argv[i]) + 1;
		if (len > XNBD_CONTROL_MAX_LINE)
			return -EMSGSIZE;
	}
	char *p = c->line;
	for (int i = 0; i < argc; i++) {
		p += xnbd__ctl_encode(p, argv[i]);
		*p++ = i + 1 < argc ? ' ' : '\n';
	}
	return (int)len;
}

/* The line kinds of version 1, in the order read_reply's switch uses. */
static const char *const kinds[] = {"info", "progress", "ok", "error"};

/* Read reply lines up to the final one; *in_step tells whether it was
 * read (the stream is then ready for the next request). */
static int read_reply(struct xnbd_ctl *c, xnbd_ctl_line_cb cb, void *ud,
                      char **message, bool *in_step)
{
	*in_step = false;
	for (;;) {
		int len = read_line(c, NULL);
		if (len < 0)
			return len;
		/* Kinds this client does not know are skipped unread: a later
		 * version 1 server may send them (doc/control-protocol.md). */
		size_t klen = strcspn(c->line, " ");
		int kind = -1;
		for (int k = 0; k < 4; k++)
			if (strlen(kinds[k]) == klen &&
			    memcmp(c->line, kinds[k], klen) == 0)
				kind = k;
		if (kind < 0)
			continue;
		int argc = xnbd__ctl_split(c->line, (size_t)len, c->argv,
		                           XNBD__CTL_MAX_WORDS);
		if (argc < 0)
			return -EPROTO;
		char **av = c->argv;
		struct xnbd_ctl_line l = {.kind = kinds[kind]};
		switch (kind) {
		case 0: /* info KEY VALUE */
			if (argc < 3)
				return -EPROTO;
			l.key = av[1];
			l.value = av[2];
			break;
		case 1: /* progress DONE TOTAL */
			if (argc < 3 || !parse_u64(av[1], &l.done) ||
			    !parse_u64(av[2], &l.total))
				return -EPROTO;
			break;
		case 2:
			*in_step = true;
			return 0;
		default: /* error NAME MESSAGE */
			if (argc < 2)
				return -EPROTO;
			*in_step = true;
			if (message) {
				*message = strdup(argc > 2 ? av[2] : "");
				/* Without memory the error still has its name. */
			}
			int err = xnbd__ctl_errno_value(av[1]);
			return err < 0 ? err : -EIO;
		}
		if (cb && cb(&l, ud) != 0)
			return -ECANCELED;
	}
}

int xnbd_ctl_call(struct xnbd_ctl *c, int argc, const char *const *argv,
                  xnbd_ctl_line_cb cb, void *user_data, char **message)
{
	if (message)
		*message = NULL;
	int len = encode_request(c, argc, argv);
	if (len < 0)
		return len;
	if (c->fd < 0)
		return -ENOTCONN;
	bool in_step = false;
	int r = send_all(c->fd, c->line, (size_t)len);
	if (r == 0)
		r = read_reply(c, cb, user_data, message, &in_step);
	if (!in_step)
		broken(c);
	return r;
}

void xnbd_ctl_close(struct xnbd_ctl *c)
{
	if (!c)
		return;
	broken(c);
	free(c->server);
	free(c);
}
