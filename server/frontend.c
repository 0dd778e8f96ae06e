/* frontend.c - what the command-line frontends share: usage errors and
 * --version, option values and the options both servers take, paths, the
 * daemon, signals.  Every binary links this file (as the servers link
 * logsink.c); it uses no logsink, so that the control tools, which log
 * nothing, can link it too. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "frontend.h"

int fail_usage(const char *prog, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "%s: ", prog);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nTry '%s --help'.\n", prog);
	return EXIT_USAGE;
}

void print_version(const char *prog, const char *version)
{
	printf("%s %s (libxnbd %s)\n", prog, version, xnbd_version());
	exit(0);
}

int parse_size(const char *s, size_t *out)
{
	uint64_t v;
	if (xnbd_parse_size(s, &v) < 0 || v > SIZE_MAX)
		return -1;
	*out = (size_t)v;
	return 0;
}

int serve_option(const char *prog, int o, const char *arg, const char *typed,
                 struct serve_opts *s)
{
	switch (o) {
	case O_LPORT:
		if (!xnbd_port_valid(arg))
			return fail_usage(
			    prog, "invalid port '%s' (1 to 65535)", arg);
		s->lport = arg;
		break;
	case O_LADDR:
		/* An empty address (an unset shell variable) must not turn into
		 * "every address". */
		if (!*arg)
			return fail_usage(
			    prog, "%s",
			    "empty --laddr (leave the option out to "
			    "listen on every address)");
		s->laddr = arg;
		break;
	case O_DAEMONIZE:
		s->daemonize = 1;
		break;
	case O_PIDFILE:
		s->pidfile = arg;
		break;
	case O_LOGPATH:
		s->logpath = arg;
		break;
	case O_SYSLOG:
		s->use_syslog = 1;
		break;
	case O_MAXQ:
		if (parse_size(arg, &s->max_queue))
			return fail_usage(prog, "invalid queue size '%s'", arg);
		break;
	case O_MAXBUF:
		if (parse_size(arg, &s->max_buf))
			return fail_usage(prog, "invalid buffer size '%s'",
			                  arg);
		break;
	case O_VERBOSE:
		s->verbose = 1;
		break;
	default:
		return fail_usage(prog, "unknown or incomplete option '%s'",
		                  typed);
	}
	return 0;
}

int serve_listen(const char *prog, struct xnbd_server *srv,
                 const struct serve_opts *s)
{
	int r = xnbd_server_listen(srv, s->laddr, s->lport);
	if (r < 0)
		fprintf(stderr, "%s: cannot listen on %s port %s: %s\n", prog,
		        s->laddr ? s->laddr : "all addresses", s->lport,
		        r == -ENOENT && s->laddr ? "no such local address"
		                                 : xnbd_strerror(r));
	return r;
}

/* getcwd(NULL, 0): the working directory at its own length, whatever
 * PATH_MAX says. */
char *abs_path(const char *p)
{
	if (p[0] == '/')
		return strdup(p);
	char *cwd = getcwd(NULL, 0);
	if (!cwd)
		return NULL;
	size_t n = strlen(cwd) + strlen(p) + 2;
	char *r = malloc(n);
	if (r)
		snprintf(r, n, "%s/%s", cwd, p);
	free(cwd);
	return r;
}

int daemonize(uv_loop_t *loop, const char *pidfile, int keep_stderr)
{
	int p[2];
	if (pipe(p))
		return -errno;
	pid_t pid = fork();
	if (pid < 0)
		return -errno;
	if (pid > 0) {
		char c;
		close(p[1]);
		ssize_t n = read(p[0], &c, 1);
		_exit(n == 1 ? 0 : 1);
	}
	close(p[0]);
	setsid();
	int r = uv_loop_fork(loop);
	if (r < 0)
		return r;
	if (pidfile) {
		FILE *f = fopen(pidfile, "we");
		if (!f)
			return -errno;
		fprintf(f, "%d\n", (int)getpid());
		if (fclose(f))
			return -errno;
	}
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0);
		dup2(null, 1);
		if (!keep_stderr)
			dup2(null, 2);
		if (null > 2)
			close(null);
	}
	if (chdir("/"))
		return -errno;
	(void)!write(p[1], "r", 1);
	close(p[1]);
	return 0;
}

void start_signal(uv_loop_t *loop, uv_signal_t *h, uv_signal_cb cb, int signum,
                  void *data)
{
	uv_signal_init(loop, h);
	h->data = data;
	uv_signal_start(h, cb, signum);
}

/* We are exiting, and a late SIGTERM must not kill us with the default
 * action (the exit status would lie).  Closing the handle gives the signal
 * back its default action, so it is ignored right after. */
void close_signal(uv_signal_t *h)
{
	int signum = h->signum; /* the handle forgets it when closed */
	uv_close((uv_handle_t *)h, NULL);
	if (signum > 0)
		signal(signum, SIG_IGN);
}

static void on_server_down_now(struct xnbd_server *s, void *ud)
{
	*(int *)ud = 1;
}

void close_server_now(uv_loop_t *loop, struct xnbd_server *s)
{
	int down = 0;
	if (xnbd_server_shutdown(s, 0, on_server_down_now, &down) == 0)
		while (!down && uv_run(loop, UV_RUN_ONCE))
			;
}

void raise_fd_limit(void)
{
	struct rlimit rl;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
}
