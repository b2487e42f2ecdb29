//! The event log: every change as received, written with the batch.
//!
//! A batch of many changes goes by binary `COPY`: the `INSERT … SELECT … FROM
//! unnest(…) ON CONFLICT DO NOTHING` it replaces was the store's most expensive
//! statement in the 1M backlog (24 s of the store's 74–96 s; `docs/design.md`,
//! "Throughput"): eleven text arrays unnested, two LSNs per row parsed from
//! text, a speculative insertion per row. The tuples are encoded in the
//! daemon while the batch is planned ([`EventRows::of`]), so writing them is
//! I/O only, on a connection of its own beside the derived rows. A small batch
//! keeps the `INSERT` ([`INSERT`]), as one CTE of the batch's one write
//! statement in its own transaction (`apply::write_plan`): sqlx sends a
//! `COPY`'s data and its end in separate writes without `TCP_NODELAY`, and
//! Nagle's algorithm then holds the end until the server's delayed ACK, tens
//! of milliseconds that a caught-up stream cannot afford (see "The merge state
//! in memory" in `docs/design.md`), and a second connection's transaction
//! would cost three more round trips.
//!
//! Exactly-once is unchanged: the primary key `(source, commit_lsn, seq,
//! commit_time)` refuses a change logged twice. A batch meets one only when
//! it is written again after its log committed and its derived rows did not
//! (a large batch's log has a transaction of its own, see
//! `apply::write_plan`), when a
//! large transaction's earlier chunks stream again after a crash, or when a
//! Kafka apply owner re-reads changes whose write failed after its log
//! committed. The insert skips
//! such changes (`ON CONFLICT DO NOTHING`); the `COPY` runs under a savepoint,
//! and on a unique violation the savepoint is rolled back and the same bytes go
//! through `event_log_staging` (an unlogged table, empty outside a transaction)
//! into that insert. Either way the logged copies are kept, as the log always
//! did.

use sqlx::{Connection, PgConnection};

use super::apply::PgScalar;
use super::StoreError;
use crate::event::ChangeEvent;
use crate::failpoint::{self, Stage};

/// Rows per `CopyData` message. A crash between two of
/// them is a crash "during the event `COPY`" (the fault test's stage).
const CHUNK: usize = 2000;

/// From this many changes a batch's log goes by `COPY` (where one delayed ACK
/// is small beside the batch, and the log is written beside its derived rows).
const COPY_FROM: usize = 1000;

/// Whether a batch of `n` changes logs by `COPY` (on a connection of its own,
/// beside the derived rows), not in its write statement.
pub(crate) fn by_copy(n: usize) -> bool {
    n >= COPY_FROM
}

/// The columns, in the order each tuple carries them.
const COLUMNS: &str =
    "source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key, row, unchanged, unreadable";
const FIELDS: i16 = 12;

/// Binary `COPY` header: signature, flags, header-extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// End of data: a tuple with -1 fields.
const TRAILER: &[u8] = &(-1i16).to_be_bytes();

/// 2000-01-01T00:00:00Z, PostgreSQL's timestamp origin, in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// `text`'s type OID, for the elements of `unchanged text[]`.
const TEXT_OID: i32 = 25;
/// The `jsonb` binary format's version byte.
const JSONB_VERSION: u8 = 1;

/// A batch's event-log rows, ready to write: binary `COPY` tuples in chunks
/// of [`CHUNK`], or the columns of the insert for a small batch.
pub(crate) enum EventRows {
    /// Large batches.
    Copy { chunks: Vec<Vec<u8>>, len: usize },
    /// Small batches.
    Insert(Box<Columns>),
}

impl EventRows {
    /// Encodes `events` (source, LSNs, position, xid and commit time of each,
    /// its table, operation, key and image as JSON, its unchanged TOAST columns).
    pub(crate) fn of(events: &[&ChangeEvent]) -> EventRows {
        if !by_copy(events.len()) {
            return EventRows::Insert(Box::new(Columns::of(events)));
        }
        // The stream's header goes with the first chunk and its trailer with
        // the last: one write per chunk (each further write would be a small
        // segment for Nagle's algorithm to hold).
        let n = events.len().div_ceil(CHUNK);
        let chunks = events
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, part)| {
                let mut buf = Vec::with_capacity(part.len() * 256 + HEADER.len() + TRAILER.len());
                if i == 0 {
                    buf.extend_from_slice(HEADER);
                }
                for e in part {
                    encode(&mut buf, e);
                }
                if i + 1 == n {
                    buf.extend_from_slice(TRAILER);
                }
                buf
            })
            .collect();
        EventRows::Copy {
            chunks,
            len: events.len(),
        }
    }
}

