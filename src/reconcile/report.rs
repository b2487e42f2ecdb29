//! `tributary report [RUN_ID|latest]`: the recorded runs, or one run's drift
//! field by field, read back from `reconcile_runs` and `reconcile_drift`.

use serde_json::Value;

use super::RunReport;
use crate::store::Store;

pub use crate::store::reconcile::{DriftRow, Run, RunDetail};

/// The most recent runs, newest first.
pub async fn runs(store: &Store, limit: i64) -> Result<Vec<Run>, sqlx::Error> {
    store.reconcile_runs(limit).await
}

/// One run (`None`: the latest) with its drift.
pub async fn run(store: &Store, run_id: Option<i64>) -> Result<Option<RunDetail>, sqlx::Error> {
    store.reconcile_run(run_id).await
}

/// Prints the runs as a table.
pub fn print_runs(runs: &[Run]) {
    if runs.is_empty() {
        println!("no reconciliation runs yet (run `tributary reconcile`)");
        return;
    }
    println!(
        "{:>6}  {:<20}  {:<9}  {:>10}  {:>9}  {:>6}  {:>8}  {:>10}  source",
        "run", "started", "status", "rows", "profiles", "drift", "repaired", "unverified"
    );
    for r in runs {
        println!(
            "{:>6}  {:<20}  {:<9}  {:>10}  {:>9}  {:>6}  {:>8}  {:>10}  {}",
            r.run_id,
            r.started_at.format("%Y-%m-%d %H:%M:%S"),
            r.status,
            r.rows_checked,
            r.profiles_checked,
            r.drift_count,
            r.repaired_count,
            r.unverified,
            r.source.as_deref().unwrap_or("all")
        );
    }
}

/// Prints one run and its drift, field by field.
pub fn print_run(d: &RunDetail) {
    let r = &d.run;
    println!(
        "run {}: {}, started {}, {} rows and {} profiles checked, {} drifted, {} repaired, {} unverified",
        r.run_id,
        r.status,
        r.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        r.rows_checked,
        r.profiles_checked,
        r.drift_count,
        r.repaired_count,
        r.unverified
    );
    println!("as of: {}", r.as_of.0);
    print_drift(d.drift.iter().map(|x| {
        (
            x.profile_id,
            x.field.as_str(),
            x.kind.as_str(),
            x.expected.as_ref().map(|j| &j.0),
            x.actual.as_ref().map(|j| &j.0),
            x.repaired,
        )
    }));
}

/// Prints a finished run's summary (the `reconcile` command's output).
pub fn print_summary(r: &RunReport) {
    let as_of = r
        .as_of
        .iter()
        .map(|(s, l)| format!("{s} {l}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "reconcile run {} ({}): {} rows and {} profiles checked in {:.1} s (as of {as_of})",
        r.run_id, r.status, r.rows_checked, r.profiles_checked, r.seconds
    );
    println!(
        "  {} drifted, {} repaired, {} unverified (kept changing)",
        r.drift_count, r.repaired_count, r.unverified
    );
    print_drift(r.drifts.iter().take(50).map(|x| {
        (
            x.profile_id,
            x.field.as_str(),
            x.kind.as_str(),
            x.expected.as_ref(),
            x.actual.as_ref(),
            x.repaired,
        )
    }));
    if r.drifts.len() > 50 {
        println!(
            "  … {} more: `tributary report {}`",
            r.drifts.len() - 50,
            r.run_id
        );
    }
}

/// One drift line: profile, field, kind, expected, actual, repaired.
type Line<'a> = (
    Option<i64>,
    &'a str,
    &'a str,
    Option<&'a Value>,
    Option<&'a Value>,
    bool,
);

fn print_drift<'a>(rows: impl Iterator<Item = Line<'a>>) {
    let show = |v: Option<&Value>| v.map_or_else(|| "—".to_owned(), Value::to_string);
    for (p, field, kind, e, a, repaired) in rows {
        println!(
            "  profile {:<8} {:<28} {:<8} expected {}  actual {}{}",
            p.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            field,
            kind,
            show(e),
            show(a),
            if repaired { "  (repaired)" } else { "" }
        );
    }
}
