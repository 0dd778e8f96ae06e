/* proxy_control.c - the proxy's commands on a control server.
 *
 * The commands and their reply keys are documented in
 * doc/control-protocol.md; this file only translates between them and
 * xnbd/proxy.h.  Messages for refusals say what to do next, since they are
 * what an operator reads from xnbd-bgctl in the middle of a migration.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "xnbd/client.h"
#include "xnbd/control.h"
#include "xnbd/proxy.h"
#include "xnbd/server.h"

#include "backend.h"

struct pctl {
	struct xnbd_proxy *p;
	struct xnbd_server *srv;
};

static void info_u64(struct xnbd_control_req *r, const char *key, uint64_t v)
{
	char buf[32];
	snprintf(buf, sizeof(buf), "%" PRIu64, v);
	xnbd_control_info(r, key, buf);
}

static const char *state_name(int st)
{
	switch (st) {
	case XNBD_PROXY_CONNECTED:
		return "connected";
	case XNBD_PROXY_WAITING:
		return "waiting";
	default:
		return "switched";
	}
}

static void cmd_query(struct xnbd_control_req *r, int argc, char **argv,
                      void *ud)
{
	struct pctl *c = ud;
	struct xnbd_proxy *p = c->p;
	(void)argv;
	if (argc != 1) {
		xnbd_control_finish(r, -EINVAL, "query takes no arguments");
		return;
	}
	uint64_t blocks = xnbd_proxy_blocks(p),
	         cached = xnbd_proxy_cached_blocks(p);
	xnbd_control_info(r, "mode", "proxy");
	xnbd_control_info(r, "state", state_name(xnbd_proxy_state(p)));
	xnbd_control_info(r, "cache", xnbd_proxy_cache_path(p));
	xnbd_control_info(r, "bitmap", xnbd_proxy_bitmap_path(p));
	info_u64(r, "size", xnbd_backend_size(xnbd_proxy_backend(p)));
	info_u64(r, "block-size", XNBD_PROXY_BLOCK);
	info_u64(r, "blocks", blocks);
	info_u64(r, "cached-blocks", cached);
	char pct[32];
	/* Never 100.00 before the last block is in. */
	double f = blocks ? (double)cached * 100.0 / (double)blocks : 100.0;
	if (cached < blocks && f > 99.99)
		f = 99.99;
	snprintf(pct, sizeof(pct), "%.2f", f);
	xnbd_control_info(r, "cached-percent", pct);
	xnbd_control_info(r, "upstream-host", xnbd_proxy_upstream_host(p));
	xnbd_control_info(r, "upstream-port", xnbd_proxy_upstream_port(p));
	xnbd_control_info(r, "upstream-export", xnbd_proxy_upstream_name(p));
	info_u64(r, "waiting-requests", xnbd_proxy_waiting(p));
	uint64_t lat, win = xnbd_proxy_fetch_window(p, &lat);
	info_u64(r, "fetch-window", win == UINT64_MAX ? 0 : win);
	info_u64(r, "upstream-latency-us", lat / 1000);
	if (c->srv) {
		size_t q, b, mq, mb;
		xnbd_server_usage(c->srv, &q, &b, &mq, &mb);
		info_u64(r, "clients", xnbd_server_client_count(c->srv));
		info_u64(r, "queued-requests", q);
		info_u64(r, "max-queue-size", mq);
		info_u64(r, "buffered-bytes", b);
		info_u64(r, "max-buf-size", mb);
	}
	xnbd_control_finish(r, 0, NULL);
}

/* ---- cache-all ---------------------------------------------------------- */

struct fill {
	struct xnbd_control_req *r;
	struct xnbd_proxy_job *job;
};

static void fill_progress(struct xnbd_proxy *p, uint64_t cached, uint64_t total,
                          void *ud)
{
	struct fill *f = ud;
	(void)p;
	xnbd_control_progress(f->r, cached, total);
}

static void fill_done(struct xnbd_proxy *p, int status, void *ud)
{
	struct fill *f = ud;
	(void)p;
	char msg[160];
	const char *m = NULL;
	if (status == -EALREADY)
		m = "the proxy switched to target mode; nothing left to fetch";
	else if (status == -ECANCELED)
		m = "the fill was stopped";
	else if (status) {
		snprintf(msg, sizeof(msg),
		         "fetching from the upstream failed: %s",
		         strerror(-status));
		m = msg;
	}
	xnbd_control_finish(f->r, status, m);
	free(f);
}

static void fill_gone(struct xnbd_control_req *r, void *ud)
{
	struct fill *f = ud;
	(void)r;
	xnbd_proxy_job_cancel(f->job);
}

