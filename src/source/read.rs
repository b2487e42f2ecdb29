//! Reading a source table the way the stream sees it, and the watermarks that
//! place such a read in the stream's order.
//!
//! Rows are read as text and converted with the stream's own function under
//! the stream's session settings (UTC, ISO dates), so a row read here and the
//! same row streamed produce identical values and row keys. The same module
//! builds the SQL expressions that compute, on the source, the key and the
//! digest image of a row exactly as the store records them, which lets
//! reconciliation compare hashes per key bucket without moving rows.
//!
//! A read is placed in the stream with two watermarks (after DBLog): the WAL
//! position before it (`low`), the read's MVCC snapshot, and the WAL position
//! after it (`high`). Once the store has applied everything up to `high`, a row
//! read here is the row's latest word as of `high`, except for rows that a
//! transaction the read could not see also changed: those changes are in the
//! event log either between the watermarks or under one of the snapshot's
//! in-progress transaction ids, and the streamed change wins.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{PgConnection, Row};

use super::{query_err, quote_ident, quote_literal, SourceConfig, SourceError};
use crate::config::TableConfig;
use crate::event::{ChangeEvent, Lsn, Op};
use crate::pgoutput::value::{bytes_to_json, oid};

/// Rows read outside the stream carry positions from here on inside their
/// watermark, so that they never share an identity with a streamed change.
pub const READ_SEQ_BASE: u64 = 1 << 40;

/// One column of a source table.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID (for the text → JSON conversion).
    pub type_oid: u32,
    /// SQL type name (for casting a bound value back).
    pub type_name: String,
    /// Part of the replica identity (the row key).
    pub key: bool,
}

/// A source table ready to be read.
#[derive(Debug, Clone)]
pub struct TableReader {
    source: String,
    table: TableConfig,
    /// Its columns, in table order.
    pub columns: Vec<Column>,
    /// The encoding [`TableReader::select`] asks values in: `UTF8`, or
    /// `SQL_ASCII` (the bytes as stored) when the database is `SQL_ASCII`.
    bytes_as: &'static str,
}

/// Sets the session up like the stream's: UTC, ISO dates, exact floats.
pub async fn prepare_session(
    conn: &mut PgConnection,
    src: &SourceConfig,
) -> Result<(), SourceError> {
    sqlx::raw_sql("set timezone = 'UTC'; set datestyle = 'ISO, YMD'; set extra_float_digits = 3; set intervalstyle = 'iso_8601'")
        .execute(conn)
        .await
        .map_err(query_err(src, "set session"))?;
    Ok(())
}

