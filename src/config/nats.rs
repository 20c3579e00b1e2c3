//! `[nats]`: where the NATS JetStream sink connects, how many publishes may
//! wait for their acknowledgement, TLS, and the stream it may create for
//! development. Resolved once when the config is loaded (environment
//! override, secret file); checked strictly only when `[sink] kind = "nats"`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::take_url;
use super::{invalid, ConfigError, SinkKind};

/// Environment variable that overrides `nats.url` (credentials stay out of the file).
pub const ENV_NATS_URL: &str = "OUTBOX_RELAY_NATS_URL";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://host:4222`,
    /// `tls://host:4222`; `nats://user:password@host` or `nats://token@host`
    /// for credentials). Required with `[sink] kind = "nats"` unless
    /// `OUTBOX_RELAY_NATS_URL` is set, which overrides it.
    pub url: Option<String>,
    /// File holding the URL (a mounted secret), instead of `url`.
    pub url_file: Option<PathBuf>,
    /// Publishes whose acknowledgement (PubAck) may be outstanding at once.
    /// Default 512. Bounds the memory held for records in flight together
    /// with the relay's queue.
    pub max_outstanding: usize,
    /// How long a publish waits for its PubAck, in milliseconds. Default
    /// 5000. A timeout ends the session; the records are sent again from the
    /// slot (JetStream drops the copies it already stored, by `Nats-Msg-Id`).
    pub ack_timeout_ms: u64,
    /// How long connecting may take, in milliseconds. Default 5000.
    pub connect_timeout_ms: u64,
    /// Create (or extend) the stream `nats.stream` so that it captures every
    /// subject the relay publishes to. Default `false`: streams belong to
    /// their users, and a subject no stream captures stops delivery with an
    /// error naming it. Meant for development.
    pub create_stream: bool,
    /// Name of the stream `create_stream` creates. Default `OUTBOX`.
    pub stream: String,
    /// The `duplicate_window` of the stream `create_stream` creates, in
    /// seconds: how long JetStream remembers a `Nats-Msg-Id` and drops a
    /// re-sent copy. Default 120 (JetStream's own default).
    pub duplicate_window_secs: u64,
    /// Refuse to connect without TLS. Default `false` (a `tls://` URL, or a
    /// server that requires TLS, also gives TLS).
    pub tls_required: bool,
    /// PEM file of the certificate authorities to trust for the server,
    /// beside the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: None,
            url_file: None,
            max_outstanding: 512,
            ack_timeout_ms: 5000,
            connect_timeout_ms: 5000,
            create_stream: false,
            stream: "OUTBOX".into(),
            duplicate_window_secs: 120,
            tls_required: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl NatsConfig {
    /// The URL, once resolved (present whenever the sink is NATS).
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or_default()
    }

    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.ack_timeout_ms)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// The servers of `url`, parsed (credentials included).
    pub fn servers(&self) -> Result<Vec<async_nats::ServerAddr>, String> {
        self.url()
            .split(',')
            .map(str::trim)
            .map(|s| {
                let addr: async_nats::ServerAddr = s.parse().map_err(|e| {
                    // The message never repeats the URL: it may hold a password.
                    format!("a server address is not a NATS URL ({e}); write nats://host:4222 or tls://host:4222")
                })?;
                match addr.scheme() {
                    "nats" | "tls" => Ok(addr),
                    other => Err(format!(
                        "scheme {other:?} is not supported; use nats:// or tls://"
                    )),
                }
            })
            .collect()
    }

    /// Applies `OUTBOX_RELAY_NATS_URL` and `url_file`, then checks the
    /// section. With another sink only the syntax is checked (the section is unused).
    pub(super) fn resolve(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
        kind: SinkKind,
    ) -> Result<(), ConfigError> {
        take_url(
            env,
            ENV_NATS_URL,
            ("nats.url", "nats.url_file"),
            &mut self.url,
            &mut self.url_file,
        )?;
        if kind != SinkKind::Nats {
            return Ok(());
        }
        match self.url.as_deref().map(str::trim) {
            None | Some("") => {
                return Err(ConfigError::Missing {
                    key: "nats.url",
                    hint: format!(
                        "[sink] kind = \"nats\" needs a server: set nats.url (e.g. \"nats://127.0.0.1:4222\"), nats.url_file or {ENV_NATS_URL}"
                    ),
                })
            }
            Some(_) => {}
        }
        self.servers().map_err(|m| invalid("nats.url", m))?;
        if !(1..=65_536).contains(&self.max_outstanding) {
            return Err(invalid(
                "nats.max_outstanding",
                format!("{} is outside 1..=65536", self.max_outstanding),
            ));
        }
        for (key, ms) in [
            ("nats.ack_timeout_ms", self.ack_timeout_ms),
            ("nats.connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if !(100..=600_000).contains(&ms) {
                return Err(invalid(key, format!("{ms} is outside 100..=600000")));
            }
        }
        if !valid_stream_name(&self.stream) {
            return Err(invalid(
                "nats.stream",
                format!(
                    "{:?} is not a valid stream name (1-255 printable characters without spaces, '.', '*', '>', '/' or '\\')",
                    self.stream
                ),
            ));
        }
        if self.duplicate_window_secs == 0 {
            return Err(invalid(
                "nats.duplicate_window_secs",
                "must be at least 1: re-sent records are dropped only inside this window",
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Conflict {
                    message:
                        "nats.tls_cert_file and nats.tls_key_file go together; set both or neither"
                            .into(),
                })
            }
            _ => {}
        }
        for (key, file) in [
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file {
                if let Err(e) = std::fs::metadata(f) {
                    return Err(invalid(key, format!("cannot read {f:?}: {e}")));
                }
            }
        }
        Ok(())
    }
}

