//! `tributary check`: a source without logical WAL exits 1 with the fix; a config
//! with an unknown key exits 2 naming the key and its line.

use tributary::cluster::ClusterOptions;

use crate::harness::*;

fn config(source_url: &str, sink_url: &str) -> String {
    format!(
        r#"
[sink]
url = "{sink_url}"

[[source]]
name = "crm"
url = "{source_url}"

  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email" }}
  fields = {{ first_name = "first_name" }}
"#
    )
}

#[tokio::test]
async fn check_fails_on_wal_level_replica_and_says_how_to_fix_it() {
    let pg = cluster_with(ClusterOptions {
        wal_level: "replica".into(),
        ..Default::default()
    });
    let src = create_db(&pg, "crm").await;
    exec(
        &src,
        "create table contacts (id bigint primary key, email text, first_name text)",
    )
    .await;
    let sink = create_db(&pg, "profiles").await;
    let cfg = write_config(&config(&src, &sink));
    let out = run_cmd(&cfg, &["check"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("wal_level is replica"), "{t}");
    assert!(
        t.contains("wal_level = logical"),
        "the fix must be named: {t}"
    );
    // The sink is not migrated yet: that is a failure with a fix too.
    assert!(t.contains("tributary migrate"), "{t}");

    let out = run_cmd(&cfg, &["check", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json is JSON");
    assert_eq!(doc["ok"], false);
    let wal = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "wal_level")
        .unwrap();
    assert_eq!(wal["ok"], false);
    assert_eq!(wal["target"], "source:crm");
}

#[tokio::test]
async fn check_passes_on_a_logical_source_and_migrated_sink() {
    let pg = cluster();
    let src = create_db(&pg, "crm").await;
    exec(
        &src,
        "create table contacts (id bigint primary key, email text, first_name text)",
    )
    .await;
    let sink = create_db(&pg, "profiles").await;
    let cfg = write_config(&config(&src, &sink));
    assert!(run_cmd(&cfg, &["migrate"]).status.success());
    let out = run_cmd(&cfg, &["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn unknown_config_key_exits_2_naming_key_and_line() {
    let cfg = write_config(
        "[sink]\nurl = \"postgres://127.0.0.1/x\"\n\n[[source]]\nname = \"crm\"\nurl = \"postgres://127.0.0.1/y\"\nslto = \"oops\"\n",
    );
    let out = run_cmd(&cfg, &["check"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("slto"), "{t}");
    assert!(t.contains("tributary.toml:7:"), "line 7 must be named: {t}");
}

fn checks(out: &std::process::Output) -> Vec<serde_json::Value> {
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json is not JSON ({e}): {}", text(out)));
    assert_eq!(
        doc["failed"].as_u64().unwrap(),
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ok"] == false)
            .count() as u64
    );
    assert_eq!(doc["ok"], doc["failed"] == 0);
    doc["checks"].as_array().unwrap().clone()
}

fn find<'a>(all: &'a [serde_json::Value], target: &str, check: &str) -> &'a serde_json::Value {
    all.iter()
        .find(|c| c["target"] == target && c["check"] == check)
        .unwrap_or_else(|| panic!("no {target} {check} in {all:#?}"))
}

/// Every preflight item of the contract is a named check in `check --json`,
/// each with the documented fields; a publication that does not publish
/// deletes, a slot of the wrong plugin, and a role without REPLICATION or the
/// right to create the publication each fail with a fix that names the SQL.
#[tokio::test]
async fn check_json_covers_every_preflight_item_with_a_fix_for_each_failure() {
    let pg = cluster();
    let src = create_db(&pg, "crm").await;
    exec(
        &src,
        "create table contacts (id bigint primary key, email text, first_name text);
         create publication tributary_crm for table contacts with (publish = 'insert, update');",
    )
    .await;
    exec(
        &src,
        "select pg_create_logical_replication_slot('tributary_crm', 'test_decoding')",
    )
    .await;
    let sink = create_db(&pg, "profiles").await;
    let cfg = write_config(&config(&src, &sink));
    assert!(run_cmd(&cfg, &["migrate"]).status.success());
    let out = run_cmd(&cfg, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = checks(&out);
    for c in &all {
        for field in ["target", "check", "ok", "detail"] {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        assert_eq!(
            c.get("fix").is_some(),
            c["ok"] == false,
            "a fix exactly for failures: {c}"
        );
    }
    for item in [
        "connect",
        "server_version",
        "wal_level",
        "replication_slots",
        "wal_senders",
        "replication_privilege",
        "table public.contacts",
        "publication",
        "slot",
    ] {
        find(&all, "source:crm", item);
    }
    assert_eq!(find(&all, "sink", "connect")["ok"], true);
    assert_eq!(find(&all, "sink", "migrated")["ok"], true);
    let publication = find(&all, "source:crm", "publication");
    assert_eq!(publication["ok"], false, "{publication}");
    assert!(
        publication["fix"]
            .as_str()
            .unwrap()
            .contains("publish = 'insert, update, delete, truncate'"),
        "{publication}"
    );
    let slot = find(&all, "source:crm", "slot");
    assert_eq!(slot["ok"], false, "{slot}");
    assert!(
        slot["detail"].as_str().unwrap().contains("test_decoding"),
        "{slot}"
    );

    // Fixed as the check says: everything passes.
    exec(
        &src,
        "alter publication tributary_crm set (publish = 'insert, update, delete, truncate')",
    )
    .await;
    exec(&src, "select pg_drop_replication_slot('tributary_crm')").await;
    let out = run_cmd(&cfg, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(checks(&out).iter().all(|c| c["ok"] == true));

    // A least-privilege mistake: a role that can read but not replicate, and
    // cannot create the publication (it owns no table).
    exec(
        &src,
        "create role reader login; grant select on contacts to reader; drop publication tributary_crm;",
    )
    .await;
    let as_reader = src.replace("postgres@", "reader@");
    let cfg = write_config(&config(&as_reader, &sink));
    let out = run_cmd(&cfg, &["check", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = checks(&out);
    let rep = find(&all, "source:crm", "replication_privilege");
    assert_eq!(rep["ok"], false);
    assert_eq!(rep["fix"], "ALTER ROLE reader WITH REPLICATION");
    let publication = find(&all, "source:crm", "publication");
    assert_eq!(publication["ok"], false);
    assert!(
        publication["fix"]
            .as_str()
            .unwrap()
            .contains("CREATE PUBLICATION \"tributary_crm\" FOR TABLE public.contacts"),
        "{publication}"
    );
    assert_eq!(
        find(&all, "source:crm", "table public.contacts")["ok"],
        true
    );
}
