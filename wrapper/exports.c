/* exports.c - xnbd-wrapper's table of exports: opening targets and
 * proxies, adding them to the server, removing them while clients are
 * connected, retrying those that failed.  See the notes in wrapper.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "logsink.h"
#include "wrapper.h"

void wexport_error(struct wexport *e, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	char *msg = logsink_vformat(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	free(e->error);
	e->error = msg != buf ? msg : strdup(msg);
}

struct wexport *wexport_find(struct wrapper *w, const char *name)
{
	for (struct wexport *e = w->exports; e; e = e->next)
		if (strcmp(e->name, name) == 0)
			return e;
	return NULL;
}

char *canon_path(const char *path)
{
	char *r = realpath(path, NULL);
	if (r || errno != ENOENT)
		return r ? r : strdup(path);
	/* Not there yet (a cache or bitmap made at open): its directory's
	 * real path and its own name. */
	const char *slash = strrchr(path, '/');
	const char *base = slash ? slash + 1 : path;
	char *dir =
	    slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path))
	          : strdup(".");
	char *rdir = dir ? realpath(dir, NULL) : NULL;
	free(dir);
	if (!rdir || !*base || strcmp(base, ".") == 0 ||
	    strcmp(base, "..") == 0) {
		free(rdir);
		return strdup(path);
	}
	char *out = NULL;
	if (asprintf(&out, "%s/%s", strcmp(rdir, "/") == 0 ? "" : rdir, base) <
	    0)
		out = NULL;
	free(rdir);
	return out;
}

void fileid_make(const char *path, struct fileid *id)
{
	memset(id, 0, sizeof(*id));
	if (!path)
		return;
	id->path = path;
	id->canon = canon_path(path);
	struct stat st;
	if (stat(path, &st) == 0) {
		id->have_ino = 1;
		id->dev = st.st_dev;
		id->ino = st.st_ino;
	}
}

void fileid_free(struct fileid *id)
{
	free(id->canon);
	id->canon = NULL;
}

/* Do a and b name one file: the same canonical path, or (hard links) the
 * same inode? */
static int fileid_same(const struct fileid *a, const struct fileid *b)
{
	if (!a->path || !b->path)
		return 0;
	if (strcmp(a->path, b->path) == 0)
		return 1;
	if (a->canon && b->canon && strcmp(a->canon, b->canon) == 0)
		return 1;
	return a->have_ino && b->have_ino && a->dev == b->dev &&
	       a->ino == b->ino;
}

static int same_file(const char *a, const char *b)
{
	struct fileid ia, ib;
	fileid_make(a, &ia);
	fileid_make(b, &ib);
	int same = fileid_same(&ia, &ib);
	fileid_free(&ia);
	fileid_free(&ib);
	return same;
}

void wexport_ids(const struct wexport *e, struct fileid ids[3])
{
	fileid_make(e->file, &ids[0]);
	fileid_make(e->bitmap, &ids[1]);
	fileid_make(e->ctlsock, &ids[2]);
}

const char *wexport_clash_ids(const struct wexport *a,
                              const struct fileid ia[3],
                              const struct wexport *b,
                              const struct fileid ib[3])
{
	if (a != b && a->type == W_TARGET && b->type == W_TARGET)
		return NULL;
	for (int j = 0; j < 3; j++)
		for (int i = a == b ? j + 1 : 0; i < 3; i++)
			if (fileid_same(&ia[i], &ib[j]))
				return ia[i].path;
	return NULL;
}

struct wexport *wexport_using(struct wrapper *w, const char *path)
{
	struct fileid id;
	fileid_make(path, &id);
	struct wexport *lists[] = {w->exports, w->retired}, *found = NULL;
	for (int l = 0; l < 2 && !found; l++)
		for (struct wexport *e = lists[l]; e && !found; e = e->next) {
			struct fileid ids[3];
			wexport_ids(e, ids);
			for (int i = 0; i < 3 && !found; i++)
				if (fileid_same(&ids[i], &id))
					found = e;
			for (int i = 0; i < 3; i++)
				fileid_free(&ids[i]);
		}
	fileid_free(&id);
	return found;
}

