#!/bin/bash
# qemu-img and qemu-io against xnbd-server: convert into and out of the
# export (raw and qcow2), qemu-img compare, qemu-img info/map, and qemu-io
# pattern writes and verified reads (aligned, unaligned, zeroes, discard).
. "$(dirname "$0")/lib.sh"
require_tools qemu-img qemu-io

MIB=32
SIZE=$((MIB * 1024 * 1024))
SRC=$T/src.img
IMG=$T/export.img
pattern_image "$SRC" $MIB 3 || fail "cannot make source image"
# Give the source some zero ranges too (qemu-img convert skips zeros).
must dd if=/dev/zero of="$SRC" bs=1M seek=4 count=3 conv=notrunc status=none
must dd if=/dev/zero of="$SRC" bs=4k seek=4000 count=5 conv=notrunc status=none
# The export starts as unrelated data, so skipped zeros would show.
pattern_image "$IMG" $MIB 4 || fail "cannot make export image"

start_server "$IMG"
NBD="nbd://127.0.0.1:$PORT"

# --- qemu-img info ---
qemu-img info --output=json -f raw "$NBD" >"$T/info.json" || fail "qemu-img info failed"
grep -q "\"virtual-size\": $SIZE" "$T/info.json" ||
	{ cat "$T/info.json" >&2; fail "qemu-img info: virtual-size is not $SIZE"; }

# --- convert file -> export ---
qemu-img convert -n -f raw -O raw "$SRC" "$NBD" || fail "qemu-img convert to the export failed"
qemu-img compare -f raw -F raw "$SRC" "$NBD" ||
	fail "qemu-img compare source vs export: differ after convert (status $?)"
cmp "$SRC" "$IMG" || fail "image file differs from the source after convert to the export"

# --- convert export -> file (raw and qcow2) ---
qemu-img convert -f raw -O raw "$NBD" "$T/out.raw" || fail "qemu-img convert from the export failed"
cmp "$SRC" "$T/out.raw" || fail "raw copy of the export differs from the source"
qemu-img convert -f raw -O qcow2 "$NBD" "$T/out.qcow2" || fail "qemu-img convert export -> qcow2 failed"
qemu-img compare -f qcow2 -F raw "$T/out.qcow2" "$NBD" ||
	fail "qemu-img compare qcow2 copy vs export: differ (status $?)"
# qcow2 -> export with many requests in flight (-W: out of order writes, -m 8 coroutines)
pattern_image "$T/src2.img" $MIB 5 || fail "cannot make second source"
qemu-img convert -n -W -m 8 -f raw -O raw "$T/src2.img" "$NBD" ||
	fail "qemu-img convert -W -m 8 to the export failed"
qemu-img compare -f raw -F raw "$T/src2.img" "$NBD" || fail "export differs from src2 after convert -W -m 8"
# compare must notice a difference (so it can fail above)
qemu-img compare -q -f raw -F raw "$SRC" "$NBD"
[ $? = 1 ] || fail "qemu-img compare did not report different images as different"

# --- qemu-img map: the zeros written by qemu-img are reported as zero ---
qemu-img convert -n -f raw -O raw "$SRC" "$NBD" || fail "convert (again) failed"
qemu-img map --output=json -f raw "$NBD" >"$T/map.json" || fail "qemu-img map failed"
"$PYTHON" - "$T/map.json" "$SRC" <<'EOF' || fail "qemu-img map: zero extents hold data (see above)"
import json, sys
m = json.load(open(sys.argv[1]))
data = open(sys.argv[2], "rb").read()
end = 0
for e in m:
    if e["start"] != end:
        print("map gap at %d" % end, file=sys.stderr); sys.exit(1)
    end = e["start"] + e["length"]
    if e.get("zero") and data[e["start"]:end].count(0) != e["length"]:
        print("extent %r reported zero but holds data" % e, file=sys.stderr)
        sys.exit(1)
if end != len(data):
    print("map covers %d of %d bytes" % (end, len(data)), file=sys.stderr); sys.exit(1)
EOF

# --- qemu-io pattern checks ---
QIO=(qemu-io -f raw "$NBD")
qio() {
	# Run qemu-io commands; fail on a non-zero status or any error output.
	local out
	out=$("${QIO[@]}" "$@" 2>&1)
	local rc=$?
	echo "$out" >"$T/qio.out"
	if [ $rc != 0 ] || grep -qiE 'fail|error|mismatch' <<<"$out"; then
		echo "$out" >&2
		fail "qemu-io $* (status $rc)"
	fi
}
qio -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 1M 1M' -c 'write -P 0x11 1000 5000' \
	-c 'write -P 0x22 65535 2' -c 'write -P 0x33 31M 1M' -c 'write -P 0x44 32767k 1k' \
	-c 'flush'
# Read back in a separate process and connection.
qio -c 'read -P 0xab 0 1000' -c 'read -P 0x11 1000 5000' -c 'read -P 0xab 6000 59535' \
	-c 'read -P 0x22 65535 2' -c 'read -P 0xab 65537 0' -c 'read -P 0xcd 1M 1M' \
	-c 'read -P 0x33 31M 1023k' -c 'read -P 0x44 32767k 1k'
# A wrong pattern must be detected (so the checks above can fail).
out=$("${QIO[@]}" -c 'read -P 0x55 1M 4k' 2>&1)
grep -q 'Pattern verification failed' <<<"$out" ||
	{ echo "$out" >&2; fail "qemu-io did not report a wrong pattern"; }
# Write zeroes, discard, and asynchronous writes in flight together.
qio -c 'write -z 1M 256k' -c 'read -P 0 1M 256k' -c 'read -P 0xcd 1280k 768k' \
	-c 'write -z -u 2M 1M' -c 'read -P 0 2M 1M'
qio -c 'aio_write -P 0x61 8M 512k' -c 'aio_write -P 0x62 9M 512k' \
	-c 'aio_write -P 0x63 10M 512k' -c 'aio_write -P 0x64 11M 3' -c 'aio_flush' \
	-c 'read -P 0x61 8M 512k' -c 'read -P 0x62 9M 512k' -c 'read -P 0x63 10M 512k' \
	-c 'read -P 0x64 11M 3'
qio -c 'discard 12M 1M' -c 'write -P 0x77 12M 4k' -c 'read -P 0x77 12M 4k'
# The image file agrees with what qemu-io wrote.
"$PYTHON" - "$IMG" <<'EOF' || fail "image file does not hold what qemu-io wrote"
import sys
d = open(sys.argv[1], "rb").read()
M = 1 << 20
checks = [(0, 1000, 0xab), (1000, 5000, 0x11), (65535, 2, 0x22), (M, 256 << 10, 0),
          (M + (256 << 10), 768 << 10, 0xcd), (2 * M, M, 0), (8 * M, 512 << 10, 0x61),
          (11 * M, 3, 0x64), (12 * M, 4096, 0x77), (31 * M, 1023 << 10, 0x33),
          (32 * M - 1024, 1024, 0x44)]
for off, n, b in checks:
    if d[off:off + n] != bytes([b]) * n:
        print("image at %d (+%d) is not 0x%02x" % (off, n, b), file=sys.stderr)
        sys.exit(1)
EOF
# Reads beyond the end are refused by qemu itself (the export size is right).
out=$("${QIO[@]}" -c 'read 32M 1' 2>&1)
grep -qiE 'out of|error|invalid|beyond|range' <<<"$out" ||
	{ echo "$out" >&2; fail "qemu-io read past the end did not fail"; }

stop_server
log PASS
