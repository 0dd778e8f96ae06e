# lib.sh - shared helpers for the shell interop tests; source it, don't run it.
#
#   . "$(dirname "$0")/lib.sh"
#   require_tools nbdinfo qemu-img     # exit 77 when one is missing
#   make_image "$T/disk.img" 32M       # sparse file
#   start_server "$T/disk.img"         # sets SERVER_PID, PORT, SERVER_LOG
#   ... tests, calling fail "message" on a failed check ...
#
# A temporary directory $T is made on sourcing and removed on exit; every
# server started here is stopped by its PID in the EXIT trap.

set -u

: "${XNBD_SERVER:=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/build/server/xnbd-server}"
: "${PYTHON:=/usr/bin/python3}"
: "${XNBD_TESTS_DIR:=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
export XNBD_SERVER PYTHON XNBD_TESTS_DIR

TEST_NAME=$(basename "$0")
T=$(mktemp -d "${TMPDIR:-/tmp}/xnbd-interop.XXXXXX")
SERVER_PIDS=()
SERVER_PID=
PORT=
SERVER_LOG=
SERVER_ADDR=127.0.0.1

log() { echo "[$TEST_NAME] $*" >&2; }

# fail MESSAGE: print what failed (and the tail of the server log) and exit 1.
fail() {
	echo "[$TEST_NAME] FAIL: $*" >&2
	if [ -n "$SERVER_LOG" ] && [ -s "$SERVER_LOG" ]; then
		echo "[$TEST_NAME] --- last lines of $SERVER_LOG ---" >&2
		tail -n 20 "$SERVER_LOG" >&2
	fi
	exit 1
}

skip() {
	echo "[$TEST_NAME] SKIP: $*" >&2
	exit 77
}

# require_tools TOOL...: skip (77) when a peer tool is missing.
require_tools() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || skip "$t is not installed"
	done
}

# require_python_nbd: skip when /usr/bin/python3 cannot import nbd.
require_python_nbd() {
	[ -x "$PYTHON" ] || skip "$PYTHON is missing"
	"$PYTHON" -c 'import nbd' 2>/dev/null ||
		skip "the Python nbd module (python3-libnbd) is not importable by $PYTHON"
}

# kill_pid PID: SIGTERM, wait up to 5 s, then SIGKILL.  Only our own PIDs.
kill_pid() {
	local pid=$1 i
	kill -0 "$pid" 2>/dev/null || return 0
	kill -TERM "$pid" 2>/dev/null
	for i in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "server $pid ignored SIGTERM; killing it"
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	return 0
}

# forget_pid PID: drop PID (reaped already) from the servers to stop on exit.
forget_pid() {
	local p keep=()
	for p in "${SERVER_PIDS[@]}"; do
		[ "$p" = "$1" ] || keep+=("$p")
	done
	SERVER_PIDS=("${keep[@]}")
}

cleanup() {
	local rc=$? pid
	trap - EXIT
	for pid in "${SERVER_PIDS[@]}"; do
		kill_pid "$pid"
	done
	rm -rf "$T"
	exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ -x "$XNBD_SERVER" ] || fail "server binary $XNBD_SERVER not found (build with ninja -C build)"

# free_port [ADDR]: print a TCP port that is free now on ADDR.
free_port() {
	"$PYTHON" - "${1:-127.0.0.1}" <<'EOF'
import socket, sys
addr = sys.argv[1]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
with socket.socket(fam, socket.SOCK_STREAM) as s:
    s.bind((addr, 0))
    print(s.getsockname()[1])
EOF
}

# wait_port ADDR PORT PID: wait until ADDR:PORT accepts, or PID died (rc 2),
# or 10 s passed (rc 1).
wait_port() {
	"$PYTHON" - "$1" "$2" "$3" <<'EOF'
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
        os.kill(pid, 0)
        # a zombie counts as dead
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                sys.exit(2)
    except (OSError, IndexError):
        sys.exit(2)
    time.sleep(0.05)
sys.exit(1)
EOF
}

