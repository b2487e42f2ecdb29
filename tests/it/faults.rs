//! A random workload over both sources while one daemon is SIGKILLed and
//! restarted again and again and another runs undisturbed into a second store:
//! both stores end with exactly the same profiles, every aggregate equals what
//! SQL over the sources computes, and each change is logged exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::harness::*;

/// What a workload did to the sources.
#[derive(Default)]
pub struct Workload {
    contacts: BTreeSet<i64>,      // present rows
    versions: BTreeMap<i64, i64>, // id -> highest version ever used
    accounts: BTreeSet<i64>,
    orders: BTreeSet<i64>,
    /// Row changes made, per source.
    pub changes: BTreeMap<&'static str, i64>,
}

const STATUSES: [&str; 4] = ["paid", "shipped", "cancelled", "pending"];

impl Workload {
    /// One random statement; returns (source, sql).
    fn statement(&mut self, rng: &mut StdRng) -> (&'static str, String) {
        // Mostly one email per id (contacts and accounts with the same id are the
        // same person); sometimes another one, which links and merges profiles.
        let email = |rng: &mut StdRng, id: i64| {
            let n = if rng.random_bool(0.9) {
                id
            } else {
                rng.random_range(1..=2000)
            };
            format!("'u{n}@x.com'")
        };
        match rng.random_range(0..10) {
            0..=2 => {
                let id = rng.random_range(1..=300);
                let v = self.versions.entry(id).or_insert(0);
                *v += 1;
                let v = *v;
                let sql = if self.contacts.contains(&id) {
                    if rng.random_bool(0.2) {
                        self.contacts.remove(&id);
                        format!("delete from contacts where id = {id}")
                    } else {
                        let email_change = if rng.random_bool(0.02) {
                            format!(", email = {}", email(rng, id))
                        } else {
                            String::new()
                        };
                        format!(
                            "update contacts set first_name = 'F{}', phone = '{}', row_version = {v}, modified_at = now(){email_change} where id = {id}",
                            rng.random_range(0..1000),
                            rng.random_range(0..1000)
                        )
                    }
                } else {
                    self.contacts.insert(id);
                    format!(
                        "insert into contacts (id, email, first_name, phone, row_version) values ({id}, {}, 'F{}', '{}', {v})",
                        email(rng, id),
                        rng.random_range(0..1000),
                        rng.random_range(0..1000)
                    )
                };
                ("crm", sql)
            }
            3..=4 => {
                let id = rng.random_range(1..=300);
                let sql = if self.accounts.contains(&id) {
                    if rng.random_bool(0.15) {
                        self.accounts.remove(&id);
                        format!("delete from accounts where id = {id}")
                    } else {
                        format!(
                            "update accounts set phone = '{}' where id = {id}",
                            rng.random_range(0..1000)
                        )
                    }
                } else {
                    self.accounts.insert(id);
                    format!(
                        "insert into accounts (id, email, phone) values ({id}, {}, '{}')",
                        email(rng, id),
                        rng.random_range(0..1000)
                    )
                };
                ("shop", sql)
            }
            _ => {
                let id = rng.random_range(1..=3000);
                let sql = if self.orders.contains(&id) {
                    match rng.random_range(0..10) {
                        0..=1 => {
                            self.orders.remove(&id);
                            format!("delete from orders where id = {id}")
                        }
                        2..=4 => format!("update orders set account_id = {}, updated_at = now() where id = {id}", rng.random_range(1..=300)),
                        _ => format!(
                            "update orders set status = '{}', total_cents = {}, updated_at = now() where id = {id}",
                            STATUSES[rng.random_range(0..4)],
                            rng.random_range(0..100_000)
                        ),
                    }
                } else {
                    self.orders.insert(id);
                    format!(
                        "insert into orders (id, account_id, status, total_cents) values ({id}, {}, '{}', {})",
                        rng.random_range(1..=300),
                        STATUSES[rng.random_range(0..4)],
                        rng.random_range(0..100_000)
                    )
                };
                ("shop", sql)
            }
        }
    }

    /// Runs `changes` random row changes in transactions of 1–10 statements,
    /// calling `between` after each transaction.
    pub async fn run(
        &mut self,
        crm: &str,
        shop: &str,
        changes: usize,
        seed: u64,
        mut between: impl FnMut(usize),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut crm_conn = PgConnection::connect(crm).await.unwrap();
        let mut shop_conn = PgConnection::connect(shop).await.unwrap();
        let mut done = 0;
        while done < changes {
            let n = rng.random_range(1..=10);
            let mut per: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
            for _ in 0..n {
                let (src, sql) = self.statement(&mut rng);
                per.entry(src).or_default().push(sql);
            }
            for (src, stmts) in per {
                let conn = if src == "crm" {
                    &mut crm_conn
                } else {
                    &mut shop_conn
                };
                let sql = format!("begin; {}; commit;", stmts.join("; "));
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                *self.changes.entry(src).or_default() += i64::try_from(stmts.len()).unwrap();
                done += stmts.len();
            }
            between(done);
        }
    }
}

