#!/bin/bash
# Live migration end to end, across three network namespaces made here:
#
#   host A (10.231.1.1)  xnbd-server --target on the source image
#   host B (10.231.1.2, 10.231.2.1)  xnbd-server --proxy of A
#   client (10.231.2.2)  fio --ioengine=nbd on B
#
# A veth pair links A and B, another B and the client; the client cannot
# reach A at all.  fio runs two verifying jobs on B for the whole test: a
# reader of the first region, whose content was written on A beforehand
# in fio's verifiable format (so every read, fetched from A, from B's cache
# or, after the switch, from B alone, checks its block's checksum and
# offset), and a writer of unaligned 6 KiB blocks in the second region,
# each read back and checked soon after (verify_backlog).  Meanwhile
# xnbd-bgctl on B refuses --switch while blocks are missing, runs
# --cache-all, then --switch; then A's server is stopped (SIGTERM by PID).
# fio must still be running then, go on after A is gone, and end with no
# error and no verify failure; --query must say "switched" and 100%; a full
# sequential verify of the first region after A is gone must pass; and A's
# image must be unchanged.  Skipped (77) only when namespaces cannot be made
# (not root, no `ip netns`) or fio has no nbd engine.
. "$(dirname "$0")/lib.sh"
require_tools fio ip
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd ioengine"
: "${XNBD_BGCTL:=$(dirname "$XNBD_SERVER")/../bgctl/xnbd-bgctl}"
[ -x "$XNBD_BGCTL" ] || fail "xnbd-bgctl not found at $XNBD_BGCTL"

NSA=xnbd-mig-$$-a
NSB=xnbd-mig-$$-b
NSC=xnbd-mig-$$-c
A_IP=10.231.1.1
B_UP_IP=10.231.1.2
B_IP=10.231.2.1
C_IP=10.231.2.2
NBD_PORT=10809
READ_MIB=224    # the region fio reads (filled on A beforehand)
WRITE_MIB=32    # the region fio writes
# fio's pace: slow enough that most of the source is still on A alone when
# --cache-all starts (at 2 s), so that fio's reads race the fill
READ_RATE=8m
WRITE_RATE=4m
RUNTIME=15      # seconds fio runs; the migration must be over well before
NAMESPACES=()
FIO_PID=

[ "$(id -u)" = 0 ] || skip "network namespaces need root"

# Stop everything started here, by PID, and delete the namespaces (their
# veth pairs go with them), whatever happened; then lib.sh's cleanup.
mig_cleanup() {
	local rc=$? ns
	trap - EXIT
	[ -n "$FIO_PID" ] && kill_pid "$FIO_PID"
	for pid in "${SERVER_PIDS[@]}"; do
		kill_pid "$pid"
	done
	SERVER_PIDS=()
	for ns in "${NAMESPACES[@]}"; do
		ip netns del "$ns" 2>/dev/null || log "could not delete namespace $ns"
	done
	(exit $rc)
	cleanup
}
trap mig_cleanup EXIT

