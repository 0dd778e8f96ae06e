/* control.c - the server side of the control channel: a Unix socket on a
 * libuv loop, one line per request, handlers by command word.
 *
 * Notes on the design:
 * - A connection holds everything one request needs: the receive buffer,
 *   a copy of the request line that its words are decoded into (argv
 *   points there), and the request itself.  A connection serves one
 *   request at a time, so nothing is allocated per request.
 * - Lines after an unfinished request stay in the receive buffer and are
 *   read on as long as there is room: that is how a client leaving in the
 *   middle of a long job is noticed.  When the buffer is full of waiting
 *   lines, reading pauses until the request is finished.
 * - Output goes to a pending buffer; one uv_write carries all of it while
 *   the next lines gather in the second buffer, so a reply of many lines
 *   costs a few writes and no allocation per line.  A client that does not
 *   read only gets its `progress` lines dropped (each one supersedes the
 *   last); `info` and final lines are always kept.  While more than that
 *   waits, no further request of the connection is dispatched (nor, once
 *   its receive buffer is full, read), so a client that sends without
 *   reading costs bounded memory.
 * - End of stream from the client is not always goodbye: a client may shut
 *   down its sending side and wait for the reply (`printf 'query\n' | nc
 *   -U`).  A read EOF is taken as the client gone only when the socket
 *   also reports a hang-up (the client closed it); otherwise the buffered
 *   requests are answered and the connection closed after the last reply.
 * - xnbd_control_finish() never runs a handler: the connection's next
 *   request is dispatched from the loop (an idle handle, kept only while
 *   connections wait for it), so a handler may finish another request
 *   (or its own, later) and go on using its state, whatever the clients
 *   have queued.  Only a handler that finishes inline, inside dispatch,
 *   returns to a loop that takes the next line.
 * - The gone callback runs from the connection's close callback, never
 *   inside a call of the handler's: a connection is freed once its handle
 *   is closed and its request, if any, finished.  The control server is
 *   freed once it was asked to be and its listener and connections are
 *   gone.
 * - The socket is created by hand, not with uv_pipe_bind, to control the
 *   file: its mode is set before bind(2) so it is never reachable by
 *   others, a stale file is probed before it is replaced, and on free only
 *   the file this server created is removed (uv_pipe_bind unlinks the path
 *   on close, whatever has replaced it meanwhile).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "xnbd/control.h"

#include "ctlwire.h"
#include "list.h"
#include "wire.h"

#define MAX_COMMAND 64U
#define MAX_KEY 64U
#define MAX_PROGRAM 256U
/* Output that may wait for the client before progress lines are dropped. */
#define OUT_SOFT_LIMIT (64U * 1024U)
/* Output buffers larger than this are not kept between writes. */
#define OUT_KEEP (64U * 1024U)
#define BACKLOG 16

struct command {
	char *name;
	xnbd_control_handler fn;
	void *ud;
};

struct conn;

struct xnbd_control_req {
	struct conn *c;
	bool active;
	xnbd_control_gone_cb gone;
	void *gone_ud;
};

struct conn {
	struct xnbd_list link;       /* ctl->conns */
	struct xnbd_list ready_link; /* ctl->ready when `queued` */
	bool queued;
	struct xnbd_control *ctl;
	uv_pipe_t pipe;
	uv_write_t wreq;
	bool reading;
	bool writing;
	bool eof;     /* the client shut its sending side */
	bool ending;  /* close once the output is written */
	bool closing; /* uv_close called: nothing more is sent */
	bool handle_closed;
	bool dispatching;     /* inside conn_process: do not recurse */
	struct xnbd__buf out; /* lines not yet handed to libuv */
	struct xnbd__buf wr;  /* the lines of the write in flight */
	struct xnbd_control_req req;
	size_t rlen;
	char rbuf[XNBD_CONTROL_MAX_LINE];
	char line[XNBD_CONTROL_MAX_LINE];
	char *argv[XNBD__CTL_MAX_WORDS + 1];
};

