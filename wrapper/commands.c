/* commands.c - xnbd-wrapper's control commands (doc/control-protocol.md,
 * "Commands of xnbd-wrapper"), and the proxy commands on each proxy's own
 * control socket.  The proxies' replies come from libxnbd
 * (xnbd_proxy_control_run), so they are those of xnbd-server --proxy. */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "logsink.h"
#include "wrapper.h"

static void info_u64(struct xnbd_control_req *r, const char *key, uint64_t v)
{
	char buf[32];
	snprintf(buf, sizeof(buf), "%" PRIu64, v);
	xnbd_control_info(r, key, buf);
}

static const char *state_name(enum wstate s)
{
	return s == W_OPENING   ? "opening"
	       : s == W_SERVING ? "serving"
	                        : "failed";
}

/* Finish with an error whose message is made from a format. */
__attribute__((format(printf, 3, 4))) static void
refuse(struct xnbd_control_req *r, int err, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	char *msg = logsink_vformat(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	xnbd_control_finish(r, err, msg);
	if (msg != buf)
		free(msg);
}

static void refuse_db(struct xnbd_control_req *r, struct wrapper *w, int err,
                      const char *what)
{
	refuse(r, err, "cannot write the export list %s (%s): %s", w->db_abs,
	       strerror(-err), what);
}

/* ---- list ----------------------------------------------------------------------- */

static const char *proxy_state(struct xnbd_proxy *p)
{
	switch (xnbd_proxy_state(p)) {
	case XNBD_PROXY_CONNECTED:
		return "connected";
	case XNBD_PROXY_WAITING:
		return "waiting";
	default:
		return "switched";
	}
}

static void cmd_list(struct xnbd_control_req *r, int argc, char **argv,
                     void *ud)
{
	struct wrapper *w = ud;
	if (argc != 1) {
		xnbd_control_finish(r, -EINVAL, "list takes no arguments");
		return;
	}
	for (struct wexport *e = w->exports; e; e = e->next) {
		int serving = e->state == W_SERVING;
		/* One line that cannot be sent would make the rest lie. */
		int st = xnbd_control_info(r, "export", e->name);
		if (st < 0) {
			xnbd_control_finish(r, st,
			                    "an export's name does not fit a "
			                    "reply line");
			return;
		}
		xnbd_control_info(r, "type",
		                  e->type == W_TARGET ? "target" : "proxy");
		xnbd_control_info(r, "state", state_name(e->state));
		xnbd_control_info(r, "file", e->file);
		xnbd_control_info(r, "readonly",
		                  w->cfg.readonly ? "yes" : "no");
		if (e->type == W_TARGET)
			xnbd_control_info(
			    r, "cow",
			    w->cfg.cow && !w->cfg.readonly ? "yes" : "no");
		if (serving) {
			info_u64(r, "clients",
			         xnbd_export_client_count(e->export));
			struct xnbd_backend *b =
			    e->cow     ? e->cow
			    : e->proxy ? xnbd_proxy_backend(e->proxy)
			               : e->image;
			info_u64(r, "size", xnbd_backend_size(b));
		}
		if (e->type == W_PROXY) {
			struct xnbd_proxy *p = serving ? e->proxy : NULL;
			if (p)
				xnbd_control_info(r, "proxy-state",
				                  proxy_state(p));
			xnbd_control_info(r, "upstream-host",
			                  p ? xnbd_proxy_upstream_host(p)
			                    : e->rhost);
			xnbd_control_info(r, "upstream-port",
			                  p ? xnbd_proxy_upstream_port(p)
			                    : e->rport);
			xnbd_control_info(r, "upstream-export",
			                  p ? xnbd_proxy_upstream_name(p)
			                    : e->rname);
			xnbd_control_info(r, "bitmap", e->bitmap);
			xnbd_control_info(r, "control", e->ctlsock);
		}
		if (e->state == W_FAILED && e->error)
			xnbd_control_info(r, "error", e->error);
	}
	xnbd_control_finish(r, 0, NULL);
}

/* ---- adding ---------------------------------------------------------------------- */

static void cmd_add_target(struct xnbd_control_req *r, int argc, char **argv,
                           void *ud)
{
	struct wrapper *w = ud;
	if (argc != 3) {
		xnbd_control_finish(r, -EINVAL, "usage: add-target NAME FILE");
		return;
	}
	const char *name = argv[1];
	const char *why = wexport_bad_name(name);
	if (why) {
		xnbd_control_finish(r, -EINVAL, why);
		return;
	}
	if (wexport_find(w, name)) {
		refuse(r, -EEXIST, "an export named '%s' exists already", name);
		return;
	}
	char *abs = abs_path(argv[2]);
	char *real = abs ? realpath(abs, NULL) : NULL;
	int err = -errno;
	free(abs);
	if (!real) {
		refuse(r, err, "cannot open image %s: %s", argv[2],
		       strerror(-err));
		return;
	}
	const char *own = wrapper_file(w, real);
	if (own) {
		refuse(r, -EBUSY, "%s is %s", real, own);
		free(real);
		return;
	}
	if (word_len(real) > MAX_WORD) {
		refuse(r, -ENAMETOOLONG, "the path %.64s... is too long", real);
		free(real);
		return;
	}
	/* Two targets may share an image; a proxy's files are its own. */
	struct wexport *u = wexport_using(w, real);
	if (u && u->type == W_PROXY) {
		refuse(r, -EBUSY, "%s is in use by the proxy of export '%s'",
		       real, u->name);
		free(real);
		return;
	}
	struct wexport *e =
	    wexport_new(w, W_TARGET, name, real, NULL, NULL, NULL, NULL, NULL);
	free(real);
	if (!e) {
		xnbd_control_finish(r, -ENOMEM, NULL);
		return;
	}
	err = wexport_open_target(e);
	if (err < 0) {
		xnbd_control_finish(r, err, e->error);
		wexport_discard(e);
		return;
	}
	wexport_append(w, e);
	err = db_sync(w);
	if (err < 0) {
		wexport_remove(e); /* no client can have come yet */
		refuse_db(r, w, err, "the export is not added");
		return;
	}
	logsink_printf(XNBD_LOG_INFO, "export '%s' added: %s%s", e->name,
	               e->file, e->cow ? " (copy-on-write)" : "");
	xnbd_control_finish(r, 0, NULL);
}

static void proxy_added(struct wexport *e, int status)
{
	struct wrapper *w = e->w;
	struct xnbd_control_req *r = e->req;
	e->req = NULL;
	/* Finishing never runs another command (a queued removal of this very
	 * export waits for the loop), but e goes first all the same. */
	if (status < 0) {
		logsink_printf(XNBD_LOG_WARNING, "export '%s' not added: %s",
		               e->name, e->error);
		char *msg = e->error ? strdup(e->error) : NULL;
		wexport_remove(e);
		if (r)
			xnbd_control_finish(r, status, msg);
		free(msg);
		return;
	}
	e->from_request = 0;
	int err = db_sync(w);
	if (err < 0) {
		wexport_remove(e); /* no client can have come yet */
		if (r)
			refuse_db(r, w, err, "the export is not added");
		return;
	}
	logsink_printf(XNBD_LOG_INFO,
	               "export '%s' added: proxy of %s:%s, cache %s", e->name,
	               e->rhost, e->rport, e->file);
	if (r)
		xnbd_control_finish(r, 0, NULL);
}

static void cmd_add_proxy(struct xnbd_control_req *r, int argc, char **argv,
                          void *ud)
{
	struct wrapper *w = ud;
	if (argc != 7 && argc != 8) {
		xnbd_control_finish(r, -EINVAL,
		                    "usage: add-proxy NAME RHOST RPORT "
		                    "CACHE BITMAP CTLSOCK [EXPORTNAME]");
		return;
	}
	const char *name = argv[1];
	const char *why = wexport_bad_name(name);
	if (why) {
		xnbd_control_finish(r, -EINVAL, why);
		return;
	}
	if (wexport_find(w, name)) {
		refuse(r, -EEXIST, "an export named '%s' exists already", name);
		return;
	}
	if (argc == 8 && strlen(argv[7]) > XNBD_MAX_STRING) {
		xnbd_control_finish(r, -EINVAL,
		                    "export names are at most 4096 bytes "
		                    "long");
		return;
	}
	if (!*argv[2] || !xnbd_port_valid(argv[3])) {
		refuse(r, -EINVAL,
		       "invalid upstream '%s' port '%s' (1 to 65535)", argv[2],
		       argv[3]);
		return;
	}
	char *paths[3] = {NULL, NULL, NULL};
	for (int i = 0; i < 3; i++) {
		char *abs = *argv[4 + i] ? abs_path(argv[4 + i]) : NULL;
		/* Canonical, so that two spellings of one file are one file. */
		paths[i] = abs ? canon_path(abs) : NULL;
		free(abs);
		if (!paths[i]) {
			refuse(r, *argv[4 + i] ? -ENOMEM : -EINVAL,
			       "empty path");
			goto out;
		}
		if (word_len(paths[i]) > MAX_WORD) {
			refuse(r, -ENAMETOOLONG,
			       "the path %.64s... is too long", paths[i]);
			goto out;
		}
	}
	/* sockaddr_un's sun_path holds 108 bytes with the final NUL. */
	if (strlen(paths[2]) >= 108) {
		refuse(r, -ENAMETOOLONG,
		       "the control socket path %s is longer than "
		       "a Unix socket address allows (107 bytes)",
		       paths[2]);
		goto out;
	}
	for (int i = 0; i < 3; i++) {
		const char *own = wrapper_file(w, paths[i]);
		if (own) {
			refuse(r, -EBUSY, "%s is %s", paths[i], own);
			goto out;
		}
		struct wexport *u = wexport_using(w, paths[i]);
		if (u) {
			refuse(
			    r, -EBUSY, "%s is in use by export '%s'%s",
			    paths[i], u->name,
			    wexport_find(w, u->name) == u
			        ? ""
			        : " (removed; its clients are still connected)");
			goto out;
		}
	}
	struct wexport *e =
	    wexport_new(w, W_PROXY, name, paths[0], argv[2], argv[3],
	                argc == 8 ? argv[7] : "", paths[1], paths[2]);
	if (!e) {
		xnbd_control_finish(r, -ENOMEM, NULL);
		goto out;
	}
	if (wexport_clash(e, e)) { /* one file, however spelled or linked */
		refuse(r, -EINVAL,
		       "the cache, the bitmap and the control socket "
		       "must be three different files");
		wexport_discard(e);
		goto out;
	}
	/* In the table (the name is taken, `list` shows it opening), not in
	 * the export list file until it is served. */
	e->from_request = 1;
	int err = wexport_open_proxy(e, proxy_added);
	if (err < 0) {
		xnbd_control_finish(r, err, e->error);
		wexport_discard(e);
		goto out;
	}
	e->req = r;
	wexport_append(w, e);
out:
	for (int i = 0; i < 3; i++)
		free(paths[i]);
}

/* ---- removing ------------------------------------------------------------------- */

/* Remove the exports marked `dropping`, once the file no longer lists
 * them; the reply tells each one's clients still being served. */
static void remove_marked(struct xnbd_control_req *r, struct wrapper *w)
{
	int err = db_sync(w);
	if (err < 0) {
		for (struct wexport *e = w->exports; e; e = e->next)
			e->dropping = 0;
		refuse_db(r, w, err, "nothing is removed");
		return;
	}
	struct wexport *e = w->exports, *next;
	for (; e; e = next) {
		next = e->next;
		if (!e->dropping)
			continue;
		char *name = strdup(e->name);
		/* The engine logs the removal of what it serves. */
		if (e->state != W_SERVING)
			logsink_printf(
			    XNBD_LOG_INFO, "export '%s' (%s) removed", e->name,
			    e->state == W_OPENING ? "opening" : "failed");
		size_t clients = wexport_remove(e);
		xnbd_control_info(r, "export", name ? name : "?");
		info_u64(r, "clients", clients);
		free(name);
	}
	xnbd_control_finish(r, 0, NULL);
}

static void cmd_remove_by_exportname(struct xnbd_control_req *r, int argc,
                                     char **argv, void *ud)
{
	struct wrapper *w = ud;
	if (argc != 2) {
		xnbd_control_finish(r, -EINVAL,
		                    "usage: remove-by-exportname NAME");
		return;
	}
	struct wexport *e = wexport_find(w, argv[1]);
	if (!e) {
		refuse(r, -ENOENT, "no export named '%s'", argv[1]);
		return;
	}
	e->dropping = 1;
	remove_marked(r, w);
}

static void cmd_remove_by_file(struct xnbd_control_req *r, int argc,
                               char **argv, void *ud)
{
	struct wrapper *w = ud;
	if (argc != 2) {
		xnbd_control_finish(r, -EINVAL, "usage: remove-by-file FILE");
		return;
	}
	char *abs = abs_path(argv[1]);
	char *real = abs ? realpath(abs, NULL) : NULL;
	int n = 0;
	for (struct wexport *e = w->exports; e; e = e->next) {
		char *ereal = realpath(e->file, NULL);
		if ((abs && strcmp(e->file, abs) == 0) ||
		    (real && (strcmp(e->file, real) == 0 ||
		              (ereal && strcmp(ereal, real) == 0)))) {
			e->dropping = 1;
			n++;
		}
		free(ereal);
	}
	free(abs);
	free(real);
	if (n == 0) {
		refuse(r, -ENOENT, "no export serves the file %s", argv[1]);
		return;
	}
	remove_marked(r, w);
}

/* ---- the proxies' commands --------------------------------------------------------- */

/* Run the proxy command argv[0] (query, cache-all, cache-all2, switch,
 * reconnect) on e's proxy.  `query` starts with the export's own lines:
 * its name and clients, then the wrapper's queue usage. */
static void proxy_command(struct wexport *e, struct xnbd_control_req *r,
                          int argc, char **argv)
{
	struct wrapper *w = e->w;
	if (e->type != W_PROXY) {
		refuse(r, -EINVAL, "export '%s' is a target, not a proxy",
		       e->name);
		return;
	}
	if (e->state != W_SERVING) {
		refuse(r, -EBUSY, "the proxy of export '%s' is not open%s%s",
		       e->name, e->state == W_OPENING ? " yet" : ": ",
		       e->state == W_OPENING ? ""
		       : e->error            ? e->error
		                             : "?");
		return;
	}
	if (strcmp(argv[0], "query") == 0 && argc == 1) {
		size_t q, b, mq, mb;
		xnbd_server_usage(w->srv, &q, &b, &mq, &mb);
		xnbd_control_info(r, "export", e->name);
		info_u64(r, "clients", xnbd_export_client_count(e->export));
		info_u64(r, "queued-requests", q);
		info_u64(r, "max-queue-size", mq);
		info_u64(r, "buffered-bytes", b);
		info_u64(r, "max-buf-size", mb);
	}
	xnbd_proxy_control_run(e->proxy, NULL, r, argc, argv);
	/* A switched proxy is listed as a target on its cache from now on. */
	if (strcmp(argv[0], "switch") == 0)
		db_sync(w);
}

static void cmd_bgctl(struct xnbd_control_req *r, int argc, char **argv,
                      void *ud)
{
	struct wrapper *w = ud;
	static const struct {
		const char *cmd, *proxy_cmd, *usage;
		int min, max;
	} map[] = {
	    {"bgctl-query", "query", "bgctl-query NAME", 2, 2},
	    {"bgctl-cache-all", "cache-all", "bgctl-cache-all NAME", 2, 2},
	    {"bgctl-cache-all2", "cache-all2", "bgctl-cache-all2 NAME", 2, 2},
	    {"bgctl-switch", "switch", "bgctl-switch NAME [force]", 2, 3},
	    {"bgctl-reconnect", "reconnect",
	     "bgctl-reconnect NAME HOST PORT [EXPORTNAME]", 4, 5},
	};
	size_t i = 0;
	while (strcmp(map[i].cmd, argv[0]) != 0)
		i++;
	if (argc < map[i].min || argc > map[i].max) {
		refuse(r, -EINVAL, "usage: %s", map[i].usage);
		return;
	}
	struct wexport *e = wexport_find(w, argv[1]);
	if (!e) {
		refuse(r, -ENOENT, "no export named '%s'", argv[1]);
		return;
	}
	/* The proxy's command line: its name, then the arguments after NAME. */
	char *pv[5];
	int pc = 0;
	pv[pc++] = (char *)map[i].proxy_cmd;
	for (int k = 2; k < argc; k++)
		pv[pc++] = argv[k];
	proxy_command(e, r, pc, pv);
}

static void cmd_shutdown(struct xnbd_control_req *r, int argc, char **argv,
                         void *ud)
{
	struct wrapper *w = ud;
	if (argc != 1) {
		xnbd_control_finish(r, -EINVAL, "shutdown takes no arguments");
		return;
	}
	logsink_printf(XNBD_LOG_INFO,
	               "shutdown requested on the control socket: "
	               "stopping after requests in flight");
	xnbd_control_finish(r, 0, NULL);
	wrapper_stop(w);
}

int commands_add(struct wrapper *w)
{
	static const struct {
		const char *name;
		xnbd_control_handler fn;
	} cmds[] = {
	    {"list", cmd_list},
	    {"add-target", cmd_add_target},
	    {"add-proxy", cmd_add_proxy},
	    {"remove-by-exportname", cmd_remove_by_exportname},
	    {"remove-by-file", cmd_remove_by_file},
	    {"bgctl-query", cmd_bgctl},
	    {"bgctl-cache-all", cmd_bgctl},
	    {"bgctl-cache-all2", cmd_bgctl},
	    {"bgctl-switch", cmd_bgctl},
	    {"bgctl-reconnect", cmd_bgctl},
	    {"shutdown", cmd_shutdown},
	};
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		int r = xnbd_control_add(w->ctl, cmds[i].name, cmds[i].fn, w);
		if (r < 0)
			return r;
	}
	return 0;
}

static void cmd_proxy(struct xnbd_control_req *r, int argc, char **argv,
                      void *ud)
{
	proxy_command(ud, r, argc, argv);
}

int commands_add_proxy(struct wexport *e)
{
	static const char *const cmds[] = {"query", "cache-all", "cache-all2",
	                                   "switch", "reconnect"};
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		int r = xnbd_control_add(e->pctl, cmds[i], cmd_proxy, e);
		if (r < 0)
			return r;
	}
	return 0;
}
