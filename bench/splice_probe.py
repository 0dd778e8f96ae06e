#!/usr/bin/python3
"""What would splicing WRITE payloads save?  A probe for bench/README.md.

A sender streams N MiB over loopback TCP; the receiver stores them into a
file (in the page cache, wrapping at --size) in 1 MiB pieces, either as
xnbd-server does now (recv into a buffer, then pwrite: two copies) or
with splice (socket -> pipe without a copy, pipe -> file: one copy).
Prints the receiver's wall time and CPU time for each, alternating runs.
This measures the kernel paths only, not a server.
"""
import argparse
import os
import resource
import socket
import sys
import tempfile
import threading
import time

MiB = 1 << 20


def sender(port, total):
    s = socket.create_connection(("127.0.0.1", port))
    buf = os.urandom(MiB)
    left = total
    while left:
        n = min(left, MiB)
        s.sendall(buf[:n])
        left -= n
    s.close()


def receive(conn, fd, total, size, how):
    off = 0
    left = total
    if how == "copy":
        buf = bytearray(MiB)
        view = memoryview(buf)
        while left:
            got = 0
            want = min(left, MiB)
            while got < want:
                n = conn.recv_into(view[got:want])
                if n == 0:
                    raise EOFError
                got += n
            os.pwrite(fd, view[:want], off)
            off = (off + want) % size
            left -= want
        return
    r, w = os.pipe()
    try:
        import fcntl
        fcntl.fcntl(w, 1031, MiB)  # F_SETPIPE_SZ
        while left:
            want = min(left, MiB)
            inpipe = 0
            while inpipe < want:
                n = os.splice(conn.fileno(), w, want - inpipe)
                if n == 0:
                    raise EOFError
                inpipe += n
            done = 0
            while done < want:
                n = os.splice(r, fd, want - done, offset_dst=off + done)
                done += n
            off = (off + want) % size
            left -= want
    finally:
        os.close(r)
        os.close(w)


def one(how, total, size, path):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    port = ls.getsockname()[1]
    t = threading.Thread(target=sender, args=(port, total))
    t.start()
    conn, _ = ls.accept()
    fd = os.open(path, os.O_RDWR)
    # The sender's thread shares this process: count the receiving
    # thread's CPU only.
    c0 = time.thread_time()
    w0 = time.monotonic()
    receive(conn, fd, total, size, how)
    w1 = time.monotonic()
    c1 = time.thread_time()
    os.close(fd)
    conn.close()
    ls.close()
    t.join()
    return total / MiB / (w1 - w0), (c1 - c0) / (total / (1 << 30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--total", type=int, default=4096, help="MiB per run")
    ap.add_argument("--size", type=int, default=1024, help="file MiB")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = os.path.join(d, "f")
        with open(path, "wb") as f:
            f.write(os.urandom(MiB) * a.size)
        res = {"copy": [], "splice": []}
        for i in range(a.runs):
            for how in (("copy", "splice") if i % 2 == 0 else
                        ("splice", "copy")):
                res[how].append(one(how, a.total * MiB, a.size * MiB, path))
        for how, v in res.items():
            v.sort()
            m = v[len(v) // 2]
            print("%-6s median %5.0f MiB/s, receiver %.2f CPU-s per GiB "
                  "(throughputs %s)" % (how, m[0], m[1],
                                        " ".join("%.0f" % x for x, _ in v)))


if __name__ == "__main__":
    main()
