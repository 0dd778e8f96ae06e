/* test-fetchctl.c - a proxy's fetch window (fetchctl.c) against a
 * simulated upstream: a path of latency L to a bottleneck of bandwidth B,
 * asked for 256 KiB fetches by clients that always want more, or that
 * keep a given number in flight. */
#include <check.h>
#include <stdint.h>
#include <string.h>

#include "fetchctl.h"
#include "unit-main.h"

#define KiB 1024ULL
#define MiB (1024ULL * KiB)
#define MS 1000000ULL
#define SEC 1000000000ULL
#define FETCH (256 * KiB)
#define MAX_FLIGHT 256 /* the proxy's own limit on requests in flight */
#define WMAX (256 * MiB)

struct sim {
	struct xnbd__fetchctl fc;
	uint64_t now;
	uint64_t lat;    /* the path's latency (ns) */
	double bw;       /* the bottleneck's bytes per ns */
	uint64_t last_c; /* when the bottleneck is free */
	/* fetches in flight, in order of completion (FIFO) */
	struct {
		uint64_t sent, done, len;
		unsigned flags;
	} q[MAX_FLIGHT];
	unsigned head, n;
	unsigned demand;  /* fetches the clients keep in flight, at most */
	uint64_t fetch;   /* their size */
	uint64_t fetched; /* bytes */
	unsigned max_probe_flight;
	unsigned probes;
	uint64_t think; /* with nothing in flight, the clients wait this long */
};

static void sim_init(struct sim *s, uint64_t lat, double mib_per_s,
                     uint64_t fixed)
{
	memset(s, 0, sizeof(*s));
	xnbd__fetchctl_init(&s->fc, WMAX, fixed);
	s->now = 1 * SEC;
	s->lat = lat;
	s->bw = mib_per_s * (double)MiB / (double)SEC;
	s->demand = MAX_FLIGHT;
	s->fetch = FETCH;
}

/* Run until the time is t: send whatever the window lets through, then
 * complete the next fetch. */
static void sim_run(struct sim *s, uint64_t t)
{
	while (s->now < t) {
		bool was_probing = s->fc.probing;
		if (!s->n)
			s->now += s->think;
		while (s->n < s->demand &&
		       xnbd__fetchctl_room(&s->fc, s->fetch)) {
			unsigned i = (s->head + s->n++) % MAX_FLIGHT;
			s->q[i].sent = s->now;
			s->q[i].len = s->fetch;
			s->q[i].flags = xnbd__fetchctl_sent(&s->fc, s->fetch,
			                                    s->now, false);
			uint64_t xfer = (uint64_t)((double)s->fetch / s->bw);
			uint64_t c = s->now + s->lat + xfer;
			if (c < s->last_c + xfer)
				c = s->last_c + xfer;
			s->last_c = c;
			s->q[i].done = c;
			if (s->fc.probing && s->n > s->max_probe_flight)
				s->max_probe_flight = s->n;
		}
		ck_assert_uint_gt(s->n, 0); /* one may always go */
		unsigned i = s->head;
		s->head = (s->head + 1) % MAX_FLIGHT;
		s->n--;
		s->now = s->q[i].done;
		s->fetched += s->q[i].len;
		xnbd__fetchctl_done(&s->fc, s->q[i].len, s->q[i].sent,
		                    s->q[i].flags, true, s->now);
		if (!was_probing && s->fc.probing)
			s->probes++;
	}
}

/* Bytes per second fetched over the next span ns. */
static double sim_rate(struct sim *s, uint64_t span)
{
	uint64_t b0 = s->fetched, t0 = s->now;
	sim_run(s, s->now + span);
	return (double)(s->fetched - b0) * (double)SEC / (double)(s->now - t0);
}

static double bdp(const struct sim *s)
{
	return s->bw * ((double)s->lat + (double)FETCH / s->bw);
}

START_TEST(a_near_upstream_gets_the_least_window_at_full_speed)
{
	static struct sim s;
	sim_init(&s, 200 * 1000, 1024, 0); /* 0.2 ms, 1 GiB/s */
	sim_run(&s, s.now + 2 * SEC);
	double r = sim_rate(&s, 1 * SEC);
	ck_assert_uint_le(s.fc.window, 2 * MiB);
	ck_assert_uint_ge(s.fc.window, FC_MIN);
	ck_assert(r >= 0.95 * 1024 * MiB);
	/* it was probed, with a few fetches alone in flight */
	ck_assert_uint_ge(s.probes, 1);
	ck_assert_uint_le(s.max_probe_flight, FC_PROBE_N);
}
END_TEST

