/* client.c - an asynchronous NBD client on libuv, used as a backend.
 *
 * Notes on the design:
 * - Requests live in slots; a cookie is the slot index in its low 32 bits
 *   and the slot's generation in the high ones, so a reply for a slot
 *   that has been reused, or a cookie never sent, is a protocol error and
 *   never lands in the wrong buffer (the original matched replies in FIFO
 *   order and cached wrong data from servers that answer out of order).
 * - Received bytes accumulate in one buffer.  Headers and the fixed parts
 *   of structured chunks are parsed only when complete; data is copied to
 *   the request's buffer after its offset and length were checked against
 *   the request.  The rest of a large payload (DIRECT_MIN or more) is
 *   read from the socket straight into the request's buffer, to its last
 *   byte, with no copy through the receive buffer, and the header after
 *   it is read with a small read (HDR_READ), so that little of the next
 *   payload takes the copy either.
 * - The handshake is a small state machine run from the same buffer: the
 *   client sends one option at a time, as the spec requires.
 * - Requests are not written as they are submitted: they queue, and a
 *   check handle (run once per loop iteration, after the I/O callbacks
 *   that submitted them) writes all that queued at once (uv_try_write,
 *   and uv_write for what the socket did not take), so a
 *   proxy's fetches for a batch of its clients' requests cost one
 *   system call, not one each.  An idle handle keeps the loop from
 *   blocking in poll while some wait.
 * - A slot is free again only when its reply is complete and its
 *   write has finished; on a lost connection every request completes with
 *   -ECONNRESET (or -ECANCELED when the client is freed).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xnbd/client.h"

#include "backend.h"
#include "wire.h"

/* The receive buffer: the replies to a proxy's 32 cold 4 KiB reads (132
 * KiB) come in one read, not three. */
#define RBUF (256U * 1024U)
/* Payloads left to receive of at least this size go straight into the
 * request's buffer. */
#define DIRECT_MIN (32U * 1024U)
/* After a large payload, the next read is this small: a header, and the
 * first bytes of a payload that is likely large too. */
#define HDR_READ 4096U
#define MAX_OPT_REPLY 65536U
/* Requests in flight at once.  The table never moves: libuv holds
 * pointers to the write requests in it. */
#define MAX_SLOTS 1024U
/* Separate ranges one structured read may be delivered in at a time. */
#define COV_MAX 16U

enum state { C_IDLE, C_RESOLVING, C_CONNECTING, C_HANDSHAKE, C_READY, C_DEAD };

enum hs_step {
	H_GREET,      /* NBDMAGIC and the second magic */
	H_FLAGS,      /* newstyle handshake flags */
	H_OLDSTYLE,   /* size, flags, zeroes */
	H_SR,         /* reply to NBD_OPT_STRUCTURED_REPLY */
	H_GO,         /* replies to NBD_OPT_GO */
	H_EXPORTNAME, /* reply to NBD_OPT_EXPORT_NAME */
};

struct slot {
	struct xnbd_io *io; /* NULL when free */
	struct xnbd_client *c;
	uint32_t gen;
	uint32_t next_free;
	/* The next slot queued to be written, or NO_SLOT; once written, the
	 * next slot of its batch (until the batch's write has finished). */
	uint32_t next_q;
	bool writing; /* queued, or its batch's uv_write not finished */
	bool listed;  /* on the free list */
	int err;
	uint64_t covered; /* READ bytes delivered (structured) */
	/* The byte ranges delivered so far, disjoint, sorted and merged: a
	 * chunk that overlaps one is a protocol error, so no byte of the
	 * buffer can be left unwritten by a server that repeats a chunk. */
	struct {
		uint64_t a, b;
	} cov[COV_MAX];
	uint32_t ncov;
	/* The first slot of a batch holds its write and its length. */
	uv_write_t w;
	uint32_t batch_n;
	uint8_t hdr[XNBD_REQUEST_SIZE];
};

struct xnbd_client {
	struct xnbd_backend base;
	uv_loop_t *loop;
	uv_tcp_t tcp;
	uv_getaddrinfo_t gai;
	uv_connect_t conn;
	uv_timer_t timer; /* the time limit of connecting and negotiating */
	uint64_t timeout_ms;
	int nhandles;     /* tcp, timer, flush and kick: initialised, close
	                 callback not run */
	uv_check_t flush; /* writes the queued requests (flush_cb) */
	uv_idle_t kick;   /* active with flush: poll does not block */
	bool flush_on;
	uint32_t q_head, q_tail; /* requests queued to be written */
	uint32_t nq;
	uv_buf_t *bufs; /* scratch for a batch's buffers (2 a slot) */
	bool freeing;
	enum state state;
	enum hs_step hs;
	char *name;
	xnbd_client_cb connect_cb, disc_cb;
	void *connect_ud, *disc_ud;
	xnbd_log_fn log;
	void *log_ud;
	uint64_t size;
	uint16_t tflags;
	bool structured;
	bool no_zeroes;
	uint8_t *rbuf;
	size_t rlen;
	/* payload being received */
	struct slot *cur;
	uint64_t cur_left;
	uint8_t *cur_dst; /* NULL: discard */
	bool cur_last;    /* the chunk ends the reply */
	bool big;         /* the last payload begun was DIRECT_MIN or more */
	bool direct;      /* the read under way fills cur_dst, not rbuf */
	uint64_t copied;  /* payload bytes that came through rbuf (tests) */
	struct slot *slots;
	uint32_t nslots;
	uint32_t free_head;
	size_t in_flight;
	uint8_t hs_out[16 + 4 + 4096 + 8];
};

