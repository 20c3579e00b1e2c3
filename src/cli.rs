//! Command-line interface: argument parsing, logging setup and exit codes.
//!
//! Exit codes: 0 clean shutdown, 1 runtime failure, 2 bad usage or configuration.
//! The binary in `src/bin` only calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::admin;
use crate::config::{Config, SinkKind};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::relay::{self, RunOptions};
use crate::setup::SetupError;

const EXIT_HELP: &str = "Exit codes: 0 clean shutdown, 1 runtime failure (PostgreSQL or Kafka problem the relay cannot retry), 2 bad usage or configuration.

Environment: OUTBOX_RELAY_POSTGRES_URL overrides postgres.url, OUTBOX_RELAY_KAFKA_BROKERS overrides kafka.brokers, OUTBOX_RELAY_REDIS_URL / _NATS_URL / _RABBITMQ_URL override redis.url / nats.url / rabbitmq.url, RUST_LOG sets the log filter (default \"info\").";

#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about = "Relays transactional outbox rows from PostgreSQL logical replication to Kafka", after_help = EXIT_HELP)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream outbox inserts to Kafka until SIGTERM or SIGINT.
    ///
    /// Creates the publication and the slot if missing (postgres.create_missing),
    /// confirms the slot only after Kafka acknowledged every record up to it, and
    /// on SIGTERM/SIGINT waits relay.shutdown_timeout_ms for in-flight deliveries.
    #[command(after_help = EXIT_HELP)]
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Start from this LSN (X/X) instead of the slot's confirmed position and
        /// produce every transaction committed after it, even if acknowledged
        /// before; refused if it is behind the slot's confirmed position.
        #[arg(long, value_name = "LSN")]
        start_lsn: Option<Lsn>,
    },
    /// Produce again every outbox event committed in an LSN range (inside the replay window).
    ///
    /// Re-sends the events of transactions whose commit end LSN is after
    /// --from-lsn and at most --to-lsn (default: the checkpoint), with the same
    /// topic, key, value and headers plus a `replayed` header (the request id).
    /// The live stream then continues where it was; the checkpoint never moves
    /// back. Refused, naming the earliest replayable LSN, if the slot no longer
    /// retains the start of the range (see [replay] window).
    #[command(after_help = REPLAY_HELP)]
    Replay {
        /// Path of the TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Replay transactions that end after this LSN (X/X), e.g. a message's `lsn` header.
        #[arg(long, value_name = "LSN")]
        from_lsn: Lsn,
        /// Replay transactions that end at or before this LSN. Default: the checkpoint.
        #[arg(long, value_name = "LSN")]
        to_lsn: Option<Lsn>,
        /// Append this to every replayed record's topic (e.g. ".replay").
        #[arg(long, value_name = "SUFFIX", conflicts_with = "only_topic")]
        topic_suffix: Option<String>,
        /// Replay only the records routed to this topic.
        #[arg(long, value_name = "TOPIC")]
        only_topic: Option<String>,
        /// How long to wait for a running instance to execute the request, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        wait_secs: u64,
    },
    /// Print what the relay would send, one JSON line per record, from a temporary slot.
    ///
    /// Streams new outbox inserts from a temporary replication slot (dropped
    /// when the command ends) to stdout as JSON lines: topic, key, value,
    /// headers, lsn. Touches neither Kafka nor the relay's slot, so it runs
    /// beside a live relay. Stop with Ctrl-C.
    #[command(after_help = EXIT_HELP)]
    Tail {
        /// Path of the TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Parse and validate the configuration without connecting to anything.
    #[command(after_help = EXIT_HELP)]
    CheckConfig {
        /// Path of the TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check PostgreSQL and the role, then create the outbox table, publication and slot if missing.
    ///
    /// Checks wal_level, max_replication_slots and max_wal_senders (enough free),
    /// the role's REPLICATION attribute, SELECT on the outbox table (or CREATE on
    /// its schema when the table must be created), CREATE on the database and
    /// ownership of the table when the publication must be created, and the
    /// configured columns. Prints one line per item: ok, created, would create,
    /// or what to change. Creates nothing while a check fails, whatever
    /// postgres.create_missing says. Safe to run again: what exists is left alone.
    #[command(after_help = INIT_HELP)]
    Init {
        /// Path of the TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print the SQL that would run (one statement per line) and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With shard.count > 1: every shard's publication and slot, not only shard.index's.
        #[arg(long)]
        all_shards: bool,
    },
    /// Show the replication slot, its retained WAL and lag, and the publication.
    ///
    /// Prints the slot (active, active_pid, confirmed_flush_lsn, restart_lsn,
    /// retained_wal_bytes = current WAL - restart_lsn, wal_status), the server's
    /// current WAL position, lag_bytes (current WAL - confirmed_flush_lsn) and
    /// the publication's tables. Never prints the connection string.
    #[command(after_help = STATUS_HELP)]
    Status {
        /// Path of the TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print one JSON object (LSNs as "X/X" strings, byte counts as numbers) instead of text.
        #[arg(long)]
        json: bool,
        /// With shard.count > 1: every shard (text: one block per shard; JSON: an array).
        #[arg(long)]
        all_shards: bool,
    },
}

fn init_logging(format: LogFormat) {
    // lapin logs every message RabbitMQ returns (payload included) as a
    // warning; the relay reports the record itself, without the payload.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,lapin::returned_messages=error".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("outbox-relay: {e}");
        ExitCode::from(2)
    })
}

