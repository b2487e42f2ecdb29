//! pgoutput, the built-in logical decoding output plugin: its messages parsed
//! from bytes ([`parse`]), and the [`Decoder`] that keeps the relation cache
//! and turns row messages into [`ChangeEvent`]s.
//!
//! Parsing never panics: every read is bounds-checked and a short or malformed
//! message is a [`DecodeError`].
//!
//! Unchanged TOAST (`u` in a tuple) means "this large value did not change and
//! was not sent". It is kept out of the row image and listed in
//! `ChangeEvent::unchanged`, so the merge keeps the value it already has.

pub mod value;

use std::collections::HashMap;

use bytes::{Buf, Bytes};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value};

use crate::event::{ChangeEvent, Lsn, Op};

/// A malformed pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended early.
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    /// Unknown message or tuple tag.
    #[error("unknown pgoutput {what} tag {tag:#04x}")]
    UnknownTag {
        /// Which kind of tag.
        what: &'static str,
        /// The byte.
        tag: u8,
    },
    /// A row message for a relation never announced.
    #[error("row for unknown relation oid {0} (no Relation message seen)")]
    UnknownRelation(u32),
    /// A row change outside Begin..Commit.
    #[error("row change outside a transaction")]
    OutsideTransaction,
    /// Tuple width does not match the relation.
    #[error("tuple has {got} columns, relation {relation} has {want}")]
    Width {
        /// Relation name.
        relation: String,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the relation.
        want: usize,
    },
    /// Text that is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// Unchanged TOASTed value: not sent, same as before.
    Unchanged,
    /// Text format.
    Text(Bytes),
    /// Binary format (not requested by Tributary, kept for completeness).
    Binary(Bytes),
}

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (key).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
}

/// A relation (table) as announced by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID.
    pub id: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting (`d`, `n`, `f`, `i`).
    pub replica_identity: u8,
    /// Columns in order.
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// A parsed pgoutput message (protocol version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Transaction start.
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time (µs since 2000-01-01).
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// Transaction end.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the resume point.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: i64,
    },
    /// Replication origin of the transaction.
    Origin {
        /// Origin LSN.
        lsn: Lsn,
        /// Origin name.
        name: String,
    },
    /// Schema of a relation.
    Relation(Relation),
    /// A data type.
    Type {
        /// Type OID.
        id: u32,
        /// Schema.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Row inserted.
    Insert {
        /// Relation OID.
        relation: u32,
        /// New row.
        new: Vec<TupleValue>,
    },
    /// Row updated.
    Update {
        /// Relation OID.
        relation: u32,
        /// Old key (`K`) or old row (`O`), when sent.
        old: Option<Vec<TupleValue>>,
        /// New row.
        new: Vec<TupleValue>,
    },
    /// Row deleted.
    Delete {
        /// Relation OID.
        relation: u32,
        /// Old key or old row.
        old: Vec<TupleValue>,
    },
    /// Tables truncated.
    Truncate {
        /// Option bits (cascade, restart identity).
        options: u8,
        /// Relation OIDs.
        relations: Vec<u32>,
    },
    /// Protocol v2: the following messages belong to in-progress transaction `xid`.
    StreamStart {
        /// Top-level transaction id.
        xid: u32,
        /// First block of this transaction?
        first: bool,
    },
    /// Protocol v2: end of a block of streamed changes.
    StreamStop,
    /// Protocol v2: a streamed transaction committed.
    StreamCommit {
        /// Top-level transaction id.
        xid: u32,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the resume point.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: i64,
    },
    /// Protocol v2: a streamed transaction (`subxid == xid`) or one of its
    /// subtransactions aborted.
    StreamAbort {
        /// Top-level transaction id.
        xid: u32,
        /// Aborted (sub)transaction id.
        subxid: u32,
    },
    /// Logical decoding message (`pg_logical_emit_message`).
    LogicalMessage {
        /// Transactional?
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Prefix.
        prefix: String,
        /// Payload.
        content: Bytes,
    },
}

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<(), DecodeError> {
        if self.0.remaining() < n {
            Err(DecodeError::Truncated(what))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.need(2, what)?;
        Ok(self.0.get_i16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.need(4, what)?;
        Ok(self.0.get_i32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.need(8, what)?;
        Ok(self.0.get_i64())
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = self.0.split_to(end);
        self.0.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::Utf8(what))
    }
    fn tuple(&mut self) -> Result<Vec<TupleValue>, DecodeError> {
        let n = self.i16("tuple width")?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated("tuple width"))?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(match self.u8("tuple value kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                k @ (b't' | b'b') => {
                    let len = self.i32("value length")?;
                    let len =
                        usize::try_from(len).map_err(|_| DecodeError::Truncated("value length"))?;
                    let v = self.bytes(len, "value")?;
                    if k == b't' {
                        TupleValue::Text(v)
                    } else {
                        TupleValue::Binary(v)
                    }
                }
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "tuple value",
                        tag,
                    })
                }
            });
        }
        Ok(out)
    }
}

