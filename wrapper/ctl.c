/* ctl.c - xnbd-wrapper-ctl: list, add, remove and steer the exports of a
 * running xnbd-wrapper through its control socket (the commands are in
 * doc/control-protocol.md, "Commands of xnbd-wrapper"; the client is
 * libxnbd's xnbd_ctl_*).
 *
 * Exit status: 0 when the wrapper did what was asked, 1 when it refused or
 * failed (its message on standard error), 2 for a usage error. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xnbd/xnbd.h>

#include "ctlout.h"
#include "frontend.h"

#define PROG "xnbd-wrapper-ctl"
#define DEFAULT_CTL_SOCKET "/tmp/xnbd_wrapper.ctl" /* as xnbd-wrapper's */

enum cmd {
	C_NONE,
	C_LIST,
	C_ADD_TARGET,
	C_ADD_PROXY,
	C_RM_FILE,
	C_RM_NAME,
	C_QUERY,
	C_SWITCH,
	C_CACHE_ALL,
	C_CACHE_ALL2,
	C_RECONNECT,
	C_SHUTDOWN,
};

/* Each command: its option, its word on the control socket, the number of
 * arguments it takes, and which of them are paths (bits, made absolute
 * here: the wrapper may run in another directory). */
static const struct {
	enum cmd cmd;
	const char *option, *word;
	int nargs;
	unsigned paths;
} commands[] = {
    {C_LIST, "list", "list", 0, 0},
    {C_ADD_TARGET, "add-target", "add-target", 2, 1U << 1},
    {C_ADD_PROXY, "add-proxy", "add-proxy", 6, 7U << 3},
    {C_RM_FILE, "remove-by-file", "remove-by-file", 1, 1U << 0},
    {C_RM_NAME, "remove-by-exportname", "remove-by-exportname", 1, 0},
    {C_QUERY, "bgctl-query", "bgctl-query", 1, 0},
    {C_SWITCH, "bgctl-switch", "bgctl-switch", 1, 0},
    {C_CACHE_ALL, "bgctl-cache-all", "bgctl-cache-all", 1, 0},
    {C_CACHE_ALL2, "bgctl-cache-all2", "bgctl-cache-all2", 1, 0},
    {C_RECONNECT, "bgctl-reconnect", "bgctl-reconnect", 3, 0},
    {C_SHUTDOWN, "shutdown", "shutdown", 0, 0},
};
#define NCOMMANDS (sizeof(commands) / sizeof(commands[0]))

struct opts {
	int ci; /* index in commands[], or -1 */
	const char *sock, *exportname;
	int json, force, progress;
	char **args;
};

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "Usage: " PROG " [--socket PATH] COMMAND\n"
	    "\n"
	    "Steer a running xnbd-wrapper through its control socket (default\n" DEFAULT_CTL_SOCKET
	    ").  Commands:\n"
	    "\n"
	    "  --list [--json]                         the exports and their state\n"
	    "  --add-target NAME FILE                  serve the image FILE as NAME\n"
	    "  [--target-exportname N] --add-proxy NAME RHOST RPORT CACHE BITMAP CTLSOCK\n"
	    "                                          serve the NBD export N at RHOST:RPORT\n"
	    "                                          as NAME through a caching proxy\n"
	    "  --remove-by-file FILE                   remove the exports of FILE\n"
	    "  --remove-by-exportname NAME             remove the export NAME\n"
	    "  --bgctl-query [--json] NAME             the cache state of proxy NAME\n"
	    "  [--progress] --bgctl-cache-all NAME     fetch every block proxy NAME lacks\n"
	    "  [--progress] --bgctl-cache-all2 NAME    the same over its own connection\n"
	    "  [--force] --bgctl-switch NAME           make proxy NAME a target on its cache\n"
	    "  [--target-exportname N] --bgctl-reconnect NAME RHOST RPORT\n"
	    "                                          point proxy NAME at another upstream\n"
	    "  --shutdown                              stop the wrapper gracefully\n"
	    "  --help, --version\n"
	    "\n"
	    "Removed exports' clients are served until they disconnect.\n"
	    "Exit status: 0 done, 1 refused or failed, 2 usage error.\n"
	    "See xnbd-wrapper-ctl(8).\n");
}

