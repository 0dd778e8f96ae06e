#!/usr/bin/python3
"""A request that arrives while the server is stopping is answered
ESHUTDOWN (the spec's recommendation), the request in flight before the
signal still gets its data, and the server then exits 0."""
import os
import signal
import socket
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq  # noqa: E402

ESHUTDOWN = 108


def test():
    with xt.TestDir() as d:
        data = bytes(range(256)) * (32 * MiB // 256)
        img = d.image("disk.img", 32 * MiB, data)
        srv = d.server(img)
        s = socket.create_connection((srv.addr, srv.port))
        c = xt.RawClient(s)
        c.handshake()
        s.settimeout(20)
        # A 32 MiB read, more than the socket buffers hold while we do not
        # read: its reply stays in flight across the signal.  (A tiny
        # receive buffer would do it too, but makes TCP crawl.)
        first = c.send_request(xt.CMD_READ, 0, 32 * MiB)
        time.sleep(0.3)
        srv.signal(signal.SIGTERM)
        time.sleep(0.3)
        late = c.send_request(xt.CMD_READ, 4096, 4096)
        r = c.read_reply({first: 32 * MiB, late: 4096})
        check_eq(r["cookie"], first, "the request in flight is answered first")
        check_eq(r["error"], 0, "the request in flight succeeds")
        check(r["data"] == data, "and carries the right data")
        r = c.read_reply({first: 32 * MiB, late: 4096})
        check_eq(r["cookie"], late, "the late request is answered")
        check_eq(r["error"], ESHUTDOWN, "with ESHUTDOWN")
        check_eq(srv.stop(), 0, "the server exits 0")
        c.close()


xt.main(test)