const char *wexport_clash(const struct wexport *a, const struct wexport *b)
{
	struct fileid ia[3], ib[3];
	wexport_ids(a, ia);
	wexport_ids(b, ib);
	const char *path = wexport_clash_ids(a, ia, b, ib);
	for (int i = 0; i < 3; i++) {
		fileid_free(&ia[i]);
		fileid_free(&ib[i]);
	}
	return path;
}

const char *wexport_bad_name(const char *name)
{
	if (xnbd_export_name_check(name) < 0)
		return strlen(name) > XNBD_MAX_STRING
		           ? "export names are at most 4096 bytes long"
		           : "export names must be UTF-8 text";
	if (word_len(name) > MAX_WORD)
		return "the export name is too long for the control protocol's "
		       "lines once encoded";
	return NULL;
}

const char *wrapper_file(struct wrapper *w, const char *path)
{
	const struct {
		const char *path, *what;
	} own[] = {
	    {w->db_abs, "the export list"},
	    {w->db_tmp_abs, "the export list's temporary file"},
	    {w->socket_abs, "the wrapper's control socket"},
	    {w->pidfile_abs, "the wrapper's pid file"},
	    {w->log_abs, "the wrapper's log file"},
	};
	for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
		if (own[i].path && same_file(own[i].path, path))
			return own[i].what;
	return NULL;
}

static void entry_free(struct wexport *e)
{
	free(e->name);
	free(e->file);
	free(e->rhost);
	free(e->rport);
	free(e->rname);
	free(e->bitmap);
	free(e->ctlsock);
	free(e->error);
	free(e);
}

static int dup_opt(char **dst, const char *src)
{
	if (!src)
		return 0;
	*dst = strdup(src);
	return *dst ? 0 : -1;
}

struct wexport *wexport_new(struct wrapper *w, enum wtype type,
                            const char *name, const char *file,
                            const char *rhost, const char *rport,
                            const char *rname, const char *bitmap,
                            const char *ctlsock)
{
	struct wexport *e = calloc(1, sizeof(*e));
	if (!e)
		return NULL;
	e->w = w;
	e->type = type;
	e->state = W_FAILED; /* until opened */
	if (dup_opt(&e->name, name) || dup_opt(&e->file, file) ||
	    dup_opt(&e->rhost, rhost) || dup_opt(&e->rport, rport) ||
	    dup_opt(&e->rname, rname) || dup_opt(&e->bitmap, bitmap) ||
	    dup_opt(&e->ctlsock, ctlsock)) {
		entry_free(e);
		return NULL;
	}
	return e;
}

void wexport_append(struct wrapper *w, struct wexport *e)
{
	struct wexport **pp = &w->exports;
	while (*pp)
		pp = &(*pp)->next;
	e->next = NULL;
	*pp = e;
}

static void unlink_from(struct wexport **head, struct wexport *e)
{
	for (struct wexport **pp = head; *pp; pp = &(*pp)->next)
		if (*pp == e) {
			*pp = e->next;
			break;
		}
	e->next = NULL;
}

/* ---- proxies are freed from the loop, never inside their callbacks ---------- */

static void reaper_cb(uv_timer_t *t)
{
	struct wrapper *w = t->data;
	while (w->nreap)
		xnbd_proxy_free(w->reap[--w->nreap]);
}

static void reap_proxy(struct wrapper *w, struct xnbd_proxy *p)
{
	if (w->nreap == w->reap_cap) {
		size_t cap = w->reap_cap ? 2 * w->reap_cap : 8;
		struct xnbd_proxy **n = realloc(w->reap, cap * sizeof(*n));
		if (!n) {
			/* Leaking a proxy beats freeing it under its own feet. */
			logsink_printf(XNBD_LOG_ERR,
			               "out of memory freeing a proxy");
			return;
		}
		w->reap = n;
		w->reap_cap = cap;
	}
	w->reap[w->nreap++] = p;
	uv_timer_start(&w->reaper, reaper_cb, 0, 0);
}

void reaper_flush_and_close(struct wrapper *w)
{
	reaper_cb(&w->reaper);
	uv_close((uv_handle_t *)&w->reaper, NULL);
}

/* Everything e holds but its table entry.  Not inside a callback of e's
 * proxy.  A proxy still opening is abandoned: freeing it frees its
 * upstream client, after which no callback of the opening runs. */
