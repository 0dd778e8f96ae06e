#!/usr/bin/python3
"""Negative and edge-case protocol tests over raw sockets (no libnbd).

The fixed newstyle handshake is done by hand (xnbdtest.RawClient).  Every
scenario runs on its own connection(s); a failed scenario is recorded and
the next one still runs; at the end the server must still be serving.

Handshake: greeting; unknown option -> ERR_UNSUP then GO works; LIST with
data -> ERR_INVALID then GO works; LIST; INFO; STARTTLS refused; ABORT;
malformed GO; SET_META_CONTEXT before STRUCTURED_REPLY; unknown client
flags -> the server closes; EXPORT_NAME with and without NO_ZEROES;
oldstyle only with --oldstyle.
Transmission (simple and structured replies): read past the end -> EINVAL
(as an error chunk when structured); write past the end -> ENOSPC with the
payload consumed; write on --readonly -> EPERM; unknown command -> EINVAL;
invalid flags -> EINVAL; 32 MiB read works, 32 MiB + 1 -> EINVAL; 32 MiB +
1 write -> error, connection in sync; bad request magic -> that connection
closes, new ones work; pipelining with replies matched by cookie; DISC
with requests in flight answers them all first; clients vanishing with
replies queued harm no one; 100 connections at once.  Also: oversized
options, the handshake and a request in one packet, NBD_OPT_INFO requests,
meta contexts and block status chunk rules, structured read chunk rules.
"""
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

sys.dont_write_bytecode = True
sys.path.insert(0, os.environ.get("XNBD_TESTS_DIR") or
                os.path.dirname(os.path.abspath(__file__)))
import xnbdtest as xt  # noqa: E402
from xnbdtest import (MiB, check, check_eq, check_bytes, expect, expect_eq,  # noqa: E402
                      log, RawClient, Closed)

SIZE = 64 * MiB
MAXB = 32 * MiB
EPERM, EINVAL, ENOSPC = 1, 22, 28


class Ctx:
    pass


ctx = Ctx()


OPEN = []


def sock(srv=None, timeout=20):
    """A new connection to srv (default: the main server), closed at the
    end of the scenario whatever happens."""
    s = (srv or ctx.srv).sock(timeout)
    OPEN.append(s)
    return s


def connect(srv=None, structured=False, timeout=20):
    c = RawClient(sock(srv, timeout))
    c.handshake(structured=structured)
    return c


def model_read(off, n):
    return bytes(ctx.model[off:off + n])


def in_sync(c, what):
    """A read on connection c still works and returns the right data."""
    off = 3 * MiB + 17
    err, data = c.read(off, 5000)
    check_eq(err, 0, "%s: error of the follow-up read" % what)
    check_bytes(data, model_read(off, 5000), "%s: follow-up read" % what, off)


scenario_results = []


def scenario(fn):
    name = fn.__name__
    t0 = time.time()
    try:
        fn()
        scenario_results.append((name, "ok", time.time() - t0))
    except (xt.Failure, Closed, OSError, struct.error, AssertionError) as e:
        msg = "%s: %s: %s" % (name, type(e).__name__, e)
        if not isinstance(e, xt.Failure):
            traceback.print_exc()
        expect(False, msg)
        scenario_results.append((name, "FAILED", time.time() - t0))
    finally:
        while OPEN:
            OPEN.pop().close()
    check(ctx.srv.alive(), "server died during scenario %s" % name)
    return fn


# ---- handshake ----------------------------------------------------------------

def greeting():
    s = sock()
    head = xt.recv_exact(s, 18)
    magic, opt, hflags = struct.unpack(">QQH", head)
    check_eq(hex(magic), hex(xt.NBDMAGIC), "NBDMAGIC")
    check_eq(hex(opt), hex(xt.IHAVEOPT),
             "second magic (IHAVEOPT; oldstyle only with --oldstyle)")
    check(hflags & xt.FLAG_FIXED_NEWSTYLE, "FIXED_NEWSTYLE not offered: %#x" % hflags)
    expect(hflags & ~3 == 0, "unknown handshake flags set: %#x" % hflags)
    s.close()


def unknown_option_then_go():
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    for opt, data in ((0x1234, b""), (0x7fff0042, b"some data \x00\x01" * 10),
                      (4, b"\x00" * 8)):                # 4: PEEK_EXPORT (withdrawn)
        r = c.option(opt, data)
        check_eq(len(r), 1, "number of replies to unknown option %#x" % opt)
        check_eq(hex(r[0][0]), hex(xt.REP_ERR_UNSUP),
                 "reply to unknown option %#x" % opt)
    c.go()
    check_eq(c.size, SIZE, "size from GO")
    check(c.tflags & xt.TFLAG_HAS_FLAGS, "HAS_FLAGS not set in %#x" % c.tflags)
    check_eq(c.tflags & 0x80, 0, "SEND_DF set without structured replies")
    in_sync(c, "GO after unknown options")
    c.close()
    c = connect(structured=True)
    check(c.tflags & 0x80, "SEND_DF not set with structured replies: %#x" % c.tflags)
    c.close()


