/* xnbd/proxy.h - a caching proxy of a remote NBD export.
 *
 * A proxy serves an upstream NBD export through a local cache image and a
 * persistent bitmap (xnbd/bitmap.h) that records which blocks of the cache
 * hold the right data.  Reads of uncached blocks fetch whole blocks from
 * the upstream, store them, and only then mark them cached; writes go to
 * the cache alone (a write covering part of an uncached block fetches the
 * block first) and nothing is ever written upstream.  The proxy is used as
 * a backend: xnbd_proxy_backend() gives the struct xnbd_backend to export.
 *
 * Durability: a bit reaches the bitmap file only after the cache data it
 * vouches for was synced (on FLUSH, FUA writes, every few seconds and at
 * close), so a proxy restarted after a crash on the same cache and bitmap
 * serves only correct data.
 *
 * Upstream loss: requests for cached blocks go on being served; those that
 * need the upstream wait, and the proxy reconnects by itself (with growing
 * pauses, logging each attempt) until xnbd_proxy_reconnect() points it
 * elsewhere.  xnbd_proxy_switch() turns the proxy into a plain image on its
 * cache without disturbing the clients: the way a live migration ends.
 *
 * All calls are made on the loop's thread.
 */
#ifndef XNBD_PROXY_H
#define XNBD_PROXY_H

#include <stdint.h>
#include <uv.h>

#include "xnbd/backend.h"
#include "xnbd/common.h"
#include "xnbd/log.h"

