//! The cache's entries in compact form: one allocation per entry instead of
//! the few dozen of a [`Contribution`] or a [`CachedProfile`] (strings, JSON
//! trees, B-tree nodes).
//!
//! Why: an entry as the merge core holds it is 1-2 KB, so the default budget
//! held about 10,000 rows, and dropping a generation of them was 8-15 % of
//! the daemon's CPU (`perf`, docs/design.md "Throughput"). Encoded, a row of
//! the benchmarks' tables is 60-150 bytes: the same budget holds about ten
//! times as many, and a dropped generation is one free per entry.
//!
//! The form: source, table, field, aggregate and identifier-kind names are
//! interned to small integers ([`Names`], per cache, never shrinking: they
//! come from the mapping, a bounded set); integers are LEB128 varints
//! (signed ones zigzagged); strings are a length and their UTF-8 bytes; JSON
//! values are a tag and their scalar or their elements (not their JSON text:
//! serde_json's parse of a float is not exact, which the property test
//! caught). The
//! merge core keeps its own types: an entry is decoded when a batch takes it
//! and encoded when the batch puts it back, and a property test proves that
//! decoding gives back exactly what was encoded.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashMapExt};
use serde_json::{Map, Number, Value};

use super::CachedProfile;
use crate::event::Lsn;
use crate::identity::Ident;
use crate::resolve::{AggState, Contribution, RowRef, Winner};

/// Interned names; see the module doc.
#[derive(Debug, Default)]
pub(super) struct Names {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Names {
    pub(super) fn new() -> Names {
        Names {
            ids: HashMap::new(),
            names: Vec::new(),
        }
    }

    /// The id of `name`, interning it.
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    /// The id of `name`, when interned.
    fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn name(&self, id: u64) -> Result<&str, Corrupt> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.names.get(i))
            .map(|n| &**n)
            .ok_or(Corrupt)
    }
}

/// An entry that does not decode: a bug in this module, never input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Corrupt;

/// Appends the encoded form of things to a buffer.
struct Writer<'n> {
    buf: Vec<u8>,
    names: &'n mut Names,
}

/// Appends `v` as a LEB128 varint.
fn put_uint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        #[allow(clippy::cast_possible_truncation)]
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    #[allow(clippy::cast_possible_truncation)]
    buf.push(v as u8);
}

impl Writer<'_> {
    fn uint(&mut self, v: u64) {
        put_uint(&mut self.buf, v);
    }

    fn int(&mut self, v: i64) {
        #[allow(clippy::cast_sign_loss)]
        self.uint(((v << 1) ^ (v >> 63)) as u64);
    }

    fn str(&mut self, s: &str) {
        self.uint(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }

    fn name(&mut self, s: &str) {
        let id = self.names.intern(s);
        self.uint(u64::from(id));
    }

    fn time(&mut self, t: &DateTime<Utc>) {
        self.int(t.timestamp());
        self.uint(u64::from(t.timestamp_subsec_nanos()));
    }

    fn number(&mut self, n: &Number) {
        if let Some(u) = n.as_u64() {
            self.buf.push(TAG_UINT);
            self.uint(u);
        } else if let Some(i) = n.as_i64() {
            self.buf.push(TAG_INT);
            self.int(i);
        } else {
            self.buf.push(TAG_FLOAT);
            let f = n.as_f64().unwrap_or_default();
            self.buf.extend_from_slice(&f.to_bits().to_le_bytes());
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.buf.push(TAG_NULL),
            Value::Bool(false) => self.buf.push(TAG_FALSE),
            Value::Bool(true) => self.buf.push(TAG_TRUE),
            Value::Number(n) => self.number(n),
            Value::String(s) => {
                self.buf.push(TAG_STRING);
                self.str(s);
            }
            Value::Array(a) => {
                self.buf.push(TAG_ARRAY);
                self.uint(a.len() as u64);
                for v in a {
                    self.value(v);
                }
            }
            Value::Object(o) => {
                self.buf.push(TAG_OBJECT);
                self.uint(o.len() as u64);
                for (k, v) in o {
                    self.str(k);
                    self.value(v);
                }
            }
        }
    }

    fn values<'a>(&mut self, m: impl ExactSizeIterator<Item = (&'a String, &'a Value)>) {
        self.uint(m.len() as u64);
        for (k, v) in m {
            self.name(k);
            self.value(v);
        }
    }

    fn row(&mut self, r: &RowRef) {
        self.name(&r.source);
        self.name(&r.table);
        self.str(&r.row_key);
    }

    fn winner(&mut self, w: &Winner) {
        self.value(&w.value);
        self.row(&w.row);
        self.time(&w.freshness);
        self.uint(w.lsn.0);
    }

    fn agg(&mut self, a: &AggState) {
        self.int(a.n);
        let flags =
            u8::from(a.s.is_some()) | (u8::from(a.v.is_some()) << 1) | (u8::from(a.stale) << 2);
        self.buf.push(flags);
        if let Some(s) = &a.s {
            self.number(s);
        }
        if let Some(v) = &a.v {
            self.value(v);
        }
    }

    fn finish(self) -> Box<[u8]> {
        self.buf.into_boxed_slice()
    }
}

