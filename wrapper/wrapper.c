/* wrapper.c - xnbd-wrapper: one listener serving many images by export
 * name, steered at run time through a control socket (xnbd-wrapper-ctl).
 * This file is the command line, start-up, daemon and signal glue; the
 * export table is exports.c, the commands commands.c, the export list
 * file db.c. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "logsink.h"
#include "wrapper.h"

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "Usage: " PROG " [options] [--imgfile FILE]...\n"
	    "\n"
	    "Serve many disk images on one port; clients choose one by export name.\n"
	    "Exports are added, removed and steered at run time with\n"
	    "xnbd-wrapper-ctl(8) through the control socket.\n"
	    "\n"
	    "Options:\n"
	    "  --imgfile FILE        export FILE under its path as given (repeatable)\n"
	    "  --cow                 serve targets copy-on-write: writes go to an\n"
	    "                        overlay per export that vanishes with the wrapper\n"
	    "  --readonly            serve every export read-only (advertised to clients)\n"
	    "  --lport PORT          TCP port to listen on (default 8520)\n"
	    "  --laddr ADDRESS       address to listen on (default: all, IPv6 and IPv4)\n"
	    "  --socket PATH         control socket (default " DEFAULT_CTL_SOCKET
	    ")\n"
	    "  --dbpath FILE         keep the export list in FILE across restarts\n"
	    "  --daemonize           run in the background\n"
	    "  --pidfile FILE        with --daemonize, write the daemon's PID to FILE\n"
	    "  --logpath FILE        append messages to FILE instead of standard error\n"
	    "  --syslog              send messages to syslog\n"
	    "  --max-queue-size N    stop reading requests while N are queued (0: no bound)\n"
	    "  --max-buf-size BYTES  stop reading requests while BYTES are buffered (0: no bound)\n"
	    "  --verbose             log debug messages too\n"
	    "  --help                show this help and exit\n"
	    "  --version             show the version and exit\n"
	    "\n"
	    "SIGTERM and SIGINT stop after answering requests in flight.\n"
	    "See xnbd-wrapper(8).\n");
}

static int parse_args(int argc, char **argv, struct wconfig *c)
{
	enum {
		O_IMGFILE = O_SERVE_END,
		O_COW,
		O_READONLY,
		O_SOCKET,
		O_DBPATH,
		O_HELP,
		O_VERSION,
	};
	static const struct option opts[] = {
	    {"imgfile", required_argument, NULL, O_IMGFILE},
	    {"cow", no_argument, NULL, O_COW},
	    {"readonly", no_argument, NULL, O_READONLY},
	    {"socket", required_argument, NULL, O_SOCKET},
	    {"dbpath", required_argument, NULL, O_DBPATH},
	    SERVE_OPTIONS,
	    {"help", no_argument, NULL, O_HELP},
	    {"version", no_argument, NULL, O_VERSION},
	    {NULL, 0, NULL, 0},
	};
	int o, r;
	c->serve.lport = "8520";
	c->socket = DEFAULT_CTL_SOCKET;
	opterr = 0;
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (o) {
		case O_IMGFILE: {
			const char **n = realloc(
			    c->imgfiles, (c->nimgfiles + 1) * sizeof(*n));
			if (!n) {
				fprintf(stderr, PROG ": out of memory\n");
				return 1;
			}
			c->imgfiles = n;
			c->imgfiles[c->nimgfiles++] = optarg;
			break;
		}
		case O_COW:
			c->cow = 1;
			break;
		case O_READONLY:
			c->readonly = 1;
			break;
		case O_SOCKET:
			if (!*optarg)
				return fail_usage(PROG, "%s",
				                  "empty --socket path");
			c->socket = optarg;
			break;
		case O_DBPATH:
			if (!*optarg)
				return fail_usage(PROG, "%s", "empty --dbpath");
			c->dbpath = optarg;
			break;
		case O_HELP:
			usage(stdout);
			exit(0);
		case O_VERSION:
			print_version(PROG, XNBD_WRAPPER_VERSION);
		default: /* one both servers take, or none we know */
			if ((r = serve_option(PROG, o, optarg, argv[optind - 1],
			                      &c->serve)) != 0)
				return r;
			break;
		}
	}
	if (optind != argc)
		return fail_usage(PROG,
		                  "unexpected argument '%s' (images are given "
		                  "with --imgfile)",
		                  argv[optind]);
	if (c->serve.pidfile && !c->serve.daemonize)
		return fail_usage(PROG, "%s",
		                  "--pidfile goes with --daemonize");
	return 0;
}

