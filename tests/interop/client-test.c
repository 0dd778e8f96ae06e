/* client-test.c - libxnbd's NBD client against a real server.
 *
 * Usage: client-test HOST PORT [readonly]
 * Connects, writes hundreds of random extents with every request in flight
 * at once, reads them back (again all at once) and compares, checks that
 * zeroed ranges read as zeroes (hole chunks on structured servers) and
 * that errors come back as errors.  With `readonly`, checks that writes
 * fail with EPERM and reads work.  Exit 0 on success.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xnbd/xnbd.h>

#define N 400
#define SLOT (128 * 1024)

static uv_loop_t *loop;
static int connected = 1;
static int pending;

static void fail(const char *what, int err)
{
	fprintf(stderr, "client-test: FAIL: %s: %s\n", what,
	        err ? xnbd_strerror(err) : "");
	exit(1);
}

static void on_connect(struct xnbd_client *c, int status, void *ud)
{
	connected = status;
}

static void on_io(struct xnbd_io *io)
{
	pending--;
}

static void wait_all(void)
{
	while (pending > 0)
		uv_run(loop, UV_RUN_ONCE);
}

static void submit(struct xnbd_backend *b, struct xnbd_io *io)
{
	io->done = on_io;
	int r = xnbd_backend_submit(b, io);
	if (r == XNBD_IO_PENDING)
		pending++;
	else if (r < 0)
		io->status = r;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 2;
	int readonly = argc > 3 && strcmp(argv[3], "readonly") == 0;
	loop = uv_default_loop();
	struct xnbd_client *c;
	if (xnbd_client_new(loop, &c))
		fail("new", 0);
	if (xnbd_client_connect(c, argv[1], argv[2], "", on_connect, NULL))
		fail("connect call", 0);
	while (connected == 1)
		uv_run(loop, UV_RUN_ONCE);
	if (connected)
		fail("connect", connected);
	struct xnbd_backend *b = xnbd_client_backend(c);
	uint64_t size = xnbd_client_size(c);
	if (size < (uint64_t)N * SLOT)
		fail("export too small", 0);
	printf("client-test: connected, %llu bytes, %s replies\n",
	       (unsigned long long)size,
	       xnbd_client_structured(c) ? "structured" : "simple");

	static struct xnbd_io io[N];
	static uint8_t *wbuf[N], *rbuf[N];
	static uint64_t off[N], len[N];
	srand(7);
	for (int i = 0; i < N; i++) {
		len[i] = 1 + (uint64_t)rand() % (SLOT - 1);
		off[i] =
		    (uint64_t)i * SLOT + (uint64_t)rand() % (SLOT - len[i]);
		wbuf[i] = malloc(len[i]);
		rbuf[i] = malloc(len[i]);
		for (uint64_t k = 0; k < len[i]; k++)
			wbuf[i][k] = (uint8_t)rand();
	}

	if (readonly) {
		io[0] = (struct xnbd_io){.type = XNBD_IO_WRITE,
		                         .offset = 0,
		                         .length = 512,
		                         .buf = wbuf[0]};
		int r = xnbd_backend_submit(b, &io[0]);
		if (r != -EPERM)
			fail(
			    "write to a read-only export not refused with EPERM",
			    r < 0 ? r : 0);
		static uint8_t rb[65536];
		io[0] = (struct xnbd_io){.type = XNBD_IO_READ,
		                         .offset = 4096,
		                         .length = sizeof(rb),
		                         .buf = rb};
		submit(b, &io[0]);
		wait_all();
		if (io[0].status)
			fail("read from a read-only export", io[0].status);
		xnbd_client_free(c);
		uv_run(loop, UV_RUN_DEFAULT);
		printf("client-test: read-only checks passed\n");
		return 0;
	}

	for (int i = 0; i < N; i++) {
		io[i] = (struct xnbd_io){.type = XNBD_IO_WRITE,
		                         .offset = off[i],
		                         .length = len[i],
		                         .buf = wbuf[i]};
		submit(b, &io[i]);
	}
	if (xnbd_client_in_flight(c) < N / 2)
		fail("requests were not pipelined", 0);
	wait_all();
	for (int i = 0; i < N; i++)
		if (io[i].status)
			fail("write", io[i].status);
	for (int i = 0; i < N; i++) {
		memset(rbuf[i], 0xee, len[i]);
		io[i] = (struct xnbd_io){.type = XNBD_IO_READ,
		                         .offset = off[i],
		                         .length = len[i],
		                         .buf = rbuf[i]};
		submit(b, &io[i]);
	}
	wait_all();
	for (int i = 0; i < N; i++) {
		if (io[i].status)
			fail("read", io[i].status);
		if (memcmp(rbuf[i], wbuf[i], len[i]) != 0)
			fail("data read back differs from data written", 0);
	}
	printf("client-test: %d pipelined writes and reads match\n", N);

	/* Zero a whole slot and read it: zeroes (a hole chunk where the server
	 * sends them), the neighbours intact. */
	if (xnbd_client_flags(c) & XNBD_FLAG_SEND_WRITE_ZEROES) {
		io[0] = (struct xnbd_io){
		    .type = XNBD_IO_ZERO, .offset = 3 * SLOT, .length = SLOT};
		submit(b, &io[0]);
		wait_all();
		if (io[0].status)
			fail("zero", io[0].status);
		static uint8_t big[3 * SLOT];
		memset(big, 0xee, sizeof(big));
		io[0] = (struct xnbd_io){.type = XNBD_IO_READ,
		                         .offset = 2 * SLOT,
		                         .length = 3 * SLOT,
		                         .buf = big};
		submit(b, &io[0]);
		wait_all();
		if (io[0].status)
			fail("read around zeroes", io[0].status);
		for (int k = 0; k < SLOT; k++)
			if (big[SLOT + k])
				fail("zeroed range does not read as zeroes", 0);
		if (memcmp(big + (off[2] - 2 * SLOT), wbuf[2], len[2]) ||
		    memcmp(big + (off[4] - 2 * SLOT), wbuf[4], len[4]))
			fail("neighbours of the zeroed range changed", 0);
		printf("client-test: zeroing reads back as zeroes\n");
	}

	/* Flush; a read past the end is refused before it is sent. */
	io[0] = (struct xnbd_io){.type = XNBD_IO_FLUSH};
	submit(b, &io[0]);
	wait_all();
	if (io[0].status)
		fail("flush", io[0].status);
	io[0] = (struct xnbd_io){.type = XNBD_IO_READ,
	                         .offset = size - 10,
	                         .length = 20,
	                         .buf = rbuf[0]};
	if (xnbd_backend_submit(b, &io[0]) != -EINVAL)
		fail("read past the end not refused", 0);

	/* Free with requests in flight: they complete with -ECANCELED. */
	for (int i = 0; i < 8; i++) {
		io[i] = (struct xnbd_io){.type = XNBD_IO_READ,
		                         .offset = off[i],
		                         .length = len[i],
		                         .buf = rbuf[i]};
		submit(b, &io[i]);
	}
	xnbd_client_free(c);
	if (pending != 0)
		fail("requests left pending after free", 0);
	for (int i = 0; i < 8; i++)
		if (io[i].status != -ECANCELED)
			fail("in-flight request not cancelled by free",
			     io[i].status);
	uv_run(loop, UV_RUN_DEFAULT);
	if (uv_loop_close(loop))
		fail("handles left open", 0);
	for (int i = 0; i < N; i++) {
		free(wbuf[i]);
		free(rbuf[i]);
	}
	printf("client-test: all checks passed\n");
	return 0;
}
