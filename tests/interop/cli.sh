#!/bin/bash
# The command line of xnbd-server: help, version, errors and their exit
# statuses, a port already in use.  (--daemonize: daemonize.sh.)
. "$(dirname "$0")/lib.sh"
require_tools nbdinfo

make_image "$T/disk.img" 16M

timeout 10 "$XNBD_SERVER" --help >"$T/out" || fail "--help failed"
grep -q -- "--target" "$T/out" && grep -q -- "--cow-target" "$T/out" ||
	fail "--help does not describe the modes"
timeout 10 "$XNBD_SERVER" --version >"$T/out" || fail "--version failed"
grep -q "^xnbd-server [0-9]" "$T/out" || fail "--version prints no version"

expect_exit 2 "mode is required" "$T/disk.img"
expect_exit 2 "unknown" --target --no-such-option "$T/disk.img"
expect_exit 2 "missing" --target
expect_exit 2 "exactly one" --target "$T/disk.img" "$T/disk.img"
expect_exit 2 "invalid port" --target --lport 0 "$T/disk.img"
expect_exit 2 "invalid port" --target --lport 70000 "$T/disk.img"
expect_exit 2 "invalid port" --target --lport abc "$T/disk.img"
expect_exit 2 "choose one" --target --cow-target "$T/disk.img"
expect_exit 2 "five arguments" --proxy h 1 c b
expect_exit 2 "five arguments" --proxy h 1 c b s x
expect_exit 2 "invalid upstream port" --proxy h 0 c b s
expect_exit 2 "invalid upstream port" --proxy h 99999 c b s
expect_exit 2 "empty argument" --proxy "" 1 c b s
expect_exit 2 "target-exportname goes with --proxy" --target --target-exportname x "$T/disk.img"
expect_exit 2 "cow-target" --target --cow-overlay "$T" "$T/disk.img"
expect_exit 2 "invalid queue size" --target --max-queue-size -1 "$T/disk.img"
expect_exit 2 "invalid buffer size" --target --max-buf-size 12X "$T/disk.img"
expect_exit 2 "exclude" --target --inetd --connected-fd 3 "$T/disk.img"
# The client's descriptor is checked before the server opens its own: a
# closed number was taken by them (libuv's signal pipe: a crash at fd 5, a
# hang at fd 4), and a pipe on standard input was served as a client.
for fd in 4 5 6 7; do
	eval "expect_exit 1 'is not open' --target --connected-fd $fd \"\$T/disk.img\" $fd<&-"
done
expect_exit 1 "not a socket" --target --inetd --logpath "$T/inetd.log" \
	"$T/disk.img" < <(echo hi)
expect_exit 1 "not open" --target --inetd --logpath "$T/inetd.log" \
	"$T/disk.img" <&-
expect_exit 2 "pidfile" --target --pidfile "$T/p" "$T/disk.img"
expect_exit 2 "proxy" --target --clear-bitmap "$T/disk.img"
expect_exit 1 "No such file" --target "$T/missing.img"
expect_exit 1 "Is a directory" --target "$T"
expect_exit 1 "Is a directory" --target --readonly "$T"
expect_exit 1 "Is a directory" --cow-target "$T"
mkfifo "$T/fifo"
expect_exit 1 "not a regular file" --target --readonly "$T/fifo"
expect_exit 1 "No such file" --cow-target "$T/missing.img"
# The default overlay place must be a directory: never a file left behind.
TMPDIR="$T/not-a-dir" expect_exit 1 "'$T/not-a-dir' (the default place: \$TMPDIR, else /var/tmp) is not a directory" --cow-target "$T/disk.img"
[ -e "$T/not-a-dir" ] && fail "an overlay file was created at \$TMPDIR"
log "usage errors and unusable images: one line, status 2 or 1"

# A port in use is a clear error, and the first server keeps serving.
start_server "$T/disk.img"
expect_exit 1 "cannot listen" --target --laddr 127.0.0.1 --lport "$PORT" "$T/disk.img"
nbdinfo --size "$URI" >/dev/null || fail "first server stopped serving"
expect_exit 1 "cannot listen" --target --laddr 192.0.2.1 --lport "$PORT" "$T/disk.img"
stop_server
log "port in use and unavailable addresses: status 1"

echo "cli.sh: all checks passed"
