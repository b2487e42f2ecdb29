//! Sources that do ordinary but less common things: a partitioned table,
//! values a sum cannot hold.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

/// A partitioned `orders` table is mapped by its parent's name: its snapshot,
/// its streamed changes (including a row that moves to another partition) and
/// a restart all work, whether the daemon created the publication or found
/// one that published the partitions under their own names. Before, the
/// changes arrived under the partitions' names and were dropped, and every
/// restart failed on `alter publication … add table` for a table the
/// publication already covered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_streams_under_its_own_name_and_survives_restarts() {
    let pg = cluster();
    let shop = create_db(&pg, "shop").await;
    let sink = create_db(&pg, "profiles").await;
    exec(
        &shop,
        "create table orders (id bigint not null, account_id bigint, status text not null,
                              total_cents bigint not null, primary key (id)) partition by range (id);
         create table orders_low partition of orders for values from (minvalue) to (1000);
         create table orders_high partition of orders for values from (1000) to (maxvalue);
         insert into orders values (1, 7, 'paid', 100), (2000, 7, 'paid', 200), (3, 8, 'paid', 50);
         -- a publication made by hand, publishing the partitions under their own names
         create publication part_pub for table orders;",
    )
    .await;
    let cfg = write_config(&format!(
        r#"
[sink]
url = "{sink}"
batch_max_wait_ms = 20

[[source]]
name = "shop"
url = "{shop}"
slot = "part_slot"
publication = "part_pub"
  [[source.table]]
  name = "public.orders"
  identity = {{ shop_account = "account_id" }}
  [source.table.aggregates]
  order_count = {{ fn = "count" }}
  lifetime_value_cents = {{ fn = "sum", column = "total_cents" }}
"#
    ));
    let out = run_cmd(&cfg, &["check"]);
    assert!(
        text(&out).contains("publish_via_partition_root"),
        "check names what run will change: {}",
        text(&out)
    );
    let totals = |account: &'static str| {
        let sink = sink.clone();
        async move {
            traits_of(&sink, "shop_account", account)
                .await
                .map(|t| (t["order_count"].clone(), t["lifetime_value_cents"].clone()))
        }
    };
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 1).await;
    assert_eq!(totals("7").await, Some((json!(2), json!(300))));
    // Streamed: into each partition, and an update moving a row across them.
    exec(
        &shop,
        "insert into orders values (4, 7, 'paid', 1000), (5000, 8, 'paid', 5);
         update orders set id = 1500, total_cents = 60 where id = 3;
         delete from orders where id = 2000;",
    )
    .await;
    wait_until(
        "streamed changes applied",
        Duration::from_secs(30),
        || async {
            totals("7").await == Some((json!(2), json!(1100)))
                && totals("8").await == Some((json!(2), json!(65)))
        },
    )
    .await;
    assert_eq!(daemon.stop(), Some(0));

    // A restart finds the table in the publication and streams on.
    let daemon = Daemon::start(&cfg);
    exec(
        &shop,
        "insert into orders values (6, 8, 'paid', 35), (7000, 8, 'paid', 1)",
    )
    .await;
    wait_until(
        "streamed after a restart",
        Duration::from_secs(30),
        || async { totals("8").await == Some((json!(4), json!(101))) },
    )
    .await;
    let out = run_cmd(&cfg, &["check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        scalar::<i64>(&sink, "select count(*) from tributary.dead_letters").await,
        0
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// `numeric` and `float8` columns can hold NaN and ±Infinity, and pgoutput
/// sends them as such. A sum cannot hold them: each such row goes to
/// `dead_letters` and the sum keeps counting the others. Before, the first one
/// turned the profile's sum into nothing, and the next row started it again
/// from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_infinity_in_a_summed_column_never_reset_the_sum() {
    let pg = cluster();
    let shop = create_db(&pg, "shop").await;
    let sink = create_db(&pg, "profiles").await;
    exec(
        &shop,
        "create table orders (id bigint primary key, account_id bigint, total numeric, weight float8);
         insert into orders values (1, 7, 100.5, 1.5);",
    )
    .await;
    let cfg = write_config(&format!(
        r#"
[sink]
url = "{sink}"
batch_max_wait_ms = 20

[[source]]
name = "shop"
url = "{shop}"
slot = "nan_slot"
publication = "nan_pub"
  [[source.table]]
  name = "public.orders"
  identity = {{ shop_account = "account_id" }}
  [source.table.aggregates]
  total = {{ fn = "sum", column = "total" }}
  weight = {{ fn = "sum", column = "weight" }}
"#
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 1).await;
    exec(
        &shop,
        "insert into orders values (2, 7, 'NaN', 1), (3, 7, 'Infinity', 'NaN'), (4, 7, '-Infinity', '-Infinity'),
                                   (5, 7, 1, 'Infinity');
         insert into orders values (6, 7, 10, 2);",
    )
    .await;
    wait_until(
        "the last order applied",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "shop_account", "7")
                .await
                .is_some_and(|t| t["total"] == json!(110.5))
        },
    )
    .await;
    let t = traits_of(&sink, "shop_account", "7").await.unwrap();
    assert_eq!(
        (t["total"].clone(), t["weight"].clone()),
        (json!(110.5), json!(3.5)),
        "{t}"
    );
    assert_eq!(
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.dead_letters where error like '%is not a finite number%'"
        )
        .await,
        4
    );
    assert_eq!(daemon.stop(), Some(0));
}