/// Parses one pgoutput message. Inside a stream block (protocol v2, between
/// Stream Start and Stream Stop) row, relation, type and logical messages carry
/// the (sub)transaction id first; it is returned beside the message.
pub fn parse(data: Bytes, in_stream: bool) -> Result<(Option<u32>, Message), DecodeError> {
    let mut r = Reader(data);
    let tag = r.u8("message tag")?;
    let xid = if in_stream && matches!(tag, b'R' | b'Y' | b'I' | b'U' | b'D' | b'T' | b'M') {
        Some(r.u32("stream xid")?)
    } else {
        None
    };
    let msg = match tag {
        b'S' => Message::StreamStart {
            xid: r.u32("stream xid")?,
            first: r.u8("first segment")? == 1,
        },
        b'E' => Message::StreamStop,
        b'c' => {
            let xid = r.u32("stream xid")?;
            let _flags = r.u8("commit flags")?;
            Message::StreamCommit {
                xid,
                commit_lsn: Lsn(r.u64("commit lsn")?),
                end_lsn: Lsn(r.u64("end lsn")?),
                commit_time: r.i64("commit time")?,
            }
        }
        b'A' => Message::StreamAbort {
            xid: r.u32("stream xid")?,
            subxid: r.u32("stream subxid")?,
        },
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("final lsn")?),
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => {
            let _flags = r.u8("commit flags")?;
            Message::Commit {
                commit_lsn: Lsn(r.u64("commit lsn")?),
                end_lsn: Lsn(r.u64("end lsn")?),
                commit_time: r.i64("commit time")?,
            }
        }
        b'O' => Message::Origin {
            lsn: Lsn(r.u64("origin lsn")?),
            name: r.cstr("origin name")?,
        },
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.cstr("namespace")?;
            let name = r.cstr("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = usize::try_from(r.i16("column count")?)
                .map_err(|_| DecodeError::Truncated("column count"))?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name: r.cstr("column name")?,
                    type_oid: r.u32("type oid")?,
                    type_mod: r.i32("type modifier")?,
                });
            }
            Message::Relation(Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            id: r.u32("type id")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation id")?;
            match r.u8("insert tuple tag")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "insert tuple",
                        tag,
                    })
                }
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let (old, new) = match r.u8("update tuple tag")? {
                b'K' | b'O' => {
                    let old = r.tuple()?;
                    match r.u8("update new tuple tag")? {
                        b'N' => (Some(old), r.tuple()?),
                        tag => {
                            return Err(DecodeError::UnknownTag {
                                what: "update new tuple",
                                tag,
                            })
                        }
                    }
                }
                b'N' => (None, r.tuple()?),
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "update tuple",
                        tag,
                    })
                }
            };
            Message::Update { relation, old, new }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            match r.u8("delete tuple tag")? {
                b'K' | b'O' => Message::Delete {
                    relation,
                    old: r.tuple()?,
                },
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "delete tuple",
                        tag,
                    })
                }
            }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::new();
            for _ in 0..n {
                relations.push(r.u32("truncated relation")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = Lsn(r.u64("message lsn")?);
            let prefix = r.cstr("message prefix")?;
            let len = usize::try_from(r.u32("message length")?)
                .map_err(|_| DecodeError::Truncated("message length"))?;
            Message::LogicalMessage {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "message",
                tag,
            })
        }
    };
    Ok((xid, msg))
}

/// PostgreSQL timestamp (µs since 2000-01-01 UTC) → UTC time.
pub fn pg_time(us: i64) -> DateTime<Utc> {
    const PG_EPOCH_UNIX_S: i64 = 946_684_800;
    Utc.timestamp_opt(
        PG_EPOCH_UNIX_S + us.div_euclid(1_000_000),
        u32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    )
    .single()
    .unwrap_or_default()
}

