#!/bin/bash
# nbdinfo against xnbd-server: export size, --list, --map of a sparse image
# with some data (holes as "hole,zero", data as "data"), and the flags the
# export advertises.
. "$(dirname "$0")/lib.sh"
require_tools nbdinfo

SIZE=$((32 * 1024 * 1024))
IMG=$T/disk.img
make_image "$IMG" $SIZE
# Data: 128 KiB at 1 MiB, 64 KiB at 20 MiB, the last 64 KiB of the image.
must dd if=/dev/urandom of="$IMG" bs=64K seek=16 count=2 conv=notrunc,fsync status=none
must dd if=/dev/urandom of="$IMG" bs=64K seek=320 count=1 conv=notrunc,fsync status=none
must dd if=/dev/urandom of="$IMG" bs=64K seek=511 count=1 conv=notrunc,fsync status=none
[ "$(stat -c %s "$IMG")" = $SIZE ] || fail "image size changed"

start_server "$IMG"

# --- size ---
got=$(nbdinfo --size "$URI") || fail "nbdinfo --size failed"
[ "$got" = $SIZE ] || fail "nbdinfo --size: expected $SIZE, got '$got'"

# --- flags and size through --json ---
nbdinfo --json "$URI" >"$T/info.json" || fail "nbdinfo --json failed"
"$PYTHON" - "$T/info.json" $SIZE <<'EOF' || fail "nbdinfo --json: wrong export description (see above)"
import json, sys
info = json.load(open(sys.argv[1]))
size = int(sys.argv[2])
bad = []
exports = info.get("exports", [])
if len(exports) != 1:
    bad.append("expected 1 export, got %d" % len(exports))
e = exports[0] if exports else {}
if info.get("protocol") != "newstyle-fixed":
    bad.append("protocol %r, expected newstyle-fixed" % info.get("protocol"))
if info.get("structured") is not True:
    bad.append("structured replies not negotiated")
if e.get("export-size") != size:
    bad.append("export-size %r, expected %d" % (e.get("export-size"), size))
expect = {"can_flush": True, "can_fua": True, "can_trim": True,
          "can_zero": True, "can_multi_conn": True, "is_read_only": False,
          "can_fast_zero": True, "can_df": True, "can_cache": True}
for k, v in expect.items():
    if e.get(k) is not v:
        bad.append("%s is %r, expected %r" % (k, e.get(k), v))
if "base:allocation" not in e.get("contexts", []):
    bad.append("base:allocation not among contexts %r" % e.get("contexts"))
mx = e.get("block_size_maximum")
if mx is not None and mx < 32 * 1024 * 1024 and mx < size:
    bad.append("block_size_maximum %r below 32 MiB" % mx)
for b in bad:
    print("nbdinfo --json:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

# --- the same flags through nbdinfo --can / --is (exit 0 = true) ---
for f in flush fua trim zero multi-conn; do
	nbdinfo --can "$f" "$URI" || fail "nbdinfo --can $f: expected true (0), got status $?"
done
nbdinfo --is readonly "$URI"
rc=$?
[ $rc = 2 ] || fail "nbdinfo --is readonly: expected false (status 2), got status $rc"

# --- --list ---
nbdinfo --list "$URI" >"$T/list.txt" || fail "nbdinfo --list failed"
grep -q '^export="":' "$T/list.txt" || { cat "$T/list.txt" >&2; fail "nbdinfo --list does not show the export \"\""; }
n=$(grep -c '^export=' "$T/list.txt")
[ "$n" = 1 ] || { cat "$T/list.txt" >&2; fail "nbdinfo --list: expected 1 export, got $n"; }
grep -q "export-size: $SIZE" "$T/list.txt" || { cat "$T/list.txt" >&2; fail "nbdinfo --list: export-size $SIZE missing"; }
# Any name is served as the one image.
got=$(nbdinfo --size "nbd://127.0.0.1:$PORT/some-other-name") ||
	fail "nbdinfo with export name 'some-other-name' failed"
[ "$got" = $SIZE ] || fail "export 'some-other-name': size $got, expected $SIZE"

# --- --map ---
nbdinfo --map --json "$URI" >"$T/map.json" || fail "nbdinfo --map failed"
"$PYTHON" - "$T/map.json" $SIZE <<'EOF' || fail "nbdinfo --map: wrong allocation map (see above)"
import json, sys
M = 1 << 20
K = 1 << 10
size = int(sys.argv[2])
ext = json.load(open(sys.argv[1]))
# merge adjacent extents of one type; a server may split them as it likes
merged = []
pos = 0
for e in ext:
    if e["offset"] != pos:
        print("map not contiguous at %d: %r" % (pos, e), file=sys.stderr)
        sys.exit(1)
    pos += e["length"]
    if merged and merged[-1][2] == e["description"]:
        merged[-1][1] += e["length"]
    else:
        merged.append([e["offset"], e["length"], e["description"]])
if pos != size:
    print("map covers %d bytes, expected %d" % (pos, size), file=sys.stderr)
    sys.exit(1)
expected = [
    [0, 1 * M, "hole,zero"],
    [1 * M, 128 * K, "data"],
    [1 * M + 128 * K, 20 * M - (1 * M + 128 * K), "hole,zero"],
    [20 * M, 64 * K, "data"],
    [20 * M + 64 * K, size - 64 * K - (20 * M + 64 * K), "hole,zero"],
    [size - 64 * K, 64 * K, "data"],
]
if merged != expected:
    print("nbdinfo --map gave:", file=sys.stderr)
    for m in merged:
        print("  %10d %10d %s" % tuple(m), file=sys.stderr)
    print("expected:", file=sys.stderr)
    for m in expected:
        print("  %10d %10d %s" % tuple(m), file=sys.stderr)
    sys.exit(1)
EOF
# The plain-text map says the same.
nbdinfo --map "$URI" >"$T/map.txt" || fail "nbdinfo --map (text) failed"
grep -q ' 3  hole,zero$' "$T/map.txt" || fail "nbdinfo --map text has no 'hole,zero' extent"
grep -q ' 0  data$' "$T/map.txt" || fail "nbdinfo --map text has no 'data' extent"

# A sub-range map: --map over [1 MiB, 1 MiB + 128 KiB) is one data extent.
"$PYTHON" - "$PORT" <<'EOF' || fail "block status of a sub-range wrong"
import sys
try:
    import nbd
except ImportError:
    sys.exit(0)
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_tcp("127.0.0.1", sys.argv[1])
got = []
def cb(ctx, off, entries, err):
    got.extend(entries)
h.block_status(128 * 1024, 1 << 20, cb)
if not got or got[1] != 0:
    print("block status of the data range: %r" % got, file=sys.stderr)
    sys.exit(1)
h.shutdown()
EOF

stop_server
log PASS
