/* main.c - xnbd-bgctl: control a running xnbd-server --proxy through its
 * control socket (the protocol is in doc/control-protocol.md; the client
 * is libxnbd's xnbd_ctl_*).
 *
 * Exit status: 0 when the server did what was asked, 1 when it refused or
 * failed (its message on standard error), 2 for a usage error. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xnbd/xnbd.h>

#include "ctlout.h"
#include "frontend.h"

#define PROG "xnbd-bgctl"

enum cmd { C_NONE, C_QUERY, C_CACHE_ALL, C_CACHE_ALL2, C_SWITCH, C_RECONNECT };

struct opts {
	enum cmd cmd;
	const char *cmd_name;
	int json, progress, force;
	const char *exportname;
	const char *sock, *rhost, *rport;
};

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "Usage: " PROG " --query [--json] CTLSOCK\n"
	    "       " PROG " [--progress] --cache-all CTLSOCK\n"
	    "       " PROG " [--progress] --cache-all2 CTLSOCK\n"
	    "       " PROG " [--force] --switch CTLSOCK\n"
	    "       " PROG
	    " [--exportname NAME] --reconnect CTLSOCK RHOST RPORT\n"
	    "\n"
	    "Control a running xnbd-server --proxy through its control socket CTLSOCK.\n"
	    "\n"
	    "  --query        show the cache state: paths, size, upstream, cached blocks,\n"
	    "                 queue usage (--json: one JSON object, for scripts)\n"
	    "  --cache-all    fetch every block not cached yet; returns when all are\n"
	    "                 (--progress: a progress bar on a terminal, lines otherwise)\n"
	    "  --cache-all2   the same over a connection of its own to the upstream\n"
	    "  --switch       become a plain target on the cache image, clients kept;\n"
	    "                 refused while blocks are missing unless --force (they then\n"
	    "                 read as zeroes)\n"
	    "  --shutdown     the same as --switch (old name)\n"
	    "  --reconnect    use the upstream at RHOST RPORT (export NAME) from now on;\n"
	    "                 requests waiting for the lost upstream are served from it\n"
	    "  --help, --version\n"
	    "\n"
	    "Exit status: 0 done, 1 refused or failed, 2 usage error.  See xnbd-bgctl(1).\n");
}

static int set_cmd(struct opts *o, enum cmd c, const char *name)
{
	if (o->cmd != C_NONE && (o->cmd != c || strcmp(o->cmd_name, name)))
		return fail_usage(PROG, "%s",
		                  "give one command: --query, --cache-all, "
		                  "--cache-all2, --switch or --reconnect");
	o->cmd = c;
	o->cmd_name = name;
	return 0;
}

static int parse(int argc, char **argv, struct opts *o)
{
	enum {
		O_QUERY = 256,
		O_CACHE_ALL,
		O_CACHE_ALL2,
		O_SWITCH,
		O_SHUTDOWN,
		O_RECONNECT,
		O_JSON,
		O_PROGRESS,
		O_FORCE,
		O_EXPORTNAME,
		O_HELP,
		O_VERSION,
	};
	static const struct option lo[] = {
	    {"query", no_argument, NULL, O_QUERY},
	    {"cache-all", no_argument, NULL, O_CACHE_ALL},
	    {"cache-all2", no_argument, NULL, O_CACHE_ALL2},
	    {"switch", no_argument, NULL, O_SWITCH},
	    {"shutdown", no_argument, NULL, O_SHUTDOWN},
	    {"reconnect", no_argument, NULL, O_RECONNECT},
	    {"json", no_argument, NULL, O_JSON},
	    {"progress", no_argument, NULL, O_PROGRESS},
	    {"force", no_argument, NULL, O_FORCE},
	    {"exportname", required_argument, NULL, O_EXPORTNAME},
	    {"help", no_argument, NULL, O_HELP},
	    {"version", no_argument, NULL, O_VERSION},
	    {NULL, 0, NULL, 0},
	};
	int c, r;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case O_QUERY:
			r = set_cmd(o, C_QUERY, "--query");
			break;
		case O_CACHE_ALL:
			r = set_cmd(o, C_CACHE_ALL, "--cache-all");
			break;
		case O_CACHE_ALL2:
			r = set_cmd(o, C_CACHE_ALL2, "--cache-all2");
			break;
		case O_SWITCH:
			r = set_cmd(o, C_SWITCH, "--switch");
			break;
		case O_SHUTDOWN:
			r = set_cmd(o, C_SWITCH, "--shutdown");
			break;
		case O_RECONNECT:
			r = set_cmd(o, C_RECONNECT, "--reconnect");
			break;
		case O_JSON:
			o->json = 1;
			r = 0;
			break;
		case O_PROGRESS:
			o->progress = 1;
			r = 0;
			break;
		case O_FORCE:
			o->force = 1;
			r = 0;
			break;
		case O_EXPORTNAME:
			if (strlen(optarg) > XNBD_MAX_STRING)
				return fail_usage(
				    PROG,
				    "--exportname: longer than the "
				    "protocol's %u bytes",
				    XNBD_MAX_STRING);
			o->exportname = optarg;
			r = 0;
			break;
		case O_HELP:
			usage(stdout);
			exit(0);
		case O_VERSION:
			print_version(PROG, XNBD_BGCTL_VERSION);
		default:
			return fail_usage(PROG,
			                  "unknown or incomplete option '%s'",
			                  argv[optind - 1]);
		}
		if (r)
			return r;
	}
	if (o->cmd == C_NONE)
		return fail_usage(PROG, "%s",
		                  "a command is required: --query, "
		                  "--cache-all, --cache-all2, --switch or "
		                  "--reconnect");
	int want = o->cmd == C_RECONNECT ? 3 : 1;
	if (argc - optind != want)
		return fail_usage(PROG, "%s %s", o->cmd_name,
		                  want == 3 ? "takes CTLSOCK RHOST RPORT"
		                            : "takes one argument, CTLSOCK");
	o->sock = argv[optind];
	if (o->cmd == C_RECONNECT) {
		o->rhost = argv[optind + 1];
		o->rport = argv[optind + 2];
		if (!*o->rhost)
			return fail_usage(PROG, "%s", "empty RHOST");
		if (!xnbd_port_valid(o->rport))
			return fail_usage(
			    PROG, "invalid RPORT '%s' (1 to 65535)", o->rport);
	}
	if (o->json && o->cmd != C_QUERY)
		return fail_usage(PROG, "%s", "--json goes with --query");
	if (o->progress && o->cmd != C_CACHE_ALL && o->cmd != C_CACHE_ALL2)
		return fail_usage(PROG, "%s",
		                  "--progress goes with --cache-all");
	if (o->force && o->cmd != C_SWITCH)
		return fail_usage(PROG, "%s", "--force goes with --switch");
	if (o->exportname && o->cmd != C_RECONNECT)
		return fail_usage(PROG, "%s",
		                  "--exportname goes with --reconnect");
	return 0;
}

/* ---- query ---------------------------------------------------------------- */

