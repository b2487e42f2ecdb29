//! `reconcile`, `report` and `snapshot --table`: a store corrupted behind the
//! daemon's back is reported with exactly those drifts and repaired; a healthy
//! store under a live workload reports none; a field added to the config is
//! filled by a re-snapshot while changes keep flowing.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::Connection;
use tributary::cluster::Cluster;

use crate::faults::{caught_up, expected_aggregates, stored_aggregates, Workload};
use crate::harness::*;

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// Runs `reconcile` with `args`; returns (exit code, report).
fn reconcile(cfg: &std::path::Path, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["--json", "reconcile", "--wait-secs", "60"];
    all.extend_from_slice(args);
    let out = run_cmd(cfg, &all);
    (out.status.code(), json_of(&out))
}

/// The drifts of a report as (profile, field, kind), sorted.
fn drift_set(r: &Value) -> BTreeSet<(i64, String, String)> {
    r["drifts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["profile_id"].as_i64().unwrap_or(-1),
                d["field"].as_str().unwrap().to_owned(),
                d["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// A workload applied and caught up, with the daemon left running.
async fn settled(
    tag: &str,
    changes: usize,
) -> (Cluster, String, String, String, ConfigFile, Daemon) {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "insert into contacts (id, email, first_name, last_name) select g, 'u' || g || '@x.com', 'Pre' || g, 'Last' || g from generate_series(1001, 1100) g").await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, tag));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, changes, 7, |_| {}).await;
    wait_until("caught up", Duration::from_secs(90), || {
        caught_up(&shop, &sink, &w)
    })
    .await;
    (pg, crm, shop, sink, cfg, daemon)
}

