//! Applying a batch of source changes to the profile store: the events, the
//! merge result and the source's checkpoint commit in one sink transaction.
//!
//! The merge rules live in [`crate::resolve`]; this adapter loads the slice of
//! state the batch touches (the rows' previous contributions, the owners of the
//! identifiers in the new images, those profiles' aggregate state), runs the
//! pure core over the batch in order, and writes back what the change log says
//! changed, with multi-row statements (`unnest`). A transaction-scoped advisory
//! lock serialises batches from all sources (and all processes), so identity
//! merges and profile-id allocation never race.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use serde_json::{Map, Value};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::event_log::{self, EventRows};
use super::{Store, StoreError};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::failpoint::{self, Stage};
use crate::identity::Ident;
use crate::mapping::Mapper;
use crate::resolve::{
    extreme, resolve_fields, traits, truncate_as_deletes, AggState, ChangeLog, Contribution,
    Outcome, ProfileId, ProfileState, RowRef, SplitScope, State, Winner,
};
use crate::state::{CachedProfile, MergeCache};

/// Key of the advisory lock that serialises profile writes.
const APPLY_LOCK: i64 = 0x7472_6962_7574; // "tribut"

/// A profile whose traits (or merge pointer) a batch changed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProfileChange {
    /// The profile.
    pub profile_id: ProfileId,
    /// Set when the batch merged it into another profile.
    pub merged_into: Option<ProfileId>,
    /// Traits whose value changed (null: the trait is gone).
    pub changed: Map<String, Value>,
    /// All traits after the batch.
    pub traits: Map<String, Value>,
}

/// A row the batch sent to `dead_letters`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DeadLetter {
    /// Source name.
    pub source: String,
    /// `schema.table`.
    pub table: String,
    /// Commit LSN of the change.
    pub lsn: Lsn,
    /// The row image.
    pub row: Map<String, Value>,
    /// Why it could not be mapped.
    pub error: String,
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ApplyStats {
    /// Events in the batch (after truncate expansion).
    pub events: usize,
    /// Events that changed a contribution.
    pub applied: usize,
    /// Older or duplicate events.
    pub stale: usize,
    /// Events sent to dead_letters.
    pub dead_letters: usize,
    /// Profiles whose traits were recomputed.
    pub profiles_touched: usize,
    /// Identity merges.
    pub merges: usize,
    /// Profiles split (a row that joined two groups of identifiers went).
    pub splits: usize,
    /// Identifiers that left their profile (no live row carries them).
    pub identities_removed: usize,
    /// Changes of forgotten people, dropped.
    pub suppressed: usize,
    /// Profiles whose traits or merge pointer changed, for the profiles topic.
    pub profile_changes: Vec<ProfileChange>,
    /// Rows sent to `dead_letters`, for the dead-letter topic.
    pub dead: Vec<DeadLetter>,
}

/// Live contributions of `profiles`, grouped by profile; with `with_fields`
/// only the rows that carry field values.
pub(crate) async fn contributions_by_profile(
    tx: &mut PgConnection,
    profiles: &[ProfileId],
    with_fields: bool,
) -> Result<BTreeMap<ProfileId, Vec<Contribution>>, StoreError> {
    let filter = if with_fields {
        " and c.fields::text <> '{}'"
    } else {
        ""
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "select {CONTRIBUTION_COLUMNS} from contributions c where c.profile_id = any($1) and not c.deleted{filter}"
    )))
    .bind(profiles)
    .fetch_all(&mut *tx)
    .await?;
    let mut out: BTreeMap<ProfileId, Vec<Contribution>> = BTreeMap::new();
    for r in &rows {
        let c = row_of(r)?;
        if let Some(p) = c.profile_id {
            out.entry(p).or_default().push(c);
        }
    }
    Ok(out)
}

/// Takes the lock that serialises profile writes, for the rest of the transaction.
/// Returns the store's write generation, which every holder moves forward
/// (see [`crate::state`]: a cache is trusted only if nobody else wrote).
pub(crate) async fn lock(tx: &mut PgConnection) -> Result<i64, StoreError> {
    lock_then(tx, "").await
}

/// [`lock`], then the statements `then`, in one round trip.
async fn lock_then(tx: &mut PgConnection, then: &str) -> Result<i64, StoreError> {
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "select pg_advisory_xact_lock({APPLY_LOCK});
         update write_generation set generation = generation + 1 returning generation;
         {then}"
    )))
    .fetch_all(&mut *tx)
    .await?;
    let generation = rows.last().ok_or(sqlx::Error::RowNotFound)?;
    Ok(generation.try_get::<i64, _>(0)?)
}

pub(crate) fn row_of(r: &sqlx::postgres::PgRow) -> Result<Contribution, sqlx::Error> {
    let identities: Json<Vec<(String, String)>> = r.try_get("identities")?;
    let fields: Json<BTreeMap<String, Value>> = r.try_get("fields")?;
    let aggs: Json<BTreeMap<String, Value>> = r.try_get("aggs")?;
    let lsn: String = r.try_get("lsn")?;
    Ok(Contribution {
        row: RowRef {
            source: r.try_get("source")?,
            table: r.try_get("table_name")?,
            row_key: r.try_get("row_key")?,
        },
        profile_id: r.try_get("profile_id")?,
        deleted: r.try_get("deleted")?,
        identities: identities.0,
        fields: fields.0,
        aggs: aggs.0,
        version: r.try_get("version")?,
        lsn: lsn.parse().unwrap_or_default(),
        seq: u64::try_from(r.try_get::<i64, _>("seq")?).unwrap_or(0),
        freshness: r.try_get("freshness")?,
        priority: r.try_get("priority")?,
        digest: None,
    })
}

pub(crate) const CONTRIBUTION_COLUMNS: &str =
    "c.source, c.table_name, c.row_key, c.profile_id, c.deleted, c.identities, c.fields, c.aggs, c.version, c.lsn::text as lsn, c.seq, c.freshness, c.priority";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ApplyStats {
    /// Whether the batch changed which profile rows and identifiers belong
    /// to beyond the keys it loaded (a merge re-points the loser's rows in
    /// the store): a cache planned on top must wait for its commit and drop
    /// its entries. A split needs neither: it loads every row and identifier
    /// of the profile it splits, so the cache holds all it changed, and an
    /// identifier it removed is cached as owned by nobody.
    pub fn regrouped(&self) -> bool {
        self.merges > 0
    }

    /// Whether an outbox has anything of this batch to deliver.
    pub fn publishes_anything(&self) -> bool {
        !self.profile_changes.is_empty() || !self.dead.is_empty()
    }
}

impl Store {
    /// Applies `events` of `source` (in commit order) and, when given, moves the
    /// source's checkpoint to `checkpoint`, all in one transaction.
    pub async fn apply(
        &self,
        mapper: &Mapper,
        source: &str,
        events: &[ChangeEvent],
        checkpoint: Option<Lsn>,
    ) -> Result<ApplyStats, StoreError> {
        self.apply_via(mapper, source, events, checkpoint, None)
            .await
    }

    /// [`Store::apply`], handing the batch's profile changes and dead letters
    /// to `outbox` before the commit.
    pub async fn apply_via(
        &self,
        mapper: &Mapper,
        source: &str,
        events: &[ChangeEvent],
        checkpoint: Option<Lsn>,
        outbox: Option<&dyn super::Outbox>,
    ) -> Result<ApplyStats, StoreError> {
        let prepared = self
            .prepare(mapper, source, events, checkpoint, outbox.is_some())
            .await?;
        self.finish(prepared, outbox).await
    }

