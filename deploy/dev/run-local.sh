#!/usr/bin/env bash
# Runs outbox-relay in the foreground against a local PostgreSQL and Kafka-protocol
# broker, starting both if they are not already listening:
#   deploy/dev/run-local.sh          start what is missing, apply sql/, run the relay
#   deploy/dev/run-local.sh --sink redis   the same with the Redis sink instead of Kafka
#   deploy/dev/run-local.sh --sink nats    the same with NATS JetStream (stream OUTBOX)
#   deploy/dev/run-local.sh --sink rabbitmq   the same with RabbitMQ (exchange and queue outbox)
#   deploy/dev/run-local.sh stop     stop the servers this script started
#
# PostgreSQL listens on 127.0.0.1:${PGPORT:-54329} (data in .local/pg, trust auth: for
# development only), the broker on 127.0.0.1:${KAFKA_PORT:-9092} (tansu, in memory),
# Redis on 127.0.0.1:${REDIS_PORT:-6389} (data in .local/redis, append-only file),
# NATS on 127.0.0.1:${NATS_PORT:-4222} (JetStream storage in .local/nats),
# RabbitMQ on 127.0.0.1:${RABBITMQ_PORT:-5673} (data in .local/rabbitmq, management
# plugin on ${RABBITMQ_MGMT_PORT:-15673}, user guest).
# If something already listens on a port it is used as is: it must be a PostgreSQL
# with wal_level=logical, a Kafka broker, a Redis server or a NATS server with JetStream.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE="$ROOT/.local"
PGPORT=${PGPORT:-54329}
KAFKA_PORT=${KAFKA_PORT:-9092}
REDIS_PORT=${REDIS_PORT:-6389}
NATS_PORT=${NATS_PORT:-4222}
RABBITMQ_PORT=${RABBITMQ_PORT:-5673}
RABBITMQ_MGMT_PORT=${RABBITMQ_MGMT_PORT:-15673}
SINK=kafka
if [ "${1:-}" = --sink ]; then
  SINK=${2:-}
  shift 2 || true
fi
case "$SINK" in
  kafka | redis | nats | rabbitmq) ;;
  *) echo "usage: $0 [--sink kafka|redis|nats|rabbitmq] | stop" >&2; exit 2 ;;
esac
mkdir -p "$STATE"

log() { echo "run-local: $*" >&2; }
# RabbitMQ in .local/rabbitmq: its own node name, epmd port and files, run as the
# `rabbitmq` user when root; the same environment for rabbitmqctl and epmd. Its
# Erlang distribution and epmd ports are the AMQP port + 20000 and + 20001, below
# the kernel's ephemeral range, which outgoing connections may hold.
RABBITMQ_DIR="$STATE/rabbitmq"
RABBITMQ_NODE="rabbit-local-$RABBITMQ_PORT@localhost"
AS_RABBITMQ=()
[ "$(id -u)" = 0 ] && AS_RABBITMQ=(runuser -u rabbitmq --)
RABBITMQ_ENV=(env HOME="$RABBITMQ_DIR/home" ERL_EPMD_PORT=$((RABBITMQ_PORT + 20001))
  RABBITMQ_NODENAME="$RABBITMQ_NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  RABBITMQ_NODE_PORT="$RABBITMQ_PORT" RABBITMQ_DIST_PORT=$((RABBITMQ_PORT + 20000))
  RABBITMQ_MNESIA_BASE="$RABBITMQ_DIR/mnesia" RABBITMQ_LOG_BASE="$RABBITMQ_DIR/log"
  RABBITMQ_FEATURE_FLAGS_FILE="$RABBITMQ_DIR/feature_flags" RABBITMQ_PID_FILE="$RABBITMQ_DIR/pid"
  RABBITMQ_ENABLED_PLUGINS_FILE="$RABBITMQ_DIR/enabled_plugins" RABBITMQ_CONF_ENV_FILE="$RABBITMQ_DIR/env.conf"
  RABBITMQ_CONFIG_FILE="$RABBITMQ_DIR/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$RABBITMQ_DIR/advanced.config")
rabbitmqadmin() {
  python3 "$(ls /usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbitmq_management-*/priv/www/cli/rabbitmqadmin | tail -n 1)" \
    -H 127.0.0.1 -P "$RABBITMQ_MGMT_PORT" "$@"
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pgbin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1; }