impl TableReader {
    /// Reads the table's columns and key from the catalog.
    pub async fn load(
        conn: &mut PgConnection,
        src: &SourceConfig,
        t: &TableConfig,
    ) -> Result<TableReader, SourceError> {
        // Key columns are those of the replica identity, exactly as pgoutput flags them.
        let rows = sqlx::query(
            "select a.attname::text as name, a.atttypid::bigint as type_oid,
                    format_type(a.atttypid, a.atttypmod) as type_name,
                    case c.relreplident
                      -- FULL: the primary key if there is one (as the stream's
                      -- decoder is told), else every column
                      when 'f' then coalesce((select a.attnum = any(i.indkey) from pg_index i
                                               where i.indrelid = c.oid and i.indisprimary), true)
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
        .await
        .map_err(query_err(src, "read table columns"))?;
        let columns = rows
            .iter()
            .map(|r| Column {
                name: r.get("name"),
                type_oid: u32::try_from(r.get::<i64, _>("type_oid")).unwrap_or(25),
                type_name: r.get("type_name"),
                key: r.get("key"),
            })
            .collect();
        // A SQL_ASCII database stores whatever bytes it was given: its text
        // is read as those bytes (and what is not UTF-8 fails only its row);
        // any other encoding is converted to UTF-8 by the server.
        let encoding: String = sqlx::query_scalar("select current_setting('server_encoding')")
            .fetch_one(&mut *conn)
            .await
            .map_err(query_err(src, "read server_encoding"))?;
        Ok(TableReader {
            source: src.name.clone(),
            table: t.clone(),
            columns,
            bytes_as: if encoding == "SQL_ASCII" {
                "SQL_ASCII"
            } else {
                "UTF8"
            },
        })
    }

    /// `"schema"."table"`.
    pub fn relation(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.table.schema),
            quote_ident(&self.table.name)
        )
    }

    /// `select <every column's text, as bytes> from <table>`, to be followed by
    /// a filter. Bytes, not text: a `SQL_ASCII` database can hold text that is
    /// not UTF-8, and converting it for a UTF-8 client would fail the whole
    /// read; as bytes, such a value fails only its own row (a dead letter).
    /// (`convert_to` a target of `SQL_ASCII` returns the text's bytes as they
    /// are stored; `textsend` would convert them to the client's encoding.)
    pub fn select(&self) -> String {
        let cols = self
            .columns
            .iter()
            .map(|c| {
                format!(
                    "pg_catalog.convert_to({}::text, '{}')",
                    quote_ident(&c.name),
                    self.bytes_as
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!("select {cols} from {}", self.relation())
    }

    /// SQL for the row key as jsonb, equal in value to the store's `row_key::jsonb`.
    pub fn key_expr(&self) -> String {
        object_expr(
            self.columns
                .iter()
                .filter(|c| c.key)
                .map(|c| (c.name.as_str(), json_expr(&c.name, c.type_oid))),
        )
    }

    /// SQL for the row key as the store's `row_key` text (compact JSON, keys
    /// sorted), so that both sides hash the same bytes into key buckets.
    pub fn key_text_expr(&self) -> String {
        let mut keys: Vec<&Column> = self.columns.iter().filter(|c| c.key).collect();
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        let parts: Vec<String> = keys
            .iter()
            .map(|c| {
                let name = serde_json::to_string(&c.name).unwrap_or_default();
                format!(
                    "{} || to_json({})::text",
                    quote_literal(&format!("{name}:")),
                    quote_ident(&c.name)
                )
            })
            .collect();
        format!("'{{' || {} || '}}'", parts.join(" || ',' || "))
    }

    /// SQL for the digest of the row's mapped columns, equal to the store's
    /// `contributions.digest` ([`STORE_DIGEST`]) when the store holds this image.
    pub fn digest_expr(&self) -> String {
        let terms: Vec<String> = self
            .table
            .mapped_columns()
            .into_iter()
            .map(|name| {
                let text = self.columns.iter().find(|c| c.name == name).map_or_else(
                    || "null::text".to_owned(),
                    |c| text_expr(&c.name, c.type_oid),
                );
                format!(
                    "hashtextextended(coalesce({} || {text}, {}), 0)::numeric",
                    quote_literal(&format!("{name}=")),
                    quote_literal(name)
                )
            })
            .collect();
        if terms.is_empty() {
            return "0::bigint".to_owned();
        }
        format!("(({}) % {DIGEST_MODULUS})::bigint", terms.join(" + "))
    }

    /// One row of [`TableReader::select`] as a snapshot event at `at_lsn`.
    pub fn event(
        &self,
        r: &sqlx::postgres::PgRow,
        at_lsn: Lsn,
        seq: u64,
        at: DateTime<Utc>,
    ) -> Result<ChangeEvent, sqlx::Error> {
        let mut key = Map::new();
        let mut row = Map::new();
        let mut unreadable = Vec::new();
        for (i, c) in self.columns.iter().enumerate() {
            let json = match r.try_get::<Option<&[u8]>, _>(i)? {
                None => Value::Null,
                Some(bytes) => {
                    let (json, why) = bytes_to_json(c.type_oid, bytes);
                    if let Some(why) = why {
                        unreadable.push((c.name.clone(), why.to_owned()));
                    }
                    json
                }
            };
            if c.key {
                key.insert(c.name.clone(), json.clone());
            }
            row.insert(c.name.clone(), json);
        }
        Ok(ChangeEvent {
            source: self.source.clone(),
            table: self.table.qualified.clone(),
            op: Op::Snapshot,
            key,
            row,
            unchanged: Vec::new(),
            unreadable,
            lsn: at_lsn,
            commit_lsn: at_lsn,
            seq,
            xid: 0,
            commit_time: at,
        })
    }
}

/// `jsonb_build_object` over (name, expression) pairs, in groups under the
/// function's argument limit.
fn object_expr<'a>(pairs: impl Iterator<Item = (&'a str, String)>) -> String {
    let pairs: Vec<String> = pairs
        .map(|(name, expr)| format!("{}, {expr}", quote_literal(name)))
        .collect();
    if pairs.is_empty() {
        return "'{}'::jsonb".to_owned();
    }
    pairs
        .chunks(40)
        .map(|c| format!("jsonb_build_object({})", c.join(", ")))
        .collect::<Vec<_>>()
        .join(" || ")
}

