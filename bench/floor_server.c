/* floor_server.c - the least an NBD server can do per request, as a
 * yardstick for bench.py (the "floor" column), never a server to use.
 *
 * One thread, one client at a time, blocking I/O: an oldstyle handshake
 * (no options, no export name), then for each request one read of its
 * header, a pread or pwrite of the image, and one writev of the reply.
 * No event loop, no queue, no second thread: at depth 1 no server can
 * answer in fewer system calls or wake-ups, so its IOPS there are about
 * the machine's ceiling for that row (runs vary more than servers do).  It serves reads, writes, flush (a
 * no-op: nothing here is durable) and disconnect; anything else gets
 * EINVAL.
 *
 * With --loop it is the least an event-driven server can do (the "loop
 * floor" column): the socket is non-blocking and watched by epoll, and
 * each wake-up is one epoll_wait, one read of all that has arrived, a
 * pread or pwrite per complete request in it, made right there on the
 * one thread, and one write of all their replies.  That is how many
 * system calls a server on an event loop that pipelines requests (as
 * xnbd-server on libuv does) makes at the least, with no threads, no
 * queue, no check of the page cache and no accounting.  Large requests
 * take the paths xnbd-server takes: a read of 64 KiB or more goes out
 * with sendfile after its header, and a write payload over 128 KiB (up
 * to 1 MiB) that has not all arrived with its header is spliced from the
 * socket into a pipe and from the pipe into the file, on the one thread
 * (in 64 KiB pieces where the pages are not all cached, as xnbd-server
 * splices: write_piece); after it, the next read takes the next header
 * alone, so that its payload stays in the socket for splicing too.
 * Each connection is served so on a thread of its own, and the loop
 * floor offers multi-conn: nbdcopy's connections run side by side, each
 * on a loop of its own (the least a server serving them on both cores
 * does; xnbd-server serves them all on one loop thread plus its pool).
 *
 * With --loop --cow the loop floor keeps IMAGE as it is and writes to an
 * unlinked overlay in $TMPDIR (or /var/tmp), where xnbd-server --cow-target
 * puts its own, with a bit per 4096-byte block in memory: the least a
 * copy-on-write server does.  A read is a pread per run of blocks held by
 * one layer; a write, a pwrite into the overlay (a partial block not yet
 * there is copied up first).
 *
 * With --relay it is the least a proxy can do for data it does not hold
 * (the "relay floor" of the proxy modes): it connects each client to the
 * upstream at 127.0.0.1:UPPORT and copies bytes both ways, one epoll_wait,
 * one read and one write at a time, with no framing at all: no request
 * is parsed, nothing is stored.  Every client is served on the one loop,
 * each over an upstream connection of its own (multi-conn passes through:
 * the upstream's handshake is relayed as it is).
 *
 * With --cache it is the least a caching proxy does (the "cache floor"
 * of the cold proxy mode): it serves each client on a thread of its own
 * (multi-conn: since 2026-12-06, fifteenth session; one client before),
 * which connects to the upstream for it, newstyle with simple replies,
 * and runs one epoll loop; the cache image and its bitmap are shared
 * (bits set atomically).  A read
 * whose 4096-byte blocks are all in the cache file is a pread there; a
 * read with any block absent is sent upstream for its whole blocks, and
 * on the reply the absent ones are stored (pwrite) and their bits set in
 * a bitmap in memory, while the present ones are read back over the reply
 * (a write may have come meanwhile).  A write is a pwrite into the cache
 * and its bits set; a partial end block that is absent is fetched first.
 * Large reads are stored as xnbd-server stores them: a payload of more
 * than 128 KiB of whole blocks is read from the socket straight into a
 * buffer of its own (after the part that came with its header; the next
 * header is then read alone) and written with one O_DIRECT write through
 * an io_uring into the cache, allocated whole at the start; the client
 * gets its reply, one writev from those buffers per wake-up, once the
 * write is done.  At most 1 MiB of upstream reads are in flight a client (the
 * rest wait in order; FLOOR_CAP in the environment sets another cap, 0
 * none): the cap that made the fastest cold copies of a loopback
 * upstream (bench/README.md, twelfth session), a choice a proxy that
 * does not know its upstream cannot make.  A client write to blocks
 * whose direct store is still in flight is not ordered after it (a
 * proxy must; xnbd-server locks the blocks): no row of bench.py makes
 * large cold reads and writes at once.
 * Requests to the upstream go out in one write per wake-up, replies to
 * the client in another.  Every 2 s while bits were set, and at its end,
 * the cache is synced and then the bitmap written to CACHE.bitmap and
 * synced, the group commit by which xnbd-server keeps a bit on disk from
 * vouching for data that is not (there on a worker thread, here on the
 * thread of the client whose wake-up found it due, which stops that
 * client meanwhile; FLOOR_SYNC_THREAD in the environment runs it on a
 * thread of its own instead, as xnbd-server must).  No locks on blocks
 * (two clients missing the same block both fetch and store it), no flush
 * (a no-op); it exits once its clients are gone, if one of them asked
 * anything.
 *
 *     floor_server [--loop [--cow]] PORT IMAGE
 *     floor_server --relay PORT UPPORT
 *     floor_server --cache PORT UPPORT CACHE
 */
#define _GNU_SOURCE /* O_TMPFILE */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#define REQ_MAGIC 0x25609513U
#define REPLY_MAGIC 0x67446698U
#define MAX_LEN (32U << 20)

/* Wait until a non-blocking fd is ready for ev: 0, or -1 on an error. */
static int wait_for(int fd, short ev)
{
	struct pollfd pfd = {fd, ev, 0};
	return poll(&pfd, 1, -1) < 0 && errno != EINTR ? -1 : 0;
}

/* After an output call on a non-blocking fd returned r: 1 to make it
 * again (the fd was full and now has room, or a signal came), -1 on an
 * error or at its end, 0 when r bytes went. */
static int again_out(int fd, ssize_t r)
{
	if (r < 0 && errno == EAGAIN)
		return wait_for(fd, POLLOUT) ? -1 : 1;
	if (r < 0 && errno == EINTR)
		return 1;
	return r <= 0 ? -1 : 0;
}