/// Has the store caught up with `w`: aggregates equal SQL over the shop, and
/// every change the workload made is logged?
pub async fn caught_up(shop: &str, sink: &str, w: &Workload) -> bool {
    expected_aggregates(shop, sink).await == stored_aggregates(sink).await
        && scalar::<i64>(
            sink,
            "select count(*) from tributary.events where op <> 'snapshot'",
        )
        .await
            == w.changes.values().sum::<i64>()
}

/// (order_count, lifetime_value_cents) per live profile id.
pub type Aggregates = BTreeMap<i64, (i64, i64)>;

/// Aggregates per live profile computed by SQL over the shop's current orders,
/// grouped by the profile that owns each order's account.
pub async fn expected_aggregates(shop: &str, sink: &str) -> Aggregates {
    let mut s = PgConnection::connect(shop).await.unwrap();
    let per_account: Vec<(i64, i64, i64)> = sqlx::query_as(
        "select account_id, count(*), coalesce(sum(total_cents) filter (where status in ('paid', 'shipped')), 0)::bigint
           from orders group by account_id",
    )
    .fetch_all(&mut s)
    .await
    .unwrap();
    let mut k = PgConnection::connect(sink).await.unwrap();
    let owners: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "select value, profile_id from tributary.identities where kind = 'shop_account'",
    )
    .fetch_all(&mut k)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let mut out = Aggregates::new();
    for (account, count, value) in per_account {
        let p = owners.get(&account.to_string()).copied().unwrap_or(-1);
        let e = out.entry(p).or_default();
        e.0 += count;
        e.1 += value;
    }
    out
}

/// The same, as the store has it.
pub async fn stored_aggregates(sink: &str) -> Aggregates {
    let mut k = PgConnection::connect(sink).await.unwrap();
    let rows: Vec<(i64, Value)> = sqlx::query_as(
        "select profile_id, traits from tributary.profiles where merged_into is null",
    )
    .fetch_all(&mut k)
    .await
    .unwrap();
    rows.into_iter()
        .filter_map(|(p, t)| {
            let count = t.get("order_count").and_then(Value::as_i64)?;
            Some((
                p,
                (
                    count,
                    t.get("lifetime_value_cents")
                        .and_then(Value::as_i64)
                        .unwrap_or(0),
                ),
            ))
        })
        .collect()
}

