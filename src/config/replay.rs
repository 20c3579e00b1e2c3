//! The `[checkpoint]`, `[replay]` and `[sink]` sections: where the relay keeps
//! its acknowledged position, how much WAL it keeps replayable, and where
//! records go.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, validate_identifier, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Schema of the relay's own tables (`checkpoint`, `replay_request`), created
    /// by `init` (or `sql/002_relay_state.sql`). Default `outbox_relay`.
    pub schema: String,
    /// How often the relay looks for replay requests, in milliseconds. Default
    /// 1000. (Until this version it was also the checkpoint's write interval;
    /// see `write_interval_ms`.)
    pub interval_ms: u64,
    /// Shortest interval between two checkpoint writes while the acknowledged
    /// position advances, in milliseconds. Default 20. The stored position
    /// trails the acknowledged one by about this much plus one write (and is
    /// stored once more on shutdown). Each write is one small UPDATE committed
    /// with `synchronous_commit = off`.
    pub write_interval_ms: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            schema: "outbox_relay".into(),
            interval_ms: 1000,
            write_interval_ms: 20,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    /// How far the slot's confirmed position trails the acknowledged one, so
    /// PostgreSQL keeps that much WAL decodable for `outbox-relay replay`:
    /// a duration (`"90s"`, `"15m"`, `"1h"`, `"7d"`) or a size (`"512MB"`,
    /// `"2GB"`; 1 kB = 1024 bytes, as in postgresql.conf). Default: none.
    #[serde(default)]
    pub window: Option<String>,
}

/// The parsed `replay.window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Keep the slot where the acknowledged position was this long ago.
    Age(Duration),
    /// Keep the slot this many bytes of WAL behind the acknowledged position.
    Bytes(u64),
}

/// Parses `"1h"`, `"30m"`, `"2GB"`, ... (see `Config::window`).
pub fn parse_window(text: &str) -> Result<Window, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. \"1h\" or \"2GB\""))?;
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} must start with a whole number, e.g. \"1h\" or \"2GB\""))?;
    if n == 0 {
        return Err(format!(
            "{text:?} is zero; remove replay.window to keep no replay window"
        ));
    }
    let secs = |mult: u64| Ok(Window::Age(Duration::from_secs(n.saturating_mul(mult))));
    let bytes = |shift: u32| {
        n.checked_mul(1u64 << shift)
            .map(Window::Bytes)
            .ok_or_else(|| format!("{text:?} is too large"))
    };
    match unit.trim() {
        "s" => secs(1),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        "B" => bytes(0),
        "kB" | "KB" => bytes(10),
        "MB" => bytes(20),
        "GB" => bytes(30),
        "TB" => bytes(40),
        other => Err(format!(
            "unknown unit {other:?} in {text:?}; use s, m, h or d for a duration, or B, kB, MB, GB or TB for a size"
        )),
    }
}

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Produce to Kafka (the default).
    #[default]
    Kafka,
    /// Write one JSON line per record to stdout.
    Stdout,
    /// Redis Streams (`XADD`) or pub/sub (`PUBLISH`): `[redis]`.
    Redis,
    /// Publish to NATS JetStream (`[nats]`).
    Nats,
    /// Publish to a RabbitMQ exchange (`[rabbitmq]`).
    #[serde(rename = "rabbitmq")]
    RabbitMq,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `kafka` (default), `stdout`, `redis`, `nats` or `rabbitmq`.
    #[serde(default)]
    pub kind: SinkKind,
    /// With `kind = "stdout"`: confirm the slot and write checkpoints once a
    /// line is written, as with Kafka. Default `false`: the slot stays where it
    /// was, so a later Kafka run sends the same events.
    #[serde(default)]
    pub confirm: Option<bool>,
}

impl SinkConfig {
    /// Whether acknowledged positions are confirmed to the slot and checkpointed.
    pub fn confirms(&self) -> bool {
        match self.kind {
            SinkKind::Kafka | SinkKind::RabbitMq => true,
            SinkKind::Stdout => self.confirm.unwrap_or(false),
            SinkKind::Redis => true,
            SinkKind::Nats => true,
        }
    }
}

pub(super) fn validate(
    checkpoint: &CheckpointConfig,
    replay: &ReplayConfig,
    sink: &SinkConfig,
) -> Result<Option<Window>, ConfigError> {
    validate_identifier("checkpoint.schema", &checkpoint.schema)?;
    if !(100..=600_000).contains(&checkpoint.interval_ms) {
        return Err(invalid(
            "checkpoint.interval_ms",
            format!("{} is outside 100..=600000", checkpoint.interval_ms),
        ));
    }
    if !(1..=60_000).contains(&checkpoint.write_interval_ms) {
        return Err(invalid(
            "checkpoint.write_interval_ms",
            format!(
                "{} is outside 1..=60000; the checkpoint is written at most this often while events are acknowledged",
                checkpoint.write_interval_ms
            ),
        ));
    }
    let window = replay
        .window
        .as_deref()
        .map(parse_window)
        .transpose()
        .map_err(|m| invalid("replay.window", m))?;
    if sink.kind != SinkKind::Stdout && sink.confirm == Some(false) {
        return Err(invalid(
            "sink.confirm",
            "applies only to kind = \"stdout\"; the other sinks always confirm what the destination acknowledged",
        ));
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_as_durations_or_sizes() {
        assert_eq!(
            parse_window("1h"),
            Ok(Window::Age(Duration::from_secs(3600)))
        );
        assert_eq!(
            parse_window("15m"),
            Ok(Window::Age(Duration::from_secs(900)))
        );
        assert_eq!(
            parse_window("7d"),
            Ok(Window::Age(Duration::from_secs(7 * 86_400)))
        );
        assert_eq!(parse_window("2GB"), Ok(Window::Bytes(2 << 30)));
        assert_eq!(parse_window("512 MB"), Ok(Window::Bytes(512 << 20)));
        assert_eq!(parse_window("64kB"), Ok(Window::Bytes(64 << 10)));
    }

    #[test]
    fn bad_windows_say_how_to_write_one() {
        for (text, needle) in [
            ("1", "no unit"),
            ("h", "whole number"),
            ("0h", "remove replay.window"),
            ("3 weeks", "unknown unit"),
            ("1.5h", "unknown unit"),
            ("99999999999TB", "too large"),
        ] {
            let e = parse_window(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn only_a_confirming_stdout_sink_or_kafka_confirms() {
        let sink = |kind, confirm| SinkConfig { kind, confirm };
        assert!(sink(SinkKind::Kafka, None).confirms());
        assert!(!sink(SinkKind::Stdout, None).confirms());
        assert!(sink(SinkKind::Stdout, Some(true)).confirms());
        assert!(sink(SinkKind::RabbitMq, None).confirms());
    }
}
