//! A database user of a source who can create functions in a schema on the
//! default search path (`public`, before PostgreSQL 15 anyone could) must not
//! get code run by Tributary's sessions, which run as the replication role.
//! The classic attack (CVE-2018-1058) is an overload that matches the call's
//! argument types better than the built-in: `hashtextextended(text, integer)`
//! beats `pg_catalog.hashtextextended(text, bigint)` for a literal `0`, and
//! `to_json(bigint)` beats the polymorphic `pg_catalog.to_json(anyelement)`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::*;

/// Overloads that record who called them. In a read-only transaction (a
/// snapshot, a reconcile read) the insert fails, which fails the caller's
/// statement: either way a call is seen.
const HOSTILE: &str = r#"
create table public.hostile_calls (fn text not null, caller text not null, at timestamptz not null default now());
grant insert on public.hostile_calls to public;
create function public.hashtextextended(t text, seed integer) returns bigint language plpgsql as $$
begin
  insert into public.hostile_calls (fn, caller) values ('hashtextextended', current_user);
  return 0;
end $$;
create function public.to_json(v bigint) returns json language plpgsql as $$
begin
  insert into public.hostile_calls (fn, caller) values ('to_json', current_user);
  return pg_catalog.to_json(v::text);
end $$;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_resolves_a_function_a_source_user_planted() {
    let pg = cluster();
    let src = create_db(&pg, "hostile").await;
    let sink = create_db(&pg, "profiles").await;
    exec(
        &src,
        "create table people (id bigint primary key, email text, score integer, note text);
         insert into people select g, 'p' || g || '@x.com', g, 'n' || g from generate_series(1, 50) g;",
    )
    .await;
    exec(&src, HOSTILE).await;
    // The planted functions are what an unqualified call in a default session
    // resolves to: the test would prove nothing if they were not.
    exec(&src, "select hashtextextended('x', 0), to_json(1::bigint)").await;
    let planted: i64 = scalar(&src, "select count(*) from hostile_calls").await;
    assert_eq!(
        planted, 2,
        "the overloads are not what a default session calls"
    );
    exec(&src, "truncate hostile_calls").await;

    let cfg = write_config(&source_config(
        &sink,
        ("hostile", &src, "hostile"),
        &format!(
            "{EMAIL}{}",
            people_table("score = \"score\", note = \"note\"")
        ),
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 1).await;
    exec(&src, "update people set note = 'changed' where id = 7").await;
    wait_until(
        "snapshot and stream applied",
        Duration::from_secs(60),
        || async {
            traits_of(&sink, "email", "p7@x.com")
                .await
                .is_some_and(|t| t["note"] == json!("changed"))
        },
    )
    .await;

    // Every command that reads the source: check, a table re-snapshot, reconcile, status.
    let out = run_cmd(&cfg, &["check"]);
    assert!(out.status.success(), "check: {}", text(&out));
    let out = run_cmd(
        &cfg,
        &[
            "--json",
            "snapshot",
            "--source",
            "hostile",
            "--table",
            "public.people",
        ],
    );
    assert!(out.status.success(), "snapshot: {}", text(&out));
    let out = run_cmd(&cfg, &["--json", "reconcile", "--wait-secs", "60"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reconcile: {e}: {}", text(&out)));
    assert_eq!(
        (
            out.status.code(),
            report["drift_count"].clone(),
            report["rows_checked"].clone()
        ),
        (Some(0), json!(0), json!(50)),
        "{report}"
    );
    let out = run_cmd(&cfg, &["--json", "status"]);
    assert!(out.status.success(), "status: {}", text(&out));
    assert_eq!(daemon.stop(), Some(0));

    let calls: Vec<(String, String)> =
        sqlx_rows(&src, "select fn, caller from hostile_calls").await;
    assert!(calls.is_empty(), "planted functions were called: {calls:?}");
    assert_eq!(
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.profiles where merged_into is null"
        )
        .await,
        50
    );
}

async fn sqlx_rows(url: &str, sql: &'static str) -> Vec<(String, String)> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_as(sql).fetch_all(&mut c).await.unwrap()
}
