#!/usr/bin/python3
"""xnbd-server --proxy survives SIGKILL at any moment with its data intact.

The upstream is xnbd-server --target on an image of random data.  Round
after round (30, or fewer if time runs short), a proxy is started on the
same cache image and bitmap (never --clear-bitmap), two libnbd connections
flood it with asynchronous unaligned reads (many of blocks not cached yet,
so that fetches are under way when it dies; a fresh window per round gets
reads and partial writes racing on uncached blocks), unaligned writes and
write-zeroes (many partial, to uncached blocks, so the proxy fetches and
merges), FUA writes and flushes (some rounds flush often, some never), and
the proxy is SIGKILLed at a random moment with requests in flight.  Every
fifth round the flood stops first and every request must be answered
within 10 s (no request gets stuck); the proxy must log no error.

The model (per 4 KiB block): a durable `base` content (upstream data, or
what the last check read back), and the writes issued since, in order
(writes to one block never overlap in time: the workload waits for one
before it sends another to the same block).  A successful FLUSH makes every
write answered before it was sent durable: those fold into the base; so does
a FUA write once answered.  After each restart, every block written or
first read in the round, the window, and samples of the other blocks read,
of those written in earlier rounds and of the whole image are read back:
each byte must be either the base's or one that some not yet durable write
put there.  The zeroes of a bit persisted before its data, a flushed or FUA
write lost, or data of the wrong block all fail.  What is read back becomes
the new base (served data must then stay stable).  Reads answered during the
flood are checked against the model too, where no write raced them.

At the end the proxy is stopped cleanly, restarted and checked once more;
the upstream image must be byte-identical to the start; and the checker
proves it is not blind: with bits forged in the bitmap file (a bit on disk
for a block whose data never landed) and bits dropped (a flushed write
lost), the check must report exactly the damaged blocks.

SIGKILL loses no page cache, so this checks the proxy's own ordering (the
bitmap never gets ahead of the cache writes; flushed bits are on disk), not
fdatasync against power loss.  PROXY_CRASH_SEED=N repeats a run's random
choices (the timing of the kills cannot be repeated exactly).
"""
import hashlib
import mmap
import os
import random
import select
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import KiB, MiB, check, check_eq  # noqa: E402

SIZE = 128 * MiB
BS = 4096
NBLOCKS = SIZE // BS
MAX_ROUNDS = 30
MIN_ROUNDS = 10
TIME_BUDGET = 38.0        # no new round starts after this many seconds
DEPTH = 32                # requests in flight per connection
HOT = 512 * KiB           # a per-round window where reads and writes race
FRESH_RATE = 800          # blocks per second the flood looks at first time
FRESH_BURST = 200
SEED = int(os.environ.get("PROXY_CRASH_SEED") or random.randrange(1 << 30))


class Entry:
    """The part of one write that falls in one block: bytes [s, e)."""
    __slots__ = ("s", "e", "data", "w")

    def __init__(self, s, e, data, w):
        self.s, self.e, self.data, self.w = s, e, data, w


class Op:
    __slots__ = ("kind", "off", "len", "buf", "data", "flags", "blocks",
                 "err", "seq", "mark", "checkable", "gens", "h", "faulting")

    def __init__(self, kind, off=0, length=0):
        self.kind, self.off, self.len = kind, off, length
        self.err = None
        self.seq = None
        self.flags = 0
        self.faulting = False


