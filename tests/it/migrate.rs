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
