//! The byte stream to PostgreSQL, shared by the replication connection and the
//! SQL connection: socket (TCP or Unix), TCP keepalives, and TLS per libpq's
//! `sslmode` (SSLRequest, then an OpenSSL handshake checked against
//! `sslrootcert`).
//!
//! Responsible for what `sslmode` and `sslrootcert` mean and for saying clearly
//! why a TLS connection failed. It does not speak the protocol past the
//! SSLRequest: startup and authentication live in `replication` and in
//! tokio-postgres.
//!
//! Parts: `tls` (sslmode, sslrootcert, the handshake), `attrs`
//! (`target_session_attrs` and the server state it is decided from),
//! `conninfo` (the libpq parameters tokio-postgres does not parse); here the
//! target, opening a socket to one host, and trying the hosts in turn.

mod attrs;
mod conninfo;
mod tls;

use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;

pub use attrs::{ServerState, SessionAttrs};
pub use conninfo::{split_params, LibpqParams};
use tls::secure;
pub use tls::{RootCert, SslMode, Tls};

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream to the server: TCP, TLS over TCP, or a Unix socket.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// One dynamic call per read, whatever the stream; TLS adds no copy of its own
/// beyond decrypting into the caller's buffer.
pub type BoxedTransport = Box<dyn Transport>;

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

#[cfg(test)]
mod tests;
