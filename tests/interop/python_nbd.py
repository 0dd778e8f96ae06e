#!/usr/bin/python3
"""libnbd's Python module (and nbdsh) against xnbd-server.

Writes at aligned, unaligned and 64 KiB-crossing offsets read back equal to
a model of the image (also in the image file itself); zero-length and
last-byte reads; reads past the end fail with EINVAL; flush; trim (only
the trimmed range changes); WRITE_ZEROES with and without NO_HOLE and
FAST_ZERO reads back zeros; base:allocation block status agrees with the
data; pread_structured hole chunks cover only zeros and the chunks tile
the request; DF gives one chunk; cache; requests over the 32 MiB maximum
(TRIM and FAST_ZERO allowed, plain WRITE_ZEROES refused); nbdsh.
"""
import errno
import os
import random
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, KiB, check, check_eq, check_bytes, log  # noqa: E402

SIZE = 64 * MiB


def test():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        img = t.image("disk.img", SIZE)
        srv = t.server(img)
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_tcp(srv.addr, str(srv.port))
        # Let requests libnbd would refuse itself reach the server.
        h.set_strict_mode(h.get_strict_mode() & ~(nbd.STRICT_ZERO_SIZE |
                                                  nbd.STRICT_BOUNDS))

        check_eq(h.get_size(), SIZE, "export size")
        check(h.get_structured_replies_negotiated(),
              "structured replies not negotiated")
        check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION),
              "base:allocation not negotiated")
        for f in ("flush", "fua", "trim", "zero", "fast_zero", "df",
                  "multi_conn", "cache"):
            check(getattr(h, "can_" + f)(), "can_%s is false" % f)
        check(not h.is_read_only(), "export is read-only")

        model = bytearray(SIZE)
        rnd = random.Random(20261125)

        def write(off, n, flags=0):
            data = rnd.randbytes(n)
            h.pwrite(data, off, flags)
            model[off:off + n] = data

        def verify(off, n, what):
            got = h.pread(n, off)
            check_bytes(got, model[off:off + n], what, off)

        def verify_all(what):
            for off in range(0, SIZE, 8 * MiB):
                verify(off, 8 * MiB, "%s, range at %d" % (what, off))

        # ---- writes at various offsets and lengths ----
        writes = [
            (0, 4096, 0),                       # aligned, first block
            (3 * 4096, 64 * KiB, 0),            # aligned 64 KiB
            (1, 1, 0),                          # one byte, unaligned
            (4095, 2, 0),                       # across a 4 KiB boundary
            (64 * KiB - 1, 2, 0),               # across a 64 KiB boundary
            (5 * 64 * KiB - 1000, 3000, nbd.CMD_FLAG_FUA),
            (3 * 64 * KiB - 7, 64 * KiB + 14, 0),   # spans 3 64 KiB units
            (1 * MiB - 3, 2 * MiB + 6, 0),          # many 64 KiB units
            (8 * MiB + 12345, 4 * MiB + 1, nbd.CMD_FLAG_FUA),
            (16 * MiB, 16 * MiB, 0),            # 16 MiB in one request
            (SIZE - 4096 - 5, 4096, 0),
            (SIZE - 1, 1, 0),                   # last byte
            (40 * MiB + 100, 100, 0),           # tiny data in a big hole
        ]
        for off, n, fl in writes:
            write(off, n, fl)
        for off, n, fl in writes:
            verify(off, n, "read back of write (%d, %d)" % (off, n))
            lo, hi = max(0, off - 777), min(SIZE, off + n + 777)
            verify(lo, hi - lo, "read around write (%d, %d)" % (off, n))
        verify_all("whole image after writes")

        # ---- zero-length and edge reads ----
        for off in (0, 12345, SIZE):
            try:
                got = h.pread(0, off)
                check_eq(len(got), 0, "length of a zero-length read at %d" % off)
            except nbd.Error as e:
                # Unspecified by the spec; but the server must not drop us.
                log("zero-length read at %d refused: %s" % (off, e))
        verify(SIZE - 1, 1, "last byte")
        verify(SIZE - 4096, 4096, "last 4 KiB")
        for off, n in ((SIZE - 1, 2), (SIZE, 1), (SIZE + 4096, 4096)):
            try:
                h.pread(n, off)
                xt.fail("read of %d bytes at %d (past the end) succeeded" % (n, off))
            except nbd.Error as e:
                check_eq(e.errnum, errno.EINVAL,
                         "errno of read (%d, %d) past the end" % (off, n))
        verify(0, 4096, "read after refused requests")

        # ---- flush: everything is in the image file ----
        h.flush()
        with open(img, "rb") as f:
            disk = f.read()
        check_bytes(disk, model, "image file after flush")

        # ---- trim ----
        # An aligned 1 MiB range inside the 16 MiB write, and an unaligned
        # one: bytes outside the range must not change; inside, each byte
        # reads as before or as zero (the spec lets a server ignore trims).
        for off, n in ((20 * MiB, 1 * MiB), (24 * MiB - 100, 1 * MiB + 200)):
            before = bytes(model[off - 8192:off + n + 8192])
            h.trim(n, off)
            got = h.pread(n + 16384, off - 8192)
            check_bytes(got[:8192], before[:8192],
                        "8 KiB before trim (%d, %d)" % (off, n), off - 8192)
            check_bytes(got[8192 + n:], before[8192 + n:],
                        "8 KiB after trim (%d, %d)" % (off, n), off + n)
            inside = got[8192:8192 + n]
            for i in range(0, n, 4096):
                a, b = inside[i:i + 4096], before[8192 + i:8192 + i + 4096]
                check(a == b or a == bytes(len(a)) or
                      all(x == y or x == 0 for x, y in zip(a, b)),
                      "trim (%d, %d): bytes at %d are neither old nor zero"
                      % (off, n, off + i))
            model[off:off + n] = inside
        # The aligned trim left a hole (this server punches holes on a
        # file system that can).
        ext = block_status(h, 1 * MiB, 20 * MiB)
        check(all(fl & nbd.STATE_HOLE for _, _, fl in ext),
              "block status of the trimmed 1 MiB at 20 MiB: %r" % ext)
        verify_all("whole image after trims")

        # ---- WRITE_ZEROES ----
        # Without NO_HOLE, over data, unaligned and aligned.
        for off, n in ((16 * MiB + 3, 70000), (28 * MiB, 2 * MiB)):
            h.zero(n, off)
            model[off:off + n] = bytes(n)
            verify(off - 4096, n + 8192, "zero (%d, %d)" % (off, n))
        # Zeroed 2 MiB reports ZERO in block status (this server punches or
        # zero-fills, and reports holes as zero).
        ext = block_status(h, 2 * MiB, 28 * MiB)
        check(all(fl & nbd.STATE_ZERO for _, _, fl in ext),
              "block status of the zeroed 2 MiB at 28 MiB: %r" % ext)
        # With NO_HOLE: zeros, and the range is allocated in the image
        # (st_blocks grows when zeroing a hole with NO_HOLE).
        blocks0 = os.stat(img).st_blocks
        h.zero(4 * MiB, 44 * MiB, nbd.CMD_FLAG_NO_HOLE)
        blocks1 = os.stat(img).st_blocks
        check(blocks1 - blocks0 >= (4 * MiB) // 512,
              "zero with NO_HOLE over a 4 MiB hole did not allocate it "
              "(st_blocks %d -> %d)" % (blocks0, blocks1))
        verify(44 * MiB - 4096, 4 * MiB + 8192, "zero with NO_HOLE over a hole")
        off, n = 8 * MiB + 1000, 100000           # over data, unaligned
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        model[off:off + n] = bytes(n)
        verify(off - 4096, n + 8192, "zero with NO_HOLE|FUA over data")
        # FAST_ZERO: either zeroes fast or fails with ENOTSUP leaving the
        # data alone.
        for off, n, fl in ((9 * MiB, 1 * MiB, 0), (10 * MiB + 5, 5000, 0),
                           (11 * MiB, 1 * MiB, nbd.CMD_FLAG_NO_HOLE)):
            try:
                h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO | fl)
                model[off:off + n] = bytes(n)
                log("fast zero (%d, %d, %#x) done" % (off, n, fl))
            except nbd.Error as e:
                check_eq(e.errnum, errno.ENOTSUP,
                         "errno of a refused FAST_ZERO (%d, %d)" % (off, n))
                log("fast zero (%d, %d, %#x) refused with ENOTSUP" % (off, n, fl))
            verify(off - 4096, n + 8192, "after fast zero (%d, %d)" % (off, n))
        # Zeroing past the end: ENOSPC (the spec's SHOULD).
        try:
            h.zero(8192, SIZE - 4096)
            xt.fail("zero past the end succeeded")
        except nbd.Error as e:
            check_eq(e.errnum, errno.ENOSPC, "errno of zero past the end")
        verify_all("whole image after zeroing")

        # ---- block status agrees with the data ----
        check_block_status(h, model, 0, SIZE, nbd)
        # Written random data is never reported as zero; a fully written
        # 1 MiB is not a hole.
        for off, n in ((3 * 4096, 64 * KiB), (1 * MiB, 1 * MiB),
                       (17 * MiB, 1 * MiB), (SIZE - 4096, 4096)):
            for eo, el, fl in block_status(h, n, off):
                check(not fl & nbd.STATE_ZERO,
                      "random data (%d, %d) reported as zero at %d" % (off, n, eo))
                check(not fl & nbd.STATE_HOLE,
                      "written range (%d, %d) reported as a hole at %d" % (off, n, eo))
        # The untouched hole between 48 MiB and 63 MiB is hole+zero.
        ext = block_status(h, 8 * MiB, 50 * MiB)
        check(ext and all(fl == nbd.STATE_HOLE | nbd.STATE_ZERO
                          for _, _, fl in ext),
              "block status of an untouched hole: %r" % ext)
        # REQ_ONE: exactly one extent, not longer than asked.
        got = []
        h.block_status(3 * MiB, 0, lambda ctx, off, ent, err: got.append(ent),
                       nbd.CMD_FLAG_REQ_ONE)
        check(len(got) == 1 and len(got[0]) == 2 and got[0][0] <= 3 * MiB,
              "block status with REQ_ONE: %r" % got)

        # ---- pread_structured: data and hole chunks ----
        # [32 MiB, 34 MiB) holds data only at 32 MiB + 256 KiB (64 KiB).
        base = 32 * MiB
        h.zero(2 * MiB, base)
        model[base:base + 2 * MiB] = bytes(2 * MiB)
        write(base + 256 * KiB, 64 * KiB)
        chunks = structured_read(h, nbd, 2 * MiB, base, 0)
        check_chunks(chunks, model, base, 2 * MiB, nbd)
        kinds = {c[0] for c in chunks}
        check(nbd.READ_HOLE in kinds,
              "no hole chunk in a read of 2 MiB with 1.9 MiB of zeros: %r"
              % [(c[0], c[1], c[2]) for c in chunks])
        check(nbd.READ_DATA in kinds, "no data chunk in a read with data")
        # The same over mixed regions of the image, unaligned.
        for off, n in ((0, 4 * MiB), (base + 1, 1 * MiB - 3),
                       (40 * MiB - 5, 1 * MiB), (SIZE - 3 * MiB, 3 * MiB)):
            check_chunks(structured_read(h, nbd, n, off, 0), model, off, n, nbd)
        # DF: one content chunk with everything.
        for off, n in ((base, 2 * MiB), (base + 200 * KiB, 64 * KiB + 5),
                       (44 * MiB, 64 * KiB)):
            chunks = structured_read(h, nbd, n, off, nbd.CMD_FLAG_DF)
            check_eq(len(chunks), 1, "number of chunks with DF for (%d, %d): %r"
                     % (off, n, [(c[0], c[1], c[2]) for c in chunks]))
            check_chunks(chunks, model, off, n, nbd)

        # ---- cache ----
        h.cache(4 * MiB, 0)
        h.cache(1, SIZE - 1)
        try:
            h.cache(8192, SIZE - 4096)
            xt.fail("cache past the end succeeded")
        except nbd.Error as e:
            check_eq(e.errnum, errno.EINVAL, "errno of cache past the end")
        verify(0, 4 * MiB, "read after cache")

        # ---- final state, also seen by a second connection ----
        h.flush()
        h2 = srv.connect()
        check_bytes(h2.pread(4 * MiB, base - 1 * MiB), model[base - MiB:base + 3 * MiB],
                    "second connection", base - MiB)
        h2.shutdown()
        verify_all("whole image at the end")
        h.shutdown()
        with open(img, "rb") as f:
            check_bytes(f.read(), model, "image file at the end")

        # ---- requests longer than the 32 MiB maximum block size ----
        # TRIM and FAST_ZERO are not bound by it; plain WRITE_ZEROES is
        # (the spec: the client MUST NOT, the server SHOULD fail EINVAL).
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_tcp(srv.addr, str(srv.port))
        h.set_strict_mode(0)
        big = 40 * MiB
        try:
            h.zero(big, 8 * MiB)
            xt.fail("WRITE_ZEROES of 40 MiB (over the maximum block size) "
                    "succeeded")
        except nbd.Error as e:
            check_eq(e.errnum, errno.EINVAL, "errno of WRITE_ZEROES of 40 MiB")
        check_bytes(h.pread(4 * MiB, 8 * MiB), model[8 * MiB:12 * MiB],
                    "data after the refused 40 MiB zero", 8 * MiB)
        try:
            h.zero(big, 8 * MiB, nbd.CMD_FLAG_FAST_ZERO)
            model[8 * MiB:8 * MiB + big] = bytes(big)
            for off in range(8 * MiB, 8 * MiB + big, 8 * MiB):
                verify_h = h.pread(8 * MiB, off)
                check(verify_h == bytes(8 * MiB), "40 MiB FAST_ZERO: data at %d" % off)
        except nbd.Error as e:
            check_eq(e.errnum, errno.ENOTSUP, "errno of a refused 40 MiB FAST_ZERO")
        h.trim(big, 4 * MiB)
        h.trim(SIZE, 0, nbd.CMD_FLAG_FUA)
        ext = block_status(h, SIZE, 0)
        check(all(fl & nbd.STATE_HOLE for _, _, fl in ext),
              "block status after trimming the whole export: %r" % ext[:8])
        h.shutdown()

        # ---- nbdsh, the shell ----
        if shutil.which("nbdsh"):
            r = subprocess.run(
                ["nbdsh", "-u", srv.uri, "-c",
                 "h.pwrite(b'nbdsh!' * 100, 4097); "
                 "assert h.pread(600, 4097) == b'nbdsh!' * 100; "
                 "assert h.get_size() == %d; h.flush(); print('ok')" % SIZE],
                capture_output=True, text=True, timeout=30, env=xt.nbdsh_env())
            check(r.returncode == 0 and r.stdout.strip() == "ok",
                  "nbdsh write/read: rc %d, %r %r" % (r.returncode, r.stdout, r.stderr))
            with open(img, "rb") as f:
                f.seek(4097)
                check_eq(f.read(600), b"nbdsh!" * 100, "image after nbdsh write")

        check_eq(srv.stop(), 0, "server exit status after SIGTERM")


