#!/bin/bash
# xnbd-server --laddr ::1: nbdinfo nbd://[::1]:PORT works, data written
# over IPv6 reads back, and the server listens on ::1 only (not on
# 127.0.0.1).  Skipped when ::1 is not configured on lo.
. "$(dirname "$0")/lib.sh"
require_tools nbdinfo

"$PYTHON" -c 'import socket; s = socket.socket(socket.AF_INET6); s.bind(("::1", 0))' 2>/dev/null ||
	skip "::1 is not configured on lo"

IMG=$T/disk.img
make_image "$IMG" 16M
SERVER_ADDR=::1
start_server "$IMG"
[ "$URI" = "nbd://[::1]:$PORT/" ] || fail "unexpected URI $URI"

got=$(nbdinfo --size "nbd://[::1]:$PORT") || fail "nbdinfo nbd://[::1]:$PORT failed"
[ "$got" = $((16 * 1048576)) ] || fail "nbdinfo over IPv6: size '$got', expected 16777216"
nbdinfo "nbd://[::1]:$PORT" >"$T/info.txt" || fail "nbdinfo (full) over IPv6 failed"
grep -q 'can_multi_conn: true' "$T/info.txt" || { cat "$T/info.txt" >&2; fail "nbdinfo over IPv6: flags missing"; }
grep -q "uri: nbd://\[::1\]:$PORT/" "$T/info.txt" || { cat "$T/info.txt" >&2; fail "nbdinfo over IPv6: uri not [::1]"; }

# the log names the IPv6 peer
grep -q '::1' "$SERVER_LOG" || fail "server log does not mention the IPv6 peer ::1"

# read and write over IPv6 with libnbd (if the Python module is there) or qemu-io
if "$PYTHON" -c 'import nbd' 2>/dev/null; then
	"$PYTHON" - "$PORT" <<'EOF' || fail "read/write over IPv6 failed"
import sys, nbd
h = nbd.NBD()
h.connect_uri("nbd://[::1]:%s/" % sys.argv[1])
data = bytes(range(256)) * 300
h.pwrite(data, 12345)
assert h.pread(len(data), 12345) == data, "read back over IPv6 differs"
h.flush()
h.shutdown()
EOF
	"$PYTHON" - "$IMG" <<'EOF' || fail "image file lacks the data written over IPv6"
import sys
d = open(sys.argv[1], "rb").read()
assert d[12345:12345 + 76800] == bytes(range(256)) * 300
EOF
fi

# --laddr ::1 means ::1 only: 127.0.0.1 on that port is refused
"$PYTHON" - "$PORT" <<'EOF' || fail "server listening on ::1 also accepts on 127.0.0.1:$PORT"
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()
except OSError:
    sys.exit(0)
sys.exit(1)
EOF

stop_server
log PASS
