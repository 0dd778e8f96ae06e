#!/usr/bin/python3
"""A proxy's files and upstream, given wrongly (found by an adversarial
review, 2026-12-04): each start is refused with a clear message, and no
file is changed.

1. The cache image deleted, or truncated, while its bitmap was kept: the
   bitmap's bits would vouch for zeroes.  Refused (the deleted cache is
   not left behind re-created); --clear-bitmap starts afresh and serves
   the upstream's data.
2. CACHE_IMAGE and BITMAP swapped on the command line: the bitmap was
   grown to the image's size and ruined.  Refused, both files unchanged;
   the right order then serves what the cache holds.
3. One path for both: refused, nothing left behind.
4. A reconnect to port 70000 (getaddrinfo took it as 4464): xnbd-bgctl
   says it is invalid (exit 2), the control socket answers EINVAL, and
   the proxy keeps its upstream.
5. The server's own options: an empty --laddr (it listened on every
   address), ports with a sign or a space, and export names over 4096
   bytes (for xnbd-bgctl too) are usage errors (exit 2).
6. A second server on a running proxy's files and control socket, with
   --clear-bitmap: it cleared the running proxy's bitmap on disk before
   it found the socket taken.  The socket's place is now checked first,
   and a start refused for it creates no cache or bitmap; with a socket
   of its own, the bitmap's lock (flock) refuses it.
"""
import hashlib
import os
import socket
import subprocess

import xnbdtest as xt

SIZE = 4 << 20


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def start_fails(up, cache, bitmap, ctl, *extra):
    """Start a proxy that must refuse: exit status 1; returns stderr."""
    r = subprocess.run([xt.SERVER, "--proxy", "--laddr", "127.0.0.1",
                        "--lport", str(xt.free_port())] + list(extra) +
                       ["127.0.0.1", str(up.port), cache, bitmap, ctl],
                       capture_output=True, text=True, timeout=30)
    xt.check(r.returncode == 1, "start with %s %s exited %d, expected 1:\n%s"
             % (os.path.basename(cache), os.path.basename(bitmap),
                r.returncode, r.stderr))
    return r.stderr


