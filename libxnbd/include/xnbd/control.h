/* xnbd/control.h - the control channel: requests and replies on a Unix
 * socket, between a running server and the tools that manage it
 * (xnbd-bgctl, xnbd-wrapper-ctl, or a third-party program).
 *
 * The protocol is text, versioned and documented in
 * doc/control-protocol.md: the server greets with its protocol version, a
 * request is one line of words, and a reply is zero or more `info` and
 * `progress` lines closed by `ok` or `error`.  Every word is
 * percent-encoded, so paths and export names with spaces or newlines
 * travel unharmed.
 *
 * Server side: xnbd_control_new() on a libuv loop, one handler per
 * command word, xnbd_control_listen() on a path.  A handler answers at
 * once or later (a long job such as filling a cache streams `progress`
 * lines); it ends every request with xnbd_control_finish().
 *
 * Client side: a small blocking API (xnbd_ctl_*), enough for command-line
 * tools; it needs no loop.
 */
#ifndef XNBD_CONTROL_H
#define XNBD_CONTROL_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "xnbd/common.h"
#include "xnbd/log.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The protocol version this library speaks (the `xnbd-control 1` greeting). */
#define XNBD_CONTROL_VERSION 1

/* Longest request or reply line, in bytes after encoding, newline included. */
#define XNBD_CONTROL_MAX_LINE 8192

/* ---- server side ----------------------------------------------------------- */

struct xnbd_control;
struct xnbd_control_req;

/* A request: argv[0] is the command word, argv[1..argc-1] its arguments,
 * decoded, valid until xnbd_control_finish().  The handler answers with
 * xnbd_control_info() / xnbd_control_progress() and must, now or later,
 * call xnbd_control_finish() exactly once. */
typedef void (*xnbd_control_handler)(struct xnbd_control_req *req, int argc,
                                     char **argv, void *user_data);

/* Called when the peer of a request that is not finished yet goes away;
 * the handler should stop its work and still call xnbd_control_finish(),
 * which then only frees the request. */
typedef void (*xnbd_control_gone_cb)(struct xnbd_control_req *req,
                                     void *user_data);

/* Create a control server on `loop`.  Returns 0 or -ENOMEM.  As with any
 * libuv server, the program must ignore SIGPIPE: a client that leaves
 * while its reply is being written would otherwise kill the process. */
XNBD_EXPORT int xnbd_control_new(uv_loop_t *loop, struct xnbd_control **out);

/* Where its messages go; without a handler they are dropped. */
XNBD_EXPORT void xnbd_control_set_log(struct xnbd_control *ctl, xnbd_log_fn fn,
                                      void *user_data);

/* The text of the greeting after the version, telling clients what they
 * talk to, e.g. "xnbd-server/0.1.0" (copied; by default
 * "libxnbd/VERSION").  Affects connections accepted afterwards.  Returns
 * 0, -EINVAL (NULL, empty or over 256 bytes) or -ENOMEM. */
XNBD_EXPORT int xnbd_control_set_program(struct xnbd_control *ctl,
                                         const char *text);

/* Route requests whose first word is `command` (copied) to `fn`.  Returns
 * 0, -EEXIST, -EINVAL (empty or over 64 bytes) or -ENOMEM.  The command
 * `help` is built in: it lists the commands. */
XNBD_EXPORT int xnbd_control_add(struct xnbd_control *ctl, const char *command,
                                 xnbd_control_handler fn, void *user_data);

/* Listen on the Unix socket `path` (created with mode 0600).  A socket file
 * left by a dead process is replaced; one a live process answers on is
 * not: -EADDRINUSE.  Any other existing file gives -EEXIST.  Returns 0 or a
 * negative errno (-ENAMETOOLONG for a path sun_path cannot hold,
 * -EALREADY when this server already listens). */
XNBD_EXPORT int xnbd_control_listen(struct xnbd_control *ctl, const char *path);

/* Would xnbd_control_listen() take `path`?  The same checks, changing
 * nothing: call it before work a refused socket would waste or harm (a
 * proxy checks its control socket before it opens its cache and bitmap).
 * Returns 0, or -EADDRINUSE, -EEXIST, -ENAMETOOLONG, -EINVAL as listening
 * would, -ENOENT or -ENOTDIR when the directory is missing, -EACCES or
 * -EROFS when the process may not make a file in it, or another negative
 * errno. */
