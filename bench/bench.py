#!/usr/bin/python3
"""Side-by-side benchmark of xnbd-server against nbdkit, qemu-nbd and
nbd-server on one image, over loopback.

Runs are interleaved, each starting with the next server (A B C D, B C D A,
...), so drift and the cost of fresh memory hit every server alike.
For each row it prints the median (min-max) of each server, the ratio of
xnbd-server to the best peer, and the work done per server CPU-second
(server CPU = utime+stime of the server and its reaped children, from
/proc/PID/stat before and after the run), and how much of one core the
client (fio, nbdcopy) used meanwhile (its rusage over the wall time): fio
runs one thread, so near 100% the client, not the server, is the bound.

    bench/bench.py [--short] [--runs N] [--size 1G] [--rows a,b,...]

--short is the CI smoke form: a second or two a row, one run; it asserts
nothing about speed.
"""
import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Cold proxy mode: sequential rows pass over the image once, not for a
# time: a second pass would read what the first one cached.
ONE_PASS = False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen on %d" % port)


def page_cache_drops():
    """How often the page cache was dropped (drop_caches) since boot."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("drop_pagecache "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tcp_congestion():
    """The system's TCP congestion control.  It decides the peers' costs on
    loopback: bbr paces every connection, with an hrtimer a segment where
    no qdisc paces for it (lo has none), while xnbd-server's listeners on
    loopback do not pace (since 2026-12-06, thirteenth session)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def idle_polling():
    """How long an idle vCPU of this guest polls before it halts, from the
    haltpoll cpuidle governor (None where the machine has none).  Where it
    does not poll, every wake-up of a task on the other, idle vCPU takes an
    exit to the host and back: round trips at depth 1 are made of two such
    wake-ups (fourteenth session, 2026-12-06)."""
    base = "/sys/devices/system/cpu/cpuidle/"
    try:
        for name in ("current_governor", "current_governor_ro"):
            if os.path.exists(base + name):
                with open(base + name) as f:
                    if f.read().strip() != "haltpoll":
                        return None
                break
        with open("/sys/module/haltpoll/parameters/guest_halt_poll_ns") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def warm_memory(mib):
    """Touch mib MiB of fresh anonymous memory, then free it.  On a VM whose
    balloon takes free memory back (free page reporting), the first touch
    of a page the host took back faults on the host: writing 1 GiB into new
    page cache then runs at a tenth of its speed, and whichever server runs
    first after a pause pays for it.  Memory freed just before a run is
    still the guest's while the run takes it (reporting waits 2 s), so
    every server starts alike.  Returns the seconds it took."""
    if mib <= 0:
        return 0.0
    import mmap
    t0 = time.monotonic()
    n = mib << 20
    m = mmap.mmap(-1, n)
    for i in range(0, n, 4096):
        m[i] = 1
    m.close()
    return time.monotonic() - t0


def cpu_seconds(pid):
    """utime+stime of the process and its reaped children, in seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11.
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return (ut + st + cut + cst) / CLK_TCK


def machine_cpu():
    """CPU-seconds the whole machine has spent busy, on all cores (from
    /proc/stat: user, nice, system, irq and softirq; not idle, iowait or
    the host's steal).  Work per machine CPU-second counts what a server
    costs wherever the kernel charges it: over loopback, a sender's
    transmit may run in the receiver's ACK processing or the other way
    round, which moves CPU between server and client but not out of the
    machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK


def has_children(pid):
    """Has the process children (alive or not yet reaped)?"""
    try:
        for t in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, t)) as f:
                if f.read().split():
                    return True
    except OSError:
        pass
    return False


def children_cpu():
    """CPU-seconds of this process's reaped children: the client runs as
    one, and servers are reaped only after the measurement."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def tree_rss_kib(pid):
    """RSS of a process and all its descendants (nbd-server forks one
    process per client)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for t in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


