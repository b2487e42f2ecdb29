//! Rows that cannot be mapped go to dead_letters with the reason; the rest of
//! the stream (even the same transaction) applies, and `status` counts them;
//! the log says which table and why, never the row's values.

use std::time::Duration;

use crate::harness::*;

#[tokio::test]
async fn bad_rows_become_dead_letters_and_the_stream_goes_on() {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, "dl").replace(
        "[identity.email]",
        "[merge]\nmax_identities = 3\n\n[identity.email]",
    ));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;

    // One transaction mixing good and bad rows.
    exec(
        &crm,
        "begin;
         insert into contacts (id, email, first_name) values (1, 'good@x.com', 'Good');
         insert into contacts (id, email, first_name) values (2, 'not-an-email', 'Bad');
         commit;",
    )
    .await;
    exec(&shop, "insert into orders (id, account_id, status, total_cents) values (1, null, 'paid', 100), (2, 7, 'paid', 200)").await;
    wait_until("good rows applied", Duration::from_secs(30), || async {
        traits_of(&sink, "email", "good@x.com")
            .await
            .is_some_and(|t| t["first_name"] == "Good")
            && traits_of(&sink, "shop_account", "7")
                .await
                .is_some_and(|t| t["order_count"] == 1)
    })
    .await;
    wait_until("dead letters written", Duration::from_secs(30), || async {
        scalar::<i64>(&sink, "select count(*) from tributary.dead_letters").await == 2
    })
    .await;
    let email_err: String = scalar(
        &sink,
        "select error from tributary.dead_letters where table_name = 'public.contacts'",
    )
    .await;
    assert!(
        email_err.contains("not-an-email") && email_err.contains("email"),
        "{email_err}"
    );
    let order_err: String = scalar(&sink, "select error || ' ' || row::text || ' ' || source from tributary.dead_letters where table_name = 'public.orders'").await;
    assert!(
        order_err.contains("no identifier")
            && order_err.contains("\"id\": 1")
            && order_err.contains("shop"),
        "{order_err}"
    );
    // A row that would give a profile a 4th identifier (merge.max_identities = 3).
    exec(
        &shop,
        "insert into accounts (id, email) values (8, 'good@x.com')",
    )
    .await; // 3: email, crm_contact 1, shop_account 8
    exec(
        &shop,
        "insert into accounts (id, email) values (9, 'good@x.com')",
    )
    .await; // would be 4
    wait_until("merge-limit dead letter", Duration::from_secs(30), || async {
        scalar::<i64>(&sink, "select count(*) from tributary.dead_letters where error like '%max_identities = 3%'").await == 1
    })
    .await;
    assert!(
        traits_of(&sink, "shop_account", "9").await.is_none(),
        "the refused row linked nothing"
    );
    assert!(traits_of(&sink, "shop_account", "8").await.is_some());

    // The bad row left no trace in the profiles.
    assert!(traits_of(&sink, "crm_contact", "2").await.is_none());

    let out = run_cmd(&cfg, &["status", "--json"]);
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(doc["dead_letters"], 3, "{doc}");
    let log = daemon.log.clone();
    assert_eq!(daemon.stop(), Some(0));

    // The WARN names the table, LSN and reason, never the row's values: no
    // identifier or other row data in the log at INFO or above.
    let log = std::fs::read_to_string(log).unwrap();
    let above_debug: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .collect();
    assert!(
        above_debug
            .iter()
            .any(|l| l.contains("rows sent to dead_letters") && l.contains("public.contacts")),
        "no WARN for the dead letters:\n{log}"
    );
    let leaks: Vec<&&str> = above_debug
        .iter()
        .filter(|l| l.contains("not-an-email") || l.contains("Bad"))
        .collect();
    assert!(leaks.is_empty(), "row data logged above DEBUG: {leaks:#?}");
}
