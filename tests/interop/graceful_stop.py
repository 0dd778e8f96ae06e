#!/usr/bin/python3
"""SIGTERM/SIGINT stop xnbd-server gracefully.

1. libnbd with many aio reads and writes in flight (the client not even
   reading its replies yet): SIGTERM; every command completes successfully,
   the writes are in the image, the server exits 0 within a few seconds.
2. The same over a raw socket, with 8 x 16 MiB reads whose replies cannot
   all be sent until the client reads them (backpressure): all arrive,
   complete and correct; then the server closes and exits 0; meanwhile
   it accepts no new connection.
3. An idle connected client (and one idle in the handshake): SIGTERM,
   and SIGINT, end the server with status 0 within a few seconds
   (SIGUSR2 before that changes nothing).
"""
import os
import random
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq, check_bytes, expect, log  # noqa: E402

SIZE = 64 * MiB
STOP_WITHIN = 5     # seconds


def wait_stopped(srv, what):
    t0 = time.time()
    rc = srv.stop(STOP_WITHIN, sig=None)   # signalled already; fails if slower
    log("%s: server exited %d after %.2f s" % (what, rc, time.time() - t0))
    check_eq(rc, 0, "%s: exit status" % what)


def libnbd_in_flight(t, nbd, pat):
    img = t.image("a.img", SIZE, pat)
    srv = t.server(img)
    h = srv.connect()
    rnd = random.Random(5)
    cmds = {}
    writes = []
    for k in range(24):
        off = (32 + k) * MiB
        data = rnd.randbytes(MiB)
        c = h.aio_pwrite(nbd.Buffer.from_bytearray(data), off,
                         flags=nbd.CMD_FLAG_FUA if k % 4 == 0 else 0)
        cmds[c] = ("write", off, data)
        writes.append((off, data))
    for k in range(24):
        off = rnd.randrange(0, 16 * MiB)
        buf = nbd.Buffer(4 * MiB)
        cmds[h.aio_pread(buf, off)] = ("read", off, buf)
    cmds[h.aio_flush()] = ("flush", 0, None)
    check(h.aio_in_flight() > 0, "nothing in flight")
    log("libnbd: %d commands issued, %d in flight" % (len(cmds), h.aio_in_flight()))
    # libnbd sends what the socket takes inside each call; the rest waits
    # for the next.  Push every command out (without reading replies), so
    # that all are with the server when it is stopped, however slow this
    # machine is today.
    import select
    end = time.time() + 10
    while h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE and time.time() < end:
        select.select([], [h.aio_get_fd()], [], 0.1)
        h.aio_notify_write()
    check(not h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE,
          "libnbd could not send its commands within 10 s")
    time.sleep(0.2)
    srv.signal(signal.SIGTERM)
    t0 = time.time()
    pending = set(cmds)
    while pending and time.time() - t0 < 10:
        h.poll(1000)
        for c in list(pending):
            try:
                if h.aio_command_completed(c):
                    pending.discard(c)
            except nbd.Error as e:
                kind, off, _ = cmds[c]
                xt.fail("in-flight %s at %d failed after SIGTERM: %s" % (kind, off, e))
    check(not pending, "%d in-flight commands never completed after SIGTERM"
          % len(pending))
    for c, (kind, off, buf) in cmds.items():
        if kind == "read":
            check_bytes(buf.to_bytearray(), pat[off:off + 4 * MiB],
                        "in-flight read at %d" % off, off)
    wait_stopped(srv, "libnbd aio in flight")
    with open(img, "rb") as f:
        disk = f.read()
    for off, data in writes:
        check_bytes(disk[off:off + MiB], data, "in-flight write at %d in the image" % off, off)