static int parse(int argc, char **argv, struct opts *o)
{
	enum {
		O_SOCKET = 256,
		O_JSON,
		O_FORCE,
		O_PROGRESS,
		O_EXPORTNAME,
		O_HELP,
		O_VERSION,
		O_CMD, /* O_CMD + i: commands[i] */
	};
	struct option lo[NCOMMANDS + 8];
	size_t n = 0;
	lo[n++] = (struct option){"socket", required_argument, NULL, O_SOCKET};
	lo[n++] = (struct option){"json", no_argument, NULL, O_JSON};
	lo[n++] = (struct option){"force", no_argument, NULL, O_FORCE};
	lo[n++] = (struct option){"progress", no_argument, NULL, O_PROGRESS};
	lo[n++] = (struct option){"target-exportname", required_argument, NULL,
	                          O_EXPORTNAME};
	lo[n++] = (struct option){"help", no_argument, NULL, O_HELP};
	lo[n++] = (struct option){"version", no_argument, NULL, O_VERSION};
	for (size_t i = 0; i < NCOMMANDS; i++)
		lo[n++] = (struct option){commands[i].option, no_argument, NULL,
		                          O_CMD + (int)i};
	lo[n] = (struct option){NULL, 0, NULL, 0};
	o->ci = -1;
	o->sock = DEFAULT_CTL_SOCKET;
	opterr = 0;
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case O_SOCKET:
			o->sock = optarg;
			break;
		case O_JSON:
			o->json = 1;
			break;
		case O_FORCE:
			o->force = 1;
			break;
		case O_PROGRESS:
			o->progress = 1;
			break;
		case O_EXPORTNAME:
			o->exportname = optarg;
			break;
		case O_HELP:
			usage(stdout);
			exit(0);
		case O_VERSION:
			print_version(PROG, XNBD_WRAPPER_VERSION);
		default:
			if (c >= O_CMD && c < O_CMD + (int)NCOMMANDS) {
				if (o->ci >= 0 && o->ci != c - O_CMD)
					return fail_usage(PROG, "%s",
					                  "give one command");
				o->ci = c - O_CMD;
				break;
			}
			return fail_usage(PROG,
			                  "unknown or incomplete option '%s'",
			                  argv[optind - 1]);
		}
	}
	if (o->ci < 0)
		return fail_usage(PROG, "%s",
		                  "a command is required, such as --list");
	enum cmd cmd = commands[o->ci].cmd;
	int want = commands[o->ci].nargs;
	if (argc - optind != want)
		return fail_usage(PROG, "--%s takes %d argument%s, not %d",
		                  commands[o->ci].option, want,
		                  want == 1 ? "" : "s", argc - optind);
	o->args = argv + optind;
	if (o->json && cmd != C_LIST && cmd != C_QUERY)
		return fail_usage(PROG, "%s",
		                  "--json goes with --list or --bgctl-query");
	if (o->force && cmd != C_SWITCH)
		return fail_usage(PROG, "%s",
		                  "--force goes with --bgctl-switch");
	if (o->progress && cmd != C_CACHE_ALL && cmd != C_CACHE_ALL2)
		return fail_usage(PROG, "%s",
		                  "--progress goes with --bgctl-cache-all");
	if (o->exportname && cmd != C_ADD_PROXY && cmd != C_RECONNECT)
		return fail_usage(PROG, "%s",
		                  "--target-exportname goes with "
		                  "--add-proxy or --bgctl-reconnect");
	return 0;
}

/* ---- replies -------------------------------------------------------------- */

/* `list`: each export is a group of lines starting with `export`. */
static void print_list(const struct kvs *k, int json)
{
	size_t *starts = malloc((k->n + 1) * sizeof(*starts)), n = 0;
	if (!starts) {
		fprintf(stderr, PROG ": out of memory\n");
		return;
	}
	for (size_t i = 0; i < k->n; i++)
		if (strcmp(k->v[i].key, "export") == 0)
			starts[n++] = i;
	starts[n] = k->n;
	if (json) {
		printf("[");
		for (size_t e = 0; e < n; e++) {
			printf(e ? ",\n " : "");
			json_object(k, starts[e], starts[e + 1]);
		}
		printf("]\n");
		free(starts);
		return;
	}
	if (n == 0) {
		printf("no exports\n");
		free(starts);
		return;
	}
	int wname = 6;
	for (size_t e = 0; e < n; e++) {
		int l = (int)strlen(k->v[starts[e]].value);
		if (l > wname)
			wname = l < 40 ? l : 40;
	}
	printf("%-*s  %-6s  %-7s  %7s  %s\n", wname, "EXPORT", "TYPE", "STATE",
	       "CLIENTS", "FILE");
	for (size_t e = 0; e < n; e++) {
		size_t a = starts[e], b = starts[e + 1];
		const char *type = or_dash(kvs_field(k, a, b, "type"));
		const char *cow = kvs_field(k, a, b, "cow");
		const char *ro = kvs_field(k, a, b, "readonly");
		printf("%-*s  %-6s  %-7s  %7s  %s%s%s\n", wname, k->v[a].value,
		       type, or_dash(kvs_field(k, a, b, "state")),
		       or_dash(kvs_field(k, a, b, "clients")),
		       or_dash(kvs_field(k, a, b, "file")),
		       cow && strcmp(cow, "yes") == 0 ? " (copy-on-write)" : "",
		       ro && strcmp(ro, "yes") == 0 ? " (read-only)" : "");
		if (strcmp(type, "proxy") == 0) {
			const char *ps = kvs_field(k, a, b, "proxy-state");
			printf(
			    "%*s  proxy of %s port %s export \"%s\"%s%s%s, bitmap %s, "
			    "control %s\n",
			    wname, "",
			    or_dash(kvs_field(k, a, b, "upstream-host")),
			    or_dash(kvs_field(k, a, b, "upstream-port")),
			    kvs_field(k, a, b, "upstream-export")
			        ? kvs_field(k, a, b, "upstream-export")
			        : "",
			    ps ? " (" : "", ps ? ps : "", ps ? ")" : "",
			    or_dash(kvs_field(k, a, b, "bitmap")),
			    or_dash(kvs_field(k, a, b, "control")));
		}
		if (kvs_field(k, a, b, "error"))
			printf("%*s  error: %s\n", wname, "",
			       kvs_field(k, a, b, "error"));
	}
	free(starts);
}