struct xnbd_control {
	uv_loop_t *loop;
	xnbd_log_fn log;
	void *log_ud;
	struct command *cmds; /* sorted by name */
	size_t ncmds, cmds_cap;
	char *program;
	uv_pipe_t listener;
	bool listener_open; /* initialised and its close callback not run */
	char *path;         /* the socket file this server created */
	dev_t dev;
	ino_t ino;
	struct xnbd_list conns;
	struct xnbd_list ready; /* connections whose next line waits */
	uv_idle_t kick;         /* dispatches them from the loop */
	bool kick_open;         /* initialised and its close callback not run */
	bool freeing;
};

#define ctl_log(ctl, level, ...) \
	xnbd__logf((ctl)->log, (ctl)->log_ud, level, __VA_ARGS__)

static void conn_process(struct conn *c);
static void conn_close(struct conn *c);
static void ctl_maybe_free(struct xnbd_control *ctl);

/* ---- commands ------------------------------------------------------------------ */

int xnbd_control_new(uv_loop_t *loop, struct xnbd_control **out)
{
	struct xnbd_control *ctl = calloc(1, sizeof(*ctl));
	if (!ctl)
		return -ENOMEM;
	ctl->program = strdup("libxnbd/" XNBD_VERSION);
	if (!ctl->program) {
		free(ctl);
		return -ENOMEM;
	}
	ctl->loop = loop;
	xnbd_list_init(&ctl->conns);
	xnbd_list_init(&ctl->ready);
	*out = ctl;
	return 0;
}

void xnbd_control_set_log(struct xnbd_control *ctl, xnbd_log_fn fn,
                          void *user_data)
{
	ctl->log = fn;
	ctl->log_ud = user_data;
}

int xnbd_control_set_program(struct xnbd_control *ctl, const char *text)
{
	if (!text || !*text || strlen(text) > MAX_PROGRAM)
		return -EINVAL;
	char *p = strdup(text);
	if (!p)
		return -ENOMEM;
	free(ctl->program);
	ctl->program = p;
	return 0;
}