/* ---- stopping ------------------------------------------------------------------ */

/* Free the control socket, the exports and the server, and close the
 * timers: after the server's shutdown, or a start that failed. */
static void free_all(struct wrapper *w)
{
	/* The export list records a reconnect or a switch made during the
	 * stop's grace period (not after a failed start: the file stays as it
	 * was).  An add-proxy still waiting for its upstream is answered while
	 * its connection is open; then the control sockets go (fills in
	 * progress stop), then the exports: proxies sync their caches and
	 * bitmaps as they go. */
	if (w->running)
		db_sync(w);
	for (struct wexport *e = w->exports; e; e = e->next)
		if (e->req) {
			xnbd_control_finish(e->req, -ESHUTDOWN,
			                    "the wrapper is stopping");
			e->req = NULL;
		}
	xnbd_control_free(w->ctl);
	w->ctl = NULL;
	while (w->exports) {
		struct wexport *e = w->exports;
		w->exports = e->next;
		wexport_free_at_exit(e);
	}
	xnbd_server_free(w->srv);
	w->srv = NULL;
	uv_close((uv_handle_t *)&w->tick, NULL);
	/* The reaper closes once it has freed what it holds. */
	reaper_flush_and_close(w);
}

static void on_server_down(struct xnbd_server *s, void *ud)
{
	struct wrapper *w = ud;
	logsink_printf(XNBD_LOG_INFO, "server stopped");
	/* The signal handlers stay until the very end (see signals_close). */
	uv_unref((uv_handle_t *)&w->sig_term);
	uv_unref((uv_handle_t *)&w->sig_int);
	free_all(w);
}

void wrapper_stop(struct wrapper *w)
{
	if (!w->running) {
		w->stop_pending = 1; /* main() stops once started */
		return;
	}
	if (w->stopping)
		return;
	w->stopping = 1;
	uv_timer_stop(&w->tick);
	/* A switch or a reconnect since the last tick reaches the file. */
	db_sync(w);
	xnbd_server_shutdown(w->srv, 10000, on_server_down, w);
}

static void on_stop_signal(uv_signal_t *h, int signum)
{
	struct wrapper *w = h->data;
	logsink_printf(XNBD_LOG_INFO,
	               "%s received: stopping after requests in "
	               "flight",
	               strsignal(signum));
	wrapper_stop(w);
}

static void on_tick(uv_timer_t *t)
{
	struct wrapper *w = t->data;
	wexport_retry(w);
	db_sync(w);
}

/* ---- start-up --------------------------------------------------------------------- */

static int check_table(struct wrapper *w);

/* The table from the export list file, then --imgfile exports (one that
 * the file has already, same name and same file, is the same export);
 * nothing is opened yet.  Returns 0 or an exit code. */
static int load_table(struct wrapper *w)
{
	struct dbent *ents = NULL;
	size_t n = 0;
	char err[1024];
	if (w->db_abs && db_load(w->db_abs, &ents, &n, err, sizeof(err)) < 0) {
		fprintf(stderr,
		        PROG
		        ": cannot use the export list %s\n" PROG
		        ": move it away or repair it; nothing was served\n",
		        err);
		return 1;
	}
	int code = 0;
	for (size_t i = 0; i < n; i++) {
		struct dbent *d = &ents[i];
		struct wexport *e =
		    wexport_new(w, d->type, d->name, d->file, d->rhost,
		                d->rport, d->rname, d->bitmap, d->ctlsock);
		if (!e) {
			code = 1;
			break;
		}
		wexport_append(w, e);
	}
	db_free(ents, n);
	if (code) {
		fprintf(stderr, PROG ": out of memory\n");
		return code;
	}
	for (size_t i = 0; i < w->cfg.nimgfiles; i++) {
		const char *name = w->cfg.imgfiles[i];
		char *real = realpath(name, NULL);
		if (!real) {
			fprintf(stderr, PROG ": cannot open image '%s': %s\n",
			        name, strerror(errno));
			return 1;
		}
		struct wexport *e = wexport_find(w, name);
		if (e && (e->type != W_TARGET || strcmp(e->file, real) != 0)) {
			fprintf(stderr,
			        PROG
			        ": --imgfile %s: the export list %s has an "
			        "export of that name for %s\n",
			        name, w->db_abs,
			        e->type == W_TARGET ? e->file : "a proxy");
			free(real);
			return 1;
		}
		if (!e) {
			e = wexport_new(w, W_TARGET, name, real, NULL, NULL,
			                NULL, NULL, NULL);
			if (!e) {
				free(real);
				fprintf(stderr, PROG ": out of memory\n");
				return 1;
			}
			e->from_imgfile = 1;
			wexport_append(w, e);
		}
		free(real);
	}
	return check_table(w);
}

