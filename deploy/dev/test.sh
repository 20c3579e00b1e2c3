#!/usr/bin/env bash
# Runs every check and test of the project on this machine:
# installs what is missing (deploy/dev/install-deps.sh), then formatting, clippy,
# the dependency policy (deny.toml: licenses, bans, sources; no network needed),
# `cargo test`, whose integration tests start their own PostgreSQL and tansu,
# and the benchmark package's unit tests (Python standard library only).
set -euo pipefail
cd "$(dirname "$0")/../.."
tools="$(deploy/dev/install-deps.sh)"
export TANSU_BIN="$(tail -n 1 <<<"$tools")"
cargo_deny="$(tail -n 2 <<<"$tools" | head -n 1)"
cargo fmt --all -- --check
"$cargo_deny" --locked check licenses bans sources
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
python3 -m unittest discover -s bench -t bench