def list_with_data_invalid():
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    r = c.option(xt.OPT_LIST, b"bogus")
    check_eq(hex(r[-1][0]), hex(xt.REP_ERR_INVALID), "reply to LIST with data")
    check_eq(len(r), 1, "replies to LIST with data (no SERVER replies)")
    # a correct LIST now
    r = c.option(xt.OPT_LIST)
    check_eq(r[-1][0], xt.REP_ACK, "final reply to LIST")
    servers = [d for t, d in r if t == xt.REP_SERVER]
    check_eq(len(servers), 1, "exports listed")
    n, = struct.unpack(">I", servers[0][:4])
    check(n <= len(servers[0]) - 4, "REP_SERVER name length %d too long" % n)
    check_eq(servers[0][4:4 + n], b"", "listed export name")
    c.go()
    in_sync(c, "GO after LIST with data")
    c.close()


def other_options():
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    # STARTTLS: no TLS here -> POLICY (or UNSUP), never ACK
    r = c.option(xt.OPT_STARTTLS)
    check(r[-1][0] in (xt.REP_ERR_POLICY, xt.REP_ERR_UNSUP),
          "reply to STARTTLS: %#x" % r[-1][0])
    # STRUCTURED_REPLY with data -> INVALID (it takes none)
    r = c.option(xt.OPT_STRUCTURED_REPLY, b"x")
    expect_eq(hex(r[-1][0]), hex(xt.REP_ERR_INVALID), "reply to STRUCTURED_REPLY with data")
    # SET_META_CONTEXT before STRUCTURED_REPLY -> INVALID (spec: SHOULD)
    q = b"base:allocation"
    data = struct.pack(">I", 0) + struct.pack(">II", 1, len(q)) + q
    r = c.option(xt.OPT_SET_META_CONTEXT, data)
    expect_eq(hex(r[-1][0]), hex(xt.REP_ERR_INVALID),
              "reply to SET_META_CONTEXT without structured replies")
    # GO whose name length runs past the option data -> INVALID
    r = c.option(xt.OPT_GO, struct.pack(">I", 100) + b"abc")
    check_eq(hex(r[-1][0]), hex(xt.REP_ERR_INVALID), "reply to a malformed GO")
    # GO with an information request count past the data -> INVALID
    r = c.option(xt.OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 5) + b"\x00\x01")
    check_eq(hex(r[-1][0]), hex(xt.REP_ERR_INVALID), "reply to GO with short info list")
    # INFO: export info then ACK, and no transmission yet
    r = c.option(xt.OPT_INFO, struct.pack(">IH", 0, 0))
    check_eq(r[-1][0], xt.REP_ACK, "final reply to INFO")
    infos = [d for t, d in r if t == xt.REP_INFO and struct.unpack(">H", d[:2])[0] == 0]
    check_eq(len(infos), 1, "NBD_INFO_EXPORT replies to INFO")
    size, tfl = struct.unpack(">QH", infos[0][2:12])
    check_eq(size, SIZE, "size from INFO")
    # structured replies and base:allocation, properly this time
    r = c.option(xt.OPT_STRUCTURED_REPLY)
    check_eq(r[-1][0], xt.REP_ACK, "STRUCTURED_REPLY")
    r = c.option(xt.OPT_SET_META_CONTEXT, data)
    check_eq(r[-1][0], xt.REP_ACK, "SET_META_CONTEXT base:allocation")
    ctxs = [d for t, d in r if t == xt.REP_META_CONTEXT]
    check_eq(len(ctxs), 1, "contexts selected")
    check_eq(ctxs[0][4:], q, "context name")
    ctx_id, = struct.unpack(">I", ctxs[0][:4])
    c.structured = True
    c.go()
    # block status works now
    err, chunks = c.command(xt.CMD_BLOCK_STATUS, 0, 1 * MiB)
    check_eq(err, 0, "block status error")
    bs = [ch for ch in chunks if ch["type"] == xt.REPLY_TYPE_BLOCK_STATUS]
    check_eq(len(bs), 1, "block status chunks")
    check_eq(struct.unpack(">I", bs[0]["payload"][:4])[0], ctx_id, "context id")
    in_sync(c, "after many options")
    c.close()


def abort():
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    c.send_option(xt.OPT_ABORT)
    try:
        rtype, _ = c.read_option_reply(xt.OPT_ABORT)
        check_eq(rtype, xt.REP_ACK, "reply to ABORT")
    except Closed:
        expect(False, "server closed without the ACK the spec requires for ABORT")
    check(xt.is_closed(c.s, 5), "server did not close after ABORT")
    c.close()


def unknown_client_flags():
    for flags in (xt.FLAG_FIXED_NEWSTYLE | 4, 0x80000000, 0xffffffff):
        s = sock()
        xt.recv_exact(s, 18)
        s.sendall(struct.pack(">I", flags))
        # whatever we send next, the server must just close
        try:
            s.sendall(struct.pack(">QII", xt.IHAVEOPT, xt.OPT_LIST, 0))
        except OSError:
            pass
        check(xt.is_closed(s, 5),
              "server did not close after unknown client flags %#x" % flags)
        s.close()


