/* main.c - xnbd-server: command line, daemon and signal glue around
 * libxnbd's server engine.  Everything about NBD lives in the library. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <xnbd/xnbd.h>

#include "frontend.h"
#include "logsink.h"

#define PROG "xnbd-server"
#define SNAPSHOT_NAMES 100 /* IMAGE.snapshot.T, then .T.2 to .T.100 */

enum mode { MODE_NONE, MODE_TARGET, MODE_COW, MODE_PROXY };

struct config {
	struct serve_opts serve;
	enum mode mode;
	const char *image;
	const char *overlay;
	const char *rhost, *rport, *cache, *bitmap, *ctlsock; /* --proxy */
	const char *exportname;
	int clear_bitmap;
	int readonly;
	int inetd;
	int connected_fd;
	int oldstyle;
};

struct app {
	struct config cfg;
	uv_loop_t *loop;
	struct xnbd_backend *backend; /* what is exported */
	struct xnbd_backend *image;   /* the image file (below a CoW layer) */
	struct xnbd_export *export;
	struct xnbd_server *server;
	struct xnbd_proxy *proxy;
	struct xnbd_control *control;
	int proxy_opened; /* 1 ready, <0 failed */
	uv_signal_t sig_term, sig_int, sig_usr1, sig_usr2;
	char *image_abs;
	char *cache_abs, *bitmap_abs, *ctl_abs;
	int stopping;
	int started;        /* serving: signals act */
	int stop_requested; /* a stop signal came while starting */
	int released;       /* signal handles unreferenced */
	int server_done;
	int exit_code;
};

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "Usage: " PROG " --target [options] DISK_IMAGE\n"
	    "       " PROG " --cow-target [options] BASE_DISK_IMAGE\n"
	    "       " PROG
	    " --proxy [options] RHOST RPORT CACHE_IMAGE BITMAP CTLSOCK\n"
	    "\n"
	    "Export DISK_IMAGE over the NBD protocol.  With --cow-target, writes go to\n"
	    "an overlay that disappears when the server ends; BASE_DISK_IMAGE is never\n"
	    "written.  With --proxy, serve the NBD export at RHOST:RPORT, caching its\n"
	    "blocks in CACHE_IMAGE as they are read, recorded in BITMAP; writes stay\n"
	    "local.  xnbd-bgctl(1) controls the proxy through the socket CTLSOCK.\n"
	    "\n"
	    "Options:\n"
	    "  --lport PORT          TCP port to listen on (default 8520)\n"
	    "  --laddr ADDRESS       address to listen on (default: all, IPv6 and IPv4)\n"
	    "  --readonly            export read-only; writes are refused with EPERM\n"
	    "  --daemonize           run in the background\n"
	    "  --pidfile FILE        with --daemonize, write the daemon's PID to FILE\n"
	    "  --inetd               serve the one client connected on standard input\n"
	    "  --connected-fd N      serve the client on descriptor N, negotiated already\n"
	    "  --logpath FILE        append messages to FILE instead of standard error\n"
	    "  --syslog              send messages to syslog\n"
	    "  --max-queue-size N    stop reading requests while N are queued (0: no bound)\n"
	    "  --max-buf-size BYTES  stop reading requests while BYTES are buffered (0: no bound)\n"
	    "  --cow-overlay PATH    --cow-target: keep the overlay in the new file PATH,\n"
	    "                        or, if PATH is a directory, make it there, unlinked\n"
	    "                        (default: an unlinked file in $TMPDIR or /var/tmp)\n"
	    "  --target-exportname NAME  --proxy: the upstream export's name (default \"\")\n"
	    "  --clear-bitmap        --proxy: forget what BITMAP says is cached\n"
	    "  --oldstyle            greet clients with the oldstyle handshake (legacy)\n"
	    "  --verbose             log debug messages too\n"
	    "  --help                show this help and exit\n"
	    "  --version             show the version and exit\n"
	    "\n"
	    "Signals: SIGUSR1 writes a snapshot DISK_IMAGE.snapshot.<unix-time>\n"
	    "(target mode only); SIGUSR2 switches a proxy to target mode once every\n"
	    "block is cached;\n"
	    "SIGTERM and SIGINT stop after answering requests in flight.\n"
	    "See xnbd-server(8).\n");
}

