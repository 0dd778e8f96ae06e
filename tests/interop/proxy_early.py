#!/usr/bin/python3
"""xnbd-server --proxy: small cold reads are answered before their blocks
are stored in the cache (doc/design.md, "Small cold reads do not wait for
the cache").

- The proxy runs with a file size limit (RLIMIT_FSIZE, SIGXFSZ ignored)
  below part of its cache image, so stores there fail with EFBIG.  A small
  cold read there still returns the upstream's data (it does not wait for
  its store, whose failure only leaves the block absent and is logged),
  also when it comes in several pieces and a store fails before the last;
  the block reads right again (fetched anew).  A large cold read, which
  waits for its store, fails.
- Below the limit, cold reads are cached (their bits set once stored), and
  a write pipelined right after a cold read of the same block wins: the
  read's store cannot land over it.  After a restart on the same cache and
  bitmap the writes and the cached blocks read back without the upstream.
- Large cold reads, many at once with small reads among them (their
  payloads read straight into the request buffers, their stores made
  through io_uring where it is there): each returns the upstream's data,
  and once stored the cache image holds exactly the upstream's bytes.
"""
import os
import random
import resource
import signal
import time

import xnbdtest as xt

BS = 4096
SIZE = 16 << 20
LIMIT = 8 << 20


def cached(h, off):
    got = []

    def cb(meta, o, entries, err):
        if meta == "x-xnbd:cache":
            got.append(bool(entries[1] & 1))
        return 0

    h.block_status(BS, off, cb)
    return got[0]


def wait_cached(h, off, want, what):
    end = time.time() + 10
    while cached(h, off) != want:
        if time.time() > end:
            xt.fail("%s: block at %d cached=%s after 10 s, expected %s"
                    % (what, off, not want, want))
        time.sleep(0.02)