const TAG_NULL: u8 = 0;
const TAG_FALSE: u8 = 1;
const TAG_TRUE: u8 = 2;
const TAG_UINT: u8 = 3;
const TAG_INT: u8 = 4;
const TAG_FLOAT: u8 = 5;
const TAG_STRING: u8 = 6;
const TAG_ARRAY: u8 = 7;
const TAG_OBJECT: u8 = 8;

/// Reads back what a [`Writer`] wrote.
struct Reader<'a, 'n> {
    buf: &'a [u8],
    names: &'n Names,
}

impl<'a> Reader<'a, '_> {
    fn byte(&mut self) -> Result<u8, Corrupt> {
        let (b, rest) = self.buf.split_first().ok_or(Corrupt)?;
        self.buf = rest;
        Ok(*b)
    }

    fn uint(&mut self) -> Result<u64, Corrupt> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Corrupt)
    }

    fn int(&mut self) -> Result<i64, Corrupt> {
        let u = self.uint()?;
        #[allow(clippy::cast_possible_wrap)]
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }

    fn len(&mut self) -> Result<usize, Corrupt> {
        usize::try_from(self.uint()?).map_err(|_| Corrupt)
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        if n > self.buf.len() {
            return Err(Corrupt);
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }

    fn str(&mut self) -> Result<&'a str, Corrupt> {
        let n = self.len()?;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| Corrupt)
    }

    fn name(&mut self) -> Result<String, Corrupt> {
        let id = self.uint()?;
        self.names.name(id).map(str::to_owned)
    }

    fn time(&mut self) -> Result<DateTime<Utc>, Corrupt> {
        let secs = self.int()?;
        let nanos = u32::try_from(self.uint()?).map_err(|_| Corrupt)?;
        DateTime::from_timestamp(secs, nanos).ok_or(Corrupt)
    }

    fn tagged_number(&mut self, tag: u8) -> Result<Number, Corrupt> {
        match tag {
            TAG_UINT => Ok(Number::from(self.uint()?)),
            TAG_INT => Ok(Number::from(self.int()?)),
            TAG_FLOAT => {
                let bits: [u8; 8] = self.bytes(8)?.try_into().map_err(|_| Corrupt)?;
                Number::from_f64(f64::from_bits(u64::from_le_bytes(bits))).ok_or(Corrupt)
            }
            _ => Err(Corrupt),
        }
    }

    fn number(&mut self) -> Result<Number, Corrupt> {
        let tag = self.byte()?;
        self.tagged_number(tag)
    }

    fn value(&mut self) -> Result<Value, Corrupt> {
        Ok(match self.byte()? {
            TAG_NULL => Value::Null,
            TAG_FALSE => Value::Bool(false),
            TAG_TRUE => Value::Bool(true),
            TAG_STRING => Value::String(self.str()?.to_owned()),
            TAG_ARRAY => {
                let n = self.len()?;
                Value::Array((0..n).map(|_| self.value()).collect::<Result<_, _>>()?)
            }
            TAG_OBJECT => {
                let n = self.len()?;
                Value::Object(
                    (0..n)
                        .map(|_| Ok((self.str()?.to_owned(), self.value()?)))
                        .collect::<Result<_, _>>()?,
                )
            }
            tag => Value::Number(self.tagged_number(tag)?),
        })
    }

    fn values<M: FromIterator<(String, Value)>>(&mut self) -> Result<M, Corrupt> {
        let n = self.len()?;
        (0..n).map(|_| Ok((self.name()?, self.value()?))).collect()
    }

    fn row(&mut self) -> Result<RowRef, Corrupt> {
        Ok(RowRef {
            source: self.name()?,
            table: self.name()?,
            row_key: self.str()?.to_owned(),
        })
    }

    fn winner(&mut self) -> Result<Winner, Corrupt> {
        Ok(Winner {
            value: self.value()?,
            row: self.row()?,
            freshness: self.time()?,
            lsn: Lsn(self.uint()?),
        })
    }

    fn agg(&mut self) -> Result<AggState, Corrupt> {
        let n = self.int()?;
        let flags = self.byte()?;
        let s = if flags & 1 != 0 {
            Some(self.number()?)
        } else {
            None
        };
        let v = if flags & 2 != 0 {
            Some(self.value()?)
        } else {
            None
        };
        Ok(AggState {
            n,
            s,
            v,
            stale: flags & 4 != 0,
        })
    }

    fn end(&self) -> Result<(), Corrupt> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Corrupt)
        }
    }
}

