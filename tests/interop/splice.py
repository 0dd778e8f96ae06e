#!/usr/bin/python3
"""Large writes spliced from the socket into the image, and the copy path
beside them.

xnbd-server moves the data of a WRITE of more than 128 KiB and up to
1 MiB (without FUA) to a plain image through a pipe: socket -> pipe on the
loop thread, pipe -> file there too while its writes do not stall (else on
the backend's write lane), never through its memory.  It
reads no further than the next request header after such a write, waits
for the rest of a payload that has not arrived yet, and falls back to
copying when the pipe fills before the payload is in (the pipe's slots
hold pieces of socket buffers, and small pieces fill it early).  This test
checks what could go wrong with that:
1. Pipelines of writes of every size around the bounds (128 KiB, one
   byte more, 1 MiB, one byte more, several MiB), at unaligned offsets,
   with small writes and reads between them, and more large writes in
   flight than a session keeps pipes: every byte lands where it belongs.
2. A payload that trickles in, its header split too: the server waits for
   each piece and splices it on.
3. A payload sent in hundreds of tiny pieces, which fill the pipe's slots
   before the payload is in: the server takes what the pipe holds back and
   copies the rest; later large writes on the same connection still work.
4. A client that goes away in the middle of a payload (FIN, and reset):
   nothing of it reaches the image, and the server serves others.
5. The same, with the pipe full when the client's FIN comes: the server
   sees the end of the stream and closes (before, it spun on a socket
   that splice could not read).
6. FUA writes (copied, with RWF_DSYNC) among them; and the image file,
   read directly once the server stopped, holds every write.
7. A read-only export refuses large writes and stays in step with the
   stream (their payloads are read and dropped, not spliced).
8. Through a CoW layer, whole-block writes are spliced into the overlay,
   partial ones copied and merged; the base image never changes.
9. Through a caching proxy, whole-block writes are spliced into the cache,
   partial ones merged with blocks fetched from the upstream; each is
   marked cached (the upstream, changed behind the proxy's back, is not
   asked again for them, before or after a restart) and the upstream
   never changes.
10. A CoW overlay and a proxy's cache are sparse files of ours: on ext4
   and XFS, the first write into each 1 MiB of them allocates all of it;
   not on a file system with less than 64 MiB free (as root, an ext4 of
   48 MiB is mounted for that), where every write still lands.
"""
import os
import random
import socket
import struct
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_bytes, check_eq  # noqa: E402

SIZE = 64 * MiB
KiB = 1024


