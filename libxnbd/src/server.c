/* server.c - the NBD server engine: listeners, sessions, dispatch.
 *
 * Notes on the design:
 * - One session per connection.  It reads into a receive buffer, feeds the
 *   handshake state machine (handshake.c) and then parses as many request
 *   headers per read as arrived.  A large WRITE payload is read straight
 *   into the request's own buffer, the one handed to the backend.
 * - Requests are `struct req`, kept on a per-session free list with their
 *   buffers, so steady-state I/O allocates nothing.
 * - Replies are not written one by one: a finished request is put on its
 *   session's output list and the session on the server's dirty list; a
 *   uv_check handle, which runs once per loop iteration after all I/O
 *   callbacks, sends each dirty session's replies in one vectored write.
 * - Large reads the backend finds in the page cache are not read at all
 *   when they are asked for: the reply's data is a file segment, sent with
 *   sendfile() when its turn comes, so the bytes go from the page cache to
 *   the socket without a copy through user space (see read_fd in
 *   backend.h).  The session writes its socket itself (writev, sendfile),
 *   and waits for room with a poll handle on a duplicate of the socket's
 *   descriptor, since libuv's stream has no way to send from a file.
 * - Backpressure: a session stops parsing and reading while it (or the
 *   whole server) has too many requests or bytes queued, and resumes when
 *   replies have been written.
 * - A session is freed only when its handle is closed and no request of it
 *   is with the backend or the socket.
 * - Exports come and go while the server runs.  A session in transmission
 *   counts on its export (`clients`); a removed export leaves the catalog at
 *   once, and its callback runs from the `reap` timer once that count is
 *   zero, so the caller frees the backend only when nobody uses it.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "xnbd/server.h"

#include "backend.h"
#include "list.h"
#include "pool.h"
#include "wire.h"

/* A session's receive buffer: one read takes what a wake-up brings.  32
 * writes of 4 KiB are 132 KiB; with 64 KiB, three reads a wake-up and
 * 0.84x the IOPS (fourteenth session, 2026-12-06).  Pages are touched
 * only as far as bursts reach. */
#define RBUF_SIZE (256U * 1024U)
#define DIRECT_MIN (32U * 1024U) /* payload left to read straight in */
#define SESSION_MAX_QUEUE 1024U
#define SESSION_MAX_BUF (256U * 1024U * 1024U)
#define MAX_EXTENTS 2048U
#define HOLE_GRAIN (64U * 1024U) /* granularity of hole detection in reads */
#define KEEP_BUF_MAX (1024U * 1024U) /* larger buffers are not kept */
#define ALIGN_BUF_MIN (128U * 1024U) /* buffers this large: page-aligned */
#define FREE_REQS_MAX 64U
#define SENDFILE_MIN (64U * 1024U) /* smaller reads: copied and batched */
#define WRITE_IOV_MAX 512U
/* WRITE payloads above SPLICE_MIN and up to PIPE_SIZE go to a plain image
 * through a pipe (see splice_in).  Smaller ones are copied: the file
 * backend writes those from the loop thread, without a pool hand-off. */
#define SPLICE_MIN (128U * 1024U)
#define PIPE_SIZE (1024U * 1024U)
#define PIPES_MAX 16U /* per session, in use */
/* Kept open while unused: each counts PIPE_SIZE against the user's pipe
 * page limit (pipe-user-pages-soft), full or not. */
#define PIPES_KEEP 2U
#define SPLICE_GIVE_UP 4U /* payloads in a row that had to be copied */

struct xnbd_export {
	char *name;
	char *description;
	struct xnbd_backend *backend;
	unsigned flags;
	struct xnbd__hs_export hs; /* as the handshake sees it */
	size_t clients;            /* sessions in transmission with it */
	/* Removed from a server, waiting for its last client to end. */
	bool removing;
	xnbd_export_removed_cb removed_cb;
	void *removed_ud;
	struct xnbd_list due_link; /* srv->removed_due once that client ended */
};

struct listener {
	struct xnbd_list link;
	uv_tcp_t tcp;
	struct xnbd_server *srv;
};

/* A piece of a reply: bytes of the request's header area, of its data
 * buffer, or of a file (at off in req.src_fd). */
enum { SEG_HDR, SEG_DATA, SEG_FILE };
struct seg {
	uint32_t kind;
	uint32_t len;
	uint64_t off;
};

struct session;

struct req {
	struct xnbd_list link;
	struct session *s;
	struct xnbd__request r;
	struct xnbd_io io;
	uint8_t *buf; /* READ/WRITE data */
	size_t buf_cap;
	uint32_t have; /* WRITE payload bytes received */
	int pr, pw;    /* WRITE: the pipe its payload is spliced into, or -1 */
	int src_fd;    /* READ: >= 0 when the data is sent from this file */
	uint64_t src_off;
	uint32_t src_resumes; /* the session's wresumes when it was checked */
	struct xnbd_extent *extents; /* 2 * MAX_EXTENTS: one half a context */
	uint32_t n_ext[XNBD__CTX_COUNT]; /* BLOCK_STATUS: extents per context */
	uint32_t ctx_left;    /* BLOCK_STATUS: contexts still to ask about */
	struct xnbd__buf hdr; /* reply headers */
	struct seg segs[8];
	struct seg *xsegs; /* when more than 8 are needed */
	uint32_t nsegs, xsegs_cap;
	size_t charged; /* bytes counted against the buffer bounds */
};

enum sess_state {
	S_HANDSHAKE,
	S_TRANSMIT,
	S_CLOSING, /* handle closing or closed */
};

struct session {
	struct xnbd_list link;       /* srv->sessions */
	struct xnbd_list dirty_link; /* srv->dirty when output is pending */
	struct xnbd_server *srv;
	union {
		uv_handle_t handle;
		uv_stream_t stream;
		uv_tcp_t tcp;
		uv_pipe_t pipe;
	} h;
	enum sess_state state;
	bool handle_closed;
	bool reading;
	bool draining; /* DISC or a failed handshake: take no new requests */
	bool shutting; /* server shutdown: answer new requests ESHUTDOWN */
	/* shutting and drained: write side shut, reading to EOF */
	bool fin_sent;
	uv_shutdown_t shut;
	bool direct; /* the last alloc_cb handed out cur's buffer */
	struct xnbd__hs hs;
	struct xnbd_export *export;
	struct xnbd__tx tx;
	uint8_t *rbuf;
	size_t rpos, rlen;
	struct req *cur;      /* WRITE whose payload is being received */
	uint64_t skip;        /* payload bytes to discard */
	struct req *skip_req; /* the rejected write they belong to */
	struct xnbd_list out; /* finished requests not yet written */
	struct xnbd_list free_reqs;
	size_t nfree;
	size_t queued;         /* requests received and not yet released */
	size_t buffered;       /* bytes charged by those requests */
	size_t writes_pending; /* handshake and batch writes with libuv */
	/* Output of the transmission phase, written by the session itself. */
	int fd;           /* the stream's descriptor */
	bool is_sock;     /* a socket: splice and SO_ERROR work on it */
	bool sendfile_ok; /* large cached reads go out with sendfile */
	bool wblocked;    /* the socket is full: waiting on wpoll */
	bool wpoll_init;  /* wpoll (on wfd, a dup of fd) is initialised */
	bool wpoll_closed;
	uv_poll_t wpoll;
	int wfd;
	uint32_t wseg; /* write cursor: segment of the first request in out */
	uint32_t woff; /* and bytes of it already written */
	/* Times the writer went on after a stop (room in the socket, a load,
	 * a handshake write): a file segment checked before the last one may
	 * have left the page cache while it waited. */
	uint32_t wresumes;
	/* Large WRITE payloads are spliced from the socket into a pipe
	 * (splice_in); meanwhile libuv does not read the socket, and the
	 * session waits for input on wpoll. */
	bool splice_ok;
	bool wait_in;  /* waiting on wpoll for more of a spliced payload */
	bool hdr_only; /* read no further than the next request header */
	uint32_t splice_misses;
	uint32_t npipes, npipes_free; /* open, and of those not in use */
	int pipes[PIPES_KEEP][2];
	/* At most one file segment at a time is read into its request's
	 * buffer on the pool, while the writer waits. */
	struct req *loading;
	struct xnbd__job load;
	uint8_t *load_dst;
	uint64_t load_at, load_left, load_rel;
	int load_status;
	char peer[64];
	struct iovec iov[WRITE_IOV_MAX];
};

struct xnbd_server {
	uv_loop_t *loop;
	struct xnbd__chan jobs; /* the sessions' reloads, on libxnbd's pool */
	xnbd_log_fn log;
	void *log_ud;
	unsigned flags;
	size_t max_queue, max_buf;
	size_t queued, buffered;
	struct xnbd_export **exports;
	size_t nexports;
	struct xnbd__hs_catalog catalog;
	struct xnbd_list listeners;
	struct xnbd_list sessions;
	struct xnbd_list dirty;
	size_t nsessions;
	size_t nlisteners_open;
	uv_check_t check;
	/* Active together with check: an active idle handle keeps the loop
	 * from blocking in poll while replies wait for the check handle (they
	 * may be finished after it ran: in a close callback, or by a wake
	 * that leaves more for the next round). */
	uv_idle_t kick;
	bool check_started;
	bool wake_pending; /* paused sessions may read again */
	bool check_closed;
	bool kick_closed;
	uv_timer_t grace;
	bool grace_started;
	bool grace_closed;
	uv_timer_t reap; /* runs the callbacks of removed exports */
	bool reap_closed;
	struct xnbd_list removed_due; /* removed exports no client uses */
	bool shutting_down;
	xnbd_shutdown_cb shutdown_cb;
	void *shutdown_ud;
	xnbd_client_end_cb end_cb;
	void *end_ud;
	uint8_t discard[RBUF_SIZE];
};

static void session_close(struct session *s, const char *why);
static void skip_done(struct session *s);
static void session_process(struct session *s);
static void session_maybe_resume(struct session *s);
static void wake_paused(struct xnbd_server *srv, struct session *except);
static void check_cb(uv_check_t *h);
static void maybe_finish_shutdown(struct xnbd_server *srv);

static void kick_cb(uv_idle_t *h)
{
	(void)h; /* its being active is all: poll does not block */
}

/* Replies or wakes wait: the check handle runs at the end of this loop
 * iteration, or of the next one, which then does not block. */
static void check_arm(struct xnbd_server *srv)
{
	if (!srv->check_started && !srv->check_closed &&
	    !uv_is_closing((uv_handle_t *)&srv->check)) {
		uv_check_start(&srv->check, check_cb);
		uv_idle_start(&srv->kick, kick_cb);
		srv->check_started = true;
	}
}

