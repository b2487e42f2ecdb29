//! `tributary demo`: the self-contained first run.
//!
//! Starts three throwaway clusters from the local PostgreSQL binaries (a CRM,
//! a shop, the profile store), loads a few thousand overlapping people, runs
//! the daemon in-process, makes live changes for `--duration` seconds, checks
//! that every profile's aggregates equal SQL over the sources, prints a few
//! unified profiles and the counts, and cleans up.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterOptions};
use crate::config::Config;

const CRM_SQL: &str = "
create table contacts (id bigint primary key, email text, first_name text, last_name text, phone text,
  opted_in boolean not null default false, row_version bigint not null default 1,
  modified_at timestamptz not null default now());
insert into contacts (id, email, first_name, last_name, phone, opted_in, modified_at)
select g,
       -- the same people as the shop, written differently
       case when g % 3 = 0 then upper(substr(n.first, 1, 1)) || substr(n.first, 2) || '.' || n.last || g || '@Example.com'
            else n.first || '.' || n.last || g || '@example.com' end,
       initcap(n.first), initcap(n.last), '+1 555 ' || lpad((g * 37 % 10000)::text, 4, '0'), g % 2 = 0,
       now() - (g % 300) * interval '1 day'
  from generate_series(1, 3000) g,
       lateral (select (array['ann','bob','carla','dev','emma','femi','gus','hana','ivan','jo'])[1 + g % 10] as first,
                       (array['lee','kim','diaz','patel','smith','okafor','novak','sato'])[1 + g % 8] as last) n;";

const SHOP_SQL: &str = "
create table accounts (id bigint primary key, email text, phone text, created_at timestamptz not null default now());
create table orders (id bigint primary key, account_id bigint, status text not null, total_cents bigint not null,
  created_at timestamptz not null default now(), updated_at timestamptz not null default now());
-- accounts 1..2500: 2000 of them are CRM contacts 1001..3000 (same email, other spelling), 500 are shop-only
insert into accounts (id, email, phone, created_at)
select a,
       case when a <= 2000
            then '  ' || (array['ann','bob','carla','dev','emma','femi','gus','hana','ivan','jo'])[1 + (a + 1000) % 10] || '.'
                 || (array['lee','kim','diaz','patel','smith','okafor','novak','sato'])[1 + (a + 1000) % 8] || (a + 1000) || '@EXAMPLE.com'
            else 'shopper' || a || '@example.net' end,
       case when a % 4 = 0 then '+1 555 9' || lpad(a::text, 3, '0') end,
       now() - (a % 700) * interval '1 day'
  from generate_series(1, 2500) a;
insert into orders (id, account_id, status, total_cents, created_at)
select o, 1 + (o * 7919) % 2500, (array['paid','paid','shipped','cancelled','pending'])[1 + o % 5], 500 + (o * 104729) % 20000,
       now() - (o % 365) * interval '1 day'
  from generate_series(1, 8000) o;";

const FIRST: [&str; 10] = [
    "ann", "bob", "carla", "dev", "emma", "femi", "gus", "hana", "ivan", "jo",
];
const LAST: [&str; 8] = [
    "lee", "kim", "diaz", "patel", "smith", "okafor", "novak", "sato",
];

fn config_text(crm: &str, shop: &str, sink: &str) -> String {
    format!(
        r#"
[sink]
url = "{sink}"
batch_max_wait_ms = 50

[[source]]
name = "crm"
url = "{crm}"
priority = 10
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email", crm_contact = "id" }}
  version = "row_version"
  updated_at = "modified_at"
  fields = {{ email = "email", first_name = "first_name", last_name = "last_name", phone = "phone", marketing_opt_in = "opted_in" }}

[[source]]
name = "shop"
url = "{shop}"
  [[source.table]]
  name = "public.accounts"
  identity = {{ email = "email", shop_account = "id" }}
  fields = {{ shop_signup_at = "created_at", phone = "phone" }}
  [[source.table]]
  name = "public.orders"
  identity = {{ shop_account = "account_id" }}
  updated_at = "updated_at"
  [source.table.aggregates]
  order_count          = {{ fn = "count" }}
  lifetime_value_cents = {{ fn = "sum", column = "total_cents", only_when = {{ status = ["paid", "shipped"] }} }}
  last_order_at        = {{ fn = "max", column = "created_at" }}

[identity.email]
normalize = "email"

[fields.phone]
strategy = "freshest"
"#
    )
}

async fn exec(url: &str, sql: &str) -> anyhow::Result<()> {
    let mut c = PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {url}"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut c)
        .await?;
    Ok(())
}

fn start_cluster(name: &str) -> anyhow::Result<Cluster> {
    Cluster::start(&ClusterOptions::default()).with_context(|| format!("start the {name} cluster"))
}

