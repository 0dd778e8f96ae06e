#!/usr/bin/python3
"""xnbd-wrapper: bugs found in review, each shown here so it stays fixed.

- An add-proxy that fails with a removal of the same name pipelined behind
  it on one control connection: the export was used after it was freed.
- Removing an opening proxy while its add-proxy connection has a removal
  queued: the queued command ran inside the first removal's walk of the
  table and removed an export twice.
- A proxy of the export list whose upstream accepts but never speaks: the
  wrapper did not listen (nor stop) until it spoke.  Now it listens after
  a short wait, serves the other exports, and stops at once; add-proxy to
  such an upstream ends with an error (the client's connect time limit).
- A waiting add-proxy is answered when the wrapper stops.
- Files that may not be shared: an export list naming one proxy file
  twice or for two exports, an --imgfile that is a proxy's cache, and any
  export using the wrapper's own files (export list, its temporary, log,
  pid file) are refused; so are export names that are not UTF-8 or are too
  long (also once percent-encoded for a reply line), and control socket
  paths too long for a socket, before connecting.
- One cache spelled two ways (./, ../, a symlinked directory, a hard
  link) was two files to the checks: two proxies shared one cache.
- bgctl-reconnect to port 70000 reached port 4464 and put 70000 in the
  export list, which the next start refused whole.
  (The pid file is in the same list; it goes with --daemonize, which this
  test does not use.)
"""
import os
import signal
import socket
import subprocess
import threading
import time

import xnbdtest as xt
from wrapper import WCTL, WRAPPER, Wrapper

MiB = 1 << 20


class Ctl:
    """A raw control connection: lines in, lines out."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        self.s.connect(path)
        self.buf = b""
        greeting = self.line()
        xt.check(greeting.startswith("xnbd-control 1 "),
                 "control greeting: %r" % greeting)

    def send(self, text):
        self.s.sendall(text.encode())

    def line(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise xt.Failure("control connection closed; had %r" % self.buf)
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def reply(self):
        """Lines up to and including `ok` or `error ...`."""
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line == "ok" or line.startswith("error "):
                return out

    def close(self):
        self.s.close()


def silent_upstream():
    """A listening socket nobody answers: connections complete in the
    backlog and then hear nothing."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


def wait_opening(w, name):
    """Wait until the export is in the table, opening."""
    end = time.time() + 10
    while name not in w.exports():
        xt.check(time.time() < end, "%s never listed" % name)
        time.sleep(0.02)
    xt.check_eq(w.exports()[name]["state"], "opening", name + "'s state")


def alive(w):
    xt.check(w.proc.poll() is None,
             "the wrapper died (%s)\n%s" % (w.proc.returncode, w.log_text()[-3000:]))
    w.ctl("--list")


def pipelined_failing_add_and_remove(t):
    w = Wrapper(t, sock="a.ctl")
    dead = xt.free_port()  # nothing listens: the add fails quickly
    c = Ctl(w.sock)
    c.send("add-proxy p 127.0.0.1 %d %s %s %s\nremove-by-exportname p\n"
           % (dead, t.join("a.cache"), t.join("a.bitmap"), t.join("a.pctl")))
    r1, r2 = c.reply(), c.reply()
    xt.check(r1[-1].startswith("error "), "failing add-proxy: %r" % r1)
    xt.check(r2 == ["error ENOENT no%20export%20named%20'p'"],
             "remove after the failed add: %r" % r2)
    c.close()
    alive(w)
    xt.check_eq(w.exports(), {}, "exports after the failed add")
    xt.check_eq(w.stop(), 0, "wrapper exit status")


def opening_proxy(t, w, tag, then=""):
    """Send add-proxy p (a silent upstream) on a new control connection,
    with the lines `then` pipelined behind it; wait until p is opening.
    Returns the connection and the upstream's socket."""
    up, port = silent_upstream()
    a = Ctl(w.sock)
    a.send("add-proxy p 127.0.0.1 %d %s %s %s\n%s"
           % (port, t.join(tag + ".cache"), t.join(tag + ".bitmap"),
              t.join(tag + ".pctl"), then))
    wait_opening(w, "p")
    return a, up