/// Entry point of the `outbox-relay` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match load(&config) {
            Ok(cfg) => {
                // Never a sink's URL: it may hold a password.
                let sink = match cfg.sink.kind {
                    SinkKind::Kafka => {
                        format!("brokers {:?}", cfg.kafka.brokers)
                    }
                    other => format!("sink {}", other.label()),
                };
                let source = match cfg.source.kind {
                    crate::config::SourceKind::Wal => format!(
                        "slot {:?}, publication {:?}",
                        cfg.postgres.slot, cfg.postgres.publication
                    ),
                    crate::config::SourceKind::Poll => "polling the table".to_string(),
                };
                println!(
                    "{}: ok ({source}, table {}, topic template {:?}, {sink})",
                    config.display(),
                    cfg.outbox.table,
                    cfg.outbox.topic,
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Init {
            config,
            dry_run,
            all_shards,
        } => match load(&config) {
            Ok(cfg) => with_client(&cfg, |client| {
                admin::init(client, &cfg, dry_run, all_shards)
            }),
            Err(code) => code,
        },
        Command::Status {
            config,
            json,
            all_shards,
        } => match load(&config) {
            Ok(cfg) => with_client(&cfg, |client| {
                admin::status(client, &cfg, &config, json, all_shards)
            }),
            Err(code) => code,
        },
        Command::Run { config, start_lsn } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let opts = RunOptions {
                start_lsn,
                ..RunOptions::default()
            };
            match runtime(tokio::runtime::Builder::new_multi_thread()) {
                Ok(rt) => rt.block_on(run(cfg, opts)),
                Err(code) => code,
            }
        }
        Command::Replay {
            config,
            from_lsn,
            to_lsn,
            topic_suffix,
            only_topic,
            wait_secs,
        } => match load(&config) {
            Ok(cfg) => {
                let args = admin::ReplayArgs {
                    from: from_lsn,
                    to: to_lsn,
                    only_topic,
                    topic_suffix,
                    wait: std::time::Duration::from_secs(wait_secs),
                };
                with_client(&cfg, |client| admin::replay(client, &cfg, &args))
            }
            Err(code) => code,
        },
        Command::Tail { config } => {
            let mut cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            cfg.sink.kind = SinkKind::Stdout;
            cfg.sink.confirm = Some(false);
            // tail only looks: a publication it created would make the relay's
            // first run take the missing slot for a lost one.
            cfg.postgres.create_missing = false;
            cfg.metrics.listen.clear();
            let opts = RunOptions {
                temporary_slot: Some(format!("outbox_relay_tail_{}", std::process::id())),
                ..RunOptions::default()
            };
            match runtime(tokio::runtime::Builder::new_multi_thread()) {
                Ok(rt) => rt.block_on(run(cfg, opts)),
                Err(code) => code,
            }
        }
    }
}

