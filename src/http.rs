//! The metrics and health listener: `GET /metrics`, `/healthz`, `/readyz`.
//!
//! A deliberately small HTTP/1.1 responder (one request per connection) so
//! the relay needs no web framework. It only reads [`Metrics`]; it changes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::{Health, Metrics};

/// Binds the listener; fails early with the address in the message.
pub async fn bind(addr: &str) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr:?} for metrics: {e}; set metrics.listen"),
        )
    })
}

/// Serves requests until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(10), handle(stream, &metrics)).await
            {
                tracing::debug!(%peer, error = %e, "metrics request timed out");
            }
        });
    }
}

pub fn local_addr(l: &TcpListener) -> Option<SocketAddr> {
    l.local_addr().ok()
}

async fn handle(mut stream: TcpStream, metrics: &Metrics) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line =
        String::from_utf8_lossy(buf.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET", "/healthz") => ("200 OK", "text/plain", b"ok\n".to_vec()),
        ("GET", "/readyz") => match metrics.health() {
            Health::Streaming => (
                "200 OK",
                "text/plain",
                b"ready: streaming from the slot\n".to_vec(),
            ),
            Health::Standby => (
                "200 OK",
                "text/plain",
                b"standby: another instance streams from the slot\n".to_vec(),
            ),
            Health::Down(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {reason}\n").into_bytes(),
            ),
        },
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            b"not found: try /metrics, /healthz or /readyz\n".to_vec(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            b"only GET is supported\n".to_vec(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let metrics = Arc::new(Metrics::new());
        let l = bind("127.0.0.1:0").await.unwrap();
        let addr = local_addr(&l).unwrap();
        tokio::spawn(serve(l, metrics.clone()));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("not ready: starting\n"),
            "{r}"
        );
        metrics.set_health(Health::Standby);
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.contains("standby"),
            "{r}"
        );
        metrics.set_health(Health::Streaming);
        assert!(get(addr, "/readyz").await.contains("ready: streaming"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("outbox_relay_active{sink=\"kafka\"} 1"), "{m}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