START_TEST(a_far_upstream_gets_a_window_of_its_bandwidth_delay)
{
	static struct sim s;
	sim_init(&s, 20 * MS, 500, 0);
	sim_run(&s, s.now + 3 * SEC);
	double r = sim_rate(&s, 1 * SEC);
	ck_assert(s.fc.window >= 2 * bdp(&s));
	ck_assert(s.fc.window <= 4 * bdp(&s));
	ck_assert(r >= 0.95 * 500 * MiB);
}
END_TEST

START_TEST(a_path_grown_longer_is_found_by_the_next_probe)
{
	static struct sim s;
	sim_init(&s, 1 * MS, 500, 0);
	sim_run(&s, s.now + 2 * SEC);
	uint64_t near = s.fc.window;
	ck_assert(near <= 4 * bdp(&s));
	s.lat = 30 * MS; /* the same connection, now through a longer way */
	sim_run(&s, s.now + FC_PROBE_NS + 3 * SEC);
	double r = sim_rate(&s, 1 * SEC);
	ck_assert(s.fc.window >= 2 * bdp(&s));
	ck_assert(r >= 0.9 * 500 * MiB);
	ck_assert_uint_ge(s.probes, 2);
	ck_assert_uint_le(s.max_probe_flight, FC_PROBE_N);
}
END_TEST

START_TEST(probes_cost_little)
{
	static struct sim s;
	sim_init(&s, 20 * MS, 500, 0);
	sim_run(&s, s.now + 3 * SEC);
	/* 25 s with two probes, each a drain and four fetches alone */
	double r = sim_rate(&s, 25 * SEC);
	ck_assert_uint_ge(s.probes, 3);
	ck_assert(r >= 0.95 * 500 * MiB);
}
END_TEST

START_TEST(small_fetches_alone_are_never_probed)
{
	static struct sim s;
	/* cold 4 KiB reads at depth 32: no latency sample, so no probe (it
	 * would send them one at a time for nothing), and the window stays */
	sim_init(&s, 20 * MS, 500, 0);
	s.demand = 32;
	s.fetch = 4 * KiB;
	sim_run(&s, s.now + 25 * SEC);
	ck_assert_uint_eq(s.probes, 0);
	ck_assert_uint_eq(s.fc.base, 0);
	ck_assert_uint_eq(s.fc.window, FC_START);
	/* a copy, then small reads again: no probe after the copy */
	s.demand = MAX_FLIGHT;
	s.fetch = FETCH;
	sim_run(&s, s.now + 2 * SEC);
	unsigned probes = s.probes;
	ck_assert_uint_ge(probes, 1);
	s.demand = 32;
	s.fetch = 4 * KiB;
	sim_run(&s, s.now + 25 * SEC);
	ck_assert_uint_eq(s.probes, probes);
}
END_TEST

START_TEST(a_fixed_window_stays)
{
	static struct sim s;
	sim_init(&s, 20 * MS, 500, 2 * MiB);
	sim_run(&s, s.now + 3 * SEC);
	double r = sim_rate(&s, 1 * SEC);
	ck_assert_uint_eq(s.fc.window, 2 * MiB);
	ck_assert_uint_eq(s.probes, 0);
	/* 2 MiB a round trip, and no more */
	double round = (double)(s.lat + (uint64_t)((double)FETCH / s.bw));
	ck_assert(r <= 1.05 * 2 * MiB * SEC / round);
	ck_assert(r >= 0.9 * 2 * MiB * SEC / round);
}
END_TEST

START_TEST(no_window_leaves_the_callers_limit)
{
	static struct sim s;
	sim_init(&s, 20 * MS, 500, UINT64_MAX);
	sim_run(&s, s.now + 1 * SEC);
	ck_assert_uint_eq(s.n, MAX_FLIGHT - 1); /* (one just came back) */
}
END_TEST