if [ "${1:-}" = stop ]; then
  [ -f "$STATE/pg/data/postmaster.pid" ] && as_pg "$(pgbin)/pg_ctl" -D "$STATE/pg/data" -m fast stop || true
  [ -f "$STATE/tansu.pid" ] && kill "$(cat "$STATE/tansu.pid")" 2>/dev/null && rm -f "$STATE/tansu.pid" || true
  [ -f "$STATE/redis.pid" ] && kill "$(cat "$STATE/redis.pid")" 2>/dev/null && rm -f "$STATE/redis.pid" || true
  [ -f "$STATE/nats.pid" ] && kill "$(cat "$STATE/nats.pid")" 2>/dev/null && rm -f "$STATE/nats.pid" || true
  if [ -f "$STATE/rabbitmq.started" ]; then
    "${AS_RABBITMQ[@]}" "${RABBITMQ_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$RABBITMQ_NODE" stop >/dev/null 2>&1 || true
    "${AS_RABBITMQ[@]}" "${RABBITMQ_ENV[@]}" epmd -kill >/dev/null 2>&1 || true
    rm -f "$STATE/rabbitmq.started"
  fi
  log "stopped"
  exit 0
fi

log "installing what is missing (the first run builds the tansu broker: 10 to 20 minutes)"
TANSU=$(deploy/dev/install-deps.sh local | tail -n 1)
BIN=$(pgbin)
# Built before anything is announced, so the slot exists before the first insert.
log "building the relay and the example consumer (release; a few minutes the first time)"
cargo build --release --locked --bin outbox-relay --example consume --example nats_tail

if ! listening "$PGPORT"; then
  if [ ! -f "$STATE/pg/data/PG_VERSION" ]; then
    log "creating a PostgreSQL cluster in $STATE/pg"
    mkdir -p "$STATE/pg"
    [ "$(id -u)" = 0 ] && chown postgres: "$STATE/pg"
    as_pg "$BIN/initdb" -D "$STATE/pg/data" -U postgres -E UTF8 --auth=trust >/dev/null
  fi
  log "starting PostgreSQL on 127.0.0.1:$PGPORT"
  as_pg "$BIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/postgres.log" -w start -o \
    "-p $PGPORT -k $STATE/pg -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10" >/dev/null
fi

case "$SINK" in
  kafka)
    if ! listening "$KAFKA_PORT"; then
      log "starting tansu on 127.0.0.1:$KAFKA_PORT"
      nohup "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 &
      echo $! >"$STATE/tansu.pid"
      for _ in $(seq 100); do listening "$KAFKA_PORT" && break; sleep 0.1; done
    fi
    SINK_TOML="[kafka]
brokers = \"127.0.0.1:$KAFKA_PORT\"
# tansu does not create topics on first use; a real cluster may.
create_topics = true"
    WHERE="broker 127.0.0.1:$KAFKA_PORT"
    WATCH="target/release/examples/consume 127.0.0.1:$KAFKA_PORT outbox.event.order"
    ;;
  redis)
    if ! listening "$REDIS_PORT"; then
      command -v redis-server >/dev/null || { log "redis-server is missing: apt-get install redis-server (deploy/dev/install-deps.sh installs it)"; exit 1; }
      log "starting redis-server on 127.0.0.1:$REDIS_PORT (data in $STATE/redis, appendfsync always)"
      mkdir -p "$STATE/redis"
      nohup redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE/redis" --appendonly yes \
        --appendfsync always --save "" --protected-mode no >"$STATE/redis/redis.log" 2>&1 &
      echo $! >"$STATE/redis.pid"
      for _ in $(seq 100); do listening "$REDIS_PORT" && break; sleep 0.1; done
    fi
    SINK_TOML="[sink]
kind = \"redis\"

[redis]
url = \"redis://127.0.0.1:$REDIS_PORT\""
    WHERE="Redis redis://127.0.0.1:$REDIS_PORT"
    WATCH="redis-cli -p $REDIS_PORT XREAD BLOCK 0 STREAMS outbox.event.order 0   (docs/sinks/redis.md: the fields, XREADGROUP)"
    ;;
  nats)
    if ! listening "$NATS_PORT"; then
      command -v nats-server >/dev/null || { log "nats-server is missing: apt-get install nats-server (deploy/dev/install-deps.sh installs it)"; exit 1; }
      log "starting nats-server (JetStream) on 127.0.0.1:$NATS_PORT (storage in $STATE/nats)"
      mkdir -p "$STATE/nats"
      nohup nats-server -js -sd "$STATE/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$STATE/nats.log" 2>&1 &
      echo $! >"$STATE/nats.pid"
      for _ in $(seq 100); do listening "$NATS_PORT" && break; sleep 0.1; done
    fi
    SINK_TOML="[sink]