#define NO_SLOT UINT32_MAX

#define clog_(c, level, ...) \
	xnbd__logf((c)->log, (c)->log_ud, level, __VA_ARGS__)

/* ---- slots --------------------------------------------------------------- */

static void slot_maybe_free(struct xnbd_client *c, struct slot *s)
{
	if (s->io || s->writing || s->listed)
		return; /* in use, or freed already (a batch's end after die) */
	uint32_t i = (uint32_t)(s - c->slots);
	s->listed = true;
	s->gen++;
	s->next_free = c->free_head;
	c->free_head = i;
}

/* The reply is complete (or will never come): finish the I/O. */
static void slot_complete(struct xnbd_client *c, struct slot *s, int err)
{
	struct xnbd_io *io = s->io;
	if (!io)
		return;
	if (!err && io->type == XNBD_IO_READ && c->structured &&
	    s->covered != io->length)
		err = -EIO; /* the server left part of the read unanswered */
	io->status = err;
	s->io = NULL;
	c->in_flight--;
	slot_maybe_free(c, s);
	xnbd__io_complete(&c->base, io);
}

/* Record that [a, b) of a read was delivered; -1 if some of it was
 * already, or if the ranges are too scattered to track. */
static int cover(struct slot *s, uint64_t a, uint64_t b)
{
	uint32_t i = 0;
	while (i < s->ncov && s->cov[i].b <= a)
		i++;
	if (i < s->ncov && s->cov[i].a < b)
		return -1; /* overlaps range i */
	bool join_prev = i > 0 && s->cov[i - 1].b == a;
	bool join_next = i < s->ncov && s->cov[i].a == b;
	if (join_prev && join_next) {
		s->cov[i - 1].b = s->cov[i].b;
		memmove(&s->cov[i], &s->cov[i + 1],
		        (s->ncov - i - 1) * sizeof(s->cov[0]));
		s->ncov--;
	} else if (join_prev) {
		s->cov[i - 1].b = b;
	} else if (join_next) {
		s->cov[i].a = a;
	} else {
		if (s->ncov == COV_MAX)
			return -1;
		memmove(&s->cov[i + 1], &s->cov[i],
		        (s->ncov - i) * sizeof(s->cov[0]));
		s->cov[i].a = a;
		s->cov[i].b = b;
		s->ncov++;
	}
	return 0;
}

static struct slot *slot_get(struct xnbd_client *c)
{
	if (c->free_head == NO_SLOT)
		return NULL;
	struct slot *s = &c->slots[c->free_head];
	c->free_head = s->next_free;
	s->listed = false;
	return s;
}

/* ---- connection loss ------------------------------------------------------- */

static void free_now(struct xnbd_client *c)
{
	free(c->bufs);
	free(c->slots);
	free(c->rbuf);
	free(c->name);
	free(c);
}

static void close_cb(uv_handle_t *h)
{
	struct xnbd_client *c = h->data;
	if (--c->nhandles == 0 && c->freeing)
		free_now(c);
}

static void close_handles(struct xnbd_client *c)
{
	if (!c->nhandles || uv_is_closing((uv_handle_t *)&c->tcp))
		return;
	uv_close((uv_handle_t *)&c->tcp, close_cb);
	uv_close((uv_handle_t *)&c->timer, close_cb);
	uv_close((uv_handle_t *)&c->flush, close_cb);
	uv_close((uv_handle_t *)&c->kick, close_cb);
}

/* Requests queued and never to be written (the connection is gone). */
static void drop_queue(struct xnbd_client *c)
{
	while (c->q_head != NO_SLOT) {
		struct slot *s = &c->slots[c->q_head];
		c->q_head = s->next_q;
		s->writing = false;
		slot_maybe_free(c, s);
	}
	c->q_tail = NO_SLOT;
	c->nq = 0;
}

static void fail_all(struct xnbd_client *c, int err)
{
	c->cur = NULL;
	c->cur_left = 0;
	for (uint32_t i = 0; i < c->nslots; i++)
		if (c->slots[i].io)
			slot_complete(c, &c->slots[i], err);
}

/* Give up the connection; `err` goes to whoever waits. */
static void die(struct xnbd_client *c, int err, const char *why)
{
	if (c->state == C_DEAD)
		return;
	enum state was = c->state;
	c->state = C_DEAD;
	if (why)
		clog_(c, XNBD_LOG_WARNING, "upstream connection: %s", why);
	close_handles(c);
	fail_all(c, c->freeing ? -ECANCELED : -ECONNRESET);
	drop_queue(c);
	if (was != C_READY && c->connect_cb) {
		xnbd_client_cb cb = c->connect_cb;
		c->connect_cb = NULL;
		if (!c->freeing)
			cb(c, err, c->connect_ud);
	} else if (was == C_READY && c->disc_cb && !c->freeing) {
		c->disc_cb(c, err, c->disc_ud);
	}
}

