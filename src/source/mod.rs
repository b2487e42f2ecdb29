//! One source database: its publication and slot, the replication stream, and
//! the initial snapshot.
//!
//! The replication stream is read by one loop per source ([`crate::app`]); this
//! module gives it the pieces: [`ensure_publication`], [`Replication`] (connect,
//! create the slot with an exported snapshot, start streaming, next message,
//! flush feedback) and [`snapshot`].

pub mod read;
pub mod snapshot;
pub mod spill;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::config::SourceConfig;
use crate::event::Lsn;
use crate::pgoutput::{DecodeError, Decoded, Decoder};
use crate::pgwire::{CopyMessage, PgConn, PgWireError};

/// Source-side failures.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The replication connection failed.
    #[error("source {source_name}: {error}")]
    Wire {
        /// Source name.
        source_name: String,
        /// Cause.
        #[source]
        error: PgWireError,
    },
    /// An ordinary query (publication, snapshot) failed.
    #[error("source {source_name}: {what}")]
    Query {
        /// Source name.
        source_name: String,
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        error: sqlx::Error,
    },
    /// A pgoutput message could not be decoded.
    #[error("source {source_name}: undecodable replication message at {lsn}")]
    Decode {
        /// Source name.
        source_name: String,
        /// Where.
        lsn: Lsn,
        /// Cause.
        #[source]
        error: DecodeError,
    },
    /// The server is not set up for logical replication.
    #[error("source {source_name}: wal_level is {wal_level}; set wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart the server)")]
    WalLevel {
        /// Source name.
        source_name: String,
        /// Current setting.
        wal_level: String,
    },
    /// The publication was dropped (or recreated) while the slot streamed
    /// through it: the server cannot decode the WAL written since.
    #[error(
        "source {source_name}: {message} (it was dropped while Tributary streamed through it); the server cannot \
         decode the changes written since through this slot, so they cannot be read. To re-snapshot the source: \
         DELETE FROM tributary.checkpoints WHERE source = '{source_name}'; then start tributary run again (it \
         recreates the publication and the slot)"
    )]
    PublicationDropped {
        /// Source name.
        source_name: String,
        /// The server's words (`publication "x" does not exist`).
        message: String,
    },
    /// The source is not the server the checkpoint came from, or its history
    /// no longer holds the checkpoint: its positions do not continue the
    /// store's, and streaming from the checkpoint would skip changes.
    #[error(
        "source {source_name}: the server is not the one the checkpoint ({checkpoint}) came from: {what}. Its \
         positions do not continue the ones the store holds, so streaming from the checkpoint would skip changes. \
         To re-snapshot the source: DELETE FROM tributary.checkpoints WHERE source = '{source_name}'; then start \
         tributary run again, and run tributary reconcile --repair to remove what the store holds that the source \
         no longer has"
    )]
    NewGeneration {
        /// Source name.
        source_name: String,
        /// Stored checkpoint.
        checkpoint: Lsn,
        /// What differs.
        what: String,
    },
    /// A mapped column is generated: pgoutput does not publish it.
    #[error("source {source_name}: {}", generated_column_text(.table, .column, .expression))]
    GeneratedColumn {
        /// Source name.
        source_name: String,
        /// `schema.table`.
        table: String,
        /// The column.
        column: String,
        /// What it is computed from.
        expression: String,
    },
    /// The server is older than Tributary supports.
    #[error(
        "source {source_name}: PostgreSQL {version} is not supported; {}",
        server_version_fix()
    )]
    ServerVersion {
        /// Source name.
        source_name: String,
        /// `server_version_num` / 10000 (or 100 before 10).
        version: String,
    },
    /// The slot the checkpoint refers to is gone: changes may have been lost.
    #[error(
        "source {source_name}: replication slot {slot} is missing, but the store has a checkpoint at {checkpoint}; \
         changes after it may be lost. Tributary will not silently recreate the slot and skip the gap. To re-snapshot \
         the source: DELETE FROM tributary.checkpoints WHERE source = '{source_name}'; then start tributary run again"
    )]
    SlotLost {
        /// Source name.
        source_name: String,
        /// Slot name.
        slot: String,
        /// Stored checkpoint.
        checkpoint: Lsn,
    },
    /// The server invalidated the slot (WAL removed past `max_slot_wal_keep_size`).
    #[error(
        "source {source_name}: replication slot {slot} was invalidated by the server (wal_status = lost: the WAL it needed \
         was removed, see max_slot_wal_keep_size); changes after checkpoint {checkpoint} are gone. To re-snapshot the \
         source: DELETE FROM tributary.checkpoints WHERE source = '{source_name}'; then start tributary run again \
         (it drops the invalid slot and creates a new one)"
    )]
    SlotInvalidated {
        /// Source name.
        source_name: String,
        /// Slot name.
        slot: String,
        /// Stored checkpoint.
        checkpoint: Lsn,
    },
}

