//! TLS per libpq's `sslmode` and `sslrootcert`: the connector, the SSLRequest
//! and the handshake, and why a TLS connection failed.

use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509VerifyResult, X509};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use super::{BoxedTransport, ConnectError, LibpqParams};

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

/// X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH (x509_vfy.h, stable since OpenSSL 1.0.2).
const HOST_MISMATCH_CODES: [i32; 2] = [62, 64];

/// SSLRequest (8 bytes: length 8, code 80877103), then a handshake if the server answers `S`.
pub(super) async fn secure(
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