/* ---- sending ------------------------------------------------------------------ */

/* The batch that starts at slot first is written, or never will be:
 * its slots may be freed once their replies are in.  Its links are read
 * before any slot is freed (a freed slot's next_q is not touched, but
 * the free list may hand it out from a callback). */
static void batch_done(struct xnbd_client *c, struct slot *first, int status)
{
	uint32_t n = first->batch_n;
	uint32_t i = (uint32_t)(first - c->slots);
	for (uint32_t k = 0, j = i; k < n; k++, j = c->slots[j].next_q)
		c->slots[j].writing = false;
	if (status < 0 && c->state != C_DEAD)
		die(c, status, uv_strerror(status));
	for (uint32_t k = 0; k < n; k++) {
		struct slot *s = &c->slots[i];
		i = s->next_q;
		slot_maybe_free(c, s);
	}
}

static void batch_write_cb(uv_write_t *w, int status)
{
	struct slot *first = w->data;
	batch_done(first->c, first, status);
}

/* The check handle: write every request queued, in order, at once. */
static void flush_cb(uv_check_t *h)
{
	struct xnbd_client *c = h->data;
	uv_check_stop(&c->flush);
	uv_idle_stop(&c->kick);
	c->flush_on = false;
	if (!c->nq || c->state != C_READY)
		return;
	/* Queued slots have their I/O: nothing completes them unwritten
	 * but die(), which empties the queue. */
	unsigned nbufs = 0;
	for (uint32_t i = c->q_head; i != NO_SLOT; i = c->slots[i].next_q) {
		struct slot *s = &c->slots[i];
		c->bufs[nbufs++] =
		    uv_buf_init((char *)s->hdr, XNBD_REQUEST_SIZE);
		if (s->io->type == XNBD_IO_WRITE)
			c->bufs[nbufs++] =
			    uv_buf_init(s->io->buf, (unsigned)s->io->length);
	}
	struct slot *first = &c->slots[c->q_head];
	first->batch_n = c->nq;
	first->w.data = first;
	c->q_head = c->q_tail = NO_SLOT;
	c->nq = 0;
	/* Written at once where the socket has room: a uv_write that finishes
	 * at once still stops its POLLOUT watcher, which libuv 1.44 turns into
	 * an epoll_ctl each time (one a loop iteration, a cold proxy's
	 * strace). */
	uv_buf_t *bufs = c->bufs;
	int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
	if (r == UV_EAGAIN) /* full, or an earlier batch is still going out */
		r = 0;
	if (r < 0) {
		batch_done(c, first, r);
		return;
	}
	size_t done = (size_t)r;
	while (nbufs && done >= bufs->len) {
		done -= bufs->len;
		bufs++;
		nbufs--;
	}
	if (!nbufs) {
		batch_done(c, first, 0);
		return;
	}
	bufs->base += done;
	bufs->len -= done;
	r = uv_write(&first->w, (uv_stream_t *)&c->tcp, bufs, nbufs,
	             batch_write_cb);
	if (r < 0)
		batch_done(c, first, r);
}

static void kick_cb(uv_idle_t *h)
{
	(void)h; /* only there to keep poll from blocking */
}

static int client_submit(struct xnbd_backend *b, struct xnbd_io *io)
{
	struct xnbd_client *c = (struct xnbd_client *)b;
	static const uint16_t cmd[] = {
	    [XNBD_IO_READ] = XNBD_CMD_READ,
	    [XNBD_IO_WRITE] = XNBD_CMD_WRITE,
	    [XNBD_IO_FLUSH] = XNBD_CMD_FLUSH,
	    [XNBD_IO_TRIM] = XNBD_CMD_TRIM,
	    [XNBD_IO_ZERO] = XNBD_CMD_WRITE_ZEROES,
	    [XNBD_IO_CACHE] = XNBD_CMD_CACHE,
	};
	if (c->state != C_READY)
		return -ENOTCONN;
	if (io->type == XNBD_IO_BLOCK_STATUS)
		return -ENOTSUP;
	if ((io->type == XNBD_IO_READ || io->type == XNBD_IO_WRITE) &&
	    io->length > XNBD_MAX_PAYLOAD)
		return -EINVAL;
	if (io->length == 0 && io->type != XNBD_IO_FLUSH)
		return XNBD_IO_COMPLETED;
	struct slot *s = slot_get(c);
	if (!s)
		return -EAGAIN; /* MAX_SLOTS requests in flight already */
	uint16_t flags = 0;
	if ((io->flags & XNBD_IO_FUA) && (c->tflags & XNBD_FLAG_SEND_FUA))
		flags |= XNBD_CMD_FLAG_FUA;
	if (io->flags & XNBD_IO_NO_HOLE)
		flags |= XNBD_CMD_FLAG_NO_HOLE;
	if (io->flags & XNBD_IO_FAST_ZERO)
		flags |= XNBD_CMD_FLAG_FAST_ZERO;
	uint32_t idx = (uint32_t)(s - c->slots);
	uint8_t *h = s->hdr;
	xnbd__put32(h, XNBD_MAGIC_REQUEST);
	xnbd__put16(h + 4, flags);
	xnbd__put16(h + 6, cmd[io->type]);
	xnbd__put64(h + 8, ((uint64_t)s->gen << 32) | idx);
	xnbd__put64(h + 16, io->type == XNBD_IO_FLUSH ? 0 : io->offset);
	xnbd__put32(h + 24,
	            io->type == XNBD_IO_FLUSH ? 0 : (uint32_t)io->length);
	s->io = io;
	s->err = 0;
	s->covered = 0;
	s->ncov = 0;
	s->writing = true;
	s->next_q = NO_SLOT;
	if (c->q_tail != NO_SLOT)
		c->slots[c->q_tail].next_q = idx;
	else
		c->q_head = idx;
	c->q_tail = idx;
	c->nq++;
	if (!c->flush_on) {
		uv_check_start(&c->flush, flush_cb);
		uv_idle_start(&c->kick, kick_cb);
		c->flush_on = true;
	}
	c->in_flight++;
	return XNBD_IO_PENDING;
}