    /// Records messages that are not change events (the Kafka apply role):
    /// into `dead_letters` (no LSN: they have none) and through `outbox` to the
    /// dead-letter topic, in one transaction, before the caller commits their
    /// offsets. `source` names them for the outbox. With `consumed`, it commits
    /// only while the owner's lease holds, and moves its offsets.
    pub async fn record_undecodable(
        &self,
        source: &str,
        letters: Vec<DeadLetter>,
        consumed: Option<&super::lease::Consumed>,
        outbox: Option<&dyn super::Outbox>,
    ) -> Result<(), StoreError> {
        if letters.is_empty() && consumed.is_none() {
            return Ok(());
        }
        let mut tx = self.pool().begin().await?;
        if let Some(c) = consumed {
            super::lease::hold(&mut tx, c).await?;
        }
        sqlx::query(
            "insert into dead_letters (source, lsn, table_name, row, error)
             select s, null, t, r::jsonb, e from unnest($1::text[], $2::text[], $3::text[], $4::text[]) as u(s, t, r, e)",
        )
        .bind(letters.iter().map(|d| d.source.clone()).collect::<Vec<_>>())
        .bind(letters.iter().map(|d| d.table.clone()).collect::<Vec<_>>())
        .bind(letters.iter().map(|d| dead_letter_row(&d.row)).collect::<Vec<_>>())
        .bind(letters.iter().map(|d| d.error.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        if let Some(o) = outbox.filter(|_| !letters.is_empty()) {
            let stats = ApplyStats {
                dead_letters: letters.len(),
                dead: letters,
                ..ApplyStats::default()
            };
            o.deliver(source, &stats)
                .await
                .map_err(StoreError::Outbox)?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Creates the monthly `events` partitions the batch needs (once per month
    /// per process), outside the batch transaction.
    pub(crate) async fn ensure_partitions(&self, events: &[ChangeEvent]) -> Result<(), StoreError> {
        self.ensure_partitions_for(events.iter().map(|e| e.commit_time))
            .await
    }

    /// Creates the monthly `events` partitions for these commit times (once
    /// per month per process), outside any transaction.
    pub(crate) async fn ensure_partitions_for(
        &self,
        times: impl Iterator<Item = chrono::DateTime<chrono::Utc>>,
    ) -> Result<(), StoreError> {
        use chrono::Datelike;
        let months: BTreeSet<(i32, u32)> = times.map(|t| (t.year(), t.month())).collect();
        for (y, m) in months {
            if self
                .partitions
                .lock()
                .map(|p| p.contains(&(y, m)))
                .unwrap_or(false)
            {
                continue;
            }
            self.create_partitions_from(y, m, 1).await?;
        }
        Ok(())
    }

    /// Creates `count` monthly partitions starting at year `y`, month `m`.
    pub async fn create_partitions_from(
        &self,
        mut y: i32,
        mut m: u32,
        count: u32,
    ) -> Result<(), StoreError> {
        for _ in 0..count {
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let sql = format!(
                "create table if not exists events_y{y:04}m{m:02} partition of events for values from ('{y:04}-{m:02}-01 00:00:00+00') to ('{ny:04}-{nm:02}-01 00:00:00+00')"
            );
            match sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&self.pool)
                .await
            {
                Ok(_) => {}
                // Two processes creating the same partition at once: the loser sees a duplicate.
                Err(e) if super::created_concurrently(&e) => {}
                Err(e) => return Err(e.into()),
            }
            if let Ok(mut p) = self.partitions.lock() {
                p.insert((y, m));
            }
            (y, m) = (ny, nm);
        }
        Ok(())
    }
}

/// Applies `events` inside `tx` (which holds the lock). With `record_dead_letters`
/// false (replay), rows that cannot be mapped are counted but not recorded again.
/// The events are logged in `tx` too.
pub(crate) async fn apply_in(
    tx: &mut PgConnection,
    mapper: &Mapper,
    source: &str,
    events: &[ChangeEvent],
    record_dead_letters: bool,
    cache: Option<&mut MergeCache>,
) -> Result<ApplyStats, StoreError> {
    index_probes_only(tx).await?;
    let plan_for = PlanFor {
        dead_letters: record_dead_letters,
        publish: false,
    };
    let plan = plan(tx, mapper, source, events, plan_for, cache, None).await?;
    write_plan(tx, None, &plan).await?;
    Ok(plan.stats)
}

/// Every statement of a batch looks rows up by key, a batch's worth in
/// tables that can be a thousand times larger, and the statistics of a store
/// being filled (a backlog, a snapshot) lag far behind its size: the planner
/// then hashed the whole of `contributions` or `identities` once per batch
/// (measured: a 100,000-row hash join, 300-500 ms, to find 700 keys). Index
/// probes are always right here. For the rest of the transaction.
pub(crate) async fn index_probes_only(tx: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::raw_sql(PROBES_ONLY).execute(&mut *tx).await?;
    Ok(())
}

macro_rules! probes_only {
    () => {
        "set local enable_hashjoin = off; set local enable_mergejoin = off; set local enable_seqscan = off"
    };
}
const PROBES_ONLY: &str = probes_only!();

/// `BEGIN` and [`index_probes_only`] in one round trip, for
/// `begin_with`: a small batch made about twenty round trips to the store,
/// each a wake-up of both processes and, on busy cores, a wait for one.
pub(crate) const BEGIN_PROBES_ONLY: &str = concat!("begin; ", probes_only!());

/// [`lock`] and [`index_probes_only`] in one round trip.
pub(crate) async fn lock_probes_only(tx: &mut PgConnection) -> Result<i64, StoreError> {
    lock_then(tx, PROBES_ONLY).await
}

/// A batch read and derived, ready to be written: the event log rows, the
/// derived rows, and what it did. Computing it reads the store but writes
/// nothing, so it can run beside the previous batch's commit (see
/// `store::pipeline`).
pub(crate) struct Plan {
    events: EventRows,
    writes: Writes,
    pub(crate) stats: ApplyStats,
    /// The cache keys the batch touched (pinned until it commits).
    pub(crate) pins: Pins,
    /// Whether `stats` holds the profile changes to publish (planned for a
    /// process that publishes them; a plan without them is never handed to
    /// an outbox, see `pipeline`).
    pub(crate) publishes: bool,
}

/// Keys of the merge state a batch touched.
#[derive(Debug, Default, Clone)]
pub struct Pins {
    /// Source rows.
    pub rows: Vec<RowRef>,
    /// Identifiers.
    pub idents: Vec<Ident>,
    /// Profiles.
    pub profiles: Vec<ProfileId>,
}

/// Before a read by profile (all rows of a profile, its identifier count, its
/// stored provenance) of a batch planned beside uncommitted ones: waits until
/// those committed when one of them touched any of `profiles`, since their
/// rows are in the store only then. Reads by key need no wait: the keys an
/// uncommitted batch touched stay in the cache until it commits.
pub(crate) trait ReadGuard: Send {
    /// Waits, when needed, until the store holds what `profiles` need.
    fn before_profile_reads<'a>(
        &'a mut self,
        profiles: &'a [ProfileId],
    ) -> futures_util::future::BoxFuture<'a, Result<(), StoreError>>;

    /// Waits until every batch before this one committed (a truncate reads
    /// all of a table's rows).
    fn quiesce(&mut self) -> futures_util::future::BoxFuture<'_, Result<(), StoreError>>;
}

async fn guard_reads(
    guard: &mut Option<&mut dyn ReadGuard>,
    profiles: &[ProfileId],
) -> Result<(), StoreError> {
    match guard {
        Some(g) if !profiles.is_empty() => g.before_profile_reads(profiles).await,
        _ => Ok(()),
    }
}

/// What a plan is made for, beside its batch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanFor {
    /// Rows that cannot be mapped are recorded in `dead_letters` (a replay
    /// counts them without recording them again).
    pub(crate) dead_letters: bool,
    /// The write goes to an outbox: its profile changes are computed.
    pub(crate) publish: bool,
}

/// Reads the slice of state `events` touch (from the cache where it holds
/// it), runs the pure core and computes every row to write; writes nothing.
/// `tx` sees the store as committed (a connection of its own, beside earlier
/// uncommitted writes that `guard` waits for when needed), or is the batch's
/// own transaction before any of its writes ([`apply_in`]).
pub(crate) async fn plan(
    tx: &mut PgConnection,
    mapper: &Mapper,
    source: &str,
    events: &[ChangeEvent],
    plan_for: PlanFor,
    mut cache: Option<&mut MergeCache>,
    mut guard: Option<&mut dyn ReadGuard>,
) -> Result<Plan, StoreError> {
    // 2. Expand truncates into deletes of the table's live rows: those the
    // store holds and those this batch wrote before the truncate.
    let mut expanded: Vec<Cow<'_, ChangeEvent>> = Vec::with_capacity(events.len());
    let mut written: HashMap<&str, BTreeSet<String>> = HashMap::new();
    // Which rows the batch wrote matters only to a truncate after them.
    let truncates = events.iter().any(|e| e.op == Op::Truncate);
    for e in events {
        if e.op == Op::Truncate {
            // The table's rows as the store holds them: only once every
            // batch before this one committed.
            if let Some(g) = guard.as_deref_mut() {
                g.quiesce().await?;
            }
            let mut keys: BTreeSet<String> = sqlx::query_scalar("select row_key from contributions where source = $1 and table_name = $2 and not deleted")
                .bind(source)
                .bind(&e.table)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            keys.extend(written.remove(e.table.as_str()).unwrap_or_default());
            let keys = keys
                .iter()
                .filter_map(|k| serde_json::from_str::<Map<String, Value>>(k).ok());
            expanded.extend(truncate_as_deletes(e, keys).into_iter().map(Cow::Owned));
        } else {
            if truncates && matches!(e.op, Op::Insert | Op::Update | Op::Snapshot) {
                written
                    .entry(e.table.as_str())
                    .or_default()
                    .insert(e.row_key());
            }
            expanded.push(Cow::Borrowed(e));
        }
    }

    // 3. Load the slice of state the batch touches: from the cache where it
    // holds it, from the store for the rest (nothing for keys known to be new).
    let mut state = State::slice(mapper);
    let mut existing = Existing::default();
    // Each mapped event's row, its key rendered once.
    let mut event_rows: Vec<Option<RowRef>> = expanded
        .iter()
        .map(|e| {
            mapper.table(&e.source, &e.table).map(|_| RowRef {
                source: e.source.clone(),
                table: e.table.clone(),
                row_key: e.row_key(),
            })
        })
        .collect();
    let rows: BTreeSet<&RowRef> = event_rows.iter().flatten().collect();
    let mut misses: Vec<&RowRef> = Vec::new();
    for &r in &rows {
        match cache.as_deref_mut() {
            Some(c) => {
                if let Some(hit) = c.take_contribution(r) {
                    existing.rows.insert(r.clone());
                    state.contributions.insert(r.clone(), hit);
                } else if c.may_hold_row(r) {
                    misses.push(r);
                }
            }
            None => misses.push(r),
        }
    }
    if cache.is_some() {
        let hits = existing.rows.len();
        metrics::counter!(crate::metrics::CACHE_ROWS, "result" => "hit").increment(hits as u64);
        metrics::counter!(crate::metrics::CACHE_ROWS, "result" => "read")
            .increment(misses.len() as u64);
        metrics::counter!(crate::metrics::CACHE_ROWS, "result" => "new")
            .increment((rows.len() - hits - misses.len()) as u64);
    }
    if !misses.is_empty() {
        let tables: Vec<&str> = misses.iter().map(|r| r.table.as_str()).collect();
        let keys: Vec<&str> = misses.iter().map(|r| r.row_key.as_str()).collect();
        let loaded = sqlx::query(sqlx::AssertSqlSafe(format!(
            "select {CONTRIBUTION_COLUMNS} from contributions c
               join unnest($2::text[], $3::text[]) as u(t, k) on c.table_name = u.t and c.row_key = u.k
              where c.source = $1"
        )))
        .bind(source)
        .bind(&tables)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        for r in &loaded {
            let c = row_of(r)?;
            existing.rows.insert(c.row.clone());
            state.contributions.insert(c.row.clone(), c);
        }
    }
    // Identifiers of the new images (unchanged TOAST ones come from the loaded rows).
    let mut idents: BTreeSet<Ident> = BTreeSet::new();
    // Each event's new image's identifiers (None: a delete or truncate, an
    // unmapped table, or an image that cannot be mapped).
    let mut event_idents: Vec<Option<Vec<Ident>>> = vec![None; expanded.len()];
    for (i, e) in expanded
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e.op, Op::Insert | Op::Update | Op::Snapshot))
    {
        if let (Some(m), Some(row)) = (mapper.table(&e.source, &e.table), &event_rows[i]) {
            let prev = state.contributions.get(row);
            if let Ok(ids) = m.identities(e, prev.filter(|p| !p.deleted)) {
                idents.extend(ids.iter().cloned());
                event_idents[i] = Some(ids);
            }
        }
    }
    // A live row's identifiers all belong to the row's profile: the row links
    // them, and a merge re-points a profile's identifiers and rows in one
    // statement. So an identifier that a loaded live row carries is owned by
    // that row's profile, with no lookup (an update of a row the store holds
    // reads its identifiers' owners for nothing otherwise: 750,000 of the 1M
    // backlog's million lookups). The cache, which may hold a later owner
    // planned by an earlier write, is asked first. With `merge.max_identities`
    // every owner is read, as before.
    let carried: HashMap<&Ident, ProfileId> = if mapper.max_identities().is_none() {
        state
            .contributions
            .values()
            .filter(|c| !c.deleted)
            .filter_map(|c| c.profile_id.map(|p| (c, p)))
            .flat_map(|(c, p)| c.identities.iter().map(move |i| (i, p)))
            .collect()
    } else {
        HashMap::new()
    };
    let mut ident_misses: Vec<&Ident> = Vec::new();
    let (mut hits, mut from_rows) = (0u64, 0u64);
    for i in &idents {
        let owner = match cache.as_deref().and_then(|c| c.owner(i)) {
            Some(Some(p)) => {
                hits += 1;
                Some(p)
            }
            Some(None) => {
                // Known to have no owner: new to the store once the write
                // that removed it commits, which is before this one writes.
                hits += 1;
                continue;
            }
            None => carried.get(i).copied().inspect(|_| from_rows += 1),
        };
        if let Some(p) = owner {
            existing.idents.insert(i.clone());
            state.owners.insert(i.clone(), p);
        } else if cache.as_deref().is_none_or(|c| c.may_hold_ident(i)) {
            ident_misses.push(i);
        }
    }
    drop(carried);
    if cache.is_some() {
        let counter = |result: &'static str, n: u64| {
            metrics::counter!(crate::metrics::CACHE_IDENTIFIERS, "result" => result).increment(n);
        };
        counter("hit", hits);
        counter("carried", from_rows);
        counter("read", ident_misses.len() as u64);
        counter(
            "new",
            (idents.len() - ident_misses.len()) as u64 - hits - from_rows,
        );
    }
    if !ident_misses.is_empty() {
        let kinds: Vec<&str> = ident_misses.iter().map(|(k, _)| k.as_str()).collect();
        let values: Vec<&str> = ident_misses.iter().map(|(_, v)| v.as_str()).collect();
        let owners: Vec<(String, String, i64)> = sqlx::query_as(
            "select i.kind, i.value, i.profile_id from identities i join unnest($1::text[], $2::text[]) as u(k, v) on i.kind = u.k and i.value = u.v",
        )
        .bind(&kinds)
        .bind(&values)
        .fetch_all(&mut *tx)
        .await?;
        for (k, v, p) in owners {
            existing.idents.insert((k.clone(), v.clone()));
            state.owners.insert((k, v), p);
        }
    }
    // Forgotten people: a change that carries a suppressed identifier is neither
    // logged nor applied, whether it is live, replayed or read by a snapshot.
    let suppressed = suppressed_among(tx, &idents, cache.as_deref_mut()).await?;
    let mut skipped: HashSet<(Lsn, u64)> = HashSet::new();
    if !suppressed.is_empty() {
        for (e, ids) in expanded.iter().zip(&event_idents) {
            if ids.iter().flatten().any(|i| suppressed.contains(i)) {
                skipped.insert((e.commit_lsn, e.seq));
            }
        }
        let keep: Vec<bool> = expanded
            .iter()
            .map(|e| !skipped.contains(&(e.commit_lsn, e.seq)))
            .collect();
        retain_kept(&mut expanded, &keep);
        retain_kept(&mut event_rows, &keep);
        retain_kept(&mut event_idents, &keep);
    }
    // The event log, as received (idempotent on (source, commit_lsn, seq)).
    let kept: Vec<&ChangeEvent> = events
        .iter()
        .filter(|e| !skipped.contains(&(e.commit_lsn, e.seq)))
        .collect();
    let events_rows = EventRows::of(&kept);
    let (stats, writes, pins) = derive(
        tx,
        mapper,
        Loaded {
            state,
            existing,
            cache,
            rows: event_rows,
            idents: event_idents,
        },
        expanded,
        skipped.len(),
        plan_for,
        &mut guard,
    )
    .await?;
    Ok(Plan {
        events: events_rows,
        writes,
        stats,
        pins,
        publishes: plan_for.publish,
    })
}

