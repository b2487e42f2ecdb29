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
