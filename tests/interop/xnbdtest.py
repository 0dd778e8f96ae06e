"""Shared helpers for the Python interop tests (run them with /usr/bin/python3).

    import xnbdtest as xt
    nbd = xt.need_nbd()                  # the libnbd module, or exit 77
    with xt.TestDir() as t:              # temp dir, removed at the end
        img = t.image("disk.img", 32 << 20)
        srv = t.server(img)              # xnbd-server --target on 127.0.0.1
        h = srv.connect()                # a connected nbd.NBD handle
        xt.check(cond, "what should hold")

Every server started is stopped by PID when the TestDir closes (and at
interpreter exit, should a test die by an exception).  `xt.main(fn)` runs a
test function, turning failures into exit 1 with a message, skips into 77.
"""
import atexit
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.environ.get("XNBD_SERVER") or os.path.join(
    HERE, "..", "..", "build", "server", "xnbd-server")
BGCTL = os.environ.get("XNBD_BGCTL") or os.path.join(
    HERE, "..", "..", "build", "bgctl", "xnbd-bgctl")
NAME = os.path.basename(sys.argv[0])

MiB = 1 << 20
_SIGTERM = signal.SIGTERM
KiB = 1 << 10


class Skip(Exception):
    pass


class Failure(Exception):
    pass


class SoftFailures(Failure):
    pass


def log(msg):
    print("[%s] %s" % (NAME, msg), file=sys.stderr, flush=True)


def fail(msg):
    raise Failure(msg)


def check(cond, msg):
    if not cond:
        raise Failure(msg)


_soft_failures = []


def expect(cond, msg):
    """A check that does not stop the test: failures are reported together
    at the end (so one bug does not hide the results of later checks)."""
    if not cond:
        log("CHECK FAILED: %s" % msg)
        _soft_failures.append(msg)
    return cond


def expect_eq(actual, expected, what):
    return expect(actual == expected,
                  "%s: expected %r, got %r" % (what, expected, actual))


def check_eq(actual, expected, what):
    if actual != expected:
        raise Failure("%s: expected %r, got %r" % (what, expected, actual))


def need_nbd():
    try:
        import nbd
    except ImportError:
        raise Skip("the Python nbd module (python3-libnbd) is not importable "
                   "by %s" % sys.executable)
    return nbd


LIB_THREADS = ("xnbd-io", "xnbd-snapshot")


def thread_names(pid):
    """The names (comm) of pid's threads other than its main thread."""
    names = []
    for tid in os.listdir("/proc/%d/task" % pid):
        if int(tid) == pid:
            continue
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                names.append(f.read().strip())
        except OSError:
            pass  # it ended meanwhile
    return names


def check_own_threads(pid, what):
    """Every thread of the server but its main one is libxnbd's own: its
    I/O pool (at most 16) or a snapshot's copier; none of libuv's pool,
    which libxnbd does not use (name lookups aside)."""
    names = thread_names(pid)
    others = [n for n in names if n not in LIB_THREADS]
    check(not others, "%s: threads that are not libxnbd's: %s" % (what, others))
    check(names.count("xnbd-io") <= 16,
          "%s: %d I/O threads" % (what, names.count("xnbd-io")))
    counts = {n: names.count(n) for n in set(names)}
    log("%s: threads besides the main one: %s" % (what, ", ".join(
        "%d %s" % (k, n) for n, k in sorted(counts.items())) or "none"))


def need_tools(*tools):
    for t in tools:
        if shutil.which(t) is None:
            raise Skip("%s is not installed" % t)


def nbdsh_env():
    """The environment for running nbdsh: it execs "python3" from PATH,
    which must be one that can import nbd, so put ours first."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def first_diff(a, b):
    """Index of the first differing byte of a and b (or the shorter length)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def check_bytes(actual, expected, what, base=0):
    if bytes(actual) != bytes(expected):
        i = first_diff(actual, expected)
        raise Failure("%s: %d bytes differ from expected; first at offset %d "
                      "(image offset %d): got %r, expected %r"
                      % (what, sum(1 for x, y in zip(actual, expected) if x != y)
                         + abs(len(actual) - len(expected)),
                         i, base + i, bytes(actual[i:i + 8]),
                         bytes(expected[i:i + 8])))


