/* frontend.h - what the command-line frontends share (see frontend.c). */
#ifndef XNBD_FRONTEND_H
#define XNBD_FRONTEND_H

#include <getopt.h>
#include <stddef.h>
#include <uv.h>

#include <xnbd/xnbd.h>

/* The exit status of every frontend for a usage error. */
#define EXIT_USAGE 2

/* Say "prog: <message>" and where help is on stderr; returns EXIT_USAGE. */
__attribute__((format(printf, 2, 3))) int fail_usage(const char *prog,
                                                     const char *fmt, ...);

/* --version: say ours and the library's on stdout, and exit 0. */
__attribute__((noreturn)) void print_version(const char *prog,
                                             const char *version);

/* A size: digits with an optional K, M or G (powers of 1024). */
int parse_size(const char *s, size_t *out);

/* What the options both servers (xnbd-server, xnbd-wrapper) take say. */
struct serve_opts {
	const char *lport, *laddr;
	const char *logpath, *pidfile;
	int daemonize, use_syslog, verbose;
	size_t max_queue, max_buf;
};

/* Their getopt_long values; a server's own options follow O_SERVE_END. */
enum {
	O_LPORT = 256,
	O_LADDR,
	O_DAEMONIZE,
	O_PIDFILE,
	O_LOGPATH,
	O_SYSLOG,
	O_MAXQ,
	O_MAXBUF,
	O_VERBOSE,
	O_SERVE_END,
};

/* Their entries in a getopt_long table. */
#define SERVE_OPTIONS \
	{"lport", required_argument, NULL, O_LPORT}, \
	    {"laddr", required_argument, NULL, O_LADDR}, \
	    {"daemonize", no_argument, NULL, O_DAEMONIZE}, \
	    {"pidfile", required_argument, NULL, O_PIDFILE}, \
	    {"logpath", required_argument, NULL, O_LOGPATH}, \
	    {"syslog", no_argument, NULL, O_SYSLOG}, \
	    {"max-queue-size", required_argument, NULL, O_MAXQ}, \
	    {"max-buf-size", required_argument, NULL, O_MAXBUF}, \
	{ \
		"verbose", no_argument, NULL, O_VERBOSE \
	}

/* Take option o, one of those, with its argument arg into s; any other
 * is unknown or incomplete (typed is what was typed).  Returns 0, or the
 * exit status of a usage error (said). */
int serve_option(const char *prog, int o, const char *arg, const char *typed,
                 struct serve_opts *s);

/* Listen on s->laddr (all addresses when NULL), port s->lport; says why
 * not on stderr.  Returns 0 or a negative errno. */
int serve_listen(const char *prog, struct xnbd_server *srv,
                 const struct serve_opts *s);

/* The path p made absolute against the working directory (not resolved:
 * it may not exist yet); NULL without memory or working directory. */
char *abs_path(const char *p);

/* Fork; the parent exits 0 once the child is set up.  The child writes
 * its PID to `pidfile` (unless NULL; before leaving the working directory,
 * so a relative name is the caller's), points standard input and output,
 * and standard error unless keep_stderr, at /dev/null, and moves to /.
 * Returns 0 in the child, or a negative errno. */
int daemonize(uv_loop_t *loop, const char *pidfile, int keep_stderr);

/* Handle signum on loop with cb, h->data set to data. */
void start_signal(uv_loop_t *loop, uv_signal_t *h, uv_signal_cb cb, int signum,
                  void *data);

/* Remove h's handler and ignore its signal from now on. */
void close_signal(uv_signal_t *h);

/* Raise the soft limit on open descriptors to the hard limit: each
 * client costs one, or two while its socket is full. */
void raise_fd_limit(void);

/* Shut down a server that was started but never run at once, closing its
 * handles, so that it can be freed. */
void close_server_now(uv_loop_t *loop, struct xnbd_server *s);

#endif