/* The table may be served: names are valid, no export uses a file of
 * the wrapper's or a file another export may not share.  Returns 0 or an
 * exit code, after a message. */
static int check_table(struct wrapper *w)
{
	size_t n = 0;
	for (struct wexport *e = w->exports; e; e = e->next)
		n++;
	/* Each path looked up once: a list of hundreds stays quick. */
	struct fileid(*ids)[3] = calloc(n ? n : 1, sizeof(*ids));
	if (!ids) {
		fprintf(stderr, PROG ": out of memory\n");
		return 1;
	}
	size_t k = 0;
	for (struct wexport *e = w->exports; e; e = e->next)
		wexport_ids(e, ids[k++]);
	int code = 0;
	size_t ei = 0;
	for (struct wexport *e = w->exports; e && !code; e = e->next, ei++) {
		const char *origin =
		    e->from_imgfile ? "--imgfile" : "the export list";
		const char *why = wexport_bad_name(e->name);
		if (why) {
			fprintf(stderr, PROG ": %s: export '%s': %s\n", origin,
			        e->name, why);
			code = 1;
			break;
		}
		const char *v[] = {e->file, e->bitmap, e->ctlsock};
		for (int i = 0; i < 3 && !code; i++) {
			if (v[i] && word_len(v[i]) > MAX_WORD) {
				fprintf(
				    stderr,
				    PROG
				    ": %s: export '%s': the path %.64s... is "
				    "too long\n",
				    origin, e->name, v[i]);
				code = 1;
				break;
			}
			const char *what = v[i] ? wrapper_file(w, v[i]) : NULL;
			if (what) {
				fprintf(stderr,
				        PROG ": %s: export '%s' uses %s, %s\n",
				        origin, e->name, v[i], what);
				code = 1;
			}
		}
		size_t oi = 0;
		for (struct wexport *o = w->exports; o && !code;
		     o = o->next, oi++) {
			const char *path =
			    wexport_clash_ids(e, ids[ei], o, ids[oi]);
			if (path && o == e) {
				fprintf(
				    stderr,
				    PROG
				    ": %s: the proxy of export '%s' uses %s "
				    "twice\n",
				    origin, e->name, path);
				code = 1;
			} else if (path) {
				fprintf(
				    stderr,
				    PROG
				    ": %s: exports '%s' and '%s' both use %s; "
				    "a proxy's cache, bitmap and control socket are its "
				    "own\n",
				    origin, e->name, o->name, path);
				code = 1;
			}
			if (o == e)
				break; /* each pair once */
		}
	}
	for (size_t i = 0; i < n; i++)
		for (int j = 0; j < 3; j++)
			fileid_free(&ids[i][j]);
	free(ids);
	return code;
}

/* A proxy of the table is open, or has failed, at start or later. */
static void start_done(struct wexport *e, int status)
{
	if (status < 0)
		logsink_printf(XNBD_LOG_ERR,
		               "export '%s' is not served: %s; trying "
		               "again every %d s",
		               e->name, e->error, RETRY_MS / 1000);
	else if (e->w->running)
		logsink_printf(XNBD_LOG_NOTICE,
		               "export '%s' is served: its upstream "
		               "answered",
		               e->name);
}

static void start_wait_cb(uv_timer_t *t)
{
	(void)t; /* its end is the point */
}

/* Open the table and wait for the proxies.  A command-line image that
 * cannot be served stops the start (returns 1).  An export of the list
 * file that cannot be opened stays listed and is tried again later: one
 * missing image or upstream must not stop the others. */
