#!/bin/bash
# A listener on a loopback address does not pace: where the system's TCP
# congestion control is BBR, xnbd-server's connections on 127.0.0.1 and
# ::1 get cubic (or reno), and those on any other address keep BBR;
# xnbd-wrapper's on 127.0.0.1 too.
# Runs in a network namespace of its own, whose default congestion
# control it sets to bbr; skipped without root, namespaces or tcp_bbr.
. "$(dirname "$0")/lib.sh"

[ "$(id -u)" = 0 ] || skip "network namespaces need root"
: "${XNBD_WRAPPER:=$(dirname "$XNBD_SERVER")/../wrapper/xnbd-wrapper}"
[ -x "$XNBD_WRAPPER" ] || fail "xnbd-wrapper binary $XNBD_WRAPPER not found"
command -v ss >/dev/null 2>&1 || skip "ss (iproute2) is not installed"

NS=xnbdcc$$
OTHER_IP=10.213.77.1

cc_cleanup() {
	local rc=$? pid
	trap - EXIT
	for pid in "${SERVER_PIDS[@]}"; do
		kill_pid "$pid"
	done
	SERVER_PIDS=()
	ip netns del "$NS" 2>/dev/null
	(exit $rc)
	cleanup
}
trap cc_cleanup EXIT

ip netns add "$NS" 2>"$T/netns.err" ||
	skip "cannot create a network namespace: $(cat "$T/netns.err")"
in_ns() { ip netns exec "$NS" "$@"; }
in_ns ip link set lo up || fail "cannot bring lo up in $NS"
# An address that is not loopback: a dummy device's, else a veth end's.
if in_ns ip link add other0 type dummy 2>/dev/null; then
	in_ns ip addr add $OTHER_IP/24 dev other0 || fail "cannot add $OTHER_IP"
	in_ns ip link set other0 up || fail "cannot bring other0 up"
else
	in_ns ip link add other0 type veth peer name other1 ||
		fail "cannot make a dummy or veth device in $NS"
	in_ns ip addr add $OTHER_IP/24 dev other0 || fail "cannot add $OTHER_IP"
	in_ns ip link set other0 up && in_ns ip link set other1 up ||
		fail "cannot bring the veth pair up"
fi
modprobe tcp_bbr 2>/dev/null
in_ns sysctl -qw net.ipv4.tcp_congestion_control=bbr 2>"$T/sysctl.err" ||
	skip "no bbr congestion control here: $(cat "$T/sysctl.err")"
[ "$(in_ns sysctl -n net.ipv4.tcp_congestion_control)" = bbr ] ||
	fail "the namespace's default congestion control is not bbr"

IMG=$T/disk.img
make_image "$IMG" 16M

# server_cc ADDR [wrapper]: sets CC to the congestion control of
# xnbd-server's (or xnbd-wrapper's) end of a connection to it listening
# on ADDR (a port picked free in the namespace),
# with a client holding the connection open.  Also checks that the server
# answers with the NBD greeting over it.
server_cc() {
	local addr=$1 port pid log=$T/server-$1-${2:-server}.log
	port=$(in_ns "$PYTHON" - "$addr" <<'EOF'
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
with socket.socket(fam) as s:
    s.bind((sys.argv[1], 0))
    print(s.getsockname()[1])
EOF
	) || fail "no free port on $addr"
	# ip execs the server: $! is the server's PID (in_ns would be a
	# subshell's).
	if [ "${2:-}" = wrapper ]; then
		ip netns exec "$NS" "$XNBD_WRAPPER" --laddr "$addr" \
			--lport "$port" --socket "$T/wrapper-$port.ctl" \
			--logpath "$log" --imgfile "$IMG" &
	else
		ip netns exec "$NS" "$XNBD_SERVER" --target --laddr "$addr" \
			--lport "$port" --logpath "$log" "$IMG" &
	fi
	pid=$!
	SERVER_PIDS+=("$pid")
	ip netns exec "$NS" "$PYTHON" - "$addr" "$port" "$pid" "$T/held-$port" <<'EOF' &
import os, socket, sys, time
addr, port, pid, flag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
end = time.time() + 10
while True:
    try:
        c = socket.create_connection((addr, port), 0.5)
        break
    except OSError:
        if time.time() > end or not os.path.exists("/proc/%d" % pid):
            sys.exit(2)
        time.sleep(0.05)
c.settimeout(5)
greeting = b""
while len(greeting) < 16:
    d = c.recv(16 - len(greeting))
    if not d:
        sys.exit(3)
    greeting += d
if greeting[:8] != b"NBDMAGIC":
    sys.exit(4)
open(flag, "w").close()
time.sleep(1)
EOF
	local client=$! i
	for i in $(seq 100); do
		[ -e "$T/held-$port" ] && break
		kill -0 $client 2>/dev/null || break
		sleep 0.05
	done
	[ -e "$T/held-$port" ] || fail "no NBD greeting from the server on $addr: $(cat "$log")"
	in_ns ss -tinH state established "( sport = :$port )" >"$T/ss-$port.txt"
	CC=$(grep -o -w -E 'bbr|cubic|reno' "$T/ss-$port.txt" | head -n 1)
	wait $client
	kill_pid "$pid"
	forget_pid "$pid"
}

server_cc 127.0.0.1
log "listening on 127.0.0.1: $CC"
case $CC in
cubic | reno) ;;
*) fail "a connection to 127.0.0.1 has congestion control '$CC', not cubic or reno" ;;
esac

server_cc $OTHER_IP
log "listening on $OTHER_IP: $CC"
[ "$CC" = bbr ] || fail "a connection to $OTHER_IP has congestion control '$CC', not the system's bbr"

# xnbd-wrapper listens through the same library call.
server_cc 127.0.0.1 wrapper
log "xnbd-wrapper listening on 127.0.0.1: $CC"
case $CC in
cubic | reno) ;;
*) fail "a connection to xnbd-wrapper on 127.0.0.1 has congestion control '$CC', not cubic or reno" ;;
esac

if in_ns "$PYTHON" -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null; then
	server_cc ::1
	log "listening on ::1: $CC"
	case $CC in
	cubic | reno) ;;
	*) fail "a connection to ::1 has congestion control '$CC', not cubic or reno" ;;
	esac
else
	log "::1 is not configured in the namespace: not checked"
fi
exit 0
