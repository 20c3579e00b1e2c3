//! The byte stream to PostgreSQL, shared by the replication connection and the
//! SQL connection: socket (TCP or Unix), TCP keepalives, and TLS per libpq's
//! `sslmode` (SSLRequest, then an OpenSSL handshake checked against
//! `sslrootcert`).
//!
//! Responsible for what `sslmode` and `sslrootcert` mean and for saying clearly
//! why a TLS connection failed. It does not speak the protocol past the
//! SSLRequest: startup and authentication live in `replication` and in
//! tokio-postgres.

mod conninfo;

use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509VerifyResult, X509};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_openssl::SslStream;
use tokio_postgres::config::Host;

pub use conninfo::{split_tls_params, TlsParams};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream to the server: TCP, TLS over TCP, or a Unix socket.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// One dynamic call per read, whatever the stream; TLS adds no copy of its own
/// beyond decrypting into the caller's buffer.
pub type BoxedTransport = Box<dyn Transport>;

/// libpq's `sslmode`. `allow` is not offered: it only matters for servers that
/// require TLS yet are reached without it first, which `prefer` covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked. The default.
    Prefer,
    /// TLS or fail; the certificate is not checked (unless `sslrootcert` is set: then as `VerifyCa`).
    Require,
    /// TLS, and the certificate chain must lead to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err("sslmode=allow is not supported; use prefer (TLS when the server offers it) or disable".into()),
            other => return Err(format!("sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full")),
        })
    }
}

/// The roots a server certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// OpenSSL's default store (`sslrootcert=system`, or no `sslrootcert`).
    System,
    /// The PEM file named by `sslrootcert`; only its certificates are trusted.
    File(PathBuf),
}

impl std::fmt::Display for RootCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootCert::System => f.write_str("the system's trusted certificates"),
            RootCert::File(p) => write!(f, "sslrootcert {:?}", p.display().to_string()),
        }
    }
}

/// How to secure a connection: the mode asked for, the effective one, and the
/// OpenSSL context built once from the root certificates.
#[derive(Clone)]
pub struct Tls {
    /// As written in the connection string (for messages).
    requested: SslMode,
    /// `require` with `sslrootcert` behaves as `verify-ca`, as in libpq.
    mode: SslMode,
    root: RootCert,
    connector: Option<SslConnector>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("requested", &self.requested)
            .field("mode", &self.mode)
            .field("root", &self.root)
            .finish()
    }
}

impl Tls {
    /// Plain connections only.
    pub fn disabled() -> Tls {
        Tls {
            requested: SslMode::Disable,
            mode: SslMode::Disable,
            root: RootCert::System,
            connector: None,
        }
    }

    /// Builds the settings from the connection string's parameters; reads the
    /// `sslrootcert` file now, so a bad file is a configuration error.
    pub fn from_params(p: &TlsParams) -> Result<Tls, String> {
        let requested = match &p.sslmode {
            Some(m) => m.parse()?,
            None => SslMode::Prefer,
        };
        if let Some(n) = p.sslnegotiation.as_deref().filter(|n| *n != "postgres") {
            return Err(format!(
                "sslnegotiation={n:?} is not supported; remove it (the relay asks for TLS with an SSLRequest, which every PostgreSQL version understands)"
            ));
        }
        let root = match p.sslrootcert.as_deref() {
            None | Some("system") => RootCert::System,
            Some("") => {
                return Err("sslrootcert is empty; name a PEM file with the CA certificate, or remove it to use the system's trusted certificates".into())
            }
            Some(path) => RootCert::File(path.into()),
        };
        let mode = match requested {
            SslMode::Require if p.sslrootcert.is_some() => SslMode::VerifyCa,
            m => m,
        };
        let connector = match mode {
            SslMode::Disable => None,
            _ => Some(build_connector(mode, &root)?),
        };
        Ok(Tls {
            requested,
            mode,
            root,
            connector,
        })
    }

    /// The effective mode (`require` with `sslrootcert` is `verify-ca`).
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    pub fn root(&self) -> &RootCert {
        &self.root
    }

