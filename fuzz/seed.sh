#!/usr/bin/env bash
# Seeds fuzz/corpus/decode with every message captured in
# tests/fixtures/pgoutput/*.hex (one hex-encoded message per line).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/decode
for f in ../tests/fixtures/pgoutput/*.hex; do
    n=0
    while read -r line; do
        [ -n "$line" ] || continue
        n=$((n + 1))
        printf '%s' "$line" | perl -ne 'print pack("H*", $_)' \
            >"corpus/decode/$(basename "$f" .hex)-$n"
    done <"$f"
done
