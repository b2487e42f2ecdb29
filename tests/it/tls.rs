//! TLS to a server whose certificate comes from a test CA generated here:
//! verify-full (with SCRAM channel binding, required or not), verify-ca,
//! require (checking the chain when given a root certificate), and clear
//! failures for a wrong CA and a host name the certificate does not name; a
//! password never sent without TLS unless sslmode=disable; a server that
//! accepts a login before it proved itself in SCRAM is refused.

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
    // require with sslrootcert checks the chain, as libpq does (both paths);
    // without a root certificate it encrypts without checking.
    let err = PgConn::connect(&url("127.0.0.1", "require", &other_file), true)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(
        sqlx::PgConnection::connect_with(&url("127.0.0.1", "require", &other_file).pg_options())
            .await
            .is_err(),
        "the SQL path trusted another CA under require"
    );
    PgConn::connect(&url("127.0.0.1", "require", &ca_file), true)
        .await
        .expect("require with the right root certificate");
    let unchecked: ConnInfo = format!(
        "postgres://rep:tls-pw@127.0.0.1:{}/postgres?sslmode=require",
        pg.port()
    )
    .parse()
    .unwrap();
    PgConn::connect(&unchecked, true)
        .await
        .expect("require without sslrootcert does not check the chain");
    // channel_binding=require: the SCRAM exchange is bound to the certificate.
    let bound = format!(
        "postgres://rep:tls-pw@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}&channel_binding=require",
        pg.port(),
        ca_file.display()
    )
    .parse::<ConnInfo>()
    .unwrap();
    PgConn::connect(&bound, true)
        .await
        .expect("channel_binding=require over verify-full");
    // Plain TCP is refused by hostssl.
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

/// A password goes over an unencrypted connection only with sslmode=disable
/// chosen explicitly: under the default (prefer) a server without TLS is
/// refused on both paths, whatever authentication it would ask for.
#[tokio::test]
async fn a_password_is_never_sent_without_tls_unless_sslmode_is_disable() {
    let pg = cluster(); // no ssl
    exec(
        &pg.url("postgres"),
        "create role clear with login replication password 'clear-pw'",
    )
    .await;
    pg.set_hba("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all clear 127.0.0.1/32 password\n")
        .unwrap();
    let url = |mode: &str| -> ConnInfo {
        format!(
            "postgres://clear:clear-pw@127.0.0.1:{}/postgres{mode}",
            pg.port()
        )
        .parse()
        .unwrap()
    };
    for mode in ["", "?sslmode=prefer", "?sslmode=allow"] {
        let err = PgConn::connect(&url(mode), true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not accept TLS") && err.contains("sslmode=disable"),
            "{mode}: {err}"
        );
        assert!(
            sqlx::PgConnection::connect_with(&url(mode).pg_options())
                .await
                .is_err(),
            "{mode}: the SQL path sent the password without TLS"
        );
    }
    PgConn::connect(&url("?sslmode=disable"), true)
        .await
        .expect("sslmode=disable allows it, explicitly");
}

/// A server (or something in its place) that answers a SCRAM login with
/// "authentication ok" before it proved it knows the password's verifier is
/// refused: otherwise anyone in the middle could accept every login.
#[tokio::test]
async fn a_login_accepted_before_the_server_proved_itself_in_scram_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let len = s.read_i32().await.unwrap();
        let mut startup = vec![0; usize::try_from(len).unwrap() - 4];
        s.read_exact(&mut startup).await.unwrap();
        // AuthenticationSASL offering SCRAM-SHA-256.
        let mech = b"SCRAM-SHA-256\0\0";
        s.write_u8(b'R').await.unwrap();
        s.write_i32(8 + i32::try_from(mech.len()).unwrap())
            .await
            .unwrap();
        s.write_i32(10).await.unwrap();
        s.write_all(mech).await.unwrap();
        // The client's first SCRAM message.
        let tag = s.read_u8().await.unwrap();
        assert_eq!(tag, b'p');
        let len = s.read_i32().await.unwrap();
        let mut first = vec![0; usize::try_from(len).unwrap() - 4];
        s.read_exact(&mut first).await.unwrap();
        // "Authentication ok" at once, and ready.
        s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let info: ConnInfo = format!("postgres://rep:pw@127.0.0.1:{port}/postgres?sslmode=disable")
        .parse()
        .unwrap();
    let err = PgConn::connect(&info, true)
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("before it proved")),
        "{err:?}"
    );
    fake.abort();
}
