#!/usr/bin/env bash
# The test suite, from a fresh clone: fetches the test model, builds in release, runs every test.
# The benchmark-data test runs too when ../shared/data (or $OEDIT_SHARED_DATA) is there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh
cargo test --release --locked "$@"
shared="${OEDIT_SHARED_DATA:-../shared/data}"
if [ -d "$shared" ]; then
  OEDIT_SHARED_DATA="$(cd "$shared" && pwd)" cargo test --release --locked --lib -- --ignored all_shared_data_parses
else
  echo "note: $shared not found: the benchmark-data test (all_shared_data_parses) was not run" >&2
fi
