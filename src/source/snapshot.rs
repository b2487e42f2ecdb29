//! The initial snapshot: every mapped table read in a transaction that imports
//! the slot's exported snapshot, so that each row is seen exactly once, either
//! here or in the stream that starts at the slot's consistent point.
//!
//! Values are read as text and converted with the same function the stream
//! uses, under the same session settings (UTC, ISO dates), so a row read here
//! and the same row streamed later produce identical values and row keys.

use chrono::Utc;
use futures_util::TryStreamExt;
use serde_json::{Map, Value};
use sqlx::{Connection, PgConnection, Row};

use super::{query_conn, query_err, quote_ident, SourceConfig};
use crate::config::TableConfig;
use crate::event::{ChangeEvent, Lsn, Op};
use crate::pgoutput::value::text_to_json;

/// Where snapshot batches go (the store, in the daemon).
pub trait SnapshotSink {
    /// Applies one batch of snapshot events.
    fn apply(
        &mut self,
        events: Vec<ChangeEvent>,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send;
}

struct ColumnInfo {
    name: String,
    type_oid: u32,
    key: bool,
}

async fn columns(conn: &mut PgConnection, t: &TableConfig) -> Result<Vec<ColumnInfo>, sqlx::Error> {
    // Key columns are those of the replica identity, exactly as pgoutput flags them.
    let rows = sqlx::query(
        "select a.attname::text as name, a.atttypid::bigint as type_oid,
                case c.relreplident
                  when 'f' then true
                  when 'i' then exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisreplident and a.attnum = any(i.indkey))
                  else exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary and a.attnum = any(i.indkey))
                end as key
           from pg_attribute a
           join pg_class c on c.oid = a.attrelid
           join pg_namespace n on n.oid = c.relnamespace
          where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped
          order by a.attnum",
    )
    .bind(&t.schema)
    .bind(&t.name)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| ColumnInfo {
            name: r.get("name"),
            type_oid: u32::try_from(r.get::<i64, _>("type_oid")).unwrap_or(25),
            key: r.get("key"),
        })
        .collect())
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
    sqlx::raw_sql("set timezone = 'UTC'; set datestyle = 'ISO, YMD'; set extra_float_digits = 3; set intervalstyle = 'iso_8601'")
        .execute(&mut conn)
        .await
        .map_err(query_err(src, "set session"))?;
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
        let cols = columns(&mut tx, t)
            .await
            .map_err(query_err(src, "read table columns"))?;
        let select = cols
            .iter()
            .map(|c| format!("{}::text", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "select {select} from {}.{}",
            quote_ident(&t.schema),
            quote_ident(&t.name)
        );
        tracing::info!(source = %src.name, table = %t.qualified, "snapshot of table started");
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(&mut *tx);
        let mut n: u64 = 0;
        while let Some(r) = rows
            .try_next()
            .await
            .map_err(query_err(src, "read snapshot rows"))?
        {
            let mut key = Map::new();
            let mut row = Map::new();
            for (i, c) in cols.iter().enumerate() {
                let v = r
                    .try_get::<Option<String>, _>(i)
                    .map_err(query_err(src, "decode snapshot row"))?;
                let json = v.map_or(Value::Null, |text| text_to_json(c.type_oid, &text));
                if c.key {
                    key.insert(c.name.clone(), json.clone());
                }
                row.insert(c.name.clone(), json);
            }
            pending.push(ChangeEvent {
                source: src.name.clone(),
                table: t.qualified.clone(),
                op: Op::Snapshot,
                key,
                row,
                unchanged: Vec::new(),
                lsn: consistent_point,
                commit_lsn: consistent_point,
                seq,
                xid: 0,
                commit_time: now,
            });
            seq += 1;
            n += 1;
            if pending.len() >= batch {
                sink.apply(std::mem::take(&mut pending)).await?;
            }
        }
        drop(rows);
        tracing::info!(source = %src.name, table = %t.qualified, rows = n, "snapshot of table done");
    }
    if !pending.is_empty() {
        sink.apply(pending).await?;
    }
    tx.commit()
        .await
        .map_err(query_err(src, "end snapshot transaction"))?;
    Ok(seq)
}
