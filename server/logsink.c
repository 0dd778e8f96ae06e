/* logsink.c - where the frontends' messages go: stderr, a file, or syslog.
 * Shared by every binary of the project (each links this file). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "logsink.h"

static const char *prog = "xnbd";
static FILE *logfile;
static int use_syslog;
static int min_level = XNBD_LOG_INFO;

static const char *level_name(int level)
{
	switch (level) {
	case XNBD_LOG_ERR:
		return "error";
	case XNBD_LOG_WARNING:
		return "warning";
	case XNBD_LOG_NOTICE:
		return "notice";
	case XNBD_LOG_INFO:
		return "info";
	default:
		return "debug";
	}
}

int logsink_open(const char *program, const char *path, int to_syslog,
                 int verbose)
{
	prog = program;
	min_level = verbose ? XNBD_LOG_DEBUG : XNBD_LOG_INFO;
	if (to_syslog) {
		openlog(program, LOG_PID, LOG_DAEMON);
		use_syslog = 1;
	}
	if (path) {
		logfile = fopen(path, "ae");
		if (!logfile)
			return -errno;
		setvbuf(logfile, NULL, _IOLBF, 0);
	}
	return 0;
}

void logsink_write(void *ud, int level, const char *msg)
{
	(void)ud;
	if (level > min_level)
		return;
	if (use_syslog)
		syslog(level, "%s", msg);
	if (logfile) {
		char ts[32];
		time_t t = time(NULL);
		struct tm tm;
		strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S",
		         localtime_r(&t, &tm));
		fprintf(logfile, "%s %s[%d]: %s: %s\n", ts, prog, (int)getpid(),
		        level_name(level), msg);
	} else if (!use_syslog) {
		fprintf(stderr, "%s[%d]: %s: %s\n", prog, (int)getpid(),
		        level_name(level), msg);
	}
}

char *logsink_vformat(char *buf, size_t size, const char *fmt, va_list ap)
{
	va_list again;
	va_copy(again, ap);
	int n = vsnprintf(buf, size, fmt, ap);
	char *big = NULL;
	if (n >= 0 && (size_t)n >= size && (big = malloc((size_t)n + 1)))
		vsnprintf(big, (size_t)n + 1, fmt, again);
	va_end(again);
	return big ? big : buf;
}

void logsink_printf(int level, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	char *msg = logsink_vformat(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	logsink_write(NULL, level, msg);
	if (msg != buf)
		free(msg);
}

int logsink_uses_stderr(void)
{
	return !logfile && !use_syslog;
}