START_TEST(a_window_beyond_the_clients_needs_shrinks_to_them)
{
	static struct sim s;
	/* near: 32 fetches (8 MiB, the first window) pile up; a window of
	 * two megabytes serves them as fast */
	sim_init(&s, 200 * 1000, 1024, 0);
	s.demand = 32;
	sim_run(&s, s.now + 2 * SEC);
	double r = sim_rate(&s, 1 * SEC);
	ck_assert_uint_eq(s.fc.window, FC_MIN);
	ck_assert(r >= 0.95 * 1024 * MiB);
	/* far: the clients' 8 MiB make half the path's bandwidth-delay,
	 * and the window lets them all through */
	sim_init(&s, 30 * MS, 500, 0);
	s.demand = 32;
	sim_run(&s, s.now + 2 * SEC);
	r = sim_rate(&s, 1 * SEC);
	ck_assert_uint_ge(s.fc.window, 3 * 8 * MiB / 2);
	double round = (double)(s.lat + (uint64_t)((double)FETCH / s.bw));
	ck_assert(r >= 0.95 * 8 * MiB * SEC / round);
	/* and when they want more, it grows */
	s.demand = MAX_FLIGHT;
	sim_run(&s, s.now + 2 * SEC);
	r = sim_rate(&s, 1 * SEC);
	ck_assert(s.fc.window >= 2 * bdp(&s));
	ck_assert(r >= 0.95 * 500 * MiB);
}
END_TEST

START_TEST(clients_that_wait_between_fetches_still_size_the_window)
{
	static struct sim s;
	/* near, one 256 KiB fetch at a time and 50 us from its return to
	 * the next: nothing is in flight in between, and the epochs still
	 * end and measure (before, each fetch started one afresh, and the
	 * window stayed at its start: proxy_far.py, 2026-12-06) */
	sim_init(&s, 100 * 1000, 1024, 0);
	s.demand = 1;
	s.think = 50 * 1000;
	sim_run(&s, s.now + 2 * SEC);
	ck_assert_uint_eq(s.fc.window, FC_MIN);
	ck_assert_uint_gt(s.fc.base, 0);
	/* a pause longer than an epoch ends it: the next starts afresh */
	s.think = 0;
	s.now += 2 * FC_EPOCH_NS;
	uint64_t t = s.now;
	sim_run(&s, s.now + 1);
	ck_assert_uint_ge(s.fc.t0, t);
}
END_TEST

START_TEST(one_fetch_may_always_go)
{
	struct xnbd__fetchctl fc;
	xnbd__fetchctl_init(&fc, WMAX, 0);
	ck_assert(xnbd__fetchctl_room(&fc, 64 * MiB)); /* > the window */
	xnbd__fetchctl_sent(&fc, 64 * MiB, 1, false);
	ck_assert(!xnbd__fetchctl_room(&fc, 4 * KiB));
	xnbd__fetchctl_done(&fc, 64 * MiB, 1, 0, true, 2);
	ck_assert_uint_eq(fc.bytes, 0);
	ck_assert(xnbd__fetchctl_room(&fc, 4 * KiB));
	/* a window holds fetches back at its edge, not before */
	for (uint64_t b = 0; b < FC_START; b += FETCH) {
		ck_assert(xnbd__fetchctl_room(&fc, FETCH));
		xnbd__fetchctl_sent(&fc, FETCH, 3, false);
	}
	ck_assert(!xnbd__fetchctl_room(&fc, 1));
}
END_TEST

START_TEST(small_fetches_take_the_lane_past_a_full_window)
{
	struct xnbd__fetchctl fc;
	xnbd__fetchctl_init(&fc, WMAX, 0);
	for (uint64_t b = 0; b < FC_START; b += FETCH)
		xnbd__fetchctl_sent(&fc, FETCH, 1, false);
	ck_assert(!xnbd__fetchctl_room(&fc, 4 * KiB)); /* the window is full */
	ck_assert(xnbd__fetchctl_lane(&fc, 4 * KiB));
	ck_assert(xnbd__fetchctl_lane(&fc, FC_LANE_MAX));
	ck_assert(!xnbd__fetchctl_lane(&fc, FC_LANE_MAX + 1)); /* not large */
	/* the lane holds FC_LANE bytes, then small fetches wait their turn */
	unsigned n = 0;
	while (xnbd__fetchctl_lane(&fc, 64 * KiB)) {
		ck_assert_uint_eq(xnbd__fetchctl_sent(&fc, 64 * KiB, 2, true),
		                  FC_IN_LANE);
		n++;
	}
	ck_assert_uint_eq(n, FC_LANE / (64 * KiB));
	ck_assert_uint_eq(fc.bytes, FC_START + FC_LANE);
	xnbd__fetchctl_done(&fc, 64 * KiB, 2, FC_IN_LANE, true, 3);
	ck_assert(xnbd__fetchctl_lane(&fc, 64 * KiB));
	ck_assert_uint_eq(fc.lane, FC_LANE - 64 * KiB);
	ck_assert_uint_eq(fc.bytes, FC_START + FC_LANE - 64 * KiB);
	/* and none while a probe measures the latency */
	fc.probing = true;
	ck_assert(!xnbd__fetchctl_lane(&fc, 4 * KiB));
}
END_TEST

