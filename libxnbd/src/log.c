/* log.c - formatting for the log callback every handle may carry. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "wire.h"

void xnbd__vlogf(xnbd_log_fn fn, void *ud, int level, const char *fmt,
                 va_list ap)
{
	if (!fn)
		return;
	/* Most messages fit the stack; a longer one (long paths, whose reason
	 * comes after them) is formatted again into memory of its size, and
	 * only cut where that memory cannot be had. */
	char msg[512];
	va_list again;
	va_copy(again, ap);
	int n = vsnprintf(msg, sizeof(msg), fmt, ap);
	char *big = NULL;
	if (n >= (int)sizeof(msg) && (big = malloc((size_t)n + 1)))
		vsnprintf(big, (size_t)n + 1, fmt, again);
	va_end(again);
	fn(ud, level, big ? big : msg);
	free(big);
}

void xnbd__logf(xnbd_log_fn fn, void *ud, int level, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	xnbd__vlogf(fn, ud, level, fmt, ap);
	va_end(ap);
}
