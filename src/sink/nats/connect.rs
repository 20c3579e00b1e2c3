//! Connecting to NATS: credentials from the URL, TLS, and a client that
//! never reconnects by itself (it refuses to authenticate a second time and
//! gives up after one attempt per server); the connection's events (lost,
//! server errors) go to the publishing task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{ConnectErrorKind, Event};
use tokio::sync::watch;

use super::Conn;
use crate::config::NatsConfig;
use crate::metrics::Metrics;

/// What the connection's event callback tells the publishing task.
#[derive(Default)]
pub(super) struct Events {
    /// Set once the connection broke.
    pub(super) lost: watch::Sender<bool>,
    /// The server's last `-ERR` (a permissions violation names the subject).
    pub(super) last_server_error: Mutex<Option<String>>,
}

/// User name and password, or a token, from the URL (`user:pass@` or `token@`).
#[derive(Clone, Default)]
struct Credentials {
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
}

fn credentials(servers: &[async_nats::ServerAddr]) -> Credentials {
    let Some(s) = servers.iter().find(|s| s.username().is_some()) else {
        return Credentials::default();
    };
    let user = s.username().map(percent_decode);
    match s.password() {
        Some(p) => Credentials {
            user,
            password: Some(percent_decode(p)),
            token: None,
        },
        None => Credentials {
            token: user,
            ..Credentials::default()
        },
    }
}

/// Decodes `%XX` escapes of a URL's user-info part.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Connects to the first server of `servers` that answers. A connection that
/// breaks later is not re-established (see the module comment of `nats`):
/// `events.lost` is set instead.
pub(super) async fn connect(
    cfg: &NatsConfig,
    servers: &[async_nats::ServerAddr],
    events: Arc<Events>,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, Conn> {
    let creds = credentials(servers);
    // Credentials for the first connection only: a reconnect is refused
    // (see the module comment), and after as many attempts as there are
    // servers the client gives up and the task ends.
    let established = Arc::new(AtomicBool::new(false));
    let once = established.clone();
    let mut opts = async_nats::ConnectOptions::with_auth_callback(move |_nonce| {
        let (creds, once) = (creds.clone(), once.clone());
        async move {
            if once.load(Ordering::SeqCst) {
                return Err(async_nats::AuthError::new(
                    "the relay does not reuse a broken connection",
                ));
            }
            let mut auth = async_nats::Auth::new();
            auth.username = creds.user;
            auth.password = creds.password;
            auth.token = creds.token;
            Ok(auth)
        }
    })
    .name("outbox-relay")
    .connection_timeout(cfg.connect_timeout())
    .ignore_discovered_servers()
    .max_reconnects(servers.len())
    .require_tls(cfg.tls_required)
    .event_callback(move |event| {
        let (events, metrics) = (events.clone(), metrics.clone());
        async move {
            match event {
                Event::Disconnected | Event::Closed => {
                    events.lost.send_replace(true);
                }
                Event::ServerError(e) => {
                    metrics.error("nats_client");
                    tracing::warn!(error = %e, "NATS server error");
                    *events
                        .last_server_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
                Event::ClientError(e) => {
                    metrics.error("nats_client");
                    tracing::debug!(error = %e, "NATS client error");
                }
                _ => {}
            }
        }
    });
    if let Some(ca) = &cfg.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let client = opts
        .connect(servers.to_vec())
        .await
        .map_err(|e| {
            let (config, hint) = match e.kind() {
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    (true, "; check the credentials in nats.url (nats://user:password@host or nats://token@host)")
                }
                ConnectErrorKind::Tls => (
                    true,
                    "; check nats.tls_ca_file, nats.tls_cert_file and nats.tls_key_file and the server's certificate",
                ),
                ConnectErrorKind::TimedOut => (false, "; raise nats.connect_timeout_ms or check the network"),
                _ => (false, "; is the server running and nats.url right?"),
            };
            Conn::Failed {
                error: format!("{e}{hint}"),
                config,
            }
        })?;
    established.store(true, Ordering::SeqCst);
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_from_the_url() {
        let servers = |u: &str| vec![u.parse::<async_nats::ServerAddr>().unwrap()];
        let c = credentials(&servers("nats://relay:p%40ss@h:4222"));
        assert_eq!(c.user.as_deref(), Some("relay"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert!(c.token.is_none());
        let c = credentials(&servers("tls://s3cret@h:4222"));
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert!(c.user.is_none());
        assert!(credentials(&servers("nats://h")).user.is_none());
    }
}