/// Writes a planned batch in `tx`. A small batch's event log goes in the
/// one statement with its derived rows. A large one's goes by `COPY` in
/// `log`, a transaction of its own on a second connection, at the same time
/// as the derived rows (two backends work in parallel), or in `tx` ahead of
/// the derived rows when there is no `log`.
///
/// `log` commits as soon as its `COPY` is done, while the derived rows are
/// still being written, so always before `tx` (which the caller commits after
/// this returns): its commit's WAL flush, 5 ms a batch and 8 s of the 1M
/// backlog's 43 s when it waited for the derived rows, now overlaps them.
/// If the batch then fails, the retry finds the events logged and keeps them
/// (see `store::event_log`), as after a crash between the two commits.
pub(crate) async fn write_plan(
    tx: &mut PgConnection,
    log: Option<sqlx::Transaction<'_, sqlx::Postgres>>,
    plan: &Plan,
) -> Result<(), StoreError> {
    match (&plan.events, log) {
        (EventRows::Insert(columns), log) => {
            let added = plan.writes.write(tx, Some(columns)).await?;
            event_log::kept_logged(columns.len(), added);
            if let Some(l) = log {
                // Nothing to log there (the batch shrank to a small one).
                l.commit().await?;
            }
            Ok(())
        }
        (EventRows::Copy { chunks, len }, None) => {
            event_log::append(tx, chunks, *len).await?;
            plan.writes.write(tx, None).await.map(drop)
        }
        (EventRows::Copy { chunks, len }, Some(mut log)) => {
            let (logged, derived) = tokio::join!(
                async {
                    event_log::append(&mut log, chunks, *len).await?;
                    log.commit().await?;
                    failpoint::hit(Stage::LogCommitted);
                    Ok::<(), StoreError>(())
                },
                plan.writes.write(tx, None)
            );
            logged?;
            derived.map(drop)
        }
    }
}

/// Which rows of the batch's slice the store already holds (the rest are
/// new, and written with a plain `INSERT`).
#[derive(Default)]
struct Existing {
    rows: HashSet<RowRef>,
    idents: HashSet<Ident>,
}

/// The batch's slice of the merge state, with where it came from.
struct Loaded<'c> {
    state: State,
    existing: Existing,
    cache: Option<&'c mut MergeCache>,
    /// Each (expanded, unsuppressed) event's row, None for unmapped tables.
    rows: Vec<Option<RowRef>>,
    /// Each such event's new image's identifiers, as the plan mapped them
    /// (None: a delete or truncate, or not mapped).
    idents: Vec<Option<Vec<Ident>>>,
}

/// Keeps the items of `v` whose entry in `keep` is true (`keep` runs
/// beside `v`).
fn retain_kept<T>(v: &mut Vec<T>, keep: &[bool]) {
    let mut k = keep.iter();
    v.retain(|_| k.next().copied().unwrap_or(true));
}

/// The suppressed identifiers among `idents`: from the cache's copy of
/// `suppressions` (loaded whole once per cache generation), or by a lookup.
async fn suppressed_among(
    tx: &mut PgConnection,
    idents: &BTreeSet<Ident>,
    cache: Option<&mut MergeCache>,
) -> Result<BTreeSet<Ident>, StoreError> {
    if let Some(c) = cache {
        if c.suppressions().is_none() {
            let all: Vec<(String, String)> = sqlx::query_as("select kind, value from suppressions")
                .fetch_all(&mut *tx)
                .await?;
            c.set_suppressions(all.into_iter().collect());
        }
        return Ok(c.suppressions().map_or_else(BTreeSet::new, |s| {
            idents.iter().filter(|i| s.contains(*i)).cloned().collect()
        }));
    }
    let kinds: Vec<&str> = idents.iter().map(|(k, _)| k.as_str()).collect();
    let values: Vec<&str> = idents.iter().map(|(_, v)| v.as_str()).collect();
    Ok(sqlx::query_as::<_, (String, String)>(
        "select s.kind, s.value from suppressions s join unnest($1::text[], $2::text[]) as u(k, v) on s.kind = u.k and s.value = u.v",
    )
    .bind(&kinds)
    .bind(&values)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .collect())
}

