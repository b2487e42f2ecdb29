//! Replay and rebuild from the event log.
//!
//! `replay` feeds a source's logged events from an LSN back through the normal
//! apply path (idempotent: in a healthy store every event is stale), then
//! re-derives the profiles those rows belong to from their contributions, the
//! ground truth: aggregates recomputed from scratch, fields resolved again,
//! identities re-pointed, profile rows recreated if missing. A healthy store
//! therefore changes nothing; a store whose derived rows were damaged is put
//! right. `--dry-run` does the same in a transaction that is rolled back.
//!
//! `rebuild` empties all derived state and applies the whole log again in the
//! order it was first applied (`events.applied_seq`), so profile ids come out
//! the same and the result equals the original row for row.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::types::Json;
use sqlx::{PgConnection, Row};

use super::apply::{
    apply_in, contributions_by_profile, identities_of, lock, next_profile_id, provenance_json,
    stored_provenance, StoredProfile,
};
use super::{Store, StoreError};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::identity::Ident;
use crate::mapping::Mapper;
use crate::resolve::{
    aggregate_from, resolve_fields, traits, AggState, ProfileId, ProfileState, State,
};

/// What a replay did (or, with `--dry-run`, would do).
#[derive(Debug, Serialize)]
pub struct ReplayReport {
    /// Source replayed.
    pub source: String,
    /// First LSN replayed.
    pub from_lsn: Lsn,
    /// Last LSN replayed, if bounded.
    pub to_lsn: Option<Lsn>,
    /// Events read from the log.
    pub events: u64,
    /// Profiles whose stored rows were (or would be) changed.
    pub profiles_changed: Vec<ProfileId>,
    /// Nothing was written.
    pub dry_run: bool,
}

/// What a rebuild did.
#[derive(Debug, Serialize)]
pub struct RebuildReport {
    /// Events applied again.
    pub events: u64,
    /// Live profiles afterwards.
    pub profiles: i64,
}

fn op_of(s: &str) -> Op {
    match s {
        "insert" => Op::Insert,
        "update" => Op::Update,
        "delete" => Op::Delete,
        "truncate" => Op::Truncate,
        _ => Op::Snapshot,
    }
}

fn event_of(r: &sqlx::postgres::PgRow) -> Result<ChangeEvent, sqlx::Error> {
    let key: Json<Map<String, Value>> = r.try_get("key")?;
    let row: Option<Json<Map<String, Value>>> = r.try_get("row")?;
    let lsn: String = r.try_get("lsn")?;
    let commit_lsn: String = r.try_get("commit_lsn")?;
    Ok(ChangeEvent {
        source: r.try_get("source")?,
        table: r.try_get("table_name")?,
        op: op_of(r.try_get::<&str, _>("op")?),
        key: key.0,
        row: row.map(|j| j.0).unwrap_or_default(),
        unchanged: r
            .try_get::<Option<Vec<String>>, _>("unchanged")?
            .unwrap_or_default(),
        unreadable: r
            .try_get::<Option<Json<Vec<(String, String)>>>, _>("unreadable")?
            .map(|j| j.0)
            .unwrap_or_default(),
        lsn: lsn.parse().unwrap_or_default(),
        commit_lsn: commit_lsn.parse().unwrap_or_default(),
        seq: u64::try_from(r.try_get::<i64, _>("seq")?).unwrap_or(0),
        xid: u32::try_from(r.try_get::<i64, _>("xid")?).unwrap_or(0),
        commit_time: r.try_get("commit_time")?,
    })
}

const EVENT_COLUMNS: &str =
    "source, table_name, op, key, row, unchanged, unreadable, lsn::text as lsn, commit_lsn::text as commit_lsn, seq, xid, commit_time";

