#!/usr/bin/python3
"""xnbd-server --cow-target against libnbd, nbdinfo and fio.

Checks that the base image is never written, that clients share one
overlay and read back exactly a model of their writes (unaligned, zeroing,
trimming, pipelined, from two connections), that FLUSH/FUA work, that
BLOCK_STATUS reports both layers honestly, that fio --verify passes, and
that no overlay file survives SIGTERM or SIGKILL.
"""
import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import nbd
except ImportError:
    print("SKIP: python3-libnbd is not installed")
    sys.exit(77)

SERVER = os.environ.get("XNBD_SERVER", "build/server/xnbd-server")
SIZE = 32 << 20
BLOCK = 4096
HOLE = 20 << 20  # a hole in the base image


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVERS = []


class Server:
    def __init__(self, args, log, env=None):
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [SERVER, "--laddr", "127.0.0.1", "--lport", str(self.port),
             "--logpath", log] + args, env=env)
        SERVERS.append(self.proc)
        end = time.time() + 10
        while True:
            if self.proc.poll() is not None:
                raise SystemExit("server exited early: %s" % self.proc.returncode)
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.time() > end:
                    raise SystemExit("server did not start")
                time.sleep(0.05)
        self.uri = "nbd://127.0.0.1:%d/" % self.port

    def connect(self):
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        h.connect_uri(self.uri)
        return h

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(15)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check(cond, what):
    if not cond:
        raise SystemExit("FAIL: " + what)
    print("ok:", what)


def extents(h, off, length):
    got = []

    def cb(meta, offset, entries, err):
        if meta == "base:allocation":
            for i in range(0, len(entries), 2):
                got.append((entries[i], entries[i + 1]))
    h.block_status(length, off, cb)
    return got


def wait_all(h, cookies):
    """Wait for libnbd commands; a completed cookie is retired once."""
    left = set(cookies)
    end = time.time() + 60
    while left:
        if time.time() > end:
            raise SystemExit("FAIL: %d commands never answered" % len(left))
        h.poll(1000)
        for c in list(left):
            if h.aio_command_completed(c):
                left.discard(c)


