/* xnbd/client.h - an asynchronous NBD client on libuv.
 *
 * The client connects to a server (fixed newstyle with NBD_OPT_GO and
 * structured replies where offered; NBD_OPT_EXPORT_NAME and oldstyle for
 * old servers) and is then used as a backend: xnbd_client_backend() gives a
 * struct xnbd_backend on which reads, writes, flushes and the rest are
 * submitted with xnbd_backend_submit().  Many requests may be in flight;
 * replies are matched by cookie in whatever order they come, and every
 * byte from the server is checked before it is used.
 */
#ifndef XNBD_CLIENT_H
#define XNBD_CLIENT_H

#include <stdint.h>
#include <uv.h>

#include "xnbd/backend.h"
#include "xnbd/common.h"
#include "xnbd/log.h"

#ifdef __cplusplus
extern "C" {
#endif

struct xnbd_client;

typedef void (*xnbd_client_cb)(struct xnbd_client *c, int status,
                               void *user_data);

/* Create a client on `loop`.  Returns 0 or -ENOMEM.  The program must
 * ignore SIGPIPE: requests are written with libuv's writes, and a server
 * that goes away while one is being written would otherwise kill the
 * process. */
XNBD_EXPORT int xnbd_client_new(uv_loop_t *loop, struct xnbd_client **out);

/* Where the client's messages go; without a handler they are dropped. */
XNBD_EXPORT void xnbd_client_set_log(struct xnbd_client *c, xnbd_log_fn fn,
                                     void *user_data);

/* Is `port` a TCP port as the library takes one: a decimal number from 1
 * to 65535, with no sign, spaces or service name?  (getaddrinfo would
 * take 70000 as 4464.)  Returns 1 or 0.  xnbd_client_connect(),
 * xnbd_proxy_open() and xnbd_proxy_reconnect() refuse any other with
 * -EINVAL; a program may check first to say so in its own words.
 * (xnbd_server_listen() takes 0 and service names too.) */
XNBD_EXPORT int xnbd_port_valid(const char *port);

/* Connect to host:port and open the export `name` ("" for the default);
 * port is a decimal number from 1 to 65535 (anything else: -EINVAL).
 * cb runs once with 0 when transmission may start, or with a negative
 * errno: -ECONNREFUSED and other socket errors, -ENOENT (no such export
 * or host), -EPROTO (the server broke the protocol), -ENOTSUP (it offers
 * nothing this client speaks), -ETIMEDOUT (no connection or no complete
 * handshake within the connect timeout).  Returns 0, or -EALREADY if
 * connecting or connected, or another negative errno (then cb is not
 * called). */
XNBD_EXPORT int xnbd_client_connect(struct xnbd_client *c, const char *host,
                                    const char *port, const char *name,
                                    xnbd_client_cb cb, void *user_data);

/* The default of xnbd_client_set_connect_timeout(). */
#define XNBD_CLIENT_CONNECT_TIMEOUT_MS 30000U

/* The time a connection and its handshake may take, from the end of the
 * name lookup, before xnbd_client_connect()'s callback gets -ETIMEDOUT:
 * a server that accepts connections but never speaks must not make the
 * caller wait forever.  XNBD_CLIENT_CONNECT_TIMEOUT_MS unless set; 0 is
 * no limit.  Set it before connecting (-EALREADY otherwise). */
XNBD_EXPORT int xnbd_client_set_connect_timeout(struct xnbd_client *c,
                                                uint64_t ms);

/* Have cb called when an established connection is lost or closed by the
 * server, after every request in flight has completed with an error. */
XNBD_EXPORT void xnbd_client_on_disconnect(struct xnbd_client *c,
                                           xnbd_client_cb cb, void *user_data);

/* Size of the export (0 before a connection is established). */
XNBD_EXPORT uint64_t xnbd_client_size(const struct xnbd_client *c);

/* Transmission flags the server sent, XNBD_FLAG_* (0 before a connection
 * is established). */
XNBD_EXPORT uint16_t xnbd_client_flags(const struct xnbd_client *c);

/* Did the server agree to structured replies? */
XNBD_EXPORT int xnbd_client_structured(const struct xnbd_client *c);

/* The connection as a backend, valid while the client exists.  Submitting
 * before the connection is up, or after it was lost, fails with
 * -ENOTCONN.  Its capabilities follow the server's flags. */
XNBD_EXPORT struct xnbd_backend *xnbd_client_backend(struct xnbd_client *c);

/* Number of requests sent and not yet answered. */
XNBD_EXPORT size_t xnbd_client_in_flight(const struct xnbd_client *c);

/* Close the connection (sending NBD_CMD_DISC if it is up) and free the
 * client.  Requests in flight complete with -ECANCELED first.  The memory
 * is released once the loop has run the socket's close callback; no
 * callback of the client runs after this returns.  Accepts NULL. */
XNBD_EXPORT void xnbd_client_free(struct xnbd_client *c);

#ifdef __cplusplus
}
#endif

#endif
