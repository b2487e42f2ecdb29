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

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::{Store, StoreError};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::identity::Ident;
use crate::mapping::Mapper;
use crate::resolve::{
    extreme, resolve_fields, traits, truncate_as_deletes, AggState, Contribution, Outcome,
    ProfileId, ProfileState, RowRef, State,
};

/// Key of the advisory lock that serialises profile writes.
const APPLY_LOCK: i64 = 0x7472_6962_7574; // "tribut"

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
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
}

fn row_of(r: &sqlx::postgres::PgRow) -> Result<Contribution, sqlx::Error> {
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
    })
}

const CONTRIBUTION_COLUMNS: &str =
    "c.source, c.table_name, c.row_key, c.profile_id, c.deleted, c.identities, c.fields, c.aggs, c.version, c.lsn::text as lsn, c.seq, c.freshness, c.priority";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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
        self.ensure_partitions(events).await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("select pg_advisory_xact_lock($1)")
            .bind(APPLY_LOCK)
            .execute(&mut *tx)
            .await?;
        let stats = apply_in(&mut tx, mapper, source, events).await?;
        if let Some(lsn) = checkpoint {
            sqlx::query(
                "insert into checkpoints (source, lsn) values ($1, $2::pg_lsn)
                 on conflict (source) do update set lsn = excluded.lsn, updated_at = now()
                 where checkpoints.lsn < excluded.lsn",
            )
            .bind(source)
            .bind(lsn.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(stats)
    }

    /// Creates the monthly `events` partitions the batch needs (once per month
    /// per process), outside the batch transaction.
    async fn ensure_partitions(&self, events: &[ChangeEvent]) -> Result<(), StoreError> {
        use chrono::Datelike;
        let months: BTreeSet<(i32, u32)> = events
            .iter()
            .map(|e| (e.commit_time.year(), e.commit_time.month()))
            .collect();
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
                Err(e)
                    if e.as_database_error()
                        .and_then(|d| d.code())
                        .is_some_and(|c| c == "42P07" || c == "23505") => {}
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

async fn apply_in(
    tx: &mut PgConnection,
    mapper: &Mapper,
    source: &str,
    events: &[ChangeEvent],
) -> Result<ApplyStats, StoreError> {
    // 1. The event log, exactly as received (idempotent on (source, commit_lsn, seq)).
    insert_events(tx, events).await?;

    // 2. Expand truncates into deletes of the table's live rows.
    let mut expanded: Vec<ChangeEvent> = Vec::with_capacity(events.len());
    for e in events {
        if e.op == Op::Truncate {
            let keys: Vec<String> = sqlx::query_scalar("select row_key from contributions where source = $1 and table_name = $2 and not deleted")
                .bind(source)
                .bind(&e.table)
                .fetch_all(&mut *tx)
                .await?;
            let keys = keys
                .iter()
                .filter_map(|k| serde_json::from_str::<Map<String, Value>>(k).ok());
            expanded.extend(truncate_as_deletes(e, keys));
        } else {
            expanded.push(e.clone());
        }
    }

    // 3. Load the slice of state the batch touches.
    let mut state = State::new(mapper);
    let rows: Vec<RowRef> = expanded
        .iter()
        .filter(|e| mapper.table(&e.source, &e.table).is_some())
        .map(|e| RowRef {
            source: e.source.clone(),
            table: e.table.clone(),
            row_key: e.row_key(),
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let tables: Vec<&str> = rows.iter().map(|r| r.table.as_str()).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.row_key.as_str()).collect();
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
        state.contributions.insert(c.row.clone(), c);
    }
    // Identifiers of the new images (unchanged TOAST ones come from the loaded rows).
    let mut idents: BTreeSet<Ident> = BTreeSet::new();
    for e in expanded
        .iter()
        .filter(|e| matches!(e.op, Op::Insert | Op::Update | Op::Snapshot))
    {
        if let Some(m) = mapper.table(&e.source, &e.table) {
            let prev = state.contributions.get(&RowRef {
                source: e.source.clone(),
                table: e.table.clone(),
                row_key: e.row_key(),
            });
            if let Ok(c) = m.contribution(e, prev.filter(|p| !p.deleted)) {
                idents.extend(c.identities);
            }
        }
    }
    let kinds: Vec<&str> = idents.iter().map(|(k, _)| k.as_str()).collect();
    let values: Vec<&str> = idents.iter().map(|(_, v)| v.as_str()).collect();
    let owners: Vec<(String, String, i64)> = sqlx::query_as(
        "select i.kind, i.value, i.profile_id from identities i join unnest($1::text[], $2::text[]) as u(k, v) on i.kind = u.k and i.value = u.v",
    )
    .bind(&kinds)
    .bind(&values)
    .fetch_all(&mut *tx)
    .await?;
    for (k, v, p) in owners {
        state.owners.insert((k, v), p);
    }
    let mut want: BTreeSet<ProfileId> = state
        .owners
        .values()
        .copied()
        .chain(state.contributions.values().filter_map(|c| c.profile_id))
        .collect();
    while !want.is_empty() {
        let ids: Vec<i64> = std::mem::take(&mut want).into_iter().collect();
        let profs: Vec<ProfileRow> = sqlx::query_as(
            "select profile_id, merged_into, agg_state from profiles where profile_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        for (p, merged_into, aggs) in profs {
            if let Some(m) = merged_into.filter(|m| !state.profiles.contains_key(m)) {
                want.insert(m);
            }
            state.profiles.insert(
                p,
                ProfileState {
                    merged_into,
                    aggs: aggs.0,
                },
            );
        }
    }
    state.next_profile_id =
        sqlx::query_scalar::<_, i64>("select coalesce(max(profile_id), 0) + 1 from profiles")
            .fetch_one(&mut *tx)
            .await?;

    // 4. The pure core, event by event.
    let mut stats = ApplyStats {
        events: expanded.len(),
        ..Default::default()
    };
    let mut dead: Vec<(&ChangeEvent, String)> = Vec::new();
    for e in &expanded {
        match state.apply(mapper, e) {
            Ok(Outcome::Applied) => stats.applied += 1,
            Ok(Outcome::Stale) => stats.stale += 1,
            Ok(Outcome::Unmapped) => {}
            Err(err) => dead.push((e, err.to_string())),
        }
    }
    stats.dead_letters = dead.len();
    let log = std::mem::take(&mut state.log);
    stats.merges = log.merges.len();

    // 5. Write back: merges first (they re-point rows this batch did not load).
    for (loser, survivor) in &log.merges {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "update identities set profile_id = {survivor} where profile_id = {loser};
             update contributions set profile_id = {survivor} where profile_id = {loser};
             update profiles set merged_into = {survivor} where merged_into = {loser};
             delete from profile_fields where profile_id = {loser};"
        )))
        .execute(&mut *tx)
        .await?;
    }
    write_contributions(
        tx,
        log.contributions
            .iter()
            .filter_map(|r| state.contributions.get(r)),
    )
    .await?;
    let id_rows: Vec<(&Ident, ProfileId)> = log
        .identities
        .iter()
        .filter_map(|i| state.owners.get(i).map(|p| (i, *p)))
        .collect();
    sqlx::query(
        "insert into identities (kind, value, profile_id)
         select * from unnest($1::text[], $2::text[], $3::bigint[])
         on conflict (kind, value) do update set profile_id = excluded.profile_id",
    )
    .bind(
        id_rows
            .iter()
            .map(|(i, _)| i.0.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        id_rows
            .iter()
            .map(|(i, _)| i.1.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(id_rows.iter().map(|(_, p)| *p).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;

    // 6. Recompute traits of every touched profile from its stored rows.
    let dirty: Vec<ProfileId> = log.dirty.iter().copied().collect();
    stats.profiles_touched = dirty.len();
    refresh_profiles(tx, mapper, &mut state, &dirty).await?;

    // 7. Dead letters: the stream goes on.
    if !dead.is_empty() {
        for (e, err) in &dead {
            tracing::warn!(source = %e.source, table = %e.table, lsn = %e.commit_lsn, error = %err, "row sent to dead_letters");
        }
        sqlx::query(
            "insert into dead_letters (source, lsn, table_name, row, error)
             select s, l::pg_lsn, t, r::jsonb, e from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) as u(s, l, t, r, e)",
        )
        .bind(dead.iter().map(|(e, _)| e.source.as_str()).collect::<Vec<_>>())
        .bind(dead.iter().map(|(e, _)| e.commit_lsn.to_string()).collect::<Vec<_>>())
        .bind(dead.iter().map(|(e, _)| e.table.as_str()).collect::<Vec<_>>())
        .bind(dead.iter().map(|(e, _)| Value::Object(e.row.clone()).to_string()).collect::<Vec<_>>())
        .bind(dead.iter().map(|(_, err)| err.as_str()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    Ok(stats)
}

async fn insert_events(tx: &mut PgConnection, events: &[ChangeEvent]) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into events (source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key, row, unchanged)
         select s, l::pg_lsn, cl::pg_lsn, q, x, ct, t, o, k::jsonb, r::jsonb,
                case when u = '' then null else string_to_array(u, ',') end
           from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                       $7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) as u(s, l, cl, q, x, ct, t, o, k, r, u)
         on conflict do nothing",
    )
    .bind(events.iter().map(|e| e.source.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.lsn.to_string()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.commit_lsn.to_string()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| i64_of(e.seq)).collect::<Vec<_>>())
    .bind(events.iter().map(|e| i64::from(e.xid)).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.commit_time).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.table.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.op.as_str()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| Value::Object(e.key.clone()).to_string()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| Value::Object(e.row.clone()).to_string()).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.unchanged.join(",")).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_contributions<'a>(
    tx: &mut PgConnection,
    rows: impl Iterator<Item = &'a Contribution>,
) -> Result<(), StoreError> {
    let rows: Vec<&Contribution> = rows.collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into contributions (source, table_name, row_key, profile_id, deleted, identities, fields, aggs, version, lsn, seq, freshness, priority, updated_at)
         select s, t, k, p, d, i::jsonb, f::jsonb, a::jsonb, v, l::pg_lsn, q, fr, pr, now()
           from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bool[], $6::text[], $7::text[], $8::text[],
                       $9::bigint[], $10::text[], $11::bigint[], $12::timestamptz[], $13::int[]) as u(s, t, k, p, d, i, f, a, v, l, q, fr, pr)
         on conflict (source, table_name, row_key) do update set
           profile_id = excluded.profile_id, deleted = excluded.deleted, identities = excluded.identities,
           fields = excluded.fields, aggs = excluded.aggs, version = excluded.version, lsn = excluded.lsn,
           seq = excluded.seq, freshness = excluded.freshness, priority = excluded.priority, updated_at = now()",
    )
    .bind(rows.iter().map(|c| c.row.source.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.row.table.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.row.row_key.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.profile_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.deleted).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| serde_json::to_string(&c.identities).unwrap_or_default()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| serde_json::to_string(&c.fields).unwrap_or_default()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| serde_json::to_string(&c.aggs).unwrap_or_default()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.version).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.lsn.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| i64_of(c.seq)).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.freshness).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.priority).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// `(profile_id, merged_into, agg_state)` as stored.