/* ---- logging -------------------------------------------------------------- */

#define slog(srv, level, ...) \
	xnbd__logf((srv)->log, (srv)->log_ud, level, __VA_ARGS__)

/* ---- exports ------------------------------------------------------------- */

static void export_refresh(struct xnbd_export *e)
{
	unsigned caps = xnbd_backend_caps(e->backend);
	uint16_t f = XNBD_FLAG_HAS_FLAGS;
	bool ro =
	    (e->flags & XNBD_EXPORT_READONLY) || (caps & XNBD_CAP_READ_ONLY);
	if (ro)
		f |= XNBD_FLAG_READ_ONLY;
	if (caps & XNBD_CAP_FLUSH)
		f |= XNBD_FLAG_SEND_FLUSH;
	if (caps & XNBD_CAP_FUA)
		f |= XNBD_FLAG_SEND_FUA;
	if (!ro && (caps & XNBD_CAP_TRIM))
		f |= XNBD_FLAG_SEND_TRIM;
	if (!ro && (caps & XNBD_CAP_ZERO)) {
		f |= XNBD_FLAG_SEND_WRITE_ZEROES;
		if (caps & XNBD_CAP_FAST_ZERO)
			f |= XNBD_FLAG_SEND_FAST_ZERO;
	}
	if (caps & XNBD_CAP_CACHE)
		f |= XNBD_FLAG_SEND_CACHE;
	if (caps & XNBD_CAP_MULTI_CONN)
		f |= XNBD_FLAG_CAN_MULTI_CONN;
	e->hs.name = e->name;
	e->hs.description = e->description;
	e->hs.size = xnbd_backend_size(e->backend);
	e->hs.tflags = f;
	e->hs.contexts =
	    (caps & XNBD_CAP_BLOCK_STATUS) ? XNBD__CTX_BASE_ALLOCATION : 0;
	if ((caps & XNBD_CAP_BLOCK_STATUS) && (caps & XNBD_CAP_CACHE_STATUS))
		e->hs.contexts |= XNBD__CTX_XNBD_CACHE;
	e->hs.min_block = 1;
	e->hs.pref_block = 4096;
	e->hs.max_block = XNBD_MAX_PAYLOAD;
	e->hs.handle = e;
}

int xnbd_export_name_check(const char *name)
{
	if (!name || strlen(name) > XNBD_MAX_STRING)
		return -EINVAL;
	for (const unsigned char *p = (const unsigned char *)name; *p;) {
		unsigned c = *p++, v, min;
		int more;
		if (c < 0x80)
			continue;
		if (c >= 0xc2 && c <= 0xdf)
			more = 1, min = 0x80, v = c & 0x1f;
		else if (c >= 0xe0 && c <= 0xef)
			more = 2, min = 0x800, v = c & 0x0f;
		else if (c >= 0xf0 && c <= 0xf4)
			more = 3, min = 0x10000, v = c & 0x07;
		else
			return -EINVAL;
		for (; more; more--, p++) {
			if ((*p & 0xc0) != 0x80) /* also stops at the NUL */
				return -EINVAL;
			v = v << 6 | (*p & 0x3fU);
		}
		if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
			return -EINVAL;
	}
	return 0;
}

int xnbd_export_new(const char *name, struct xnbd_backend *backend,
                    unsigned flags, struct xnbd_export **out)
{
	if (!backend || xnbd_export_name_check(name) < 0)
		return -EINVAL;
	struct xnbd_export *e = calloc(1, sizeof(*e));
	if (!e)
		return -ENOMEM;
	e->name = strdup(name);
	if (!e->name) {
		free(e);
		return -ENOMEM;
	}
	e->backend = backend;
	e->flags = flags;
	xnbd_list_init(&e->due_link);
	export_refresh(e);
	*out = e;
	return 0;
}

int xnbd_export_set_description(struct xnbd_export *e, const char *d)
{
	char *c = NULL;
	if (d) {
		c = strndup(d, XNBD_MAX_STRING);
		if (!c)
			return -ENOMEM;
	}
	free(e->description);
	e->description = c;
	export_refresh(e);
	return 0;
}

void xnbd_export_free(struct xnbd_export *e)
{
	if (!e)
		return;
	free(e->name);
	free(e->description);
	free(e);
}

static size_t cat_count(void *ud)
{
	return ((struct xnbd_server *)ud)->nexports;
}

static const struct xnbd__hs_export *cat_get(void *ud, size_t i)
{
	return &((struct xnbd_server *)ud)->exports[i]->hs;
}

static const struct xnbd__hs_export *cat_find(void *ud, const char *name,
                                              size_t len)
{
	struct xnbd_server *srv = ud;
	for (size_t i = 0; i < srv->nexports; i++) {
		struct xnbd_export *e = srv->exports[i];
		if (strlen(e->name) == len && memcmp(e->name, name, len) == 0)
			return &e->hs;
	}
	if ((srv->flags & XNBD_SERVER_ANY_NAME) && srv->nexports)
		return &srv->exports[0]->hs;
	return NULL;
}

/* ---- server --------------------------------------------------------------- */

static void check_cb(uv_check_t *h);

int xnbd_server_new(uv_loop_t *loop, struct xnbd_server **out)
{
	struct xnbd_server *srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	int r = xnbd__jobs_init(&srv->jobs, loop);
	if (r < 0) {
		free(srv);
		return r;
	}
	srv->loop = loop;
	srv->catalog =
	    (struct xnbd__hs_catalog){cat_count, cat_get, cat_find, srv};
	xnbd_list_init(&srv->listeners);
	xnbd_list_init(&srv->sessions);
	xnbd_list_init(&srv->dirty);
	xnbd_list_init(&srv->removed_due);
	uv_check_init(loop, &srv->check);
	srv->check.data = srv;
	uv_idle_init(loop, &srv->kick);
	srv->kick.data = srv;
	uv_timer_init(loop, &srv->grace);
	srv->grace.data = srv;
	uv_timer_init(loop, &srv->reap);
	srv->reap.data = srv;
	*out = srv;
	return 0;
}

void xnbd_server_set_log(struct xnbd_server *srv, xnbd_log_fn fn, void *ud)
{
	srv->log = fn;
	srv->log_ud = ud;
}

void xnbd_server_set_flags(struct xnbd_server *srv, unsigned flags)
{
	srv->flags = flags;
}

void xnbd_server_usage(const struct xnbd_server *srv, size_t *queued,
                       size_t *buffered, size_t *max_queue, size_t *max_buf)
{
	if (queued)
		*queued = srv->queued;
	if (buffered)
		*buffered = srv->buffered;
	if (max_queue)
		*max_queue = srv->max_queue;
	if (max_buf)
		*max_buf = srv->max_buf;
}

void xnbd_server_set_limits(struct xnbd_server *srv, size_t max_queue,
                            size_t max_buf)
{
	srv->max_queue = max_queue;
	srv->max_buf = max_buf;
}

int xnbd_server_add_export(struct xnbd_server *srv, struct xnbd_export *e)
{
	if (e->removing)
		return -EBUSY;
	for (size_t i = 0; i < srv->nexports; i++)
		if (strcmp(srv->exports[i]->name, e->name) == 0)
			return -EEXIST;
	struct xnbd_export **n =
	    realloc(srv->exports, (srv->nexports + 1) * sizeof(*n));
	if (!n)
		return -ENOMEM;
	srv->exports = n;
	export_refresh(e);
	srv->exports[srv->nexports++] = e;
	return 0;
}

/* The removal callbacks of exports no client uses any more run here, on
 * the loop, never inside the call that removed the export or ended the
 * session. */
static void reap_cb(uv_timer_t *t)
{
	struct xnbd_server *srv = t->data;
	while (!xnbd_list_empty(&srv->removed_due)) {
		struct xnbd_export *e = xnbd_container_of(
		    srv->removed_due.next, struct xnbd_export, due_link);
		xnbd_list_remove(&e->due_link);
		xnbd_export_removed_cb cb = e->removed_cb;
		void *ud = e->removed_ud;
		e->removing = false;
		e->removed_cb = NULL;
		cb(srv, e, ud); /* may free e */
	}
	maybe_finish_shutdown(srv);
}

static void removal_due(struct xnbd_server *srv, struct xnbd_export *e)
{
	xnbd_list_insert(srv->removed_due.prev, &e->due_link);
	uv_timer_start(&srv->reap, reap_cb, 0, 0);
}

int xnbd_server_remove_export(struct xnbd_server *srv, struct xnbd_export *e,
                              xnbd_export_removed_cb cb, void *ud)
{
	if (!cb)
		return -EINVAL;
	size_t i = 0;
	while (i < srv->nexports && srv->exports[i] != e)
		i++;
	if (i == srv->nexports)
		return -ENOENT;
	if (uv_is_closing((uv_handle_t *)&srv->reap))
		return -ESHUTDOWN;
	memmove(&srv->exports[i], &srv->exports[i + 1],
	        (srv->nexports - i - 1) * sizeof(srv->exports[0]));
	srv->nexports--;
	e->removing = true;
	e->removed_cb = cb;
	e->removed_ud = ud;
	/* Clients negotiating keep no reference but their meta context
	 * selection, which must not outlive the export. */
	xnbd_list_for_each(l, &srv->sessions)
	{
		struct session *s = xnbd_container_of(l, struct session, link);
		if (s->state == S_HANDSHAKE)
			xnbd__hs_forget_export(&s->hs, &e->hs);
	}
	slog(srv, XNBD_LOG_INFO,
	     "export '%s' removed; %zu client(s) still "
	     "served to the end of their sessions",
	     e->name, e->clients);
	if (e->clients == 0)
		removal_due(srv, e);
	return 0;
}

size_t xnbd_export_client_count(const struct xnbd_export *e)
{
	return e->clients;
}

size_t xnbd_server_client_count(const struct xnbd_server *srv)
{
	return srv->nsessions;
}

void xnbd_server_on_client_end(struct xnbd_server *srv, xnbd_client_end_cb cb,
                               void *ud)
{
	srv->end_cb = cb;
	srv->end_ud = ud;
}

static bool server_over_limits(const struct xnbd_server *srv)
{
	return (srv->max_queue && srv->queued >= srv->max_queue) ||
	       (srv->max_buf && srv->buffered >= srv->max_buf);
}

/* ---- requests ------------------------------------------------------------- */

