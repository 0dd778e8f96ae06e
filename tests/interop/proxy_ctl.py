#!/usr/bin/python3
"""xnbd-bgctl against a running proxy.

- --query (human and --json); --cache-all --progress without a terminal
  leaves a cache equal to the source except where clients wrote, and
  --query then says 100%; --cache-all2 does the same over its own
  connection.
- --switch is refused while blocks are missing (exit 1, a message), then
  done with clients connected, which keep working; stopping the upstream
  afterwards does not disturb them.  --force --switch: missing blocks read
  as zeroes.  SIGUSR2 switches too.
- Upstream loss: cached blocks are still served, the rest wait; the proxy
  reconnects by itself when the upstream returns; --reconnect points it at
  another upstream; a reconnect to an export of another size is refused.
- A chain of two proxies.
- Bad requests on the control socket get errors; the server carries on.
"""
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import xnbdtest as xt

BS = 4096


def read_bg(h, length, off, result):
    """Read in a thread (the libnbd handle is used by that thread only)."""
    def run():
        try:
            result["data"] = h.pread(length, off)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            result["error"] = e
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def main():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        size = 16 * xt.MiB
        src = os.urandom(size)
        up_img = t.image("src.img", size, src)
        up = t.server(up_img, ["--readonly"])

        # ---- query, cache-all, switch -------------------------------------
        p = t.proxy(up.port, name="a")
        h = p.connect()
        h.pwrite(b"\x11" * 10000, 4 * xt.MiB + 5)   # a client write
        model = bytearray(src)
        model[4 * xt.MiB + 5:4 * xt.MiB + 10005] = b"\x11" * 10000
        q = xt.query(p.ctl)
        xt.check_eq(q["mode"], "proxy", "query mode")
        xt.check_eq(q["state"], "connected", "query state")
        xt.check_eq(q["size"], size, "query size")
        xt.check_eq(q["blocks"], size // BS, "query blocks")
        xt.check_eq(q["cache"], p.cache, "query cache path")
        xt.check_eq(q["bitmap"], p.bitmap, "query bitmap path")
        xt.check_eq(q["upstream-port"], str(up.port), "query upstream port")
        xt.check(0 < q["cached-blocks"] < q["blocks"], "some blocks cached")
        human = xt.bgctl("--query", p.ctl, check_rc=0).stdout
        xt.check("cached blocks" in human and p.cache in human,
                 "human-readable query:\n" + human)

        r = xt.bgctl("--switch", p.ctl, check_rc=1)
        xt.check("not cached" in r.stderr, "switch refused with a reason: " + r.stderr)
        xt.check_eq(xt.query(p.ctl)["state"], "connected", "still a proxy")

        r = xt.bgctl("--progress", "--cache-all", p.ctl, check_rc=0)
        xt.check("cached" in r.stdout and "100.00%" in r.stdout,
                 "plain progress lines without a terminal:\n" + r.stdout)
        q = xt.query(p.ctl)
        xt.check_eq(q["cached-blocks"], q["blocks"], "everything cached")
        xt.check_eq(q["cached-percent"], 100, "query says 100%")
        h.flush()
        with open(p.cache, "rb") as f:
            xt.check_bytes(f.read(), model, "cache image = source + client writes")

        # Clients keep working across the switch and the upstream's end.
        h2 = p.connect()
        xt.bgctl("--switch", p.ctl, check_rc=0)
        xt.check_eq(xt.query(p.ctl)["state"], "switched", "state after switch")
        up.stop()
        for hh in (h, h2):
            hh.pwrite(b"\x22" * 5000, 100)
            model[100:5100] = b"\x22" * 5000
            xt.check_bytes(hh.pread(size, 0), model, "reads after switch and upstream stop")
        r = xt.bgctl("--switch", p.ctl, check_rc=1)
        xt.check("already" in r.stderr, "second switch: " + r.stderr)
        r = xt.bgctl("--cache-all", p.ctl, check_rc=1)
        xt.check(r.stderr.strip() != "", "cache-all after switch: an error message")
        h3 = p.connect()   # a new client after the switch
        xt.check_bytes(h3.pread(BS, 0), model[:BS], "a new client after the switch")
        for hh in (h, h2, h3):
            hh.shutdown()
        xt.check_eq(p.stop(), 0, "switched proxy exits cleanly")

        up = t.server(up_img, ["--readonly"], port=up.port)

        # ---- --force --switch, --shutdown alias ----------------------------
        p = t.proxy(up.port, name="b")
        h = p.connect()
        part = h.pread(BS * 3, 0)
        r = xt.bgctl("--shutdown", p.ctl, check_rc=1)   # old alias of --switch
        xt.bgctl("--force", "--switch", p.ctl, check_rc=0)
        xt.check_bytes(h.pread(BS * 3, 0), part, "cached blocks after a forced switch")
        xt.check_bytes(h.pread(BS, 8 * xt.MiB), bytes(BS),
                       "a missing block reads as zeroes after a forced switch")
        h.shutdown()
        p.stop()

        # ---- the progress bar on a terminal (script(1) gives it one) -------
        p = t.proxy(up.port, name="tty")
        if shutil.which("script"):
            r = subprocess.run(["script", "-qec", "%s --progress --cache-all %s"
                                % (xt.BGCTL, p.ctl), "/dev/null"],
                               capture_output=True, text=True, timeout=60)
            xt.check(r.returncode == 0, "cache-all on a terminal: exit %d: %s"
                     % (r.returncode, r.stdout + r.stderr))
            xt.check("[####" in r.stdout and "100.00% " in r.stdout,
                     "a progress bar on a terminal: %r" % r.stdout[-300:])
        else:
            xt.log("script(1) missing: the terminal progress bar is not checked")
        p.stop()

        # ---- SIGUSR2 ------------------------------------------------------------
        p = t.proxy(up.port, name="c")
        p.signal(signal.SIGUSR2)
        time.sleep(0.3)
        xt.check_eq(xt.query(p.ctl)["state"], "connected",
                    "SIGUSR2 with blocks missing does not switch")
        xt.check("not cached" in p.log_text(), "SIGUSR2 refusal is logged")
        xt.bgctl("--cache-all2", p.ctl, check_rc=0)
        xt.check_eq(xt.query(p.ctl)["cached-percent"], 100, "cache-all2 filled it")
        with open(p.cache, "rb") as f:
            xt.check_bytes(f.read(), src, "cache-all2: cache = source")
        p.signal(signal.SIGUSR2)
        time.sleep(0.3)
        xt.check_eq(xt.query(p.ctl)["state"], "switched", "SIGUSR2 switched")
        p.stop()

        # ---- upstream loss, automatic retry, --reconnect --------------------------
        p = t.proxy(up.port, name="d")
        h = p.connect()
        h.pread(xt.MiB, 0)                 # cached
        up.stop()
        time.sleep(0.2)
        xt.check_bytes(h.pread(xt.MiB, 0), src[:xt.MiB], "cached data while the upstream is gone")
        res = {}
        th = read_bg(h, xt.MiB, 8 * xt.MiB, res)
        time.sleep(1.0)
        xt.check(th.is_alive(), "a read of uncached blocks waits for the upstream")
        q = xt.query(p.ctl)
        xt.check_eq(q["state"], "waiting", "query state while the upstream is gone")
        xt.check(q["waiting-requests"] >= 1, "query counts waiting requests")
        xt.check("lost" in p.log_text(), "the loss is logged")
        up = t.server(up_img, ["--readonly"], port=up.port)   # same address
        th.join(15)
        xt.check(not th.is_alive(), "the waiting read finished after the upstream returned")
        xt.check("data" in res, "waiting read: %r" % res.get("error"))
        xt.check_bytes(res["data"], src[8 * xt.MiB:9 * xt.MiB], "waiting read data")

        # Elsewhere: a copy of the image on another server, via --reconnect.
        copy_img = t.image("copy.img", size, src)
        up_b = t.server(copy_img, ["--readonly"])
        up.stop()
        res = {}
        th = read_bg(h, xt.MiB, 12 * xt.MiB, res)
        time.sleep(0.5)
        xt.check(th.is_alive(), "read waits again")
        small = t.image("small.img", xt.MiB, bytes(xt.MiB))
        up_small = t.server(small, ["--readonly"])
        r = xt.bgctl("--reconnect", p.ctl, "127.0.0.1", up_small.port, check_rc=1)
        xt.check("size" in r.stderr, "reconnect to another size refused: " + r.stderr)
        r = xt.bgctl("--reconnect", p.ctl, "127.0.0.1", xt.free_port(), check_rc=1)
        xt.check(r.stderr.strip() != "", "reconnect to nothing: a message")
        xt.bgctl("--reconnect", p.ctl, "127.0.0.1", up_b.port, check_rc=0)
        th.join(15)
        xt.check("data" in res, "read after --reconnect: %r" % res.get("error"))
        xt.check_bytes(res["data"], src[12 * xt.MiB:13 * xt.MiB], "read after --reconnect")
        q = xt.query(p.ctl)
        xt.check_eq((q["state"], q["upstream-port"]), ("connected", str(up_b.port)),
                    "query after --reconnect")
        h.shutdown()
        p.stop()

        # ---- a chain of two proxies --------------------------------------------------
        p1 = t.proxy(up_b.port, name="chain1")
        p2 = t.proxy(p1.port, name="chain2")
        h = p2.connect()
        xt.check_bytes(h.pread(size, 0), src, "read through two proxies")
        h.pwrite(b"\x33" * 7000, 3)
        h.flush()
        h1 = p1.connect()
        xt.check_bytes(h1.pread(7003, 0), src[:7003], "the first proxy is not written")
        xt.check_eq(xt.query(p1.ctl)["cached-percent"], 100, "the first proxy cached it all")
        h1.shutdown()
        h.shutdown()
        p2.stop()
        p1.stop()

        # ---- bad control requests --------------------------------------------------
        p = t.proxy(up_b.port, name="e")
        s = socket.socket(socket.AF_UNIX)
        s.connect(p.ctl)
        f = s.makefile("rwb")
        greet = f.readline()
        xt.check(greet.startswith(b"xnbd-control 1"), "greeting: %r" % greet)
        for line, want in ((b"frobnicate\n", b"error ENOSYS"),
                           (b"switch now please\n", b"error EINVAL"),
                           (b"reconnect\n", b"error EINVAL"),
                           (b"query %zz\n", b"error"),
                           (b"x" * 20000 + b"\n", b"error")):
            f.write(line)
            f.flush()
            reply = f.readline()
            while reply.startswith(b"info") or reply.startswith(b"progress"):
                reply = f.readline()
            xt.check(reply.startswith(want), "%r... answered %r" % (line[:20], reply))
            if len(line) > 10000:
                break
        s.close()
        xt.check(p.alive(), "proxy alive after bad control requests")
        xt.check_eq(xt.query(p.ctl)["state"], "connected", "control works after them")
        r = xt.bgctl("--query", t.join("nonexistent.ctl"), check_rc=1)
        xt.check("no such" in r.stderr.lower(), "bgctl on a missing socket: " + r.stderr)
        r = xt.bgctl("--query", check_rc=2)
        r = xt.bgctl("--bogus", p.ctl, check_rc=2)
        # A live control socket is not stolen by a second server.
        rc = subprocess.run([xt.SERVER, "--proxy", "--lport", str(xt.free_port()),
                             "--laddr", "127.0.0.1", "127.0.0.1", str(up_b.port),
                             t.join("f.cache"), t.join("f.bitmap"), p.ctl],
                            capture_output=True, text=True, timeout=20)
        xt.check(rc.returncode == 1 and "running server" in rc.stderr,
                 "second server on a live socket: %d %s" % (rc.returncode, rc.stderr))
        xt.check_eq(xt.query(p.ctl)["state"], "connected", "first server keeps its socket")
        # A stale one (server killed) does not block a restart.
        p.proc.kill()
        p.proc.wait()
        xt.check(os.path.exists(p.ctl), "stale socket file left by SIGKILL")
        p = t.proxy(up_b.port, name="e")
        xt.check_eq(xt.query(p.ctl)["state"], "connected", "restart over a stale socket")
        p.stop()
        xt.check(not os.path.exists(p.ctl), "socket removed at a clean exit")


xt.main(main)