/// Runs the demo; `duration` seconds of live changes.
pub async fn demo(duration: u64, keep: bool, json: bool) -> anyhow::Result<u8> {
    let say = |s: &str| {
        if !json {
            println!("{s}");
        }
    };
    say("Starting three throwaway PostgreSQL clusters (crm, shop, profiles)...");
    let clusters = tokio::task::spawn_blocking(|| -> anyhow::Result<[Cluster; 3]> {
        Ok([
            start_cluster("crm")?,
            start_cluster("shop")?,
            start_cluster("profiles")?,
        ])
    })
    .await??;
    let [crm_c, shop_c, sink_c] = &clusters;
    let (crm, shop, sink) = (
        crm_c.url("postgres"),
        shop_c.url("postgres"),
        sink_c.url("postgres"),
    );
    exec(&crm, CRM_SQL).await?;
    exec(&shop, SHOP_SQL).await?;
    say("Loaded 3,000 CRM contacts, 2,500 shop accounts (2,000 of them CRM contacts spelled differently) and 8,000 orders.");

    let cfg = Config::parse(&config_text(&crm, &shop, &sink), Path::new("<demo>"))?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(crate::daemon::run(
        cfg.clone(),
        crate::cli::Role::All,
        shutdown.clone(),
    ));
    say("Running the daemon: snapshot of both sources, then streaming...");
    let started = Instant::now();
    let mut sinkc = loop {
        if let Ok(mut c) = PgConnection::connect(&sink).await {
            let done: Option<i64> = sqlx::query_scalar("select count(*) from tributary.checkpoints where snapshot_completed_at is not null")
                .fetch_optional(&mut c)
                .await
                .unwrap_or(None);
            if done == Some(2) {
                break c;
            }
        }
        if daemon.is_finished() || started.elapsed() > Duration::from_secs(120) {
            shutdown.cancel();
            daemon.await??;
            anyhow::bail!("the snapshot did not complete");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let snap_s = started.elapsed().as_secs_f64();
    say(&format!(
        "Snapshot done in {snap_s:.1}s. Making live changes for {duration}s..."
    ));

    let changes = live_changes(&crm, &shop, Duration::from_secs(duration)).await?;
    say(&format!("Made {changes} live changes (new orders, status changes, orders moving between accounts, deletes, new accounts that link existing people)."));

    // Wait until both slots have confirmed everything written so far.
    let ends = [
        (crm.clone(), "tributary_crm"),
        (shop.clone(), "tributary_shop"),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    for (url, slot) in &ends {
        let mut c = PgConnection::connect(url).await?;
        // The insert position: with synchronous_commit = off (as on the demo
        // clusters) the write position can lag commits that already happened.
        let end: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
            .fetch_one(&mut c)
            .await?;
        loop {
            let caught_up: bool = sqlx::query_scalar("select coalesce(confirmed_flush_lsn >= $1::pg_lsn, false) from pg_replication_slots where slot_name = $2")
                .bind(&end)
                .bind(slot)
                .fetch_one(&mut c)
                .await?;
            if caught_up || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (checked, mismatched) = verify_aggregates(&shop, &mut sinkc).await?;
    // The proof a user would run: reconcile the store against the sources.
    let store = crate::store::Store::connect(&cfg.sink).await?;
    let run = crate::reconcile::reconcile(
        &cfg,
        &store,
        &crate::reconcile::Options {
            source: None,
            repair: false,
            sample: None,
            wait: Duration::from_secs(60),
            progress: crate::progress::Progress::hidden(),
        },
    )
    .await?;
    let counts: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from tributary.profiles where merged_into is null),
                (select count(*) from tributary.profiles where merged_into is not null),
                (select count(*) from tributary.identities),
                (select count(*) from tributary.events),
                (select count(*) from tributary.dead_letters)",
    )
    .fetch_one(&mut sinkc)
    .await?;
    let sample: Vec<(i64, Value, Value)> = sqlx::query_as(
        "select profile_id, identities, traits from tributary.profile_view
          where identities ? 'crm_contact' and identities ? 'shop_account' and traits ? 'order_count'
          order by (traits ->> 'order_count')::int desc, profile_id limit 3",
    )
    .fetch_all(&mut sinkc)
    .await?;

    if json {
        let doc = serde_json::json!({
            "snapshot_seconds": snap_s, "live_changes": changes,
            "profiles": counts.0, "merged_profiles": counts.1, "identities": counts.2, "events": counts.3, "dead_letters": counts.4,
            "aggregates_checked": checked, "aggregates_mismatched": mismatched,
            "reconcile": run,
            "sample": sample.iter().map(|(p, i, t)| serde_json::json!({"profile_id": p, "identities": i, "traits": t})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("\nA few unified profiles (SELECT * FROM tributary.profile_view):");
        for (p, ids, traits) in &sample {
            println!("\n  profile {p}");
            println!("    identities {ids}");
            let t: BTreeMap<String, Value> =
                serde_json::from_value(traits.clone()).unwrap_or_default();
            for (k, v) in t {
                println!("    {k:<22} {v}");
            }
        }
        println!(
            "\nCounts: {} profiles ({} merged away), {} identities, {} events logged, {} dead letters.",
            counts.0, counts.1, counts.2, counts.3, counts.4
        );
        println!("Check: order_count and lifetime_value_cents of {checked} profiles compared with SQL over the shop's orders: {mismatched} differ.");
        println!("\n$ tributary reconcile");
        crate::reconcile::report::print_summary(&run);
    }

    if keep {
        println!("\n--keep: clusters stay up until Ctrl-C.\n  crm      {crm}\n  shop     {shop}\n  profiles {sink}   (schema tributary)");
        crate::app::stop_on_signal(shutdown.clone()).await;
    }
    shutdown.cancel();
    daemon.await??;
    drop(sinkc);
    tokio::task::spawn_blocking(move || drop(clusters)).await?;
    say("Stopped the daemon and removed the clusters.");
    Ok(u8::from(mismatched > 0 || run.unrepaired() > 0))
}

/// Random live changes for `duration`; returns how many rows changed.
async fn live_changes(crm: &str, shop: &str, duration: Duration) -> anyhow::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut crm = PgConnection::connect(crm).await?;
    let mut shop = PgConnection::connect(shop).await?;
    let until = Instant::now() + duration;
    let (mut n, mut next_order, mut next_account) = (0u64, 8001i64, 2501i64);
    while Instant::now() < until {
        let (conn, sql) = match rng.random_range(0..10) {
            0..=2 => {
                next_order += 1;
                (&mut shop, format!("insert into orders (id, account_id, status, total_cents) values ({next_order}, {}, 'paid', {})", rng.random_range(1..=2500), rng.random_range(500..20000)))
            }
            3..=4 => (&mut shop, format!("update orders set status = 'shipped', updated_at = now() where id = {}", rng.random_range(1..next_order))),
            5 => (&mut shop, format!("update orders set account_id = {}, updated_at = now() where id = {}", rng.random_range(1..=2500), rng.random_range(1..next_order))),
            6 => (&mut shop, format!("delete from orders where id = {}", rng.random_range(1..next_order))),
            7 => {
                // A CRM-only person (contacts 1..1000) orders in the shop: the order
                // arrives first (a shop-only profile), then the account carrying the
                // contact's email links the two, and they merge.
                next_account += 1;
                next_order += 1;
                let c: usize = rng.random_range(1..=1000);
                let email = format!("{}.{}{c}@example.com", FIRST[c % 10], LAST[c % 8]);
                (&mut shop, format!(
                    "insert into orders (id, account_id, status, total_cents) values ({next_order}, {next_account}, 'paid', 4200);
                     insert into accounts (id, email) values ({next_account}, '{email}')"
                ))
            }
            _ => (&mut crm, format!("update contacts set phone = '+1 555 {:04}', row_version = row_version + 1, modified_at = now() where id = {}", rng.random_range(0..10000), rng.random_range(1..=3000))),
        };
        let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(conn)
            .await?;
        n += r.rows_affected();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(n)
}

/// Compares every profile's order_count and lifetime_value_cents with SQL over
/// the shop's orders; returns (profiles checked, mismatches).
async fn verify_aggregates(shop: &str, sink: &mut PgConnection) -> anyhow::Result<(usize, usize)> {
    let mut s = PgConnection::connect(shop).await?;
    let per_account: Vec<(i64, i64, i64)> = sqlx::query_as(
        "select account_id, count(*), coalesce(sum(total_cents) filter (where status in ('paid', 'shipped')), 0)::bigint from orders group by account_id",
    )
    .fetch_all(&mut s)
    .await?;
    let owners: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "select value, profile_id from tributary.identities where kind = 'shop_account'",
    )
    .fetch_all(&mut *sink)
    .await?
    .into_iter()
    .collect();
    let mut want: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (a, c, v) in per_account {
        let e = want
            .entry(owners.get(&a.to_string()).copied().unwrap_or(-1))
            .or_default();
        e.0 += c;
        e.1 += v;
    }
    let got: BTreeMap<i64, (i64, i64)> = sqlx::query_as::<_, (i64, Value)>("select profile_id, traits from tributary.profiles where merged_into is null and traits ? 'order_count'")
        .fetch_all(&mut *sink)
        .await?
        .into_iter()
        .map(|(p, t)| (p, (t["order_count"].as_i64().unwrap_or(0), t.get("lifetime_value_cents").and_then(Value::as_i64).unwrap_or(0))))
        .collect();
    let keys: std::collections::BTreeSet<i64> = want.keys().chain(got.keys()).copied().collect();
    let bad: Vec<_> = keys
        .iter()
        .filter(|k| want.get(k) != got.get(k))
        .map(|k| (k, want.get(k), got.get(k)))
        .collect();
    for (p, w, g) in bad.iter().take(5) {
        tracing::error!(profile = p, expected = ?w, stored = ?g, "aggregate differs from SQL over the sources");
    }
    Ok((keys.len(), bad.len()))
}