def no_zeroes_choice():
    # without NO_ZEROES: EXPORT_NAME reply is size, flags and 124 zeros
    for cflags, zeros in ((xt.FLAG_FIXED_NEWSTYLE, 124),
                          (xt.FLAG_FIXED_NEWSTYLE | xt.FLAG_NO_ZEROES, 0),
                          (0, 124)):                # plain (non-fixed) newstyle
        c = RawClient(sock())
        c.greeting()
        c.send_client_flags(cflags)
        name = b"any-name-works"
        c.send_option(xt.OPT_EXPORT_NAME, name)
        size, tfl = struct.unpack(">QH", xt.recv_exact(c.s, 10))
        check_eq(size, SIZE, "size after EXPORT_NAME (client flags %#x)" % cflags)
        if zeros:
            check_eq(xt.recv_exact(c.s, zeros), bytes(zeros),
                     "the 124 zero bytes (client flags %#x)" % cflags)
        in_sync(c, "EXPORT_NAME with client flags %#x" % cflags)
        c.close()


def oversized_option():
    # an absurd option length: the server may close, but must survive
    s = sock()
    xt.recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", xt.IHAVEOPT, 0x4242, 0xffffffff)
              + b"x" * 1000)
    time.sleep(0.2)
    s.close()
    c = connect()
    in_sync(c, "connection after an oversized option")
    c.close()


def oversized_option_in_sync():
    # option data beyond what the server buffers: an error reply, skipped
    # data, and the stream stays in sync
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    for opt in (xt.OPT_LIST, 0x4321, xt.OPT_GO):
        r = c.option(opt, b"\x00" * 100000)
        check(r[-1][0] & (1 << 31), "reply to option %d with 100000 bytes of data: %#x"
              % (opt, r[-1][0]))
    c.go()
    in_sync(c, "after oversized options")
    c.close()


def handshake_in_one_packet():
    # client flags, options and the first request in one send: the server
    # must take the bytes after GO / EXPORT_NAME as transmission
    for final in (xt.OPT_GO, xt.OPT_EXPORT_NAME):
        s = sock()
        blob = struct.pack(">I", 3)
        blob += struct.pack(">QII", xt.IHAVEOPT, xt.OPT_STRUCTURED_REPLY, 0)
        if final == xt.OPT_GO:
            blob += struct.pack(">QII", xt.IHAVEOPT, xt.OPT_GO, 6) + struct.pack(">IH", 0, 0)
        else:
            blob += struct.pack(">QII", xt.IHAVEOPT, xt.OPT_EXPORT_NAME, 0)
        blob += struct.pack(">IHHQQI", xt.REQUEST_MAGIC, 0, xt.CMD_READ, 77, 100, 5000)
        s.sendall(blob)
        c = RawClient(s)
        c.greeting()
        check_eq(c.read_option_reply(xt.OPT_STRUCTURED_REPLY)[0], xt.REP_ACK,
                 "STRUCTURED_REPLY")
        if final == xt.OPT_GO:
            while c.read_option_reply(xt.OPT_GO)[0] != xt.REP_ACK:
                pass
        else:
            xt.recv_exact(s, 10)
        c.structured = True
        err, chunks = c.reply_for(77)
        check_eq(err, 0, "error of the read sent with the handshake")
        d = b"".join(ch["payload"][8:] for ch in chunks
                     if ch["type"] == xt.REPLY_TYPE_OFFSET_DATA)
        check_bytes(d, model_read(100, 5000), "read sent with the handshake", 100)
        in_sync(c, "after a one-packet handshake")
        c.close()


def go_info_requests():
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    # NBD_INFO_NAME (1), DESCRIPTION (2), BLOCK_SIZE (3), and an unknown one
    reqs = [1, 2, 3, 0x7777]
    data = struct.pack(">I", 0) + struct.pack(">H", len(reqs)) + \
        b"".join(struct.pack(">H", i) for i in reqs)
    r = c.option(xt.OPT_INFO, data)
    check_eq(r[-1][0], xt.REP_ACK, "final reply to INFO with requests")
    infos = {}
    for t, d in r[:-1]:
        check_eq(t, xt.REP_INFO, "reply type before ACK")
        check(len(d) >= 2, "empty NBD_REP_INFO")
        it, = struct.unpack(">H", d[:2])
        check(it not in infos, "NBD_INFO %d sent twice" % it)
        infos[it] = d[2:]
    check(0 in infos, "no NBD_INFO_EXPORT")
    check_eq(len(infos[0]), 10, "NBD_INFO_EXPORT length")
    if 3 in infos:
        check_eq(len(infos[3]), 12, "NBD_INFO_BLOCK_SIZE length")
        mn, pref, mx = struct.unpack(">III", infos[3])
        check(mn >= 1 and mn & (mn - 1) == 0 and mn <= 65536,
              "minimum block size %d not a power of 2 <= 64 KiB" % mn)
        check(pref >= max(mn, 512) and pref & (pref - 1) == 0,
              "preferred block size %d" % pref)
        check(mx >= pref and mx % mn == 0, "maximum block size %d" % mx)
        check(mx >= MAXB, "maximum block size %d below 32 MiB" % mx)
    if 1 in infos:
        check_eq(infos[1], b"", "NBD_INFO_NAME of the default export")
    check(0x7777 not in infos, "a reply to an unknown information request")
    c.go()
    in_sync(c, "after INFO with requests")
    c.close()