static void release(struct wexport *e)
{
	xnbd_control_free(e->pctl);
	e->pctl = NULL;
	xnbd_export_free(e->export);
	e->export = NULL;
	xnbd_proxy_free(e->proxy); /* syncs the cache and bitmap, then frees */
	e->proxy = NULL;
	xnbd_backend_free(e->cow);
	e->cow = NULL;
	xnbd_backend_free(e->image);
	e->image = NULL;
	if (e->req) {
		xnbd_control_finish(
		    e->req, -ECANCELED,
		    "the export was removed before it was ready");
		e->req = NULL;
	}
}

/* ---- opening ------------------------------------------------------------------- */

static int add_to_server(struct wexport *e, struct xnbd_backend *b)
{
	struct wrapper *w = e->w;
	int r = xnbd_export_new(
	    e->name, b, w->cfg.readonly ? XNBD_EXPORT_READONLY : 0, &e->export);
	if (r == 0)
		r = xnbd_export_set_description(e->export, e->file);
	if (r == 0)
		r = xnbd_server_add_export(w->srv, e->export);
	if (r < 0) {
		wexport_error(e, "%s",
		              r == -EINVAL ? "the export name is too long"
		              : r == -EEXIST
		                  ? "an export of that name is served"
		                  : strerror(-r));
		xnbd_export_free(e->export);
		e->export = NULL;
		return r;
	}
	e->state = W_SERVING;
	free(e->error);
	e->error = NULL;
	return 0;
}

int wexport_open_target(struct wexport *e)
{
	struct wrapper *w = e->w;
	int cow = w->cfg.cow && !w->cfg.readonly;
	int r = xnbd_backend_file_open(
	    w->loop, e->file,
	    (w->cfg.readonly || w->cfg.cow) ? XNBD_OPEN_READONLY : 0,
	    &e->image);
	if (r < 0) {
		wexport_error(e, "cannot open image %s: %s", e->file,
		              r == -EINVAL
		                  ? "not a regular file or block device"
		                  : strerror(-r));
		goto fail;
	}
	/* A read-only CoW target is its base served read-only: no overlay. */
	if (cow) {
		r = xnbd_backend_cow_new(w->loop, e->image, NULL,
		                         XNBD_COW_TEMPORARY, &e->cow);
		if (r < 0) {
			wexport_error(
			    e, "cannot create the overlay of %s in %s: %s",
			    e->file, xnbd_backend_cow_default_dir(),
			    strerror(-r));
			goto fail;
		}
	}
	r = add_to_server(e, e->cow ? e->cow : e->image);
	if (r < 0)
		goto fail;
	return 0;
fail:
	release(e);
	e->state = W_FAILED;
	e->retry_at = uv_now(w->loop) + RETRY_MS;
	return r;
}

static const char *proxy_open_error(int st)
{
	switch (st) {
	case -EBADMSG:
		return "the bitmap is damaged or not an xNBD bitmap";
	case -EINVAL:
		return "the bitmap was made for another image";
	case -EFBIG:
		return "the cache image is larger than the upstream export";
	default:
		return strerror(-st);
	}
}

/* The proxy is open: its own control socket, then the export. */
static int proxy_ready(struct wexport *e)
{
	struct wrapper *w = e->w;
	int r = xnbd_control_new(w->loop, &e->pctl);
	if (r == 0) {
		xnbd_control_set_log(e->pctl, logsink_write, NULL);
		r = xnbd_control_set_program(e->pctl,
		                             PROG "/" XNBD_WRAPPER_VERSION);
	}
	if (r == 0)
		r = commands_add_proxy(e);
	if (r < 0) {
		wexport_error(e, "%s", strerror(-r));
		return r;
	}
	r = xnbd_control_listen(e->pctl, e->ctlsock);
	if (r < 0) {
		wexport_error(
		    e, "cannot open the control socket %s: %s", e->ctlsock,
		    r == -EADDRINUSE ? "a running program listens there"
		    : r == -EEXIST   ? "a file that is not a socket is in "
		                       "the way"
		                     : strerror(-r));
		return r;
	}
	return add_to_server(e, xnbd_proxy_backend(e->proxy));
}