impl Store {
    /// Re-applies the logged events of `source` from `from` (to `to`), then
    /// re-derives the profiles of the rows they touched.
    pub async fn replay(
        &self,
        mapper: &Mapper,
        source: &str,
        from: Lsn,
        to: Option<Lsn>,
        dry_run: bool,
        batch: usize,
    ) -> Result<ReplayReport, StoreError> {
        let mut tx = self.pool().begin().await?;
        lock(&mut tx).await?;
        let (mut after_lsn, mut after_seq) = (from.to_string(), -1_i64);
        let mut events = 0u64;
        let mut profiles: BTreeSet<ProfileId> = BTreeSet::new();
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "select {EVENT_COLUMNS} from events
                  where source = $1 and commit_lsn >= $2::pg_lsn and ($3::text is null or commit_lsn <= $3::pg_lsn)
                    and (commit_lsn, seq) > ($4::pg_lsn, $5)
                  order by commit_lsn, seq limit $6"
            )))
            .bind(source)
            .bind(from.to_string())
            .bind(to.map(|l| l.to_string()))
            .bind(&after_lsn)
            .bind(after_seq)
            .bind(i64::try_from(batch).unwrap_or(5000))
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            let chunk: Vec<ChangeEvent> = rows.iter().map(event_of).collect::<Result<_, _>>()?;
            let last = chunk.last().expect("non-empty");
            after_lsn = last.commit_lsn.to_string();
            after_seq = i64::try_from(last.seq).unwrap_or(i64::MAX);
            events += chunk.len() as u64;
            apply_in(&mut tx, mapper, source, &chunk, false, None).await?;
            // The profiles those rows belong to now.
            let tables: Vec<&str> = chunk.iter().map(|e| e.table.as_str()).collect();
            let keys: Vec<String> = chunk.iter().map(ChangeEvent::row_key).collect();
            let ps: Vec<i64> = sqlx::query_scalar(
                "select distinct c.profile_id from contributions c join unnest($2::text[], $3::text[]) as u(t, k)
                   on c.table_name = u.t and c.row_key = u.k
                  where c.source = $1 and c.profile_id is not null",
            )
            .bind(source)
            .bind(&tables)
            .bind(&keys)
            .fetch_all(&mut *tx)
            .await?;
            profiles.extend(ps);
        }
        let changed = rederive(&mut tx, mapper, &profiles).await?;
        if dry_run {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
        }
        Ok(ReplayReport {
            source: source.to_owned(),
            from_lsn: from,
            to_lsn: to,
            events,
            profiles_changed: changed,
            dry_run,
        })
    }

    /// Empties all derived state and applies the whole event log again, in the
    /// order it was first applied, in one transaction.
    pub async fn rebuild(
        &self,
        mapper: &Mapper,
        batch: usize,
    ) -> Result<RebuildReport, StoreError> {
        let mut tx = self.pool().begin().await?;
        lock(&mut tx).await?;
        sqlx::raw_sql("truncate profiles, identities, contributions, dead_letters")
            .execute(&mut *tx)
            .await?;
        // One pass over the log in apply order: the server sorts it once
        // (`applied_seq` has no index; only this reads it), and a cursor
        // hands it over a batch at a time. Declared before the first apply,
        // which turns sequential scans off for the rest of the transaction.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "declare rebuild_log no scroll cursor for select {EVENT_COLUMNS} from events order by applied_seq"
        )))
        .execute(&mut *tx)
        .await?;
        let fetch = format!("fetch forward {} from rebuild_log", batch.max(1));
        let mut events = 0u64;
        // A batch ends with a whole transaction, as the daemon's do: splits
        // are settled at transaction ends, and so come out the same.
        let mut carried: Vec<ChangeEvent> = Vec::new();
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(fetch.clone()))
                .persistent(false)
                .fetch_all(&mut *tx)
                .await?;
            if rows.is_empty() && carried.is_empty() {
                break;
            }
            let more = !rows.is_empty();
            let mut chunk: Vec<ChangeEvent> = std::mem::take(&mut carried);
            for r in &rows {
                chunk.push(event_of(r)?);
            }
            events += rows.len() as u64;
            if more {
                if let Some(last) = chunk.last() {
                    let (source, lsn) = (last.source.clone(), last.commit_lsn);
                    let cut = chunk
                        .iter()
                        .rposition(|e| e.source != source || e.commit_lsn != lsn)
                        .map_or(0, |n| n + 1);
                    carried = chunk.split_off(cut);
                }
                if chunk.is_empty() {
                    // One transaction so far: read on.
                    continue;
                }
            }
            // apply() takes one source at a time: split into runs of one source.
            let mut start = 0;
            while start < chunk.len() {
                let src = chunk[start].source.clone();
                let end = chunk[start..]
                    .iter()
                    .position(|e| e.source != src)
                    .map_or(chunk.len(), |n| start + n);
                apply_in(&mut tx, mapper, &src, &chunk[start..end], true, None).await?;
                start = end;
            }
        }
        sqlx::raw_sql("close rebuild_log").execute(&mut *tx).await?;
        let profiles: i64 =
            sqlx::query_scalar("select count(*) from profiles where merged_into is null")
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(RebuildReport { events, profiles })
    }
}

