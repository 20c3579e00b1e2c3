//! The checkpoint while the relay streams: stored within moments of each
//! acknowledgement (no idle period needed), never ahead of it; `replay` right
//! after a consumer read its range; `status` with the live position.

use std::time::{Duration, Instant};

use outbox_relay::lsn::Lsn;

use crate::harness::*;
use crate::replay::{checkpoint, consume_async, lsn_of, replay_range, replayed, sorted};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_advances_while_the_relay_streams_without_pause() {
    let tc = TestCase::new("cp_streaming").await;
    let relay = start_relay(tc.config()).await;
    let table = tc.table.clone();
    let writer = tokio::spawn(async move {
        let db = servers().sql().await;
        for i in 0..600 {
            insert_rows(&db, &table, "evt", i * 2, 2).await;
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
    // Sample the stored row while rows keep coming.
    let mut seen: Vec<Lsn> = Vec::new();
    while !writer.is_finished() {
        if let Some(cp) = checkpoint(&tc).await {
            let acked = Lsn(relay.metrics.acked_lsn.get() as u64);
            assert!(
                cp <= acked,
                "checkpoint {cp} ahead of the acknowledged {acked}"
            );
            if seen.last() != Some(&cp) {
                seen.push(cp);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.await.unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // A write per second (the old design) would show at most a handful.
    assert!(
        seen.len() >= 10,
        "the checkpoint took only {} values while rows streamed for seconds: {seen:?}",
        seen.len()
    );
    relay.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_right_after_consuming_its_range_resends_exactly_it() {
    let tc = TestCase::new("replay_now").await;
    let addr = free_addr();
    // The stored row lags by up to a minute here: only the live instance
    // knows that the range was acknowledged, and `replay` must ask it.
    let text = format!(
        "{}\n[checkpoint]\nwrite_interval_ms = 60000\n[replay]\nwindow = \"1h\"\n",
        tc.config_text(&servers().brokers, "")
            .replace("listen = \"\"", &format!("listen = \"{addr}\""))
    );
    let file = config_file(&text);
    let log = tempfile::NamedTempFile::new().unwrap();
    let _relay = KillOnDrop(spawn_relay_binary(file.path(), log.path()));
    eventually(60, "relay streaming from its slot", || tc.slot_exists(true)).await;
    let db = servers().sql().await;
    // The first acknowledgement is stored at once; the 600 below are not.
    insert_rows(&db, &tc.table, "order", 10_000, 1).await;
    let topic = tc.topic("order");
    consume_async(topic.clone(), 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = checkpoint(&tc).await;
    for i in 0..600 {
        insert_rows(&db, &tc.table, "order", i, 1).await;
    }
    let got = consume_async(topic.clone(), 601).await;
    let (from, to) = (lsn_of(&got, 0), lsn_of(&got, 300));

    let status = relay_cli(&["status"], file.path()).await;
    assert_eq!(status.code, Some(0), "{status}");
    let live: Lsn = status
        .item("live_acked_lsn")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no live position in {status}"));
    assert!(live >= lsn_of(&got, 599), "{status}");
    assert!(status.item("checkpoint_lsn").contains("ms ago"), "{status}");
    assert_eq!(
        checkpoint(&tc).await,
        stored,
        "the row must lag for this test"
    );

    let started = Instant::now();
    let out = replay_range(file.path(), from, to).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout
            .contains("300 events in 300 transactions replayed"),
        "{out}"
    );
    let all = consume_async(topic, 901).await;
    assert_eq!(sorted(seqs(&replayed(&all))), (0..300).collect::<Vec<_>>());
    eprintln!(
        "replay of 300 just-consumed records took {:?} with the stored checkpoint {stored:?} behind it",
        started.elapsed()
    );
}
