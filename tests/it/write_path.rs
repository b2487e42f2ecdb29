//! The one write path: what a batch must do when it holds more than one
//! change of a row or table (a TRUNCATE after inserts of the same batch), and
//! a row whose identifier goes away.

use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::harness::*;

/// Waits until the profile of shop account `account` counts `orders` orders.
async fn wait_for_orders(sink: &str, account: &str, orders: i64, what: &str) {
    wait_until(what, Duration::from_secs(30), || async {
        traits_of(sink, "shop_account", account)
            .await
            .is_some_and(|t| t.get("order_count") == Some(&json!(orders)))
    })
    .await;
}

/// A TRUNCATE removes the rows that the same batch inserted before it: in one
/// source transaction, and in separate transactions that share a batch.
#[tokio::test]
async fn a_truncate_removes_rows_inserted_earlier_in_the_same_batch() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    // A long linger so that separate transactions land in one batch.
    let cfg = write_config(
        &pipeline_config(&crm, &shop, &sink, "tr")
            .replace("batch_max_wait_ms = 20", "batch_max_wait_ms = 1500"),
    );
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(
        &shop,
        "insert into accounts (id, email) values (7, 'seven@x.com'), (8, 'eight@x.com')",
    )
    .await;

    // One transaction: inserts, then the truncate, then one insert after it.
    exec(
        &shop,
        "begin;
         insert into orders (id, account_id, status, total_cents) values (1, 7, 'paid', 100), (2, 7, 'paid', 200);
         truncate orders;
         insert into orders (id, account_id, status, total_cents) values (3, 7, 'paid', 40);
         commit;",
    )
    .await;
    wait_for_orders(&sink, "7", 1, "the first truncate applied").await;
    let t = traits_of(&sink, "shop_account", "7").await.unwrap();
    assert_eq!(t["lifetime_value_cents"], json!(40), "{t}");

    // Separate transactions, committed within one linger: a batch.
    exec(&shop, "insert into orders (id, account_id, status, total_cents) values (4, 8, 'paid', 1000), (5, 8, 'paid', 2000)").await;
    exec(&shop, "truncate orders").await;
    exec(
        &shop,
        "insert into orders (id, account_id, status, total_cents) values (6, 8, 'paid', 5)",
    )
    .await;
    wait_for_orders(&sink, "8", 1, "the second truncate applied").await;
    let t8 = traits_of(&sink, "shop_account", "8").await.unwrap();
    assert_eq!(t8["lifetime_value_cents"], json!(5), "{t8}");
    let t7 = traits_of(&sink, "shop_account", "7").await.unwrap();
    assert!(
        t7.get("order_count").is_none(),
        "the truncate emptied account 7's orders too: {t7}"
    );
    let live: i64 = scalar(
        &sink,
        "select count(*) from tributary.contributions where table_name = 'public.orders' and not deleted",
    )
    .await;
    assert_eq!(
        live, 1,
        "only the order inserted after the truncate is live"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// Where a source transaction landed: its xid (32 bits, as logged) and the
/// WAL positions and wall-clock times around it.
struct Committed {
    xid: i64,
    lsn: (String, String),
    time: (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>),
}

async fn commit_on(url: &str, sql: &str) -> Committed {
    let mut src = PgConnection::connect(url).await.unwrap();
    let at = "select pg_current_wal_insert_lsn()::text, clock_timestamp()";
    let (lsn_before, time_before): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(at).fetch_one(&mut src).await.unwrap();
    let mut tx = src.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await
        .unwrap();
    let xid: i64 = sqlx::query_scalar("select txid_current() % 4294967296")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (lsn_after, time_after) = sqlx::query_as(at).fetch_one(&mut src).await.unwrap();
    Committed {
        xid,
        lsn: (lsn_before, lsn_after),
        time: (time_before, time_after),
    }
}

/// `(source, table, op, seq, key, row->>'email', row->>'status', unchanged is
/// null, LSNs inside the transaction's WAL, commit time)` of each logged change.
type Logged = (
    String,
    String,
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    bool,
    bool,
    chrono::DateTime<chrono::Utc>,
);

/// The logged changes of `t`, once there are `n` of them, after checking
/// what every one of them must hold.
async fn logged(sink: &str, t: &Committed, n: usize) -> Vec<Logged> {
    let query = format!(
        "select source, table_name, op, seq, key::text, row->>'email', row->>'status', unchanged is null,
                lsn >= '{}'::pg_lsn and lsn <= commit_lsn and commit_lsn <= '{}'::pg_lsn,
                commit_time
           from tributary.events where xid = {} order by seq",
        t.lsn.0, t.lsn.1, t.xid
    );
    let mut k = PgConnection::connect(sink).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut rows: Vec<Logged> = Vec::new();
    while rows.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} changes logged",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        rows = sqlx::query_as(sqlx::AssertSqlSafe(query.clone()))
            .fetch_all(&mut k)
            .await
            .unwrap();
    }
    assert_eq!(rows.len(), n, "no change logged twice");
    for (i, l) in rows.iter().enumerate() {
        assert_eq!(l.0, "shop");
        assert_eq!(
            usize::try_from(l.3).ok(),
            Some(i),
            "positions in the transaction"
        );
        assert!(l.7, "no unchanged TOAST column: {l:?}");
        assert!(l.8, "LSNs inside the transaction's WAL: {l:?}");
        assert!(
            l.9 >= t.time.0 && l.9 <= t.time.1,
            "commit time {} outside {}..{}",
            l.9,
            t.time.0,
            t.time.1
        );
    }
    rows
}

