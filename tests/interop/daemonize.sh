#!/bin/bash
# xnbd-server --daemonize --pidfile: the command returns 0 once the server
# listens, the pidfile names a running server that serves nbdinfo, and
# SIGTERM to that PID stops it and removes the pidfile.  A bad image or a
# taken port makes --daemonize fail with status 1 before forking.
. "$(dirname "$0")/lib.sh"
require_tools nbdinfo

IMG=$T/disk.img
PIDFILE=$T/xnbd.pid
make_image "$IMG" 16M
PORT=$(free_port) || fail "no free port"
SERVER_LOG=$T/daemon.log

"$XNBD_SERVER" --target --laddr 127.0.0.1 --lport "$PORT" --logpath "$SERVER_LOG" \
	--daemonize --pidfile "$PIDFILE" "$IMG"
rc=$?
[ -s "$PIDFILE" ] && DPID=$(cat "$PIDFILE") && SERVER_PIDS+=("$DPID")
[ $rc = 0 ] || fail "xnbd-server --daemonize exited $rc"
[ -n "${DPID:-}" ] || fail "pidfile $PIDFILE missing or empty after --daemonize returned"
case $DPID in *[!0-9]*) fail "pidfile holds '$DPID', not a PID" ;; esac
kill -0 "$DPID" 2>/dev/null || fail "no process $DPID from the pidfile"
grep -q xnbd-server "/proc/$DPID/cmdline" 2>/dev/null || fail "PID $DPID is not xnbd-server"
# already listening when --daemonize returned
got=$(nbdinfo --size "nbd://127.0.0.1:$PORT") || fail "nbdinfo against the daemon failed"
[ "$got" = 16777216 ] || fail "daemon export size '$got'"
# detached: not our child, its own session
[ "$(awk '{print $4}' /proc/$DPID/stat)" != $$ ] || fail "the daemon is still our child"

# a second daemon on the same port fails before forking, with status 1
"$XNBD_SERVER" --target --laddr 127.0.0.1 --lport "$PORT" --logpath "$T/second.log" \
	--daemonize --pidfile "$T/second.pid" "$IMG"
rc=$?
if [ -s "$T/second.pid" ]; then
	SERVER_PIDS+=("$(cat "$T/second.pid")")
fi
[ $rc = 1 ] || fail "--daemonize on a taken port: status $rc, expected 1"
# a missing image: status 1
"$XNBD_SERVER" --target --laddr 127.0.0.1 --lport "$(free_port)" --logpath "$T/third.log" \
	--daemonize --pidfile "$T/third.pid" "$T/no-such.img"
rc=$?
[ -s "$T/third.pid" ] && SERVER_PIDS+=("$(cat "$T/third.pid")")
[ $rc = 1 ] || fail "--daemonize with a missing image: status $rc, expected 1"

# SIGTERM by the pidfile's PID: it exits, and removes the pidfile
kill -TERM "$DPID"
for i in $(seq 100); do
	kill -0 "$DPID" 2>/dev/null || break
	sleep 0.1
done
kill -0 "$DPID" 2>/dev/null && fail "daemon $DPID still running 10 s after SIGTERM"
[ -e "$PIDFILE" ] && fail "pidfile $PIDFILE left behind after the daemon stopped"
grep -q 'server stopped' "$SERVER_LOG" || fail "no 'server stopped' in the daemon's log"
forget_pid "$DPID"
log PASS
