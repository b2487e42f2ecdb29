//! The store side of reconciliation (`crate::reconcile`): the runs and their
//! drift in `reconcile_runs` and `reconcile_drift`, per-bucket digests and
//! rows of `contributions`, the profile chunks the profile pass compares, and
//! the re-derivation a repair ends with.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};

use super::apply::{lock, row_of, winners_of, ProvenanceDoc, CONTRIBUTION_COLUMNS};
use super::watermarked::changed_during;
use super::{Store, StoreError};
use crate::identity::Ident;
use crate::mapping::Mapper;
use crate::reconcile::RunReport;
use crate::resolve::{AggState, Contribution, ProfileId, Winner};
use crate::source::read::Watermarks;

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
    /// Field (see [`crate::reconcile::Drift::field`]).
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

/// A profile row as stored.
#[derive(Debug, Clone, Default)]
pub struct StoredRow {
    /// Merged into another profile.
    pub merged_into: Option<ProfileId>,
    /// `traits`.
    pub traits: Map<String, Value>,
    /// `agg_state`.
    pub aggs: BTreeMap<String, AggState>,
}

/// Which profiles a chunk of the profile pass covers.
#[derive(Debug, Clone, Copy)]
pub enum ProfileChunk<'a> {
    /// `profile_id` in `[lo, hi)`.
    Range(i64, i64),
    /// These ids.
    Ids(&'a [i64]),
}

/// What the store holds for one chunk of profiles, read in one
/// repeatable-read transaction (so never a half-applied batch).
#[derive(Debug, Default)]
pub struct ProfileChunkState {
    /// Live contributions by the profile they point at.
    pub contributions: BTreeMap<ProfileId, Vec<Contribution>>,
    /// Profile rows.
    pub profiles: HashMap<ProfileId, StoredRow>,
    /// Provenance (`profile_fields`) by profile and field.
    pub provenance: HashMap<ProfileId, BTreeMap<String, Winner>>,
    /// The owner of every identifier that points into the chunk or that one
    /// of its contributions carries.
    pub owners: HashMap<Ident, ProfileId>,
}

