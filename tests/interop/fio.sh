#!/bin/bash
# fio's nbd engine against xnbd-server: randwrite + verify at iodepth 32
# with 4 jobs (a connection each, each in its own region), a verify-only
# rerun from new connections, and a randread run; fio must exit 0 and
# report no errors.
. "$(dirname "$0")/lib.sh"
require_tools fio
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd ioengine"

JOBS=4
REGION_MIB=12
IMG=$T/disk.img
make_image "$IMG" $((JOBS * REGION_MIB))M
start_server "$IMG"
# fio leaves *-verify.state files in its working directory
cd "$T" || fail "cannot cd to $T"

# run_fio NAME ARGS...: run fio with JSON output; fail unless it exits 0
# and every job reports error 0 and, if verifying, no verify errors.
run_fio() {
	local name=$1
	shift
	fio --name="$name" --ioengine=nbd --uri="$URI" --output-format=json \
		--output="$T/$name.json" "$@" >"$T/$name.out" 2>&1
	local rc=$?
	if [ $rc != 0 ] || grep -qiE 'verify|bad magic|crc' "$T/$name.out"; then
		cat "$T/$name.out" >&2
		[ -s "$T/$name.json" ] && grep -E '"error"|"jobname"' "$T/$name.json" >&2
		fail "fio $name failed (status $rc)"
	fi
	"$PYTHON" - "$T/$name.json" "$name" <<'EOF' || fail "fio $name: job errors (see above)"
import json, sys
text = open(sys.argv[1]).read()
# fio may print notes before the JSON document
doc = json.loads(text[text.index("{"):])
bad = 0
for j in doc["jobs"]:
    if j.get("error", 0) != 0:
        print("job %s: error %s" % (j["jobname"], j["error"]), file=sys.stderr)
        bad += 1
    io = j["read"]["io_bytes"] + j["write"]["io_bytes"]
    if io == 0:
        print("job %s did no I/O" % j["jobname"], file=sys.stderr)
        bad += 1
print("fio %s: %d jobs, %.1f MiB read, %.1f MiB written" % (
    sys.argv[2], len(doc["jobs"]),
    sum(j["read"]["io_bytes"] for j in doc["jobs"]) / 2**20,
    sum(j["write"]["io_bytes"] for j in doc["jobs"]) / 2**20), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
}

COMMON=(--numjobs=$JOBS --size=${REGION_MIB}M --offset_increment=${REGION_MIB}M
	--iodepth=32 --group_reporting=0)

# randwrite, then fio reads every block back and checks its checksum
run_fio randwrite-verify "${COMMON[@]}" --rw=randwrite --bsrange=4k-64k \
	--bs_unaligned=0 --verify=crc32c --do_verify=1 --verify_fatal=1 \
	--verify_backlog=0 --randseed=1234

# new connections, only verify what the previous run wrote
run_fio verify-only "${COMMON[@]}" --rw=randwrite --bsrange=4k-64k \
	--verify=crc32c --verify_only=1 --verify_fatal=1 --randseed=1234

# the verification is real: corrupt one block behind fio's back (in the
# image file) and verify-only must now fail
printf 'garbage' | dd of="$IMG" bs=1 seek=$((5 * 1048576 + 100)) conv=notrunc status=none ||
	fail "cannot corrupt the image"
fio --name=verify-corrupt --ioengine=nbd --uri="$URI" "${COMMON[@]}" --rw=randwrite \
	--bsrange=4k-64k --verify=crc32c --verify_only=1 --verify_fatal=1 \
	--randseed=1234 >"$T/verify-corrupt.out" 2>&1 &&
	fail "fio verify-only passed over a corrupted image: its checks prove nothing"

# randread over everything, 4k and mixed sizes
run_fio randread "${COMMON[@]}" --rw=randread --bs=4k --io_size=${REGION_MIB}M
run_fio randread-mixed "${COMMON[@]}" --rw=randread --bsrange=512-128k

# mixed random reads and writes with verification, 4 KiB blocks
run_fio randrw-verify "${COMMON[@]}" --rw=randrw --bs=4k --verify=md5 \
	--do_verify=1 --verify_fatal=1 --randseed=99

stop_server
log PASS
