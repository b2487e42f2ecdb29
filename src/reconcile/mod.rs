//! `tributary reconcile`: proof that the profile store matches the sources,
//! and the repair when it does not.
//!
//! Two passes, each with the daemon's own code:
//! * rows ([`rows`]): every mapped source table against the store's
//!   contributions, by key-bucket hashes first and row by row only where they
//!   differ, anchored to a WAL position per source;
//! * profiles ([`profiles`]): every profile's stored traits, aggregates,
//!   provenance and identity ownership against a recomputation from its
//!   contributions.
//!
//! A run is recorded in `reconcile_runs` and its drift, field by field, in
//! `reconcile_drift`. `--repair` re-reads drifted rows from the source between
//! watermarks and applies them through the normal apply path, re-derives the
//! drifted profiles, then checks them again and records how many were fixed.
//!
//! The identity graph only grows (an old email stays linked to its person), so
//! identities that no current row carries are not drift.

pub mod profiles;
pub mod report;
pub mod rows;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sqlx::Connection;

use crate::config::{Config, SourceConfig, TableConfig};
use crate::event::Lsn;
use crate::mapping::Mapper;
use crate::resnapshot::{apply_read, wait_until_applied};
use crate::resolve::ProfileId;
use crate::source::query_conn;
use crate::source::read::{prepare_session, TableReader};
use crate::store::Store;

/// How a stored value differs from the expected one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftKind {
    /// Expected but absent from the store.
    Missing,
    /// In the store but not expected.
    Extra,
    /// Both present, different.
    Mismatch,
}

impl DriftKind {
    /// The `reconcile_drift.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Extra => "extra",
            DriftKind::Mismatch => "mismatch",
        }
    }
}

/// How a drift is repaired.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fix {
    /// Re-derive the profile from its contributions.
    Rederive(ProfileId),
    /// Read the row again from the source and apply it.
    Row {
        /// Source name.
        source: String,
        /// `schema.table`.
        table: String,
        /// Canonical row key.
        row_key: String,
    },
}

/// One drifted value.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// The profile concerned (None for a source row the store never linked).
    pub profile_id: Option<ProfileId>,
    /// A trait name; `profile`; `provenance.<field>`; `identity.<kind>:<value>`;
    /// or `row <source>/<table> <key>` for a source row.
    pub field: String,
    /// What the sources say.
    pub expected: Option<Value>,
    /// What the store holds.
    pub actual: Option<Value>,
    /// How they differ.
    pub kind: DriftKind,
    /// `--repair` fixed it (a check after the repair no longer finds it).
    pub repaired: bool,
    /// How to repair it.
    #[serde(skip)]
    pub fix: Fix,
}

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only this source's tables (profiles are always checked).
    pub source: Option<String>,
    /// Repair what drifted.
    pub repair: bool,
    /// Check only about this many rows per table, and their profiles.
    pub sample: Option<u64>,
    /// How long to wait for the daemon to pass an anchor.
    pub wait: Duration,
    /// Progress bars (hidden unless on a terminal).
    pub progress: crate::progress::Progress,
}

/// A finished run.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// `reconcile_runs.run_id`.
    pub run_id: i64,
    /// `clean`, `drift` or `repaired`.
    pub status: String,
    /// Per source, the WAL position the run is anchored to.
    pub as_of: BTreeMap<String, Lsn>,
    /// Source rows covered.
    pub rows_checked: u64,
    /// Profiles recomputed and compared.
    pub profiles_checked: u64,
    /// Drifted values found.
    pub drift_count: u64,
    /// Of those, repaired (and verified).
    pub repaired_count: u64,
    /// Rows that kept changing during the run and could not be compared.
    pub unverified: u64,
    /// Key buckets whose hashes differed (their rows were compared one by one).
    pub buckets_differing: u64,
    /// Wall time.
    pub seconds: f64,
    /// The drift.
    pub drifts: Vec<Drift>,
}

impl RunReport {
    /// Drift left after repair.
    pub fn unrepaired(&self) -> u64 {
        self.drift_count.saturating_sub(self.repaired_count)
    }
}

/// Runs one reconciliation (and repair) and records it.
pub async fn reconcile(cfg: &Config, store: &Store, opts: &Options) -> anyhow::Result<RunReport> {
    if let Some(s) = &opts.source {
        anyhow::ensure!(
            cfg.source(s).is_some(),
            "--source {s}: no such source in the config"
        );
    }
    let run_id = store.start_reconcile_run(opts.source.as_deref()).await?;
    let started = Instant::now();
    tracing::info!(run_id, repair = opts.repair, sample = ?opts.sample, "reconciliation started");
    let result = run(cfg, store, opts, run_id, started).await;
    if let Err(e) = &result {
        store.fail_reconcile_run(run_id).await.ok();
        tracing::error!(run_id, error = %format!("{e:#}"), "reconciliation failed");
    }
    result
}