/// Runs the pure core over the batch's (expanded, unsuppressed) events and
/// computes what to write: contributions, identities, profiles, dead letters.
/// With a cache, the slice goes back into it as the batch leaves it, and the
/// keys it touched are returned to be pinned.
async fn derive(
    tx: &mut PgConnection,
    mapper: &Mapper,
    loaded: Loaded<'_>,
    expanded: Vec<Cow<'_, ChangeEvent>>,
    suppressed: usize,
    plan_for: PlanFor,
    guard: &mut Option<&mut dyn ReadGuard>,
) -> Result<(ApplyStats, Writes, Pins), StoreError> {
    let Loaded {
        mut state,
        mut existing,
        mut cache,
        rows: event_rows,
        idents: event_idents,
    } = loaded;
    let mut want: BTreeSet<ProfileId> = state
        .owners
        .values()
        .copied()
        .chain(state.contributions.values().filter_map(|c| c.profile_id))
        .collect();
    // What the store holds for each loaded profile, to write only what changes.
    let mut before: HashMap<ProfileId, StoredProfile> = HashMap::new();
    // What the cache also knew of them (provenance, rows with fields).
    let mut known: HashMap<ProfileId, CachedProfile> = HashMap::new();
    while !want.is_empty() {
        let mut ids: Vec<i64> = Vec::new();
        for p in std::mem::take(&mut want) {
            match cache.as_deref_mut().and_then(|c| c.take_profile(p)) {
                Some(mut cp) => {
                    if let Some(m) = cp.merged_into.filter(|m| !state.profiles.contains_key(m)) {
                        want.insert(m);
                    }
                    state.profiles.insert(
                        p,
                        ProfileState {
                            merged_into: cp.merged_into,
                            aggs: cp.aggs.clone(),
                            identities: 0,
                        },
                    );
                    before.insert(
                        p,
                        StoredProfile {
                            merged_into: cp.merged_into,
                            aggs: std::mem::take(&mut cp.aggs),
                            traits: std::mem::take(&mut cp.traits),
                        },
                    );
                    known.insert(p, cp);
                }
                None => ids.push(p),
            }
        }
        if ids.is_empty() {
            continue;
        }
        let profs: Vec<ProfileRow> = sqlx::query_as(
            "select profile_id, merged_into, agg_state, traits from profiles where profile_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        for (p, merged_into, aggs, traits) in profs {
            if let Some(m) = merged_into.filter(|m| !state.profiles.contains_key(m)) {
                want.insert(m);
            }
            state.profiles.insert(
                p,
                ProfileState {
                    merged_into,
                    aggs: aggs.0.clone(),
                    identities: 0,
                },
            );
            before.insert(
                p,
                StoredProfile {
                    merged_into,
                    aggs: aggs.0,
                    traits: traits.0,
                },
            );
        }
    }
    if mapper.max_identities().is_some() {
        // Only the merge limit needs to know how many identifiers a profile owns.
        let ids: Vec<i64> = state.profiles.keys().copied().collect();
        guard_reads(guard, &ids).await?;
        let counts: Vec<(i64, i64)> =
            sqlx::query_as("select profile_id, count(*) from identities where profile_id = any($1) group by profile_id")
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
        for (p, n) in counts {
            if let Some(st) = state.profiles.get_mut(&p) {
                st.identities = n;
            }
        }
    }
    state.next_profile_id = match cache.as_deref().and_then(MergeCache::next_profile_id) {
        Some(n) => n,
        None => next_profile_id(tx).await?,
    };

    // 4. The pure core, event by event.
    let mut stats = ApplyStats {
        events: expanded.len(),
        suppressed,
        ..Default::default()
    };
    // (event, the reason in full for the table, the reason without values for logs)
    let mut dead: Vec<(&ChangeEvent, String, String)> = Vec::new();
    let mut splitting = Splitting::default();
    let candidates = withdrawing(&state, &event_rows, &event_idents);
    drop((event_rows, event_idents));
    state.track_splits(candidates.is_some());
    if let Some(candidates) = candidates.filter(|c| !c.is_empty()) {
        load_for_split(
            tx,
            &mut state,
            &mut existing,
            &mut splitting,
            guard,
            candidates,
        )
        .await?;
    }
    for (n, e) in expanded.iter().enumerate() {
        match state.apply(mapper, e) {
            Ok(Outcome::Applied) => stats.applied += 1,
            Ok(Outcome::Stale) => stats.stale += 1,
            Ok(Outcome::Unmapped) => {}
            Err(err) => dead.push((e, err.to_string(), err.redacted())),
        }
        // Splits are settled at the end of each source transaction, so the
        // profiles (and the ids a split allocates) depend on the sequence of
        // transactions only, not on how they were grouped into batches.
        let last_of_transaction = expanded
            .get(n + 1)
            .is_none_or(|next| next.commit_lsn != e.commit_lsn);
        if last_of_transaction && !state.log.unlinked.is_empty() {
            split_unlinked(tx, &mut state, &mut existing, &mut splitting, guard).await?;
        }
    }
    stats.dead_letters = dead.len();
    let log = std::mem::take(&mut state.log);
    stats.merges = log.merges.len();
    stats.splits = log.splits.len();
    stats.identities_removed = log.removed_identities.len();

    // 5. What to write back: merges first (they re-point rows this batch did
    // not load), then contributions and identifiers.
    let mut writes = Writes {
        merges: log.merges.clone(),
        ..Writes::default()
    };
    writes.contributions(
        log.contributions
            .iter()
            .filter_map(|r| state.contributions.get(r)),
        &existing.rows,
    );
    writes.identities(
        log.identities
            .iter()
            .filter_map(|i| state.owners.get(i).map(|p| (i, *p))),
        &existing.idents,
        &log.first_reset,
    );
    for (k, v) in &log.removed_identities {
        writes.removed_identities.kind.push(k.clone());
        writes.removed_identities.value.push(v.clone());
    }

    // 6. Recompute traits of every touched profile.
    stats.profiles_touched = log.dirty.len();
    let (changes, mut after) = refresh_profiles(
        tx,
        mapper,
        &mut state,
        &log,
        &before,
        &mut known,
        cache.as_deref(),
        plan_for.publish,
        &mut writes,
        guard,
    )
    .await?;
    stats.profile_changes = changes;

    // 7. Dead letters: the stream goes on.
    if plan_for.dead_letters && !dead.is_empty() {
        stats.dead = dead
            .iter()
            .map(|(e, err, _)| DeadLetter {
                source: e.source.clone(),
                table: e.table.clone(),
                lsn: e.commit_lsn,
                row: e.row.clone(),
                error: err.clone(),
            })
            .collect();
        // One WARN per batch (nothing per row above DEBUG); the rows and their
        // reasons are in the table. Nothing from a row is logged above DEBUG:
        // the WARN's reason is the redacted one (no identifier, no value).
        for (e, err, _) in &dead {
            tracing::debug!(source = %e.source, table = %e.table, lsn = %e.commit_lsn, error = %err, "row sent to dead_letters");
        }
        let (first, _, reason) = &dead[0];
        tracing::warn!(source = %first.source, rows = dead.len(), first_table = %first.table, first_lsn = %first.commit_lsn,
            first_error = %reason, "rows sent to dead_letters; the stream goes on");
        writes.dead = DeadRows {
            source: dead.iter().map(|(e, ..)| e.source.clone()).collect(),
            lsn: dead
                .iter()
                .map(|(e, ..)| e.commit_lsn.to_string())
                .collect(),
            table: dead.iter().map(|(e, ..)| e.table.clone()).collect(),
            row: dead.iter().map(|(e, ..)| dead_letter_row(&e.row)).collect(),
            error: dead.iter().map(|(_, err, _)| err.clone()).collect(),
        };
    }

    // 8. The slice, as the batch leaves it, goes back into the cache (it
    // counts once the batch commits; until then it is pinned there).
    let mut pins = Pins::default();
    if let Some(c) = cache {
        c.set_next_profile_id(state.next_profile_id);
        pins.rows = state.contributions.keys().cloned().collect();
        pins.idents = state.owners.keys().cloned().collect();
        pins.profiles = state.profiles.keys().copied().collect();
        for (_, contribution) in state.contributions.drain() {
            c.put_contribution(contribution);
        }
        for (i, p) in state.owners.drain() {
            c.put_owner(i, p);
        }
        for i in &log.removed_identities {
            c.remove_owner(i.clone());
        }
        pins.idents.extend(log.removed_identities.iter().cloned());
        for (p, st) in state.profiles.drain() {
            let entry = match after.remove(&p) {
                Some(e) => e,
                None => {
                    let Some(b) = before.remove(&p) else { continue };
                    let extra = known.remove(&p).unwrap_or_default();
                    CachedProfile {
                        merged_into: st.merged_into,
                        aggs: b.aggs,
                        traits: b.traits,
                        winners: extra.winners,
                        field_rows: extra.field_rows,
                    }
                }
            };
            c.put_profile(p, entry);
        }
    }
    Ok((stats, writes, pins))
}

