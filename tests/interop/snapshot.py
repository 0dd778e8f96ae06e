#!/usr/bin/python3
"""SIGUSR1 snapshot while a client keeps writing.

Pattern A is written over a 256 MiB image through NBD; SIGUSR1; as soon as
"snapshot started: PATH" is logged the client overwrites everything with
pattern B (from the end backwards, so most writes hit chunks the copier
has not reached; every 8th chunk zeroed and another trimmed instead).  Some of those writes must complete while PATH.partial
still exists (clients are not stalled); once "snapshot complete: PATH" is
logged, PATH equals pattern A byte for byte, the .partial file is gone,
and the image (through NBD and on disk) holds pattern B.  A second
SIGUSR1 during the snapshot changes nothing (it is refused, and the log
says so); SIGTERM during a snapshot ends the server with status 0, leaves
no .partial file and logs the cancellation before "server stopped".
Snapshots taken one right after another within one second are named
IMAGE.snapshot.T, IMAGE.snapshot.T.2, ...  An image whose snapshot name
would not fit PATH_MAX gets no snapshot (cut short, the name would be
another file's), the log says why, and serving goes on; one whose name
fits is named whole in log lines of over 2 KiB.
"""
import os
import random
import re
import signal
import struct
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq, check_bytes, log  # noqa: E402

SIZE = 256 * MiB
CHUNK = 1 * MiB
NCHUNKS = SIZE // CHUNK
DEPTH = 16

BASE = {b"A": random.Random(1).randbytes(CHUNK),
        b"B": random.Random(2).randbytes(CHUNK)}