class Server:
    def __init__(self, name, image, workdir, xnbd, mode="target"):
        self.mode = mode
        self.name = name
        self.image = image
        self.workdir = workdir
        self.xnbd = xnbd
        self.proc = None
        self.port = None
        self.pid = None
        self.pidfile = None
        self.floor = None
        self.proxy_peers = "caching"
        self.size = None  # the image's, for a floor's new file

    def argv(self, port, extra):
        img = self.image
        cow = self.mode == "cow"
        if self.mode.startswith("proxy"):
            return self.proxy_argv(port, extra)
        if self.name == "floor":
            return [self.floor, str(port), img]
        if self.name == "loop-floor":
            return [self.floor, "--loop"] + (["--cow"] if cow else []) + \
                [str(port), img]
        if self.name == "xnbd-server":
            return [self.xnbd, "--cow-target" if cow else "--target",
                    "--laddr", "127.0.0.1", "--lport", str(port)] + extra + [img]
        if self.name == "nbdkit":
            return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                    "-p", str(port)] + (["--filter=cow"] if cow else []) + \
                ["file", img]
        if self.name == "qemu-nbd":
            return ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port),
                    "-t", "-e", "64", "--cache=writeback", "--aio=threads"] + \
                (["--snapshot"] if cow else []) + [img]
        if self.name == "nbd-server":
            conf = os.path.join(self.workdir, "nbd-server.conf")
            with open(conf, "w") as f:
                f.write("[generic]\nlistenaddr = 127.0.0.1\nport = %d\n"
                        "allowlist = true\n[bench]\nexportname = %s\n"
                        "flush = true\nfua = true\ntrim = true\n"
                        "copyonwrite = %s\n" %
                        (port, img, "true" if self.mode == "cow" else "false"))
            # nbd-server forks one process per client and, in its -d debug
            # mode, serves only one client: let it daemonize, and follow it
            # through its pid file.
            self.pidfile = os.path.join(self.workdir, "nbd-server.pid")
            if os.path.exists(self.pidfile):
                os.unlink(self.pidfile)
            return ["nbd-server", "-C", conf, "-p", self.pidfile]
        raise ValueError(self.name)

    def proxy_argv(self, port, extra):
        """A caching proxy of the upstream at self.upstream (a port), with a
        fresh cache each start."""
        up = str(self.upstream)
        cache = os.path.join(self.workdir, "proxy.cache")
        for f in (cache, cache + ".bitmap", cache + ".ctl"):
            if os.path.exists(f):
                os.unlink(f)
        if self.name == "relay-floor":
            return [self.floor, "--relay", str(port), up]
        if self.name == "cache-floor":
            return [self.floor, "--cache", str(port), up, cache]
        if self.name == "cache-floor-st":
            # The same with its group commit on a thread of its own,
            # beside its clients, as xnbd-server's worker makes it (since
            # 2026-12-06, fifteenth session); env execs it: the same pid.
            return ["env", "FLOOR_SYNC_THREAD=1", self.floor, "--cache",
                    str(port), up, cache]
        if self.name == "loop-floor":
            # Rows that only write: the least a server keeping writes in a
            # local file does (a cold proxy's writes of whole blocks need
            # no fetch), serving a new file as a cold cache is.
            # Allocated beforehand (since 2026-12-06, twelfth session), as
            # xnbd-server allocates its cache ahead of its writes: writes
            # into a sparse file's holes took twice the CPU here.
            with open(cache, "wb") as f:
                f.truncate(self.size)
                os.posix_fallocate(f.fileno(), 0, self.size)
            return [self.floor, "--loop", str(port), cache]
        if self.name == "xnbd-server":
            return [self.xnbd, "--proxy", "--laddr", "127.0.0.1", "--lport",
                    str(port)] + extra + ["127.0.0.1", up, cache,
                                          cache + ".bitmap", cache + ".ctl"]
        relay = self.proxy_peers == "relay"
        if self.name == "nbdkit":
            # The cache filter keeps blocks in a temporary file (in
            # $TMPDIR, else /var/tmp); by default only those written:
            # cache-on-read=true makes it keep what it fetches as well.
            return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                    "-p", str(port), "--filter=cache", "nbd",
                    "hostname=127.0.0.1", "port=" + up] + \
                ([] if relay else ["cache-on-read=true"])
        if self.name == "qemu-nbd" and relay:
            # A plain pass-through of the upstream: it keeps nothing.
            return ["qemu-nbd", "-b", "127.0.0.1", "-p", str(port), "-t",
                    "-e", "64", "--image-opts",
                    "driver=nbd,server.type=inet,server.host=127.0.0.1,"
                    "server.port=" + up]
        if self.name == "qemu-nbd":
            # qemu's caching proxy: a qcow2 overlay whose backing file is
            # the upstream, under the copy-on-read filter, so that a read
            # of a cluster the overlay lacks fetches it and writes it into
            # the overlay (writes stay there too).
            overlay = os.path.join(self.workdir, "proxy.qcow2")
            if os.path.exists(overlay):
                os.unlink(overlay)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            "-F", "raw", "-b", "nbd://127.0.0.1:" + up,
                            overlay], check=True)
            return ["qemu-nbd", "-b", "127.0.0.1", "-p", str(port), "-t",
                    "-e", "64", "--cache=writeback", "--aio=threads",
                    "--image-opts",
                    "driver=copy-on-read,file.driver=qcow2,"
                    "file.file.driver=file,file.file.filename=" + overlay]
        raise ValueError(self.name)

    def uri(self):
        name = "bench" if self.name == "nbd-server" else ""
        return "nbd://127.0.0.1:%d/%s" % (self.port, name)

    def start(self, extra=()):
        if self.name == "upstream":
            # The proxies' upstream itself, read directly: nothing to start.
            self.port, self.pid = self.upstream_srv.port, self.upstream_srv.pid
            return
        self.port = free_port()
        self.proc = subprocess.Popen(self.argv(self.port, list(extra)),
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if self.pidfile:
            self.proc.wait(10)
            end = time.time() + 10
            while not (os.path.exists(self.pidfile) and
                       open(self.pidfile).read().strip()):
                if time.time() > end:
                    raise RuntimeError("nbd-server wrote no pid file")
                time.sleep(0.05)
            self.pid = int(open(self.pidfile).read())
            self.proc = None
            wait_port(self.port, None)
        else:
            self.pid = self.proc.pid
            wait_port(self.port, self.proc)

    def stop(self):
        if self.name == "upstream":
            return
        if self.proc is None and self.pid:
            try:
                os.kill(self.pid, signal.SIGTERM)
                end = time.time() + 10
                while time.time() < end:
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
            self.pid = None
            return
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# Not servers to compare with but measures of the machine: the upstream of
# the proxies read directly, their cache's disk, the four floors
# (floor_server.c) and the kernel's own I/O on the image.
FLOORS = ("floor", "loop-floor", "relay-floor", "cache-floor",
          "cache-floor-st")
YARDSTICKS = ("upstream", "disk") + FLOORS + ("kernel",)


def available_servers(xnbd):
    out = []
    for name, tool in (("xnbd-server", xnbd), ("nbdkit", "nbdkit"),
                       ("qemu-nbd", "qemu-nbd"), ("nbd-server", "nbd-server"),
                       ("floor", "cc"), ("loop-floor", "cc"),
                       ("relay-floor", "cc"), ("cache-floor", "cc"),
                       ("cache-floor-st", "cc"), ("kernel", "fio")):
        if shutil.which(tool) or os.path.exists(tool):
            out.append(name)
    return out


def build_floor(work):
    """floor_server.c, built for this run: the least a server can do per
    request (see its head).  Not a peer: a yardstick."""
    out = os.path.join(work, "floor_server")
    subprocess.run(["cc", "-O2", "-pthread", "-o", out,
                    os.path.join(HERE, "floor_server.c"), "-luring"],
                   check=True)
    return out


def fio_secs(job):
    return max(job["read"]["runtime"], job["write"]["runtime"]) / 1000.0


def fio_result(job, bs):
    """(value, unit, work done) of a fio job: IOPS and requests for 4 KiB
    rows, MiB/s and MiB for the others."""
    secs = max(fio_secs(job), 1e-3)
    if bs == "4k":
        ops = job["read"]["total_ios"] + job["write"]["total_ios"]
        return ops / secs, "IOPS", ops
    mib = (job["read"]["io_bytes"] + job["write"]["io_bytes"]) / 2**20
    return mib / secs, "MiB/s", mib


# Each row: a name, what it measures, and how to run it against a URI.
def fio_row(name, rw, bs, depth, jobs=1, mix=None):
    def run(uri, runtime, size):
        cmd = ["fio", "--name=b", "--ioengine=nbd", "--uri=" + uri,
               "--rw=" + rw, "--bs=" + bs, "--iodepth=%d" % depth,
               "--numjobs=%d" % jobs, "--group_reporting",
               "--size=%d" % size, "--output-format=json"]
        if not (ONE_PASS and rw in ("read", "write")):
            cmd += ["--time_based", "--runtime=%g" % runtime]
        if mix is not None:
            cmd.append("--rwmixread=%d" % mix)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
        # fio's own account of its job's CPU over the job's run time,
        # without its start and its connection.
        client = (job["usr_cpu"] + job["sys_cpu"]) / 100.0
        return fio_result(job, bs) + (client,)

    def kernel(image, runtime, size):
        """The same I/O made straight on the image by one fio thread with
        pread/pwrite: what the kernel alone costs.  Returns the value, its
        unit, the work done and the CPU-seconds fio spent."""
        # --invalidate=0: fio would drop the image's page cache first, and
        # both the yardstick and the servers after it would write into
        # small new folios instead of the large ones the image has.
        cmd = ["fio", "--name=k", "--ioengine=psync", "--invalidate=0",
               "--filename=" + image,
               "--rw=" + rw, "--bs=" + bs, "--size=%d" % size,
               "--time_based", "--runtime=%g" % runtime,
               "--output-format=json"]
        if mix is not None:
            cmd.append("--rwmixread=%d" % mix)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
        cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * fio_secs(job)
        return fio_result(job, bs) + (cpu,)
    run.one_thread = jobs == 1
    # A cold proxy's sequential read stores every block it fetches: the
    # cache's disk is measured beside it, with fio's writes of the row's
    # size at its depth (disk_write).
    run.disk = ("1m", 8) if rw == "read" and bs == "1m" else None
    # The kernel yardstick runs for rows that write: there the file
    # system's own cost per request is a large share of any server's.  In
    # rows that only write, its throughput bounds every server's too: the
    # file system makes buffered writes to one file one at a time (under
    # the inode's lock), whoever makes them.
    if rw in ("write", "randwrite", "randrw"):
        run.kernel = kernel
        run.kernel_caps = rw != "randrw"
    run.writes_only = rw in ("write", "randwrite")
    return name, run


def nbdcopy_row(name, conns):
    def run(uri, runtime, size):
        # Whole-image copies one after the other for the row's time (one
        # in cold proxy mode: a second would read what the first cached).
        # One copy of 1 GiB takes about 0.4 s and 0.3 server CPU-seconds,
        # which /proc counts in ticks of 10 ms: a single copy's work per
        # CPU-second would move by 3% a tick.
        t0 = time.monotonic()
        copies = 0
        while True:
            subprocess.run(["nbdcopy", "-C", str(conns), "-T", str(conns),
                            uri, "null:"], check=True, capture_output=True)
            copies += 1
            if ONE_PASS or time.monotonic() - t0 >= runtime:
                break
        mib = copies * size / 2**20
        return mib / (time.monotonic() - t0), "MiB/s", mib
    # The blocking floor serves one connection at a time and does not
    # offer multi-conn: nbdcopy would fall back to one, which is another
    # row.  The loop floor serves each connection on a thread of its own.
    run.single_conn = conns == 1
    # Through a cold proxy every block is stored: the cache's disk beside
    # it, at nbdcopy's request size (256 KiB).
    run.disk = ("256k", 16)
    # With one connection and one thread (-C 1 -T 1) nbdcopy's I/O runs
    # in one worker thread (its main thread waits): a one-thread client.
    run.one_thread = conns == 1
    return name, run


def disk_write(workdir, size, bs, depth):
    """Proxy modes' `disk` yardstick: what the proxies' cache's disk takes,
    one pass of O_DIRECT writes of bs at depth `depth` into a new file
    (which fio allocates first) beside the cache, as xnbd-server stores
    large fetches: 1 MiB at depth 8 for fio's 1 MiB reads and the fill;
    256 KiB (nbdcopy's requests) at depth 16 (the threads of xnbd-server's
    pool) for the copies.  Returns MiB/s, the unit, the MiB written and
    fio's CPU-seconds."""
    probe = os.path.join(workdir, "disk.probe")
    if os.path.exists(probe):
        os.unlink(probe)
    try:
        out = subprocess.run(
            ["fio", "--name=d", "--ioengine=libaio", "--direct=1",
             "--rw=write", "--bs=" + bs, "--iodepth=%d" % depth,
             "--size=%d" % size,
             "--filename=" + probe, "--output-format=json"],
            check=True, capture_output=True, text=True)
    finally:
        if os.path.exists(probe):
            os.unlink(probe)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    mib = job["write"]["io_bytes"] / 2**20
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * fio_secs(job)
    return mib / max(fio_secs(job), 1e-3), "MiB/s", mib, cpu


def fill_row(name):
    """Proxy modes: fill the whole cache.  xnbd-server by `xnbd-bgctl
    --cache-all`; the peers' proxies by reading every block through them
    (nbdcopy to null:, which fills their caches); `upstream` is
    nbdcopy straight from the upstream, the yardstick of the target."""
    def run(uri, runtime, size, srv):
        t0 = time.monotonic()
        if srv.name == "xnbd-server":
            ctl = os.path.join(srv.workdir, "proxy.cache.ctl")
            subprocess.run([srv.bgctl, "--cache-all", ctl], check=True,
                           capture_output=True)
        else:
            subprocess.run(["nbdcopy", uri, "null:"], check=True,
                           capture_output=True)
        mib = size / 2**20
        return mib / (time.monotonic() - t0), "MiB/s", mib
    run.with_server = True
    run.proxy_only = True
    run.cold_only = True  # a warm proxy holds every block: nothing to fill
    run.disk = ("1m", 8)
    return name, run


def memory_row(name, extra):
    """Peak RSS of the server while a client floods 1 MiB writes at depth
    128; `extra` are xnbd-server options (peers run without them)."""
    def run(uri, runtime, size, srv):
        fio = subprocess.Popen(["fio", "--name=m", "--ioengine=nbd",
                                "--uri=" + uri, "--rw=write", "--bs=1m",
                                "--iodepth=128", "--time_based",
                                "--runtime=%g" % runtime, "--size=%d" % size,
                                "--output-format=json"],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        peak = 0
        while fio.poll() is None:
            peak = max(peak, tree_rss_kib(srv.pid))
            time.sleep(0.02)
        if fio.returncode:
            raise RuntimeError("fio failed")
        return peak / 1024.0, "MiB peak RSS", 0
    run.extra = extra
    run.memory = True
    run.with_server = True
    return name, run


ROWS = dict([
    fio_row("seq-read-1M-qd8", "read", "1m", 8),
    fio_row("seq-write-1M-qd8", "write", "1m", 8),
    fio_row("rand-read-4K-qd1", "randread", "4k", 1),
    fio_row("rand-read-4K-qd32", "randread", "4k", 32),
    fio_row("rand-write-4K-qd32", "randwrite", "4k", 32),
    fio_row("rand-rw70-4K-qd32", "randrw", "4k", 32, mix=70),
    nbdcopy_row("nbdcopy-null-1conn", 1),
    nbdcopy_row("nbdcopy-null-4conn", 4),
    fill_row("fill-cache-whole-image"),
    memory_row("mem-flood-1M-qd128", []),
    memory_row("mem-flood-1M-qd128-maxbuf64M", ["--max-buf-size", "64M"]),
])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--runtime", type=float, default=None)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rows", default=None,
                    help="comma-separated rows (default: all of the mode)")
    ap.add_argument("--servers", default=None)
    ap.add_argument("--mode", choices=["target", "cow", "proxy", "proxy-warm"],
                    default="target",
                    help="serve the image plainly, through a CoW layer, or "
                    "as a caching proxy of an xnbd-server --target upstream "
                    "(proxy: cold cache; proxy-warm: the whole image read "
                    "through the proxy first, and xnbd-server's cache file "
                    "read into the page cache)")
    ap.add_argument("--xnbd", default=os.path.join(HERE, "..", "build",
                                                   "server", "xnbd-server"))
    ap.add_argument("--bgctl", default=None,
                    help="xnbd-bgctl (default: next to --xnbd's build)")
    ap.add_argument("--proxy-peers", choices=["caching", "relay"],
                    default="caching",
                    help="in the proxy modes, run the peers as caching "
                    "proxies that keep what they fetch (nbdkit's cache "
                    "filter with cache-on-read=true; qemu-nbd with "
                    "copy-on-read into a qcow2 overlay backed by the "
                    "upstream), or as pass-throughs that keep nothing "
                    "(the cache filter's default, which keeps only "
                    "writes; qemu-nbd over an nbd blockdev)")
    ap.add_argument("--warm-pages", action="store_true",
                    help="proxy-warm: read xnbd-server's cache file into "
                    "the page cache a page at a time, readahead off (small "
                    "folios), instead of with cat (large folios)")
    ap.add_argument("--warm-memory", type=int, default=None, metavar="MiB",
                    help="touch and free this much fresh memory before each "
                    "run (default: the image's size and 3072 MiB more in "
                    "the cow and proxy modes, whose runs fill new page "
                    "cache; 0 elsewhere and with --short)")
    args = ap.parse_args()
    bgctl = args.bgctl or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(args.xnbd))), "bgctl",
        "xnbd-bgctl")
    runs = args.runs or (1 if args.short else 5)
    runtime = args.runtime or (1.0 if args.short else 8.0)
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    size = int(args.size[:-1]) * mult[args.size[-1]] if args.size[-1] in mult \
        else int(args.size)
    if args.short:
        size = min(size, 256 * 2**20)
    warm = args.warm_memory
    if warm is None:
        # The image's size and 3 GiB more since 2026-12-06 (twelfth
        # session): with 512 MiB more, the cold proxy's sequential writes
        # still ran at half speed now and then, for every server.
        warm = 0 if args.short or args.mode == "target" else \
            (size >> 20) + 3072

    servers = args.servers.split(",") if args.servers else \
        available_servers(args.xnbd)
    proxy = args.mode.startswith("proxy")
    global ONE_PASS
    ONE_PASS = args.mode == "proxy"
    # The blocking floor serves its image plainly and the kernel yardstick
    # writes the image itself; the loop floor has a CoW layer (--cow) and
    # serves a cold proxy's rows that only write (into a new file: the
    # least a proxy keeping writes does); the relay floor forwards
    # everything to an upstream, and the cache floor stores what it
    # fetches: the two ends of what a cold proxy does with reads (a warm
    # one holds the data).
    keep = {"target": ("floor", "loop-floor", "kernel"),
            "cow": ("loop-floor",),
            "proxy": ("relay-floor", "cache-floor", "cache-floor-st",
                      "loop-floor"),
            "proxy-warm": ()}[args.mode]
    servers = [n for n in servers
               if n not in FLOORS + ("kernel",) or n in keep]
    if proxy:
        servers = [n for n in servers if n != "nbd-server"]  # cannot proxy
        servers.append("upstream")
        if args.mode == "proxy":
            servers.append("disk")
    rows = [r for r in args.rows.split(",") if r] if args.rows else \
        [r for r in ROWS
         if (proxy or not getattr(ROWS[r], "proxy_only", False)) and
         (args.mode == "proxy" or not getattr(ROWS[r], "cold_only", False))]
    for r in rows:
        if r not in ROWS:
            ap.error("unknown row %s (rows: %s)" % (r, ",".join(ROWS)))
        if getattr(ROWS[r], "proxy_only", False) and not proxy:
            ap.error("row %s needs --mode proxy" % r)
        if getattr(ROWS[r], "cold_only", False) and args.mode != "proxy":
            ap.error("row %s needs --mode proxy (a warm cache is full)" % r)
    work = tempfile.mkdtemp(prefix="xnbd-bench-")
    try:
        image = os.path.join(work, "bench.img")
        with open(image, "wb") as f:
            block = os.urandom(2**20)
            for _ in range(size // 2**20):
                f.write(block)
        subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)
        floor = build_floor(work) if set(FLOORS) & set(servers) else None
        upstream = None
        if proxy:
            upstream = Server("xnbd-server", image, work, args.xnbd, "target")
            upstream.start()
        results = {}  # (row, server) ->
        # [(value, unit, per CPU-s, client, per machine CPU-s or None)]
        warmed = [page_cache_drops()]
        redone = [0]

        def measure(fn, name, row, i):
            """One run of row with server name: (value, unit, work per
            server CPU-s, client's share of a core, work per machine
            CPU-s or None for the yardsticks that are no server)."""
            with_server = getattr(fn, "with_server", False)
            extra = getattr(fn, "extra", [])
            if name == "kernel":
                value, unit, amount, cpu = fn.kernel(image, runtime, size)
                print("# %s run %d kernel: %.0f %s, fio CPU %.2fs" %
                      (row, i + 1, value, unit, cpu),
                      file=sys.stderr, flush=True)
                return (value, unit, amount / max(cpu, 1e-3), 0.0, None)
            if name == "disk":
                value, unit, amount, cpu = disk_write(work, size, *fn.disk)
                print("# %s run %d disk: %.0f %s, fio CPU %.2fs" %
                      (row, i + 1, value, unit, cpu),
                      file=sys.stderr, flush=True)
                return (value, unit, amount / max(cpu, 1e-3), 0.0, None)
            srv = Server(name, image, work, args.xnbd, args.mode)
            srv.upstream = upstream.port if upstream else None
            srv.proxy_peers = args.proxy_peers
            srv.upstream_srv = upstream
            srv.bgctl = bgctl
            srv.floor = floor
            srv.size = size
            srv.start(extra if name == "xnbd-server" else ())
            try:
                time.sleep(0.1)
                if args.mode == "proxy-warm" and name != "upstream":
                    subprocess.run(["nbdcopy", srv.uri(), "null:"],
                                   check=True)
                    if name == "xnbd-server":
                        # Fetched blocks were stored past the page cache
                        # (O_DIRECT); put them in it, as the upstream's
                        # image is.  (Read ahead, they come in as large
                        # folios: see README.md, eighth session, for what
                        # that does to 4 KiB writes, and --warm-pages.)
                        cmd = ["cat", os.path.join(work, "proxy.cache")]
                        if args.warm_pages:
                            cmd = ["fio", "--name=warm", "--ioengine=psync",
                                   "--rw=read", "--bs=4k", "--invalidate=0",
                                   "--fadvise_hint=random",
                                   "--size=%d" % size, "--filename=" +
                                   os.path.join(work, "proxy.cache")]
                        subprocess.run(cmd, stdout=subprocess.DEVNULL,
                                       check=True)
                c0, m0 = cpu_seconds(srv.pid), machine_cpu()
                k0, t0 = children_cpu(), time.monotonic()
                if with_server:
                    got = fn(srv.uri(), runtime, size, srv)
                else:
                    got = fn(srv.uri(), runtime, size)
                value, unit, amount = got[:3]
                client = got[3] if len(got) > 3 else \
                    (children_cpu() - k0) / max(time.monotonic() - t0, 1e-3)
                # Let forked children (nbd-server's, one a client) end
                # and be reaped, so that their CPU is counted: a CoW
                # child may take seconds to drop its overlay.
                time.sleep(0.2)
                end = time.monotonic() + 10
                while has_children(srv.pid) and time.monotonic() < end:
                    time.sleep(0.05)
                c1, m1 = cpu_seconds(srv.pid), machine_cpu()
            finally:
                srv.stop()
            print("# %s run %d %s: %.0f %s, server CPU %.2fs, "
                  "client %.0f%% of a core, machine CPU %.2fs" %
                  (row, i + 1, name, value, unit, c1 - c0, 100 * client,
                   m1 - m0), file=sys.stderr, flush=True)
            return (value, unit, amount / max(c1 - c0, 1e-3), client,
                    amount / max(m1 - m0, 1e-3))

        for row in rows:
            for i in range(runs):
                fn = ROWS[row]
                memory = getattr(fn, "memory", False)
                # Each run starts with the next server (A B C, B C A, ...):
                # whoever runs first after a pause gets fresh memory, which
                # costs more on a virtual machine (see README.md).
                for name in servers[i % len(servers):] + \
                        servers[:i % len(servers)]:
                    extra = getattr(fn, "extra", [])
                    if extra and name != "xnbd-server":
                        continue  # the option is ours alone
                    if name in YARDSTICKS and memory:
                        continue  # the proxies' memory, not the upstream's
                    # The relay floor passes multi-conn through from
                    # the upstream (since 2026-12-06) and serves the
                    # copies with several connections and the fill; the
                    # cache floor serves each connection on a thread of
                    # its own since the fifteenth session (2026-12-06).
                    if name == "floor" and \
                            getattr(fn, "single_conn", True) is False:
                        continue  # it serves one connection at a time
                    if name.startswith("cache-floor") and \
                            getattr(fn, "proxy_only", False):
                        continue  # the fill opens several connections
                    if name == "loop-floor" and proxy and \
                            not getattr(fn, "writes_only", False):
                        continue  # it holds no upstream's data
                    if name == "kernel" and not hasattr(fn, "kernel"):
                        continue
                    if name == "disk" and not getattr(fn, "disk", False):
                        continue
                    # The host may drop the guest's page cache (Firecracker
                    # does, through drop_caches): a run during which that
                    # happened measured the disk, not the server, and is
                    # made again on an image read back into the cache.
                    for attempt in (1, 2):
                        d0 = page_cache_drops()
                        if d0 != warmed[0]:
                            subprocess.run(["cat", image],
                                           stdout=subprocess.DEVNULL,
                                           check=True)
                            warmed[0] = d0
                        if not memory:
                            took = warm_memory(warm)
                            if took > 3:
                                print("# %d MiB of memory warmed in %.1fs: "
                                      "the host had taken it back"
                                      % (warm, took), file=sys.stderr,
                                      flush=True)
                        got = measure(fn, name, row, i)
                        if page_cache_drops() == d0 or attempt == 2:
                            break
                        redone[0] += 1
                        print("# %s run %d %s: the page cache was dropped "
                              "during the run; once more" % (row, i + 1, name),
                              file=sys.stderr, flush=True)
                    results.setdefault((row, name), []).append(got)
        poll = idle_polling()
        print("Mode: %s; image %d MiB in page cache; %d run(s) of %gs a row; "
              "%s%s" % (args.mode, size >> 20, runs, runtime,
                        time.strftime("%Y-%m-%d"),
                        "; %d MiB of memory warmed before each run" % warm
                        if warm else "") +
              ("; the peers as %s" % ("caching proxies"
                                      if args.proxy_peers == "caching"
                                      else "pass-throughs")
               if proxy else "") +
              ("; xnbd-server's cache read back a page at a time"
               if args.warm_pages and args.mode == "proxy-warm" else "") +
              "; TCP congestion control %s" % tcp_congestion() +
              ("; idle vCPUs poll %d us before they halt" % (poll // 1000)
               if poll is not None else ""))
        report(rows, servers, results, runtime)
        if redone[0]:
            print("\n%d run(s) made again: the host dropped the page cache "
                  "(/proc/vmstat drop_pagecache) while they ran." % redone[0])
    finally:
        if upstream:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


def report(rows, servers, results, runtime):
    """The table.  Beside the ratios: the client's use of one core with
    xnbd-server and with the best peer (medians), and for one-thread
    clients the ceiling: xnbd-server's median scaled to a client using its
    whole core, over the best peer's.  A ceiling under a target says the
    client bounds the row there, however fast the server."""
    # The columns after the client-bound ceiling: one for each yardstick
    # that ran (the key its value has in a row's `extra` below).
    extra_cols = [(key, title) for key, title in (
        ("upstream", "xnbd / upstream read directly"),
        ("disk", "cache's disk / upstream read directly (/ best peer)"),
        ("floor", "floor / best peer (work; per CPU-s)"),
        ("loop-floor", "loop floor / best peer (work; per CPU-s)"),
        ("relay-floor", "relay floor / best peer (work; per CPU-s;"
         " per CPU-s with the disk's stores)"),
        ("cache-floor", "cache floor / best peer (work; per CPU-s)"),
        ("cache-floor-st", "cache floor with its commit beside its"
         " clients / best peer (work; per CPU-s)"),
        ("kernel", "kernel / best peer (work; per CPU-s)"),
    ) if key in servers]
    print("| row | " + " | ".join(servers) +
          " | xnbd / best peer | xnbd work per CPU-s / best peer's |"
          " work per machine CPU-s: xnbd / best peer (floors) |"
          " client, % of a core (xnbd / best peer) | client-bound ceiling |" +
          "".join(" %s |" % title for _, title in extra_cols))
    print("|---" * (len(servers) + 6 + len(extra_cols)) + "|")
    for row in rows:
        cells = []
        med = {}
        eff = {}
        mach = {}  # work per machine CPU-second
        cli = {}
        unit = ""
        for name in servers:
            vals = results.get((row, name), [])
            if not vals:
                cells.append("-")
                continue
            unit = vals[0][1]
            v = [x[0] for x in vals]
            med[name] = statistics.median(v)
            # work per server CPU-second (operations or MiB)
            e = [x[2] for x in vals]
            eff[name] = statistics.median(e)
            cli[name] = statistics.median(x[3] for x in vals)
            if vals[0][4] is not None:
                mach[name] = statistics.median(x[4] for x in vals)
            cells.append("%.0f (%.0f-%.0f) %s, %.0f/CPU-s" %
                         (med[name], min(v), max(v), unit, eff[name]))
        peers = [n for n in servers
                 if n != "xnbd-server" and n not in YARDSTICKS and n in med]
        extra = dict.fromkeys(key for key, _ in extra_cols)
        if "xnbd-server" in med and med.get("upstream"):
            extra["upstream"] = "%.2f" % (med["xnbd-server"] / med["upstream"])
        ratio = eff_ratio = "-"
        if unit.startswith("MiB peak"):
            if "xnbd-server" in med and peers:
                ratio = "%.2f (lower is better)" % (
                    med["xnbd-server"] / min(med[n] for n in peers))
            cells = [c.split(",")[0] for c in cells]
            print("| %s | %s | %s | - | - | - | - |%s" % (
                row, " | ".join(cells), ratio, " - |" * len(extra_cols)))
            continue
        best_med = max((med[n] for n in peers), default=0)
        best_eff = max((eff[n] for n in peers), default=0)
        client = ceiling = machine = "-"
        if "xnbd-server" in med and peers:
            bestn = max(peers, key=lambda n: med[n])
            best = best_med
            ratio = "%.2f" % (med["xnbd-server"] / best) if best else "-"
            eff_ratio = "%.2f" % (eff["xnbd-server"] / best_eff) \
                if best_eff else "-"
            best_mach = max((mach[n] for n in peers if n in mach),
                            default=0)
            if best_mach and "xnbd-server" in mach:
                machine = "%.2f" % (mach["xnbd-server"] / best_mach)
                floors = ["%s %.2f" % (n, mach[n] / best_mach)
                          for n in FLOORS if n in mach]
                if floors:
                    machine += " (%s)" % ", ".join(floors)
            client = "%.0f / %.0f" % (100 * cli["xnbd-server"],
                                      100 * cli[bestn])
            if "floor" in cli:
                client += " (floor %.0f)" % (100 * cli["floor"])
            if "loop-floor" in cli:
                client += " (loop floor %.0f)" % (100 * cli["loop-floor"])
            if getattr(ROWS[row], "one_thread", False) and best:
                # The client's work per request is what it was with the
                # server that made it cheapest (the floor included), done
                # at a whole core: no server gets the client further.
                ceiling = "%.2f" % (max(
                    med[n] / min(max(cli[n], 1e-3), 1.0)
                    for n in cli if n not in ("upstream", "kernel", "disk"))
                    / best)
        for key in FLOORS + ("kernel",):
            if med.get(key) and best_med and best_eff:
                # The kernel's work bounds a row's only where it only
                # writes (kernel_caps); its work per CPU-s, every row.
                work = "-" if key == "kernel" and not getattr(
                    ROWS[row], "kernel_caps", False) else \
                    "%.2f" % (med[key] / best_med)
                extra[key] = "%s; %.2f" % (work, eff[key] / best_eff)
                if key == "relay-floor" and eff.get("disk"):
                    # A proxy that stores what it relays, at the relay
                    # floor's cost plus what the disk's own writes of the
                    # same bytes cost fio (its O_DIRECT stores): the
                    # least a cold proxy storing as xnbd-server does
                    # spends on the row's work.
                    extra[key] += "; %.2f" % (
                        1 / (1 / eff[key] + 1 / eff["disk"]) / best_eff)
        if med.get("disk") and med.get("upstream"):
            extra["disk"] = "%.2f" % (med["disk"] / med["upstream"])
            if best_med:
                extra["disk"] += " (%.2f)" % (med["disk"] / best_med)
        print("| %s | %s | %s | %s | %s | %s | %s |%s" % (
            row, " | ".join(cells), ratio, eff_ratio, machine, client, ceiling,
            "".join(" %s |" % (extra[key] or "-") for key, _ in extra_cols)))


if __name__ == "__main__":
    main()