static void proxy_opened(struct xnbd_proxy *p, int status, void *ud)
{
	struct wexport *e = ud;
	struct wrapper *w = e->w;
	if (status < 0)
		wexport_error(e, "cannot open the proxy of %s:%s: %s", e->rhost,
		              e->rport, proxy_open_error(status));
	else
		status = proxy_ready(e);
	if (status < 0) {
		xnbd_control_free(e->pctl);
		e->pctl = NULL;
		e->proxy = NULL;
		reap_proxy(w, p); /* not here: we are inside its callback */
		e->state = W_FAILED;
		e->retry_at = uv_now(w->loop) + RETRY_MS;
	}
	wexport_cb done = e->done;
	e->done = NULL;
	if (done)
		done(e, status);
}

int wexport_open_proxy(struct wexport *e, wexport_cb done)
{
	struct wrapper *w = e->w;
	int r = xnbd_proxy_new(w->loop, &e->proxy);
	if (r < 0) {
		wexport_error(e, "%s", strerror(-r));
		return r;
	}
	xnbd_proxy_set_log(e->proxy, logsink_write, NULL);
	e->state = W_OPENING;
	e->done = done;
	r = xnbd_proxy_open(
	    e->proxy, e->rhost, e->rport, e->rname, e->file, e->bitmap,
	    w->cfg.readonly ? XNBD_PROXY_READONLY : 0, proxy_opened, e);
	if (r < 0) {
		wexport_error(e, "cannot open the proxy of %s:%s: %s", e->rhost,
		              e->rport, strerror(-r));
		xnbd_proxy_free(e->proxy);
		e->proxy = NULL;
		e->done = NULL;
		e->state = W_FAILED;
		e->retry_at = uv_now(w->loop) + RETRY_MS;
	}
	return r;
}

/* ---- removing ------------------------------------------------------------------- */

static void removed(struct xnbd_server *s, struct xnbd_export *x, void *ud)
{
	struct wexport *e = ud;
	struct wrapper *w = e->w;
	logsink_printf(XNBD_LOG_INFO, "export '%s': its last client has gone",
	               e->name);
	unlink_from(&w->retired, e);
	release(e);
	entry_free(e);
}

size_t wexport_remove(struct wexport *e)
{
	struct wrapper *w = e->w;
	unlink_from(&w->exports, e);
	if (e->state != W_SERVING) {
		wexport_discard(e);
		return 0;
	}
	/* The proxy's own control socket goes now: its path is free for a new
	 * export, and nobody steers a proxy that is on its way out. */
	xnbd_control_free(e->pctl);
	e->pctl = NULL;
	size_t clients = xnbd_export_client_count(e->export);
	int r = xnbd_server_remove_export(w->srv, e->export, removed, e);
	if (r < 0) {
		/* The server does not hold it (or has stopped): nobody uses it. */
		logsink_printf(XNBD_LOG_WARNING, "export '%s': %s", e->name,
		               strerror(-r));
		release(e);
		entry_free(e);
		return 0;
	}
	/* Its files stay in use until then: no new export may take them. */
	e->next = w->retired;
	w->retired = e;
	return clients;
}

void wexport_discard(struct wexport *e)
{
	release(e);
	entry_free(e);
}

void wexport_free_at_exit(struct wexport *e)
{
	if (e->req) {
		xnbd_control_finish(e->req, -ESHUTDOWN,
		                    "the wrapper is stopping");
		e->req = NULL;
	}
	release(e);
	entry_free(e);
}

/* ---- retrying ------------------------------------------------------------------- */

static void retried(struct wexport *e, int status)
{
	if (status == 0)
		logsink_printf(XNBD_LOG_NOTICE, "export '%s' is served again",
		               e->name);
	else
		logsink_printf(XNBD_LOG_WARNING,
		               "export '%s' still fails: %s; trying "
		               "again in %d s",
		               e->name, e->error, RETRY_MS / 1000);
}

void wexport_retry(struct wrapper *w)
{
	uint64_t now = uv_now(w->loop);
	for (struct wexport *e = w->exports; e; e = e->next) {
		if (e->state != W_FAILED || now < e->retry_at)
			continue;
		if (e->type == W_TARGET) {
			retried(e, wexport_open_target(e));
		} else if (wexport_open_proxy(e, retried) < 0) {
			retried(e, -1);
		}
	}
}