/// The event log holds each change as the source sent it: source, table,
/// operation, key, image, transaction id, commit position and time, position
/// in the transaction. A small batch is logged by one insert, a large one by
/// binary `COPY` (encoded in the daemon, so an encoding slip in any column
/// would show here).
#[tokio::test]
async fn the_event_log_holds_every_change_as_the_source_sent_it() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "ev"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    let small = commit_on(
        &shop,
        "insert into accounts (id, email, phone) values (21, 'a@x.com', '+1 555 0100');
         update accounts set email = 'b@x.com' where id = 21;
         delete from accounts where id = 21;",
    )
    .await;
    let rows = logged(&sink, &small, 3).await;
    let got: Vec<(&str, &str, &str, Option<&str>)> = rows
        .iter()
        .map(|l| (l.1.as_str(), l.2.as_str(), l.4.as_str(), l.5.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (
                "public.accounts",
                "insert",
                r#"{"id": 21}"#,
                Some("a@x.com")
            ),
            (
                "public.accounts",
                "update",
                r#"{"id": 21}"#,
                Some("b@x.com")
            ),
            ("public.accounts", "delete", r#"{"id": 21}"#, None),
        ]
    );

    let large = commit_on(
        &shop,
        "insert into orders (id, account_id, status, total_cents)
           select g, 22, 'paid', g from generate_series(1, 1500) g",
    )
    .await;
    let rows = logged(&sink, &large, 1500).await;
    for (i, l) in rows.iter().enumerate() {
        assert_eq!(
            (l.1.as_str(), l.2.as_str(), l.4.as_str(), l.6.as_deref()),
            (
                "public.orders",
                "insert",
                format!(r#"{{"id": {}}}"#, i + 1).as_str(),
                Some("paid")
            )
        );
    }
    assert_eq!(daemon.stop(), Some(0));
}

/// A row whose identifier becomes NULL (or unparsable) leaves the profile it
/// belonged to: it no longer counts in its aggregates or fields, and the image
/// goes to dead_letters. Given an identifier again, it comes back.
#[tokio::test]
async fn a_row_whose_identifier_becomes_null_withdraws_its_contribution() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "nu"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(
        &shop,
        "insert into accounts (id, email) values (7, 'seven@x.com')",
    )
    .await;
    exec(&shop, "insert into orders (id, account_id, status, total_cents) values (1, 7, 'paid', 100), (2, 7, 'paid', 200)").await;
    exec(&crm, "insert into contacts (id, email, first_name, row_version) values (1, 'seven@x.com', 'Sev', 1)").await;
    wait_until(
        "two orders and the contact",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "shop_account", "7")
                .await
                .is_some_and(|t| {
                    t.get("order_count") == Some(&json!(2))
                        && t.get("first_name") == Some(&json!("Sev"))
                })
        },
    )
    .await;

    exec(&shop, "update orders set account_id = null where id = 2").await;
    wait_for_orders(&sink, "7", 1, "the order left the profile").await;
    let t = traits_of(&sink, "shop_account", "7").await.unwrap();
    assert_eq!(t["lifetime_value_cents"], json!(100), "{t}");
    let dead: i64 = scalar(
        &sink,
        "select count(*) from tributary.dead_letters where table_name = 'public.orders' and error like '%no identifier%'",
    )
    .await;
    assert_eq!(dead, 1, "the NULL-identifier image is a dead letter");

    // An unparsable identifier: the contact's fields leave the profile.
    exec(
        &crm,
        "update contacts set email = 'not-an-email', row_version = 2 where id = 1",
    )
    .await;
    wait_until(
        "the contact's fields left the profile",
        Duration::from_secs(30),
        || async {
            traits_of(&sink, "shop_account", "7")
                .await
                .is_some_and(|t| t.get("first_name").is_none())
        },
    )
    .await;

    // Given an identifier again, the order counts again.
    exec(&shop, "update orders set account_id = 7 where id = 2").await;
    wait_for_orders(&sink, "7", 2, "the order is back").await;
    let t = traits_of(&sink, "shop_account", "7").await.unwrap();
    assert_eq!(t["lifetime_value_cents"], json!(300), "{t}");
    assert_eq!(daemon.stop(), Some(0));
}