def meta_contexts():
    c = RawClient(sock())
    c.greeting()
    c.send_client_flags()
    check_eq(c.option(xt.OPT_STRUCTURED_REPLY)[-1][0], xt.REP_ACK, "STRUCTURED_REPLY")

    def query(opt, *qs):
        data = struct.pack(">I", 0) + struct.pack(">I", len(qs)) + \
            b"".join(struct.pack(">I", len(q)) + q for q in qs)
        r = c.option(opt, data)
        check_eq(r[-1][0], xt.REP_ACK, "final reply to meta context option %d %r"
                 % (opt, qs))
        out = {}
        for t, d in r[:-1]:
            check_eq(t, xt.REP_META_CONTEXT, "reply type")
            out[d[4:]] = struct.unpack(">I", d[:4])[0]
        return out
    listed = query(xt.OPT_LIST_META_CONTEXT)
    check(b"base:allocation" in listed, "LIST_META_CONTEXT: %r" % listed)
    check_eq(query(xt.OPT_LIST_META_CONTEXT, b"base:"), {b"base:allocation": 0},
             "LIST_META_CONTEXT base:")
    check_eq(query(xt.OPT_SET_META_CONTEXT, b"base:nonesuch", b"x-other:thing"), {},
             "SET_META_CONTEXT of unknown contexts")
    # select everything listed: block status must have one chunk per context
    sel = query(xt.OPT_SET_META_CONTEXT, *listed.keys())
    check_eq(set(sel), set(listed), "contexts selected")
    check_eq(len(set(sel.values())), len(sel), "distinct context ids")
    c.structured = True
    c.go()
    for flags in (0, xt.CMD_FLAG_REQ_ONE):
        for off, n in ((0, SIZE), (40 * MiB - 5, 8 * MiB + 10), (SIZE - 1, 1)):
            err, chunks = c.command(xt.CMD_BLOCK_STATUS, off, n, flags)
            check_eq(err, 0, "block status (%d, %d) error" % (off, n))
            ids = []
            for ch in chunks:
                if ch["type"] != xt.REPLY_TYPE_BLOCK_STATUS:
                    continue
                p = ch["payload"]
                check((len(p) - 4) % 8 == 0 and len(p) >= 12,
                      "block status payload length %d" % len(p))
                ids.append(struct.unpack(">I", p[:4])[0])
                ext = [struct.unpack(">II", p[i:i + 8]) for i in range(4, len(p), 8)]
                check(all(ln > 0 for ln, _ in ext), "zero-length extent")
                if flags & xt.CMD_FLAG_REQ_ONE:
                    check_eq(len(ext), 1, "extents with REQ_ONE")
                    check(ext[0][0] <= n, "REQ_ONE extent longer than the request")
                else:
                    check(sum(ln for ln, _ in ext[:-1]) < n,
                          "extents before the last cover the whole request")
            check_eq(sorted(ids), sorted(sel.values()),
                     "context ids in block status (%d, %d), one chunk each"
                     % (off, n))
    expect_error(c, xt.CMD_BLOCK_STATUS, SIZE - 4096, 8192, EINVAL,
                 "block status past the end")
    in_sync(c, "after block status")
    c.close()


# ---- transmission -----------------------------------------------------------

def expect_error(c, cmd, off, n, want, what, flags=0, data=None):
    """Send one request; its reply must be error `want`.  With structured
    replies a READ error must come as an error chunk (never a simple reply),
    and error chunks must be well formed."""
    cookie = c.send_request(cmd, off, n, flags, data)
    chunks = []
    while True:
        r = c.read_reply()
        check_eq(r["cookie"], cookie, "%s: cookie" % what)
        if r["kind"] == "simple":
            check(not (c.structured and cmd == xt.CMD_READ),
                  "%s: simple reply to a READ after structured replies were "
                  "negotiated" % what)
            err = r["error"]
            break
        chunks.append(r)
        if r["type"] & (1 << 15):
            p = r["payload"]
            check(len(p) >= 6, "%s: error chunk too short" % what)
            mlen, = struct.unpack(">H", p[4:6])
            check(mlen <= len(p) - 6, "%s: error message length %d > %d"
                  % (what, mlen, len(p) - 6))
            check(r["error"] != 0, "%s: error chunk with error 0" % what)
        else:
            check(r["type"] == xt.REPLY_TYPE_NONE,
                  "%s: content chunk type %d in a failing reply" % (what, r["type"]))
        if r["flags"] & xt.REPLY_FLAG_DONE:
            errs = [ch["error"] for ch in chunks if ch["error"]]
            err = errs[0] if errs else 0
            break
    check_eq(err, want, "%s: error" % what)


