//! The `[rabbitmq]` section: where the RabbitMQ sink publishes (URL, exchange)
//! and how much it keeps unconfirmed. Resolved once when the config is loaded:
//! the URL from `OUTBOX_RELAY_RABBITMQ_URL`, the file or the config, parsed;
//! the TLS files read. Does not connect (the sink does, in `sink::rabbitmq`).

use std::path::PathBuf;
use std::str::FromStr;

use lapin::uri::{AMQPScheme, AMQPUri};
use serde::Deserialize;

use super::secret::{read_file, take_url};
use super::{invalid, ConfigError, SinkKind};

/// Environment variable that overrides `rabbitmq.url` and `rabbitmq.url_file`.
pub const ENV_RABBITMQ_URL: &str = "OUTBOX_RELAY_RABBITMQ_URL";

/// RabbitMQ's own limit on a message (`max_message_size`'s default, 128 MiB).
const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 << 20;
/// The largest `max_message_size` RabbitMQ accepts (512 MiB).
const SERVER_MAX_MESSAGE_BYTES: usize = 512 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqConfig {
    /// AMQP URL, `amqp://user:password@host:5672/vhost` (`%2f` is the vhost
    /// `/`; `amqps://` for TLS, port 5671; `?heartbeat=30` and the other
    /// query parameters of the AMQP URI spec work). Required with
    /// `sink.kind = "rabbitmq"`; `OUTBOX_RELAY_RABBITMQ_URL` overrides it.
    pub url: Option<String>,
    /// File holding the URL (a mounted secret), instead of `url`.
    pub url_file: Option<PathBuf>,
    /// Exchange every record is published to, with the record's topic as the
    /// routing key. Default `outbox`. `""` is the default exchange (the routing
    /// key names a queue).
    pub exchange: String,
    /// Declare the exchange (durable, of `exchange_type`) when connecting.
    /// Default `false`: it must exist (checked when connecting).
    pub declare: bool,
    /// Type of the exchange `declare` creates: `topic` (default), `direct`,
    /// `fanout` or `headers`.
    pub exchange_type: ExchangeType,
    /// Most records published and not yet confirmed by the server. Default 1000.
    pub max_in_flight: usize,
    /// Records larger than this (body plus headers, bytes) are refused before
    /// publishing, as RabbitMQ refuses them with `max_message_size`; they follow
    /// `outbox.on_invalid` with reason `too_large`. Default 134217728 (128 MiB,
    /// RabbitMQ's default).
    pub max_message_bytes: usize,
    /// How long connecting (TCP, TLS, AMQP handshake, exchange check) may take,
    /// in milliseconds. Default 10000.
    pub connect_timeout_ms: u64,
    /// PEM file of CA certificates trusted for `amqps://`, besides the
    /// system's. Default: the system's only.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate (with its chain) for `amqps://` (mutual TLS);
    /// needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `tls_cert_file`, unencrypted.
    pub tls_key_file: Option<PathBuf>,
    /// The parsed URL (set by `resolve`).
    #[serde(skip)]
    pub uri: Option<AMQPUri>,
    /// The TLS files' contents (set by `resolve`).
    #[serde(skip)]
    pub tls: TlsFiles,
}

/// `rabbitmq.exchange_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeType {
    #[default]
    Topic,
    Direct,
    Fanout,
    Headers,
}

/// The contents of the `tls_*` files.
#[derive(Clone, Default)]
pub struct TlsFiles {
    pub ca_pem: Option<String>,
    pub cert_pem: Option<Vec<u8>>,
    pub key_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("cert_pem", &self.cert_pem.is_some())
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        RabbitMqConfig {
            url: None,
            url_file: None,
            exchange: "outbox".into(),
            declare: false,
            exchange_type: ExchangeType::Topic,
            max_in_flight: 1000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            connect_timeout_ms: 10_000,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            uri: None,
            tls: TlsFiles::default(),
        }
    }
}

