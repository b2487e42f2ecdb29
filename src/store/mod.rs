//! The profile store (PostgreSQL, via sqlx): migrations, the apply of a batch of
//! source transactions together with its checkpoint in one sink transaction
//! (`apply`), and every other statement that names a store table: replay and
//! rebuild (`replay`), forget (`forget`), watermarked re-reads (`watermarked`),
//! the Kafka apply role's lease and offsets (`lease`),
//! reconciliation's runs, digests and chunks (`reconcile`), and the reads of
//! `status`, `check` and the metrics (`stats`). No module outside this one
//! speaks the store's SQL (the test `docs::only_the_store_module_names_the_store_tables_in_sql`
//! holds that).
//!
//! Every relation lives in the configured schema; the pool sets `search_path`
//! to it so that SQL here and in the migrations is written unqualified.

pub mod apply;
pub mod digest;
pub(crate) mod event_log;
pub mod forget;
pub mod lease;
pub mod pipeline;
pub mod reconcile;
pub mod replay;
pub mod stats;
pub mod watermarked;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::SinkConfig;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Profile-store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Could not reach or log in to the store.
    #[error("cannot connect to the profile store {url}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("profile store migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Any query.
    #[error("profile store query failed")]
    Query(#[from] sqlx::Error),
    /// A write prepared before it failed; nothing of this one was written
    /// either, and its source streams it again from its checkpoint.
    #[error("an earlier write to the profile store failed; this one was planned on top of it")]
    EarlierWriteFailed,
    /// The outbox (Kafka) did not take the batch's derived changes; the batch
    /// was rolled back and is retried.
    #[error("delivering the batch's profile changes before commit failed")]
    Outbox(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The apply lease is no longer this instance's (it expired and a standby
    /// took it): nothing of the write was committed, and the instance stands
    /// by again.
    #[error("the apply lease (epoch {epoch}) is no longer this instance's; another apply instance owns profile writes now")]
    LeaseLost {
        /// The epoch this instance held.
        epoch: i64,
    },
}

impl StoreError {
    /// What the retry policy ([`crate::retry`]) does about it. An outbox
    /// failure rolled the batch back, and the broker may be back.
    pub fn action(&self) -> crate::retry::Action {
        match self {
            StoreError::Connect { source, .. } | StoreError::Query(source) => {
                crate::retry::sqlx_error(source)
            }
            StoreError::Migrate(_) | StoreError::LeaseLost { .. } => crate::retry::Action::Stop,
            StoreError::Outbox(_) | StoreError::EarlierWriteFailed => crate::retry::Action::Retry,
        }
    }
}

/// Takes a batch's derived changes (profile changes, dead letters) inside the
/// store transaction, before it commits: a crash or a failure there rolls the
/// batch back, so it is delivered again, never lost.
pub trait Outbox: Send + Sync {
    /// Delivers what `stats` carries for `source`; Ok only once it is durable.
    fn deliver<'a>(
        &'a self,
        source: &'a str,
        stats: &'a apply::ApplyStats,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>;

    /// Delivers the erasure of a forgotten person (`forget`): tombstones for
    /// their `profiles` and for their source `rows` (source, `schema.table`,
    /// row key); Ok only once durable, before the store's erasure commits.
    fn erase<'a>(
        &'a self,
        profiles: &'a [i64],
        rows: &'a [(String, String, String)],
    ) -> futures_util::future::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>;
}

/// A handle on the profile store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Connections for the event log, written beside a batch's transaction
    /// by the holder of the apply lock (see `apply::apply_in`).
    log_pool: PgPool,
    schema: String,
    /// Monthly `events` partitions known to exist (year, month).
    partitions: Arc<Mutex<HashSet<(i32, u32)>>>,
    /// The merge state in memory, shared by the process's source loops
    /// (None: `memory_budget_mb = 0`). Taken before the apply lock.
    cache: Option<Arc<tokio::sync::Mutex<crate::state::MergeCache>>>,
    /// The order of this process's writes (see `pipeline`).
    ledger: Arc<pipeline::Ledger>,
    /// How [`Probe`] connects: the pool's options under its own application name.
    probe_opts: PgConnectOptions,
}