/// The digest the daemon computes for a contribution equals the SQL form the
/// store used to compute (and the source-side digest is built to match):
/// `hashtextextended` itself for strings of every tail length, and whole
/// images with every kind of JSON value.
#[tokio::test]
async fn digests_computed_in_the_daemon_equal_the_sql_form() {
    use sqlx::Connection;
    use tributary::store::digest::{digest_of_object, hash_bytes_extended};
    let pg = cluster();
    let db = create_db(&pg, "digests").await;
    let mut conn = sqlx::PgConnection::connect(&db).await.unwrap();
    let mut texts: Vec<String> = (0..40)
        .map(|n| "abcdefghijklmnopqrstuvwxyz0123456789ABCDEF"[..n].to_owned())
        .collect();
    texts.extend(["é", "name=Ünïcödé 🎉", "x\u{1}y", "email=a@x.com"].map(String::from));
    for t in &texts {
        let sql: i64 = sqlx::query_scalar("select hashtextextended($1, 0)")
            .bind(t)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        #[allow(clippy::cast_possible_wrap)]
        let ours = hash_bytes_extended(t.as_bytes(), 0) as i64;
        assert_eq!(ours, sql, "hashtextextended({t:?})");
    }
    let images = [
        r#"{"email": "a@x.com", "id": 1, "first_name": null}"#,
        r#"{"n": 1.50, "m": -0.0, "big": 12345678901234567890, "neg": -42, "f": 0.1}"#,
        r#"{"e1": 1e3, "e2": 1.5e-7, "e3": 2E+2}"#,
        r#"{"b": true, "c": false, "s": "quote \" back \\ tab \t nl \n ctl \u0001 ü"}"#,
        r#"{"j": {"zz": [1, "x", null, {"b": 2, "a": 1}], "a": {}}, "arr": [], "t": "2026-11-30T10:00:00.123456Z"}"#,
        r#"{}"#,
        r#"{"only": null}"#,
    ];
    for text in images {
        let image: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).unwrap();
        let sql: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select coalesce({}, 0)",
            tributary::source::read::STORE_DIGEST.replace("$img", "$1")
        )))
        .bind(serde_json::Value::Object(image.clone()).to_string())
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(digest_of_object(&image), sql, "digest of {text}");
    }
}