/* ---- receiving: transmission ------------------------------------------------------ */

static struct slot *slot_for(struct xnbd_client *c, uint64_t cookie)
{
	uint32_t idx = (uint32_t)cookie;
	if (idx >= c->nslots)
		return NULL;
	struct slot *s = &c->slots[idx];
	if (!s->io || s->gen != (uint32_t)(cookie >> 32))
		return NULL;
	return s;
}

/* Parse replies out of the buffer; returns bytes used, or -1 after die(). */
static ssize_t parse_replies(struct xnbd_client *c, const uint8_t *p,
                             size_t len)
{
	size_t used = 0;
	while (used < len) {
		if (c->cur_left) {
			size_t n =
			    len - used < c->cur_left ? len - used : c->cur_left;
			if (c->cur_dst) {
				memcpy(c->cur_dst, p + used, n);
				c->cur_dst += n;
				c->copied += n;
			}
			c->cur_left -= n;
			used += n;
			if (c->cur_left == 0 && c->cur_last && c->cur)
				slot_complete(c, c->cur, c->cur->err);
			if (c->cur_left == 0)
				c->cur = NULL;
			continue;
		}
		const uint8_t *h = p + used;
		size_t avail = len - used;
		if (avail < 4)
			break;
		uint32_t magic = xnbd__get32(h);
		if (magic == XNBD_MAGIC_SIMPLE_REPLY) {
			if (avail < XNBD_SIMPLE_REPLY_SIZE)
				break;
			uint32_t err = xnbd__get32(h + 4);
			struct slot *s = slot_for(c, xnbd__get64(h + 8));
			if (!s ||
			    (c->structured && s->io->type == XNBD_IO_READ)) {
				die(c, -EPROTO,
				    "reply to a request never sent");
				return -1;
			}
			used += XNBD_SIMPLE_REPLY_SIZE;
			if (s->io->type == XNBD_IO_READ && err == 0) {
				c->cur = s;
				c->cur_left = s->io->length;
				c->cur_dst = s->io->buf;
				c->cur_last = true;
				c->big = c->cur_left >= DIRECT_MIN;
				s->err = 0;
				continue;
			}
			slot_complete(c, s, err ? xnbd__nbd_to_errno(err) : 0);
			continue;
		}
		if (magic != XNBD_MAGIC_STRUCTURED_REPLY || !c->structured) {
			die(c, -EPROTO, "bad reply magic");
			return -1;
		}
		if (avail < XNBD_STRUCTURED_REPLY_SIZE)
			break;
		uint16_t flags = xnbd__get16(h + 4);
		uint16_t type = xnbd__get16(h + 6);
		struct slot *s = slot_for(c, xnbd__get64(h + 8));
		uint32_t plen = xnbd__get32(h + 16);
		bool last = flags & XNBD_REPLY_FLAG_DONE;
		if (!s) {
			die(c, -EPROTO,
			    "structured reply to a request never sent");
			return -1;
		}
		struct xnbd_io *io = s->io;
		const uint8_t *pl = h + XNBD_STRUCTURED_REPLY_SIZE;
		size_t pavail = avail - XNBD_STRUCTURED_REPLY_SIZE;
		switch (type) {
		case XNBD_REPLY_TYPE_NONE:
			if (plen != 0 || !last) {
				die(c, -EPROTO, "bad NONE chunk");
				return -1;
			}
			used += XNBD_STRUCTURED_REPLY_SIZE;
			slot_complete(c, s, s->err);
			continue;
		case XNBD_REPLY_TYPE_OFFSET_DATA:
		case XNBD_REPLY_TYPE_OFFSET_HOLE: {
			bool hole = type == XNBD_REPLY_TYPE_OFFSET_HOLE;
			if (io->type != XNBD_IO_READ ||
			    plen < (hole ? 12U : 9U) || (hole && plen != 12)) {
				die(c, -EPROTO, "bad data chunk");
				return -1;
			}
			if (pavail < (hole ? 12U : 8U))
				goto need_more;
			uint64_t off = xnbd__get64(pl);
			uint64_t n = hole ? xnbd__get32(pl + 8) : plen - 8;
			if (off < io->offset || n == 0 || n > io->length ||
			    off - io->offset > io->length - n) {
				die(c, -EPROTO,
				    "data chunk outside the request");
				return -1;
			}
			if (cover(s, off - io->offset, off - io->offset + n) <
			    0) {
				die(c, -EPROTO,
				    "data chunks overlap (or are too scattered)");
				return -1;
			}
			s->covered += n;
			uint8_t *dst = (uint8_t *)io->buf + (off - io->offset);
			if (hole) {
				memset(dst, 0, n);
				used += XNBD_STRUCTURED_REPLY_SIZE + 12;
				if (last)
					slot_complete(c, s, s->err);
				continue;
			}
			used += XNBD_STRUCTURED_REPLY_SIZE + 8;
			c->cur = s;
			c->cur_left = n;
			c->cur_dst = dst;
			c->cur_last = last;
			c->big = n >= DIRECT_MIN;
			continue;
		}
		case XNBD_REPLY_TYPE_ERROR:
		case XNBD_REPLY_TYPE_ERROR_OFFSET: {
			if (plen < 6 || plen > 6 + XNBD_MAX_STRING + 8) {
				die(c, -EPROTO, "bad error chunk");
				return -1;
			}
			if (pavail < plen)
				goto need_more;
			uint32_t e = xnbd__get32(pl);
			s->err = xnbd__nbd_to_errno(e ? e : XNBD_EIO);
			/* Errors need no coverage. */
			if (io->type == XNBD_IO_READ)
				s->covered = io->length;
			used += XNBD_STRUCTURED_REPLY_SIZE + plen;
			if (last)
				slot_complete(c, s, s->err);
			continue;
		}
		default:
			if (!(type & 0x8000)) {
				die(c, -EPROTO, "unknown chunk type");
				return -1;
			}
			/* An unknown error type: the request failed. */
			s->err = -EIO;
			used += XNBD_STRUCTURED_REPLY_SIZE;
			c->cur = s;
			c->cur_left = plen;
			c->cur_dst = NULL;
			c->cur_last = last;
			if (plen == 0 && last)
				slot_complete(c, s, s->err);
			continue;
		}
	need_more:
		break;
	}
	return (ssize_t)used;
}