kind = \"nats\"

[nats]
url = \"nats://127.0.0.1:$NATS_PORT\"
# Development only: the relay creates stream OUTBOX with every subject it publishes to.
create_stream = true"
    WHERE="NATS nats://127.0.0.1:$NATS_PORT (stream OUTBOX)"
    WATCH="target/release/examples/nats_tail nats://127.0.0.1:$NATS_PORT OUTBOX"
    ;;
  rabbitmq)
    if ! listening "$RABBITMQ_PORT"; then
      command -v rabbitmq-server >/dev/null || {
        log "rabbitmq-server is missing: run deploy/dev/install-deps.sh (Debian's package; its own service stays stopped)"
        exit 1
      }
      log "starting RabbitMQ on 127.0.0.1:$RABBITMQ_PORT (management on 127.0.0.1:$RABBITMQ_MGMT_PORT)"
      mkdir -p "$RABBITMQ_DIR/home" "$RABBITMQ_DIR/mnesia" "$RABBITMQ_DIR/log"
      echo "[rabbitmq_management]." >"$RABBITMQ_DIR/enabled_plugins"
      printf 'management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' "$RABBITMQ_MGMT_PORT" >"$RABBITMQ_DIR/rabbitmq.conf"
      [ "$(id -u)" = 0 ] && chown -R rabbitmq: "$RABBITMQ_DIR"
      touch "$STATE/rabbitmq.started"
      (cd "$RABBITMQ_DIR" && exec nohup "${AS_RABBITMQ[@]}" "${RABBITMQ_ENV[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server) \
        >"$RABBITMQ_DIR/server.log" 2>&1 &
      for _ in $(seq 600); do listening "$RABBITMQ_PORT" && listening "$RABBITMQ_MGMT_PORT" && break; sleep 0.1; done
      listening "$RABBITMQ_PORT" || { log "RabbitMQ did not start, see $RABBITMQ_DIR/server.log"; exit 1; }
      # The exchange the relay publishes to and a queue taking every routing key:
      # without a queue for it, a record is unroutable and stops the relay.
      rabbitmqadmin declare exchange name=outbox type=topic durable=true >/dev/null
      rabbitmqadmin declare queue name=outbox durable=true >/dev/null
      rabbitmqadmin declare binding source=outbox destination=outbox routing_key='#' >/dev/null
    fi
    SINK_TOML="[sink]
kind = \"rabbitmq\"

[rabbitmq]
url = \"amqp://guest:guest@127.0.0.1:$RABBITMQ_PORT/%2f\"
exchange = \"outbox\"
declare = true"
    WHERE="RabbitMQ 127.0.0.1:$RABBITMQ_PORT (exchange outbox, queue outbox bound to #)"
    WATCH="python3 $(ls /usr/lib/rabbitmq/lib/rabbitmq_server-*/plugins/rabbitmq_management-*/priv/www/cli/rabbitmqadmin 2>/dev/null | tail -n 1) -P $RABBITMQ_MGMT_PORT -f long get queue=outbox count=10 ackmode=ack_requeue_true"
    ;;
esac

URL="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
psql "$URL" -qX -v ON_ERROR_STOP=1 -f sql/001_outbox.sql

cat >"$STATE/relay.toml" <<TOML
# Written by deploy/dev/run-local.sh
[postgres]
url = "$URL"

$SINK_TOML
TOML

RELAY=target/release/outbox-relay
# The publication and slot now: rows inserted from here on are relayed.
"$RELAY" init --config "$STATE/relay.toml" >&2

cat >&2 <<TXT

run-local: PostgreSQL $URL, $WHERE, config $STATE/relay.toml
run-local: in another terminal, insert an event:
  psql "$URL" -c "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'order-1', 'OrderPlaced', '{\"total\": 42}')"
run-local: and watch it arrive:
  $WATCH
run-local: the slot's progress: $RELAY status --config $STATE/relay.toml
run-local: stop the relay with Ctrl-C; stop the servers with: deploy/dev/run-local.sh stop

TXT
exec "$RELAY" run --config "$STATE/relay.toml"
