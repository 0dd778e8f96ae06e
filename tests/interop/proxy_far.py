#!/usr/bin/python3
"""xnbd-server --proxy of an upstream far away: its bytes held back 15 ms
each way by bench/delay_relay.c (this VM's kernel has no netem).

- nbdcopy through the cold proxy (many reads in flight, each waiting a
  round trip of 30 ms for its fetch) returns the upstream's image byte for
  byte, and so does a second copy, from the cache.
- A write through the proxy, a cold read across it (a small one takes a
  round trip at least: the link is far indeed) and the fill
  (`xnbd-bgctl --cache-all`) over the far link: the cache then equals the
  upstream except where the client wrote, and the bitmap says 100%.
- The fetch window (how many bytes of fetches the proxy keeps in flight)
  shrinks from its start of 64 MiB for an upstream on loopback, and for
  the far link it is at least twice what the copy fetched in a round
  trip; --query reports the upstream's latency as no less than the round
  trip.  XNBD_FETCH_WINDOW
  fixes the window (0: none), and a value that is no size is refused with
  a warning, the proxy sizing its window itself.
- A small cold read takes the lane past fetches waiting for the window:
  with an upstream slow per read (nbdkit's delay filter, 100 ms) and the
  window fixed at 1 MiB, one client queues 64 reads of 256 KiB (16 rounds
  of the window) and another's 4 KiB read comes back while most of them
  still wait.
- The relay itself passes both directions through unchanged (a direct
  nbdcopy of the upstream through it), and a side that sends and closes
  at once has all its bytes, then the end of the stream, arrive on the
  other side, a delay later.
"""
import os
import socket
import subprocess
import threading
import time

import xnbdtest as xt

DELAY_MS = 15


def relay(up_port):
    port = xt.free_port()
    proc = xt.track(subprocess.Popen(
        [os.environ["DELAY_RELAY"], str(port), str(up_port), str(DELAY_MS)]))
    end = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return proc, port
        except OSError:
            if time.time() > end or proc.poll() is not None:
                xt.fail("delay_relay did not listen on %d" % port)
            time.sleep(0.05)


