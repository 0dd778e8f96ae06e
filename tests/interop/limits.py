#!/usr/bin/python3
"""--max-queue-size and --max-buf-size: backpressure without deadlock.

A client that sends large reads and never reads the replies fills the
server-wide bound; other clients then wait (that is what the bound means),
but once the greedy client goes away every waiting client is served.  A
second server shows that, without the options, a client that never reads
cannot hold up another one (the per-connection bound applies), and that
peak memory stays near the configured --max-buf-size while a client floods
1 MiB writes.
"""
import os
import socket
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq  # noqa: E402


def conn(srv, rcvbuf=None):
    s = socket.create_connection((srv.addr, srv.port))
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    c = xt.RawClient(s)
    c.handshake()
    return c


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test():
    with xt.TestDir() as d:
        img = d.image("disk.img", 64 * MiB)

        # 1. A bounded queue: the greedy client's exit wakes the others.
        srv = d.server(img, ["--max-queue-size", "4"])
        a = conn(srv, rcvbuf=4096)
        for i in range(8):
            a.send_request(xt.CMD_READ, i * MiB, 8 * MiB)
        time.sleep(0.5)
        b = conn(srv)
        b.s.settimeout(20)
        cookie = b.send_request(xt.CMD_READ, 0, 4096)
        time.sleep(0.3)
        a.s.close()
        err, data = b.reply_for(cookie, 4096)
        check_eq(err, 0, "a waiting client's read after the greedy "
                 "client left")
        err, data = b.read(4096, 4096)
        check_eq(err, 0, "the waiting client keeps being served")
        b.close()
        srv.stop()

        # 2. No server-wide bound: a client that never reads its replies
        # does not hold up another client.
        srv = d.server(img)
        a = conn(srv, rcvbuf=4096)
        for i in range(16):
            a.send_request(xt.CMD_READ, i * MiB, 16 * MiB)
        time.sleep(0.5)
        b = conn(srv)
        b.s.settimeout(10)
        err, data = b.read(0, 4096)
        check_eq(err, 0, "another client is served while one never reads")
        a.s.close()
        b.close()
        srv.stop()

        # 3. Memory under a flood of 1 MiB writes stays near the bound.
        srv = d.server(img, ["--max-buf-size", "16M"])
        a = conn(srv, rcvbuf=4096)
        payload = b"\xab" * MiB
        peak = 0
        a.s.settimeout(0.05)
        sent = 0
        t_end = time.time() + 3
        while time.time() < t_end and sent < 200:
            try:
                a.send_request(xt.CMD_WRITE, (sent % 64) * MiB, MiB,
                               data=payload)
                sent += 1
            except socket.timeout:
                pass  # the server stopped reading: backpressure
            peak = max(peak, rss_kib(srv.pid))
        xt.log("%d writes sent; server peak RSS %d KiB" % (sent, peak))
        check(peak < (16 + 32) * 1024,
              "server RSS stays under --max-buf-size plus a margin "
              "(%d KiB)" % peak)
        a.s.close()
        srv.stop()


xt.main(test)
