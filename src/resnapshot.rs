//! `tributary snapshot --source S [--table T]`: read a source's tables again
//! while the daemon streams, without losing or reordering a change.
//!
//! Each chunk of rows (in key order) is read between two watermarks
//! ([`crate::source::read`]). Once the daemon's checkpoint has passed the high
//! watermark, every change committed before it is in the store; the rows of
//! the chunk are then applied as snapshot events positioned at the high
//! watermark, except rows that a change invisible to the read touched (found
//! in the event log between the watermarks or under the read's in-progress
//! transaction ids): for those the streamed change is newer and stays. Rows
//! the store holds but the table no longer has are deleted the same way.
//! Everything goes through the normal apply path, so suppressions (forgotten
//! people) hold and later streamed changes win by position.

use crate::progress::{Progress, Stage};
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::{Connection, PgConnection};

use crate::config::{Config, SourceConfig, TableConfig};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::mapping::Mapper;
use crate::source::read::{
    prepare_session, read_between_watermarks, Bind, TableReader, WatermarkedRead, Watermarks,
    READ_SEQ_BASE,
};
use crate::source::{query_conn, query_err, quote_ident};
use crate::store::apply::{apply_in, lock, ApplyStats};
use crate::store::{Store, StoreError};

/// Rows per watermarked chunk.
const CHUNK_ROWS: i64 = 20_000;

/// Waits until the daemon has applied `source` past `lsn`, prodding an idle
/// source with heartbeats so that its stream moves.
///
/// Applied means: the store's checkpoint, or the position the daemon has
/// confirmed to the slot, is past `lsn`. The daemon confirms only what the
/// store has committed, and confirms keepalive positions of an idle stream
/// without writing the store (a write per keepalive would, with the store on
/// the same server, make WAL that makes the next keepalive).
pub async fn wait_until_applied(
    store: &Store,
    src: &SourceConfig,
    lsn: Lsn,
    timeout: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_prod: Option<Instant> = None;
    let mut conn = query_conn(src).await?;
    loop {
        let cp = store.checkpoint(&src.name).await?.map(|c| c.lsn);
        let confirmed: Option<String> = sqlx::query_scalar(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
        )
        .bind(&src.slot)
        .fetch_optional(&mut conn)
        .await
        .map_err(query_err(src, "read the slot's confirmed position"))?
        .flatten();
        let confirmed: Option<Lsn> = confirmed.and_then(|l| l.parse().ok());
        // The slot only counts once the store has a checkpoint (a snapshot done).
        let applied = cp.map(|c| c.max(confirmed.unwrap_or_default()));
        if applied.is_some_and(|a| a > lsn) {
            conn.close().await.ok();
            return Ok(());
        }
        if started.elapsed() >= timeout {
            anyhow::bail!(
                "source {}: the daemon has not applied the stream past {lsn} (applied up to {}) within {} s; \
                 is `tributary run` streaming this source? (raise --wait-secs for a slow one)",
                src.name,
                applied.map_or_else(|| "nothing yet".to_owned(), |c| c.to_string()),
                timeout.as_secs()
            );
        }
        if last_prod.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            // Fire and forget: a busy source moves anyway.
            if let Err(e) = crate::source::heartbeat(src).await {
                tracing::debug!(source = %src.name, error = %e, "heartbeat failed");
            }
            last_prod = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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
/// change invisible to the read touched. Call after [`wait_until_applied`].
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
        apply_in(&mut tx, mapper, source, &events, true, None, None).await?
    };
    tx.commit().await?;
    Ok((out, stats))
}

/// What `tributary snapshot` did, per table.
#[derive(Debug, Serialize)]
pub struct TableSnapshot {
    /// `schema.table`.
    pub table: String,
    /// Chunks read.
    pub chunks: u64,
    /// Totals over the chunks.
    #[serde(flatten)]
    pub totals: ReadApplied,
}

/// Re-snapshots `table` (or every mapped table) of `source` while the daemon streams.
pub async fn snapshot(
    cfg: &Config,
    store: &Store,
    source: &str,
    table: Option<&str>,
    wait: Duration,
    progress: Progress,
) -> anyhow::Result<Vec<TableSnapshot>> {
    let src = cfg
        .source(source)
        .ok_or_else(|| anyhow::anyhow!("no source `{source}` in the config"))?;
    let tables: Vec<&TableConfig> = match table {
        None => src.tables.iter().collect(),
        Some(t) => {
            let qualified = if t.contains('.') {
                t.to_owned()
            } else {
                format!("public.{t}")
            };
            vec![src.table(&qualified).ok_or_else(|| {
                    anyhow::anyhow!("source `{source}` maps no table `{qualified}` (see [[source.table]] in the config)")
                })?]
        }
    };
    let mapper = Mapper::new(cfg);
    let mut conn = query_conn(src).await?;
    prepare_session(&mut conn, src).await?;
    let mut out = Vec::new();
    for t in tables {
        let estimate = row_estimate(&mut conn, t).await;
        let stage = progress.stage(
            &format!("snapshot {}/{}", src.name, t.qualified),
            u64::try_from(estimate).ok().filter(|n| *n > 0),
        );
        out.push(snapshot_table(store, &mapper, src, t, &mut conn, wait, &stage).await?);
        stage.done();
    }
    conn.close().await.ok();
    Ok(out)
}

