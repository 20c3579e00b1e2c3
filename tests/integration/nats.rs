//! The NATS JetStream sink against a real nats-server (`harness::nats`):
//! content and per-key order of a backlog with large values and of a live
//! stream, restarts that store nothing twice, SIGKILLs whose re-sends
//! JetStream drops by `Nats-Msg-Id`, the server stopped mid-stream (the slot
//! holds), `outbox.on_invalid` for refused messages, a subject no stream
//! captures, and `check-config`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;
use outbox_relay::metrics::{Health, Metrics};
use outbox_relay::relay::RelayError;

use crate::harness::nats::*;
use crate::harness::*;

/// This test's config with `[sink] kind = "nats"`; `extra` goes into `[nats]`.
fn nats_text(tc: &TestCase, url: &str, extra: &str) -> String {
    format!(
        "{}\n[sink]\nkind = \"nats\"\n\n[nats]\nurl = \"{url}\"\n{extra}\n",
        tc.config_text(&tc.s.brokers, "")
    )
}

fn nats_config(tc: &TestCase, url: &str, extra: &str) -> Config {
    Config::from_toml(&nats_text(tc, url, extra), Path::new("t.toml"), |_| None).unwrap()
}

/// Each row's seq, in stream order, per key.
fn seqs_per_key(msgs: &[NatsMsg]) -> HashMap<String, Vec<i64>> {
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for m in msgs {
        per_key
            .entry(m.header("key").unwrap().to_string())
            .or_default()
            .push(m.row_seq());
    }
    per_key
}

/// Every seq in `0..total` exactly once, and each key's in commit order.
fn assert_exactly_once_in_order(msgs: &[NatsMsg], total: i64) {
    let mut count: HashMap<i64, usize> = HashMap::new();
    for m in msgs {
        *count.entry(m.row_seq()).or_default() += 1;
    }
    let missing: Vec<i64> = (0..total).filter(|s| !count.contains_key(s)).collect();
    assert!(missing.is_empty(), "rows never stored: {missing:?}");
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "rows stored more than once: {twice:?}");
    assert_eq!(msgs.len() as i64, total);
    let ids: HashSet<&str> = msgs.iter().map(|m| m.header("id").unwrap()).collect();
    assert_eq!(ids.len() as i64, total, "distinct event ids");
    for (key, seqs) in seqs_per_key(msgs) {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of commit order: {seqs:?}"
        );
    }
}