/// Event-log rows, column by column, as bound to the insert.
#[derive(Default)]
pub(crate) struct Columns {
    source: Vec<String>,
    lsn: Vec<String>,
    commit_lsn: Vec<String>,
    seq: Vec<i64>,
    xid: Vec<i64>,
    commit_time: Vec<chrono::DateTime<chrono::Utc>>,
    table: Vec<String>,
    op: Vec<&'static str>,
    key: Vec<String>,
    row: Vec<String>,
    unchanged: Vec<String>,
    /// `''` for none, else the JSON of `ChangeEvent::unreadable`.
    unreadable: Vec<String>,
}

impl Columns {
    /// The batch's rows (the first to go), as `$1`-`$12` of [`INSERT`].
    pub(crate) fn bind<'q, O>(&'q self, q: PgScalar<'q, O>) -> PgScalar<'q, O> {
        q.bind(&self.source)
            .bind(&self.lsn)
            .bind(&self.commit_lsn)
            .bind(&self.seq)
            .bind(&self.xid)
            .bind(&self.commit_time)
            .bind(&self.table)
            .bind(&self.op)
            .bind(&self.key)
            .bind(&self.row)
            .bind(&self.unchanged)
            .bind(&self.unreadable)
    }

    /// How many rows.
    pub(crate) fn len(&self) -> usize {
        self.source.len()
    }

    fn of(events: &[&ChangeEvent]) -> Columns {
        Columns {
            source: events.iter().map(|e| e.source.clone()).collect(),
            lsn: events.iter().map(|e| e.lsn.to_string()).collect(),
            commit_lsn: events.iter().map(|e| e.commit_lsn.to_string()).collect(),
            seq: events.iter().map(|e| seq_of(e.seq)).collect(),
            xid: events.iter().map(|e| i64::from(e.xid)).collect(),
            commit_time: events.iter().map(|e| e.commit_time).collect(),
            table: events.iter().map(|e| e.table.clone()).collect(),
            op: events.iter().map(|e| e.op.as_str()).collect(),
            key: events
                .iter()
                .map(|e| serde_json::to_string(&e.key).unwrap_or_default())
                .collect(),
            row: events
                .iter()
                .map(|e| serde_json::to_string(&e.row).unwrap_or_default())
                .collect(),
            unchanged: events.iter().map(|e| e.unchanged.join(",")).collect(),
            unreadable: events
                .iter()
                .map(|e| {
                    if e.unreadable.is_empty() {
                        String::new()
                    } else {
                        serde_json::to_string(&e.unreadable).unwrap_or_default()
                    }
                })
                .collect(),
        }
    }
}