# start_server [SERVER OPTIONS...] IMAGE: start xnbd-server --target on
# $SERVER_ADDR (default 127.0.0.1) and a free port; sets SERVER_PID, PORT,
# SERVER_LOG and URI.  Retries with another port if the one picked was
# taken meanwhile.
start_server() {
	local attempt rc
	for attempt in 1 2 3 4 5; do
		PORT=$(free_port "$SERVER_ADDR") || fail "cannot find a free port on $SERVER_ADDR"
		SERVER_LOG=$T/server.$PORT.log
		"$XNBD_SERVER" --target --laddr "$SERVER_ADDR" --lport "$PORT" \
			--logpath "$SERVER_LOG" "$@" &
		SERVER_PID=$!
		SERVER_PIDS+=("$SERVER_PID")
		wait_port "$SERVER_ADDR" "$PORT" "$SERVER_PID"
		rc=$?
		if [ $rc = 0 ]; then
			case $SERVER_ADDR in
			*:*) URI="nbd://[$SERVER_ADDR]:$PORT/" ;;
			*) URI="nbd://$SERVER_ADDR:$PORT/" ;;
			esac
			log "server pid $SERVER_PID listening on $SERVER_ADDR port $PORT"
			return 0
		fi
		kill_pid "$SERVER_PID"
		forget_pid "$SERVER_PID"
		if [ $rc = 2 ] && grep -qi "in use" "$SERVER_LOG" 2>/dev/null; then
			log "port $PORT was taken meanwhile; retrying"
			continue
		fi
		fail "server did not start listening on $SERVER_ADDR:$PORT (xnbd-server $* )"
	done
	fail "no free port after 5 attempts"
}

# stop_server [PID]: SIGTERM the server and check it exits 0 within 10 s.
stop_server() {
	local pid=${1:-$SERVER_PID} i rc
	kill -TERM "$pid" 2>/dev/null || fail "server $pid is not running"
	for i in $(seq 101); do
		# Running: its state is readable and not Z (a zombie has exited;
		# wait reaps it below).  The shell may reap it at any moment, so
		# a state that cannot be read means it has exited too.
		case "$(awk '{print $3}' /proc/$pid/stat 2>/dev/null)" in
		"" | Z) break ;;
		esac
		[ "$i" = 101 ] && fail "server $pid still running 10 s after SIGTERM"
		sleep 0.1
	done
	wait "$pid"
	rc=$?
	forget_pid "$pid"
	[ $rc = 0 ] || fail "server $pid exited with status $rc after SIGTERM, expected 0"
}

# make_image PATH SIZE: a sparse image of SIZE (truncate syntax, e.g. 32M).
make_image() {
	rm -f "$1"
	truncate -s "$2" "$1" || fail "cannot make image $1"
}

# pattern_image PATH MIB SEED: a file of MIB MiB of reproducible random data.
pattern_image() {
	"$PYTHON" - "$1" "$2" "$3" <<'EOF'
import random, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
with open(path, "wb") as f:
    for _ in range(mib):
        f.write(r.randbytes(1 << 20))
EOF
}

# must CMD...: run CMD, fail with its name if it fails.
must() {
	"$@" || fail "command failed (status $?): $*"
}

# expect_exit STATUS PATTERN ARGS...: xnbd-server exits with STATUS at
# once, printing exactly one line that names the program and holds
# PATTERN (a fixed string).  The server is $XNBD_SERVER, or $EXIT_SERVER,
# run through the words of the array RUN_AS when it has any.
RUN_AS=()
expect_exit() {
	local want=$1 pat=$2 rc
	shift 2
	timeout 10 "${RUN_AS[@]}" "${EXIT_SERVER:-$XNBD_SERVER}" "$@" >"$T/out" 2>"$T/err"
	rc=$?
	[ "$rc" = "$want" ] || fail "xnbd-server $* exited $rc, expected $want ($(cat "$T/err"))"
	[ "$(grep -c '^xnbd-server: ' "$T/err")" = 1 ] ||
		fail "xnbd-server $*: expected one error line, got: $(cat "$T/err")"
	grep -qF -- "$pat" "$T/err" ||
		fail "xnbd-server $*: message does not say '$pat': $(cat "$T/err")"
}
