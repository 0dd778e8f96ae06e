#!/bin/sh
# Install what is needed, build, and serve a demo image with
# `xnbd-server --target` on port 8520 until Ctrl-C.
# Usage: scripts/demo.sh [IMAGE]   (default: demo.img, 256 MiB, created if absent)
set -eu
cd "$(dirname "$0")/.."

sh scripts/deps.sh
[ -f build/build.ninja ] || meson setup build >/dev/null
ninja -C build >/dev/null

img=${1:-demo.img}
if [ ! -e "$img" ]; then
	truncate -s 256M "$img"
	printf 'Hello from xNBD.\n' | dd of="$img" conv=notrunc status=none
	echo "created $img (256 MiB, sparse)"
fi
host=$(hostname -f 2>/dev/null || hostname)
echo "serving $img: connect to nbd://localhost:8520/ (or nbd://$host:8520/)"
echo "  e.g.  nbdinfo nbd://localhost:8520/    qemu-img info nbd://localhost:8520"
echo "stop with Ctrl-C"
exec build/server/xnbd-server --target "$img"