static int open_table(struct wrapper *w)
{
	for (size_t i = 0; i < w->cfg.nimgfiles; i++) {
		struct wexport *e = wexport_find(w, w->cfg.imgfiles[i]);
		if (e->state != W_SERVING && wexport_open_target(e) < 0) {
			fprintf(stderr, PROG ": %s\n", e->error);
			return 1;
		}
	}
	for (struct wexport *e = w->exports; e; e = e->next) {
		if (e->state == W_SERVING)
			continue;
		if (e->type == W_TARGET) {
			if (wexport_open_target(e) < 0)
				start_done(e, -1);
		} else if (wexport_open_proxy(e, start_done) < 0) {
			start_done(e, -1);
		}
	}
	/* Clients that come at once find the proxies whose upstreams answer
	 * soon; one that does not (a host down, a server that never speaks)
	 * must not keep the others from being served, nor a stop waiting. */
	uv_timer_t *wait = &w->start_wait;
	uv_update_time(w->loop); /* the checks above may have taken a while */
	uv_timer_init(w->loop, wait);
	uv_timer_start(wait, start_wait_cb, START_WAIT_MS, 0);
	for (;;) {
		int opening = 0;
		for (struct wexport *e = w->exports; e; e = e->next)
			opening |= e->state == W_OPENING;
		if (!opening || w->stop_pending ||
		    !uv_is_active((uv_handle_t *)wait))
			break;
		uv_run(w->loop, UV_RUN_ONCE);
	}
	for (struct wexport *e = w->exports; e; e = e->next)
		if (e->state == W_OPENING && !w->stop_pending)
			logsink_printf(
			    XNBD_LOG_WARNING,
			    "export '%s': no answer from its "
			    "upstream %s:%s yet; it is served once there is",
			    e->name, e->rhost, e->rport);
	uv_close((uv_handle_t *)wait, NULL);
	return 0;
}

static int open_control(struct wrapper *w)
{
	int r = xnbd_control_new(w->loop, &w->ctl);
	if (r == 0) {
		xnbd_control_set_log(w->ctl, logsink_write, NULL);
		r = xnbd_control_set_program(w->ctl,
		                             PROG "/" XNBD_WRAPPER_VERSION);
	}
	if (r == 0)
		r = commands_add(w);
	if (r == 0)
		r = xnbd_control_listen(w->ctl, w->socket_abs);
	if (r < 0) {
		fprintf(
		    stderr, PROG ": cannot open the control socket '%s': %s\n",
		    w->cfg.socket,
		    r == -EADDRINUSE ? "a running wrapper listens there"
		    : r == -EEXIST ? "a file that is not a socket is in the way"
		                   : xnbd_strerror(r));
		return 1;
	}
	return 0;
}

/* Remove the signal handlers and ignore those signals from now on: we are
 * exiting, and a late SIGTERM must not kill us with the default action
 * (the exit status would lie). */
static void signals_close(struct wrapper *w)
{
	if (!w->loop || w->signals_closed || !w->sig_term.data)
		return;
	w->signals_closed = 1;
	close_signal(&w->sig_term);
	close_signal(&w->sig_int);
	uv_run(w->loop, UV_RUN_NOWAIT);
}

static int cleanup(struct wrapper *w, int code)
{
	signals_close(w);
	if (w->loop && uv_loop_close(w->loop) != 0 && code == 0)
		code = 1;
	free(w->socket_abs);
	free(w->db_abs);
	free(w->db_tmp_abs);
	free(w->pidfile_abs);
	free(w->log_abs);
	free(w->db_saved);
	free(w->reap);
	free(w->cfg.imgfiles);
	return code;
}

/* Release everything after a failed start and return `code`. */
static int fail_start(struct wrapper *w, int code)
{
	close_server_now(w->loop, w->srv);
	free_all(w);
	signals_close(w);
	uv_run(w->loop, UV_RUN_DEFAULT);
	return cleanup(w, code);
}