/// A key: one name or two, then the rest of the bytes.
fn key(ids: &[u32], rest: &str) -> Box<[u8]> {
    let mut w = Vec::with_capacity(ids.len() * 2 + rest.len());
    for id in ids {
        put_uint(&mut w, u64::from(*id));
    }
    w.extend_from_slice(rest.as_bytes());
    w.into_boxed_slice()
}

/// The key of a row, interning its names.
pub(super) fn row_key(names: &mut Names, r: &RowRef) -> Box<[u8]> {
    key(
        &[names.intern(&r.source), names.intern(&r.table)],
        &r.row_key,
    )
}

/// The key of a row, when its names are interned (else no entry has it).
pub(super) fn find_row_key(names: &Names, r: &RowRef) -> Option<Box<[u8]>> {
    Some(key(
        &[names.get(&r.source)?, names.get(&r.table)?],
        &r.row_key,
    ))
}

/// The key of an identifier, interning its kind.
pub(super) fn ident_key(names: &mut Names, i: &Ident) -> Box<[u8]> {
    key(&[names.intern(&i.0)], &i.1)
}

/// The key of an identifier, when its kind is interned.
pub(super) fn find_ident_key(names: &Names, i: &Ident) -> Option<Box<[u8]>> {
    Some(key(&[names.get(&i.0)?], &i.1))
}

/// Encodes a contribution (its row is the key).
pub(super) fn encode_contribution(names: &mut Names, c: &Contribution) -> Box<[u8]> {
    let mut w = Writer {
        buf: Vec::with_capacity(64),
        names,
    };
    let flags = u8::from(c.profile_id.is_some())
        | (u8::from(c.deleted) << 1)
        | (u8::from(c.version.is_some()) << 2)
        | (u8::from(c.digest.is_some()) << 3);
    w.buf.push(flags);
    if let Some(p) = c.profile_id {
        w.int(p);
    }
    if let Some(v) = c.version {
        w.int(v);
    }
    if let Some(d) = c.digest {
        w.buf.extend_from_slice(&d.to_le_bytes());
    }
    w.uint(c.identities.len() as u64);
    for (kind, value) in &c.identities {
        w.name(kind);
        w.str(value);
    }
    w.values(c.fields.iter());
    w.values(c.aggs.iter());
    w.uint(c.lsn.0);
    w.uint(c.seq);
    w.time(&c.freshness);
    w.int(i64::from(c.priority));
    w.finish()
}

