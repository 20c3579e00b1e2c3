//! Checkpoints, the replay window, `replay`, `run --start-lsn`, the stdout
//! sink and `tail`, against the shared PostgreSQL and tansu.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::lsn::Lsn;

use crate::harness::*;

/// This test's config text with `extra` sections appended.
fn config_text(tc: &TestCase, extra: &str) -> String {
    format!(
        "{}\n[checkpoint]\ninterval_ms = 200\n{extra}",
        tc.config_text(&tc.s.brokers, "")
    )
}

fn config(text: &str) -> Config {
    Config::from_toml(text, Path::new("test.toml"), |_| None).unwrap()
}

/// The slot's stored checkpoint.
pub(crate) async fn checkpoint(tc: &TestCase) -> Option<Lsn> {
    tc.s.sql()
        .await
        .query_opt(
            "SELECT acked_lsn::text FROM outbox_relay.checkpoint WHERE slot_name = $1",
            &[&tc.name],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, String>(0).parse().unwrap())
}

/// Waits until the checkpoint is past `lsn` (a commit LSN: its transaction is acknowledged).
async fn checkpoint_past(tc: &TestCase, lsn: Lsn) {
    eventually(30, &format!("checkpoint past {lsn}"), || async move {
        checkpoint(tc).await.is_some_and(|c| c > lsn)
    })
    .await;
}

fn consume(topic: String, expected: usize) -> Vec<Consumed> {
    consume_all(shared_brokers(), &[topic], expected)
}

pub(crate) async fn consume_async(topic: String, expected: usize) -> Vec<Consumed> {
    tokio::task::spawn_blocking(move || consume(topic, expected))
        .await
        .unwrap()
}

/// The commit LSN header of the record with payload seq `seq`.
pub(crate) fn lsn_of(got: &[Consumed], seq: i64) -> Lsn {
    got.iter()
        .find(|r| seqs(std::slice::from_ref(*r))[0] == seq)
        .and_then(|r| r.header("lsn"))
        .unwrap_or_else(|| panic!("no record with seq {seq}"))
        .parse()
        .unwrap()
}

/// `outbox-relay replay --from-lsn FROM --to-lsn TO` with the config at `config`.
pub(crate) async fn replay_range(config: &Path, from: Lsn, to: Lsn) -> Output {
    relay_cli(
        &[
            "replay",
            "--from-lsn",
            &from.to_string(),
            "--to-lsn",
            &to.to_string(),
        ],
        config,
    )
    .await
}

pub(crate) fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort_unstable();
    v
}

/// The records sent again by a replay request (with a `replayed` header).
pub(crate) fn replayed(got: &[Consumed]) -> Vec<Consumed> {
    got.iter()
        .filter(|r| r.header("replayed").is_some())
        .cloned()
        .collect()
}

fn originals(got: &[Consumed]) -> Vec<Consumed> {
    got.iter()
        .filter(|r| r.header("replayed").is_none())
        .cloned()
        .collect()
}

#[tokio::test]
async fn restarts_skip_what_was_acknowledged_and_replay_sends_exactly_the_range() {
    restarts_send_nothing_twice_and_replay_sends_the_range(servers()).await;
}

