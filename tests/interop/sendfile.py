#!/usr/bin/python3
"""Large reads sent from the page cache with sendfile(), and the copy path
beside them.

xnbd-server answers a read of 64 KiB or more whose range is in the page
cache without reading it: the reply's data goes from the image's pages to
the socket when its turn comes.  This test checks what could go wrong with
that:
1. A client that reads slowly through a tiny receive buffer, with many
   large reads in flight: the server must wait for room in the middle of a
   reply's data and go on exactly where it stopped (simple and structured
   replies, unaligned offsets and lengths, small reads in between).
2. Reads of ranges in the page cache and of ranges evicted from it (which
   take the copy path through the thread pool) interleaved in one
   pipeline: every reply carries its own data, in the order sent.
3. The image's pages leaving the page cache while such replies wait (a
   slow client): the server reads the rest on its thread pool instead of
   letting sendfile wait for the disk, and every reply is still right.
4. The image shrinking under the server while such replies wait: the
   server must not send bytes it does not have.  The client either gets
   whole, correct replies or a closed connection; the server keeps
   running, answers reads past the new end with an error, and serves the
   image again once it is back.
"""
import ctypes
import os
import platform
import random
import socket
import struct
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_bytes, check_eq  # noqa: E402

SIZE = 64 * MiB


def cachestat_works(path):
    """Does cachestat(2) (Linux 6.5) answer for this file?  Without it
    the server sends nothing with sendfile."""
    libc = ctypes.CDLL(None, use_errno=True)
    nr = 561 if platform.machine() == "alpha" else 451
    fd = os.open(path, os.O_RDWR)
    try:
        rng = (ctypes.c_uint64 * 2)(0, 4096)
        cs = (ctypes.c_uint64 * 5)()
        return libc.syscall(nr, fd, ctypes.byref(rng), ctypes.byref(cs), 0) == 0
    finally:
        os.close(fd)


