//! `forget --identity`: the person's profile, identities, provenance, rows and
//! logged events are gone, and neither a late change of the source row, a
//! replay, a rebuild, a re-snapshot from scratch nor `tributary snapshot`
//! brings them back.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

async fn ann_gone(sink: &str) {
    for (kind, value) in [
        ("email", "ann@example.com"),
        ("crm_contact", "1"),
        ("shop_account", "10"),
    ] {
        assert!(
            traits_of(sink, kind, value).await.is_none(),
            "{kind}={value} came back"
        );
        let n: i64 = scalar(sink, &format!("select count(*) from tributary.identities where kind = '{kind}' and value = '{value}'")).await;
        assert_eq!(n, 0, "identity {kind}={value} came back");
    }
    let rows: i64 = scalar(sink, "select count(*) from tributary.contributions where row_key in ('{\"id\":1}', '{\"id\":10}', '{\"id\":100}') and table_name <> 'public.orders' or row_key = '{\"id\":100}'").await;
    assert_eq!(rows, 0, "the person's rows came back");
    let events: i64 = scalar(sink, "select count(*) from tributary.events where (table_name = 'public.contacts' and key = '{\"id\": 1}') or (table_name = 'public.accounts' and key = '{\"id\": 10}') or (table_name = 'public.orders' and key = '{\"id\": 100}')").await;
    assert_eq!(events, 0, "the person's events came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_person_never_comes_back() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "insert into contacts (id, email, first_name) values (1, 'ann@example.com', 'Ann'), (2, 'bob@example.com', 'Bob')").await;
    exec(&shop, "insert into accounts (id, email) values (10, 'Ann@Example.com'); insert into orders (id, account_id, status, total_cents) values (100, 10, 'paid', 500)").await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "fg"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    wait_until("ann and bob", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "ann@example.com")
            .await
            .is_some_and(|t| t.get("order_count") == Some(&json!(1)))
            && traits_of(&sink, "email", "bob@example.com").await.is_some()
    })
    .await;

    // The identity is given as a user would type it; it is normalised like the stream's.
    let out = run_cmd(
        &cfg,
        &["--json", "forget", "--identity", "email= ANN@example.com"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["suppressed"].as_array().unwrap().len(), 3, "{r}");
    ann_gone(&sink).await;
    assert!(
        traits_of(&sink, "email", "bob@example.com").await.is_some(),
        "bob is untouched"
    );

    // A late change of Ann's rows (then one of Bob's, to know the stream passed them).
    exec(
        &crm,
        "update contacts set first_name = 'Ann again', row_version = 2 where id = 1",
    )
    .await;
    exec(
        &shop,
        "insert into orders (id, account_id, status, total_cents) values (101, 10, 'paid', 1)",
    )
    .await;
    exec(
        &crm,
        "update contacts set first_name = 'Bobby', row_version = 2 where id = 2",
    )
    .await;
    wait_until("bob's later change", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "bob@example.com")
            .await
            .is_some_and(|t| t["first_name"] == "Bobby")
    })
    .await;
    // The order of account 10 arrives after Ann's account was forgotten: shop_account 10 is suppressed.
    ann_gone(&sink).await;
    assert_eq!(daemon.stop(), Some(0));

    // Replay, rebuild and a re-snapshot of both sources.
    for src in ["crm", "shop"] {
        let out = run_cmd(&cfg, &["replay", "--source", src, "--from-lsn", "0/0"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    ann_gone(&sink).await;
    assert_eq!(run_cmd(&cfg, &["rebuild"]).status.code(), Some(0));
    ann_gone(&sink).await;
    exec(&sink, "delete from tributary.checkpoints").await;
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    wait_until(
        "bob after the re-snapshot",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "email", "bob@example.com")
                .await
                .is_some_and(|t| t["first_name"] == "Bobby")
        },
    )
    .await;
    ann_gone(&sink).await;
    // And `tributary snapshot` of both sources while the daemon streams.
    for src in ["crm", "shop"] {
        let out = run_cmd(&cfg, &["--json", "snapshot", "--source", src]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(r[0]["rows"].as_u64().unwrap() >= 1, "{r}");
    }
    ann_gone(&sink).await;
    assert!(traits_of(&sink, "email", "bob@example.com").await.is_some());
    assert_eq!(daemon.stop(), Some(0));

    let out = run_cmd(&cfg, &["forget", "--identity", "no-equals-sign"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("KIND=VALUE"));
}

/// An address recycled to a new customer joins nobody to the old one (the
/// old customer's current row no longer carries it), so forgetting the new
/// customer erases exactly one person. Under the old grow-only rule the
/// address kept the two fused, and `forget` erased both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_after_an_address_was_recycled_erases_exactly_one_person() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "fr"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (1, 'old@example.com', 'Ann')",
    )
    .await;
    exec(
        &crm,
        "update contacts set email = 'ann@example.com', row_version = 2 where id = 1",
    )
    .await;
    exec(&shop, "insert into accounts (id, email) values (20, 'old@example.com'); insert into orders (id, account_id, status, total_cents) values (200, 20, 'paid', 700)").await;
    wait_until(
        "ann and the new owner of her old address",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "shop_account", "20")
                .await
                .is_some_and(|t| t.get("order_count") == Some(&json!(1)))
                && traits_of(&sink, "crm_contact", "1")
                    .await
                    .is_some_and(|t| t.get("email") == Some(&json!("ann@example.com")))
        },
    )
    .await;
    let new_owner = traits_of(&sink, "email", "old@example.com").await.unwrap();
    assert_eq!(
        new_owner.get("first_name"),
        None,
        "Ann's name is not the new customer's: {new_owner}"
    );

    let out = run_cmd(&cfg, &["--json", "forget", "--identity", "shop_account=20"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["suppressed"].as_array().unwrap().len(),
        2,
        "email and shop account only: {r}"
    );
    assert!(traits_of(&sink, "shop_account", "20").await.is_none());
    let ann = traits_of(&sink, "crm_contact", "1").await;
    assert_eq!(
        ann.and_then(|t| t.get("first_name").cloned()),
        Some(json!("Ann")),
        "forgetting the new customer erased Ann"
    );
    assert_eq!(daemon.stop(), Some(0));
}