/// Also run on each version of the matrix.
pub async fn restarts_send_nothing_twice_and_replay_sends_the_range(s: &'static Servers) {
    let tc = TestCase::on(s, "replay_range").await;
    let text = config_text(&tc, "[replay]\nwindow = \"1h\"\n");
    let file = config_file(&text);
    let topic = tc.topic("order");
    let db = s.sql().await;

    let relay = start_relay(config(&text)).await;
    let slot_start = tc.confirmed().await;
    let lsn_a = insert_rows(&db, &tc.table, "order", 0, 10).await;
    let lsn_b = insert_rows(&db, &tc.table, "order", 10, 10).await;
    insert_rows(&db, &tc.table, "order", 20, 10).await;
    let got = consume_async(topic.clone(), 30).await;
    assert_eq!(sorted(seqs(&got)), (0..30).collect::<Vec<_>>());
    checkpoint_past(&tc, lsn_of(&got, 29)).await;
    relay.stop().await.unwrap();
    // The window keeps the slot where it was: PostgreSQL still has all of it.
    assert_eq!(
        tc.confirmed().await,
        slot_start,
        "the slot stays at the window start"
    );

    // A restart decodes the window again but sends nothing twice.
    let relay = start_relay(config(&text)).await;
    insert_rows(&db, &tc.table, "order", 30, 10).await;
    let got = consume_async(topic.clone(), 40).await;
    assert_eq!(
        sorted(seqs(&got)),
        (0..40).collect::<Vec<_>>(),
        "no duplicates after a restart"
    );
    assert!(relay.metrics.transactions_skipped.get() >= 3);
    assert!(relay.metrics.events_skipped.get() >= 30);
    checkpoint_past(&tc, lsn_of(&got, 39)).await;

    // Replay (lsn_a, lsn_b] through the running relay: exactly the second batch again.
    let out = replay_range(file.path(), lsn_a, lsn_b).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("waiting for the instance"), "{out}");
    assert!(
        out.stdout.contains("10 events in 1 transactions replayed"),
        "{out}"
    );
    assert!(out.stdout.contains(&format!(
        "replaying every event committed in ({lsn_a}, {lsn_b}]"
    )));
    // The live stream goes on after the replay.
    insert_rows(&db, &tc.table, "order", 40, 10).await;
    let got = consume_async(topic.clone(), 60).await;
    let replayed = replayed(&got);
    assert_eq!(sorted(seqs(&replayed)), (10..20).collect::<Vec<_>>());
    assert_eq!(sorted(seqs(&originals(&got))), (0..50).collect::<Vec<_>>());
    let first = got.iter().find(|r| seqs(std::slice::from_ref(*r))[0] == 15);
    let again = replayed
        .iter()
        .find(|r| seqs(std::slice::from_ref(*r))[0] == 15);
    let (first, again) = (first.unwrap(), again.unwrap());
    assert_eq!(
        (&first.key, &first.header("id"), &first.header("lsn")),
        (&again.key, &again.header("id"), &again.header("lsn")),
        "a replayed record is the original plus the replayed header"
    );
    checkpoint_past(&tc, lsn_of(&got, 49)).await;
    let relay_checkpoint = checkpoint(&tc).await.unwrap();
    relay.stop().await.unwrap();

    // With no relay running, replay does it itself, into suffixed topics.
    let out = relay_cli(
        &[
            "replay",
            "--from-lsn",
            &lsn_a.to_string(),
            "--topic-suffix",
            ".again",
        ],
        file.path(),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("replaying here"), "{out}");
    let again = consume_async(format!("{topic}.again"), 40).await;
    assert_eq!(sorted(seqs(&again)), (10..50).collect::<Vec<_>>());
    assert!(again.iter().all(|r| r.header("replayed").is_some()));
    assert_eq!(checkpoint(&tc).await, Some(relay_checkpoint), "never moves");
    assert_eq!(
        tc.confirmed().await,
        slot_start,
        "the replay confirms nothing"
    );

    // And the relay afterwards still sends nothing twice.
    let relay = start_relay(config(&text)).await;
    insert_rows(&db, &tc.table, "order", 50, 10).await;
    let got = consume_async(topic.clone(), 70).await;
    assert_eq!(sorted(seqs(&originals(&got))), (0..60).collect::<Vec<_>>());
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn replay_outside_the_window_and_start_behind_the_slot_are_refused() {
    let tc = TestCase::new("replay_refused").await;
    let text = config_text(&tc, "");
    let file = config_file(&text);
    let db = servers().sql().await;
    let relay = start_relay(config(&text)).await;
    insert_rows(&db, &tc.table, "order", 0, 5).await;
    let got = consume_async(tc.topic("order"), 5).await;
    let commit = lsn_of(&got, 4);
    checkpoint_past(&tc, commit).await;
    eventually(30, "slot confirmed past the batch", || async {
        tc.confirmed().await > commit
    })
    .await;

    // Without a window the slot keeps nothing behind the acknowledged position.
    let out = relay_cli(&["replay", "--from-lsn", "0/1"], file.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    let line = out.stderr.lines().last().unwrap_or_default();
    assert!(
        line.contains("cannot replay from 0/1: the slot keeps WAL only from ")
            && line.contains("the earliest replayable LSN")
            && line.contains("[replay] window"),
        "{out}"
    );
    // A request the relay cannot execute is marked failed; the live stream goes on.
    let id: i64 = db
        .query_one(
            "INSERT INTO outbox_relay.replay_request (slot_name, from_lsn, to_lsn)
             VALUES ($1, '0/1', $2::text::pg_lsn) RETURNING id",
            &[&tc.name, &commit.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    let state = |id: i64| async move {
        servers()
            .sql()
            .await
            .query_one(
                "SELECT state, coalesce(error, '') FROM outbox_relay.replay_request WHERE id = $1",
                &[&id],
            )
            .await
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .unwrap()
    };
    eventually(30, "the request marked failed", || async {
        state(id).await.0 == "failed"
    })
    .await;
    assert!(state(id).await.1.contains("earliest replayable LSN"));
    insert_rows(&db, &tc.table, "order", 5, 5).await;
    assert_eq!(consume_async(tc.topic("order"), 10).await.len(), 10);
    relay.stop().await.unwrap();

    // A checkpoint from another cluster (ahead of this server's WAL) is refused.
    db.execute(
        "UPDATE outbox_relay.checkpoint SET acked_lsn = 'FFFF/0' WHERE slot_name = $1",
        &[&tc.name],
    )
    .await
    .unwrap();
    let err = spawn_relay(config(&text)).join().await.unwrap_err();
    assert!(
        err.to_string().contains("is ahead of this server's WAL")
            && err
                .to_string()
                .contains("DELETE FROM outbox_relay.checkpoint"),
        "{err}"
    );
    db.execute(
        "DELETE FROM outbox_relay.checkpoint WHERE slot_name = $1",
        &[&tc.name],
    )
    .await
    .unwrap();

    let confirmed = tc.confirmed().await;
    let out = relay_cli(&["run", "--start-lsn", "0/1"], file.path()).await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "cannot start at 0/1: slot \"replay_refused\" has already confirmed everything up to {confirmed}"
        )),
        "{out}"
    );
}

