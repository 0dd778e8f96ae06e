#!/bin/sh
# Install the project into a scratch directory, build api-test.c against it
# with `pkg-config --cflags --libs libxnbd`, and run it.
set -eu
: "${MESON_BUILD_ROOT:?}" "${PREFIX:?}" "${LIBDIR:?}" "${API_TEST_SRC:?}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
DESTDIR="$tmp/root" meson install -C "$MESON_BUILD_ROOT" --no-rebuild --quiet
root="$tmp/root$PREFIX"
export PKG_CONFIG_PATH="$tmp/root$LIBDIR/pkgconfig"
pc="pkg-config --define-variable=prefix=$root"
$pc --exists libxnbd
for h in xnbd.h protocol.h backend.h bitmap.h client.h server.h log.h common.h; do
	test -f "$root/include/xnbd/$h"
done
test -x "$root/sbin/xnbd-server"
test -f "$root/share/man/man8/xnbd-server.8"
san=""
case "${SANITIZE:-none}" in none|"") ;; *) san="-fsanitize=$SANITIZE" ;; esac
# shellcheck disable=SC2046,SC2086
cc $san -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Werror -o "$tmp/api-test" "$API_TEST_SRC" \
	$($pc --cflags --libs libxnbd)
LD_LIBRARY_PATH="$tmp/root$LIBDIR" "$tmp/api-test"