fn seq_of(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn encode(buf: &mut Vec<u8>, e: &ChangeEvent) {
    buf.extend_from_slice(&FIELDS.to_be_bytes());
    text(buf, &e.source);
    // pg_lsn is sent as its unsigned 64-bit value.
    bytes8(buf, e.lsn.0.to_be_bytes());
    bytes8(buf, e.commit_lsn.0.to_be_bytes());
    bytes8(buf, seq_of(e.seq).to_be_bytes());
    bytes8(buf, i64::from(e.xid).to_be_bytes());
    bytes8(
        buf,
        (e.commit_time.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes(),
    );
    text(buf, &e.table);
    text(buf, e.op.as_str());
    json(buf, Some(JSONB_VERSION), &e.key);
    json(buf, None, &e.row);
    if e.unchanged.is_empty() {
        buf.extend_from_slice(&(-1i32).to_be_bytes());
    } else {
        text_array(buf, &e.unchanged);
    }
    if e.unreadable.is_empty() {
        buf.extend_from_slice(&(-1i32).to_be_bytes());
    } else {
        json(buf, Some(JSONB_VERSION), &e.unreadable);
    }
}

fn len_prefix(buf: &mut Vec<u8>, len: usize) {
    buf.extend_from_slice(&i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes());
}

fn text(buf: &mut Vec<u8>, s: &str) {
    len_prefix(buf, s.len());
    buf.extend_from_slice(s.as_bytes());
}

fn bytes8(buf: &mut Vec<u8>, b: [u8; 8]) {
    buf.extend_from_slice(&8i32.to_be_bytes());
    buf.extend_from_slice(&b);
}

/// A JSON field: written in place, then its length filled in.
fn json(buf: &mut Vec<u8>, version: Option<u8>, v: &impl serde::Serialize) {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend(version);
    // Writing JSON maps, strings and numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, v);
    let len = i32::try_from(buf.len() - at - 4).unwrap_or(i32::MAX);
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// A one-dimensional `text[]` without NULLs.
fn text_array(buf: &mut Vec<u8>, items: &[String]) {
    let body: usize = 20 + items.iter().map(|s| 4 + s.len()).sum::<usize>();
    len_prefix(buf, body);
    buf.extend_from_slice(&1i32.to_be_bytes()); // dimensions
    buf.extend_from_slice(&0i32.to_be_bytes()); // no NULLs
    buf.extend_from_slice(&TEXT_OID.to_be_bytes());
    len_prefix(buf, items.len());
    buf.extend_from_slice(&1i32.to_be_bytes()); // lower bound
    for s in items {
        text(buf, s);
    }
}

/// Appends a large batch's `len` rows, encoded in `chunks`
/// ([`EventRows::Copy`]), to the event log in the open transaction on `conn`;
/// changes logged already are kept as they are (see the module doc). A small
/// batch's rows go in its write statement instead ([`INSERT`]).
pub(crate) async fn append(
    conn: &mut PgConnection,
    chunks: &[Vec<u8>],
    len: usize,
) -> Result<(), StoreError> {
    let mut attempt = conn.begin().await?;
    match copy(&mut attempt, "events", chunks).await {
        Ok(()) => {
            attempt.commit().await?;
            Ok(())
        }
        Err(StoreError::Query(sqlx::Error::Database(e)))
            if e.code().as_deref() == Some("23505") =>
        {
            attempt.rollback().await?;
            copy(conn, "event_log_staging", chunks).await?;
            let added = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "insert into events ({COLUMNS}) select {COLUMNS} from event_log_staging on conflict do nothing"
            )))
            .execute(&mut *conn)
            .await?
            .rows_affected();
            sqlx::raw_sql("delete from event_log_staging")
                .execute(&mut *conn)
                .await?;
            kept_logged(len, added);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Says so when some of a batch's `len` changes were in the log already (only
/// `added` were new): a batch written again after a crash, by either path.
pub(crate) fn kept_logged(len: usize, added: u64) {
    let kept = u64::try_from(len).unwrap_or(u64::MAX).saturating_sub(added);
    if kept > 0 {
        tracing::info!(
            changes = len,
            kept,
            "some changes of this batch are in the event log already (written before a crash); keeping the logged copies"
        );
    }
}

/// The insert of a small batch's log rows (`$1`-`$12`, [`Columns::bind`]), as a
/// CTE of the batch's one write statement (`apply::WRITE`), which counts the
/// rows it added.
pub(crate) const INSERT: &str =
    "insert into events (source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key, row, unchanged, unreadable)
     select s, l::pg_lsn, cl::pg_lsn, q, x, ct, t, o, k::jsonb, r::json,
            case when u = '' then null else string_to_array(u, ',') end,
            case when ur = '' then null else ur::jsonb end
       from unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                   $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[])
            as u(s, l, cl, q, x, ct, t, o, k, r, u, ur)
     on conflict do nothing
     returning 1";

/// One `COPY` of the encoded chunks into `table`.
async fn copy(conn: &mut PgConnection, table: &str, chunks: &[Vec<u8>]) -> Result<(), StoreError> {
    let mut copy = conn
        .copy_in_raw(&format!(
            "copy {table} ({COLUMNS}) from stdin with (format binary)"
        ))
        .await?;
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            failpoint::hit(Stage::EventLog);
        }
        copy.send(chunk.as_slice()).await?;
    }
    copy.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_array_carries_its_dimension_and_elements() {
        let mut buf = Vec::new();
        text_array(&mut buf, &["a".to_owned(), "bc".to_owned()]);
        let want: Vec<u8> = [
            &31i32.to_be_bytes()[..],
            &1i32.to_be_bytes(),
            &0i32.to_be_bytes(),
            &25i32.to_be_bytes(),
            &2i32.to_be_bytes(),
            &1i32.to_be_bytes(),
            &1i32.to_be_bytes(),
            b"a",
            &2i32.to_be_bytes(),
            b"bc",
        ]
        .concat();
        assert_eq!(buf, want);
    }

    #[test]
    fn a_json_field_is_prefixed_with_its_length_and_jsonb_with_its_version() {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), 7.into());
        let mut buf = Vec::new();
        json(&mut buf, Some(JSONB_VERSION), &m);
        assert_eq!(
            buf,
            [&9i32.to_be_bytes()[..], &[1], br#"{"id":7}"#].concat()
        );
    }
}