#[tokio::test]
async fn the_window_moves_on_across_restarts_more_frequent_than_the_window() {
    let tc = TestCase::new("replay_window").await;
    let text = config_text(&tc, "[replay]\nwindow = \"2s\"\n");
    let db = servers().sql().await;
    let mut relay = start_relay(config(&text)).await;
    let first = insert_rows(&db, &tc.table, "order", 0, 5).await;
    for round in 1..8 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        relay.stop().await.unwrap();
        relay = start_relay(config(&text)).await;
        insert_rows(&db, &tc.table, "order", round * 5, 5).await;
    }
    eventually(30, "the slot confirmed past the first batch", || async {
        tc.confirmed().await >= first
    })
    .await;
    let got = consume_async(tc.topic("order"), 40).await;
    assert_eq!(
        sorted(seqs(&got)),
        (0..40).collect::<Vec<_>>(),
        "restarts inside the window send nothing twice"
    );
    assert!(relay.metrics.replay_window_age_seconds.get() >= 2.0);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn start_lsn_sends_everything_after_it_again() {
    let tc = TestCase::new("replay_start").await;
    let text = config_text(&tc, "[replay]\nwindow = \"1h\"\n");
    let db = servers().sql().await;
    let relay = start_relay(config(&text)).await;
    let lsn_a = insert_rows(&db, &tc.table, "order", 0, 5).await;
    insert_rows(&db, &tc.table, "order", 5, 5).await;
    let got = consume_async(tc.topic("order"), 10).await;
    checkpoint_past(&tc, lsn_of(&got, 9)).await;
    relay.stop().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, &text).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .args(["--start-lsn", &lsn_a.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let got = consume_async(tc.topic("order"), 15).await;
    terminate(&mut child);
    assert_eq!(
        sorted(seqs(&got)),
        sorted((0..10).chain(5..10).collect()),
        "the second batch again, the first not"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("streaming from --start-lsn"), "{log}");
}

#[tokio::test]
async fn checkpoint_survives_sigkill_and_never_leads_kafka() {
    let tc = TestCase::new("replay_kill").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    // With a window the slot stays behind: only the checkpoint prevents repeats.
    std::fs::write(&cfg, config_text(&tc, "[replay]\nwindow = \"1h\"\n")).unwrap();
    let log = dir.path().join("relay.log");
    let mut child = spawn_relay_binary(&cfg, &log);
    eventually(60, "relay streaming", || tc.slot_exists(true)).await;

    // (first seq, WAL insert position after the commit) per 50-row batch.
    let (tx, rx) = mpsc::channel();
    let table = tc.table.clone();
    let writer = tokio::spawn(async move {
        let db = servers().sql().await;
        for b in 0..30 {
            let lsn = insert_rows(&db, &table, "order", b * 50, 50).await;
            tx.send((b * 50, lsn)).unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    eventually(60, "a checkpoint", || async {
        checkpoint(&tc).await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = checkpoint(&tc).await.unwrap();

    // Every batch whose commit ended at or before the checkpoint is in Kafka.
    let batches: Vec<(i64, Lsn)> = rx.try_iter().collect();
    let covered: Vec<i64> = batches
        .iter()
        .filter(|(_, lsn)| *lsn <= at_kill)
        .flat_map(|(first, _)| *first..*first + 50)
        .collect();
    assert!(!covered.is_empty(), "the checkpoint covers some batch");
    let want = covered.clone();
    let brokers = servers().brokers.clone();
    let topic = tc.topic("order");
    let got = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &[topic], |got| {
            let have: std::collections::HashSet<i64> = seqs(got).into_iter().collect();
            want.iter().all(|s| have.contains(s))
        })
    })
    .await
    .unwrap();
    let have: std::collections::HashSet<i64> = seqs(&got).into_iter().collect();
    assert!(
        covered.iter().all(|s| have.contains(s)),
        "checkpoint ahead of Kafka"
    );

    // After a restart every row arrives; what the checkpoint covered arrives once.
    let restarted = Instant::now();
    let mut child = spawn_relay_binary(&cfg, &log);
    writer.await.unwrap();
    let topic = tc.topic("order");
    let Ok(got) = tokio::task::spawn_blocking(move || consume(topic, 1500)).await else {
        let _ = child.kill();
        panic!(
            "relay log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    };
    let delivered_after = restarted.elapsed();
    terminate(&mut child);
    let all = seqs(&got);
    assert_eq!(
        all.iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        1500,
        "every row delivered"
    );
    for s in &covered {
        assert_eq!(
            all.iter().filter(|x| *x == s).count(),
            1,
            "seq {s} was acknowledged before the kill and must not be sent again"
        );
    }
    assert!(checkpoint(&tc).await.unwrap() >= at_kill);
    let distinct = all.iter().collect::<std::collections::HashSet<_>>().len();
    eprintln!(
        "FAULT checkpoint_sigkill: written=1500 delivered={} duplicates={} covered_by_checkpoint={} resent_covered=0 all_delivered_after_restart_ms={}",
        all.len(),
        all.len() - distinct,
        covered.len(),
        delivered_after.as_millis()
    );
}

/// Lines a child writes to stdout, on a channel.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_json(lines: &mpsc::Receiver<String>) -> serde_json::Value {
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("a JSON line within 30 s");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// SIGTERM, then waits for exit 0.
#[tokio::test]
async fn tail_and_the_stdout_sink_print_json_lines_and_confirm_nothing() {
    let tc = TestCase::new("replay_tail").await;
    let text = config_text(&tc, "");
    let file = config_file(&text);
    let db = servers().sql().await;
    let relay = start_relay(config(&text)).await;

    // tail runs beside the live relay on a temporary slot of its own.
    let mut tail = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["tail", "--config", file.path().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let temp = format!("outbox_relay_tail_{}", tail.id());
    let slot_active = |name: String| async move {
        servers()
            .sql()
            .await
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active AND temporary",
                &[&name],
            )
            .await
            .unwrap()
            .is_some()
    };
    eventually(90, "tail's temporary slot", || slot_active(temp.clone())).await;
    let lines = stdout_lines(&mut tail);
    insert_rows(&db, &tc.table, "order", 0, 3).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let v = next_json(&lines);
        assert_eq!(v["topic"], tc.topic("order"));
        assert!(v["key"].as_str().unwrap().starts_with('k'));
        let payload: serde_json::Value =
            serde_json::from_str(v["value"].as_str().unwrap()).unwrap();
        seen.push(payload["seq"].as_i64().unwrap());
        let names: Vec<&str> = v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h[0].as_str().unwrap())
            .collect();
        assert_eq!(names, ["id", "event_type", "lsn"]);
        assert!(v["lsn"].as_str().unwrap().contains('/'));
    }
    assert_eq!(sorted(seen), [0, 1, 2]);
    terminate(&mut tail);
    assert!(!slot_active(temp).await, "the temporary slot is gone");
    // The live relay was not disturbed.
    assert_eq!(consume_async(tc.topic("order"), 3).await.len(), 3);
    relay.stop().await.unwrap();

    // [sink] kind = "stdout" streams from the relay's slot and confirms nothing.
    let before = tc.confirmed().await;
    let stdout_cfg = config_file(&format!("{text}[sink]\nkind = \"stdout\"\n"));
    let mut run = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["run", "--config", stdout_cfg.path().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(90, "stdout relay streaming", || tc.slot_exists(true)).await;
    let lines = stdout_lines(&mut run);
    insert_rows(&db, &tc.table, "order", 3, 2).await;
    let seqs_out: Vec<i64> = (0..2)
        .map(|_| {
            let v = next_json(&lines);
            serde_json::from_str::<serde_json::Value>(v["value"].as_str().unwrap()).unwrap()["seq"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs_out, [3, 4]);
    tokio::time::sleep(Duration::from_millis(500)).await; // a few status intervals
    terminate(&mut run);
    assert_eq!(
        tc.confirmed().await,
        before,
        "the stdout sink confirmed nothing"
    );
}
