/* ctlout.h - what the control tools (xnbd-bgctl, xnbd-wrapper-ctl) share
 * to show a reply or why there is none (see ctlout.c). */
#ifndef XNBD_CTLOUT_H
#define XNBD_CTLOUT_H

#include <stddef.h>
#include <stdint.h>

#include <xnbd/xnbd.h>

/* A reply's info lines, in the order they came. */
struct kv {
	char *key, *value;
};

struct kvs {
	struct kv *v;
	size_t n, cap;
	int oom; /* a line could not be kept */
};

/* An xnbd_ctl_line_cb keeping each info line in the struct kvs ud; without
 * memory it sets oom and returns 1, which cancels the call. */
int kvs_collect(const struct xnbd_ctl_line *l, void *ud);

/* The value of key among the pairs [from, to), or NULL. */
const char *kvs_field(const struct kvs *k, size_t from, size_t to,
                      const char *key);

void kvs_free(struct kvs *k);

/* The pairs [from, to) as one JSON object. */
void json_object(const struct kvs *k, size_t from, size_t to);

/* s, or "-" for a value the reply lacks. */
const char *or_dash(const char *s);

/* Who answers on the control socket, as the messages below name it. */
struct ctl_peer {
	const char *prog;    /* ours, first on each message */
	const char *running; /* "(is <running> running?)" */
	const char *name;    /* "the <name> closed the connection" */
};

/* Say on stderr why xnbd_ctl_open(sock) failed with r. */
void ctl_open_failed(const struct ctl_peer *p, const char *sock, int r);

/* Say on stderr why the command cmd failed: the peer's message msg, or
 * else r from xnbd_ctl_call. */
void ctl_call_failed(const struct ctl_peer *p, const char *cmd, int r,
                     const char *msg);

/* cache-all progress, shown when enabled: on a terminal one line redrawn
 * (with a bar of # and - if bar), else a line a second at most. */
struct prog {
	int enabled, tty, bar, drawn;
	uint64_t last_ms;
};

/* An xnbd_ctl_line_cb for progress lines, ud a struct prog. */
int on_progress(const struct xnbd_ctl_line *l, void *ud);

#endif