/// Settles the profiles the batch withdrew identifiers from
/// ([`State::split_unlinked`]): loads every live row and identifier of them
/// (and of the profiles this batch merged into them) that the batch does not
/// hold, with the identifiers' first profiles, then splits them in the pure
/// core. Costs one read of each such profile, like a re-resolve; only a
/// delete or an identifier change gets here.
async fn split_unlinked(
    tx: &mut PgConnection,
    state: &mut State,
    existing: &mut Existing,
    splitting: &mut Splitting,
    guard: &mut Option<&mut dyn ReadGuard>,
) -> Result<(), StoreError> {
    let candidates: Vec<ProfileId> = state
        .log
        .unlinked
        .iter()
        .map(|p| state.live(*p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    load_for_split(tx, state, existing, splitting, guard, candidates.clone()).await?;
    // What the store held of the candidates (and of profiles merged into
    // them); the core adds what the batch changed.
    let mut scope = SplitScope::default();
    for (p, (rows, idents)) in &splitting.read {
        if candidates.contains(&state.live(*p)) {
            scope.rows.extend(rows.iter().cloned());
            scope.idents.extend(idents.iter().cloned());
        }
    }
    state.split_unlinked(&mut splitting.firsts, Some(&scope));
    Ok(())
}

/// Reads into the batch's state every live row and identifier of
/// `candidates` (and of the profiles this batch merged into them) that it
/// has not read yet. The store's rows of a profile do not change while a
/// batch is planned: each profile is read once per batch.
async fn load_for_split(
    tx: &mut PgConnection,
    state: &mut State,
    existing: &mut Existing,
    splitting: &mut Splitting,
    guard: &mut Option<&mut dyn ReadGuard>,
    candidates: Vec<ProfileId>,
) -> Result<(), StoreError> {
    let mut read = candidates.clone();
    read.extend(losers_of(state, &state.log.merges, &candidates));
    // A profile this batch created has nothing in the store.
    read.retain(|p| !splitting.read.contains_key(p) && !state.log.created.contains(p));
    if read.is_empty() {
        return Ok(());
    }
    for p in &read {
        splitting.read.insert(*p, (Vec::new(), Vec::new()));
    }
    guard_reads(guard, &read).await?;
    for (p, rows) in contributions_by_profile(tx, &read, false).await? {
        let keys = &mut splitting.read.entry(p).or_default().0;
        for mut c in rows {
            keys.push(c.row.clone());
            if state.contributions.contains_key(&c.row) {
                continue;
            }
            c.profile_id = c.profile_id.map(|p| state.live(p));
            existing.rows.insert(c.row.clone());
            state.contributions.insert(c.row.clone(), c);
        }
    }
    let stored = identities_of(tx, &read).await?;
    // First profiles: the store's where it has one; else where this batch
    // moved the identifier (a merge); else the profile the store has it in.
    for (k, v, p, first) in stored {
        let i = (k, v);
        existing.idents.insert(i.clone());
        splitting.read.entry(p).or_default().1.push(i.clone());
        if state.log.removed_identities.contains(&i) {
            // An earlier transaction of the batch took it out.
            continue;
        }
        let first = first.or_else(|| state.first.get(&i).copied()).unwrap_or(p);
        splitting.firsts.entry(i.clone()).or_insert(first);
        // A batch's own owner of it (loaded, or moved here) is later.
        let live = state.live(p);
        state.owners.entry(i).or_insert(live);
    }
    Ok(())
}

/// The profiles the batch's changes will withdraw identifiers from, as far
/// as the rows' state before the batch tells (a delete or truncate of a live
/// row, an image that drops one of the row's identifiers): read for their
/// splits in one go before the batch is applied, instead of one read per
/// transaction. Profiles that only later changes of the batch make
/// candidates are read when their transaction ends. None when no change of
/// the batch can withdraw anything (each row changes once and keeps its
/// identifiers: the usual batch), so nothing can split.
///
/// `rows` and `images` run beside the batch's events: each one's row (None
/// for an unmapped table) and new image's identifiers as the plan mapped them
/// (None for a delete or truncate, or an image that cannot be mapped).
fn withdrawing(
    state: &State,
    rows: &[Option<RowRef>],
    images: &[Option<Vec<Ident>>],
) -> Option<Vec<ProfileId>> {
    let mut changes: HashMap<&RowRef, usize> = HashMap::new();
    for row in rows.iter().flatten() {
        *changes.entry(row).or_default() += 1;
    }
    let mut out: BTreeSet<ProfileId> = BTreeSet::new();
    let mut any = false;
    for (row, image) in rows.iter().zip(images) {
        let Some(row) = row else { continue };
        let prev = state.contributions.get(row).filter(|c| !c.deleted);
        if changes.get(row).is_some_and(|n| *n > 1) {
            // A row changed more than once in the batch: a later change may
            // withdraw what an earlier one linked, from any profile its
            // images link to.
            any = true;
            out.extend(prev.and_then(|c| c.profile_id).map(|p| state.live(p)));
            for i in image.iter().flatten() {
                out.extend(state.owners.get(i).map(|p| state.live(*p)));
            }
            continue;
        }
        let Some(prev) = prev else { continue };
        let Some(p) = prev.profile_id else { continue };
        let withdraws = match image {
            Some(ids) => !prev.identities.iter().all(|i| ids.contains(i)),
            None => true,
        };
        if withdraws {
            any = true;
            out.insert(state.live(p));
        }
    }
    any.then(|| out.into_iter().collect())
}

/// The id the store's next new profile takes (ids are never reused).
pub(crate) async fn next_profile_id(tx: &mut PgConnection) -> Result<ProfileId, StoreError> {
    Ok(
        sqlx::query_scalar::<_, i64>("select coalesce(max(profile_id), 0) + 1 from profiles")
            .fetch_one(&mut *tx)
            .await?,
    )
}

/// The identifiers the store has in `profiles`: kind, value, profile and
/// first profile (see [`State::split_unlinked`]).
pub(crate) async fn identities_of(
    tx: &mut PgConnection,
    profiles: &[ProfileId],
) -> Result<Vec<(String, String, i64, Option<i64>)>, StoreError> {
    Ok(sqlx::query_as(
        "select kind, value, profile_id, first_profile_id from identities where profile_id = any($1)",
    )
    .bind(profiles)
    .fetch_all(&mut *tx)
    .await?)
}

/// What a batch's splits have read so far.
#[derive(Default)]
struct Splitting {
    /// Profiles whose store rows and identifiers are in the batch's state,
    /// with the keys of those rows and identifiers.
    read: HashMap<ProfileId, (Vec<RowRef>, Vec<Ident>)>,
    /// First profiles of the identifiers read (see [`State::split_unlinked`]).
    firsts: HashMap<Ident, ProfileId>,
}

/// `contributions` rows, column by column: source, table, key, profile,
/// deleted, identities, fields, aggs, version, LSN, seq, freshness, priority,
/// digest (the 14 parallel arrays the `insert` and the `update` unnest).
#[derive(Default)]
struct ContributionRows {
    source: Vec<String>,
    table: Vec<String>,
    key: Vec<String>,
    profile: Vec<Option<i64>>,
    deleted: Vec<bool>,
    identities: Vec<String>,
    fields: Vec<String>,
    aggs: Vec<String>,
    version: Vec<Option<i64>>,
    lsn: Vec<String>,
    seq: Vec<i64>,
    freshness: Vec<chrono::DateTime<chrono::Utc>>,
    priority: Vec<i32>,
    digest: Vec<Option<i64>>,
}

impl ContributionRows {
    fn push(&mut self, c: &Contribution) {
        self.source.push(c.row.source.clone());
        self.table.push(c.row.table.clone());
        self.key.push(c.row.row_key.clone());
        self.profile.push(c.profile_id);
        self.deleted.push(c.deleted);
        self.identities
            .push(serde_json::to_string(&c.identities).unwrap_or_default());
        self.fields
            .push(serde_json::to_string(&c.fields).unwrap_or_default());
        self.aggs
            .push(serde_json::to_string(&c.aggs).unwrap_or_default());
        self.version.push(c.version);
        self.lsn.push(c.lsn.to_string());
        self.seq.push(i64_of(c.seq));
        self.freshness.push(c.freshness);
        self.priority.push(c.priority);
        self.digest.push(c.digest);
    }

    fn bind<'q, O>(&'q self, q: PgScalar<'q, O>) -> PgScalar<'q, O> {
        q.bind(&self.source)
            .bind(&self.table)
            .bind(&self.key)
            .bind(&self.profile)
            .bind(&self.deleted)
            .bind(&self.identities)
            .bind(&self.fields)
            .bind(&self.aggs)
            .bind(&self.version)
            .bind(&self.lsn)
            .bind(&self.seq)
            .bind(&self.freshness)
            .bind(&self.priority)
            .bind(&self.digest)
    }
}

/// `identities` rows: kind, value, owner, and whether a split moved it (its
/// first profile is its new owner).
#[derive(Default)]
struct IdentityRows {
    kind: Vec<String>,
    value: Vec<String>,
    profile: Vec<i64>,
    moved: Vec<bool>,
}

/// `dead_letters` rows.
#[derive(Default)]
struct DeadRows {
    source: Vec<String>,
    lsn: Vec<String>,
    table: Vec<String>,
    row: Vec<String>,
    error: Vec<String>,
}

/// The derived rows a batch writes, in the order they are written: merges
/// (re-pointing rows the batch did not load), contributions, identifiers,
/// profiles, dead letters. New rows by a plain `INSERT … SELECT FROM
/// unnest(…)`, rows the store holds by one set-based `UPDATE`. (Not `COPY`:
/// sqlx sends a `COPY`'s data and its end in two writes, and Nagle's
/// algorithm then holds the second until the server's delayed ACK, about
/// 30-40 ms per `COPY`, which measured as most of a small batch's time.)
#[derive(Default)]
struct Writes {
    merges: Vec<(ProfileId, ProfileId)>,
    new_contributions: ContributionRows,
    old_contributions: ContributionRows,
    new_identities: IdentityRows,
    old_identities: IdentityRows,
    removed_identities: IdentityRows,
    new_profiles: ProfileRows,
    old_profiles: ProfileRows,
    dead: DeadRows,
}

impl Writes {
    fn contributions<'a>(
        &mut self,
        rows: impl Iterator<Item = &'a Contribution>,
        existing: &HashSet<RowRef>,
    ) {
        for c in rows {
            if existing.contains(&c.row) {
                self.old_contributions.push(c);
            } else {
                self.new_contributions.push(c);
            }
        }
    }

    fn identities<'a>(
        &mut self,
        rows: impl Iterator<Item = (&'a Ident, ProfileId)>,
        existing: &HashSet<Ident>,
        moved: &BTreeSet<Ident>,
    ) {
        for (i, p) in rows {
            let to = if existing.contains(i) {
                &mut self.old_identities
            } else {
                &mut self.new_identities
            };
            to.kind.push(i.0.clone());
            to.value.push(i.1.clone());
            to.profile.push(p);
            to.moved.push(moved.contains(i));
        }
    }

    /// Writes the rows: the merges' re-pointing first, then everything else
    /// (with the batch's event-log rows when they go in this transaction) in
    /// [`WRITE`], one statement and one round trip. Returns how many of the
    /// log rows were new.
    async fn write(
        &self,
        tx: &mut PgConnection,
        events: Option<&event_log::Columns>,
    ) -> Result<u64, StoreError> {
        for (loser, survivor) in &self.merges {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "update identities set profile_id = {survivor}, first_profile_id = coalesce(first_profile_id, profile_id) where profile_id = {loser};
                 update contributions set profile_id = {survivor} where profile_id = {loser};
                 update profiles set merged_into = {survivor} where merged_into = {loser};"
            )))
            .execute(&mut *tx)
            .await?;
        }
        let none = event_log::Columns::default();
        let q = events.unwrap_or(&none).bind(sqlx::query_scalar(&**WRITE));
        let q = self.new_contributions.bind(q);
        let q = self.old_contributions.bind(q);
        let (ins, upd) = (&self.new_profiles, &self.old_profiles);
        let added: i64 = q
            .bind(&self.new_identities.kind)
            .bind(&self.new_identities.value)
            .bind(&self.new_identities.profile)
            .bind(&self.old_identities.kind)
            .bind(&self.old_identities.value)
            .bind(&self.old_identities.profile)
            .bind(&ins.id)
            .bind(&ins.merged_into)
            .bind(&ins.traits)
            .bind(&ins.aggs)
            .bind(&ins.provenance)
            .bind(&upd.id)
            .bind(&upd.merged_into)
            .bind(&upd.traits)
            .bind(&upd.aggs)
            .bind(&upd.provenance)
            .bind(&self.dead.source)
            .bind(&self.dead.lsn)
            .bind(&self.dead.table)
            .bind(&self.dead.row)
            .bind(&self.dead.error)
            .bind(&self.old_identities.moved)
            .bind(&self.removed_identities.kind)
            .bind(&self.removed_identities.value)
            .fetch_one(&mut *tx)
            .await?;
        Ok(u64::try_from(added).unwrap_or(0))
    }
}

/// A dead letter's row as `dead_letters.row` (`jsonb`) can hold it: a `\u0000`
/// (which only a `json` column can send, and which may be why the row is
/// there) is kept as the six characters of its escape.
fn dead_letter_row(row: &Map<String, Value>) -> String {
    fn visible(v: &mut Value) {
        match v {
            Value::String(s) => *s = s.replace('\0', "\\u0000"),
            Value::Array(a) => a.iter_mut().for_each(visible),
            Value::Object(m) => {
                *m = std::mem::take(m)
                    .into_iter()
                    .map(|(k, mut v)| {
                        visible(&mut v);
                        (k.replace('\0', "\\u0000"), v)
                    })
                    .collect();
            }
            _ => {}
        }
    }
    let text = serde_json::to_string(row).unwrap_or_default();
    if !text.contains("\\u0000") {
        return text;
    }
    let mut v = Value::Object(row.clone());
    visible(&mut v);
    serde_json::to_string(&v).unwrap_or_default()
}

/// A batch's writes as one statement of data-modifying CTEs: the event log
/// (`$1`-`$12`, empty arrays when it is written on its own connection),
/// contributions new (`$13`-`$26`, a plain `INSERT`) and existing (`$27`-`$40`,
/// one set-based `UPDATE`), identifiers new and existing (`$41`-`$46`),
/// profiles new and existing (`$47`-`$56`), dead letters (`$57`-`$61`),
/// whether a split moved each existing identifier (`$62`) and the
/// identifiers no live row carries any more (`$63`-`$64`). The
/// CTEs touch disjoint rows (the plan splits new from existing), so running
/// them in one snapshot is the same as running them in turn. One round trip
/// instead of up to eight, each a wake-up of the daemon and of the store's
/// backend: under a steady stream the p50 went from 23-31 ms to 14-24 ms, though the store's
/// CPU did not (its rows cost more than its round trips; `docs/design.md`,
/// "Throughput").
static WRITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let contributions = |from: usize| {
        let p = |i: usize| from + i;
        format!(
            "unnest(${}::text[], ${}::text[], ${}::text[], ${}::bigint[], ${}::bool[], ${}::text[], ${}::text[], ${}::text[],
                    ${}::bigint[], ${}::text[], ${}::bigint[], ${}::timestamptz[], ${}::int[], ${}::bigint[])
               as u(s, t, k, p, d, i, f, a, v, l, q, fr, pr, g)",
            p(0), p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), p(9), p(10), p(11), p(12), p(13)
        )
    };
    format!(
        "with ev as ({events}),
         new_contributions as (
           insert into contributions (source, table_name, row_key, profile_id, deleted, identities, fields, aggs,
                                      version, lsn, seq, freshness, priority, digest)
           select s, t, k, p, d, i::json, f::json, a::json, v, l::pg_lsn, q, fr, pr, case when d then null else g end
             from {new_contributions}),
         old_contributions as (
           update contributions c set
             profile_id = u.p, deleted = u.d, identities = u.i::json, fields = u.f::json, aggs = u.a::json,
             version = u.v, lsn = u.l::pg_lsn, seq = u.q, freshness = u.fr, priority = u.pr, updated_at = now(),
             -- the same image re-written (a merge re-pointing it) keeps its digest
             digest = case when (u.l::pg_lsn, u.q) = (c.lsn, c.seq)
                           then coalesce(case when u.d then null else u.g end, c.digest)
                           else case when u.d then null else u.g end end
            from {old_contributions}
           where c.source = u.s and c.table_name = u.t and c.row_key = u.k),
         new_identities as (
           insert into identities (kind, value, profile_id)
           select * from unnest($41::text[], $42::text[], $43::bigint[])),
         old_identities as (
           -- a merge moves an identity away from the profile it came from
           -- (which a later split needs to know); a split resets it
           update identities i set profile_id = u.p,
             first_profile_id = case when u.m then null else coalesce(i.first_profile_id, i.profile_id) end
             from unnest($44::text[], $45::text[], $46::bigint[], $62::bool[]) as u(k, v, p, m)
            where i.kind = u.k and i.value = u.v),
         removed_identities as (
           delete from identities i
            using unnest($63::text[], $64::text[]) as u(k, v)
            where i.kind = u.k and i.value = u.v),
         new_profiles as (
           insert into profiles (profile_id, merged_into, traits, agg_state, provenance)
           select id, m, t::jsonb, a::json, pv::json
             from unnest($47::bigint[], $48::bigint[], $49::text[], $50::text[], $51::text[]) as u(id, m, t, a, pv)),
         old_profiles as (
           update profiles p set merged_into = u.m, traits = u.t::jsonb, agg_state = u.a::json, updated_at = now(),
             provenance = case when u.pv = 'null' then p.provenance else u.pv::json end
             from unnest($52::bigint[], $53::bigint[], $54::text[], $55::text[], $56::text[]) as u(id, m, t, a, pv)
            where p.profile_id = u.id),
         dead as (
           insert into dead_letters (source, lsn, table_name, row, error)
           select s, l::pg_lsn, t, r::jsonb, e
             from unnest($57::text[], $58::text[], $59::text[], $60::text[], $61::text[]) as u(s, l, t, r, e))
         select count(*) from ev",
        events = event_log::INSERT,
        new_contributions = contributions(13),
        old_contributions = contributions(27),
    )
});