static struct req *req_get(struct session *s)
{
	struct req *q;
	if (!xnbd_list_empty(&s->free_reqs)) {
		q = xnbd_container_of(s->free_reqs.next, struct req, link);
		xnbd_list_remove(&q->link);
		s->nfree--;
	} else {
		q = calloc(1, sizeof(*q));
		if (!q)
			return NULL;
		xnbd__buf_init(&q->hdr);
		q->s = s;
	}
	xnbd_list_init(&q->link);
	xnbd__buf_reset(&q->hdr);
	q->nsegs = 0;
	q->have = 0;
	q->pr = q->pw = -1;
	q->src_fd = -1;
	q->charged = 0;
	s->queued++;
	s->srv->queued++;
	return q;
}

static void req_destroy(struct req *q)
{
	free(q->buf);
	free(q->extents);
	free(q->xsegs);
	xnbd__buf_free(&q->hdr);
	free(q);
}

static void charge(struct req *q, size_t n)
{
	q->charged += n;
	q->s->buffered += n;
	q->s->srv->buffered += n;
}

/* Make q->buf hold at least n bytes. */
static int req_buf(struct req *q, size_t n)
{
	if (q->buf_cap >= n)
		return 0;
	free(q->buf);
	q->buf_cap = 0;
	/* Never smaller than a page: most requests are small and alike.
	 * Large ones are page-aligned, so a backend may use them for direct
	 * I/O (a proxy stores fetched blocks with O_DIRECT). */
	size_t cap = n < 4096 ? 4096 : n;
	if (cap >= ALIGN_BUF_MIN) {
		void *m;
		q->buf = posix_memalign(&m, 4096, cap) ? NULL : m;
	} else {
		q->buf = malloc(cap);
	}
	if (!q->buf)
		return -ENOMEM;
	q->buf_cap = cap;
	return 0;
}

static void session_maybe_free(struct session *s);

/* After DISC, a failed handshake or a shutdown: close once every request
 * is answered and every reply written. */
static void shut_cb(uv_shutdown_t *req, int status)
{
	struct session *s = req->data;
	if (status == UV_ECANCELED || s->state == S_CLOSING)
		return;
	/* The replies and our FIN are out.  Drop what the client sent
	 * meanwhile, so that closing does not reset the connection, and close. */
	uv_os_fd_t fd;
	if (status == 0 && uv_fileno(&s->h.handle, &fd) == 0)
		while (recv(fd, s->srv->discard, sizeof(s->srv->discard),
		            MSG_DONTWAIT) > 0)
			;
	session_close(s, NULL);
}

static void session_check_drained(struct session *s)
{
	if (s->state == S_CLOSING || s->queued || s->writes_pending || s->cur ||
	    s->skip || !xnbd_list_empty(&s->out))
		return;
	if (s->draining) {
		session_close(s, NULL);
	} else if (s->shutting && !s->fin_sent) {
		/* Everything is answered.  Shut the write side first: closing with
		 * unread requests in the socket would reset the connection, and the
		 * client could lose replies it has not read yet. */
		s->fin_sent = true;
		s->shut.data = s;
		if (uv_shutdown(&s->shut, &s->h.stream, shut_cb) < 0)
			session_close(s, NULL);
	}
}

/* A pipe for a spliced payload: one the session keeps, or a new one. */
static bool pipe_get(struct session *s, struct req *q)
{
	if (s->npipes_free) {
		s->npipes_free--;
		q->pr = s->pipes[s->npipes_free][0];
		q->pw = s->pipes[s->npipes_free][1];
		return true;
	}
	if (s->npipes >= PIPES_MAX)
		return false;
	int p[2];
	if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
		return false;
	/* Past the per-user pipe limits the kernel refuses to grow it. */
	int cap = fcntl(p[1], F_SETPIPE_SZ, (int)PIPE_SIZE);
	if (cap < (int)PIPE_SIZE) {
		close(p[0]);
		close(p[1]);
		if (++s->splice_misses >= SPLICE_GIVE_UP)
			s->splice_ok = false;
		return false;
	}
	s->npipes++;
	q->pr = p[0];
	q->pw = p[1];
	return true;
}

/* Give a request's pipe back to its session, or close it when it may hold
 * bytes (a failed write) or the session is closing. */
static void pipe_put(struct session *s, struct req *q)
{
	if (q->pr < 0)
		return;
	int left = 1;
	if (s->state != S_CLOSING && s->npipes_free < PIPES_KEEP &&
	    ioctl(q->pr, FIONREAD, &left) == 0 && left == 0) {
		s->pipes[s->npipes_free][0] = q->pr;
		s->pipes[s->npipes_free][1] = q->pw;
		s->npipes_free++;
	} else {
		close(q->pr);
		close(q->pw);
		s->npipes--;
	}
	q->pr = q->pw = -1;
}

static void req_release(struct req *q)
{
	struct session *s = q->s;
	struct xnbd_server *srv = s->srv;
	bool was_over = server_over_limits(srv);
	pipe_put(s, q);
	s->queued--;
	srv->queued--;
	s->buffered -= q->charged;
	srv->buffered -= q->charged;
	q->charged = 0;
	/* Sessions paused by the server-wide bounds are woken from the check
	 * handle, whichever session (closing or not) released the room. */
	if (was_over && !server_over_limits(srv)) {
		srv->wake_pending = true;
		check_arm(srv);
	}
	if (q->buf_cap > KEEP_BUF_MAX) {
		free(q->buf);
		q->buf = NULL;
		q->buf_cap = 0;
	}
	if (s->nfree < FREE_REQS_MAX && s->state != S_CLOSING) {
		xnbd_list_insert(&s->free_reqs, &q->link);
		s->nfree++;
	} else {
		req_destroy(q);
	}
}

static void seg_add(struct req *q, uint32_t kind, uint64_t off, size_t len)
{
	struct seg *sg;
	if (q->nsegs < 8) {
		sg = &q->segs[q->nsegs];
	} else {
		uint32_t x = q->nsegs - 8;
		if (x >= q->xsegs_cap) {
			uint32_t cap = q->xsegs_cap ? q->xsegs_cap * 2 : 16;
			struct seg *n = realloc(q->xsegs, cap * sizeof(*n));
			if (!n) {
				q->hdr.failed = true;
				return;
			}
			q->xsegs = n;
			q->xsegs_cap = cap;
		}
		sg = &q->xsegs[x];
	}
	sg->kind = kind;
	sg->off = off;
	sg->len = (uint32_t)len;
	q->nsegs++;
}

static struct seg *seg_at(struct req *q, uint32_t i)
{
	return i < 8 ? &q->segs[i] : &q->xsegs[i - 8];
}

/* Append reply header bytes and a segment for them. */
static uint8_t *hdr_push(struct req *q, size_t n)
{
	size_t off = q->hdr.len;
	uint8_t *p = xnbd__buf_push(&q->hdr, n);
	if (p)
		seg_add(q, SEG_HDR, off, n);
	return p;
}

/* ---- replies --------------------------------------------------------------- */

static void session_mark_dirty(struct session *s)
{
	struct xnbd_server *srv = s->srv;
	if (xnbd_list_empty(&s->dirty_link))
		xnbd_list_insert(srv->dirty.prev, &s->dirty_link);
	check_arm(srv);
}

static void reply_simple(struct req *q, uint32_t err)
{
	uint8_t *p = hdr_push(q, XNBD_SIMPLE_REPLY_SIZE);
	if (p)
		xnbd__simple_reply(p, q->r.cookie, err);
}

static void reply_error_chunk(struct req *q, uint32_t err)
{
	static const char msg[] = "request failed";
	size_t ml = sizeof(msg) - 1;
	uint8_t *p = hdr_push(q, XNBD_STRUCTURED_REPLY_SIZE + 6 + ml);
	if (!p)
		return;
	xnbd__chunk_header(p, XNBD_REPLY_FLAG_DONE, XNBD_REPLY_TYPE_ERROR,
	                   q->r.cookie, (uint32_t)(6 + ml));
	xnbd__put32(p + 20, err);
	xnbd__put16(p + 24, (uint16_t)ml);
	memcpy(p + 26, msg, ml);
}

/* An error reply of the right kind for this request. */
static void reply_error(struct req *q, uint32_t err)
{
	if (q->s->tx.structured &&
	    (q->r.type == XNBD_CMD_READ || q->r.type == XNBD_CMD_BLOCK_STATUS))
		reply_error_chunk(q, err);
	else
		reply_simple(q, err);
}

static void chunk_data(struct req *q, uint64_t rel, uint64_t len, bool last)
{
	uint8_t *p = hdr_push(q, XNBD_STRUCTURED_REPLY_SIZE + 8);
	if (!p)
		return;
	xnbd__chunk_header(p, last ? XNBD_REPLY_FLAG_DONE : 0,
	                   XNBD_REPLY_TYPE_OFFSET_DATA, q->r.cookie,
	                   (uint32_t)(8 + len));
	xnbd__put64(p + 20, q->r.offset + rel);
	if (q->src_fd >= 0)
		seg_add(q, SEG_FILE, q->src_off + rel, len);
	else
		seg_add(q, SEG_DATA, rel, len);
}

static void chunk_hole(struct req *q, uint64_t rel, uint64_t len, bool last)
{
	uint8_t *p = hdr_push(q, XNBD_STRUCTURED_REPLY_SIZE + 12);
	if (!p)
		return;
	xnbd__chunk_header(p, last ? XNBD_REPLY_FLAG_DONE : 0,
	                   XNBD_REPLY_TYPE_OFFSET_HOLE, q->r.cookie, 12);
	xnbd__put64(p + 20, q->r.offset + rel);
	xnbd__put32(p + 28, (uint32_t)len);
}

/* A successful READ: simple reply plus data, or structured chunks in which
 * runs of zeroes become hole chunks (unless the client asked for DF). */
static void reply_read(struct req *q)
{
	uint32_t len = q->r.length;
	if (!q->s->tx.structured) {
		reply_simple(q, 0);
		if (q->src_fd >= 0)
			seg_add(q, SEG_FILE, q->src_off, len);
		else
			seg_add(q, SEG_DATA, 0, len);
		return;
	}
	if (len == 0) {
		uint8_t *p = hdr_push(q, XNBD_STRUCTURED_REPLY_SIZE);
		if (p)
			xnbd__chunk_header(p, XNBD_REPLY_FLAG_DONE,
			                   XNBD_REPLY_TYPE_NONE, q->r.cookie,
			                   0);
		return;
	}
	/* Data sent from a file is not looked at: it goes as one chunk. */
	if ((q->r.flags & XNBD_CMD_FLAG_DF) || q->src_fd >= 0) {
		chunk_data(q, 0, len, true);
		return;
	}
	/* Classify grains (aligned to the export's offsets) as zero or data
	 * and emit one chunk per run. */
	uint64_t pos = 0;
	bool run_zero = false;
	uint64_t run_start = 0;
	while (pos < len) {
		uint64_t abs = q->r.offset + pos;
		uint64_t next =
		    (abs / HOLE_GRAIN + 1) * HOLE_GRAIN - q->r.offset;
		if (next > len)
			next = len;
		bool z = xnbd__is_zero(q->buf + pos, next - pos);
		if (pos == 0)
			run_zero = z;
		else if (z != run_zero) {
			if (run_zero)
				chunk_hole(q, run_start, pos - run_start,
				           false);
			else
				chunk_data(q, run_start, pos - run_start,
				           false);
			run_start = pos;
			run_zero = z;
		}
		pos = next;
	}
	if (run_zero)
		chunk_hole(q, run_start, len - run_start, true);
	else
		chunk_data(q, run_start, len - run_start, true);
}

