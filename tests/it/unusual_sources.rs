//! Sources that do ordinary but less common things: a partitioned table,
//! values a sum or the store cannot hold.

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
    let cfg = write_config(&source_config(
        &sink,
        ("shop", &shop, "part"),
        r#"
  [[source.table]]
  name = "public.orders"
  identity = { shop_account = "account_id" }
  [source.table.aggregates]
  order_count = { fn = "count" }
  lifetime_value_cents = { fn = "sum", column = "total_cents" }
"#,
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
    let cfg = write_config(&source_config(
        &sink,
        ("shop", &shop, "nan"),
        r#"
  [[source.table]]
  name = "public.orders"
  identity = { shop_account = "account_id" }
  [source.table.aggregates]
  total = { fn = "sum", column = "total" }
  weight = { fn = "sum", column = "weight" }
"#,
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

/// Values that once stopped a source for good become dead letters, and the
/// rows after them apply: a `\u0000` inside a `json` value (the store's `jsonb`
/// cannot hold it), JSON nested deeper than the parser allows, bytes that are
/// not UTF-8 from a `SQL_ASCII` database, and a key or an identifier longer
/// than the store's indexes can hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_store_cannot_hold_become_dead_letters_and_the_stream_goes_on() {
    let pg = cluster();
    let admin = pg.url("postgres");
    exec(&admin, "create database legacy encoding 'SQL_ASCII' lc_collate 'C' lc_ctype 'C' template template0").await;
    let src = pg.url("legacy");
    let sink = create_db(&pg, "profiles").await;
    exec(
        &src,
        "create table people (id text primary key, email text, doc json, note text)",
    )
    .await;
    // One bad row of each kind before the snapshot, one of each streamed.
    let bad_rows = |base: u32| {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        format!(
            "insert into people values ('{a}', 'nul{a}@x.com', '{{\"k\": \"a\\u0000b\"}}', 'fine');
             insert into people values ('{b}', 'deep{b}@x.com', '{deep}', 'fine');
             insert into people values ('{c}', 'latin{c}@x.com', '{{}}', E'caf\\xe9');
             insert into people values (repeat('k', 5000) || '{d}', 'key{d}@x.com', '{{}}', 'fine');
             insert into people values ('{e}', repeat('x', 3000) || '{e}@x.com', '{{}}', 'fine');
             insert into people values ('{f}', 'good{f}@x.com', '{{\"ok\": true}}', 'fine');",
            a = base + 1,
            b = base + 2,
            c = base + 3,
            d = base + 4,
            e = base + 5,
            f = base + 6,
        )
    };
    exec(&src, &bad_rows(0)).await;
    let cfg = write_config(&source_config(
        &sink,
        ("legacy", &src, "legacy"),
        &format!("{EMAIL}{}", people_table("doc = \"doc\", note = \"note\"")),
    ));
    let mut daemon = Daemon::start(&cfg);
    let until_applied = |email: &'static str, daemon: &Daemon| {
        let (sink, log) = (sink.clone(), daemon.log.clone());
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while traits_of(&sink, "email", email).await.is_none() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{email} never applied:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until_applied("good6@x.com", &daemon).await;
    exec(&src, &bad_rows(10)).await;
    until_applied("good16@x.com", &daemon).await;
    assert!(daemon.alive(), "{}", daemon.log_text());
    let reasons: Vec<String> = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&sink).await.unwrap();
        sqlx::query_scalar("select error from tributary.dead_letters order by id")
            .fetch_all(&mut c)
            .await
            .unwrap()
    };
    assert_eq!(reasons.len(), 10, "{reasons:#?}");
    for want in ["\\u0000", "nested", "UTF-8", "key", "identity"] {
        assert_eq!(
            reasons.iter().filter(|r| r.contains(want)).count(),
            2,
            "{want}: {reasons:#?}"
        );
    }
    let live = "select count(*) from tributary.profiles where merged_into is null";
    assert_eq!(
        scalar::<i64>(&sink, live).await,
        2,
        "only the good rows made profiles"
    );
    assert_eq!(daemon.stop(), Some(0));

    // The event log keeps what could not be read, so a rebuild from it
    // refuses the same rows instead of storing their stand-ins.
    let out = run_cmd(&cfg, &["rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        scalar::<i64>(&sink, live).await,
        2,
        "a rebuild stored a stand-in"
    );
    assert_eq!(
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.events where unreadable is not null"
        )
        .await,
        4,
        "the log names the unreadable columns"
    );
}

/// A cluster with a source `crm` holding `people (id, email, note)`, and a store.
async fn people_source() -> (tributary::cluster::Cluster, String, String) {
    let pg = cluster();
    let src = create_db(&pg, "crm").await;
    let sink = create_db(&pg, "profiles").await;
    exec(
        &src,
        "create table people (id bigint primary key, email text, note text)",
    )
    .await;
    (pg, src, sink)
}

/// The source `crm` with `public.people` (see [`people_table`]).
fn people_config(sink: &str, src: &str, tag: &str, fields: &str) -> String {
    source_config(
        sink,
        ("crm", src, tag),
        &format!("{EMAIL}{}", people_table(fields)),
    )
}

/// PostgreSQL (before 18) does not publish generated columns: a mapped one
/// would be in the snapshot and missing from every streamed change. `check`
/// fails on it and `run` stops before it creates anything, with one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mapped_generated_column_is_refused_by_check_and_run_alike() {
    let pg = cluster();
    let src = create_db(&pg, "crm").await;
    let sink = create_db(&pg, "profiles").await;
    exec(
        &src,
        "create table people (id bigint primary key, email text, first text, last text,
                              full_name text generated always as (first || ' ' || last) stored)",
    )
    .await;
    let cfg = write_config(&people_config(
        &sink,
        &src,
        "gen",
        "first = \"first\", full_name = \"full_name\"",
    ));
    let out = run_cmd(&cfg, &["check"]);
    let check = text(&out);
    assert!(!out.status.success(), "{check}");
    let want = "full_name of public.people is a generated column";
    assert!(
        check.contains(want) && check.contains("map the columns it is computed from"),
        "{check}"
    );
    let daemon = Daemon::start(&cfg);
    let (code, log) = exits_by_itself(daemon, Duration::from_secs(30)).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains(want), "{log}");
    assert_eq!(
        scalar::<i64>(&src, "select count(*) from pg_replication_slots").await,
        0,
        "run created a slot before refusing"
    );
}