    fn verifies(&self) -> bool {
        matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

fn build_connector(mode: SslMode, root: &RootCert) -> Result<SslConnector, String> {
    let openssl = |e: openssl::error::ErrorStack| format!("cannot set up TLS: {e}");
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(openssl)?;
    // Read whole TLS records per system call rather than header and body apart.
    b.set_read_ahead(true);
    if !matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
        b.set_verify(SslVerifyMode::NONE);
        return Ok(b.build());
    }
    if let RootCert::File(path) = root {
        let fix = "set sslrootcert to a PEM file holding the CA certificate that signed the server's certificate";
        let pem = std::fs::read(path).map_err(|e| {
            format!(
                "cannot read sslrootcert {:?}: {e}; {fix}",
                path.display().to_string()
            )
        })?;
        let certs = X509::stack_from_pem(&pem).unwrap_or_default();
        if certs.is_empty() {
            return Err(format!(
                "sslrootcert {:?} holds no PEM certificate; {fix}",
                path.display().to_string()
            ));
        }
        let mut store = X509StoreBuilder::new().map_err(openssl)?;
        for c in certs {
            store.add_cert(c).map_err(openssl)?;
        }
        b.set_cert_store(store.build());
    }
    b.set_verify(SslVerifyMode::PEER);
    Ok(b.build())
}

/// Where and how to reach PostgreSQL: the parsed connection string (its own
/// `ssl_mode` always `Disable`: TLS is set up here) and the TLS settings.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
}

impl PgTarget {
    /// Parses a libpq URL or key=value string including its TLS parameters.
    /// Errors never contain the string itself.
    pub fn parse(conninfo: &str) -> Result<PgTarget, String> {
        let (rest, params) = split_tls_params(conninfo)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        Ok(PgTarget {
            config,
            tls: Tls::from_params(&params)?,
        })
    }
}

/// Why no stream to the server could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to PostgreSQL at {target}: {source}; check that the server runs and listens there (listen_addresses, port) and the host and port in postgres.url")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?} connecting to PostgreSQL at {1}")]
    Timeout(Duration, String),
    #[error("the connection string names no host")]
    NoHost,
    #[error("connection to PostgreSQL at {target} failed while asking for TLS: {source}")]
    SslRequest {
        target: String,
        source: std::io::Error,
    },
    #[error("PostgreSQL at {target} answered the TLS request with {answer:?} instead of S or N; is this a PostgreSQL server?")]
    SslAnswer { target: String, answer: char },
    #[error("PostgreSQL at {target} does not support SSL, but sslmode={mode} requires it; turn on ssl in postgresql.conf (ssl = on, ssl_cert_file, ssl_key_file) or set sslmode=prefer or disable in postgres.url")]
    SslUnsupported { target: String, mode: SslMode },
    #[error("certificate verify failed for PostgreSQL at {target}: {reason} (trusted: {root}); set sslrootcert in postgres.url to the CA certificate that signed the server's certificate")]
    CertVerify {
        target: String,
        reason: String,
        root: RootCert,
    },
    #[error("the certificate of PostgreSQL at {target} does not match host {host:?} ({reason}); connect through a name or address the certificate lists (its subjectAltName), or use sslmode=verify-ca to check the CA only")]
    HostMismatch {
        target: String,
        host: String,
        reason: String,
    },
    #[error("TLS handshake with PostgreSQL at {target} failed: {message}")]
    Handshake { target: String, message: String },
}

impl ConnectError {
    /// TLS refusals a reconnect cannot fix: the configuration or the server must change.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ConnectError::SslUnsupported { .. }
                | ConnectError::CertVerify { .. }
                | ConnectError::HostMismatch { .. }
        )
    }
}

/// What to change when the server refuses the connection at startup
/// (SQLSTATE `code`, the server's `message`): a wrong password, a pg_hba.conf
/// without a line for this client or one that wants TLS, a missing role or database.
pub fn refusal_hint(code: &str, message: &str) -> Option<&'static str> {
    let hba = message.starts_with("no pg_hba.conf entry")
        || message.starts_with("pg_hba.conf rejects connection");
    Some(match code {
        "28P01" => "check the password in postgres.url, OUTBOX_RELAY_POSTGRES_URL or postgres.password_file",
        "28000" if hba && message.ends_with("no encryption") => {
            "the server accepts this client only over TLS (hostssl); set sslmode=require, verify-ca or verify-full in postgres.url"
        }
        "28000" if hba => "add a line for this host, user and database to pg_hba.conf and reload PostgreSQL",
        "28000" if message.starts_with("role ") => "create the role or fix the user in postgres.url",
        "3D000" => "create the database or fix its name in postgres.url",
        _ => return None,
    })
}

