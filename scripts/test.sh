#!/usr/bin/env bash
# The project's test command (the README names it; .ci/run runs it).
#   1. formatting and lints
#   2. the guest image, built or reused from the cache (osso-guest build)
#   3. every test in the workspace, with the end-to-end layers required:
#      a layer that cannot run on this machine says SKIPPED with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
echo "== guest image"
cargo run -q -p osso-guest --release -- build --quiet
echo "== tests"
export OSSO_REQUIRE_E2E=1
cargo test --workspace --release -- --nocapture 2>&1 | tee target/test-output.txt
echo "== skipped layers"
grep -h "SKIPPED" target/test-output.txt | sort | uniq -c || echo "none"
