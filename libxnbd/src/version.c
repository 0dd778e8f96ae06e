/* version.c - the library's version, error strings and size parser. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "xnbd/xnbd.h"

const char *xnbd_version(void)
{
	return XNBD_VERSION;
}

const char *xnbd_strerror(int err)
{
	return strerror(err < 0 ? -err : err);
}

int xnbd_parse_size(const char *s, uint64_t *out)
{
	if (!s || *s < '0' || *s > '9') /* no sign, no spaces */
		return -EINVAL;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || end == s)
		return -EINVAL;
	unsigned shift = 0;
	if (*end == 'K' || *end == 'k')
		shift = 10;
	else if (*end == 'M' || *end == 'm')
		shift = 20;
	else if (*end == 'G' || *end == 'g')
		shift = 30;
	if (shift)
		end++;
	if (*end || v > (UINT64_MAX >> shift))
		return -EINVAL;
	*out = (uint64_t)v << shift;
	return 0;
}
