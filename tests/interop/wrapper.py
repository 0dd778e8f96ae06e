#!/usr/bin/python3
"""xnbd-wrapper and xnbd-wrapper-ctl.

- Two images (--imgfile, named by their paths as given) on one port,
  listed by NBD_OPT_LIST and `--list` (human and --json), each served to
  concurrent clients with the right data.
- Unknown names: NBD_OPT_GO gets an error and the same connection can go on
  to a known export; NBD_OPT_EXPORT_NAME gets a clean close; the wrapper
  keeps serving.
- --add-target at run time; a duplicate name, a missing file, a directory
  and a device that is not a disk are refused (exit 1, a message).
- --remove-by-exportname with a client connected: the export is gone for
  new clients at once, the connected client is served to its end, then the
  export is released; --remove-by-file; unknown names and files (exit 1).
- A proxy export: shared by its clients, filled by --bgctl-cache-all,
  queried through the wrapper and through its own control socket with
  xnbd-bgctl, switched with clients connected; bgctl commands on targets
  and unknown names are refused.
- --dbpath: the export list survives a restart (targets, a switched proxy
  as a target on its cache, a proxy with its cache); --imgfile merges with
  it; a damaged or truncated list refuses to start.
- --readonly is advertised and enforced; --cow leaves images unchanged and
  its overlays vanish; --shutdown stops the wrapper; --daemonize/--pidfile.
"""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import xnbdtest as xt

WRAPPER = os.environ.get("XNBD_WRAPPER") or os.path.join(
    xt.HERE, "..", "..", "build", "wrapper", "xnbd-wrapper")
WCTL = os.environ.get("XNBD_WRAPPER_CTL") or os.path.join(
    xt.HERE, "..", "..", "build", "wrapper", "xnbd-wrapper-ctl")
BS = 4096