/* The value of key in the reply, or NULL. */
static const char *get(const struct kvs *k, const char *key)
{
	return kvs_field(k, 0, k->n, key);
}

static void human_size(char *buf, size_t n, const char *bytes)
{
	double v = bytes ? strtod(bytes, NULL) : 0;
	const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
	int i = 0;
	while (v >= 1024 && i < 5) {
		v /= 1024;
		i++;
	}
	snprintf(buf, n, "%.1f %s", v, u[i]);
}

static void print_human(const struct kvs *k)
{
	char hs[32];
	human_size(hs, sizeof(hs), get(k, "size"));
	printf("mode:              %s (%s)\n", or_dash(get(k, "mode")),
	       or_dash(get(k, "state")));
	printf("cache image:       %s\n", or_dash(get(k, "cache")));
	printf("bitmap:            %s\n", or_dash(get(k, "bitmap")));
	printf("disk size:         %s bytes (%s)\n", or_dash(get(k, "size")),
	       hs);
	printf("upstream:          %s port %s, export \"%s\"\n",
	       or_dash(get(k, "upstream-host")),
	       or_dash(get(k, "upstream-port")),
	       get(k, "upstream-export") ? get(k, "upstream-export") : "");
	printf("cached blocks:     %s / %s (%s%%), blocks of %s bytes\n",
	       or_dash(get(k, "cached-blocks")), or_dash(get(k, "blocks")),
	       or_dash(get(k, "cached-percent")),
	       or_dash(get(k, "block-size")));
	printf("waiting requests:  %s\n", or_dash(get(k, "waiting-requests")));
	const char *fw = get(k, "fetch-window"),
	           *ul = get(k, "upstream-latency-us");
	if (fw) {
		char ws[32];
		human_size(ws, sizeof(ws), fw);
		printf("fetch window:      %s\n",
		       strcmp(fw, "0") ? ws : "unbounded");
	}
	if (ul && strcmp(ul, "0"))
		printf("upstream latency:  %s us (a large fetch's least)\n",
		       ul);
	else if (ul)
		printf("upstream latency:  not measured yet\n");
	if (get(k, "queued-requests")) {
		const char *mq = get(k, "max-queue-size"),
		           *mb = get(k, "max-buf-size");
		printf("clients:           %s\n", or_dash(get(k, "clients")));
		printf("queued requests:   %s / %s\n",
		       get(k, "queued-requests"),
		       mq && strcmp(mq, "0") ? mq : "unbounded");
		printf("buffered bytes:    %s / %s\n",
		       or_dash(get(k, "buffered-bytes")),
		       mb && strcmp(mb, "0") ? mb : "unbounded");
	}
	/* Keys this version does not know, as they came. */
	static const char *const known[] = {
	    "mode",
	    "state",
	    "cache",
	    "bitmap",
	    "size",
	    "block-size",
	    "blocks",
	    "cached-blocks",
	    "cached-percent",
	    "upstream-host",
	    "upstream-port",
	    "upstream-export",
	    "waiting-requests",
	    "fetch-window",
	    "upstream-latency-us",
	    "clients",
	    "queued-requests",
	    "max-queue-size",
	    "buffered-bytes",
	    "max-buf-size",
	};
	for (size_t i = 0; i < k->n; i++) {
		size_t j = 0;
		while (j < sizeof(known) / sizeof(known[0]) &&
		       strcmp(known[j], k->v[i].key))
			j++;
		if (j == sizeof(known) / sizeof(known[0]))
			printf("%-18s %s\n", k->v[i].key, k->v[i].value);
	}
}