impl RabbitMqConfig {
    /// Applies `OUTBOX_RELAY_RABBITMQ_URL` or `url_file`, parses the URL, reads
    /// the TLS files and checks every value. With `kind` other than RabbitMQ
    /// only what is set is checked.
    pub(super) fn resolve(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
        kind: SinkKind,
    ) -> Result<(), ConfigError> {
        take_url(
            env,
            ENV_RABBITMQ_URL,
            ("rabbitmq.url", "rabbitmq.url_file"),
            &mut self.url,
            &mut self.url_file,
        )?;
        let used = kind == SinkKind::RabbitMq;
        match &self.url {
            Some(url) => self.uri = Some(parse_url(url).map_err(|m| invalid("rabbitmq.url", m))?),
            None if used => {
                return Err(ConfigError::Missing {
                    key: "rabbitmq.url",
                    hint: format!(
                        "sink.kind = \"rabbitmq\" needs the server's URL: set rabbitmq.url (e.g. \"amqp://relay:secret@127.0.0.1:5672/%2f\"), rabbitmq.url_file or {ENV_RABBITMQ_URL}"
                    ),
                })
            }
            None => {}
        }
        self.validate_exchange()?;
        if self.max_in_flight == 0 || self.max_in_flight > 65_535 {
            return Err(invalid(
                "rabbitmq.max_in_flight",
                format!("{} is outside 1..=65535", self.max_in_flight),
            ));
        }
        if self.max_message_bytes == 0 || self.max_message_bytes > SERVER_MAX_MESSAGE_BYTES {
            return Err(invalid(
                "rabbitmq.max_message_bytes",
                format!(
                    "{} is outside 1..={SERVER_MAX_MESSAGE_BYTES} (RabbitMQ's largest max_message_size)",
                    self.max_message_bytes
                ),
            ));
        }
        if !(100..=600_000).contains(&self.connect_timeout_ms) {
            return Err(invalid(
                "rabbitmq.connect_timeout_ms",
                format!("{} is outside 100..=600000", self.connect_timeout_ms),
            ));
        }
        self.resolve_tls()
    }

    fn validate_exchange(&self) -> Result<(), ConfigError> {
        let x = &self.exchange;
        if x.len() > 255
            || !x
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(invalid(
                "rabbitmq.exchange",
                format!("{x:?} must be at most 255 of a-z A-Z 0-9 - _ . :"),
            ));
        }
        if self.declare && (x.is_empty() || x.starts_with("amq.")) {
            return Err(ConfigError::Conflict {
                message: format!(
                    "rabbitmq.declare = true cannot declare the server's own exchange {x:?}; name another exchange or set declare = false"
                ),
            });
        }
        Ok(())
    }

    fn resolve_tls(&mut self) -> Result<(), ConfigError> {
        let tls_set = self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some();
        if tls_set
            && self
                .uri
                .as_ref()
                .is_some_and(|u| u.scheme != AMQPScheme::AMQPS)
        {
            return Err(ConfigError::Conflict {
                message: "rabbitmq.tls_* files apply to amqps:// URLs only; use amqps:// in rabbitmq.url or remove them".into(),
            });
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::Conflict {
                message: "rabbitmq.tls_cert_file and rabbitmq.tls_key_file go together; set both or neither".into(),
            });
        }
        if let Some(file) = &self.tls_ca_file {
            let pem = read_file("rabbitmq.tls_ca_file", file)?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(invalid(
                    "rabbitmq.tls_ca_file",
                    format!("{file:?} holds no PEM certificate"),
                ));
            }
            self.tls.ca_pem = Some(pem);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            let cert_pem = read_file("rabbitmq.tls_cert_file", cert)?;
            if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(invalid(
                    "rabbitmq.tls_cert_file",
                    format!("{cert:?} holds no PEM certificate"),
                ));
            }
            let key_pem = read_file("rabbitmq.tls_key_file", key)?;
            if !key_pem.contains("PRIVATE KEY-----") {
                return Err(invalid(
                    "rabbitmq.tls_key_file",
                    format!("{key:?} holds no PEM private key"),
                ));
            }
            self.tls.cert_pem = Some(cert_pem.into_bytes());
            self.tls.key_pem = Some(key_pem.into_bytes());
        }
        Ok(())
    }

    /// `host:port` of the server, for messages (never the credentials).
    pub fn address(&self) -> String {
        self.uri.as_ref().map_or_else(
            || "(no rabbitmq.url)".into(),
            |u| format!("{}:{}", u.authority.host, u.authority.port),
        )
    }
}

/// Parses an AMQP URL. Errors never contain the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<AMQPUri, String> {
    const EXAMPLE: &str = "amqp://user:password@127.0.0.1:5672/%2f";
    let mut uri = AMQPUri::from_str(url).map_err(|e| {
        if e.contains(url) {
            format!("is not an AMQP URL like {EXAMPLE}")
        } else {
            format!("is not an AMQP URL like {EXAMPLE} ({e})")
        }
    })?;
    // The parser keeps only domain names and falls back to "localhost" for an
    // IP address (127.0.0.1, [::1]): take the host as written.
    let host = host_of(url).ok_or_else(|| format!("names no host; write it like {EXAMPLE}"))?;
    uri.authority.host = host;
    Ok(uri)
}

