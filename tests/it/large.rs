//! Large transactions with bounded memory: a single transaction of 1,000,000
//! row changes streamed by the server (protocol v2) is applied while the
//! daemon's resident memory stays under a stated budget; an aborted large
//! transaction and a rolled-back savepoint leave no trace; a transaction the
//! server sends whole at commit is spilled past the budget and applied in chunks.

use std::time::Duration;

use tributary::cluster::ClusterOptions;

use crate::harness::*;

/// The daemon's peak RSS budget for the 1M-change transaction (the config
/// below holds at most 8 MiB of one transaction in memory, and batches of 5,000).
const RSS_BUDGET: u64 = 160 * 1024 * 1024;

fn config(crm: &str, shop: &str, sink: &str, tag: &str, spill: &std::path::Path) -> String {
    pipeline_config(crm, shop, sink, tag).replace(
        "batch_max_wait_ms = 20",
        &format!(
            "batch_max_wait_ms = 20\nmax_txn_memory_mb = 8\nspill_dir = \"{}\"",
            spill.display()
        ),
    )
}

async fn setup(work_mem: &str) -> (tributary::cluster::Cluster, String, String, String) {
    let pg = cluster_with(ClusterOptions {
        extra_conf: vec![format!("logical_decoding_work_mem = {work_mem}")],
        ..Default::default()
    });
    let (crm, shop, sink) = two_sources(&pg).await;
    (pg, crm, shop, sink)
}