def model_ops(srv, base):
    model = bytearray(base)
    h1, h2 = srv.connect(), srv.connect()
    check(h1.can_multi_conn() and h1.can_flush() and h1.can_fua() and
          h1.can_trim() and h1.can_zero() and not h1.is_read_only(),
          "CoW export advertises flush, fua, trim, zero and multi-conn")
    ext = extents(h1, HOLE, 1 << 20)
    check(ext and ext[0][1] == 3 and ext[0][0] >= 1 << 20,
          "a hole of the base reads as hole,zero through the CoW layer (%r)"
          % ext[:2])
    ext = extents(h1, 0, 1 << 20)
    check(ext and ext[0][1] == 0, "base data reads as data through the CoW layer")
    h1.pwrite(b"y" * BLOCK, HOLE + BLOCK)
    model[HOLE + BLOCK:HOLE + 2 * BLOCK] = b"y" * BLOCK
    ext = extents(h1, HOLE, 3 * BLOCK)
    check(ext[:2] == [(BLOCK, 3), (BLOCK, 0)],
          "a block written into the base's hole is data, its neighbour a "
          "hole (%r)" % ext[:3])
    rnd = random.Random(4)
    for i in range(2000):
        h = (h1, h2)[i % 2]
        other = (h2, h1)[i % 2]
        off = rnd.randrange(SIZE - 1)
        ln = rnd.randrange(1, min(200000, SIZE - off) + 1)
        r = rnd.random()
        if r < 0.45:
            data = rnd.randbytes(ln)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if r < 0.05 else 0)
            model[off:off + ln] = data
        elif r < 0.55:
            h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if r < 0.5 else 0)
            model[off:off + ln] = bytes(ln)
        elif r < 0.6:
            h.trim(ln, off)
            model[off:off + ln] = bytes(ln)
        else:
            if other.pread(ln, off) != model[off:off + ln]:
                raise SystemExit("FAIL: read at %d+%d differs from the model "
                                 "(op %d)" % (off, ln, i))
    h1.flush()
    check(True, "2000 random unaligned writes, zeroes, trims and reads from "
          "two connections match the model")

    # Pipelined: many writes in flight at once, then many reads in flight.
    pending = []
    for i in range(256):
        off = rnd.randrange(0, SIZE - 70000)
        ln = rnd.randrange(1, 70000)
        # disjoint regions: each write owns a 128 KiB slot
        off = i * (SIZE // 256) + rnd.randrange(1000)
        data = rnd.randbytes(ln)
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        pending.append(h1.aio_pwrite(buf, off))
        model[off:off + ln] = data
    wait_all(h1, pending)
    reads = []
    for i in range(256):
        off = rnd.randrange(SIZE - 65536)
        buf = nbd.Buffer(65536)
        reads.append((h2.aio_pread(buf, off), buf, off))
    wait_all(h2, [c for c, _, _ in reads])
    for _, buf, off in reads:
        if buf.to_bytearray() != model[off:off + 65536]:
            raise SystemExit("FAIL: pipelined read at %d differs" % off)
    check(True, "256 pipelined writes then 256 pipelined reads match the model")

    for off in range(0, SIZE, 1 << 20):
        if h2.pread(1 << 20, off) != model[off:off + (1 << 20)]:
            raise SystemExit("FAIL: full read at %d differs" % off)
    check(True, "the whole export equals the model")

    # Block status across both layers: a zeroed aligned range reads as a
    # hole, a written block as data, an untouched base block as data.
    h1.zero(1 << 20, 8 << 20)
    model[8 << 20:9 << 20] = bytes(1 << 20)
    ext = extents(h1, 8 << 20, 1 << 20)
    check(ext and ext[0][0] >= 1 << 20 and ext[0][1] & 2,
          "zeroed overlay range reports zero (%r)" % ext[:2])
    h1.pwrite(b"x" * BLOCK, 12 << 20)
    model[12 << 20:(12 << 20) + BLOCK] = b"x" * BLOCK
    ext = extents(h1, 12 << 20, BLOCK)
    check(ext and ext[0][1] == 0, "written overlay block reports data")
    total = 0
    off = 0
    while off < SIZE:  # the extents tile the export, as a client walks them
        ext = extents(h1, off, SIZE - off)
        check(ext and all(e[0] > 0 for e in ext), "extents are non-empty") \
            if off == 0 else None
        off += sum(e[0] for e in ext)
    check(off == SIZE, "walking block status covers exactly the export")
    h1.shutdown()
    h2.shutdown()
    return model


def main():
    tmp = tempfile.mkdtemp(prefix="xnbd-cow-")
    try:
        base = os.path.join(tmp, "base.img")
        data = bytearray(random.Random(1).randbytes(SIZE))
        data[HOLE:HOLE + (2 << 20)] = bytes(2 << 20)
        with open(base, "wb") as f:
            # The base has a real hole at HOLE (2 MiB), data elsewhere.
            f.write(data[:HOLE])
            f.seek(HOLE + (2 << 20))
            f.write(data[HOLE + (2 << 20):])
        base_sum = sha(base)
        with open(base, "rb") as f:
            base_data = f.read()
        ovdir = os.path.join(tmp, "overlays")
        os.mkdir(ovdir)

        # 1. The model test, then SIGTERM: nothing left, base unchanged.
        srv = Server(["--cow-target", "--cow-overlay", ovdir, base],
                     os.path.join(tmp, "log1"))
        model_ops(srv, base_data)
        # fio verify at depth 32 over the same CoW export
        if shutil.which("fio"):
            r = subprocess.run(
                ["fio", "--name=cow", "--ioengine=nbd", "--uri=" + srv.uri,
                 "--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16M",
                 "--offset=8M", "--verify=crc32c", "--verify_fatal=1"],
                capture_output=True, text=True, cwd=tmp)
            check(r.returncode == 0 and "verify" not in r.stderr.lower(),
                  "fio --verify at depth 32 over CoW passes")
        else:
            raise SystemExit("FAIL: fio is missing (scripts/deps.sh installs it)")
        check(srv.stop() == 0, "SIGTERM stops the CoW server with status 0")
        check(os.listdir(ovdir) == [], "no overlay file after SIGTERM")
        check(sha(base) == base_sum, "base image unchanged after heavy writes")

        # 2. SIGKILL while writes are being made: nothing left behind.
        srv = Server(["--cow-target", "--cow-overlay", ovdir, base],
                     os.path.join(tmp, "log2"))
        h = srv.connect()
        h.pwrite(b"k" * 65536, 4096)
        check(h.pread(65536, 4096) == b"k" * 65536,
              "a new server's overlay serves its own writes")
        srv.stop(signal.SIGKILL)
        check(os.listdir(ovdir) == [], "no overlay file after SIGKILL")
        check(sha(base) == base_sum, "base image unchanged after SIGKILL")

        # 3. A second server starts from the base again: writes are gone.
        srv = Server(["--cow-target", "--cow-overlay", ovdir, base],
                     os.path.join(tmp, "log3"))
        h = srv.connect()
        check(h.pread(65536, 4096) == base_data[4096:4096 + 65536],
              "a restarted CoW server serves the base again")
        h.shutdown()
        srv.stop()

        # 4. A named overlay is kept and holds the writes.
        named = os.path.join(tmp, "kept.overlay")
        srv = Server(["--cow-target", "--cow-overlay", named, base],
                     os.path.join(tmp, "log4"))
        h = srv.connect()
        h.pwrite(b"n" * 100, 5000)
        h.flush()
        h.shutdown()
        srv.stop()
        with open(named, "rb") as f:
            f.seek(4096)
            blk = f.read(4096)
        check(blk == base_data[4096:5000] + b"n" * 100 +
              base_data[5100:8192],
              "named overlay kept, holding the copied-up block")
        # 5. The default place ($TMPDIR): SIGKILL with writes in flight
        # leaves nothing there either.
        tmpdir = os.path.join(tmp, "tmpdir")
        os.mkdir(tmpdir)
        env = dict(os.environ, TMPDIR=tmpdir)
        srv = Server(["--cow-target", base], os.path.join(tmp, "log5"), env)
        h = srv.connect()
        rnd = random.Random(9)
        for i in range(64):
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(rnd.randbytes(65536))),
                         i * 65536 + rnd.randrange(4096))
        h.poll(0)
        check(any(os.path.islink(os.path.join("/proc", str(srv.proc.pid), "fd", f))
                  and os.readlink(os.path.join("/proc", str(srv.proc.pid), "fd",
                                               f)).startswith(tmpdir)
                  for f in os.listdir("/proc/%d/fd" % srv.proc.pid)),
              "the default overlay lives in $TMPDIR")
        srv.stop(signal.SIGKILL)
        check(os.listdir(tmpdir) == [],
              "no overlay file in $TMPDIR after SIGKILL with writes in flight")

        # 6. --readonly: the base served read-only, writes refused (EPERM).
        srv = Server(["--cow-target", "--readonly", base],
                     os.path.join(tmp, "log6"), env)
        h = srv.connect()
        check(h.is_read_only(), "read-only CoW export is advertised read-only")
        try:
            h.set_strict_mode(0)
            h.pwrite(b"x" * 512, 0)
            check(False, "write to a read-only CoW export refused")
        except nbd.Error as e:
            check(e.errno in (errno.EPERM, "EPERM"), "write refused with EPERM")
        check(h.pread(4096, 0) == base_data[:4096], "reads serve the base")
        h.shutdown()
        srv.stop()

        # 7. --inetd in CoW mode: one client on standard input.
        h = nbd.NBD()
        h.connect_command([SERVER, "--inetd", "--cow-target", "--logpath",
                           os.path.join(tmp, "log7"), base])
        h.pwrite(b"i" * 4096, 8192)
        check(h.pread(4096, 8192) == b"i" * 4096, "CoW over --inetd serves "
              "its own writes")
        h.shutdown()
        check(sha(base) == base_sum, "base image unchanged at the end")
        r = subprocess.run([SERVER, "--cow-target", "--cow-overlay", named,
                            "--lport", str(free_port()), base],
                           capture_output=True, text=True, timeout=10)
        check(r.returncode == 1 and "overlay" in r.stderr,
              "an existing overlay file is refused with a message")
    finally:
        for p in SERVERS:  # whatever failed, stop every server started
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print("cow.py: all checks passed")


if __name__ == "__main__":
    main()