static int parse_args(int argc, char **argv, struct config *c)
{
	enum {
		O_TARGET = O_SERVE_END,
		O_COW,
		O_PROXY,
		O_READONLY,
		O_INETD,
		O_CONNFD,
		O_OLDSTYLE,
		O_HELP,
		O_VERSION,
		O_EXPORTNAME,
		O_CLEARBITMAP,
		O_OVERLAY,
	};
	static const struct option opts[] = {
	    {"target", no_argument, NULL, O_TARGET},
	    {"cow-target", no_argument, NULL, O_COW},
	    {"proxy", no_argument, NULL, O_PROXY},
	    SERVE_OPTIONS,
	    {"readonly", no_argument, NULL, O_READONLY},
	    {"inetd", no_argument, NULL, O_INETD},
	    {"connected-fd", required_argument, NULL, O_CONNFD},
	    {"oldstyle", no_argument, NULL, O_OLDSTYLE},
	    {"cow-overlay", required_argument, NULL, O_OVERLAY},
	    {"target-exportname", required_argument, NULL, O_EXPORTNAME},
	    {"clear-bitmap", no_argument, NULL, O_CLEARBITMAP},
	    {"help", no_argument, NULL, O_HELP},
	    {"version", no_argument, NULL, O_VERSION},
	    {NULL, 0, NULL, 0},
	};
	int o, r;
	c->serve.lport = "8520";
	c->connected_fd = -1;
	opterr = 0;
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (o) {
		case O_TARGET:
		case O_COW:
		case O_PROXY: {
			enum mode m = o == O_TARGET ? MODE_TARGET
			              : o == O_COW  ? MODE_COW
			                            : MODE_PROXY;
			if (c->mode != MODE_NONE && c->mode != m)
				return fail_usage(PROG, "%s",
				                  "choose one of --target, "
				                  "--cow-target and --proxy");
			c->mode = m;
			break;
		}
		case O_READONLY:
			c->readonly = 1;
			break;
		case O_INETD:
			c->inetd = 1;
			break;
		case O_CONNFD: {
			char *end;
			long fd = strtol(optarg, &end, 10);
			if (*end || end == optarg || fd < 0 || fd > INT_MAX)
				return fail_usage(
				    PROG, "invalid descriptor '%s'", optarg);
			c->connected_fd = (int)fd;
			break;
		}
		case O_OLDSTYLE:
			c->oldstyle = 1;
			break;
		case O_OVERLAY:
			c->overlay = optarg;
			break;
		case O_EXPORTNAME:
			if (strlen(optarg) > XNBD_MAX_STRING)
				return fail_usage(
				    PROG,
				    "--target-exportname: longer than "
				    "the protocol's %u bytes",
				    XNBD_MAX_STRING);
			c->exportname = optarg;
			break;
		case O_CLEARBITMAP:
			c->clear_bitmap = 1;
			break;
		case O_HELP:
			usage(stdout);
			exit(0);
		case O_VERSION:
			print_version(PROG, XNBD_SERVER_VERSION);
		default: /* one both servers take, or none we know */
			if ((r = serve_option(PROG, o, optarg, argv[optind - 1],
			                      &c->serve)) != 0)
				return r;
			break;
		}
	}
	if (c->mode == MODE_NONE)
		return fail_usage(PROG, "%s",
		                  "a mode is required: --target, "
		                  "--cow-target or --proxy");
	if (c->overlay && c->mode != MODE_COW)
		return fail_usage(PROG, "%s",
		                  "--cow-overlay goes with --cow-target");
	if (c->mode != MODE_PROXY && (c->exportname || c->clear_bitmap))
		return fail_usage(PROG, "%s",
		                  c->exportname
		                      ? "--target-exportname goes with --proxy"
		                      : "--clear-bitmap goes with --proxy");
	if (c->mode == MODE_PROXY) {
		if (optind + 5 != argc)
			return fail_usage(PROG, "%s",
			                  "--proxy takes five arguments: "
			                  "RHOST RPORT CACHE_IMAGE BITMAP "
			                  "CTLSOCK");
		c->rhost = argv[optind];
		c->rport = argv[optind + 1];
		c->cache = argv[optind + 2];
		c->bitmap = argv[optind + 3];
		c->ctlsock = argv[optind + 4];
		c->image = c->cache;
		if (!xnbd_port_valid(c->rport))
			return fail_usage(
			    PROG, "invalid upstream port '%s' (1 to 65535)",
			    c->rport);
		if (!*c->rhost || !*c->cache || !*c->bitmap || !*c->ctlsock)
			return fail_usage(PROG, "%s",
			                  "empty argument to --proxy");
	} else {
		if (optind + 1 != argc)
			return fail_usage(
			    PROG, "%s",
			    optind >= argc
			        ? "the disk image is missing"
			        : "exactly one disk image is expected");
		c->image = argv[optind];
	}
	if (c->inetd && c->connected_fd >= 0)
		return fail_usage(
		    PROG, "%s",
		    "--inetd and --connected-fd exclude each other");
	if ((c->inetd || c->connected_fd >= 0) && c->serve.daemonize)
		return fail_usage(PROG, "%s",
		                  "--daemonize needs a listening server");
	if (c->serve.pidfile && !c->serve.daemonize)
		return fail_usage(PROG, "%s",
		                  "--pidfile goes with --daemonize");
	return 0;
}

