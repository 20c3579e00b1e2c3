//! The administrative commands `init`, `status` and `replay`, as plain async
//! functions: what they check, print, and which failure code they report.
//! The CLI owns the runtime, the help texts and the process exit code.
//!
//! `init` reads the server's settings, the role's attributes and privileges and
//! the existing objects, decides per item whether it is fine, missing (to be
//! created) or a problem the user must fix ([`plan`], pure), and only when no
//! check failed creates the outbox table, the publication and the slot.
//! `status` prints the slot's progress. With `source.kind = "poll"` both
//! print what polling needs instead (`admin::poll`). The SQL itself (queries and DDL) lives
//! in `setup`; argument parsing lives in `cli`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use tokio_postgres::Client;

use crate::config::{Config, SourceKind};
use crate::setup::{self, SetupError};

mod init;
mod poll;
mod replay;
mod status;

pub use replay::{check_range, Range, ReplayArgs};

pub use init::{
    inspect, plan, Facts, Item, ItemState, PublicationFacts, SlotFacts, StateFacts, TableFacts,
};
#[cfg(test)]
use status::{bytes, Status};

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

/// `outbox-relay init`; `Some(code)` when a check or a statement failed.
pub async fn init(
    client: Client,
    cfg: &Config,
    dry_run: bool,
    all_shards: bool,
) -> Result<Option<u8>, SetupError> {
    {
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
        if !dry_run && cfg.source.kind == SourceKind::Wal {
            init::report_cut_over(&client, cfg, &mut out).await?;
        }
        Ok(None)
    }
}

/// `outbox-relay status`; `config_path` goes into the hint for a missing
/// slot; `Some(1)` when a slot is missing, lost or not usable.
pub async fn status(
    client: Client,
    cfg: &Config,
    config_path: &Path,
    json: bool,
    all_shards: bool,
) -> Result<Option<u8>, SetupError> {
    if cfg.source.kind == SourceKind::Poll {
        return poll::status(&client, cfg, config_path, json).await;
    }
    {
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
    }
}

/// `outbox-relay replay`.
pub async fn replay(
    client: Client,
    cfg: &Config,
    args: &ReplayArgs,
) -> Result<Option<u8>, SetupError> {
    if cfg.source.kind == SourceKind::Poll {
        return Err(SetupError::Poll(Box::new(
            crate::setup::poll::PollError::WalOnly { what: "replay" },
        )));
    }
    replay::run(client, cfg, args).await
}

/// The SQL connection of an admin command: `postgres.url`, waiting at most
/// [`CONNECT_TIMEOUT`] unless the URL sets `connect_timeout`.
pub async fn connect(cfg: &Config) -> Result<Client, SetupError> {
    let mut pg = cfg.pg().clone();
    if pg.config.get_connect_timeout().is_none() {
        pg.config.connect_timeout(CONNECT_TIMEOUT);
    }
    setup::sql_connect(&pg).await
}

#[cfg(test)]
mod tests;
