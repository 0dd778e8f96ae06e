/* ctlout.c - what the control tools (xnbd-bgctl, xnbd-wrapper-ctl) share
 * to show a reply: its info lines kept as key/value pairs, those as JSON,
 * why a call failed, and cache-all progress.  Both tools link this file
 * (as the servers link server/logsink.c). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "ctlout.h"

int kvs_collect(const struct xnbd_ctl_line *l, void *ud)
{
	struct kvs *k = ud;
	if (strcmp(l->kind, "info") != 0)
		return 0;
	if (k->n == k->cap) {
		size_t cap = k->cap ? 2 * k->cap : 32;
		struct kv *v = realloc(k->v, cap * sizeof(*v));
		if (!v) {
			k->oom = 1;
			return 1;
		}
		k->v = v;
		k->cap = cap;
	}
	k->v[k->n].key = strdup(l->key);
	k->v[k->n].value = strdup(l->value);
	k->n++;
	if (!k->v[k->n - 1].key || !k->v[k->n - 1].value) {
		k->oom = 1;
		return 1;
	}
	return 0;
}

const char *kvs_field(const struct kvs *k, size_t from, size_t to,
                      const char *key)
{
	for (size_t i = from; i < to; i++)
		if (strcmp(k->v[i].key, key) == 0)
			return k->v[i].value;
	return NULL;
}

void kvs_free(struct kvs *k)
{
	for (size_t i = 0; i < k->n; i++) {
		free(k->v[i].key);
		free(k->v[i].value);
	}
	free(k->v);
}

/* The length of the well-formed UTF-8 sequence at p, or 0. */
static size_t utf8_seq(const unsigned char *p)
{
	unsigned c = p[0];
	size_t n;
	unsigned min, v;
	if (c >= 0xc2 && c <= 0xdf) {
		n = 2;
		min = 0x80;
		v = c & 0x1f;
	} else if (c >= 0xe0 && c <= 0xef) {
		n = 3;
		min = 0x800;
		v = c & 0x0f;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4;
		min = 0x10000;
		v = c & 0x07;
	} else {
		return 0;
	}
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		v = v << 6 | (p[i] & 0x3fU);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	return n;
}

/* A JSON string; bytes that are not UTF-8 (a file name may hold any)
 * become U+FFFD, so the output is always valid JSON. */
static void json_string(const char *s)
{
	putchar('"');
	for (const unsigned char *p = (const unsigned char *)s; *p;) {
		if (*p == '"' || *p == '\\') {
			printf("\\%c", *p++);
		} else if (*p < 0x20) {
			printf("\\u%04x", *p++);
		} else if (*p < 0x80) {
			putchar(*p++);
		} else {
			size_t n = utf8_seq(p);
			if (n) {
				fwrite(p, 1, n, stdout);
				p += n;
			} else {
				fputs("\\ufffd", stdout);
				p++;
			}
		}
	}
	putchar('"');
}

/* A value that is a plain decimal number goes out as a JSON number when
 * its key is one of these, whose values are always numbers; any other
 * value stays a string, so that a name or a path made of digits is not
 * mistaken for one. */
static int numeric_key(const char *key)
{
	static const char *const keys[] = {
	    "size",
	    "block-size",
	    "blocks",
	    "cached-blocks",
	    "cached-percent",
	    "waiting-requests",
	    "clients",
	    "queued-requests",
	    "max-queue-size",
	    "buffered-bytes",
	    "max-buf-size",
	    "fetch-window",
	    "upstream-latency-us",
	};
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if (strcmp(key, keys[i]) == 0)
			return 1;
	return 0;
}

static int is_number(const char *s)
{
	int digits = 0, dot = 0;
	for (; *s; s++) {
		if (*s >= '0' && *s <= '9')
			digits++;
		else if (*s == '.' && !dot && digits)
			dot = 1;
		else
			return 0;
	}
	return digits > 0;
}

void json_object(const struct kvs *k, size_t from, size_t to)
{
	printf("{");
	for (size_t i = from; i < to; i++) {
		printf(i > from ? ", " : "");
		json_string(k->v[i].key);
		printf(": ");
		if (numeric_key(k->v[i].key) && is_number(k->v[i].value))
			printf("%s", k->v[i].value);
		else
			json_string(k->v[i].value);
	}
	printf("}");
}

const char *or_dash(const char *s)
{
	return s ? s : "-";
}

void ctl_open_failed(const struct ctl_peer *p, const char *sock, int r)
{
	switch (r) {
	case -ENOENT:
	case -ECONNREFUSED:
		fprintf(stderr, "%s: %s: %s (is %s running?)\n", p->prog, sock,
		        r == -ENOENT ? "no such socket"
		                     : "nobody listens there",
		        p->running);
		break;
	case -EPROTO:
		fprintf(stderr, "%s: %s: not an xNBD control socket\n", p->prog,
		        sock);
		break;
	case -EPROTONOSUPPORT:
		fprintf(stderr,
		        "%s: %s: the %s speaks another control protocol "
		        "version\n",
		        p->prog, sock, p->name);
		break;
	default:
		fprintf(stderr, "%s: %s: %s\n", p->prog, sock, strerror(-r));
		break;
	}
}

void ctl_call_failed(const struct ctl_peer *p, const char *cmd, int r,
                     const char *msg)
{
	if (msg)
		fprintf(stderr, "%s: %s: %s\n", p->prog, cmd, msg);
	else if (r == -ECONNRESET)
		fprintf(stderr,
		        "%s: %s: the %s closed the connection before "
		        "answering\n",
		        p->prog, cmd, p->name);
	else
		fprintf(stderr, "%s: %s: %s\n", p->prog, cmd, strerror(-r));
}

static uint64_t now_ms(void)
{
	struct timeval tv;
	gettimeofday(&tv, NULL);
	return (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
}

int on_progress(const struct xnbd_ctl_line *l, void *ud)
{
	struct prog *p = ud;
	if (!p->enabled || strcmp(l->kind, "progress") != 0 || l->total == 0)
		return 0;
	double pct = (double)l->done * 100.0 / (double)l->total;
	if (p->tty) {
		if (p->bar) {
			int width = 40, fill = (int)(pct / 100.0 * width);
			char bar[41];
			memset(bar, '#', (size_t)fill);
			memset(bar + fill, '-', (size_t)(width - fill));
			bar[width] = 0;
			printf("\r[%s] %6.2f%% %" PRIu64 "/%" PRIu64 " blocks",
			       bar, pct, l->done, l->total);
		} else {
			printf("\r%6.2f%% %" PRIu64 "/%" PRIu64 " blocks", pct,
			       l->done, l->total);
		}
		fflush(stdout);
		p->drawn = 1;
		return 0;
	}
	/* Without a terminal: a line a second at most, and the last one. */
	uint64_t t = now_ms();
	if (l->done != l->total && t - p->last_ms < 1000)
		return 0;
	p->last_ms = t;
	printf("cached %" PRIu64 " of %" PRIu64 " blocks (%.2f%%)\n", l->done,
	       l->total, pct);
	fflush(stdout);
	return 0;
}