static int full(int fd, void *buf, size_t n, int out)
{
	char *p = buf;
	while (n) {
		ssize_t r = out ? write(fd, p, n) : read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN) {
			/* A non-blocking socket (the loop floor's) is full or
			 * empty: wait for it. */
			if (wait_for(fd, out ? POLLOUT : POLLIN))
				return -1;
			continue;
		}
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static int reply(int c, uint32_t err, const char *handle, void *data,
                 size_t len)
{
	char h[16];
	uint32_t m = htonl(REPLY_MAGIC), e = htonl(err);
	memcpy(h, &m, 4);
	memcpy(h + 4, &e, 4);
	memcpy(h + 8, handle, 8);
	struct iovec iov[2] = {{h, 16}, {data, len}};
	size_t total = 16 + len;
	int n = len ? 2 : 1;
	while (total) {
		ssize_t r = writev(c, iov, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		total -= (size_t)r;
		for (int i = 0; i < n && r; i++) {
			size_t k = (size_t)r < iov[i].iov_len ? (size_t)r
			                                      : iov[i].iov_len;
			iov[i].iov_base = (char *)iov[i].iov_base + k;
			iov[i].iov_len -= k;
			r -= (ssize_t)k;
		}
	}
	return 0;
}

static int handshake(int c, uint64_t size, int multi)
{
	char hello[152] = "NBDMAGIC";
	uint64_t v = htobe64(0x00420281861253ULL);
	memcpy(hello + 8, &v, 8);
	v = htobe64(size);
	memcpy(hello + 16, &v, 8);
	/* HAS_FLAGS, SEND_FLUSH, and CAN_MULTI_CONN from the loop floor,
	 * which serves each connection on a thread of its own. */
	uint32_t flags = htonl(1U | 1U << 2 | (multi ? 1U << 8 : 0));
	memcpy(hello + 24, &flags, 4);
	return full(c, hello, sizeof(hello), 1);
}

/* A request header: 0 if it is one, -1 if the client broke the protocol. */
struct req {
	uint16_t type;
	uint32_t len;
	uint64_t off;
	char handle[8];
};

static int parse(const unsigned char *q, struct req *r)
{
	uint32_t magic;
	memcpy(&magic, q, 4);
	memcpy(&r->type, q + 6, 2);
	memcpy(&r->off, q + 16, 8);
	memcpy(&r->len, q + 24, 4);
	memcpy(r->handle, q + 8, 8);
	r->type = ntohs(r->type);
	r->off = be64toh(r->off);
	r->len = ntohl(r->len);
	return ntohl(magic) == REQ_MAGIC ? 0 : -1;
}

static void serve(int c, int img, uint64_t size, char *buf)
{
	if (handshake(c, size, 0))
		return;
	for (;;) {
		unsigned char q[28];
		struct req r;
		if (full(c, q, sizeof(q), 0) || parse(q, &r))
			return;
		const char *handle = r.handle;
		uint32_t len = r.len;
		int bad = len > MAX_LEN || r.off > size || len > size - r.off;
		switch (r.type) {
		case 0: /* read */
			if (bad) {
				if (reply(c, EINVAL, handle, NULL, 0))
					return;
			} else if (pread(img, buf, len, (off_t)r.off) !=
			           (ssize_t)len) {
				if (reply(c, EIO, handle, NULL, 0))
					return;
			} else if (reply(c, 0, handle, buf, len)) {
				return;
			}
			break;
		case 1: { /* write */
			if (len > MAX_LEN || full(c, buf, len, 0))
				return;
			uint32_t err = bad ? EINVAL
			               : pwrite(img, buf, len, (off_t)r.off) ==
			                       (ssize_t)len
			                   ? 0
			                   : EIO;
			if (reply(c, err, handle, NULL, 0))
				return;
			break;
		}
		case 2: /* disconnect */
			return;
		case 3: /* flush */
			if (reply(c, 0, handle, NULL, 0))
				return;
			break;
		default:
			if (reply(c, EINVAL, handle, NULL, 0))
				return;
		}
	}
}

/* The copy-on-write layer of --loop --cow. */
#define COW_BS 4096U
static int cow_fd = -1;  /* the overlay, or -1: the image is written */
static uint8_t *cow_map; /* a bit per block: the block is in the overlay */

/* Connections on threads of their own share the map. */
static void set_bit(uint64_t b)
{
	__atomic_fetch_or(&cow_map[b >> 3], (uint8_t)(1U << (b & 7)),
	                  __ATOMIC_RELAXED);
}

static int in_overlay(uint64_t b)
{
	return __atomic_load_n(&cow_map[b >> 3], __ATOMIC_RELAXED) >> (b & 7) &
	       1;
}

/* The layer holding off's block and the end of the run of blocks it
 * holds from there, no further than end. */
static int run_of(int img, uint64_t off, uint64_t end, uint64_t *run_end)
{
	if (cow_fd < 0) {
		*run_end = end;
		return img;
	}
	uint64_t b = off / COW_BS, e = (b + 1) * COW_BS;
	int o = in_overlay(b);
	while (e < end && in_overlay(e / COW_BS) == o)
		e += COW_BS;
	*run_end = e < end ? e : end;
	return o ? cow_fd : img;
}

static int image_read(int img, char *dst, uint32_t len, uint64_t off)
{
	uint64_t end = off + len;
	while (off < end) {
		uint64_t e;
		int fd = run_of(img, off, end, &e);
		size_t n = (size_t)(e - off);
		if (pread(fd, dst, n, (off_t)off) != (ssize_t)n)
			return -1;
		dst += n;
		off = e;
	}
	return 0;
}

/* A large read's data, sent from the page cache with sendfile (as
 * xnbd-server sends reads of 64 KiB and more), after its reply header. */
static int image_send(int c, int img, uint32_t len, uint64_t off)
{
	uint64_t end = off + len;
	while (off < end) {
		uint64_t e;
		int fd = run_of(img, off, end, &e);
		off_t o = (off_t)off;
		while ((uint64_t)o < e) {
			ssize_t r =
			    sendfile(c, fd, &o, (size_t)(e - (uint64_t)o));
			int a = again_out(c, r);
			if (a < 0)
				return -1;
		}
		off = e;
	}
	return 0;
}

/* Before a write to the overlay: the blocks it covers in part, not yet
 * there, copied up, so that the rest of them keeps the image's bytes. */
static int cow_prepare(int img, uint32_t len, uint64_t off, uint64_t size)
{
	if (cow_fd < 0 || !len)
		return 0;
	uint64_t first = off / COW_BS, last = (off + len - 1) / COW_BS;
	for (uint64_t b = first; b <= last;
	     b += last > first ? last - first : 1) {
		uint64_t bs = b * COW_BS,
		         be = bs + COW_BS < size ? bs + COW_BS : size;
		if (in_overlay(b) || (off <= bs && off + len >= be))
			continue;
		char blk[COW_BS];
		size_t n = (size_t)(be - bs);
		if (pread(img, blk, n, (off_t)bs) != (ssize_t)n ||
		    pwrite(cow_fd, blk, n, (off_t)bs) != (ssize_t)n)
			return -1;
		set_bit(b);
	}
	return 0;
}

static void cow_mark(uint32_t len, uint64_t off)
{
	if (cow_fd < 0 || !len)
		return;
	for (uint64_t b = off / COW_BS; b <= (off + len - 1) / COW_BS; b++)
		set_bit(b);
}

static int image_write(int img, const char *src, uint32_t len, uint64_t off,
                       uint64_t size)
{
	int fd = cow_fd < 0 ? img : cow_fd;
	if (cow_prepare(img, len, off, size) ||
	    pwrite(fd, src, len, (off_t)off) != (ssize_t)len)
		return -1;
	cow_mark(len, off);
	return 0;
}

/* The pipe of spliced payloads, one a connection's thread. */
static _Thread_local int pipe_r = -1, pipe_w = -1;
#define PIPE_SIZE (1U << 20)

/* Splice what the pipe holds into fd at *off, at most piece bytes a call. */
static int pipe_drain(int fd, uint64_t *off, size_t *held, size_t piece)
{
	while (*held) {
		loff_t o = (loff_t)*off;
		ssize_t r =
		    splice(pipe_r, NULL, fd, &o, *held < piece ? *held : piece,
		           SPLICE_F_MOVE);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		*off += (uint64_t)r;
		*held -= (size_t)r;
	}
	return 0;
}

/* cachestat(2) (Linux 6.5; glibc 2.36 has no wrapper). */
#ifndef SYS_cachestat
#define SYS_cachestat 451
#endif
#define WRITE_PIECE (64U << 10)

/* The piece size of a write of len bytes at off into fd, as xnbd-server
 * picks it (WRITE_PIECE in libxnbd/src/backend_file.c): 64 KiB where some
 * of its pages are not in the page cache, so that the file system makes
 * small folios for them; whole where they all are, or cachestat cannot
 * tell.  Whole splices into new pages make large folios, whose first touch
 * crawled on this VM in some runs and not in others (bench/README.md,
 * thirteenth session): a floor that wrote so was no steady yardstick. */
static size_t write_piece(int fd, uint64_t off, size_t len)
{
	struct {
		uint64_t off, len;
	} range = {off, len};
	uint64_t cs[5]; /* nr_cache first */
	if (syscall(SYS_cachestat, fd, &range, cs, 0) < 0)
		return SIZE_MAX;
	uint64_t pages = (off + len + 4095) / 4096 - off / 4096;
	return cs[0] >= pages ? SIZE_MAX : WRITE_PIECE;
}

/* A large write's payload, of which the first k bytes were read with its
 * header (at src): those go into the pipe, the rest is spliced from the
 * socket into the pipe (no copy), and the pipe into the file, as
 * xnbd-server does with payloads over 128 KiB.  A pipe filled early (its
 * slots hold pieces of socket buffers) is emptied into the file on the
 * way.  -1: the connection is lost; *err is set for a file error. */
static int image_splice(int c, int img, const char *src, size_t k, uint32_t len,
                        uint64_t off, uint64_t size, uint32_t *err)
{
	int fd = cow_fd < 0 ? img : cow_fd;
	uint64_t at = off;
	size_t held = 0, rest = len - k;
	*err = cow_prepare(img, len, off, size) ? EIO : 0;
	size_t piece = write_piece(fd, off, len);
	if (k && full(pipe_w, (char *)src, k, 1))
		return -1;
	held = k;
	while (rest) {
		ssize_t r = splice(c, NULL, pipe_w, NULL, rest,
		                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
		if (r > 0) {
			rest -= (size_t)r;
			held += (size_t)r;
			continue;
		}
		if (r == 0)
			return -1;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return -1;
		int avail = 0;
		if (held && ioctl(c, FIONREAD, &avail) == 0 && avail > 0) {
			/* The pipe is full: into the file with what it holds. */
			if (pipe_drain(fd, &at, &held, piece))
				*err = EIO;
			continue;
		}
		if (wait_for(c, POLLIN))
			return -1;
	}
	if (pipe_drain(fd, &at, &held, piece))
		*err = EIO;
	if (held) /* the file refused: the pipe emptied to keep the stream */
		return -1;
	if (!*err)
		cow_mark(len, off);
	return 0;
}

static int cow_open(uint64_t size)
{
	const char *dir = getenv("TMPDIR");
	if (!dir || !*dir)
		dir = "/var/tmp";
	cow_fd = open(dir, O_TMPFILE | O_RDWR, 0600);
	cow_map = calloc((size + COW_BS - 1) / COW_BS / 8 + 1, 1);
	if (cow_fd < 0 || !cow_map || ftruncate(cow_fd, (off_t)size) < 0) {
		perror("floor_server: the overlay");
		return -1;
	}
	return 0;
}

/* The loop floor's buffers: what arrived and is not yet served, and the
 * replies of one wake-up.  Both hold a largest request and its header. */
#define LOOP_BUF (2 * MAX_LEN)
#define SENDFILE_MIN (64U << 10) /* reads of this and more: sendfile */
#define SPLICE_MIN (128U << 10)  /* write payloads over this: spliced */

static size_t put_reply(char *out, uint32_t err, const char *handle)
{
	uint32_t m = htonl(REPLY_MAGIC), e = htonl(err);
	memcpy(out, &m, 4);
	memcpy(out + 4, &e, 4);
	memcpy(out + 8, handle, 8);
	return 16;
}

static void serve_loop(int c, int img, uint64_t size, char *in, char *out)
{
	if (handshake(c, size, 1))
		return;
	int ep = epoll_create1(0);
	struct epoll_event ev = {.events = EPOLLIN};
	if (ep < 0 || fcntl(c, F_SETFL, O_NONBLOCK) < 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) < 0)
		goto done;
	size_t have = 0;
	/* after a spliced payload: read the next header alone */
	int hdr_only = 0;
	for (;;) {
		if (epoll_wait(ep, &ev, 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			goto done;
		}
		size_t want =
		    hdr_only && have < 28 ? 28 - have : LOOP_BUF - have;
		ssize_t got = read(c, in + have, want);
		if (got < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		if (got <= 0)
			goto done;
		have += (size_t)got;
		size_t pos = 0, n = 0;
		while (have - pos >= 28) {
			struct req r;
			if (parse((unsigned char *)in + pos, &r))
				goto done;
			uint32_t len = r.len;
			int bad =
			    len > MAX_LEN || r.off > size || len > size - r.off;
			/* A large write payload not all here yet is spliced. */
			int spliced = r.type == 1 && !bad && len > SPLICE_MIN &&
			              len <= PIPE_SIZE && pipe_w >= 0 &&
			              have - pos < 28 + (size_t)len;
			hdr_only = 0;
			if (r.type == 1 && !spliced) {
				if (len > MAX_LEN)
					goto done;
				if (have - pos < 28 + (size_t)len)
					break; /* its payload is still on the way */
			}
			if (n + 16 + (r.type == 0 && !bad ? len : 0) >
			    LOOP_BUF) {
				if (full(c, out, n, 1))
					goto done;
				n = 0;
			}
			uint32_t err = 0;
			switch (r.type) {
			case 0: /* read */
				if (bad) {
					n += put_reply(out + n, EINVAL,
					               r.handle);
				} else if (len >= SENDFILE_MIN) {
					/* Its header after the replies before it, then the
					 * data from the page cache. */
					n += put_reply(out + n, 0, r.handle);
					if (full(c, out, n, 1) ||
					    image_send(c, img, len, r.off))
						goto done;
					n = 0;
				} else if (image_read(img, out + n + 16, len,
				                      r.off)) {
					n += put_reply(out + n, EIO, r.handle);
				} else {
					n += put_reply(out + n, 0, r.handle) +
					     len;
				}
				pos += 28;
				break;
			case 1: /* write */
				if (spliced) {
					if (image_splice(c, img, in + pos + 28,
					                 have - pos - 28, len,
					                 r.off, size, &err))
						goto done;
					pos = have; /* all of it taken */
					hdr_only = 1;
				} else {
					if (bad)
						err = EINVAL;
					else if (image_write(img, in + pos + 28,
					                     len, r.off, size))
						err = EIO;
					pos += 28 + (size_t)len;
				}
				n += put_reply(out + n, err, r.handle);
				break;
			case 2: /* disconnect */
				full(c, out, n, 1);
				goto done;
			default: /* flush is a no-op, the rest EINVAL */
				n +=
				    put_reply(out + n, r.type == 3 ? 0 : EINVAL,
				              r.handle);
				pos += 28;
			}
		}
		if (pos) {
			/* What is left is the start of a request still arriving:
			 * moved down once; the next reads append to it. */
			memmove(in, in + pos, have - pos);
			have -= pos;
		}
		if (n && full(c, out, n, 1))
			goto done;
	}
done:
	if (ep >= 0)
		close(ep);
}

/* A loop floor's connection, on a thread of its own with its own
 * buffers and pipe: nbdcopy's multi-conn connections are served side by
 * side, as a server with a loop a core would serve them (xnbd-server
 * serves all of its connections on one loop thread, plus its pool). */
struct conn {
	int c, img;
	uint64_t size;
};

static void *conn_thread(void *arg)
{
	struct conn *k = arg;
	char *in = malloc(LOOP_BUF), *out = malloc(LOOP_BUF);
	int p[2];
	if (pipe2(p, O_CLOEXEC) == 0) {
		/* Room for a whole payload (xnbd-server's pipes have as much);
		 * without a pipe, payloads are read as the rest. */
		pipe_r = p[0];
		pipe_w = p[1];
		fcntl(pipe_w, F_SETPIPE_SZ, (int)PIPE_SIZE);
	}
	if (in && out)
		serve_loop(k->c, k->img, k->size, in, out);
	close(k->c);
	if (pipe_r >= 0) {
		close(pipe_r);
		close(pipe_w);
	}
	free(in);
	free(out);
	free(k);
	return NULL;
}

static void serve_thread(int c, int img, uint64_t size)
{
	struct conn *k = malloc(sizeof(*k));
	pthread_attr_t a;
	pthread_t t;
	if (!k) {
		close(c);
		return;
	}
	*k = (struct conn){c, img, size};
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &a, conn_thread, k)) {
		close(c);
		free(k);
	}
	pthread_attr_destroy(&a);
}

#define RELAY_BUF (4U << 20)

/* An epoll descriptor watching a and b, both made non-blocking, for
 * input (its data.fd says which); -1 on an error. */
static int watch_two(int a, int b)
{
	int ep = epoll_create1(0);
	struct epoll_event ae = {.events = EPOLLIN, .data.fd = a};
	struct epoll_event be = {.events = EPOLLIN, .data.fd = b};
	if (ep >= 0 && (fcntl(a, F_SETFL, O_NONBLOCK) < 0 ||
	                fcntl(b, F_SETFL, O_NONBLOCK) < 0 ||
	                epoll_ctl(ep, EPOLL_CTL_ADD, a, &ae) < 0 ||
	                epoll_ctl(ep, EPOLL_CTL_ADD, b, &be) < 0)) {
		close(ep);
		return -1;
	}
	return ep;
}

/* The relay: one epoll loop for the listener and every client, each
 * client joined to an upstream connection of its own (so clients that
 * open several connections, nbdcopy's multi-conn, are served as one
 * server would serve them: on one thread).  Each event is one read of
 * what has arrived and one write of it to the other side; a full socket
 * is waited for there, as the one-client relay did. */
#define RELAY_MAX 64 /* connections at once, each end counted */

static int accept_one(int l);

static int relay_peer[2 * RELAY_MAX + 1024]; /* fd -> the other end */

static int relay_join(int ep, int c, int upport)
{
	int u = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons((uint16_t)upport),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
	struct epoll_event ue = {.events = EPOLLIN, .data.fd = u};
	int sz = (int)(sizeof(relay_peer) / sizeof(relay_peer[0]));
	if (u < 0 || u >= sz || c >= sz ||
	    connect(u, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ||
	    fcntl(c, F_SETFL, O_NONBLOCK) < 0 ||
	    fcntl(u, F_SETFL, O_NONBLOCK) < 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce) < 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, u, &ue) < 0) {
		if (u >= 0)
			close(u); /* closing drops it from the epoll set */
		return -1;
	}
	relay_peer[c] = u;
	relay_peer[u] = c;
	return 0;
}

static int relay(int l, int upport, char *buf)
{
	int ep = epoll_create1(0);
	struct epoll_event le = {.events = EPOLLIN, .data.fd = l};
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, l, &le) < 0)
		return 1;
	for (;;) {
		struct epoll_event evs[2 * RELAY_MAX];
		int n = epoll_wait(ep, evs, 2 * RELAY_MAX, -1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return 1;
		for (int i = 0; i < n; i++) {
			int from = evs[i].data.fd;
			if (from == l) {
				int c = accept_one(l);
				if (c >= 0 && relay_join(ep, c, upport) < 0)
					close(c);
				continue;
			}
			if (relay_peer[from] < 0)
				continue; /* closed earlier in this batch */
			int to = relay_peer[from];
			ssize_t r = read(from, buf, RELAY_BUF);
			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				continue;
			if (r <= 0 || full(to, buf, (size_t)r, 1)) {
				relay_peer[from] = relay_peer[to] = -1;
				close(from);
				close(to);
			}
		}
	}
}

