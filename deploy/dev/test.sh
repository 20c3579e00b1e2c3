#!/usr/bin/env bash
# Runs every check and test of the project on this machine:
# installs what is missing (deploy/dev/install-deps.sh), then formatting, clippy,
# and `cargo test`, whose integration tests start their own PostgreSQL and tansu.
set -euo pipefail
cd "$(dirname "$0")/../.."
export TANSU_BIN="$(deploy/dev/install-deps.sh | tail -n 1)"
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