XNBD_EXPORT int xnbd_control_check_path(const char *path);

/* Stop listening, remove the socket file, drop every connection (pending
 * requests get their gone callback) and free the control server once the
 * loop has closed its handles.  Accepts NULL. */
XNBD_EXPORT void xnbd_control_free(struct xnbd_control *ctl);

/* Have cb called if the request's peer leaves before it is finished. */
XNBD_EXPORT void xnbd_control_on_gone(struct xnbd_control_req *req,
                                      xnbd_control_gone_cb cb, void *user_data);

/* Add an `info KEY VALUE` line to the reply.  KEY is a word of
 * [a-z0-9_-.], at most 64 bytes; VALUE any string.  Returns 0, -EINVAL
 * (bad key), -EMSGSIZE (the encoded line would exceed
 * XNBD_CONTROL_MAX_LINE; nothing is sent), -ENOMEM (the connection is then
 * closed), or -EPIPE when the peer has gone (the line is dropped). */
XNBD_EXPORT int xnbd_control_info(struct xnbd_control_req *req, const char *key,
                                  const char *value);

/* Add a `progress DONE TOTAL` line.  Returns as xnbd_control_info().
 * While the client leaves more than 64 KiB of the reply unread, progress
 * lines are dropped (and 0 returned): each one supersedes the last. */
XNBD_EXPORT int xnbd_control_progress(struct xnbd_control_req *req,
                                      uint64_t done, uint64_t total);

/* End the request: `ok` when status is 0, otherwise
 * `error ERRNO-NAME MESSAGE` with status a negative errno and `message`
 * a human-readable sentence (NULL: strerror's; shortened if the line
 * cannot hold it).  An errno the protocol has no name for is sent as EIO.
 * Frees the request.  Never runs a handler: the connection's next request
 * is dispatched from the loop, so the caller may go on using its own state
 * (and finish other requests) after this returns. */
XNBD_EXPORT void xnbd_control_finish(struct xnbd_control_req *req, int status,
                                     const char *message);

/* ---- client side (blocking) ------------------------------------------------ */

struct xnbd_ctl;

/* Connect to the control socket at `path` and read the greeting.
 * Returns 0, -ENOENT / -ECONNREFUSED (no server there), -EPROTO (the peer
 * is not an xNBD control server), -EPROTONOSUPPORT (another major
 * version), or another negative errno. */
XNBD_EXPORT int xnbd_ctl_open(const char *path, struct xnbd_ctl **out);

/* One line of a reply: kind is "info" (key and value set) or "progress"
 * (done and total set).  Return nonzero to stop reading the reply early
 * (xnbd_ctl_call then returns -ECANCELED and the connection is closed
 * for further calls). */
struct xnbd_ctl_line {
	const char *kind;
	const char *key;
	const char *value;
	uint64_t done, total;
};
typedef int (*xnbd_ctl_line_cb)(const struct xnbd_ctl_line *line,
                                void *user_data);

/* Send the request argv[0..argc-1] and read its reply, handing each info
 * and progress line to cb (may be NULL).  Returns 0 for `ok`, the negative
 * errno named by an `error` line (its message then in *message, to be
 * freed by the caller, when message is not NULL; a name this library does
 * not know gives -EIO), -EPROTO for a reply that breaks the protocol,
 * -ECONNRESET when the server went away, -EINVAL (argc < 1, or an empty
 * or NULL word where the command should be), -E2BIG (more than 256 words),
 * -EMSGSIZE (the encoded request exceeds XNBD_CONTROL_MAX_LINE),
 * -ENOTCONN after an earlier call left the connection unusable, or
 * another negative errno.  *message is NULL unless an `error` line was
 * read.  Any failure other than an `error` reply closes the connection. */
XNBD_EXPORT int xnbd_ctl_call(struct xnbd_ctl *c, int argc,
                              const char *const *argv, xnbd_ctl_line_cb cb,
                              void *user_data, char **message);

/* The server's greeting text after the version (e.g. the program name and
 * version), valid while the connection is open. */
XNBD_EXPORT const char *xnbd_ctl_server(const struct xnbd_ctl *c);

/* Close the connection and free it.  Accepts NULL. */
XNBD_EXPORT void xnbd_ctl_close(struct xnbd_ctl *c);

#ifdef __cplusplus
}
#endif

#endif