/* One chunk per selected meta context, in context-ID order; the last one
 * carries the DONE flag. */
static void reply_block_status(struct req *q)
{
	uint32_t ctx = q->s->tx.contexts, last = 0;
	for (uint32_t c = 0; c < XNBD__CTX_COUNT; c++)
		if (ctx & (1U << c))
			last = c;
	for (uint32_t c = 0; c < XNBD__CTX_COUNT; c++) {
		if (!(ctx & (1U << c)))
			continue;
		uint32_t n = q->n_ext[c];
		const struct xnbd_extent *ext = q->extents + c * MAX_EXTENTS;
		uint8_t *p =
		    hdr_push(q, XNBD_STRUCTURED_REPLY_SIZE + 4 + 8ULL * n);
		if (!p)
			return;
		xnbd__chunk_header(p, c == last ? XNBD_REPLY_FLAG_DONE : 0,
		                   XNBD_REPLY_TYPE_BLOCK_STATUS, q->r.cookie,
		                   4 + 8 * n);
		/* Context ID: bit number plus one, as handshake.c hands them out. */
		xnbd__put32(p + 20, c + 1);
		for (uint32_t i = 0; i < n; i++) {
			xnbd__put32(p + 24 + 8 * i, (uint32_t)ext[i].length);
			xnbd__put32(p + 28 + 8 * i, ext[i].flags);
		}
	}
}

/* The request is answered: queue its reply for the next flush. */
static void req_finish(struct req *q, int status)
{
	struct session *s = q->s;
	if (s->state == S_CLOSING) {
		req_release(q);
		session_maybe_free(s);
		return;
	}
	/* The backend is done with the payload's pipe: it goes back to the
	 * session's spares now, not once the reply is out, so that writes
	 * streaming in take the same few pipes over and over. */
	pipe_put(s, q);
	uint32_t err = xnbd__errno_to_nbd(status);
	/* The spec reserves these two for FAST_ZERO and DF. */
	if (err == XNBD_ENOTSUP && !(q->r.type == XNBD_CMD_WRITE_ZEROES &&
	                             (q->r.flags & XNBD_CMD_FLAG_FAST_ZERO)))
		err = XNBD_EIO;
	if (err == XNBD_EOVERFLOW && !(q->r.flags & XNBD_CMD_FLAG_DF))
		err = XNBD_EIO;
	if (err)
		reply_error(q, err);
	else if (q->r.type == XNBD_CMD_READ)
		reply_read(q);
	else if (q->r.type == XNBD_CMD_BLOCK_STATUS)
		reply_block_status(q);
	else
		reply_simple(q, 0);
	if (q->hdr.failed) {
		req_release(q);
		session_close(s, "out of memory building a reply");
		return;
	}
	xnbd_list_insert(s->out.prev, &q->link);
	session_mark_dirty(s);
}

static int status_next(struct req *q);

static void io_done(struct xnbd_io *io)
{
	struct req *q = io->user_data;
	if (io->type == XNBD_IO_BLOCK_STATUS && !io->status) {
		int r = status_next(q);
		if (r == XNBD_IO_PENDING)
			return;
		req_finish(q, r == XNBD_IO_COMPLETED ? q->io.status : r);
		return;
	}
	if (io->status)
		slog(q->s->srv, XNBD_LOG_WARNING,
		     "%s: I/O error at offset %llu: %s", q->s->peer,
		     (unsigned long long)io->offset, strerror(-io->status));
	req_finish(q, io->status);
}

static void req_submit(struct req *q)
{
	static const uint32_t io_type[] = {
	    [XNBD_CMD_READ] = XNBD_IO_READ,
	    [XNBD_CMD_WRITE] = XNBD_IO_WRITE,
	    [XNBD_CMD_FLUSH] = XNBD_IO_FLUSH,
	    [XNBD_CMD_TRIM] = XNBD_IO_TRIM,
	    [XNBD_CMD_CACHE] = XNBD_IO_CACHE,
	    [XNBD_CMD_WRITE_ZEROES] = XNBD_IO_ZERO,
	    [XNBD_CMD_BLOCK_STATUS] = XNBD_IO_BLOCK_STATUS,
	};
	struct xnbd_io *io = &q->io;
	io->type = io_type[q->r.type];
	io->flags = 0;
	if ((q->r.flags & XNBD_CMD_FLAG_FUA) &&
	    (io->type == XNBD_IO_WRITE || io->type == XNBD_IO_TRIM ||
	     io->type == XNBD_IO_ZERO))
		io->flags |= XNBD_IO_FUA;
	if (q->r.flags & XNBD_CMD_FLAG_NO_HOLE)
		io->flags |= XNBD_IO_NO_HOLE;
	if (q->r.flags & XNBD_CMD_FLAG_FAST_ZERO)
		io->flags |= XNBD_IO_FAST_ZERO;
	io->offset = q->r.offset;
	io->length = q->r.length;
	io->buf = q->buf;
	io->extents = q->extents;
	io->max_extents =
	    (q->r.flags & XNBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_EXTENTS;
	io->done = io_done;
	io->user_data = q;
	int r, fd;
	uint64_t fd_off;
	if (io->type == XNBD_IO_READ && q->s->sendfile_ok &&
	    io->length >= SENDFILE_MIN &&
	    xnbd__backend_read_fd(q->s->export->backend, io->offset, io->length,
	                          &fd, &fd_off) == 0) {
		/* Answered now; the data is read when the reply is sent. */
		q->src_fd = fd;
		q->src_off = fd_off;
		q->src_resumes = q->s->wresumes;
		req_finish(q, 0);
		return;
	}
	if (io->type == XNBD_IO_BLOCK_STATUS) {
		q->ctx_left = q->s->tx.contexts;
		io->extents = NULL;
		r = status_next(q);
	} else if (q->pr >= 0) {
		r = xnbd__backend_submit_pipe(q->s->export->backend, io, q->pr);
	} else {
		r = xnbd_backend_submit(q->s->export->backend, io);
	}
	if (r == XNBD_IO_COMPLETED)
		req_finish(q, io->status);
	else if (r < 0)
		req_finish(q, r);
}

/* Ask the backend about the next selected meta context of a BLOCK_STATUS
 * request, storing what the previous one answered.  Returns as
 * xnbd_backend_submit(), having done every context that finished inline. */
static int status_next(struct req *q)
{
	struct xnbd_io *io = &q->io;
	for (;;) {
		if (io->extents) {
			/* The previous context's answer. */
			uint32_t c = (uint32_t)((io->extents - q->extents) /
			                        MAX_EXTENTS);
			q->n_ext[c] = io->n_extents;
		}
		if (!q->ctx_left)
			return XNBD_IO_COMPLETED;
		uint32_t c = (uint32_t)__builtin_ctz(q->ctx_left);
		q->ctx_left &= q->ctx_left - 1;
		io->type = XNBD_IO_BLOCK_STATUS;
		/* x-xnbd:cache */
		io->flags = c == 1 ? XNBD_IO_STATUS_CACHED : 0;
		io->offset = q->r.offset;
		io->length = q->r.length;
		io->extents = q->extents + c * MAX_EXTENTS;
		io->max_extents =
		    (q->r.flags & XNBD_CMD_FLAG_REQ_ONE) ? 1 : MAX_EXTENTS;
		int r = xnbd_backend_submit(q->s->export->backend, io);
		if (r != XNBD_IO_COMPLETED)
			return r;
		if (io->status)
			return r;
	}
}

/* Answer a request with an NBD error without submitting it. */
static void queue_error(struct req *q, uint32_t err)
{
	struct session *s = q->s;
	reply_error(q, err);
	xnbd_list_insert(s->out.prev, &q->link);
	session_mark_dirty(s);
}

/* A request header has been parsed: check it and start it. */
static void handle_request(struct session *s, const struct xnbd__request *r)
{
	struct req *q = req_get(s);
	if (!q) {
		session_close(s, "out of memory");
		return;
	}
	q->r = *r;
	uint32_t err = xnbd__request_check(&s->tx, r);

	/* During a shutdown, requests are answered, not served. */
	if (s->shutting && r->type != XNBD_CMD_DISC)
		err = XNBD_ESHUTDOWN;
	if (r->type == XNBD_CMD_DISC) {
		/* Answer what is in flight, then close (in session_flush). */
		req_release(q);
		s->draining = true;
		slog(s->srv, XNBD_LOG_INFO, "%s: client disconnected", s->peer);
		return;
	}
	if (xnbd__request_has_payload(r)) {
		if (err == 0 && req_buf(q, r->length) < 0)
			err = XNBD_ENOMEM;
		if (err) {
			/* Consume the payload so the stream stays in sync, then answer
			 * (skip_done). */
			charge(q, XNBD_SIMPLE_REPLY_SIZE);
			q->io.status = (int)err;
			s->skip_req = q;
			s->skip = r->length;
			if (s->skip == 0)
				skip_done(s);
			return;
		}
		charge(q, r->length);
		if (r->length == 0) {
			req_submit(q);
			return;
		}
		/* A large write to a plain image or whole blocks of a CoW layer:
		 * splice its payload (the buffer stays, for falling back to
		 * copying). */
		if (s->splice_ok && r->type == XNBD_CMD_WRITE &&
		    !(r->flags & XNBD_CMD_FLAG_FUA) && r->length > SPLICE_MIN &&
		    r->length <= PIPE_SIZE &&
		    xnbd__backend_takes_pipe(s->export->backend, r->offset,
		                             r->length))
			pipe_get(s, q);
		s->cur = q;
		return;
	}
	if (err) {
		charge(q, XNBD_STRUCTURED_REPLY_SIZE);
		queue_error(q, err);
		return;
	}
	if (r->type == XNBD_CMD_READ) {
		if (req_buf(q, r->length ? r->length : 1) < 0) {
			queue_error(q, XNBD_ENOMEM);
			return;
		}
		charge(q, r->length);
	} else if (r->type == XNBD_CMD_BLOCK_STATUS) {
		if (!q->extents) {
			q->extents = malloc(XNBD__CTX_COUNT * MAX_EXTENTS *
			                    sizeof(*q->extents));
			if (!q->extents) {
				queue_error(q, XNBD_ENOMEM);
				return;
			}
		}
		charge(q, XNBD__CTX_COUNT * (sizeof(*q->extents) * MAX_EXTENTS +
		                             XNBD_STRUCTURED_REPLY_SIZE + 4 +
		                             8U * MAX_EXTENTS));
	}
	req_submit(q);
}

/* A rejected write's payload has been discarded: answer it. */
static void skip_done(struct session *s)
{
	struct req *q = s->skip_req;
	s->skip_req = NULL;
	queue_error(q, (uint32_t)q->io.status);
}

/* ---- output ----------------------------------------------------------------- */

/* Release every request of a list whose replies have been written (or
 * will never be). */
static void release_all(struct xnbd_list *l)
{
	while (!xnbd_list_empty(l)) {
		struct req *q = xnbd_container_of(l->next, struct req, link);
		xnbd_list_remove(&q->link);
		req_release(q);
	}
}

/* Replies are out: free their requests, and read again if that was what
 * held the session (or the server) back. */
static void replies_written(struct session *s, struct xnbd_list *reqs,
                            int status)
{
	release_all(reqs);
	if (status < 0 && s->state != S_CLOSING)
		session_close(s, uv_strerror(status));
	session_maybe_resume(s);
	session_check_drained(s);
	session_maybe_free(s);
}

static void wpoll_cb(uv_poll_t *p, int status, int events);
static void session_flush(struct session *s);

/* wpoll watches for room in the socket (wblocked) and for input while a
 * payload is spliced (wait_in). */
static int wpoll_ensure(struct session *s)
{
	if (!s->wpoll_init) {
		/* libuv allows one watcher per descriptor, and the stream has
		 * it; the duplicate shares the socket. */
		int d = fcntl(s->fd, F_DUPFD_CLOEXEC, 0);
		if (d < 0) {
			int e = errno;
			slog(
			    s->srv, XNBD_LOG_ERR,
			    "%s: no descriptor to wait for room in the socket: %s",
			    s->peer, strerror(e));
			return -e;
		}
		int r = uv_poll_init(s->srv->loop, &s->wpoll, d);
		if (r < 0) {
			close(d);
			return r;
		}
		s->wpoll.data = s;
		s->wfd = d;
		s->wpoll_init = true;
	}
	return 0;
}

static int wpoll_update(struct session *s)
{
	int ev =
	    (s->wblocked ? UV_WRITABLE : 0) | (s->wait_in ? UV_READABLE : 0);
	if (!ev)
		return uv_poll_stop(&s->wpoll);
	return uv_poll_start(&s->wpoll, ev, wpoll_cb);
}

/* The socket is full: flush again once it has room. */
static int wait_writable(struct session *s)
{
	int r = wpoll_ensure(s);
	if (r < 0)
		return r;
	s->wblocked = true;
	r = wpoll_update(s);
	if (r < 0)
		s->wblocked = false;
	return r;
}

/* The socket has no more of a spliced payload yet: go on once it has. */
static int wait_input(struct session *s)
{
	int r = wpoll_ensure(s);
	if (r < 0)
		return r;
	s->wait_in = true;
	r = wpoll_update(s);
	if (r < 0)
		s->wait_in = false;
	return r;
}

static void wpoll_cb(uv_poll_t *p, int status, int events)
{
	struct session *s = p->data;
	if (status < 0) {
		/* libuv says EBADF for any POLLERR; the socket knows better. */
		int e = 0;
		socklen_t l = sizeof(e);
		if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &e, &l) == 0 && e)
			status = -e;
		session_close(s, uv_strerror(status));
		return;
	}
	bool out = s->wblocked && (events & UV_WRITABLE);
	bool in = s->wait_in && (events & UV_READABLE);
	if (out) {
		s->wblocked = false;
		s->wresumes++;
	}
	if (in)
		s->wait_in = false;
	int r = wpoll_update(s);
	if (r < 0) {
		session_close(s, uv_strerror(r));
		return;
	}
	if (in)
		session_process(s);
	if (out)
		session_flush(s);
}

