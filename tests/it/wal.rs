//! WAL safety: a source whose server only has traffic on unpublished tables
//! (in the same database and in another one) still sees its slot advance, so
//! the server does not keep WAL for Tributary's sake.

use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn an_idle_source_slot_advances_when_other_tables_are_busy() {
    let pg = cluster();
    let crm = create_db(&pg, "crm").await;
    let shop = create_db(&pg, "shop").await;
    let other = create_db(&pg, "other").await;
    let sink = create_db(&pg, "profiles").await;
    exec(&crm, CRM_SCHEMA).await;
    exec(
        &crm,
        "create table audit_log (id bigserial primary key, payload text)",
    )
    .await;
    exec(&shop, SHOP_SCHEMA).await;
    exec(
        &other,
        "create table noise (id bigserial primary key, payload text)",
    )
    .await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "w"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    let flush = |slot: &'static str| {
        let crm = crm.clone();
        async move {
            scalar::<String>(&crm, &format!("select confirmed_flush_lsn::text from pg_replication_slots where slot_name = '{slot}'")).await
        }
    };
    let lsn = |s: &str| -> u64 {
        let (hi, lo) = s.split_once('/').unwrap();
        (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
    };
    // Busy on tables Tributary does not publish: ~8 MB of WAL in the crm database
    // (unpublished table) and in another database of the same server.
    for _ in 0..4 {
        exec(&crm, "insert into audit_log (payload) select repeat('x', 1000) from generate_series(1, 1000)").await;
        exec(
            &other,
            "insert into noise (payload) select repeat('y', 1000) from generate_series(1, 1000)",
        )
        .await;
    }
    let target = lsn(&scalar::<String>(&crm, "select pg_current_wal_insert_lsn()::text").await);
    for slot in ["crm_w", "shop_w"] {
        wait_until(
            &format!("slot {slot} passes the busy WAL"),
            Duration::from_secs(30),
            || {
                let f = flush(slot);
                async move { lsn(&f.await) >= target }
            },
        )
        .await;
    }
    let retained: i64 = scalar(&crm, "select max(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn))::bigint from pg_replication_slots where slot_name in ('crm_w', 'shop_w')").await;
    assert!(
        retained < 1_000_000,
        "slots lag {retained} bytes behind the busy server"
    );
    let out = run_cmd(&cfg, &["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["sources"][0]["wal_retained_bytes"].is_i64(), "{doc}");
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test]
async fn an_invalidated_slot_stops_the_source_with_the_resnapshot_path() {
    let pg = cluster_with(tributary::cluster::ClusterOptions {
        extra_conf: vec![
            "max_slot_wal_keep_size = 1MB".into(),
            "max_wal_size = 32MB".into(),
            "min_wal_size = 32MB".into(),
        ],
        ..Default::default()
    });
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(
        &crm,
        "create table filler (id bigserial primary key, payload text)",
    )
    .await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "inv"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    assert_eq!(daemon.stop(), Some(0));

    // While the daemon is down: a change it must not silently skip, then far more
    // WAL than max_slot_wal_keep_size allows the slots to keep.
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (1, 'a@x.com', 'Ann')",
    )
    .await;
    for _ in 0..6 {
        exec(&crm, "insert into filler (payload) select repeat(md5(g::text), 100) from generate_series(1, 5000) g").await;
        exec(&crm, "select pg_switch_wal(); checkpoint").await;
    }
    let lost: i64 = scalar(
        &crm,
        "select count(*) from pg_replication_slots where wal_status = 'lost'",
    )
    .await;
    assert!(lost >= 1, "the test did not manage to invalidate a slot");

    let out = run_cmd(&cfg, &["run"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(
        t.contains("invalidated")
            && t.contains("DELETE FROM tributary.checkpoints WHERE source = "),
        "{t}"
    );

    // Following the message re-snapshots, and the change made while down is there.
    exec(&sink, "delete from tributary.checkpoints").await;
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    wait_until(
        "row written while the slot was lost",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "email", "a@x.com")
                .await
                .is_some_and(|t| t["first_name"] == "Ann")
        },
    )
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test]
async fn an_idle_source_gets_heartbeats_and_its_slot_advances() {
    // No autovacuum: once the slots exist, only heartbeats write WAL on this server.
    let pg = cluster_with(tributary::cluster::ClusterOptions {
        extra_conf: vec!["autovacuum = off".into()],
        ..Default::default()
    });
    let (crm, shop, sink) = two_sources(&pg).await;
    let text = pipeline_config(&crm, &shop, &sink, "hb")
        .replace("priority = 10", "priority = 10\nheartbeat_interval_s = 1");
    let cfg = write_config(&text);
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    let flush = || async {
        scalar::<String>(
            &crm,
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = 'crm_hb'",
        )
        .await
    };
    wait_until("a heartbeat", Duration::from_secs(30), || async {
        daemon.log_text().contains("heartbeat")
    })
    .await;
    let start = flush().await;
    // Nothing writes anywhere on this server; only heartbeats put WAL in the crm database.
    wait_until(
        "the idle crm slot advances",
        Duration::from_secs(30),
        || async {
            let now = flush().await;
            scalar::<bool>(&crm, &format!("select '{now}'::pg_lsn > '{start}'::pg_lsn")).await
        },
    )
    .await;
    assert_eq!(daemon.stop(), Some(0));
}