async fn pick(sink: &str, sql: &str) -> i64 {
    scalar::<Option<i64>>(sink, sql)
        .await
        .unwrap_or_else(|| panic!("nothing to pick: {sql}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_is_reported_exactly_and_repaired() {
    let (_pg, crm, shop, sink, cfg, daemon) = settled("rc", 1500).await;
    let source_rows: i64 = scalar::<i64>(&crm, "select count(*) from contacts").await
        + scalar::<i64>(
            &shop,
            "select (select count(*) from accounts) + (select count(*) from orders)",
        )
        .await;

    // A healthy store: zero drift, exit 0, every source row covered.
    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["drift_count"], json!(0), "{r}");
    assert_eq!(r["status"], json!("clean"), "{r}");
    assert_eq!(r["rows_checked"].as_i64().unwrap(), source_rows, "{r}");
    // The digests computed on the source in SQL equal the store's: no bucket
    // needed a row-by-row comparison.
    assert_eq!(r["buckets_differing"], json!(0), "{r}");
    assert!(r["profiles_checked"].as_i64().unwrap() > 100, "{r}");
    assert!(
        r["as_of"]["crm"].is_string() && r["as_of"]["shop"].is_string(),
        "{r}"
    );

    // Four kinds of damage behind the daemon's back, to four different profiles.
    let live = "from tributary.profiles p where merged_into is null
                  and exists (select 1 from tributary.contributions c where c.profile_id = p.profile_id and not c.deleted)";
    let a = pick(
        &sink,
        &format!("select min(profile_id) {live} and traits ? 'first_name'"),
    )
    .await;
    let b = pick(
        &sink,
        &format!("select min(profile_id) {live} and profile_id <> {a}"),
    )
    .await;
    let (c, email): (i64, String) = {
        let mut conn = sqlx::PgConnection::connect(&sink).await.unwrap();
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select c.profile_id, e ->> 1 from tributary.contributions c, json_array_elements(c.identities) e
              where not c.deleted and e ->> 0 = 'email' and c.profile_id not in ({a}, {b})
              order by c.profile_id limit 1"
        )))
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    let d = pick(
        &sink,
        &format!("select min(profile_id) {live} and profile_id not in ({a}, {b}, {c})"),
    )
    .await;
    let e = pick(&sink, &format!("select min(profile_id) {live} and profile_id not in ({a}, {b}, {c}, {d}) and traits ? 'order_count'")).await;
    // And two people fused as the grow-only graph used to leave them: f's
    // rows and identifiers in g, though no row joins them.
    let f = pick(
        &sink,
        &format!("select min(profile_id) {live} and profile_id not in ({a}, {b}, {c}, {d}, {e})"),
    )
    .await;
    let g = pick(
        &sink,
        &format!(
            "select min(profile_id) {live} and profile_id not in ({a}, {b}, {c}, {d}, {e}, {f})"
        ),
    )
    .await;
    let ident_of = |p: i64| {
        let sink = sink.clone();
        async move {
            let mut conn = sqlx::PgConnection::connect(&sink).await.unwrap();
            sqlx::query_as::<_, (String, String)>(sqlx::AssertSqlSafe(format!(
                "select kind, value from tributary.identities where profile_id = {p} order by kind, value limit 1"
            )))
            .fetch_one(&mut conn)
            .await
            .unwrap()
        }
    };
    let (f_ident, g_ident) = (ident_of(f).await, ident_of(g).await);
    exec(&sink, &format!("
        update tributary.profiles set traits = traits || '{{\"first_name\": \"Mallory\"}}' where profile_id = {a};
        delete from tributary.profiles where profile_id = {b};
        update tributary.identities set profile_id = {d} where kind = 'email' and value = '{email}';
        update tributary.profiles set traits = jsonb_set(traits, '{{order_count}}', to_jsonb((traits ->> 'order_count')::int + 1)),
               agg_state = jsonb_set(agg_state::jsonb, '{{order_count,n}}', to_jsonb((agg_state -> 'order_count' ->> 'n')::int + 1))
         where profile_id = {e};
        update tributary.contributions set profile_id = {g} where profile_id = {f};
        update tributary.identities set profile_id = {g} where profile_id = {f};
        update tributary.profiles set merged_into = {g} where profile_id = {f};")).await;

    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!(code, Some(1), "{r}");
    let want: BTreeSet<(i64, String, String)> = [
        (a, "first_name".to_owned(), "mismatch".to_owned()),
        (b, "profile".to_owned(), "missing".to_owned()),
        (c, format!("identity.email:{email}"), "mismatch".to_owned()),
        // d owns an identifier that none of its rows carries
        (d, format!("identity.email:{email}"), "extra".to_owned()),
        (e, "order_count".to_owned(), "mismatch".to_owned()),
        // g's rows make two components
        (g, "identities".to_owned(), "mismatch".to_owned()),
    ]
    .into();
    let found = drift_set(&r);
    assert!(found.is_superset(&want), "{r}");
    assert!(
        found.difference(&want).all(|(p, _, _)| *p == g),
        "only the fused profile's traits may differ besides: {r}"
    );
    let drifted = found.len();
    assert_eq!(r["status"], json!("drift"), "{r}");
    let run_id = r["run_id"].as_i64().unwrap();

    // The report shows the run field by field, with expected and actual values.
    let out = run_cmd(&cfg, &["--json", "report", "latest"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rep = json_of(&out);
    assert_eq!(rep["run_id"], json!(run_id), "{rep}");
    assert_eq!(rep["drift_count"], json!(drifted), "{rep}");
    let first = rep["drift"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["field"] == json!("first_name"))
        .expect("first_name drift");
    assert_eq!(first["actual"], json!("Mallory"), "{rep}");
    assert_ne!(first["expected"], json!("Mallory"), "{rep}");
    let ident = rep["drift"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| {
            x["field"].as_str().unwrap().starts_with("identity.") && x["profile_id"] == json!(c)
        })
        .unwrap();
    assert_eq!(
        (ident["expected"].clone(), ident["actual"].clone()),
        (json!(c), json!(d)),
        "{rep}"
    );
    let out = run_cmd(&cfg, &["report"]);
    assert!(text(&out).contains(&format!("{run_id}")), "{}", text(&out));
    let out = run_cmd(&cfg, &["report", &run_id.to_string()]);
    assert!(text(&out).contains("Mallory"), "{}", text(&out));

    // --repair fixes them (exit 0: nothing left unrepaired); the next run is clean.
    let (code, r) = reconcile(&cfg, &["--repair"]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(
        (r["drift_count"].clone(), r["repaired_count"].clone()),
        (json!(drifted), json!(drifted)),
        "{r}"
    );
    assert_eq!(r["status"], json!("repaired"), "{r}");
    assert!(
        r["drifts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["repaired"] == json!(true)),
        "{r}"
    );
    let repaired: i64 = scalar(
        &sink,
        &format!(
            "select count(*) from tributary.reconcile_drift where run_id = {} and repaired",
            r["run_id"]
        ),
    )
    .await;
    assert_eq!(repaired, i64::try_from(drifted).unwrap());
    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!((code, r["drift_count"].clone()), (Some(0), json!(0)), "{r}");
    let owner: i64 = scalar(&sink, &format!("select profile_id from tributary.identities where kind = 'email' and value = '{email}'")).await;
    assert_eq!(owner, c);
    // The fused profile is split again.
    let owner = |(kind, value): (String, String)| {
        let sink = sink.clone();
        async move {
            scalar::<i64>(&sink, &format!("select profile_id from tributary.identities where kind = '{kind}' and value = '{value}'")).await
        }
    };
    assert_ne!(
        owner(f_ident).await,
        owner(g_ident).await,
        "the fused people are one profile still"
    );

    // A change the store missed (its stored image of a row is not the source's)
    // and a row it lost: both found row by row, and repaired from the source.
    let contact: i64 = pick(&sink, "select min((row_key::jsonb ->> 'id')::bigint) from tributary.contributions where table_name = 'public.contacts' and not deleted and fields::jsonb ? 'last_name'").await;
    let order: i64 = pick(&sink, "select min((row_key::jsonb ->> 'id')::bigint) from tributary.contributions where table_name = 'public.orders' and not deleted").await;
    exec(&sink, &format!("
        update tributary.contributions set fields = fields::jsonb || '{{\"last_name\": \"Stale\"}}', digest = digest + 1
         where table_name = 'public.contacts' and row_key = '{{\"id\":{contact}}}';
        delete from tributary.contributions where table_name = 'public.orders' and row_key = '{{\"id\":{order}}}';")).await;
    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!(code, Some(1), "{r}");
    let fields: BTreeSet<String> = drift_set(&r).into_iter().map(|(_, f, _)| f).collect();
    assert!(
        fields.contains(&format!("row crm/public.contacts {{\"id\":{contact}}}")),
        "{r}"
    );
    assert!(
        fields.contains(&format!("row shop/public.orders {{\"id\":{order}}}")),
        "{r}"
    );
    let (code, r) = reconcile(&cfg, &["--repair"]);
    assert_eq!(code, Some(0), "{r}");
    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!((code, r["drift_count"].clone()), (Some(0), json!(0)), "{r}");
    assert_eq!(
        expected_aggregates(&shop, &sink).await,
        stored_aggregates(&sink).await
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_during_a_live_workload_reports_no_drift() {
    let (_pg, crm, shop, sink, cfg, daemon) = settled("rl", 0).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c2, s2, halt) = (crm.clone(), shop.clone(), stop.clone());
    let writer = tokio::spawn(async move {
        let mut w = Workload::default();
        let mut seed = 99;
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            // At most 200 changes each half second: the workload is all
            // merges, splits and deletes, each of which makes the daemon read
            // and rewrite whole profiles, and an unthrottled writer on the
            // same two cores outran a debug build's daemon for good (this
            // test is about drift under change, not about throughput).
            let paced = tokio::time::sleep(Duration::from_millis(500));
            w.run(&c2, &s2, 200, seed, |_| {}).await;
            paced.await;
            seed += 1;
        }
        w
    });
    // Several runs while the writers never pause: rows change under every pass.
    for _ in 0..4 {
        let p: PathBuf = cfg.to_path_buf();
        let (code, r) = tokio::task::spawn_blocking(move || reconcile(&p, &[]))
            .await
            .unwrap();
        assert_eq!(
            (code, r["drift_count"].clone()),
            (Some(0), json!(0)),
            "drift under a live workload: {r}"
        );
        assert!(r["rows_checked"].as_i64().unwrap() > 0, "{r}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let w = writer.await.unwrap();
    assert!(
        w.changes.values().sum::<i64>() > 1000,
        "the workload hardly ran"
    );
    // Quiet again, the store is exact.
    wait_until("caught up", Duration::from_secs(60), || async {
        expected_aggregates(&shop, &sink).await == stored_aggregates(&sink).await
    })
    .await;
    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!(
        (code, r["drift_count"].clone(), r["unverified"].clone()),
        (Some(0), json!(0), json!(0)),
        "{r}"
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_field_is_filled_by_a_table_snapshot_while_changes_flow() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "alter table contacts add column city text;
                insert into contacts (id, email, first_name, city) select g, 'u' || g || '@x.com', 'Pre' || g, 'City' || g from generate_series(1001, 3000) g").await;
    let base = pipeline_config(&crm, &shop, &sink, "nf");
    let cfg = write_config(&base);
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    wait_until("snapshot applied", Duration::from_secs(60), || async {
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.contributions where table_name = 'public.contacts'",
        )
        .await
            == 2000
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));

    // The new field, and the daemon restarted with it; changes keep flowing.
    let with_city = base.replace("bio = \"bio\" }", "bio = \"bio\", city = \"city\" }");
    assert_ne!(with_city, base);
    let cfg = write_config(&with_city);
    let daemon = Daemon::start(&cfg);
    let (c2, s2) = (crm.clone(), shop.clone());
    let writer = tokio::spawn(async move {
        let mut w = Workload::default();
        w.run(&c2, &s2, 3000, 5, |_| {}).await;
    });
    // Also change cities while the snapshot runs: the streamed change must win.
    let c3 = crm.clone();
    let mover = tokio::spawn(async move {
        for i in 0..200 {
            let id = 1001 + (i * 7) % 2000;
            exec(&c3, &format!("update contacts set city = 'Moved{i}', row_version = row_version + 1 where id = {id}")).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Before the snapshot, reconciliation sees the field missing.
    let p = cfg.to_path_buf();
    let (code, r) = tokio::task::spawn_blocking(move || reconcile(&p, &["--sample", "200"]))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "{r}");

    let p = cfg.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        run_cmd(
            &p,
            &[
                "--json",
                "snapshot",
                "--source",
                "crm",
                "--table",
                "public.contacts",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let snap = json_of(&out);
    assert!(snap[0]["rows"].as_i64().unwrap() >= 2000, "{snap}");
    writer.await.unwrap();
    mover.await.unwrap();

    // Every contact's city is in its profile, the latest one where it moved.
    wait_until("cities", Duration::from_secs(60), || async {
        let want: Vec<(String, Option<String>)> = {
            let mut conn = sqlx::PgConnection::connect(&crm).await.unwrap();
            sqlx::query_as("select lower(email), city from contacts where id between 1001 and 3000 and email is not null order by 1")
                .fetch_all(&mut conn)
                .await
                .unwrap()
        };
        let mut ok = true;
        for (email, city) in want.iter().step_by(37) {
            let t = traits_of(&sink, "email", email).await;
            ok &= t.is_some();
            if let Some(t) = t {
                ok &= t.get("city") == city.as_ref().map(|c| json!(c)).as_ref();
            }
        }
        ok
    })
    .await;
    let with: i64 = scalar(
        &sink,
        "select count(*) from tributary.profiles where merged_into is null and traits ? 'city'",
    )
    .await;
    assert!(with >= 1500, "only {with} profiles have a city");
    let p = cfg.to_path_buf();
    let (code, r) = tokio::task::spawn_blocking(move || reconcile(&p, &[]))
        .await
        .unwrap();
    assert_eq!((code, r["drift_count"].clone()), (Some(0), json!(0)), "{r}");
    assert_eq!(daemon.stop(), Some(0));
}

/// The watermark rule itself, step by step: a change committed while a read
/// was open (invisible to it) reaches the store through the stream; the read's
/// older image, applied afterwards at the high watermark, must not replace it.
/// (Accounts have no version column, so only the watermark rule protects it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_read_never_overwrites_a_change_it_could_not_see() {
    use tributary::config::Config;
    use tributary::mapping::Mapper;
    use tributary::resnapshot::{apply_read, wait_until_applied};
    use tributary::source::read::{
        prepare_session, take_snapshot, wal_position, TableReader, Watermarks, READ_SEQ_BASE,
    };
    use tributary::store::Store;

    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&shop, "insert into accounts (id, email, phone) select g, 'a' || g || '@x.com', 'old' || g from generate_series(1, 20) g").await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "wm"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    wait_until("accounts", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "a20@x.com").await.is_some()
    })
    .await;

    let config = Config::load(&cfg).unwrap();
    let src = config.source("shop").unwrap();
    let table = src.table("public.accounts").unwrap();
    let store = Store::connect(&config.sink).await.unwrap();
    let mapper = Mapper::new(&config);
    let mut conn = sqlx::PgConnection::connect(&shop).await.unwrap();
    prepare_session(&mut conn, src).await.unwrap();
    let reader = TableReader::load(&mut conn, src, table).await.unwrap();

    // The read: low watermark, snapshot, rows… and meanwhile a writer commits.
    let low = wal_position(&mut conn, src).await.unwrap();
    let taken_at = chrono::Utc::now();
    let mut tx = conn
        .begin_with("begin isolation level repeatable read, read only")
        .await
        .unwrap();
    let (xmax, xip) = take_snapshot(&mut tx, src).await.unwrap();
    exec(&shop, "update accounts set phone = 'new7' where id = 7").await;
    let rows = sqlx::query(sqlx::AssertSqlSafe(reader.select()))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let high = wal_position(&mut conn, src).await.unwrap();
    let events: Vec<_> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            reader
                .event(r, high, READ_SEQ_BASE + i as u64, taken_at)
                .unwrap()
        })
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.row["id"] == json!(7) && e.row["phone"] == json!("old7")),
        "the read must not see the concurrent change"
    );
    let marks = Watermarks {
        low,
        high,
        xmax,
        xip,
        taken_at,
    };
    wait_until_applied(&store, src, high, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        traits_of(&sink, "email", "a7@x.com").await.unwrap()["phone"],
        json!("new7")
    );

    let (applied, _) = apply_read(
        &store,
        &mapper,
        "shop",
        "public.accounts",
        &marks,
        events,
        |_| Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!((applied.rows, applied.skipped), (20, 1), "{applied:?}");
    assert_eq!(
        traits_of(&sink, "email", "a7@x.com").await.unwrap()["phone"],
        json!("new7"),
        "the older read replaced a newer streamed change"
    );
    // A later streamed change still wins over the read.
    exec(&shop, "update accounts set phone = 'newer3' where id = 3").await;
    wait_until("later change", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "a3@x.com").await.unwrap()["phone"] == json!("newer3")
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reconciles_on_a_schedule_and_exports_the_drift() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "insert into contacts (id, email, first_name) select g, 'u' || g || '@x.com', 'Pre' || g from generate_series(1, 50) g").await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = write_config(&format!(
        "{}\n[reconcile]\ninterval_s = 1\n\n[metrics]\nlisten = \"{addr}\"\n",
        pipeline_config(&crm, &shop, &sink, "sc")
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    wait_until("a clean scheduled run", Duration::from_secs(60), || async {
        scalar::<i64>(&sink, "select count(*) from tributary.reconcile_runs where status = 'clean' and rows_checked = 50")
            .await
            > 0
            && scrape(&addr).await.contains("tributary_reconcile_drift 0")
    })
    .await;
    let m = scrape(&addr).await;
    assert!(
        m.contains("tributary_reconcile_runs_total{status=\"clean\"}"),
        "{m}"
    );
    assert!(m.contains("tributary_reconcile_duration_seconds"), "{m}");

    // The apply path's own figures move with streamed changes.
    exec(&crm, "insert into contacts (id, email, first_name) values (51, 'u51@x.com', 'New'); update contacts set first_name = 'Moved' where id = 1").await;
    wait_until("apply metrics", Duration::from_secs(30), || async {
        let m = scrape(&addr).await;
        m.lines().any(|l| {
            l.starts_with("tributary_source_events_applied_total{source=\"crm\"}")
                && l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v >= 2.0)
        })
    })
    .await;
    let m = scrape(&addr).await;
    for name in [
        "tributary_source_transactions_applied_total{source=\"crm\"}",
        "tributary_source_lag_seconds{source=\"crm\"}",
        "tributary_sink_batch_events_count",
        "tributary_sink_apply_duration_seconds_count",
        "tributary_end_to_end_latency_seconds_count",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }

    exec(&sink, "update tributary.profiles set traits = traits || '{\"first_name\": \"Mallory\"}'
                  where profile_id = (select min(profile_id) from tributary.profiles where merged_into is null)").await;
    wait_until(
        "the drift in the metric",
        Duration::from_secs(60),
        || async { scrape(&addr).await.contains("tributary_reconcile_drift 1") },
    )
    .await;
    let drifted: i64 = scalar(&sink, "select count(*) from tributary.reconcile_drift d join tributary.reconcile_runs r using (run_id)
                                       where r.status = 'drift' and d.field = 'first_name' and d.actual = '\"Mallory\"'").await;
    assert!(drifted > 0);
    assert_eq!(daemon.stop(), Some(0));
}

/// The digest the source computes in SQL equals the one the store recorded
/// from the stream, for the common column types (and awkward values): a clean
/// store needs no row-by-row comparison.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_store_digests_agree_across_column_types() {
    let pg = cluster();
    let src = create_db(&pg, "typed").await;
    let sink = create_db(&pg, "profiles").await;
    exec(&src, r#"
        create table people (id text primary key, email text, amount numeric(12,2), ratio numeric, score integer,
          small smallint, flag boolean, born date, seen timestamp, at timestamptz, doc jsonb, raw json, uid uuid,
          tags text[], nums int[], note varchar(40));
        insert into people values
          ('a"1', 'a@x.com', 250.00, 0.125, 7, 3, true, '2001-02-03', '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.123456+02',
           '{"k": [1, "two", null], "z": {"y": 1.5}}', '{"b": 1, "a": 2}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{x,"y z",NULL}', '{1,2,3}', E'line\nbreak \\ "quoted" é'),
          ('b\2', 'b@x.com', 12.50, 1e-3, null, null, false, null, null, null, 'null', '[]', null, '{}', null, null),
          ('c', 'c@x.com', -0.01, 100, -5, -1, null, '1999-12-31', '2000-01-01 00:00:00', '2000-01-01 00:00:00+00',
           '"text"', '3', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', '{"a,b"}', '{-1}', '');
    "#).await;
    let cfg = write_config(&format!(
        r#"
[sink]
url = "{sink}"
batch_max_wait_ms = 20

[[source]]
name = "typed"
url = "{src}"
slot = "typed_dg"
publication = "typed_dg"
  [[source.table]]
  name = "public.people"
  identity = {{ email = "email" }}
  fields = {{ amount = "amount", ratio = "ratio", score = "score", small = "small", flag = "flag", born = "born", seen = "seen", at = "at", doc = "doc", raw = "raw", uid = "uid", tags = "tags", nums = "nums", note = "note" }}

[identity.email]
normalize = "email"
"#
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 1).await;
    // Streamed images too, not only the snapshot's.
    exec(&src, "insert into people (id, email, amount, at, doc) values ('d', 'd@x.com', 3.10, now(), '{\"n\": 1e3}');
                update people set amount = 99.90, note = 'changed' where id = 'c';").await;
    wait_until("streamed", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "d@x.com").await.is_some()
            && traits_of(&sink, "email", "c@x.com")
                .await
                .is_some_and(|t| t["note"] == json!("changed"))
    })
    .await;
    let (code, r) = reconcile(&cfg, &[]);
    assert_eq!((code, r["drift_count"].clone()), (Some(0), json!(0)), "{r}");
    assert_eq!(r["rows_checked"], json!(4), "{r}");
    assert_eq!(
        r["buckets_differing"],
        json!(0),
        "some column type hashes differently on the two sides: {r}"
    );
    assert_eq!(daemon.stop(), Some(0));
}
