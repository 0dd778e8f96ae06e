#!/bin/bash
# libxnbd's NBD client (tests/interop/client-test.c) against xnbd-server in
# each handshake style, read-only, and against nbdkit with replies delayed
# and reordered, with and without structured replies.
. "$(dirname "$0")/lib.sh"
require_tools nbdkit
: "${CLIENT_TEST:?}"

run() { "$CLIENT_TEST" "$@" || fail "client-test $* failed"; }

make_image "$T/disk.img" 64M
start_server "$T/disk.img"
run 127.0.0.1 "$PORT"
stop_server
start_server --oldstyle "$T/disk.img"
run 127.0.0.1 "$PORT"
stop_server
start_server --readonly "$T/disk.img"
run 127.0.0.1 "$PORT" readonly
stop_server

# nbdkit: reads are delayed and writes are not, so replies come back out of
# order; once with structured replies and once without.
for sr in "" --no-sr; do
	port=$(free_port)
	nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$port" $sr \
		--filter=delay memory 64M rdelay=2ms &
	pid=$!
	SERVER_PIDS+=("$pid")
	wait_port 127.0.0.1 "$port" "$pid" || fail "nbdkit did not start"
	run 127.0.0.1 "$port"
	kill_pid "$pid"
	forget_pid "$pid"
done
echo "client.sh: all checks passed"