/// Writes rows `0..` (1 to 9 per transaction, keys k0-k9) until `stop`; returns how many.
fn spawn_writer(
    table: String,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<i64> {
    tokio::spawn(async move {
        let db = servers().sql().await;
        let mut next = 0i64;
        while !stop.load(Ordering::Relaxed) {
            let n = 1 + next % 9;
            insert_rows(&db, &table, "evt", next, n).await;
            next += n;
            committed.store(next - 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        next
    })
}

fn kill(child: &std::process::Child, signal: &str) {
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_backlog_with_large_values_and_live_rows_arrive_once_in_key_order_as_written() {
    let tc = TestCase::new("nats_content").await;
    let url = shared_nats();
    let cfg = nats_config(
        &tc,
        url,
        "create_stream = true\nstream = \"nats_content\"\nmax_outstanding = 64\n",
    );
    // The first run creates the slot; the backlog is committed while no relay runs.
    start_relay(cfg.clone()).await.stop().await.unwrap();
    let db = tc.s.sql().await;
    let t = &tc.table;
    // 300 rows: every 50th with a 100 KB value, row 150 with 1 MB (the
    // server's max_payload is 1 MiB including headers), keys k0-k6, a header.
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
         SELECT 'evt', 'k' || (i % 7), 'Backlog',
                jsonb_build_object('seq', i, 'pad', CASE WHEN i = 150 THEN repeat('x', 1000000)
                                                         WHEN i % 50 = 0 THEN repeat('y', 100000)
                                                         ELSE '' END),
                jsonb_build_object('tenant', 't' || (i % 3))
         FROM generate_series(0, 299) i"
    ))
    .await
    .unwrap();
    let relay = start_relay(cfg).await;
    // Live: 200 more rows in transactions of 10.
    for from in (300..500).step_by(10) {
        db.batch_execute(&format!(
            "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload, headers)
             SELECT 'evt', 'k' || (i % 7), 'Live', jsonb_build_object('seq', i),
                    jsonb_build_object('tenant', 't' || (i % 3))
             FROM generate_series({from}, {}) i",
            from + 9
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let end = wal_insert_lsn(&db).await;
    eventually(60, "everything confirmed", || async {
        tc.confirmed().await >= end
    })
    .await;
    assert_eq!(Metrics::total(&relay.metrics.events_acked), 500);
    relay.stop().await.unwrap();

    let msgs = read_stream(url, "nats_content", 500).await;
    assert_exactly_once_in_order(&msgs, 500);
    // Exactly what PostgreSQL holds: subject, key, value text, headers.
    let rows = db
        .query(
            &format!("SELECT id::text, aggregate_id, payload::text FROM {t}"),
            &[],
        )
        .await
        .unwrap();
    let by_id: HashMap<String, (String, String)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for m in &msgs {
        let seq = m.row_seq();
        let id = m.header("id").unwrap();
        let (key, payload) = &by_id[id];
        assert_eq!(m.subject, tc.topic("evt"));
        assert_eq!(m.header("key"), Some(key.as_str()));
        assert_eq!(m.value(), payload, "value of row {seq}");
        assert_eq!(m.header("Nats-Msg-Id"), Some(id));
        assert_eq!(m.header("tenant"), Some(format!("t{}", seq % 3).as_str()));
        let event_type = if seq < 300 { "Backlog" } else { "Live" };
        assert_eq!(m.header("event_type"), Some(event_type));
        let lsn: Lsn = m.header("lsn").unwrap().parse().unwrap();
        assert!(lsn > Lsn::ZERO && lsn <= end);
    }
    let big = msgs.iter().find(|m| m.row_seq() == 150).unwrap();
    assert!(big.payload.len() > 1_000_000);
    assert_eq!(
        msgs.iter().filter(|m| m.payload.len() > 100_000).count(),
        6,
        "five 100 KB values and the 1 MB one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sigterm_mid_stream_then_restart_stores_every_row_once() {
    let tc = TestCase::new("nats_sigterm").await;
    let url = shared_nats();
    create_stream(url, "nats_sigterm", &[tc.topic("evt")], -1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, nats_text(&tc, url, "")).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = KillOnDrop(spawn_relay_binary(&config, &log));
    eventually(60, "relay streaming", || tc.slot_exists(true)).await;

    let (stop, committed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(-1)),
    );
    let writer = spawn_writer(tc.table.clone(), stop.clone(), committed.clone());
    let start = tc.confirmed().await;
    eventually(60, "relay progress", || async {
        tc.confirmed().await > start
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(&child.0, "-TERM");
    let status = child.0.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM:\n{stderr}");
    let stored_at_stop = stream_len(url, "nats_sigterm").await;

    let mut child = KillOnDrop(spawn_relay_binary(&config, &log));
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();
    let end = wal_insert_lsn(&tc.s.sql().await).await;
    eventually(60, "restarted relay confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut child.0);

    let msgs = read_stream(url, "nats_sigterm", total as u64).await;
    assert_exactly_once_in_order(&msgs, total);
    eprintln!(
        "nats sigterm: {total} rows, {stored_at_stop} stored at the stop, {} in the stream",
        msgs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sigkill_loop_loses_nothing_and_jetstream_drops_every_resent_copy() {
    let tc = TestCase::new("nats_sigkill").await;
    let url = shared_nats();
    create_stream(url, "nats_sigkill", &[tc.topic("evt")], -1).await;
    // Every publish, duplicates included: a core NATS subscription sees what
    // the relays sent, the stream what JetStream kept.
    let sub_client = nats_client(url).await;
    let mut sub = sub_client.subscribe(tc.topic("evt")).await.unwrap();
    sub_client.flush().await.unwrap();
    let published: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counter = {
        let published = published.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(m) = sub.next().await {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .unwrap_or_else(|| panic!("no Nats-Msg-Id: {m:?}"));
                *published.lock().unwrap().entry(id.to_string()).or_default() += 1;
            }
        })
    };
    // Confirm only every 500 ms, so that each kill leaves acknowledged
    // records unconfirmed and the next instance sends them again (well
    // inside the stream's 2-minute duplicate window).
    let text = nats_text(&tc, url, "")
        .replace(
            "status_interval_ms = 200",
            "status_interval_ms = 1000\nconfirm_interval_ms = 500",
        )
        .replace(
            "[relay]\n",
            "[checkpoint]\nwrite_interval_ms = 500\n\n[relay]\n",
        );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = KillOnDrop(spawn_relay_binary(&config, &log));
    eventually(60, "relay streaming", || tc.slot_exists(true)).await;

    let (stop, committed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(-1)),
    );
    let writer = spawn_writer(tc.table.clone(), stop.clone(), committed.clone());
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..5 {
        let before = tc.confirmed().await;
        eventually(60, "the instance confirms progress", || async {
            tc.confirmed().await > before
        })
        .await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(300 + rng % 500)).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        child = KillOnDrop(spawn_relay_binary(&config, &log));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();
    let end = wal_insert_lsn(&tc.s.sql().await).await;
    eventually(90, "the last instance confirms everything", || async {
        tc.confirmed().await >= end
    })
    .await;
    terminate(&mut child.0);

    let msgs = read_stream(url, "nats_sigkill", total as u64).await;
    assert_exactly_once_in_order(&msgs, total);
    eventually(30, "the subscriber saw every event", || async {
        published.lock().unwrap().len() as i64 >= total
    })
    .await;
    counter.abort();
    let published = published.lock().unwrap().clone();
    let sent: usize = published.values().sum();
    let resent = sent - published.len();
    eprintln!(
        "FAULT nats_sigkill: {total} rows, 5 SIGKILLs, {sent} publishes ({resent} re-sent copies), {} messages in the stream",
        msgs.len()
    );
    assert!(
        resent > 0,
        "no kill left an acknowledged record unconfirmed: the test did not exercise the duplicate window"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_stopped_mid_stream_holds_the_slot_and_loses_nothing() {
    let tc = TestCase::new("nats_down").await;
    let mut server = NatsServer::start();
    let url = server.url();
    create_stream(&url, "nats_down", &[tc.topic("evt")], -1).await;
    let relay = start_relay(nats_config(
        &tc,
        &url,
        "ack_timeout_ms = 1000\nconnect_timeout_ms = 500\n",
    ))
    .await;
    let (stop, committed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicI64::new(-1)),
    );
    let writer = spawn_writer(tc.table.clone(), stop.clone(), committed.clone());
    let start = tc.confirmed().await;
    eventually(60, "relay progress", || async {
        tc.confirmed().await > start
    })
    .await;

    server.stop();
    // Nothing committed from here on can have been acknowledged.
    let at_stop = wal_insert_lsn(&tc.s.sql().await).await;
    let mut reason = String::new();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let confirmed = tc.confirmed().await;
        assert!(
            confirmed <= at_stop,
            "the slot passed {at_stop}, committed after the server stopped: {confirmed}"
        );
        if let Health::Down(why) = relay.metrics.health() {
            reason = why;
        }
    }
    assert!(
        reason.contains("NATS"),
        "readiness names the sink: {reason:?}"
    );
    assert!(!relay.is_finished(), "the relay keeps retrying");

    server.start_again();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let total = writer.await.unwrap();
    let end = wal_insert_lsn(&tc.s.sql().await).await;
    eventually(60, "everything confirmed after the restart", || async {
        tc.confirmed().await >= end
    })
    .await;
    assert_eq!(relay.metrics.health(), Health::Streaming);
    relay.stop().await.unwrap();
    let msgs = read_stream(&url, "nats_down", total as u64).await;
    assert_exactly_once_in_order(&msgs, total);
    eprintln!("nats server restart: {total} rows, readiness while down: {reason}");
}

/// Rows for the refusal tests: one before, one of 50 KB (over the stream's
/// max_msg_size of 20000), one after; returns the WAL position before the large one.
async fn insert_with_large(tc: &TestCase, huge: &[(&str, usize)]) -> Lsn {
    let db = tc.s.sql().await;
    let t = &tc.table;
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'Before', '{{\"seq\": 1}}')"
    ))
    .await
    .unwrap();
    let before = wal_insert_lsn(&db).await;
    for (id, size) in huge {
        db.batch_execute(&format!(
            "INSERT INTO {t} (id, aggregate_type, aggregate_id, event_type, payload)
               VALUES ('{id}', 'ok', 'b', 'Huge', jsonb_build_object('seq', 2, 'pad', repeat('x', {size})))"
        ))
        .await
        .unwrap();
    }
    db.batch_execute(&format!(
        "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload) VALUES ('ok', 'a', 'After', '{{\"seq\": 3}}')"
    ))
    .await
    .unwrap();
    before
}

const TOO_LARGE_FOR_STREAM: &str = "00000000-0000-4000-8000-00000000b16b";
const TOO_LARGE_FOR_SERVER: &str = "00000000-0000-4000-8000-0000000b16b2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refused_message_stops_the_relay_naming_the_event() {
    let tc = TestCase::new("nats_refused").await;
    let url = shared_nats();
    create_stream(url, "nats_refused", &[tc.topic("ok")], 20_000).await;
    let relay = start_relay(nats_config(&tc, url, "")).await;
    let before = insert_with_large(&tc, &[(TOO_LARGE_FOR_STREAM, 50_000)]).await;
    let err = relay.join().await.unwrap_err();
    assert!(
        matches!(&err, RelayError::Refused { id, sink: "NATS", .. } if id == TOO_LARGE_FOR_STREAM),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("max_msg_size"), "{text}");
    assert!(text.contains("outbox.on_invalid"), "{text}");
    assert!(err.is_fatal());
    assert!(
        tc.confirmed().await <= before,
        "confirmed past the refused row"
    );
    // "After" may be stored already (it was published while the refused
    // one's PubAck was on its way); the refused one never is.
    let msgs = read_stream(url, "nats_refused", 1).await;
    assert_eq!(msgs[0].header("event_type"), Some("Before"), "{msgs:?}");
    assert!(
        msgs.iter()
            .all(|m| m.header("id") != Some(TOO_LARGE_FOR_STREAM) && m.payload.len() < 20_000),
        "{msgs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refused_messages_are_dead_lettered_and_the_stream_goes_on() {
    let tc = TestCase::new("nats_dlq").await;
    let url = shared_nats();
    let dlq = format!("{}.dlq", tc.name);
    create_stream(url, "nats_dlq", &[tc.topic("ok")], 20_000).await;
    create_stream(url, "nats_dlq_dead", std::slice::from_ref(&dlq), -1).await;
    let text = nats_text(&tc, url, "").replace(
        "[outbox]\n",
        &format!("[outbox]\non_invalid = \"dead_letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let relay = start_relay(Config::from_toml(&text, Path::new("t"), |_| None).unwrap()).await;
    // One over the stream's max_msg_size (refused in its PubAck), one over the
    // server's max_payload of 1 MiB (refused before it is sent).
    insert_with_large(
        &tc,
        &[
            (TOO_LARGE_FOR_STREAM, 50_000),
            (TOO_LARGE_FOR_SERVER, 1_200_000),
        ],
    )
    .await;
    let end = wal_insert_lsn(&tc.s.sql().await).await;
    eventually(30, "everything confirmed past the refused rows", || async {
        tc.confirmed().await >= end
    })
    .await;
    assert!(!relay.is_finished(), "the relay keeps running");

    let good = read_stream(url, "nats_dlq", 2).await;
    let types: Vec<_> = good
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    let dead = read_stream(url, "nats_dlq_dead", 2).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (id, error) in [
        (TOO_LARGE_FOR_STREAM, "max_msg_size"),
        (TOO_LARGE_FOR_SERVER, "max_payload"),
    ] {
        let d = dead.iter().find(|m| m.header("id") == Some(id)).unwrap();
        assert_eq!(d.subject, dlq);
        assert_eq!(d.header("reason"), Some("too_large"));
        assert_eq!(d.header("original_topic"), Some(tc.topic("ok").as_str()));
        assert_eq!(d.header("key"), Some("b"));
        assert!(d.header("error").unwrap().contains(error), "{d:?}");
        assert!(d.payload.is_empty(), "the refused value is not sent again");
        let size: usize = d.header("original_size").unwrap().parse().unwrap();
        assert!(size > 50_000);
    }
    assert_eq!(Metrics::total(&relay.metrics.events_dead_lettered), 2);
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subject_without_a_stream_is_named_with_the_fix_and_delivered_once_one_exists() {
    let tc = TestCase::new("nats_nostream").await;
    let url = shared_nats();
    let relay = start_relay(nats_config(&tc, url, "")).await;
    let db = tc.s.sql().await;
    let before = wal_insert_lsn(&db).await;
    insert_rows(&db, &tc.table, "evt", 0, 3).await;
    let end = wal_insert_lsn(&db).await;
    let subject = tc.topic("evt");
    let health = || match relay.metrics.health() {
        Health::Down(why) => why,
        _ => String::new(),
    };
    // Health alternates between Streaming (a new session) and Down (its failure).
    let seen = Mutex::new(String::new());
    eventually(
        30,
        "readiness says no stream captures the subject",
        || async {
            let why = health();
            let found = why.contains("no JetStream stream captures subject");
            if found {
                *seen.lock().unwrap() = why;
            }
            found
        },
    )
    .await;
    let reason = seen.into_inner().unwrap();
    assert!(reason.contains(&format!("{subject:?}")), "{reason}");
    assert!(reason.contains("nats.create_stream = true"), "{reason}");
    assert!(
        tc.confirmed().await <= before,
        "confirmed past an unstored row"
    );
    assert!(!relay.is_finished(), "the relay retries");

    create_stream(url, "nats_nostream", std::slice::from_ref(&subject), -1).await;
    eventually(30, "delivered once the stream exists", || async {
        tc.confirmed().await >= end
    })
    .await;
    relay.stop().await.unwrap();
    let msgs = read_stream(url, "nats_nostream", 3).await;
    assert_exactly_once_in_order(&msgs, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_from_the_url_and_wrong_ones_stop_with_exit_2() {
    let tc = TestCase::new("nats_auth").await;
    let server = NatsServer::start_with(&["--user", "relay", "--pass", "s3cret"]);
    let good = format!("nats://relay:s3cret@127.0.0.1:{}", server.port);
    create_stream(&good, "nats_auth", &[tc.topic("evt")], -1).await;

    let wrong = format!("nats://relay:wrong@127.0.0.1:{}", server.port);
    let err = spawn_relay(nats_config(&tc, &wrong, ""))
        .join()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("check the credentials in nats.url"), "{text}");
    assert!(!text.contains("wrong@"), "the URL is never printed: {text}");
    assert!(
        err.is_fatal() && err.disposition().exit_code() == 2,
        "{err:?}"
    );

    let relay = start_relay(nats_config(&tc, &good, "")).await;
    let db = tc.s.sql().await;
    insert_rows(&db, &tc.table, "evt", 0, 5).await;
    let end = wal_insert_lsn(&db).await;
    eventually(30, "delivered with the URL's credentials", || async {
        tc.confirmed().await >= end
    })
    .await;
    relay.stop().await.unwrap();
    assert_exactly_once_in_order(&read_stream(&good, "nats_auth", 5).await, 5);
}

#[tokio::test]
async fn nats_check_config_refuses_a_nats_sink_without_a_server() {
    let tc_text =
        "[postgres]\nurl = \"postgresql://relay@127.0.0.1/app\"\n\n[sink]\nkind = \"nats\"\n";
    let f = config_file(tc_text);
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("nats.url is missing"), "{out}");
    assert!(out.stderr.contains("OUTBOX_RELAY_NATS_URL"), "{out}");
    let f = config_file(&format!(
        "{tc_text}\n[nats]\nurl = \"nats://127.0.0.1:4222\"\nmax_outstanding = 0\n"
    ));
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("nats.max_outstanding"), "{out}");
    let f = config_file(&format!(
        "{tc_text}\n[nats]\nurl = \"nats://127.0.0.1:4222\"\n"
    ));
    let out = relay_cli(&["check-config"], f.path()).await;
    assert_eq!(out.code, Some(0), "{out}");
}