/// Decodes a contribution of row `row`.
pub(super) fn decode_contribution(
    names: &Names,
    row: RowRef,
    buf: &[u8],
) -> Result<Contribution, Corrupt> {
    let mut r = Reader { buf, names };
    let flags = r.byte()?;
    let profile_id = if flags & 1 != 0 { Some(r.int()?) } else { None };
    let version = if flags & 4 != 0 { Some(r.int()?) } else { None };
    let digest = if flags & 8 != 0 {
        let b: [u8; 8] = r.bytes(8)?.try_into().map_err(|_| Corrupt)?;
        Some(i64::from_le_bytes(b))
    } else {
        None
    };
    let n = r.len()?;
    let identities = (0..n)
        .map(|_| Ok((r.name()?, r.str()?.to_owned())))
        .collect::<Result<Vec<Ident>, Corrupt>>()?;
    let fields = r.values()?;
    let aggs = r.values()?;
    let lsn = Lsn(r.uint()?);
    let seq = r.uint()?;
    let freshness = r.time()?;
    let priority = i32::try_from(r.int()?).map_err(|_| Corrupt)?;
    r.end()?;
    Ok(Contribution {
        row,
        profile_id,
        deleted: flags & 2 != 0,
        identities,
        fields,
        aggs,
        version,
        lsn,
        seq,
        freshness,
        priority,
        digest,
    })
}

/// Encodes a cached profile.
pub(super) fn encode_profile(names: &mut Names, p: &CachedProfile) -> Box<[u8]> {
    let mut w = Writer {
        buf: Vec::with_capacity(64),
        names,
    };
    let flags = u8::from(p.merged_into.is_some())
        | (u8::from(p.winners.is_some()) << 1)
        | (u8::from(p.field_rows.is_some()) << 2);
    w.buf.push(flags);
    if let Some(m) = p.merged_into {
        w.int(m);
    }
    w.uint(p.aggs.len() as u64);
    for (name, a) in &p.aggs {
        w.name(name);
        w.agg(a);
    }
    w.values(p.traits.iter());
    if let Some(winners) = &p.winners {
        w.uint(winners.len() as u64);
        for (field, winner) in winners {
            w.name(field);
            w.winner(winner);
        }
    }
    if let Some(rows) = &p.field_rows {
        w.uint(rows.len() as u64);
        for row in rows {
            w.row(row);
        }
    }
    w.finish()
}

/// Decodes a cached profile.
pub(super) fn decode_profile(names: &Names, buf: &[u8]) -> Result<CachedProfile, Corrupt> {
    let mut r = Reader { buf, names };
    let flags = r.byte()?;
    let merged_into = if flags & 1 != 0 { Some(r.int()?) } else { None };
    let n = r.len()?;
    let aggs = (0..n)
        .map(|_| Ok((r.name()?, r.agg()?)))
        .collect::<Result<BTreeMap<String, AggState>, Corrupt>>()?;
    let traits: Map<String, Value> = r.values()?;
    let winners = if flags & 2 != 0 {
        let n = r.len()?;
        Some(
            (0..n)
                .map(|_| Ok((r.name()?, r.winner()?)))
                .collect::<Result<BTreeMap<String, Winner>, Corrupt>>()?,
        )
    } else {
        None
    };
    let field_rows = if flags & 4 != 0 {
        let n = r.len()?;
        Some(
            (0..n)
                .map(|_| r.row())
                .collect::<Result<BTreeSet<RowRef>, Corrupt>>()?,
        )
    } else {
        None
    };
    r.end()?;
    Ok(CachedProfile {
        merged_into,
        aggs,
        traits,
        winners,
        field_rows,
    })
}