/// The row digest is a sum of per-column text hashes folded into a bigint.
const DIGEST_MODULUS: &str = "9223372036854775807";

/// The store's digest of a row image (`$img`: the JSON object of the mapped
/// columns): for each column, the hash of `name=value` with the value as
/// `jsonb_each_text` renders it (`name` alone for null), summed and folded.
pub const STORE_DIGEST: &str = "(select (sum(hashtextextended(coalesce(k || '=' || v, k), 0)::numeric) % 9223372036854775807)::bigint
   from jsonb_each_text($img::jsonb) as e(k, v))";

/// SQL giving the text that `jsonb_each_text` renders of the JSON value
/// [`text_to_json`](crate::pgoutput::value::text_to_json) makes of the column. Where the two could differ (exotic
/// values), the digests differ and the row is compared in full: a false
/// alarm costs a read, never a missed drift.
fn text_expr(name: &str, type_oid: u32) -> String {
    let c = quote_ident(name);
    match type_oid {
        // integral numerics are integers, others the shortest decimal
        oid::NUMERIC => format!(
            "case when position('.' in {c}::text) > 0 then rtrim(rtrim({c}::text, '0'), '.') else {c}::text end"
        ),
        // as `jsonb_each_text` renders a member: strings unquoted, JSON null as NULL
        oid::JSON | oid::JSONB => format!("(jsonb_build_object('v', {c}::jsonb) ->> 'v')"),
        oid::TIMESTAMPTZ => format!(
            "to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        ),
        oid::TIMESTAMP => format!("to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"),
        other if array_like(other) => format!("to_jsonb({c})::text"),
        _ => format!("{c}::text"),
    }
}

/// Array types (their values are JSON arrays in an image).
fn array_like(type_oid: u32) -> bool {
    matches!(
        type_oid,
        1000 | 1005
            | 1007
            | 1016
            | 1028
            | 1021
            | 1022
            | 1231
            | 1115
            | 1185
            | 1182
            | 2951
            | 199
            | 3807
            | 1009
            | 1015
            | 1014
            | 1003
            | 1002
    )
}

/// SQL giving the jsonb value that [`text_to_json`](crate::pgoutput::value::text_to_json) makes of the column's text.
/// Where the two could differ (exotic values), the digests differ and the row
/// is compared in full: a false alarm costs a read, never a missed drift.
fn json_expr(name: &str, type_oid: u32) -> String {
    let c = quote_ident(name);
    match type_oid {
        oid::BOOL
        | oid::INT2
        | oid::INT4
        | oid::INT8
        | oid::FLOAT4
        | oid::FLOAT8
        | oid::NUMERIC => {
            format!("to_jsonb({c})")
        }
        oid::OID => format!("to_jsonb({c}::bigint)"),
        oid::JSON => format!("{c}::jsonb"),
        oid::JSONB => c,
        oid::TIMESTAMPTZ => format!(
            "to_jsonb(to_char({c} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))"
        ),
        oid::TIMESTAMP => format!("to_jsonb(to_char({c}, 'YYYY-MM-DD\"T\"HH24:MI:SS.US'))"),
        _ => format!("to_jsonb({c}::text)"),
    }
}

/// Where a read outside the stream sits in the stream.
#[derive(Debug, Clone)]
pub struct Watermarks {
    /// WAL insert position before the read.
    pub low: Lsn,
    /// WAL insert position after the read.
    pub high: Lsn,
    /// Transaction ids the read could not see: those at or above `xmax`
    /// (which may have written their commit record before `low`)…
    pub xmax: u64,
    /// …and those in progress when it started.
    pub xip: Vec<u64>,
    /// When the read started.
    pub taken_at: DateTime<Utc>,
}

impl Watermarks {
    /// `xmax` as the stream reports transaction ids (32 bits).
    pub fn xmax32(&self) -> i64 {
        i64::try_from(self.xmax & 0xFFFF_FFFF).unwrap_or(0)
    }

    /// The in-progress transaction ids as the stream reports them (32 bits).
    pub fn xip32(&self) -> Vec<i64> {
        self.xip
            .iter()
            .map(|x| i64::try_from(x & 0xFFFF_FFFF).unwrap_or(0))
            .collect()
    }
}

/// A value bound to a watermarked read's query.
#[derive(Debug, Clone)]
pub enum Bind {
    /// `$n` as text (NULL for None).
    Text(Option<String>),
    /// `$n` as a text array.
    TextArray(Vec<String>),
}

/// Rows read between watermarks, as snapshot events at the high watermark.
#[derive(Debug)]
pub struct WatermarkedRead {
    /// Where the read sits in the stream.
    pub marks: Watermarks,
    /// The rows, in the query's order.
    pub rows: Vec<ChangeEvent>,
}

/// Reads `select <columns> from <table> <tail>` (a filter, an order, a limit,
/// with `binds` as `$1`, `$2`, ...) between two watermarks.
pub async fn read_between_watermarks(
    conn: &mut PgConnection,
    src: &SourceConfig,
    reader: &TableReader,
    tail: &str,
    binds: &[Bind],
) -> Result<WatermarkedRead, SourceError> {
    use sqlx::Connection;
    let low = wal_position(conn, src).await?;
    let taken_at = Utc::now();
    let mut tx = conn
        .begin_with("begin isolation level repeatable read, read only")
        .await
        .map_err(query_err(src, "begin a read between watermarks"))?;
    let (xmax, xip) = take_snapshot(&mut tx, src).await?;
    let mut q = sqlx::query(sqlx::AssertSqlSafe(format!("{} {tail}", reader.select())));
    for b in binds {
        q = match b {
            Bind::Text(v) => q.bind(v.clone()),
            Bind::TextArray(v) => q.bind(v.clone()),
        };
    }
    let rows = q
        .fetch_all(&mut *tx)
        .await
        .map_err(query_err(src, "read rows between watermarks"))?;
    tx.commit()
        .await
        .map_err(query_err(src, "end a read between watermarks"))?;
    let high = wal_position(conn, src).await?;
    let mut events = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        events.push(
            reader
                .event(r, high, READ_SEQ_BASE + i as u64, taken_at)
                .map_err(query_err(src, "decode a row"))?,
        );
    }
    Ok(WatermarkedRead {
        marks: Watermarks {
            low,
            high,
            xmax,
            xip,
            taken_at,
        },
        rows: events,
    })
}

