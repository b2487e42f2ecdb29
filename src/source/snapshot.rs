//! The initial snapshot: every mapped table read in a transaction that imports
//! the slot's exported snapshot, so that each row is seen exactly once, either
//! here or in the stream that starts at the slot's consistent point.
//!
//! Values are read as text and converted with the same function the stream
//! uses, under the same session settings (UTC, ISO dates), so a row read here
//! and the same row streamed later produce identical values and row keys.

use chrono::Utc;
use futures_util::TryStreamExt;
use sqlx::Connection;

use super::read::{prepare_session, TableReader};
use super::{query_conn, query_err, SourceConfig};
use crate::event::{ChangeEvent, Lsn};

/// Where snapshot batches go (the store, in the daemon).
pub trait SnapshotSink {
    /// Applies one batch of snapshot events (it may still be applying when
    /// this returns: [`SnapshotSink::table_done`] waits for it).
    fn apply(
        &mut self,
        events: Vec<ChangeEvent>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;

    /// Every row of `table` was handed to [`SnapshotSink::apply`]: returns
    /// once they are all applied.
    fn table_done(
        &mut self,
        table: &str,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

/// Reads every mapped table of `src` as of `snapshot_name` and hands the rows to
/// `sink` in batches of `batch` events. Returns the number of rows read.
pub async fn snapshot(
    src: &SourceConfig,
    snapshot_name: &str,
    consistent_point: Lsn,
    batch: usize,
    sink: &mut impl SnapshotSink,
) -> Result<u64, anyhow::Error> {
    let mut conn = query_conn(src).await?;
    prepare_session(&mut conn, src).await?;
    let mut tx = conn
        .begin_with("begin isolation level repeatable read, read only")
        .await
        .map_err(query_err(src, "begin snapshot transaction"))?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "set transaction snapshot '{}'",
        snapshot_name.replace('\'', "''")
    )))
    .execute(&mut *tx)
    .await
    .map_err(query_err(src, "import exported snapshot"))?;
    let now = Utc::now();
    let mut seq: u64 = 0;
    let mut pending = Vec::with_capacity(batch);
    for t in &src.tables {
        let reader = TableReader::load(&mut tx, src, t).await?;
        let sql = reader.select();
        tracing::info!(source = %src.name, table = %t.qualified, "snapshot of table started");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
        let mut n: u64 = 0;
        while let Some(r) = rows
            .try_next()
            .await
            .map_err(query_err(src, "read snapshot rows"))?
        {
            pending.push(
                reader
                    .event(&r, consistent_point, seq, now)
                    .map_err(query_err(src, "decode snapshot row"))?,
            );
            seq += 1;
            n += 1;
            if pending.len() >= batch {
                sink.apply(std::mem::take(&mut pending)).await?;
            }
        }
        drop(rows);
        if !pending.is_empty() {
            sink.apply(std::mem::take(&mut pending)).await?;
        }
        sink.table_done(&t.qualified).await?;
        tracing::info!(source = %src.name, table = %t.qualified, rows = n, "snapshot of table done");
    }
    tx.commit()
        .await
        .map_err(query_err(src, "end snapshot transaction"))?;
    Ok(seq)
}
