#!/bin/bash
# bench/throttle.sh: what the dirty-page throttle does to another client.
#
#   bench/throttle.sh [XNBD_SERVER [WRITE_BS [DIR]]]
#
# Serves a new sparse 12 GiB image in DIR (default: a temporary directory
# under /var/tmp; it needs 12 GiB free) with XNBD_SERVER (default:
# build/server/xnbd-server) on a free loopback port, then for 20 s one fio
# client writes it sequentially (WRITE_BS, default 1m, depth 8), faster
# than the disk takes it, while another reads 4 KiB at depth 1.  Prints
# the writer's MiB/s and the reader's IOPS and latency percentiles: a
# stall of the server's loop thread shows in the reader's slowest reads.
# Not part of bench.py's suite (doc/design.md, "Spliced writes are made
# on the loop thread too").
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
srv=${1:-$here/build/server/xnbd-server}
bs=${2:-1m}
made=
if [ $# -ge 3 ]; then dir=$3; else dir=$(mktemp -d /var/tmp/xnbd-throttle.XXXXXX); made=1; fi
img=$dir/throttle.img
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -f "$img"
truncate -s 12G "$img"
"$srv" --target --laddr 127.0.0.1 --lport "$port" "$img" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$img" "$dir"/w.json "$dir"/r.json; [ -z "$made" ] || rmdir "$dir"' EXIT
for _ in $(seq 100); do
	ss -ltn | grep -q "127.0.0.1:$port " && break
	sleep 0.1
done
fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$port" --rw=write \
	--bs="$bs" --iodepth=8 --size=12g --time_based --runtime=20 \
	--output-format=json >"$dir/w.json" 2>/dev/null &
w=$!
fio --name=r --ioengine=nbd --uri="nbd://127.0.0.1:$port" --rw=randread \
	--bs=4k --iodepth=1 --size=64m --time_based --runtime=20 \
	--output-format=json >"$dir/r.json" 2>/dev/null
wait $w
python3 - "$dir/w.json" "$dir/r.json" <<'P'
import json, sys
def job(f):
    s = open(f).read()
    return json.loads(s[s.index("{"):])["jobs"][0]
w, r = job(sys.argv[1]), job(sys.argv[2])
p = r["read"]["clat_ns"]["percentile"]
print("writer %.0f MiB/s; reader %.0f IOPS, latency (us) p50 %.0f p99 %.0f "
      "p99.9 %.0f p99.99 %.0f max %.0f" % (
          w["write"]["bw"] / 1024, r["read"]["iops"], p["50.000000"] / 1e3,
          p["99.000000"] / 1e3, p["99.900000"] / 1e3, p["99.990000"] / 1e3,
          r["read"]["clat_ns"]["max"] / 1e3))
P
