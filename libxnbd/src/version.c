/* version.c - the library's version and error strings. */
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