impl SourceError {
    /// What the retry policy ([`crate::retry`]) does about it.
    pub fn action(&self) -> crate::retry::Action {
        match self {
            SourceError::Wire { error, .. } => error.action(),
            SourceError::Query { error, .. } => crate::retry::sqlx_error(error),
            SourceError::Decode { .. }
            | SourceError::WalLevel { .. }
            | SourceError::ServerVersion { .. }
            | SourceError::PublicationDropped { .. }
            | SourceError::NewGeneration { .. }
            | SourceError::GeneratedColumn { .. }
            | SourceError::SlotLost { .. }
            | SourceError::SlotInvalidated { .. } => crate::retry::Action::Stop,
        }
    }
}

/// Why a mapped generated column is refused, and the fix: the words `check`
/// prints and `run` stops with.
pub fn generated_column_text(table: &str, column: &str, expression: &str) -> String {
    format!(
        "{column} of {table} is a generated column ({expression}); logical replication does not publish \
         generated columns, so every streamed change would lack it: map the columns it is computed from instead"
    )
}

/// The mapped columns of `src` that are generated, as `(table, column,
/// expression)`: `run` stops with the first ([`SourceError::GeneratedColumn`]),
/// `check` fails on each, both in [`generated_column_text`]'s words.
pub async fn generated_columns(
    conn: &mut PgConnection,
    src: &SourceConfig,
) -> Result<Vec<(String, String, String)>, sqlx::Error> {
    let mut out = Vec::new();
    for t in &src.tables {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "select a.attname::text, pg_get_expr(d.adbin, d.adrelid)
               from pg_attribute a
               join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
              where a.attrelid = to_regclass($1) and a.attgenerated <> '' and a.attname = any($2)
              order by a.attnum",
        )
        .bind(format!(
            "{}.{}",
            quote_ident(&t.schema),
            quote_ident(&t.name)
        ))
        .bind(
            t.mapped_columns()
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *conn)
        .await?;
        out.extend(
            rows.into_iter()
                .map(|(column, expression)| (t.qualified.clone(), column, expression)),
        );
    }
    Ok(out)
}

/// The primary-key columns of the mapped tables whose replica identity is
/// FULL, by `schema.table` (see `Decoder::set_full_identity_keys`).
async fn full_identity_keys(
    conn: &mut PgConn,
    src: &SourceConfig,
) -> Result<HashMap<String, Vec<String>>, SourceError> {
    let tables: Vec<String> = src
        .tables
        .iter()
        .map(|t| quote_literal(&t.qualified))
        .collect();
    let rows = conn
        .simple_query(&format!(
            "select n.nspname || '.' || c.relname, a.attname
               from pg_class c
               join pg_namespace n on n.oid = c.relnamespace
               join pg_index i on i.indrelid = c.oid and i.indisprimary
               join pg_attribute a on a.attrelid = c.oid and a.attnum = any(i.indkey)
              where c.relreplident = 'f' and n.nspname || '.' || c.relname in ({})",
            tables.join(", ")
        ))
        .await
        .map_err(|error| SourceError::Wire {
            source_name: src.name.clone(),
            error,
        })?;
    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        if let [Some(table), Some(column)] = row.as_slice() {
            keys.entry(table.clone()).or_default().push(column.clone());
        }
    }
    Ok(keys)
}