async fn run(cfg: Config, opts: RunOptions) -> ExitCode {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight deliveries");
        let _ = tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(1);
    });
    let metrics = Arc::new(Metrics::labelled(cfg.shard.shard(), cfg.sink.kind.label()));
    if !cfg.metrics.listen.is_empty() {
        match crate::http::bind(&cfg.metrics.listen).await {
            Ok(listener) => {
                tracing::info!(listen = %cfg.metrics.listen, "serving /metrics, /healthz and /readyz");
                tokio::spawn(crate::http::serve(listener, metrics.clone()));
            }
            Err(e) => {
                eprintln!("outbox-relay: {e}");
                return ExitCode::from(2);
            }
        }
    }
    // On a worker thread, next to the I/O driver: fewer cross-thread wake-ups
    // than running the stream loop on the thread that blocks on the runtime.
    let relay = tokio::spawn(relay::run_with(cfg, metrics, rx, opts));
    let result = match relay.await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay: the relay task failed: {e}");
            return ExitCode::from(1);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "relay stopped");
            eprintln!("outbox-relay: {e}");
            ExitCode::from(e.disposition().exit_code())
        }
    }
}

/// Builds the async runtime; a failure is reported and becomes exit code 1.
pub(crate) fn runtime(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("outbox-relay: cannot start the async runtime: {e}");
        ExitCode::from(1)
    })
}

/// `--help` footer of `init`.
pub const INIT_HELP: &str = "Exit codes: 0 everything is in place (with --dry-run: no check failed), 1 PostgreSQL unreachable or a statement failed, 2 bad usage or configuration (including bad credentials) or a failed check; the check's line says what to change, and nothing is created while a check fails.

Environment: OUTBOX_RELAY_POSTGRES_URL overrides postgres.url, RUST_LOG sets the log filter (default \"info\").";
/// `--help` footer of `status`.
pub const STATUS_HELP: &str = "Exit codes: 0 the slot exists and is usable, 1 the slot is missing, lost (wal_status = lost) or not a pgoutput slot of this database, or PostgreSQL is unreachable (the reason is printed on stderr), 2 bad usage or configuration (including bad credentials).

Environment: OUTBOX_RELAY_POSTGRES_URL overrides postgres.url, RUST_LOG sets the log filter (default \"info\").";
/// `--help` footer of `replay`.
pub const REPLAY_HELP: &str = "How it works: the request goes into the replay_request table; the instance holding the slot finishes its in-flight deliveries, streams again from the slot's confirmed position (the start of the replay window), produces the transactions of the range again with a `replayed` header, skips the rest up to the checkpoint, and carries on live. With no instance running, this command holds the slot and does it itself, producing nothing outside the range and confirming nothing.

Exit codes: 0 replayed, 1 PostgreSQL or Kafka failed or the request was not executed in time, 2 bad usage or configuration, or a range the slot no longer retains (the message names the earliest replayable LSN).";

/// Runs an admin command on a current-thread runtime and turns its outcome
/// into the exit code (`Some(code)`: it failed with that code).
fn with_client<F, Fut>(cfg: &Config, f: F) -> ExitCode
where
    F: FnOnce(tokio_postgres::Client) -> Fut,
    Fut: std::future::Future<Output = Result<Option<u8>, SetupError>>,
{
    let rt = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
        let client = admin::connect(cfg).await?;
        f(client).await
    });
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            ExitCode::from(e.disposition().exit_code())
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