/* The first request of the output list, and the segment the cursor is at
 * (skipping empty ones and moving finished requests to `done`); NULL
 * when the list is empty. */
static struct req *out_head(struct session *s, struct xnbd_list *done,
                            struct seg **sg)
{
	while (!xnbd_list_empty(&s->out)) {
		struct req *q =
		    xnbd_container_of(s->out.next, struct req, link);
		while (s->wseg < q->nsegs && seg_at(q, s->wseg)->len == 0)
			s->wseg++;
		if (s->wseg < q->nsegs) {
			*sg = seg_at(q, s->wseg);
			return q;
		}
		xnbd_list_remove(&q->link);
		xnbd_list_insert(done->prev, &q->link);
		s->wseg = 0;
		s->woff = 0;
	}
	return NULL;
}

/* n bytes from the cursor on are written. */
static void out_advance(struct session *s, size_t n, struct xnbd_list *done)
{
	struct seg *sg;
	struct req *q;
	while (n && (q = out_head(s, done, &sg))) {
		size_t left = sg->len - s->woff;
		if (n < left) {
			s->woff += (uint32_t)n;
			return;
		}
		n -= left;
		s->woff = 0;
		s->wseg++;
	}
	(void)out_head(s, done, &sg);
}

/* Gather memory segments from the cursor on, up to a file segment.
 * Returns the number of iovecs. */
static size_t out_gather(struct session *s, size_t *bytes)
{
	size_t k = 0, total = 0;
	uint32_t si = s->wseg, off = s->woff;
	xnbd_list_for_each(l, &s->out)
	{
		struct req *q = xnbd_container_of(l, struct req, link);
		for (; si < q->nsegs; si++, off = 0) {
			struct seg *sg = seg_at(q, si);
			if (sg->kind == SEG_FILE)
				goto out;
			if (sg->len == off)
				continue;
			if (k == WRITE_IOV_MAX)
				goto out;
			uint8_t *base =
			    sg->kind == SEG_DATA ? q->buf : q->hdr.data;
			s->iov[k].iov_base = base + sg->off + off;
			s->iov[k].iov_len = sg->len - off;
			total += sg->len - off;
			k++;
		}
		si = 0;
	}
out:
	*bytes = total;
	return k;
}

/* The rest of the file segment at the cursor must be read into the
 * request's buffer (the READ has one of its full length) and sent from
 * there: sendfile() cannot serve the descriptor pair, or the pages left
 * the page cache while the reply waited (a slow client), and sendfile
 * would make the loop wait for the disk.  The read runs on the pool;
 * the session writes nothing meanwhile (it counts as a pending write). */
static int read_rest(struct session *s)
{
	return xnbd__pread_full(s->loading->src_fd, s->load_dst, s->load_left,
	                        s->load_at);
}

static void load_work(struct xnbd__job *j)
{
	struct session *s = xnbd_container_of(j, struct session, load);
	s->load_status = read_rest(s);
}

static void load_loaded(struct session *s, struct req *q)
{
	struct seg *sg = seg_at(q, s->wseg);
	sg->kind = SEG_DATA;
	sg->off = s->load_rel;
}

static void load_done(struct xnbd__job *j)
{
	struct session *s = xnbd_container_of(j, struct session, load);
	struct req *q = s->loading;
	s->loading = NULL;
	s->writes_pending--;
	s->wresumes++;
	if (s->state == S_CLOSING) {
		req_release(q); /* session_close left it to us */
		session_maybe_free(s);
		return;
	}
	if (s->load_status == -ENODATA) {
		slog(s->srv, XNBD_LOG_ERR,
		     "%s: the image ends before offset %llu", s->peer,
		     (unsigned long long)(s->load_at + s->load_left));
		session_close(s, "a reply's data is gone");
		return;
	}
	if (s->load_status < 0) {
		slog(s->srv, XNBD_LOG_ERR,
		     "%s: reading the image at offset %llu: %s", s->peer,
		     (unsigned long long)s->load_at, strerror(-s->load_status));
		session_close(s, "a reply's data could not be read");
		return;
	}
	load_loaded(s, q);
	session_flush(s);
}

/* Start loading the segment at the cursor.  Returns 0 when the load runs
 * (or, without a pool, ran here), or a negative errno. */
static int load_segment(struct session *s, struct req *q, struct seg *sg)
{
	int r = req_buf(q, q->r.length);
	if (r < 0)
		return r;
	/* where the segment is in the read */
	s->load_rel = sg->off - q->src_off;
	s->load_dst = q->buf + s->load_rel + s->woff;
	s->load_at = sg->off + s->woff;
	s->load_left = sg->len - s->woff;
	s->load.work = load_work;
	s->load.done = load_done;
	s->loading = q;
	if (xnbd__job_submit(&s->srv->jobs, &s->load) == 0) {
		s->writes_pending++;
		return 0;
	}
	r = read_rest(s);
	s->loading = NULL;
	if (r == 0)
		load_loaded(s, q);
	return r;
}

/* Write finished replies until they are all out or the socket is full;
 * release each request as soon as its reply is out. */
static void session_flush(struct session *s)
{
	if (s->state == S_CLOSING || xnbd_list_empty(&s->out)) {
		session_check_drained(s);
		return;
	}
	/* Waiting for room, or for a handshake reply still with libuv (hs_write_cb
	 * flushes when it is out). */
	if (s->wblocked || s->writes_pending)
		return;
	struct xnbd_list done;
	xnbd_list_init(&done);
	int err = 0;
	struct seg *sg;
	struct req *q;
	while ((q = out_head(s, &done, &sg))) {
		ssize_t n;
		size_t want;
		if (sg->kind == SEG_FILE) {
			off_t off = (off_t)(sg->off + s->woff);
			want = sg->len - s->woff;
			if (q->src_resumes != s->wresumes &&
			    xnbd__fd_cached(q->src_fd, (uint64_t)off, want) ==
			        0) {
				/* Evicted while the reply waited. */
				err = load_segment(s, q, sg);
				if (err || s->loading)
					break;
				continue;
			}
			n = sendfile(s->fd, q->src_fd, &off, want);
			if (n == 0) {
				err = -EIO;
				slog(s->srv, XNBD_LOG_ERR,
				     "%s: the image ends before offset %llu",
				     s->peer, (unsigned long long)off);
				break;
			}
			if (n < 0 && (errno == EINVAL || errno == ENOSYS ||
			              errno == EOPNOTSUPP || errno == ESPIPE)) {
				s->sendfile_ok = false;
				err = load_segment(s, q, sg);
				if (err || s->loading)
					break;
				continue;
			}
		} else {
			/* Before a file segment too, the header goes out at once,
			 * as a packet of its own (TCP_NODELAY), and the data after
			 * it with sendfile.  Held back with MSG_MORE, so that the
			 * data would follow it in the same segments, it cost more:
			 * whole-image nbdcopy took 3141 to 4163 MiB per server
			 * CPU-second with MSG_MORE against 3670 to 4571 without,
			 * 1 MiB reads at depth 8 3684 to 4053 against 4170 to 7835
			 * (interleaved pairs over loopback, 2026-12-05; the loop
			 * floor, which never held its headers back, made as much
			 * as this in its pair).  See bench/README.md. */
			size_t k = out_gather(s, &want);
			n = writev(s->fd, s->iov, (int)k);
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				err = wait_writable(s);
				break;
			}
			err = -errno;
			break;
		}
		out_advance(s, (size_t)n, &done);
		if ((size_t)n < want) {
			/* A short write: the socket is full. */
			if (!xnbd_list_empty(&s->out))
				err = wait_writable(s);
			break;
		}
	}
	replies_written(s, &done, err);
}