/// In a timeline history file (lines `parentTLI<tab>switchpoint<tab>reason`),
/// the position at which the history left timeline `from`.
pub fn switch_point_in(history: &str, from: i64) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let parent: i64 = parts.next()?.parse().ok()?;
        let at: Lsn = parts.next()?.parse().ok()?;
        (parent == from).then_some(at)
    })
}

/// Whether the server a source now is (`system_id`, `timeline`, current WAL
/// end `wal_end`, and where its history left the stored timeline) can stream
/// on from `checkpoint`, recorded on `stored`; the error says what differs.
pub fn same_generation(
    source_name: &str,
    checkpoint: Lsn,
    stored: Option<&(String, i64)>,
    now: (&str, i64, Lsn),
    left_stored_timeline_at: Option<Lsn>,
) -> Result<(), SourceError> {
    let (system_id, timeline, wal_end) = now;
    let differs = |what: String| SourceError::NewGeneration {
        source_name: source_name.to_owned(),
        checkpoint,
        what,
    };
    if let Some((stored_id, stored_tli)) = stored {
        if stored_id != system_id {
            return Err(differs(format!(
                "its system identifier is {system_id}, the checkpoint's server had {stored_id} (a restore from \
                 another cluster, or a move to a new server)"
            )));
        }
        if *stored_tli != timeline {
            match left_stored_timeline_at {
                Some(at) if at >= checkpoint => {}
                Some(at) => {
                    return Err(differs(format!(
                        "it is on timeline {timeline}, which left timeline {stored_tli} at {at}, before the \
                         checkpoint (a failover to a standby that was behind, or a point-in-time restore)"
                    )))
                }
                None => {
                    return Err(differs(format!(
                        "it is on timeline {timeline}, whose history does not say where it left timeline \
                         {stored_tli}"
                    )))
                }
            }
        }
    }
    if wal_end < checkpoint {
        return Err(differs(format!(
            "its WAL ends at {wal_end}, before the checkpoint (a restore to an earlier point)"
        )));
    }
    Ok(())
}

/// The oldest PostgreSQL major version a source may run. `run` needs pgoutput's
/// protocol version 2 (large transactions streamed while in progress) and its
/// `messages` option (the heartbeats that move an idle source's slot), both
/// new in 14; `check` and `run` refuse anything older with the same words.
pub const MIN_SERVER_MAJOR: i32 = 14;

fn server_version_fix() -> String {
    format!("Tributary needs PostgreSQL {MIN_SERVER_MAJOR} or newer (pgoutput protocol version 2 and its messages option); upgrade the server")
}

/// `server_version_num` as a major version for messages (`150004` → `15`, `90624` → `9.6`).
pub fn server_major_of(version_num: i32) -> String {
    if version_num >= 100_000 {
        (version_num / 10_000).to_string()
    } else {
        format!("{}.{}", version_num / 10_000, version_num / 100 % 100)
    }
}

/// Whether a source server of `server_version_num` is supported; the error
/// names the fix. The one rule `check` and `run` both apply.
pub fn supported_server(source_name: &str, version_num: i32) -> Result<(), SourceError> {
    if version_num >= MIN_SERVER_MAJOR * 10_000 {
        Ok(())
    } else {
        Err(SourceError::ServerVersion {
            source_name: source_name.to_owned(),
            version: server_major_of(version_num),
        })
    }
}

/// Quotes an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Wraps a query error with the source's name and what was being done.
pub(crate) fn query_err(src: &SourceConfig, what: &str) -> impl FnOnce(sqlx::Error) -> SourceError {
    let (source_name, what) = (src.name.clone(), what.to_owned());
    move |error| SourceError::Query {
        source_name,
        what,
        error,
    }
}

