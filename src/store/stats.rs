//! Reads of the store for `status`, `check` and the metrics sampler.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Store;

/// Row counts of the store.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct Counts {
    /// Live (unmerged) profiles.
    pub live: i64,
    /// Profiles merged into another.
    pub merged: i64,
    /// Identifiers.
    pub identities: i64,
    /// Rows in `dead_letters`.
    pub dead: i64,
}

/// The latest reconciliation run.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct LastReconcile {
    /// `reconcile_runs.run_id`.
    pub run_id: i64,
    /// `running`, `clean`, `drift`, `repaired` or `failed`.
    pub status: String,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End (None while running).
    pub finished_at: Option<DateTime<Utc>>,
    /// Drift found.
    pub drift_count: i64,
    /// Drift repaired.
    pub repaired_count: i64,
}

/// What the store knows of one source.
#[derive(Debug, Default)]
pub struct SourceProgress {
    /// The stored checkpoint, as text (`0/16B3748`).
    pub checkpoint_lsn: Option<String>,
    /// The initial snapshot completed.
    pub snapshot_completed: bool,
    /// Commit time of the last streamed (non-snapshot) event logged.
    pub last_event_commit_time: Option<DateTime<Utc>>,
}

impl Store {
    /// Versions of the migrations applied (an error: none, the schema is missing).
    pub async fn applied_migrations(&self) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar("select version from _sqlx_migrations where success")
            .fetch_all(self.pool())
            .await
    }

    /// Profile, identity and dead-letter counts.
    pub async fn counts(&self) -> Result<Counts, sqlx::Error> {
        // One scan of `profiles` for both counts (the metrics sampler calls
        // this every poll interval).
        sqlx::query_as(
            "select p.live, p.merged,
                    (select count(*) from identities) as identities,
                    (select count(*) from dead_letters) as dead
               from (select count(*) filter (where merged_into is null) as live,
                            count(*) filter (where merged_into is not null) as merged
                       from profiles) p",
        )
        .fetch_one(self.pool())
        .await
    }

    /// The latest reconciliation run, if any ran.
    pub async fn last_reconcile(&self) -> Result<Option<LastReconcile>, sqlx::Error> {
        sqlx::query_as(
            "select run_id, status, started_at, finished_at, drift_count, repaired_count
               from reconcile_runs order by run_id desc limit 1",
        )
        .fetch_optional(self.pool())
        .await
    }

    /// The checkpoint and the last logged event of `source`.
    pub async fn source_progress(&self, source: &str) -> Result<SourceProgress, sqlx::Error> {
        let cp: Option<(String, bool)> = sqlx::query_as(
            "select lsn::text, snapshot_completed_at is not null from checkpoints where source = $1",
        )
        .bind(source)
        .fetch_optional(self.pool())
        .await?;
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "select commit_time from events where source = $1 and op <> 'snapshot' order by commit_lsn desc, seq desc limit 1",
        )
        .bind(source)
        .fetch_optional(self.pool())
        .await?;
        Ok(SourceProgress {
            snapshot_completed: cp.as_ref().is_some_and(|c| c.1),
            checkpoint_lsn: cp.map(|c| c.0),
            last_event_commit_time: last,
        })
    }
}
