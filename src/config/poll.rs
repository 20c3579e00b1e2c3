//! The `[source]` and `[poll]` sections: where events come from (the WAL
//! through a replication slot, or polling the outbox table over plain SQL),
//! and how the polling mode reads, removes and waits for rows.
//!
//! Plain data with its defaults in one place and its own `validate()`; what
//! polling does with it lives in `poll`.

use serde::Deserialize;

use super::{invalid, ConfigError};

/// Where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Logical replication (pgoutput) from a slot (the default).
    #[default]
    Wal,
    /// Polling the outbox table over an ordinary SQL connection: no slot, no
    /// publication, no REPLICATION privilege, any `wal_level`.
    Poll,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `wal` (default) or `poll`.
    pub kind: SourceKind,
}

/// What happens to a row once the sink acknowledged it (and every row sent before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSend {
    /// `DELETE` the row (the default): the table holds only unsent rows.
    #[default]
    Delete,
    /// `UPDATE` the row's `poll.sent_column` to `now()`; removing old rows is
    /// then the application's job.
    Mark,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// Column that orders the rows: a unique integer assigned at insert from a
    /// sequence with CACHE 1 (an identity column). `init` adds it as
    /// `bigint GENERATED ALWAYS AS IDENTITY` when missing. Default `relay_seq`.
    pub order_column: String,
    /// `delete` (default) or `mark`.
    pub after_send: AfterSend,
    /// With `after_send = "mark"`: the timestamptz column set to `now()` for a
    /// sent row; rows where it is NULL are unsent. `init` adds it. Default `sent_at`.
    pub sent_column: String,
    /// Most rows read by one poll, and most rows sent and not yet removed
    /// (the in-flight bound is twice this): the catch-up rate grows with it.
    /// Default 5000 (1..=100000).
    pub batch_size: u32,
    /// Milliseconds between polls while rows keep arriving, and the first wait
    /// after an empty poll. Default 100.
    pub interval_ms: u64,
    /// Longest wait between polls: after each empty poll the wait doubles up
    /// to this. With `notify` it is the safety-net interval. Default 2000.
    pub max_interval_ms: u64,
    /// Wake up on `NOTIFY` from a statement trigger on the outbox table
    /// (created by `init`) instead of waiting out the interval. Default `false`.
    pub notify: bool,
    /// Shortest interval between two `DELETE`s (or `UPDATE`s) of acknowledged
    /// rows, in milliseconds: acknowledged rows are removed in one statement
    /// at most this often. A crash re-sends what was in flight and what was
    /// acknowledged within about this long. Default 20 (1..=60000).
    pub after_send_interval_ms: u64,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            order_column: "relay_seq".into(),
            after_send: AfterSend::Delete,
            sent_column: "sent_at".into(),
            batch_size: 5000,
            interval_ms: 100,
            max_interval_ms: 2000,
            notify: false,
            after_send_interval_ms: 20,
        }
    }
}

impl PollConfig {
    /// The `NOTIFY` channel of `table` (a `schema.table` name), at most 63 bytes.
    pub fn channel(table: &super::TableName) -> String {
        let mut c = format!("outbox_relay_{}_{}", table.schema, table.name);
        while c.len() > 63 {
            c.pop();
        }
        c
    }
}

