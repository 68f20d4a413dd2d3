#!/usr/bin/env bash
# Quick start, command 2: starts the local servers if they are not running, then runs
# every test of the workspace against them (after building the example WASM plugins). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up >/dev/null
eval "$(scripts/services.sh env)"
scripts/build-plugins.sh
cargo test --workspace "$@"
