#!/bin/sh
# Install what is needed, build, and run the whole test suite: once in a
# normal build and once under AddressSanitizer and UndefinedBehaviorSanitizer.
# Usage: scripts/test.sh [--no-sanitize]
set -eu
cd "$(dirname "$0")/.."

sh scripts/deps.sh

run() {
	dir=$1
	shift
	if [ -f "$dir/build.ninja" ]; then
		meson setup --reconfigure "$dir" "$@" >/dev/null
	else
		meson setup "$dir" "$@" >/dev/null
	fi
	ninja -C "$dir"
	meson test -C "$dir" --print-errorlogs --num-processes 2
}

run build-test --werror
# The benchmarks' short form, as a smoke test: every server and row must
# run; nothing is asserted about speed.
/usr/bin/python3 bench/bench.py --short --xnbd build-test/server/xnbd-server
/usr/bin/python3 bench/bench.py --short --mode cow --rows rand-rw70-4K-qd32 \
	--xnbd build-test/server/xnbd-server
/usr/bin/python3 bench/bench.py --short --mode proxy \
	--rows seq-read-1M-qd8,seq-write-1M-qd8,fill-cache-whole-image \
	--xnbd build-test/server/xnbd-server
if [ "${1:-}" != "--no-sanitize" ]; then
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	run build-sanitize --werror -Db_sanitize=address,undefined -Db_lundef=false
fi
echo "test.sh: all tests passed"
