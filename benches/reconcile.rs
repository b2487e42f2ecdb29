//! Reconciliation benchmark (not a test): `cargo bench --bench reconcile`.
//!
//! On two throwaway clusters (source and store), N contacts (default 1,000,000; `N=100000` for a
//! quick run) are snapshotted into the profile store by the daemon. Then:
//! 1. a plain scan of the source table (`sum(hashtextextended(row::text))`),
//!    the floor the issue compares against: "a store with no drift costs
//!    little more than one scan of each source table";
//! 2. `reconcile` with no drift: source rows verified per second, and the
//!    ratio to the plain scan;
//! 3. 10 drifted profiles (5 traits changed, 5 rows whose stored image is
//!    stale): the time for `reconcile` to find exactly them.
//!
//! Figures go to stdout and target/bench/reconcile.json.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;
use tributary::cluster::{Cluster, ClusterOptions};
use tributary::config::Config;
use tributary::reconcile::{reconcile, Options};
use tributary::store::Store;

// The allocator `tributary reconcile` runs with (src/main.rs), so that the
// figures are the command's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn exec(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut c = PgConnection::connect(url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut c)
        .await?;
    Ok(())
}

async fn scalar_i64(url: &str, sql: &str) -> anyhow::Result<i64> {
    let mut c = PgConnection::connect(url).await?;
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut c)
        .await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let n: i64 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // The source and the store on separate servers, as deployed: the store's
    // WAL is not in the source's stream.
    let pg = tokio::task::spawn_blocking(|| Cluster::start(&ClusterOptions::default())).await??;
    let pg_store =
        tokio::task::spawn_blocking(|| Cluster::start(&ClusterOptions::default())).await??;
    exec(&pg.url("postgres"), "create database crm").await?;
    exec(&pg_store.url("postgres"), "create database profiles").await?;
    let (crm, sink) = (pg.url("crm"), pg_store.url("profiles"));
    exec(&crm, &format!(
        "create table contacts (id bigint primary key, email text, first_name text, last_name text, phone text,
           row_version bigint not null default 1, modified_at timestamptz not null default now());
         insert into contacts (id, email, first_name, last_name, phone)
           select g, 'user' || g || '@example.com', 'First' || g, 'Last' || (g % 5000), '+1 555 ' || g
             from generate_series(1, {n}) g;"
    ))
    .await?;
    exec(&crm, "vacuum analyze contacts").await?;
    let text = format!(
        r#"
[sink]
url = "{sink}"
[[source]]
name = "crm"
url = "{crm}"
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email", crm_contact = "id" }}
  version = "row_version"
  updated_at = "modified_at"
  fields = {{ email = "email", first_name = "first_name", last_name = "last_name", phone = "phone" }}
[identity.email]
normalize = "email"
"#
    );
    let cfg = Config::parse(&text, Path::new("<bench>"))?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(tributary::daemon::run(
        cfg.clone(),
        tributary::cli::Role::All,
        shutdown.clone(),
    ));
    let t = Instant::now();
    loop {
        let done = scalar_i64(
            &sink,
            "select count(*) from tributary.checkpoints where snapshot_completed_at is not null",
        )
        .await
        .unwrap_or(0);
        if done == 1 {
            break;
        }
        anyhow::ensure!(!daemon.is_finished(), "the daemon stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snapshot_s = t.elapsed().as_secs_f64();
    eprintln!("snapshot of {n} contacts into the store: {snapshot_s:.1} s");

    // The floor: one plain scan of the source table.
    let t = Instant::now();
    scalar_i64(
        &crm,
        "select sum(hashtextextended(c::text, 0) % 1000)::bigint from contacts c",
    )
    .await?;
    let scan_s = t.elapsed().as_secs_f64();

    let store = Store::connect(&cfg.sink).await?;
    let opts = Options {
        source: None,
        repair: false,
        sample: None,
        wait: Duration::from_secs(120),
        progress: tributary::progress::Progress::hidden(),
    };
    let t = Instant::now();
    let clean = reconcile(&cfg, &store, &opts).await?;
    let clean_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        clean.drift_count == 0,
        "drift on a healthy store: {:?}",
        clean.drifts
    );
    let rate = clean.rows_checked as f64 / clean_s;

    // Ten drifted profiles: five traits changed behind the daemon's back, five
    // stored row images made stale.
    exec(&sink, "
        update tributary.profiles set traits = traits || '{\"first_name\": \"Drifted\"}'
         where profile_id in (select profile_id from tributary.profiles order by profile_id limit 5);
        update tributary.contributions set fields = (fields::jsonb || '{\"last_name\": \"Stale\"}')::json, digest = digest + 1
         where row_key in (select row_key from tributary.contributions order by profile_id desc limit 5);").await?;
    let t = Instant::now();
    let drifted = reconcile(&cfg, &store, &opts).await?;
    let find_s = t.elapsed().as_secs_f64();
    let profiles: std::collections::BTreeSet<i64> =
        drifted.drifts.iter().filter_map(|d| d.profile_id).collect();
    anyhow::ensure!(
        profiles.len() == 10,
        "expected 10 drifted profiles, found {:?}",
        drifted.drifts
    );

    shutdown.cancel();
    daemon.await??;
    let doc = serde_json::json!({
        "contacts": n,
        "snapshot_seconds": snapshot_s,
        "plain_scan_seconds": scan_s,
        "reconcile_no_drift_seconds": clean_s,
        "rows_verified_per_second": rate,
        "profiles_checked": clean.profiles_checked,
        "ratio_to_plain_scan": clean_s / scan_s,
        "find_10_drifted_seconds": find_s,
        "drifts_found": drifted.drift_count,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!(
        "reconcile, {n} contacts, no drift: {clean_s:.1} s = {rate:.0} source rows verified/s \
         ({} profiles); a plain scan of the table takes {scan_s:.2} s (reconcile = {:.1}x the scan); \
         10 drifted profiles found in {find_s:.1} s",
        clean.profiles_checked,
        clean_s / scan_s
    );
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/reconcile.json",
        serde_json::to_string_pretty(&doc)?,
    )?;
    tokio::task::spawn_blocking(move || drop((pg, pg_store))).await?;
    Ok(())
}
