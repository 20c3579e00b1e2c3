//! The `[redis]` section: where the Redis sink connects (URL, TLS files) and
//! how it writes (stream or pub/sub, trimming, WAIT for replicas, limits).
//! Checked here without connecting; the sink itself is `sink::redis`.

use std::path::PathBuf;

use serde::Deserialize;

use super::secret::{read_file, take_url};
use super::{invalid, ConfigError, OutboxConfig, PlacementKind};

/// Environment variable that overrides `redis.url` (keeps the password out of the file).
pub const ENV_REDIS_URL: &str = "OUTBOX_RELAY_REDIS_URL";

/// How records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// `XADD` to a stream named by the topic (default): kept until trimmed,
    /// read with `XREAD` / `XREADGROUP`.
    #[default]
    Stream,
    /// `PUBLISH` to a channel named by the topic: at most once, only
    /// subscribers connected at that moment receive it.
    Pubsub,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port][/db]`, or `rediss://...` for TLS.
    /// Required with `sink.kind = "redis"` unless `OUTBOX_RELAY_REDIS_URL`
    /// (which overrides it) or `url_file` is set. No default.
    pub url: Option<String>,
    /// File holding the URL (a mounted secret), instead of `url`.
    pub url_file: Option<PathBuf>,
    /// `stream` (default: `XADD`) or `pubsub` (`PUBLISH`, at most once).
    pub mode: RedisMode,
    /// Trim each stream to about this many entries (`XADD ... MAXLEN ~ n`).
    /// Default: none (streams grow until trimmed by someone else). Stream mode only.
    pub maxlen: Option<u64>,
    /// After each pipeline, `WAIT wait_replicas wait_timeout_ms`: records are
    /// acknowledged only once that many replicas have them. Default 0 (no WAIT).
    pub wait_replicas: u32,
    /// How long `WAIT` waits for the replicas, in milliseconds. Default 1000.
    /// Fewer replicas in time fail the delivery: the relay streams the
    /// unconfirmed records again from the slot.
    pub wait_timeout_ms: u64,
    /// Largest record (key + value + header names and values), in bytes. A
    /// larger one is refused without being sent (`outbox.on_invalid`, reason
    /// `too_large`). Default 536870912 (512 MiB, the server's default
    /// `proto-max-bulk-len`; a larger bulk string makes it close the connection).
    pub max_record_bytes: u64,
    /// Most records in one pipeline (one round trip). Default 1024.
    pub pipeline_records: usize,
    /// How long to wait for a reply before the connection counts as lost, in
    /// milliseconds. Default 30000; must exceed `wait_timeout_ms`.
    pub response_timeout_ms: u64,
    /// How long connecting may take, in milliseconds. Default 10000.
    pub connect_timeout_ms: u64,
    /// PEM file with the certificate authorities that sign the server's
    /// certificate (`rediss://` only). Default: the system's.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (`rediss://` only; with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// The TLS files' contents, read and checked once by `validate`.
    #[serde(skip)]
    tls: TlsFiles,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            url_file: None,
            mode: RedisMode::Stream,
            maxlen: None,
            wait_replicas: 0,
            wait_timeout_ms: 1000,
            max_record_bytes: 512 << 20,
            pipeline_records: 1024,
            response_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls: TlsFiles::default(),
        }
    }
}

impl RedisConfig {
    /// Applies `OUTBOX_RELAY_REDIS_URL` or reads `url_file` into `url`.
    pub(super) fn resolve(
        &mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        take_url(
            &env,
            ENV_REDIS_URL,
            ("redis.url", "redis.url_file"),
            &mut self.url,
            &mut self.url_file,
        )
    }