async fn snapshot_table(
    store: &Store,
    mapper: &Mapper,
    src: &SourceConfig,
    t: &TableConfig,
    conn: &mut PgConnection,
    wait: Duration,
    stage: &Stage,
) -> anyhow::Result<TableSnapshot> {
    let reader = TableReader::load(conn, src, t).await?;
    let keys: Vec<&str> = reader
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.as_str())
        .collect();
    anyhow::ensure!(
        !keys.is_empty(),
        "{}: table has no primary key or replica identity to page by",
        t.qualified
    );
    let key_list = keys
        .iter()
        .map(|k| quote_ident(k))
        .collect::<Vec<_>>()
        .join(", ");
    let mut totals = ReadApplied::default();
    let mut chunks = 0u64;
    let mut last: Option<Vec<Option<String>>> = None;
    let mut seen: BTreeSet<String> = BTreeSet::new();
    // Rows last written before the first chunk's low watermark that no chunk
    // found are gone from the source; anything written later is the stream's.
    let mut started_at: Option<Lsn> = None;
    tracing::info!(source = %src.name, table = %t.qualified, "re-snapshot of table started");
    loop {
        // Keyset paging: the next chunk starts after the last key read,
        // compared in the key's own type (its text cast back by the server).
        let (tail, binds) = match &last {
            None => (
                format!("order by {key_list} limit {CHUNK_ROWS}"),
                Vec::new(),
            ),
            Some(vals) => (
                format!(
                    "where ({key_list}) > ({}) order by {key_list} limit {CHUNK_ROWS}",
                    keys.iter()
                        .enumerate()
                        .map(|(i, k)| format!("${}::text::{}", i + 1, type_of(&reader, k)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                vals.iter().cloned().map(Bind::Text).collect(),
            ),
        };
        let WatermarkedRead {
            marks,
            rows: events,
        } = read_between_watermarks(conn, src, &reader, &tail, &binds).await?;
        let first = *started_at.get_or_insert(marks.low);
        let high = marks.high;
        let n = events.len();
        if let Some(e) = events.last() {
            last = Some(
                keys.iter()
                    .map(|k| match e.key.get(*k) {
                        None | Some(Value::Null) => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(v) => Some(v.to_string()),
                    })
                    .collect(),
            );
        }
        seen.extend(events.iter().map(ChangeEvent::row_key));
        wait_until_applied(store, src, high, wait).await?;
        // Rows the store holds but the table lost are deleted after the last chunk.
        let done = i64::try_from(n).unwrap_or(i64::MAX) < CHUNK_ROWS;
        let gone_keys = if done {
            store_live_keys(store, &src.name, &t.qualified, first).await?
        } else {
            Vec::new()
        };
        let (applied, _) = apply_read(
            store,
            mapper,
            &src.name,
            &t.qualified,
            &marks,
            events,
            |_| {
                gone_keys
                    .into_iter()
                    .filter(|k| !seen.contains(k))
                    .collect()
            },
        )
        .await?;
        chunks += 1;
        stage.inc(applied.rows);
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS, "source" => src.name.clone())
            .increment(applied.rows);
        totals.rows += applied.rows;
        totals.applied += applied.applied;
        totals.skipped += applied.skipped;
        totals.deleted += applied.deleted;
        tracing::info!(source = %src.name, table = %t.qualified, rows = totals.rows, "re-snapshot progress");
        if done {
            break;
        }
    }
    tracing::info!(source = %src.name, table = %t.qualified, rows = totals.rows,
        applied = totals.applied, skipped = totals.skipped, deleted = totals.deleted, "re-snapshot of table done");
    Ok(TableSnapshot {
        table: t.qualified.clone(),
        chunks,
        totals,
    })
}

/// About how many rows `table` has, for a progress bar: the planner's
/// estimate, or a count when the table was never analyzed (then it is new, and
/// usually small). 0 when unknown.
async fn row_estimate(conn: &mut PgConnection, t: &TableConfig) -> i64 {
    let table = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
    let estimate: Option<f32> =
        sqlx::query_scalar("select reltuples from pg_class where oid = $1::regclass")
            .bind(&table)
            .fetch_optional(&mut *conn)
            .await
            .ok()
            .flatten();
    match estimate {
        #[allow(clippy::cast_possible_truncation)]
        Some(n) if n >= 0.0 => n as i64,
        _ => sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
            .fetch_one(&mut *conn)
            .await
            .unwrap_or(0),
    }
}

/// The SQL type of column `name`, for casting a bound key value.
fn type_of(reader: &TableReader, name: &str) -> String {
    reader
        .columns
        .iter()
        .find(|c| c.name == name)
        .map_or_else(|| "text".to_owned(), |c| c.type_name.clone())
}

/// Live row keys of a table last written before `before`.
async fn store_live_keys(
    store: &Store,
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
    .fetch_all(store.pool())
    .await?)
}