async fn run(
    cfg: &Config,
    store: &Store,
    opts: &Options,
    run_id: i64,
    started: Instant,
) -> anyhow::Result<RunReport> {
    let mapper = Mapper::new(cfg);
    let mut report = RunReport {
        run_id,
        status: String::new(),
        as_of: BTreeMap::new(),
        rows_checked: 0,
        profiles_checked: 0,
        drift_count: 0,
        repaired_count: 0,
        unverified: 0,
        buckets_differing: 0,
        seconds: 0.0,
        drifts: Vec::new(),
    };
    let mut sampled: BTreeSet<ProfileId> = BTreeSet::new();
    for src in cfg
        .sources
        .iter()
        .filter(|s| opts.source.as_ref().is_none_or(|n| n == &s.name))
    {
        let mut conn = query_conn(src).await?;
        prepare_session(&mut conn, src).await?;
        for t in &src.tables {
            let stage = opts
                .progress
                .stage(&format!("rows {}/{}", src.name, t.qualified), None);
            let o = rows::check_table(store, &mapper, src, t, &mut conn, opts.sample, opts.wait)
                .await?;
            stage.inc(o.rows_checked);
            stage.done();
            tracing::info!(run_id, source = %src.name, table = %t.qualified, rows = o.rows_checked,
                buckets_differing = o.buckets_differing, drifts = o.drifts.len(), unverified = o.unverified,
                "rows compared");
            report.rows_checked += o.rows_checked;
            report.unverified += o.unverified;
            report.buckets_differing += o.buckets_differing;
            report.drifts.extend(o.drifts);
            sampled.extend(o.sampled_profiles);
            let anchor = report.as_of.entry(src.name.clone()).or_insert(o.anchor);
            *anchor = (*anchor).max(o.anchor);
        }
        conn.close().await.ok();
    }
    let (drifts, n) = if opts.sample.is_some() {
        let ids: Vec<ProfileId> = sampled.into_iter().collect();
        profiles::check(store, &mapper, profiles::Scope::Only(&ids), &opts.progress).await?
    } else {
        profiles::check(store, &mapper, profiles::Scope::All, &opts.progress).await?
    };
    report.profiles_checked = n;
    report.drifts.extend(drifts);
    report.drift_count = report.drifts.len() as u64;
    tracing::info!(
        run_id,
        rows = report.rows_checked,
        profiles = n,
        drift = report.drift_count,
        "compared"
    );

    if opts.repair && !report.drifts.is_empty() {
        let left = repair(cfg, store, &mapper, &report.drifts, opts.wait).await?;
        let still: BTreeSet<(Option<ProfileId>, &str)> = left
            .iter()
            .map(|d| (d.profile_id, d.field.as_str()))
            .collect();
        for d in &mut report.drifts {
            d.repaired = !still.contains(&(d.profile_id, d.field.as_str()));
        }
        report.repaired_count = report.drifts.iter().filter(|d| d.repaired).count() as u64;
        tracing::info!(
            run_id,
            repaired = report.repaired_count,
            left = left.len(),
            "repaired"
        );
    }
    report.status = if report.drift_count == 0 {
        "clean"
    } else if report.unrepaired() == 0 {
        "repaired"
    } else {
        "drift"
    }
    .to_owned();
    report.seconds = started.elapsed().as_secs_f64();
    record(store, &report).await?;
    Ok(report)
}

async fn record(store: &Store, r: &RunReport) -> anyhow::Result<()> {
    Ok(store.record_reconcile_run(r).await?)
}

/// Repairs `drifts`; returns the drift a fresh check of the same rows and
/// profiles still finds.
async fn repair(
    cfg: &Config,
    store: &Store,
    mapper: &Mapper,
    drifts: &[Drift],
    wait: Duration,
) -> anyhow::Result<Vec<Drift>> {
    // Rows first: read again between watermarks and applied like a re-snapshot.
    let mut rows: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut profiles: BTreeSet<ProfileId> = BTreeSet::new();
    for d in drifts {
        match &d.fix {
            Fix::Row {
                source,
                table,
                row_key,
            } => rows
                .entry((source.clone(), table.clone()))
                .or_default()
                .push(row_key.clone()),
            Fix::Rederive(p) => {
                profiles.insert(*p);
            }
        }
        profiles.extend(d.profile_id);
    }
    for ((source, table), keys) in &rows {
        let Some((src, t, mut conn)) = open_table(cfg, source, table).await? else {
            continue;
        };
        let reader = TableReader::load(&mut conn, src, t).await?;
        let read = rows::read_keys(&mut conn, src, &reader, keys).await?;
        wait_until_applied(store, src, read.marks.high, wait).await?;
        let wanted = keys.clone();
        apply_read(
            store,
            mapper,
            source,
            table,
            &read.marks,
            read.rows,
            move |found| wanted.into_iter().filter(|k| !found.contains(k)).collect(),
        )
        .await?;
        // The profiles those rows belong to now.
        let now = store.profiles_of_rows(source, table, keys).await?;
        profiles.extend(now);
        conn.close().await.ok();
    }
    // Then every profile concerned, from its contributions.
    store.rederive_profiles(mapper, &profiles).await?;

    // Check again what was repaired.
    let mut left = Vec::new();
    for ((source, table), keys) in &rows {
        let Some((src, t, mut conn)) = open_table(cfg, source, table).await? else {
            continue;
        };
        let (d, _) = rows::verify_keys(store, mapper, src, t, &mut conn, keys, wait).await?;
        left.extend(d);
        conn.close().await.ok();
    }
    let ids: Vec<ProfileId> = profiles.into_iter().collect();
    let (d, _) = profiles::check(
        store,
        mapper,
        profiles::Scope::Only(&ids),
        &crate::progress::Progress::hidden(),
    )
    .await?;
    left.extend(d);
    Ok(left)
}

/// A drifted row's source and table (None if no longer configured), with a
/// connection set up like the stream's.
async fn open_table<'c>(
    cfg: &'c Config,
    source: &str,
    table: &str,
) -> anyhow::Result<Option<(&'c SourceConfig, &'c TableConfig, sqlx::PgConnection)>> {
    let Some(src) = cfg.source(source) else {
        return Ok(None);
    };
    let Some(t) = src.table(table) else {
        return Ok(None);
    };
    let mut conn = query_conn(src).await?;
    prepare_session(&mut conn, src).await?;
    Ok(Some((src, t, conn)))
}
