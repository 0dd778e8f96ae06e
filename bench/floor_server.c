/* floor_server.c - the least an NBD server can do per request, as a
 * yardstick for bench.py (the "floor" column), never a server to use.
 *
 * One thread, one client at a time, blocking I/O: an oldstyle handshake
 * (no options, no export name), then for each request one read of its
 * header, a pread or pwrite of the image, and one writev of the reply.
 * No event loop, no queue, no second thread: at depth 1 no server can
 * answer in fewer system calls or wake-ups, so its IOPS there are the
 * machine's ceiling for that row.  It serves reads, writes, flush (a
 * no-op: nothing here is durable) and disconnect; anything else gets
 * EINVAL.
 *
 *     floor_server PORT IMAGE
 */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define REQ_MAGIC 0x25609513U
#define REPLY_MAGIC 0x67446698U
#define MAX_LEN (32U << 20)

static int full(int fd, void *buf, size_t n, int out)
{
	char *p = buf;
	while (n) {
		ssize_t r = out ? write(fd, p, n) : read(fd, p, n);
		if (r < 0 && errno == EINTR)
			continue;
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

static void serve(int c, int img, uint64_t size, char *buf)
{
	char hello[152] = "NBDMAGIC";
	uint64_t v = htobe64(0x00420281861253ULL);
	memcpy(hello + 8, &v, 8);
	v = htobe64(size);
	memcpy(hello + 16, &v, 8);
	uint32_t flags = htonl(1U | 1U << 2); /* HAS_FLAGS, SEND_FLUSH */
	memcpy(hello + 24, &flags, 4);
	if (full(c, hello, sizeof(hello), 1))
		return;
	for (;;) {
		unsigned char q[28];
		if (full(c, q, sizeof(q), 0))
			return;
		uint32_t magic, len;
		uint16_t type;
		uint64_t off;
		memcpy(&magic, q, 4);
		memcpy(&type, q + 6, 2);
		memcpy(&off, q + 16, 8);
		memcpy(&len, q + 24, 4);
		magic = ntohl(magic);
		type = ntohs(type);
		off = be64toh(off);
		len = ntohl(len);
		const char *handle = (const char *)q + 8;
		if (magic != REQ_MAGIC)
			return;
		int bad = len > MAX_LEN || off > size || len > size - off;
		switch (type) {
		case 0: /* read */
			if (bad) {
				if (reply(c, EINVAL, handle, NULL, 0))
					return;
			} else if (pread(img, buf, len, (off_t)off) != (ssize_t)len) {
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
			               : pwrite(img, buf, len, (off_t)off) ==
			                         (ssize_t)len ? 0 : EIO;
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

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: floor_server PORT IMAGE\n");
		return 2;
	}
	int img = open(argv[2], O_RDWR);
	struct stat st;
	if (img < 0 || fstat(img, &st) < 0) {
		perror(argv[2]);
		return 1;
	}
	signal(SIGPIPE, SIG_IGN); /* a client gone: its writes fail */
	char *buf = malloc(MAX_LEN);
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = {.sin_family = AF_INET,
	                        .sin_port = htons((uint16_t)atoi(argv[1])),
	                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (!buf || l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 ||
	    listen(l, 8) < 0) {
		perror("floor_server");
		return 1;
	}
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0)
			continue;
		setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		serve(c, img, (uint64_t)st.st_size, buf);
		close(c);
	}
}