/// Re-derives `profiles` from their live contributions and writes whatever
/// differs (the partition of their identifiers, profile rows, identities,
/// provenance). Returns the profiles changed, among them any split off.
pub(crate) async fn rederive(
    tx: &mut PgConnection,
    mapper: &Mapper,
    profiles: &BTreeSet<ProfileId>,
) -> Result<Vec<ProfileId>, StoreError> {
    let (profiles, mut changed) = regroup(tx, mapper, profiles).await?;
    let ids: Vec<i64> = profiles.iter().copied().collect();
    let by_profile = contributions_by_profile(tx, &ids, false).await?;
    type Stored = (
        i64,
        Option<i64>,
        Json<BTreeMap<String, AggState>>,
        Json<Map<String, Value>>,
    );
    let stored: HashMap<i64, StoredProfile> =
        sqlx::query_as::<_, Stored>("select profile_id, merged_into, agg_state, traits from profiles where profile_id = any($1)")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(p, merged_into, a, t)| (p, StoredProfile { merged_into, aggs: a.0, traits: t.0 }))
            .collect();
    let mut provenance = stored_provenance(tx, &ids).await?;
    for (p, contribs) in &by_profile {
        // Identities: every identifier of the profile's rows points at it.
        let mut kinds = Vec::new();
        let mut values = Vec::new();
        for c in contribs {
            for (k, v) in &c.identities {
                kinds.push(k.as_str());
                values.push(v.as_str());
            }
        }
        let repointed = sqlx::query(
            "insert into identities (kind, value, profile_id) select k, v, $3 from unnest($1::text[], $2::text[]) as u(k, v)
             on conflict (kind, value) do update set profile_id = excluded.profile_id where identities.profile_id <> excluded.profile_id",
        )
        .bind(&kinds)
        .bind(&values)
        .bind(p)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let aggs: BTreeMap<String, AggState> = aggregate_from(contribs, mapper.aggregates())
            .into_iter()
            .filter(|(_, a)| a.n != 0)
            .collect();
        let winners = resolve_fields(contribs, |f| mapper.strategy(f));
        let t = traits(&winners, &aggs, mapper.aggregates());
        let same = stored
            .get(p)
            .is_some_and(|o| o.merged_into.is_none() && o.aggs == aggs && o.traits == t)
            && provenance.remove(p).as_ref() == Some(&winners);
        if !same {
            sqlx::query(
                "insert into profiles (profile_id, traits, agg_state, provenance) values ($1, $2, $3, $4::json)
                 on conflict (profile_id) do update set traits = excluded.traits, agg_state = excluded.agg_state,
                   provenance = excluded.provenance, merged_into = null, updated_at = now()",
            )
            .bind(p)
            .bind(Json(&t))
            .bind(Json(&aggs))
            .bind(provenance_json(&winners))
            .execute(&mut *tx)
            .await?;
        }
        if repointed > 0 || !same {
            changed.insert(*p);
        }
    }
    Ok(changed.into_iter().collect())
}

