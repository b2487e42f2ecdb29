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
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

use crate::config::{Config, SourceConfig, TableConfig};
use crate::event::{ChangeEvent, Lsn};
use crate::mapping::Mapper;
use crate::source::read::{
    prepare_session, read_between_watermarks, Bind, TableReader, WatermarkedRead,
};
use crate::source::{query_conn, query_err, quote_ident};
pub use crate::store::watermarked::{apply_read, ReadApplied};
use crate::store::Store;

/// Rows per watermarked chunk.
const CHUNK_ROWS: i64 = 20_000;

/// Waits until the daemon has applied `source` past `lsn`, prodding an idle
/// source with heartbeats so that its stream moves.
///
/// Applied means: the store's checkpoint, or the position the daemon has
/// confirmed to the slot, is past `lsn`, and, in a deployment split over
/// Kafka, the apply owner has applied every message the capture had
/// published by then (`store::lease`). The daemon confirms only what the
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
    // Split over Kafka: where the capture had published when its checkpoint
    // passed `lsn`; the apply owner must have applied up to there.
    let mut published: Option<crate::store::lease::Offsets> = None;
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
        if published.is_none() && applied.is_some_and(|a| a > lsn) {
            published = Some(store.published_offsets(&src.name).await?);
        }
        if let Some(p) = &published {
            if store.apply_caught_up(p).await? {
                conn.close().await.ok();
                return Ok(());
            }
            if started.elapsed() >= timeout {
                anyhow::bail!(
                    "source {}: the stream past {lsn} is published to Kafka but the apply owner has not applied it within {} s; \
                     is a `tributary run --role apply` instance running and owning the lease? (raise --wait-secs for a slow one)",
                    src.name,
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
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
            store
                .live_keys_before(&src.name, &t.qualified, first)
                .await?
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
    // A table that was out of the publication has now been read again.
    store.done_table_snapshot(&src.name, &t.qualified).await?;
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
