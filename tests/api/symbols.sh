#!/bin/sh
# Every symbol libxnbd exports is public API: named xnbd_*, covered by the
# version script, declared and documented in an installed header.
set -eu
: "${LIB:?}" "${INCDIR:?}"
syms=$(nm -D --defined-only "$LIB" | awk '$2 ~ /^[TDBR]$/ {print $3}' | sed 's/@.*//' | sort -u)
[ -n "$syms" ] || { echo "no exported symbols found in $LIB"; exit 1; }
bad=0
for s in $syms; do
	case "$s" in
	xnbd__*) echo "internal symbol leaked: $s"; bad=1; continue ;;
	xnbd_*) ;;
	*) echo "symbol outside the xnbd_ namespace: $s"; bad=1; continue ;;
	esac
	if ! grep -q "XNBD_EXPORT[^;]*\\b$s(" "$INCDIR"/xnbd/*.h; then
		echo "exported but not declared with XNBD_EXPORT in a header: $s"; bad=1
		continue
	fi
	# A doc comment ends right above the declaration.
	file=$(grep -l "XNBD_EXPORT.*\\b$s(" "$INCDIR"/xnbd/*.h | head -n1)
	line=$(grep -n "XNBD_EXPORT.*\\b$s(" "$file" | head -n1 | cut -d: -f1)
	prev=$(sed -n "$((line - 1))p" "$file")
	case "$prev" in
	*'*/'*) ;;
	*) echo "undocumented: $s ($file:$line)"; bad=1 ;;
	esac
done
# And every XNBD_EXPORT declaration is really exported.
for s in $(grep -ho "XNBD_EXPORT [^(]*(" "$INCDIR"/xnbd/*.h | grep -o "xnbd_[a-z0-9_]*($" | tr -d '('); do
	echo "$syms" | grep -qx "$s" || { echo "declared but not exported: $s"; bad=1; }
done
[ "$bad" -eq 0 ] && echo "symbols.sh: $(echo "$syms" | wc -l) exported symbols, all public and documented"
exit "$bad"