def test():
    nbd = xt.need_nbd()
    rnd = random.Random(7)
    data = bytearray(rnd.randbytes(SIZE))
    with xt.TestDir() as d:
        up = d.server(d.image("up.img", SIZE, bytes(data)))
        # The cache image exists at full size (growing it would hit the
        # limit); writes past LIMIT fail with EFBIG.
        with open(d.join("p.cache"), "wb") as f:
            f.truncate(SIZE)
        old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
        try:
            px = d.proxy(up.port)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_sig)

        def connect_to(server):
            h = nbd.NBD()
            h.add_meta_context("x-xnbd:cache")
            h.connect_uri(server.uri)
            return h

        def connect():
            return connect_to(px)

        h = connect()
        # 1. Past the limit: the store fails, the small read does not.
        off = 12 << 20
        xt.check_bytes(h.pread(BS, off), data[off:off + BS],
                       "cold 4 KiB read whose store fails")
        xt.check_bytes(h.pread(3 * BS + 100, off + 8 * BS + 7),
                       data[off + 8 * BS + 7:off + 11 * BS + 107],
                       "unaligned cold read whose store fails")
        # Reads of several pieces (an edge, a run, an edge): a store that
        # fails before the last piece arrives must not fail the read.
        for k in range(60):
            o = (9 << 20) + k * 12 * BS + 5
            xt.check_bytes(h.pread(5 * BS, o), data[o:o + 5 * BS],
                           "cold read of several pieces, stores failing (%d)"
                           % k)
        time.sleep(0.3)
        xt.check(not cached(h, off), "a block whose store failed is absent")
        xt.check_bytes(h.pread(BS, off), data[off:off + BS],
                       "the same block, fetched again")
        text = px.log_text()
        xt.check("storing fetched blocks" in text and "File too large" in text,
                 "the failed store is logged:\n" + text[-2000:])
        # A large read waits for its stores, and reports their failure.
        try:
            h.pread(1 << 20, 13 << 20)
            xt.fail("a 1 MiB cold read whose store fails succeeded")
        except nbd.Error:
            pass
        h.shutdown()
        h = connect()

        # 2. Below the limit: cold reads are cached, once stored.
        off = 1 << 20
        xt.check_bytes(h.pread(BS, off), data[off:off + BS], "cold read")
        wait_cached(h, off, True, "cold read below the limit")

        # 3. A cold read, then at once a write of the same block, many at
        # a time: the write wins, whatever the stores do.
        blocks = rnd.sample(range((2 << 20) // BS, LIMIT // BS), 200)
        for i in range(0, len(blocks), 50):
            cmds = []
            bufs = []
            for b in blocks[i:i + 50]:
                rb = nbd.Buffer(BS)
                cmds.append(h.aio_pread(rb, b * BS))
                bufs.append((b, rb))
                new = rnd.randbytes(BS)
                cmds.append(h.aio_pwrite(new, b * BS))
                data[b * BS:(b + 1) * BS] = new
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for c in cmds:  # raises for a command that failed
                xt.check(h.aio_command_completed(c), "command %d done" % c)
        for b in blocks:
            xt.check_bytes(h.pread(BS, b * BS), data[b * BS:(b + 1) * BS],
                           "block %d written right after its cold read" % b)
        h.flush()
        h.shutdown()
        xt.check_eq(px.stop(), 0, "proxy exit status")

        # 4. Restart on the same cache and bitmap, then the upstream goes.
        px2 = d.proxy(up.port)
        h = connect_to(px2)
        for b in blocks + [(1 << 20) // BS]:
            xt.check(cached(h, b * BS), "block %d cached after a restart" % b)
        up.stop()
        for b in blocks + [(1 << 20) // BS]:
            xt.check_bytes(h.pread(BS, b * BS), data[b * BS:(b + 1) * BS],
                           "block %d after a restart, upstream gone" % b)
        h.shutdown()
        xt.check_eq(px2.stop(), 0, "second proxy exit status")


def test_large():
    nbd = xt.need_nbd()
    rnd = random.Random(11)
    size = 24 << 20
    data = bytes(rnd.randbytes(size))
    big = 256 << 10
    with xt.TestDir() as d:
        up = d.server(d.image("up2.img", size, data))
        px = d.proxy(up.port)
        h = nbd.NBD()
        h.add_meta_context("x-xnbd:cache")
        h.connect_uri(px.uri)
        # A cached MiB at the end, for small reads served at once.
        hot = size - (1 << 20)
        xt.check_bytes(h.pread(1 << 20, hot), data[hot:], "a hot MiB")
        offs = [k * big for k in range((16 << 20) // big)]
        rnd.shuffle(offs)
        cmds = []
        for i in range(0, len(offs), 32):
            for o in offs[i:i + 32]:
                rb = nbd.Buffer(big)
                cmds.append((h.aio_pread(rb, o), rb, o, big))
                for _ in range(2):
                    so = hot + rnd.randrange(0, (1 << 20) - BS, BS)
                    sb = nbd.Buffer(BS)
                    cmds.append((h.aio_pread(sb, so), sb, so, BS))
            while h.aio_in_flight() > 0:
                h.poll(-1)
        for c, b, o, n in cmds:
            xt.check(h.aio_command_completed(c), "command %d done" % c)
            xt.check_bytes(b.to_bytearray(), data[o:o + n],
                           "cold read at %d of %d bytes" % (o, n))
        for o in offs:
            wait_cached(h, o + big - BS, True, "large read at %d" % o)
        h.flush()
        h.shutdown()
        xt.check_eq(px.stop(), 0, "proxy exit status")
        with open(d.join("p.cache"), "rb") as f:
            got = f.read(16 << 20)
        xt.check_bytes(got, data[:16 << 20],
                       "the cache image after 64 large cold reads")
        text = px.log_text()
        xt.check("storing fetched blocks" not in text,
                 "no store failed:\n" + text[-2000:])


def both():
    test()
    test_large()


xt.main(both)
