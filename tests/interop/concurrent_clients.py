#!/usr/bin/python3
"""Concurrent clients against one xnbd-server.

Phase 1: four reader processes, each its own connection with 16 requests
in flight, read random (unaligned) ranges of a pattern image in which
every 4 KiB block holds its block number; no byte may be wrong.
Phase 2: four writer processes each rewrite a disjoint region (pipelined,
shuffled, unaligned pieces), while two readers keep checking the pattern
region; afterwards every region holds exactly its writer's data, seen
through a new connection and in the image file.
"""
import multiprocessing
import os
import random
import struct
import sys
import time
import traceback

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq, check_bytes, log  # noqa: E402

PAT_SIZE = 16 * MiB          # [0, 16 MiB): the pattern
NWRITERS = 4
REGION = 8 * MiB             # writer i owns [16 MiB + i*8 MiB, +8 MiB)
SIZE = PAT_SIZE + NWRITERS * REGION
BLOCK = 4096
DEPTH = 16


def pattern(nbytes):
    """Each 4 KiB block: 512 big-endian 64-bit words (block << 16 | word)."""
    out = bytearray()
    for b in range(nbytes // BLOCK):
        out += struct.pack(">512Q", *((b << 16) | w for w in range(512)))
    return bytes(out)


def run_child(fn, *args):
    """Child process body: exit 0, or print the failure and exit 1."""
    try:
        fn(*args)
    except BaseException as e:  # noqa: B036 - a child reports everything
        log("child %s%r FAILED: %s" % (fn.__name__, args[:1], e))
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def reader(idx, port, pat, nops, stop_at=None):
    nbd = xt.need_nbd()
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(port))
    rnd = random.Random(1000 + idx)
    sizes = [1, 7, 512, 4095, 4096, 4097, 65535, 65536, 65537, 200000, 1 * MiB]
    inflight = {}
    issued = done = 0
    while done < nops:
        while len(inflight) < DEPTH and issued < nops:
            n = rnd.choice(sizes)
            off = rnd.randrange(0, PAT_SIZE - n + 1)
            if rnd.random() < 0.3:               # some block-aligned reads
                off -= off % BLOCK
            buf = nbd.Buffer(n)
            c = h.aio_pread(buf, off)
            inflight[c] = (buf, off, n)
            issued += 1
        h.poll(-1)
        while inflight:
            c = h.aio_peek_command_completed()
            if not c:
                break
            h.aio_command_completed(c)      # raises on a failed read
            buf, off, n = inflight.pop(c)
            got = buf.to_bytearray()
            if got != pat[off:off + n]:
                i = xt.first_diff(got, pat[off:off + n])
                bad = off + i
                xt.fail("reader %d: read (%d, %d): wrong byte at offset %d "
                        "(block %d): got %r, expected %r" % (
                            idx, off, n, bad, bad // BLOCK, bytes(got[i:i + 8]),
                            pat[bad:bad + 8]))
            done += 1
        if stop_at is not None and stop_at.is_set() and done >= nops // 10:
            break
    h.shutdown()


def writer(idx, port, expect_path):
    nbd = xt.need_nbd()
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(port))
    rnd = random.Random(2000 + idx)
    base = PAT_SIZE + idx * REGION
    model = bytearray(REGION)
    for rnd_pass in range(3):
        # tile the region with pieces of random (unaligned) sizes, shuffled
        pieces = []
        pos = 0
        while pos < REGION:
            n = min(REGION - pos, rnd.choice([1, 333, 4096, 5000, 65536,
                                              65537, 131072, 300000]))
            pieces.append((pos, n))
            pos += n
        rnd.shuffle(pieces)
        if rnd_pass == 2:                    # last pass: only a subset
            pieces = pieces[:len(pieces) // 3]
        inflight = {}
        i = 0
        while i < len(pieces) or inflight:
            while len(inflight) < DEPTH and i < len(pieces):
                pos, n = pieces[i]
                i += 1
                data = rnd.randbytes(n)
                model[pos:pos + n] = data
                fl = nbd.CMD_FLAG_FUA if rnd.random() < 0.05 else 0
                c = h.aio_pwrite(nbd.Buffer.from_bytearray(data), base + pos,
                                 flags=fl)
                inflight[c] = (pos, n)
            h.poll(-1)
            while inflight:
                c = h.aio_peek_command_completed()
                if not c:
                    break
                h.aio_command_completed(c)
                del inflight[c]
        # the pass is answered: read it back on the same connection
        got = h.pread(REGION, base)
        check_bytes(got, model, "writer %d pass %d read back" % (idx, rnd_pass),
                    base)
    h.flush()
    h.shutdown()
    with open(expect_path, "wb") as f:
        f.write(model)


def start(ctx, fn, *args):
    p = ctx.Process(target=run_child, args=(fn,) + args)
    p.start()
    return p


def join_all(procs, timeout, what):
    end = time.time() + timeout
    failed = []
    for p in procs:
        p.join(max(0.1, end - time.time()))
        if p.is_alive():
            p.kill()
            p.join()
            failed.append("%s pid %d hung (killed after %d s)" % (what, p.pid, timeout))
        elif p.exitcode != 0:
            failed.append("%s pid %d exited %s" % (what, p.pid, p.exitcode))
    check(not failed, "; ".join(failed))


def test():
    xt.need_nbd()
    ctx = multiprocessing.get_context("fork")
    with xt.TestDir() as t:
        pat = pattern(PAT_SIZE)
        img = t.image("disk.img", SIZE, pat)
        srv = t.server(img)

        # ---- phase 1: 4 readers ----
        t0 = time.time()
        readers = [start(ctx, reader, i, srv.port, pat, 1500) for i in range(4)]
        join_all(readers, 60, "reader")
        log("phase 1: 4 readers x 1500 reads in %.1f s" % (time.time() - t0))
        check(srv.alive(), "server died in phase 1")

        # ---- phase 2: 4 writers on disjoint regions + 2 readers ----
        t0 = time.time()
        stop = ctx.Event()
        readers = [start(ctx, reader, 10 + i, srv.port, pat, 100000, stop)
                   for i in range(2)]
        writers = [start(ctx, writer, i, srv.port, t.join("expect.%d" % i))
                   for i in range(NWRITERS)]
        join_all(writers, 60, "writer")
        stop.set()
        join_all(readers, 30, "reader")
        log("phase 2: %d writers and 2 readers in %.1f s"
            % (NWRITERS, time.time() - t0))
        check(srv.alive(), "server died in phase 2")

        # ---- verify through a new connection and in the file ----
        h = srv.connect()
        check_bytes(h.pread(PAT_SIZE, 0), pat, "pattern region after phase 2")
        with open(img, "rb") as f:
            disk = f.read()
        check_bytes(disk[:PAT_SIZE], pat, "pattern region in the image file")
        for i in range(NWRITERS):
            base = PAT_SIZE + i * REGION
            with open(t.join("expect.%d" % i), "rb") as f:
                want = f.read()
            check_bytes(h.pread(REGION, base), want,
                        "region of writer %d (new connection)" % i, base)
            check_bytes(disk[base:base + REGION], want,
                        "region of writer %d (image file)" % i, base)
        h.shutdown()
        check_eq(srv.stop(), 0, "server exit status after SIGTERM")


if __name__ == "__main__":
    xt.main(test)