static void start_fill(struct xnbd_control_req *r, int argc, void *ud,
                       unsigned flags)
{
	struct pctl *c = ud;
	if (argc != 1) {
		xnbd_control_finish(r, -EINVAL, "cache-all takes no arguments");
		return;
	}
	struct fill *f = calloc(1, sizeof(*f));
	if (!f) {
		xnbd_control_finish(r, -ENOMEM, NULL);
		return;
	}
	f->r = r;
	int st = xnbd_proxy_cache_all(c->p, flags, fill_progress, fill_done, f,
	                              &f->job);
	if (st < 0) {
		free(f);
		xnbd_control_finish(r, st,
		                    st == -EALREADY
		                        ? "the proxy is in target mode already"
		                        : NULL);
		return;
	}
	xnbd_control_on_gone(r, fill_gone, f);
}

static void cmd_cache_all(struct xnbd_control_req *r, int argc, char **argv,
                          void *ud)
{
	(void)argv;
	start_fill(r, argc, ud, 0);
}

static void cmd_cache_all2(struct xnbd_control_req *r, int argc, char **argv,
                           void *ud)
{
	(void)argv;
	start_fill(r, argc, ud, XNBD_PROXY_OWN_CONNECTION);
}

/* ---- switch --------------------------------------------------------------- */

static void cmd_switch(struct xnbd_control_req *r, int argc, char **argv,
                       void *ud)
{
	struct pctl *c = ud;
	int force = 0;
	if (argc == 2 && strcmp(argv[1], "force") == 0)
		force = 1;
	else if (argc != 1) {
		xnbd_control_finish(r, -EINVAL, "usage: switch [force]");
		return;
	}
	int st = xnbd_proxy_switch(c->p, force);
	if (st == -EBUSY) {
		char msg[200];
		uint64_t missing =
		    xnbd_proxy_blocks(c->p) - xnbd_proxy_cached_blocks(c->p);
		snprintf(
		    msg, sizeof(msg),
		    "%" PRIu64
		    " blocks are not cached yet: fill the cache first "
		    "(cache-all), or force the switch and they read as zeroes",
		    missing);
		xnbd_control_finish(r, st, msg);
		return;
	}
	xnbd_control_finish(
	    r, st,
	    st == -EALREADY ? "the proxy is in target mode already" : NULL);
}

/* ---- reconnect ------------------------------------------------------------ */

static void reconnected(struct xnbd_proxy *p, int status, void *ud)
{
	struct xnbd_control_req *r = ud;
	char msg[200];
	const char *m = NULL;
	if (status == -EINVAL) {
		m = "the export there has another size than this proxy's image";
	} else if (status == -EALREADY) {
		m = "the proxy switched to target mode meanwhile";
	} else if (status) {
		snprintf(msg, sizeof(msg), "cannot connect: %s",
		         strerror(-status));
		m = msg;
	}
	(void)p;
	xnbd_control_finish(r, status, m);
}

static void cmd_reconnect(struct xnbd_control_req *r, int argc, char **argv,
                          void *ud)
{
	struct pctl *c = ud;
	if (argc != 3 && argc != 4) {
		xnbd_control_finish(r, -EINVAL,
		                    "usage: reconnect HOST PORT [EXPORT]");
		return;
	}
	if (!xnbd_port_valid(argv[2])) {
		xnbd_control_finish(r, -EINVAL, "invalid port (1 to 65535)");
		return;
	}
	int st = xnbd_proxy_reconnect(c->p, argv[1], argv[2],
	                              argc == 4 ? argv[3] : "", reconnected, r);
	if (st < 0)
		xnbd_control_finish(
		    r, st,
		    st == -EALREADY ? "the proxy is in target mode "
		                      "already: no upstream to use"
		    : st == -EBUSY  ? "another reconnect is under way"
		                    : NULL);
}

static const struct {
	const char *name;
	xnbd_control_handler fn;
} cmds[] = {
    {"query", cmd_query},           {"cache-all", cmd_cache_all},
    {"cache-all2", cmd_cache_all2}, {"switch", cmd_switch},
    {"reconnect", cmd_reconnect},
};

/* The handlers use their struct pctl only while they run (what they start
 * keeps the request, never the pctl), so a program routing commands itself
 * passes one on the stack. */
void xnbd_proxy_control_run(struct xnbd_proxy *p, struct xnbd_server *srv,
                            struct xnbd_control_req *req, int argc, char **argv)
{
	struct pctl c = {p, srv};
	for (size_t i = 0; argc >= 1 && i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(argv[0], cmds[i].name) == 0) {
			cmds[i].fn(req, argc, argv, &c);
			return;
		}
	xnbd_control_finish(req, -ENOSYS, "not a command of the proxy");
}

int xnbd_proxy_control_add(struct xnbd_proxy *p, struct xnbd_control *ctl,
                           struct xnbd_server *srv)
{
	/* The commands' state lives in the proxy, freed with it. */
	_Static_assert(sizeof(struct pctl) <=
	                   sizeof(struct xnbd__proxy_ctl_area),
	               "room for the control state");
	struct pctl *c = (struct pctl *)xnbd__proxy_ctl_area(p);
	c->p = p;
	c->srv = srv;
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		int r = xnbd_control_add(ctl, cmds[i].name, cmds[i].fn, c);
		if (r < 0)
			return r;
	}
	return 0;
}