/// Opens a stream to the first host of `target` that answers, with TLS as its
/// `sslmode` says. Unix sockets never use TLS (as in libpq).
pub async fn open(target: &PgTarget) -> Result<BoxedTransport, ConnectError> {
    let cfg = &target.config;
    let timeout = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let ports = cfg.get_ports();
    let mut last = None;
    for (i, host) in cfg.get_hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let attempt = match host {
            Host::Tcp(h) => {
                let addr = format!("{h}:{port}");
                match tokio::time::timeout(timeout, TcpStream::connect(addr.clone())).await {
                    Ok(Ok(s)) => {
                        tune_socket(&s, cfg);
                        secure(&target.tls, h, &addr, s).await
                    }
                    Ok(Err(source)) => Err(ConnectError::Connect {
                        target: addr,
                        source,
                    }),
                    Err(_) => Err(ConnectError::Timeout(timeout, addr)),
                }
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let addr = path.display().to_string();
                match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
                    Ok(Ok(s)) => Ok(Box::new(s) as BoxedTransport),
                    Ok(Err(source)) => Err(ConnectError::Connect {
                        target: addr,
                        source,
                    }),
                    Err(_) => Err(ConnectError::Timeout(timeout, addr)),
                }
            }
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or(ConnectError::NoHost))
}

/// No Nagle delay for status updates; TCP keepalives and user timeout from the
/// connection string (`keepalives`, `keepalives_idle`, `keepalives_interval`,
/// `keepalives_count`, `tcp_user_timeout`), so a dead server or network is noticed.
fn tune_socket(s: &TcpStream, cfg: &tokio_postgres::Config) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    if cfg.get_keepalives() {
        let mut ka = socket2::TcpKeepalive::new().with_time(cfg.get_keepalives_idle());
        if let Some(i) = cfg.get_keepalives_interval() {
            ka = ka.with_interval(i);
        }
        if let Some(n) = cfg.get_keepalives_retries() {
            ka = ka.with_retries(n);
        }
        if let Err(e) = sock.set_tcp_keepalive(&ka) {
            tracing::warn!(error = %e, "cannot enable TCP keepalives on the PostgreSQL connection");
        }
    }
    if let Some(t) = cfg.get_tcp_user_timeout() {
        if let Err(e) = sock.set_tcp_user_timeout(Some(*t)) {
            tracing::warn!(error = %e, "cannot set tcp_user_timeout on the PostgreSQL connection");
        }
    }
}

/// X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH (x509_vfy.h, stable since OpenSSL 1.0.2).
const HOST_MISMATCH_CODES: [i32; 2] = [62, 64];

/// SSLRequest (8 bytes: length 8, code 80877103), then a handshake if the server answers `S`.
async fn secure(
    tls: &Tls,
    host: &str,
    target: &str,
    mut s: TcpStream,
) -> Result<BoxedTransport, ConnectError> {
    let Some(connector) = &tls.connector else {
        return Ok(Box::new(s));
    };
    let io = |source| ConnectError::SslRequest {
        target: target.to_string(),
        source,
    };
    let mut request = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut request);
    s.write_all(&request).await.map_err(io)?;
    // Exactly one byte: anything the server sent after it must not be read
    // as if it had come through TLS (CVE-2021-23222).
    let answer = s.read_u8().await.map_err(io)?;
    match answer {
        b'S' => {}
        b'N' if tls.mode == SslMode::Prefer => {
            tracing::debug!(
                target,
                "server does not offer TLS; sslmode=prefer continues without"
            );
            return Ok(Box::new(s));
        }
        b'N' => {
            return Err(ConnectError::SslUnsupported {
                target: target.to_string(),
                mode: tls.requested,
            })
        }
        other => {
            return Err(ConnectError::SslAnswer {
                target: target.to_string(),
                answer: other as char,
            })
        }
    }
    let handshake = |message: String| ConnectError::Handshake {
        target: target.to_string(),
        message,
    };
    let mut ssl = connector
        .configure()
        .map_err(|e| handshake(e.to_string()))?;
    ssl.set_verify_hostname(tls.mode == SslMode::VerifyFull);
    let ssl = ssl.into_ssl(host).map_err(|e| handshake(e.to_string()))?;
    let mut stream = SslStream::new(ssl, s).map_err(|e| handshake(e.to_string()))?;
    if let Err(e) = Pin::new(&mut stream).connect().await {
        let verify = stream.ssl().verify_result();
        return Err(if !tls.verifies() || verify == X509VerifyResult::OK {
            handshake(e.to_string())
        } else if HOST_MISMATCH_CODES.contains(&verify.as_raw()) {
            ConnectError::HostMismatch {
                target: target.to_string(),
                host: host.to_string(),
                reason: verify.error_string().to_string(),
            }
        } else {
            ConnectError::CertVerify {
                target: target.to_string(),
                reason: verify.error_string().to_string(),
                root: tls.root.clone(),
            }
        });
    }
    tracing::debug!(target, version = stream.ssl().version_str(), mode = %tls.mode, "TLS established");
    Ok(Box::new(stream))
}

#[cfg(test)]
mod tests;