for ns in "$NSA" "$NSB" "$NSC"; do
	if ! ip netns add "$ns" 2>"$T/netns.err"; then
		[ ${#NAMESPACES[@]} = 0 ] && skip "cannot create a network namespace: $(cat "$T/netns.err")"
		fail "cannot create namespace $ns: $(cat "$T/netns.err")"
	fi
	NAMESPACES+=("$ns")
	must ip -n "$ns" link set lo up
done
must ip -n "$NSA" link add eth0 type veth peer name up0 netns "$NSB"
must ip -n "$NSC" link add eth0 type veth peer name down0 netns "$NSB"
must ip -n "$NSA" addr add $A_IP/24 dev eth0
must ip -n "$NSB" addr add $B_UP_IP/24 dev up0
must ip -n "$NSB" addr add $B_IP/24 dev down0
must ip -n "$NSC" addr add $C_IP/24 dev eth0
for pair in "$NSA eth0" "$NSB up0" "$NSB down0" "$NSC eth0"; do
	set -- $pair
	must ip -n "$1" link set "$2" up
done
log "namespaces $NSA ($A_IP), $NSB ($B_UP_IP, $B_IP), $NSC ($C_IP)"

# ns_wait_port NS ADDR PORT PID: like wait_port, from inside NS.
ns_wait_port() {
	local ns=$1
	shift
	ip netns exec "$ns" "$PYTHON" - "$@" <<'EOF'
import os, socket, sys, time
addr, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
end = time.time() + 10
while time.time() < end:
    try:
        socket.create_connection((addr, port), 0.5).close()
        sys.exit(0)
    except OSError:
        pass
    try:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(2)
    except (OSError, IndexError):
        sys.exit(2)
    time.sleep(0.05)
sys.exit(1)
EOF
}

# bgctl ARGS...: xnbd-bgctl run on host B.
bgctl() {
	ip netns exec "$NSB" "$XNBD_BGCTL" "$@"
}

# query_field FIELD: one field of B's --query --json.
query_field() {
	bgctl --query --json "$CTL" | "$PYTHON" -c \
		'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

cd "$T" || fail "cannot cd to $T"
IMG=$T/source.img
make_image "$IMG" $((READ_MIB + WRITE_MIB))M
must fio --name=fill --filename="$IMG" --ioengine=psync --rw=write --bs=64k \
	--size=${READ_MIB}M --verify=crc32c --do_verify=0 --output="$T/fill.out"
SHA_BEFORE=$(sha256sum <"$IMG")

# Host A: the source.
A_LOG=$T/a.log
ip netns exec "$NSA" "$XNBD_SERVER" --target --laddr $A_IP --lport $NBD_PORT \
	--logpath "$A_LOG" "$IMG" &
A_PID=$!
SERVER_PIDS+=("$A_PID")
ns_wait_port "$NSA" $A_IP $NBD_PORT $A_PID || fail "A's server did not start: $(cat "$A_LOG")"
log "A: xnbd-server --target pid $A_PID on $A_IP:$NBD_PORT"

# Host B: the proxy of A.
SERVER_LOG=$T/b.log
CTL=$T/b.ctl
ip netns exec "$NSB" "$XNBD_SERVER" --proxy --laddr $B_IP --lport $NBD_PORT \
	--logpath "$SERVER_LOG" $A_IP $NBD_PORT "$T/b.cache" "$T/b.bitmap" "$CTL" &
B_PID=$!
SERVER_PIDS+=("$B_PID")
ns_wait_port "$NSB" $B_IP $NBD_PORT $B_PID || fail "B's proxy did not start"
log "B: xnbd-server --proxy pid $B_PID on $B_IP:$NBD_PORT, upstream $A_IP:$NBD_PORT"
ip netns exec "$NSC" "$PYTHON" -c "
import socket, sys
try:
    socket.create_connection(('$A_IP', $NBD_PORT), 1).close()
except OSError:
    sys.exit(0)
sys.exit(1)" || fail "the client namespace reaches A directly: the topology is wrong"

# The client: fio on B for RUNTIME seconds.
ip netns exec "$NSC" fio --output-format=json --output="$T/fio.json" \
	--ioengine=nbd --uri="nbd://$B_IP:$NBD_PORT/" --time_based \
	--runtime=$RUNTIME --iodepth=16 --verify=crc32c --verify_fatal=1 \
	--name=reader --rw=randread --bs=64k --offset=0 --size=${READ_MIB}M \
	--rate=$READ_RATE \
	--name=writer --rw=randwrite --bs=6k --offset=${READ_MIB}M \
	--size=${WRITE_MIB}M --verify_backlog=16 --rate=$WRITE_RATE >"$T/fio.out" 2>&1 &
FIO_PID=$!
T0=$(date +%s.%N)
elapsed() { "$PYTHON" -c "import time; print('%.1f' % (time.time() - $T0))"; }

sleep 2
kill -0 $FIO_PID 2>/dev/null || { cat "$T/fio.out" >&2; fail "fio ended at once"; }
STATE=$(query_field state) || fail "--query on B failed"
[ "$STATE" = connected ] || fail "B's state is $STATE before the migration, expected connected"
PCT=$(query_field cached-percent)
log "$(elapsed) s: fio runs; B has $PCT% cached"
bgctl --switch "$CTL" >"$T/switch0.out" 2>&1
rc=$?
[ $rc = 1 ] || fail "--switch with blocks missing: exit $rc, expected 1 (refused): $(cat "$T/switch0.out")"
[ "$(query_field state)" = connected ] || fail "a refused --switch changed B's state"

bgctl --cache-all "$CTL" >"$T/cache-all.out" 2>&1 ||
	fail "--cache-all failed (status $?): $(cat "$T/cache-all.out")"
PCT=$(query_field cached-percent)
log "$(elapsed) s: --cache-all done ($PCT% cached)"
bgctl --switch "$CTL" >"$T/switch.out" 2>&1 ||
	fail "--switch after --cache-all failed (status $?): $(cat "$T/switch.out")"
STATE=$(query_field state)
[ "$STATE" = switched ] || fail "B's state is $STATE after --switch, expected switched"
log "$(elapsed) s: B switched"

kill -0 $FIO_PID 2>/dev/null ||
	fail "fio ended before A was stopped: the migration took too long for RUNTIME=$RUNTIME"
stop_server "$A_PID"
log "$(elapsed) s: A's server (pid $A_PID) stopped; fio goes on against B alone"
sleep 2
kill -0 $FIO_PID 2>/dev/null ||
	fail "fio ended within 2 s of A's stop (it should run until $RUNTIME s): $(tail -n 20 "$T/fio.out")"

wait $FIO_PID
rc=$?
FIO_PID=
log "$(elapsed) s: fio ended with status $rc"
if [ $rc != 0 ] || grep -qiE 'verify|bad magic|crc|error' "$T/fio.out"; then
	cat "$T/fio.out" >&2
	fail "fio failed across the migration (status $rc)"
fi
"$PYTHON" - "$T/fio.json" <<'EOF' || fail "fio reported job errors (see above)"
import json, sys
text = open(sys.argv[1]).read()
doc = json.loads(text[text.index("{"):])
bad = 0
for j in doc["jobs"]:
    r, w = j["read"], j["write"]
    print("fio %s: error %d, %.1f MiB read (%d reads), %.1f MiB written "
          "(%d writes)" % (j["jobname"], j["error"], r["io_bytes"] / 2**20,
                           r["total_ios"], w["io_bytes"] / 2**20,
                           w["total_ios"]), file=sys.stderr)
    if j["error"]:
        bad += 1
    if j["jobname"] == "writer" and (w["total_ios"] == 0 or r["total_ios"] == 0):
        print("the writer did not both write and verify", file=sys.stderr)
        bad += 1
    if j["jobname"] == "reader" and r["total_ios"] == 0:
        print("the reader did not read", file=sys.stderr)
        bad += 1
sys.exit(1 if bad else 0)
EOF

STATE=$(query_field state)
PCT=$(query_field cached-percent)
[ "$STATE" = switched ] || fail "B's state is $STATE at the end, expected switched"
[ "$PCT" = 100 ] || [ "$PCT" = 100.0 ] || fail "B has $PCT% cached at the end, expected 100"

# Every block of the source, read from B alone, in fio's format.
ip netns exec "$NSC" fio --name=final-verify --ioengine=nbd \
	--uri="nbd://$B_IP:$NBD_PORT/" --rw=read --bs=64k --size=${READ_MIB}M \
	--iodepth=16 --verify=crc32c --verify_fatal=1 >"$T/final.out" 2>&1 ||
	{ cat "$T/final.out" >&2; fail "the full verify of the source region on B failed"; }

[ "$(sha256sum <"$IMG")" = "$SHA_BEFORE" ] || fail "A's image changed: the proxy wrote upstream"
grep -qiE 'error|warn' "$SERVER_LOG" && { log "B's log:"; cat "$SERVER_LOG" >&2; }
stop_server "$B_PID"
log PASS
