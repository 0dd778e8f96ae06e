/* xnbd/server.h - the NBD server engine on a caller's libuv loop.
 *
 * A server holds exports (a name and a backend each) and serves them to
 * clients that connect to its listeners or are handed to it as connected
 * descriptors.  Every call is made on the loop's thread.  Functions that
 * can fail return 0 or a negative errno; one that fails never calls its
 * callback.
 */
#ifndef XNBD_SERVER_H
#define XNBD_SERVER_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "xnbd/backend.h"
#include "xnbd/common.h"
#include "xnbd/log.h"

#ifdef __cplusplus
extern "C" {
#endif

struct xnbd_server;
struct xnbd_export;

/* Flags of xnbd_export_new(). */
#define XNBD_EXPORT_READONLY (1U << 0) /* advertise and enforce read-only */

/* May `name` name an export?  0, or -EINVAL when it is longer than 4096
 * bytes or is not well-formed UTF-8 (the NBD protocol's rules; overlong
 * forms, surrogates and code points past U+10FFFF are refused). */
XNBD_EXPORT int xnbd_export_name_check(const char *name);

/* Create an export named `name` (copied; "" is the default export) over
 * `backend`.  The export does not own the backend: free the export first,
 * then the backend.  Returns 0, -EINVAL (a name xnbd_export_name_check()
 * refuses), or -ENOMEM. */
XNBD_EXPORT int xnbd_export_new(const char *name, struct xnbd_backend *backend,
                                unsigned flags, struct xnbd_export **out);

/* Set the human-readable description sent with NBD_OPT_LIST and
 * NBD_INFO_DESCRIPTION (copied; NULL clears it).  Returns 0 or -ENOMEM. */
XNBD_EXPORT int xnbd_export_set_description(struct xnbd_export *e,
                                            const char *description);

/* Free an export that no server holds any more.  Accepts NULL. */
XNBD_EXPORT void xnbd_export_free(struct xnbd_export *e);

/* Create a server on `loop`.  Returns 0 or -ENOMEM.  The program must
 * ignore SIGPIPE: replies are written to the client's socket with
 * writev() and sendfile(), and a client that leaves while one is being
 * written would otherwise kill the process. */
XNBD_EXPORT int xnbd_server_new(uv_loop_t *loop, struct xnbd_server **out);

/* Where the server's messages go; without a handler they are dropped. */
XNBD_EXPORT void xnbd_server_set_log(struct xnbd_server *s, xnbd_log_fn fn,
                                     void *user_data);

/* Flags of xnbd_server_set_flags(). */
/* Greet clients with the oldstyle handshake (first export only). */
#define XNBD_SERVER_OLDSTYLE (1U << 0)
/* Serve the first export whatever name a client asks for, as the original
 * xnbd-server did; NBD_OPT_LIST still lists the real names. */
#define XNBD_SERVER_ANY_NAME (1U << 1)
/* Never send read data with sendfile(); by default, reads of 64 KiB or
 * more that are in the page cache go from the page cache to the socket
 * without a copy through the server.  (For comparisons and tests; the
 * server falls back to copying by itself where sendfile cannot work.) */
#define XNBD_SERVER_NO_SENDFILE (1U << 2)
/* Never splice WRITE data; by default, the data of a large write (more
 * than 128 KiB, up to 1 MiB, without FUA) to a plain file image goes from
 * the socket into a pipe and from the pipe into the image, never through
 * the server's memory.  (For comparisons and tests; the server falls back
 * to copying by itself where splicing cannot work.) */
#define XNBD_SERVER_NO_SPLICE (1U << 3)

/* Set XNBD_SERVER_* flags; they apply to clients that connect later. */
XNBD_EXPORT void xnbd_server_set_flags(struct xnbd_server *s, unsigned flags);

/* Bound the requests queued (received and not yet answered) and the bytes
 * of request and reply data buffered, over all clients together.  Past a
 * bound the server stops reading from clients until it drains.  0 means no
 * bound of one's own; a fixed per-connection safety bound (1024 requests,
 * 256 MiB) always applies. */
XNBD_EXPORT void xnbd_server_set_limits(struct xnbd_server *s, size_t max_queue,
                                        size_t max_buf);

/* How much is queued now (requests received and not yet answered, and the
 * bytes buffered for them), and the bounds set by
 * xnbd_server_set_limits().  Any pointer may be NULL. */
XNBD_EXPORT void xnbd_server_usage(const struct xnbd_server *s, size_t *queued,
                                   size_t *buffered, size_t *max_queue,
                                   size_t *max_buf);

/* Add an export; the server refers to it until xnbd_server_free(), or
 * until the callback of xnbd_server_remove_export().  Exports may be added
 * at any time, also while the server listens: clients that negotiate
 * afterwards find it.  Returns 0, -EEXIST (an export of that name is
 * held), -EBUSY (e was removed and its removal callback has not run yet),
 * or -ENOMEM. */
XNBD_EXPORT int xnbd_server_add_export(struct xnbd_server *s,
                                       struct xnbd_export *e);

typedef void (*xnbd_export_removed_cb)(struct xnbd_server *s,
                                       struct xnbd_export *e, void *user_data);

/* Remove an export while the server runs.  At once, it is neither listed
 * (NBD_OPT_LIST) nor found by clients that negotiate (NBD_OPT_INFO and
 * NBD_OPT_GO get NBD_REP_ERR_UNKNOWN, NBD_OPT_EXPORT_NAME a closed
 * connection), and its name is free for xnbd_server_add_export().  Clients
 * already in transmission with it are not disturbed: they are served to
 * the end of their sessions.  cb (not NULL) runs once on the loop's thread,
 * never inside this call, when the last of them has ended (at the next
 * loop iteration when there is none); from then on the server does not
 * touch the export, and the caller may free it and its backend.  A
 * shutdown waits for these callbacks.  Returns 0, -EINVAL (cb is NULL),
 * -ENOENT (the server does not hold e), or -ESHUTDOWN (the server's
 * shutdown has completed). */
XNBD_EXPORT int xnbd_server_remove_export(struct xnbd_server *s,
                                          struct xnbd_export *e,
                                          xnbd_export_removed_cb cb,
                                          void *user_data);

/* Number of clients in transmission with the export (on any server),
 * also after it was removed, until they end. */
XNBD_EXPORT size_t xnbd_export_client_count(const struct xnbd_export *e);

/* Listen on TCP.  host NULL (or "") listens on every address, IPv6 and
 * IPv4; otherwise on each address `host` resolves to.  port is a number or
 * service name.  Returns 0, or the negative errno of the first failure
 * (-EADDRINUSE, -EACCES, -EADDRNOTAVAIL, -ENOENT for an unknown host...).
 * A listener on a loopback address (127.0.0.0/8, ::1) whose TCP congestion
 * control would pace (BBR) gets cubic, else reno, for its connections:
 * pacing serves links, loopback has none, and it costs a timer a segment.
 * Other listeners keep the system's choice. */
XNBD_EXPORT int xnbd_server_listen(struct xnbd_server *s, const char *host,
                                   const char *port);

/* Flags of xnbd_server_serve_fd(). */
/* The client was negotiated elsewhere: start transmission at once with the
 * first export and simple replies. */
#define XNBD_SERVE_NEGOTIATED (1U << 0)

/* Serve one connected client on a socket descriptor (TCP or Unix), e.g.
 * inetd's standard input.  The server takes the descriptor over.
 * Returns 0, -ENOTSOCK, -EINVAL (no export for a negotiated client), or
 * another negative errno. */
XNBD_EXPORT int xnbd_server_serve_fd(struct xnbd_server *s, int fd,
                                     unsigned flags);

/* Number of connected clients. */
XNBD_EXPORT size_t xnbd_server_client_count(const struct xnbd_server *s);

typedef void (*xnbd_client_end_cb)(struct xnbd_server *s, void *user_data);

/* Have cb called each time a client's connection has ended (after it is
 * closed and counted out of xnbd_server_client_count()). */
XNBD_EXPORT void xnbd_server_on_client_end(struct xnbd_server *s,
                                           xnbd_client_end_cb cb,
                                           void *user_data);

typedef void (*xnbd_shutdown_cb)(struct xnbd_server *s, void *user_data);

/* Stop gracefully: close the listeners, stop taking requests, answer every
 * request in flight, then close each connection.  Clients still
 * negotiating are disconnected.  After `grace_ms` milliseconds, what is
 * left is closed hard.  cb runs once everything is closed; then the server
 * may be freed.  Returns 0, or -EALREADY if a shutdown is under way. */
XNBD_EXPORT int xnbd_server_shutdown(struct xnbd_server *s, unsigned grace_ms,
                                     xnbd_shutdown_cb cb, void *user_data);

/* Free a server that has no open handles: one never started, or one whose
 * shutdown callback has run.  Accepts NULL. */
XNBD_EXPORT void xnbd_server_free(struct xnbd_server *s);

#ifdef __cplusplus
}
#endif

#endif
