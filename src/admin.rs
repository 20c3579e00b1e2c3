//! The administrative commands `init` and `status`: what they check, print and
//! exit with.
//!
//! `init` reads the server's settings, the role's attributes and privileges and
//! the existing objects, decides per item whether it is fine, missing (to be
//! created) or a problem the user must fix ([`plan`], pure), and only when no
//! check failed creates the outbox table, the publication and the slot.
//! `status` prints the slot's progress. The SQL itself (queries and DDL) lives
//! in `setup`; argument parsing lives in `cli`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::Config;
use crate::setup::{self, SetupError};

mod init;
mod replay;
mod status;

pub use replay::{check_range, Range, ReplayArgs};

pub use init::{
    inspect, plan, Facts, Item, ItemState, PublicationFacts, SlotFacts, StateFacts, TableFacts,
};
#[cfg(test)]
use status::{bytes, Status};

/// `--help` footer of `init`.
pub const INIT_HELP: &str = "Exit codes: 0 everything is in place (with --dry-run: no check failed), 1 PostgreSQL unreachable or a statement failed, 2 bad usage or configuration (including bad credentials) or a failed check; the check's line says what to change, and nothing is created while a check fails.

Environment: OUTBOX_RELAY_POSTGRES_URL overrides postgres.url, RUST_LOG sets the log filter (default \"info\").";

/// `--help` footer of `status`.
pub const STATUS_HELP: &str = "Exit codes: 0 the slot exists and is usable, 1 the slot is missing, lost (wal_status = lost) or not a pgoutput slot of this database, or PostgreSQL is unreachable (the reason is printed on stderr), 2 bad usage or configuration (including bad credentials).

Environment: OUTBOX_RELAY_POSTGRES_URL overrides postgres.url, RUST_LOG sets the log filter (default \"info\").";

/// How long the admin commands wait for a connection unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The configs `init` and `status` act on: this instance's shard, or with
/// `all_shards` every shard of the layout.
fn shard_configs(cfg: &Config, all_shards: bool) -> Vec<Config> {
    if all_shards {
        cfg.shard.shard().all().map(|s| cfg.for_shard(s)).collect()
    } else {
        vec![cfg.clone()]
    }
}

/// Runs `outbox-relay init`.
pub fn init_main(cfg: &Config, dry_run: bool, all_shards: bool) -> ExitCode {
    with_client(cfg, |client| async move {
        let mut out = std::io::stdout().lock();
        let configs = shard_configs(cfg, all_shards);
        for c in &configs {
            if configs.len() > 1 {
                let _ = writeln!(out, "-- shard {}", c.shard.shard());
            }
            if let Some(code) = init::run(&client, c, dry_run, &mut out).await? {
                return Ok(Some(code));
            }
        }
        if !dry_run {
            init::report_cut_over(&client, cfg, &mut out).await?;
        }
        Ok(None)
    })
}

/// Runs `outbox-relay status`; `config_path` goes into the hint for a missing slot.
pub fn status_main(cfg: &Config, config_path: &Path, json: bool, all_shards: bool) -> ExitCode {
    with_client(cfg, |client| async move {
        let mut out = std::io::stdout().lock();
        let configs = shard_configs(cfg, all_shards);
        let mut reports = Vec::new();
        for c in &configs {
            reports.push(status::read(&client, c).await?);
        }
        if json && all_shards {
            let all: Vec<_> = reports.iter().map(|r| r.json()).collect();
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&all).expect("serializable")
            );
        } else if json {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&reports[0].json()).expect("serializable")
            );
        } else {
            for (c, r) in configs.iter().zip(&reports) {
                if configs.len() > 1 {
                    let _ = writeln!(out, "-- shard {}", c.shard.shard());
                }
                let _ = out.write_all(r.text().as_bytes());
            }
        }
        let problems: Vec<String> = reports
            .iter()
            .filter_map(|r| r.problem(config_path))
            .collect();
        for reason in &problems {
            eprintln!("outbox-relay: {reason}");
        }
        Ok((!problems.is_empty()).then_some(1))
    })
}

/// `--help` footer of `replay`.
pub const REPLAY_HELP: &str = "How it works: the request goes into the replay_request table; the instance holding the slot finishes its in-flight deliveries, streams again from the slot's confirmed position (the start of the replay window), produces the transactions of the range again with a `replayed` header, skips the rest up to the checkpoint, and carries on live. With no instance running, this command holds the slot and does it itself, producing nothing outside the range and confirming nothing.

Exit codes: 0 replayed, 1 PostgreSQL or Kafka failed or the request was not executed in time, 2 bad usage or configuration, or a range the slot no longer retains (the message names the earliest replayable LSN).";

/// Runs `outbox-relay replay`.
pub fn replay_main(cfg: &Config, args: &ReplayArgs) -> ExitCode {
    with_client(
        cfg,
        |client| async move { replay::run(client, cfg, args).await },
    )
}

/// Connects, runs `f`, and turns its outcome into the exit code (`Some(code)` = failed).
fn with_client<F, Fut>(cfg: &Config, f: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<Option<u8>, SetupError>>,
{
    let rt = match crate::cli::runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mut pg = cfg.postgres_config().expect("validated");
    if pg.config.get_connect_timeout().is_none() {
        pg.config.connect_timeout(CONNECT_TIMEOUT);
    }
    let result = rt.block_on(async {
        let client = setup::sql_connect(&pg).await?;
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

#[cfg(test)]
mod tests;
