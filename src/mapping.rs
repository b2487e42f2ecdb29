//! From a row image to a [`Contribution`]: what one source row says about one
//! person (identifiers, field values, aggregate inputs, version, freshness).
//!
//! Pure: the config and the row in, a contribution or a [`MapError`] (which
//! becomes a dead letter) out. An unchanged TOAST column keeps the value the
//! row's previous contribution had.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use foldhash::HashMap;
use serde_json::{Map, Value};

use crate::config::{AggFn, AggregateConfig, Config, Normalize, Strategy, TableConfig};
use crate::event::{ChangeEvent, Op};
use crate::identity::{normalize, Ident, IdentError};
use crate::pgoutput::value::parse_timestamptz;
use crate::resolve::{Contribution, RowRef};

/// Why a row cannot be mapped; the row goes to `dead_letters` with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// Every identity column is NULL: the row belongs to nobody.
    #[error("row has no identifier: all of {0:?} are NULL")]
    NoIdentity(Vec<String>),
    /// An identifier could not be normalised.
    #[error(transparent)]
    Identity(#[from] IdentError),
    /// The version column holds something that is not an integer.
    #[error("version column {column}: {value} is not an integer")]
    Version {
        /// Column.
        column: String,
        /// Value as JSON.
        value: String,
    },
    /// An aggregate input that is not a finite number (sum) or not comparable (max/min).
    #[error("aggregate {name}: column {column} value {value} is not a finite number")]
    AggregateInput {
        /// Aggregate.
        name: String,
        /// Column.
        column: String,
        /// Value as JSON.
        value: String,
    },
    /// Linking the row would give a profile more identifiers than allowed.
    #[error("linking this row would give a profile {identities} identifiers (merging {profiles} profiles), more than merge.max_identities = {limit}")]
    MergeLimit {
        /// Identifiers the profile would own.
        identities: i64,
        /// The configured limit.
        limit: i64,
        /// Profiles the row would merge.
        profiles: usize,
    },
    /// A mapped column is absent from the row image (dropped or renamed upstream).
    #[error("mapped column {0} is missing from the row")]
    MissingColumn(String),
    /// A value the store cannot hold (see [`MapError::unstorable_value`]).
    #[error("column {column}: {why}")]
    Unstorable {
        /// Column.
        column: String,
        /// What the store cannot hold about it.
        why: String,
    },
}

