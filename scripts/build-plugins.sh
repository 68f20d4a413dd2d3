#!/usr/bin/env bash
# Builds the SDK's example plugins as wasm32-wasip2 components into plugins/dist/, with a
# manifest per plugin (name, version, wasm file, sha256; default limits). The tests and
# the demo load them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -q wasm32-wasip2 || rustup target add wasm32-wasip2
examples=(redact-pii bot-filter currency-normalize noop hostile)
args=()
for e in "${examples[@]}"; do args+=(-p "$e"); done
cargo build --quiet --release --target wasm32-wasip2 "${args[@]}"
target="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')}"
mkdir -p plugins/dist
for e in "${examples[@]}"; do
  file="${e//-/_}.wasm"
  cp "$target/wasm32-wasip2/release/$file" "plugins/dist/$e.wasm"
  sum=$(sha256sum "plugins/dist/$e.wasm" | cut -d' ' -f1)
  cat >"plugins/dist/$e.toml" <<TOML
name = "$e"
version = "0.1.0"
wasm = "$e.wasm"
sha256 = "$sum"
TOML
done
echo "plugins built into plugins/dist/" >&2
