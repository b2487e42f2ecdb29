//! What an operator sees: every exported metric moves during a live stream,
//! `/readyz` follows the store, `status --json` and `check --json` have the
//! documented fields, and progress bars draw on a terminal only; and the
//! daemon runs without transparent huge pages.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::faults::{caught_up, Workload};
use crate::harness::*;

/// Every sample of a scrape: `name{labels}` → value.
fn samples(scrape: &str) -> BTreeMap<String, f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of `name` (any labels; for a histogram, its `_count`).
fn total(s: &BTreeMap<String, f64>, name: &str) -> Option<f64> {
    let hits: Vec<f64> = s
        .iter()
        .filter(|(series, _)| {
            let base = series.split('{').next().unwrap_or("");
            base == name || base == format!("{name}_count")
        })
        .map(|(_, v)| *v)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

/// Every object key in a JSON document.
fn json_keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                json_keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| json_keys(v, out)),
        _ => {}
    }
}

async fn ready(addr: &str) -> (u16, Value) {
    let (code, body) = http_get(addr, "/readyz").await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The daemon turns transparent huge pages off for itself (`src/main.rs`:
/// with them, re-touched allocator memory cost 8 % of its CPU in zeroing 2 MiB
/// pages). The kernel reports the flag as `THP_enabled` in the process status
/// (Linux 5.0 on); where it does not, there is nothing to check.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_without_transparent_huge_pages() {
    let sources = cluster();
    let store = cluster();
    let (crm, shop, sink) = sources_and_store(&sources, &store).await;
    let addr = free_addr();
    let cfg = write_config(&format!(
        "{}\n[metrics]\nlisten = \"{addr}\"\n",
        pipeline_config(&crm, &shop, &sink, "thp")
    ));
    let daemon = Daemon::start(&cfg);
    // Serving metrics: `main` ran long ago.
    wait_until("/healthz", Duration::from_secs(30), || async {
        http_get(&addr, "/healthz").await.0 == 200
    })
    .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("0"),
            "transparent huge pages are on for the daemon: {line}"
        );
    }
    assert_eq!(daemon.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_moves_during_a_live_stream_and_readyz_follows_the_store() {
    let sources = cluster();
    let mut store = cluster();
    let (crm, shop, sink) = sources_and_store(&sources, &store).await;
    // Rows for the initial snapshot (ids the workload does not use).
    exec(&crm, "insert into contacts (id, email, first_name) select g, 'pre' || g || '@x.com', 'Pre' || g from generate_series(10001, 10300) g").await;
    let addr = free_addr();
    let cfg = write_config(&format!(
        "{}\n[reconcile]\ninterval_s = 2\n\n[metrics]\nlisten = \"{addr}\"\npoll_interval_s = 1\n",
        pipeline_config(&crm, &shop, &sink, "op")
    ));
    let daemon = Daemon::start(&cfg);
    wait_until("/healthz", Duration::from_secs(30), || async {
        http_get(&addr, "/healthz").await.0 == 200
    })
    .await;
    let first = samples(&scrape(&addr).await);
    wait_until("/readyz", Duration::from_secs(60), || async {
        ready(&addr).await.0 == 200
    })
    .await;
    let (_, body) = ready(&addr).await;
    assert_eq!(body["sources"]["crm"], "streaming", "{body}");
    assert_eq!(body["store"], "reachable", "{body}");

    // A live workload, with a dead letter (an order without an account), a
    // merge (an account whose email is a contact's) and a reconnect.
    let mut w = Workload::default();
    w.run(&crm, &shop, 1500, 11, |_| {}).await;
    exec(&shop, "insert into accounts (id, email) values (5000, 'u1@x.com');
                 insert into orders (id, account_id, status, total_cents) values (90000, null, 'paid', 1)").await;
    exec(&shop, "delete from orders where id = 90000").await;
    *w.changes.entry("shop").or_default() += 3;
    exec(
        &crm,
        "select pg_terminate_backend(pid) from pg_stat_replication",
    )
    .await;
    w.run(&crm, &shop, 500, 12, |_| {}).await;
    wait_until("the store caught up", Duration::from_secs(120), || async {
        caught_up(&shop, &sink, &w).await
    })
    .await;

    // Counters that grow with the workload (snapshot rows may all be counted
    // before the first scrape: their exact total is checked below).
    let counters = [
        tributary::metrics::EVENTS,
        tributary::metrics::TRANSACTIONS,
        tributary::metrics::BYTES_RECEIVED,
        tributary::metrics::RECONNECTS,
        tributary::metrics::BATCH_EVENTS,
        tributary::metrics::APPLY_SECONDS,
        tributary::metrics::END_TO_END_SECONDS,
        tributary::metrics::DEAD_LETTERS,
        tributary::metrics::MERGES,
        tributary::metrics::RECONCILE_RUNS,
        tributary::metrics::RECONCILE_DURATION,
    ];
    // The store's counts, read again on every poll: the event log commits
    // ahead of its batch's derived rows, so "caught up" by events can still
    // see the last batch's profiles land.
    let store_counts = || async {
        let counts: (i64, i64) = (
            scalar(
                &sink,
                "select count(*) from tributary.profiles where merged_into is null",
            )
            .await,
            scalar(&sink, "select count(*) from tributary.identities").await,
        );
        counts
    };
    let (mut profiles, mut identities): (i64, i64);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        (profiles, identities) = store_counts().await;
        let last = samples(&scrape(&addr).await);
        let mut still: Vec<String> = counters
            .iter()
            .filter(|m| total(&last, m).unwrap_or(0.0) <= total(&first, m).unwrap_or(0.0))
            .map(|m| format!("{m} did not grow"))
            .collect();
        let g = |series: &str| last.get(series).copied();
        #[allow(clippy::cast_precision_loss)]
        let expect: [(&str, bool); 10] = [
            (
                "lag_seconds",
                g("tributary_source_lag_seconds{source=\"shop\"}").is_some(),
            ),
            (
                "lag_bytes",
                g("tributary_source_lag_bytes{source=\"shop\"}").is_some(),
            ),
            (
                "wal_retained",
                g("tributary_source_wal_retained_bytes{source=\"crm\"}").is_some_and(|b| b > 0.0),
            ),
            (
                "streaming",
                g("tributary_source_streaming{source=\"crm\"}") == Some(1.0),
            ),
            (
                "snapshot_running",
                g("tributary_snapshot_running{source=\"crm\"}") == Some(0.0),
            ),
            ("profiles", g("tributary_profiles") == Some(profiles as f64)),
            (
                "identities",
                g("tributary_identities") == Some(identities as f64),
            ),
            (
                "reconcile_rows",
                g("tributary_reconcile_rows_checked").is_some_and(|n| n > 300.0),
            ),
            (
                "reconcile_drift",
                g("tributary_reconcile_drift") == Some(0.0),
            ),
            (
                "reconcile_drift_found",
                g("tributary_reconcile_drift_found").is_some(),
            ),
        ];
        still.extend(
            expect
                .iter()
                .filter(|(_, ok)| !ok)
                .map(|(n, _)| (*n).to_owned()),
        );
        if still.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics that did not move: {still:?}\n{last:#?}\ndaemon log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let last = samples(&scrape(&addr).await);
    for m in tributary::metrics::ALL {
        assert!(total(&last, m).is_some(), "{m} is not exported:\n{last:#?}");
    }
    assert_eq!(
        total(&last, tributary::metrics::SNAPSHOT_ROWS),
        Some(300.0),
        "snapshot progress counts the 300 contacts"
    );
    assert!(total(&last, tributary::metrics::DEAD_LETTERS) >= Some(1.0));
    assert!(total(&last, tributary::metrics::RECONNECTS) >= Some(1.0));

    // `status --json`: the documented fields, with the daemon's figures.
    let out = run_cmd(&cfg, &["status", "--json"]);
    let st: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", text(&out)));
    assert_eq!(st["profiles"], profiles, "{st:#}");
    assert_eq!(st["identities"], identities, "{st:#}");
    assert!(st["dead_letters"].as_i64() >= Some(1), "{st:#}");
    assert!(st["merged_profiles"].is_i64(), "{st:#}");
    assert!(st["last_reconcile"]["run_id"].is_i64(), "{st:#}");
    assert!(st["last_reconcile"]["status"].is_string(), "{st:#}");
    assert_eq!(st["daemon"]["reachable"], true, "{st:#}");
    assert_eq!(st["daemon"]["ready"], true, "{st:#}");
    assert_eq!(st["daemon"]["endpoint"], addr.as_str(), "{st:#}");
    let srcs = st["sources"].as_array().unwrap();
    assert_eq!(srcs.len(), 2);
    for s in srcs {
        assert_eq!(s["slot_exists"], true, "{s:#}");
        assert_eq!(s["active"], true, "{s:#}");
        assert_eq!(s["snapshot_completed"], true, "{s:#}");
        assert!(
            s["slot"].is_string() && s["wal_status"].is_string(),
            "{s:#}"
        );
        assert!(
            s["confirmed_flush_lsn"].as_str().unwrap().contains('/'),
            "{s:#}"
        );
        assert!(s["checkpoint_lsn"].as_str().unwrap().contains('/'), "{s:#}");
        assert!(s["wal_retained_bytes"].as_i64() > Some(0), "{s:#}");
        assert!(s["lag_bytes"].is_i64(), "{s:#}");
        assert!(s["last_event_commit_time"].is_string(), "{s:#}");
        assert!(s["lag_seconds"].as_f64() >= Some(0.0), "{s:#}");
        assert!(s["error"].is_null(), "{s:#}");
        let d = &s["daemon"];
        assert_eq!(d["streaming"], true, "{s:#}");
        for n in [
            "events_applied",
            "transactions_applied",
            "bytes_received",
            "reconnects",
        ] {
            assert!(d[n].as_u64() > Some(0), "{n} in {s:#}");
        }
        assert!(
            d["snapshot_rows"].is_u64() && d["dead_letters"].is_u64(),
            "{s:#}"
        );
    }
    let shop_events = srcs.iter().find(|s| s["name"] == "shop").unwrap()["daemon"]
        ["events_applied"]
        .as_u64()
        .unwrap();
    assert_eq!(
        i64::try_from(shop_events).unwrap(),
        w.changes["shop"],
        "every shop change applied once"
    );

    // Every key of the document is in the documented shape.
    let ops = std::fs::read_to_string("docs/operations.md").unwrap();
    let mut keys = Vec::new();
    json_keys(&st, &mut keys);
    for k in keys {
        assert!(
            ops.contains(&format!("`{k}`"))
                || ops.contains(&format!("`.{k}`"))
                || ops.contains(&format!(".{k}`")),
            "status --json key `{k}` is not documented in docs/operations.md"
        );
    }

    // Every query of the SQL cookbook runs against this store.
    let cookbook = std::fs::read_to_string("docs/sql-cookbook.md").unwrap();
    let queries: Vec<&str> = cookbook
        .split("```sql")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(queries.len() >= 10);
    for q in queries {
        exec(&sink, q).await;
    }

    // Progress: a bar on a terminal (script(1) gives the command one), nothing
    // in a pipe or with --json.
    let piped = run_cmd(
        &cfg,
        &["snapshot", "--source", "crm", "--table", "public.contacts"],
    );
    assert!(piped.status.success(), "{}", text(&piped));
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(
        !err.contains("ETA") && !err.contains('\r'),
        "no bar in a pipe: {err}"
    );
    // Not a terminal: logs are JSON lines, fields first-class.
    let lines: Vec<Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["source"] == "crm" && l["message"].is_string()),
        "{err}"
    );
    let cmd = format!(
        "{} --config {} --log-format json snapshot --source crm --table public.contacts",
        env!("CARGO_BIN_EXE_tributary"),
        cfg.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qefc", &cmd, "/dev/null"])
        .output()
        .expect("script(1)");
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("snapshot crm/public.contacts")
            && shown.contains("rows")
            && shown.contains("ETA"),
        "a bar with rows, rate and ETA on a terminal: {shown}"
    );

    // The store goes away: unready, and the body says why; back: ready.
    tokio::task::block_in_place(|| store.stop()).unwrap();
    wait_until(
        "unready without the store",
        Duration::from_secs(30),
        || async { ready(&addr).await.0 == 503 },
    )
    .await;
    let (_, body) = ready(&addr).await;
    assert_eq!(body["ready"], false);
    assert!(
        body["store"].as_str().unwrap().starts_with("unreachable"),
        "{body}"
    );
    assert_eq!(
        http_get(&addr, "/healthz").await.0,
        200,
        "alive all the same"
    );
    tokio::task::block_in_place(|| store.restart()).unwrap();
    wait_until("ready again", Duration::from_secs(90), || async {
        ready(&addr).await.0 == 200
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));
}

/// `/readyz` has no authentication, so anyone who reaches it can send it as
/// many requests as they like: they must not take the store connections the
/// apply path writes with. The store's statement log shows who asked it
/// `select 1`: only the probe's own session, at most once a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_readyz_requests_costs_the_store_one_probe_a_second() {
    let sources = cluster();
    let store = cluster_with(tributary::cluster::ClusterOptions {
        extra_conf: vec![
            "log_statement = 'all'".into(),
            "log_line_prefix = 'app=%a '".into(),
        ],
        ..Default::default()
    });
    let (crm, shop, sink) = sources_and_store(&sources, &store).await;
    let addr = free_addr();
    let cfg = write_config(&format!(
        "{}\n[metrics]\nlisten = \"{addr}\"\n",
        pipeline_config(&crm, &shop, &sink, "flood")
    ));
    let daemon = Daemon::start(&cfg);
    wait_until("/readyz", Duration::from_secs(60), || async {
        ready(&addr).await.0 == 200
    })
    .await;
    let log_path = store.data_dir().parent().unwrap().join("server.log");
    let before = std::fs::read_to_string(&log_path).unwrap().len();

    // 32 clients asking as fast as they can for 3 s, while a change streams.
    let started = std::time::Instant::now();
    let flood = Duration::from_secs(3);
    let clients: Vec<_> = (0..32)
        .map(|_| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut ok = 0u32;
                while started.elapsed() < flood {
                    if http_get(&addr, "/readyz").await.0 == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (1, 'flood@x.com', 'Flood')",
    )
    .await;
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    wait_until(
        "the change applied during the flood",
        Duration::from_secs(30),
        || async { traits_of(&sink, "email", "flood@x.com").await.is_some() },
    )
    .await;
    assert!(
        answered > 200,
        "the flood was too thin to prove anything: {answered} answers"
    );

    let log = std::fs::read_to_string(&log_path).unwrap();
    let probes: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.trim_end().ends_with(": select 1"))
        .collect();
    assert!(
        probes
            .iter()
            .all(|l| l.starts_with("app=tributary readyz ")),
        "a probe ran on another session than the probe's own: {probes:#?}"
    );
    assert!(
        !probes.is_empty() && probes.len() as f64 <= secs + 2.0,
        "{} probes reached the store for {answered} requests in {secs:.1} s",
        probes.len()
    );
    assert_eq!(daemon.stop(), Some(0));
}