/* ---- signals and shutdown ------------------------------------------------ */

/* Let the loop end: the signal handlers stay installed (unreferenced)
 * until finish() removes them. */
static void release_signals(struct app *a)
{
	a->released = 1;
	uv_unref((uv_handle_t *)&a->sig_term);
	uv_unref((uv_handle_t *)&a->sig_int);
	uv_unref((uv_handle_t *)&a->sig_usr1);
	uv_unref((uv_handle_t *)&a->sig_usr2);
}

/* Remove the handlers and ignore those signals from now on: we are exiting,
 * and a late SIGTERM must not kill us with the default action (the exit
 * status would lie). */
static void close_signals(struct app *a)
{
	if (!a->sig_term.data)
		return;
	close_signal(&a->sig_term);
	close_signal(&a->sig_int);
	close_signal(&a->sig_usr1);
	close_signal(&a->sig_usr2);
	a->sig_term.data = NULL;
}

/* Once the server is down and a snapshot it cancelled has ended (its
 * message comes first), say so and let the loop end. */
static void maybe_finish(struct app *a)
{
	if (a->server_done &&
	    !(a->backend && xnbd_backend_snapshot_running(a->backend)) &&
	    !a->released) {
		logsink_printf(XNBD_LOG_INFO, "server stopped");
		release_signals(a);
	}
}

static void on_server_down(struct xnbd_server *s, void *ud)
{
	struct app *a = ud;
	a->server_done = 1;
	/* The control socket goes first (a fill in progress is stopped), then
	 * the proxy syncs its cache and bitmap. */
	xnbd_control_free(a->control);
	a->control = NULL;
	if (a->proxy) {
		/* Lets the upstream go; syncs and frees once its fills stopped. */
		xnbd_proxy_free(a->proxy);
		a->proxy = NULL;
		a->backend = a->image = NULL;
	}
	maybe_finish(a);
}

static void stop(struct app *a)
{
	if (a->stopping)
		return;
	a->stopping = 1;
	xnbd_backend_snapshot_cancel(a->backend);
	xnbd_server_shutdown(a->server, 10000, on_server_down, a);
}

static void on_stop_signal(uv_signal_t *h, int signum)
{
	struct app *a = h->data;
	if (!a->started) {
		/* Starting: stop once started (or give up waiting upstream). */
		a->stop_requested = 1;
		return;
	}
	logsink_printf(XNBD_LOG_INFO,
	               "%s received: stopping after requests in "
	               "flight",
	               strsignal(signum));
	stop(a);
}