/// The slot dropped by someone else while the daemon streams, or the
/// publication dropped: the WAL since the checkpoint cannot be read through
/// them any more. The daemon stops (no retry loop) and says how to go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_or_publication_dropped_behind_the_daemon_stops_it_with_the_fix() {
    let pg = cluster();
    for (tag, drop) in [
        ("slot", "select pg_terminate_backend(active_pid) from pg_replication_slots where active_pid is not null;
                  select pg_drop_replication_slot('slot_slot')"),
        ("pub", "drop publication pub_pub"),
    ] {
        let src = create_db(&pg, &format!("crm_{tag}")).await;
        let sink = create_db(&pg, &format!("profiles_{tag}")).await;
        exec(&src, "create table people (id bigint primary key, email text, note text)").await;
        let cfg = write_config(&people_config(&sink, &src, tag, "note = \"note\""));
        let daemon = Daemon::start(&cfg);
        exec(&src, &format!("insert into people values (1, 'one-{tag}@x.com', 'a')")).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while traits_of(&sink, "email", &format!("one-{tag}@x.com")).await.is_none() {
            assert!(std::time::Instant::now() < deadline, "{tag}: not streaming:\n{}", daemon.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The daemon reconnects at once after a terminated walsender: drop
        // the slot between two of its attempts.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = {
                use sqlx::Connection;
                let mut c = sqlx::PgConnection::connect(&src).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(drop.to_owned())).execute(&mut c).await
            };
            match r {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{tag}: {e}"),
            }
        }
        exec(&src, &format!("insert into people values (2, 'two-{tag}@x.com', 'b')")).await;
        let (code, log) = exits_by_itself(daemon, Duration::from_secs(30)).await;
        assert_ne!(code, Some(0), "{log}");
        assert!(
            log.contains("DELETE FROM tributary.checkpoints WHERE source = 'crm'"),
            "{tag}: the error does not name the fix:\n{log}"
        );
        // The fix works: the re-snapshot brings the row the gap hid.
        exec(&sink, "DELETE FROM tributary.checkpoints WHERE source = 'crm'").await;
        let daemon = Daemon::start(&cfg);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while traits_of(&sink, "email", &format!("two-{tag}@x.com")).await.is_none() {
            assert!(std::time::Instant::now() < deadline, "{tag}: the fix did not work:\n{}", daemon.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(daemon.stop(), Some(0));
    }
}

/// While the daemon waits on the store (a large transaction's chunks, a
/// batch in flight), it still tells the source it is alive, so a short
/// `wal_sender_timeout` never drops the connection and makes the server send
/// everything again. The store is held still for three times the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_wal_sender_timeout_survives_a_store_that_stalls() {
    let (pg, src, sink) = people_source().await;
    exec(
        &pg.url("postgres"),
        "alter system set wal_sender_timeout = '2s'",
    )
    .await;
    exec(&pg.url("postgres"), "select pg_reload_conf()").await;
    let cfg = write_config(
        &people_config(&sink, &src, "ka", "note = \"note\"").replace(
            "batch_max_wait_ms = 20",
            "batch_max_wait_ms = 20\nbatch_max_events = 100",
        ),
    );
    let daemon = Daemon::start(&cfg);
    exec(&src, "insert into people values (0, 'zero@x.com', 'a')").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "zero@x.com").await.is_some()
    })
    .await;
    let walsender = "select pid from pg_stat_replication where application_name = 'tributary'";
    let pid_before: i32 = scalar(&src, walsender).await;

    // Hold the store still: the daemon's writes wait on the lock.
    let holder = {
        let sink = sink.clone();
        tokio::spawn(async move {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&sink).await.unwrap();
            sqlx::raw_sql("begin; lock table tributary.contributions in exclusive mode; select pg_sleep(6); commit")
                .execute(&mut c)
                .await
                .unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A transaction larger than a batch, then small ones behind it.
    exec(
        &src,
        "insert into people select g, 'big' || g || '@x.com', 'b' from generate_series(1, 500) g",
    )
    .await;
    for i in 0..20 {
        exec(
            &src,
            &format!(
                "insert into people values ({}, 'small{i}@x.com', 'c')",
                1000 + i
            ),
        )
        .await;
    }
    holder.await.unwrap();
    wait_until("everything applied", Duration::from_secs(60), || async {
        traits_of(&sink, "email", "small19@x.com").await.is_some()
            && traits_of(&sink, "email", "big500@x.com").await.is_some()
    })
    .await;
    let pid_after: i32 = scalar(&src, walsender).await;
    let log = daemon.log_text();
    assert_eq!(
        pid_before, pid_after,
        "the server dropped the replication connection:\n{log}"
    );
    assert!(!log.contains("reconnecting"), "{log}");
    assert_eq!(daemon.stop(), Some(0));
}

/// Spill files: a run killed while it held a large transaction leaves its
/// file behind, and the next start removes it (another source's stays). A
/// full spill disk is a clear error that names `sink.spill_dir`, the daemon
/// retries, and once there is room the transaction arrives whole.
/// The full disk is a small tmpfs, which needs root (as CI runs); elsewhere
/// that half is skipped with a note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_files_of_a_killed_run_are_removed_and_a_full_spill_disk_loses_nothing() {
    let (_pg, src, sink) = people_source().await;
    let spill = tempfile::tempdir().unwrap();
    let stale = spill.path().join("tributary-txn-crm-killed.jsonl");
    let other = spill.path().join("tributary-txn-crm_2-live.jsonl");
    std::fs::write(&stale, "{}\n").unwrap();
    std::fs::write(&other, "{}\n").unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs"])
        .arg(spill.path())
        .status()
        .is_ok_and(|s| s.success());
    // Unmounted however the test ends, before the directory is removed.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = mounted.then(|| Unmount(spill.path().to_owned()));
    if mounted {
        // The tmpfs hides the files written before it: write them again.
        std::fs::write(&stale, "{}\n").unwrap();
        std::fs::write(&other, "{}\n").unwrap();
    } else {
        eprintln!("cannot mount a tmpfs here (not root?): the full-disk half is skipped");
    }
    let cfg = write_config(
        &people_config(&sink, &src, "sp", "note = \"note\"").replace(
            "batch_max_wait_ms = 20",
            &format!(
                "batch_max_wait_ms = 20\nmax_txn_memory_mb = 1\nspill_dir = \"{}\"",
                spill.path().display()
            ),
        ),
    );
    let mut daemon = Daemon::start(&cfg);
    exec(&src, "insert into people values (0, 'zero@x.com', 'a')").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "zero@x.com").await.is_some()
    })
    .await;
    assert!(
        !stale.exists(),
        "the killed run's spill file is still there"
    );
    assert!(other.exists(), "another source's spill file was removed");

    // About 3 MB in one transaction: spilled, and more than the tmpfs holds.
    exec(&src, "insert into people select g, 'big' || g || '@x.com', repeat('n', 1000) from generate_series(1, 3000) g").await;
    if mounted {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !daemon.log_text().contains("sink.spill_dir") {
            assert!(
                std::time::Instant::now() < deadline,
                "no clear error:\n{}",
                daemon.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = daemon.log_text();
        assert!(log.contains("No space left on device"), "{log}");
        assert!(
            daemon.alive(),
            "the daemon gave up instead of retrying:\n{log}"
        );
        assert!(traits_of(&sink, "email", "big1@x.com").await.is_none());
        let grown = std::process::Command::new("mount")
            .args(["-o", "remount,size=64m"])
            .arg(spill.path())
            .status()
            .unwrap();
        assert!(grown.success());
    }
    wait_until(
        "the large transaction applied",
        Duration::from_secs(90),
        || async {
            traits_of(&sink, "email", "big3000@x.com").await.is_some()
                && traits_of(&sink, "email", "big1@x.com").await.is_some()
        },
    )
    .await;
    assert_eq!(
        scalar::<i64>(&sink, "select count(*) from tributary.contributions").await,
        3001
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// The source moved to a new server (a restore into another cluster, a
/// migration) where someone created the slot again: its positions do not
/// continue the checkpoint's. The daemon stops with what differs and the way
/// forward, and the way forward works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_on_a_new_server_is_refused_until_it_is_snapshotted_again() {
    let old = cluster();
    let new = cluster();
    let sink = create_db(&old, "profiles").await;
    let table = "create table people (id bigint primary key, email text, note text)";
    let src_old = create_db(&old, "crm").await;
    exec(&src_old, table).await;
    let cfg = write_config(&people_config(&sink, &src_old, "mv", "note = \"note\""));
    let daemon = Daemon::start(&cfg);
    exec(&src_old, "insert into people values (1, 'one@x.com', 'a')").await;
    wait_until(
        "streaming from the old server",
        Duration::from_secs(30),
        || async { traits_of(&sink, "email", "one@x.com").await.is_some() },
    )
    .await;
    assert_eq!(daemon.stop(), Some(0));

    // The new server: the same table and rows, plus one written there, and the
    // slot created by hand as a migration runbook might.
    let src_new = create_db(&new, "crm").await;
    exec(&src_new, table).await;
    exec(
        &src_new,
        "insert into people values (1, 'one@x.com', 'a'), (2, 'two@x.com', 'b')",
    )
    .await;
    exec(
        &src_new,
        "select pg_create_logical_replication_slot('mv_slot', 'pgoutput')",
    )
    .await;
    let cfg = write_config(&people_config(&sink, &src_new, "mv", "note = \"note\""));
    let (code, log) = exits_by_itself(Daemon::start(&cfg), Duration::from_secs(30)).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("system identifier")
            && log.contains("DELETE FROM tributary.checkpoints WHERE source = 'crm'"),
        "{log}"
    );

    exec(
        &sink,
        "DELETE FROM tributary.checkpoints WHERE source = 'crm'",
    )
    .await;
    let daemon = Daemon::start(&cfg);
    wait_until(
        "snapshotted from the new server",
        Duration::from_secs(30),
        || async { traits_of(&sink, "email", "two@x.com").await.is_some() },
    )
    .await;
    exec(
        &src_new,
        "insert into people values (3, 'three@x.com', 'c')",
    )
    .await;
    wait_until(
        "streaming from the new server",
        Duration::from_secs(30),
        || async { traits_of(&sink, "email", "three@x.com").await.is_some() },
    )
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

/// `REPLICA IDENTITY FULL`: pgoutput flags every column as key, but a row's
/// key must be the same in the snapshot and in the stream, whatever a column
/// holds. With a primary key the key is the primary key; without one it is
/// every column, NULLs included. Before, a NULL or an unsent TOASTed value
/// gave a streamed change another key than the snapshot's row: the update
/// left the snapshot's contribution behind and counted the row twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_identity_keeps_one_key_for_a_row_across_snapshot_and_stream() {
    let pg = cluster();
    let src = create_db(&pg, "crm").await;
    let sink = create_db(&pg, "profiles").await;
    // bio: about 20 kB that does not compress, so it is stored out of line.
    exec(
        &src,
        "create table people (id bigint primary key, email text, note text, bio text);
         alter table people replica identity full;
         create table tags (email text, tag text);
         alter table tags replica identity full;
         insert into people values
           (1, 'a@x.com', null, 'short'),
           (2, 'b@x.com', 'x', (select string_agg(md5(g::text), '') from generate_series(1, 600) g));
         insert into tags values ('t@x.com', null);",
    )
    .await;
    let cfg = write_config(&source_config(
        &sink,
        ("crm", &src, "full"),
        &format!(
            "{EMAIL}{}{}",
            people_table("note = \"note\""),
            r#"  [source.table.aggregates]
  people = { fn = "count" }

  [[source.table]]
  name = "public.tags"
  identity = { email = "email" }
  fields = { tag = "tag" }
  [source.table.aggregates]
  tags = { fn = "count" }
"#
        ),
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 1).await;
    // Updates of rows the snapshot read: a NULL becoming a value, a row whose
    // TOASTed column is not sent, a row without a primary key holding a NULL.
    exec(
        &src,
        "update people set note = 'n' where id = 1;
         update people set note = 'y' where id = 2;
         update tags set tag = 'vip' where email = 't@x.com';",
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (a, b, t) = (
            traits_of(&sink, "email", "a@x.com").await,
            traits_of(&sink, "email", "b@x.com").await,
            traits_of(&sink, "email", "t@x.com").await,
        );
        if a.as_ref().is_some_and(|t| t["note"] == json!("n"))
            && b.as_ref().is_some_and(|t| t["note"] == json!("y"))
            && t.as_ref().is_some_and(|t| t["tag"] == json!("vip"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the updates did not apply: {a:?} {b:?} {t:?}\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live_rows = "select count(*) from tributary.contributions where not deleted";
    assert_eq!(
        scalar::<i64>(&sink, live_rows).await,
        3,
        "a row is counted twice"
    );
    for (email, agg) in [
        ("a@x.com", "people"),
        ("b@x.com", "people"),
        ("t@x.com", "tags"),
    ] {
        assert_eq!(
            traits_of(&sink, "email", email).await.unwrap()[agg],
            json!(1),
            "{email}"
        );
    }
    // A delete finds the row by the same key.
    exec(
        &src,
        "delete from people where id = 1; delete from tags where email = 't@x.com'",
    )
    .await;
    wait_until("the deletes applied", Duration::from_secs(30), || async {
        scalar::<i64>(&sink, live_rows).await == 1
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

/// A table that was out of the publication for a while (removed and added
/// back), or newly mapped on a source that streams already: its changes were
/// not in the stream, so at the next start the daemon adds it to the
/// publication and reads its rows again while it streams. Before, the rows
/// written meanwhile (and a new table's existing rows) never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_was_out_of_the_publication_is_read_again() {
    let pg = cluster();
    let src = create_db(&pg, "crm").await;
    let sink = create_db(&pg, "profiles").await;
    exec(
        &src,
        "create table people (id bigint primary key, email text, note text);
         create table extra (id bigint primary key, email text, note text);
         insert into extra values (1, 'extra1@x.com', 'e');",
    )
    .await;
    let base = people_config(&sink, &src, "out", "note = \"note\"");
    let cfg = write_config(&base);
    let daemon = Daemon::start(&cfg);
    exec(&src, "insert into people values (1, 'one@x.com', 'a')").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "one@x.com").await.is_some()
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));

    // Out of the publication while a row is written; and a second table mapped.
    exec(&src, "alter publication out_pub drop table people").await;
    exec(&src, "insert into people values (2, 'two@x.com', 'b')").await;
    let cfg = write_config(&format!(
        "{base}\n  [[source.table]]\n  name = \"public.extra\"\n  identity = {{ email = \"email\" }}\n  fields = {{ note = \"note\" }}\n"
    ));
    let daemon = Daemon::start(&cfg);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(traits_of(&sink, "email", "two@x.com").await.is_some()
        && traits_of(&sink, "email", "extra1@x.com").await.is_some())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not read again:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    exec(&src, "insert into people values (3, 'three@x.com', 'c')").await;
    wait_until("streaming on", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "three@x.com").await.is_some()
            && scalar::<i64>(
                &sink,
                "select count(*) from tributary.table_snapshots_pending",
            )
            .await
                == 0
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

/// The same while the daemon streams: the publication is checked every
/// `heartbeat_interval_s`, and a mapped table someone removed is added back
/// and read again, closing the gap without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_removed_from_the_publication_while_streaming_is_added_back_and_read_again() {
    let (_pg, src, sink) = people_source().await;
    let cfg = write_config(
        &people_config(&sink, &src, "live", "note = \"note\"").replace(
            "publication = \"live_pub\"",
            "publication = \"live_pub\"\nheartbeat_interval_s = 1",
        ),
    );
    let daemon = Daemon::start(&cfg);
    exec(&src, "insert into people values (1, 'one@x.com', 'a')").await;
    wait_until("streaming", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "one@x.com").await.is_some()
    })
    .await;
    exec(&src, "alter publication live_pub drop table people").await;
    exec(&src, "insert into people values (2, 'gap@x.com', 'b')").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while traits_of(&sink, "email", "gap@x.com").await.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the gap stayed:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    exec(&src, "insert into people values (3, 'after@x.com', 'c')").await;
    wait_until("streaming on", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "after@x.com").await.is_some()
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));
}