/// The partition part of [`rederive`]: splits each of `profiles` into the
/// connected components of its live rows' identifiers and removes the
/// identifiers none of them carries, with the merge core's own rule
/// ([`State::split_unlinked`]; the part from the smaller profile keeps the
/// id). This is what repairs a store built when the graph only grew. Returns
/// the profiles to re-derive (the given ones and those split off) and the
/// ones whose identifiers changed.
async fn regroup(
    tx: &mut PgConnection,
    mapper: &Mapper,
    profiles: &BTreeSet<ProfileId>,
) -> Result<(BTreeSet<ProfileId>, BTreeSet<ProfileId>), StoreError> {
    let ids: Vec<i64> = profiles.iter().copied().collect();
    let mut state = State::slice(mapper);
    for (_, rows) in contributions_by_profile(tx, &ids, false).await? {
        for c in rows {
            state.contributions.insert(c.row.clone(), c);
        }
    }
    let stored = identities_of(tx, &ids).await?;
    let mut firsts: HashMap<Ident, ProfileId> = HashMap::new();
    for (k, v, p, first) in stored {
        firsts.insert((k.clone(), v.clone()), first.unwrap_or(p));
        state.owners.insert((k, v), p);
    }
    for p in &ids {
        state.profiles.insert(*p, ProfileState::default());
    }
    state.next_profile_id = next_profile_id(tx).await?;
    state.log.unlinked = profiles.clone();
    state.split_unlinked(&mut firsts.into_iter().collect(), None);
    let log = std::mem::take(&mut state.log);
    let mut changed: BTreeSet<ProfileId> = BTreeSet::new();
    for (p, n) in &log.splits {
        changed.insert(*p);
        changed.insert(*n);
    }
    if !log.removed_identities.is_empty() {
        let (kinds, values): (Vec<&str>, Vec<&str>) = log
            .removed_identities
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .unzip();
        sqlx::query(
            "delete from identities i using unnest($1::text[], $2::text[]) as u(k, v) where i.kind = u.k and i.value = u.v",
        )
        .bind(&kinds)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        changed.extend(profiles.iter().copied());
    }
    if !log.splits.is_empty() {
        let mut moved: (Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
        for i in &log.first_reset {
            if let Some(p) = state.owners.get(i) {
                moved.0.push(&i.0);
                moved.1.push(&i.1);
                moved.2.push(*p);
            }
        }
        sqlx::query(
            "update identities i set profile_id = u.p, first_profile_id = null
               from unnest($1::text[], $2::text[], $3::bigint[]) as u(k, v, p)
              where i.kind = u.k and i.value = u.v",
        )
        .bind(&moved.0)
        .bind(&moved.1)
        .bind(&moved.2)
        .execute(&mut *tx)
        .await?;
        let mut rows: (Vec<&str>, Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
        for r in &log.contributions {
            if let Some(p) = state.contributions.get(r).and_then(|c| c.profile_id) {
                rows.0.push(&r.source);
                rows.1.push(&r.table);
                rows.2.push(&r.row_key);
                rows.3.push(p);
            }
        }
        sqlx::query(
            "update contributions c set profile_id = u.p, updated_at = now()
               from unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) as u(s, t, k, p)
              where c.source = u.s and c.table_name = u.t and c.row_key = u.k",
        )
        .bind(&rows.0)
        .bind(&rows.1)
        .bind(&rows.2)
        .bind(&rows.3)
        .execute(&mut *tx)
        .await?;
    }
    let mut all = profiles.clone();
    all.extend(log.created.iter().copied());
    Ok((all, changed))
}