/* ---- main ------------------------------------------------------------------ */

static const struct ctl_peer peer = {PROG, "the proxy", "server"};

int main(int argc, char **argv)
{
	struct opts o = {0};
	int r = parse(argc, argv, &o);
	if (r)
		return r;
	struct xnbd_ctl *c;
	r = xnbd_ctl_open(o.sock, &c);
	if (r < 0) {
		ctl_open_failed(&peer, o.sock, r);
		return 1;
	}
	const char *av[5];
	int ac = 0;
	struct kvs k = {0};
	struct prog pg = {0};
	xnbd_ctl_line_cb cb = NULL;
	void *ud = NULL;
	switch (o.cmd) {
	case C_QUERY:
		av[ac++] = "query";
		cb = kvs_collect;
		ud = &k;
		break;
	case C_CACHE_ALL:
	case C_CACHE_ALL2:
		av[ac++] = o.cmd == C_CACHE_ALL ? "cache-all" : "cache-all2";
		pg.enabled = o.progress;
		pg.tty = isatty(STDOUT_FILENO);
		pg.bar = 1;
		cb = on_progress;
		ud = &pg;
		break;
	case C_SWITCH:
		av[ac++] = "switch";
		if (o.force)
			av[ac++] = "force";
		break;
	case C_RECONNECT:
		av[ac++] = "reconnect";
		av[ac++] = o.rhost;
		av[ac++] = o.rport;
		av[ac++] = o.exportname ? o.exportname : "";
		break;
	default:
		break;
	}
	char *msg = NULL;
	r = xnbd_ctl_call(c, ac, av, cb, ud, &msg);
	xnbd_ctl_close(c);
	if (pg.drawn)
		printf("\n");
	if (r == 0 && o.cmd == C_QUERY) {
		if (o.json) {
			json_object(&k, 0, k.n);
			printf("\n");
		} else {
			print_human(&k);
		}
	}
	kvs_free(&k);
	if (r < 0) {
		ctl_call_failed(&peer, o.cmd_name, r, msg);
		free(msg);
		return 1;
	}
	free(msg);
	if (o.cmd == C_SWITCH)
		printf("switched to target mode\n");
	else if (o.cmd == C_RECONNECT)
		printf("connected to %s port %s\n", o.rhost, o.rport);
	else if (o.cmd == C_CACHE_ALL || o.cmd == C_CACHE_ALL2)
		printf("every block is cached\n");
	return 0;
}
