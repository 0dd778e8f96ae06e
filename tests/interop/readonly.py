#!/usr/bin/python3
"""xnbd-server --readonly.

The export is advertised read-only (libnbd, nbdinfo); writes, trims and
write-zeroes (plain, FUA, NO_HOLE, FAST_ZERO) sent anyway fail with EPERM
(the man page's promise and the spec's SHOULD); reads, block status,
cache and flush work; the connection stays usable; the image file is
unchanged (SHA-256).
"""
import errno
import hashlib
import os
import random
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq, check_bytes, expect, expect_eq  # noqa: E402

SIZE = 16 * MiB


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        data = random.Random(9).randbytes(SIZE - 4 * MiB)   # last 4 MiB: hole
        img = t.image("disk.img", SIZE, data)
        content = data + bytes(4 * MiB)
        before = sha(img)
        mtime = os.stat(img).st_mtime_ns
        srv = t.server(img, ["--readonly"])

        # ---- advertised read-only ----
        if shutil.which("nbdinfo"):
            r = subprocess.run(["nbdinfo", "--is", "readonly", srv.uri])
            check_eq(r.returncode, 0, "nbdinfo --is readonly (0 = true)")
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_tcp(srv.addr, str(srv.port))
        check(h.is_read_only(), "export not advertised read-only")
        check_eq(h.get_size(), SIZE, "size")
        # Send what libnbd would refuse itself, so the server must answer.
        h.set_strict_mode(0)

        # ---- writes of every kind fail with EPERM ----
        attempts = [
            ("write", lambda: h.pwrite(b"x" * 4096, 0)),
            ("write FUA", lambda: h.pwrite(b"y" * 100, 12345, nbd.CMD_FLAG_FUA)),
            ("write 1 MiB", lambda: h.pwrite(bytes(MiB), 2 * MiB)),
            ("trim", lambda: h.trim(1 * MiB, 0)),
            ("trim FUA", lambda: h.trim(4096, 8192, nbd.CMD_FLAG_FUA)),
            ("write-zeroes", lambda: h.zero(1 * MiB, 0)),
            ("write-zeroes NO_HOLE", lambda: h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)),
            ("write-zeroes FAST_ZERO", lambda: h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)),
        ]
        for name, fn in attempts:
            try:
                fn()
                expect(False, "%s on a read-only export succeeded" % name)
            except nbd.Error as e:
                expect_eq(e.errnum, errno.EPERM,
                          "errno of %s on the read-only export (%s)" % (name, e))
            # the connection stays usable after each refusal
            check_bytes(h.pread(4096, 0), content[:4096],
                        "read after refused %s" % name)

        # ---- reads, block status, cache, flush work ----
        for off in range(0, SIZE, 4 * MiB):
            check_bytes(h.pread(4 * MiB, off), content[off:off + 4 * MiB],
                        "read at %d" % off, off)
        check_bytes(h.pread(77777, 1234567), content[1234567:1234567 + 77777],
                    "unaligned read", 1234567)
        ext = []
        h.block_status(SIZE, 0, lambda ctx, off, e, err: ext.extend(e))
        check(ext, "no block status on the read-only export")
        tail = []
        h.block_status(4 * MiB, SIZE - 4 * MiB, lambda ctx, off, e, err: tail.extend(e))
        expect(tail[1] & nbd.STATE_ZERO, "the hole at the end is not reported zero: %r"
               % tail[:4])
        h.cache(4 * MiB, 0)
        h.flush()
        check_bytes(h.pread(4096, SIZE - 4096), content[-4096:], "last block")

        # ---- a second connection is read-only too ----
        h2 = srv.connect()
        check(h2.is_read_only(), "second connection not read-only")
        h2.shutdown()
        h.shutdown()
        check_eq(srv.stop(), 0, "server exit status after SIGTERM")

        # ---- the image file is unchanged ----
        check_eq(sha(img), before, "SHA-256 of the image after the session")
        check_eq(os.stat(img).st_size, SIZE, "image size")
        expect_eq(os.stat(img).st_mtime_ns, mtime, "image mtime")


if __name__ == "__main__":
    xt.main(test)
