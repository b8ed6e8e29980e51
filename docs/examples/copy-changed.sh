#!/usr/bin/env bash
# copy-changed.sh URI CONTEXT TARGET
#
# Copies onto TARGET only the chunks of the Sluice export URI that differ from another
# backup: the extents the meta context CONTEXT (`sluice:changed-since:OTHER`) marks with
# bit 0. TARGET is a raw image file or a block device that holds backup OTHER's bytes (of the
# same size); afterwards it holds the exported backup's. Open the export with
#   sluice export ID --changed-since OTHER [--disk D]
# and pass the `uri` and `meta_context` it prints. Needs nbdinfo, nbdcopy and nbdkit (with
# its nbd plugin and offset filter); an nbds:// URI carries its certificate directory.
# Prints what it copied. docs/restore.md explains it; tests/tests/api_export_changed.rs runs it.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 URI CONTEXT TARGET" >&2
    exit 2
fi
uri=$1 ctx=$2 target=$3
map=$(nbdinfo --map="$ctx" "$uri")
# nbdkit's nbd plugin takes the certificate directory as an option of its own, not in the URI.
base=${uri%%\?*} tls=()
case $uri in
*'?tls-certificates='*) tls=("tls-certificates=${uri#*\?tls-certificates=}") ;;
esac
extents=0 bytes=0
while read -r offset length type _; do
    [ $((type & 1)) -eq 1 ] || continue
    # The same byte range of the export and of the target, as two NBD endpoints.
    nbdcopy --flush -- \
        [ nbdkit --exit-with-parent -r --filter=offset nbd uri="$base" "${tls[@]}" offset="$offset" range="$length" ] \
        [ nbdkit --exit-with-parent --filter=offset file file="$target" offset="$offset" range="$length" ]
    extents=$((extents + 1)) bytes=$((bytes + length))
done <<<"$map"
echo "copied $bytes bytes in $extents extents onto $target"