def conn(srv, structured, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        # Before connecting, so the window starts small.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect((srv.addr, srv.port))
    return xt.RawClient(s).handshake(structured=structured)


class SlowSock:
    """Reads through a socket a few KiB at a time, pausing now and then,
    so the server keeps finding the socket full."""

    def __init__(self, s, rng):
        self.s = s
        self.rng = rng
        self.n = 0

    def recv(self, n):
        self.n += 1
        if self.n % 64 == 0:
            time.sleep(0.002)
        return self.s.recv(min(n, self.rng.choice((512, 4096, 7000))))


def read_replies(c, reqs, model, what):
    """Read the replies to reqs [(cookie, off, len)] in order (the server
    answers a pipeline of reads of one kind in order only by chance, so
    match by cookie) and check each one's data against model."""
    want = {ck: (off, n) for ck, off, n in reqs}
    got = {}
    partial = {}
    while len(got) < len(want):
        r = c.read_reply({ck: n for ck, (off, n) in want.items()})
        ck = r["cookie"]
        check(ck in want and ck not in got, "%s: reply for cookie %d"
              % (what, ck))
        check_eq(r["error"], 0, "%s: error of read %d" % (what, ck))
        off, n = want[ck]
        if r["kind"] == "simple":
            got[ck] = r["data"]
            continue
        buf = partial.setdefault(ck, bytearray(n))
        if r["type"] == xt.REPLY_TYPE_OFFSET_DATA:
            o, = struct.unpack(">Q", r["payload"][:8])
            d = r["payload"][8:]
            check(off <= o and o + len(d) <= off + n,
                  "%s: data chunk [%d, +%d) outside read [%d, +%d)"
                  % (what, o, len(d), off, n))
            buf[o - off:o - off + len(d)] = d
        elif r["type"] == xt.REPLY_TYPE_OFFSET_HOLE:
            o, hn = struct.unpack(">QI", r["payload"][:12])
            buf[o - off:o - off + hn] = bytes(hn)
        if r["flags"] & xt.REPLY_FLAG_DONE:
            got[ck] = bytes(partial.pop(ck))
    for ck, (off, n) in want.items():
        check_bytes(got[ck], bytes(model[off:off + n]),
                    "%s: read [%d, +%d)" % (what, off, n), off)


def evict(path, off, n):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        f.read(n)


def slow_reader(srv, model, structured, rng):
    what = "slow reader (%s)" % ("structured" if structured else "simple")
    c = conn(srv, structured, rcvbuf=4096)
    reqs = []
    for i in range(40):
        if i % 5 == 4:
            off, n = rng.randrange(SIZE - 4096), rng.choice((1, 512, 4096))
        else:
            n = rng.choice((64 * 1024, 1 * MiB, 1 * MiB + 3, 2 * MiB - 1,
                            300001))
            off = rng.randrange(SIZE - n)
        reqs.append((c.send_request(xt.CMD_READ, off, n), off, n))
    time.sleep(0.3)  # let the server fill the socket and wait for room
    c.s = SlowSock(c.s, rng)
    read_replies(c, reqs, model, what)
    c.s = c.s.s
    c.close()
    xt.log("%s: %d reads checked" % (what, len(reqs)))


def mixed_paths(srv, img, model, rng):
    # The first half stays in the page cache, the second is evicted before
    # each batch, so its reads go through the thread pool and copy.
    half = SIZE // 2
    for structured in (False, True):
        c = conn(srv, structured)
        for batch in range(4):
            warm(img, 0, half)
            evict(img, half, half)
            reqs = []
            for i in range(32):
                n = rng.choice((64 * 1024, 256 * 1024, 1 * MiB, 1 * MiB + 7))
                base = 0 if i % 2 else half
                off = base + rng.randrange(half - n)
                reqs.append((c.send_request(xt.CMD_READ, off, n), off, n))
            read_replies(c, reqs, model,
                         "cached and evicted reads, batch %d" % batch)
        c.close()
    xt.log("reads from the page cache and from the disk interleave correctly")


def evicted_while_waiting(srv, img, model, rng):
    for structured in (False, True):
        c = conn(srv, structured, rcvbuf=4096)
        reqs = []
        for i in range(48):
            n = rng.choice((64 * 1024, 1 * MiB, 1 * MiB + 5))
            off = rng.randrange(SIZE - n)
            reqs.append((c.send_request(xt.CMD_READ, off, n), off, n))
        time.sleep(0.5)  # the replies wait for room in the socket
        evict(img, 0, SIZE)
        read_replies(c, reqs, model, "evicted while waiting (%s)"
                     % ("structured" if structured else "simple"))
        c.close()
        warm(img, 0, SIZE)
    xt.log("replies whose pages were evicted while they waited are right")


def shrinking_image(d, srv, img, model, sendfile):
    c = conn(srv, False, rcvbuf=4096)
    reqs = []
    for i in range(48):
        off = (i % 32) * MiB
        reqs.append((c.send_request(xt.CMD_READ, off, 1 * MiB), off, 1 * MiB))
    time.sleep(0.5)  # replies are waiting for room in the socket
    os.truncate(img, 0)
    c.s.settimeout(20)
    whole = errors = 0
    closed = False
    want = {ck: (off, n) for ck, off, n in reqs}
    try:
        for _ in reqs:
            # Reads that went through the thread pool may finish out of
            # order.
            r = c.read_reply({ck: n for ck, (off, n) in want.items()})
            check(r["cookie"] in want, "reply for cookie %d after the image "
                  "shrank" % r["cookie"])
            off, n = want.pop(r["cookie"])
            if r["error"]:
                errors += 1  # read through the pool after it shrank: EIO
                continue
            check_bytes(r["data"], bytes(model[off:off + n]),
                        "a whole reply sent while the image shrank", off)
            whole += 1
    except xt.Closed:
        closed = True
    except socket.timeout:
        xt.fail("the server neither finished nor closed the connection "
                "after the image shrank")
    c.close()
    xt.log("image shrank under waiting replies: %d whole replies, %d "
           "errors, connection %s" % (whole, errors,
                                      "closed" if closed else "open"))
    if sendfile:
        # Replies were waiting with their data still in the image (this is
        # also what shows that sendfile was used): the connection must end,
        # and for that reason.
        check(closed, "the connection went on after the image shrank under "
              "replies whose data was still to be sent")
        check("image ends before" in srv.log_text(),
              "the log does not say why the connection ended:\n" +
              srv.log_text()[-2000:])
    check(srv.alive(), "the server died when the image shrank")
    c = conn(srv, True)
    err, _ = c.read(5 * MiB, 1 * MiB)
    check(err != 0, "a read past the image's new end succeeded")
    # The image is back: reads are right again.
    with open(img, "r+b") as f:
        f.write(model)
    warm(img, 0, SIZE)
    for off in (0, 5 * MiB + 1, SIZE - 1 * MiB):
        err, data = c.read(off, 1 * MiB)
        check_eq(err, 0, "read after the image came back")
        check_bytes(data, bytes(model[off:off + MiB]),
                    "read after the image came back", off)
    c.close()


def test():
    rng = random.Random(int(os.environ.get("XNBD_SEED", "20261202")))
    xt.log("seed %s" % os.environ.get("XNBD_SEED", "20261202"))
    with xt.TestDir() as d:
        model = bytearray(rng.randbytes(SIZE))
        # A zero stretch, so structured replies may carry hole chunks too.
        model[10 * MiB:12 * MiB] = bytes(2 * MiB)
        img = d.image("disk.img", SIZE, bytes(model))
        warm(img, 0, SIZE)
        sendfile = cachestat_works(img)
        if not sendfile:
            xt.log("cachestat(2) is missing: the server copies every read, "
                   "and only that path is tested")
        srv = d.server(img)
        for structured in (False, True):
            slow_reader(srv, model, structured, rng)
        mixed_paths(srv, img, model, rng)
        evicted_while_waiting(srv, img, model, rng)
        xt.check_own_threads(srv.pid, "after reloads of evicted reads")
        shrinking_image(d, srv, img, model, sendfile)
        check_eq(srv.stop(), 0, "exit status after SIGTERM")


if __name__ == "__main__":
    xt.main(test)