def remove_opening_with_queued_removal(t, img):
    w = Wrapper(t, sock="b.ctl")
    a, up = opening_proxy(t, w, "b", "remove-by-exportname q\n")
    w.ctl("--add-target", "q", img)  # after p in the table
    b = Ctl(w.sock)
    b.send("remove-by-exportname p\n")
    rb = b.reply()
    xt.check_eq(rb, ["info export p", "info clients 0", "ok"], "removal of p")
    ra1, ra2 = a.reply(), a.reply()
    xt.check(ra1[-1].startswith("error ECANCELED "), "p's add-proxy: %r" % ra1)
    xt.check_eq(ra2, ["info export q", "info clients 0", "ok"], "removal of q")
    a.close()
    b.close()
    alive(w)
    xt.check_eq(w.exports(), {}, "exports after both removals")
    up.close()
    xt.check_eq(w.stop(), 0, "wrapper exit status")


def waiting_add_answered_at_stop(t):
    w = Wrapper(t, sock="c.ctl")
    a, up = opening_proxy(t, w, "c")
    w.ctl("--shutdown")
    r = a.reply()
    xt.check(r[-1].startswith("error ESHUTDOWN "), "waiting add-proxy: %r" % r)
    xt.check_eq(w.stop(sig=None), 0, "wrapper exit status")
    up.close()


def silent_upstream_at_start(t, img, add_result):
    """The export list names a proxy whose upstream went silent."""
    db = t.join("d.db")
    src = t.image("d-src.img", 4 * MiB, os.urandom(4 * MiB))
    srv = t.server(src)
    w = Wrapper(t, ["--dbpath", db], sock="d.ctl")
    w.ctl("--add-proxy", "p", "127.0.0.1", srv.port, t.join("d.cache"),
          t.join("d.bitmap"), t.join("d.pctl"))
    w.ctl("--add-target", "q", img)
    xt.check_eq(w.stop(), 0, "wrapper exit status")
    srv.stop()
    # The same port, now a server that never speaks.
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    up.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    up.bind(("127.0.0.1", srv.port))
    up.listen(64)

    # A stop during the start's wait is carried out at once.
    port = xt.free_port()
    log = t.join("d1.log")
    p = subprocess.Popen([WRAPPER, "--laddr", "127.0.0.1", "--lport", str(port),
                          "--socket", t.join("d.ctl"), "--logpath", log,
                          "--dbpath", db])
    xt._live.append(p)
    time.sleep(1)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    xt.check_eq(p.wait(20), 0, "exit status after SIGTERM while starting")
    xt._live.remove(p)
    xt.check(time.time() - t0 < 3, "SIGTERM while starting took %.1f s"
             % (time.time() - t0))

    # Without a stop: the wrapper listens after its short wait and serves q.
    t0 = time.time()
    w = Wrapper(t, ["--dbpath", db], sock="d.ctl")
    xt.log("listening after %.1f s" % (time.time() - t0))
    ex = w.exports()
    xt.check_eq(ex["p"]["state"], "opening", "p's state")
    xt.check_eq(ex["q"]["state"], "serving", "q's state")
    h = w.connect("q")
    with open(img, "rb") as f:
        xt.check(h.pread(65536, 0) == f.read(65536), "q's data")
    h.shutdown()
    xt.check(w.wait_log("no answer from its upstream"),
             "the log says why p is not served")
    # Its entry is kept in the list: it is tried again later.
    with open(db) as f:
        xt.check(" p " in f.read().replace("\n", " "), "p left the list")
    t0 = time.time()
    xt.check_eq(w.stop(), 0, "exit status while p is opening")
    xt.check(time.time() - t0 < 5, "the stop took %.1f s" % (time.time() - t0))

    # An add-proxy to that upstream ends with an error, not a wait
    # without end (the client's time limit is 30 s).
    w = Wrapper(t, sock="e.ctl")

    def add():
        t0 = time.time()
        r = w.ctl("--add-proxy", "s", "127.0.0.1", srv.port, t.join("e.cache"),
                  t.join("e.bitmap"), t.join("e.pctl"), rc=None, timeout=90)
        add_result.append((r, time.time() - t0, w, up))

    th = threading.Thread(target=add)
    th.start()
    return th


