//! Prints every message of a JetStream stream as one JSON line (stream
//! sequence, subject, headers, payload), from the beginning, and keeps
//! following it. A stand-in for `nats stream view` when the `nats` CLI is not
//! installed (Debian ships only the server).
//!
//!     cargo run --example nats_tail -- nats://127.0.0.1:4222 OUTBOX

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::GetStreamErrorKind;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(stream)) = (args.next(), args.next()) else {
        eprintln!("usage: nats_tail URL STREAM");
        std::process::exit(2);
    };
    if let Err(e) = tail(&url, &stream).await {
        eprintln!("nats_tail: {e}");
        std::process::exit(1);
    }
}

async fn tail(url: &str, stream: &str) -> Result<(), Box<dyn std::error::Error>> {
    let js = jetstream::new(async_nats::connect(url).await?);
    // With `nats.create_stream` the stream appears with the first record.
    let mut waiting = false;
    let mut s = loop {
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                if !std::mem::replace(&mut waiting, true) {
                    eprintln!("nats_tail: waiting for stream {stream:?} to exist");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut seq = s.info().await?.state.first_sequence.max(1);
    loop {
        let last = s.info().await?.state.last_sequence;
        if seq > last {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // A sequence the stream no longer holds (deleted, aged out) is skipped.
        if let Ok(m) = s.get_raw_message(seq).await {
            let headers: Vec<(String, String)> = m
                .headers
                .iter()
                .flat_map(|(k, vs)| {
                    vs.iter()
                        .map(move |v| (AsRef::<str>::as_ref(k).to_string(), v.to_string()))
                })
                .collect();
            let line = serde_json::json!({
                "seq": m.sequence,
                "subject": m.subject.as_str(),
                "headers": headers,
                "payload": String::from_utf8_lossy(&m.payload),
            });
            println!("{line}");
        }
        seq += 1;
    }
}
