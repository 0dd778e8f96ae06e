#!/bin/bash
# Files the server may not open, create or write: each is refused at the
# start with one clear line naming the file (exit 1), nothing is created
# and nothing changed; an image it may only read is still served with
# --readonly; a snapshot it may not write is refused and logged, and the
# export goes on.  Root opens any file, so where the test runs as root the
# servers here run as the unprivileged user 65534 (setpriv).
. "$(dirname "$0")/lib.sh"
require_tools nbdinfo sha256sum

SRV=$XNBD_SERVER
AS=()
if [ "$(id -u)" = 0 ]; then
	command -v setpriv >/dev/null ||
		skip "running as root, and no setpriv to drop to an unprivileged user"
	AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
	chmod 755 "$T"
	if ! "${AS[@]}" test -x "$SRV"; then
		# A directory above the build is closed to that user: run copies
		# (the library found through LD_LIBRARY_PATH, before RUNPATH).
		SRV=$(readlink -f "$SRV")
		mkdir "$T/bin"
		cp "$SRV" "$T/bin/" || fail "cannot copy $SRV"
		lib=$(ldd "$SRV" | awk '/libxnbd/ {print $3}')
		case $lib in
		"") ;; # linked statically
		/*) cp "$lib" "$T/bin/" || fail "cannot copy $lib" ;;
		*) fail "$SRV does not find its libxnbd: $(ldd "$SRV" | grep libxnbd)" ;;
		esac
		chmod -R a+rX "$T/bin"
		SRV=$T/bin/$(basename "$SRV")
		export LD_LIBRARY_PATH=$T/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
	fi
	"${AS[@]}" "$SRV" --version >/dev/null ||
		fail "user 65534 cannot run $SRV"
fi
RUN_AS=("${AS[@]}") # expect_exit (lib.sh) runs the server so
EXIT_SERVER=$SRV

# expect_proxy_exit PATTERN ARGS...: a proxy's start, whose refusal is
# logged (on standard error here) once the upstream answered: status 1
# and a line naming PATTERN that says "Permission denied".
expect_proxy_exit() {
	local pat=$1 rc
	shift
	timeout 10 "${AS[@]}" "$SRV" --proxy "$@" >"$T/out" 2>"$T/err"
	rc=$?
	[ "$rc" = 1 ] || fail "xnbd-server --proxy $* exited $rc, expected 1 ($(cat "$T/err"))"
	grep -F -- "$pat" "$T/err" | grep -q "Permission denied" ||
		fail "xnbd-server --proxy $*: no 'Permission denied' naming '$pat': $(cat "$T/err")"
}

# A directory for the server's logs, the user's own.
L=$T/logs
mkdir "$L"
[ -n "${AS[*]}" ] && chown 65534:65534 "$L"
# A directory the user may enter but not write, and files in it.
C=$T/closed
mkdir "$C"
chmod 755 "$C"
pattern_image "$T/ro.img" 8 1
chmod 444 "$T/ro.img"
RO_SUM=$(sha256sum <"$T/ro.img")
pattern_image "$T/none.img" 8 2
chmod 000 "$T/none.img"

expect_exit 1 "cannot open image '$T/ro.img': Permission denied" --target "$T/ro.img"
expect_exit 1 "cannot open image '$T/none.img': Permission denied" --target --readonly "$T/none.img"
expect_exit 1 "cannot open image '$T/none.img': Permission denied" --cow-target "$T/none.img"
TMPDIR="$C" expect_exit 1 "cannot create the overlay in '$C' (the default place: \$TMPDIR, else /var/tmp): Permission denied" \
	--cow-target "$T/ro.img"
expect_exit 1 "cannot create the overlay file '$C/ov': Permission denied" \
	--cow-target --cow-overlay "$C/ov" "$T/ro.img"
expect_exit 1 "$C/server.log" --target --readonly --logpath "$C/server.log" "$T/ro.img"
[ "$(ls -A "$C")" = "" ] || fail "files were created in $C: $(ls -A "$C")"
[ "$(sha256sum <"$T/ro.img")" = "$RO_SUM" ] || fail "$T/ro.img changed"
log "unreadable and unwritable images, overlays and logs: status 1, the file named"

# The image it may only read is served with --readonly.
PORT=$(free_port 127.0.0.1) || fail "no free port"
"${AS[@]}" "$SRV" --target --readonly --laddr 127.0.0.1 --lport "$PORT" \
	--logpath "$L/ro.log" "$T/ro.img" &
SERVER_PID=$!
SERVER_PIDS+=("$SERVER_PID")
SERVER_LOG=$L/ro.log
wait_port 127.0.0.1 "$PORT" "$SERVER_PID" || fail "the read-only server did not start"
[ "$(nbdinfo --size "nbd://127.0.0.1:$PORT/")" = $((8 << 20)) ] ||
	fail "wrong size served"
nbdcopy "nbd://127.0.0.1:$PORT/" "$T/copy" || fail "nbdcopy of the read-only image"
cmp "$T/copy" "$T/ro.img" || fail "the read-only image served wrong data"
stop_server "$SERVER_PID"
log "an image the server may only read is served with --readonly"

# A proxy's cache, bitmap and control socket it may not create or write:
# refused before anything is made, nothing created, nothing changed.
chmod 644 "$T/ro.img"
start_server "$T/ro.img"
UP_PORT=$PORT
UP_PID=$SERVER_PID
W=$T/w
mkdir "$W"
[ -n "${AS[*]}" ] && chown 65534:65534 "$W"
touch "$T/cache.ro" "$T/bitmap.ro"
chmod 444 "$T/cache.ro" "$T/bitmap.ro"
expect_proxy_exit "$C/cache" 127.0.0.1 "$UP_PORT" "$C/cache" "$W/bm" "$W/ctl"
expect_proxy_exit "$C/bm" 127.0.0.1 "$UP_PORT" "$W/cache" "$C/bm" "$W/ctl"
expect_proxy_exit "$C/ctl" 127.0.0.1 "$UP_PORT" "$W/cache" "$W/bm" "$C/ctl"
expect_proxy_exit "$T/cache.ro" 127.0.0.1 "$UP_PORT" "$T/cache.ro" "$W/bm" "$W/ctl"
expect_proxy_exit "$T/bitmap.ro" 127.0.0.1 "$UP_PORT" "$W/cache" "$T/bitmap.ro" "$W/ctl"
[ "$(ls -A "$C")" = "" ] || fail "files were created in $C: $(ls -A "$C")"
[ "$(ls -A "$W")" = "" ] || fail "files were left in $W: $(ls -A "$W")"
[ -s "$T/cache.ro" ] || [ -s "$T/bitmap.ro" ] && fail "a read-only cache or bitmap was written"
log "a proxy's files it may not make or write: status 1, the file named, nothing made"

# A snapshot the server may not write is refused and logged; serving goes on.
cp "$T/ro.img" "$W/disk.img"
[ -n "${AS[*]}" ] && chown 65534:65534 "$W/disk.img"
chmod 555 "$W"
PORT=$(free_port 127.0.0.1) || fail "no free port"
"${AS[@]}" "$SRV" --target --laddr 127.0.0.1 --lport "$PORT" --logpath "$L/snap.log" \
	"$W/disk.img" &
SERVER_PID=$!
SERVER_PIDS+=("$SERVER_PID")
SERVER_LOG=$L/snap.log
wait_port 127.0.0.1 "$PORT" "$SERVER_PID" || fail "the server did not start"
kill -USR1 "$SERVER_PID"
for i in $(seq 50); do
	grep -q "cannot take snapshot" "$SERVER_LOG" && break
	sleep 0.1
done
grep -q "cannot take snapshot $W/disk.img.snapshot.[0-9]*: Permission denied" "$SERVER_LOG" ||
	fail "no refusal of the snapshot in the log: $(cat "$SERVER_LOG")"
[ "$(ls -A "$W")" = "disk.img" ] || fail "files were left in $W: $(ls -A "$W")"
[ "$(nbdinfo --size "nbd://127.0.0.1:$PORT/")" = $((8 << 20)) ] ||
	fail "the export stopped serving after a refused snapshot"
stop_server "$SERVER_PID"
chmod 755 "$W"
log "a snapshot it may not write: refused, logged, the export goes on"
