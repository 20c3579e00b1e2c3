//! `replay`: checks the range against what the slot still retains, files a
//! request in `replay_request`, and either waits for the instance holding the
//! slot to execute it or, with no instance running, executes it here.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::relay::{self, Disposition, RelayError, RunOptions};
use crate::setup::{self, SetupError};
use crate::state::{RequestState, StateStore};

/// What `replay` was asked for.
#[derive(Debug, Clone)]
pub struct ReplayArgs {
    pub from: Lsn,
    pub to: Option<Lsn>,
    pub only_topic: Option<String>,
    pub topic_suffix: Option<String>,
    /// How long to wait for a running instance to execute the request.
    pub wait: Duration,
}

/// The checked range, or why there is nothing to replay (exit 2).
#[derive(Debug, PartialEq, Eq)]
pub struct Range {
    pub from: Lsn,
    pub to: Lsn,
    /// `--to-lsn` was past the checkpoint and was lowered to it.
    pub clamped: bool,
    /// The range goes past the stored checkpoint: the instance holding the
    /// slot ends it at what it has acknowledged when it takes the request.
    pub up_to_live: bool,
}

/// Stands for "everything acknowledged" in a request for the live instance.
const LIVE_END: Lsn = Lsn(u64::MAX);

/// Checks `(from, to]` against the earliest replayable LSN (the slot's
/// confirmed position) and what was acknowledged: the stored `checkpoint`,
/// or, while an instance holds the slot (`live`), whatever that instance has
/// acknowledged, which it knows better than the row it stores a moment later.
pub fn check_range(
    from: Lsn,
    to: Option<Lsn>,
    earliest: Lsn,
    checkpoint: Option<Lsn>,
    live: bool,
) -> Result<Range, String> {
    if from < earliest {
        return Err(format!(
            "cannot replay from {from}: the slot keeps WAL only from {earliest}, the earliest replayable LSN; replay from {earliest} or later, and set [replay] window (e.g. \"1h\" or \"2GB\") to keep more next time"
        ));
    }
    let stored = checkpoint.unwrap_or(Lsn::ZERO);
    let (to, clamped) = match to {
        Some(t) if live || t <= stored => (t, false),
        Some(_) => (stored, true),
        None if live => (LIVE_END, false),
        None => (stored, false),
    };
    if from >= to {
        let cp = checkpoint.map_or("none stored".into(), |c| c.to_string());
        return Err(format!(
            "nothing to replay: the range ({from}, {to}] is empty (the checkpoint, the last acknowledged position stored, is {cp}; the earliest replayable LSN is {earliest}); pass a --from-lsn between them, and set [replay] window to keep more WAL replayable"
        ));
    }
    Ok(Range {
        from,
        to,
        clamped,
        up_to_live: live && to > stored,
    })
}