/// An ordinary (non-replication) connection to the source, with the locked
/// search path (`crate::conninfo::SOURCE_SEARCH_PATH`).
pub async fn query_conn(src: &SourceConfig) -> Result<PgConnection, SourceError> {
    PgConnection::connect_with(&src.conn.source_options())
        .await
        .map_err(query_err(src, &format!("connect to {}", src.conn)))
}

/// Checks `wal_level` and creates the publication for the mapped tables if it
/// does not exist; adds mapped tables an existing publication lacks and
/// returns them (their changes were not streamed while they were out of it).
pub async fn ensure_publication(src: &SourceConfig) -> Result<Vec<String>, SourceError> {
    let mut added = Vec::new();
    let mut conn = query_conn(src).await?;
    let (wal_level, version_num): (String, i32) = sqlx::query_as(
        "select current_setting('wal_level'), current_setting('server_version_num')::int",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(query_err(src, "read wal_level and server_version_num"))?;
    supported_server(&src.name, version_num)?;
    if let Some((table, column, expression)) = generated_columns(&mut conn, src)
        .await
        .map_err(query_err(src, "look up generated columns"))?
        .into_iter()
        .next()
    {
        return Err(SourceError::GeneratedColumn {
            source_name: src.name.clone(),
            table,
            column,
            expression,
        });
    }
    if wal_level != "logical" {
        return Err(SourceError::WalLevel {
            source_name: src.name.clone(),
            wal_level,
        });
    }
    let tables: Vec<String> = src
        .tables
        .iter()
        .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
        .collect();
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_publication where pubname = $1)")
            .bind(&src.publication)
            .fetch_one(&mut conn)
            .await
            .map_err(query_err(src, "look up publication"))?;
    if !exists {
        // A partitioned table's changes are published under its own name, not
        // its leaf partitions' (which no mapping names: they would be dropped,
        // and the publication would never list the table itself).
        let sql = format!(
            "create publication {} for table {} with (publish_via_partition_root = true)",
            quote_ident(&src.publication),
            tables.join(", ")
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(query_err(src, "create publication"))?;
        tracing::info!(source = %src.name, publication = %src.publication, "created publication");
    } else {
        // An existing publication that publishes a mapped partitioned table
        // under its partitions' names is switched to the table's own name.
        let (via_root, partitioned): (bool, Vec<String>) = (
            sqlx::query_scalar("select pubviaroot from pg_publication where pubname = $1")
                .bind(&src.publication)
                .fetch_one(&mut conn)
                .await
                .map_err(query_err(src, "read publish_via_partition_root"))?,
            sqlx::query_scalar(
                "select n.nspname || '.' || c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  where c.relkind = 'p' and n.nspname || '.' || c.relname = any($1)",
            )
            .bind(src.tables.iter().map(|t| t.qualified.clone()).collect::<Vec<_>>())
            .fetch_all(&mut conn)
            .await
            .map_err(query_err(src, "look up partitioned tables"))?,
        );
        if !via_root && !partitioned.is_empty() {
            let sql = format!(
                "alter publication {} set (publish_via_partition_root = true)",
                quote_ident(&src.publication)
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .map_err(query_err(
                    src,
                    "set publish_via_partition_root on the publication",
                ))?;
            tracing::info!(source = %src.name, publication = %src.publication, tables = ?partitioned,
                "publication now publishes partitioned tables under their own names");
        }
        let present: Vec<String> = sqlx::query_scalar(
            "select schemaname || '.' || tablename from pg_publication_tables where pubname = $1",
        )
        .bind(&src.publication)
        .fetch_all(&mut conn)
        .await
        .map_err(query_err(src, "list publication tables"))?;
        for (t, quoted) in src.tables.iter().zip(&tables) {
            if !present.contains(&t.qualified) {
                let sql = format!(
                    "alter publication {} add table {quoted}",
                    quote_ident(&src.publication)
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .map_err(query_err(src, "add table to publication"))?;
                tracing::info!(source = %src.name, table = %t.qualified, "added table to publication");
                added.push(t.qualified.clone());
            }
        }
    }
    conn.close().await.ok();
    Ok(added)
}

/// Writes a non-transactional logical message into the source's WAL. An idle
/// database then still has something in its own WAL for the slot to decode and
/// confirm, so the slot advances even when keepalives alone would not move it.
pub async fn heartbeat(src: &SourceConfig) -> Result<(), SourceError> {
    let mut conn = query_conn(src).await?;
    sqlx::query("select pg_logical_emit_message(false, 'tributary', 'heartbeat')")
        .execute(&mut conn)
        .await
        .map_err(query_err(src, "emit a heartbeat message"))?;
    conn.close().await.ok();
    Ok(())
}

/// The slot as the server sees it.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    /// `confirmed_flush_lsn`.
    pub confirmed_flush: Lsn,
    /// Someone is streaming from it.
    pub active: bool,
    /// `wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of
    /// invalidation (`safe_wal_size`; None without `max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
    /// WAL the server keeps for the slot: current WAL position − `restart_lsn`.
    pub wal_retained_bytes: Option<i64>,
}

/// Looks the slot up; None when it does not exist.
pub async fn slot_info(src: &SourceConfig) -> Result<Option<SlotInfo>, SourceError> {
    let mut conn = query_conn(src).await?;
    #[derive(sqlx::FromRow)]
    struct Row {
        confirmed_flush_lsn: Option<String>,
        active: bool,
        wal_status: Option<String>,
        safe_wal_size: Option<i64>,
        wal_retained_bytes: Option<i64>,
    }
    let row: Option<Row> = sqlx::query_as(
        "select confirmed_flush_lsn::text, active, wal_status, safe_wal_size,
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint as wal_retained_bytes
           from pg_replication_slots where slot_name = $1",
    )
    .bind(&src.slot)
    .fetch_optional(&mut conn)
    .await
    .map_err(query_err(src, "look up slot"))?;
    conn.close().await.ok();
    Ok(row.map(|r| SlotInfo {
        confirmed_flush: r
            .confirmed_flush_lsn
            .and_then(|l| l.parse().ok())
            .unwrap_or_default(),
        active: r.active,
        wal_status: r.wal_status,
        safe_wal_size: r.safe_wal_size,
        wal_retained_bytes: r.wal_retained_bytes,
    }))
}

/// A slot just created, with the snapshot that matches its consistent point.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    /// First LSN the slot will stream.
    pub consistent_point: Lsn,
    /// Exported snapshot name, usable while the creating connection stays idle.
    pub snapshot_name: String,
}

/// What the stream yields.
#[derive(Debug)]
pub enum StreamItem {
    /// Decoded pgoutput messages (usually one).
    Decoded(Vec<Decoded>),
    /// A keepalive; the caller answers it via [`Replication::send_status`].
    Keepalive {
        /// Server WAL position sent so far.
        wal_end: Lsn,
        /// Reply requested.
        reply: bool,
    },
}

/// A replication connection to one source.
pub struct Replication {
    source: String,
    conn: PgConn,
    decoder: Decoder,
    last_status: Instant,
    bytes_received: metrics::Counter,
}

impl Replication {
    /// Opens a logical replication connection.
    pub async fn connect(src: &SourceConfig) -> Result<Replication, SourceError> {
        let mut conn =
            PgConn::connect(&src.conn, true)
                .await
                .map_err(|error| SourceError::Wire {
                    source_name: src.name.clone(),
                    error,
                })?;
        if conn.params.get("server_encoding").map(String::as_str) == Some("SQL_ASCII") {
            // pgoutput converts values to the client's encoding, and from
            // SQL_ASCII that means checking them: one value that is not UTF-8
            // would end the stream at the same place on every reconnect. As
            // sent, such a value fails only its row (a dead letter).
            conn.simple_query("SET client_encoding = 'SQL_ASCII'")
                .await
                .map_err(|error| SourceError::Wire {
                    source_name: src.name.clone(),
                    error,
                })?;
        }
        let mut decoder = Decoder::new(&src.name);
        decoder.set_full_identity_keys(full_identity_keys(&mut conn, src).await?);
        Ok(Replication {
            source: src.name.clone(),
            conn,
            decoder,
            last_status: Instant::now(),
            bytes_received: metrics::counter!(crate::metrics::BYTES_RECEIVED, "source" => src.name.clone()),
        })
    }

    fn wire(&self, error: PgWireError) -> SourceError {
        if let PgWireError::Server(e) = &error {
            // pgoutput looks the publication up by name in the catalog as of
            // each change: once dropped, every later change fails to decode.
            if e.code == "42704" && e.message.starts_with("publication ") {
                return SourceError::PublicationDropped {
                    source_name: self.source.clone(),
                    message: e.message.clone(),
                };
            }
        }
        SourceError::Wire {
            source_name: self.source.clone(),
            error,
        }
    }

    /// `CREATE_REPLICATION_SLOT ... LOGICAL pgoutput EXPORT_SNAPSHOT`.
    pub async fn create_slot(&mut self, slot: &str) -> Result<CreatedSlot, SourceError> {
        let rows = self
            .conn
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(slot)
            ))
            .await
            .map_err(|e| self.wire(e))?;
        let row = rows.first().ok_or_else(|| {
            self.wire(PgWireError::Protocol(
                "CREATE_REPLICATION_SLOT returned no row".into(),
            ))
        })?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let consistent_point = get(1).parse().map_err(|_| {
            self.wire(PgWireError::Protocol(format!(
                "bad consistent point {:?}",
                get(1)
            )))
        })?;
        tracing::info!(source = %self.source, slot, lsn = %consistent_point, "created replication slot");
        Ok(CreatedSlot {
            consistent_point,
            snapshot_name: get(2),
        })
    }

    /// Drops a slot (used only for a slot whose initial snapshot never completed).
    pub async fn drop_slot(&mut self, slot: &str) -> Result<(), SourceError> {
        self.conn
            .simple_query(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(slot)))
            .await
            .map_err(|e| self.wire(e))?;
        Ok(())
    }

    /// `IDENTIFY_SYSTEM`: the server's system identifier, timeline and
    /// current WAL position.
    pub async fn identify(&mut self) -> Result<(String, i64, Lsn), SourceError> {
        let rows = self
            .conn
            .simple_query("IDENTIFY_SYSTEM")
            .await
            .map_err(|e| self.wire(e))?;
        let row = rows.first().ok_or_else(|| {
            self.wire(PgWireError::Protocol(
                "IDENTIFY_SYSTEM returned no row".into(),
            ))
        })?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok((
            field(0),
            field(1).parse().unwrap_or(0),
            field(2).parse().unwrap_or_default(),
        ))
    }

    /// Where timeline `tli`'s history left timeline `from` (`TIMELINE_HISTORY`),
    /// None when the history does not name it.
    pub async fn switch_point(&mut self, tli: i64, from: i64) -> Result<Option<Lsn>, SourceError> {
        let rows = self
            .conn
            .simple_query(&format!("TIMELINE_HISTORY {tli}"))
            .await
            .map_err(|e| self.wire(e))?;
        let content = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .unwrap_or_default();
        Ok(switch_point_in(&content, from))
    }

    /// `START_REPLICATION` from `from` (the stored checkpoint), pgoutput
    /// protocol version 2 with `streaming 'on'`: large transactions arrive in
    /// chunks while in progress instead of being spilled by the server and sent
    /// at commit ([`MIN_SERVER_MAJOR`] is the first version that has it).
    pub async fn start(
        &mut self,
        slot: &str,
        publication: &str,
        from: Lsn,
    ) -> Result<(), SourceError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '2', streaming 'on', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication))
        );
        self.conn
            .start_replication(&sql)
            .await
            .map_err(|e| self.wire(e))?;
        tracing::info!(source = %self.source, slot, from = %from, protocol = 2, "streaming");
        Ok(())
    }

    /// The next item of the stream (cancel-safe).
    pub async fn next(&mut self) -> Result<StreamItem, SourceError> {
        match self.conn.recv_copy().await.map_err(|e| self.wire(e))? {
            CopyMessage::XLogData { start, data, .. } => {
                self.bytes_received.increment(data.len() as u64);
                let decoded =
                    self.decoder
                        .decode(start, data)
                        .map_err(|error| SourceError::Decode {
                            source_name: self.source.clone(),
                            lsn: start,
                            error,
                        })?;
                Ok(StreamItem::Decoded(decoded))
            }
            CopyMessage::Keepalive { wal_end, reply } => {
                Ok(StreamItem::Keepalive { wal_end, reply })
            }
            CopyMessage::Done => Err(self.wire(PgWireError::Io {
                target: self.source.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server ended the replication stream",
                ),
            })),
        }
    }

    /// Reports `flushed` to the server (only ever what the store committed).
    pub async fn send_status(&mut self, flushed: Lsn) -> Result<(), SourceError> {
        self.last_status = Instant::now();
        self.conn
            .send_status(flushed, false)
            .await
            .map_err(|e| self.wire(e))
    }

    /// Time since the last status update.
    pub fn since_status(&self) -> Duration {
        self.last_status.elapsed()
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new server, a history that left the stored timeline before the
    /// checkpoint, or a WAL that ends before it: each stops with what differs
    /// and the fix; a promotion after the checkpoint is followed.
    #[test]
    fn a_source_whose_positions_do_not_continue_the_checkpoint_is_refused() {
        let cp: Lsn = "0/5000000".parse().unwrap();
        let stored = ("7000000000000000001".to_owned(), 1);
        let at = |s: &str| s.parse::<Lsn>().unwrap();
        let ok = |now, left| same_generation("crm", cp, Some(&stored), now, left).is_ok();
        assert!(ok((stored.0.as_str(), 1, at("0/6000000")), None));
        assert!(same_generation("crm", cp, None, ("1", 1, at("0/6000000")), None).is_ok());
        assert!(ok(
            (stored.0.as_str(), 2, at("0/6000000")),
            Some(at("0/5000000"))
        ));
        for (now, left, says) in [
            (
                ("7000000000000000002", 1, at("0/6000000")),
                None,
                "system identifier",
            ),
            (
                (stored.0.as_str(), 2, at("0/6000000")),
                Some(at("0/4000000")),
                "left timeline 1 at 0/4000000",
            ),
            (
                (stored.0.as_str(), 2, at("0/6000000")),
                None,
                "does not say",
            ),
            (
                (stored.0.as_str(), 1, at("0/4000000")),
                None,
                "WAL ends at 0/4000000",
            ),
        ] {
            let e = same_generation("crm", cp, Some(&stored), now, left).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(says) && text.contains("DELETE FROM tributary.checkpoints"),
                "{text}"
            );
            assert_eq!(e.action(), crate::retry::Action::Stop);
        }
        assert_eq!(
            switch_point_in(
                "1\t0/3000000\tno recovery target specified\n2\t0/4A00000\tx\n",
                2
            ),
            Some(at("0/4A00000"))
        );
        assert_eq!(switch_point_in("1\t0/3000000\tx\n", 3), None);
    }

    /// `check` and `run` apply this one rule: the same servers refused, with
    /// the same words and the same fix, and `run` stops instead of retrying.
    #[test]
    fn check_and_run_refuse_the_same_servers_with_the_same_fix() {
        for ok in [140_000, 140_013, 150_004, 170_000] {
            assert!(supported_server("crm", ok).is_ok(), "{ok}");
        }
        for (old, shown) in [(130_011, "13"), (100_023, "10"), (90_624, "9.6")] {
            let e = supported_server("crm", old).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&format!("PostgreSQL {shown} is not supported"))
                    && text.contains("PostgreSQL 14 or newer"),
                "{text}"
            );
            assert_eq!(e.action(), crate::retry::Action::Stop);
        }
    }
}
