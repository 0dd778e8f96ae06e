/* log.c - formatting for the log callback every handle may carry. */
#include <stdarg.h>
#include <stdio.h>

#include "wire.h"

void xnbd__logf(xnbd_log_fn fn, void *ud, int level, const char *fmt, ...)
{
	if (!fn)
		return;
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fn(ud, level, msg);
}