def main():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        src = os.urandom(SIZE)
        up = t.server(t.image("up.img", SIZE, src))

        # A full cache and its bitmap, kept as a pattern for each case.
        p = t.proxy(up.port, name="full")
        h = p.connect()
        xt.check_bytes(h.pread(SIZE, 0), src, "first read through the proxy")
        h.shutdown()
        xt.check_eq(p.stop(), 0, "proxy exit status")
        bm = open(p.bitmap, "rb").read()

        # ---- 1. the cache image lost or cut short ---------------------------------
        cache, bitmap, ctl = t.join("c1.cache"), t.join("c1.bitmap"), t.join("c1.ctl")
        with open(bitmap, "wb") as f:
            f.write(bm)
        err = start_fails(up, cache, bitmap, ctl)
        xt.check("truncated or replaced" in err, "deleted cache: " + err)
        xt.check(not os.path.exists(cache), "the refused start left a cache behind")
        xt.check_eq(open(bitmap, "rb").read() == bm, True, "bitmap unchanged")
        with open(cache, "wb") as f:
            f.write(src[:5000])  # a block and a part
        err = start_fails(up, cache, bitmap, ctl)
        xt.check("block 1 " in err, "truncated cache names its first lost block: " + err)
        xt.check_eq(os.path.getsize(cache), 5000, "truncated cache size unchanged")
        xt.check_eq(open(bitmap, "rb").read() == bm, True, "bitmap unchanged")
        # --clear-bitmap: every block fetched again.
        s = xt.Server(cache, ["--clear-bitmap"], tmpdir=t.path,
                      mode=["--proxy", "127.0.0.1", str(up.port), cache, bitmap, ctl])
        t.servers.append(s)
        h = s.connect()
        xt.check_bytes(h.pread(SIZE, 0), src, "after --clear-bitmap")
        h.shutdown()
        xt.check_eq(s.stop(), 0, "proxy exit status")

        # ---- 2. cache image and bitmap swapped ------------------------------------
        cache, bitmap, ctl = t.join("c2.cache"), t.join("c2.bitmap"), t.join("c2.ctl")
        with open(cache, "wb") as f:
            f.write(open(p.cache, "rb").read())
        with open(bitmap, "wb") as f:
            f.write(bm)
        before = (digest(cache), digest(bitmap))
        err = start_fails(up, bitmap, cache, ctl)
        xt.check("swapped" in err or "not an xNBD bitmap" in err, "swapped: " + err)
        xt.check_eq((digest(cache), digest(bitmap)), before, "files after the swapped start")
        # The right order serves the cache as it is: the upstream changed
        # meanwhile, and cached blocks do not follow it.
        with open(up.image, "r+b") as f:
            f.write(b"\xee" * 4096)
        s = xt.Server(cache, tmpdir=t.path,
                      mode=["--proxy", "127.0.0.1", str(up.port), cache, bitmap, ctl])
        t.servers.append(s)
        h = s.connect()
        xt.check_bytes(h.pread(SIZE, 0), src, "the cache after the refused start")
        h.shutdown()

        # ---- 4. reconnect to a port out of range ----------------------------------
        r = xt.bgctl("--reconnect", ctl, "127.0.0.1", "70000", check_rc=2)
        xt.check("RPORT" in r.stderr, "bgctl's message: " + r.stderr)
        for port in ("70000", "+80", " 80", "0", "http"):
            c = socket.socket(socket.AF_UNIX)
            c.connect(ctl)
            f = c.makefile("rwb")
            f.readline()
            f.write(b"reconnect 127.0.0.1 %s\n" % port.replace(" ", "%20").encode())
            f.flush()
            reply = f.readline()
            xt.check(reply.startswith(b"error EINVAL"),
                     "reconnect to port %r answered %r" % (port, reply))
            c.close()
        q = xt.query(ctl)
        xt.check_eq((q["state"], str(q["upstream-port"])), ("connected", str(up.port)),
                    "the proxy's upstream after the refused reconnects")

        # ---- 6. the control socket's place, checked before the files -------------
        # A second server on the same files and socket, with --clear-bitmap,
        # must not clear the running one's bitmap.
        before = digest(bitmap)
        err = start_fails(up, cache, bitmap, ctl, "--clear-bitmap")
        xt.check("running server" in err, "second server: " + err)
        xt.check_eq(digest(bitmap), before, "the running proxy's bitmap")
        # With a control socket of its own: the bitmap's lock refuses it.
        err = start_fails(up, cache, bitmap, t.join("c2b.ctl"), "--clear-bitmap")
        xt.check("in use" in err, "second server, own socket: " + err)
        xt.check_eq(digest(bitmap), before, "the running proxy's bitmap")
        h = s.connect()
        xt.check_bytes(h.pread(SIZE, 0), src, "the running proxy after it")
        h.shutdown()
        xt.check_eq(s.stop(), 0, "proxy exit status")
        for where, what in ((t.join("nodir", "x.ctl"), "directory"),
                            (up.image, "not a socket")):
            err = start_fails(up, t.join("c6.cache"), t.join("c6.bitmap"), where)
            xt.check(what in err, "control socket %s: %s" % (where, err))
            xt.check(not os.path.exists(t.join("c6.cache")) and
                     not os.path.exists(t.join("c6.bitmap")),
                     "a start refused for its control socket left files")

        # ---- 3. one path for both -------------------------------------------------
        same = t.join("same")
        err = start_fails(up, same, same, t.join("c3.ctl"))
        xt.check("same file" in err, "one path for both: " + err)
        xt.check(not os.path.exists(same), "the refused start left a file behind")
        # The same under a path of 3000 bytes: the message names it twice
        # and still ends with its reason (log lines are not cut).
        deep = t.path
        while len(deep) < 3000:
            deep = os.path.join(deep, "d" * 200)
        os.makedirs(deep)
        same = os.path.join(deep, "same")
        err = start_fails(up, same, same, t.join("c3.ctl"))
        xt.check(err.count(same) == 2 and "same file" in err,
                 "one long path for both: %s" % err[-300:])
        xt.check(not os.path.exists(same), "the refused start left a file behind")

        # ---- 5. the server's own addresses ----------------------------------------
        # Each bad option comes before a second one ("--lport 0"), so that
        # a server that took the first would stop at the second, never
        # listening anywhere; the message must name the first.
        for args, what in ((["--laddr", ""], "empty --laddr"),
                           (["--lport", "+80"], "'+80'"),
                           (["--lport", " 80"], "' 80'"),
                           (["--max-queue-size", " 5"], "' 5'")):
            r = subprocess.run([xt.SERVER, "--target"] + args +
                               ["--lport", "0", up.image],
                               capture_output=True, text=True, timeout=20)
            xt.check(r.returncode == 2 and what in r.stderr,
                     "%s: exit %d, %s" % (what, r.returncode, r.stderr))
        # An export name past the protocol's 4096 bytes, on the command line.
        long = "a" * 5000
        r = subprocess.run([xt.SERVER, "--proxy", "--target-exportname", long,
                            "--lport", "0", "127.0.0.1", str(up.port),
                            t.join("x.cache"), t.join("x.bitmap"), t.join("x.ctl")],
                           capture_output=True, text=True, timeout=20)
        xt.check(r.returncode == 2 and "4096" in r.stderr,
                 "long --target-exportname: exit %d, %s" % (r.returncode, r.stderr))
        r = xt.bgctl("--exportname", long, "--reconnect", t.join("x.ctl"),
                     "127.0.0.1", up.port, check_rc=2)
        xt.check("4096" in r.stderr, "bgctl's long --exportname: " + r.stderr)
        del nbd


xt.main(main)