/// What the decoder hands to the source loop.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A transaction started.
    Begin {
        /// Transaction id.
        xid: u32,
    },
    /// A row change (inside a transaction).
    Change(ChangeEvent),
    /// The transaction committed; resume after `end_lsn`.
    Commit {
        /// Commit record LSN.
        commit_lsn: Lsn,
        /// End of the commit record.
        end_lsn: Lsn,
    },
    /// A logical decoding message (heartbeats, watermarks).
    Message {
        /// Prefix.
        prefix: String,
        /// Payload.
        content: Bytes,
    },
    /// Protocol v2: changes of in-progress transaction `xid` follow.
    StreamStart {
        /// Top-level transaction id.
        xid: u32,
    },
    /// Protocol v2: end of a block of streamed changes.
    StreamStop,
    /// Protocol v2: streamed transaction `xid` committed.
    StreamCommit {
        /// Top-level transaction id.
        xid: u32,
        /// Commit record LSN.
        commit_lsn: Lsn,
        /// End of the commit record.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: DateTime<Utc>,
    },
    /// Protocol v2: transaction `xid` (when `subxid == xid`) or subtransaction
    /// `subxid` aborted: drop its changes.
    StreamAbort {
        /// Top-level transaction id.
        xid: u32,
        /// Aborted (sub)transaction.
        subxid: u32,
    },
    /// Nothing for the caller (Relation, Type, Origin).
    Nothing,
}

/// A tuple split into (key columns, row image without unchanged values, unchanged columns).
/// (key columns, row image without unchanged values, unchanged columns,
/// unreadable columns with why).
type Image = (
    Map<String, Value>,
    Map<String, Value>,
    Vec<String>,
    Vec<(String, String)>,
);

struct OpenTxn {
    xid: u32,
    final_lsn: Lsn,
    commit_time: DateTime<Utc>,
    seq: u64,
}

/// Stateful pgoutput decoder for one source: relation cache and the open transaction.
pub struct Decoder {
    source: String,
    relations: HashMap<u32, Relation>,
    /// Primary-key columns of tables with `REPLICA IDENTITY FULL`, by
    /// `schema.table`: pgoutput flags every column of such a table as key,
    /// and the row's key is its primary key all the same (as the snapshot
    /// reads it), not its whole image.
    full_identity_keys: HashMap<String, Vec<String>>,
    txn: Option<OpenTxn>,
    /// Inside a protocol v2 stream block of this transaction.
    stream: Option<u32>,
}

impl Decoder {
    /// A decoder for the named source.
    pub fn new(source: &str) -> Decoder {
        Decoder {
            source: source.to_owned(),
            relations: HashMap::new(),
            full_identity_keys: HashMap::new(),
            txn: None,
            stream: None,
        }
    }

    /// The primary keys of the `REPLICA IDENTITY FULL` tables that have one
    /// (see the field); applies to relations announced from now on.
    pub fn set_full_identity_keys(&mut self, keys: HashMap<String, Vec<String>>) {
        self.full_identity_keys = keys;
    }

    /// The relation with this OID, if announced.
    pub fn relation(&self, id: u32) -> Option<&Relation> {
        self.relations.get(&id)
    }

