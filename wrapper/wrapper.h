/* wrapper.h - xnbd-wrapper's state, shared by its files (private).
 *
 * Notes on the design:
 * - One process, one libuv loop, one struct xnbd_server holding every
 *   export; clients choose one by name.  Exports are added and removed
 *   while the server runs (xnbd_server_add_export and _remove_export), so
 *   nothing is ever restarted, and all clients of a proxy share it.
 * - The wrapper's table of exports (struct wexport, in the order they were
 *   added) is what `list` shows and what the export list file (--dbpath)
 *   records.  An export is `opening` (a proxy connecting to its upstream),
 *   `serving`, or `failed` (it could not be opened at start or on a later
 *   attempt; it stays in the table and the file, and is tried again every
 *   RETRY_MS).  A removed export leaves the table at once; its clients are
 *   served to the end of their sessions, and its memory, backends and
 *   proxy go when the last of them has ended.
 * - A change the export list file could not record is refused and undone
 *   before any client could see it: the file never lags behind what is
 *   served after a command was answered.
 */
#ifndef XNBD_WRAPPER_H
#define XNBD_WRAPPER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include <xnbd/xnbd.h>

#include "frontend.h"

#define PROG "xnbd-wrapper"
#define DEFAULT_CTL_SOCKET "/tmp/xnbd_wrapper.ctl"
#define RETRY_MS 10000 /* a failed export is tried again this often */
#define TICK_MS 1000   /* the export list file is compared this often */
/* At start, proxies have this long to reach their upstreams before the
 * wrapper listens without them (they are served once they have). */
#define START_WAIT_MS 5000

enum wtype { W_TARGET, W_PROXY };
enum wstate { W_OPENING, W_SERVING, W_FAILED };

struct wrapper;
struct wexport;
typedef void (*wexport_cb)(struct wexport *e, int status);

struct wexport {
	struct wexport *next;
	struct wrapper *w;
	enum wtype type;
	enum wstate state;
	char *name;
	char *file; /* target: the image; proxy: the cache image */
	/* Proxy: its parameters as given (the upstream may change later). */
	char *rhost, *rport, *rname, *bitmap, *ctlsock;
	char *error;       /* why it is `failed` */
	uint64_t retry_at; /* uv_now() of the next attempt when failed */
	int from_request;  /* an add-proxy not yet answered: not in the file */
	int dropping;      /* being removed: left out of the file */
	int from_imgfile;  /* named by --imgfile (for messages) */
	struct xnbd_control_req *req; /* the add-proxy request to answer */
	wexport_cb done;              /* when the proxy's opening ends */
	struct xnbd_backend *image;   /* target: the file */
	struct xnbd_backend *cow;     /* target with --cow: the layer over it */
	struct xnbd_proxy *proxy;
	struct xnbd_control *pctl; /* proxy: its own control socket */
	struct xnbd_export *export;
};

struct wconfig {
	struct serve_opts serve;
	const char **imgfiles;
	size_t nimgfiles;
	const char *socket;
	const char *dbpath;
	int cow, readonly;
};

struct wrapper {
	struct wconfig cfg;
	uv_loop_t *loop;
	struct xnbd_server *srv;
	struct xnbd_control *ctl;
	struct wexport *exports; /* the table, in order */
	struct wexport *retired; /* removed, still serving their clients */
	char *socket_abs, *db_abs, *db_tmp_abs, *pidfile_abs, *log_abs;
	char *db_saved;  /* the export list file's contents as last written */
	int db_failing;  /* the last write failed (logged once) */
	uv_timer_t tick; /* retries and the export list file */
	uv_timer_t start_wait; /* the start's wait for the proxies */
	uv_timer_t reaper;     /* frees proxies outside their own callbacks */
	struct xnbd_proxy **reap;
	size_t nreap, reap_cap;
	uv_signal_t sig_term, sig_int;
	int running;      /* started: a stop may begin */
	int stop_pending; /* asked to stop while starting */
	int signals_closed;
	int stopping;
	int exit_code;
};

/* ---- exports.c ------------------------------------------------------------- */

/* The export of that name in the table, or NULL. */
struct wexport *wexport_find(struct wrapper *w, const char *name);

/* The export, in the table or retired, that uses `path` as its image,
 * cache, bitmap or control socket, or NULL. */
struct wexport *wexport_using(struct wrapper *w, const char *path);

/* A new table entry (not opened, not in the table); NULL without memory.
 * Proxy parameters are NULL for a target.  Strings are copied. */
struct wexport *wexport_new(struct wrapper *w, enum wtype type,
                            const char *name, const char *file,
                            const char *rhost, const char *rport,
                            const char *rname, const char *bitmap,
                            const char *ctlsock);

/* If a and b may not both be in the table, the path they share (a proxy's
 * cache, bitmap and control socket are its own; targets may share an
 * image); with a == b, a path a proxy uses twice.  NULL otherwise. */