/// `\u0000` anywhere in a JSON value (a string or a key): PostgreSQL's `json`
/// type accepts the escape, its `jsonb` (profile traits) and `text` do not.
pub fn holds_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(holds_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

impl MapError {
    /// The error for a mapped value the store cannot hold, if `v` is one.
    fn unstorable_value(column: &str, v: &Value) -> Option<MapError> {
        holds_nul(v).then(|| MapError::Unstorable {
            column: column.to_owned(),
            why: "the value contains \\u0000, which the store's jsonb cannot hold".to_owned(),
        })
    }

    /// The error for a row key longer than the store's indexes hold.
    pub fn key_too_long(bytes: usize) -> MapError {
        MapError::Unstorable {
            column: "(row key)".to_owned(),
            why: format!(
                "the row key is {bytes} bytes, longer than the {} the store's index holds",
                crate::identity::MAX_STORED_KEY_BYTES
            ),
        }
    }

    /// The reason without any value from the row: what logs at INFO and above
    /// may say (the full text, values included, goes to `dead_letters` only).
    pub fn redacted(&self) -> String {
        match self {
            MapError::NoIdentity(cols) => {
                format!("row has no identifier: all of {cols:?} are NULL")
            }
            MapError::Identity(IdentError::NotScalar { kind, .. }) => {
                format!("identity {kind}: value is not a string or number")
            }
            MapError::Identity(IdentError::Unparsable { kind, rule, .. }) => {
                format!(
                    "identity {kind}: value is not a valid {kind} after normalisation ({rule:?})"
                )
            }
            MapError::Version { column, .. } => {
                format!("version column {column}: value is not an integer")
            }
            MapError::AggregateInput { name, column, .. } => {
                format!("aggregate {name}: column {column} value is not a finite number")
            }
            MapError::Identity(IdentError::TooLong { .. })
            | MapError::MergeLimit { .. }
            | MapError::MissingColumn(_)
            | MapError::Unstorable { .. } => self.to_string(),
        }
    }
}

/// One table's mapping, ready to apply.
#[derive(Debug, Clone)]
pub struct TableMapping {
    /// Source name.
    pub source: String,
    /// Source priority.
    pub priority: i32,
    /// The table config.
    pub table: TableConfig,
    /// Identity kind → normalisation.
    pub normalize: BTreeMap<String, Normalize>,
    /// Every column the mapping reads (the digest's columns).
    pub mapped: Vec<String>,
}

/// All mappings and the field strategies, built once from the config.
#[derive(Debug, Clone, Default)]
pub struct Mapper {
    /// Source → table → mapping (looked up by `&str`, several times per change).
    tables: HashMap<String, HashMap<String, Arc<TableMapping>>>,
    strategies: BTreeMap<String, Strategy>,
    aggregates: BTreeMap<String, AggregateConfig>,
    priorities: BTreeMap<String, i32>,
    max_identities: Option<i64>,
}

impl Mapper {
    /// Builds the mapper from a validated config.
    pub fn new(cfg: &Config) -> Mapper {
        let mut m = Mapper {
            strategies: cfg.fields.clone(),
            max_identities: cfg.merge.max_identities,
            ..Default::default()
        };
        for s in &cfg.sources {
            m.priorities.insert(s.name.clone(), s.priority);
            for t in &s.tables {
                let normalize = t
                    .identity
                    .keys()
                    .map(|k| (k.clone(), cfg.normalize_of(k)))
                    .collect();
                m.aggregates
                    .extend(t.aggregates.iter().map(|(k, v)| (k.clone(), v.clone())));
                m.tables.entry(s.name.clone()).or_default().insert(
                    t.qualified.clone(),
                    Arc::new(TableMapping {
                        source: s.name.clone(),
                        priority: s.priority,
                        table: t.clone(),
                        normalize,
                        mapped: t.mapped_columns().into_iter().map(str::to_owned).collect(),
                    }),
                );
            }
        }
        m
    }

    /// The mapping of `source`'s `table`, if mapped.
    pub fn table(&self, source: &str, table: &str) -> Option<&Arc<TableMapping>> {
        self.tables.get(source)?.get(table)
    }

    /// Resolution strategy of a field.
    pub fn strategy(&self, field: &str) -> Strategy {
        self.strategies.get(field).copied().unwrap_or_default()
    }

    /// The most identifiers one profile may own (`merge.max_identities`).
    pub fn max_identities(&self) -> Option<i64> {
        self.max_identities
    }

    /// Every aggregate by name.
    pub fn aggregates(&self) -> &BTreeMap<String, AggregateConfig> {
        &self.aggregates
    }
}

/// A column's value as `ev` sent it; None for an unchanged TOAST value (the
/// caller falls back to the row's previous contribution).
fn sent<'a>(ev: &'a ChangeEvent, col: &str) -> Result<Option<&'a Value>, MapError> {
    if ev.unchanged.iter().any(|c| c == col) {
        return Ok(None);
    }
    ev.row
        .get(col)
        .map(Some)
        .ok_or_else(|| MapError::MissingColumn(col.to_owned()))
}

impl TableMapping {
    /// The identifiers of an insert, update or snapshot image (an identifier
    /// column that was not sent keeps `prev`'s value): the part of
    /// [`TableMapping::contribution`] that says which profiles a change
    /// touches, without building its fields, aggregates and digest.
    pub fn identities(
        &self,
        ev: &ChangeEvent,
        prev: Option<&Contribution>,
    ) -> Result<Vec<Ident>, MapError> {
        let t = &self.table;
        let mut identities: Vec<Ident> = Vec::new();
        for (kind, col) in &t.identity {
            let v = match sent(ev, col)? {
                Some(v) => normalize(kind, self.normalize[kind], v)?,
                None => prev.and_then(|p| {
                    p.identities
                        .iter()
                        .find(|(k, _)| k == kind)
                        .map(|(_, v)| v.clone())
                }),
            };
            if let Some(v) = v {
                identities.push((kind.clone(), v));
            }
        }
        if identities.is_empty() {
            return Err(MapError::NoIdentity(t.identity.values().cloned().collect()));
        }
        Ok(identities)
    }