/// The one write statement as it is bound, parameter group by parameter group
/// ([`ContributionRows::bind`], `event_log::Columns::bind`).
pub(crate) type PgScalar<'q, O> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// `(profile_id, merged_into, agg_state, traits)` as stored.
type ProfileRow = (
    i64,
    Option<i64>,
    Json<BTreeMap<String, AggState>>,
    Json<Map<String, Value>>,
);

/// A profile row as it was before the batch.
pub(crate) struct StoredProfile {
    pub(crate) merged_into: Option<ProfileId>,
    pub(crate) aggs: BTreeMap<String, AggState>,
    pub(crate) traits: Map<String, Value>,
}

/// The profiles `merges` (this batch's) folded into one of `profiles`.
fn losers_of(
    state: &State,
    merges: &[(ProfileId, ProfileId)],
    profiles: &[ProfileId],
) -> Vec<ProfileId> {
    let wanted: HashSet<ProfileId> = profiles.iter().copied().collect();
    merges
        .iter()
        .map(|(loser, _)| *loser)
        .filter(|l| wanted.contains(&state.live(*l)))
        .collect()
}

/// The live rows with field values of `profiles` as the batch leaves them,
/// read before the batch wrote anything: the store's rows of those profiles
/// and of the profiles this batch merged into them, except the rows the batch
/// holds (its own version of those, in `in_batch`, counts instead).
async fn field_rows_after<'s>(
    tx: &mut PgConnection,
    state: &State,
    merges: &[(ProfileId, ProfileId)],
    profiles: &[ProfileId],
    in_batch: &HashMap<ProfileId, Vec<&'s Contribution>>,
    guard: &mut Option<&mut dyn ReadGuard>,
) -> Result<BTreeMap<ProfileId, Vec<Cow<'s, Contribution>>>, StoreError> {
    let mut out: BTreeMap<ProfileId, Vec<Cow<'s, Contribution>>> = BTreeMap::new();
    if profiles.is_empty() {
        return Ok(out);
    }
    let mut read: Vec<ProfileId> = profiles.to_vec();
    read.extend(losers_of(state, merges, profiles));
    guard_reads(guard, &read).await?;
    for (_, rows) in contributions_by_profile(tx, &read, true).await? {
        for mut c in rows {
            if state.contributions.contains_key(&c.row) {
                continue;
            }
            let p = state.live(c.profile_id.unwrap_or_default());
            c.profile_id = Some(p);
            out.entry(p).or_default().push(Cow::Owned(c));
        }
    }
    for p in profiles {
        let rows = out.entry(*p).or_default();
        rows.extend(
            in_batch
                .get(p)
                .into_iter()
                .flatten()
                .map(|c| Cow::Borrowed(*c)),
        );
    }
    Ok(out)
}

/// Recomputes the traits of the batch's dirty profiles and adds what changed
/// to `writes`: profiles whose field values may have changed are resolved
/// again from their rows (and their provenance diffed against
/// `profiles.provenance`); the others changed only aggregates, which are
/// patched into their stored traits.
#[allow(clippy::too_many_arguments)]
async fn refresh_profiles(
    tx: &mut PgConnection,
    mapper: &Mapper,
    state: &mut State,
    log: &ChangeLog,
    before: &HashMap<ProfileId, StoredProfile>,
    known: &mut HashMap<ProfileId, CachedProfile>,
    cache: Option<&MergeCache>,
    publish: bool,
    writes: &mut Writes,
    guard: &mut Option<&mut dyn ReadGuard>,
) -> Result<(Vec<ProfileChange>, HashMap<ProfileId, CachedProfile>), StoreError> {
    let mut changes = Vec::new();
    let mut after: HashMap<ProfileId, CachedProfile> = HashMap::new();
    if log.dirty.is_empty() {
        return Ok((changes, after));
    }
    let fields_dirty: Vec<ProfileId> = log
        .fields_dirty
        .iter()
        .copied()
        .filter(|p| {
            state
                .profiles
                .get(p)
                .is_some_and(|s| s.merged_into.is_none())
        })
        .collect();
    // Rows with field values of those profiles (aggregate-only rows are not
    // needed). A profile this batch created has all its rows in `state` (a new
    // id is larger than every stored one, so it never absorbs a stored
    // profile); so has one whose field rows the cache knows, unless a merge
    // in this batch re-pointed rows it did not see. Read only the others back.
    let (fresh, stored): (BTreeSet<ProfileId>, Vec<ProfileId>) = {
        let (f, s): (Vec<ProfileId>, Vec<ProfileId>) =
            fields_dirty.iter().partition(|p| log.created.contains(*p));
        (f.into_iter().collect(), s)
    };
    let mut in_batch: HashMap<ProfileId, Vec<&Contribution>> = HashMap::new();
    for c in state
        .contributions
        .values()
        .filter(|c| !c.deleted && !c.fields.is_empty())
    {
        if let Some(p) = c.profile_id {
            in_batch.entry(p).or_default().push(c);
        }
    }
    // Borrowed from the batch's slice where it holds the row (no clone of
    // its fields per profile and batch), owned where read or decoded.
    let mut by_profile: BTreeMap<ProfileId, Vec<Cow<'_, Contribution>>> = BTreeMap::new();
    let mut to_read: Vec<ProfileId> = Vec::new();
    for p in &stored {
        let from_cache = cache.filter(|_| log.merges.is_empty()).and_then(|cache| {
            let rows = known.get(p)?.field_rows.as_ref()?;
            let mut live: BTreeMap<&RowRef, Cow<'_, Contribution>> = BTreeMap::new();
            for r in rows {
                let c = match state.contributions.get(r) {
                    Some(c) => Cow::Borrowed(c),
                    None => Cow::Owned(cache.contribution(r)?),
                };
                if !c.deleted && !c.fields.is_empty() && c.profile_id == Some(*p) {
                    live.insert(r, c);
                }
            }
            for c in in_batch.get(p).into_iter().flatten() {
                live.insert(&c.row, Cow::Borrowed(*c));
            }
            Some(live.into_values().collect::<Vec<_>>())
        });
        match from_cache {
            Some(rows) => {
                by_profile.insert(*p, rows);
            }
            None => to_read.push(*p),
        }
    }
    by_profile.extend(field_rows_after(tx, state, &log.merges, &to_read, &in_batch, guard).await?);
    for p in &fresh {
        by_profile.insert(
            *p,
            in_batch
                .get(p)
                .into_iter()
                .flatten()
                .map(|c| Cow::Borrowed(*c))
                .collect(),
        );
    }
    drop(in_batch);
    // Max/min whose extreme was withdrawn: rescan that aggregate's inputs.
    let stale: Vec<(ProfileId, String)> = log
        .dirty
        .iter()
        .filter_map(|p| state.profiles.get(p).map(|s| (p, s)))
        .flat_map(|(p, s)| {
            s.aggs
                .iter()
                .filter(|(_, a)| a.stale)
                .map(move |(name, _)| (*p, name.clone()))
        })
        .collect();
    for (p, name) in stale {
        // The inputs as the batch leaves them: the store's rows of the profile
        // (and of those merged into it here) that the batch does not hold,
        // and the batch's own rows.
        let mut read = vec![p];
        read.extend(losers_of(state, &log.merges, &[p]));
        guard_reads(guard, &read).await?;
        let stored: Vec<(String, String, String, Json<Value>)> = sqlx::query_as(
            "select source, table_name, row_key, aggs -> $2 from contributions
              where profile_id = any($1) and not deleted and aggs -> $2 is not null",
        )
        .bind(&read)
        .bind(&name)
        .fetch_all(&mut *tx)
        .await?;
        let mut inputs: Vec<Json<Value>> = stored
            .into_iter()
            .filter(|(source, table, row_key, _)| {
                !state.contributions.contains_key(&RowRef {
                    source: source.clone(),
                    table: table.clone(),
                    row_key: row_key.clone(),
                })
            })
            .map(|(_, _, _, v)| v)
            .collect();
        inputs.extend(
            state
                .contributions
                .values()
                .filter(|c| !c.deleted && c.profile_id == Some(p))
                .filter_map(|c| c.aggs.get(&name))
                .map(|v| Json(v.clone())),
        );
        let func = mapper.aggregates().get(&name).map(|a| a.func);
        if let (Some(func), Some(a)) = (
            func,
            state
                .profiles
                .get_mut(&p)
                .and_then(|s| s.aggs.get_mut(&name)),
        ) {
            a.v = extreme(func, inputs.iter().map(|j| &j.0));
            a.stale = false;
        }
    }

    // Current provenance of the field-dirty profiles, to diff against: from
    // the cache where it knows it.
    let mut old_winners: HashMap<ProfileId, BTreeMap<String, Winner>> = HashMap::new();
    let mut unknown: Vec<ProfileId> = Vec::new();
    for p in &stored {
        match known.get_mut(p).and_then(|k| k.winners.take()) {
            Some(w) => {
                old_winners.insert(*p, w);
            }
            None => unknown.push(*p),
        }
    }
    guard_reads(guard, &unknown).await?;
    old_winners.extend(stored_provenance(tx, &unknown).await?);

    // What each dirty profile needs, taken out of the batch's maps in order;
    // then each is refreshed on its own (the work is independent per
    // profile, so a large batch splits it over the cores); then the results
    // are written out in the same order.
    let full: BTreeSet<ProfileId> = fields_dirty.iter().copied().collect();
    let with_cache = cache.is_some();
    let inputs: Vec<RefreshInput<'_>> = log
        .dirty
        .iter()
        .filter_map(|p| {
            let st = state.profiles.get_mut(p)?;
            // Taken, not cloned: nothing reads a profile's aggregates in `state`
            // after this (the cache gets them back from `after`).
            let mut live_aggs = std::mem::take(&mut st.aggs);
            live_aggs.retain(|_, a| a.n != 0);
            Some(RefreshInput {
                profile: *p,
                merged_into: st.merged_into,
                live_aggs,
                old: before.get(p),
                full: full.contains(p),
                rows: by_profile.get(p).map_or(&[][..], Vec::as_slice),
                old_prov: old_winners.remove(p),
                extra: if with_cache {
                    known.remove(p).unwrap_or_default()
                } else {
                    CachedProfile::default()
                },
            })
        })
        .collect();
    let wanted = Wanted {
        entry: with_cache,
        change: publish,
    };
    let refreshed = refresh_each(inputs, mapper, wanted);
    let mut ins = ProfileRows::default();
    let mut upd = ProfileRows::default();
    for r in refreshed {
        if let Some(change) = r.change {
            changes.push(change);
        }
        if let Some(row) = r.row {
            let rows = if row.new { &mut ins } else { &mut upd };
            rows.id.push(r.profile);
            rows.merged_into.push(row.merged_into);
            rows.traits.push(row.traits);
            rows.aggs.push(row.aggs);
            rows.provenance.push(row.provenance);
        }
        if let Some(entry) = r.after {
            after.insert(r.profile, entry);
        }
    }

    writes.new_profiles = ins;
    writes.old_profiles = upd;
    Ok((changes, after))
}

