#!/usr/bin/python3
"""Randomized CoW stress test: many aio requests in flight over three
connections.  Within a batch the requests are byte-disjoint but often share
4 KiB blocks (the copy-up race the block lock must prevent): writes,
zeroes and trims, some with FUA, plus reads of untouched regions (must equal
the model) and racy reads of touched ones (every byte must be the old or
the new value: a bit set before its data landed would show zeroes).  After
each batch the whole export is compared with the model; at the end the base
must be unchanged and no overlay file left.

    cow_stress.py [SEED [ROUNDS]]   (XNBD_SERVER names the binary)
"""
import os, random, signal, socket, subprocess, sys, tempfile, time, hashlib
try:
    import nbd
except ImportError:
    print("SKIP: python3-libnbd is not installed")
    sys.exit(77)

SERVER = os.environ.get("XNBD_SERVER", "build/server/xnbd-server")
SEED = int(sys.argv[1]) if len(sys.argv) > 1 else 1
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 80
EXTRA = []
SIZE = 8 << 20
tmp = tempfile.mkdtemp(prefix="xnbd-cowstress-")
os.makedirs(tmp + "/ov")
rnd = random.Random(SEED)
base = bytearray(rnd.randbytes(SIZE))
base[2 << 20:3 << 20] = bytes(1 << 20)
bp = tmp + "/base.img"
with open(bp, "wb") as f:
    f.write(base[:2 << 20]); f.seek(3 << 20); f.write(base[3 << 20:])
bsum = hashlib.sha256(open(bp, "rb").read()).hexdigest()

with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
p = subprocess.Popen([SERVER, "--cow-target", "--laddr", "127.0.0.1", "--lport", str(port),
                      "--cow-overlay", tmp + "/ov", "--logpath", tmp + "/log"] + EXTRA + [bp])
for _ in range(100):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close(); break
    except OSError:
        time.sleep(0.05)
hs = []
for i in range(3):
    h = nbd.NBD(); h.connect_uri("nbd://127.0.0.1:%d/" % port); hs.append(h)
model = bytearray(base)

def wait(pend):
    left = dict(pend)
    t = time.time() + 60
    while left:
        if time.time() > t:
            raise SystemExit("TIMEOUT %d" % len(left))
        for (hi, c) in list(left):
            h = hs[hi]
            if h.aio_command_completed(c):
                del left[(hi, c)]
        if left:
            hs[next(iter(left))[0]].poll(100)

bad = 0
for rd in range(ROUNDS):
    pend = {}
    reads = []
    old = bytes(model)
    racy = []
    touched = bytearray(SIZE // 4096 + 1)
    wins = []
    # a few windows, each split into consecutive disjoint segments
    for w in range(rnd.randrange(3, 10)):
        start = rnd.randrange(SIZE - 300000)
        pos = start
        end = start + rnd.randrange(1000, 300000)
        if any(lo < end and start < hi for lo, hi in wins):
            continue
        wins.append((start, end))
        while pos < end:
            ln = min(end - pos, rnd.choice([1, 7, 100, 511, 1000, 3000, 4095, 4096, 5000, 9000, 40000]))
            kind = rnd.random()
            hi = rnd.randrange(3)
            h = hs[hi]
            fl = nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0
            if kind < 0.6:
                data = rnd.randbytes(ln)
                c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), pos, flags=fl)
                model[pos:pos + ln] = data
            elif kind < 0.75:
                c = h.aio_zero(ln, pos, flags=fl | (nbd.CMD_FLAG_NO_HOLE if rnd.random() < .5 else 0))
                model[pos:pos + ln] = bytes(ln)
            elif kind < 0.85:
                c = h.aio_trim(ln, pos, flags=fl)
                model[pos:pos + ln] = bytes(ln)
            else:
                c = None
            if c is not None:
                pend[(hi, c)] = 1
                for b in range(pos // 4096, (pos + ln - 1) // 4096 + 1):
                    touched[b] = 1
            pos += ln
    # concurrent reads of blocks untouched in this batch
    for i in range(40):
        off = rnd.randrange(SIZE - 70000); ln = rnd.randrange(1, 70000)
        if any(touched[off // 4096:(off + ln - 1) // 4096 + 1]):
            continue
        hi = rnd.randrange(3)
        buf = nbd.Buffer(ln)
        c = hs[hi].aio_pread(buf, off)
        pend[(hi, c)] = 1
        reads.append((buf, off, ln, bytes(model[off:off + ln])))
    for i in range(40):
        off = rnd.randrange(SIZE - 20000); ln = rnd.randrange(1, 20000)
        hi = rnd.randrange(3); buf = nbd.Buffer(ln)
        c = hs[hi].aio_pread(buf, off); pend[(hi, c)] = 1
        racy.append((buf, off, ln))
    wait(pend)
    for buf, off, ln in racy:
        got = bytes(buf.to_bytearray()); o = old[off:off+ln]; n = bytes(model[off:off+ln])
        if got == o or got == n: continue
        for k in range(ln):
            if got[k] != o[k] and got[k] != n[k]:
                print("RACY READ garbage round %d at %d (block %d +%d) got %d old %d new %d" % (rd, off+k, (off+k)//4096, (off+k)%4096, got[k], o[k], n[k])); bad += 1; break
    for buf, off, ln, exp in reads:
        if buf.to_bytearray() != exp:
            print("MISMATCH concurrent read round", rd, off, ln); bad += 1
    # verify with pipelined reads
    pend = {}; reads = []
    for off in range(0, SIZE, 1 << 20):
        hi = rnd.randrange(3); buf = nbd.Buffer(1 << 20)
        c = hs[hi].aio_pread(buf, off); pend[(hi, c)] = 1; reads.append((buf, off))
    wait(pend)
    for buf, off in reads:
        got = buf.to_bytearray()
        if got != model[off:off + (1 << 20)]:
            i = next(k for k in range(len(got)) if got[k] != model[off + k])
            print("MISMATCH round %d at %d (block %d +%d)" % (rd, off + i, (off + i) // 4096, (off + i) % 4096))
            bad += 1
    if bad:
        break
# Waiters on a block lock start from the loop, not from a thread of
# libuv's pool: every thread but the main one is libxnbd's own.
others = []
for tid in os.listdir("/proc/%d/task" % p.pid):
    if int(tid) != p.pid:
        try:
            with open("/proc/%d/task/%s/comm" % (p.pid, tid)) as f:
                n = f.read().strip()
        except OSError:
            continue  # gone meanwhile
        if n != "xnbd-io":
            others.append(n)
if others:
    print("threads that are not libxnbd's:", others); bad += 1
for h in hs:
    h.shutdown()
p.send_signal(signal.SIGTERM)
rc = p.wait(20)
left = os.listdir(tmp + "/ov")
same = hashlib.sha256(open(bp, "rb").read()).hexdigest() == bsum
print("cow_stress.py: seed", SEED, "rounds", rd + 1, "bad", bad, "rc", rc,
      "overlay files left", left, "base same", same)
import shutil; shutil.rmtree(tmp)
sys.exit(1 if bad or rc or left or not same else 0)