/// The merge state the daemon keeps in memory (`src/state/`) is a cache of the
/// store bounded by `sink.memory_budget_mb`. A workload whose state is several
/// times a 1 MiB budget (merges, identifier changes, deletes and re-inserts,
/// out-of-order versions) ends with the same store, profile for profile and
/// provenance for provenance, as a daemon that keeps nothing in memory
/// (`memory_budget_mb = 0`) and one whose state fits (256 MiB); the small
/// budget was really exceeded (its entries were dropped) and is respected
/// after every commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_memory_budget_is_honoured_and_the_store_stays_exact() {
    use crate::faults::{caught_up, Workload};
    let pg = cluster();
    let (crm, shop, fits) = two_sources(&pg).await;
    let none = create_db(&pg, "profiles_none").await;
    let small = create_db(&pg, "profiles_small").await;
    // Rows for the initial snapshot, outside the workload's ids: the state
    // is then several MiB before the workload starts.
    exec(&crm, "insert into contacts (id, email, first_name) select g, 'pre' || g || '@x.com', 'Pre' || g from generate_series(10001, 14000) g").await;
    exec(&shop, "insert into accounts (id, email) select g, 'pre' || g || '@x.com' from generate_series(10001, 14000) g").await;
    let (addr, fits_addr) = (free_addr(), free_addr());
    let budget = |sink: &str, tag: &str, mb: Option<u32>, metrics: Option<&str>| {
        let mut cfg = pipeline_config(&crm, &shop, sink, tag);
        if let Some(mb) = mb {
            cfg = cfg.replace(
                "batch_max_wait_ms = 20",
                &format!("batch_max_wait_ms = 20\nmemory_budget_mb = {mb}"),
            );
        }
        if let Some(addr) = metrics {
            cfg.push_str(&format!("\n[metrics]\nlisten = \"{addr}\"\n"));
        }
        write_config(&cfg)
    };
    let cfgs = [
        budget(&fits, "fits", Some(256), Some(&fits_addr)),
        budget(&none, "none", Some(0), None),
        budget(&small, "small", Some(1), Some(&addr)),
    ];
    let daemons: Vec<Daemon> = cfgs.iter().map(|c| Daemon::start(c)).collect();
    for sink in [&fits, &none, &small] {
        wait_snapshots(sink, 2).await;
    }
    // Changes without merges, where the cache serves what a batch touches:
    // new contacts, then field updates of their profiles, accounts that join
    // them (by e-mail), and orders on those accounts.
    let mut w = Workload::default();
    let mut logged = 0;
    for chunk in 0..4 {
        let (lo, hi) = (20001 + chunk * 250, 20250 + chunk * 250);
        let steps = [
            (&crm, format!("insert into contacts (id, email, first_name) select g, 'late' || g || '@x.com', 'Late' from generate_series({lo}, {hi}) g")),
            (&crm, format!("update contacts set first_name = 'Up' || id, row_version = row_version + 1, modified_at = now() where id between {lo} and {hi}")),
            (&shop, format!("insert into accounts (id, email, phone) select g, 'late' || g || '@x.com', '555' from generate_series({lo}, {hi}) g")),
            (&shop, format!("insert into orders (id, account_id, status, total_cents) select 500000 + g, g, 'paid', 5 from generate_series({lo}, {hi}) g")),
        ];
        // Each step in batches of its own: applied everywhere before the next.
        for (db, sql) in steps {
            exec(db, &sql).await;
            logged += 250;
            for sink in [&fits, &none, &small] {
                wait_until("the step was applied", Duration::from_secs(60), || async {
                    scalar::<i64>(
                        sink,
                        "select count(*) from tributary.events where op <> 'snapshot'",
                    )
                    .await
                        == logged
                })
                .await;
            }
        }
        *w.changes.entry("crm").or_default() += 500;
        *w.changes.entry("shop").or_default() += 500;
    }
    // A merge whose losing profile has a row the merge does not touch (order
    // 520002), then a change of the surviving profile's fields: its traits
    // must still count that row. The account that moves to Ann's address
    // leaves contact 20002 (the only one with a last name) joined to nobody
    // in the merged profile: it splits off with its own profile.
    for (db, sql) in [
        (&crm, "update contacts set last_name = 'Only', row_version = row_version + 1, modified_at = now() where id = 20002"),
        (&shop, "update accounts set email = 'late20001@x.com' where id = 20002"),
        (&crm, "update contacts set first_name = 'After', row_version = row_version + 1, modified_at = now() where id = 20001"),
    ] {
        exec(db, sql).await;
        logged += 1;
        for sink in [&fits, &none, &small] {
            wait_until("the step was applied", Duration::from_secs(60), || async {
                scalar::<i64>(sink, "select count(*) from tributary.events where op <> 'snapshot'").await == logged
            })
            .await;
        }
    }
    *w.changes.entry("crm").or_default() += 2;
    *w.changes.entry("shop").or_default() += 1;
    let merged = traits_of(&fits, "crm_contact", "20001")
        .await
        .unwrap_or_default();
    assert_eq!(merged.get("order_count"), Some(&json!(2)), "{merged}");
    assert_eq!(merged.get("last_name"), None, "{merged}");
    let split = traits_of(&fits, "crm_contact", "20002")
        .await
        .unwrap_or_default();
    assert_eq!(split.get("last_name"), Some(&json!("Only")), "{split}");
    // Then a random workload with merges, identifier changes and deletes.
    w.run(&crm, &shop, 3000, 21, |_| {}).await;
    for sink in [&fits, &none, &small] {
        wait_until("the store caught up", Duration::from_secs(120), || async {
            caught_up(&shop, sink, &w).await
        })
        .await;
    }
    let fits_metrics = scrape(&fits_addr).await;
    assert!(
        fits_metrics.contains("tributary_merge_cache_rows_total{result=\"hit\"}")
            && !fits_metrics.contains("tributary_merge_cache_rows_total{result=\"hit\"} 0\n"),
        "the default budget served rows from memory:\n{fits_metrics}"
    );
    let metrics = scrape(&addr).await;
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        sample("tributary_merge_cache_evictions_total") > 0.0,
        "the workload never exceeded the 1 MiB budget:\n{metrics}"
    );
    assert!(
        sample("tributary_merge_cache_bytes") <= 1024.0 * 1024.0,
        "the cache holds more than its budget after a commit:\n{metrics}"
    );
    let expected = profiles_and_provenance(&none).await;
    assert!(expected.0.len() > 4000, "the workload made profiles");
    assert_eq!(
        profiles_and_provenance(&fits).await,
        expected,
        "a cache that holds the whole state"
    );
    assert_eq!(
        profiles_and_provenance(&small).await,
        expected,
        "a cache bounded by 1 MiB"
    );
    for d in daemons {
        assert_eq!(d.stop(), Some(0));
    }
}

