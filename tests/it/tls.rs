//! TLS to a server whose certificate comes from a test CA generated here:
//! verify-full (with SCRAM channel binding), verify-ca, require, and clear
//! failures for a wrong CA and a host name the certificate does not name.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use sqlx::Connection;
use tributary::conninfo::ConnInfo;
use tributary::pgwire::PgConn;

use crate::harness::*;

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

#[tokio::test]
async fn tls_verify_full_with_scram_and_clear_failures() {
    let pg = cluster();
    let (ca_params, ca_key, ca_pem) = ca("tributary test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    pg.write_server_file("server.crt", server_cert.pem().as_bytes(), 0o644)
        .unwrap();
    pg.write_server_file("server.key", server_key.serialize_pem().as_bytes(), 0o600)
        .unwrap();
    let admin = pg.url("postgres");
    for sql in [
        "alter system set ssl = on",
        "alter system set ssl_cert_file = 'server.crt'",
        "alter system set ssl_key_file = 'server.key'",
        "set password_encryption = 'scram-sha-256'; create role rep with login replication password 'tls-pw'",
        "select pg_reload_conf()",
    ] {
        exec(&admin, sql).await;
    }
    // TCP connections other than the harness's superuser must use TLS and SCRAM.
    pg.set_hba("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhostssl all rep 127.0.0.1/32 scram-sha-256\n").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let (_, _, other_pem) = ca("some other CA");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other_pem).unwrap();
    let url = |host: &str, mode: &str, ca: &std::path::Path| -> ConnInfo {
        format!(
            "postgres://rep:tls-pw@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            pg.port(),
            ca.display()
        )
        .parse()
        .unwrap()
    };

    // verify-full: chain and name checked; SCRAM-SHA-256-PLUS binds to the TLS channel.
    let good = url("127.0.0.1", "verify-full", &ca_file);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match PgConn::connect(&good, true).await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e; // the reload may not have taken effect yet
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("verify-full replication connection failed: {e}"),
        }
    };
    assert_eq!(conn.simple_query("IDENTIFY_SYSTEM").await.unwrap().len(), 1);
    // sqlx (snapshot reads, check, the store) honours the same URL.
    let mut q = sqlx::PgConnection::connect_with(&good.pg_options())
        .await
        .expect("sqlx over verify-full");
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&mut q)
        .await
        .unwrap();
    assert!(ssl);

    // A certificate from another CA is refused, and the error says so.
    let err = PgConn::connect(&url("127.0.0.1", "verify-full", &other_file), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TLS") && err.contains("UnknownIssuer"),
        "{err}"
    );
    // A host name the certificate does not name: verify-full refuses, verify-ca accepts.
    let err = PgConn::connect(&url("localhost", "verify-full", &ca_file), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TLS") && err.contains("not valid for name \"localhost\""),
        "{err}"
    );
    PgConn::connect(&url("localhost", "verify-ca", &ca_file), true)
        .await
        .expect("verify-ca checks the chain only");
    // require: encrypted without checking; plain TCP is refused by hostssl.
    PgConn::connect(&url("127.0.0.1", "require", &other_file), true)
        .await
        .expect("require does not check the chain");
    let err = PgConn::connect(&url("127.0.0.1", "disable", &ca_file), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pg_hba.conf") || err.contains("no encryption"),
        "{err}"
    );
    assert!(!err.contains("tls-pw"), "no password in errors: {err}");
}