/// Readiness probes of the store (`/readyz`) on a connection of their own,
/// never one of the pool's: a flood of probes must not take connections the
/// apply path waits for. One probe runs at a time, and an answer younger than
/// [`Probe::FRESH`] is given again without asking the store, so any number of
/// requests costs the store at most one `select 1` per second.
#[derive(Debug)]
pub struct Probe {
    opts: PgConnectOptions,
    conn: tokio::sync::Mutex<Option<PgConnection>>,
    last: Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

impl Probe {
    /// How long an answer is given again.
    pub const FRESH: Duration = Duration::from_secs(1);

    fn fresh(&self) -> Option<Result<(), String>> {
        let last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < Self::FRESH)
            .map(|(_, r)| r.clone())
    }

    /// Whether the store answers a trivial query within `within` (connecting
    /// first if the probe's connection is gone); the error says why not.
    pub async fn check(&self, within: Duration) -> Result<(), String> {
        if let Some(r) = self.fresh() {
            return r;
        }
        let started = std::time::Instant::now();
        let Ok(mut conn) = tokio::time::timeout(within, self.conn.lock()).await else {
            return Err(format!("no answer within {}s", within.as_secs()));
        };
        // Another request may have probed while this one waited.
        if let Some(r) = self.fresh() {
            return r;
        }
        let left = within.saturating_sub(started.elapsed());
        let asked = tokio::time::timeout(left, async {
            if conn.is_none() {
                *conn = Some(PgConnection::connect_with(&self.opts).await?);
            }
            match conn.as_mut() {
                Some(c) => sqlx::query("select 1").execute(c).await.map(|_| ()),
                None => Ok(()),
            }
        })
        .await;
        let r = match asked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}s", within.as_secs())),
        };
        if r.is_err() {
            // A connection cut mid-query is not reused.
            *conn = None;
        }
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), r.clone()));
        r
    }
}

impl Store {
    /// Connects (lazily checked by one round trip) with `search_path` set to the schema.
    pub async fn connect(cfg: &SinkConfig) -> Result<Store, StoreError> {
        // No JIT: the store runs short statements over index probes, and a
        // plan whose estimate passes `jit_above_cost` (a chunk of a
        // reconciliation's reads, or any plan the write path's `enable_* =
        // off` settings price at their disable cost) spent more time
        // compiling expressions than running them (docs/design.md).
        let opts = cfg
            .conn
            .pg_options()
            .options([("search_path", cfg.schema.as_str()), ("jit", "off")]);
        let probe_opts = opts
            .clone()
            .application_name(&format!("{} readyz", cfg.conn.application_name));
        let log_pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(cfg.conn.connect_timeout_s.max(1) * 3))
            .connect_lazy_with(opts.clone());
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pool_size)
            .acquire_timeout(Duration::from_secs(cfg.conn.connect_timeout_s.max(1) * 3))
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Connect {
                url: cfg.conn.to_string(),
                source,
            })?;
        Ok(Store {
            pool,
            log_pool,
            schema: cfg.schema.clone(),
            partitions: Arc::default(),
            cache: (cfg.memory_budget_bytes > 0).then(|| {
                Arc::new(tokio::sync::Mutex::new(crate::state::MergeCache::new(
                    cfg.memory_budget_bytes,
                )))
            }),
            ledger: Arc::default(),
            probe_opts,
        })
    }

    /// A readiness probe on a connection of its own (see [`Probe`]).
    pub fn probe(&self) -> Probe {
        Probe {
            opts: self.probe_opts.clone(),
            conn: tokio::sync::Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    /// Creates the schema if needed and applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // The schema name is validated as [a-z0-9_]+ by the config. Instances
        // started together against a new store all get here at once (the
        // migrations themselves are serialised by sqlx's advisory lock).
        match sqlx::query(sqlx::AssertSqlSafe(format!(
            "create schema if not exists {}",
            self.schema
        )))
        .execute(&self.pool)
        .await
        {
            Err(e) if !created_concurrently(&e) => return Err(e.into()),
            _ => {}
        }
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(StoreError::Migrate)?;
        // Event partitions for last month, this month and the next three.
        use chrono::Datelike;
        let now = chrono::Utc::now();
        let (y, m) = if now.month() == 1 {
            (now.year() - 1, 12)
        } else {
            (now.year(), now.month() - 1)
        };
        self.create_partitions_from(y, m, 5).await
    }

    /// The underlying pool: only `src/store/` speaks the store's SQL.
    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configured schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}