static void check_cb(uv_check_t *h)
{
	struct xnbd_server *srv = h->data;
	while (!xnbd_list_empty(&srv->dirty)) {
		struct session *s = xnbd_container_of(
		    srv->dirty.next, struct session, dirty_link);
		xnbd_list_remove(&s->dirty_link);
		xnbd_list_init(&s->dirty_link);
		session_flush(s);
	}
	if (srv->wake_pending) {
		srv->wake_pending = false;
		wake_paused(srv, NULL);
	}
	if (!xnbd_list_empty(&srv->dirty))
		return; /* woken sessions answered at once: flush next round */
	uv_check_stop(&srv->check);
	uv_idle_stop(&srv->kick);
	srv->check_started = false;
}

/* ---- input -------------------------------------------------------------------- */

static bool session_over_limits(const struct session *s)
{
	return s->queued >= SESSION_MAX_QUEUE ||
	       s->buffered >= SESSION_MAX_BUF || server_over_limits(s->srv);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct session *s = h->data;
	s->direct = false;
	if (s->cur && s->cur->pr < 0 && s->rpos == s->rlen &&
	    s->cur->r.length - s->cur->have >= DIRECT_MIN) {
		s->direct = true;
		*buf = uv_buf_init((char *)s->cur->buf + s->cur->have,
		                   s->cur->r.length - s->cur->have);
		return;
	}
	if (s->skip >= DIRECT_MIN && s->rpos == s->rlen) {
		size_t n = s->skip < RBUF_SIZE ? s->skip : RBUF_SIZE;
		s->direct = true;
		*buf = uv_buf_init((char *)s->srv->discard, n);
		return;
	}
	if (s->rpos == s->rlen)
		s->rpos = s->rlen = 0;
	size_t room = RBUF_SIZE - s->rlen;
	/* After a spliced payload, the next header may start another: read
	 * no part of that one's payload into the buffer. */
	if (s->hdr_only && s->rlen - s->rpos < XNBD_REQUEST_SIZE &&
	    XNBD_REQUEST_SIZE - (s->rlen - s->rpos) < room)
		room = XNBD_REQUEST_SIZE - (s->rlen - s->rpos);
	*buf = uv_buf_init((char *)s->rbuf + s->rlen, room);
}

static void session_handshake_input(struct session *s);

static void read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
	struct session *s = st->data;
	if (nread == 0)
		return;
	if (nread < 0) {
		if (nread == UV_EOF)
			slog(s->srv, XNBD_LOG_INFO,
			     "%s: connection closed by client", s->peer);
		session_close(s,
		              nread == UV_EOF ? NULL : uv_strerror((int)nread));
		return;
	}
	if (s->fin_sent) {
		s->rpos = s->rlen = 0; /* after the shutdown: read and drop */
		return;
	}
	if (s->direct) {
		s->direct = false;
		if (s->cur) {
			s->cur->have += (uint32_t)nread;
			if (s->cur->have == s->cur->r.length) {
				struct req *q = s->cur;
				s->cur = NULL;
				req_submit(q);
			}
		} else {
			s->skip -= (uint64_t)nread;
			if (s->skip == 0)
				skip_done(s);
		}
	} else {
		s->rlen += (size_t)nread;
	}
	if (s->state == S_HANDSHAKE)
		session_handshake_input(s);
	else
		session_process(s);
}

static void session_pause(struct session *s)
{
	if (s->reading && s->state != S_CLOSING) {
		uv_read_stop(&s->h.stream);
		s->reading = false;
	}
}

static void session_read(struct session *s)
{
	if (!s->reading && s->state != S_CLOSING) {
		int r = uv_read_start(&s->h.stream, alloc_cb, read_cb);
		if (r < 0) {
			session_close(s, uv_strerror(r));
			return;
		}
		s->reading = true;
	}
}

/* Splicing a payload cannot go on (the pipe is full, or the socket
 * refuses): take what the pipe holds into the request's buffer; the rest
 * is read as usual.  Returns -1 when the session was closed. */
static int splice_abandon(struct session *s, struct req *q)
{
	for (uint32_t got = 0; got < q->have;) {
		ssize_t k = read(q->pr, q->buf + got, q->have - got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0) {
			session_close(
			    s, "a write's data went missing in its pipe");
			return -1;
		}
		got += (uint32_t)k;
	}
	pipe_put(s, q);
	if (++s->splice_misses >= SPLICE_GIVE_UP)
		s->splice_ok = false;
	return 0;
}

enum { SPLICED, SPLICE_WAIT, SPLICE_COPY, SPLICE_CLOSED };

/* Move what the socket has of the payload of q (s->cur) into its pipe,
 * without blocking: the bytes are not copied, the pipe takes the socket
 * buffer's pages. */
static int splice_in(struct session *s, struct req *q)
{
	bool retried = false;
	if (s->wait_in) {
		/* Entered from elsewhere than wpoll (a resume): wait anew only if
		 * the socket has nothing. */
		s->wait_in = false;
		if (wpoll_update(s) < 0) {
			session_close(s, "cannot stop waiting for input");
			return SPLICE_CLOSED;
		}
	}
	while (q->have < q->r.length) {
		ssize_t n =
		    splice(s->fd, NULL, q->pw, NULL, q->r.length - q->have,
		           SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
		if (n > 0) {
			q->have += (uint32_t)n;
			continue;
		}
		if (n == 0) {
			slog(s->srv, XNBD_LOG_INFO,
			     "%s: connection closed by client", s->peer);
			session_close(s, NULL);
			return SPLICE_CLOSED;
		}
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			/* The socket is empty, or the pipe is full: its slots hold
			 * pieces of socket buffers, and small ones fill it early. */
			int avail = 0;
			if (ioctl(s->fd, FIONREAD, &avail) == 0 && avail == 0) {
				/* Nothing to read, or the end of the stream: a full pipe
				 * hides the end from splice, and a readable socket that
				 * never gives anything would spin the loop. */
				char c;
				ssize_t k =
				    recv(s->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
				if (k == 0) {
					slog(s->srv, XNBD_LOG_INFO,
					     "%s: connection closed by client",
					     s->peer);
					session_close(s, NULL);
					return SPLICE_CLOSED;
				}
				if (k < 0 && errno != EAGAIN &&
				    errno != EWOULDBLOCK && errno != EINTR) {
					session_close(s, strerror(errno));
					return SPLICE_CLOSED;
				}
				if (k < 0 && wait_input(s) == 0)
					return SPLICE_WAIT;
				/* Bytes came meanwhile, or no way to wait for them
				 * here: one more try, then the copy path (libuv). */
			}
			if (!retried) {
				retried = true;
				continue;
			}
		} else if (errno == EINVAL || errno == ENOSYS ||
		           errno == EOPNOTSUPP) {
			s->splice_ok = false; /* not with this stream */
		} else {
			session_close(s, strerror(errno));
			return SPLICE_CLOSED;
		}
		return splice_abandon(s, q) < 0 ? SPLICE_CLOSED : SPLICE_COPY;
	}
	s->splice_misses = 0;
	s->hdr_only = true;
	return SPLICED;
}

/* Consume the receive buffer: payloads, then request headers. */
static void session_process(struct session *s)
{
	while (s->state == S_TRANSMIT) {
		size_t avail = s->rlen - s->rpos;
		if (s->cur) {
			struct req *q = s->cur;
			size_t n = q->r.length - q->have;
			if (n > avail)
				n = avail;
			while (q->pr >= 0 && n) {
				/* Received with the header: into the pipe, in order. */
				ssize_t k = write(q->pw, s->rbuf + s->rpos, n);
				if (k < 0 && errno == EINTR)
					continue;
				if (k <= 0) {
					if (splice_abandon(s, q) < 0)
						return;
					break;
				}
				q->have += (uint32_t)k;
				s->rpos += (size_t)k;
				n -= (size_t)k;
			}
			if (q->pr < 0) {
				memcpy(q->buf + q->have, s->rbuf + s->rpos, n);
				q->have += (uint32_t)n;
				s->rpos += n;
			}
			if (q->have < q->r.length) {
				if (q->pr < 0)
					break;
				int st = splice_in(s, q);
				if (st == SPLICE_CLOSED)
					return;
				if (st != SPLICED)
					break;
			}
			s->cur = NULL;
			req_submit(q);
			continue;
		}
		if (s->skip) {
			size_t n = s->skip < avail ? (size_t)s->skip : avail;
			s->skip -= n;
			s->rpos += n;
			if (s->skip)
				break;
			skip_done(s);
			continue;
		}
		if (s->draining || session_over_limits(s))
			break;
		if (avail < XNBD_REQUEST_SIZE)
			break;
		struct xnbd__request r;
		if (xnbd__request_parse(s->rbuf + s->rpos, &r) < 0) {
			session_close(s, "bad request magic");
			return;
		}
		s->rpos += XNBD_REQUEST_SIZE;
		s->hdr_only = false;
		handle_request(s, &r);
	}
	if (s->state != S_TRANSMIT)
		return;
	/* Keep a partial header at the front of the buffer. */
	if (s->rpos == s->rlen) {
		s->rpos = s->rlen = 0;
	} else if (s->rpos > 0 && !s->cur && !s->skip) {
		memmove(s->rbuf, s->rbuf + s->rpos, s->rlen - s->rpos);
		s->rlen -= s->rpos;
		s->rpos = 0;
	}
	bool need_input = s->cur || s->skip;
	if (s->wait_in) /* wpoll reads on */
		session_pause(s);
	else if (!need_input && (s->draining || session_over_limits(s)))
		session_pause(s);
	else
		session_read(s);
	if (s->draining)
		session_mark_dirty(s); /* the flush closes once drained */
}

/* Sessions paused by the server-wide bounds read again once the bounds
 * allow; called whenever requests were released, whichever session they
 * belonged to (also a closing one). */
static void wake_paused(struct xnbd_server *srv, struct session *except)
{
	if (!srv->max_queue && !srv->max_buf)
		return;
	xnbd_list_for_each(l, &srv->sessions)
	{
		if (server_over_limits(srv))
			return;
		struct session *o = xnbd_container_of(l, struct session, link);
		if (o != except && o->state == S_TRANSMIT && !o->reading &&
		    !o->draining && !session_over_limits(o))
			session_process(o);
	}
}

static void session_maybe_resume(struct session *s)
{
	if (s->state == S_TRANSMIT && s->draining)
		session_mark_dirty(s);
	else if (s->state == S_TRANSMIT && !session_over_limits(s) &&
	         (!s->reading || s->rpos < s->rlen))
		session_process(s);
}

/* ---- handshake ------------------------------------------------------------------ */

struct hs_write {
	uv_write_t w;
	struct session *s;
	size_t len;
	uint8_t data[];
};

static void hs_write_cb(uv_write_t *w, int status)
{
	struct hs_write *hw = w->data;
	struct session *s = hw->s;
	free(hw);
	s->writes_pending--;
	if (status < 0 && s->state != S_CLOSING)
		session_close(s, uv_strerror(status));
	s->wresumes++;
	if (!xnbd_list_empty(&s->out) && s->state != S_CLOSING)
		session_mark_dirty(s); /* replies waited for this one */
	session_check_drained(s);
	session_maybe_free(s);
}

static int send_hs_output(struct session *s)
{
	struct xnbd__buf *o = &s->hs.out;
	if (o->len == 0)
		return 0;
	struct hs_write *hw = malloc(sizeof(*hw) + o->len);
	if (!hw)
		return -ENOMEM;
	hw->s = s;
	hw->len = o->len;
	hw->w.data = hw;
	memcpy(hw->data, o->data, o->len);
	xnbd__buf_reset(o);
	uv_buf_t b = uv_buf_init((char *)hw->data, (unsigned)hw->len);
	int r = uv_write(&hw->w, &s->h.stream, &b, 1, hs_write_cb);
	if (r < 0) {
		free(hw);
		return r;
	}
	s->writes_pending++;
	return 0;
}

static void enter_transmission(struct session *s, struct xnbd_export *e,
                               uint16_t tflags, bool structured,
                               uint32_t contexts)
{
	s->export = e;
	e->clients++;
	uv_os_fd_t fd = -1;
	uv_fileno(&s->h.handle, &fd);
	s->fd = fd;
	int type;
	socklen_t tl = sizeof(type);
	s->is_sock = getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) == 0;
	s->sendfile_ok = !(s->srv->flags & XNBD_SERVER_NO_SENDFILE);
	s->splice_ok = s->is_sock && !(s->srv->flags & XNBD_SERVER_NO_SPLICE);
	s->tx.size = e->hs.size;
	s->tx.tflags = tflags;
	s->tx.structured = structured;
	s->tx.contexts = contexts;
	s->state = S_TRANSMIT;
	slog(s->srv, XNBD_LOG_INFO, "%s: serving export '%s' (%llu bytes%s%s)",
	     s->peer, e->name, (unsigned long long)e->hs.size,
	     (tflags & XNBD_FLAG_READ_ONLY) ? ", read-only" : "",
	     structured ? ", structured replies" : "");
}

