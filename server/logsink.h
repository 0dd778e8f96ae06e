/* logsink.h - the frontends' log destination (see logsink.c). */
#ifndef XNBD_LOGSINK_H
#define XNBD_LOGSINK_H

#include <stdarg.h>
#include <stddef.h>

#include <xnbd/log.h>

/* Send messages to `path` (appended) and/or syslog; with neither, to
 * stderr.  Returns 0 or a negative errno from opening the file. */
int logsink_open(const char *program, const char *path, int to_syslog,
                 int verbose);
/* An xnbd_log_fn. */
void logsink_write(void *ud, int level, const char *msg);
__attribute__((format(printf, 2, 3))) void logsink_printf(int level,
                                                          const char *fmt, ...);
int logsink_uses_stderr(void);
/* Format into buf (size bytes), or, when the text is longer, into memory
 * of its size (cut to buf only where none can be had): a message is never
 * cut before its reason.  Returns buf or the memory, which the caller
 * frees. */
__attribute__((format(printf, 3, 0))) char *
logsink_vformat(char *buf, size_t size, const char *fmt, va_list ap);

#endif