static void on_snapshot_done(struct xnbd_backend *b, int status,
                             const char *path, void *ud)
{
	struct app *a = ud;
	if (status == 0)
		logsink_printf(XNBD_LOG_INFO, "snapshot complete: %s", path);
	else if (status == -ECANCELED && a->stopping)
		logsink_printf(XNBD_LOG_INFO,
		               "snapshot %s cancelled by the stop; its partial "
		               "file was removed",
		               path);
	else
		logsink_printf(XNBD_LOG_ERR, "snapshot %s failed: %s", path,
		               xnbd_strerror(status));
	maybe_finish(a);
}

static void on_usr1(uv_signal_t *h, int signum)
{
	struct app *a = h->data;
	if (a->stopping || !a->started)
		return;
	/* IMAGE.snapshot.UNIXTIME; a second one within the same second (or
	 * with that name taken) is IMAGE.snapshot.UNIXTIME.2, then .3, ... */
	char path[PATH_MAX];
	long long now = (long long)time(NULL);
	int r = -EEXIST;
	for (unsigned n = 1; r == -EEXIST && n <= SNAPSHOT_NAMES; n++) {
		int len =
		    n == 1 ? snprintf(path, sizeof(path), "%s.snapshot.%lld",
		                      a->image_abs, now)
		           : snprintf(path, sizeof(path), "%s.snapshot.%lld.%u",
		                      a->image_abs, now, n);
		if (len < 0 || (size_t)len >= sizeof(path)) {
			/* Cut short, it would name another file. */
			logsink_printf(
			    XNBD_LOG_ERR,
			    "cannot take a snapshot: its name (the "
			    "image's path and .snapshot.TIME) would be "
			    "longer than %d bytes",
			    PATH_MAX - 1);
			return;
		}
		r = xnbd_backend_snapshot(a->backend, path, on_snapshot_done,
		                          a);
	}
	if (r == -EBUSY)
		logsink_printf(XNBD_LOG_ERR,
		               "SIGUSR1: a snapshot is being written already; "
		               "no second one was started");
	else if (r < 0)
		logsink_printf(XNBD_LOG_ERR, "cannot take snapshot %s: %s",
		               path, xnbd_strerror(r));
	else
		logsink_printf(XNBD_LOG_INFO, "snapshot started: %s", path);
}

static void on_usr2(uv_signal_t *h, int signum)
{
	struct app *a = h->data;
	if (!a->started)
		return;
	if (!a->proxy) {
		logsink_printf(
		    XNBD_LOG_NOTICE,
		    "SIGUSR2 ignored: only a proxy switches to target mode");
		return;
	}
	int r = xnbd_proxy_switch(a->proxy, 0);
	if (r == -EBUSY)
		logsink_printf(
		    XNBD_LOG_WARNING,
		    "SIGUSR2: not switching to target mode: %llu blocks are "
		    "not cached yet (xnbd-bgctl --cache-all fills the cache; "
		    "xnbd-bgctl --force --switch switches anyway)",
		    (unsigned long long)(xnbd_proxy_blocks(a->proxy) -
		                         xnbd_proxy_cached_blocks(a->proxy)));
	else if (r == -EALREADY)
		logsink_printf(XNBD_LOG_NOTICE,
		               "SIGUSR2: in target mode already");
}

static void on_client_end(struct xnbd_server *s, void *ud)
{
	struct app *a = ud;
	/* A server for one client (inetd, connected fd) ends with it. */
	if ((a->cfg.inetd || a->cfg.connected_fd >= 0) &&
	    xnbd_server_client_count(s) == 0)
		stop(a);
}

/* ---- main -------------------------------------------------------------------- */

