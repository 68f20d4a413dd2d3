#!/usr/bin/env bash
# Quick start, command 2: starts the local servers if they are not running, builds the
# example WASM plugins, runs the README's first command (scripts/demo.sh) and keeps its
# report for the test that checks it against MongoDB and the output folder, then runs
# every test of the workspace. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up >/dev/null
eval "$(scripts/services.sh env)"
scripts/build-plugins.sh
report="$(mktemp -t sluice-quickstart-XXXXXX.txt)"
echo "running the quick start (scripts/demo.sh); its report: $report" >&2
scripts/demo.sh >"$report"
export SLUICE_DEMO_REPORT="$report"
cargo test --workspace "$@"