/// The host part of `scheme://[userinfo@]host[:port][/path][?query]`, without
/// the brackets of an IPv6 address, percent-decoding left to the parser.
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml_text: &str, env: &[(&str, &str)]) -> Result<RabbitMqConfig, ConfigError> {
        let mut c: RabbitMqConfig = toml::from_str(toml_text).unwrap();
        let env = |k: &str| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        };
        c.resolve(&env, SinkKind::RabbitMq).map(|()| c)
    }

    #[test]
    fn ip_addresses_and_names_are_kept_as_written() {
        for (url, host, port, vhost) in [
            ("amqp://u:p@127.0.0.1:5673/%2f", "127.0.0.1", 5673, "/"),
            ("amqp://[::1]:5672/app", "::1", 5672, "app"),
            ("amqps://relay@mq.internal/", "mq.internal", 5671, ""),
            ("amqp://10.1.2.3", "10.1.2.3", 5672, "/"),
        ] {
            let u = parse_url(url).unwrap();
            assert_eq!(
                (
                    u.authority.host.as_str(),
                    u.authority.port,
                    u.vhost.as_str()
                ),
                (host, port, vhost),
                "{url}"
            );
        }
    }

    #[test]
    fn the_url_comes_from_the_environment_the_file_or_the_config() {
        let c = resolve(
            "url = \"amqp://a@h1\"\n",
            &[(ENV_RABBITMQ_URL, "amqp://b@h2:1234/v")],
        )
        .unwrap();
        assert_eq!(c.address(), "h2:1234");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("url");
        std::fs::write(&f, "amqp://relay:s3cret@mq:5672/%2f\n").unwrap();
        let c = resolve(&format!("url_file = {f:?}\n"), &[]).unwrap();
        assert_eq!(c.uri.unwrap().authority.userinfo.password, "s3cret");
        let both = resolve(&format!("url = \"amqp://x\"\nurl_file = {f:?}\n"), &[]);
        assert!(both.unwrap_err().to_string().contains("remove one"));
    }

    #[test]
    fn bad_sections_name_the_key_and_the_fix_and_never_the_password() {
        for (text, expected) in [
            (
                "",
                "rabbitmq.url is missing: sink.kind = \"rabbitmq\" needs",
            ),
            (
                "url = \"http://u:s3cret@h\"\n",
                "invalid rabbitmq.url: is not an AMQP URL",
            ),
            (
                "url = \"amqp://u:s3cret@h:99999\"\n",
                "invalid rabbitmq.url",
            ),
            (
                "url = \"amqp://u:s3cret@h\"\nexchange = \"a b\"\n",
                "rabbitmq.exchange",
            ),
            (
                "url = \"amqp://u:s3cret@h\"\nexchange = \"amq.topic\"\ndeclare = true\n",
                "set declare = false",
            ),
            (
                "url = \"amqp://u:s3cret@h\"\nmax_in_flight = 0\n",
                "rabbitmq.max_in_flight",
            ),
            (
                "url = \"amqp://u:s3cret@h\"\nmax_message_bytes = 0\n",
                "rabbitmq.max_message_bytes",
            ),
            (
                "url = \"amqp://u:s3cret@h\"\ntls_ca_file = \"/x.pem\"\n",
                "use amqps://",
            ),
            (
                "url = \"amqps://u:s3cret@h\"\ntls_cert_file = \"/x.pem\"\n",
                "set both or neither",
            ),
            (
                "url = \"amqps://u:s3cret@h\"\ntls_ca_file = \"/nonexistent.pem\"\n",
                "cannot read \"/nonexistent.pem\"",
            ),
            (
                "url_file = \"/nonexistent/url\"\n",
                "rabbitmq.url_file: cannot read",
            ),
        ] {
            let err = resolve(text, &[]).expect_err(text).to_string();
            assert!(
                err.contains(expected),
                "{text:?}: {err:?} lacks {expected:?}"
            );
            assert!(!err.contains("s3cret"), "password leaked: {err}");
        }
    }

    #[test]
    fn another_sink_needs_no_rabbitmq_url() {
        let mut c = RabbitMqConfig::default();
        c.resolve(&|_: &str| None, SinkKind::Kafka).unwrap();
        assert!(c.uri.is_none());
    }
}