def block_status(h, n, off):
    """[(offset, length, flags)] from one BLOCK_STATUS request."""
    out = []

    def cb(ctx, o, entries, err):
        if ctx != "base:allocation":
            return 0
        pos = o
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0
    h.block_status(n, off, cb)
    check(out, "block status (%d, %d) returned no extents" % (off, n))
    check_eq(out[0][0], off, "first extent offset")
    return out


def check_block_status(h, model, off, n, nbd):
    """Walk [off, off+n) by block status; ZERO extents must read as zeros."""
    end = off + n
    pos = off
    while pos < end:
        ext = block_status(h, end - pos, pos)
        for eo, el, fl in ext:
            check(el > 0, "zero-length extent at %d" % eo)
            e_end = min(eo + el, end)
            if fl & nbd.STATE_ZERO and model[eo:e_end] != bytes(e_end - eo):
                xt.fail("extent (%d, %d) flagged ZERO holds data (first "
                        "nonzero byte at %d)" % (eo, el, eo + xt.first_diff(
                            model[eo:e_end], bytes(e_end - eo))))
        pos = min(ext[-1][0] + ext[-1][1], end)


def structured_read(h, nbd, n, off, flags):
    chunks = []

    def cb(buf, o, status, err):
        chunks.append((status, o, len(buf), bytes(buf)))
        return 0
    buf = h.pread_structured(n, off, cb, flags)
    check_eq(len(buf), n, "length of pread_structured result")
    return chunks


def check_chunks(chunks, model, off, n, nbd):
    """Chunks tile [off, off+n) without overlap; data chunks equal the
    model; hole chunks cover only zeros."""
    seen = sorted((o, ln, st, data) for st, o, ln, data in chunks)
    pos = off
    for o, ln, st, data in seen:
        check(ln > 0, "empty chunk at %d" % o)
        check_eq(o, pos, "chunk offset (gap or overlap) in read (%d, %d)" % (off, n))
        if st == nbd.READ_DATA:
            check_bytes(data, model[o:o + ln], "data chunk (%d, %d)" % (o, ln), o)
        elif st == nbd.READ_HOLE:
            check(model[o:o + ln] == bytes(ln),
                  "hole chunk (%d, %d) covers nonzero data" % (o, ln))
        else:
            xt.fail("unexpected chunk status %d at %d" % (st, o))
        pos = o + ln
    check_eq(pos, off + n, "end of the chunks of read (%d, %d)" % (off, n))


if __name__ == "__main__":
    xt.main(test)