    /// Decodes one XLogData payload that starts at `lsn`. A row message can
    /// yield two events (a primary-key change is a delete of the old key and an
    /// insert of the new row), hence the Vec.
    pub fn decode(&mut self, lsn: Lsn, data: Bytes) -> Result<Vec<Decoded>, DecodeError> {
        let (sx, msg) = parse(data, self.stream.is_some())?;
        Ok(match msg {
            Message::StreamStart { xid, .. } => {
                self.stream = Some(xid);
                vec![Decoded::StreamStart { xid }]
            }
            Message::StreamStop => {
                self.stream = None;
                vec![Decoded::StreamStop]
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                vec![Decoded::StreamCommit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time: pg_time(commit_time),
                }]
            }
            Message::StreamAbort { xid, subxid } => vec![Decoded::StreamAbort { xid, subxid }],
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.txn = Some(OpenTxn {
                    xid,
                    final_lsn,
                    commit_time: pg_time(commit_time),
                    seq: 0,
                });
                vec![Decoded::Begin { xid }]
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                self.txn = None;
                vec![Decoded::Commit {
                    commit_lsn,
                    end_lsn,
                }]
            }
            Message::Relation(mut rel) => {
                if rel.replica_identity == b'f' {
                    if let Some(pk) = self.full_identity_keys.get(&rel.qualified()) {
                        for c in &mut rel.columns {
                            c.key = pk.contains(&c.name);
                        }
                    }
                }
                self.relations.insert(rel.id, rel);
                vec![Decoded::Nothing]
            }
            Message::Origin { .. } | Message::Type { .. } => vec![Decoded::Nothing],
            Message::LogicalMessage {
                prefix, content, ..
            } => vec![Decoded::Message { prefix, content }],
            Message::Insert { relation, new } => {
                let image = self.image(relation, &new)?;
                vec![self.change(sx, lsn, relation, Op::Insert, image)?]
            }
            Message::Update { relation, old, new } => {
                let (mut key, row, unchanged, unreadable) = self.image(relation, &new)?;
                let old_key = match &old {
                    Some(old) => Some(self.image(relation, old)?.0),
                    None => None,
                };
                // A key column not sent because it is an unchanged TOASTed
                // value (a FULL identity without a primary key) keeps the old
                // image's value: the key must not change because a value was
                // not sent.
                if let Some(old_key) = &old_key {
                    for c in &unchanged {
                        if let Some(v) = old_key.get(c) {
                            key.insert(c.clone(), v.clone());
                        }
                    }
                }
                match old_key {
                    // The key itself changed: the old row is gone, a new one exists.
                    Some(old_key) if !old_key.is_empty() && old_key != key => vec![
                        self.change(
                            sx,
                            lsn,
                            relation,
                            Op::Delete,
                            (old_key.clone(), old_key, Vec::new(), Vec::new()),
                        )?,
                        self.change(
                            sx,
                            lsn,
                            relation,
                            Op::Insert,
                            (key, row, unchanged, unreadable),
                        )?,
                    ],
                    _ => vec![self.change(
                        sx,
                        lsn,
                        relation,
                        Op::Update,
                        (key, row, unchanged, unreadable),
                    )?],
                }
            }
            Message::Delete { relation, old } => {
                let (key, row, _, unreadable) = self.image(relation, &old)?;
                vec![self.change(
                    sx,
                    lsn,
                    relation,
                    Op::Delete,
                    (key, row, Vec::new(), unreadable),
                )?]
            }
            Message::Truncate { relations, .. } => {
                let mut out = Vec::new();
                for relation in relations {
                    out.push(self.change(
                        sx,
                        lsn,
                        relation,
                        Op::Truncate,
                        (Map::new(), Map::new(), Vec::new(), Vec::new()),
                    )?);
                }
                out
            }
        })
    }

    /// Splits a tuple into (key columns, row image without unchanged values, unchanged columns).
    fn image(&self, relation: u32, tuple: &[TupleValue]) -> Result<Image, DecodeError> {
        let rel = self
            .relations
            .get(&relation)
            .ok_or(DecodeError::UnknownRelation(relation))?;
        if tuple.len() != rel.columns.len() {
            return Err(DecodeError::Width {
                relation: rel.qualified(),
                got: tuple.len(),
                want: rel.columns.len(),
            });
        }
        let mut key = Map::new();
        let mut row = Map::new();
        let mut unchanged = Vec::new();
        let mut unreadable = Vec::new();
        for (col, v) in rel.columns.iter().zip(tuple) {
            let json = match v {
                TupleValue::Null => Value::Null,
                TupleValue::Unchanged => {
                    unchanged.push(col.name.clone());
                    continue;
                }
                TupleValue::Text(b) => {
                    let (json, why) = value::bytes_to_json(col.type_oid, b);
                    if let Some(why) = why {
                        unreadable.push((col.name.clone(), why.to_owned()));
                    }
                    json
                }
                TupleValue::Binary(b) => {
                    Value::String(b.iter().map(|x| format!("{x:02x}")).collect())
                }
            };
            // In a `K` (key-only) tuple, non-key columns are sent as NULL and
            // not flagged as key. A key column is NULL only in a table whose
            // identity is every column (FULL without a primary key), and the
            // snapshot keeps its NULL in the key too.
            if col.key {
                key.insert(col.name.clone(), json.clone());
            }
            row.insert(col.name.clone(), json);
        }
        Ok((key, row, unchanged, unreadable))
    }

    fn change(
        &mut self,
        stream_xid: Option<u32>,
        lsn: Lsn,
        relation: u32,
        op: Op,
        image: Image,
    ) -> Result<Decoded, DecodeError> {
        let (key, row, unchanged, unreadable) = image;
        let table = self
            .relations
            .get(&relation)
            .ok_or(DecodeError::UnknownRelation(relation))?
            .qualified();
        // A streamed change learns its commit LSN, time and position in the
        // transaction only at Stream Commit; the source loop fills them in.
        let (xid, commit_lsn, seq, commit_time) = match stream_xid {
            Some(xid) => (xid, Lsn::ZERO, 0, DateTime::<Utc>::default()),
            None => {
                let txn = self.txn.as_mut().ok_or(DecodeError::OutsideTransaction)?;
                txn.seq += 1;
                (txn.xid, txn.final_lsn, txn.seq - 1, txn.commit_time)
            }
        };
        Ok(Decoded::Change(ChangeEvent {
            source: self.source.clone(),
            table,
            op,
            key,
            row,
            unchanged,
            unreadable,
            lsn,
            commit_lsn,
            seq,
            xid,
            commit_time,
        }))
    }
}

#[cfg(test)]
mod tests;