/* ---- --cache: the least a caching proxy does ---------------------------- */

#define CBS 4096U                /* the cache's block */
#define CACHE_BUF (16U << 20)    /* each of the four buffers */
#define CACHE_MAX_LEN (4U << 20) /* longest request served */
#define SLOTS 1024U              /* upstream reads in flight */

#define DIRECT_MIN (128U << 10) /* stores over this: O_DIRECT, as xnbd's */

/* Each client's thread has its own upstream connection, ring and
 * slots (__thread); the cache image and the bitmap are shared. */
static __thread int ups = -1;         /* the upstream's socket */
static int cache_fd = -1;             /* the cache image */
static int cache_dfd = -1;            /* the same, opened with O_DIRECT */
static __thread struct io_uring ring; /* the direct stores */
static __thread int ring_efd = -1;    /* its completions' eventfd */
static uint8_t *cbits;                /* a bit per block, in memory */
static int bitmap_fd = -1;
static size_t bitmap_len;
#define SYNC_MS 2000 /* the group commit's period, as xnbd-server's */

static int present(uint64_t b)
{
	return __atomic_load_n(&cbits[b >> 3], __ATOMIC_RELAXED) >> (b & 7) & 1;
}

/* A client request waiting on the upstream: a read, or a write whose
 * partial end blocks were absent (then its payload, to lay over them). */