/// An update takes its identifiers' owners from the row it updates (a live
/// row's identifiers all belong to its profile) instead of reading them from
/// the store. With merges, identifier changes and deletes in the workload,
/// the store equals one built by a daemon that reads every owner (with
/// `merge.max_identities` set, which turns the shortcut off), and the
/// shortcut was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_carried_by_loaded_rows_equal_owners_read_from_the_store() {
    use crate::faults::{caught_up, Workload};
    let pg = cluster();
    let (crm, shop, carried) = two_sources(&pg).await;
    let read = create_db(&pg, "profiles_read").await;
    let addr = free_addr();
    let mut cfg = pipeline_config(&crm, &shop, &carried, "carried");
    cfg.push_str(&format!("\n[metrics]\nlisten = \"{addr}\"\n"));
    let carried_cfg = write_config(&cfg);
    let read_cfg = write_config(
        &(pipeline_config(&crm, &shop, &read, "read") + "\n[merge]\nmax_identities = 1000000\n"),
    );
    let daemons = [Daemon::start(&carried_cfg), Daemon::start(&read_cfg)];
    for sink in [&carried, &read] {
        wait_snapshots(sink, 2).await;
    }
    let mut w = Workload::default();
    w.run(&crm, &shop, 3000, 31, |_| {}).await;
    for sink in [&carried, &read] {
        wait_until("the store caught up", Duration::from_secs(120), || async {
            caught_up(&shop, sink, &w).await
        })
        .await;
    }
    let metrics = scrape(&addr).await;
    let carried_owners: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("tributary_merge_cache_identifiers_total{result=\"carried\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        carried_owners > 0.0,
        "no owner was taken from a loaded row:\n{metrics}"
    );
    let expected = profiles_and_provenance(&read).await;
    assert!(expected.0.len() > 100, "the workload made profiles");
    assert_eq!(
        profiles_and_provenance(&carried).await,
        expected,
        "owners taken from loaded rows"
    );
    for d in daemons {
        assert_eq!(d.stop(), Some(0));
    }
}

