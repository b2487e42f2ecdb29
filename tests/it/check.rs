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