/* Release everything (also after a failed start) and return `code`. */
static int finish(struct app *a, int code)
{
	/* After a failed start too: let the loops below end. */
	if (a->loop && a->sig_term.data && !a->released)
		release_signals(a);
	if (a->server && !a->server_done) {
		/* Started but never run: close its handles before freeing. */
		close_server_now(a->loop, a->server);
	}
	xnbd_control_free(a->control);
	a->control = NULL;
	xnbd_server_free(a->server);
	xnbd_export_free(a->export);
	if (a->proxy) {
		/* Waits for the fills' last fetches, then syncs and frees. */
		xnbd_proxy_free(a->proxy);
		a->proxy = NULL;
		a->backend = a->image = NULL;
		uv_run(a->loop, UV_RUN_DEFAULT);
	}
	if (a->backend != a->image)
		xnbd_backend_free(a->backend);
	xnbd_backend_free(a->image);
	if (a->loop) {
		close_signals(a);
		uv_run(a->loop, UV_RUN_NOWAIT);
	}
	if (a->loop && uv_loop_close(a->loop) != 0 && code == 0)
		code = 1;
	free(a->image_abs);
	free(a->cache_abs);
	free(a->bitmap_abs);
	free(a->ctl_abs);
	return code;
}

static void on_proxy_open(struct xnbd_proxy *p, int status, void *ud)
{
	struct app *a = ud;
	a->proxy_opened = status ? status : 1;
}

/* Connect upstream and open the cache and bitmap; the library logs why it
 * failed.  Returns 0 or an exit code. */
static const char *ctl_error(int r)
{
	return r == -EADDRINUSE ? "a running server listens there"
	       : r == -EEXIST   ? "a file that is not a socket is in the way"
	       : r == -ENOENT   ? "its directory does not exist"
	                        : xnbd_strerror(r);
}

/* The control socket's place, checked before the cache image and bitmap
 * are touched: a start refused for its socket must change nothing, and
 * above all must not clear the bitmap (--clear-bitmap) of a server that
 * runs on the same files.  Returns 0, or prints why and returns 1. */
static int check_ctl_place(const char *path, const char *given)
{
	int r = xnbd_control_check_path(path);
	if (r == 0)
		return 0;
	fprintf(stderr, PROG ": cannot open the control socket '%s': %s\n",
	        given, ctl_error(r));
	return 1;
}

/* The client's descriptor (--inetd: 0; --connected-fd N), checked before
 * the server opens anything of its own: a closed number would otherwise
 * be taken by the server's own descriptors (its log, libuv's signal pipe)
 * and served as the client.  Returns 0, or prints why and returns 1. */
static int check_client_fd(int fd, int inetd)
{
	int type;
	socklen_t len = sizeof(type);
	const char *why = NULL;
	if (fcntl(fd, F_GETFD) == -1)
		why = "it is not open";
	else if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0)
		why =
		    errno == ENOTSOCK ? "it is not a socket" : strerror(errno);
	else if (type != SOCK_STREAM)
		why = "it is not a stream socket";
	if (!why)
		return 0;
	if (inetd)
		fprintf(stderr, PROG ": --inetd: standard input: %s\n", why);
	else
		fprintf(stderr, PROG ": --connected-fd %d: %s\n", fd, why);
	return 1;
}

static int open_proxy(struct app *a)
{
	struct config *c = &a->cfg;
	int r = xnbd_proxy_new(a->loop, &a->proxy);
	if (r < 0) {
		fprintf(stderr, PROG ": %s\n", xnbd_strerror(r));
		return 1;
	}
	xnbd_proxy_set_log(a->proxy, logsink_write, NULL);
	unsigned flags = (c->clear_bitmap ? XNBD_PROXY_CLEAR_BITMAP : 0) |
	                 (c->readonly ? XNBD_PROXY_READONLY : 0);
	/* Absolute paths (which may not exist yet): the daemon changes
	 * directory, and the control socket is removed by name at exit. */
	a->cache_abs = abs_path(c->cache);
	a->bitmap_abs = abs_path(c->bitmap);
	a->ctl_abs = abs_path(c->ctlsock);
	if (!a->cache_abs || !a->bitmap_abs || !a->ctl_abs) {
		fprintf(stderr, PROG ": cannot resolve paths: %s\n",
		        strerror(errno));
		return 1;
	}
	if (check_ctl_place(a->ctl_abs, c->ctlsock))
		return 1;
	r = xnbd_proxy_open(a->proxy, c->rhost, c->rport,
	                    c->exportname ? c->exportname : "", a->cache_abs,
	                    a->bitmap_abs, flags, on_proxy_open, a);
	if (r < 0) {
		fprintf(stderr, PROG ": cannot start the proxy: %s\n",
		        xnbd_strerror(r));
		return 1;
	}
	while (!a->proxy_opened && !a->stop_requested &&
	       uv_run(a->loop, UV_RUN_ONCE))
		;
	if (a->stop_requested && a->proxy_opened != 1) {
		logsink_printf(XNBD_LOG_INFO,
		               "stopped while connecting to %s:%s", c->rhost,
		               c->rport);
		return 0x100; /* exit 0, having served nothing */
	}
	if (a->proxy_opened != 1) {
		logsink_printf(XNBD_LOG_ERR, "cannot start the proxy of %s:%s",
		               c->rhost, c->rport);
		return 1;
	}
	a->backend = xnbd_proxy_backend(a->proxy);
	a->image = a->backend;
	if (!(a->image_abs = strdup(a->cache_abs)))
		return 1;
	return 0;
}