const char *wexport_clash(const struct wexport *a, const struct wexport *b);

/* The canonical absolute form of an absolute path: realpath() of the
 * file, or of its directory when the file does not exist yet, plus its
 * name.  Malloc'd; NULL without memory. */
char *canon_path(const char *path);

/* What a path names, for comparing many paths: the path, its canonical
 * form, and its device and inode when it exists. */
struct fileid {
	const char *path; /* not owned; NULL: no file */
	char *canon;
	int have_ino;
	dev_t dev;
	ino_t ino;
};
void fileid_make(const char *path, struct fileid *id);
void fileid_free(struct fileid *id);

/* The ids of e's image (cache), bitmap and control socket. */
void wexport_ids(const struct wexport *e, struct fileid ids[3]);

/* wexport_clash() on ids made beforehand (a long list is checked with
 * each path looked up once, not once per pair). */
const char *wexport_clash_ids(const struct wexport *a,
                              const struct fileid ia[3],
                              const struct wexport *b,
                              const struct fileid ib[3]);

/* Check a new export's name: NULL when it may be used, otherwise why not
 * (a sentence). */
const char *wexport_bad_name(const char *name);

/* If path is one of the wrapper's own files (the export list and its
 * temporary, the control socket, the pid file, the log file), what it
 * is; NULL otherwise.  No export may use them. */
const char *wrapper_file(struct wrapper *w, const char *path);

/* Append e to the table. */
void wexport_append(struct wrapper *w, struct wexport *e);

/* Open a target and add it to the server.  Returns 0 or a negative errno,
 * with e->error set to a sentence saying why. */
int wexport_open_target(struct wexport *e);

/* Start opening a proxy; done(e, status) runs when it is served (0) or
 * has failed (e->error says why).  Returns 0, or a negative errno when
 * nothing was started (e->error set). */
int wexport_open_proxy(struct wexport *e, wexport_cb done);

/* Take e out of the table and remove it from the server: its clients are
 * served to their end (it is `retired` meanwhile), then it is freed.
 * Returns how many clients it has now. */
size_t wexport_remove(struct wexport *e);

/* Free an entry that is not served (failed, or never added), also
 * abandoning a proxy that is still opening; it must not be in the table. */
void wexport_discard(struct wexport *e);

/* Free everything of e after the server's shutdown. */
void wexport_free_at_exit(struct wexport *e);

/* Free the proxies waiting to be freed, and close the reaper. */
void reaper_flush_and_close(struct wrapper *w);

/* Try failed exports whose time has come again. */
void wexport_retry(struct wrapper *w);

/* Set e->error from a format. */
__attribute__((format(printf, 2, 3))) void wexport_error(struct wexport *e,
                                                         const char *fmt, ...);

/* ---- db.c --------------------------------------------------------------------- */

/* One entry of the export list file. */
struct dbent {
	enum wtype type;
	char *name, *file;
	char *rhost, *rport, *rname, *bitmap, *ctlsock;
	unsigned line;
};

/* Read the export list file.  A missing file is an empty list (0).
 * Returns 0 and sets *ents and *n, or -1 with a message in err (the file
 * is damaged or unreadable: the wrapper must not start on it). */
int db_load(const char *path, struct dbent **ents, size_t *n, char *err,
            size_t errlen);
void db_free(struct dbent *ents, size_t n);

/* Write the table to the export list file when it differs from what was
 * written last: FILE.tmp, fsync, rename, fsync of the directory.  Returns
 * 0 (also without --dbpath) or a negative errno. */
int db_sync(struct wrapper *w);

/* ---- words.c -------------------------------------------------------------------- */

/* Append the percent-encoding of s (the control protocol's word rules)
 * to *buf; returns 0 or -ENOMEM. */
int word_append(char **buf, size_t *len, size_t *cap, const char *s);

/* Split a line (NUL-terminated, without newline) into decoded words in
 * place; returns the count, or -1 for a bad encoding or more than max. */
int words_split(char *line, char **argv, int max);

/* The length of s percent-encoded as a word. */
size_t word_len(const char *s);

/* Names and paths must fit a reply line (8192 bytes with its key) once
 * encoded: at most this many bytes. */
#define MAX_WORD 8000U

/* ---- commands.c ---------------------------------------------------------------- */

/* Register the wrapper's commands on w->ctl.  Returns 0 or a negative
 * errno. */
int commands_add(struct wrapper *w);

/* Register the proxy's commands on its own control socket e->pctl (the
 * same replies as bgctl-* on the wrapper's).  Returns 0 or a negative
 * errno. */
int commands_add_proxy(struct wexport *e);

/* ---- wrapper.c ------------------------------------------------------------------- */

/* Stop gracefully, as on SIGTERM. */
void wrapper_stop(struct wrapper *w);

#endif
