//! End to end: two source databases stream into one profile store.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

struct Setup {
    _pg: tributary::cluster::Cluster,
    crm: String,
    shop: String,
    sink: String,
}

async fn setup() -> Setup {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    Setup {
        _pg: pg,
        crm,
        shop,
        sink,
    }
}

async fn wait_traits(
    sink: &str,
    kind: &str,
    value: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = traits_of(sink, kind, value).await {
            if pred(&t) {
                return t;
            }
            last = Some(t);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; last traits of {kind}={value}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_sources_stream_into_one_profile_per_person() {
    let s = setup().await;
    // Rows that exist before the first run: the snapshot must bring them.
    exec(&s.crm, "insert into contacts (id, email, first_name, last_name, phone, opted_in) values (1, 'Ann@Example.com', 'Ann', 'Lee', '111', true)").await;
    exec(
        &s.shop,
        "insert into accounts (id, email, phone) values (10, ' ann@example.com', '222')",
    )
    .await;
    let cfg = write_config(&pipeline_config(&s.crm, &s.shop, &s.sink, "t"));
    let daemon = Daemon::start(&cfg);

    // Snapshot: one person from two sources, linked by the normalised email.
    let t = wait_traits(
        &s.sink,
        "shop_account",
        "10",
        "snapshot of both sources",
        |t| t.get("first_name").is_some(),
    )
    .await;
    assert_eq!(t["first_name"], "Ann");
    assert_eq!(t["email"], "Ann@Example.com");
    assert_eq!(
        traits_of(&s.sink, "crm_contact", "1").await,
        Some(t.clone()),
        "crm contact and shop account are one profile"
    );

    // Live: orders aggregate onto the same person.
    exec(&s.shop, "insert into orders (id, account_id, status, total_cents) values (100, 10, 'paid', 1500), (101, 10, 'cancelled', 999), (102, 10, 'shipped', 500)").await;
    let t = wait_traits(
        &s.sink,
        "email",
        "ann@example.com",
        "orders aggregated",
        |t| t.get("order_count") == Some(&json!(3)),
    )
    .await;
    assert_eq!(t["lifetime_value_cents"], 2000);

    // Conflict: the CRM's phone is written with a later modified_at: freshest wins.
    exec(&s.crm, "update contacts set phone = '333', row_version = 2, modified_at = now() + interval '1 hour' where id = 1").await;
    wait_traits(
        &s.sink,
        "email",
        "ann@example.com",
        "fresher crm phone",
        |t| t["phone"] == "333",
    )
    .await;

    // A later row links two existing profiles: Bob (crm) and an order of account 20.
    exec(
        &s.crm,
        "insert into contacts (id, email, first_name) values (2, 'bob@example.com', 'Bob')",
    )
    .await;
    exec(
        &s.shop,
        "insert into orders (id, account_id, status, total_cents) values (200, 20, 'paid', 700)",
    )
    .await;
    wait_traits(&s.sink, "shop_account", "20", "bob's order", |t| {
        t.get("order_count") == Some(&json!(1))
    })
    .await;
    // The contact comes from the other source (its own loop): wait for it too.
    wait_traits(&s.sink, "email", "bob@example.com", "bob's contact", |t| {
        t["first_name"] == "Bob"
    })
    .await;
    assert!(
        traits_of(&s.sink, "email", "bob@example.com")
            .await
            .unwrap()
            .get("order_count")
            .is_none(),
        "not linked yet"
    );
    exec(
        &s.shop,
        "insert into accounts (id, email) values (20, 'BOB@example.com')",
    )
    .await;
    let bob = wait_traits(
        &s.sink,
        "email",
        "bob@example.com",
        "merge of bob's profiles",
        |t| t.get("order_count") == Some(&json!(1)),
    )
    .await;
    assert_eq!(bob["first_name"], "Bob");
    assert_eq!(bob["lifetime_value_cents"], 700);
    let merged: i64 = scalar(
        &s.sink,
        "select count(*) from tributary.profiles where merged_into is not null",
    )
    .await;
    assert_eq!(merged, 1, "one profile merged into the other");
    let survivor_is_smaller: bool = scalar(&s.sink, "select bool_and(merged_into < profile_id) from tributary.profiles where merged_into is not null").await;
    assert!(survivor_is_smaller);

    // Unchanged TOAST: a large, incompressible bio survives an update of another column.
    exec(&s.crm, "update contacts set bio = (select string_agg(md5(g::text), '') from generate_series(1, 4000) g), row_version = 3 where id = 1").await;
    wait_traits(&s.sink, "crm_contact", "1", "large bio", |t| {
        t.get("bio")
            .and_then(|b| b.as_str())
            .is_some_and(|b| b.len() == 128_000)
    })
    .await;
    exec(
        &s.crm,
        "update contacts set first_name = 'Annie', row_version = 4 where id = 1",
    )
    .await;
    let t = wait_traits(&s.sink, "crm_contact", "1", "rename", |t| {
        t["first_name"] == "Annie"
    })
    .await;
    assert_eq!(
        t["bio"].as_str().map(str::len),
        Some(128_000),
        "the unchanged TOAST bio must not be blanked"
    );
    let toasted: i64 = scalar(&s.sink, "select count(*) from tributary.events where table_name = 'public.contacts' and 'bio' = any(unchanged)").await;
    assert!(
        toasted >= 1,
        "the event log records the unchanged TOAST column"
    );

    // Deletes withdraw contributions: the next-best value takes over.
    exec(&s.shop, "delete from orders where id = 100").await;
    let t = wait_traits(&s.sink, "email", "ann@example.com", "order delete", |t| {
        t.get("order_count") == Some(&json!(2))
    })
    .await;
    assert_eq!(t["lifetime_value_cents"], 500);
    exec(&s.crm, "delete from contacts where id = 1").await;
    let t = wait_traits(&s.sink, "shop_account", "10", "contact delete", |t| {
        t.get("first_name").is_none()
    })
    .await;
    assert_eq!(
        t["phone"], "222",
        "the shop's phone takes over when the crm row is gone"
    );

    // TRUNCATE withdraws every row of the table: no orders, no order aggregates.
    exec(&s.shop, "truncate orders").await;
    let t = wait_traits(&s.sink, "email", "bob@example.com", "truncate", |t| {
        t.get("order_count").is_none()
    })
    .await;
    assert!(
        t.get("lifetime_value_cents").is_none() && t.get("last_order_at").is_none(),
        "{t}"
    );
    assert!(traits_of(&s.sink, "shop_account", "10")
        .await
        .unwrap()
        .get("order_count")
        .is_none());

    // Provenance and checkpoints are readable with SQL.
    let src: String = scalar(&s.sink, "select pf.source from tributary.profile_fields pf join tributary.identities i on i.profile_id = pf.profile_id where i.kind = 'shop_account' and i.value = '10' and pf.field = 'phone'").await;
    assert_eq!(src, "shop");
    let cps: i64 = scalar(
        &s.sink,
        "select count(*) from tributary.checkpoints where snapshot_completed_at is not null",
    )
    .await;
    assert_eq!(cps, 2);

    assert_eq!(daemon.stop(), Some(0), "SIGTERM stops cleanly with exit 0");
    let status = run_cmd(&cfg, &["status", "--json"]);
    let doc: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|_| panic!("{}", text(&status)));
    assert_eq!(doc["sources"][0]["name"], "crm");
    assert_eq!(doc["sources"][0]["slot_exists"], true);
    assert_eq!(doc["profiles"], 2);
}