/// What refreshing one dirty profile needs (see [`refresh_one`]).
struct RefreshInput<'a> {
    profile: ProfileId,
    merged_into: Option<ProfileId>,
    /// Its aggregates as the batch leaves them, empty ones dropped.
    live_aggs: BTreeMap<String, AggState>,
    /// The profile as the store holds it (None: new to the store).
    old: Option<&'a StoredProfile>,
    /// Whether this batch resolves its fields (else only aggregates changed).
    full: bool,
    /// Its live rows with field values, when `full`.
    rows: &'a [Cow<'a, Contribution>],
    /// Its stored provenance, when known.
    old_prov: Option<BTreeMap<String, Winner>>,
    /// What the cache knew of it beyond the stored row.
    extra: CachedProfile,
}

/// One refreshed profile: what to publish, write and cache.
#[derive(Debug, PartialEq)]
struct Refreshed {
    profile: ProfileId,
    change: Option<ProfileChange>,
    row: Option<RefreshedRow>,
    after: Option<CachedProfile>,
}

/// A profile row to write, its JSON columns rendered.
#[derive(Debug, PartialEq)]
struct RefreshedRow {
    new: bool,
    merged_into: Option<ProfileId>,
    traits: String,
    aggs: String,
    provenance: String,
}

/// From this many dirty profiles a batch refreshes them on two threads: the
/// work is CPU only and independent per profile, and the plan it belongs to
/// is the chain every write waits for (docs/design.md, "Throughput", twelfth
/// session). Below it a thread costs more than it saves.
const PARALLEL_REFRESH_FROM: usize = 512;

/// What a profile's refresh produces beside the row to write.
#[derive(Clone, Copy)]
struct Wanted {
    /// Its cache entry (the batch was planned with the cache).
    entry: bool,
    /// The change to publish (the process publishes profile changes): a copy
    /// of the profile's traits and the traits that changed, per profile and
    /// batch, for nothing when nobody reads them.
    change: bool,
}

/// Refreshes every profile of `inputs`, in order.
fn refresh_each(inputs: Vec<RefreshInput<'_>>, mapper: &Mapper, wanted: Wanted) -> Vec<Refreshed> {
    refresh_each_from(inputs, mapper, wanted, PARALLEL_REFRESH_FROM)
}

/// [`refresh_each`], on two threads from `parallel_from` profiles.
fn refresh_each_from(
    inputs: Vec<RefreshInput<'_>>,
    mapper: &Mapper,
    wanted: Wanted,
    parallel_from: usize,
) -> Vec<Refreshed> {
    if inputs.len() < parallel_from.max(2) {
        return inputs
            .into_iter()
            .map(|i| refresh_one(i, mapper, wanted))
            .collect();
    }
    let mut first = inputs;
    let second = first.split_off(first.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(move || {
            second
                .into_iter()
                .map(|i| refresh_one(i, mapper, wanted))
                .collect::<Vec<_>>()
        });
        let mut out: Vec<Refreshed> = first
            .into_iter()
            .map(|i| refresh_one(i, mapper, wanted))
            .collect();
        match other.join() {
            Ok(rest) => out.extend(rest),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        out
    })
}

/// One dirty profile: its traits, aggregates and provenance as the batch
/// leaves them, the change to publish, the row to write (none when nothing
/// changed) and its cache entry.
fn refresh_one(input: RefreshInput<'_>, mapper: &Mapper, wanted: Wanted) -> Refreshed {
    let RefreshInput {
        profile,
        merged_into,
        live_aggs,
        old,
        full,
        rows,
        old_prov,
        extra,
    } = input;
    // The new provenance, or None where this batch did not resolve fields.
    let (t, aggs, winners) = if merged_into.is_some() {
        (Map::new(), BTreeMap::new(), Some(BTreeMap::new()))
    } else if full {
        let winners = resolve_fields(rows.iter().map(|c| &**c), |f| mapper.strategy(f));
        let t = traits(&winners, &live_aggs, mapper.aggregates());
        (t, live_aggs, Some(winners))
    } else {
        // Only aggregates changed: keep the stored field values.
        let mut t = old.map(|o| o.traits.clone()).unwrap_or_default();
        for name in mapper.aggregates().keys() {
            t.remove(name);
        }
        for (name, a) in &live_aggs {
            if let Some(v) = mapper.aggregates().get(name).and_then(|d| a.value(d.func)) {
                t.insert(name.clone(), v);
            }
        }
        (t, live_aggs, None)
    };
    let same_provenance = match &winners {
        None => true,
        Some(w) => old_prov.as_ref().map_or(merged_into.is_some(), |o| o == w),
    };
    let unchanged = same_provenance
        && old.is_some_and(|o| o.traits == t && o.aggs == aggs && o.merged_into == merged_into);
    let mut change = None;
    let mut row = None;
    if !unchanged {
        if wanted.change {
            change = change_of(profile, old, merged_into, &t);
        }
        row = Some(RefreshedRow {
            new: old.is_none(),
            merged_into,
            traits: serde_json::to_string(&t).unwrap_or_default(),
            aggs: serde_json::to_string(&aggs).unwrap_or_else(|_| "{}".into()),
            provenance: match (&winners, old) {
                (Some(w), _) => provenance_json(w),
                // A profile new in the store has no provenance to keep.
                (None, None) => "[]".to_owned(),
                (None, Some(_)) => KEEP_PROVENANCE.to_owned(),
            },
        });
    }
    let after = wanted.entry.then(|| {
        let new_profile = old.is_none();
        CachedProfile {
            merged_into,
            field_rows: if full {
                Some(rows.iter().map(|c| c.row.clone()).collect())
            } else if new_profile {
                Some(BTreeSet::new())
            } else {
                extra.field_rows
            },
            winners: match winners {
                Some(w) => Some(w),
                None if new_profile => Some(BTreeMap::new()),
                None => old_prov.or(extra.winners),
            },
            aggs,
            traits: t,
        }
    });
    Refreshed {
        profile,
        change,
        row,
        after,
    }
}

/// The change to publish for a profile refreshed to `traits` (and
/// `merged_into`) from `old`: the traits that changed (`null` for one
/// removed) and a copy of them all; none when neither moved.
fn change_of(
    profile: ProfileId,
    old: Option<&StoredProfile>,
    merged_into: Option<ProfileId>,
    traits: &Map<String, Value>,
) -> Option<ProfileChange> {
    let no_traits = Map::new();
    let old_traits = old.map_or(&no_traits, |o| &o.traits);
    let mut changed: Map<String, Value> = traits
        .iter()
        .filter(|(k, v)| old_traits.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for k in old_traits.keys().filter(|k| !traits.contains_key(*k)) {
        changed.insert(k.clone(), Value::Null);
    }
    let moved = old.map(|o| o.merged_into) != Some(merged_into);
    (!changed.is_empty() || moved).then(|| ProfileChange {
        profile_id: profile,
        merged_into,
        changed,
        traits: traits.clone(),
    })
}

/// Written as a profile's provenance, JSON `null` means "keep the stored one"
/// (the batch changed only aggregates); it never reaches a stored row, since
/// a profile new to the store gets `[]`.
const KEEP_PROVENANCE: &str = "null";

/// One group of `profiles.provenance` (read through the `profile_fields`
/// view): a winning row, the freshness and LSN its values won with, and those
/// values by field. A profile's fields that won from one row share a group, so
/// the row is named once, not once per field (migration
/// `20261206000001_compact_provenance.sql`).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct ProvenanceGroup<S: Ord, V> {
    s: S,
    t: S,
    k: S,
    f: chrono::DateTime<chrono::Utc>,
    l: Lsn,
    v: BTreeMap<S, V>,
}

/// The `profiles.provenance` document of a profile's winners, grouped by
/// winning row in the order of each group's first field: the text
/// `serde_json` makes of [`ProvenanceGroup`]s, written directly (through
/// serde it was 4 % of the daemon's CPU on the 1M backlog, most of it in
/// per-entry formatting machinery; `provenance_text_is_serdes` proves the two
/// equal).
pub(crate) fn provenance_json(winners: &BTreeMap<String, Winner>) -> String {
    // (the group's first winner, the fields it won); a profile has few rows.
    let mut groups: Vec<(&Winner, Vec<(&str, &Value)>)> = Vec::new();
    for (field, w) in winners {
        let same = |g: &&mut (&Winner, Vec<(&str, &Value)>)| {
            g.0.row == w.row && g.0.freshness == w.freshness && g.0.lsn == w.lsn
        };
        match groups.iter_mut().find(same) {
            Some(g) => g.1.push((field, &w.value)),
            None => groups.push((w, vec![(field, &w.value)])),
        }
    }
    let mut out = Vec::with_capacity(16 + groups.len() * 128 + winners.len() * 32);
    out.push(b'[');
    for (i, (w, values)) in groups.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"s\":");
        json_str(&mut out, &w.row.source);
        out.extend_from_slice(b",\"t\":");
        json_str(&mut out, &w.row.table);
        out.extend_from_slice(b",\"k\":");
        json_str(&mut out, &w.row.row_key);
        // Microseconds, truncated as sqlx encodes a timestamptz (PostgreSQL
        // would round nanoseconds given as text); the RFC 3339 text chrono's
        // serde form gives (`AutoSi`, `Z`).
        let f = chrono::SubsecRound::trunc_subsecs(w.freshness, 6);
        out.extend_from_slice(b",\"f\":\"");
        out.extend_from_slice(
            f.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                .as_bytes(),
        );
        // Writing into a `Vec` cannot fail.
        let _ = write!(out, "\",\"l\":\"{}\",\"v\":{{", w.lsn);
        for (j, (field, value)) in values.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            json_str(&mut out, field);
            out.push(b':');
            // A `Value` always serialises (its map keys are strings).
            let _ = serde_json::to_writer(&mut out, value);
        }
        out.extend_from_slice(b"}}");
    }
    out.push(b']');
    String::from_utf8(out).unwrap_or_else(|_| "[]".into())
}