def refused_files_and_names(t, img):
    db = t.join("f.db")
    src = t.image("f-src.img", 1 * MiB)
    srv = t.server(src)
    w = Wrapper(t, ["--dbpath", db], sock="f.ctl")
    w.ctl("--add-target", "q", img)
    for path in (db, w.log):
        r = w.ctl("--add-target", "bad", path, rc=1)
        xt.check("is the" in r.stderr or "is the" in r.stdout,
                 "add-target %s: %r" % (path, r.stderr))
    open(db + ".tmp", "w").close()
    r = w.ctl("--add-target", "bad", db + ".tmp", rc=1)
    os.unlink(db + ".tmp")
    for cache, bitmap in ((db, t.join("f.bm")), (t.join("f.cache"), w.log),
                          (db + ".tmp", t.join("f.bm"))):
        r = w.ctl("--add-proxy", "bad", "127.0.0.1", srv.port, cache, bitmap,
                  t.join("f.pctl"), rc=1)
        xt.check("wrapper" in r.stderr or "export list" in r.stderr,
                 "add-proxy with %s, %s: %r" % (cache, bitmap, r.stderr))
    # Refused before any connection is made: the upstream is not even up.
    dead = xt.free_port()
    long_sock = t.join("s" * 120)
    r = w.ctl("--add-proxy", "bad", "127.0.0.1", dead, t.join("f.cache"),
              t.join("f.bm"), long_sock, rc=1)
    xt.check("Unix socket" in r.stderr, "overlong socket path: %r" % r.stderr)
    r = subprocess.run([WCTL, "--socket", w.sock, "--add-target", b"bad\xff",
                        img], capture_output=True)
    xt.check(r.returncode == 1 and b"UTF-8" in r.stderr,
             "non-UTF-8 name: %r" % (r,))
    r = subprocess.run([WCTL, "--socket", w.sock, "--add-proxy", b"bad\xc0\x80",
                        "127.0.0.1", str(dead), t.join("f.cache"),
                        t.join("f.bm"), t.join("f.pctl")], capture_output=True)
    xt.check(r.returncode == 1 and b"UTF-8" in r.stderr,
             "overlong UTF-8 name: %r" % (r,))
    r = w.ctl("--add-target", "n" * 4097, img, rc=1)
    xt.check("4096" in r.stderr, "overlong name: %r" % r.stderr)
    # UTF-8 that fits 4096 bytes but not a reply line once encoded.
    r = w.ctl("--add-target", "\u00e9" * 2000, img, rc=1)
    xt.check("too long" in r.stderr, "name too long encoded: %r" % r.stderr)
    # One cache spelled two ways (and through a symlinked directory) is one
    # file: the second proxy is refused before its upstream even answers.
    os.mkdir(t.join("fd"))
    os.symlink(t.join("fd"), t.join("fl"))
    w.ctl("--add-proxy", "pa", "127.0.0.1", srv.port, t.join("fd/c.img"),
          t.join("fd/a.bm"), t.join("fd/a.sock"))
    for spelling in (t.join("fd/./c.img"), t.join("fl/c.img"),
                     t.join("fd/../fd/c.img")):
        r = w.ctl("--add-proxy", "pb", "127.0.0.1", srv.port, spelling,
                  t.join("fd/b.bm"), t.join("fd/b.sock"), rc=1)
        xt.check("in use by export 'pa'" in r.stderr,
                 "cache %s: %r" % (spelling, r.stderr))
    r = w.ctl("--add-proxy", "pb", "127.0.0.1", srv.port, t.join("fd/b.img"),
              t.join("fl/b.img"), t.join("fd/b.sock"), rc=1)
    xt.check("three different files" in r.stderr, "cache = bitmap: %r"
             % r.stderr)
    os.link(img, t.join("img.hardlink"))
    w.ctl("--add-target", "hl", img)
    r = w.ctl("--add-proxy", "pb", "127.0.0.1", srv.port,
              t.join("fd/b.img"), t.join("img.hardlink"), t.join("fd/b.sock"),
              rc=1)
    xt.check("in use by export" in r.stderr, "hard link: %r" % r.stderr)
    # A reconnect to a port out of range (getaddrinfo took 70000 as 4464,
    # and the export list then recorded a port no start accepts) is
    # refused, and the list keeps the upstream.
    c = Ctl(w.sock)
    for port in ("70000", "0", "+1", "x"):
        c.send("bgctl-reconnect pa 127.0.0.1 %s\n" % port)
        r = c.reply()
        xt.check(r[-1].startswith("error EINVAL") and "65535" in r[-1],
                 "bgctl-reconnect to port %s: %r" % (port, r))
    c.close()
    with open(db) as f:
        listed = f.read()
    xt.check("70000" not in listed and str(srv.port) in listed,
             "export list after refused reconnects: %r" % listed)
    w.ctl("--remove-by-exportname", "pa")
    w.ctl("--remove-by-exportname", "hl")
    r = w.ctl("--add-target", "caf\u00e9", img)  # UTF-8 is fine
    # A file name that is not UTF-8 is fine for a file; --json stays JSON.
    odd = os.path.join(t.path.encode(), b"odd\xff.img")
    with open(odd, "wb") as f:
        f.write(b"\0" * 65536)
    r = subprocess.run([WCTL, "--socket", w.sock, "--add-target", "odd", odd],
                       capture_output=True)
    xt.check(r.returncode == 0, "add-target of a non-UTF-8 file: %r" % (r,))
    r = subprocess.run([WCTL, "--socket", w.sock, "--list", "--json"],
                       capture_output=True)
    import json
    listed = {e["export"]: e for e in json.loads(r.stdout.decode("utf-8"))}
    xt.check(listed["odd"]["file"].endswith("odd\ufffd.img"),
             "a non-UTF-8 byte in --json: %r" % listed["odd"]["file"])
    w.ctl("--remove-by-exportname", "odd")
    xt.check_eq(sorted(w.exports()), ["caf\u00e9", "q"], "exports")
    with open(db, "rb") as f:
        before = f.read()
    xt.check_eq(w.stop(), 0, "wrapper exit status")

    def start_fails(args, text):
        port = xt.free_port()
        r = subprocess.run([WRAPPER, "--laddr", "127.0.0.1", "--lport",
                            str(port), "--socket", t.join("g.ctl")] + args,
                           capture_output=True, text=True, errors="replace",
                           timeout=30)
        xt.check(r.returncode == 1 and text in r.stderr,
                 "start with %s: %d %r" % (args, r.returncode, r.stderr))

    def db_with(*entries):
        path = t.join("g%d.db" % len(os.listdir(t.path)))
        with open(path, "w") as f:
            f.write("xnbd-wrapper-db 1\n")
            for e in entries:
                f.write(e + "\n")
            f.write("end %d\n" % len(entries))
        return path

    c, b, s = t.join("g.cache"), t.join("g.bm"), t.join("g.pctl")
    proxy = "proxy %s 127.0.0.1 " + str(srv.port) + " %%20 %s %s %s"
    start_fails(["--dbpath", db_with(proxy % ("a", c, b, s),
                                     proxy % ("b", t.join("h.cache"), b,
                                              t.join("h.pctl")))],
                "both use %s" % b)
    start_fails(["--dbpath", db_with(proxy % ("a", c, c, s))],
                "uses %s twice" % c)
    start_fails(["--dbpath", db_with(proxy % ("a", c, b, s),
                                     "target t %s" % c)],
                "both use %s" % c)
    dbp = db_with(proxy % ("a", c, b, s))
    open(c, "wb").close()
    start_fails(["--dbpath", dbp, "--imgfile", c], "both use %s" % c)
    start_fails(["--dbpath", dbp, "--logpath", b], "the wrapper's log file")
    xt.check(not os.path.exists(b), "a refused start made the bitmap")
    dbt = db_with("target t %s" % img)
    start_fails(["--dbpath", dbt, "--imgfile", dbt], "the export list")
    start_fails(["--dbpath", db_with("target n%C3%28 " + img)], "UTF-8")
    start_fails(["--dbpath", db_with(
        "proxy a 127.0.0.1 abc %%20 %s %s %s" % (c, b, s))], "invalid upstream")
    start_fails(["--dbpath", db_with(
        "proxy a  10809 %%20 %s %s %s" % (c, b, s))], "invalid upstream")
    dbe = db_with("target t %s" % img)
    with open(dbe) as f:
        text = f.read().replace("end 1", "end ")
    with open(dbe, "w") as f:
        f.write(text)
    start_fails(["--dbpath", dbe], "does not count")
    with open(db, "rb") as f:
        xt.check(f.read() == before, "a refused start changed the list")


def test():
    xt.need_nbd()
    with xt.TestDir() as t:
        img = t.image("img", 1 * MiB, os.urandom(1 * MiB))
        add_result = []
        th = silent_upstream_at_start(t, img, add_result)
        pipelined_failing_add_and_remove(t)
        remove_opening_with_queued_removal(t, img)
        waiting_add_answered_at_stop(t)
        refused_files_and_names(t, img)
        th.join(120)
        xt.check(add_result, "add-proxy to a silent upstream never returned")
        r, took, w, up = add_result[0]
        xt.check(r.returncode == 1, "add-proxy to a silent upstream: %r" % r)
        xt.log("add-proxy to a silent upstream failed after %.1f s: %s"
               % (took, r.stderr.strip()))
        xt.check(25 < took < 60, "it took %.1f s" % took)
        alive(w)
        xt.check_eq(w.exports(), {}, "exports after the failed add")
        xt.check_eq(w.stop(), 0, "wrapper exit status")
        up.close()


xt.main(test)