static void print_pairs(const struct kvs *k, int json)
{
	if (json) {
		json_object(k, 0, k->n);
		printf("\n");
		return;
	}
	for (size_t i = 0; i < k->n; i++)
		printf("%-18s %s\n", k->v[i].key, k->v[i].value);
}

/* ---- main ------------------------------------------------------------------------ */

static const struct ctl_peer peer = {PROG, "xnbd-wrapper", "wrapper"};

int main(int argc, char **argv)
{
	struct opts o = {0};
	int r = parse(argc, argv, &o);
	if (r)
		return r;
	enum cmd cmd = commands[o.ci].cmd;
	char name[32]; /* the command as typed, for messages */
	snprintf(name, sizeof(name), "--%s", commands[o.ci].option);

	/* The request: the command word, its arguments, then the options that
	 * become arguments. */
	const char *av[12];
	char *owned[8] = {NULL};
	int ac = 0, no = 0;
	av[ac++] = commands[o.ci].word;
	for (int i = 0; i < commands[o.ci].nargs; i++) {
		/* An absolute path for a relative one (which may not exist): the
		 * wrapper resolves relative paths against its own directory, not
		 * ours.  An empty one goes as it is, for the wrapper to refuse. */
		if ((commands[o.ci].paths & (1U << i)) && *o.args[i]) {
			char *a = abs_path(o.args[i]);
			if (!a) {
				fprintf(stderr, PROG ": %s\n", strerror(errno));
				return 1;
			}
			owned[no++] = a;
			av[ac++] = a;
		} else {
			av[ac++] = o.args[i];
		}
	}
	if (cmd == C_SWITCH && o.force)
		av[ac++] = "force";
	if ((cmd == C_ADD_PROXY || cmd == C_RECONNECT) && o.exportname)
		av[ac++] = o.exportname;

	struct xnbd_ctl *c;
	r = xnbd_ctl_open(o.sock, &c);
	if (r < 0) {
		ctl_open_failed(&peer, o.sock, r);
		for (int i = 0; i < no; i++)
			free(owned[i]);
		return 1;
	}
	struct kvs k = {0};
	struct prog pg = {0};
	xnbd_ctl_line_cb cb = kvs_collect;
	void *ud = &k;
	if (cmd == C_CACHE_ALL || cmd == C_CACHE_ALL2) {
		pg.enabled = o.progress;
		pg.tty = isatty(STDOUT_FILENO);
		cb = on_progress;
		ud = &pg;
	}
	char *msg = NULL;
	r = xnbd_ctl_call(c, ac, av, cb, ud, &msg);
	xnbd_ctl_close(c);
	for (int i = 0; i < no; i++)
		free(owned[i]);
	if (pg.drawn)
		printf("\n");
	if (r == 0 && k.oom)
		r = -ENOMEM;
	if (r < 0) {
		ctl_call_failed(&peer, name, r, msg);
		free(msg);
		kvs_free(&k);
		return 1;
	}
	switch (cmd) {
	case C_LIST:
		print_list(&k, o.json);
		break;
	case C_QUERY:
		print_pairs(&k, o.json);
		break;
	case C_ADD_TARGET:
	case C_ADD_PROXY:
		printf("added export '%s'\n", o.args[0]);
		break;
	case C_RM_FILE:
	case C_RM_NAME:
		for (size_t i = 0; i + 1 < k.n; i += 2)
			printf(
			    "removed export '%s'; %s client(s) served until they "
			    "disconnect\n",
			    k.v[i].value, k.v[i + 1].value);
		break;
	case C_SWITCH:
		printf("switched to target mode\n");
		break;
	case C_CACHE_ALL:
	case C_CACHE_ALL2:
		printf("every block is cached\n");
		break;
	case C_RECONNECT:
		printf("connected to %s port %s\n", o.args[1], o.args[2]);
		break;
	case C_SHUTDOWN:
		printf("the wrapper is stopping\n");
		break;
	default:
		break;
	}
	free(msg);
	kvs_free(&k);
	return 0;
}
