/* db.c - the export list file (--dbpath): what xnbd-wrapper serves, kept
 * across restarts.  The format is in xnbd-wrapper(8):
 *
 *     # comment
 *     xnbd-wrapper-db 1
 *     target NAME FILE
 *     proxy NAME RHOST RPORT EXPORTNAME CACHE BITMAP CTLSOCK
 *     end COUNT
 *
 * Words are percent-encoded as on the control channel.  The closing
 * `end COUNT` line makes a file cut short at a line boundary detectable:
 * a file that breaks any rule is refused as a whole, never read in part,
 * since dropping an export silently is the one thing the file must not
 * cause.  It is written whole to FILE.tmp, synced and renamed over FILE
 * (and the directory synced), so a crash leaves the old or the new list.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "logsink.h"
#include "wrapper.h"

#define DB_MAGIC "xnbd-wrapper-db"
#define DB_VERSION "1"
#define DB_MAX_LINE (64 * 1024)

void db_free(struct dbent *ents, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		struct dbent *d = &ents[i];
		free(d->name);
		free(d->file);
		free(d->rhost);
		free(d->rport);
		free(d->rname);
		free(d->bitmap);
		free(d->ctlsock);
	}
	free(ents);
}

__attribute__((format(printf, 5, 6))) static int bad(char *err, size_t errlen,
                                                     const char *path,
                                                     unsigned line,
                                                     const char *fmt, ...)
{
	va_list ap;
	int n = line ? snprintf(err, errlen, "%s:%u: ", path, line)
	             : snprintf(err, errlen, "%s: ", path);
	if (n < 0 || (size_t)n >= errlen)
		return -1;
	va_start(ap, fmt);
	vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
	va_end(ap);
	return -1;
}

static int dup_words(struct dbent *d, char **av, int ac)
{
	char **dst[] = {&d->name, &d->file};
	char **pdst[] = {&d->name, &d->rhost,  &d->rport,  &d->rname,
	                 &d->file, &d->bitmap, &d->ctlsock};
	char ***t = d->type == W_TARGET ? dst : pdst;
	for (int i = 0; i < ac; i++)
		if (!(*t[i] = strdup(av[i])))
			return -1;
	return 0;
}

/* Parse the lines of the file held in buf (NUL-terminated). */
static int parse(char *buf, size_t len, const char *path, struct dbent **ents,
                 size_t *nents, char *err, size_t errlen)
{
	struct dbent *v = NULL;
	size_t n = 0;
	int header = 0, ended = 0;
	unsigned lineno = 0;
	char *p = buf, *av[16];
	if (len && buf[len - 1] != '\n')
		goto cut;
	while (p < buf + len) {
		char *nl = memchr(p, '\n', (size_t)(buf + len - p));
		*nl = '\0';
		char *line = p;
		p = nl + 1;
		lineno++;
		if (line[0] == '#' || line[0] == '\0')
			continue;
		if (ended) {
			bad(err, errlen, path, lineno,
			    "text after the 'end' line");
			goto fail;
		}
		int ac = words_split(line, av, 16);
		if (ac < 0) {
			bad(err, errlen, path, lineno, "badly encoded words");
			goto fail;
		}
		if (!header) {
			if (ac != 2 || strcmp(av[0], DB_MAGIC) != 0) {
				bad(err, errlen, path, lineno,
				    "not an xnbd-wrapper export list (no '" DB_MAGIC
				    " " DB_VERSION "' line)");
				goto fail;
			}
			if (strcmp(av[1], DB_VERSION) != 0) {
				bad(err, errlen, path, lineno,
				    "export list version %s; this program reads version " DB_VERSION,
				    av[1]);
				goto fail;
			}
			header = 1;
			continue;
		}
		if (strcmp(av[0], "end") == 0) {
			char *e;
			unsigned long cnt =
			    ac == 2 ? strtoul(av[1], &e, 10) : 0;
			if (ac != 2 || !*av[1] || *e || cnt != n) {
				bad(err, errlen, path, lineno,
				    "the 'end' line does not count the %zu entries above it",
				    n);
				goto fail;
			}
			ended = 1;
			continue;
		}
		enum wtype type;
		int want;
		if (strcmp(av[0], "target") == 0) {
			type = W_TARGET;
			want = 3;
		} else if (strcmp(av[0], "proxy") == 0) {
			type = W_PROXY;
			want = 8;
		} else {
			bad(err, errlen, path, lineno, "unknown entry '%s'",
			    av[0]);
			goto fail;
		}
		if (ac != want) {
			bad(err, errlen, path, lineno,
			    "'%s' takes %d words, not %d", av[0], want - 1,
			    ac - 1);
			goto fail;
		}
		for (size_t i = 0; i < n; i++)
			if (strcmp(v[i].name, av[1]) == 0) {
				bad(err, errlen, path, lineno,
				    "export '%s' is listed twice (line %u)",
				    av[1], v[i].line);
				goto fail;
			}
		struct dbent *nv = realloc(v, (n + 1) * sizeof(*nv));
		if (!nv) {
			bad(err, errlen, path, 0, "out of memory");
			goto fail;
		}
		v = nv;
		memset(&v[n], 0, sizeof(v[n]));
		v[n].type = type;
		v[n].line = lineno;
		n++;
		if (dup_words(&v[n - 1], av + 1, ac - 1) < 0) {
			bad(err, errlen, path, 0, "out of memory");
			goto fail;
		}
		struct dbent *d = &v[n - 1];
		if (type == W_PROXY) {
			if (!*d->rhost || !xnbd_port_valid(d->rport)) {
				bad(err, errlen, path, lineno,
				    "invalid upstream '%s' port '%s' "
				    "(1 to 65535)",
				    d->rhost, d->rport);
				goto fail;
			}
		}
		const char *paths[] = {d->file, d->bitmap, d->ctlsock};
		for (int i = 0; i < (type == W_TARGET ? 1 : 3); i++)
			if (paths[i][0] != '/') {
				bad(err, errlen, path, lineno,
				    "'%s' is not an absolute path", paths[i]);
				goto fail;
			}
	}
	if (!header && n == 0 && lineno == 0) {
		/* An empty file: a list never written to, e.g. made by touch(1). */
		*ents = NULL;
		*nents = 0;
		return 0;
	}
	if (!header) {
		bad(err, errlen, path, 0,
		    "no '" DB_MAGIC " " DB_VERSION "' line");
		goto fail;
	}
	if (!ended)
		goto cut;
	*ents = v;
	*nents = n;
	return 0;
cut:
	bad(err, errlen, path, 0, "the file is cut short (no 'end' line)");
fail:
	db_free(v, n);
	return -1;
}