class Model:
    def __init__(self, up):
        self.up = up            # the upstream image, mapped
        self.base = {}          # block -> bytes (durable), if not upstream's
        self.cur = {}           # block -> bytearray: all issued writes applied
        self.pending = {}       # block -> [Entry] in issue order
        self.wflight = {}       # block -> the write in flight on it
        self.gen = {}           # block -> writes issued to it (races reads)
        self.cseq = 0           # writes answered successfully so far

    def upblock(self, b):
        return self.up[b * BS:(b + 1) * BS]

    def base_of(self, b):
        v = self.base.get(b)
        return v if v is not None else self.upblock(b)

    def cur_of(self, b):
        v = self.cur.get(b)
        return v if v is not None else self.base_of(b)

    def expected(self, off, length):
        b0, b1 = off // BS, (off + length - 1) // BS
        out = b"".join(bytes(self.cur_of(b)) for b in range(b0, b1 + 1))
        return out[off - b0 * BS:off - b0 * BS + length]

    def busy(self, b0, b1):
        return any(b in self.wflight for b in range(b0, b1 + 1))

    def issue_write(self, w):
        """Record write w (w.data: its bytes, zeroes for write-zeroes)."""
        end = w.off + w.len
        w.blocks = range(w.off // BS, (end - 1) // BS + 1)
        for b in w.blocks:
            s, e = max(w.off, b * BS), min(end, (b + 1) * BS)
            part = w.data[s - w.off:e - w.off]
            c = self.cur.get(b)
            if c is None:
                c = self.cur[b] = bytearray(self.base_of(b))
            c[s - b * BS:e - b * BS] = part
            self.pending.setdefault(b, []).append(
                Entry(s - b * BS, e - b * BS, part, w))
            self.wflight[b] = w
            self.gen[b] = self.gen.get(b, 0) + 1

    def write_done(self, w):
        for b in w.blocks:
            if self.wflight.get(b) is w:
                del self.wflight[b]
        if w.err == 0:
            self.cseq += 1
            w.seq = self.cseq
            if w.flags & FUA:
                for b in w.blocks:
                    self.fold_entry(b, w)

    def fold_entry(self, b, w):
        """w is durable in block b: its bytes join the base, and earlier
        writes can no longer show through them."""
        ents = self.pending.get(b, [])
        k = next(i for i, e in enumerate(ents) if e.w is w)
        e = ents[k]
        nb = bytearray(self.base_of(b))
        nb[e.s:e.e] = e.data
        self.base[b] = bytes(nb)
        kept = []
        for x in ents[:k]:
            if x.s < e.s:
                end = min(x.e, e.s)
                kept.append(Entry(x.s, end, x.data[:end - x.s], x.w))
            if x.e > e.e:
                s = max(x.s, e.e)
                kept.append(Entry(s, x.e, x.data[s - x.s:], x.w))
        ents[:k + 1] = kept
        if not ents:
            del self.pending[b]

    def flush_done(self, mark):
        """A flush sent when `mark` writes had been answered succeeded:
        those writes are durable."""
        for b in list(self.pending):
            ents = self.pending[b]
            while ents and ents[0].w.seq is not None and ents[0].w.seq <= mark:
                e = ents.pop(0)
                nb = bytearray(self.base_of(b))
                nb[e.s:e.e] = e.data
                self.base[b] = bytes(nb)
            if not ents:
                del self.pending[b]

    def judge(self, b, got):
        """None if block b may read as got after a crash, else why not."""
        base = self.base_of(b)
        if got == base:
            return None
        ents = self.pending.get(b, [])
        st = bytearray(base)
        for e in ents:
            st[e.s:e.e] = e.data
            if got == st:
                return None
        bad, first = 0, None
        for i in range(len(got)):
            g = got[i]
            if g == base[i]:
                continue
            for e in ents:
                if e.s <= i < e.e and e.data[i - e.s] == g:
                    break
            else:
                bad += 1
                if first is None:
                    first = i
        if not bad:
            return None
        what = []
        if got.count(0) == len(got):
            what.append("the block reads as zeroes")
        if got == self.upblock(b):
            what.append("it is the upstream's data")
        elif base == self.upblock(b):
            what.append("its durable content is the upstream's")
        else:
            what.append("its durable content was written by the client")
        return ("block %d (offset %d): %d bytes match neither the durable "
                "content nor any write since the last flush (first at +%d: "
                "got %r, durable %r); %d not yet durable writes; %s"
                % (b, b * BS, bad, first, bytes(got[first:first + 8]),
                   bytes(base[first:first + 8]), len(ents), "; ".join(what)))

    def settle(self, b, got):
        """After a check, what was read is the durable content."""
        got = bytes(got)
        if got == self.upblock(b):
            self.base.pop(b, None)
        else:
            self.base[b] = got
        self.cur.pop(b, None)
        self.pending.pop(b, None)
        self.wflight.pop(b, None)


FUA = 1  # nbd.CMD_FLAG_FUA, set in run()


def pump(nbd, hs, timeout):
    """One select over the connections' sockets, then notify them.  Dead
    connections are dropped from hs."""
    rd, wr, fds = [], [], {}
    for h in list(hs):
        if h.aio_is_dead() or h.aio_is_closed():
            hs.remove(h)
            continue
        fd = h.aio_get_fd()
        d = h.aio_get_direction()
        fds[fd] = h
        if d & nbd.AIO_DIRECTION_READ:
            rd.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            wr.append(fd)
    if not fds:
        return
    r, w, _ = select.select(rd, wr, [], timeout)
    for fd, h in fds.items():
        try:
            if fd in r:
                h.aio_notify_read()
            if fd in w and not h.aio_is_dead():
                h.aio_notify_write()
        except nbd.Error:
            pass  # the connection died: its commands complete with errors


def read_blocks(nbd, srv, blocks):
    """Read the given blocks through the server; returns {block: bytes}."""
    blocks = sorted(set(blocks))
    runs = []
    for b in blocks:
        if runs and runs[-1][1] == b and b - runs[-1][0] < 256:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    h = srv.connect()
    out = {}
    todo = list(runs)
    flight = []
    end = time.monotonic() + 60
    while todo or flight:
        while todo and len(flight) < 16:
            b0, b1 = todo.pop()
            buf = nbd.Buffer((b1 - b0) * BS)
            flight.append((h.aio_pread(buf, b0 * BS), buf, b0, b1))
        check(time.monotonic() < end, "reading %d blocks back took over 60 s "
              "(%d reads unanswered)" % (len(blocks), len(flight)))
        h.poll(1000)
        for x in list(flight):
            if h.aio_command_completed(x[0]):
                flight.remove(x)
                data = x[1].to_bytearray()
                for b in range(x[2], x[3]):
                    out[b] = data[(b - x[2]) * BS:(b - x[2] + 1) * BS]
    h.shutdown()
    return out


def verify(nbd, srv, model, blocks):
    got = read_blocks(nbd, srv, blocks)
    problems = []
    for b in sorted(got):
        why = model.judge(b, got[b])
        if why:
            problems.append(why)
    return got, problems


def bitmap_bits(path):
    with open(path, "rb") as f:
        f.seek(4096)
        return f.read()


def set_bit(path, b, on):
    with open(path, "r+b") as f:
        f.seek(4096 + b // 8)
        v = f.read(1)[0]
        v = v | (1 << (b % 8)) if on else v & ~(1 << (b % 8))
        f.seek(4096 + b // 8)
        f.write(bytes([v]))


def bit(bits, b):
    return bits[b // 8] >> (b % 8) & 1


class Round:
    """One round: a proxy flooded through two connections, then SIGKILLed."""

    def __init__(self, nbd, rnd, model, seen, stats):
        self.nbd, self.rnd, self.model = nbd, rnd, model
        self.seen, self.stats = seen, stats
        self.seen_list = sorted(seen)
        self.touched, self.written, self.fresh = set(), set(), set()
        self.done = []
        self.flight = set()
        self.faulting_at_kill = 0
        self.ops = self.acked = self.flushed = self.in_flight_at_kill = 0
        self.killed = False
        # A window of blocks nobody looked at yet, where reads (faulting)
        # and partial writes race.
        for _ in range(100):
            self.hot = rnd.randrange(0, NBLOCKS - HOT // BS)
            if not any(b in seen for b in range(self.hot,
                                                self.hot + HOT // BS)):
                break
        self.hot *= BS
        self.allow = 64.0  # unseen blocks the flood may still look at
        # Some rounds flush often, some rarely, some never (FUA writes are
        # then all that must survive).
        self.p_flush = rnd.choice([0.05, 0.05, 0.01, 0.0])
        self.p_fua = rnd.choice([0.05, 0.2])
        self.t_last = time.monotonic()

    def length(self):
        r = self.rnd.random()
        if r < 0.7:
            return self.rnd.randint(1, BS)
        if r < 0.98:
            return self.rnd.randint(BS, 64 * KiB)
        return self.rnd.randint(64 * KiB, 256 * KiB)

    def pick(self):
        """An unaligned range: in the hot window, around blocks nobody
        looked at yet (at a bounded rate, so that uncached blocks remain for
        every round), or around blocks seen already (cached, most of them)."""
        rnd = self.rnd
        r = rnd.random()
        n = self.length()
        if r < 0.35:
            n = min(n, HOT)
            off = self.hot + rnd.randrange(HOT - n + 1)
        elif r < 0.65 and self.allow >= 3:
            n = min(n, 2 * BS)
            for _ in range(20):
                b = rnd.randrange(NBLOCKS - 2)
                if b not in self.seen and b + 1 not in self.seen:
                    break
            off = min(b * BS + rnd.randrange(BS), SIZE - n)
        else:
            b = rnd.choice(self.seen_list) if self.seen_list else 0
            off = min(b * BS + rnd.randrange(BS), SIZE - n)
            new = sum(1 for k in range(off // BS, (off + n - 1) // BS + 1)
                      if k not in self.seen)
            if new > self.allow:
                n = BS - off % BS  # stay in the block seen already
        return off, n

    def account(self, b0, b1):
        """Note blocks b0..b1 touched; returns whether any is new (not
        cached, unless the upstream's content came through a write)."""
        new = False
        for b in range(b0, b1 + 1):
            self.touched.add(b)
            if b not in self.seen or b in self.fresh:
                new = True
            if b not in self.seen:
                self.seen.add(b)
                self.seen_list.append(b)
                self.fresh.add(b)
                if not self.hot <= b * BS < self.hot + HOT:
                    self.allow -= 1
        return new

    def issue(self, h):
        nbd, rnd, model = self.nbd, self.rnd, self.model
        r = rnd.random()
        op = None
        if r < self.p_flush:
            op = Op("flush")
            op.mark = model.cseq
        elif r < 0.35:
            for _ in range(4):
                off, n = self.pick()
                if not model.busy(off // BS, (off + n - 1) // BS):
                    op = Op("write" if r < 0.32 else "zero", off, n)
                    break
        if op is None:
            op = Op("read", *self.pick())
        op.h = h

        def cb(err, op=op):
            op.err = err.value
            self.done.append(op)
            return 1
        if op.kind == "read":
            op.buf = nbd.Buffer(op.len)
            b0, b1 = op.off // BS, (op.off + op.len - 1) // BS
            op.checkable = not model.busy(b0, b1)
            op.gens = [model.gen.get(b, 0) for b in range(b0, b1 + 1)]
            h.aio_pread(op.buf, op.off, completion=cb)
            op.faulting = self.account(b0, b1)
            self.stats["reads"] += 1
        elif op.kind == "flush":
            h.aio_flush(completion=cb)
            self.stats["flushes"] += 1
        else:
            if op.kind == "write":
                op.data = rnd.randbytes(op.len)
                if rnd.random() < self.p_fua:
                    op.flags = FUA
            else:
                op.data = bytes(op.len)
            model.issue_write(op)
            op.faulting = self.account(op.blocks[0], op.blocks[-1])
            self.written.update(op.blocks)
            if op.kind == "write":
                op.buf = nbd.Buffer.from_bytearray(op.data)
                h.aio_pwrite(op.buf, op.off, completion=cb, flags=op.flags)
            else:
                h.aio_zero(op.len, op.off, completion=cb)
            self.stats["writes"] += 1
        self.inflight[h] += 1
        self.flight.add(op)
        self.ops += 1

    def complete(self, op, n):
        model = self.model
        self.inflight[op.h] -= 1
        self.flight.discard(op)
        if op.err and not self.killed:
            xt.fail("round %d: %s %d+%d failed with errno %d before the kill"
                    % (n, op.kind, op.off, op.len, op.err))
        if op.kind == "flush":
            if op.err == 0:
                model.flush_done(op.mark)
                self.flushed += 1
        elif op.kind == "read":
            if op.err or not op.checkable:
                return
            b0 = op.off // BS
            if op.gens != [model.gen.get(b, 0)
                           for b in range(b0, b0 + len(op.gens))]:
                return  # a write raced it: either content would do
            got = op.buf.to_bytearray()
            exp = model.expected(op.off, op.len)
            if got != exp:
                i = xt.first_diff(got, exp)
                xt.fail("round %d: read %d+%d answered wrong data at offset "
                        "%d (block %d): got %r, expected %r%s"
                        % (n, op.off, op.len, op.off + i, (op.off + i) // BS,
                           bytes(got[i:i + 8]), bytes(exp[i:i + 8]),
                           " (zeroes)" if not any(got[i:i + 64]) else ""))
            self.stats["checked_reads"] += 1
        else:
            model.write_done(op)
            if op.err == 0:
                self.acked += 1
                if op.flags & FUA:
                    self.stats["fua"] += 1

    def flood(self, p, delay, n, drain):
        """Flood p for `delay` seconds (then, if drain, wait until every
        request is answered), SIGKILL it, collect what completes."""
        hs = [p.connect(), p.connect()]
        conns = list(hs)
        self.inflight = {h: 0 for h in hs}
        kill_at = time.monotonic() + delay
        while True:
            now = time.monotonic()
            self.allow = min(self.allow + (now - self.t_last) * FRESH_RATE,
                             FRESH_BURST)
            self.t_last = now
            if drain and not self.killed and now >= kill_at:
                # Stop sending; every request must be answered, soon.
                if not sum(self.inflight.values()):
                    drain = False
                elif now > kill_at + 10:
                    xt.fail("round %d: %d requests unanswered 10 s after the "
                            "flood stopped" % (n, sum(self.inflight.values())))
            if not drain and not self.killed and now >= kill_at:
                p.proc.send_signal(signal.SIGKILL)
                self.killed = True
                self.in_flight_at_kill = sum(self.inflight.values())
                self.faulting_at_kill = sum(
                    1 for op in self.flight if op.faulting and op.err is None)
                kill_end = now + 10
            if not self.killed and now < kill_at:
                for h in hs:
                    while self.inflight[h] < DEPTH:
                        self.issue(h)
            pump(self.nbd, hs, 0.05)
            while self.done:
                self.complete(self.done.pop(0), n)
            if self.killed:
                if not hs or not sum(self.inflight.values()):
                    break
                if time.monotonic() > kill_end:
                    xt.fail("the connections to the killed proxy did not end")
        rc = p.proc.wait(10)
        check_eq(rc, -signal.SIGKILL, "the proxy's exit status")
        while self.done:
            self.complete(self.done.pop(0), n)
        del conns[:], hs[:]  # the handles close when freed
        self.stats["in_flight_at_kill"] += self.in_flight_at_kill
        self.stats["faulting_at_kill"] += self.faulting_at_kill


def check_log(p, n):
    """The proxy logged no error (warnings are shown)."""
    for line in p.log_text().splitlines():
        if ": error:" in line:
            xt.fail("round %d: the proxy logged an error: %s" % (n, line))
        if ": warning:" in line:
            xt.log("round %d: the proxy warned: %s" % (n, line))


def run():
    nbd = xt.need_nbd()
    global FUA
    FUA = nbd.CMD_FLAG_FUA
    rnd = random.Random(SEED)
    xt.log("seed %d (set PROXY_CRASH_SEED to repeat)" % SEED)
    t_start = time.time()
    with xt.TestDir() as t:
        img = t.join("upstream.img")
        with open(img, "wb") as f:
            for _ in range(SIZE // MiB):
                f.write(rnd.randbytes(MiB))
        with open(img, "rb") as f:
            up_sha = hashlib.sha256(f.read()).hexdigest()
        upf = open(img, "rb")
        up = mmap.mmap(upf.fileno(), 0, access=mmap.ACCESS_READ)
        upsrv = t.server(img)
        model = Model(up)
        seen = set()          # blocks ever read, written or checked
        ever_written = set()
        stats = dict(ops=0, reads=0, checked_reads=0, writes=0, acked=0,
                     fua=0, flushes=0, flushed=0, in_flight_at_kill=0,
                     faulting_at_kill=0,
                     verified=0)
        n = 0
        while n < MAX_ROUNDS and (n < MIN_ROUNDS or
                                  time.time() - t_start < TIME_BUDGET):
            n += 1
            rd = Round(nbd, rnd, model, seen, stats)
            p = t.proxy(upsrv.port, name="p")
            delay = rnd.uniform(0.05, 1.0)
            drain = n % 5 == 0  # now and then, kill it once all is answered
            rd.flood(p, delay, n, drain)
            t.servers.remove(p)
            check_log(p, n)
            ever_written |= rd.written

            # Restart on the same cache and bitmap, and check: every block
            # written or newly looked at in the round, the hot window, a
            # sample of the others and of the blocks written before, and a
            # few anywhere.
            p = t.proxy(upsrv.port, name="p")
            blocks = rd.written | rd.fresh
            blocks.update(range(rd.hot // BS, (rd.hot + HOT) // BS))
            rest = sorted(rd.touched - blocks)
            blocks.update(rnd.sample(rest, min(len(rest), 1024)))
            old = sorted(ever_written - blocks)
            blocks.update(rnd.sample(old, min(len(old), 2048)))
            blocks.update(rnd.randrange(NBLOCKS) for _ in range(64))
            got, problems = verify(nbd, p, model, blocks)
            if problems:
                xt.log("round %d: %d block(s) wrong after the restart"
                       % (n, len(problems)))
                for why in problems[:20]:
                    xt.log("  " + why)
                xt.fail("round %d: data wrong after SIGKILL and restart "
                        "(seed %d; server log %s)" % (n, SEED, p.log))
            for b, d in got.items():
                model.settle(b, d)
                if b not in seen:
                    seen.add(b)
            stats["verified"] += len(got)
            stats["ops"] += rd.ops
            stats["acked"] += rd.acked
            stats["flushed"] += rd.flushed
            q = xt.query(p.ctl)
            xt.log("round %d: %d requests, %d writes and %d flushes answered, "
                   "%d in flight at the kill after %.2f s%s (%d of them on "
                   "blocks new in the round; %d blocks new); %d blocks "
                   "checked; %.1f%% cached"
                   % (n, rd.ops, rd.acked, rd.flushed, rd.in_flight_at_kill,
                      delay, " and a drain" if drain else "",
                      rd.faulting_at_kill, len(rd.fresh), len(got),
                      q["cached-percent"]))
            check_eq(p.stop(), 0, "the proxy's exit status after SIGTERM")
            t.servers.remove(p)
            check_log(p, n)

        xt.log("%d rounds in %.1f s: %d requests (%d reads, %d of them "
               "checked live; %d writes/zeroes, %d answered, %d FUA; %d "
               "flushes, %d answered); %d requests in flight at the kills, "
               "%d of them on blocks new in their round; %d block checks"
               % (n, time.time() - t_start, stats["ops"], stats["reads"],
                  stats["checked_reads"], stats["writes"], stats["acked"],
                  stats["fua"], stats["flushes"], stats["flushed"],
                  stats["in_flight_at_kill"], stats["faulting_at_kill"],
                  stats["verified"]))
        check(stats["in_flight_at_kill"] >= n,
              "requests were in flight at the kills")

        # A clean stop keeps everything: restart and check what was written.
        p = t.proxy(upsrv.port, name="p")
        blocks = set(model.base) | set(rnd.randrange(NBLOCKS)
                                       for _ in range(512))
        got, problems = verify(nbd, p, model, blocks)
        check(not problems, "after a clean stop and restart: %s"
              % "; ".join(problems[:5]))
        for b, d in got.items():
            model.settle(b, d)
        check_eq(p.stop(), 0, "the proxy's exit status after SIGTERM")
        t.servers.remove(p)

        # The checker is not blind: damage the bitmap as two classic bugs
        # would, and it must name exactly the damaged blocks.
        bits = bitmap_bits(p.bitmap)
        with open(p.cache, "rb") as f:
            def cache_zero(b):
                f.seek(b * BS)
                return f.read(BS).count(0) == BS
            forged = []
            for _ in range(10000):
                b = rnd.randrange(NBLOCKS)
                if not bit(bits, b) and b not in model.base and \
                        b not in forged and cache_zero(b):
                    forged.append(b)
                    if len(forged) == 8:
                        break
        dropped = [b for b in sorted(model.base) if bit(bits, b)][:8]
        check(len(forged) == 8 and len(dropped) == 8,
              "blocks to damage for the checker's self-test (%d never cached, "
              "%d written)" % (len(forged), len(dropped)))
        for b in forged:
            set_bit(p.bitmap, b, True)   # a bit on disk before its data
        for b in dropped:
            set_bit(p.bitmap, b, False)  # a flushed write lost
        p = t.proxy(upsrv.port, name="p")
        _, problems = verify(nbd, p, model, forged + dropped)
        named = sorted(int(w.split()[1]) for w in problems)
        check_eq(named, sorted(forged + dropped),
                 "blocks the checker reports after the bitmap was damaged")
        xt.log("self-test: the checker reports all %d damaged blocks, e.g. %s"
               % (len(named), problems[0]))
        check_eq(p.stop(), 0, "the proxy's exit status after SIGTERM")
        t.servers.remove(p)

        check_eq(upsrv.stop(), 0, "the upstream's exit status")
        up.close()
        upf.close()
        with open(img, "rb") as f:
            check_eq(hashlib.sha256(f.read()).hexdigest(), up_sha,
                     "sha256 of the upstream image (nothing is written "
                     "upstream)")


xt.main(run)
