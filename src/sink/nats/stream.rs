//! `nats.create_stream`: the one stream that captures every subject the
//! relay publishes to, created or extended the first time a subject is seen.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

/// `nats.create_stream`: the stream that captures every subject published to.
pub(super) struct StreamSettings {
    pub(super) name: String,
    pub(super) duplicate_window: Duration,
}

/// Whether the stream subject `pattern` captures `subject`.
fn captures(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// `nats.create_stream`: creates the stream with `subject`, or adds `subject`
/// to it unless one of its subjects captures it already.
pub(super) async fn ensure_stream(
    ctx: &jetstream::Context,
    s: &StreamSettings,
    subject: &str,
) -> Result<(), String> {
    let wanted = stream::Config {
        name: s.name.clone(),
        subjects: vec![subject.to_string()],
        storage: stream::StorageType::File,
        duplicate_window: s.duplicate_window,
        ..Default::default()
    };
    let mut stream = ctx
        .get_or_create_stream(wanted)
        .await
        .map_err(|e| format!("cannot create or read stream {:?}: {e}", s.name))?;
    let info = stream
        .info()
        .await
        .map_err(|e| format!("cannot read stream {:?}: {e}", s.name))?;
    if info.config.subjects.iter().any(|p| captures(p, subject)) {
        return Ok(());
    }
    let mut config = info.config.clone();
    config.subjects.push(subject.to_string());
    ctx.update_stream(config)
        .await
        .map_err(|e| format!("cannot add subject {subject:?} to stream {:?}: {e} (another stream may capture it: then set nats.create_stream = false)", s.name))?;
    tracing::info!(stream = %s.name, subject, "added subject to stream (nats.create_stream)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_subjects_capture_with_wildcards() {
        assert!(captures("outbox.>", "outbox.event.order"));
        assert!(captures("outbox.*.order", "outbox.event.order"));
        assert!(captures("outbox.event.order", "outbox.event.order"));
        assert!(!captures("outbox.*", "outbox.event.order"));
        assert!(!captures("outbox.event.order", "outbox.event"));
        assert!(!captures("outbox.>", "outbox"));
    }
}