/* ---- receiving: handshake ---------------------------------------------------------- */

struct hs_write {
	uv_write_t w;
	struct xnbd_client *c;
	uint8_t data[];
};

static void hs_write_cb(uv_write_t *w, int status)
{
	struct hs_write *hw = w->data;
	struct xnbd_client *c = hw->c;
	free(hw);
	if (status < 0 && status != UV_ECANCELED && c->state == C_HANDSHAKE)
		die(c, status, uv_strerror(status));
}

/* Send the first n bytes of hs_out.  Each send has its own write request:
 * the previous one may still await its callback. */
static int hs_send(struct xnbd_client *c, size_t n)
{
	struct hs_write *hw = malloc(sizeof(*hw) + n);
	if (!hw)
		return -ENOMEM;
	hw->c = c;
	hw->w.data = hw;
	memcpy(hw->data, c->hs_out, n);
	uv_buf_t b = uv_buf_init((char *)hw->data, (unsigned)n);
	int r = uv_write(&hw->w, (uv_stream_t *)&c->tcp, &b, 1, hs_write_cb);
	if (r < 0)
		free(hw);
	return r;
}

static size_t put_opt(uint8_t *p, uint32_t opt, uint32_t len)
{
	xnbd__put64(p, XNBD_MAGIC_OPTS);
	xnbd__put32(p + 8, opt);
	xnbd__put32(p + 12, len);
	return 16;
}

static int send_go(struct xnbd_client *c, size_t prefix)
{
	size_t nl = strlen(c->name);
	uint8_t *p = c->hs_out + prefix;
	size_t n = put_opt(p, XNBD_OPT_GO, (uint32_t)(4 + nl + 2 + 2));
	xnbd__put32(p + n, (uint32_t)nl);
	memcpy(p + n + 4, c->name, nl);
	xnbd__put16(p + n + 4 + nl, 1);
	xnbd__put16(p + n + 6 + nl, XNBD_INFO_BLOCK_SIZE);
	c->hs = H_GO;
	return hs_send(c, prefix + n + 8 + nl);
}

static int send_export_name(struct xnbd_client *c, size_t prefix)
{
	size_t nl = strlen(c->name);
	uint8_t *p = c->hs_out + prefix;
	size_t n = put_opt(p, XNBD_OPT_EXPORT_NAME, (uint32_t)nl);
	memcpy(p + n, c->name, nl);
	c->hs = H_EXPORTNAME;
	return hs_send(c, prefix + n + nl);
}

