//! Schema changes on mapped tables while streaming: no restart, no wrong value.
//! An added column is picked up from the Relation message, a retyped column is
//! typed by its new type, and a mapped column that disappears is reported as a
//! dead letter (never read as NULL) while the rest of the stream applies.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

#[tokio::test]
async fn add_drop_rename_and_retype_columns_while_streaming() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "ddl"));
    let mut daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    exec(&crm, "insert into contacts (id, email, first_name, last_name, phone) values (1, 'a@x.com', 'Ann', 'Lee', '111')").await;
    exec(&shop, "insert into accounts (id, email) values (5, 'a@x.com'); insert into orders (id, account_id, status, total_cents) values (1, 5, 'paid', 100)").await;
    let ready = || async {
        traits_of(&sink, "email", "a@x.com")
            .await
            .is_some_and(|t| t.get("order_count") == Some(&json!(1)) && t["first_name"] == "Ann")
    };
    wait_until("initial rows", Duration::from_secs(30), ready).await;

    // ADD COLUMN: new rows carry it, mapped values still right.
    exec(&crm, "alter table contacts add column nickname text; update contacts set first_name = 'Annie', nickname = 'A', row_version = 2 where id = 1").await;
    wait_until(
        "update after ADD COLUMN",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "email", "a@x.com")
                .await
                .is_some_and(|t| t["first_name"] == "Annie")
        },
    )
    .await;

    // ALTER TYPE: total_cents becomes numeric(14,2); the sum stays an exact integer.
    exec(&shop, "alter table orders alter column total_cents type numeric(14,2); insert into orders (id, account_id, status, total_cents) values (2, 5, 'paid', 250.00)").await;
    let t = wait_until_traits(&sink, |t| t.get("order_count") == Some(&json!(2))).await;
    assert_eq!(t["lifetime_value_cents"], json!(350), "{t}");

    // DROP COLUMN of a mapped column: the row is a dead letter, the old value stays.
    exec(&crm, "alter table contacts drop column last_name; update contacts set first_name = 'Anne', row_version = 3 where id = 1").await;
    // RENAME of a mapped column: likewise.
    exec(&shop, "alter table accounts rename column phone to phone_number; update accounts set phone_number = '999' where id = 5").await;
    // ... and the rest of the stream goes on.
    exec(
        &shop,
        "insert into orders (id, account_id, status, total_cents) values (3, 5, 'shipped', 50)",
    )
    .await;
    let t = wait_until_traits(&sink, |t| t.get("order_count") == Some(&json!(3))).await;
    assert_eq!(t["lifetime_value_cents"], json!(400));
    assert_eq!(
        t["last_name"], "Lee",
        "never read as NULL: the value from before the drop stays"
    );
    assert_eq!(
        t["first_name"], "Annie",
        "the row that lost a mapped column is not half-applied"
    );
    assert_eq!(t["phone"], "111");
    wait_until("dead letters for the vanished columns", Duration::from_secs(30), || async {
        scalar::<i64>(&sink, "select count(*) from tributary.dead_letters where error like '%mapped column last_name is missing%'").await == 1
            && scalar::<i64>(&sink, "select count(*) from tributary.dead_letters where error like '%mapped column phone is missing%'").await == 1
    })
    .await;
    assert!(daemon.alive(), "no restart needed");
    assert!(
        !daemon.log_text().contains("reconnecting"),
        "schema changes must not interrupt the stream"
    );
    assert_eq!(daemon.stop(), Some(0));

    async fn wait_until_traits(
        sink: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(t) = traits_of(sink, "email", "a@x.com").await {
                if pred(&t) {
                    return t;
                }
                assert!(std::time::Instant::now() < deadline, "last traits {t}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
