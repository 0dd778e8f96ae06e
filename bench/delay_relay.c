/* delay_relay.c - a TCP relay that holds every byte back for a while: a
 * far link for tests and measurements on a machine whose kernel has no
 * netem (this VM's: `tc qdisc ... netem` says the kind is unknown).
 *
 * Each client that connects to 127.0.0.1:PORT is joined to a connection
 * of its own to 127.0.0.1:UPPORT, and what either side sends reaches the
 * other MS milliseconds after the relay read it: a round trip of twice MS
 * plus the relay's own time.  At most WINDOW bytes (default 64 MiB) wait
 * in each direction; past that the relay stops reading that side, so the
 * sender's socket fills as it would on a link with that much in flight.
 * No rate limit: the link is as fast as the relay, only far.  A side that
 * closes is seen closed by the other once all it sent has gone over (its
 * end of stream is delayed like its bytes); an error ends both at once.
 *
 *     delay_relay PORT UPPORT MS [WINDOW_MIB]
 *
 * One thread, one epoll loop, every connection on it.  Not part of the
 * server; bench/README.md says what it was used for.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXFD 4096
#define CHUNK (256U * 1024U)

struct chunk {
	struct chunk *next;
	uint64_t due; /* ns, CLOCK_MONOTONIC */
	size_t len, off;
	char data[];
};

/* What one side sent, waiting to go to the other side. */
struct dir {
	int from, to;
	struct chunk *head, *tail;
	size_t queued;
	int reading;      /* from is watched for input */
	int writing;      /* to is watched for output */
	int eof;          /* from sent its last byte */
	int shut;         /* and that end of stream went on to to */
	uint64_t eof_due; /* when the end of stream may go on */
};

static struct dir *dirs[MAXFD]; /* by the descriptor read from */
static void close_pair(int a);
static struct dir *outs[MAXFD]; /* by the descriptor written to */
static int ep;
static uint64_t delay_ns;
static size_t window;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void watch(int fd)
{
	uint32_t ev = 0;
	if (dirs[fd] && dirs[fd]->reading)
		ev |= EPOLLIN;
	if (outs[fd] && outs[fd]->writing)
		ev |= EPOLLOUT;
	struct epoll_event e = {.events = ev, .data.fd = fd};
	epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e);
}

static void drop(struct dir *d)
{
	while (d->head) {
		struct chunk *c = d->head;
		d->head = c->next;
		free(c);
	}
	free(d);
}

static void close_pair(int a)
{
	struct dir *d = dirs[a];
	if (!d)
		return;
	int b = d->to;
	struct dir *e = dirs[b];
	dirs[a] = dirs[b] = outs[a] = outs[b] = NULL;
	close(a);
	close(b);
	drop(d);
	if (e)
		drop(e);
}

static int join(int c, int upport)
{
	int u = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons((uint16_t)upport),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (u < 0 || u >= MAXFD || c >= MAXFD ||
	    connect(u, (struct sockaddr *)&a, sizeof(a)) < 0) {
		if (u >= 0)
			close(u);
		return -1;
	}
	setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	fcntl(c, F_SETFL, O_NONBLOCK);
	fcntl(u, F_SETFL, O_NONBLOCK);
	struct dir *cu = calloc(1, sizeof(*cu)), *uc = calloc(1, sizeof(*uc));
	if (!cu || !uc) {
		free(cu);
		free(uc);
		close(u);
		return -1;
	}
	*cu = (struct dir){.from = c, .to = u, .reading = 1};
	*uc = (struct dir){.from = u, .to = c, .reading = 1};
	dirs[c] = outs[u] = cu;
	dirs[u] = outs[c] = uc;
	struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
	struct epoll_event ue = {.events = EPOLLIN, .data.fd = u};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce) < 0 ||
	    epoll_ctl(ep, EPOLL_CTL_ADD, u, &ue) < 0) {
		close_pair(c);
		return 0; /* c is closed */
	}
	return 0;
}