def send_and_close():
    """Bytes sent right before a close reach the other side whole, then
    its end of stream, no sooner than the delay."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    proc, port = relay(sink.getsockname()[1])
    sink.settimeout(10)
    sink.accept()[0].close()  # relay()'s own probe, passed on
    got = {}

    def drain():
        c, _ = sink.accept()
        buf = bytearray()
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            buf += b
        got["data"], got["at"] = bytes(buf), time.time()
        c.close()
    th = threading.Thread(target=drain, daemon=True)
    th.start()
    data = os.urandom(3 << 20)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(data)
    t0 = time.time()
    s.close()
    th.join(30)
    sink.close()
    xt.check("data" in got, "the relay passed on no end of stream")
    xt.check_bytes(got["data"], data, "bytes sent right before a close")
    xt.check(got["at"] - t0 >= DELAY_MS / 1000,
             "the end of stream came %.3f s after the close, before the "
             "%d ms delay" % (got["at"] - t0, DELAY_MS))
    xt.stop_process(proc)


def copy(uri, dest):
    r = subprocess.run(["nbdcopy", uri, dest], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        xt.fail("nbdcopy %s: %s" % (uri, r.stderr))


def main():
    xt.need_nbd()
    xt.need_tools("nbdcopy")
    with xt.TestDir() as t:
        size = 32 * xt.MiB
        src = os.urandom(size)
        up = t.server(t.image("src.img", size, src), ["--readonly"])
        rproc, rport = relay(up.port)

        send_and_close()

        # The relay alone: both directions, handshake and all.
        out = t.join("direct.out")
        copy("nbd://127.0.0.1:%d" % rport, out)
        with open(out, "rb") as f:
            xt.check_bytes(f.read(), src, "through the relay alone")

        # A cold proxy behind it: every read waits for a far fetch.
        p = t.proxy(rport, name="far")
        t0 = time.time()
        copy(p.uri, out)
        took = time.time() - t0
        with open(out, "rb") as f:
            xt.check_bytes(f.read(), src, "cold copy through the proxy")
        xt.log("cold copy of %d MiB over a %d ms round trip: %.2f s"
               % (size >> 20, 2 * DELAY_MS, took))
        copy(p.uri, out)  # again, from the cache
        with open(out, "rb") as f:
            xt.check_bytes(f.read(), src, "warm copy through the proxy")
        p.stop()

        # A fresh cache: a write, a cold read across it, then the fill.
        p = t.proxy(rport, name="fill")
        h = p.connect()
        model = bytearray(src)
        h.pwrite(b"\x5a" * 6000, 3 * xt.MiB + 100)
        model[3 * xt.MiB + 100:3 * xt.MiB + 6100] = b"\x5a" * 6000
        xt.check_bytes(h.pread(2 * xt.MiB, 2 * xt.MiB),
                       model[2 * xt.MiB:4 * xt.MiB], "cold read across a write")
        # The link is far indeed: a cold read waits a round trip.
        t0 = time.time()
        xt.check_bytes(h.pread(4096, 20 * xt.MiB),
                       src[20 * xt.MiB:20 * xt.MiB + 4096], "a cold read")
        took = time.time() - t0
        xt.check(took >= 2 * DELAY_MS / 1000,
                 "a cold read took %.3f s, under the %d ms round trip"
                 % (took, 2 * DELAY_MS))
        xt.bgctl("--cache-all", p.ctl, check_rc=0)
        q = xt.query(p.ctl)
        xt.check_eq(q["cached-blocks"], q["blocks"],
                    "blocks cached after the fill")
        h.shutdown()
        p.stop()
        with open(p.cache, "rb") as f:
            xt.check_bytes(f.read(), bytes(model), "cache after the fill")
        fetch_window(t, up, rport, src)
        xt.stop_process(rproc)
        small_reads_lane(t, src)


def cold_copy(t, port, name, size):
    """A cold copy to null: through a new proxy of port: (proxy, MiB/s)."""
    p = t.proxy(port, name=name)
    t0 = time.time()
    r = subprocess.run(["nbdcopy", p.uri, "null:"], capture_output=True,
                       text=True, timeout=600)
    xt.check(r.returncode == 0, "nbdcopy to null: " + r.stderr)
    rate = size / xt.MiB / (time.time() - t0)
    q = xt.query(p.ctl)
    xt.log("%s: cold copy at %.0f MiB/s; fetch window %d KiB, upstream "
           "latency %d us" % (name, rate, q["fetch-window"] >> 10,
                              q["upstream-latency-us"]))
    return p, q, rate


def fetch_window(t, up, rport, src):
    # Cold copies of 512 MiB, enough for the window to settle: it is sized
    # after a first epoch, a probe and two more epochs (fetchctl.h), and a
    # copy of 256 MiB from an upstream on loopback that does not pace (a
    # listener on loopback, since 2026-12-06) was over in about 200 ms,
    # before that in 2 of 8 runs.  (A copy whose fetches all came back
    # between its requests kept the window at its start, before short
    # idle gaps stayed in an epoch: fourteenth session.)
    size = 512 * xt.MiB
    big = t.join("big.img")
    with open(big, "wb") as f:
        f.truncate(size)
    bup = t.server(big, ["--readonly"])
    # Near: piled-up fetches buy nothing; the window shrinks from 64 MiB.
    p, q, rate = cold_copy(t, bup.port, "win-near", size)
    xt.check(0 < q["fetch-window"] < 64 * xt.MiB,
             "the fetch window shrank for an upstream on loopback: %r" % q)
    p.stop()
    # Far: the window holds what arrives in a round trip, and more.
    bproc, bport = relay(bup.port)
    p, q, rate = cold_copy(t, bport, "win-far", size)
    rtt = 2 * DELAY_MS / 1000
    xt.check(q["upstream-latency-us"] >= rtt * 1e6,
             "upstream latency %d us, under the round trip of %d ms"
             % (q["upstream-latency-us"], 2 * DELAY_MS))
    xt.check(q["fetch-window"] >= 2 * rate * xt.MiB * rtt,
             "the fetch window holds two round trips' fetches at %.0f "
             "MiB/s: %r" % (rate, q))
    human = xt.bgctl("--query", p.ctl, check_rc=0).stdout
    xt.check("fetch window:" in human and "upstream latency:" in human,
             "human-readable query:\n" + human)
    p.stop()
    xt.stop_process(bproc)

    # XNBD_FETCH_WINDOW: a fixed window, none, or a warning.
    for val, want in (("2M", 2 * xt.MiB), ("0", 0), ("12Q", 64 * xt.MiB),
                      ("-1", 64 * xt.MiB)):
        os.environ["XNBD_FETCH_WINDOW"] = val
        try:
            p = t.proxy(up.port, name="fw" + val)
        finally:
            del os.environ["XNBD_FETCH_WINDOW"]
        h = p.connect()
        xt.check_bytes(h.pread(xt.MiB, 5 * xt.MiB), src[5 * xt.MiB:6 * xt.MiB],
                       "a read with XNBD_FETCH_WINDOW=" + val)
        q = xt.query(p.ctl)
        xt.check_eq(q["fetch-window"], want, "XNBD_FETCH_WINDOW=" + val)
        bad = "XNBD_FETCH_WINDOW=%s is not a size" % val in p.log_text()
        xt.check(bad == (want == 64 * xt.MiB),
                 "a warning for XNBD_FETCH_WINDOW=%s exactly when it is bad; "
                 "log:\n%s" % (val, p.log_text()))
        h.shutdown()
        p.stop()


def small_reads_lane(t, src):
    nbd = xt.need_nbd()
    img = t.join("src.img")
    for _ in range(5):  # another port if the one picked gets taken
        port = xt.free_port()
        nk = xt.track(subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i",
             "127.0.0.1", "--filter=delay", "file", img, "rdelay=100ms"],
            stderr=subprocess.DEVNULL))
        if xt.wait_port("127.0.0.1", port, nk):
            break
        xt.stop_process(nk)
    else:
        xt.fail("nbdkit did not start")
    os.environ["XNBD_FETCH_WINDOW"] = "1M"
    try:
        p = t.proxy(port, name="lane")
    finally:
        del os.environ["XNBD_FETCH_WINDOW"]
    a, b = p.connect(), p.connect()
    big = 256 * 1024
    bufs = [nbd.Buffer(big) for _ in range(64)]
    cookies = [a.aio_pread(bufs[i], i * big) for i in range(64)]
    time.sleep(0.05)  # (all of them at the proxy first)
    small = nbd.Buffer(4096)
    t0 = time.time()
    c = b.aio_pread(small, 24 * xt.MiB)
    while not b.aio_command_completed(c):
        a.poll(0)
        b.poll(0)
        time.sleep(0.001)
    took = time.time() - t0
    done = sum(1 for k in cookies if a.aio_command_completed(k))
    xt.log("a 4 KiB cold read behind 64 x 256 KiB waiting for a 1 MiB "
           "window, 100 ms a read upstream: %.3f s, %d of the 64 back"
           % (took, done))
    xt.check_bytes(small.to_bytearray(), src[24 * xt.MiB:24 * xt.MiB + 4096],
                   "the small read")
    xt.check(done <= 32, "the small read waited for the queue: %.3f s, %d "
             "of 64 large reads back before it" % (took, done))
    while a.aio_in_flight():
        a.poll(-1)
    for i in range(64):
        a.aio_command_completed(cookies[i])  # (retired already, or now)
        xt.check_bytes(bufs[i].to_bytearray(), src[i * big:(i + 1) * big],
                       "large read %d" % i)
    a.shutdown()
    b.shutdown()
    p.stop()
    xt.stop_process(nk)


if __name__ == "__main__":
    xt.main(main)