static int open_control(struct app *a)
{
	int r = xnbd_control_new(a->loop, &a->control);
	if (r == 0) {
		xnbd_control_set_log(a->control, logsink_write, NULL);
		r = xnbd_control_set_program(a->control,
		                             PROG "/" XNBD_SERVER_VERSION);
	}
	if (r == 0) {
		r = xnbd_proxy_control_add(a->proxy, a->control, a->server);
	}
	if (r == 0)
		r = xnbd_control_listen(a->control, a->ctl_abs);
	if (r < 0) {
		fprintf(stderr,
		        PROG ": cannot open the control socket '%s': %s\n",
		        a->cfg.ctlsock, ctl_error(r));
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct app a = {0};
	int r = parse_args(argc, argv, &a.cfg);
	if (r)
		return r;
	if ((a.cfg.inetd || a.cfg.connected_fd >= 0) &&
	    check_client_fd(a.cfg.inetd ? 0 : a.cfg.connected_fd, a.cfg.inetd))
		return 1;
	struct config *c = &a.cfg;
	const struct serve_opts *s = &c->serve;
	int cow = 0;

	signal(SIGPIPE, SIG_IGN);
	/* Under a file size limit a write past it fails with EFBIG, and the
	 * loop thread, which makes small writes, must not die of it. */
	signal(SIGXFSZ, SIG_IGN);
	raise_fd_limit();

	/* Under inetd, standard error may be the client's socket. */
	int to_syslog = s->use_syslog || (c->inetd && !s->logpath);
	r = logsink_open(PROG, s->logpath, to_syslog, s->verbose);
	if (r < 0) {
		fprintf(stderr, PROG ": cannot open log file '%s': %s\n",
		        s->logpath, strerror(-r));
		return 1;
	}

	a.loop = uv_default_loop();
	/* Signals are handled from the start, so that none is ever left to its
	 * default action while a thread of ours could receive it; a stop during
	 * the start is carried out once started. */
	start_signal(a.loop, &a.sig_term, on_stop_signal, SIGTERM, &a);
	start_signal(a.loop, &a.sig_int, on_stop_signal, SIGINT, &a);
	start_signal(a.loop, &a.sig_usr1, on_usr1, SIGUSR1, &a);
	start_signal(a.loop, &a.sig_usr2, on_usr2, SIGUSR2, &a);
	if (c->mode == MODE_PROXY) {
		r = open_proxy(&a);
		if (r)
			return finish(&a, r == 0x100 ? 0 : r);
		goto export;
	}
	a.image_abs = realpath(c->image, NULL);
	if (!a.image_abs) {
		fprintf(stderr, PROG ": cannot open image '%s': %s\n", c->image,
		        strerror(errno));
		return finish(&a, 1);
	}
	cow = c->mode == MODE_COW;
	r = xnbd_backend_file_open(
	    a.loop, a.image_abs, (c->readonly || cow) ? XNBD_OPEN_READONLY : 0,
	    &a.image);
	if (r < 0) {
		fprintf(stderr, PROG ": cannot open image '%s': %s\n", c->image,
		        r == -EINVAL ? "not a regular file or block device"
		                     : xnbd_strerror(r));
		return finish(&a, 1);
	}
	a.backend = a.image;
	/* A read-only CoW target is the base served read-only: no overlay. */
	if (cow && !c->readonly) {
		struct stat st;
		/* NULL: the library's default place */
		const char *ov = c->overlay;
		unsigned flags = XNBD_COW_TEMPORARY;
		if (ov && !(stat(ov, &st) == 0 && S_ISDIR(st.st_mode)))
			flags = 0; /* a new file to keep */
		r = xnbd_backend_cow_new(a.loop, a.image, ov, flags,
		                         &a.backend);
		/* The overlay's place, named as it is. */
		const char *where = ov ? ov : xnbd_backend_cow_default_dir();
		const char *from =
		    ov ? "" : " (the default place: $TMPDIR, else /var/tmp)";
		if (r == -ENOTDIR && !ov) {
			fprintf(stderr,
			        PROG ": '%s'%s is not a directory for the "
			             "overlay: set TMPDIR or --cow-overlay\n",
			        where, from);
			return finish(&a, 1);
		}
		if (r < 0) {
			fprintf(stderr,
			        PROG
			        ": cannot create the overlay %s '%s'%s: %s\n",
			        flags ? "in" : "file", where, from,
			        xnbd_strerror(r));
			return finish(&a, 1);
		}
	}
	export : if ((r = xnbd_export_new(
	                  "", a.backend, c->readonly ? XNBD_EXPORT_READONLY : 0,
	                  &a.export)) < 0 ||
	             (r = xnbd_export_set_description(a.export, a.image_abs)) <
	                 0 ||
	             (r = xnbd_server_new(a.loop, &a.server)) < 0 ||
	             (r = xnbd_server_add_export(a.server, a.export)) < 0)
	{
		fprintf(stderr, PROG ": %s\n", xnbd_strerror(r));
		return finish(&a, 1);
	}
	xnbd_server_set_log(a.server, logsink_write, NULL);
	xnbd_server_set_flags(a.server,
	                      XNBD_SERVER_ANY_NAME |
	                          (c->oldstyle ? XNBD_SERVER_OLDSTYLE : 0));
	xnbd_server_set_limits(a.server, s->max_queue, s->max_buf);
	xnbd_server_on_client_end(a.server, on_client_end, &a);
	if (a.proxy && (r = open_control(&a)) != 0)
		return finish(&a, r);

	if (c->inetd || c->connected_fd >= 0) {
		int fd = c->inetd ? 0 : c->connected_fd;
		r = xnbd_server_serve_fd(a.server, fd,
		                         c->inetd ? 0 : XNBD_SERVE_NEGOTIATED);
		if (r < 0) {
			logsink_printf(XNBD_LOG_ERR,
			               "cannot serve descriptor %d: %s", fd,
			               xnbd_strerror(r));
			return finish(&a, 1);
		}
	} else if (serve_listen(PROG, a.server, s) < 0) {
		return finish(&a, 1);
	}

	if (s->daemonize &&
	    (r = daemonize(a.loop, s->pidfile, logsink_uses_stderr())) < 0) {
		fprintf(stderr, PROG ": cannot daemonize%s%s%s: %s\n",
		        s->pidfile ? " (pid file " : "",
		        s->pidfile ? s->pidfile : "", s->pidfile ? ")" : "",
		        xnbd_strerror(r));
		return finish(&a, 1);
	}

	a.started = 1;
	if (a.stop_requested)
		stop(&a);

	if (!c->inetd && c->connected_fd < 0)
		logsink_printf(XNBD_LOG_INFO,
		               "serving %s (%llu bytes%s%s) on %s port %s",
		               a.image_abs,
		               (unsigned long long)xnbd_backend_size(a.backend),
		               cow       ? ", copy-on-write"
		               : a.proxy ? ", proxy"
		                         : "",
		               c->readonly ? ", read-only" : "",
		               s->laddr ? s->laddr : "all addresses", s->lport);

	uv_run(a.loop, UV_RUN_DEFAULT);
	if (s->pidfile)
		unlink(s->pidfile);
	return finish(&a, a.exit_code);
}