fn valid_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    const BASE: &str = "[postgres]\nurl = \"postgresql://relay@db/app\"\n";

    fn parse(extra: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{extra}"), Path::new("r.toml"), env)
    }

    #[test]
    fn nats_sink_needs_a_url_and_says_where_to_put_it() {
        let e = parse("[sink]\nkind = \"nats\"\n", |_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats.url is missing"), "{e}");
        assert!(e.contains(ENV_NATS_URL), "{e}");
        // Without the NATS sink the section is not needed.
        parse("", |_| None).unwrap();
    }

    #[test]
    fn url_comes_from_the_file_or_the_environment_and_defaults_are_documented() {
        let c = parse(
            "[sink]\nkind = \"nats\"\n[nats]\nurl = \"nats://127.0.0.1:4222\"\n",
            |_| None,
        )
        .unwrap();
        assert_eq!(c.nats.url(), "nats://127.0.0.1:4222");
        assert_eq!(c.nats.max_outstanding, 512);
        assert_eq!(c.nats.ack_timeout_ms, 5000);
        assert_eq!(c.nats.stream, "OUTBOX");
        assert_eq!(c.nats.duplicate_window_secs, 120);
        assert!(!c.nats.create_stream);
        assert!(c.sink.confirms());

        let env = |k: &str| (k == ENV_NATS_URL).then(|| "nats://u:p@a:1,nats://b:2".to_string());
        let c = parse("[sink]\nkind = \"nats\"\n", env).unwrap();
        assert_eq!(c.nats.servers().unwrap().len(), 2);

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("url");
        std::fs::write(&f, "tls://secret-token@nats.example:4222\n").unwrap();
        let c = parse(
            &format!("[sink]\nkind = \"nats\"\n[nats]\nurl_file = {f:?}\n"),
            |_| None,
        )
        .unwrap();
        assert_eq!(c.nats.url(), "tls://secret-token@nats.example:4222");
        let e = parse(
            &format!("[sink]\nkind = \"nats\"\n[nats]\nurl = \"nats://a\"\nurl_file = {f:?}\n"),
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("remove one"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_never_echo_the_url() {
        for (section, needle) in [
            ("url = \"http://user:hunter2@h:80\"", "tls://host:4222"),
            (
                "url = \"nats://a\"\nmax_outstanding = 0",
                "nats.max_outstanding",
            ),
            (
                "url = \"nats://a\"\nack_timeout_ms = 5",
                "nats.ack_timeout_ms",
            ),
            ("url = \"nats://a\"\nstream = \"a.b\"", "nats.stream"),
            (
                "url = \"nats://a\"\nduplicate_window_secs = 0",
                "nats.duplicate_window_secs",
            ),
            (
                "url = \"nats://a\"\ntls_cert_file = \"/x\"",
                "set both or neither",
            ),
            (
                "url = \"nats://a\"\ntls_ca_file = \"/nonexistent/ca.pem\"",
                "nats.tls_ca_file",
            ),
            ("url = \"nats://a\"\nsubject = \"x\"", "unknown field"),
        ] {
            let e = parse(
                &format!("[sink]\nkind = \"nats\"\n[nats]\n{section}\n"),
                |_| None,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(needle), "{section}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
