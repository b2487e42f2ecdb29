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
    apply_in, contributions_by_profile, lock, provenance_json, stored_provenance, StoredProfile,
};
use super::{Store, StoreError};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::mapping::Mapper;
use crate::resolve::{aggregate_from, resolve_fields, traits, AggState, ProfileId};

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
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(fetch.clone()))
                .persistent(false)
                .fetch_all(&mut *tx)
                .await?;
            if rows.is_empty() {
                break;
            }
            let chunk: Vec<ChangeEvent> = rows.iter().map(event_of).collect::<Result<_, _>>()?;
            events += chunk.len() as u64;
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
/// differs (profile rows, identities, provenance). Returns the profiles changed.
pub(crate) async fn rederive(
    tx: &mut PgConnection,
    mapper: &Mapper,
    profiles: &BTreeSet<ProfileId>,
) -> Result<Vec<ProfileId>, StoreError> {
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
    let mut changed = BTreeSet::new();
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