static void ready(struct xnbd_client *c)
{
	c->state = C_READY;
	uv_timer_stop(&c->timer);
	unsigned caps = 0;
	uint16_t f = c->tflags;
	if (f & XNBD_FLAG_READ_ONLY)
		caps |= XNBD_CAP_READ_ONLY;
	if (f & XNBD_FLAG_SEND_FLUSH)
		caps |= XNBD_CAP_FLUSH;
	if (f & XNBD_FLAG_SEND_FUA)
		caps |= XNBD_CAP_FUA;
	if (f & XNBD_FLAG_SEND_TRIM)
		caps |= XNBD_CAP_TRIM;
	if (f & XNBD_FLAG_SEND_WRITE_ZEROES)
		caps |= XNBD_CAP_ZERO;
	if (f & XNBD_FLAG_SEND_FAST_ZERO)
		caps |= XNBD_CAP_FAST_ZERO;
	if (f & XNBD_FLAG_SEND_CACHE)
		caps |= XNBD_CAP_CACHE;
	if (f & XNBD_FLAG_CAN_MULTI_CONN)
		caps |= XNBD_CAP_MULTI_CONN;
	c->base.caps = caps;
	c->base.size = c->size;
	clog_(c, XNBD_LOG_INFO, "upstream export '%s': %llu bytes%s", c->name,
	      (unsigned long long)c->size,
	      c->structured ? ", structured replies" : "");
	xnbd_client_cb cb = c->connect_cb;
	c->connect_cb = NULL;
	if (cb)
		cb(c, 0, c->connect_ud);
}

/* Parse handshake messages; returns bytes used, or -1 after die(). */
static ssize_t parse_handshake(struct xnbd_client *c, const uint8_t *p,
                               size_t len)
{
	size_t used = 0;
	while (c->state == C_HANDSHAKE) {
		const uint8_t *h = p + used;
		size_t avail = len - used;
		int r = 0;
		switch (c->hs) {
		case H_GREET:
			if (avail < 16)
				return (ssize_t)used;
			if (xnbd__get64(h) != XNBD_MAGIC_INIT) {
				die(c, -EPROTO, "not an NBD server");
				return -1;
			}
			if (xnbd__get64(h + 8) == XNBD_MAGIC_OLDSTYLE) {
				c->hs = H_OLDSTYLE;
			} else if (xnbd__get64(h + 8) == XNBD_MAGIC_OPTS) {
				c->hs = H_FLAGS;
			} else {
				die(c, -EPROTO, "unknown handshake");
				return -1;
			}
			used += 16;
			continue;
		case H_OLDSTYLE:
			if (avail < 8 + 4 + 124)
				return (ssize_t)used;
			c->size = xnbd__get64(h);
			c->tflags = (uint16_t)xnbd__get32(h + 8);
			used += 8 + 4 + 124;
			ready(c);
			return (ssize_t)used;
		case H_FLAGS: {
			if (avail < 2)
				return (ssize_t)used;
			uint16_t sf = xnbd__get16(h);
			used += 2;
			bool fixed = sf & XNBD_FLAG_FIXED_NEWSTYLE;
			c->no_zeroes = sf & XNBD_FLAG_NO_ZEROES;
			uint32_t cf =
			    (fixed ? XNBD_FLAG_C_FIXED_NEWSTYLE : 0) |
			    (c->no_zeroes ? XNBD_FLAG_C_NO_ZEROES : 0);
			xnbd__put32(c->hs_out, cf);
			if (fixed) {
				put_opt(c->hs_out + 4,
				        XNBD_OPT_STRUCTURED_REPLY, 0);
				c->hs = H_SR;
				r = hs_send(c, 20);
			} else {
				r = send_export_name(c, 4);
			}
			break;
		}
		case H_SR:
		case H_GO: {
			if (avail < XNBD_OPTION_REPLY_HEADER_SIZE)
				return (ssize_t)used;
			uint32_t type = xnbd__get32(h + 12);
			uint32_t rl = xnbd__get32(h + 16);
			if (xnbd__get64(h) != XNBD_MAGIC_REP ||
			    rl > MAX_OPT_REPLY) {
				die(c, -EPROTO, "bad option reply");
				return -1;
			}
			if (avail < XNBD_OPTION_REPLY_HEADER_SIZE + rl)
				return (ssize_t)used;
			const uint8_t *d = h + XNBD_OPTION_REPLY_HEADER_SIZE;
			used += XNBD_OPTION_REPLY_HEADER_SIZE + rl;
			if (c->hs == H_SR) {
				c->structured = type == XNBD_REP_ACK;
				r = send_go(c, 0);
				break;
			}
			if (type == XNBD_REP_INFO) {
				if (rl >= 2 &&
				    xnbd__get16(d) == XNBD_INFO_EXPORT) {
					if (rl != 12) {
						die(c, -EPROTO,
						    "bad NBD_INFO_EXPORT");
						return -1;
					}
					c->size = xnbd__get64(d + 2);
					c->tflags = xnbd__get16(d + 10);
				}
				continue;
			}
			if (type == XNBD_REP_ACK) {
				ready(c);
				return (ssize_t)used;
			}
			if (type == XNBD_REP_ERR_UNSUP) {
				r = send_export_name(c, 0);
				break;
			}
			die(c,
			    type == XNBD_REP_ERR_UNKNOWN ? -ENOENT
			    : (type == XNBD_REP_ERR_POLICY ||
			       type == XNBD_REP_ERR_TLS_REQD)
			        ? -EACCES
			        : -EPROTO,
			    "the server refused the export");
			return -1;
		}
		case H_EXPORTNAME: {
			size_t need = 10 + (c->no_zeroes ? 0 : 124);
			if (avail < need)
				return (ssize_t)used;
			c->size = xnbd__get64(h);
			c->tflags = xnbd__get16(h + 8);
			used += need;
			ready(c);
			return (ssize_t)used;
		}
		}
		if (r < 0) {
			die(c, r, uv_strerror(r));
			return -1;
		}
	}
	return (ssize_t)used;
}