START_TEST(failed_and_small_fetches_are_no_samples)
{
	struct xnbd__fetchctl fc;
	xnbd__fetchctl_init(&fc, WMAX, 0);
	xnbd__fetchctl_sent(&fc, FETCH, 1 * SEC, false);
	xnbd__fetchctl_done(&fc, FETCH, 1 * SEC, 0, true, 1 * SEC + 5 * MS);
	ck_assert_uint_eq(fc.base, 5 * MS);
	xnbd__fetchctl_sent(&fc, FETCH, 2 * SEC, false);
	xnbd__fetchctl_done(&fc, FETCH, 2 * SEC, 0, false, 2 * SEC + 1000);
	xnbd__fetchctl_sent(&fc, 4 * KiB, 3 * SEC, false);
	xnbd__fetchctl_done(&fc, 4 * KiB, 3 * SEC, 0, true, 3 * SEC + 1000);
	ck_assert_uint_eq(fc.base, 5 * MS);
	ck_assert_uint_eq(fc.bytes, 0);
}
END_TEST

START_TEST(a_new_connection_starts_afresh)
{
	static struct sim s;
	sim_init(&s, 20 * MS, 500, 0);
	sim_run(&s, s.now + 3 * SEC);
	ck_assert_uint_ne(s.fc.window, FC_START);
	xnbd__fetchctl_reset(&s.fc);
	ck_assert_uint_eq(s.fc.window, FC_START);
	ck_assert_uint_eq(s.fc.base, 0);
	ck_assert(!s.fc.probing);
	/* the fetches of the old connection still leave the window */
	ck_assert_uint_gt(s.fc.bytes, 0);
	while (s.n) {
		unsigned i = s.head;
		s.head = (s.head + 1) % MAX_FLIGHT;
		s.n--;
		xnbd__fetchctl_done(&s.fc, FETCH, s.q[i].sent, s.q[i].flags,
		                    false, s.now);
	}
	ck_assert_uint_eq(s.fc.bytes, 0);
	/* and a fixed window stays fixed */
	struct xnbd__fetchctl fc;
	xnbd__fetchctl_init(&fc, WMAX, 3 * MiB);
	xnbd__fetchctl_reset(&fc);
	ck_assert_uint_eq(fc.window, 3 * MiB);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("fetchctl");
	TCase *tc = tcase_create("core");
	tcase_add_test(tc, a_near_upstream_gets_the_least_window_at_full_speed);
	tcase_add_test(tc, a_far_upstream_gets_a_window_of_its_bandwidth_delay);
	tcase_add_test(tc, a_path_grown_longer_is_found_by_the_next_probe);
	tcase_add_test(tc, probes_cost_little);
	tcase_add_test(tc, small_fetches_alone_are_never_probed);
	tcase_add_test(tc, a_fixed_window_stays);
	tcase_add_test(tc, no_window_leaves_the_callers_limit);
	tcase_add_test(tc, a_window_beyond_the_clients_needs_shrinks_to_them);
	tcase_add_test(tc,
	               clients_that_wait_between_fetches_still_size_the_window);
	tcase_add_test(tc, one_fetch_may_always_go);
	tcase_add_test(tc, small_fetches_take_the_lane_past_a_full_window);
	tcase_add_test(tc, failed_and_small_fetches_are_no_samples);
	tcase_add_test(tc, a_new_connection_starts_afresh);
	suite_add_tcase(s, tc);
	return xnbd_test_run(s);
}
