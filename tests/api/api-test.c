/* api-test.c - a third-party program built against the installed libxnbd
 * through pkg-config: it writes and reads an image through the file
 * backend, takes a snapshot, and starts and stops a server. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xnbd/xnbd.h>

static int completed;

static void on_io(struct xnbd_io *io)
{
	completed = io->status ? io->status : 1;
}

static int run_io(uv_loop_t *loop, struct xnbd_backend *b, struct xnbd_io *io)
{
	completed = 0;
	io->done = on_io;
	int r = xnbd_backend_submit(b, io);
	if (r < 0)
		return r;
	if (r == XNBD_IO_COMPLETED)
		return io->status;
	while (!completed)
		uv_run(loop, UV_RUN_ONCE);
	return completed == 1 ? 0 : completed;
}

static int snap_status = 1;

static void on_snap(struct xnbd_backend *b, int status, const char *path,
                    void *ud)
{
	snap_status = status;
}

static void on_down(struct xnbd_server *s, void *ud)
{
	*(int *)ud = 1;
}

#define CHECK(c) \
	do { \
		if (!(c)) { \
			fprintf(stderr, "api-test: failed: %s (line %d)\n", \
			        #c, __LINE__); \
			return 1; \
		} \
	} while (0)

int main(int argc, char **argv)
{
	char img[] = "/tmp/xnbd-api-XXXXXX";
	int fd = mkstemp(img);
	CHECK(fd >= 0);
	CHECK(ftruncate(fd, 1 << 20) == 0);
	close(fd);

	uv_loop_t *loop = uv_default_loop();
	struct xnbd_backend *b;
	CHECK(xnbd_backend_file_open(loop, img, 0, &b) == 0);
	CHECK(xnbd_backend_size(b) == 1 << 20);
	CHECK(xnbd_backend_caps(b) & XNBD_CAP_FLUSH);

	char out[4096], in[4096];
	memset(out, 0xa5, sizeof(out));
	struct xnbd_io io = {.type = XNBD_IO_WRITE,
	                     .offset = 8192,
	                     .length = sizeof(out),
	                     .buf = out};
	CHECK(run_io(loop, b, &io) == 0);
	io = (struct xnbd_io){.type = XNBD_IO_FLUSH};
	CHECK(run_io(loop, b, &io) == 0);
	io = (struct xnbd_io){.type = XNBD_IO_READ,
	                      .offset = 8192,
	                      .length = sizeof(in),
	                      .buf = in};
	CHECK(run_io(loop, b, &io) == 0);
	CHECK(memcmp(in, out, sizeof(in)) == 0);
	io = (struct xnbd_io){.type = XNBD_IO_READ,
	                      .offset = (1 << 20) - 10,
	                      .length = 20,
	                      .buf = in};
	CHECK(xnbd_backend_submit(b, &io) == -EINVAL);

	char snap[64];
	snprintf(snap, sizeof(snap), "%s.snap", img);
	CHECK(xnbd_backend_snapshot(b, snap, on_snap, NULL) == 0);
	while (snap_status == 1)
		uv_run(loop, UV_RUN_ONCE);
	CHECK(snap_status == 0);
	CHECK(access(snap, F_OK) == 0);

	struct xnbd_export *e;
	struct xnbd_server *s;
	CHECK(xnbd_export_new("api", b, XNBD_EXPORT_READONLY, &e) == 0);
	CHECK(xnbd_server_new(loop, &s) == 0);
	CHECK(xnbd_server_add_export(s, e) == 0);
	CHECK(xnbd_server_add_export(s, e) == -EEXIST);
	CHECK(xnbd_server_listen(s, "127.0.0.1", "0") == 0);
	int down = 0;
	CHECK(xnbd_server_shutdown(s, 1000, on_down, &down) == 0);
	while (!down)
		uv_run(loop, UV_RUN_ONCE);
	xnbd_server_free(s);
	xnbd_export_free(e);
	xnbd_backend_free(b);
	CHECK(uv_loop_close(loop) == 0);
	unlink(snap);
	unlink(img);
	printf("api-test: libxnbd %s OK\n", xnbd_version());
	return 0;
}
