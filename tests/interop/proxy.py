#!/usr/bin/python3
"""xnbd-server --proxy: data correctness against real upstreams.

- Upstreams: our own --target; nbdkit with the delay filter; nbdkit's eval
  plugin sleeping a random time per read, so replies come out of order for
  sure.  Through each: hundreds of pipelined reads, writes, zeroes, trims,
  CACHE commands and flushes, byte-disjoint within a batch but often sharing
  blocks (so fetches and writes of one block race), compared with a model.
  The upstream image is unchanged afterwards.
- The x-xnbd:cache meta context tells exactly which blocks are cached;
  NBD_CMD_CACHE fetches a range.
- A read spanning many separate uncached runs (the original died on it).
- Restart on the same cache and bitmap: cached blocks (and local writes)
  are served without the upstream; --clear-bitmap starts afresh; a bitmap of
  another image, or a damaged one, is refused with a clear message;
  --readonly refuses writes and still fills the cache.
"""
import hashlib
import os
import random
import subprocess
import time

import xnbdtest as xt

BS = 4096


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_map(h, off, length):
    """[(start, length, cached)] from the x-xnbd:cache context."""
    out = []

    def cb(meta, o, entries, err):
        if meta != "x-xnbd:cache":
            return 0
        pos = o
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], bool(entries[i + 1] & 1)))
            pos += entries[i]
        return 0

    pos = off
    end = off + length
    while pos < end:
        n = len(out)
        h.block_status(end - pos, pos, cb)
        if len(out) == n:
            xt.fail("block status made no progress at %d" % pos)
        pos = out[-1][0] + out[-1][1]
    return out