# ---- processes --------------------------------------------------------------

_live = []


def _kill_all():
    for p in list(_live):
        _stop_quietly(p)


atexit.register(_kill_all)


def _stop_quietly(proc):
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            log("pid %d ignored SIGTERM; killing it" % proc.pid)
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
    if proc in _live:
        _live.remove(proc)


def free_port(addr="127.0.0.1"):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def wait_port(addr, port, proc, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((addr, port), 0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class Server:
    """One xnbd-server process listening on addr:port: --target on image,
    or, with mode given, that mode and its arguments (e.g. ["--proxy",
    rhost, rport, cache, bitmap, ctlsock])."""

    def __init__(self, image, args=(), addr="127.0.0.1", logpath=None,
                 tmpdir=None, mode=None, port=None):
        self.image = image
        self.addr = addr
        for attempt in range(5):
            self.port = port or free_port(addr)
            self.log = logpath or os.path.join(
                tmpdir or os.path.dirname(image), "server.%d.log" % self.port)
            tail = list(mode) if mode else ["--target", image]
            self.argv = [SERVER, tail[0], "--laddr", addr,
                         "--lport", str(self.port), "--logpath", self.log
                         ] + list(args) + tail[1:]
            self.proc = subprocess.Popen(self.argv)
            _live.append(self.proc)
            if wait_port(addr, self.port, self.proc):
                self.pid = self.proc.pid
                log("server pid %d on %s port %d" % (self.pid, addr, self.port))
                return
            _stop_quietly(self.proc)
            if "in use" in self.log_text():
                log("port %d was taken meanwhile; retrying" % self.port)
                continue
            fail("server did not start: %s\n%s"
                 % (" ".join(self.argv), self.log_text()))
        fail("no free port after 5 attempts")

    @property
    def host(self):
        return "[%s]" % self.addr if ":" in self.addr else self.addr

    @property
    def uri(self):
        return "nbd://%s:%d/" % (self.host, self.port)

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def connect(self, **kw):
        nbd = need_nbd()
        h = nbd.NBD()
        for k, v in kw.items():
            getattr(h, "set_" + k)(v)
        h.connect_tcp(self.addr, str(self.port))
        return h

    def sock(self, timeout=10):
        return socket.create_connection((self.addr, self.port), timeout)

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=10, sig=_SIGTERM):
        """Send sig (none if None); return the exit status (fails if the
        server is still running timeout seconds later)."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            fail("server pid %d still running %d s after %s"
                 % (self.proc.pid, timeout,
                    signal.Signals(sig).name if sig else "the signal"))
        finally:
            if self.proc in _live:
                _live.remove(self.proc)
        return rc

    def kill(self):
        _stop_quietly(self.proc)


class TestDir:
    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="xnbd-interop.")
        self.servers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for s in self.servers:
            s.kill()
        shutil.rmtree(self.path, ignore_errors=True)

    def join(self, *names):
        return os.path.join(self.path, *names)

    def image(self, name, size, data=None):
        p = self.join(name)
        with open(p, "wb") as f:
            if data is not None:
                f.write(data)
            f.truncate(size)
        return p

    def server(self, image, args=(), addr="127.0.0.1", logpath=None,
               port=None):
        s = Server(image, args, addr, logpath, tmpdir=self.path, port=port)
        self.servers.append(s)
        return s

    def proxy(self, upstream_port, name="p", args=(), upstream_host="127.0.0.1",
              addr="127.0.0.1", port=None):
        """xnbd-server --proxy of upstream_host:upstream_port, with its cache,
        bitmap and control socket named after `name` in this directory."""
        cache, bitmap, ctl = (self.join(name + ".cache"),
                              self.join(name + ".bitmap"),
                              self.join(name + ".ctl"))
        s = Server(cache, args, addr, tmpdir=self.path, port=port,
                   mode=["--proxy", upstream_host, str(upstream_port), cache,
                         bitmap, ctl])
        s.cache, s.bitmap, s.ctl = cache, bitmap, ctl
        self.servers.append(s)
        return s


def bgctl(*args, check_rc=None, timeout=120):
    """Run xnbd-bgctl with args; returns the CompletedProcess (text).  With
    check_rc, fail unless the exit status is that."""
    r = subprocess.run([BGCTL] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=timeout)
    if check_rc is not None and r.returncode != check_rc:
        fail("xnbd-bgctl %s: exit %d, expected %d\nstdout: %s\nstderr: %s"
             % (" ".join(str(a) for a in args), r.returncode, check_rc,
                r.stdout, r.stderr))
    return r


def query(ctl):
    """xnbd-bgctl --query --json, as a dict."""
    import json
    r = bgctl("--query", "--json", ctl, check_rc=0)
    return json.loads(r.stdout)


def main(fn):
    """Run fn(); exit 0 on success, 77 on Skip, 1 on anything else."""
    t0 = time.time()
    try:
        fn()
        if _soft_failures:
            raise SoftFailures("%d check(s) failed:\n  %s" % (
                len(_soft_failures), "\n  ".join(_soft_failures)))
    except Skip as e:
        log("SKIP: %s" % e)
        _kill_all()
        sys.exit(77)
    except Failure as e:
        log("FAIL: %s" % e)
        if not isinstance(e, SoftFailures):
            traceback.print_exc()
        _kill_all()
        sys.exit(1)
    except Exception as e:
        log("FAIL: unexpected %s: %s" % (type(e).__name__, e))
        traceback.print_exc()
        _kill_all()
        sys.exit(1)
    log("PASS (%.1f s)" % (time.time() - t0))
    sys.exit(0)


# ---- raw protocol (no libnbd) -------------------------------------------------

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1
CMD_FLAG_NO_HOLE = 2
CMD_FLAG_DF = 4
CMD_FLAG_REQ_ONE = 8
CMD_FLAG_FAST_ZERO = 16

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

TFLAG_HAS_FLAGS = 1
TFLAG_READ_ONLY = 2


class Closed(Exception):
    """The peer closed the connection (or reset it)."""


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(min(n - len(buf), 4 * MiB))
        except ConnectionResetError:
            raise Closed("connection reset after %d of %d bytes" % (len(buf), n))
        if not chunk:
            raise Closed("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def is_closed(s, timeout=5):
    """True if the peer closes s (EOF or reset) within timeout seconds,
    discarding whatever it sends first."""
    s.settimeout(timeout)
    end = time.time() + timeout
    try:
        while time.time() < end:
            d = s.recv(65536)
            if not d:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


class RawClient:
    """A hand-written NBD client over a plain socket."""

    def __init__(self, sock):
        self.s = sock
        self.structured = False
        self.size = None
        self.tflags = None
        self.next_cookie = 1

    # -- handshake --
    def greeting(self):
        magic, = struct.unpack(">Q", recv_exact(self.s, 8))
        check_eq(hex(magic), hex(NBDMAGIC), "greeting NBDMAGIC")
        opt, hflags = struct.unpack(">QH", recv_exact(self.s, 10))
        check_eq(hex(opt), hex(IHAVEOPT), "greeting IHAVEOPT")
        return hflags

    def send_client_flags(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        self.s.sendall(struct.pack(">I", flags))
        self.no_zeroes = bool(flags & FLAG_NO_ZEROES)

    def send_option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def read_option_reply(self, expect_opt=None):
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(self.s, 20))
        check_eq(hex(magic), hex(REPLY_MAGIC), "option reply magic")
        if expect_opt is not None:
            check_eq(opt, expect_opt, "option echoed in option reply")
        data = recv_exact(self.s, length) if length else b""
        return rtype, data

    def option(self, opt, data=b""):
        """Send an option and collect replies up to the final one; return
        [(type, data)...]."""
        self.send_option(opt, data)
        replies = []
        while True:
            rtype, rdata = self.read_option_reply(opt)
            replies.append((rtype, rdata))
            if rtype == REP_ACK or rtype & (1 << 31):
                return replies
            if opt in (OPT_INFO, OPT_GO) and rtype != REP_INFO:
                fail("unexpected reply type %#x to option %d" % (rtype, opt))

    def go(self, name=b""):
        replies = self.option(OPT_GO, struct.pack(">I", len(name)) + name +
                              struct.pack(">H", 0))
        rtype, _ = replies[-1]
        check_eq(hex(rtype), hex(REP_ACK), "final reply to NBD_OPT_GO")
        for t, d in replies[:-1]:
            if t == REP_INFO and len(d) >= 2 and \
                    struct.unpack(">H", d[:2])[0] == INFO_EXPORT:
                self.size, self.tflags = struct.unpack(">QH", d[2:12])
        check(self.size is not None, "NBD_OPT_GO gave no NBD_INFO_EXPORT")
        return replies

    def handshake(self, structured=False):
        hflags = self.greeting()
        check(hflags & FLAG_FIXED_NEWSTYLE,
              "server does not offer fixed newstyle (flags %#x)" % hflags)
        self.send_client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        if structured:
            r = self.option(OPT_STRUCTURED_REPLY)
            check_eq(r[-1][0], REP_ACK, "reply to NBD_OPT_STRUCTURED_REPLY")
            self.structured = True
        self.go()
        return self

    # -- transmission --
    def send_request(self, cmd, offset=0, length=0, flags=0, data=None,
                     cookie=None, magic=REQUEST_MAGIC):
        if cookie is None:
            cookie = self.next_cookie
            self.next_cookie += 1
        hdr = struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
        if data is not None:
            self.s.sendall(hdr + data if len(data) < 1 * MiB else hdr)
            if len(data) >= 1 * MiB:
                self.s.sendall(data)
        else:
            self.s.sendall(hdr)
        return cookie

    def read_reply(self, read_lengths=None):
        """Read one reply (simple) or one chunk (structured).

        read_lengths maps cookie -> length of data a simple reply to a read
        carries.  Returns a dict: kind ('simple' or 'chunk'), cookie, error,
        and for chunks flags, type, payload; for simple reads data."""
        magic, = struct.unpack(">I", recv_exact(self.s, 4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", recv_exact(self.s, 12))
            r = {"kind": "simple", "cookie": cookie, "error": error}
            if error == 0 and read_lengths and cookie in read_lengths:
                r["data"] = recv_exact(self.s, read_lengths[cookie])
            return r
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, cookie, length = struct.unpack(
                ">HHQI", recv_exact(self.s, 16))
            payload = recv_exact(self.s, length) if length else b""
            r = {"kind": "chunk", "cookie": cookie, "flags": flags,
                 "type": rtype, "payload": payload, "error": 0}
            if rtype & (1 << 15):
                r["error"], = struct.unpack(">I", payload[:4])
            return r
        fail("bad reply magic %#x" % magic)

    def reply_for(self, cookie, read_len=None):
        """Read replies until the final one for cookie; return
        (error, data-or-chunks).  Fails on a reply for another cookie."""
        chunks = []
        while True:
            r = self.read_reply({cookie: read_len} if read_len else None)
            check_eq(r["cookie"], cookie, "cookie of reply")
            if r["kind"] == "simple":
                return r["error"], r.get("data")
            chunks.append(r)
            if r["flags"] & REPLY_FLAG_DONE:
                err = 0
                for c in chunks:
                    if c["error"]:
                        err = c["error"]
                return err, chunks

    def command(self, cmd, offset=0, length=0, flags=0, data=None):
        read_len = length if cmd == CMD_READ else None
        c = self.send_request(cmd, offset, length, flags, data)
        return self.reply_for(c, read_len)

    def read(self, offset, length, flags=0):
        """Read; returns (error, bytes) assembling structured chunks."""
        err, res = self.command(CMD_READ, offset, length, flags)
        if not self.structured or err:
            return err, res
        buf = bytearray(length)
        for c in res:
            if c["type"] == REPLY_TYPE_OFFSET_DATA:
                off, = struct.unpack(">Q", c["payload"][:8])
                d = c["payload"][8:]
                buf[off - offset:off - offset + len(d)] = d
            elif c["type"] == REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", c["payload"][:12])
                buf[off - offset:off - offset + n] = bytes(n)
        return err, bytes(buf)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


# ---- other processes -----------------------------------------------------------


def track(proc):
    """Have a subprocess.Popen (a peer server, say) stopped by PID when the
    test ends, as the servers are; returns it."""
    _live.append(proc)
    return proc


def stop_process(proc):
    """SIGTERM a tracked process (SIGKILL 5 s later) and reap it."""
    _stop_quietly(proc)