/* Read what fd has into its direction's queue; -1 when the side is gone. */
static int take(struct dir *d)
{
	while (d->queued < window) {
		struct chunk *c = malloc(sizeof(*c) + CHUNK);
		if (!c)
			return -1;
		ssize_t r = d->eof ? 0 : read(d->from, c->data, CHUNK);
		if (r == 0) {
			/* The end of the stream follows the bytes queued. */
			free(c);
			if (!d->eof)
				d->eof_due = now_ns() + delay_ns;
			d->eof = 1;
			break;
		}
		if (r < 0) {
			free(c);
			if (errno == EAGAIN || errno == EINTR)
				return 0;
			return -1;
		}
		*c = (struct chunk){.due = now_ns() + delay_ns,
		                    .len = (size_t)r};
		if (d->tail)
			d->tail->next = c;
		else
			d->head = c;
		d->tail = c;
		d->queued += (size_t)r;
	}
	if (d->reading) {
		d->reading = 0; /* full, or over: the sender waits */
		watch(d->from);
	}
	return 0;
}

/* Write what is due; -1 when the other side is gone. */
static int give(struct dir *d, uint64_t t)
{
	while (d->head && d->head->due <= t) {
		struct chunk *c = d->head;
		ssize_t w = write(d->to, c->data + c->off, c->len - c->off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			if (!d->writing) {
				d->writing = 1;
				watch(d->to);
			}
			return 0;
		}
		if (w <= 0)
			return -1;
		c->off += (size_t)w;
		d->queued -= (size_t)w;
		if (c->off < c->len)
			continue;
		d->head = c->next;
		if (!d->head)
			d->tail = NULL;
		free(c);
	}
	if (d->writing) {
		d->writing = 0;
		watch(d->to);
	}
	if (!d->head && d->eof && !d->shut && d->eof_due <= t) {
		d->shut = 1;
		shutdown(d->to, SHUT_WR);
		struct dir *back = dirs[d->to];
		if (back && back->shut) {
			close_pair(d->from); /* both ways are over */
			return 0;
		}
	}
	if (!d->reading && !d->eof && d->queued < window) {
		d->reading = 1;
		watch(d->from);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 4 && argc != 5) {
		fprintf(stderr,
		        "usage: delay_relay PORT UPPORT MS [WINDOW_MIB]\n");
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	int port = atoi(argv[1]), upport = atoi(argv[2]);
	delay_ns = (uint64_t)(atof(argv[3]) * 1e6);
	window = (size_t)(argc == 5 ? atoi(argv[4]) : 64) << 20;
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons((uint16_t)port),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	ep = epoll_create1(0);
	struct epoll_event le = {.events = EPOLLIN, .data.fd = l};
	if (l < 0 || ep < 0 ||
	    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    listen(l, 64) < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, l, &le) < 0) {
		perror("delay_relay");
		return 1;
	}
	for (;;) {
		/* Sleep until the next chunk is due, or something happens. */
		uint64_t t = now_ns(), next = UINT64_MAX;
		for (int fd = 0; fd < MAXFD; fd++) {
			struct dir *d = dirs[fd];
			if (!d || d->writing)
				continue;
			if (d->head && d->head->due < next)
				next = d->head->due;
			else if (!d->head && d->eof && !d->shut &&
			         d->eof_due < next)
				next = d->eof_due;
		}
		int ms = next == UINT64_MAX ? -1
		         : next <= t        ? 0
		                     : (int)((next - t + 999999) / 1000000);
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, ms);
		if (n < 0 && errno != EINTR)
			return 1;
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == l) {
				int c = accept(l, NULL, NULL);
				if (c >= 0 && join(c, upport) < 0)
					close(c);
				continue;
			}
			if ((evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) &&
			    dirs[fd] && take(dirs[fd]) < 0) {
				close_pair(fd);
				continue;
			}
			if ((evs[i].events & EPOLLOUT) && outs[fd] &&
			    give(outs[fd], now_ns()) < 0)
				close_pair(fd);
		}
		t = now_ns();
		for (int fd = 0; fd < MAXFD; fd++)
			if (dirs[fd] && !dirs[fd]->writing &&
			    (dirs[fd]->head ||
			     (dirs[fd]->eof && !dirs[fd]->shut)) &&
			    give(dirs[fd], t) < 0)
				close_pair(fd);
	}
}