#ifdef __cplusplus
extern "C" {
#endif

struct xnbd_proxy;

/* Granularity of the cache and of its bitmap, in bytes. */
#define XNBD_PROXY_BLOCK 4096U

/* Flags of xnbd_proxy_open(). */
#define XNBD_PROXY_CLEAR_BITMAP (1U << 0) /* forget what the bitmap says */
#define XNBD_PROXY_READONLY (1U << 1) /* refuse writes; still fill the cache */

typedef void (*xnbd_proxy_cb)(struct xnbd_proxy *p, int status,
                              void *user_data);

/* Create a proxy on `loop`.  Returns 0 or -ENOMEM. */
XNBD_EXPORT int xnbd_proxy_new(uv_loop_t *loop, struct xnbd_proxy **out);

/* Where its messages (and its upstream client's) go. */
XNBD_EXPORT void xnbd_proxy_set_log(struct xnbd_proxy *p, xnbd_log_fn fn,
                                    void *user_data);

/* Connect to the export `name` at host:port (port: 1 to 65535), then open
 * the bitmap at `bitmap` (created, or reused unless
 * XNBD_PROXY_CLEAR_BITMAP) and the cache image at `cache` (created, or
 * grown, to the export's size, only once the bitmap was accepted).  cb runs
 * once: with 0 when the backend is ready, or with a negative errno (that
 * of xnbd_client_connect(); -EFBIG when the cache image is larger than the
 * export; -EBADMSG or -EINVAL from xnbd_bitmap_open() for a bitmap that is
 * damaged or made for another image; -EINVAL when cache and bitmap are one
 * file, or the cache image is itself an xNBD bitmap; -EUCLEAN when the
 * bitmap says a block is cached that lies past the cache image's end, as
 * after the cache was truncated or replaced), the reason also logged.
 * Nothing is changed on a refusal, and a cache image made by the attempt
 * is removed.  Returns 0, or a negative errno when nothing was started. */
XNBD_EXPORT int xnbd_proxy_open(struct xnbd_proxy *p, const char *host,
                                const char *port, const char *name,
                                const char *cache, const char *bitmap,
                                unsigned flags, xnbd_proxy_cb cb,
                                void *user_data);

/* The proxy as a backend, once open.  Its capabilities: read, write (unless
 * read-only), flush, FUA, trim and write-zeroes (done in the cache), cache
 * (NBD_CMD_CACHE fetches the range), block status, with the
 * XNBD_IO_STATUS_CACHED flag for the cached/uncached map. */
XNBD_EXPORT struct xnbd_backend *xnbd_proxy_backend(struct xnbd_proxy *p);

/* States of xnbd_proxy_state(). */
#define XNBD_PROXY_CONNECTED 0 /* the upstream is there */
#define XNBD_PROXY_WAITING 1   /* the upstream was lost; reconnecting */
#define XNBD_PROXY_SWITCHED 2  /* a plain image on the cache, for good */

/* The proxy's state, XNBD_PROXY_*. */
XNBD_EXPORT int xnbd_proxy_state(const struct xnbd_proxy *p);

/* Blocks of the image (of XNBD_PROXY_BLOCK bytes, the last maybe short). */
XNBD_EXPORT uint64_t xnbd_proxy_blocks(const struct xnbd_proxy *p);

/* How many blocks the cache holds. */
XNBD_EXPORT uint64_t xnbd_proxy_cached_blocks(const struct xnbd_proxy *p);

/* The upstream's host, as given; valid until the next reconnect or the
 * free (as are the strings of the four functions below). */
XNBD_EXPORT const char *xnbd_proxy_upstream_host(const struct xnbd_proxy *p);

/* The upstream's port. */
XNBD_EXPORT const char *xnbd_proxy_upstream_port(const struct xnbd_proxy *p);

/* The upstream's export name. */
XNBD_EXPORT const char *xnbd_proxy_upstream_name(const struct xnbd_proxy *p);

/* The fetch window: how many bytes of fetches the proxy lets the upstream
 * have in flight at once (UINT64_MAX: no limit but 256 requests).  The
 * proxy sizes it itself, as three times its fetch rate times the
 * upstream's latency (at least 2 MiB), unless XNBD_FETCH_WINDOW fixed it;
 * latency_ns, if not NULL, gets that latency as last measured (0: not
 * yet). */
XNBD_EXPORT uint64_t xnbd_proxy_fetch_window(const struct xnbd_proxy *p,
                                             uint64_t *latency_ns);

/* The cache image's path, as given to xnbd_proxy_open(). */
XNBD_EXPORT const char *xnbd_proxy_cache_path(const struct xnbd_proxy *p);

/* The bitmap's path, as given to xnbd_proxy_open(). */
XNBD_EXPORT const char *xnbd_proxy_bitmap_path(const struct xnbd_proxy *p);

/* Requests waiting for the upstream to come back. */
XNBD_EXPORT uint64_t xnbd_proxy_waiting(const struct xnbd_proxy *p);

/* Point the proxy at the export `name` on host:port (port: 1 to 65535, or
 * -EINVAL) and go on: requests that waited are served from there.  The
 * export must have the same size.
 * cb runs once with 0, or a negative errno (-EINVAL when the size differs,
 * -EALREADY after a switch, or a connection error); a failed reconnect
 * leaves the proxy as it was.  Returns 0, or a negative errno when nothing
 * was started (cb is then not called). */
XNBD_EXPORT int xnbd_proxy_reconnect(struct xnbd_proxy *p, const char *host,
                                     const char *port, const char *name,
                                     xnbd_proxy_cb cb, void *user_data);

/* Become a plain image on the cache: the upstream is let go and never
 * asked again.  Refused with -EBUSY while blocks are missing unless
 * `force`, in which case missing blocks read as zeroes.  Requests in flight
 * finish normally.  Returns 0, -EBUSY or -EALREADY. */
XNBD_EXPORT int xnbd_proxy_switch(struct xnbd_proxy *p, int force);

/* A background fill of the whole cache.  progress runs now and then with
 * the cached and total block counts; done runs once with 0 when every
 * block is cached, or a negative errno (-ECANCELED after
 * xnbd_proxy_job_cancel(), -EALREADY once switched, or the fetch error).
 * While the upstream is lost the fill waits, as every request does. */
struct xnbd_proxy_job;
typedef void (*xnbd_proxy_progress_cb)(struct xnbd_proxy *p, uint64_t cached,
                                       uint64_t total, void *user_data);

/* Flags of xnbd_proxy_cache_all(). */
/* Fetch over a connection of the job's own, not the one clients use. */
#define XNBD_PROXY_OWN_CONNECTION (1U << 0)

/* Start filling the cache.  Returns 0 and sets *job, or -ENOMEM. */
XNBD_EXPORT int xnbd_proxy_cache_all(struct xnbd_proxy *p, unsigned flags,
                                     xnbd_proxy_progress_cb progress,
                                     xnbd_proxy_cb done, void *user_data,
                                     struct xnbd_proxy_job **job);

/* Stop a fill: fetches under way finish, then done runs with -ECANCELED. */
XNBD_EXPORT void xnbd_proxy_job_cancel(struct xnbd_proxy_job *job);

/* Make the cache data and the bitmap durable now.  cb runs with 0 or a
 * negative errno.  Returns 0 or -ENOMEM. */
XNBD_EXPORT int xnbd_proxy_sync(struct xnbd_proxy *p, xnbd_proxy_cb cb,
                                void *user_data);

struct xnbd_control;
struct xnbd_server;

/* Answer the proxy's commands on a control server (xnbd/control.h):
 * `query`, `cache-all`, `cache-all2`, `switch [force]` and
 * `reconnect HOST PORT [EXPORT]`, as doc/control-protocol.md describes.
 * With `srv` (may be NULL), `query` also tells that server's queue usage.
 * A fill started by `cache-all` stops when its requester goes away.
 * Returns 0, -EEXIST (a command is taken) or -ENOMEM. */
XNBD_EXPORT int xnbd_proxy_control_add(struct xnbd_proxy *p,
                                       struct xnbd_control *ctl,
                                       struct xnbd_server *srv);

struct xnbd_control_req;

/* Answer one of the proxy's commands on a request that a program routed
 * itself, as xnbd-wrapper does for each of its proxies: argv[0] is
 * `query`, `cache-all`, `cache-all2`, `switch` or `reconnect`, then its
 * arguments (as in xnbd_proxy_control_add(), whose reply lines and keys
 * are sent); `srv` as there.  req is finished, now or later; an unknown
 * command with -ENOSYS.  A fill stops when the requester goes away. */
XNBD_EXPORT void xnbd_proxy_control_run(struct xnbd_proxy *p,
                                        struct xnbd_server *srv,
                                        struct xnbd_control_req *req, int argc,
                                        char **argv);

/* Let the upstream go, stop the fills, and once their fetches under way
 * have finished, sync the cache and the bitmap (blocking) and free the
 * proxy.  No I/O of the caller's may be in flight on the backend; the fills'
 * done callbacks run (with -ECANCELED) before the memory goes.  Accepts
 * NULL. */
XNBD_EXPORT void xnbd_proxy_free(struct xnbd_proxy *p);

#ifdef __cplusplus
}
#endif

#endif