    /// Checks the section and reads the TLS files; `used`: `sink.kind =
    /// "redis"` (only then is a URL required).
    pub(super) fn validate(
        &mut self,
        used: bool,
        outbox: &OutboxConfig,
    ) -> Result<(), ConfigError> {
        let url = match (&self.url, used) {
            (Some(url), _) => url,
            (None, true) => {
                return Err(ConfigError::Missing {
                    key: "redis.url",
                    hint: format!("sink.kind = \"redis\" needs it; set redis.url (e.g. \"redis://127.0.0.1:6379/0\"), redis.url_file or {ENV_REDIS_URL}"),
                })
            }
            (None, false) => return Ok(()),
        };
        let tls = redis_url_is_tls(url)?;
        if self.mode == RedisMode::Pubsub {
            for (set, key) in [
                (self.maxlen.is_some(), "redis.maxlen"),
                (self.wait_replicas > 0, "redis.wait_replicas"),
            ] {
                if set {
                    return Err(ConfigError::Conflict {
                        message: format!("{key} applies to redis.mode = \"stream\" only; remove it or use the stream mode"),
                    });
                }
            }
        }
        if self.maxlen == Some(0) {
            return Err(invalid(
                "redis.maxlen",
                "0 would trim every stream to nothing; remove it to keep every entry",
            ));
        }
        if self.pipeline_records == 0 || self.pipeline_records > 100_000 {
            return Err(invalid(
                "redis.pipeline_records",
                format!("{} is outside 1..=100000", self.pipeline_records),
            ));
        }
        if self.max_record_bytes == 0 {
            return Err(invalid("redis.max_record_bytes", "must be at least 1"));
        }
        if self.connect_timeout_ms == 0 {
            return Err(invalid("redis.connect_timeout_ms", "must be at least 1"));
        }
        if self.wait_replicas > 0 && self.wait_timeout_ms == 0 {
            return Err(invalid(
                "redis.wait_timeout_ms",
                "0 makes WAIT block until the replicas answer, for ever if one is gone; set a timeout in milliseconds",
            ));
        }
        if self.response_timeout_ms <= self.wait_timeout_ms && self.wait_replicas > 0 {
            return Err(invalid(
                "redis.response_timeout_ms",
                format!(
                    "{} must exceed redis.wait_timeout_ms ({}): WAIT answers only after that",
                    self.response_timeout_ms, self.wait_timeout_ms
                ),
            ));
        }
        if self.response_timeout_ms == 0 {
            return Err(invalid("redis.response_timeout_ms", "must be at least 1"));
        }
        let files = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        for (key, file) in files {
            if file.is_some() && !tls {
                return Err(ConfigError::Conflict {
                    message: format!("{key} is set but redis.url is not a rediss:// URL; use rediss:// for TLS or remove {key}"),
                });
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::Conflict {
                message:
                    "redis.tls_cert_file and redis.tls_key_file go together; set both or neither"
                        .into(),
            });
        }
        self.tls = self.read_tls_files()?;
        let partition = outbox
            .additional_placement
            .iter()
            .find(|p| p.kind == PlacementKind::Partition);
        if let (Some(p), true) = (partition, used) {
            return Err(invalid(
                "outbox.additional_placement",
                format!("\"{}:partition\" places a Kafka partition, which Redis does not have; place the column as a header (\"{}:header\")", p.column, p.column),
            ));
        }
        Ok(())
    }

    /// The contents of the TLS files (read when the config was loaded).
    pub fn tls(&self) -> &TlsFiles {
        &self.tls
    }

    /// The TLS files' contents, checked: CA certificates, client certificate
    /// and key; None where not configured.
    fn read_tls_files(&self) -> Result<TlsFiles, ConfigError> {
        use openssl::pkey::PKey;
        use openssl::x509::X509;
        let ca = match &self.tls_ca_file {
            Some(f) => {
                let pem = read_file("redis.tls_ca_file", f)?;
                if X509::stack_from_pem(pem.as_bytes()).map_or(true, |s| s.is_empty()) {
                    return Err(invalid(
                        "redis.tls_ca_file",
                        format!("{f:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
                    ));
                }
                Some(pem.into_bytes())
            }
            None => None,
        };
        let client = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(c), Some(k)) => {
                let cert = read_file("redis.tls_cert_file", c)?;
                if X509::from_pem(cert.as_bytes()).is_err() {
                    return Err(invalid(
                        "redis.tls_cert_file",
                        format!("{c:?} holds no PEM certificate"),
                    ));
                }
                let key = read_file("redis.tls_key_file", k)?;
                // The TLS library takes PKCS#8 only.
                if !key.contains("-----BEGIN PRIVATE KEY-----")
                    || PKey::private_key_from_pem(key.as_bytes()).is_err()
                {
                    return Err(invalid(
                        "redis.tls_key_file",
                        format!("{k:?} holds no unencrypted PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----); convert it with openssl pkcs8 -topk8 -nocrypt"),
                    ));
                }
                Some((cert.into_bytes(), key.into_bytes()))
            }
            _ => None,
        };
        Ok(TlsFiles { ca, client })
    }
}