def chunk(tag, i):
    """Chunk i of pattern tag: random base data, and every 4 KiB block
    stamped with the tag and its block number."""
    buf = bytearray(BASE[tag])
    for j in range(CHUNK // 4096):
        struct.pack_into(">8sQ", buf, j * 4096, tag * 8, i * (CHUNK // 4096) + j)
    return buf


def kind_b(i):
    """What phase B does to chunk i: write pattern B, zero it, or trim it."""
    return {3: "zero", 5: "trim"}.get(i % 8, "write")


def write_all(h, nbd, tag, order, on_complete=None, mixed=False):
    inflight = {}
    k = 0
    while k < len(order) or inflight:
        while len(inflight) < DEPTH and k < len(order):
            i = order[k]
            k += 1
            kind = kind_b(i) if mixed else "write"
            if kind == "zero":
                c = h.aio_zero(CHUNK, i * CHUNK)
            elif kind == "trim":
                c = h.aio_trim(CHUNK, i * CHUNK)
            else:
                c = h.aio_pwrite(nbd.Buffer.from_bytearray(chunk(tag, i)), i * CHUNK)
            inflight[c] = i
        h.poll(-1)
        while inflight:
            c = h.aio_peek_command_completed()
            if not c:
                break
            h.aio_command_completed(c)
            i = inflight.pop(c)
            if on_complete:
                on_complete(i)


def reflinks(directory):
    """Does the file system of directory support reflinks (FICLONE)?"""
    a, b = os.path.join(directory, "reflink.a"), os.path.join(directory, "reflink.b")
    with open(a, "wb") as f:
        f.write(b"x" * 4096)
    try:
        import fcntl
        with open(a, "rb") as src, open(b, "wb") as dst:
            fcntl.ioctl(dst.fileno(), 0x40049409, src.fileno())   # FICLONE
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            if os.path.exists(p):
                os.unlink(p)


def wait_log(srv, pattern, timeout):
    end = time.time() + timeout
    rx = re.compile(pattern)
    while time.time() < end:
        m = rx.search(srv.log_text())
        if m:
            return m
        if not srv.alive():
            xt.fail("server died waiting for %r; log:\n%s" % (pattern, srv.log_text()))
        time.sleep(0.005)
    xt.fail("no %r in the log after %d s; log:\n%s" % (pattern, timeout,
                                                       srv.log_text()[-2000:]))


def expected_b(i, got):
    """Chunk i after phase B: B, zeros, or (trimmed) zeros or still A."""
    k = kind_b(i)
    if k == "write":
        return chunk(b"B", i)
    if k == "zero":
        return bytes(CHUNK)
    return got if got in (bytes(CHUNK), bytes(chunk(b"A", i))) else bytes(CHUNK)


def compare_file(path, tag, what):
    with open(path, "rb") as f:
        for i in range(NCHUNKS):
            got = f.read(CHUNK)
            want = chunk(tag, i) if tag == b"A" else expected_b(i, got)
            if got != want:
                j = xt.first_diff(got, want)
                xt.fail("%s differs from pattern %s at offset %d (chunk %d): "
                        "got %r, expected %r" % (what, tag.decode(), i * CHUNK + j,
                                                 i, got[j:j + 16], bytes(want[j:j + 16])))
        check_eq(f.read(1), b"", "%s is longer than %d bytes" % (what, SIZE))


def test():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        img = t.image("disk.img", SIZE)
        srv = t.server(img)
        h = srv.connect()

        t0 = time.time()
        write_all(h, nbd, b"A", list(range(NCHUNKS)))
        h.flush()
        log("pattern A written in %.1f s" % (time.time() - t0))

        # ---- SIGUSR1, then overwrite everything while it copies ----
        t_sig = time.time()
        srv.signal(signal.SIGUSR1)
        m = wait_log(srv, r"snapshot started: (\S+)", 10)
        snap = m.group(1)
        partial = snap + ".partial"
        log("snapshot started: %s (%.3f s after the signal)" % (snap, time.time() - t_sig))
        check(snap.startswith(os.path.abspath(img) + ".snapshot."),
              "snapshot path %r is not IMAGE.snapshot.<time>" % snap)
        stamp = int(snap.rsplit(".", 1)[1])
        check(abs(stamp - int(t_sig)) <= 2, "snapshot time stamp %d, signal sent at %d"
              % (stamp, int(t_sig)))

        # The copy runs on a thread of its own (not on a pool whose threads
        # its writers may hold): listed before the .partial file is seen
        # still there, it was running.
        names = xt.thread_names(srv.pid)
        if os.path.exists(partial):
            check("xnbd-snapshot" in names,
                  "no xnbd-snapshot thread while %s exists: %s"
                  % (os.path.basename(partial), names))
            log("the copy runs on its own thread, xnbd-snapshot")

        # a second SIGUSR1 while this one runs must not disturb it
        srv.signal(signal.SIGUSR1)

        stats = {"during": 0, "after": 0, "first": None}

        def on_complete(i):
            if os.path.exists(partial):
                stats["during"] += 1
                if stats["first"] is None:
                    stats["first"] = time.time() - t_b
            else:
                stats["after"] += 1
        t_b = time.time()
        write_all(h, nbd, b"B", list(reversed(range(NCHUNKS))), on_complete,
                  mixed=True)
        log("pattern B written in %.2f s: %d writes completed while %s existed, "
            "%d after" % (time.time() - t_b, stats["during"],
                          os.path.basename(partial), stats["after"]))
        if stats["during"] == 0 and reflinks(t.path):
            # a reflink snapshot is instant: nothing to overlap with
            log("the file system has reflinks: the snapshot was instant")
        else:
            check(stats["during"] > 0,
                  "no write completed while the snapshot was being written "
                  "(clients stalled, or the snapshot was over before any write)")

        wait_log(srv, r"snapshot complete: " + re.escape(snap), 60)
        check(not os.path.exists(partial), "%s still exists after completion" % partial)
        check(os.path.exists(snap), "snapshot %s missing" % snap)
        check_eq(os.stat(snap).st_size, SIZE, "snapshot size")

        # ---- the snapshot is A, the image is B ----
        compare_file(snap, b"A", "snapshot file")
        h.flush()
        for i in range(0, NCHUNKS, 32):
            got = h.pread(32 * CHUNK, i * CHUNK)
            for k in range(32):
                g = got[k * CHUNK:(k + 1) * CHUNK]
                check_bytes(g, expected_b(i + k, g),
                            "image read through NBD, chunk %d" % (i + k),
                            (i + k) * CHUNK)
        compare_file(img, b"B", "image file")
        xt.check_own_threads(srv.pid, "after a snapshot under writes")
        h.shutdown()
        check(srv.alive(), "server died")
        # The second SIGUSR1 came while the snapshot ran (refused, said so),
        # or, were the copy instant, after it: then it is a second file.
        snaps = sorted(f for f in os.listdir(t.path) if ".snapshot." in f)
        if "a snapshot is being written already" in srv.log_text():
            check_eq(snaps, [os.path.basename(snap)], "snapshot files")
        else:
            check_eq(len(snaps), 2, "snapshot files: %s" % snaps)
            check_eq(snaps[0], os.path.basename(snap), "first snapshot file")
        check_eq(srv.stop(), 0, "server exit status after SIGTERM")
        check(" failed" not in srv.log_text(),
              "log mentions a failure:\n%s" % srv.log_text()[-2000:])

        # ---- SIGTERM during a snapshot: exit 0, no .partial left ----
        os.unlink(snap)
        srv2 = t.server(img)
        h = srv2.connect()
        h.pwrite(b"C" * CHUNK, 0)
        h.flush()
        srv2.signal(signal.SIGUSR1)
        m = wait_log(srv2, r"snapshot started: (\S+)", 10)
        snap2 = m.group(1)
        srv2.signal(signal.SIGTERM)
        rc = srv2.stop(10, sig=None)
        check_eq(rc, 0, "exit status after SIGTERM during a snapshot")
        text = srv2.log_text()
        check(" failed" not in text,
              "a cancelled snapshot logged as a failure:\n%s" % text[-2000:])
        if not os.path.exists(snap2):
            # the cancellation is said before the server says it stopped
            k = text.find("snapshot %s cancelled by the stop" % snap2)
            check(k >= 0, "no cancellation message:\n%s" % text[-2000:])
            check(k < text.find("server stopped"),
                  "cancellation logged after 'server stopped':\n%s" % text[-2000:])
        left = [f for f in os.listdir(t.path) if f.endswith(".partial")]
        check_eq(left, [], ".partial files left after SIGTERM during a snapshot")
        if os.path.exists(snap2):      # it may have finished first
            with open(snap2, "rb") as f:
                check_eq(f.read(CHUNK), b"C" * CHUNK, "snapshot finished at SIGTERM")
        # ---- an image whose size is not a multiple of the 1 MiB chunk ----
        odd_size = 3 * MiB + 777
        odd_data = random.Random(3).randbytes(odd_size)
        odd = t.image("odd.img", odd_size, odd_data)
        srv3 = t.server(odd)
        h = srv3.connect()
        check_eq(h.get_size(), odd_size, "size of the odd-sized export")
        check_bytes(h.pread(1000, odd_size - 1000), odd_data[-1000:], "odd-sized tail",
                    odd_size - 1000)
        srv3.signal(signal.SIGUSR1)
        m = wait_log(srv3, r"snapshot started: (\S+)", 10)
        h.pwrite(b"Z" * 777, odd_size - 777)        # into the partial last chunk
        wait_log(srv3, r"snapshot complete: " + re.escape(m.group(1)), 30)
        with open(m.group(1), "rb") as f:
            check_bytes(f.read(), odd_data, "snapshot of the odd-sized image")
        check_bytes(h.pread(777, odd_size - 777), b"Z" * 777, "odd-sized tail after write",
                    odd_size - 777)
        # ---- snapshots one right after another: each has its own name ----
        # IMAGE.snapshot.T, then IMAGE.snapshot.T.2, ... within one second.
        want = odd_data[:-777] + b"Z" * 777
        done_rx = r"snapshot complete: (\S+)"
        shared = False
        for attempt in range(5):
            for _ in range(2):
                n = len(re.findall(done_rx, srv3.log_text()))
                srv3.signal(signal.SIGUSR1)
                end = time.time() + 30
                while len(re.findall(done_rx, srv3.log_text())) <= n:
                    check(time.time() < end and srv3.alive(),
                          "snapshot not complete:\n%s" % srv3.log_text()[-2000:])
                    time.sleep(0.005)
            done = re.findall(done_rx, srv3.log_text())
            a, b = done[-2], done[-1]
            base = os.path.abspath(odd) + ".snapshot."
            ta, tb = (x[len(base):].split(".")[0] for x in (a, b))
            if ta == tb:
                na = a[len(base + ta):]
                check_eq(b, base + ta + ".%d" % (int(na[1:] or "1") + 1),
                         "name of a second snapshot within one second (after %s)" % a)
                shared = True
                break
        check(shared, "five pairs of snapshots never fell within one second")
        done = re.findall(done_rx, srv3.log_text())
        check_eq(len(set(done)), len(done), "snapshot names are distinct: %s" % done)
        for p in done[1:]:
            with open(p, "rb") as f:
                check_bytes(f.read(), want, "snapshot %s" % os.path.basename(p))
        check("cannot take snapshot" not in srv3.log_text(),
              "a snapshot was refused:\n%s" % srv3.log_text()[-2000:])
        log("%d snapshots one right after another, distinct names: %s" % (
            len(done) - 1, ", ".join(os.path.basename(p) for p in done[1:])))
        h.shutdown()
        check_eq(srv3.stop(), 0, "exit status (odd-sized image)")
        # ---- an image whose snapshot name would not fit PATH_MAX ----
        # Cut short, the name would be another file's: refused, said so,
        # nothing made, and serving goes on.
        deep = os.path.abspath(t.path)
        while len(deep) < 4096 - 1 - 300:
            deep = os.path.join(deep, "d" * 200)
        deep = os.path.join(deep, "i" * (4096 - 1 - 15 - len(deep) - 1))
        os.makedirs(os.path.dirname(deep))
        with open(deep, "wb") as f:
            f.truncate(MiB)
        srv4 = t.server(deep)
        h = srv4.connect()
        srv4.signal(signal.SIGUSR1)
        wait_log(srv4, r"cannot take a snapshot: its name \(the image's "
                 r"path and \.snapshot\.TIME\) would be longer than 4095 "
                 r"bytes", 10)
        check_eq(sorted(os.listdir(os.path.dirname(deep))),
                 [os.path.basename(deep)],
                 "files beside an image whose snapshot name is too long")
        h.pwrite(b"x" * 512, 0)
        check_bytes(h.pread(512, 0), b"x" * 512, "served after the refusal")
        h.shutdown()
        check_eq(srv4.stop(), 0, "exit status (long image path)")
        # ---- a snapshot whose name fits, in log lines of over 2 KiB ----
        # The log names it whole (lines are not cut at a buffer's size).
        mid = os.path.abspath(t.path)
        while len(mid) < 2200:
            mid = os.path.join(mid, "m" * 200)
        os.makedirs(mid)
        img5 = os.path.join(mid, "img")
        with open(img5, "wb") as f:
            f.write(b"5" * MiB)
        srv5 = t.server(img5)
        srv5.signal(signal.SIGUSR1)
        m = wait_log(srv5, r"snapshot complete: (\S+)", 30)
        check(m.group(1).startswith(img5 + ".snapshot.") and
              os.path.exists(m.group(1)),
              "the log names the snapshot whole: %s" % m.group(1)[-200:])
        with open(m.group(1), "rb") as f:
            check_bytes(f.read(), b"5" * MiB, "snapshot under a long path")
        check_eq(srv5.stop(), 0, "exit status (long log lines)")
        log("SIGTERM during a snapshot: %s" % (
            "snapshot completed first" if os.path.exists(snap2) else "cancelled"))


if __name__ == "__main__":
    xt.main(test)
