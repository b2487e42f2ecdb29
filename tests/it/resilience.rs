//! The source server restarted mid-stream, the sink restarted mid-batch, and
//! connections to both cut by a loopback proxy: each time the daemon recovers
//! by itself, and in the end every aggregate equals SQL over the sources and
//! every change is logged exactly once.

use std::time::Duration;

use crate::faults::{caught_up, Workload};
use crate::harness::*;

async fn converge(shop: &str, sink: &str, w: &Workload, daemon: &Daemon) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if caught_up(shop, sink, w).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not converge; daemon log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let dup: i64 = scalar(
        sink,
        "select count(*) - count(distinct (source, commit_lsn, seq)) from tributary.events",
    )
    .await;
    assert_eq!(dup, 0, "an event was logged twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_sink_restarts_mid_stream_recover_without_loss() {
    let mut sources = cluster();
    let mut store = cluster();
    let (crm, shop, sink) = sources_and_store(&sources, &store).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "r"));
    let mut daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    let mut w = Workload::default();
    w.run(&crm, &shop, 3000, 1, |_| {}).await;
    // The daemon is still working through the backlog: restart the source server.
    tokio::task::block_in_place(|| sources.restart()).unwrap();
    w.run(&crm, &shop, 3000, 2, |_| {}).await;
    // And now the profile store, while batches are being applied.
    tokio::task::block_in_place(|| store.restart()).unwrap();
    w.run(&crm, &shop, 3000, 3, |_| {}).await;

    converge(&shop, &sink, &w, &daemon).await;
    assert!(daemon.alive(), "the daemon must survive both restarts");
    let log = daemon.log_text();
    assert!(
        log.contains("reconnecting"),
        "the interruptions were seen and retried:\n{log}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_by_a_proxy_recover_without_loss() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    // The daemon reaches the sources and the store only through proxies.
    let to_sources = Proxy::start(pg.port()).await;
    let to_store = Proxy::start(pg.port()).await;
    let cfg = write_config(&pipeline_config(
        &to_sources.url("crm"),
        &to_sources.url("shop"),
        &to_store.url("profiles"),
        "p",
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    let workload = {
        let (crm, shop) = (crm.clone(), shop.clone());
        tokio::spawn(async move {
            let mut w = Workload::default();
            w.run(&crm, &shop, 6000, 9, |_| {
                std::thread::sleep(Duration::from_millis(2))
            })
            .await;
            w
        })
    };
    let mut cuts = 0;
    let mut i = 0;
    while !workload.is_finished() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cuts += if i % 2 == 0 {
            to_sources.cut()
        } else {
            to_store.cut()
        };
        i += 1;
    }
    let w = workload.await.unwrap();
    assert!(cuts >= 4, "only {cuts} connections were cut");
    converge(&shop, &sink, &w, &daemon).await;
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_is_down_makes_the_daemon_wait_without_advancing_the_slot() {
    let sources = cluster();
    let mut store = cluster();
    let (crm, shop, sink) = sources_and_store(&sources, &store).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "bp"));
    let mut daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    tokio::task::block_in_place(|| store.stop()).unwrap();
    // One change per source first, then `before`: a slot at or past it
    // acknowledged its own source's change, which the store does not have.
    // (A slot may still move up to its first change: a source's walsender
    // reports WAL of the other database, or WAL without changes, as
    // passed, and an idle loop acknowledges that; comparing with the WAL
    // position before any change made this test fail now and then.)
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (900001, 'marker-crm@x.com', 'M')",
    )
    .await;
    exec(
        &shop,
        "insert into accounts (id, email) values (900001, 'marker-shop@x.com')",
    )
    .await;
    let before: String = scalar(&shop, "select pg_current_wal_insert_lsn()::text").await;
    let mut w = Workload::default();
    *w.changes.entry("crm").or_default() += 1;
    *w.changes.entry("shop").or_default() += 1;
    w.run(&crm, &shop, 3000, 5, |_| {}).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Nothing was acknowledged past what the store has: the slots kept the WAL.
    let advanced: bool = scalar(&shop, &format!("select bool_or(confirmed_flush_lsn >= '{before}') from pg_replication_slots where slot_name in ('crm_bp', 'shop_bp')")).await;
    assert!(!advanced, "a slot advanced while the sink was down");
    assert!(
        daemon.alive(),
        "the daemon waits (with backoff) instead of giving up"
    );
    assert!(
        daemon.peak_rss() < 200 * 1024 * 1024,
        "memory stays bounded while waiting"
    );

    tokio::task::block_in_place(|| store.restart()).unwrap();
    // A short outage is absorbed by waiting for a store connection; a longer
    // one by reconnecting with backoff. Either way it resumes by itself.
    converge(&shop, &sink, &w, &daemon).await;
    assert!(
        !daemon.log_text().contains("ERROR"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.stop(), Some(0));
}