/// The contents of `redis.tls_*_file`: CA certificates, and the client
/// certificate with its key (PEM).
#[derive(Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<Vec<u8>>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsFiles")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// Whether `url` is a valid Redis URL with TLS (`rediss://`). Errors never
/// contain the URL (it may hold a password).
fn redis_url_is_tls(url: &str) -> Result<bool, ConfigError> {
    let example = "e.g. redis://user:password@127.0.0.1:6379/0, or rediss:// for TLS";
    let scheme = url.split_once("://").map(|(s, _)| s);
    let tls = match scheme {
        Some("redis") => false,
        Some("rediss") => true,
        Some("redis+unix" | "unix") => false,
        _ => {
            return Err(invalid(
                "redis.url",
                format!("must start with redis://, rediss:// or unix:// ({example})"),
            ))
        }
    };
    redis::Client::open(url).map_err(|e| {
        invalid(
            "redis.url",
            format!("is not a valid Redis URL ({e}); {example}"),
        )
    })?;
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::super::{Config, SinkKind};
    use std::path::Path;

    const BASE: &str = "[postgres]\nurl = \"postgresql://a@b/c\"\n";

    fn parse(text: &str, env_url: Option<&str>) -> Result<Config, super::ConfigError> {
        Config::from_toml(&format!("{BASE}{text}"), Path::new("r.toml"), |k| {
            (k == super::ENV_REDIS_URL)
                .then(|| env_url.map(str::to_string))
                .flatten()
        })
    }

    #[test]
    fn a_redis_sink_with_a_url_gets_the_documented_defaults() {
        let c = parse(
            "[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://u:s3cret@h:6380/2\"\n",
            None,
        )
        .unwrap();
        assert_eq!(c.sink.kind, SinkKind::Redis);
        assert!(c.sink.confirms());
        let r = &c.redis;
        assert_eq!(r.mode, super::RedisMode::Stream);
        assert_eq!(
            (r.maxlen, r.wait_replicas, r.wait_timeout_ms),
            (None, 0, 1000)
        );
        assert_eq!(r.max_record_bytes, 512 << 20);
        assert_eq!(r.pipeline_records, 1024);
    }

    #[test]
    fn the_environment_and_a_url_file_set_the_url() {
        let c = parse(
            "[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://file\"\n",
            Some("redis://env:6379"),
        )
        .unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("redis://env:6379"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("url");
        std::fs::write(&f, "rediss://u:s3cret@h:6390/1\n").unwrap();
        let c = parse(
            &format!("[sink]\nkind = \"redis\"\n[redis]\nurl_file = {f:?}\n"),
            None,
        )
        .unwrap();
        assert_eq!(c.redis.url.as_deref(), Some("rediss://u:s3cret@h:6390/1"));
    }

    #[test]
    fn bad_redis_sections_say_what_to_change_and_never_print_the_password() {
        let cases = [
            ("[sink]\nkind = \"redis\"\n", "redis.url is missing: sink.kind = \"redis\" needs it"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"http://u:s3cret@h\"\n", "must start with redis://"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://u:s3cret@h:notaport\"\n", "is not a valid Redis URL"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nmode = \"list\"\n", "unknown variant `list`"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nmaxlenn = 5\n", "unknown field `maxlenn`"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nmode = \"pubsub\"\nmaxlen = 5\n", "redis.maxlen applies to redis.mode = \"stream\" only"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nmode = \"pubsub\"\nwait_replicas = 1\n", "redis.wait_replicas applies to"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nmaxlen = 0\n", "remove it to keep every entry"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nwait_replicas = 1\nwait_timeout_ms = 0\n", "redis.wait_timeout_ms"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nwait_replicas = 1\nwait_timeout_ms = 5000\nresponse_timeout_ms = 5000\n", "must exceed redis.wait_timeout_ms"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\npipeline_records = 0\n", "redis.pipeline_records"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\ntls_ca_file = \"/etc/hostname\"\n", "not a rediss:// URL"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"rediss://h\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n", "invalid redis.tls_ca_file: cannot read \"/nonexistent/ca.pem\""),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"rediss://h\"\ntls_cert_file = \"/nonexistent/c.pem\"\n", "set both or neither"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\nurl_file = \"/x\"\n", "remove one"),
            ("[sink]\nkind = \"redis\"\n[redis]\nurl_file = \"/nonexistent/url\"\n", "invalid redis.url_file: cannot read \"/nonexistent/url\""),
            ("[sink]\nkind = \"redis\"\nconfirm = false\n[redis]\nurl = \"redis://h\"\n", "sink.confirm"),
            ("[outbox]\nadditional_placement = [\"shard:partition\"]\n[sink]\nkind = \"redis\"\n[redis]\nurl = \"redis://h\"\n", "place the column as a header (\"shard:header\")"),
        ];
        for (text, expected) in cases {
            let err = parse(text, None).expect_err(text).to_string();
            assert!(
                err.contains(expected),
                "{text:?}: {err:?} lacks {expected:?}"
            );
            assert!(!err.contains("s3cret"), "password leaked: {err}");
        }
    }

    #[test]
    fn a_redis_section_is_not_required_by_other_sinks() {
        parse("[sink]\nkind = \"stdout\"\n", None).unwrap();
        parse("[redis]\nmode = \"pubsub\"\n", None).unwrap();
    }
}