int main(int argc, char **argv)
{
	struct wrapper w = {0};
	int r = parse_args(argc, argv, &w.cfg);
	if (r)
		return cleanup(&w, r);
	struct wconfig *c = &w.cfg;
	const struct serve_opts *s = &c->serve;

	signal(SIGPIPE, SIG_IGN);
	/* Under a file size limit a write past it fails with EFBIG, and the
	 * loop thread, which makes small writes, must not die of it. */
	signal(SIGXFSZ, SIG_IGN);
	raise_fd_limit();
	/* The daemon changes directory, and the files are named again later. */
	w.socket_abs = abs_path(c->socket);
	w.db_abs = c->dbpath ? abs_path(c->dbpath) : NULL;
	w.pidfile_abs = s->pidfile ? abs_path(s->pidfile) : NULL;
	w.log_abs = s->logpath ? abs_path(s->logpath) : NULL;
	if (w.db_abs && asprintf(&w.db_tmp_abs, "%s.tmp", w.db_abs) < 0)
		w.db_tmp_abs = NULL;
	if (!w.socket_abs || (c->dbpath && (!w.db_abs || !w.db_tmp_abs)) ||
	    (s->pidfile && !w.pidfile_abs) || (s->logpath && !w.log_abs)) {
		fprintf(stderr, PROG ": cannot resolve paths: %s\n",
		        strerror(errno));
		return cleanup(&w, 1);
	}
	w.loop = uv_default_loop();
	uv_timer_init(w.loop, &w.tick);
	uv_timer_init(w.loop, &w.reaper);
	w.tick.data = w.reaper.data = &w;
	/* Stop signals are handled from the start (a stop during the start is
	 * carried out once started), and never left to their default action
	 * while a thread of ours could receive them. */
	start_signal(w.loop, &w.sig_term, on_stop_signal, SIGTERM, &w);
	start_signal(w.loop, &w.sig_int, on_stop_signal, SIGINT, &w);
	if ((r = xnbd_server_new(w.loop, &w.srv)) < 0) {
		fprintf(stderr, PROG ": %s\n", xnbd_strerror(r));
		uv_close((uv_handle_t *)&w.tick, NULL);
		uv_close((uv_handle_t *)&w.reaper, NULL);
		signals_close(&w);
		uv_run(w.loop, UV_RUN_DEFAULT);
		return cleanup(&w, 1);
	}
	xnbd_server_set_log(w.srv, logsink_write, NULL);
	xnbd_server_set_limits(w.srv, s->max_queue, s->max_buf);

	/* The control socket before any image, cache or bitmap is opened: it
	 * tells whether a wrapper runs already. */
	if ((r = load_table(&w)) != 0)
		return fail_start(&w, r);
	/* The log file once the table is known not to name it. */
	r = logsink_open(PROG, s->logpath, s->use_syslog, s->verbose);
	if (r < 0) {
		fprintf(stderr, PROG ": cannot open log file '%s': %s\n",
		        s->logpath, strerror(-r));
		return fail_start(&w, 1);
	}
	if ((r = open_control(&w)) != 0 || (r = open_table(&w)) != 0)
		return fail_start(&w, r);
	if (serve_listen(PROG, w.srv, s) < 0)
		return fail_start(&w, 1);
	/* The file now holds what is served, --imgfile exports included. */
	if ((r = db_sync(&w)) < 0) {
		fprintf(stderr, PROG ": cannot write the export list %s: %s\n",
		        w.db_abs, strerror(-r));
		return fail_start(&w, 1);
	}
	if (s->daemonize &&
	    (r = daemonize(w.loop, w.pidfile_abs, logsink_uses_stderr())) < 0) {
		fprintf(stderr, PROG ": cannot daemonize%s%s%s: %s\n",
		        w.pidfile_abs ? " (pid file " : "",
		        w.pidfile_abs ? w.pidfile_abs : "",
		        w.pidfile_abs ? ")" : "", xnbd_strerror(r));
		return fail_start(&w, 1);
	}
	uv_timer_start(&w.tick, on_tick, TICK_MS, TICK_MS);
	w.running = 1;
	if (w.stop_pending)
		wrapper_stop(&w);

	size_t n = 0, ok = 0;
	for (struct wexport *e = w.exports; e; e = e->next, n++)
		ok += e->state == W_SERVING;
	logsink_printf(XNBD_LOG_INFO,
	               "serving %zu of %zu export(s)%s%s on %s "
	               "port %s; control socket %s",
	               ok, n, c->cow ? ", copy-on-write" : "",
	               c->readonly ? ", read-only" : "",
	               s->laddr ? s->laddr : "all addresses", s->lport,
	               w.socket_abs);

	uv_run(w.loop, UV_RUN_DEFAULT);
	if (w.pidfile_abs)
		unlink(w.pidfile_abs);
	return cleanup(&w, w.exit_code);
}