async fn order_total(sink: &str) -> i64 {
    scalar::<i64>(sink, "select coalesce(sum((traits->>'order_count')::bigint), 0)::bigint from tributary.profiles where merged_into is null").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_change_transaction_is_applied_within_a_memory_budget() {
    let (_pg, crm, shop, sink) = setup("64kB").await;
    let spill = tempfile::tempdir().unwrap();
    let cfg = write_config(&config(&crm, &shop, &sink, "big", spill.path()));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(&shop, "insert into orders (id, account_id, status, total_cents) select g, g % 10, 'paid', 1 from generate_series(1, 1000000) g").await;
    wait_until(
        "1,000,000 orders applied",
        Duration::from_secs(600),
        || async { order_total(&sink).await == 1_000_000 },
    )
    .await;
    let peak = daemon.peak_rss();
    // The log line follows the commit the test just saw.
    wait_until(
        "the server streamed the transaction (protocol v2)",
        Duration::from_secs(10),
        || async { daemon.log_text().contains("streamed=true") },
    )
    .await;
    let value: i64 = scalar(
        &sink,
        "select sum((traits->>'lifetime_value_cents')::bigint)::bigint from tributary.profiles",
    )
    .await;
    assert_eq!(value, 1_000_000);
    let events: i64 = scalar(
        &sink,
        "select count(*) from tributary.events where table_name = 'public.orders'",
    )
    .await;
    assert_eq!(events, 1_000_000, "each change logged once");
    eprintln!(
        "peak RSS {} MiB for a 1,000,000-change transaction",
        peak / (1024 * 1024)
    );
    assert!(
        peak > 0 && peak < RSS_BUDGET,
        "peak RSS {} MiB exceeds the {} MiB budget",
        peak >> 20,
        RSS_BUDGET >> 20
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_large_transactions_and_savepoints_leave_no_trace() {
    let (_pg, crm, shop, sink) = setup("64kB").await;
    let spill = tempfile::tempdir().unwrap();
    let cfg = write_config(&config(&crm, &shop, &sink, "abort", spill.path()));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    // Streamed while in progress, then rolled back.
    exec(&shop, "begin; insert into orders (id, account_id, status, total_cents) select g, 1, 'paid', 5 from generate_series(1, 100000) g; rollback").await;
    // A savepoint rolled back inside a committed transaction.
    exec(
        &shop,
        "begin;
         insert into orders (id, account_id, status, total_cents) values (1, 2, 'paid', 10);
         savepoint s;
         insert into orders (id, account_id, status, total_cents) select g, 2, 'paid', 1000 from generate_series(2, 100001) g;
         rollback to savepoint s;
         insert into orders (id, account_id, status, total_cents) values (200000, 2, 'shipped', 20);
         commit",
    )
    .await;
    let t = wait_until_some(&sink).await;
    assert_eq!(t["order_count"], 2, "{t}");
    assert_eq!(t["lifetime_value_cents"], 30, "{t}");
    assert!(
        traits_of(&sink, "shop_account", "1").await.is_none(),
        "the aborted transaction created a profile"
    );
    let events: i64 = scalar(
        &sink,
        "select count(*) from tributary.events where table_name = 'public.orders'",
    )
    .await;
    assert_eq!(events, 2, "only the surviving changes are logged");
    let leftovers = std::fs::read_dir(spill.path()).unwrap().count();
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(leftovers, 0, "spill files are removed");

    async fn wait_until_some(sink: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(t) = traits_of(sink, "shop_account", "2")
                .await
                .filter(|t| t.get("order_count").is_some())
            {
                return t;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "savepoint transaction never applied"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_sent_whole_is_spilled_and_applied_in_chunks() {
    // The server's default work memory sends this transaction whole at commit;
    // the daemon's 8 MiB budget makes it spill and apply it in chunks.
    let (_pg, crm, shop, sink) = setup("64MB").await;
    let spill = tempfile::tempdir().unwrap();
    let cfg = write_config(&config(&crm, &shop, &sink, "whole", spill.path()));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(&shop, "insert into orders (id, account_id, status, total_cents) select g, g % 3, 'paid', 2 from generate_series(1, 60000) g").await;
    wait_until(
        "60,000 orders applied",
        Duration::from_secs(120),
        || async { order_total(&sink).await == 60_000 },
    )
    .await;
    // The log line follows the commit the test just saw.
    wait_until(
        "the spilled transaction applied in chunks",
        Duration::from_secs(10),
        || async {
            let log = daemon.log_text();
            log.contains("large transaction applied") && log.contains("streamed=false")
        },
    )
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_sharing_a_commit_resume_exactly_after_a_crash_between_chunks() {
    // 40,000 rows of one COPY share one commit LSN; applied in chunks of 500, the
    // daemon is killed between chunks and restarted: each change lands once.
    let (_pg, crm, shop, sink) = setup("64MB").await;
    let spill = tempfile::tempdir().unwrap();
    let text = config(&crm, &shop, &sink, "copy", spill.path()).replacen(
        "batch_max_wait_ms = 20",
        "batch_max_wait_ms = 20\nbatch_max_events = 500",
        1,
    );
    let cfg = write_config(&text);
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(&shop, "copy orders (id, account_id, status, total_cents) from program 'seq 1 40000 | awk ''{print $1\"\\t\"($1%7)\"\\tpaid\\t3\"}'''").await;
    let logged = || async {
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.events where table_name = 'public.orders'",
        )
        .await
    };
    wait_until("some chunks applied", Duration::from_secs(60), || async {
        logged().await > 2000
    })
    .await;
    daemon.kill9();
    let before = logged().await;
    assert!(
        before < 40_000,
        "the kill came too late to land between chunks ({before})"
    );
    let daemon = Daemon::start(&cfg);
    wait_until(
        "all 40,000 applied after the restart",
        Duration::from_secs(120),
        || async { order_total(&sink).await == 40_000 },
    )
    .await;
    assert_eq!(logged().await, 40_000, "each change logged exactly once");
    let commits: i64 = scalar(&sink, "select count(distinct commit_lsn) from tributary.events where table_name = 'public.orders'").await;
    assert_eq!(commits, 1, "all rows share one commit");
    let shared: bool = scalar(&sink, "select count(*) > count(distinct lsn) from tributary.events where table_name = 'public.orders'").await;
    assert!(
        shared,
        "COPY's multi-insert records put several changes at one LSN"
    );
    let value: i64 = scalar(
        &sink,
        "select sum((traits->>'lifetime_value_cents')::bigint)::bigint from tributary.profiles",
    )
    .await;
    assert_eq!(value, 120_000);
    assert_eq!(daemon.stop(), Some(0));
}