/// Whether `e` says that another session created the same object at the same
/// time: `create … if not exists` looks for the object before it adds it to
/// the catalog, so two sessions can both find it missing, and the later one
/// then fails on the catalog's unique index (23505) or with the object's own
/// duplicate error (42P06 schema, 42P07 table). The object exists either way.
pub(crate) fn created_concurrently(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| matches!(&*c, "23505" | "42P06" | "42P07"))
}

impl Store {
    /// Drops the monthly `events` partitions that end before the start of the
    /// month `months` months ago (the current month counts as one). Returns the
    /// partitions dropped. Replay and rebuild can reach only what is kept.
    pub async fn drop_old_events(&self, months: u32) -> Result<Vec<String>, StoreError> {
        use chrono::Datelike;
        let now = chrono::Utc::now();
        let total = now.year() * 12 + i32::try_from(now.month0()).unwrap_or(0)
            - i32::try_from(months).unwrap_or(i32::MAX / 2)
            + 1;
        let (keep_y, keep_m) = (total.div_euclid(12), total.rem_euclid(12) + 1);
        let names: Vec<String> = sqlx::query_scalar(
            "select c.relname::text from pg_inherits i join pg_class c on c.oid = i.inhrelid join pg_class p on p.oid = i.inhparent
              join pg_namespace n on n.oid = p.relnamespace
             where p.relname = 'events' and n.nspname = $1 and c.relname ~ '^events_y[0-9]{4}m[0-9]{2}$'",
        )
        .bind(&self.schema)
        .fetch_all(&self.pool)
        .await?;
        let mut dropped = Vec::new();
        for name in names {
            let (y, m): (i32, i32) = (
                name[8..12].parse().unwrap_or(i32::MAX),
                name[13..15].parse().unwrap_or(12),
            );
            if (y, m) < (keep_y, keep_m) {
                // Names match ^events_y[0-9]{4}m[0-9]{2}$ (checked above).
                sqlx::query(sqlx::AssertSqlSafe(format!("drop table {name}")))
                    .execute(&self.pool)
                    .await?;
                if let Ok(mut p) = self.partitions.lock() {
                    p.remove(&(y, u32::try_from(m).unwrap_or(0)));
                }
                dropped.push(name);
            }
        }
        if !dropped.is_empty() {
            tracing::info!(partitions = ?dropped, months, "dropped event-log partitions past retention");
        }
        Ok(dropped)
    }
}

/// A source's stored progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// End LSN of the last applied source transaction.
    pub lsn: crate::event::Lsn,
    /// The initial snapshot finished (streaming may resume from `lsn`).
    pub snapshot_completed: bool,
    /// The source server's system identifier and timeline when last
    /// connected (None before the first connect that recorded them).
    pub generation: Option<(String, i64)>,
    /// The slot the initial snapshot was taken with, and its consistent point
    /// (recorded when the snapshot starts).
    pub snapshot: Option<(String, crate::event::Lsn)>,
    /// Tables whose initial snapshot is complete, while the snapshot as a
    /// whole is not: a restart keeps them and reads only the rest.
    pub snapshot_tables_done: Vec<String>,
}