/* ---- reading ------------------------------------------------------------------------ */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
	struct xnbd_client *c = h->data;
	(void)suggested;
	/* Whatever rbuf held was parsed: a payload under way leaves nothing
	 * after it there.  A large payload is read straight to its end: a
	 * direct read cut short leaves a tail, which a read into rbuf would
	 * take with the replies queued behind it, all of it then copied. */
	if (c->state == C_READY && c->cur_dst && c->rlen == 0 &&
	    (c->cur_left >= DIRECT_MIN || (c->big && c->cur_left))) {
		uint64_t n =
		    c->cur_left < (1U << 30) ? c->cur_left : (1U << 30);
		c->direct = true;
		*buf = uv_buf_init((char *)c->cur_dst, (unsigned)n);
		return;
	}
	size_t room = RBUF - c->rlen;
	if (c->big && c->cur_left == 0 && room > HDR_READ)
		room = HDR_READ;
	c->direct = false;
	*buf = uv_buf_init((char *)c->rbuf + c->rlen, (unsigned)room);
}

/* A read that went straight into the payload's buffer. */
static void direct_got(struct xnbd_client *c, size_t n)
{
	c->cur_dst += n;
	c->cur_left -= n;
	if (c->cur_left)
		return;
	struct slot *s = c->cur;
	c->cur = NULL;
	if (c->cur_last && s)
		slot_complete(c, s, s->err);
}

uint64_t xnbd__client_copied(const struct xnbd_client *c)
{
	return c->copied;
}

static void read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
	struct xnbd_client *c = st->data;
	if (nread == 0)
		return;
	if (nread < 0) {
		die(c, nread == UV_EOF ? -ECONNRESET : (int)nread,
		    nread == UV_EOF ? "closed by the server"
		                    : uv_strerror((int)nread));
		return;
	}
	if (c->direct) {
		c->direct = false;
		direct_got(c, (size_t)nread);
		return;
	}
	c->rlen += (size_t)nread;
	size_t pos = 0;
	while (pos < c->rlen && c->state != C_DEAD) {
		ssize_t u =
		    c->state == C_HANDSHAKE
		        ? parse_handshake(c, c->rbuf + pos, c->rlen - pos)
		        : parse_replies(c, c->rbuf + pos, c->rlen - pos);
		if (u < 0)
			return;
		if (u == 0)
			break;
		pos += (size_t)u;
	}
	if (c->state == C_DEAD)
		return;
	memmove(c->rbuf, c->rbuf + pos, c->rlen - pos);
	c->rlen -= pos;
	if (c->rlen == RBUF) {
		die(c, -EPROTO, "reply header larger than the receive buffer");
		return;
	}
}

/* ---- connecting ------------------------------------------------------------------------ */

static void on_connect(uv_connect_t *req, int status)
{
	struct xnbd_client *c = req->data;
	if (c->state != C_CONNECTING)
		return;
	if (status < 0) {
		die(c, status, uv_strerror(status));
		return;
	}
	uv_tcp_nodelay(&c->tcp, 1);
	c->state = C_HANDSHAKE;
	c->hs = H_GREET;
	int r = uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
	if (r < 0)
		die(c, r, uv_strerror(r));
}

static void on_timeout(uv_timer_t *t)
{
	struct xnbd_client *c = t->data;
	if (c->state != C_CONNECTING && c->state != C_HANDSHAKE)
		return;
	char why[96];
	unsigned long long ms = (unsigned long long)c->timeout_ms;
	snprintf(why, sizeof(why), "no %s within %llu %s",
	         c->state == C_CONNECTING ? "connection" : "handshake",
	         ms % 1000 ? ms : ms / 1000, ms % 1000 ? "ms" : "s");
	die(c, -ETIMEDOUT, why);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
	struct xnbd_client *c = req->data;
	if (c->freeing || c->state != C_RESOLVING) {
		uv_freeaddrinfo(res);
		if (c->freeing && !c->nhandles)
			free_now(c);
		return;
	}
	if (status < 0) {
		uv_freeaddrinfo(res);
		c->state = C_DEAD;
		xnbd_client_cb cb = c->connect_cb;
		c->connect_cb = NULL;
		cb(c, -ENOENT, c->connect_ud);
		return;
	}
	uv_tcp_init(c->loop, &c->tcp);
	uv_timer_init(c->loop, &c->timer);
	uv_check_init(c->loop, &c->flush);
	uv_idle_init(c->loop, &c->kick);
	c->tcp.data = c->timer.data = c->flush.data = c->kick.data = c;
	c->nhandles = 4;
	if (c->timeout_ms)
		uv_timer_start(&c->timer, on_timeout, c->timeout_ms, 0);
	c->state = C_CONNECTING;
	c->conn.data = c;
	int r = uv_tcp_connect(&c->conn, &c->tcp, res->ai_addr, on_connect);
	uv_freeaddrinfo(res);
	if (r < 0)
		die(c, r, uv_strerror(r));
}