/// Batches of a busy source are derived while the one before commits
/// (`store::pipeline`): with small batches and a random workload over both
/// sources (merges, identifier changes, deletes, orders moving between
/// accounts), writes really overlap, every aggregate equals SQL over the
/// sources, every change is logged once, and reconciliation finds no drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_derived_while_the_one_before_commits_leave_the_store_exact() {
    use crate::faults::{caught_up, Workload};
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let addr = free_addr();
    let mut cfg = pipeline_config(&crm, &shop, &sink, "overlap").replace(
        "batch_max_wait_ms = 20",
        "batch_max_wait_ms = 1\nbatch_max_events = 25",
    );
    cfg.push_str(&format!("\n[metrics]\nlisten = \"{addr}\"\n"));
    let cfg = write_config(&cfg);
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 4000, 7, |_| {}).await;
    wait_until("the store caught up", Duration::from_secs(120), || async {
        caught_up(&shop, &sink, &w).await
    })
    .await;
    let metrics = scrape(&addr).await;
    let writes = |how: &str| -> f64 {
        let name = format!("tributary_sink_writes_total{{plan=\"{how}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        writes("overlapped") > 0.0,
        "no batch was derived while the one before committed:\n{metrics}"
    );
    let out = run_cmd(&cfg, &["--json", "reconcile", "--wait-secs", "60"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (out.status.code(), report["drift_count"].clone()),
        (Some(0), json!(0)),
        "{report}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// A batch derived while the one before it is uncommitted must not read
/// that one's rows from the store as they were: here the first write moves
/// a profile's latest order to another account and the second deletes the
/// profile's next latest one, so the second rescans the profile's
/// `last_order_at` inputs, which must not include the moved order (still
/// under the old account in the store until the first write commits). Every write is held
/// 400 ms before its commit, so the second is planned meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_derived_beside_an_uncommitted_one_sees_its_changes() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&shop, "insert into accounts (id, email) values (1, 'one@x.com'), (2, 'two@x.com');
                 insert into orders (id, account_id, status, total_cents, created_at) values
                   (10, 1, 'paid', 50, '2025-12-01T00:00:00Z'), (11, 1, 'paid', 100, '2026-01-01T00:00:00Z'), (12, 1, 'paid', 200, '2026-02-01T00:00:00Z')").await;
    let cfg = pipeline_config(&crm, &shop, &sink, "beside").replace(
        "batch_max_wait_ms = 20",
        "batch_max_wait_ms = 1\nbatch_max_events = 1",
    );
    let cfg = write_config(&cfg);
    let daemon = Daemon::start_with_env(&cfg, &[("TRIBUTARY_TEST_PAUSE", "before_commit:400")]);
    wait_snapshots(&sink, 2).await;
    wait_for_orders(&sink, "1", 3, "the snapshot").await;
    exec(
        &shop,
        "update orders set account_id = 2, updated_at = now() where id = 12",
    )
    .await;
    exec(&shop, "delete from orders where id = 11").await;
    wait_for_orders(&sink, "2", 1, "the moved order").await;
    wait_for_orders(&sink, "1", 1, "the delete").await;
    let one = traits_of(&sink, "shop_account", "1").await.unwrap();
    assert!(
        one.get("last_order_at")
            .and_then(|v| v.as_str())
            .is_some_and(|t| t.starts_with("2025-12-01")),
        "account 1 has only its first order left: {one}"
    );
    let two = traits_of(&sink, "shop_account", "2").await.unwrap();
    assert!(
        two.get("last_order_at")
            .and_then(|v| v.as_str())
            .is_some_and(|t| t.starts_with("2026-02-01")),
        "the moved order is account 2's latest: {two}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// Profiles follow the sources' current rows: a store that streamed a random
/// workload (merges, identifier changes and removals, deletes, re-inserts,
/// orders moving between accounts) and a store snapshotted afresh from the
/// final rows hold the same partition of identifiers into profiles, with the
/// same aggregates. Under the grow-only rule the streamed store kept every
/// link it had ever seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_store_and_a_fresh_snapshot_hold_the_same_partition() {
    use crate::faults::{caught_up, Workload};
    let pg = cluster();
    let (crm, shop, streamed) = two_sources(&pg).await;
    let fresh = create_db(&pg, "profiles_fresh").await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &streamed, "st"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&streamed, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 3000, 41, |_| {}).await;
    wait_until("the store caught up", Duration::from_secs(120), || async {
        caught_up(&shop, &streamed, &w).await
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));

    let fresh_cfg = write_config(&pipeline_config(&crm, &shop, &fresh, "fs"));
    let snapshotted = Daemon::start(&fresh_cfg);
    wait_snapshots(&fresh, 2).await;
    let partition = |sink: String| async move {
        let mut conn = PgConnection::connect(&sink).await.unwrap();
        sqlx::query_as::<_, (serde_json::Value, Option<i64>, Option<i64>)>(
            "select identities, (traits ->> 'order_count')::bigint, (traits ->> 'lifetime_value_cents')::bigint
               from tributary.profile_view order by identities::text",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
    };
    let expected = partition(fresh.clone()).await;
    assert!(expected.len() > 100, "the workload left profiles");
    assert_eq!(partition(streamed.clone()).await, expected);
    assert_eq!(snapshotted.stop(), Some(0));
}