static void session_handshake_input(struct session *s)
{
	size_t used =
	    xnbd__hs_input(&s->hs, s->rbuf + s->rpos, s->rlen - s->rpos);
	s->rpos += used;
	int r = send_hs_output(s);
	if (r < 0) {
		session_close(s, uv_strerror(r));
		return;
	}
	if (s->hs.state == XNBD__HS_CLOSE) {
		if (s->hs.close_reason)
			slog(s->srv, XNBD_LOG_NOTICE, "%s: handshake ended: %s",
			     s->peer, s->hs.close_reason);
		/* Let the last reply (e.g. the ACK of NBD_OPT_ABORT) go out first. */
		s->draining = true;
		session_pause(s);
		session_check_drained(s);
		return;
	}
	if (s->hs.state == XNBD__HS_DONE) {
		struct xnbd__hs *hs = &s->hs;
		enter_transmission(s, hs->export->handle, hs->tflags,
		                   hs->structured, hs->contexts);
		xnbd__hs_free(hs);
		session_process(s);
		return;
	}
	if (s->rpos == s->rlen)
		s->rpos = s->rlen = 0;
}

/* ---- sessions --------------------------------------------------------------------- */

static struct session *session_new(struct xnbd_server *srv)
{
	struct session *s = calloc(1, sizeof(*s));
	if (!s)
		return NULL;
	s->rbuf = malloc(RBUF_SIZE);
	if (!s->rbuf) {
		free(s);
		return NULL;
	}
	s->srv = srv;
	s->fd = -1;
	xnbd_list_init(&s->out);
	xnbd_list_init(&s->free_reqs);
	xnbd_list_init(&s->dirty_link);
	snprintf(s->peer, sizeof(s->peer), "client");
	return s;
}

static void session_describe_peer(struct session *s)
{
	struct sockaddr_storage ss;
	int len = sizeof(ss);
	if (s->h.handle.type != UV_TCP ||
	    uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) != 0)
		return;
	char host[INET6_ADDRSTRLEN] = "?";
	int port = 0;
	if (ss.ss_family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		uv_ip4_name(a, host, sizeof(host));
		port = ntohs(a->sin_port);
		snprintf(s->peer, sizeof(s->peer), "%s:%d", host, port);
	} else if (ss.ss_family == AF_INET6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		uv_ip6_name(a, host, sizeof(host));
		port = ntohs(a->sin6_port);
		snprintf(s->peer, sizeof(s->peer), "[%s]:%d", host, port);
	}
}

/* The handle is open and initialised: start the handshake (or, for a
 * client negotiated elsewhere, transmission). */
static void session_start(struct session *s, bool negotiated)
{
	struct xnbd_server *srv = s->srv;
	s->h.handle.data = s;
	xnbd_list_insert(&srv->sessions, &s->link);
	srv->nsessions++;
	session_describe_peer(s);
	slog(srv, XNBD_LOG_INFO, "%s: connected", s->peer);
	if (negotiated) {
		struct xnbd_export *e = srv->exports[0];
		enter_transmission(s, e, e->hs.tflags, false, 0);
		session_read(s);
		return;
	}
	s->state = S_HANDSHAKE;
	xnbd__hs_init(&s->hs, &srv->catalog,
	              (srv->flags & XNBD_SERVER_OLDSTYLE) != 0);
	int r = send_hs_output(s);
	if (r < 0) {
		session_close(s, uv_strerror(r));
		return;
	}
	if (s->hs.state == XNBD__HS_DONE) {
		enter_transmission(s, s->hs.export->handle, s->hs.tflags, false,
		                   0);
		xnbd__hs_free(&s->hs);
	} else if (s->hs.state == XNBD__HS_CLOSE) {
		session_close(s, s->hs.close_reason);
		return;
	}
	session_read(s);
}

static void session_free(struct session *s)
{
	struct xnbd_server *srv = s->srv;
	struct xnbd_export *e = s->export;
	while (!xnbd_list_empty(&s->free_reqs)) {
		struct req *q =
		    xnbd_container_of(s->free_reqs.next, struct req, link);
		xnbd_list_remove(&q->link);
		req_destroy(q);
	}
	for (uint32_t i = 0; i < s->npipes_free; i++) {
		close(s->pipes[i][0]);
		close(s->pipes[i][1]);
	}
	xnbd__hs_free(&s->hs);
	xnbd_list_remove(&s->link);
	srv->nsessions--;
	free(s->rbuf);
	free(s);
	if (e && --e->clients == 0 && e->removing)
		removal_due(srv, e);
	if (srv->end_cb)
		srv->end_cb(srv, srv->end_ud);
	maybe_finish_shutdown(srv);
}

static void session_maybe_free(struct session *s)
{
	if (s->state == S_CLOSING && s->handle_closed && s->queued == 0 &&
	    s->writes_pending == 0 && (!s->wpoll_init || s->wpoll_closed))
		session_free(s);
}

static void wpoll_close_cb(uv_handle_t *h)
{
	struct session *s = h->data;
	close(s->wfd);
	s->wpoll_closed = true;
	session_maybe_free(s);
}

static void session_close_cb(uv_handle_t *h)
{
	struct session *s = h->data;
	s->handle_closed = true;
	session_maybe_free(s);
}

static void session_close(struct session *s, const char *why)
{
	if (s->state == S_CLOSING)
		return;
	if (why)
		slog(s->srv, XNBD_LOG_NOTICE, "%s: closing connection: %s",
		     s->peer, why);
	s->state = S_CLOSING;
	if (!xnbd_list_empty(&s->dirty_link)) {
		xnbd_list_remove(&s->dirty_link);
		xnbd_list_init(&s->dirty_link);
	}
	/* Replies never written and requests never submitted are dropped. */
	while (!xnbd_list_empty(&s->out)) {
		struct req *q =
		    xnbd_container_of(s->out.next, struct req, link);
		xnbd_list_remove(&q->link);
		xnbd_list_init(&q->link);
		if (q != s->loading) /* that one is released by load_done */
			req_release(q);
	}
	if (s->cur) {
		req_release(s->cur);
		s->cur = NULL;
	}
	if (s->skip_req) {
		req_release(s->skip_req);
		s->skip_req = NULL;
	}
	s->skip = 0;
	s->reading = false;
	s->wblocked = false;
	s->wait_in = false;
	if (s->wpoll_init)
		uv_close((uv_handle_t *)&s->wpoll, wpoll_close_cb);
	uv_close(&s->h.handle, session_close_cb);
}

static void on_connection(uv_stream_t *server, int status)
{
	struct listener *l = server->data;
	struct xnbd_server *srv = l->srv;
	if (status < 0) {
		slog(srv, XNBD_LOG_WARNING, "accept: %s", uv_strerror(status));
		return;
	}
	struct session *s = session_new(srv);
	if (!s) {
		slog(srv, XNBD_LOG_ERR, "out of memory accepting a client");
		return;
	}
	uv_tcp_init(srv->loop, &s->h.tcp);
	s->h.handle.data = s;
	if (uv_accept(server, &s->h.stream) != 0) {
		s->state = S_CLOSING;
		xnbd_list_insert(&srv->sessions, &s->link);
		srv->nsessions++;
		uv_close(&s->h.handle, session_close_cb);
		return;
	}
	if (srv->shutting_down) {
		s->state = S_CLOSING;
		xnbd_list_insert(&srv->sessions, &s->link);
		srv->nsessions++;
		uv_close(&s->h.handle, session_close_cb);
		return;
	}
	uv_tcp_nodelay(&s->h.tcp, 1);
	session_start(s, false);
}