int db_load(const char *path, struct dbent **ents, size_t *n, char *err,
            size_t errlen)
{
	*ents = NULL;
	*n = 0;
	FILE *f = fopen(path, "re");
	if (!f) {
		if (errno == ENOENT)
			return 0;
		return bad(err, errlen, path, 0, "%s", strerror(errno));
	}
	char *buf = NULL;
	size_t len = 0, cap = 0;
	for (;;) {
		if (cap - len < 4096) {
			cap = cap ? cap * 2 : 8192;
			char *nb = realloc(buf, cap + 1);
			if (!nb) {
				free(buf);
				fclose(f);
				return bad(err, errlen, path, 0,
				           "out of memory");
			}
			buf = nb;
		}
		size_t got = fread(buf + len, 1, cap - len, f);
		len += got;
		if (got == 0)
			break;
	}
	int rerr = ferror(f);
	fclose(f);
	if (rerr) {
		free(buf);
		return bad(err, errlen, path, 0, "read error");
	}
	if (memchr(buf, '\0', len)) {
		free(buf);
		return bad(err, errlen, path, 0, "a NUL byte: not a text file");
	}
	buf[len] = '\0';
	int r = parse(buf, len, path, ents, n, err, errlen);
	free(buf);
	return r;
}

/* ---- writing ------------------------------------------------------------------ */

/* One line of words, each encoded (word_append leaves room for the
 * separator after the word). */