type ProfileRow = (i64, Option<i64>, Json<BTreeMap<String, AggState>>);

/// `profile_fields` rows, column by column, for one `unnest` insert.
#[derive(Default)]
struct FieldRows {
    profile: Vec<i64>,
    field: Vec<String>,
    value: Vec<String>,
    source: Vec<String>,
    table: Vec<String>,
    row_key: Vec<String>,
    freshness: Vec<chrono::DateTime<chrono::Utc>>,
    lsn: Vec<String>,
}

/// Recomputes traits and provenance of `dirty` profiles from their stored
/// contributions and writes them with their aggregate state.
async fn refresh_profiles(
    tx: &mut PgConnection,
    mapper: &Mapper,
    state: &mut State,
    dirty: &[ProfileId],
) -> Result<(), StoreError> {
    if dirty.is_empty() {
        return Ok(());
    }
    // Rows with field values, per profile (aggregate-only rows are not needed).
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "select {CONTRIBUTION_COLUMNS} from contributions c where c.profile_id = any($1) and not c.deleted and c.fields <> '{{}}'::jsonb"
    )))
    .bind(dirty)
    .fetch_all(&mut *tx)
    .await?;
    let mut by_profile: HashMap<ProfileId, Vec<Contribution>> = HashMap::new();
    for r in &rows {
        let c = row_of(r)?;
        if let Some(p) = c.profile_id {
            by_profile.entry(p).or_default().push(c);
        }
    }
    // Max/min whose extreme was withdrawn: rescan that aggregate's inputs.
    let stale: Vec<(ProfileId, String)> = dirty
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
        let inputs: Vec<Json<Value>> =
            sqlx::query_scalar("select aggs -> $2 from contributions where profile_id = $1 and not deleted and aggs ? $2").bind(p).bind(&name).fetch_all(&mut *tx).await?;
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

    let mut ids = Vec::new();
    let mut merged = Vec::new();
    let mut trait_docs = Vec::new();
    let mut agg_docs = Vec::new();
    let mut pf = FieldRows::default();
    for p in dirty {
        let Some(st) = state.profiles.get(p) else {
            continue;
        };
        let empty = Vec::new();
        let contribs = by_profile.get(p).unwrap_or(&empty);
        let (t, aggs) = if st.merged_into.is_some() {
            (Map::new(), BTreeMap::new())
        } else {
            let winners = resolve_fields(contribs, |f| mapper.strategy(f));
            for (field, w) in &winners {
                pf.profile.push(*p);
                pf.field.push(field.clone());
                pf.value.push(w.value.to_string());
                pf.source.push(w.row.source.clone());
                pf.table.push(w.row.table.clone());
                pf.row_key.push(w.row.row_key.clone());
                pf.freshness.push(w.freshness);
                pf.lsn.push(w.lsn.to_string());
            }
            let aggs: BTreeMap<String, AggState> = st
                .aggs
                .iter()
                .filter(|(_, a)| a.n != 0)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (traits(&winners, &aggs, mapper.aggregates()), aggs)
        };
        ids.push(*p);
        merged.push(st.merged_into);
        trait_docs.push(Value::Object(t).to_string());
        agg_docs.push(serde_json::to_string(&aggs).unwrap_or_else(|_| "{}".into()));
    }
    sqlx::query(
        "insert into profiles (profile_id, merged_into, traits, agg_state)
         select * from unnest($1::bigint[], $2::bigint[], $3::text[]::jsonb[], $4::text[]::jsonb[])
         on conflict (profile_id) do update set merged_into = excluded.merged_into, traits = excluded.traits,
           agg_state = excluded.agg_state, updated_at = now()
         where profiles.traits is distinct from excluded.traits or profiles.agg_state is distinct from excluded.agg_state
            or profiles.merged_into is distinct from excluded.merged_into",
    )
    .bind(&ids)
    .bind(&merged)
    .bind(&trait_docs)
    .bind(&agg_docs)
    .execute(&mut *tx)
    .await?;
    sqlx::query("delete from profile_fields where profile_id = any($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "insert into profile_fields (profile_id, field, value, source, table_name, row_key, freshness, lsn)
         select p, f, v::jsonb, s, t, k, fr, l::pg_lsn
           from unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[], $8::text[]) as u(p, f, v, s, t, k, fr, l)",
    )
    .bind(&pf.profile)
    .bind(&pf.field)
    .bind(&pf.value)
    .bind(&pf.source)
    .bind(&pf.table)
    .bind(&pf.row_key)
    .bind(&pf.freshness)
    .bind(&pf.lsn)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
