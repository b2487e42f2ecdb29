//! `tributary report [RUN_ID|latest]`: the recorded runs, or one run's drift
//! field by field, read back from `reconcile_runs` and `reconcile_drift`.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;

use super::RunReport;
use crate::store::Store;

/// One row of `reconcile_runs`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Run {
    /// Run id.
    pub run_id: i64,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End (None while running).
    pub finished_at: Option<DateTime<Utc>>,
    /// `--source`, if given.
    pub source: Option<String>,
    /// Source rows covered.
    pub rows_checked: i64,
    /// Profiles compared.
    pub profiles_checked: i64,
    /// Drifted values.
    pub drift_count: i64,
    /// Repaired.
    pub repaired_count: i64,
    /// Rows that kept changing.
    pub unverified: i64,
    /// `running`, `clean`, `drift`, `repaired` or `failed`.
    pub status: String,
    /// Anchor per source.
    pub as_of: Json<Value>,
}

/// One row of `reconcile_drift`.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DriftRow {
    /// Profile.
    pub profile_id: Option<i64>,
    /// Field (see [`super::Drift::field`]).
    pub field: String,
    /// Expected value.
    pub expected: Option<Json<Value>>,
    /// Stored value.
    pub actual: Option<Json<Value>>,
    /// `missing`, `extra` or `mismatch`.
    pub kind: String,
    /// Fixed by `--repair`.
    pub repaired: bool,
}

/// One run with its drift.
#[derive(Debug, Serialize)]
pub struct RunDetail {
    /// The run.
    #[serde(flatten)]
    pub run: Run,
    /// Its drift.
    pub drift: Vec<DriftRow>,
}

const RUN_COLUMNS: &str = "run_id, started_at, finished_at, source, rows_checked, profiles_checked, drift_count, repaired_count, unverified, status, as_of";

/// The most recent runs, newest first.
pub async fn runs(store: &Store, limit: i64) -> Result<Vec<Run>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {RUN_COLUMNS} from reconcile_runs order by run_id desc limit $1"
    )))
    .bind(limit)
    .fetch_all(store.pool())
    .await
}

/// One run (`None`: the latest) with its drift.
pub async fn run(store: &Store, run_id: Option<i64>) -> Result<Option<RunDetail>, sqlx::Error> {
    let run: Option<Run> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {RUN_COLUMNS} from reconcile_runs where run_id = coalesce($1, (select max(run_id) from reconcile_runs))"
    )))
    .bind(run_id)
    .fetch_optional(store.pool())
    .await?;
    let Some(run) = run else { return Ok(None) };
    let drift = sqlx::query_as(
        "select profile_id, field, expected, actual, kind, repaired from reconcile_drift where run_id = $1
          order by profile_id nulls first, field",
    )
    .bind(run.run_id)
    .fetch_all(store.pool())
    .await?;
    Ok(Some(RunDetail { run, drift }))
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
