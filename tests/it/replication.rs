//! The replication client against a real server: SCRAM login (and its
//! failures), slot creation with an exported snapshot, streaming pgoutput.

use std::time::Duration;

use tributary::conninfo::ConnInfo;
use tributary::event::Op;
use tributary::pgoutput::Decoded;
use tributary::pgwire::{PgConn, PgWireError};
use tributary::source::{Replication, StreamItem};

use crate::harness::*;

#[tokio::test]
async fn scram_login_succeeds_and_failures_say_what_is_wrong() {
    let pg = cluster();
    exec(&pg.url("postgres"), "set password_encryption = 'scram-sha-256'; create role rep with login replication password 's3cret-pw'").await;
    pg.set_hba("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n").unwrap();
    let base = format!(
        "postgres://rep:s3cret-pw@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let good: ConnInfo = base.parse().unwrap();
    let mut conn = PgConn::connect(&good, true).await.expect("SCRAM login");
    let rows = conn.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0][2].as_deref().unwrap().contains('/'),
        "xlogpos is an LSN: {:?}",
        rows[0]
    );

    let wrong: ConnInfo = base.replace("s3cret-pw", "nope").parse().unwrap();
    let err = PgConn::connect(&wrong, true).await.unwrap_err();
    assert!(matches!(err, PgWireError::Auth { .. }), "{err:?}");
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    assert!(
        !err.to_string().contains("nope"),
        "the password never appears in errors"
    );

    let none: ConnInfo = base.replace(":s3cret-pw", "").parse().unwrap();
    let err = PgConn::connect(&none, true).await.unwrap_err().to_string();
    assert!(
        err.contains("asks for a password") && err.contains("${VAR}"),
        "{err}"
    );

    let tls: ConnInfo = base
        .replace("sslmode=disable", "sslmode=require")
        .parse()
        .unwrap();
    let err = PgConn::connect(&tls, true).await.unwrap_err().to_string();
    assert!(
        err.contains("does not accept TLS") && err.contains("sslmode"),
        "{err}"
    );
}

#[tokio::test]
async fn a_slot_streams_decoded_changes_with_unchanged_toast_marked() {
    let pg = cluster();
    let db = create_db(&pg, "crm").await;
    exec(&db, CRM_SCHEMA).await;
    exec(&db, "create publication p for table contacts").await;
    let cfg = tributary::config::Config::parse(
        &pipeline_config(&db, &db, &db, "r")
            .replace("slot = \"crm_r\"", "slot = \"s1\"")
            .replace("publication = \"crm_r\"", "publication = \"p\""),
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let src = cfg.source("crm").unwrap();
    let mut rep = Replication::connect(src).await.unwrap();
    let slot = rep.create_slot("s1").await.unwrap();
    assert!(!slot.snapshot_name.is_empty());
    exec(&db, "insert into contacts (id, email, bio) values (1, 'a@x.com', (select string_agg(md5(g::text), '') from generate_series(1, 1000) g))").await;
    exec(&db, "update contacts set first_name = 'Ann' where id = 1").await;
    exec(
        &db,
        "insert into contacts (id, email) values (2, 'b@x.com'), (3, 'c@x.com')",
    )
    .await;
    rep.start("s1", "p", slot.consistent_point).await.unwrap();

    let mut changes = Vec::new();
    let mut commits = 0;
    while commits < 3 {
        let item = tokio::time::timeout(Duration::from_secs(10), rep.next())
            .await
            .expect("stream stalled")
            .unwrap();
        if let StreamItem::Decoded(items) = item {
            for d in items {
                match d {
                    Decoded::Change(e) => changes.push(e),
                    Decoded::Commit { .. } => commits += 1,
                    _ => {}
                }
            }
        }
    }
    assert_eq!(
        changes.iter().map(|e| e.op).collect::<Vec<_>>(),
        vec![Op::Insert, Op::Update, Op::Insert, Op::Insert]
    );
    assert_eq!(changes[0].row["bio"].as_str().map(str::len), Some(32_000));
    assert_eq!(
        changes[1].unchanged,
        vec!["bio".to_owned()],
        "the untouched TOASTed bio is marked unchanged"
    );
    assert!(!changes[1].row.contains_key("bio"));
    assert_eq!(changes[1].row["first_name"], "Ann");
    // A multi-row insert: one transaction, distinct positions, same commit LSN.
    assert_eq!(changes[2].commit_lsn, changes[3].commit_lsn);
    assert_eq!((changes[2].seq, changes[3].seq), (0, 1));
    assert!(
        changes[0].commit_lsn < changes[1].commit_lsn
            && changes[1].commit_lsn < changes[2].commit_lsn
    );
    rep.close().await;
}