/// Which stored rows of a table a row comparison reads.
#[derive(Debug, Clone, Copy)]
pub enum RowScope<'a> {
    /// Rows whose key hash (`hashtextextended(row_key, 0) & mask`) is one of these.
    Buckets(i64, &'a [i64]),
    /// Rows with these keys.
    Keys(&'a [String]),
}

/// `(profile_id, merged_into, traits, agg_state, provenance)`.
type ProfileRow = (
    i64,
    Option<i64>,
    Json<Map<String, Value>>,
    Json<BTreeMap<String, AggState>>,
    Option<Json<ProvenanceDoc>>,
);

fn bucket_of(mask: i64) -> String {
    format!("(hashtextextended(row_key, 0) & {mask})")
}

impl Store {
    /// Records the start of a run; returns its id.
    pub async fn start_reconcile_run(&self, source: Option<&str>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("insert into reconcile_runs (source) values ($1) returning run_id")
            .bind(source)
            .fetch_one(self.pool())
            .await
    }

    /// Marks a run failed.
    pub async fn fail_reconcile_run(&self, run_id: i64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "update reconcile_runs set status = 'failed', finished_at = now() where run_id = $1",
        )
        .bind(run_id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records a finished run and its drift.
    pub async fn record_reconcile_run(&self, r: &RunReport) -> Result<(), sqlx::Error> {
        let mut tx = self.pool().begin().await?;
        let text = |v: &Option<Value>| v.as_ref().map(Value::to_string);
        sqlx::query(
            "insert into reconcile_drift (run_id, profile_id, field, expected, actual, kind, repaired)
             select $1, p, f, e::jsonb, a::jsonb, k, r
               from unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bool[]) as u(p, f, e, a, k, r)",
        )
        .bind(r.run_id)
        .bind(r.drifts.iter().map(|d| d.profile_id).collect::<Vec<_>>())
        .bind(r.drifts.iter().map(|d| d.field.as_str()).collect::<Vec<_>>())
        .bind(r.drifts.iter().map(|d| text(&d.expected)).collect::<Vec<_>>())
        .bind(r.drifts.iter().map(|d| text(&d.actual)).collect::<Vec<_>>())
        .bind(r.drifts.iter().map(|d| d.kind.as_str()).collect::<Vec<_>>())
        .bind(r.drifts.iter().map(|d| d.repaired).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "update reconcile_runs set finished_at = now(), rows_checked = $2, profiles_checked = $3,
                    drift_count = $4, repaired_count = $5, unverified = $6, status = $7, as_of = $8
              where run_id = $1",
        )
        .bind(r.run_id)
        .bind(i64::try_from(r.rows_checked).unwrap_or(i64::MAX))
        .bind(i64::try_from(r.profiles_checked).unwrap_or(i64::MAX))
        .bind(i64::try_from(r.drift_count).unwrap_or(i64::MAX))
        .bind(i64::try_from(r.repaired_count).unwrap_or(i64::MAX))
        .bind(i64::try_from(r.unverified).unwrap_or(i64::MAX))
        .bind(&r.status)
        .bind(Json(&r.as_of))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// The most recent runs, newest first.
    pub async fn reconcile_runs(&self, limit: i64) -> Result<Vec<Run>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select {RUN_COLUMNS} from reconcile_runs order by run_id desc limit $1"
        )))
        .bind(limit)
        .fetch_all(self.pool())
        .await
    }

    /// One run (`None`: the latest) with its drift.
    pub async fn reconcile_run(
        &self,
        run_id: Option<i64>,
    ) -> Result<Option<RunDetail>, sqlx::Error> {
        let run: Option<Run> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select {RUN_COLUMNS} from reconcile_runs where run_id = coalesce($1, (select max(run_id) from reconcile_runs))"
        )))
        .bind(run_id)
        .fetch_optional(self.pool())
        .await?;
        let Some(run) = run else { return Ok(None) };
        let drift = sqlx::query_as(
            "select profile_id, field, expected, actual, kind, repaired from reconcile_drift where run_id = $1
              order by profile_id nulls first, field",
        )
        .bind(run.run_id)
        .fetch_all(self.pool())
        .await?;
        Ok(Some(RunDetail { run, drift }))
    }

    /// Live rows the store holds for a source table.
    pub async fn live_rows(&self, source: &str, table: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "select count(*) from contributions where source = $1 and table_name = $2 and not deleted",
        )
        .bind(source)
        .bind(table)
        .fetch_one(self.pool())
        .await
    }

    /// Per key bucket of a table's live rows (all buckets, or only `chosen`):
    /// `(bucket, rows, sum of digests as text, rows with a digest)`.
    pub async fn row_buckets(
        &self,
        source: &str,
        table: &str,
        mask: i64,
        chosen: Option<&[i64]>,
    ) -> Result<Vec<(i64, i64, String, i64)>, sqlx::Error> {
        let b = bucket_of(mask);
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select {b} as b, count(*), coalesce(sum(digest::numeric), 0)::text, count(digest)
               from contributions where source = $1 and table_name = $2 and not deleted
                and ($3::bigint[] is null or {b} = any($3))
              group by 1"
        )))
        .bind(source)
        .bind(table)
        .bind(chosen)
        .fetch_all(self.pool())
        .await
    }

    /// The profiles the live rows of these buckets belong to.
    pub async fn profiles_in_buckets(
        &self,
        source: &str,
        table: &str,
        mask: i64,
        buckets: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let b = bucket_of(mask);
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select distinct profile_id from contributions
              where source = $1 and table_name = $2 and not deleted and profile_id is not null
                and {b} = any($3)"
        )))
        .bind(source)
        .bind(table)
        .bind(buckets)
        .fetch_all(self.pool())
        .await
    }

    /// The stored rows of a table in `scope` by row key (tombstones
    /// included), and the keys that changes invisible to a read between
    /// `marks` touched (`None`: a truncate touched them all), both from one
    /// consistent snapshot of the store.
    pub async fn rows_in_scope(
        &self,
        source: &str,
        table: &str,
        scope: RowScope<'_>,
        marks: &Watermarks,
    ) -> Result<(BTreeMap<String, Contribution>, Option<HashSet<String>>), StoreError> {
        let mut tx = self
            .pool()
            .begin_with("begin isolation level repeatable read, read only")
            .await?;
        let (filter, buckets, keys): (String, &[i64], &[String]) = match scope {
            RowScope::Buckets(mask, b) => (format!("{} = any($3)", bucket_of(mask)), b, &[]),
            RowScope::Keys(k) => ("row_key = any($4)".to_owned(), &[], k),
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select {CONTRIBUTION_COLUMNS} from contributions c where c.source = $1 and c.table_name = $2 and {}",
            filter.replace("row_key", "c.row_key")
        )))
        .bind(source)
        .bind(table)
        .bind(buckets)
        .bind(keys)
        .fetch_all(&mut *tx)
        .await?;
        let changed = changed_during(&mut tx, source, table, marks).await?;
        tx.commit().await?;
        let mut stored = BTreeMap::new();
        for r in &rows {
            let c = row_of(r)?;
            stored.insert(c.row.row_key.clone(), c);
        }
        Ok((stored, changed))
    }

    /// The profiles the rows with these keys belong to now.
    pub async fn profiles_of_rows(
        &self,
        source: &str,
        table: &str,
        keys: &[String],
    ) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "select profile_id from contributions where source = $1 and table_name = $2 and row_key = any($3) and profile_id is not null",
        )
        .bind(source)
        .bind(table)
        .bind(keys)
        .fetch_all(self.pool())
        .await
    }

    /// Re-derives `profiles` from their contributions under the apply lock
    /// (the end of a repair).
    pub async fn rederive_profiles(
        &self,
        mapper: &Mapper,
        profiles: &BTreeSet<ProfileId>,
    ) -> Result<Vec<ProfileId>, StoreError> {
        let mut tx = self.pool().begin().await?;
        lock(&mut tx).await?;
        let changed = super::replay::rederive(&mut tx, mapper, profiles).await?;
        tx.commit().await?;
        Ok(changed)
    }

    /// The lowest and highest profile id (profiles and contributions) and the
    /// number of profile rows.
    pub async fn profile_id_range(&self) -> Result<(Option<i64>, Option<i64>, i64), sqlx::Error> {
        sqlx::query_as(
            "select least((select min(profile_id) from profiles), (select min(profile_id) from contributions)),
                    greatest((select max(profile_id) from profiles), (select max(profile_id) from contributions)),
                    (select count(*) from profiles)",
        )
        .fetch_one(self.pool())
        .await
    }

    /// Everything the store holds for one chunk of profiles, on a connection
    /// of its own (chunks are read in parallel).
    pub async fn profile_chunk(
        &self,
        chunk: ProfileChunk<'_>,
    ) -> Result<ProfileChunkState, StoreError> {
        let mut conn = self.pool().acquire().await?;
        read_profile_chunk(&mut conn, chunk).await
    }
}