/// Checks `[source]` and `[poll]`, and the options polling cannot honour.
pub(super) fn validate(
    source: &SourceConfig,
    p: &PollConfig,
    shard: &super::ShardConfig,
    outbox: &super::OutboxConfig,
    replay: &super::ReplayConfig,
) -> Result<(), ConfigError> {
    if p.order_column.is_empty() {
        return Err(invalid("poll.order_column", "must name a column"));
    }
    if p.after_send == AfterSend::Mark && p.sent_column.is_empty() {
        return Err(invalid(
            "poll.sent_column",
            "must name a column when poll.after_send = \"mark\"",
        ));
    }
    if p.sent_column == p.order_column {
        return Err(invalid(
            "poll.sent_column",
            format!(
                "{:?} is also poll.order_column; give them different columns",
                p.sent_column
            ),
        ));
    }
    if !(1..=100_000).contains(&p.batch_size) {
        return Err(invalid(
            "poll.batch_size",
            format!("{} is outside 1..=100000", p.batch_size),
        ));
    }
    if !(1..=3_600_000).contains(&p.interval_ms) {
        return Err(invalid(
            "poll.interval_ms",
            format!("{} is outside 1..=3600000", p.interval_ms),
        ));
    }
    if p.max_interval_ms < p.interval_ms || p.max_interval_ms > 3_600_000 {
        return Err(invalid(
            "poll.max_interval_ms",
            format!(
                "{} must be at least poll.interval_ms ({}) and at most 3600000",
                p.max_interval_ms, p.interval_ms
            ),
        ));
    }
    if !(1..=60_000).contains(&p.after_send_interval_ms) {
        return Err(invalid(
            "poll.after_send_interval_ms",
            format!("{} is outside 1..=60000", p.after_send_interval_ms),
        ));
    }
    if source.kind != SourceKind::Poll {
        return Ok(());
    }
    let conflict = |message: &str| {
        Err(ConfigError::Conflict {
            message: message.into(),
        })
    };
    if shard.count > 1 {
        return conflict("shard.count > 1 splits the WAL over several slots; with source.kind = \"poll\" one leader polls the table (the others stand by): remove shard.count, or use source.kind = \"wal\"");
    }
    if !outbox.messages_prefix.is_empty() {
        return conflict("outbox.messages_prefix relays pg_logical_emit_message events, which exist only in the WAL; with source.kind = \"poll\" remove messages_prefix (write outbox rows), or use source.kind = \"wal\"");
    }
    if replay.window.is_some() {
        return conflict("replay.window keeps WAL for replays through the slot; with source.kind = \"poll\" there is no slot: remove replay.window (with poll.after_send = \"mark\", re-send rows by setting their sent column to NULL)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let text = format!("[postgres]\nurl = \"postgresql://relay@db/app\"\n{extra}");
        Config::from_toml(&text, Path::new("relay.toml"), |_| None)
    }

    #[test]
    fn wal_is_the_default_and_poll_has_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.source.kind, SourceKind::Wal);
        let c = parse("[source]\nkind = \"poll\"\n").unwrap();
        assert_eq!(c.source.kind, SourceKind::Poll);
        assert_eq!(c.poll.order_column, "relay_seq");
        assert_eq!(c.poll.after_send, AfterSend::Delete);
        assert_eq!(c.poll.batch_size, 5000);
        assert_eq!((c.poll.interval_ms, c.poll.max_interval_ms), (100, 2000));
        assert!(!c.poll.notify);
        let c = parse("[source]\nkind = \"poll\"\n[poll]\nafter_send = \"mark\"\nnotify = true\n")
            .unwrap();
        assert_eq!(c.poll.after_send, AfterSend::Mark);
        assert_eq!(c.poll.sent_column, "sent_at");
    }

    #[test]
    fn bad_poll_settings_name_the_key_and_the_fix() {
        for (extra, needle) in [
            (
                "[source]\nkind = \"polling\"\n",
                "unknown variant `polling`",
            ),
            ("[poll]\nbatch = 5\n", "unknown field `batch`"),
            ("[poll]\nbatch_size = 0\n", "poll.batch_size"),
            (
                "[poll]\ninterval_ms = 500\nmax_interval_ms = 100\n",
                "at least poll.interval_ms",
            ),
            ("[poll]\norder_column = \"\"\n", "poll.order_column"),
            (
                "[poll]\nafter_send = \"mark\"\nsent_column = \"\"\n",
                "poll.sent_column",
            ),
            ("[poll]\nsent_column = \"relay_seq\"\n", "different columns"),
            (
                "[poll]\nafter_send_interval_ms = 0\n",
                "poll.after_send_interval_ms",
            ),
            (
                "[source]\nkind = \"poll\"\n[shard]\ncount = 2\n",
                "remove shard.count",
            ),
            (
                "[source]\nkind = \"poll\"\n[outbox]\nmessages_prefix = \"outbox\"\n",
                "remove messages_prefix",
            ),
            (
                "[source]\nkind = \"poll\"\n[replay]\nwindow = \"1h\"\n",
                "remove replay.window",
            ),
        ] {
            let e = parse(extra).expect_err(extra).to_string();
            assert!(e.contains(needle), "{extra:?}: {e}");
        }
    }

    #[test]
    fn notify_channels_fit_an_identifier() {
        let t = super::super::TableName {
            schema: "public".into(),
            name: "x".repeat(80),
        };
        assert_eq!(PollConfig::channel(&t).len(), 63);
        let t = super::super::TableName {
            schema: "app".into(),
            name: "outbox".into(),
        };
        assert_eq!(PollConfig::channel(&t), "outbox_relay_app_outbox");
    }
}
