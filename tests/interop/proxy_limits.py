#!/usr/bin/python3
"""xnbd-server --proxy --max-buf-size: bounded memory under a flood.

The upstream is slow (nbdkit's delay filter holds every read 200 ms), so
client requests pile up in the proxy waiting for their blocks.  Three raw
connections (tiny receive buffers, replies not read for a while) send
thousands of 4 MiB READs at unaligned offsets; the proxy's VmRSS, sampled
all along, must stay under --max-buf-size plus a fixed margin, and the
buffered bytes --query reports must stay near the bound.  Then every reply
must carry exactly the upstream's data and the proxy must still serve.
The same again with a flood of NBD_CMD_CACHE requests of 32 MiB ranges
(which carry no payload and are charged nothing by the request bound): the
proxy's memory must stay bounded too, every CACHE must succeed, and the
blocks must then be cached.
"""
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq  # noqa: E402

SIZE = 256 * MiB
BOUND = 32 * MiB          # --max-buf-size
MARGIN = 48 * MiB         # what the proxy may use beyond it
READ_CONNS = 3
READS = 350               # per connection
READ_LEN = 4 * MiB
CACHE_CONNS = 6
CACHES = 1024             # per connection (a session queues at most 1024)
CACHE_LEN = 32 * MiB
CACHE_AREA = 48 * MiB     # where the CACHE ranges lie
QUIET = 3.0               # seconds the flooders do not read replies
DELAY = "200ms"           # upstream read delay


