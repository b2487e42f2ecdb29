//! The initial snapshot: rows that existed before the first `run` arrive, and
//! changes made while the snapshot is being read are not lost (each row is seen
//! exactly once, in the snapshot or in the stream after the slot's consistent point).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use sqlx::{Connection, PgConnection};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_brings_existing_rows_and_loses_no_concurrent_change() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "insert into contacts (id, email, first_name) select g, 'u' || g || '@x.com', 'F' || g from generate_series(1, 40000) g").await;
    exec(&shop, "insert into accounts (id, email) select g, 'u' || g || '@x.com' from generate_series(1, 2000) g").await;

    // Writers run before, during and after the snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (crm, stop) = (crm.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let mut conn = PgConnection::connect(&crm).await.unwrap();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = rng.random_range(1..=41000);
                let sql = match rng.random_range(0..10) {
                    0 => format!("delete from contacts where id = {id}"),
                    1..=2 => format!("insert into contacts (id, email, first_name) values ({id}, 'u{id}@x.com', 'I{n}') on conflict (id) do update set first_name = excluded.first_name, row_version = contacts.row_version + 1"),
                    _ => format!("update contacts set first_name = 'U{n}', row_version = row_version + 1 where id = {id}"),
                };
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "snap"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 100, "only {writes} concurrent writes");

    let source = || async {
        let mut c = PgConnection::connect(&crm).await.unwrap();
        sqlx::query_as::<_, (i64, String)>("select id, first_name from contacts")
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .map(|(i, f)| (i.to_string(), Some(f)))
            .collect::<BTreeMap<_, _>>()
    };
    let stored = || async {
        let mut c = PgConnection::connect(&sink).await.unwrap();
        sqlx::query_as::<_, (String, Option<String>)>(
            "select i.value, p.traits ->> 'first_name' from tributary.identities i join tributary.profiles p on p.profile_id = i.profile_id
              where i.kind = 'crm_contact' and p.merged_into is null",
        )
        .fetch_all(&mut c)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, f)| f.is_some())
        .collect::<BTreeMap<_, _>>()
    };
    let want = source().await;
    assert!(
        want.len() > 30_000,
        "{} rows left after {writes} writes",
        want.len()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = stored().await;
        if got == want {
            break;
        }
        if std::time::Instant::now() > deadline {
            let diff: Vec<_> = want
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(v))
                .take(10)
                .collect();
            let extra: Vec<_> = got
                .iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .take(10)
                .collect();
            panic!(
                "store differs from source: missing or wrong {diff:?}; extra {extra:?}\n{}",
                daemon.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snapshot_events: i64 = scalar(
        &sink,
        "select count(*) from tributary.events where op = 'snapshot' and source = 'crm'",
    )
    .await;
    assert!(
        snapshot_events >= 30_000,
        "snapshot rows are logged as events: {snapshot_events}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// A daemon killed in the middle of its initial snapshot resumes it: the
/// tables it had finished are not read again, the one it was reading and the
/// rest are read again (watermarked) while the stream runs, and every row,
/// including changes made while it was down, is in the store exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_midway_resumes_without_reading_finished_tables_again() {
    let pg = cluster();
    let (_, shop, sink) = two_sources(&pg).await;
    exec(&shop, "insert into accounts (id, email) select g, 'u' || g || '@x.com' from generate_series(1, 3000) g").await;
    exec(&shop, "insert into orders (id, account_id, status, total_cents) select g, 1 + g % 3000, 'paid', g from generate_series(1, 20000) g").await;
    let tables = r#"
  [[source.table]]
  name = "public.accounts"
  identity = { email = "email", shop_account = "id" }
  fields = { phone = "phone" }
  [[source.table]]
  name = "public.orders"
  identity = { shop_account = "account_id" }
  [source.table.aggregates]
  order_count = { fn = "count" }
  lifetime_value_cents = { fn = "sum", column = "total_cents", only_when = { status = ["paid", "shipped"] } }
"#;
    let cfg = write_config(
        &source_config(&sink, ("shop", &shop, "resume"), tables).replace(
            "batch_max_wait_ms = 20",
            "batch_max_wait_ms = 20\nbatch_max_events = 500",
        ),
    );
    // Accounts are six writes, orders forty: the twelfth write is an
    // orders batch, after the accounts were recorded as done.
    let first = Daemon::start_with_env(&cfg, &[("TRIBUTARY_TEST_CRASH", "derived:12")]);
    let (code, log) = exits_by_itself(first, Duration::from_secs(60)).await;
    assert_ne!(code, Some(0), "the crash point was not reached:\n{log}");
    let done: Vec<String> = scalar(
        &sink,
        "select snapshot_tables_done from tributary.checkpoints where source = 'shop'",
    )
    .await;
    assert_eq!(done, ["public.accounts"], "{log}");
    let orders_before: i64 = scalar(
        &sink,
        "select count(*) from tributary.contributions where table_name = 'public.orders'",
    )
    .await;
    assert!(
        orders_before < 20_000,
        "the orders were all written before the crash ({orders_before})"
    );

    // Changes while it is down, to both tables: the stream brings them.
    exec(&shop, "delete from accounts where id = 7").await;
    exec(&shop, "update accounts set phone = '+100' where id = 8").await;
    exec(
        &shop,
        "update orders set status = 'cancelled' where id <= 10",
    )
    .await;
    exec(
        &shop,
        "insert into orders (id, account_id, status, total_cents) values (20001, 9, 'paid', 5)",
    )
    .await;

    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 1).await;
    wait_until("the orders read again", Duration::from_secs(90), || async {
        scalar::<i64>(&sink, "select count(*) from tributary.table_snapshots_pending").await == 0
            && scalar::<i64>(&sink, "select count(*) from tributary.contributions where table_name = 'public.orders' and not deleted").await == 20_001
            && scalar::<i64>(&sink, "select count(*) from tributary.contributions where table_name = 'public.accounts' and not deleted").await == 2_999
    })
    .await;

    // The finished table was read once: one snapshot event per row.
    let account_reads: i64 = scalar(
        &sink,
        "select count(*) from tributary.events where table_name = 'public.accounts' and op = 'snapshot'",
    )
    .await;
    assert_eq!(account_reads, 3_000, "{}", daemon.log_text());
    // Every order counted once, the changes made while it was down included.
    let count: i64 = scalar(
        &sink,
        "select coalesce(sum((traits ->> 'order_count')::bigint), 0)::bigint
           from tributary.profiles where merged_into is null",
    )
    .await;
    let value: i64 = scalar(
        &sink,
        "select coalesce(sum((traits ->> 'lifetime_value_cents')::bigint), 0)::bigint
           from tributary.profiles where merged_into is null",
    )
    .await;
    let want_value: i64 = scalar(
        &shop,
        "select sum(total_cents)::bigint from orders where status in ('paid', 'shipped')",
    )
    .await;
    assert_eq!(
        (count, value),
        (20_001, want_value),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        traits_of(&sink, "shop_account", "8")
            .await
            .and_then(|t| t.get("phone").cloned()),
        Some(serde_json::json!("+100"))
    );
    assert_eq!(daemon.stop(), Some(0));
}
