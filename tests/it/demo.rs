//! `tributary demo` runs on nothing but the local server binaries and shows
//! unified profiles whose aggregates match the sources.

use crate::harness::*;

#[test]
fn demo_runs_and_shows_unified_profiles() {
    let out = bin()
        .args(["--json", "demo", "--duration", "3"])
        .output()
        .expect("run demo");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert!(doc["profiles"].as_i64().unwrap() > 3000, "{doc}");
    assert!(
        doc["merged_profiles"].as_i64().unwrap() > 0,
        "live changes link existing people: {doc}"
    );
    assert_eq!(doc["aggregates_mismatched"], 0, "{doc}");
    assert_eq!(doc["reconcile"]["drift_count"], 0, "{doc}");
    assert_eq!(doc["reconcile"]["status"], "clean", "{doc}");
    assert!(
        doc["reconcile"]["rows_checked"].as_u64().unwrap() > 10_000,
        "{doc}"
    );
    assert!(doc["aggregates_checked"].as_i64().unwrap() > 2000, "{doc}");
    let sample = doc["sample"].as_array().unwrap();
    assert!(!sample.is_empty());
    for p in sample {
        assert!(
            p["identities"]["crm_contact"].is_array() && p["identities"]["shop_account"].is_array(),
            "{p}"
        );
        assert!(
            p["traits"]["first_name"].is_string() && p["traits"]["order_count"].is_i64(),
            "{p}"
        );
        assert!(
            p["traits"]["marketing_opt_in"].is_boolean(),
            "booleans stay booleans: {p}"
        );
    }
}

/// The demo's clusters (and the tests') trust every connection they accept,
/// so they must accept only local ones: TCP on loopback, and `pg_hba.conf`
/// rules for loopback addresses and the Unix socket alone.
#[tokio::test]
async fn the_throwaway_clusters_accept_only_local_connections() {
    let pg = cluster();
    let url = pg.url("postgres");
    assert_eq!(
        scalar::<String>(&url, "show listen_addresses").await,
        "127.0.0.1"
    );
    let foreign: Vec<String> = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query_scalar(
            "select type || ' ' || coalesce(address, '') || '/' || coalesce(netmask, '')
               from pg_hba_file_rules
              where type <> 'local'
                and not (address in ('127.0.0.1', '::1')
                         and netmask in ('255.255.255.255', 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff'))",
        )
        .fetch_all(&mut c)
        .await
        .unwrap()
    };
    assert!(
        foreign.is_empty(),
        "rules for non-local clients: {foreign:?}"
    );
}
