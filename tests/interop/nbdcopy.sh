#!/bin/bash
# nbdcopy round trips through xnbd-server: file -> export -> file with one
# connection and with several connections and threads (multi-conn), and
# export -> export between two servers; every copy must be byte-exact.
. "$(dirname "$0")/lib.sh"
require_tools nbdcopy

MIB=48
SRC=$T/src.img
IMG=$T/export.img
pattern_image "$SRC" $MIB 11 || fail "cannot make source image"
# zero runs, aligned and not, so nbdcopy's sparse handling is exercised
must dd if=/dev/zero of="$SRC" bs=1M seek=8 count=4 conv=notrunc status=none
must dd if=/dev/zero of="$SRC" bs=1 seek=$((20 * 1048576 + 333)) count=200000 conv=notrunc status=none
# the export starts full of other data: zeros in the source must be written
pattern_image "$IMG" $MIB 12 || fail "cannot make export image"

start_server "$IMG"
A_URI=$URI

# --- one connection ---
nbdcopy -C 1 -T 1 "$SRC" "$A_URI" || fail "nbdcopy file -> nbd (1 connection) failed"
cmp "$SRC" "$IMG" || fail "export image differs from the source after nbdcopy -C 1"
nbdcopy -C 1 -T 1 "$A_URI" "$T/out1.img" || fail "nbdcopy nbd -> file (1 connection) failed"
cmp "$SRC" "$T/out1.img" || fail "copy out of the export (1 connection) differs"

# --- several connections and threads ---
pattern_image "$T/src2.img" $MIB 13 || fail "cannot make second source"
must dd if=/dev/zero of="$T/src2.img" bs=1M seek=30 count=2 conv=notrunc status=none
nbdcopy -C 4 -T 4 -R 16 --request-size=262144 --flush "$T/src2.img" "$A_URI" ||
	fail "nbdcopy -C 4 -T 4 file -> nbd failed"
cmp "$T/src2.img" "$IMG" || fail "export image differs from src2 after nbdcopy -C 4 -T 4"
nbdcopy -C 4 -T 4 -R 16 --request-size=65536 "$A_URI" "$T/out2.img" ||
	fail "nbdcopy -C 4 -T 4 nbd -> file failed"
cmp "$T/src2.img" "$T/out2.img" || fail "copy out of the export (-C 4 -T 4) differs"
# with no sparse detection and big requests (32 MiB, the advertised maximum)
nbdcopy -C 2 -T 2 --no-extents --request-size=33554432 "$A_URI" "$T/out3.img" ||
	fail "nbdcopy --no-extents --request-size=33554432 failed"
cmp "$T/src2.img" "$T/out3.img" || fail "copy out with --no-extents differs"

# --- export -> export between two servers ---
make_image "$T/b.img" ${MIB}M
A_PID=$SERVER_PID A_LOG=$SERVER_LOG
start_server "$T/b.img"
B_URI=$URI
nbdcopy -C 4 -T 2 "$A_URI" "$B_URI" || fail "nbdcopy nbd -> nbd failed"
cmp "$T/src2.img" "$T/b.img" || fail "second export differs after nbdcopy nbd -> nbd"
# nbdcopy's own comparison tool (a read-only copy to null) over both
nbdcopy -C 4 "$B_URI" null: || fail "nbdcopy nbd -> null: failed"

stop_server "$SERVER_PID"
SERVER_LOG=$A_LOG
stop_server "$A_PID"
log PASS