/// `s` as a JSON string, escaped as `serde_json` escapes it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A `profiles.provenance` document as read.
pub(crate) type ProvenanceDoc = Vec<ProvenanceGroup<String, Value>>;

/// The winners by field that a `profiles.provenance` document holds.
pub(crate) fn winners_of(groups: ProvenanceDoc) -> BTreeMap<String, Winner> {
    let mut winners = BTreeMap::new();
    for g in groups {
        let row = RowRef {
            source: g.s,
            table: g.t,
            row_key: g.k,
        };
        for (field, value) in g.v {
            let w = Winner {
                value,
                row: row.clone(),
                freshness: g.f,
                lsn: g.l,
            };
            winners.insert(field, w);
        }
    }
    winners
}

/// The stored provenance of `profiles`, as winners by field.
pub(crate) async fn stored_provenance(
    tx: &mut PgConnection,
    profiles: &[ProfileId],
) -> Result<HashMap<ProfileId, BTreeMap<String, Winner>>, StoreError> {
    if profiles.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(i64, Json<ProvenanceDoc>)> =
        sqlx::query_as("select profile_id, provenance from profiles where profile_id = any($1)")
            .bind(profiles)
            .fetch_all(&mut *tx)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(p, doc)| (p, winners_of(doc.0)))
        .collect())
}

/// `profiles` rows to upsert, column by column.
#[derive(Default)]
struct ProfileRows {
    id: Vec<i64>,
    merged_into: Vec<Option<i64>>,
    traits: Vec<String>,
    aggs: Vec<String>,
    /// `profiles.provenance` documents, or [`KEEP_PROVENANCE`].
    provenance: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategies::json_value_with;
    use proptest::prelude::*;

    /// Any JSON value, its strings also made of what JSON text must escape
    /// (quotes, backslashes, control characters) and of multi-byte characters.
    fn value() -> impl Strategy<Value = Value> {
        json_value_with("\\PC{0,24}|[\"\\\\\u{0}-\u{1f}\u{7f}é✓]{0,6}")
    }

    /// Profiles refreshed on two threads come out as they do on one, in
    /// the same order: new and stored profiles, fields resolved or only
    /// aggregates changed, merged ones, unchanged ones, with and without the
    /// cache; and, for a process that publishes nothing, without the changes
    /// and otherwise the same.
    #[test]
    fn refreshing_on_two_threads_equals_refreshing_on_one() {
        let cfg = crate::config::Config::parse(
            r#"
[sink]
url = "postgres://t@127.0.0.1/profiles"
[[source]]
name = "crm"
url = "postgres://t@127.0.0.1/crm"
  [[source.table]]
  name = "public.contacts"
  identity = { email = "email" }
  fields = { email = "email", name = "name" }
  [source.table.aggregates]
  order_count = { fn = "count" }
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let mapper = Mapper::new(&cfg);
        let n: i64 = 1500;
        let contribution = |p: i64, name: &str| Contribution {
            row: RowRef {
                source: "crm".into(),
                table: "public.contacts".into(),
                row_key: format!("{{\"id\":{p}}}"),
            },
            profile_id: Some(p),
            deleted: false,
            identities: vec![("email".into(), format!("{p}@x"))],
            fields: BTreeMap::from([
                ("email".to_owned(), Value::from(format!("{p}@x"))),
                ("name".to_owned(), Value::from(name)),
            ]),
            aggs: BTreeMap::new(),
            version: Some(p),
            lsn: Lsn(u64::try_from(p).unwrap()),
            seq: 0,
            freshness: chrono::DateTime::from_timestamp(1_700_000_000 + p, 0).unwrap(),
            priority: 0,
            digest: None,
        };
        let rows: Vec<Vec<Cow<'_, Contribution>>> = (0..n)
            .map(|p| {
                vec![Cow::Owned(contribution(
                    p,
                    if p % 5 == 0 { "Old" } else { "New" },
                ))]
            })
            .collect();
        // Even profiles count orders (none for every fourth), odd ones none.
        let order_count = |p: i64| -> BTreeMap<String, AggState> {
            if p % 2 == 0 {
                BTreeMap::from([(
                    "order_count".to_owned(),
                    AggState {
                        n: p % 4,
                        ..AggState::default()
                    },
                )])
            } else {
                BTreeMap::new()
            }
        };
        let stored: Vec<StoredProfile> = (0..n)
            .map(|p| StoredProfile {
                merged_into: None,
                aggs: order_count(p),
                traits: Map::from_iter([
                    ("email".to_owned(), Value::from(format!("{p}@x"))),
                    ("name".to_owned(), Value::from("Old")),
                ]),
            })
            .collect();
        let inputs = |with_cache: bool| -> Vec<RefreshInput<'_>> {
            (0..n)
                .map(|p| {
                    let i = usize::try_from(p).unwrap();
                    RefreshInput {
                        profile: p,
                        merged_into: (p % 11 == 0).then_some(p + 1),
                        live_aggs: order_count(p),
                        old: (p % 7 != 0).then(|| &stored[i]),
                        full: p % 3 != 0,
                        rows: &rows[i],
                        old_prov: (p % 13 == 0).then(BTreeMap::new),
                        extra: if with_cache && p % 17 == 0 {
                            CachedProfile {
                                winners: Some(BTreeMap::new()),
                                field_rows: Some(BTreeSet::new()),
                                ..CachedProfile::default()
                            }
                        } else {
                            CachedProfile::default()
                        },
                    }
                })
                .collect()
        };
        for with_cache in [false, true] {
            let wanted = Wanted {
                entry: with_cache,
                change: true,
            };
            let one = refresh_each_from(inputs(with_cache), &mapper, wanted, usize::MAX);
            let two = refresh_each_from(inputs(with_cache), &mapper, wanted, 1);
            assert_eq!(one.len(), usize::try_from(n).unwrap());
            assert!(
                one.iter().any(|r| r.row.is_none()),
                "some profiles unchanged"
            );
            assert!(
                one.iter().any(|r| r.change.is_some()),
                "some profiles changed"
            );
            assert_eq!(one, two);
            // For a process that publishes nothing: no change is built, and
            // the rows and cache entries are the same.
            let quiet = Wanted {
                change: false,
                ..wanted
            };
            let mut three = refresh_each_from(inputs(with_cache), &mapper, quiet, 1);
            assert!(
                three.iter().all(|r| r.change.is_none()),
                "a change built for nobody"
            );
            for (r, o) in three.iter_mut().zip(&one) {
                r.change.clone_from(&o.change);
            }
            assert_eq!(three, one);
        }
    }

    /// Winners as compared after a round trip through the document: where
    /// each field won, freshness truncated to microseconds as it is stored.
    /// (Values are compared as text: serde_json may parse a float back a bit
    /// off.)
    fn comparable(
        winners: &BTreeMap<String, Winner>,
    ) -> BTreeMap<&str, (&RowRef, chrono::DateTime<chrono::Utc>, Lsn)> {
        winners
            .iter()
            .map(|(field, w)| {
                let f = chrono::SubsecRound::trunc_subsecs(w.freshness, 6);
                (field.as_str(), (&w.row, f, w.lsn))
            })
            .collect()
    }

    fn winner() -> impl Strategy<Value = Winner> {
        (
            value(),
            (
                "\\PC{0,8}",
                "\\PC{0,16}",
                "\\PC{0,24}|\\{\"id\":[0-9]{1,6}\\}",
            ),
            (-62_000_000_000i64..250_000_000_000, 0u32..1_000_000_000),
            any::<u64>(),
        )
            .prop_filter_map(
                "a time in range",
                |(value, (source, table, row_key), (s, n), lsn)| {
                    Some(Winner {
                        value,
                        row: RowRef {
                            source,
                            table,
                            row_key,
                        },
                        freshness: chrono::DateTime::from_timestamp(s, n)?,
                        lsn: Lsn(lsn),
                    })
                },
            )
    }

    /// Winners by field, several of them often from one row, as a contact's
    /// fields all win from its one row.
    fn winners() -> impl Strategy<Value = BTreeMap<String, Winner>> {
        let field = "\\PC{0,10}|[\"\\\\\u{0}-\u{1f}]{1,3}";
        (
            prop::collection::vec(winner(), 1..4),
            prop::collection::btree_map(field, (value(), any::<prop::sample::Index>()), 0..6),
        )
            .prop_map(|(rows, fields)| {
                fields
                    .into_iter()
                    .map(|(f, (value, i))| {
                        (
                            f,
                            Winner {
                                value,
                                ..i.get(&rows).clone()
                            },
                        )
                    })
                    .collect()
            })
    }

    proptest! {
        /// Any winners, any names and values (escapes, control characters,
        /// non-ASCII), any time (whole seconds, micro- and nanoseconds, years
        /// 0-9999) and LSN: the document is the text serde gives for its
        /// groups, names each winning row once, and reads back as the same
        /// winners.
        #[test]
        fn provenance_text_is_serdes(winners in winners()) {
            let text = provenance_json(&winners);
            let groups: ProvenanceDoc = serde_json::from_str(&text).unwrap();
            // serde's text of the same groups, with the winners' own values
            let by_serde: Vec<ProvenanceGroup<&str, &Value>> = groups
                .iter()
                .map(|g| ProvenanceGroup {
                    s: g.s.as_str(),
                    t: g.t.as_str(),
                    k: g.k.as_str(),
                    f: g.f,
                    l: g.l,
                    v: g.v.keys().map(|f| (f.as_str(), &winners[f].value)).collect(),
                })
                .collect();
            prop_assert_eq!(serde_json::to_string(&by_serde).unwrap(), text.as_str());
            let rows: BTreeSet<(&RowRef, chrono::DateTime<chrono::Utc>, Lsn)> =
                winners.values().map(|w| (&w.row, w.freshness, w.lsn)).collect();
            prop_assert_eq!(groups.len(), rows.len());
            let read = winners_of(groups);
            prop_assert_eq!(comparable(&read), comparable(&winners));
        }
    }
}
