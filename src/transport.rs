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

pub use conninfo::{split_params, LibpqParams};

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
    pub fn from_params(p: &LibpqParams) -> Result<Tls, String> {
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

/// libpq's `target_session_attrs`: which kind of server a connection must
/// reach. With several hosts (`host=a,b`), each is tried in turn and the first
/// of the right kind is kept: after a failover the relay follows the new primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAttrs {
    /// Any server (the default).
    #[default]
    Any,
    /// Not in hot standby and not `default_transaction_read_only`.
    ReadWrite,
    /// In hot standby, or `default_transaction_read_only`.
    ReadOnly,
    /// Not in hot standby.
    Primary,
    /// In hot standby.
    Standby,
    /// A standby if one of the hosts is one, else any server.
    PreferStandby,
}

impl SessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a server in this state is acceptable (for `PreferStandby`: at all).
    pub fn accepts(self, server: ServerState) -> bool {
        match self {
            SessionAttrs::Any | SessionAttrs::PreferStandby => true,
            SessionAttrs::ReadWrite => !server.hot_standby && !server.read_only,
            SessionAttrs::ReadOnly => server.hot_standby || server.read_only,
            SessionAttrs::Primary => !server.hot_standby,
            SessionAttrs::Standby => server.hot_standby,
        }
    }
}

impl FromStr for SessionAttrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            other => return Err(format!("target_session_attrs={other:?} is not one of any, read-write, read-only, primary, standby, prefer-standby")),
        })
    }
}

/// What a server said about itself at startup (`ParameterStatus`, reported by
/// PostgreSQL 14 and later on both kinds of connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerState {
    /// `in_hot_standby = on`: a standby in recovery.
    pub hot_standby: bool,
    /// `default_transaction_read_only = on`.
    pub read_only: bool,
}

impl ServerState {
    /// From the `ParameterStatus` values (`None` when the server did not report one).
    pub fn from_parameters(in_hot_standby: Option<&str>, read_only: Option<&str>) -> ServerState {
        ServerState {
            hot_standby: in_hot_standby == Some("on"),
            read_only: read_only == Some("on"),
        }
    }

    fn describe(self) -> &'static str {
        match (self.hot_standby, self.read_only) {
            (true, _) => "a standby (in_hot_standby = on)",
            (false, true) => "read-only (default_transaction_read_only = on)",
            (false, false) => "a read-write primary",
        }
    }
}

/// Where and how to reach PostgreSQL: the parsed connection string (its own
/// `ssl_mode` always `Disable`: TLS is set up here), the TLS settings and which
/// kind of server to keep.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: Tls,
    pub session_attrs: SessionAttrs,
}

impl PgTarget {
    /// Parses a libpq URL or key=value string including its TLS parameters.
    /// Errors never contain the string itself.
    pub fn parse(conninfo: &str) -> Result<PgTarget, String> {
        let (rest, params) = split_params(conninfo)?;
        let config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
        PgTarget::new(config, &params)
    }

    /// Checks what libpq checks of several hosts and builds the target.
    pub fn new(
        mut config: tokio_postgres::Config,
        params: &LibpqParams,
    ) -> Result<PgTarget, String> {
        let (hosts, ports) = (config.get_hosts().len(), config.get_ports().len());
        if ports > 1 && ports != hosts {
            return Err(format!(
                "names {hosts} host(s) but {ports} ports; give one port for all hosts or one per host, in the same order (host=a,b port=5432,5433)"
            ));
        }
        let hostaddrs = config.get_hostaddrs().len();
        if hostaddrs > 0 && hostaddrs != hosts {
            return Err(format!(
                "names {hosts} host(s) but {hostaddrs} hostaddr(s); give one hostaddr per host or none"
            ));
        }
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let session_attrs = match &params.target_session_attrs {
            Some(s) => s.parse()?,
            None => SessionAttrs::Any,
        };
        Ok(PgTarget {
            config,
            tls: Tls::from_params(params)?,
            session_attrs,
        })
    }

