//! `replay` and `rebuild` from the event log: replaying into a healthy store
//! changes nothing; replay restores profiles deleted by a simulated bug (and
//! `--dry-run` only reports them); `rebuild` yields the same profiles,
//! identities and provenance row for row.

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::faults::{caught_up, Workload};
use crate::harness::*;

/// Everything derived, in a comparable form.
async fn dump(sink: &str, with_times: bool) -> Vec<String> {
    let mut c = PgConnection::connect(sink).await.unwrap();
    let time = if with_times { "updated_at::text" } else { "''" };
    let mut out: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select format('p %s %s %s|%s', profile_id, merged_into, traits::text, {time}) from tributary.profiles
         union all select format('i %s %s %s', kind, value, profile_id) from tributary.identities
         union all select format('f %s %s %s %s %s %s %s', profile_id, field, value::text, source, table_name, row_key, lsn)
           from tributary.profile_fields"
    )))
    .fetch_all(&mut c)
    .await
    .unwrap();
    out.sort();
    out
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_restores_damage_and_rebuild_reproduces_the_store() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "insert into contacts (id, email, first_name) select g, 'u' || g || '@x.com', 'Pre' || g from generate_series(1001, 1050) g").await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "rp"));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 3000, 11, |_| {}).await;
    wait_until("caught up", Duration::from_secs(60), || {
        caught_up(&shop, &sink, &w)
    })
    .await;
    assert_eq!(daemon.stop(), Some(0));
    let original = dump(&sink, true).await;
    assert!(original.len() > 300);

    // Replaying into a healthy store changes nothing, not even updated_at.
    for src in ["crm", "shop"] {
        let out = run_cmd(
            &cfg,
            &["--json", "replay", "--source", src, "--from-lsn", "0/0"],
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let r = json(&out);
        assert!(r["events"].as_u64().unwrap() > 100, "{r}");
        assert_eq!(r["profiles_changed"], serde_json::json!([]), "{r}");
    }
    assert_eq!(
        dump(&sink, true).await,
        original,
        "replay into a healthy store changed it"
    );

    // A bug deletes profiles behind the daemon's back.
    exec(&sink, "delete from tributary.profiles where profile_id in (select profile_id from tributary.profiles where merged_into is null order by profile_id limit 10)").await;
    exec(&sink, "update tributary.profiles set traits = traits || '{\"order_count\": 999}' where profile_id = (select max(profile_id) from tributary.profiles where merged_into is null and traits ? 'order_count')").await;
    let damaged = dump(&sink, false).await;
    let out = run_cmd(
        &cfg,
        &[
            "--json",
            "replay",
            "--source",
            "crm",
            "--from-lsn",
            "0/0",
            "--dry-run",
        ],
    );
    let r = json(&out);
    assert!(r["profiles_changed"].as_array().unwrap().len() >= 10, "{r}");
    assert_eq!(
        dump(&sink, false).await,
        damaged,
        "--dry-run wrote something"
    );
    for src in ["crm", "shop"] {
        let out = run_cmd(&cfg, &["replay", "--source", src, "--from-lsn", "0/0"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    assert_eq!(
        dump(&sink, false).await,
        dump_without_times(&original),
        "replay did not restore the damaged profiles"
    );

    // Rebuild from the log: the same profiles, identities and provenance, row for row.
    let out = run_cmd(&cfg, &["--json", "rebuild"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        dump(&sink, false).await,
        dump_without_times(&original),
        "rebuild differs from the original"
    );
}

/// The dump rows with the `updated_at` column blanked.
fn dump_without_times(rows: &[String]) -> Vec<String> {
    let mut out: Vec<String> = rows
        .iter()
        .map(|r| match r.rsplit_once('|') {
            Some((head, _)) if r.starts_with("p ") => format!("{head}|"),
            _ => r.clone(),
        })
        .collect();
    out.sort();
    out
}
