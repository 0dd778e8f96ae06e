/* xnbd/xnbd.h - libxnbd, the library of the xNBD project.
 *
 * Include this one header to get the whole public API:
 *   xnbd/protocol.h  constants of the NBD protocol
 *   xnbd/backend.h   asynchronous image backends (file, copy-on-write)
 *   xnbd/bitmap.h    the persistent block bitmap
 *   xnbd/client.h    an asynchronous NBD client, usable as a backend
 *   xnbd/control.h   the control channel (server on a loop, blocking client)
 *   xnbd/server.h    the NBD server engine
 *   xnbd/log.h       the log callback
 */
#ifndef XNBD_XNBD_H
#define XNBD_XNBD_H

#include "xnbd/backend.h"
#include "xnbd/bitmap.h"
#include "xnbd/client.h"
#include "xnbd/common.h"
#include "xnbd/control.h"
#include "xnbd/log.h"
#include "xnbd/protocol.h"
#include "xnbd/proxy.h"
#include "xnbd/server.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The library's version as "MAJOR.MINOR.PATCH"; a static string. */
XNBD_EXPORT const char *xnbd_version(void);

/* A static English description of a negative errno returned by this
 * library (as strerror(-err), never NULL). */
XNBD_EXPORT const char *xnbd_strerror(int err);

/* Parse a size as the programs take it: decimal digits, then optionally K,
 * M or G (binary, either case); no sign, spaces or other suffix.  Returns 0
 * with the bytes in *out, or -EINVAL (*out untouched), also when the size
 * does not fit in 64 bits. */
XNBD_EXPORT int xnbd_parse_size(const char *s, uint64_t *out);

#ifdef __cplusplus
}
#endif

#endif
