/* fetchctl.c - a proxy's fetch window (fetchctl.h). */
#include "fetchctl.h"

#include <string.h>

void xnbd__fetchctl_init(struct xnbd__fetchctl *fc, uint64_t max,
                         uint64_t fixed)
{
	memset(fc, 0, sizeof(*fc));
	fc->max = max < FC_MIN ? FC_MIN : max;
	fc->fixed = fixed != 0;
	fc->window = fixed ? fixed : FC_START < fc->max ? FC_START : fc->max;
}

void xnbd__fetchctl_reset(struct xnbd__fetchctl *fc)
{
	if (fc->fixed)
		return;
	fc->window = FC_START < fc->max ? FC_START : fc->max;
	memset(fc->rate, 0, sizeof(fc->rate));
	fc->nrate = 0;
	fc->base = 0;
	fc->base_t = 0;
	fc->probing = false;
	fc->refill = false;
	fc->ep_bytes = 0;
	fc->ep_large = 0;
	fc->idle_t = 0;
}

bool xnbd__fetchctl_room(struct xnbd__fetchctl *fc, uint64_t len)
{
	if (!fc->bytes)
		return true;
	if (fc->probing) /* once drained, FC_PROBE_N at once */
		return fc->probe_sent && fc->probe_sent < FC_PROBE_N;
	return len <= fc->window && fc->bytes <= fc->window - len;
}

bool xnbd__fetchctl_lane(const struct xnbd__fetchctl *fc, uint64_t len)
{
	return len <= FC_LANE_MAX && !fc->probing && fc->lane + len <= FC_LANE;
}

static void new_epoch(struct xnbd__fetchctl *fc, uint64_t now)
{
	fc->t0 = now;
	fc->ep_bytes = 0;
	fc->ep_large = 0;
}

unsigned xnbd__fetchctl_sent(struct xnbd__fetchctl *fc, uint64_t len,
                             uint64_t now, bool lane)
{
	/* idle no more: a new epoch, unless the gap was short (fetchctl.h) */
	if (!fc->bytes && now - fc->idle_t >= FC_EPOCH_NS)
		new_epoch(fc, now);
	fc->bytes += len;
	if (lane) {
		fc->lane += len;
		return FC_IN_LANE;
	}
	if (fc->probing) {
		fc->probe_sent++;
		fc->probe_out++;
		return FC_PROBE;
	}
	return 0;
}

void xnbd__fetchctl_done(struct xnbd__fetchctl *fc, uint64_t len, uint64_t sent,
                         unsigned flags, bool ok, uint64_t now)
{
	bool probe = flags & FC_PROBE;
	fc->bytes -= len;
	if (!fc->bytes)
		fc->idle_t = now;
	if (flags & FC_IN_LANE)
		fc->lane -= len;
	if (fc->fixed)
		return;
	if (ok && len >= FC_SAMPLE_MIN) {
		uint64_t lat = now > sent ? now - sent : 1;
		fc->ep_large++;
		if (probe) {
			fc->probe_n++;
			if (lat < fc->probe_min)
				fc->probe_min = lat;
		}
		/* (Until a first probe, base_t stays 0: samples taken amid a
		 * start may be late, and the end of the first epoch probes.) */
		if (!fc->base || lat < fc->base) {
			if (fc->base_t)
				fc->base_t = now;
			fc->base = lat;
		}
	}
	if (probe && fc->probe_out)
		fc->probe_out--;
	if (fc->probing) {
		/* Over once its fetches are back, or at FC_PROBE_MAX_NS; the
		 * least latency among them is the new base (the first of them
		 * to arrive waited for none of the others). */
		bool over = fc->probe_sent >= FC_PROBE_N && !fc->probe_out;
		if (over || now - fc->probe_t > FC_PROBE_MAX_NS) {
			if (fc->probe_n)
				fc->base = fc->probe_min;
			fc->probing = false;
			fc->refill = true;
			fc->base_t = now;
			new_epoch(fc, now);
		}
		return;
	}
	fc->ep_bytes += len;
	uint64_t dt = now - fc->t0;
	/* (at least four round trips: a far upstream's replies come in
	 * bursts of a round trip) */
	if (dt < FC_EPOCH_NS || dt < 4 * fc->base)
		return;
	double rate = (double)fc->ep_bytes / (double)dt;
	unsigned ep_large = fc->ep_large;
	new_epoch(fc, now);
	if (fc->refill) { /* the pipe was filling again after a probe */
		fc->refill = false;
		return;
	}
	/* An epoch in which the window held nothing back measured the
	 * clients' pace, less than the upstream's: it counts too, so that a
	 * window larger than the clients need shrinks (what they keep in
	 * flight piles up just the same).  Once the window holds them back,
	 * the rate is the upstream's, and the window grows with it. */
	if (!fc->base)
		return;
	fc->rate[fc->nrate++ % 3] = rate;
	/* (not for small fetches alone: they give no sample) */
	if ((!fc->base_t || now - fc->base_t > FC_PROBE_NS) &&
	    ep_large >= FC_PROBE_N) {
		fc->probing = true;
		fc->probe_n = 0;
		fc->probe_sent = 0;
		fc->probe_out = 0;
		fc->probe_min = UINT64_MAX;
		fc->probe_t = now;
		return;
	}
	double best = 0;
	for (unsigned i = 0; i < 3; i++)
		if (fc->rate[i] > best)
			best = fc->rate[i];
	double w = FC_BDP * best * (double)fc->base;
	fc->window = w < (double)FC_MIN    ? FC_MIN
	             : w > (double)fc->max ? fc->max
	                                   : (uint64_t)w;
}
