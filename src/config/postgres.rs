//! `[postgres]`: where the WAL comes from, and the slot and publication.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use super::names::validate_identifier;
use super::{invalid, ConfigError};
use crate::transport::PgTarget;

/// Environment variable that overrides `postgres.url` (keeps the password out of the file).
pub const ENV_POSTGRES_URL: &str = "OUTBOX_RELAY_POSTGRES_URL";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// libpq URL (`postgresql://user:pass@host:port/db`) or key=value conninfo.
    /// Required unless `OUTBOX_RELAY_POSTGRES_URL` is set, which overrides it.
    pub url: Option<String>,
    /// File holding the connection string (a mounted secret), instead of `url`.
    pub url_file: Option<PathBuf>,
    /// File holding the password, which then need not be in the URL.
    pub password_file: Option<PathBuf>,
    /// Logical replication slot (pgoutput). Default `outbox_relay`.
    pub slot: String,
    /// Publication the slot streams. Default `outbox_relay`.
    pub publication: String,
    /// Create the publication and the slot when they are missing. Default `true`.
    pub create_missing: bool,
    /// Create the slot even when its publication already exists or the slot
    /// disappeared while running (events committed meanwhile are skipped).
    /// Default `false`: a missing slot is then a fatal error.
    pub recreate_missing_slot: bool,
    /// Whether the relay creates its slot as a failover slot, which PostgreSQL 17+
    /// copies to standbys running with `sync_replication_slots = on`, so a
    /// promoted standby has it: `auto` (default: on 17 and later), `on` (an
    /// error below 17), `off`. On 17+ an existing slot is switched to match.
    pub failover_slot: FailoverSlot,
    /// Interval between standby status updates, in milliseconds. Default 1000.
    /// Keep it well below the server's `wal_sender_timeout`.
    pub status_interval_ms: u64,
    /// Shortest interval between two standby status updates sent because the
    /// acknowledged position advanced, in milliseconds. Default 20. The slot's
    /// confirmed position trails the acknowledged one by about this much (plus
    /// the walsender's reaction), so a restart after a crash re-sends only what
    /// was in flight and what was acknowledged in this last interval.
    pub confirm_interval_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            url_file: None,
            password_file: None,
            slot: "outbox_relay".into(),
            publication: "outbox_relay".into(),
            create_missing: true,
            recreate_missing_slot: false,
            failover_slot: FailoverSlot::Auto,
            status_interval_ms: 1000,
            confirm_interval_ms: 20,
        }
    }
}

/// `postgres.failover_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverSlot {
    /// A failover slot where the server supports it (PostgreSQL 17+).
    #[default]
    Auto,
    /// A failover slot, or an error below PostgreSQL 17.
    On,
    /// An ordinary slot.
    Off,
}

impl PostgresConfig {
    /// Takes the URL from the environment or `url_file` (read once, here).
    pub(super) fn apply_env(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(url) = env(ENV_POSTGRES_URL).filter(|v| !v.is_empty()) {
            self.url = Some(url);
            self.url_file = None;
        } else if let Some(file) = &self.url_file {
            if self.url.is_some() {
                return Err(ConfigError::Conflict {
                    message: "postgres.url and postgres.url_file are both set; remove one".into(),
                });
            }
            self.url = Some(read_secret(file)?);
        }
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        validate_identifier("postgres.slot", &self.slot)?;
        if self.publication.is_empty() {
            return Err(invalid("postgres.publication", "must not be empty"));
        }
        if !(100..=60_000).contains(&self.status_interval_ms) {
            return Err(invalid(
                "postgres.status_interval_ms",
                format!(
                    "{} is outside 100..=60000; keep it well below wal_sender_timeout",
                    self.status_interval_ms
                ),
            ));
        }
        if !(1..=self.status_interval_ms).contains(&self.confirm_interval_ms) {
            return Err(invalid(
                "postgres.confirm_interval_ms",
                format!(
                    "{} is outside 1..={} (postgres.status_interval_ms); a status update is sent at least that often anyway",
                    self.confirm_interval_ms, self.status_interval_ms
                ),
            ));
        }
        Ok(())
    }

    /// The parsed connection string and its TLS settings (`sslmode`,
    /// `sslrootcert`; the root certificate and password files are read here,
    /// once). Errors never contain the string itself (it may hold a password).
    pub(super) fn target(&self) -> Result<PgTarget, ConfigError> {
        let url = self.url.as_deref().ok_or_else(|| ConfigError::Missing {
            key: "postgres.url",
            hint: format!("set it in the config file or in {ENV_POSTGRES_URL}"),
        })?;
        let (rest, tls_params) =
            crate::transport::split_params(url).map_err(|m| invalid("postgres.url", m))?;
        let mut cfg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            invalid(
                "postgres.url",
                format!("is not a valid libpq URL or key=value connection string ({e}); example: postgresql://relay@127.0.0.1:5432/app"),
            )
        })?;
        if cfg.get_hosts().is_empty() {
            cfg.host("localhost");
        }
        if cfg.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
            cfg.user(&user);
        }
        if cfg.get_dbname().is_none() {
            let user = cfg.get_user().unwrap_or("postgres").to_string();
            cfg.dbname(&user);
        }
        cfg.application_name("outbox-relay");
        if let Some(file) = &self.password_file {
            cfg.password(read_secret(file)?);
        }
        // TLS is set up by `transport` for both connections, per the TLS parameters.
        PgTarget::new(cfg, &tls_params).map_err(|m| invalid("postgres.url", m))
    }
}

/// Reads a secret file; the content is trimmed of surrounding whitespace and
/// never appears in an error.
pub(crate) fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadSecret {
        path: path.into(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(ConfigError::Invalid {
            key: "postgres.url_file/password_file",
            message: format!("{path:?} is empty"),
        });
    }
    Ok(text.to_string())
}