struct slot {
	int used;
	char handle[8];
	uint64_t off, eoff; /* the request's start; the blocks' start */
	uint32_t len, elen; /* its length; the blocks' length */
	char *payload;      /* a write's, or NULL for a read */
	char *dbuf;         /* a direct read's data (CACHE_MAX_LEN, aligned) */
	char hdr[16];       /* its reply's header */
};
static __thread struct slot slots[SLOTS];

/* Newstyle, fixed, then NBD_OPT_EXPORT_NAME of the default export, with
 * simple replies (no option asks for structured ones). */
static int up_connect(int port, uint64_t *size)
{
	int one = 1;
	ups = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons((uint16_t)port),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (ups < 0 || connect(ups, (struct sockaddr *)&a, sizeof(a)) < 0)
		return -1;
	setsockopt(ups, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	char h[18];
	if (full(ups, h, sizeof(h), 0) || memcmp(h, "NBDMAGICIHAVEOPT", 16))
		return -1;
	uint16_t sf;
	memcpy(&sf, h + 16, 2);
	sf = ntohs(sf) & 3; /* FIXED_NEWSTYLE, NO_ZEROES */
	char o[20] = "\0\0\0\0IHAVEOPT";
	uint32_t v = htonl(sf);
	memcpy(o, &v, 4);
	v = htonl(1); /* NBD_OPT_EXPORT_NAME, empty name */
	memcpy(o + 12, &v, 4);
	if (full(ups, o, sizeof(o), 1))
		return -1;
	char r[10 + 124];
	if (full(ups, r, sf & 2 ? 10 : sizeof(r), 0))
		return -1;
	memcpy(size, r, 8);
	*size = be64toh(*size);
	return 0;
}

static int cache_open(const char *path, uint64_t size)
{
	char bp[4096];
	snprintf(bp, sizeof(bp), "%s.bitmap", path);
	size_t blen = (size_t)((size + CBS - 1) / CBS / 8 + 1);
	cache_fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	int b = open(bp, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (cache_fd < 0 || b < 0 || ftruncate(cache_fd, (off_t)size) < 0 ||
	    ftruncate(b, (off_t)blen) < 0)
		return -1;
	/* Allocated whole beforehand, so that no direct store waits for an
	 * allocation (xnbd-server allocates ahead as it goes). */
	if (fallocate(cache_fd, 0, 0, (off_t)size) < 0)
		return -1;
	cache_dfd = open(path, O_RDWR | O_DIRECT);
	if (cache_dfd < 0)
		return -1;
	cbits = calloc(blen, 1);
	bitmap_fd = b;
	bitmap_len = blen;
	return cbits ? 0 : -1;
}

/* The calling thread's ring for its direct stores. */
static int ring_open(void)
{
	ring_efd = eventfd(0, EFD_NONBLOCK);
	if (ring_efd < 0 || io_uring_queue_init(256, &ring, 0) < 0 ||
	    io_uring_register_eventfd(&ring, ring_efd) < 0)
		return -1;
	return 0;
}

/* The group commit: the cache's data on disk, then the bitmap, so that no
 * bit on disk vouches for data that is not (as xnbd-server does it, every
 * SYNC_MS while bits were set; here on the thread of the client whose
 * wake-up found it due, the others going on meanwhile). */
static int dirty_bits;
static pthread_mutex_t sync_lock = PTHREAD_MUTEX_INITIALIZER;

static int cache_sync(void)
{
	static uint8_t *staged;
	pthread_mutex_lock(&sync_lock);
	int r = 0;
	if (!staged && !(staged = malloc(bitmap_len)))
		r = -1;
	/* The bits as they are now, before the data is synced: a bit another
	 * client sets meanwhile waits for the next commit, as xnbd-server
	 * stages its bits. */
	else if (__atomic_exchange_n(&dirty_bits, 0, __ATOMIC_ACQ_REL)) {
		for (size_t i = 0; i < bitmap_len; i++)
			staged[i] =
			    __atomic_load_n(&cbits[i], __ATOMIC_RELAXED);
		if (fdatasync(cache_fd) < 0 ||
		    pwrite(bitmap_fd, staged, bitmap_len, 0) !=
		        (ssize_t)bitmap_len ||
		    fdatasync(bitmap_fd) < 0)
			r = -1;
	}
	pthread_mutex_unlock(&sync_lock);
	return r;
}

/* FLOOR_SYNC_THREAD in the environment: the group commit runs on a
 * thread of its own, beside the clients' loops, as xnbd-server's does on
 * its worker, instead of on the loop that found it due. */
static int sync_thread_on;
static pthread_mutex_t st_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t st_cond = PTHREAD_COND_INITIALIZER;
static int st_due;

static void *sync_thread(void *arg)
{
	(void)arg;
	for (;;) {
		pthread_mutex_lock(&st_lock);
		while (!st_due)
			pthread_cond_wait(&st_cond, &st_lock);
		st_due = 0;
		pthread_mutex_unlock(&st_lock);
		if (cache_sync()) {
			perror("floor_server: the group commit");
			exit(1);
		}
	}
	return NULL;
}

/* The group commit found due by a client's loop. */
static int commit_due(void)
{
	if (!sync_thread_on)
		return cache_sync();
	pthread_mutex_lock(&st_lock);
	st_due = 1;
	pthread_cond_signal(&st_cond);
	pthread_mutex_unlock(&st_lock);
	return 0;
}

static int64_t now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Blocks [first, last] all present? */
static int all_present(uint64_t first, uint64_t last)
{
	for (uint64_t b = first; b <= last; b++)
		if (!present(b))
			return 0;
	return 1;
}

static int all_absent(uint64_t first, uint64_t last)
{
	for (uint64_t b = first; b <= last; b++)
		if (present(b))
			return 0;
	return 1;
}

static void mark(uint64_t off, uint64_t len)
{
	for (uint64_t b = off / CBS; b < (off + len + CBS - 1) / CBS; b++)
		__atomic_fetch_or(&cbits[b >> 3], (uint8_t)(1U << (b & 7)),
		                  __ATOMIC_RELAXED);
	__atomic_store_n(&dirty_bits, 1, __ATOMIC_RELEASE);
}

/* Upstream blocks at d (elen bytes from eoff) have arrived: the runs still
 * absent are stored and recorded; the runs present since (written here
 * meanwhile) are read back over d, so d holds the image as it is. */
static int settle(char *d, uint64_t eoff, uint32_t elen)
{
	uint64_t end = eoff + elen, off = eoff;
	while (off < end) {
		uint64_t b = off / CBS, e = off + CBS;
		int p = present(b);
		while (e < end && present(e / CBS) == p)
			e += CBS;
		if (e > end)
			e = end;
		size_t n = (size_t)(e - off);
		char *at = d + (off - eoff);
		if (p ? pread(cache_fd, at, n, (off_t)off) != (ssize_t)n
		      : pwrite(cache_fd, at, n, (off_t)off) != (ssize_t)n)
			return -1;
		if (!p)
			mark(off, n);
		off = e;
	}
	return 0;
}

/* Send the upstream a read of [eoff, eoff+elen) for slot i. */
static size_t put_up_read(char *uo, unsigned i, uint64_t eoff, uint32_t elen)
{
	uint32_t m = htonl(REQ_MAGIC), l = htonl(elen);
	uint16_t f = 0, t = htons(0);
	uint64_t h = i, o = htobe64(eoff);
	memcpy(uo, &m, 4);
	memcpy(uo + 4, &f, 2);
	memcpy(uo + 6, &t, 2);
	memcpy(uo + 8, &h, 8);
	memcpy(uo + 16, &o, 8);
	memcpy(uo + 24, &l, 4);
	return 28;
}

static int free_slot(void)
{
	for (unsigned i = 0; i < SLOTS; i++)
		if (!slots[i].used)
			return (int)i;
	return -1;
}

/* Append what fd has to buf (CACHE_BUF, *have used): 1, 0 if it had
 * nothing yet, -1 at its end or on an error. */
static int take_in(int fd, char *buf, size_t *have, int hdr_only)
{
	/* After a payload read straight into its buffer, the next header is
	 * read alone, so that a large payload behind it stays in the socket
	 * for its own buffer too (as xnbd-server's client reads). */
	size_t room = CACHE_BUF - *have;
	if (hdr_only && *have < 16)
		room = 16 - *have;
	ssize_t got = read(fd, buf + *have, room);
	if (got < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (got <= 0)
		return -1;
	*have += (size_t)got;
	return 1;
}

/* The upstream's replies are read in bulk, but for the payload of a large
 * read (over DIRECT_MIN, whole blocks), which goes from the socket straight
 * into the slot's own buffer: dslot is the slot being read so, dgot what
 * it has. */
static __thread int dslot = -1;
static __thread size_t dgot;
static __thread int hdr_only;
/* Stored direct reads whose replies go out at the end of the wake-up. */
static __thread unsigned doneq[SLOTS];
static __thread unsigned ndone;

/* Upstream reads not sent yet, in order, and the bytes of those sent
 * and not answered: at most up_cap, 1 MiB or FLOOR_CAP from the
 * environment (0: no cap), except that one read always goes. */
static __thread unsigned waitq[SLOTS], wq_head, wq_len;
static __thread uint64_t up_bytes;
static uint64_t up_cap = 1U << 20;

static int direct(const struct slot *sl)
{
	return !sl->payload && sl->elen > DIRECT_MIN && sl->elen % CBS == 0;
}

/* The blocks of sl have come (at d): stored, recorded, and the reply put
 * into out (with its data: a copy, as the floor's small replies are). */
static int finish(struct slot *sl, char *d, int c, char *out, size_t *np)
{
	size_t n = *np;
	uint32_t err = 0;
	if (settle(d, sl->eoff, sl->elen))
		err = EIO;
	else if (sl->payload) {
		/* A write: over the blocks. */
		if (pwrite(cache_fd, sl->payload, sl->len, (off_t)sl->off) !=
		    (ssize_t)sl->len)
			err = EIO;
		else
			mark(sl->off, sl->len);
	}
	size_t rl = !sl->payload && !err ? sl->len : 0;
	if (n + 16 + rl > CACHE_BUF) {
		if (full(c, out, n, 1))
			return -1;
		n = 0;
	}
	n += put_reply(out + n, err, sl->handle);
	memcpy(out + n, d + (sl->off - sl->eoff), rl);
	n += rl;
	free(sl->payload);
	sl->payload = NULL;
	sl->used = 0;
	*np = n;
	return 0;
}

/* A direct read's data is in its buffer: stored with one O_DIRECT write
 * through the ring, and replied to once that is done, as xnbd-server
 * does.  Blocks written meanwhile (the rare case) take finish(). */
static int arrived(unsigned i, int c, char *out, size_t *np)
{
	struct slot *sl = &slots[i];
	up_bytes -= sl->elen;
	if (!all_absent(sl->eoff / CBS, (sl->eoff + sl->elen) / CBS - 1))
		return finish(sl, sl->dbuf, c, out, np);
	struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
	if (!sqe)
		return -1;
	io_uring_prep_write(sqe, cache_dfd, sl->dbuf, sl->elen,
	                    (off_t)sl->eoff);
	io_uring_sqe_set_data64(sqe, i);
	if (io_uring_submit(&ring) != 1)
		return -1;
	return 0;
}

/* The ring's completions: bits set, replies queued for the wake-up's end. */
static int stored(void)
{
	uint64_t v;
	struct io_uring_cqe *cqe;
	if (read(ring_efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return -1;
	while (io_uring_peek_cqe(&ring, &cqe) == 0) {
		unsigned i = (unsigned)io_uring_cqe_get_data64(cqe);
		struct slot *sl = &slots[i];
		uint32_t err = 0;
		/* A short or failed write is not gone on with: a yardstick. */
		if (cqe->res == (int)sl->elen)
			mark(sl->eoff, sl->elen);
		else
			err = EIO;
		io_uring_cqe_seen(&ring, cqe);
		put_reply(sl->hdr, err, sl->handle);
		if (err)
			sl->len = 0; /* no data with an error */
		doneq[ndone++] = i;
	}
	return 0;
}

/* The queued replies of direct reads, from their buffers: one writev for
 * up to 512 pieces. */
static int send_stored(int c)
{
	struct iovec iov[512];
	unsigned at = 0;
	while (at < ndone) {
		int k = 0;
		unsigned from = at;
		size_t total = 0;
		for (; at < ndone && k + 2 <= 512; at++) {
			struct slot *sl = &slots[doneq[at]];
			iov[k++] = (struct iovec){sl->hdr, 16};
			total += 16;
			if (sl->len) {
				iov[k++] = (struct iovec){
				    sl->dbuf + (sl->off - sl->eoff), sl->len};
				total += sl->len;
			}
		}
		struct iovec *v = iov;
		while (total) {
			ssize_t r = writev(c, v, k);
			int a = again_out(c, r);
			if (a < 0)
				return -1;
			if (a)
				continue;
			total -= (size_t)r;
			while (k && (size_t)r >= v->iov_len) {
				r -= (ssize_t)v->iov_len;
				v++;
				k--;
			}
			if (k) {
				v->iov_base = (char *)v->iov_base + r;
				v->iov_len -= (size_t)r;
			}
		}
		for (unsigned j = from; j < at; j++)
			slots[doneq[j]].used = 0;
	}
	ndone = 0;
	return 0;
}

static int64_t sync_at; /* the next group commit, for every thread */

/* One client: requests read all at once per wake-up; hits, and writes of
 * whole or present blocks, served on the spot; misses sent upstream in
 * one write per wake-up, and their replies, once stored and recorded,
 * put with the others into one write to the client. */
static int serve_cache(int c, uint64_t size, char *in, char *out, char *uin,
                       char *uo)
{
	int served = 0;
	if (handshake(c, size, 1))
		return 0;
	int ep = watch_two(c, ups);
	struct epoll_event re = {.events = EPOLLIN, .data.fd = ring_efd};
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, ring_efd, &re) < 0)
		goto done;
	size_t have = 0, uhave = 0;
	for (;;) {
		struct epoll_event evs[3];
		int64_t at = __atomic_load_n(&sync_at, __ATOMIC_ACQUIRE);
		int64_t wait = at - now_ms();
		int ne = epoll_wait(ep, evs, 3, wait > 0 ? (int)wait : 0);
		if (ne < 0 && errno == EINTR)
			continue;
		if (ne < 0)
			goto done;
		at = __atomic_load_n(&sync_at, __ATOMIC_ACQUIRE);
		if (now_ms() >= at &&
		    __atomic_compare_exchange_n(
		        &sync_at, &at, now_ms() + SYNC_MS, 0, __ATOMIC_ACQ_REL,
		        __ATOMIC_ACQUIRE) &&
		    commit_due())
			goto done;
		/* replies to the client; upstream requests */
		size_t n = 0, un = 0;
		for (int k = 0; k < ne; k++) {
			if (evs[k].data.fd == ring_efd) {
				if (stored())
					goto done;
				continue;
			}
			int from_up = evs[k].data.fd == ups;
			if (from_up && dslot >= 0) {
				/* A large payload goes straight into its buffer. */
				struct slot *sl = &slots[dslot];
				ssize_t r =
				    read(ups, sl->dbuf + dgot, sl->elen - dgot);
				if (r < 0 &&
				    (errno == EAGAIN || errno == EINTR))
					continue;
				if (r <= 0)
					goto done;
				dgot += (size_t)r;
				if (dgot < sl->elen)
					continue;
				unsigned i = (unsigned)dslot;
				dslot = -1;
				hdr_only = 1;
				if (arrived(i, c, out, &n))
					goto done;
				continue;
			}
			int got = from_up ? take_in(ups, uin, &uhave, hdr_only)
			                  : take_in(c, in, &have, 0);
			if (from_up)
				hdr_only = 0;
			if (got < 0)
				goto done;
			if (!got)
				continue;
			if (from_up) {
				size_t pos = 0;
				while (uhave - pos >= 16) {
					uint32_t m, e;
					uint64_t h;
					memcpy(&m, uin + pos, 4);
					memcpy(&e, uin + pos + 4, 4);
					memcpy(&h, uin + pos + 8, 8);
					if (ntohl(m) != REPLY_MAGIC ||
					    h >= SLOTS || !slots[h].used || e)
						goto done; /* no error handling: a yardstick */
					struct slot *sl = &slots[h];
					if (direct(sl)) {
						/* What came with the header, then
						 * the rest read into the buffer. */
						size_t k2 = uhave - pos - 16;
						if (k2 > sl->elen)
							k2 = sl->elen;
						if (!sl->dbuf &&
						    posix_memalign(
						        (void **)&sl->dbuf, CBS,
						        CACHE_MAX_LEN))
							goto done;
						memcpy(sl->dbuf, uin + pos + 16,
						       k2);
						pos += 16 + k2;
						if (k2 < sl->elen) {
							dslot = (int)h;
							dgot = k2;
							break;
						}
						if (arrived((unsigned)h, c, out,
						            &n))
							goto done;
						continue;
					}
					if (uhave - pos < 16 + (size_t)sl->elen)
						break;
					up_bytes -= sl->elen;
					if (finish(sl, uin + pos + 16, c, out,
					           &n))
						goto done;
					pos += 16 + sl->elen;
				}
				memmove(uin, uin + pos, uhave - pos);
				uhave -= pos;
				continue;
			}
			size_t pos = 0;
			while (have - pos >= 28) {
				struct req r;
				if (parse((unsigned char *)in + pos, &r))
					goto done;
				served = 1;
				uint32_t len = r.len;
				int bad = !len || len > CACHE_MAX_LEN ||
				          r.off > size || len > size - r.off;
				if (r.type == 1 && len > CACHE_MAX_LEN)
					goto done;
				if (r.type == 1 &&
				    have - pos < 28 + (size_t)len)
					break; /* its payload is still on the way */
				size_t take =
				    28 + (r.type == 1 ? (size_t)len : 0);
				if (n + 16 + (r.type == 0 ? len : 0) >
				    CACHE_BUF) {
					if (full(c, out, n, 1))
						goto done;
					n = 0;
				}
				if (r.type == 2) {
					full(c, out, n, 1);
					goto done;
				}
				if ((r.type != 0 && r.type != 1) || bad) {
					/* flush is a no-op (nothing here is durable) */
					n += put_reply(out + n,
					               r.type == 3 ? 0 : EINVAL,
					               r.handle);
					pos += take;
					continue;
				}
				uint64_t first = r.off / CBS,
				         last = (r.off + len - 1) / CBS;
				uint64_t eoff = first * CBS,
				         eend = (last + 1) * CBS;
				if (eend > size)
					eend = size;
				/* A write needs the upstream only for a partial end
				 * block that is absent. */
				int miss =
				    r.type == 0
				        ? !all_present(first, last)
				        : ((r.off > eoff && !present(first)) ||
				           (r.off + len < eend &&
				            !present(last)));
				if (!miss) {
					uint32_t err = 0;
					if (r.type == 0) {
						if (pread(cache_fd,
						          out + n + 16, len,
						          (off_t)r.off) !=
						    (ssize_t)len)
							err = EIO;
						n += put_reply(out + n, err,
						               r.handle);
						n += err ? 0 : len;
					} else {
						if (pwrite(cache_fd,
						           in + pos + 28, len,
						           (off_t)r.off) !=
						    (ssize_t)len)
							err = EIO;
						else
							mark(r.off, len);
						n += put_reply(out + n, err,
						               r.handle);
					}
					pos += take;
					continue;
				}
				int i = free_slot();
				if (i < 0 || un + 28 > CACHE_BUF)
					goto done; /* more in flight than a yardstick takes */
				struct slot *sl = &slots[i];
				sl->used = 1;
				memcpy(sl->handle, r.handle, 8);
				sl->off = r.off;
				sl->len = len;
				sl->eoff = eoff;
				sl->elen = (uint32_t)(eend - eoff);
				sl->payload = NULL;
				if (r.type == 1) {
					sl->payload = malloc(len);
					if (!sl->payload)
						goto done;
					memcpy(sl->payload, in + pos + 28, len);
				}
				waitq[(wq_head + wq_len++) % SLOTS] =
				    (unsigned)i;
				pos += take;
			}
			memmove(in, in + pos, have - pos);
			have -= pos;
		}
		while (wq_len) {
			struct slot *sl = &slots[waitq[wq_head]];
			if (up_cap && up_bytes && up_bytes + sl->elen > up_cap)
				break;
			un += put_up_read(uo + un, waitq[wq_head], sl->eoff,
			                  sl->elen);
			up_bytes += sl->elen;
			wq_head = (wq_head + 1) % SLOTS;
			wq_len--;
		}
		if ((un && full(ups, uo, un, 1)) || (n && full(c, out, n, 1)) ||
		    (ndone && send_stored(c)))
			goto done;
	}
done:
	if (ep >= 0)
		close(ep);
	return served;
}

/* --cache: a thread a client, each with its own upstream connection and
 * ring.  Once the last client is gone, and one of them asked anything,
 * the cache is synced and the process ends: what they left asked of the
 * upstream is not waited for. */
static int cache_upport;
static uint64_t cache_size;
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned cache_clients;
static int cache_served;

static void *cache_thread(void *arg)
{
	int c = (int)(intptr_t)arg;
	uint64_t size;
	char *in = malloc(CACHE_BUF), *out = malloc(CACHE_BUF);
	char *uin = malloc(CACHE_BUF), *uo = malloc(CACHE_BUF);
	int served = 0;
	if (!in || !out || !uin || !uo || up_connect(cache_upport, &size) ||
	    size != cache_size || ring_open()) {
		perror("floor_server: a client's upstream connection or ring");
		exit(1);
	}
	served = serve_cache(c, cache_size, in, out, uin, uo);
	close(c);
	pthread_mutex_lock(&cache_lock);
	cache_served |= served;
	if (--cache_clients == 0 && cache_served)
		exit(cache_sync() ? 1 : 0);
	pthread_mutex_unlock(&cache_lock);
	/* This thread's ring, upstream connection and buffers are left to
	 * the process's end: a yardstick. */
	return NULL;
}

static int listen_on(int port)
{
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons((uint16_t)port),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    listen(l, 8) < 0) {
		perror("floor_server");
		return -1;
	}
	return l;
}

static int accept_one(int l)
{
	int c = accept(l, NULL, NULL), one = 1;
	if (c >= 0)
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return c;
}

int main(int argc, char **argv)
{
	if (argc == 5 && strcmp(argv[1], "--cache") == 0) {
		if (getenv("FLOOR_CAP"))
			up_cap = strtoull(getenv("FLOOR_CAP"), NULL, 0);
		cache_upport = atoi(argv[3]);
		/* The size, from a connection of the main thread's own; each
		 * client's thread makes its own. */
		if (up_connect(cache_upport, &cache_size) ||
		    cache_open(argv[4], cache_size)) {
			perror("floor_server: the upstream or the cache");
			return 1;
		}
		close(ups);
		int l = listen_on(atoi(argv[2]));
		if (l < 0)
			return 1;
		signal(SIGPIPE, SIG_IGN);
		sync_at = now_ms() + SYNC_MS;
		if (getenv("FLOOR_SYNC_THREAD")) {
			pthread_t t;
			sync_thread_on = 1;
			if (pthread_create(&t, NULL, sync_thread, NULL))
				return 1;
		}
		for (;;) {
			int c = accept_one(l);
			if (c < 0)
				continue;
			pthread_mutex_lock(&cache_lock);
			cache_clients++;
			pthread_mutex_unlock(&cache_lock);
			pthread_t t;
			pthread_attr_t a;
			pthread_attr_init(&a);
			pthread_attr_setdetachstate(&a,
			                            PTHREAD_CREATE_DETACHED);
			if (pthread_create(&t, &a, cache_thread,
			                   (void *)(intptr_t)c))
				return 1;
			pthread_attr_destroy(&a);
		}
	}
	int relaying = argc == 4 && strcmp(argv[1], "--relay") == 0;
	int loop = argc >= 4 && strcmp(argv[1], "--loop") == 0;
	argv += loop;
	argc -= loop;
	int cow = loop && argc == 4 && strcmp(argv[1], "--cow") == 0;
	argv += cow;
	argc -= cow;
	argv += relaying;
	argc -= relaying;
	if (argc != 3) {
		fprintf(stderr,
		        "usage: floor_server [--loop [--cow]] PORT IMAGE\n"
		        "       floor_server --relay PORT UPPORT\n"
		        "       floor_server --cache PORT UPPORT CACHE\n");
		return 2;
	}
	int img = relaying ? -1 : open(argv[2], cow ? O_RDONLY : O_RDWR);
	struct stat st = {0};
	if (!relaying && (img < 0 || fstat(img, &st) < 0)) {
		perror(argv[2]);
		return 1;
	}
	if (cow && cow_open((uint64_t)st.st_size))
		return 1;
	signal(SIGPIPE, SIG_IGN); /* a client gone: its writes fail */
	char *buf = loop ? NULL : malloc(relaying ? RELAY_BUF : MAX_LEN);
	int l = listen_on(atoi(argv[1]));
	if ((!loop && !buf) || l < 0)
		return 1;
	if (relaying)
		return relay(l, atoi(argv[2]), buf);
	for (;;) {
		int c = accept_one(l);
		if (c < 0)
			continue;
		if (loop) {
			serve_thread(c, img, (uint64_t)st.st_size);
			continue;
		}
		serve(c, img, (uint64_t)st.st_size, buf);
		close(c);
	}
}
