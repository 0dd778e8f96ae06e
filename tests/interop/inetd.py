#!/usr/bin/python3
"""xnbd-server --inetd: the one client on standard input.

Through libnbd's connect_command (as nbdsh/nbdinfo do): reads and writes
work, and the server process exits once the client disconnects.  Through
a socketpair we own: the exit status is 0, after NBD_CMD_DISC and after an
abrupt close alike; a second session sees the first one's writes; and
nbdsh -c 'h.connect_command([xnbd-server, "--inetd", ...])' works.
--connected-fd N: transmission at once on N, the server exits 0 after DISC.
"""
import os
import shutil
import random
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import MiB, check, check_eq, check_bytes  # noqa: E402

SIZE = 16 * MiB


def proc_state(pid):
    """'Z' for a zombie, None when gone, else the state letter."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def children_running(path, any_parent=False):
    """PIDs of our child processes (or, with any_parent, of any process)
    running --inetd on path (a file in our own temporary directory)."""
    out = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open("/proc/%s/cmdline" % d, "rb") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if (any_parent or ppid == me) and path.encode() in cmd and b"--inetd" in cmd:
            out.append(int(d))
    return out


def wait_exit(pid, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if proc_state(pid) in ("Z", None):
            return True
        time.sleep(0.05)
    return False


def test():
    nbd = xt.need_nbd()
    with xt.TestDir() as t:
        img = t.image("disk.img", SIZE)
        logf = t.join("inetd.log")
        argv = [xt.SERVER, "--inetd", "--target", "--logpath", logf, img]
        rnd = random.Random(8)

        # ---- 1: libnbd connect_command ----
        h = nbd.NBD()
        h.connect_command(argv)
        pids = children_running(img)
        check_eq(len(pids), 1, "server processes started by connect_command")
        pid = pids[0]
        check_eq(h.get_size(), SIZE, "export size over --inetd")
        check(h.get_structured_replies_negotiated(),
              "no structured replies over --inetd")
        data1 = rnd.randbytes(3 * MiB + 17)
        h.pwrite(data1, 1 * MiB - 9)
        check_bytes(h.pread(len(data1), 1 * MiB - 9), data1, "read back over --inetd")
        h.zero(4096, 8 * MiB)
        check_eq(h.pread(4096, 8 * MiB), bytes(4096), "zeroed block over --inetd")
        h.flush()
        check(proc_state(pid) not in ("Z", None), "server exited while in use")
        h.shutdown()                              # NBD_CMD_DISC
        ok = wait_exit(pid, 5)
        if not ok:
            os.kill(pid, 9)
            xt.fail("xnbd-server --inetd (pid %d) still running 5 s after the "
                    "client disconnected" % pid)
        del h
        with open(img, "rb") as f:
            f.seek(1 * MiB - 9)
            check_bytes(f.read(len(data1)), data1, "image file after --inetd session")

        # ---- 2: a socketpair, exit status after DISC ----
        def session(abrupt):
            a, b = socket.socketpair()
            p = subprocess.Popen(argv, stdin=b, stdout=b, close_fds=True)
            b.close()
            try:
                h = nbd.NBD()
                h.connect_socket(a.detach())
                check_eq(h.get_size(), SIZE, "size over a socketpair")
                got = h.pread(len(data1), 1 * MiB - 9)
                check_bytes(got, data1, "second session sees the first's writes")
                h.pwrite(b"second" * 1000, 12 * MiB)
                if abrupt:
                    # drop the connection without NBD_CMD_DISC
                    del h
                else:
                    h.shutdown()
                    del h
                rc = p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                xt.fail("xnbd-server --inetd still running 5 s after the client "
                        "%s" % ("closed the socket" if abrupt else "sent DISC"))
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            check_eq(rc, 0, "exit status of xnbd-server --inetd after %s"
                     % ("an abrupt close" if abrupt else "NBD_CMD_DISC"))
        session(abrupt=False)
        session(abrupt=True)
        with open(img, "rb") as f:
            f.seek(12 * MiB)
            check_eq(f.read(6000), b"second" * 1000, "image after socketpair sessions")

        # ---- 3: nbdsh -c 'h.connect_command([...])' ----
        # (Not "nbdinfo -- [ CMD ]": that is systemd socket activation,
        # which xnbd-server does not speak.)
        if shutil.which("nbdsh"):
            code = ("h.connect_command(%r); assert h.get_size() == %d; "
                    "assert h.pread(6000, %d) == b'second' * 1000; "
                    "h.pwrite(b'third!', 0); h.shutdown(); print('ok')"
                    % (argv, SIZE, 12 * MiB))
            r = subprocess.run(["nbdsh", "-c", code], capture_output=True,
                               text=True, timeout=30, env=xt.nbdsh_env())
            check(r.returncode == 0 and r.stdout.strip() == "ok",
                  "nbdsh -c 'h.connect_command([xnbd-server --inetd ...])': "
                  "rc %d, %r %r" % (r.returncode, r.stdout, r.stderr))
            with open(img, "rb") as f:
                check_eq(f.read(6), b"third!", "image after the nbdsh session")
            # nbdsh's server was nbdsh's child: it must be gone too
            end = time.time() + 5
            while time.time() < end:
                left = [p for p in children_running(img, any_parent=True)
                        if proc_state(p) not in ("Z", None)]
                if not left:
                    break
                time.sleep(0.05)
            for p in left:
                os.kill(p, 9)
            check(not left, "xnbd-server --inetd run by nbdsh still running "
                  "5 s after nbdsh exited: pids %r" % left)

        # ---- 4: --connected-fd: transmission at once, simple replies ----
        a, b = socket.socketpair()
        fd = b.fileno()
        p = subprocess.Popen([xt.SERVER, "--target", "--connected-fd", str(fd),
                              "--logpath", logf, img], pass_fds=(fd,))
        b.close()
        try:
            a.settimeout(10)
            c = xt.RawClient(a)
            err, d = c.read(12 * MiB, 6000)
            check_eq(err, 0, "--connected-fd: read error")
            check_eq(d, b"second" * 1000, "--connected-fd: read data")
            err, _ = c.command(xt.CMD_WRITE, 16 * MiB - 4, 4, data=b"fd!!")
            check_eq(err, 0, "--connected-fd: write error")
            err, d = c.read(16 * MiB - 4, 4)
            check_eq(d, b"fd!!", "--connected-fd: read back")
            c.send_request(xt.CMD_DISC)
            check(xt.is_closed(a, 5), "--connected-fd: not closed after DISC")
            a.close()
            rc = p.wait(5)
        except subprocess.TimeoutExpired:
            xt.fail("xnbd-server --connected-fd still running 5 s after DISC")
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        check_eq(rc, 0, "exit status of xnbd-server --connected-fd")


if __name__ == "__main__":
    xt.main(test)
