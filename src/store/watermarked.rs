//! Applying rows read from a source between two watermarks (`tributary
//! snapshot`, `reconcile --repair`): which rows a change invisible to the read
//! touched, and the apply of the others under the apply lock. See
//! `crate::resnapshot` for the rule.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::PgConnection;

use super::apply::{apply_in, lock, ApplyStats};
use super::{Store, StoreError};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::mapping::Mapper;
use crate::source::read::{Watermarks, READ_SEQ_BASE};

/// Row keys of `table` that changes invisible to a watermarked read touched
/// (or `None`: a truncate touched them all): changes committed between the
/// watermarks, and changes of transactions the read's snapshot counts as in
/// progress, wherever their commit landed: those in its list, and those at or
/// above its `xmax`, which include transactions that had written their commit
/// record before the low watermark but had not finished committing (the test
/// `reconcile_during_a_live_workload_reports_no_drift` caught exactly that).
/// Transaction ids are compared in 32 bits; the one-hour bound on commit time
/// keeps the wrap-around case from reaching old events.
pub(crate) async fn changed_during(
    tx: &mut PgConnection,
    source: &str,
    table: &str,
    marks: &Watermarks,
) -> Result<Option<HashSet<String>>, StoreError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select key::text, op from events
          where source = $1 and table_name = $2 and commit_lsn >= $3::pg_lsn and commit_lsn <= $4::pg_lsn
         union
         select key::text, op from events
          where source = $1 and table_name = $2 and (xid = any($5) or xid >= $7) and commit_lsn <= $4::pg_lsn
            and commit_time > $6::timestamptz - interval '1 hour'",
    )
    .bind(source)
    .bind(table)
    .bind(marks.low.to_string())
    .bind(marks.high.to_string())
    .bind(marks.xip32())
    .bind(marks.taken_at)
    .bind(marks.xmax32())
    .fetch_all(&mut *tx)
    .await?;
    let mut keys = HashSet::with_capacity(rows.len());
    for (key, op) in rows {
        if op == "truncate" {
            return Ok(None);
        }
        if let Ok(m) = serde_json::from_str::<Map<String, Value>>(&key) {
            keys.insert(Value::Object(m).to_string());
        }
    }
    Ok(Some(keys))
}

/// What applying a watermarked read did.
#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct ReadApplied {
    /// Rows read.
    pub rows: u64,
    /// Rows applied (or stale: the store already had them).
    pub applied: u64,
    /// Rows left to the stream (a newer change touched them).
    pub skipped: u64,
    /// Rows the store held that the source no longer has, deleted.
    pub deleted: u64,
}

/// Applies rows read between `marks` (snapshot events at the high watermark),
/// and deletes `gone` keys (store rows the read did not find), except keys a
/// change invisible to the read touched. Call after `crate::resnapshot::wait_until_applied`.
pub async fn apply_read(
    store: &Store,
    mapper: &Mapper,
    source: &str,
    table: &str,
    marks: &Watermarks,
    rows: Vec<ChangeEvent>,
    gone: impl FnOnce(&HashSet<String>) -> Vec<String>,
) -> Result<(ReadApplied, ApplyStats), StoreError> {
    let mut out = ReadApplied {
        rows: rows.len() as u64,
        ..Default::default()
    };
    // Partitions first, outside the transaction: their DDL would wait for the
    // locks this transaction takes on the event log.
    store
        .ensure_partitions_for(
            rows.iter()
                .map(|e| e.commit_time)
                .chain(std::iter::once(marks.taken_at)),
        )
        .await?;
    let mut tx = store.pool().begin().await?;
    lock(&mut tx).await?;
    let Some(changed) = changed_during(&mut tx, source, table, marks).await? else {
        // A truncate during the read: the stream has the last word on every row.
        out.skipped = out.rows;
        return Ok((out, ApplyStats::default()));
    };
    let read_keys: HashSet<String> = rows.iter().map(ChangeEvent::row_key).collect();
    let mut events: Vec<ChangeEvent> = rows
        .into_iter()
        .filter(|e| !changed.contains(&e.row_key()))
        .collect();
    out.skipped = out.rows - events.len() as u64;
    out.applied = events.len() as u64;
    let mut seq = events.iter().map(|e| e.seq).max().unwrap_or(READ_SEQ_BASE) + 1;
    for key in gone(&read_keys) {
        if changed.contains(&key) || read_keys.contains(&key) {
            continue;
        }
        let Ok(k) = serde_json::from_str::<Map<String, Value>>(&key) else {
            continue;
        };
        events.push(ChangeEvent {
            source: source.to_owned(),
            table: table.to_owned(),
            op: Op::Delete,
            key: k.clone(),
            row: k,
            unchanged: Vec::new(),
            unreadable: Vec::new(),
            lsn: marks.high,
            commit_lsn: marks.high,
            seq,
            xid: 0,
            commit_time: marks.taken_at,
        });
        seq += 1;
        out.deleted += 1;
    }
    let stats = if events.is_empty() {
        ApplyStats::default()
    } else {
        apply_in(&mut tx, mapper, source, &events, true, None).await?
    };
    tx.commit().await?;
    Ok((out, stats))
}

impl Store {
    /// Live row keys of a table last written before `before`.
    pub async fn live_keys_before(
        &self,
        source: &str,
        table: &str,
        before: Lsn,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
        "select row_key from contributions where source = $1 and table_name = $2 and not deleted and lsn < $3::pg_lsn",
    )
    .bind(source)
    .bind(table)
    .bind(before.to_string())
    .fetch_all(self.pool())
    .await?)
    }
}