class Wrapper:
    """An xnbd-wrapper on 127.0.0.1, its control socket and log in t."""

    def __init__(self, t, args=(), sock="w.ctl", port=None, cwd=None,
                 env=None):
        self.t = t
        self.sock = t.join(sock)
        self.port = port or xt.free_port()
        self.log = t.join("wrapper.%d.log" % self.port)
        self.argv = [WRAPPER, "--laddr", "127.0.0.1", "--lport", str(self.port),
                     "--socket", self.sock, "--logpath", self.log] + list(args)
        self.proc = subprocess.Popen(self.argv, cwd=cwd or t.path, env=env)
        xt._live.append(self.proc)
        if not xt.wait_port("127.0.0.1", self.port, self.proc):
            xt.fail("wrapper did not start: %s\n%s"
                    % (" ".join(self.argv), self.log_text()))
        xt.log("wrapper pid %d on port %d" % (self.proc.pid, self.port))

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def ctl(self, *args, rc=0, timeout=60):
        r = subprocess.run([WCTL, "--socket", self.sock] + [str(a) for a in args],
                           capture_output=True, text=True, timeout=timeout)
        if rc is not None and r.returncode != rc:
            xt.fail("xnbd-wrapper-ctl %s: exit %d, expected %d\nstdout: %s\n"
                    "stderr: %s\nlog:\n%s"
                    % (" ".join(str(a) for a in args), r.returncode, rc,
                       r.stdout, r.stderr, self.log_text()[-3000:]))
        return r

    def exports(self):
        """--list --json as {name: fields}."""
        return {e["export"]: e
                for e in json.loads(self.ctl("--list", "--json").stdout)}

    def connect(self, name):
        nbd = xt.need_nbd()
        h = nbd.NBD()
        h.set_export_name(name)
        h.connect_tcp("127.0.0.1", str(self.port))
        return h

    def nbd_list(self):
        nbd = xt.need_nbd()
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_tcp("127.0.0.1", str(self.port))
        names = []
        h.opt_list(lambda name, desc: names.append(name) or 0)
        h.opt_abort()
        return names

    def stop(self, sig=signal.SIGTERM):
        if sig is not None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc in xt._live:
                xt._live.remove(self.proc)

    def wait_log(self, text, timeout=10):
        end = time.time() + timeout
        while time.time() < end:
            if text in self.log_text():
                return True
            time.sleep(0.05)
        return False


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        a_data = bytes((i * 7 + 1) & 0xff for i in range(256)) * (4 * xt.KiB)
        b_data = os.urandom(2 * xt.MiB)
        c_data = os.urandom(512 * xt.KiB)
        a = t.image("a.img", len(a_data), a_data)
        t.image("b.img", len(b_data), b_data)
        c = t.image("c.img", len(c_data), c_data)
        db = t.join("exports.db")
        b_abs = t.join("b.img")

        # ---- two images by name on one port ---------------------------------
        # "b.img" is relative (to the wrapper's directory): its export name
        # is the path as given.
        w = Wrapper(t, ["--dbpath", db, "--imgfile", a, "--imgfile", "b.img",
                        "--max-queue-size", "64", "--max-buf-size", "8M"])
        xt.check_eq(sorted(w.nbd_list()), sorted([a, "b.img"]), "NBD_OPT_LIST")
        ex = w.exports()
        xt.check_eq(sorted(ex), sorted([a, "b.img"]), "--list --json names")
        xt.check_eq((ex["b.img"]["type"], ex["b.img"]["file"], ex["b.img"]["size"],
                     ex["b.img"]["state"], ex["b.img"]["readonly"]),
                    ("target", b_abs, len(b_data), "serving", "no"), "--list fields")
        human = w.ctl("--list").stdout
        xt.check(a in human and b_abs in human and "serving" in human,
                 "--list for humans:\n" + human)

        # Concurrent clients, two per export, each on its own region.
        models = {a: bytearray(a_data), "b.img": bytearray(b_data)}
        errors = []

        def client(name, k):
            try:
                h = w.connect(name)
                size = len(models[name])
                off = k * (size // 4)
                for i in range(20):
                    data = os.urandom(BS)
                    o = off + i * BS
                    h.pwrite(data, o)
                    models[name][o:o + BS] = data
                    if h.pread(BS, o) != data:
                        errors.append("%s: read-back at %d" % (name, o))
                h.flush()
                h.shutdown()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append("%s client %d: %s" % (name, k, e))

        ths = [threading.Thread(target=client, args=(n, k))
               for n in (a, "b.img") for k in (0, 1)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        xt.check(not errors, "concurrent clients: %s" % errors)
        for name, path in ((a, a), ("b.img", b_abs)):
            h = w.connect(name)
            xt.check_bytes(h.pread(len(models[name]), 0), models[name],
                           "export %s after concurrent writes" % name)
            h.shutdown()
            xt.check_bytes(file_bytes(path), models[name], "image file " + path)

        # ---- unknown names ---------------------------------------------------------
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_tcp("127.0.0.1", str(w.port))
        h.set_export_name("no-such-export")
        try:
            h.opt_go()
            xt.fail("NBD_OPT_GO of an unknown name succeeded")
        except nbd.Error as e:
            xt.log("unknown name refused: %s" % e)
        h.set_export_name(a)       # the same connection goes on
        h.opt_go()
        xt.check_bytes(h.pread(BS, 0), models[a][:BS], "GO after an unknown name")
        h.shutdown()
        try:
            w.connect("no-such-export")
            xt.fail("connecting to an unknown name succeeded")
        except nbd.Error:
            pass
        s = socket.create_connection(("127.0.0.1", w.port), 10)
        rc = xt.RawClient(s)
        rc.greeting()
        rc.send_client_flags()
        rc.send_option(xt.OPT_EXPORT_NAME, b"no-such-export")
        xt.check(xt.is_closed(s), "NBD_OPT_EXPORT_NAME of an unknown name: closed")
        s.close()
        xt.check(w.proc.poll() is None, "the wrapper keeps serving")

        # ---- add at run time, refusals -----------------------------------------------
        w.ctl("--add-target", "cee", c)
        xt.check("cee" in w.nbd_list(), "added export listed")
        h = w.connect("cee")
        xt.check_bytes(h.pread(len(c_data), 0), c_data, "added export's data")
        h.shutdown()
        r = w.ctl("--add-target", "cee", a, rc=1)
        xt.check("exists" in r.stderr, "duplicate name: " + r.stderr)
        r = w.ctl("--add-target", "ghost", t.join("missing.img"), rc=1)
        xt.check("No such file" in r.stderr, "missing file: " + r.stderr)
        r = w.ctl("--add-target", "dir", t.path, rc=1)
        xt.check(r.stderr.strip() != "", "a directory: " + r.stderr)
        r = w.ctl("--add-target", "null", "/dev/null", rc=1)
        xt.check("not a regular file" in r.stderr, "a character device: " + r.stderr)
        if os.geteuid() != 0:
            locked = t.image("locked.img", BS)
            os.chmod(locked, 0)
            r = w.ctl("--add-target", "locked", locked, rc=1)
            xt.check("ermission" in r.stderr, "unreadable file: " + r.stderr)
        xt.check_eq(sorted(w.exports()), sorted([a, "b.img", "cee"]),
                    "refused adds left nothing behind")
        w.ctl("--add-target", rc=2)
        w.ctl("--list", "extra", rc=2)

        # ---- remove with a client connected ------------------------------------------
        h = w.connect("cee")
        h.pwrite(b"\x5a" * BS, 0)
        xt.check_eq(w.exports()["cee"]["clients"], 1, "--list counts the client")
        r = w.ctl("--remove-by-exportname", "cee")
        xt.check("1 client" in r.stdout, "removal reply: " + r.stdout)
        xt.check("cee" not in w.nbd_list(), "removed export not listed")
        xt.check("cee" not in w.exports(), "removed export not in --list")
        try:
            w.connect("cee")
            xt.fail("a new client reached a removed export")
        except nbd.Error:
            pass
        # The connected client is served to the end of its session.
        xt.check_bytes(h.pread(2 * BS, 0), b"\x5a" * BS + c_data[BS:2 * BS],
                       "connected client after the removal")
        h.pwrite(b"\x6b" * BS, BS)
        h.flush()
        xt.check(not w.wait_log("its last client has gone", 0.3),
                 "export released while its client is connected")
        h.shutdown()
        xt.check(w.wait_log("'cee': its last client has gone"),
                 "export released when its last client left")
        xt.check_bytes(file_bytes(c)[:2 * BS], b"\x5a" * BS + b"\x6b" * BS,
                       "writes of the removed export's client reached the file")
        # The name is free again.
        w.ctl("--add-target", "cee", c)
        r = w.ctl("--remove-by-file", b_abs)
        xt.check("b.img" in r.stdout, "--remove-by-file: " + r.stdout)
        xt.check("b.img" not in w.exports(), "removed by file")
        for args in (("--remove-by-exportname", "nope"),
                     ("--remove-by-file", t.join("nope.img")),
                     ("--bgctl-query", "nope"),
                     ("--bgctl-query", "cee"),
                     ("--bgctl-switch", "nope"),
                     ("--bgctl-cache-all", "cee")):
            r = w.ctl(*args, rc=1)
            xt.check(r.stderr.strip() != "", "%s: a message" % (args,))

        # ---- a proxy export ---------------------------------------------------------------
        src = os.urandom(8 * xt.MiB)
        up = t.server(t.image("src.img", len(src), src), ["--readonly"])
        w.ctl("--add-proxy", "px", "127.0.0.1", up.port, t.join("px.cache"),
              t.join("px.bitmap"), t.join("px.ctl"))
        r = w.ctl("--add-proxy", "px2", "127.0.0.1", up.port, t.join("px.cache"),
                  t.join("px2.bitmap"), t.join("px2.ctl"), rc=1)
        xt.check("in use" in r.stderr, "a second proxy on one cache: " + r.stderr)
        r = w.ctl("--add-proxy", "px3", "127.0.0.1", xt.free_port(),
                  t.join("px3.cache"), t.join("px3.bitmap"), t.join("px3.ctl"), rc=1)
        xt.check("px3" not in w.exports(), "a proxy that cannot connect is not added")
        h1, h2 = w.connect("px"), w.connect("px")
        h1.pwrite(b"\x77" * 5000, 3 * xt.MiB + 11)
        model = bytearray(src)
        model[3 * xt.MiB + 11:3 * xt.MiB + 5011] = b"\x77" * 5000
        xt.check_bytes(h2.pread(8192, 3 * xt.MiB), model[3 * xt.MiB:3 * xt.MiB + 8192],
                       "the proxy's clients share it")
        q = json.loads(w.ctl("--bgctl-query", "--json", "px").stdout)
        xt.check_eq((q["mode"], q["state"], q["clients"], q["size"]),
                    ("proxy", "connected", 2, len(src)), "--bgctl-query")
        xt.check_eq((q["max-queue-size"], q["max-buf-size"]), (64, 8 * xt.MiB),
                    "the wrapper's bounds")
        xt.check(q["cached-blocks"] < q["blocks"], "not all cached yet")
        q2 = xt.query(t.join("px.ctl"))      # xnbd-bgctl on its own socket
        xt.check_eq((q2["cache"], q2["clients"]), (t.join("px.cache"), 2),
                    "xnbd-bgctl --query on the proxy's socket")
        r = w.ctl("--bgctl-switch", "px", rc=1)
        xt.check("not cached" in r.stderr, "switch refused while uncached: " + r.stderr)
        r = w.ctl("--progress", "--bgctl-cache-all", "px")
        xt.check("100.00%" in r.stdout, "cache-all progress:\n" + r.stdout)
        q = json.loads(w.ctl("--bgctl-query", "--json", "px").stdout)
        xt.check_eq(q["cached-percent"], 100, "everything cached")
        h1.flush()
        xt.check_bytes(file_bytes(t.join("px.cache")), model, "cache = source + writes")
        w.ctl("--bgctl-switch", "px")        # with two clients connected
        xt.check_eq(w.exports()["px"]["proxy-state"], "switched", "--list after switch")
        up.stop()
        for hh in (h1, h2):
            hh.pwrite(b"\x88" * 100, 100)
            model[100:200] = b"\x88" * 100
            xt.check_bytes(hh.pread(len(src), 0), model, "reads after the switch")
        h1.shutdown()
        h2.shutdown()

        # A second proxy, left a proxy, for the restart.
        up = t.server(t.join("src.img"), ["--readonly"], port=up.port)
        w.ctl("--target-exportname", "", "--add-proxy", "py", "127.0.0.1", up.port,
              t.join("py.cache"), t.join("py.bitmap"), t.join("py.ctl"))
        h = w.connect("py")
        xt.check_bytes(h.pread(xt.MiB, 0), src[:xt.MiB], "second proxy's data")
        h.shutdown()

        # A proxy removed with a client connected keeps serving it (fetching
        # too), and keeps its files until then; what it cached is kept.
        w.ctl("--add-proxy", "pz", "127.0.0.1", up.port, t.join("pz.cache"),
              t.join("pz.bitmap"), t.join("pz.ctl"))
        h = w.connect("pz")
        xt.check_bytes(h.pread(xt.MiB, 0), src[:xt.MiB], "third proxy's data")
        r = w.ctl("--remove-by-exportname", "pz")
        xt.check("1 client" in r.stdout, "proxy removal reply: " + r.stdout)
        xt.check(not os.path.exists(t.join("pz.ctl")),
                 "a removed proxy's control socket goes at once")
        r = w.ctl("--add-proxy", "pq", "127.0.0.1", up.port, t.join("pz.cache"),
                  t.join("pq.bitmap"), t.join("pq.ctl"), rc=1)
        xt.check("still connected" in r.stderr,
                 "a draining proxy's cache is not taken: " + r.stderr)
        xt.check_bytes(h.pread(xt.MiB, 4 * xt.MiB), src[4 * xt.MiB:5 * xt.MiB],
                       "a removed proxy still fetches for its client")
        h.shutdown()
        xt.check(w.wait_log("'pz': its last client has gone"), "proxy released")
        w.ctl("--add-proxy", "pq", "127.0.0.1", up.port, t.join("pz.cache"),
              t.join("pz.bitmap"), t.join("pq.ctl"))
        q = json.loads(w.ctl("--bgctl-query", "--json", "pq").stdout)
        xt.check_eq(q["cached-blocks"], 2 * xt.MiB // BS,
                    "the removed proxy's cache and bitmap were kept")
        w.ctl("--remove-by-file", t.join("pz.cache"))

        # ---- restart with --dbpath --------------------------------------------------------
        before = w.exports()
        xt.check_eq(w.stop(), 0, "wrapper exit status after SIGTERM")
        xt.check(not os.path.exists(w.sock), "control socket removed at exit")
        xt.check(not os.path.exists(t.join("py.ctl")), "proxy socket removed at exit")
        text = open(db).read()
        xt.check("proxy py " in text and "target px " in text and "end 4" in text,
                 "export list file:\n" + text)
        # The same list, merged with an --imgfile it has already.
        w = Wrapper(t, ["--dbpath", db, "--imgfile", a], port=w.port)
        after = w.exports()
        xt.check_eq(sorted(after), sorted(before), "exports after a restart")
        xt.check_eq((after["px"]["type"], after["px"]["file"]),
                    ("target", t.join("px.cache")), "a switched proxy comes back a target")
        xt.check_eq((after["py"]["type"], after["py"]["state"]), ("proxy", "serving"),
                    "a proxy comes back a proxy")
        q = json.loads(w.ctl("--bgctl-query", "--json", "py").stdout)
        xt.check(q["cached-blocks"] >= xt.MiB // BS, "the proxy's cache is kept: %r" % q)
        for name, want in ((a, models[a]), ("px", model), ("cee", None)):
            h = w.connect(name)
            if want is not None:
                xt.check_bytes(h.pread(len(want), 0), want, "export %s after restart" % name)
            h.shutdown()
        # A second wrapper on a live control socket refuses to start and
        # leaves the first alone.
        r = subprocess.run([WRAPPER, "--laddr", "127.0.0.1", "--lport",
                            str(xt.free_port()), "--socket", w.sock],
                           capture_output=True, text=True, timeout=20)
        xt.check(r.returncode == 1 and "running wrapper" in r.stderr,
                 "second wrapper: %d %s" % (r.returncode, r.stderr))
        xt.check(a in w.exports(), "the first wrapper still answers")
        xt.check_eq(w.stop(), 0, "second wrapper exit status")
        r = subprocess.run([WCTL, "--socket", w.sock, "--list"],
                           capture_output=True, text=True, timeout=20)
        xt.check(r.returncode == 1 and "running" in r.stderr,
                 "ctl without a wrapper: %d %s" % (r.returncode, r.stderr))
        r = subprocess.run([WRAPPER, "stray-argument"], capture_output=True,
                           text=True, timeout=20)
        xt.check_eq(r.returncode, 2, "wrapper usage error")

        # ---- a damaged export list refuses to start ---------------------------------------
        good = open(db).read()
        for bad, why in ((good.replace("end 4", "end 3"), "count"),
                         (good.replace("\nend 4\n", "\n"), "truncated"),
                         (good.replace("target ", "targte ", 1), "keyword"),
                         ("garbage\n", "no header")):
            with open(db, "w") as f:
                f.write(bad)
            port = xt.free_port()
            r = subprocess.run([WRAPPER, "--laddr", "127.0.0.1", "--lport", str(port),
                                "--socket", t.join("bad.ctl"), "--dbpath", db],
                               capture_output=True, text=True, timeout=20)
            xt.check(r.returncode == 1 and db in r.stderr,
                     "damaged list (%s): exit %d, %s" % (why, r.returncode, r.stderr))
            xt.check(not os.path.exists(t.join("bad.ctl")),
                     "no control socket left by a refused start")
        with open(db, "w") as f:
            f.write(good)

        # An export of the list that cannot be opened does not stop the
        # others; it stays listed (and in the file) until removed.
        db2 = t.join("ghost.db")
        with open(db2, "w") as f:
            f.write("xnbd-wrapper-db 1\ntarget ghost%%20disk %s\ntarget a %s\nend 2\n"
                    % (t.join("gone.img"), a))
        w = Wrapper(t, ["--dbpath", db2])
        ex = w.exports()
        xt.check_eq((ex["ghost disk"]["state"], ex["a"]["state"]), ("failed", "serving"),
                    "a missing image is listed as failed, the others served")
        xt.check("No such file" in ex["ghost disk"].get("error", ""),
                 "the reason is listed: %r" % ex["ghost disk"])
        xt.check("ghost%20disk" in open(db2).read(), "a failed export stays in the file")
        w.ctl("--remove-by-exportname", "ghost disk")
        xt.check("ghost" not in open(db2).read(), "removed from the file")
        xt.check_eq(w.stop(), 0, "exit status")

        # ---- --readonly -----------------------------------------------------------------------
        w = Wrapper(t, ["--readonly", "--imgfile", a])
        h = w.connect(a)
        xt.check(h.is_read_only(), "read-only advertised")
        try:
            h.pwrite(b"x" * 512, 0)
            xt.fail("a write to a read-only export succeeded")
        except nbd.Error as e:
            xt.check_eq(e.errno, "EPERM", "errno of a refused write")
        h.shutdown()
        xt.check_eq(w.exports()[a]["readonly"], "yes", "--list says read-only")
        xt.check_bytes(file_bytes(a), models[a], "read-only image unchanged")
        # --shutdown through the control socket.
        r = w.ctl("--shutdown")
        xt.check_eq(w.stop(sig=None), 0, "exit status after --shutdown")

        # ---- --cow -------------------------------------------------------------------------------
        tmp = t.join("tmp")
        os.mkdir(tmp)
        env = dict(os.environ, TMPDIR=tmp)
        w = Wrapper(t, ["--cow", "--imgfile", a], env=env)
        h, h2 = w.connect(a), w.connect(a)
        h.pwrite(b"\xc0" * 3000, 1000)
        xt.check_bytes(h2.pread(5000, 0), models[a][:1000] + b"\xc0" * 3000 +
                       models[a][4000:5000], "CoW writes seen by another client")
        h.shutdown()
        h2.shutdown()
        w.ctl("--add-target", "cee2", c)
        xt.check_eq(w.exports()["cee2"]["cow"], "yes", "an added target is CoW too")
        xt.check_eq(w.stop(), 0, "CoW wrapper exit status")
        xt.check_bytes(file_bytes(a), models[a], "--cow: the image is unchanged")
        xt.check_eq(os.listdir(tmp), [], "no overlay left behind")

        # ---- --daemonize ----------------------------------------------------------------------
        pidfile = t.join("w.pid")
        port = xt.free_port()
        r = subprocess.run([WRAPPER, "--laddr", "127.0.0.1", "--lport", str(port),
                            "--socket", t.join("d.ctl"), "--daemonize",
                            "--pidfile", pidfile, "--logpath", t.join("d.log"),
                            "--imgfile", a], timeout=20)
        xt.check_eq(r.returncode, 0, "--daemonize parent exit status")
        pid = int(open(pidfile).read())
        try:
            r = subprocess.run([WCTL, "--socket", t.join("d.ctl"), "--list"],
                               capture_output=True, text=True, timeout=20)
            xt.check(r.returncode == 0 and a in r.stdout, "daemon --list: " + r.stdout)
            subprocess.run([WCTL, "--socket", t.join("d.ctl"), "--shutdown"],
                           timeout=20, check=True, capture_output=True)
            end = time.time() + 10
            while time.time() < end and os.path.exists(pidfile):
                time.sleep(0.05)
            xt.check(not os.path.exists(pidfile), "pidfile removed at exit")
        finally:
            try:
                os.kill(pid, 0)
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        up.stop()


if __name__ == "__main__":
    xt.main(main)