def transmission_errors(structured):
    def run():
        c = connect(structured=structured)
        kind = "structured" if structured else "simple"
        # read past the end and across it
        for off, n in ((SIZE, 1), (SIZE - 1, 2), (SIZE + MiB, 4096),
                       (2**64 - 1, 2), (2**63, 512)):
            expect_error(c, xt.CMD_READ, off, n, EINVAL,
                         "%s: read (%d, %d) past the end" % (kind, off, n))
            in_sync(c, "%s: after read past the end" % kind)
        # write past the end: ENOSPC, payload consumed
        for off, n in ((SIZE - 100, 200), (SIZE, 4096), (SIZE + 10 * MiB, 65536)):
            expect_error(c, xt.CMD_WRITE, off, n, ENOSPC,
                         "%s: write (%d, %d) past the end" % (kind, off, n),
                         data=b"\xee" * n)
            in_sync(c, "%s: after write past the end" % kind)
        check(ctx.img_tail_ok(), "a refused write past the end changed the image")
        # zero past the end: ENOSPC; trim/cache/block status past the end: EINVAL
        expect_error(c, xt.CMD_WRITE_ZEROES, SIZE - 4096, 8192, ENOSPC,
                     "%s: write-zeroes past the end" % kind)
        expect_error(c, xt.CMD_TRIM, SIZE - 4096, 8192, EINVAL,
                     "%s: trim past the end" % kind)
        expect_error(c, xt.CMD_CACHE, SIZE, 4096, EINVAL, "%s: cache past the end" % kind)
        if not structured:
            # no metadata context negotiated: BLOCK_STATUS is EINVAL
            expect_error(c, xt.CMD_BLOCK_STATUS, 0, 4096, EINVAL,
                         "%s: block status without a context" % kind)
        # unknown command types
        for t in (42, 8, 0x7fff, 0xffff):
            expect_error(c, t, 0, 4096, EINVAL, "%s: command type %d" % (kind, t))
            in_sync(c, "%s: after command type %d" % (kind, t))
        # invalid flags
        for cmd, fl, what in ((xt.CMD_READ, 0x8000, "unknown flag on READ"),
                              (xt.CMD_READ, xt.CMD_FLAG_REQ_ONE, "REQ_ONE on READ"),
                              (xt.CMD_READ, xt.CMD_FLAG_NO_HOLE, "NO_HOLE on READ"),
                              (xt.CMD_FLUSH, 0x40, "unknown flag on FLUSH"),
                              (xt.CMD_TRIM, xt.CMD_FLAG_DF, "DF on TRIM")):
            n = 0 if cmd == xt.CMD_FLUSH else 4096
            expect_error(c, cmd, 0, n, EINVAL, "%s: %s" % (kind, what), flags=fl)
            in_sync(c, "%s: after %s" % (kind, what))
        if not structured:
            # DF is only valid with structured replies (SEND_DF unset)
            expect_error(c, xt.CMD_READ, 0, 4096, EINVAL, "simple: DF on READ",
                         flags=xt.CMD_FLAG_DF)
        # invalid flags on a WRITE: EINVAL, and its payload is consumed
        for fl in (xt.CMD_FLAG_NO_HOLE, xt.CMD_FLAG_DF, 0x4000):
            expect_error(c, xt.CMD_WRITE, 1 * MiB, 8192, EINVAL,
                         "%s: flag %#x on WRITE" % (kind, fl), flags=fl,
                         data=b"\xdd" * 8192)
            in_sync(c, "%s: after flag %#x on WRITE" % (kind, fl))
        err, data = c.read(1 * MiB, 8192)
        check_bytes(data, model_read(1 * MiB, 8192), "refused writes changed data", MiB)
        # the maximum block size: 32 MiB reads work, one byte more does not
        err, data = c.read(8 * MiB, MAXB)
        check_eq(err, 0, "%s: error of a 32 MiB read" % kind)
        check_bytes(data, model_read(8 * MiB, MAXB), "%s: 32 MiB read" % kind, 8 * MiB)
        expect_error(c, xt.CMD_READ, 0, MAXB + 1, EINVAL, "%s: read of 32 MiB + 1" % kind)
        in_sync(c, "%s: after a read of 32 MiB + 1" % kind)
        # a 32 MiB + 1 write with its payload: an error, then in sync
        cookie = c.send_request(xt.CMD_WRITE, 0, MAXB + 1)
        sender = threading.Thread(target=c.s.sendall, args=(b"\xab" * (MAXB + 1),))
        sender.start()
        r = c.read_reply()
        sender.join(20)
        check_eq(r["cookie"], cookie, "cookie of the 32 MiB + 1 write's reply")
        if r["kind"] == "chunk":
            while not r["flags"] & xt.REPLY_FLAG_DONE:
                r2 = c.read_reply()
                check_eq(r2["cookie"], cookie, "cookie")
                r = dict(r2, error=r["error"] or r2["error"])
        check(r["error"] != 0, "%s: a write of 32 MiB + 1 succeeded" % kind)
        expect_eq(r["error"], EINVAL, "%s: error of a write of 32 MiB + 1" % kind)
        in_sync(c, "%s: after a 32 MiB + 1 write" % kind)
        err, data = c.read(0, 1 * MiB)
        check_bytes(data, model_read(0, 1 * MiB),
                    "%s: the refused 32 MiB + 1 write changed the image" % kind)
        # zero-length requests: unspecified, but no disconnect
        for cmd in (xt.CMD_READ, xt.CMD_WRITE, xt.CMD_TRIM, xt.CMD_WRITE_ZEROES):
            c.command(cmd, 4096, 0, data=b"" if cmd == xt.CMD_WRITE else None)
            in_sync(c, "%s: after a zero-length command %d" % (kind, cmd))
        c.close()
    run.__name__ = "transmission_errors_" + ("structured" if structured else "simple")
    return run