/// The row of a contribution's key.
#[cfg(test)]
fn decode_row_key(names: &Names, key: &[u8]) -> Result<RowRef, Corrupt> {
    let mut r = Reader { buf: key, names };
    let source = r.name()?;
    let table = r.name()?;
    let row_key = std::str::from_utf8(r.buf).map_err(|_| Corrupt)?.to_owned();
    Ok(RowRef {
        source,
        table,
        row_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("email".to_owned()),
            Just("name".to_owned()),
            Just("lifetime_value".to_owned()),
            "\\PC{0,12}",
        ]
    }

    use crate::strategies::{json_value as value, number};

    fn values() -> impl Strategy<Value = BTreeMap<String, Value>> {
        prop::collection::btree_map(name(), value(), 0..5)
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        (-62_000_000_000i64..250_000_000_000, 0u32..1_000_000_000)
            .prop_filter_map("in range", |(s, n)| DateTime::from_timestamp(s, n))
    }

    fn row() -> impl Strategy<Value = RowRef> {
        (name(), name(), "\\PC{0,30}").prop_map(|(source, table, row_key)| RowRef {
            source,
            table,
            row_key,
        })
    }

    prop_compose! {
        fn contribution()(
            row in row(),
            profile_id in any::<Option<i64>>(),
            deleted in any::<bool>(),
            identities in prop::collection::vec((name(), "\\PC{0,20}"), 0..4),
            fields in values(),
            aggs in values(),
            version in any::<Option<i64>>(),
            lsn in any::<u64>(),
            seq in any::<u64>(),
            freshness in time(),
            priority in any::<i32>(),
            digest in any::<Option<i64>>(),
        ) -> Contribution {
            Contribution { row, profile_id, deleted, identities, fields, aggs, version, lsn: Lsn(lsn), seq, freshness, priority, digest }
        }
    }

    fn agg() -> impl Strategy<Value = AggState> {
        (
            any::<i64>(),
            proptest::option::of(number()),
            proptest::option::of(value()),
            any::<bool>(),
        )
            .prop_map(|(n, s, v, stale)| AggState { n, s, v, stale })
    }

    fn winner() -> impl Strategy<Value = Winner> {
        (value(), row(), time(), any::<u64>()).prop_map(|(value, row, freshness, lsn)| Winner {
            value,
            row,
            freshness,
            lsn: Lsn(lsn),
        })
    }

    prop_compose! {
        fn profile()(
            merged_into in any::<Option<i64>>(),
            aggs in prop::collection::btree_map(name(), agg(), 0..4),
            traits in values(),
            winners in proptest::option::of(prop::collection::btree_map(name(), winner(), 0..4)),
            field_rows in proptest::option::of(prop::collection::btree_set(row(), 0..4)),
        ) -> CachedProfile {
            CachedProfile { merged_into, aggs, traits: traits.into_iter().collect(), winners, field_rows }
        }
    }

    proptest! {
        #[test]
        fn a_contribution_decodes_to_what_was_encoded(c in contribution()) {
            let mut names = Names::new();
            let k = row_key(&mut names, &c.row);
            let v = encode_contribution(&mut names, &c);
            let row = decode_row_key(&names, &k).unwrap();
            prop_assert_eq!(find_row_key(&names, &c.row), Some(k.clone()));
            prop_assert_eq!(decode_contribution(&names, row, &v), Ok(c));
        }

        #[test]
        fn a_profile_decodes_to_what_was_encoded(p in profile()) {
            let mut names = Names::new();
            let v = encode_profile(&mut names, &p);
            prop_assert_eq!(decode_profile(&names, &v), Ok(p));
        }

        #[test]
        fn keys_of_different_rows_differ(a in row(), b in row()) {
            let mut names = Names::new();
            let (ka, kb) = (row_key(&mut names, &a), row_key(&mut names, &b));
            prop_assert_eq!(ka == kb, a == b);
        }
    }

    #[test]
    fn an_unknown_name_finds_no_key() {
        let mut names = Names::new();
        let r = RowRef {
            source: "crm".into(),
            table: "public.contacts".into(),
            row_key: r#"{"id":1}"#.into(),
        };
        assert_eq!(find_row_key(&names, &r), None);
        let k = row_key(&mut names, &r);
        assert_eq!(find_row_key(&names, &r), Some(k));
        let i: Ident = ("email".into(), "a@x".into());
        assert_eq!(find_ident_key(&names, &i), None);
        assert_eq!(
            ident_key(&mut names, &i),
            find_ident_key(&names, &i).unwrap()
        );
    }

    #[test]
    fn a_typical_row_is_small() {
        let mut names = Names::new();
        let c = Contribution {
            row: RowRef {
                source: "crm".into(),
                table: "public.contacts".into(),
                row_key: r#"{"id": 123456}"#.into(),
            },
            profile_id: Some(123_456),
            deleted: false,
            identities: vec![("email".into(), "someone@example.com".into())],
            fields: BTreeMap::from([
                ("email".to_owned(), Value::from("someone@example.com")),
                ("name".to_owned(), Value::from("Someone Else")),
            ]),
            aggs: BTreeMap::new(),
            version: None,
            lsn: Lsn(0x1_2345_6789),
            seq: 17,
            freshness: chrono::Utc::now(),
            priority: 0,
            digest: Some(-42),
        };
        let v = encode_contribution(&mut names, &c);
        // As the merge core holds it, the same row is about 1.5 KB.
        assert!(v.len() <= 96, "{} bytes", v.len());
    }
}