/// Runs `outbox-relay replay`; returns the exit code.
pub(super) async fn run(
    client: Client,
    cfg: &Config,
    args: &ReplayArgs,
) -> Result<Option<u8>, SetupError> {
    let mut out = std::io::stdout().lock();
    let slot_name = &cfg.postgres.slot;
    for (flag, topic) in [
        ("--only-topic", args.only_topic.clone()),
        (
            "--topic-suffix",
            args.topic_suffix.as_ref().map(|s| format!("t{s}")),
        ),
    ] {
        if topic.is_some_and(|t| !crate::config::valid_topic(&t)) {
            eprintln!(
                "outbox-relay: {flag} must keep topic names valid (1-249 of a-z A-Z 0-9 . _ -)"
            );
            return Ok(Some(2));
        }
    }
    if !crate::state::exists(&client, &cfg.checkpoint.schema).await? {
        eprintln!(
            "outbox-relay: {}",
            SetupError::NoState {
                schema: cfg.checkpoint.schema.clone()
            }
        );
        return Ok(Some(2));
    }
    let Some((slot, _, _)) = setup::slot_state(&client, None, slot_name).await? else {
        eprintln!("outbox-relay: replication slot {slot_name:?} does not exist: there is nothing to replay from; create it with `outbox-relay init`");
        return Ok(Some(2));
    };
    let store = StateStore::new(client, cfg);
    let cp = store.load().await?;
    let live = slot.active_pid.is_some();
    if cp.is_none() && !live {
        eprintln!("outbox-relay: slot {slot_name:?} has no checkpoint and no instance streams from it: no relay has stored an acknowledged position for this slot yet, so nothing is known to be in Kafka; start the relay (`outbox-relay run`) and replay once it has delivered events");
        return Ok(Some(2));
    }
    let stored = cp.as_ref().map(|c| c.acked);
    let range = match check_range(args.from, args.to, slot.confirmed_flush, stored, live) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return Ok(Some(2));
        }
    };
    let _ = match &cp {
        Some(cp) => writeln!(
            out,
            "slot {slot_name}: earliest replayable {}, checkpoint {} ({} bytes replayable)",
            slot.confirmed_flush,
            cp.acked,
            cp.acked.0.saturating_sub(slot.confirmed_flush.0)
        ),
        None => writeln!(
            out,
            "slot {slot_name}: earliest replayable {}, no checkpoint stored yet",
            slot.confirmed_flush
        ),
    };
    if range.clamped {
        let _ = writeln!(
            out,
            "--to-lsn lowered to the checkpoint {}: later events have not been produced yet",
            range.to
        );
    }
    if range.up_to_live && range.to != LIVE_END {
        let _ = writeln!(
            out,
            "--to-lsn {} is past the stored checkpoint: the instance holding the slot ends the range at what it has acknowledged",
            range.to
        );
    }
    let target = match (&args.only_topic, &args.topic_suffix) {
        (Some(t), _) => format!("topic {t} only"),
        (None, Some(s)) => format!("to topics suffixed {s:?}"),
        (None, None) => "to their original topics".into(),
    };
    let end = if range.to == LIVE_END {
        "what the instance holding the slot has acknowledged".to_string()
    } else {
        range.to.to_string()
    };
    let _ = writeln!(
        out,
        "replaying every event committed in ({}, {end}] {target}",
        range.from
    );
    let id = store
        .request(
            range.from,
            range.to,
            args.only_topic.as_deref(),
            args.topic_suffix.as_deref(),
        )
        .await?;
    let started = Instant::now();
    let mut held_by = slot.active_pid;
    if held_by.is_none() {
        let _ = writeln!(
            out,
            "request {id}: no instance holds the slot; replaying here"
        );
        let _ = out.flush();
        match replay_here(cfg, id).await {
            Ok(()) => {}
            Err(e) if e.disposition() == Disposition::Standby => {
                held_by = Some(0);
            }
            Err(e) => {
                eprintln!("outbox-relay: replay failed: {e}");
                let _ = store.fail(id, &format!("stopped by an error: {e}")).await;
                return Ok(Some(e.disposition().exit_code()));
            }
        }
    }
    if held_by.is_some() {
        let who = held_by
            .filter(|p| *p > 0)
            .map_or("another instance".to_string(), |p| {
                format!("the instance streaming as walsender pid {p}")
            });
        let _ = writeln!(out, "request {id}: waiting for {who} to execute it");
        let _ = out.flush();
    }
    let state = wait(&store, id, args.wait).await?;
    let Some(state) = state else {
        let cancelled = store.cancel(id).await?;
        eprintln!(
            "outbox-relay: request {id} was not {} within {:?}; {}",
            if cancelled { "taken" } else { "finished" },
            args.wait,
            if cancelled {
                "it was withdrawn: is the relay holding the slot a version without replay support, or stuck? (`outbox-relay status`)"
            } else {
                "it keeps running in the relay; see the replay_request table"
            }
        );
        return Ok(Some(1));
    };
    match state.state.as_str() {
        "done" => {
            if state.to != range.to {
                let _ = writeln!(
                    out,
                    "request {id}: the range ended at {}, what the instance had acknowledged when it took the request",
                    state.to
                );
            }
            let _ = writeln!(
                out,
                "request {id}: done in {:.1}s: {} events in {} transactions replayed; checkpoint unchanged (never moves back)",
                started.elapsed().as_secs_f64(),
                state.events.unwrap_or(0),
                state.transactions.unwrap_or(0)
            );
            Ok(None)
        }
        other => {
            eprintln!(
                "outbox-relay: request {id} {other}: {}",
                state.error.as_deref().unwrap_or("no reason recorded")
            );
            Ok(Some(
                if state.error.as_deref().is_some_and(|e| {
                    e.contains("earliest replayable") || e.starts_with("nothing to replay")
                }) {
                    2
                } else {
                    1
                },
            ))
        }
    }
}