def structured_read_chunks():
    c = connect(structured=True)
    # mixed data and zeros, unaligned: the chunks tile the request exactly
    for off, n, flags in ((SIZE - 9 * MiB - 5, 3 * MiB + 11, 0),
                          (SIZE - 9 * MiB, 65536, xt.CMD_FLAG_DF),
                          (0, 1, 0), (SIZE - 1, 1, 0)):
        cookie = c.send_request(xt.CMD_READ, off, n, flags)
        cover = []
        while True:
            r = c.read_reply()
            check_eq(r["cookie"], cookie, "cookie")
            check_eq(r["kind"], "chunk", "reply kind of a structured read")
            p = r["payload"]
            if r["type"] == xt.REPLY_TYPE_OFFSET_DATA:
                o, = struct.unpack(">Q", p[:8])
                check(len(p) >= 9, "data chunk with no data")
                check_bytes(p[8:], model_read(o, len(p) - 8), "data chunk", o)
                cover.append((o, len(p) - 8, "data"))
            elif r["type"] == xt.REPLY_TYPE_OFFSET_HOLE:
                check_eq(len(p), 12, "hole chunk length")
                o, hn = struct.unpack(">QI", p)
                check(hn > 0, "empty hole chunk")
                check_eq(model_read(o, hn), bytes(hn), "hole chunk over data at %d" % o)
                cover.append((o, hn, "hole"))
            elif r["type"] != xt.REPLY_TYPE_NONE:
                xt.fail("unexpected chunk type %d" % r["type"])
            if r["flags"] & xt.REPLY_FLAG_DONE:
                break
        cover.sort()
        pos = off
        for o, ln, k in cover:
            check_eq(o, pos, "chunk offset in read (%d, %d)" % (off, n))
            pos += ln
        check_eq(pos, off + n, "end of chunks in read (%d, %d)" % (off, n))
        if flags & xt.CMD_FLAG_DF:
            check_eq(len(cover), 1, "content chunks with DF")
    c.close()


def bad_magic():
    c = connect()
    c.send_request(xt.CMD_READ, 0, 4096, magic=0x12345678)
    check(xt.is_closed(c.s, 5), "server did not close a connection after a "
          "request with bad magic")
    c.close()
    c = connect()
    in_sync(c, "new connection after a bad-magic request")
    c.close()


def abrupt_close_with_replies_pending():
    # the client vanishes (FIN or RST) while 160 MiB of replies are queued:
    # the server must drop that connection and nothing else (no SIGPIPE)
    for k, rst in enumerate((False, True, False, True)):
        c = connect(structured=k % 2 == 0)
        for i in range(10):
            c.send_request(xt.CMD_READ, i * MiB, 16 * MiB)
        if rst:
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.05)
        c.s.close()
    time.sleep(0.3)
    check(ctx.srv.alive(), "server died after clients vanished with replies pending")
    c = connect()
    in_sync(c, "after clients vanished")
    c.close()


def many_connections():
    cs = [connect(structured=i % 2 == 0) for i in range(100)]
    for i, c in enumerate(cs):
        off = i * 65536 + i
        err, d = c.read(off, 4096)
        check_eq(err, 0, "read on connection %d of 100" % i)
        check_bytes(d, model_read(off, 4096), "read on connection %d of 100" % i, off)
    for c in cs:
        c.close()