static int put_line(char **b, size_t *len, size_t *cap, const char *const *w,
                    int n)
{
	for (int i = 0; i < n; i++) {
		if (word_append(b, len, cap, w[i]) < 0)
			return -ENOMEM;
		(*b)[(*len)++] = i + 1 < n ? ' ' : '\n';
		(*b)[*len] = '\0';
	}
	return 0;
}

/* The file's text for the table now. */
static char *render(struct wrapper *w)
{
	char *b = NULL;
	size_t len = 0, cap = 0, count = 0;
	const char *head[] = {
	    "#",    "export", "list", "of",  "xnbd-wrapper(8):", "do", "not",
	    "edit", "while",  "it",   "runs"};
	if (put_line(&b, &len, &cap, head, 11) < 0)
		goto oom;
	const char *magic[] = {DB_MAGIC, DB_VERSION};
	if (put_line(&b, &len, &cap, magic, 2) < 0)
		goto oom;
	for (struct wexport *e = w->exports; e; e = e->next) {
		if (e->dropping || e->from_request)
			continue;
		int r;
		struct xnbd_proxy *p = e->state == W_SERVING ? e->proxy : NULL;
		if (e->type == W_TARGET ||
		    (p && xnbd_proxy_state(p) == XNBD_PROXY_SWITCHED)) {
			/* A switched proxy is a target on its cache from now on. */
			const char *v[] = {"target", e->name, e->file};
			r = put_line(&b, &len, &cap, v, 3);
		} else {
			/* The upstream as it is now: a reconnect moves it. */
			const char *v[] = {
			    "proxy",
			    e->name,
			    p ? xnbd_proxy_upstream_host(p) : e->rhost,
			    p ? xnbd_proxy_upstream_port(p) : e->rport,
			    p ? xnbd_proxy_upstream_name(p) : e->rname,
			    e->file,
			    e->bitmap,
			    e->ctlsock,
			};
			r = put_line(&b, &len, &cap, v, 8);
		}
		if (r < 0)
			goto oom;
		count++;
	}
	char num[32];
	snprintf(num, sizeof(num), "%zu", count);
	const char *end[] = {"end", num};
	if (put_line(&b, &len, &cap, end, 2) < 0)
		goto oom;
	return b;
oom:
	free(b);
	return NULL;
}

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(fd, p, n);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static int write_atomically(const char *path, const char *text)
{
	size_t pl = strlen(path);
	char *tmp = malloc(pl + 5);
	if (!tmp)
		return -ENOMEM;
	memcpy(tmp, path, pl);
	memcpy(tmp + pl, ".tmp", 5);
	int r = 0;
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	r = write_all(fd, text, strlen(text));
	if (r == 0 && fsync(fd) != 0)
		r = -errno;
	if (close(fd) != 0 && r == 0)
		r = -errno;
	if (r == 0 && rename(tmp, path) != 0)
		r = -errno;
	if (r < 0) {
		unlink(tmp);
		goto out;
	}
	/* The rename is durable once the directory is. */
	char *slash = strrchr(path, '/');
	char *dir =
	    slash == path ? strdup("/") : strndup(path, (size_t)(slash - path));
	if (!dir) {
		r = -ENOMEM;
		goto out;
	}
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	free(dir);
	if (dfd < 0 || fsync(dfd) != 0)
		r = -errno;
	if (dfd >= 0)
		close(dfd);
out:
	free(tmp);
	return r;
}

int db_sync(struct wrapper *w)
{
	if (!w->db_abs)
		return 0;
	char *text = render(w);
	if (!text)
		return -ENOMEM;
	if (w->db_saved && strcmp(text, w->db_saved) == 0) {
		free(text);
		return 0;
	}
	int r = write_atomically(w->db_abs, text);
	if (r < 0) {
		free(text);
		if (!w->db_failing)
			logsink_printf(XNBD_LOG_ERR,
			               "cannot write the export list %s: %s",
			               w->db_abs, strerror(-r));
		w->db_failing = 1;
		return r;
	}
	if (w->db_failing)
		logsink_printf(XNBD_LOG_NOTICE,
		               "the export list %s is written again",
		               w->db_abs);
	w->db_failing = 0;
	free(w->db_saved);
	w->db_saved = text;
	return 0;
}
