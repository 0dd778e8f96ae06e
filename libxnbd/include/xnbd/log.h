/* xnbd/log.h - how the library reports what it does.
 *
 * The library never prints by itself: it hands each message to a function
 * the application installs, which may print it, send it to syslog or drop
 * it.  Levels are syslog(3)'s.
 */
#ifndef XNBD_LOG_H
#define XNBD_LOG_H

#include "xnbd/common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define XNBD_LOG_ERR 3
#define XNBD_LOG_WARNING 4
#define XNBD_LOG_NOTICE 5
#define XNBD_LOG_INFO 6
#define XNBD_LOG_DEBUG 7

/* msg is one line without a trailing newline, valid during the call. */
typedef void (*xnbd_log_fn)(void *user_data, int level, const char *msg);

#ifdef __cplusplus
}
#endif

#endif