def pipelining():
    c = connect(structured=True)
    rnd = random.Random(77)
    reqs = {}
    wire = []
    # writes go to [48 MiB, 52 MiB), disjoint pieces; reads elsewhere
    wbase = 48 * MiB
    for i in range(64):
        off, n = wbase + i * 65536 + rnd.randrange(0, 1000), rnd.randrange(1, 60000)
        data = rnd.randbytes(n)
        cookie = 0xC0FFEE0000000000 + i
        wire.append(struct.pack(">IHHQQI", xt.REQUEST_MAGIC, 0, xt.CMD_WRITE,
                                cookie, off, n) + data)
        reqs[cookie] = ("write", off, n, data)
    for i in range(200):
        n = rnd.choice([1, 512, 4096, 65536, 100000, 1 * MiB])
        off = rnd.randrange(0, 40 * MiB)
        cookie = (2**64 - 1) - i
        wire.append(struct.pack(">IHHQQI", xt.REQUEST_MAGIC, 0, xt.CMD_READ,
                                cookie, off, n))
        reqs[cookie] = ("read", off, n, None)
    rnd.shuffle(wire)
    sender = threading.Thread(target=c.s.sendall, args=(b"".join(wire),))
    sender.start()
    bufs = {}
    done = {}
    order = []
    while len(done) < len(reqs):
        r = c.read_reply()
        ck = r["cookie"]
        check(ck in reqs, "reply with unknown cookie %#x" % ck)
        check(ck not in done, "reply after the final chunk for cookie %#x" % ck)
        kind, off, n, data = reqs[ck]
        check_eq(r["error"], 0, "error of pipelined %s (%d, %d)" % (kind, off, n))
        if r["kind"] == "chunk":
            b = bufs.setdefault(ck, bytearray(n) if kind == "read" else None)
            p = r["payload"]
            if r["type"] == xt.REPLY_TYPE_OFFSET_DATA:
                o, = struct.unpack(">Q", p[:8])
                b[o - off:o - off + len(p) - 8] = p[8:]
            final = r["flags"] & xt.REPLY_FLAG_DONE
        else:
            check(kind != "read", "simple reply to a structured read")
            final = True
        if final:
            done[ck] = bufs.get(ck)
            order.append(ck)
    sender.join(10)
    for ck, (kind, off, n, data) in reqs.items():
        if kind == "read":
            check_bytes(done[ck], model_read(off, n), "pipelined read (%d, %d)"
                        % (off, n), off)
    for ck, (kind, off, n, data) in reqs.items():
        if kind == "write":
            ctx.model[off:off + n] = data
    in_sync(c, "after pipelining")
    err, got = c.read(wbase, 4 * MiB)
    check_bytes(got, model_read(wbase, 4 * MiB), "pipelined writes", wbase)
    sent_order = [struct.unpack(">Q", w[8:16])[0] for w in wire]
    log("pipelining: %d requests, replies %s the order sent" % (
        len(reqs), "in" if order == sent_order else "not in"))
    c.close()


def disc_with_requests_in_flight():
    for structured in (False, True):
        c = connect(structured=structured)
        reads = {}
        wire = b""
        for i in range(16):
            off = i * MiB + 3
            ck = 1000 + i
            wire += struct.pack(">IHHQQI", xt.REQUEST_MAGIC, 0, xt.CMD_READ, ck,
                                off, 2 * MiB)
            reads[ck] = off
        data = b"\x5a" * 65536
        wire += struct.pack(">IHHQQI", xt.REQUEST_MAGIC, xt.CMD_FLAG_FUA, xt.CMD_WRITE,
                            2000, 56 * MiB, len(data)) + data
        wire += struct.pack(">IHHQQI", xt.REQUEST_MAGIC, 0, xt.CMD_DISC, 3000, 0, 0)
        c.s.sendall(wire)
        got = {}
        bufs = {}
        lens = {ck: 2 * MiB for ck in reads}
        while len(got) < len(reads) + 1:
            try:
                r = c.read_reply(lens)
            except Closed as e:
                xt.fail("%s: closed after DISC with %d of %d requests unanswered (%s)"
                        % ("structured" if structured else "simple",
                           len(reads) + 1 - len(got), len(reads) + 1, e))
            check(r["cookie"] != 3000, "a reply to NBD_CMD_DISC")
            if r["kind"] == "chunk" and r["cookie"] in reads:
                # assemble structured read data
                b = bufs.setdefault(r["cookie"], bytearray(2 * MiB))
                p = r["payload"]
                if r["type"] == xt.REPLY_TYPE_OFFSET_DATA:
                    o, = struct.unpack(">Q", p[:8])
                    off = reads[r["cookie"]]
                    b[o - off:o - off + len(p) - 8] = p[8:]
                check_eq(r["error"], 0, "error of a read before DISC")
                if r["flags"] & xt.REPLY_FLAG_DONE:
                    got[r["cookie"]] = bytes(b)
                continue
            check_eq(r["error"], 0, "error of a request before DISC")
            got[r["cookie"]] = r.get("data")
        for ck, off in reads.items():
            check_bytes(got[ck], model_read(off, 2 * MiB), "read before DISC", off)
        check(2000 in got, "no reply to the write before DISC")
        check(xt.is_closed(c.s, 5), "server did not close after DISC")
        c.close()
        ctx.model[56 * MiB:56 * MiB + len(data)] = data
    c = connect()
    in_sync(c, "after DISC")
    err, d = c.read(56 * MiB, 65536)
    check_bytes(d, model_read(56 * MiB, 65536), "write sent before DISC", 56 * MiB)
    c.close()