/// The current WAL insert position (not the write position, which lags behind
/// commits when `synchronous_commit` is off).
pub async fn wal_position(conn: &mut PgConnection, src: &SourceConfig) -> Result<Lsn, SourceError> {
    let lsn: String = sqlx::query_scalar("select pg_current_wal_insert_lsn()::text")
        .fetch_one(conn)
        .await
        .map_err(query_err(src, "read the WAL position"))?;
    Ok(lsn.parse().unwrap_or_default())
}

/// Run first inside a repeatable-read transaction: takes its snapshot and
/// returns `(xmax, xip)`.
pub async fn take_snapshot(
    conn: &mut PgConnection,
    src: &SourceConfig,
) -> Result<(u64, Vec<u64>), SourceError> {
    let snap: String = sqlx::query_scalar("select pg_current_snapshot()::text")
        .fetch_one(conn)
        .await
        .map_err(query_err(src, "take a snapshot"))?;
    Ok(parse_snapshot(&snap))
}

/// `xmin:xmax:xip,...` → `(xmax, xip)`.
fn parse_snapshot(s: &str) -> (u64, Vec<u64>) {
    let mut parts = s.split(':');
    let _xmin = parts.next();
    let xmax = parts
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(u64::MAX);
    let xip = parts
        .next()
        .map(|l| l.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    (xmax, xip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_parse() {
        assert_eq!(parse_snapshot("10:20:"), (20, vec![]));
        assert_eq!(parse_snapshot("10:20:11,15"), (20, vec![11, 15]));
    }

    #[test]
    fn wide_images_stay_under_the_argument_limit() {
        let names: Vec<String> = (0..95).map(|i| format!("c{i}")).collect();
        let e = object_expr(names.iter().map(|n| (n.as_str(), "1".to_owned())));
        assert_eq!(e.matches("jsonb_build_object(").count(), 3);
        assert!(e.contains(" || "));
    }
}
