//! The polling mode (`[source] kind = "poll"`) in tests: a test's config for
//! it, `init` run in this process, and what is left in the table.

use std::path::Path;

use outbox_relay::admin;
use outbox_relay::config::Config;

use super::case::TestCase;

/// `[poll]` keys every polling test gets unless it sets them itself: short
/// waits, so tests do not idle.
const POLL_DEFAULTS: &[(&str, &str)] = &[("interval_ms", "20"), ("max_interval_ms", "200")];

impl TestCase {
    /// This test's config text with `[source] kind = "poll"` and a `[poll]`
    /// section of `poll` (lines `key = value`) over [`POLL_DEFAULTS`].
    pub fn poll_config_text(&self, poll: &str) -> String {
        let mut section = String::new();
        for (k, v) in POLL_DEFAULTS {
            if !poll
                .lines()
                .any(|l| l.split('=').next().map(str::trim) == Some(*k))
            {
                section.push_str(&format!("{k} = {v}\n"));
            }
        }
        section.push_str(poll);
        format!(
            "{}\n[source]\nkind = \"poll\"\n\n[poll]\n{section}\n",
            self.config_text(&self.s.brokers, "")
        )
    }

    pub fn poll_config(&self, poll: &str) -> Config {
        parse_config(&self.poll_config_text(poll))
    }

    /// Rows still in this test's table (with `after_send = "mark"`: `filter`
    /// such as `WHERE sent_at IS NULL`).
    pub async fn rows_left(&self, filter: &str) -> i64 {
        self.s
            .sql()
            .await
            .query_one(
                &format!("SELECT count(*) FROM public.{} {filter}", self.table),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }
}

/// A config from its text (a test's own variant of [`TestCase::poll_config_text`]).
pub fn parse_config(text: &str) -> Config {
    Config::from_toml(text, Path::new("test.toml"), |_| None).unwrap()
}

/// `outbox-relay init` for `cfg`, in this process; panics unless everything is in place.
pub async fn init_poll(cfg: &Config) {
    let client = admin::connect(cfg).await.unwrap();
    let failed = admin::init(client, cfg, false, false).await.unwrap();
    assert_eq!(failed, None, "init failed (see its output above)");
}