/// Executes request `id` in this process (the slot is free).
async fn replay_here(cfg: &Config, id: i64) -> Result<(), RelayError> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("outbox-relay: stopping the replay (Ctrl-C again exits at once)");
        let _ = tx.send(true);
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
    let opts = RunOptions {
        replay_request: Some(id),
        ..RunOptions::default()
    };
    let result = relay::run_with(cfg.clone(), Arc::new(Metrics::new()), rx, opts).await;
    stop.abort();
    result
}

/// Polls the request until it ends (`None`: not within `limit`).
async fn wait(
    store: &StateStore,
    id: i64,
    limit: Duration,
) -> Result<Option<RequestState>, SetupError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = store.request_state(id).await? {
            if matches!(st.state.as_str(), "done" | "failed" | "cancelled") {
                return Ok(Some(st));
            }
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_must_start_inside_the_window_and_end_at_the_checkpoint() {
        let (earliest, cp) = (Lsn(1000), Some(Lsn(5000)));
        assert_eq!(
            check_range(Lsn(2000), None, earliest, cp, false),
            Ok(Range {
                from: Lsn(2000),
                to: Lsn(5000),
                clamped: false,
                up_to_live: false,
            })
        );
        assert_eq!(
            check_range(Lsn(1000), Some(Lsn(9000)), earliest, cp, false),
            Ok(Range {
                from: Lsn(1000),
                to: Lsn(5000),
                clamped: true,
                up_to_live: false,
            })
        );
        let e = check_range(Lsn(999), None, earliest, cp, false).unwrap_err();
        assert!(
            e.contains("earliest replayable LSN") && e.contains("0/3E8"),
            "{e}"
        );
        let e = check_range(Lsn(5000), None, earliest, cp, false).unwrap_err();
        assert!(e.contains("nothing to replay"), "{e}");
    }

    #[test]
    fn with_a_live_instance_the_range_may_go_past_the_stored_checkpoint() {
        let earliest = Lsn(1000);
        // Acknowledged a moment ago, not stored yet (or nothing stored at all).
        for cp in [Some(Lsn(5000)), None] {
            assert_eq!(
                check_range(Lsn(2000), Some(Lsn(9000)), earliest, cp, true),
                Ok(Range {
                    from: Lsn(2000),
                    to: Lsn(9000),
                    clamped: false,
                    up_to_live: true,
                })
            );
            let r = check_range(Lsn(2000), None, earliest, cp, true).unwrap();
            assert_eq!((r.to, r.up_to_live), (LIVE_END, true));
        }
        // Inside the checkpoint: nothing to ask the instance.
        let r = check_range(Lsn(2000), Some(Lsn(3000)), earliest, Some(Lsn(5000)), true).unwrap();
        assert!(!r.up_to_live && !r.clamped);
        let e = check_range(Lsn(3000), Some(Lsn(3000)), earliest, None, true).unwrap_err();
        assert!(e.contains("is empty") && e.contains("none stored"), "{e}");
    }
}
