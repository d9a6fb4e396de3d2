#!/usr/bin/env bash
# The test suite, from a fresh clone: fetches the test model, builds in release, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test --release --locked "$@"