    /// Maps an insert/update/snapshot image into a contribution (no profile yet).
    /// `prev` supplies values for unchanged TOAST columns.
    pub fn contribution(
        &self,
        ev: &ChangeEvent,
        prev: Option<&Contribution>,
    ) -> Result<Contribution, MapError> {
        debug_assert!(matches!(ev.op, Op::Insert | Op::Update | Op::Snapshot));
        let t = &self.table;
        let unchanged = |col: &str| ev.unchanged.iter().any(|c| c == col);

        let identities = self.identities(ev, prev)?;

        let mut fields = BTreeMap::new();
        for (field, col) in &t.fields {
            let v = match sent(ev, col)? {
                Some(v) => Some(v.clone()),
                None => prev.and_then(|p| p.fields.get(field).cloned()),
            };
            if let Some(v) = v.filter(|v| !v.is_null()) {
                if let Some(e) = MapError::unstorable_value(col, &v) {
                    return Err(e);
                }
                fields.insert(field.clone(), v);
            }
        }

        let mut aggs = BTreeMap::new();
        for (name, a) in &t.aggregates {
            if unchanged_any(a, &unchanged) {
                if let Some(v) = prev.and_then(|p| p.aggs.get(name)) {
                    aggs.insert(name.clone(), v.clone());
                }
                continue;
            }
            if !passes(a, &ev.row) {
                continue;
            }
            let input = match (&a.column, a.func) {
                (None, _) => Value::from(1),
                (Some(col), func) => {
                    let v = ev
                        .row
                        .get(col)
                        .ok_or_else(|| MapError::MissingColumn(col.clone()))?;
                    if v.is_null() {
                        continue;
                    }
                    if let Some(e) = MapError::unstorable_value(col, v) {
                        return Err(e);
                    }
                    // NaN and ±Infinity (numeric and float columns have them) are
                    // not numbers a sum can hold: one would turn every later sum
                    // into nothing. They go to dead_letters like any non-number.
                    let numeric = v.is_number()
                        || v.as_str()
                            .is_some_and(|s| s.parse::<f64>().is_ok_and(f64::is_finite));
                    if func == AggFn::Sum && !numeric {
                        return Err(MapError::AggregateInput {
                            name: name.clone(),
                            column: col.clone(),
                            value: v.to_string(),
                        });
                    }
                    match v.as_str().and_then(|s| s.parse::<i64>().ok()) {
                        Some(i) if func == AggFn::Sum => Value::from(i),
                        _ => v.clone(),
                    }
                }
            };
            aggs.insert(name.clone(), input);
        }

        let version = match &t.version {
            None => None,
            Some(col) => match sent(ev, col)? {
                None => prev.and_then(|p| p.version),
                Some(Value::Null) => None,
                Some(v) => Some(
                    v.as_i64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                        .ok_or_else(|| MapError::Version {
                            column: col.clone(),
                            value: v.to_string(),
                        })?,
                ),
            },
        };
        let freshness = t
            .updated_at
            .as_deref()
            .and_then(|col| ev.row.get(col))
            .and_then(parse_freshness)
            .unwrap_or(ev.commit_time);

        // The digest of every mapped column, unless one was not sent.
        let digest = if self.mapped.iter().any(|c| unchanged(c)) {
            None
        } else {
            Some(crate::store::digest::digest(
                self.mapped.iter().map(|c| (c.as_str(), ev.row.get(c))),
            ))
        };

        Ok(Contribution {
            row: RowRef {
                source: self.source.clone(),
                table: t.qualified.clone(),
                row_key: ev.row_key(),
            },
            profile_id: None,
            deleted: false,
            identities,
            fields,
            aggs,
            version,
            lsn: ev.commit_lsn,
            seq: ev.seq,
            freshness,
            priority: self.priority,
            digest,
        })
    }
}

fn unchanged_any(a: &AggregateConfig, unchanged: &impl Fn(&str) -> bool) -> bool {
    a.column.as_deref().is_some_and(unchanged) || a.only_when.keys().any(|c| unchanged(c))
}

/// Does the row pass the aggregate's `only_when` filter?
fn passes(a: &AggregateConfig, row: &Map<String, Value>) -> bool {
    a.only_when.iter().all(|(col, accepted)| {
        let v = row.get(col).unwrap_or(&Value::Null);
        accepted
            .iter()
            .any(|want| want == v || (json_text(want).is_some() && json_text(want) == json_text(v)))
    })
}

fn json_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A freshness column value (timestamptz, timestamp taken as UTC, or date) → time.
pub fn parse_freshness(v: &Value) -> Option<DateTime<Utc>> {
    let s = v.as_str()?;
    // Timestamps in images are normalised RFC 3339 UTC: try that first.
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| parse_timestamptz(s))
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|t| t.and_utc())
        })
        .or_else(|| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc())
        })
}
