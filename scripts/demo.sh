#!/usr/bin/env bash
# Quick start, command 1: starts the local MongoDB-compatible and S3-compatible servers
# (installing them the first time), then runs Sluice's main job on embedded defaults.
# Extra arguments go to `sluice demo` (for example `--visitors 200`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up >/dev/null
eval "$(scripts/services.sh env)"
scripts/build-plugins.sh
cargo run --quiet --bin sluice -- demo "$@"