def conn(srv, structured=False, nodelay=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(30)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((srv.addr, srv.port))
    return xt.RawClient(s).handshake(structured=structured)


def header(cookie, cmd, off, n, flags=0):
    return struct.pack(">IHHQQI", xt.REQUEST_MAGIC, flags, cmd, cookie, off, n)


def disjoint_ranges(rng, sizes, size):
    """Non-overlapping [off, off+n) for each n in sizes, unaligned."""
    out = []
    while len(out) < len(sizes):
        n = sizes[len(out)]
        off = rng.randrange(0, size - n)
        if all(off + n <= o or o + m <= off for o, m in out):
            out.append((off, n))
    return out


def verify(c, model, ranges, what):
    for off, n in ranges:
        err, data = c.read(off, n)
        check_eq(err, 0, "%s: read error at %d+%d" % (what, off, n))
        check_bytes(data, bytes(model[off:off + n]), what, off)


def pipes_open(srv):
    """Pipes the server has open (both ends of one count once)."""
    ids = set()
    d = "/proc/%d/fd" % srv.pid
    for fd in os.listdir(d):
        try:
            t = os.readlink(os.path.join(d, fd))
        except OSError:
            continue
        if t.startswith("pipe:"):
            ids.add(t)
    return len(ids)


def pipelines(srv, model, rng):
    """Batches of disjoint writes of every size around the bounds, sent
    back to back and answered together; small writes and reads of other
    ranges between them."""
    c = conn(srv, structured=True)
    idle = pipes_open(srv)
    sizes = [128 * KiB, 128 * KiB + 1, 300 * KiB + 7, 512 * KiB, 1 * MiB - 1,
             1 * MiB, 1 * MiB + 1, 3 * MiB + 513, 4096, 513]
    for batch in range(6):
        ranges = disjoint_ranges(rng, sizes + [1 * MiB] * 20, SIZE)
        rng.shuffle(ranges)
        stream = bytearray()
        cookies = {}
        for i, (off, n) in enumerate(ranges):
            data = rng.randbytes(n)
            model[off:off + n] = data
            cookie = 1000 * batch + i + 1
            cookies[cookie] = (off, n)
            stream += header(cookie, xt.CMD_WRITE, off, n) + data
        # One send: headers and payloads back to back, as a busy client
        # sends them; 26 large writes in flight, more than a session's
        # pipes.
        c.s.sendall(stream)
        for _ in ranges:
            r = c.read_reply()
            check(r["cookie"] in cookies, "reply for an unknown cookie %r"
                  % r["cookie"])
            check_eq(r["error"], 0, "write %d+%d" % cookies.pop(r["cookie"]))
        verify(c, model, ranges, "pipeline %d" % batch)
        # All answered: the session keeps at most 2 pipes open for the
        # next writes (each one counts 1 MiB against the user's pipe
        # limit, empty or not), and closes those it used beyond.
        kept = pipes_open(srv) - idle
        check(kept <= 2, "an idle session keeps %d pipes open" % kept)
    c.close()
    xt.log("pipelines of large and small writes land where they belong")


def trickle(srv, model, rng):
    """Header and payload in pieces, with pauses: the server waits for
    each and splices it on.  Large reads are queued first through a tiny
    receive buffer, so the server also waits for room in the socket
    meanwhile."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(30)
    s.connect((srv.addr, srv.port))
    c = xt.RawClient(s).handshake()
    for k, n in enumerate((200 * KiB, 1 * MiB, 777 * KiB)):
        ranges = disjoint_ranges(rng, [n] + [1 * MiB] * 6, SIZE)
        off = ranges[0][0]
        reads = {}
        for i, (roff, rn) in enumerate(ranges[1:]):
            cookie = 100 * (k + 1) + i
            c.send_request(xt.CMD_READ, roff, rn, cookie=cookie)
            reads[cookie] = (roff, rn)
        data = rng.randbytes(n)
        msg = header(k + 1, xt.CMD_WRITE, off, n) + data
        cut = rng.randrange(1, 28)  # inside the header
        c.s.sendall(msg[:cut])
        time.sleep(0.05)
        pos = cut
        pieces = 0
        while pos < len(msg):
            step = rng.randrange(1, 40000)
            c.s.sendall(msg[pos:pos + step])
            pos += step
            pieces += 1
            if pieces % 8 == 0:
                time.sleep(0.01)
        lengths = {ck: rn for ck, (roff, rn) in reads.items()}
        for _ in range(len(reads) + 1):
            r = c.read_reply(lengths)
            if r["cookie"] == k + 1:
                check_eq(r["error"], 0, "trickled write reply")
                continue
            check(r["cookie"] in reads, "reply for an unknown cookie")
            roff, rn = reads.pop(r["cookie"])
            check_eq(r["error"], 0, "read while a write trickled in")
            check_bytes(r["data"], bytes(model[roff:roff + rn]),
                        "read while a write trickled in", roff)
        model[off:off + n] = data
        verify(c, model, [(off, n)], "trickled write %d" % k)
    c.close()
    xt.log("payloads that trickle in are waited for and land whole")


def tiny_pieces(srv, model, rng):
    """600 KiB in 700-byte pieces, each sent alone: each becomes a pipe
    slot of its own, and the slots run out long before the payload is
    in.  Then ordinary large writes on the same connection."""
    c = conn(srv, nodelay=True)
    for k in range(2):
        n = 600 * KiB
        off = rng.randrange(0, SIZE - n)
        data = rng.randbytes(n)
        c.s.sendall(header(k + 1, xt.CMD_WRITE, off, n))
        for pos in range(0, n, 700):
            c.s.sendall(data[pos:pos + 700])
            time.sleep(0.0002)
        r = c.read_reply()
        check_eq((r["cookie"], r["error"]), (k + 1, 0), "tiny-piece write")
        model[off:off + n] = data
        verify(c, model, [(off, n)], "tiny-piece write %d" % k)
    ranges = disjoint_ranges(rng, [1 * MiB] * 4, SIZE)
    for i, (off, n) in enumerate(ranges):
        data = rng.randbytes(n)
        model[off:off + n] = data
        err, _ = c.command(xt.CMD_WRITE, off, n, data=data)
        check_eq(err, 0, "write after the tiny pieces")
    verify(c, model, ranges, "writes after the tiny pieces")
    c.close()
    xt.log("payloads in tiny pieces are copied whole; later writes still work")


def server_cpu(srv):
    with open("/proc/%d/stat" % srv.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def full_pipe_then_eof(srv, model, rng):
    """A payload in about as many tiny pieces as the pipe has slots, each
    spliced alone, then the client's FIN: with the pipe full, splice
    cannot see the end of the stream, and the server must still find it
    (not wait on a socket that is readable forever, spinning) and close
    the connection.  The counts around 256 make sure one of them fills
    the pipe exactly, whatever pieces the kernel merges."""
    for pieces in (250, 256, 257, 260, 266):
        c = conn(srv, nodelay=True)
        n = 1 * MiB
        off = rng.randrange(0, SIZE - n)
        c.s.sendall(header(1, xt.CMD_WRITE, off, n))
        for _ in range(pieces):
            c.s.sendall(rng.randbytes(100))
            time.sleep(0.002)
        cpu0 = server_cpu(srv)
        c.s.shutdown(socket.SHUT_WR)
        c.s.settimeout(5)
        try:
            got = c.s.recv(1)
        except socket.timeout:
            xt.fail("%d pieces then FIN: the server kept the connection "
                    "open (%.2f CPU-s meanwhile)"
                    % (pieces, server_cpu(srv) - cpu0))
        except ConnectionResetError:
            got = b""
        check_eq(got, b"", "%d pieces then FIN: reply to a cut write"
                 % pieces)
        c.close()
        check(srv.alive(), "the server died on a payload cut short")
        c2 = conn(srv)
        verify(c2, model, [(off, n)], "range of a write cut short")
        c2.close()
    xt.log("the end of the stream is seen behind a full pipe")


def gone_mid_payload(srv, model, rng):
    """The client sends part of a payload and goes away: none of it may
    reach the image."""
    for reset in (False, True):
        c = conn(srv)
        n = 1 * MiB
        off = rng.randrange(0, SIZE - n)
        c.s.sendall(header(1, xt.CMD_WRITE, off, n) + rng.randbytes(n // 2))
        time.sleep(0.2)
        if reset:
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                           struct.pack("ii", 1, 0))
        c.close()
        time.sleep(0.2)
        check(srv.alive(), "the server died when a client left mid-payload")
        c2 = conn(srv)
        verify(c2, model, [(off, n)], "range of an unfinished write")
        # The same range, written whole by another client.
        data = rng.randbytes(n)
        model[off:off + n] = data
        err, _ = c2.command(xt.CMD_WRITE, off, n, data=data)
        check_eq(err, 0, "write after a client left mid-payload")
        verify(c2, model, [(off, n)], "range written after")
        c2.close()
    xt.log("a payload cut short by FIN or reset changes nothing")


def allocated_ahead(path, what, d):
    """A 4 KiB write went into the second MiB of the sparse file at path
    (nothing else did): the whole MiB is allocated.  Only on ext4 and XFS,
    where the server allocates ahead (elsewhere, nothing is checked)."""
    fs = subprocess.run(["stat", "-L", "-f", "-c", "%T", path],
                        capture_output=True, text=True).stdout.strip()
    if fs not in ("ext2/ext3", "xfs"):
        xt.log("%s is on %s: not allocated ahead, not checked" % (what, fs))
        return
    got = os.stat(path).st_blocks * 512
    check(got >= MiB, "%s: a 4 KiB write allocated %d bytes, not the 1 MiB "
          "around it" % (what, got))


def overlay_of(srv, size):
    """The path, through /proc, of a server's unlinked CoW overlay."""
    d = "/proc/%d/fd" % srv.pid
    for fd in os.listdir(d):
        p = os.path.join(d, fd)
        try:
            if "(deleted)" in os.readlink(p) and os.stat(p).st_size == size:
                return p
        except OSError:
            continue
    xt.fail("no unlinked overlay of %d bytes among the server's files" % size)


def write_shapes(n, rng):
    """Ranges for a pipeline of large writes to a layer of 4 KiB blocks:
    whole blocks (the last range ends at the end of the image), and
    ranges with a partial block at the start, at the end, or both."""
    B = 4096
    shapes = [(0, 256 * KiB), (0, 1 * MiB), (0, 512 * KiB + B),
              (0, 1 * MiB - 1), (513, 300 * KiB + 7), (513, 700 * KiB),
              (513, 1 * MiB - 513)]  # (offset in its block, length)
    blocks = list(range(0, n // B - 256, 300))
    rng.shuffle(blocks)
    ranges = [(blocks[i] * B + head, m) for i, (head, m) in enumerate(shapes)]
    ranges.append((n - 768 * KiB, 768 * KiB))
    return ranges


def first_write_allocates(c, model, rng, path_of, what, d):
    """One 4 KiB write into the second MiB of a layer's sparse file (the
    first write into it); path_of() then names the file."""
    data = rng.randbytes(4096)
    model[MiB + 8192:MiB + 12288] = data
    check_eq(c.command(xt.CMD_WRITE, MiB + 8192, 4096, data=data)[0], 0,
             "%s: 4 KiB write" % what)
    allocated_ahead(path_of(), what, d)
    return [(MiB + 8192, 4096)]


def layer_pipelines(c, srv, model, n, rng, what):
    """Three pipelines of write_shapes() through a layer of 4 KiB blocks:
    each lands, the blocks before each write keep what they had, and the
    whole-block ones were spliced (the session kept a pipe).  Returns the
    ranges written."""
    idle = pipes_open(srv)
    written = []
    for batch in range(3):
        ranges = write_shapes(n, rng)
        stream = bytearray()
        for i, (off, m) in enumerate(ranges):
            data = rng.randbytes(m)
            model[off:off + m] = data
            stream += header(100 * batch + i + 1, xt.CMD_WRITE, off, m) + data
        c.s.sendall(stream)
        for _ in ranges:
            r = c.read_reply()
            check_eq(r["error"], 0, "%s write, cookie %d" % (what, r["cookie"]))
        verify(c, model, ranges, "%s pipeline %d" % (what, batch))
        verify(c, model, [(max(0, off - 4096), 4096) for off, _ in ranges],
               "blocks before %s writes" % what)
        kept = pipes_open(srv) - idle
        check(kept >= 1, "whole-block writes to a %s were not spliced (no "
              "pipe kept)" % what)
        written += ranges
    return written


def cow_layer(d, rng):
    """Through a CoW layer, large writes of whole 4 KiB blocks are spliced
    into the overlay too; a write with a partial block at either end is
    copied (its ends are merged with the base).  Both land, in a pipeline
    together, and the base image never changes."""
    n = 16 * MiB
    base = rng.randbytes(n)
    img = d.image("cowbase.img", n, base)
    srv = xt.Server(img, mode=["--cow-target", img], tmpdir=d.path)
    d.servers.append(srv)
    model = bytearray(base)
    c = conn(srv)
    first_write_allocates(c, model, rng, lambda: overlay_of(srv, n),
                          "CoW overlay", d)
    layer_pipelines(c, srv, model, n, rng, "CoW layer")
    c.close()
    check_eq(srv.stop(), 0, "CoW server's exit status")
    with open(img, "rb") as f:
        check(f.read() == base, "the base image changed under a CoW layer")
    xt.log("whole-block writes to a CoW layer are spliced; partial ones "
           "are copied; the base is untouched")


def small_filesystem(d, rng):
    """On a file system with less than 64 MiB free, an overlay is not
    allocated ahead (it could take the space a later write needs), and
    every write lands.  Needs root, mkfs.ext4 and loop mounts; skipped
    without."""
    mnt = d.join("small")
    fsimg = d.join("small.ext4")
    os.mkdir(mnt)
    with open(fsimg, "wb") as f:
        f.truncate(48 * MiB)
    if os.geteuid() != 0 or subprocess.run(
            ["mkfs.ext4", "-q", "-F", fsimg], capture_output=True).returncode \
            or subprocess.run(["mount", "-o", "loop", fsimg, mnt],
                              capture_output=True).returncode:
        xt.log("no small ext4 to mount: the free-space margin not checked")
        return
    srv = None
    try:
        n = 24 * MiB
        base = rng.randbytes(n)
        img = d.image("smallbase.img", n, base)
        srv = xt.Server(img, ["--cow-overlay", mnt],
                        mode=["--cow-target", img], tmpdir=d.path)
        d.servers.append(srv)
        model = bytearray(base)
        c = conn(srv)
        ranges = [(k * MiB + 8192, 4096) for k in range(n // MiB)]
        for off, m in ranges:
            data = rng.randbytes(m)
            model[off:off + m] = data
            check_eq(c.command(xt.CMD_WRITE, off, m, data=data)[0], 0,
                     "4 KiB write on a small file system")
        got = os.stat(overlay_of(srv, n)).st_blocks * 512
        check(got < MiB, "an overlay on a file system with 37 MiB free was "
              "allocated ahead: %d bytes for %d KiB written"
              % (got, 4 * len(ranges)))
        for off in range(0, n, MiB):
            data = rng.randbytes(MiB)
            model[off:off + MiB] = data
            check_eq(c.command(xt.CMD_WRITE, off, MiB, data=data)[0], 0,
                     "1 MiB write on a small file system")
        verify(c, model, [(0, n)], "overlay on a small file system")
        c.close()
        check_eq(srv.stop(), 0, "server's exit status (small file system)")
    finally:
        if srv and srv.alive():
            srv.kill()  # its overlay keeps the file system busy
        if subprocess.run(["umount", mnt]).returncode:
            subprocess.run(["umount", "-l", mnt])
    xt.log("on a file system with little room, nothing is allocated ahead "
           "and every write lands")


def proxy_layer(d, rng):
    """Through a caching proxy, large writes of whole blocks are spliced
    into the cache image; partial ones are copied and merged with their
    edge blocks, fetched from the upstream.  Every written block must be
    marked cached: the upstream image is then changed behind the proxy's
    back, and reads of the written ranges must still return what was
    written (a block not marked would be fetched again), also after the
    proxy restarts on its cache and bitmap."""
    n = 16 * MiB
    base = rng.randbytes(n)
    img = d.image("upstream.img", n, base)
    up = d.server(img)
    p = d.proxy(up.port, name="sp")
    model = bytearray(base)
    c = conn(p)
    written = first_write_allocates(c, model, rng, lambda: p.cache,
                                    "proxy cache", d)
    written += layer_pipelines(c, p, model, n, rng, "proxy")
    c.close()
    with open(img, "rb") as f:
        check(f.read() == base, "a write through the proxy reached the "
              "upstream")
    # Change the upstream under every written range (whole blocks): the
    # proxy must not ask for them again.
    with open(img, "r+b") as f:
        for off, m in written:
            b0, b1 = off // 4096 * 4096, min(n, -(-(off + m) // 4096) * 4096)
            f.seek(b0)
            f.write(bytes(b1 - b0))
    c = conn(p)
    verify(c, model, written, "written ranges after the upstream changed")
    c.close()
    check_eq(p.stop(), 0, "proxy's exit status")
    p = d.proxy(up.port, name="sp")
    c = conn(p)
    verify(c, model, written, "written ranges after a restart")
    c.close()
    check_eq(p.stop(), 0, "restarted proxy's exit status")
    check_eq(up.stop(), 0, "upstream's exit status")
    xt.log("whole-block writes to a proxy are spliced into its cache and "
           "marked cached; partial ones are merged; the upstream is "
           "untouched")


def fua_and_readonly(d, model, rng):
    """FUA writes take the copy path (RWF_DSYNC); a read-only export
    refuses large writes and stays in sync with the stream."""
    img = d.image("ro.img", 4 * MiB, bytes(model[:4 * MiB]))
    srv = d.server(img, ["--readonly"])
    c = conn(srv)
    for _ in range(3):
        err, _ = c.command(xt.CMD_WRITE, 0, 1 * MiB, data=rng.randbytes(1 * MiB))
        check(err != 0, "a read-only export accepted a write")
    verify(c, model, [(0, 4 * MiB)], "read-only image after refused writes")
    c.close()
    check_eq(srv.stop(), 0, "read-only server's exit status")
    xt.log("refused large writes keep the stream in sync")


def test():
    rng = random.Random(int(os.environ.get("XNBD_SEED", "20261203")))
    xt.log("seed %s" % os.environ.get("XNBD_SEED", "20261203"))
    with xt.TestDir() as d:
        model = bytearray(rng.randbytes(SIZE))
        img = d.image("disk.img", SIZE, bytes(model))
        srv = d.server(img)
        pipelines(srv, model, rng)
        trickle(srv, model, rng)
        tiny_pieces(srv, model, rng)
        gone_mid_payload(srv, model, rng)
        full_pipe_then_eof(srv, model, rng)
        # FUA: copied and synced; the data is the same either way.
        c = conn(srv)
        off, n = 5 * MiB + 3, 1 * MiB
        data = rng.randbytes(n)
        model[off:off + n] = data
        err, _ = c.command(xt.CMD_WRITE, off, n, flags=xt.CMD_FLAG_FUA,
                           data=data)
        check_eq(err, 0, "FUA write")
        c.close()
        check_eq(srv.stop(), 0, "exit status after SIGTERM")
        with open(img, "rb") as f:
            check_bytes(f.read(), bytes(model), "image file after the test")
        xt.log("the image file holds every write")
        fua_and_readonly(d, model, rng)
        cow_layer(d, rng)
        proxy_layer(d, rng)
        small_filesystem(d, rng)


if __name__ == "__main__":
    xt.main(test)
