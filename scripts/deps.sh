#!/bin/sh
# Install what building and testing xNBD needs, from Debian's packages.
# Installs only what is missing; needs root (or sudo) when something is.
set -eu

packages="meson ninja-build pkg-config gcc libc6-dev libuv1-dev liburing-dev check \
libnbd-bin python3-libnbd qemu-utils nbdkit fio nbd-server socat \
iproute2 procps clang-format"

missing=""
for p in $packages; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "deps.sh: installing:$missing" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