def readonly_write_eperm():
    c = connect(ctx.ro)
    check(c.tflags & xt.TFLAG_READ_ONLY, "read-only flag not set: %#x" % c.tflags)
    expect_error(c, xt.CMD_WRITE, 0, 4096, EPERM, "write on --readonly",
                 data=b"\x01" * 4096)
    err, d = c.read(0, 4096)
    check_eq(err, 0, "read on --readonly after a refused write")
    check_bytes(d, ctx.ro_data[:4096], "--readonly image after a refused write")
    expect_error(c, xt.CMD_WRITE, 12345, 100000, EPERM, "unaligned write on --readonly",
                 data=b"\x02" * 100000, flags=xt.CMD_FLAG_FUA)
    err, d = c.read(0, 200000)
    check_bytes(d, ctx.ro_data[:200000], "--readonly image after refused writes")
    c.close()


def oldstyle():
    # default server: newstyle (covered by greeting()); --oldstyle server:
    s = sock(ctx.old)
    magic, cliserv, size, flags = struct.unpack(">QQQI", xt.recv_exact(s, 28))
    check_eq(hex(magic), hex(xt.NBDMAGIC), "oldstyle NBDMAGIC")
    check_eq(hex(cliserv), hex(xt.OLDSTYLE_MAGIC), "oldstyle magic")
    check_eq(size, ctx.old_size, "oldstyle export size")
    check(flags & xt.TFLAG_HAS_FLAGS, "oldstyle flags %#x without HAS_FLAGS" % flags)
    check_eq(flags >> 16, 0, "handshake flags in the oldstyle flags field")
    check_eq(flags & 0x80, 0, "SEND_DF set for an oldstyle client")
    check_eq(xt.recv_exact(s, 124), bytes(124), "oldstyle reserved zeros")
    c = RawClient(s)
    err, d = c.read(0, 4096)
    check_eq(err, 0, "oldstyle read")
    check_eq(d, b"old!" * 1024, "oldstyle read data")
    c.close()
    if shutil.which("nbdinfo"):
        r = subprocess.run(["nbdinfo", "--json", ctx.old.uri], capture_output=True,
                           text=True, timeout=30)
        check(r.returncode == 0 and '"protocol": "oldstyle"' in r.stdout,
              "nbdinfo on --oldstyle: rc %d %s %s" % (r.returncode, r.stdout[:300],
                                                      r.stderr))


def test():
    xt.need_tools("nbdinfo")
    with xt.TestDir() as t:
        rnd = random.Random(12)
        data = rnd.randbytes(40 * MiB) + bytes(8 * MiB) + rnd.randbytes(SIZE - 48 * MiB)
        ctx.model = bytearray(data)
        img = t.image("disk.img", SIZE, data)

        def img_tail_ok():
            with open(img, "rb") as f:
                f.seek(SIZE - 4096)
                return f.read() == data[SIZE - 4096:]
        ctx.img_tail_ok = img_tail_ok
        ctx.srv = t.server(img)
        ctx.ro_data = rnd.randbytes(1 * MiB)
        ctx.ro = t.server(t.image("ro.img", 1 * MiB, ctx.ro_data), ["--readonly"])
        ctx.old_size = 1 * MiB
        ctx.old = t.server(t.image("old.img", ctx.old_size, b"old!" * 1024),
                           ["--oldstyle"])

        for fn in (greeting, unknown_option_then_go, list_with_data_invalid,
                   other_options, abort, unknown_client_flags, no_zeroes_choice,
                   oversized_option, oversized_option_in_sync,
                   handshake_in_one_packet, go_info_requests, meta_contexts,
                   transmission_errors(False),
                   transmission_errors(True), structured_read_chunks, bad_magic,
                   abrupt_close_with_replies_pending, many_connections,
                   pipelining, disc_with_requests_in_flight, readonly_write_eperm,
                   oldstyle):
            scenario(fn)
        for name, res, dt in scenario_results:
            log("%-40s %s (%.2f s)" % (name, res, dt))

        # ---- still serving after all that ----
        r = subprocess.run(["nbdinfo", "--size", ctx.srv.uri], capture_output=True,
                           text=True, timeout=30)
        check(r.returncode == 0 and r.stdout.strip() == str(SIZE),
              "nbdinfo after the negative tests: rc %d %r %r"
              % (r.returncode, r.stdout, r.stderr))
        c = connect()
        err, d = c.read(0, SIZE // 2)
        check_bytes(d, model_read(0, SIZE // 2), "first half after all tests")
        err, d = c.read(SIZE // 2, SIZE // 2)
        check_bytes(d, model_read(SIZE // 2, SIZE // 2), "second half after all tests",
                    SIZE // 2)
        c.close()
        for s in (ctx.srv, ctx.ro, ctx.old):
            check_eq(s.stop(), 0, "exit status of server on port %d" % s.port)


if __name__ == "__main__":
    xt.main(test)
