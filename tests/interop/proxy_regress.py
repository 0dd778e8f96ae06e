#!/usr/bin/python3
"""Proxy regressions found in review, each once a crash or a hang:

1. --cache-all on a proxy that has every block already (the fill ended
   inside its own start and was used after being freed: SIGSEGV).
2. The upstream dies while a fetch is in flight (the retry loop resent the
   fetch to the dead connection forever, at 100% CPU, and the read never
   finished once the upstream was back).
3. --force --switch while a --cache-all runs over the shared upstream
   connection (the fill restarted forever inside the switch).
4. SIGTERM while a --reconnect is still connecting (the request was never
   answered and leaked).
5. SIGTERM while a client's read waits for a lost upstream: the grace
   period closed the connection, but the session waited for the read
   forever, so the server never exited (and never synced its bitmap).
6. The same with an upstream that is connected but silent (stopped with
   SIGSTOP): its fetch in flight held the stop as well.
"""
import os
import signal
import subprocess
import threading
import time

import xnbdtest as xt


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def nbdkit(args, port=None):
    port = port or xt.free_port()
    p = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-r", "-i",
                          "127.0.0.1", "-p", str(port)] + args)
    xt._live.append(p)
    xt.check(xt.wait_port("127.0.0.1", port, p), "nbdkit started")
    return p, port


def pattern(off, length):
    """nbdkit's pattern plugin: each 8-byte word is its big-endian offset."""
    out = bytearray()
    for o in range(off - off % 8, off + length, 8):
        out += o.to_bytes(8, "big")
    s = off % 8
    return bytes(out[s:s + length])


def stop_with_waiting_read(p, h, off, why):
    """Start a read of an uncached block at off that waits for the
    upstream, stop the proxy: it must exit 0 within the grace period and
    a little more, and the read must get no data."""
    res = {}

    def rd():
        try:
            res["data"] = h.pread(4096, off)
        except Exception as e:  # noqa: BLE001 - reported below
            res["error"] = e
    th = threading.Thread(target=rd, daemon=True)
    th.start()
    time.sleep(0.5)
    xt.check(th.is_alive(), "the read waits for %s" % why)
    t0 = time.time()
    xt.check_eq(p.stop(timeout=30), 0, "exit status of a stop with a read "
                "waiting for %s" % why)
    took = time.time() - t0
    xt.log("stopped after %.1f s" % took)
    xt.check(took < 20, "the stop took %.1f s" % took)
    th.join(5)
    xt.check("data" not in res, "the waiting read got no data")


def main():
    nbd = xt.need_nbd()
    xt.need_tools("nbdkit")
    with xt.TestDir() as t:
        # 1. cache-all twice (the second finds everything cached).
        img = t.image("small.img", 2 * xt.MiB, os.urandom(2 * xt.MiB))
        up = t.server(img, ["--readonly"])
        p = t.proxy(up.port, name="one")
        for i in range(3):
            xt.bgctl("--cache-all", p.ctl, check_rc=0)
        xt.bgctl("--cache-all2", p.ctl, check_rc=0)
        xt.check(p.alive(), "proxy alive after cache-all on a full cache")
        p.stop()

        # 2. The upstream dies with a fetch in flight.
        up2, uport = nbdkit(["--filter=delay", "pattern", "size=64M", "rdelay=2"])
        p = t.proxy(uport, name="two")
        h = p.connect()
        res = {}

        def rd():
            try:
                res["data"] = h.pread(xt.MiB, 0)
            except Exception as e:  # noqa: BLE001 - reported below
                res["error"] = e
        th = threading.Thread(target=rd, daemon=True)
        th.start()
        time.sleep(0.7)
        up2.kill()
        up2.wait()
        time.sleep(0.5)
        c0 = cpu_ticks(p.pid)
        time.sleep(2)
        busy = cpu_ticks(p.pid) - c0
        xt.check(busy < 50, "the proxy idles while the upstream is gone "
                 "(%d ticks in 2 s)" % busy)
        xt.check(th.is_alive(), "the read waits for the upstream")
        up3, _ = nbdkit(["pattern", "size=64M"], port=uport)
        th.join(15)
        xt.check("data" in res, "the read finished after the upstream came "
                 "back: %r" % res.get("error"))
        xt.check_bytes(res["data"], pattern(0, xt.MiB), "the waiting read's data")
        h.shutdown()
        p.stop()
        xt._stop_quietly(up3)

        # 3. A forced switch during a fill over the shared connection.
        up4, uport = nbdkit(["--filter=delay", "pattern", "size=256M",
                             "rdelay=1"])
        p = t.proxy(uport, name="three")
        fill = subprocess.Popen([xt.BGCTL, "--cache-all", p.ctl],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(0.5)
        xt.bgctl("--force", "--switch", p.ctl, check_rc=0, timeout=20)
        out, err = fill.communicate(timeout=20)
        xt.check(fill.returncode == 1 and "switched" in err,
                 "the fill ends with a message: %d %r" % (fill.returncode, err))
        q = xt.query(p.ctl)
        xt.check_eq(q["state"], "switched", "state after the forced switch")
        xt.check_eq(p.stop(), 0, "proxy exit status")
        xt._stop_quietly(up4)

        # 4. SIGTERM while a reconnect is under way (to a listener that never
        #    greets).
        import socket
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        p = t.proxy(up.port, name="four")
        rc = subprocess.Popen([xt.BGCTL, "--reconnect", p.ctl, "127.0.0.1",
                               str(silent.getsockname()[1])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        time.sleep(0.5)
        xt.check_eq(p.stop(), 0, "proxy exits 0 with a reconnect under way")
        out, err = rc.communicate(timeout=20)
        xt.check(rc.returncode == 1 and err.strip(),
                 "the reconnect gets an answer or a clear end: %r" % err)
        silent.close()

        # 5. A stop while a read waits for a lost upstream ends after the
        #    grace period (10 s); cached blocks stay cached.
        up5, uport = nbdkit(["pattern", "size=64M"])
        p = t.proxy(uport, name="five")
        h = p.connect()
        xt.check_bytes(h.pread(65536, 0), pattern(0, 65536), "a cached read")
        h.flush()
        xt._stop_quietly(up5)
        stop_with_waiting_read(p, h, 32 * xt.MiB, "a lost upstream")
        xt.check("giving up 1 fetch" in p.log_text(),
                 "the log says what was given up")
        # The block read before the stop is still cached.
        up6, _ = nbdkit(["pattern", "size=64M"], port=uport)
        p = t.proxy(uport, name="five")
        q = xt.query(p.ctl)
        xt.check(int(q["cached-blocks"]) >= 16,
                 "cached blocks after the restart: %r" % q)
        xt.check_eq(p.stop(), 0, "proxy exit status")
        xt._stop_quietly(up6)

        # 6. A stop while a read waits for an upstream that is connected
        #    but does not answer.
        img7 = t.image("seven.img", 8 * xt.MiB, os.urandom(8 * xt.MiB))
        up7 = t.server(img7)
        p = t.proxy(up7.port, name="six")
        h = p.connect()
        h.pread(4096, 0)
        up7.signal(signal.SIGSTOP)
        try:
            stop_with_waiting_read(p, h, 4 * xt.MiB, "a silent upstream")
        finally:
            up7.signal(signal.SIGCONT)
        up7.stop()


xt.main(main)