/* ---- listeners ---------------------------------------------------------------------- */

static void listener_close_cb(uv_handle_t *h)
{
	struct listener *l = h->data;
	struct xnbd_server *srv = l->srv;
	xnbd_list_remove(&l->link);
	free(l);
	maybe_finish_shutdown(srv);
}

static bool is_loopback(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET)
		return (ntohl(((const struct sockaddr_in *)sa)
		                  ->sin_addr.s_addr) >>
		        24) == 127;
	if (sa->sa_family != AF_INET6)
		return false;
	const struct in6_addr *a =
	    &((const struct sockaddr_in6 *)sa)->sin6_addr;
	return IN6_IS_ADDR_LOOPBACK(a) ||
	       (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
}

/* A listener bound to a loopback address serves this host alone.  Where
 * the system's congestion control paces (BBR: net.ipv4.tcp_congestion_
 * control), its connections get one that does not (cubic, else reno,
 * which any process may pick).  Pacing spaces a connection's packets to
 * suit the links on its path; loopback has none, and with no pacing
 * qdisc (fq) each pause is an hrtimer armed in the sender, one per
 * 64 KiB segment.  Measured on 2026-12-06's VM with bbr the default, 1
 * MiB reads at depth 8 from the page cache (sendfile): 2376 to 2732
 * MiB/s at 3.4 to 3.7 server CPU-seconds in 4 s, a third of them in
 * arming the pacing timer, against 4279 at 0.96 with cubic on the
 * listener (bench/README.md, thirteenth session).  A connection takes
 * the listener's congestion control as its handshake completes, and once
 * BBR has started pacing it, a later change leaves the pacing on: so it
 * is set here, not per connection.  Listeners on other addresses keep
 * the system's choice, as do connections handed over (--inetd,
 * --connected-fd). */
static void loopback_congestion(struct xnbd_server *srv, uv_tcp_t *t,
                                const struct sockaddr *sa)
{
	uv_os_fd_t fd;
	char cur[32] = "";
	socklen_t len = sizeof(cur) - 1;
	if (!is_loopback(sa) || uv_fileno((uv_handle_t *)t, &fd) != 0 ||
	    getsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cur, &len) != 0 ||
	    strncmp(cur, "bbr", 3) != 0)
		return;
	static const char *const calm[] = {"cubic", "reno"};
	for (size_t i = 0; i < sizeof(calm) / sizeof(calm[0]); i++)
		if (setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, calm[i],
		               (socklen_t)strlen(calm[i])) == 0) {
			slog(srv, XNBD_LOG_DEBUG,
			     "loopback listener: congestion control %s, not "
			     "%s (no pacing on loopback)",
			     calm[i], cur);
			return;
		}
}

static int listen_addr(struct xnbd_server *srv, const struct sockaddr *sa,
                       unsigned flags)
{
	struct listener *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->srv = srv;
	uv_tcp_init(srv->loop, &l->tcp);
	l->tcp.data = l;
	xnbd_list_insert(&srv->listeners, &l->link);
	int r = uv_tcp_bind(&l->tcp, sa, flags);
	if (r == 0)
		loopback_congestion(srv, &l->tcp, sa);
	if (r == 0)
		r = uv_listen((uv_stream_t *)&l->tcp, 128, on_connection);
	if (r < 0)
		uv_close((uv_handle_t *)&l->tcp, listener_close_cb);
	return r;
}

int xnbd_server_listen(struct xnbd_server *srv, const char *host,
                       const char *port)
{
	if (srv->shutting_down)
		return -ESHUTDOWN;
	if (!host || !*host) {
		/* One dual-stack socket covers IPv6 and IPv4; where IPv6 is
		 * missing, IPv4 alone. */
		struct sockaddr_in6 a6;
		struct sockaddr_in a4;
		int r = uv_ip6_addr("::", 0, &a6);
		char *end;
		long p = strtol(port, &end, 10);
		if (*end || p < 0 || p > 65535)
			return -EINVAL;
		a6.sin6_port = htons((uint16_t)p);
		r = listen_addr(srv, (const struct sockaddr *)&a6, 0);
		if (r == UV_EAFNOSUPPORT || r == UV_EADDRNOTAVAIL) {
			uv_ip4_addr("0.0.0.0", (int)p, &a4);
			r = listen_addr(srv, (const struct sockaddr *)&a4, 0);
		}
		return r;
	}
	struct addrinfo hints = {0}, *res = NULL;
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	int g = getaddrinfo(host, port, &hints, &res);
	if (g != 0)
		return g == EAI_SYSTEM ? -errno : -ENOENT;
	int first_err = 0, ok = 0;
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		unsigned flags =
		    ai->ai_family == AF_INET6 ? UV_TCP_IPV6ONLY : 0;
		int r = listen_addr(srv, ai->ai_addr, flags);
		if (r == 0)
			ok++;
		else if (!first_err)
			first_err = r;
	}
	freeaddrinfo(res);
	if (first_err)
		return first_err;
	return ok ? 0 : -ENOENT;
}

int xnbd_server_serve_fd(struct xnbd_server *srv, int fd, unsigned flags)
{
	bool negotiated = flags & XNBD_SERVE_NEGOTIATED;
	if (negotiated && srv->nexports == 0)
		return -EINVAL;
	struct session *s = session_new(srv);
	if (!s)
		return -ENOMEM;
	uv_handle_type t = uv_guess_handle(fd);
	int r;
	if (t == UV_TCP) {
		uv_tcp_init(srv->loop, &s->h.tcp);
		r = uv_tcp_open(&s->h.tcp, fd);
		if (r == 0)
			uv_tcp_nodelay(&s->h.tcp, 1);
	} else if (t == UV_NAMED_PIPE) {
		uv_pipe_init(srv->loop, &s->h.pipe, 0);
		r = uv_pipe_open(&s->h.pipe, fd);
	} else {
		free(s->rbuf);
		free(s);
		return -ENOTSOCK;
	}
	if (r < 0) {
		s->h.handle.data = s;
		s->state = S_CLOSING;
		xnbd_list_insert(&srv->sessions, &s->link);
		srv->nsessions++;
		uv_close(&s->h.handle, session_close_cb);
		return r;
	}
	session_start(s, negotiated);
	return 0;
}

/* ---- shutdown ---------------------------------------------------------------------- */

static void grace_close_cb(uv_handle_t *h)
{
	struct xnbd_server *srv = h->data;
	srv->grace_closed = true;
	maybe_finish_shutdown(srv);
}

static void check_close_cb(uv_handle_t *h)
{
	struct xnbd_server *srv = h->data;
	srv->check_closed = true;
	maybe_finish_shutdown(srv);
}

static void kick_close_cb(uv_handle_t *h)
{
	struct xnbd_server *srv = h->data;
	srv->kick_closed = true;
	maybe_finish_shutdown(srv);
}

static void reap_close_cb(uv_handle_t *h)
{
	struct xnbd_server *srv = h->data;
	srv->reap_closed = true;
	maybe_finish_shutdown(srv);
}

static void maybe_finish_shutdown(struct xnbd_server *srv)
{
	/* Removed exports' callbacks run before the shutdown's. */
	if (!srv->shutting_down || !xnbd_list_empty(&srv->listeners) ||
	    srv->nsessions || !xnbd_list_empty(&srv->removed_due))
		return;
	if (!uv_is_closing((uv_handle_t *)&srv->grace)) {
		uv_close((uv_handle_t *)&srv->grace, grace_close_cb);
		uv_close((uv_handle_t *)&srv->check, check_close_cb);
		uv_close((uv_handle_t *)&srv->kick, kick_close_cb);
		uv_close((uv_handle_t *)&srv->reap, reap_close_cb);
		return;
	}
	if (!srv->grace_closed || !srv->check_closed || !srv->kick_closed ||
	    !srv->reap_closed)
		return;
	xnbd_shutdown_cb cb = srv->shutdown_cb;
	srv->shutdown_cb = NULL;
	if (cb)
		cb(srv, srv->shutdown_ud);
}

static void grace_cb(uv_timer_t *t)
{
	struct xnbd_server *srv = t->data;
	/* With no connection left there is nothing to warn about (a start
	 * that failed after the loop ran gets here too). */
	if (srv->nsessions)
		slog(srv, XNBD_LOG_WARNING,
		     "shutdown grace period over: closing %zu connection(s)",
		     srv->nsessions);
	struct xnbd_list *l, *n;
	for (l = srv->sessions.next; l != &srv->sessions; l = n) {
		n = l->next;
		session_close(xnbd_container_of(l, struct session, link), NULL);
	}
	/* A closed session is freed once its requests are answered: backends
	 * must stop holding them for what may never come (a proxy's lost
	 * upstream), or the shutdown would never end. */
	for (l = srv->sessions.next; l != &srv->sessions; l = n) {
		n = l->next;
		struct session *s = xnbd_container_of(l, struct session, link);
		if (s->export)
			xnbd__backend_abort(s->export->backend);
	}
}

int xnbd_server_shutdown(struct xnbd_server *srv, unsigned grace_ms,
                         xnbd_shutdown_cb cb, void *ud)
{
	if (srv->shutting_down)
		return -EALREADY;
	srv->shutting_down = true;
	srv->shutdown_cb = cb;
	srv->shutdown_ud = ud;
	struct xnbd_list *l, *n;
	for (l = srv->listeners.next; l != &srv->listeners; l = n) {
		n = l->next;
		struct listener *li =
		    xnbd_container_of(l, struct listener, link);
		if (!uv_is_closing((uv_handle_t *)&li->tcp))
			uv_close((uv_handle_t *)&li->tcp, listener_close_cb);
	}
	for (l = srv->sessions.next; l != &srv->sessions; l = n) {
		n = l->next;
		struct session *s = xnbd_container_of(l, struct session, link);
		if (s->state == S_HANDSHAKE) {
			session_close(s, "server shutting down");
		} else if (s->state == S_TRANSMIT) {
			s->shutting = true;
			session_process(s);
			session_check_drained(s);
		}
	}
	uv_timer_start(&srv->grace, grace_cb, grace_ms, 0);
	maybe_finish_shutdown(srv);
	return 0;
}

void xnbd_server_free(struct xnbd_server *srv)
{
	if (!srv)
		return;
	xnbd__chan_destroy(&srv->jobs);
	free(srv->exports);
	free(srv);
}
