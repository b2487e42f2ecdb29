//! `tributary migrate` creates every relation of the contract, idempotently.

use crate::harness::*;

#[tokio::test]
async fn migrate_creates_the_contract_relations_and_is_idempotent() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    let cfg = write_config(&format!(
        r#"
[sink]
url = "{sink}"
schema = "tributary"

[[source]]
name = "crm"
url = "{sink}"
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email" }}
"#
    ));
    for _ in 0..2 {
        let out = run_cmd(&cfg, &["migrate"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    for rel in [
        "profiles",
        "identities",
        "profile_fields",
        "checkpoints",
        "events",
        "reconcile_runs",
        "reconcile_drift",
        "dead_letters",
        "suppressions",
        "profile_view",
        "contributions",
    ] {
        let n: i64 = scalar(
            &sink,
            &format!("select count(*) from information_schema.tables where table_schema = 'tributary' and table_name = '{rel}'"),
        )
        .await;
        assert_eq!(n, 1, "relation {rel} missing");
    }
    let partitioned: bool =
        scalar(&sink, "select exists (select 1 from pg_partitioned_table p join pg_class c on c.oid = p.partrelid where c.relname = 'events')").await;
    assert!(partitioned, "events must be partitioned");
}

#[tokio::test]
async fn event_log_retention_drops_partitions_past_the_kept_months() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    let cfg = write_config(&format!(
        r#"
[sink]
url = "{sink}"
events_retention_months = 3

[[source]]
name = "crm"
url = "{sink}"
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email" }}
"#
    ));
    assert!(run_cmd(&cfg, &["migrate"]).status.success());
    exec(
        &sink,
        "create table tributary.events_y2020m01 partition of tributary.events for values from ('2020-01-01 00:00:00+00') to ('2020-02-01 00:00:00+00');
         insert into tributary.events (source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key)
         values ('crm', '0/1', '0/1', 0, 1, '2020-01-15', 'public.contacts', 'insert', '{\"id\": 1}')",
    )
    .await;
    let partitions = || async {
        scalar::<Vec<String>>(&sink, "select coalesce(array_agg(c.relname::text order by c.relname), '{}') from pg_inherits i join pg_class c on c.oid = i.inhrelid where i.inhparent = 'tributary.events'::regclass").await
    };
    let before = partitions().await;
    assert!(before.contains(&"events_y2020m01".to_owned()), "{before:?}");
    let out = run_cmd(&cfg, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = partitions().await;
    assert!(
        !after.contains(&"events_y2020m01".to_owned()),
        "old partition kept: {after:?}"
    );
    // Last month, this month and the months ahead stay.
    assert_eq!(after.len(), before.len() - 1, "{before:?} -> {after:?}");
    let old: i64 = scalar(
        &sink,
        "select count(*) from tributary.events where commit_time < '2021-01-01'",
    )
    .await;
    assert_eq!(old, 0);
}