impl Store {
    /// The stored checkpoint of a source.
    pub async fn checkpoint(&self, source: &str) -> Result<Option<Checkpoint>, StoreError> {
        type Row = (
            String,
            bool,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Vec<String>,
        );
        let row: Option<Row> = sqlx::query_as(
            "select lsn::text, snapshot_completed_at is not null, system_id, timeline,
                    slot, snapshot_lsn::text, snapshot_tables_done
               from checkpoints where source = $1",
        )
        .bind(source)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(lsn, done, system_id, timeline, slot, snapshot_lsn, tables_done)| Checkpoint {
                lsn: lsn.parse().unwrap_or_default(),
                snapshot_completed: done,
                generation: system_id.zip(timeline),
                snapshot: slot.zip(snapshot_lsn.and_then(|l| l.parse().ok())),
                snapshot_tables_done: tables_done,
            },
        ))
    }

    /// Records that the initial snapshot of `source` starts with `slot` at
    /// `consistent_point`, no table done yet.
    pub async fn begin_snapshot(
        &self,
        source: &str,
        slot: &str,
        consistent_point: crate::event::Lsn,
    ) -> Result<(), StoreError> {
        self.record_snapshot(source, slot, consistent_point, false)
            .await
    }

    /// Records that every row of `table` is written by the initial snapshot
    /// of `source` (and the rows it did not see withdrawn).
    pub async fn snapshot_table_done(&self, source: &str, table: &str) -> Result<(), StoreError> {
        sqlx::query(
            "update checkpoints set snapshot_tables_done = array_append(snapshot_tables_done, $2),
               updated_at = now()
             where source = $1 and not ($2 = any(snapshot_tables_done))",
        )
        .bind(source)
        .bind(table)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that `tables` of `source` must be read again (see
    /// `table_snapshots_pending`).
    pub async fn add_pending_table_snapshots(
        &self,
        source: &str,
        tables: &[String],
    ) -> Result<(), StoreError> {
        sqlx::query(
            "insert into table_snapshots_pending (source, table_name)
             select $1, t from unnest($2::text[]) t on conflict do nothing",
        )
        .bind(source)
        .bind(tables)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tables of `source` still to be read again.
    pub async fn pending_table_snapshots(&self, source: &str) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "select table_name from table_snapshots_pending where source = $1 order by table_name",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await?)
    }

    /// `table` of `source` was read again.
    pub async fn done_table_snapshot(&self, source: &str, table: &str) -> Result<(), StoreError> {
        sqlx::query("delete from table_snapshots_pending where source = $1 and table_name = $2")
            .bind(source)
            .bind(table)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records which server (system identifier, timeline) `source`'s
    /// checkpoint now follows.
    pub async fn record_generation(
        &self,
        source: &str,
        system_id: &str,
        timeline: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("update checkpoints set system_id = $2, timeline = $3 where source = $1")
            .bind(source)
            .bind(system_id)
            .bind(timeline)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks the initial snapshot of `source` done at the slot's consistent point.
    pub async fn complete_snapshot(
        &self,
        source: &str,
        slot: &str,
        consistent_point: crate::event::Lsn,
    ) -> Result<(), StoreError> {
        self.record_snapshot(source, slot, consistent_point, true)
            .await
    }

    /// The checkpoint of `source` at the slot's consistent point, with the
    /// initial snapshot started (no table done) or complete.
    async fn record_snapshot(
        &self,
        source: &str,
        slot: &str,
        consistent_point: crate::event::Lsn,
        complete: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "insert into checkpoints (source, lsn, slot, snapshot_lsn, snapshot_completed_at)
             values ($1, $2::pg_lsn, $3, $2::pg_lsn, case when $4 then now() end)
             on conflict (source) do update set lsn = excluded.lsn, slot = excluded.slot,
               snapshot_lsn = excluded.snapshot_lsn,
               snapshot_completed_at = excluded.snapshot_completed_at,
               snapshot_tables_done = '{}', updated_at = now()",
        )
        .bind(source)
        .bind(consistent_point.to_string())
        .bind(slot)
        .bind(complete)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