async fn read_profile_chunk(
    conn: &mut PgConnection,
    chunk: ProfileChunk<'_>,
) -> Result<ProfileChunkState, StoreError> {
    let (filter, lo, hi, ids): (&str, i64, i64, &[i64]) = match chunk {
        ProfileChunk::Range(lo, hi) => ("profile_id >= $1 and profile_id < $2", lo, hi, &[]),
        ProfileChunk::Ids(ids) => ("profile_id = any($3) and $1 <= $2", 0, 0, ids),
    };
    let mut tx = conn
        .begin_with("begin isolation level repeatable read, read only")
        .await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "select {CONTRIBUTION_COLUMNS} from contributions c where c.{filter} and not c.deleted"
    )))
    .bind(lo)
    .bind(hi)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut out = ProfileChunkState::default();
    for r in &rows {
        let c = row_of(r)?;
        if let Some(p) = c.profile_id {
            out.contributions.entry(p).or_default().push(c);
        }
    }
    // The provenance document is parsed here rather than expanded by the
    // `profile_fields` view: the server's JSON parse was most of the store's
    // time in this pass.
    let rows = sqlx::query_as::<_, ProfileRow>(sqlx::AssertSqlSafe(format!(
        "select profile_id, merged_into, traits, agg_state, provenance from profiles where {filter}"
    )))
    .bind(lo)
    .bind(hi)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    for (p, merged_into, t, a, provenance) in rows {
        let winners = provenance.map(|d| winners_of(d.0)).unwrap_or_default();
        if !winners.is_empty() {
            out.provenance.insert(p, winners);
        }
        out.profiles.insert(
            p,
            StoredRow {
                merged_into,
                traits: t.0,
                aggs: a.0,
            },
        );
    }
    // Owners: the identities pointing into the chunk (by index), then the few
    // claimed identifiers that point elsewhere or nowhere.
    out.owners = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(format!(
        "select kind, value, profile_id from identities where {filter}"
    )))
    .bind(lo)
    .bind(hi)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(k, v, p)| ((k, v), p))
    .collect();
    let claimed: BTreeSet<&Ident> = out
        .contributions
        .values()
        .flatten()
        .flat_map(|c| c.identities.iter())
        .collect();
    let elsewhere: Vec<&&Ident> = claimed
        .iter()
        .filter(|i| !out.owners.contains_key(**i))
        .collect();
    if !elsewhere.is_empty() {
        let found = sqlx::query_as::<_, (String, String, i64)>(
            "select i.kind, i.value, i.profile_id from identities i
               join unnest($1::text[], $2::text[]) as u(k, v) on i.kind = u.k and i.value = u.v",
        )
        .bind(elsewhere.iter().map(|i| i.0.as_str()).collect::<Vec<_>>())
        .bind(elsewhere.iter().map(|i| i.1.as_str()).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        out.owners
            .extend(found.into_iter().map(|(k, v, p)| ((k, v), p)));
    }
    tx.commit().await?;
    Ok(out)
}