def mem_kib(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Samples the proxy's VmRSS (and, now and then, --query) until told to
    stop; keeps the peaks."""

    def __init__(self, srv):
        super().__init__(daemon=True)
        self.srv = srv
        self.peak = 0
        self.peak_vm = 0
        self.peak_buffered = 0
        self.max_buf = None
        self.peak_waiting = 0
        self.samples = 0
        self.stopping = threading.Event()

    def run(self):
        last_q = 0
        while not self.stopping.is_set():
            self.peak = max(self.peak, mem_kib(self.srv.pid))
            self.peak_vm = max(self.peak_vm, mem_kib(self.srv.pid, "VmSize"))
            self.samples += 1
            if time.time() - last_q > 0.3:
                last_q = time.time()
                try:
                    q = xt.query(self.srv.ctl)
                    self.peak_buffered = max(self.peak_buffered,
                                             q["buffered-bytes"])
                    self.peak_waiting = max(self.peak_waiting,
                                            q["waiting-requests"])
                    self.max_buf = q["max-buf-size"]
                except Exception:
                    pass
            time.sleep(0.01)

    def stop(self):
        self.stopping.set()
        self.join()


def connect(srv):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Small buffers: the proxy's replies pile up in the proxy, not here.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.connect((srv.addr, srv.port))
    s.settimeout(120)
    c = xt.RawClient(s)
    c.handshake()
    return c


class Flooder(threading.Thread):
    """One connection: send all requests (cmd, offset, length), wait until
    `go` is set, then read every reply and check it."""

    def __init__(self, srv, cmd, reqs, image, go):
        super().__init__(daemon=True)
        self.c = connect(srv)
        self.cmd, self.reqs, self.image, self.go = cmd, reqs, image, go
        self.error = None
        self.replies = 0
        self.sent = 0

    def sender(self):
        try:
            for i, (off, ln) in enumerate(self.reqs):
                self.c.send_request(self.cmd, off, ln, cookie=i + 1)
                self.sent += 1
        except Exception as e:
            self.error = self.error or "sending: %r" % e

    def run(self):
        snd = threading.Thread(target=self.sender, daemon=True)
        snd.start()
        try:
            self.go.wait()
            s = self.c.s
            buf = bytearray(max(ln for _, ln in self.reqs)
                            if self.cmd == xt.CMD_READ else 16)
            mv = memoryview(buf)
            answered = set()
            for _ in self.reqs:
                hdr = xt.recv_exact(s, 16)
                magic, err, cookie = struct.unpack(">IIQ", hdr)
                if magic != xt.SIMPLE_REPLY_MAGIC:
                    raise Exception("bad reply magic %#x" % magic)
                if not 1 <= cookie <= len(self.reqs):
                    raise Exception("reply for unknown cookie %d" % cookie)
                if cookie in answered:
                    raise Exception("a second reply for cookie %d" % cookie)
                answered.add(cookie)
                off, ln = self.reqs[cookie - 1]
                if err:
                    raise Exception("request %d (%d+%d) failed: error %d"
                                    % (cookie, off, ln, err))
                if self.cmd == xt.CMD_READ:
                    got = 0
                    while got < ln:
                        n = s.recv_into(mv[got:ln])
                        if not n:
                            raise Exception("EOF in the data of a reply")
                        got += n
                    data = bytes(mv[:ln])
                    if data != self.image[off:off + ln]:
                        d = xt.first_diff(data, self.image[off:off + ln])
                        raise Exception("read %d+%d: wrong data at offset %d"
                                        % (off, ln, off + d))
                self.replies += 1
        except Exception as e:
            self.error = self.error or "%r" % e
        snd.join(30)


def flood(srv, cmd, conns, per_conn, length, area, image, rnd, what):
    idle = mem_kib(srv.pid)
    idle_vm = mem_kib(srv.pid, "VmSize")
    go = threading.Event()
    fl = []
    for _ in range(conns):
        reqs = [(rnd.randrange(area - length + 1), length)
                for _ in range(per_conn)]
        fl.append(Flooder(srv, cmd, reqs, image, go))
    sampler = Sampler(srv)
    sampler.start()
    t0 = time.time()
    for f in fl:
        f.start()
    time.sleep(QUIET)
    quiet_peak = sampler.peak
    go.set()
    for f in fl:
        f.join(90)
        check(not f.is_alive(), "%s: a flooder still runs after 90 s "
              "(%d of %d replies)" % (what, f.replies, len(f.reqs)))
    sampler.stop()
    dt = time.time() - t0
    xt.log("%s: %d requests of %d MiB on %d connections in %.1f s; proxy "
           "RSS idle %d KiB, peak %d KiB while no reply was read, peak %d KiB "
           "overall (%d samples; bound %d KiB + margin %d KiB); VmSize idle "
           "%d KiB, peak %d KiB; buffered bytes peak %d (max-buf-size %s); "
           "requests waiting for the upstream peak %d"
           % (what, conns * per_conn, length // MiB, conns, dt, idle,
              quiet_peak, sampler.peak, sampler.samples, BOUND // 1024,
              MARGIN // 1024, idle_vm, sampler.peak_vm,
              sampler.peak_buffered, sampler.max_buf, sampler.peak_waiting))
    for f in fl:
        check(f.error is None, "%s: %s" % (what, f.error))
        check_eq(f.replies, len(f.reqs), "%s: replies received" % what)
        f.c.close()
    check(sampler.samples > 50, "%s: RSS was sampled" % what)
    # Reported at the end, so that a blown bound hides no other result.
    if sampler.max_buf is not None:
        xt.expect(sampler.peak_buffered <= BOUND + READ_LEN,
                  "%s: buffered bytes (%d) stay within --max-buf-size plus "
                  "one request" % (what, sampler.peak_buffered))
    if sanitized(srv.pid):
        # ASan keeps freed memory in quarantine (256 MiB by default) and
        # shadows every allocation: its RSS says nothing about ours.  The
        # flood's correctness is still checked; the bound only in plain
        # builds.
        xt.log("%s: sanitizer build: peak RSS %d KiB reported, not checked"
               % (what, sampler.peak))
        return fl
    xt.expect(sampler.peak < (BOUND + MARGIN) // 1024,
              "%s: the proxy's peak RSS %d KiB stays under --max-buf-size "
              "%d KiB + %d KiB (idle: %d KiB)"
              % (what, sampler.peak, BOUND // 1024, MARGIN // 1024, idle))
    return fl


def sanitized(pid):
    """Does the process run with AddressSanitizer's runtime?"""
    try:
        with open("/proc/%d/maps" % pid) as f:
            return "libasan" in f.read()
    except OSError:
        return False


def still_serves(srv, image):
    c = connect(srv)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    err, data = c.read(12345, 100000)
    check_eq(err, 0, "a read after the flood")
    check(data == image[12345:12345 + 100000], "a read after the flood "
          "returns the upstream's data")
    err, _ = c.command(xt.CMD_WRITE, 4096, 4096, data=b"\x5a" * 4096)
    check_eq(err, 0, "a write after the flood")
    err, data = c.read(4000, 200)
    check(err == 0 and data == image[4000:4096] + b"\x5a" * 104,
          "a read of the write after the flood")
    c.close()


def run():
    xt.need_tools("nbdkit")
    rnd = random.Random()
    with xt.TestDir() as t:
        img = t.join("upstream.img")
        with open(img, "wb") as f:
            for _ in range(SIZE // MiB):
                f.write(rnd.randbytes(MiB))
        upf = open(img, "rb")
        image = mmap.mmap(upf.fileno(), 0, access=mmap.ACCESS_READ)
        for _ in range(5):  # another port if the one picked gets taken
            port = xt.free_port()
            with open(t.join("nbdkit.log"), "w") as errf:
                nbdkit = xt.track(subprocess.Popen(
                    ["nbdkit", "--exit-with-parent", "-f", "-p", str(port),
                     "-i", "127.0.0.1", "--filter=delay", "file", img,
                     "rdelay=" + DELAY], stderr=errf))
            if xt.wait_port("127.0.0.1", port, nbdkit):
                break
            xt.stop_process(nbdkit)
        else:
            xt.fail("nbdkit did not start: %s"
                    % open(t.join("nbdkit.log")).read())
        xt.log("nbdkit pid %d on port %d (reads delayed %s)"
               % (nbdkit.pid, port, DELAY))

        # 1. READ flood.
        p = t.proxy(port, name="r", args=["--max-buf-size", "32M"])
        flood(p, xt.CMD_READ, READ_CONNS, READS, READ_LEN, SIZE, image, rnd,
              "READ flood")
        still_serves(p, image)
        check_eq(p.stop(), 0, "the proxy's exit status after SIGTERM")

        # 2. CACHE flood, on a cold cache.
        p = t.proxy(port, name="c", args=["--max-buf-size", "32M"])
        fl = flood(p, xt.CMD_CACHE, CACHE_CONNS, CACHES, CACHE_LEN,
                   CACHE_AREA, image, rnd, "CACHE flood")
        want = set()
        for f in fl:
            for off, ln in f.reqs:
                want.update(range(off // 4096, (off + ln - 1) // 4096 + 1))
        q = xt.query(p.ctl)
        xt.log("after the CACHE flood: %d of %d blocks cached"
               % (q["cached-blocks"], q["blocks"]))
        check_eq(q["cached-blocks"], len(want),
                 "blocks cached after the CACHE flood (those it covered)")
        still_serves(p, image)
        check_eq(p.stop(), 0, "the proxy's exit status after SIGTERM")

        image.close()
        upf.close()
        xt.stop_process(nbdkit)


xt.main(run)
