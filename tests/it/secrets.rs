//! Secrets come only from the environment and never appear in logs, `--json`
//! output or error messages.

use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn passwords_never_appear_in_logs_json_or_errors() {
    const PW: &str = "Sup3r-Secret-PW-91827";
    let pg = cluster();
    let admin = pg.url("postgres");
    exec(&admin, &format!("set password_encryption = 'scram-sha-256'; create role app with login replication superuser password '{PW}'")).await;
    pg.set_hba("local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all app 127.0.0.1/32 scram-sha-256\n").unwrap();
    let (crm, shop, sink) = two_sources(&pg).await;
    // The config names the variable; the value is only in the environment.
    std::env::set_var("TRIBUTARY_TEST_SECRET_PW", PW);
    let with_pw = |url: &str| {
        url.replace(
            "postgres://postgres@",
            "postgres://app:${TRIBUTARY_TEST_SECRET_PW}@",
        )
    };
    let cfg = write_config(&pipeline_config(
        &with_pw(&crm),
        &with_pw(&shop),
        &with_pw(&sink),
        "sec",
    ));
    assert!(!std::fs::read_to_string(&*cfg).unwrap().contains(PW));

    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (1, 'a@x.com', 'Ann')",
    )
    .await;
    wait_until("streamed", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "a@x.com").await.is_some()
    })
    .await;
    let status = run_cmd(&cfg, &["status", "--json"]);
    let check = run_cmd(&cfg, &["check", "--json"]);
    let log = daemon.log_text();
    assert_eq!(daemon.stop(), Some(0));
    assert!(log.contains("streaming"), "{log}");
    for (what, out) in [
        ("daemon log", log),
        ("status --json", text(&status)),
        ("check --json", text(&check)),
    ] {
        assert!(!out.contains(PW), "the password appears in {what}:\n{out}");
    }
    assert!(
        text(&check).contains(":***@"),
        "URLs are shown redacted: {}",
        text(&check)
    );

    // A wrong password fails with a clear error that does not echo it.
    std::env::set_var("TRIBUTARY_TEST_SECRET_PW", "Wrong-Guess-PW-55555");
    let out = run_cmd(&cfg, &["run"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("password authentication failed"), "{t}");
    assert!(
        !t.contains("Wrong-Guess-PW-55555") && !t.contains(PW),
        "{t}"
    );
    std::env::remove_var("TRIBUTARY_TEST_SECRET_PW");
}