def cached_blocks(h, off, length):
    s = set()
    for start, ln, c in cache_map(h, off, length):
        if c:
            s.update(range(start // BS, (start + ln + BS - 1) // BS))
    return s


def connect(nbd, srv):
    h = nbd.NBD()
    h.add_meta_context("x-xnbd:cache")
    h.connect_tcp(srv.addr, str(srv.port))
    return h


def workload(nbd, h, model, rounds, rng, what):
    """Batches of pipelined requests, byte-disjoint within a batch, checked
    against model (a bytearray, updated)."""
    size = len(model)
    ops = 0
    for r in range(rounds):
        taken = []

        def free_range(maxlen):
            for _ in range(50):
                ln = rng.randrange(1, maxlen)
                # Cluster near a few hot spots so batches share blocks.
                base = rng.choice([0, size // 3, size // 2, size - 300000])
                off = max(0, min(size - ln, base + rng.randrange(-200000, 200000)))
                if all(off + ln <= a or b <= off for a, b in taken):
                    taken.append((off, off + ln))
                    return off, ln
            return None

        batch = []
        for _ in range(rng.randrange(8, 40)):
            kind = rng.choice(["r", "r", "r", "w", "w", "z", "t", "c", "f"])
            rg = free_range(200000 if kind in "rc" else 70000)
            if rg is None:
                continue
            off, ln = rg
            if kind == "r":
                buf = nbd.Buffer(ln)
                c = h.aio_pread(buf, off)
                batch.append(("r", off, ln, buf, c))
            elif kind == "w":
                data = rng.randbytes(ln)
                c = h.aio_pwrite(data, off)
                batch.append(("w", off, ln, data, c))
            elif kind == "z":
                c = h.aio_zero(ln, off)
                batch.append(("z", off, ln, None, c))
            elif kind == "t":
                c = h.aio_trim(ln, off)
                batch.append(("t", off, ln, None, c))
            elif kind == "c":
                c = h.aio_cache(ln, off)
                batch.append(("c", off, ln, None, c))
            else:
                c = h.aio_flush()
                batch.append(("f", 0, 0, None, c))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for kind, off, ln, data, c in batch:
            ops += 1
            if not h.aio_command_completed(c):
                xt.fail("%s: command %s at %d+%d did not complete" % (what, kind, off, ln))
            if kind == "r":
                xt.check_bytes(data.to_bytearray(), model[off:off + ln],
                               "%s: round %d read %d+%d" % (what, r, off, ln), off)
            elif kind == "w":
                model[off:off + ln] = data
            elif kind in "zt":
                model[off:off + ln] = bytes(ln)
    return ops


def check_whole(h, model, what):
    size = len(model)
    step = 4 << 20
    for off in range(0, size, step):
        ln = min(step, size - off)
        xt.check_bytes(h.pread(ln, off), model[off:off + ln], what, off)


def run_through(nbd, t, up_port, up_img, name, rng, rounds=25, args=()):
    before = sha(up_img)
    with open(up_img, "rb") as f:
        model = bytearray(f.read())
    p = t.proxy(up_port, name=name, args=args)
    h = connect(nbd, p)
    xt.check(h.can_meta_context("x-xnbd:cache"), "x-xnbd:cache offered")
    xt.check(h.can_cache(), "the proxy advertises CACHE")
    xt.check(h.get_size() == len(model), "proxy size = upstream size")
    ops = workload(nbd, h, model, rounds, rng, name)
    # Two more connections at once, same model: all see one cache.
    h2 = connect(nbd, p)
    ops += workload(nbd, h2, model, 5, rng, name + " (2nd connection)")
    check_whole(h, model, name + ": whole image after the workload")
    h.flush()
    h.shutdown()
    h2.shutdown()
    xt.check_eq(p.stop(), 0, "%s: proxy exit status" % name)
    xt.check(sha(up_img) == before, "%s: upstream image unchanged" % name)
    xt.log("%s: %d requests checked against the model" % (name, ops))
    return p, model


def wait_cached_eq(h, off, length, expected, what):
    """A small cold read is answered before its blocks are stored, and
    they show as cached once stored: wait for that, 10 s at most."""
    end = time.time() + 10
    while cached_blocks(h, off, length) != expected and time.time() < end:
        time.sleep(0.01)
    xt.check_eq(cached_blocks(h, off, length), expected, what)


def test_cache_map_and_runs(nbd, t, up_port, up_data):
    p = t.proxy(up_port, name="map")
    h = connect(nbd, p)
    size = len(up_data)
    xt.check_eq(cached_blocks(h, 0, size), set(), "nothing cached at first")
    h.pread(10, 5 * BS + 100)          # block 5
    h.pread(BS + 2, 9 * BS - 1)         # blocks 8..10
    wait_cached_eq(h, 0, 64 * BS, {5, 8, 9, 10},
                   "cached blocks after two reads")
    h.cache(3 * BS, 20 * BS)            # CACHE: blocks 20..22
    xt.check_eq(cached_blocks(h, 0, 64 * BS), {5, 8, 9, 10, 20, 21, 22},
                "cached blocks after NBD_CMD_CACHE")
    # A partial write to an uncached block fetches it first.
    h.pwrite(b"\xaa" * 10, 30 * BS + 7)
    exp = bytearray(up_data[30 * BS:31 * BS])
    exp[7:17] = b"\xaa" * 10
    xt.check_bytes(h.pread(BS, 30 * BS), exp, "partial write merged")
    # One read over 300 separate uncached runs (every other block cached).
    base = 1 << 20
    for i in range(300):
        h.pread(1, base + 2 * i * BS)
    got = h.pread(600 * BS, base)
    xt.check_bytes(got, up_data[base:base + 600 * BS],
                   "read across 300 separate uncached runs", base)
    xt.check(p.alive(), "proxy alive after the fragmented read")
    xt.check_eq(cached_blocks(h, base, 600 * BS),
                set(range(base // BS, base // BS + 600)),
                "all 600 blocks cached after it")
    # The last, short block.
    tail = size % BS or BS
    xt.check_bytes(h.pread(tail, size - tail), up_data[size - tail:],
                   "the short last block")
    # (answered before its store: wait for it, or the count below races)
    wait_cached_eq(h, size - tail, tail, {(size - 1) // BS},
                   "the short last block cached")
    # A block status with both contexts.
    h.shutdown()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("x-xnbd:cache")
    h.connect_tcp(p.addr, str(p.port))
    seen = {}
    h.block_status(64 * BS, 0,
                   lambda m, o, e, err: seen.setdefault(m, list(e)) and 0)
    xt.check_eq(sorted(seen), ["base:allocation", "x-xnbd:cache"],
                "both contexts answered")
    xt.check_eq(seen["x-xnbd:cache"][:2], [5 * BS, 0], "first extent: uncached")
    h.shutdown()
    # 4 + 3 blocks, 1 written, 600 read, the last one.
    xt.check_eq(xt.query(p.ctl)["cached-blocks"], 4 + 3 + 1 + 600 + 1,
                "query counts the cached blocks")
    p.stop()


def start_proxy_expect_fail(t, up_port, name, args=(), cache=None, bitmap=None):
    cache = cache or t.join(name + ".cache")
    bitmap = bitmap or t.join(name + ".bitmap")
    log = t.join(name + ".fail.log")
    port = xt.free_port()
    r = subprocess.run([xt.SERVER, "--proxy", "--laddr", "127.0.0.1", "--lport",
                        str(port), "--logpath", log] + list(args) +
                       ["127.0.0.1", str(up_port), cache, bitmap,
                        t.join(name + ".ctl")], timeout=30)
    with open(log, errors="replace") as f:
        return r.returncode, f.read()


def main():
    nbd = xt.need_nbd()
    xt.need_tools("nbdkit")
    seed = int(os.environ.get("SEED") or time.time() * 1000)
    xt.log("seed %d (set SEED to repeat)" % seed)
    rng = random.Random(seed)
    with xt.TestDir() as t:
        size = 24 * xt.MiB + 3000  # a short last block
        up_data = os.urandom(size)
        up_img = t.image("up.img", size, up_data)

        # 1. Upstream: our own target.
        up = t.server(up_img, ["--readonly"])
        run_through(nbd, t, up.port, up_img, "own-target", rng)

        # 2. Cache map, CACHE, fragmented reads, partial writes.
        test_cache_map_and_runs(nbd, t, up.port, up_data)

        # 3. Restart on the same cache and bitmap: local writes and cached
        #    blocks survive, and are served with the upstream gone.
        p = t.proxy(up.port, name="rs")
        h = connect(nbd, p)
        h.pwrite(b"local!" * 100, 12345)
        before = h.pread(2 << 20, 0)
        h.shutdown()
        xt.check_eq(p.stop(), 0, "proxy exit status after SIGTERM")
        p = t.proxy(up.port, name="rs")
        h = connect(nbd, p)
        xt.check_eq(cached_blocks(h, 0, 2 << 20), set(range(512)),
                    "bitmap reused: the 2 MiB read before is cached")
        up.stop()
        xt.check_bytes(h.pread(2 << 20, 0), before,
                       "cached data served without the upstream")
        q = xt.query(p.ctl)
        xt.check(q["state"] in ("waiting", "connected"), "query state: %s" % q["state"])
        h.shutdown()
        p.stop()
        up = t.server(up_img, ["--readonly"], port=up.port)

        # 4. --clear-bitmap starts afresh (the local write is forgotten).
        p = t.proxy(up.port, name="rs", args=["--clear-bitmap"])
        h = connect(nbd, p)
        xt.check_eq(cached_blocks(h, 0, 2 << 20), set(), "cleared bitmap")
        xt.check_bytes(h.pread(2 << 20, 0), up_data[:2 << 20],
                       "after --clear-bitmap the upstream's data")
        h.shutdown()
        p.stop()

        # 5. A bitmap of another image, and a damaged one, are refused.
        other = t.image("other.img", 8 * xt.MiB, os.urandom(8 * xt.MiB))
        up2 = t.server(other, ["--readonly"])
        rc, log = start_proxy_expect_fail(t, up2.port, "mismatch",
                                          cache=t.join("mm.cache"),
                                          bitmap=t.join("rs.bitmap"))
        xt.check(rc == 1, "mismatched bitmap: exit 1, got %d" % rc)
        xt.check("made for another image" in log,
                 "mismatched bitmap: clear message; log:\n" + log)
        with open(t.join("rs.bitmap"), "r+b") as f:
            f.seek(100)
            f.write(b"garbage!")
        rc, log = start_proxy_expect_fail(t, up.port, "damaged",
                                          cache=t.join("rs.cache"),
                                          bitmap=t.join("rs.bitmap"))
        xt.check(rc == 1, "damaged bitmap: exit 1, got %d" % rc)
        xt.check("damaged" in log, "damaged bitmap: clear message; log:\n" + log)
        rc, log = start_proxy_expect_fail(t, xt.free_port(), "noup")
        xt.check(rc == 1 and "refused" in log.lower(),
                 "no upstream: exit 1 with a message; log:\n" + log)
        with open(t.join("big.cache"), "wb") as f:
            f.truncate(size + 4096)
        rc, log = start_proxy_expect_fail(t, up.port, "big",
                                          cache=t.join("big.cache"))
        xt.check(rc == 1 and "larger" in log.replace("more than", "larger"),
                 "cache larger than the upstream: refused; log:\n" + log)

        # 6. --readonly: writes refused, reads still fill the cache.
        p = t.proxy(up.port, name="ro", args=["--readonly"])
        h = connect(nbd, p)
        xt.check(h.is_read_only(), "read-only advertised")
        try:
            h.pwrite(b"x", 0)
            xt.fail("a write to a --readonly proxy succeeded")
        except nbd.Error as e:
            xt.check(e.errno in ("EPERM", 1), "EPERM, got %r" % (e.errno,))
        h.pread(1 << 20, 0)
        xt.check_eq(xt.query(p.ctl)["cached-blocks"], 256,
                    "--readonly proxy still caches what it reads")
        h.shutdown()
        p.stop()

        # 7. Upstream: nbdkit with the delay filter.
        kport = xt.free_port()
        nk = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-r",
                               "-i", "127.0.0.1", "-p", str(kport),
                               "--filter=delay", "file", up_img,
                               "rdelay=3ms"])
        xt._live.append(nk)
        xt.check(xt.wait_port("127.0.0.1", kport, nk), "nbdkit started")
        run_through(nbd, t, kport, up_img, "nbdkit-delay", rng, rounds=15)
        xt._stop_quietly(nk)

        # 8. Upstream: nbdkit eval with a random sleep per read: replies
        #    certainly out of order.
        kport = xt.free_port()
        nk = subprocess.Popen([
            "nbdkit", "--exit-with-parent", "-f", "-r", "-i", "127.0.0.1",
            "-p", str(kport), "--threads", "32", "eval",
            "get_size=echo %d" % size,
            "thread_model=echo parallel",
            "pread=sleep 0.0$((RANDOM %% 40)); exec dd if=%s iflag=skip_bytes,count_bytes "
            "skip=$4 count=$3 status=none" % up_img,
        ])
        xt._live.append(nk)
        xt.check(xt.wait_port("127.0.0.1", kport, nk), "nbdkit eval started")
        run_through(nbd, t, kport, up_img, "nbdkit-out-of-order", rng, rounds=6)
        xt._stop_quietly(nk)


xt.main(main)
