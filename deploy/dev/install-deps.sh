#!/usr/bin/env bash
# Installs what the tests and the local run need, idempotently:
#   - PostgreSQL server binaries (Debian package `postgresql`; any version >= 15 works),
#   - build dependencies of librdkafka (C compiler, make, pkg-config, OpenSSL, zlib),
#   - kcat (to look at topics by hand),
#   - promtool (Debian package `prometheus`; tests/deploy.rs checks the alert rules with it),
#   - cargo-deny (the dependency policy in deny.toml, about 2 minutes to build) and
#   - the tansu Kafka-protocol broker (about 10 to 20 minutes), each built once
#     with `cargo install` into a cache directory and reused.
# Prints the path of the cargo-deny binary, then on its last line that of tansu.
#
# Environment: OUTBOX_RELAY_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay).
set -euo pipefail

TANSU_VERSION=0.6.0
CARGO_DENY_VERSION=0.20.2
CACHE=${OUTBOX_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
DENY_ROOT="$CACHE/cargo-deny-$CARGO_DENY_VERSION"

log() { echo "install-deps: $*" >&2; }

missing=()
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v cc >/dev/null || missing+=(gcc g++)
command -v make >/dev/null || missing+=(make)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v kcat >/dev/null || missing+=(kcat)
command -v promtool >/dev/null || missing+=(prometheus)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)

if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  log "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Built in a scratch root and moved into place, so an interrupted build is never mistaken for a finished one.
if [ ! -x "$DENY_ROOT/bin/cargo-deny" ]; then
  log "building cargo-deny $CARGO_DENY_VERSION into $DENY_ROOT (once)"
  mkdir -p "$CACHE"
  tmp="$CACHE/cargo-deny-$CARGO_DENY_VERSION.partial"
  rm -rf "$tmp"
  cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked --root "$tmp" >&2
  rm -rf "$DENY_ROOT"
  mv "$tmp" "$DENY_ROOT"
fi

if [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
  log "building tansu $TANSU_VERSION into $TANSU_ROOT (once; takes a while)"
  mkdir -p "$CACHE"
  tmp="$CACHE/tansu-$TANSU_VERSION.partial"
  rm -rf "$tmp"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --root "$tmp" >&2
  rm -rf "$TANSU_ROOT"
  mv "$tmp" "$TANSU_ROOT"
fi
echo "$DENY_ROOT/bin/cargo-deny"
echo "$TANSU_ROOT/bin/tansu"