/* Index of the first command not sorting before name. */
static size_t cmd_pos(const struct xnbd_control *ctl, const char *name)
{
	size_t lo = 0, hi = ctl->ncmds;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (strcmp(ctl->cmds[mid].name, name) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static const struct command *cmd_find(const struct xnbd_control *ctl,
                                      const char *name)
{
	size_t i = cmd_pos(ctl, name);
	if (i < ctl->ncmds && strcmp(ctl->cmds[i].name, name) == 0)
		return &ctl->cmds[i];
	return NULL;
}

int xnbd_control_add(struct xnbd_control *ctl, const char *command,
                     xnbd_control_handler fn, void *user_data)
{
	if (!command || !*command || strlen(command) > MAX_COMMAND || !fn)
		return -EINVAL;
	if (strcmp(command, "help") == 0 || cmd_find(ctl, command))
		return -EEXIST;
	if (ctl->ncmds == ctl->cmds_cap) {
		size_t cap = ctl->cmds_cap ? ctl->cmds_cap * 2 : 8;
		struct command *n = realloc(ctl->cmds, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		ctl->cmds = n;
		ctl->cmds_cap = cap;
	}
	char *name = strdup(command);
	if (!name)
		return -ENOMEM;
	size_t i = cmd_pos(ctl, command);
	memmove(&ctl->cmds[i + 1], &ctl->cmds[i],
	        (ctl->ncmds - i) * sizeof(ctl->cmds[0]));
	ctl->cmds[i] = (struct command){name, fn, user_data};
	ctl->ncmds++;
	return 0;
}

/* ---- output ------------------------------------------------------------------------ */

static void write_cb(uv_write_t *w, int status);
static void conn_queue(struct conn *c);

/* Has the client left more than OUT_SOFT_LIMIT of replies unread?  Then
 * no further request of its is dispatched (and, its receive buffer full,
 * none is read) until it reads: memory stays bounded whatever it sends. */
static bool conn_backlogged(const struct conn *c)
{
	return c->out.len + c->wr.len > OUT_SOFT_LIMIT;
}

/* Hand the pending lines to libuv unless a write is in flight; close the
 * connection when it is ending and everything has been written. */
static void conn_flush(struct conn *c)
{
	if (c->closing || c->writing)
		return;
	if (c->out.len == 0) {
		if (c->ending)
			conn_close(c);
		return;
	}
	struct xnbd__buf t = c->wr;
	c->wr = c->out;
	c->out = t;
	uv_buf_t b = uv_buf_init((char *)c->wr.data, (unsigned)c->wr.len);
	int r = uv_write(&c->wreq, (uv_stream_t *)&c->pipe, &b, 1, write_cb);
	if (r < 0) {
		ctl_log(c->ctl, XNBD_LOG_WARNING, "control: write: %s",
		        uv_strerror(r));
		conn_close(c);
		return;
	}
	c->writing = true;
}

static void write_cb(uv_write_t *w, int status)
{
	struct conn *c = w->data;
	c->writing = false;
	if (c->wr.cap > OUT_KEEP)
		xnbd__buf_free(&c->wr);
	else
		xnbd__buf_reset(&c->wr);
	if (status < 0) {
		if (status != UV_ECANCELED && status != UV_EPIPE)
			ctl_log(c->ctl, XNBD_LOG_WARNING, "control: write: %s",
			        uv_strerror(status));
		conn_close(c);
	}
	if (c->closing)
		return; /* what was not written is dropped with the handle */
	conn_flush(c);
	/* Requests held back while the client did not read go on now. */
	if (!c->req.active && (c->rlen || (c->eof && !c->ending)) &&
	    !conn_backlogged(c))
		conn_queue(c);
}

/* Append one line made of n words, each encoded, then a newline.
 * Returns 0, -EMSGSIZE when it would exceed the line limit, or -ENOMEM
 * (the connection is then closed: a reply with a line missing would
 * mislead). */
static int conn_line(struct conn *c, const char *const *words, int n)
{
	size_t len = 0;
	for (int i = 0; i < n; i++)
		len += xnbd__ctl_encoded_len(words[i]) + 1;
	if (len > XNBD_CONTROL_MAX_LINE)
		return -EMSGSIZE;
	char *p = (char *)xnbd__buf_push(&c->out, len);
	if (!p) {
		conn_close(c);
		return -ENOMEM;
	}
	for (int i = 0; i < n; i++) {
		p += xnbd__ctl_encode(p, words[i]);
		*p++ = i + 1 < n ? ' ' : '\n';
	}
	conn_flush(c);
	return 0;
}

/* The final `error` line of a request.  The message is shortened to what
 * the line can hold: it is for people, and the error name says it all. */
static void conn_error(struct conn *c, int status, const char *message)
{
	const char *name = xnbd__ctl_errno_name(status);
	if (!name)
		name = "EIO";
	if (!message)
		message = strerror(-status);
	char msg[XNBD_CONTROL_MAX_LINE];
	size_t room =
	    XNBD_CONTROL_MAX_LINE - strlen("error  \n") - strlen(name);
	size_t n = xnbd__ctl_fit(message, room);
	memcpy(msg, message, n);
	msg[n] = '\0';
	const char *w[] = {"error", name, msg};
	conn_line(c, w, 3);
}

/* ---- requests ------------------------------------------------------------------------ */

void xnbd_control_on_gone(struct xnbd_control_req *req, xnbd_control_gone_cb cb,
                          void *user_data)
{
	req->gone = cb;
	req->gone_ud = user_data;
}

static bool key_ok(const char *key)
{
	size_t n = 0;
	for (; key[n]; n++) {
		char k = key[n];
		if (!((k >= 'a' && k <= 'z') || (k >= '0' && k <= '9') ||
		      k == '_' || k == '-' || k == '.'))
			return false;
	}
	return n > 0 && n <= MAX_KEY;
}

int xnbd_control_info(struct xnbd_control_req *req, const char *key,
                      const char *value)
{
	if (!key || !value || !key_ok(key))
		return -EINVAL;
	if (req->c->closing)
		return -EPIPE;
	const char *w[] = {"info", key, value};
	return conn_line(req->c, w, 3);
}

int xnbd_control_progress(struct xnbd_control_req *req, uint64_t done,
                          uint64_t total)
{
	struct conn *c = req->c;
	if (c->closing)
		return -EPIPE;
	if (conn_backlogged(c))
		return 0;
	char d[24], t[24];
	snprintf(d, sizeof(d), "%llu", (unsigned long long)done);
	snprintf(t, sizeof(t), "%llu", (unsigned long long)total);
	const char *w[] = {"progress", d, t};
	return conn_line(c, w, 3);
}

static void conn_maybe_free(struct conn *c);

static void kick_cb(uv_idle_t *h)
{
	struct xnbd_control *ctl = h->data;
	/* Those queued meanwhile wait for the next turn of the loop. */
	struct xnbd_list now;
	xnbd_list_init(&now);
	xnbd_list_splice(&now, &ctl->ready);
	while (!xnbd_list_empty(&now)) {
		struct conn *c =
		    xnbd_container_of(now.next, struct conn, ready_link);
		xnbd_list_remove(&c->ready_link);
		c->queued = false;
		conn_process(c);
	}
	if (xnbd_list_empty(&ctl->ready))
		uv_idle_stop(&ctl->kick);
}

/* Have c's next request dispatched from the loop. */
static void conn_queue(struct conn *c)
{
	struct xnbd_control *ctl = c->ctl;
	if (c->queued || c->closing)
		return;
	if (!ctl->kick_open) {
		uv_idle_init(ctl->loop, &ctl->kick);
		ctl->kick.data = ctl;
		ctl->kick_open = true;
	}
	c->queued = true;
	xnbd_list_insert(ctl->ready.prev, &c->ready_link); /* at the end */
	uv_idle_start(&ctl->kick, kick_cb);
}

void xnbd_control_finish(struct xnbd_control_req *req, int status,
                         const char *message)
{
	struct conn *c = req->c;
	if (!req->active)
		return; /* finished twice: the first one counts */
	if (!c->closing) {
		if (status == 0) {
			const char *w[] = {"ok"};
			conn_line(c, w, 1);
		} else {
			conn_error(c, status > 0 ? -status : status, message);
		}
	}
	req->active = false;
	req->gone = NULL;
	req->gone_ud = NULL;
	if (c->handle_closed)
		conn_maybe_free(c);
	else if (!c->dispatching)
		conn_queue(c); /* dispatch's loop goes on otherwise */
}

/* The built-in command: one `info command NAME` per command, sorted. */
static void help(struct xnbd_control_req *req, struct xnbd_control *ctl)
{
	bool help_done = false;
	for (size_t i = 0; i <= ctl->ncmds; i++) {
		const char *name = i < ctl->ncmds ? ctl->cmds[i].name : NULL;
		if (!help_done && (!name || strcmp("help", name) < 0)) {
			xnbd_control_info(req, "command", "help");
			help_done = true;
		}
		if (name)
			xnbd_control_info(req, "command", name);
	}
	xnbd_control_finish(req, 0, NULL);
}

/* Answer one complete line, in c->line without its newline. */
static void dispatch(struct conn *c, size_t len)
{
	struct xnbd_control *ctl = c->ctl;
	if (len == 0)
		return; /* empty lines are allowed, and ignored */
	c->line[len] = '\0';
	int argc = xnbd__ctl_split(c->line, len, c->argv, XNBD__CTL_MAX_WORDS);
	if (argc == -E2BIG) {
		conn_error(c, -E2BIG, "more than 256 words in a request");
		return;
	}
	if (argc < 0) {
		conn_error(c, -EINVAL, "badly encoded word in a request");
		return;
	}
	struct xnbd_control_req *req = &c->req;
	req->c = c;
	req->active = true;
	req->gone = NULL;
	req->gone_ud = NULL;
	if (strcmp(c->argv[0], "help") == 0) {
		help(req, ctl);
		return;
	}
	const struct command *cmd = cmd_find(ctl, c->argv[0]);
	if (!cmd) {
		char msg[128];
		snprintf(msg, sizeof(msg), "unknown command: %.*s",
		         (int)MAX_COMMAND, c->argv[0]);
		xnbd_control_finish(req, -ENOSYS, msg);
		return;
	}
	ctl_log(ctl, XNBD_LOG_DEBUG, "control: %s", c->argv[0]);
	cmd->fn(req, argc, c->argv, cmd->ud);
}

/* ---- input ------------------------------------------------------------------------ */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct conn *c = h->data;
	*buf = uv_buf_init(c->rbuf + c->rlen,
	                   (unsigned)(sizeof(c->rbuf) - c->rlen));
}

/* Has the client closed its socket, not just shut its sending side? */
static bool peer_hung_up(struct conn *c)
{
	uv_os_fd_t fd;
	if (uv_fileno((uv_handle_t *)&c->pipe, &fd) < 0)
		return true;
	struct pollfd p = {.fd = fd, .events = POLLOUT};
	if (poll(&p, 1, 0) < 0)
		return true;
	return (p.revents & (POLLHUP | POLLERR)) != 0;
}

static void read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
	struct conn *c = st->data;
	if (nread == 0 || c->closing)
		return;
	if (nread == UV_EOF) {
		c->reading = false; /* libuv stops reading at EOF */
		c->eof = true;
		if (peer_hung_up(c)) {
			conn_close(c);
			return;
		}
	} else if (nread < 0) {
		if (nread != UV_ECONNRESET)
			ctl_log(c->ctl, XNBD_LOG_WARNING, "control: read: %s",
			        uv_strerror((int)nread));
		conn_close(c);
		return;
	} else {
		c->rlen += (size_t)nread;
	}
	conn_process(c);
}

/* Read while there is room and the client may still send. */
static void conn_update_reading(struct conn *c)
{
	bool want =
	    !c->eof && !c->ending && !c->closing && c->rlen < sizeof(c->rbuf);
	if (want == c->reading)
		return;
	int r = want ? uv_read_start((uv_stream_t *)&c->pipe, alloc_cb, read_cb)
	             : uv_read_stop((uv_stream_t *)&c->pipe);
	if (r < 0) {
		ctl_log(c->ctl, XNBD_LOG_WARNING, "control: read: %s",
		        uv_strerror(r));
		conn_close(c);
		return;
	}
	c->reading = want;
}

/* Answer the complete lines in the receive buffer, one request at a time. */
static void conn_process(struct conn *c)
{
	if (c->dispatching)
		return; /* a handler finished at once: the loop below goes on */
	c->dispatching = true;
	while (!c->req.active && !c->closing && !c->ending &&
	       !conn_backlogged(c)) {
		char *nl = memchr(c->rbuf, '\n', c->rlen);
		if (!nl) {
			if (c->rlen == sizeof(c->rbuf)) {
				/* No way to find the next request reliably. */
				conn_error(c, -EINVAL,
				           "line longer than 8192 bytes");
				ctl_log(
				    c->ctl, XNBD_LOG_WARNING,
				    "control: line too long, closing the connection");
				c->ending = true;
			} else if (c->eof) {
				/* a last line without newline is dropped */
				c->ending = true;
			}
			break;
		}
		size_t len = (size_t)(nl - c->rbuf);
		memcpy(c->line, c->rbuf, len);
		c->rlen -= len + 1;
		memmove(c->rbuf, nl + 1, c->rlen);
		dispatch(c, len);
	}
	c->dispatching = false;
	if (c->closing)
		return;
	conn_update_reading(c);
	if (c->ending)
		conn_flush(c);
}

/* ---- connections ------------------------------------------------------------------ */

static void conn_maybe_free(struct conn *c)
{
	if (!c->handle_closed || c->req.active || c->writing)
		return;
	struct xnbd_control *ctl = c->ctl;
	xnbd_list_remove(&c->link);
	if (c->queued)
		xnbd_list_remove(&c->ready_link);
	xnbd__buf_free(&c->out);
	xnbd__buf_free(&c->wr);
	free(c);
	ctl_maybe_free(ctl);
}

static void conn_close_cb(uv_handle_t *h)
{
	struct conn *c = h->data;
	/* libuv has called write_cb, cancelled if need be */
	c->writing = false;
	/* handle_closed is set after the gone callback: a finish inside it
	 * must not free the connection under our feet. */
	if (c->req.active && c->req.gone) {
		xnbd_control_gone_cb cb = c->req.gone;
		c->req.gone = NULL;
		cb(&c->req, c->req.gone_ud);
	}
	c->handle_closed = true;
	conn_maybe_free(c);
}

/* Close at once: what is not written yet is dropped. */
static void conn_close(struct conn *c)
{
	if (c->closing)
		return;
	c->closing = true;
	c->reading = false;
	uv_close((uv_handle_t *)&c->pipe, conn_close_cb);
}

static void on_connection(uv_stream_t *server, int status)
{
	struct xnbd_control *ctl = server->data;
	if (status < 0) {
		ctl_log(ctl, XNBD_LOG_WARNING, "control: accept: %s",
		        uv_strerror(status));
		return;
	}
	struct conn *c = calloc(1, sizeof(*c));
	if (!c) {
		ctl_log(ctl, XNBD_LOG_ERR, "control: out of memory accepting");
		/* The pending connection is left for the next attempt. */
		return;
	}
	c->ctl = ctl;
	c->req.c = c;
	xnbd__buf_init(&c->out);
	xnbd__buf_init(&c->wr);
	xnbd_list_insert(&ctl->conns, &c->link);
	uv_pipe_init(ctl->loop, &c->pipe, 0);
	c->pipe.data = c;
	c->wreq.data = c;
	int r = uv_accept(server, (uv_stream_t *)&c->pipe);
	if (r < 0) {
		ctl_log(ctl, XNBD_LOG_WARNING, "control: accept: %s",
		        uv_strerror(r));
		conn_close(c);
		return;
	}
	char v[16];
	snprintf(v, sizeof(v), "%d", XNBD_CONTROL_VERSION);
	const char *w[] = {"xnbd-control", v, ctl->program};
	if (conn_line(c, w, 3) < 0)
		return;
	conn_update_reading(c);
}

/* ---- listening ------------------------------------------------------------------- */

static int fill_addr(struct sockaddr_un *sa, const char *path)
{
	size_t n = strlen(path);
	if (n == 0)
		return -EINVAL;
	if (n >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	memcpy(sa->sun_path, path, n + 1);
	return 0;
}

/* Something is at the path.  Remove it if it is a socket nobody listens
 * on (its server died without removing it, and `remove`); otherwise
 * refuse. */
static int clear_stale(const struct sockaddr_un *sa, bool remove)
{
	struct stat st;
	if (lstat(sa->sun_path, &st) < 0)
		return errno == ENOENT ? 0 : -errno;
	if (!S_ISSOCK(st.st_mode))
		return -EEXIST;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	int r = connect(fd, (const struct sockaddr *)sa, sizeof(*sa));
	int err = r < 0 ? errno : 0;
	close(fd);
	switch (err) {
	case 0:
	case EAGAIN: /* a listener with a full backlog is a listener */
		return -EADDRINUSE;
	case ECONNREFUSED:
		if (remove && unlink(sa->sun_path) < 0 && errno != ENOENT)
			return -errno;
		return 0;
	case ENOENT:
		return 0; /* removed meanwhile */
	default:
		return -err;
	}
}

static void listener_close_cb(uv_handle_t *h)
{
	struct xnbd_control *ctl = h->data;
	ctl->listener_open = false;
	ctl_maybe_free(ctl);
}

/* Remove the socket file if it is still the one this server created. */
static void remove_socket_file(struct xnbd_control *ctl)
{
	struct stat st;
	if (!ctl->path)
		return;
	if (lstat(ctl->path, &st) == 0 && S_ISSOCK(st.st_mode) &&
	    st.st_dev == ctl->dev && st.st_ino == ctl->ino)
		unlink(ctl->path);
	free(ctl->path);
	ctl->path = NULL;
}

int xnbd_control_check_path(const char *path)
{
	struct sockaddr_un sa;
	int r = fill_addr(&sa, path);
	if (r == 0)
		r = clear_stale(&sa, false);
	if (r < 0)
		return r;
	/* Nothing there (or a stale socket): its directory must exist, and
	 * the process may make a file in it (bind(2) would say EACCES or
	 * EROFS only once the rest was made). */
	char *dir = strdup(path);
	if (!dir)
		return -ENOMEM;
	char *slash = strrchr(dir, '/');
	if (slash)
		slash[slash == dir] = 0; /* "/x" keeps "/" */
	const char *d = slash ? dir : ".";
	struct stat st;
	if (stat(d, &st) != 0)
		r = -errno;
	else if (!S_ISDIR(st.st_mode))
		r = -ENOTDIR;
	else if (faccessat(AT_FDCWD, d, W_OK | X_OK, AT_EACCESS) != 0)
		r = -errno;
	free(dir);
	return r;
}

int xnbd_control_listen(struct xnbd_control *ctl, const char *path)
{
	if (ctl->listener_open)
		return -EALREADY;
	struct sockaddr_un sa;
	int r = fill_addr(&sa, path);
	if (r < 0)
		return r;
	r = clear_stale(&sa, true);
	if (r < 0)
		return r;
	char *copy = strdup(path);
	if (!copy)
		return -ENOMEM;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		free(copy);
		return -errno;
	}
	/* On Linux, the file bind(2) creates takes the socket's mode (less
	 * the umask); set it first, so the file is never open to others. */
	struct stat st;
	if (fchmod(fd, 0600) < 0 ||
	    bind(fd, (const struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = -errno;
		close(fd);
		free(copy);
		return r;
	}
	/* A umask that removes the owner's write bit would leave a socket
	 * not even its owner may connect to. */
	if (lstat(path, &st) < 0 ||
	    ((st.st_mode & 07777) != 0600 && chmod(path, 0600) < 0)) {
		r = -errno;
		unlink(path);
		close(fd);
		free(copy);
		return r;
	}
	uv_pipe_init(ctl->loop, &ctl->listener, 0);
	ctl->listener.data = ctl;
	ctl->listener_open = true;
	ctl->path = copy;
	ctl->dev = st.st_dev;
	ctl->ino = st.st_ino;
	r = uv_pipe_open(&ctl->listener, fd);
	if (r < 0) {
		close(fd); /* not the handle's yet */
	} else {
		r = uv_listen((uv_stream_t *)&ctl->listener, BACKLOG,
		              on_connection);
	}
	if (r < 0) {
		remove_socket_file(ctl);
		uv_close((uv_handle_t *)&ctl->listener, listener_close_cb);
		return r;
	}
	return 0;
}

/* ---- teardown --------------------------------------------------------------------- */

static void kick_close_cb(uv_handle_t *h)
{
	struct xnbd_control *ctl = h->data;
	ctl->kick_open = false;
	ctl_maybe_free(ctl);
}

static void ctl_maybe_free(struct xnbd_control *ctl)
{
	if (!ctl->freeing || ctl->listener_open ||
	    !xnbd_list_empty(&ctl->conns))
		return;
	if (ctl->kick_open) {
		if (!uv_is_closing((uv_handle_t *)&ctl->kick))
			uv_close((uv_handle_t *)&ctl->kick, kick_close_cb);
		return;
	}
	for (size_t i = 0; i < ctl->ncmds; i++)
		free(ctl->cmds[i].name);
	free(ctl->cmds);
	free(ctl->program);
	free(ctl->path);
	free(ctl);
}

void xnbd_control_free(struct xnbd_control *ctl)
{
	if (!ctl || ctl->freeing)
		return;
	ctl->freeing = true;
	remove_socket_file(ctl);
	if (ctl->listener_open && !uv_is_closing((uv_handle_t *)&ctl->listener))
		uv_close((uv_handle_t *)&ctl->listener, listener_close_cb);
	xnbd_list_for_each(it, &ctl->conns)
	    conn_close(xnbd_container_of(it, struct conn, link));
	ctl_maybe_free(ctl);
}
