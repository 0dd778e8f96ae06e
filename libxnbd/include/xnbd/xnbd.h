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

#ifdef __cplusplus
}
#endif

#endif