int xnbd_port_valid(const char *s)
{
	unsigned long v = 0;
	if (!s || !*s)
		return 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return 0;
		v = v * 10 + (unsigned long)(*s - '0');
		if (v > 65535)
			return 0;
	}
	return v >= 1;
}

int xnbd_client_connect(struct xnbd_client *c, const char *host,
                        const char *port, const char *name, xnbd_client_cb cb,
                        void *ud)
{
	if (c->state != C_IDLE)
		return -EALREADY;
	if (!host || !port || !name || !cb || strlen(name) > XNBD_MAX_STRING ||
	    !xnbd_port_valid(port))
		return -EINVAL;
	c->name = strdup(name);
	if (!c->name)
		return -ENOMEM;
	c->connect_cb = cb;
	c->connect_ud = ud;
	c->gai.data = c;
	struct addrinfo hints = {0};
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	int r =
	    uv_getaddrinfo(c->loop, &c->gai, on_resolved, host, port, &hints);
	if (r < 0)
		return r;
	c->state = C_RESOLVING;
	return 0;
}

/* ---- the rest of the API ------------------------------------------------------------------ */

static void client_backend_free(struct xnbd_backend *b)
{
	xnbd_client_free((struct xnbd_client *)b);
}

static const struct xnbd__backend_ops client_ops = {
    .name = "nbd-client",
    .submit = client_submit,
    .free = client_backend_free,
};

int xnbd_client_new(uv_loop_t *loop, struct xnbd_client **out)
{
	struct xnbd_client *c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->rbuf = malloc(RBUF);
	if (!c->rbuf) {
		free(c);
		return -ENOMEM;
	}
	c->slots = calloc(MAX_SLOTS, sizeof(*c->slots));
	c->bufs = malloc(2 * MAX_SLOTS * sizeof(*c->bufs));
	if (!c->slots || !c->bufs) {
		free(c->bufs);
		free(c->slots);
		free(c->rbuf);
		free(c);
		return -ENOMEM;
	}
	c->q_head = c->q_tail = NO_SLOT;
	for (uint32_t i = 0; i < MAX_SLOTS; i++) {
		c->slots[i].c = c;
		c->slots[i].listed = true;
		c->slots[i].next_free = i + 1 < MAX_SLOTS ? i + 1 : NO_SLOT;
	}
	c->nslots = MAX_SLOTS;
	c->free_head = 0;
	c->timeout_ms = XNBD_CLIENT_CONNECT_TIMEOUT_MS;
	c->loop = loop;
	c->base.ops = &client_ops;
	c->base.loop = loop;
	*out = c;
	return 0;
}

void xnbd_client_set_log(struct xnbd_client *c, xnbd_log_fn fn, void *ud)
{
	c->log = fn;
	c->log_ud = ud;
}

int xnbd_client_set_connect_timeout(struct xnbd_client *c, uint64_t ms)
{
	if (c->state != C_IDLE)
		return -EALREADY;
	c->timeout_ms = ms;
	return 0;
}

void xnbd_client_on_disconnect(struct xnbd_client *c, xnbd_client_cb cb,
                               void *ud)
{
	c->disc_cb = cb;
	c->disc_ud = ud;
}

uint64_t xnbd_client_size(const struct xnbd_client *c)
{
	return c->state == C_READY ? c->size : 0;
}

uint16_t xnbd_client_flags(const struct xnbd_client *c)
{
	return c->state == C_READY ? c->tflags : 0;
}

int xnbd_client_structured(const struct xnbd_client *c)
{
	return c->structured;
}

struct xnbd_backend *xnbd_client_backend(struct xnbd_client *c)
{
	return &c->base;
}

size_t xnbd_client_in_flight(const struct xnbd_client *c)
{
	return c->in_flight;
}

void xnbd_client_free(struct xnbd_client *c)
{
	if (!c)
		return;
	c->freeing = true;
	c->connect_cb = NULL;
	c->disc_cb = NULL;
	if (c->state == C_READY) {
		/* A soft disconnect; if the socket does not take it at once, the
		 * server sees the connection close instead. */
		static const uint8_t disc[XNBD_REQUEST_SIZE] = {
		    0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2};
		uv_buf_t b = uv_buf_init((char *)disc, sizeof(disc));
		uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
	}
	if (c->state == C_RESOLVING) {
		uv_cancel((uv_req_t *)&c->gai);
		c->state = C_DEAD; /* on_resolved frees */
		return;
	}
	if (c->state != C_DEAD)
		die(c, -ECANCELED, NULL);
	else
		close_handles(c);
	if (!c->nhandles)
		free_now(c);
}