async fn stream_events(sink: &str) -> BTreeMap<String, (i64, i64)> {
    let mut k = PgConnection::connect(sink).await.unwrap();
    sqlx::query_as::<_, (String, i64, i64)>(
        "select source, count(*), count(distinct (commit_lsn, seq)) from tributary.events where op <> 'snapshot' group by source",
    )
    .fetch_all(&mut k)
    .await
    .unwrap()
    .into_iter()
    .map(|(s, a, b)| (s, (a, b)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_doubles_nothing() {
    let pg = cluster();
    let crm = create_db(&pg, "crm").await;
    let shop = create_db(&pg, "shop").await;
    let sink_killed = create_db(&pg, "profiles_killed").await;
    let sink_clean = create_db(&pg, "profiles_clean").await;
    exec(&crm, CRM_SCHEMA).await;
    exec(&shop, SHOP_SCHEMA).await;

    let cfg_killed = write_config(&pipeline_config(&crm, &shop, &sink_killed, "killed"));
    let cfg_clean = write_config(&pipeline_config(&crm, &shop, &sink_clean, "clean"));
    let clean = Daemon::start(&cfg_clean);
    let mut killed = Some(Daemon::start(&cfg_killed));
    // Both slots exist and both snapshots are done before the workload starts.
    for sink in [&sink_killed, &sink_clean] {
        wait_snapshots(sink, 2).await;
    }

    // The workload runs on its own; the killer waits until the daemon has
    // applied something new since its last start, then kills it at a random
    // moment of its streaming (not during start-up, where a kill proves little).
    // The workload is paced by the kills (it slows down while fewer than its
    // share of `KILLS` have happened), so a machine where the daemon restarts
    // slowly still gets them all.
    const CHANGES: usize = 10_000;
    const KILLS: usize = 24;
    let kill_count = Arc::new(AtomicUsize::new(0));
    let workload = {
        let (crm, shop) = (crm.clone(), shop.clone());
        let kill_count = kill_count.clone();
        tokio::spawn(async move {
            let mut w = Workload::default();
            w.run(&crm, &shop, CHANGES, 42, |done| {
                // Behind schedule: slow down, but keep changes flowing (the
                // killer waits for the daemon to apply something new).
                let behind = kill_count.load(Ordering::SeqCst) < KILLS * done / CHANGES;
                std::thread::sleep(Duration::from_millis(if behind { 60 } else { 4 }));
            })
            .await;
            w
        })
    };
    let mut kills = 0;
    let mut rng = StdRng::seed_from_u64(7);
    let applied = |sink: String| async move {
        scalar::<i64>(&sink, "select coalesce(sum(pg_wal_lsn_diff(lsn, '0/0')), 0)::bigint from tributary.checkpoints").await
    };
    while !workload.is_finished() {
        let before = applied(sink_killed.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while applied(sink_killed.clone()).await == before && !workload.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "daemon made no progress after restart"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
        if let Some(d) = killed.take() {
            d.kill9();
            kills += 1;
            kill_count.store(kills, Ordering::SeqCst);
        }
        killed = Some(Daemon::start(&cfg_killed));
    }
    let w = workload.await.unwrap();
    assert!(kills >= 20, "only {kills} kills");

    // Both stores converge to what SQL over the sources says.
    for sink in [&sink_killed, &sink_clean] {
        let mut last: (Aggregates, Aggregates) = Default::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let want = expected_aggregates(&shop, sink).await;
            let got = stored_aggregates(sink).await;
            if want == got {
                break;
            }
            if std::time::Instant::now() > deadline {
                let diff: Vec<_> = last
                    .0
                    .iter()
                    .filter(|(p, v)| last.1.get(p) != Some(v))
                    .take(10)
                    .map(|(p, v)| (p, v, last.1.get(p)))
                    .collect();
                panic!("aggregates never matched in {sink}: (profile, want, got) {diff:?}");
            }
            last = (want, got);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let events = |sink: String| async move {
        let by_source = stream_events(&sink).await;
        (
            by_source.get("crm").copied().unwrap_or_default(),
            by_source.get("shop").copied().unwrap_or_default(),
        )
    };
    let want = (w.changes["crm"], w.changes["shop"]);
    // Both stores (the undisturbed one may still be applying the last CRM
    // batches: the aggregates above only wait for the shop's).
    for sink in [&sink_killed, &sink_clean] {
        wait_until("every change logged", Duration::from_secs(60), || {
            let sink = sink.clone();
            async move {
                let (c, s) = events(sink).await;
                c.0 == want.0 && s.0 == want.1
            }
        })
        .await;
    }
    let (c, s) = events(sink_killed.clone()).await;
    assert_eq!(
        (c, s),
        ((want.0, want.0), (want.1, want.1)),
        "each change exactly once in the killed run's event log"
    );

    // Exactly the profiles of the undisturbed run.
    let a = profiles(&sink_killed).await;
    let b = profiles(&sink_clean).await;
    assert_eq!(
        a, b,
        "the killed run's profiles differ from the clean run's"
    );
    assert!(a.len() > 50, "workload produced only {} profiles", a.len());
    let killed = killed.take().unwrap();
    assert_eq!(killed.stop(), Some(0));
    assert_eq!(clean.stop(), Some(0));
}

/// Every contribution row as text, without the columns a run assigns itself
/// (profile ids, wall-clock timestamps).
async fn contribution_rows(sink: &str) -> Vec<String> {
    let mut k = PgConnection::connect(sink).await.unwrap();
    sqlx::query_scalar(
        "select concat_ws('|', source, table_name, row_key, deleted, identities, fields, aggs, version, lsn, seq, freshness, priority)
           from tributary.contributions order by source, table_name, row_key",
    )
    .fetch_all(&mut k)
    .await
    .unwrap()
}

/// Every streamed change in the event log as text.
async fn event_rows(sink: &str) -> Vec<String> {
    let mut k = PgConnection::connect(sink).await.unwrap();
    sqlx::query_scalar(
        "select concat_ws('|', source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key, row, unchanged)
           from tributary.events where op <> 'snapshot' order by source, commit_lsn, seq",
    )
    .fetch_all(&mut k)
    .await
    .unwrap()
}

/// A process that dies at each stage of a write (a chunk of the event log
/// written and the rest not, the derived rows written, the checkpoint written
/// before `COMMIT`, the event log committed and the batch not, committed
/// before the acknowledgement), then
/// restarts, ends with the store of an undisturbed run, row for row: events,
/// contributions, profiles and provenance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_stage_of_a_write_ends_with_the_undisturbed_store() {
    // (stage, which hit of it aborts): the event log's first chunk of the
    // first write (more chunks follow), the other stages at the second write.
    const STAGES: [(&str, u32); 5] = [
        ("event_log", 1),
        ("derived", 2),
        ("before_commit", 2),
        ("log_committed", 2),
        ("after_commit", 2),
    ];
    let pg = cluster();
    let crm = create_db(&pg, "crm").await;
    let shop = create_db(&pg, "shop").await;
    exec(&crm, CRM_SCHEMA).await;
    exec(&shop, SHOP_SCHEMA).await;
    let reference = create_db(&pg, "profiles_reference").await;
    let reference_cfg = write_config(&pipeline_config(&crm, &shop, &reference, "reference"));
    let clean = Daemon::start(&reference_cfg);
    let mut crashed = Vec::new();
    for (stage, _) in STAGES {
        let sink = create_db(&pg, &format!("profiles_{stage}")).await;
        let cfg = write_config(&pipeline_config(&crm, &shop, &sink, stage));
        crashed.push((stage, sink, cfg));
    }
    // Slots and (empty) snapshots first; then the crashing processes are
    // stopped so that the workload waits for them as a backlog.
    let first: Vec<Daemon> = crashed.iter().map(|(_, _, c)| Daemon::start(c)).collect();
    for (sink, d) in std::iter::once((&reference, &clean))
        .chain(crashed.iter().zip(&first).map(|((_, s, _), d)| (s, d)))
    {
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while scalar::<i64>(sink, "select count(*) from pg_catalog.pg_tables where schemaname = 'tributary' and tablename = 'checkpoints'").await == 0
            || scalar::<i64>(sink, "select count(*) from tributary.checkpoints where snapshot_completed_at is not null").await < 2
        {
            assert!(std::time::Instant::now() < deadline, "no snapshot into {sink}:\n{}", d.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for d in first {
        assert_eq!(d.stop(), Some(0));
    }
    // One transaction larger than an event-log chunk (and in one write),
    // then random changes
    // with merges, identifier changes and deletes.
    exec(&shop, "insert into accounts (id, email) select g, 'u' || g || '@x.com' from generate_series(1001, 1300) g;
                 insert into orders (id, account_id, status, total_cents) select 100000 + g, 1001 + g % 300, 'paid', g from generate_series(1, 4500) g").await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 1500, 99, |_| {}).await;
    *w.changes.entry("shop").or_default() += 4800;

    for (stage, at, cfg) in crashed
        .iter()
        .zip(STAGES)
        .map(|((s, _, c), (_, n))| (s, n, c))
    {
        let mut d =
            Daemon::start_with_env(cfg, &[("TRIBUTARY_TEST_CRASH", &format!("{stage}:{at}"))]);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while d.alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "the process never reached {stage}:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            d.log_text()
                .contains(&format!("aborting at {stage}, hit {at}")),
            "the process did not stop at {stage}:\n{}",
            d.log_text()
        );
    }
    let restarted: Vec<Daemon> = crashed.iter().map(|(_, _, c)| Daemon::start(c)).collect();
    for sink in std::iter::once(&reference).chain(crashed.iter().map(|(_, s, _)| s)) {
        wait_until("the store caught up", Duration::from_secs(120), || async {
            caught_up(&shop, sink, &w).await
        })
        .await;
    }
    let expected = (
        event_rows(&reference).await,
        contribution_rows(&reference).await,
        profiles(&reference).await,
        provenance(&reference).await,
    );
    assert!(expected.0.len() > 6000 && expected.2.len() > 200);
    for (stage, sink, _) in &crashed {
        let got = (
            event_rows(sink).await,
            contribution_rows(sink).await,
            profiles(sink).await,
            provenance(sink).await,
        );
        assert!(got.0 == expected.0, "{stage}: the event log differs");
        assert!(got.1 == expected.1, "{stage}: contributions differ");
        assert!(got.2 == expected.2, "{stage}: profiles differ");
        assert!(got.3 == expected.3, "{stage}: provenance differs");
    }
    // The restart after `log_committed` wrote a batch whose changes were
    // logged already: the event log met them and kept the logged copies
    // (compared row for row above, so none was doubled).
    let (_, log_committed) = crashed
        .iter()
        .map(|(s, _, _)| *s)
        .zip(&restarted)
        .find(|(s, _)| *s == "log_committed")
        .unwrap();
    assert!(
        log_committed
            .log_text()
            .contains("in the event log already"),
        "the restart after log_committed never met a logged change:\n{}",
        log_committed.log_text()
    );
    for d in restarted {
        assert_eq!(d.stop(), Some(0));
    }
    assert_eq!(clean.stop(), Some(0));
}
