/* fetchctl.h - how many bytes of fetches a proxy keeps in flight upstream:
 * its fetch window (private).
 *
 * Fetches piled up behind the proxy buy nothing and cost it CPU: on
 * loopback the upstream's transmit then runs in the proxy's own thread
 * (the proxy's reads open the TCP window, and the upstream's queued
 * segments go out from inside them), and the data goes cold in memory
 * before it is read.  Too few starve an upstream far away, or one that is
 * slow per request but serves many at once.
 *
 * So the window is FC_BDP bandwidth-delay products (Little's law): the
 * best of the last three epochs' fetch rates, measured over FC_EPOCH_NS
 * (the clients' pace, or the upstream's once the window holds fetches
 * back, so that it grows with it), times the least latency seen of a
 * large fetch (FC_SAMPLE_MIN bytes or more).  Queues only ever lengthen
 * latency, so the least one is the upstream's own; every FC_PROBE_NS it is
 * measured afresh, as the way to the upstream may have changed: once the
 * fetches in flight are back, FC_PROBE_N are sent at once and no more
 * until they are back too (at most FC_PROBE_MAX_NS); the first of them to
 * arrive waited for no other.  The first measurement is such a probe too,
 * at the end of the first epoch.  An epoch with fewer than FC_PROBE_N
 * large fetches starts no probe (small fetches give no sample, and would
 * only be held back).  An epoch lasts FC_EPOCH_NS and four latencies at
 * least, as a far upstream's replies come in bursts of a round trip.
 * A gap with nothing in flight shorter than FC_EPOCH_NS stays in the epoch
 * (clients that ask for the next block once the last is back make such
 * gaps; their pace is what the epoch measures); a longer one ends it.
 * These are BBR's bandwidth and round-trip filters, applied to requests
 * instead of segments.  The window is at least FC_MIN: two of the largest
 * fetches, one arriving while the other is sent.
 *
 * The caller passes the time (ns, monotonic) to every call, so the unit
 * tests can run it against a simulated upstream. */
#ifndef XNBD_FETCHCTL_H
#define XNBD_FETCHCTL_H

#include <stdbool.h>
#include <stdint.h>

#define FC_MIN (2ULL << 20)          /* the least window: 2 fetches of 1 MiB */
#define FC_START (64ULL << 20)       /* ... until a first estimate */
#define FC_BDP 3                     /* the window: this many BDPs */
#define FC_SAMPLE_MIN (128U * 1024U) /* fetches whose latency counts */
#define FC_EPOCH_NS 30000000ULL      /* bandwidth is measured this long */
#define FC_PROBE_NS 10000000000ULL   /* latency is measured this often */
#define FC_PROBE_MAX_NS 200000000ULL /* ... for at most this long */
#define FC_PROBE_N 4                 /* ... from this many fetches */
#define FC_LANE_MAX (64U * 1024U)    /* fetches that may take the lane */
#define FC_LANE (1ULL << 20)         /* bytes the lane has */

struct xnbd__fetchctl {
	uint64_t max;      /* the largest window (a fixed one, if fixed) */
	uint64_t window;   /* bytes that may be in flight */
	uint64_t bytes;    /* bytes in flight now */
	uint64_t lane;     /* ... of them in the lane */
	uint64_t t0;       /* this epoch's start */
	uint64_t idle_t;   /* when the last fetch in flight came back */
	uint64_t ep_bytes; /* bytes fetched in it */
	unsigned ep_large; /* fetches of FC_SAMPLE_MIN or more in it */
	bool fixed;        /* the window never moves */
	double rate[3];    /* the last epochs' bytes per ns */
	unsigned nrate;
	uint64_t base;   /* least latency of a large fetch, or 0 */
	uint64_t base_t; /* when measured afresh (0: never) */
	bool probing;    /* drain, then FC_PROBE_N fetches alone */
	bool refill;     /* the epoch after a probe: its rate does not count */
	unsigned probe_sent, probe_out; /* its fetches, sent and not back */
	unsigned probe_n;               /* ... and back with a sample */
	uint64_t probe_min, probe_t;
};

/* fixed: 0 to size the window by itself, up to max; else the window is
 * always fixed bytes (UINT64_MAX: no limit but the caller's own). */
void xnbd__fetchctl_init(struct xnbd__fetchctl *fc, uint64_t max,
                         uint64_t fixed);

/* A new connection to the upstream: measure everything afresh. */
void xnbd__fetchctl_reset(struct xnbd__fetchctl *fc);

/* May a fetch of len bytes go now?  One always may while none is in
 * flight, whatever its size. */
bool xnbd__fetchctl_room(struct xnbd__fetchctl *fc, uint64_t len);

/* May a small fetch (FC_LANE_MAX bytes or less) go now in the lane, past
 * the window and past the fetches waiting for it?  A small cold read then
 * waits for what is in flight only, not for a copy's queue behind it
 * (35 against 4 ms on loopback).  The lane holds FC_LANE bytes, so that a
 * flood of small fetches takes the window's turn like any others. */
bool xnbd__fetchctl_lane(const struct xnbd__fetchctl *fc, uint64_t len);

/* A fetch of len bytes went upstream at now, in the lane or not; returns
 * its flags (FC_PROBE, FC_IN_LANE) to hand back to xnbd__fetchctl_done. */
#define FC_PROBE 1U
#define FC_IN_LANE 2U
unsigned xnbd__fetchctl_sent(struct xnbd__fetchctl *fc, uint64_t len,
                             uint64_t now, bool lane);

/* A fetch of len bytes sent at sent came back at now: ok whether it
 * brought its data (a failed one only leaves the window). */
void xnbd__fetchctl_done(struct xnbd__fetchctl *fc, uint64_t len, uint64_t sent,
                         unsigned flags, bool ok, uint64_t now);

#endif
