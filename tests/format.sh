#!/bin/sh
# The C sources match the repository's .clang-format (STYLE.md: "clang-format
# config in the repo; the code matches it").  Skips (77) without clang-format;
# scripts/deps.sh installs it, so CI runs it.  Fix a failure with
#     clang-format -i FILE
set -eu
: "${SRCDIR:?}"
command -v clang-format >/dev/null 2>&1 || { echo "clang-format not found"; exit 77; }
cd "$SRCDIR"
files=$(find libxnbd server bgctl wrapper tests bench -name '*.[ch]' | sort)
[ -n "$files" ] || { echo "no sources found under $SRCDIR"; exit 1; }
# shellcheck disable=SC2086
clang-format --dry-run --Werror $files
echo "$(echo "$files" | wc -l) files match .clang-format"