def raw_in_flight(t, pat):
    img = t.image("b.img", SIZE, pat)
    srv = t.server(img)
    c = xt.RawClient(srv.sock(timeout=20))
    c.handshake(structured=False)
    reads = {}
    writes = {}
    rnd = random.Random(6)
    for k in range(8):
        off = 40 * MiB + k * 512 * 1024
        data = rnd.randbytes(512 * 1024)
        writes[c.send_request(xt.CMD_WRITE, off, len(data), data=data)] = (off, data)
    for k in range(8):
        off = k * MiB + k
        reads[c.send_request(xt.CMD_READ, off, 16 * MiB)] = off
    flush = c.send_request(xt.CMD_FLUSH)
    time.sleep(0.3)                       # let the server take them all in
    srv.signal(signal.SIGTERM)
    # Once the server has taken the signal (on a loaded machine that can
    # take longer than any fixed sleep), its listener is closed.
    end = time.time() + 10
    while "stopping after requests in flight" not in srv.log_text() and \
            time.time() < end:
        time.sleep(0.02)
    time.sleep(0.1)
    # no new connections while stopping (listener closed)
    try:
        s2 = srv.sock(timeout=2)
        try:
            s2.settimeout(2)
            greet = s2.recv(8)
        except OSError:
            greet = b""
        s2.close()
        expect(greet == b"", "a new connection was greeted after SIGTERM")
    except OSError:
        pass                               # refused: good
    got = {}
    lens = {k: 16 * MiB for k in reads}
    while len(got) < len(reads) + len(writes) + 1:
        try:
            r = c.read_reply(lens)
        except xt.Closed as e:
            xt.fail("server closed with %d of %d in-flight requests unanswered: %s"
                    % (len(reads) + len(writes) + 1 - len(got),
                       len(reads) + len(writes) + 1, e))
        check(r["cookie"] not in got, "two replies for cookie %d" % r["cookie"])
        got[r["cookie"]] = r
    for k, off in reads.items():
        check_eq(got[k]["error"], 0, "error of in-flight read at %d" % off)
        check_bytes(got[k]["data"], pat[off:off + 16 * MiB], "in-flight read", off)
    for k, (off, data) in writes.items():
        check_eq(got[k]["error"], 0, "error of in-flight write at %d" % off)
    check_eq(got[flush]["error"], 0, "error of in-flight flush")
    check(xt.is_closed(c.s, STOP_WITHIN), "server did not close the connection "
          "after answering everything")
    c.close()
    wait_stopped(srv, "raw requests in flight")
    with open(img, "rb") as f:
        disk = f.read()
    for off, data in writes.values():
        check_bytes(disk[off:off + len(data)], data, "write in the image", off)


def idle(t, nbd, sig):
    img = t.image("c.img", SIZE)
    srv = t.server(img)
    h = srv.connect()
    h.pwrite(b"idle", 0)
    check_eq(h.pread(4, 0), b"idle", "read before the signal")
    # SIGUSR2 is ignored in target mode
    srv.signal(signal.SIGUSR2)
    time.sleep(0.2)
    check(srv.alive(), "SIGUSR2 killed the server")
    check_eq(h.pread(4, 0), b"idle", "read after SIGUSR2")
    # a second client stuck in the handshake (greeted, sent nothing)
    s = srv.sock()
    xt.recv_exact(s, 18)
    time.sleep(0.1)
    srv.signal(sig)
    wait_stopped(srv, "idle client, %s" % signal.Signals(sig).name)
    try:
        h.pread(4, 0)
        xt.fail("read succeeded after the server stopped")
    except nbd.Error:
        pass
    check(xt.is_closed(s, 2), "handshake-phase connection left open")
    s.close()


def test():
    nbd = xt.need_nbd()
    pat = random.Random(4).randbytes(SIZE)
    with xt.TestDir() as t:
        libnbd_in_flight(t, nbd, pat)
        raw_in_flight(t, pat)
        idle(t, nbd, signal.SIGTERM)
        idle(t, nbd, signal.SIGINT)


if __name__ == "__main__":
    xt.main(test)