    fn address(&self, i: usize) -> (&Host, String, u16) {
        let cfg = &self.config;
        let ports = cfg.get_ports();
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let host = &cfg.get_hosts()[i];
        let addr = match host {
            Host::Tcp(h) if h.contains(':') => format!("[{h}]:{port}"),
            Host::Tcp(h) => format!("{h}:{port}"),
            Host::Unix(dir) => dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
        };
        (host, addr, port)
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
    /// Every host answered, none of the kind `target_session_attrs` asks for
    /// (during a failover, before a standby is promoted): retried.
    #[error("no host in postgres.url could be used with target_session_attrs={wanted}: {}; the relay keeps trying (after a failover, until a standby is promoted)", .tried.join("; "))]
    NoSuitableHost {
        wanted: &'static str,
        tried: Vec<String>,
    },
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

/// Opens a stream to host number `i` of `target`, with TLS as its `sslmode`
/// says. Unix sockets never use TLS (as in libpq).
pub async fn open_host(target: &PgTarget, i: usize) -> Result<BoxedTransport, ConnectError> {
    let cfg = &target.config;
    let timeout = cfg
        .get_connect_timeout()
        .copied()
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let (host, addr, port) = target.address(i);
    match host {
        Host::Tcp(h) => {
            // hostaddr, when given, is where to connect; host stays the name TLS checks.
            let dial = match cfg.get_hostaddrs().get(i) {
                Some(ip) => std::net::SocketAddr::new(*ip, port).to_string(),
                None => addr.clone(),
            };
            match tokio::time::timeout(timeout, TcpStream::connect(dial)).await {
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
            match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
                Ok(Ok(s)) => Ok(Box::new(s) as BoxedTransport),
                Ok(Err(source)) => Err(ConnectError::Connect {
                    target: addr,
                    source,
                }),
                Err(_) => Err(ConnectError::Timeout(timeout, addr)),
            }
        }
    }
}

/// What one host's startup gave: a connection and the server's state, or why
/// this host is passed over (`Next`) or the whole attempt fails (`Fail`).
pub enum HostOutcome<C, E> {
    Connected(C, ServerState),
    /// This host could not be used (unreachable, starting up): try the next.
    Next(E),
    Fail(E),
}

/// Tries the hosts of `target` in order, as libpq does: `startup` opens and
/// authenticates a connection over the stream to one host; the first
/// connection to a server of the kind `target_session_attrs` asks for is
/// returned. With one host its own error is returned; with several,
/// [`ConnectError::NoSuitableHost`] lists what each host said.
pub async fn connect_any<C, E, F, Fut>(target: &PgTarget, mut startup: F) -> Result<C, E>
where
    E: From<ConnectError> + std::fmt::Display,
    F: FnMut(BoxedTransport) -> Fut,
    Fut: std::future::Future<Output = HostOutcome<C, E>>,
{
    let wanted = target.session_attrs;
    let mut last: Option<E> = None;
    let mut tried = Vec::new();
    // prefer-standby: a primary is kept in case no standby answers.
    let mut fallback = None;
    for i in 0..target.config.get_hosts().len() {
        let addr = target.address(i).1;
        let stream = match open_host(target, i).await {
            Ok(s) => s,
            Err(e) if e.is_permanent() => return Err(e.into()),
            Err(e) => {
                tried.push(format!("{addr}: {e}"));
                last = Some(e.into());
                continue;
            }
        };
        match startup(stream).await {
            HostOutcome::Connected(c, state) => {
                if wanted == SessionAttrs::PreferStandby && !state.hot_standby {
                    fallback.get_or_insert(c);
                    continue;
                }
                if wanted.accepts(state) {
                    return Ok(c);
                }
                tracing::debug!(host = %addr, wanted = wanted.as_str(), "host is {}; trying the next", state.describe());
                tried.push(format!("{addr} is {}", state.describe()));
            }
            HostOutcome::Next(e) => {
                tried.push(format!("{addr}: {e}"));
                last = Some(e);
            }
            HostOutcome::Fail(e) => return Err(e),
        }
    }
    if let Some(c) = fallback {
        return Ok(c);
    }
    match last {
        Some(e) if tried.len() == 1 => Err(e),
        _ if tried.is_empty() => Err(ConnectError::NoHost.into()),
        _ => Err(ConnectError::NoSuitableHost {
            wanted: wanted.as_str(),
            tried,
        }
        .into()),
    }
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
