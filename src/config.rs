//! `tributary.toml`: raw serde structs that refuse unknown keys, then one pass of
//! validation into [`Config`], the only form the rest of the program sees.
//!
//! Errors carry the file, the line and the key, and say what would fix them.
//! `${VAR}` in any string is replaced by that environment variable while the
//! file is read, so a secret is never written to disk in the config and a
//! missing variable is reported with the line that needs it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::Value;

use crate::conninfo::ConnInfo;

/// What is wrong with the configuration. Always exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source} (pass --config PATH or set TRIBUTARY_CONFIG)")]
    Read {
        /// The path tried.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said, with the offending key named.
        message: String,
    },
    /// The file parsed but a value is not usable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted path of the key, e.g. `source.crm.table.public.contacts.identity`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

// ---------------------------------------------------------------- raw form

/// A string with `${VAR}` expanded from the environment while deserializing, so
/// that an unset variable is reported at its line.
#[derive(Clone, PartialEq, Eq)]
struct Expanded(String);

impl<'de> Deserialize<'de> for Expanded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw, |k| std::env::var(k).ok())
            .map(Expanded)
            .map_err(de::Error::custom)
    }
}

impl fmt::Debug for Expanded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"…\"") // may hold a secret
    }
}

/// Replaces every `${NAME}` in `s` with `lookup(NAME)`; an unset name is an error.
pub fn expand_env(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` (write ${NAME})".to_owned())?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{name}}}` is not a valid environment variable name"
            ));
        }
        let value = lookup(name)
            .ok_or_else(|| format!("environment variable {name} is not set (export {name}=... before starting tributary)"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    sink: RawSink,
    #[serde(default)]
    source: Vec<RawSource>,
    #[serde(default)]
    identity: BTreeMap<String, RawIdentityKind>,
    #[serde(default)]
    fields: BTreeMap<String, RawField>,
    kafka: Option<RawKafka>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    merge: RawMerge,
    #[serde(default)]
    reconcile: RawReconcile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    interval_s: Option<u64>,
    repair: Option<bool>,
    sample: Option<u64>,
    wait_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMerge {
    max_identities: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    url: Expanded,
    schema: Option<String>,
    batch_max_events: Option<usize>,
    batch_max_wait_ms: Option<u64>,
    pool_size: Option<u32>,
    max_txn_memory_mb: Option<usize>,
    memory_budget_mb: Option<usize>,
    spill_dir: Option<PathBuf>,
    events_retention_months: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    url: Expanded,
    publication: Option<String>,
    slot: Option<String>,
    #[serde(default)]
    priority: i32,
    heartbeat_interval_s: Option<u64>,
    #[serde(default)]
    table: Vec<RawTable>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: String,
    #[serde(default)]
    identity: BTreeMap<String, String>,
    version: Option<String>,
    updated_at: Option<String>,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    #[serde(default)]
    aggregates: BTreeMap<String, RawAggregate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    #[serde(rename = "fn")]
    func: AggFn,
    column: Option<String>,
    #[serde(default)]
    only_when: BTreeMap<String, Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityKind {
    normalize: Normalize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    strategy: Strategy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: Expanded,
    topic_prefix: Option<String>,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    group_id: Option<String>,
    lease_ttl_ms: Option<u64>,
    options: Option<BTreeMap<String, Expanded>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: String,
    poll_interval_s: Option<u64>,
}

// ---------------------------------------------------------------- validated form

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from (for messages).
    pub path: PathBuf,
    /// The profile store.
    pub sink: SinkConfig,
    /// Source databases, in file order.
    pub sources: Vec<SourceConfig>,
    /// Normalisation per identity kind; kinds not listed use `trim`.
    pub identity: BTreeMap<String, Normalize>,
    /// Resolution strategy per field; fields not listed use `freshest`.
    pub fields: BTreeMap<String, Strategy>,
    /// Optional Kafka publishing.
    pub kafka: Option<KafkaConfig>,
    /// Optional Prometheus endpoint.
    pub metrics: Option<MetricsConfig>,
    /// Identity-merge guard rails.
    pub merge: MergeConfig,
    /// The daemon's scheduled reconciliation.
    pub reconcile: ReconcileConfig,
}

/// `[reconcile]`: reconciliation inside the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// Seconds between runs (None: no scheduled runs).
    pub interval_s: Option<u64>,
    /// Repair what drifted.
    pub repair: bool,
    /// Check only about this many rows per table (and their profiles).
    pub sample: Option<u64>,
    /// Seconds to wait for the stream to pass a run's anchor.
    pub wait_s: u64,
}

/// `[merge]`.
#[derive(Debug, Clone, Default)]
pub struct MergeConfig {
    /// The most identifiers one profile may own; a row that would link beyond it
    /// goes to dead_letters (default: no limit).
    pub max_identities: Option<i64>,
}

/// `[sink]`.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Connection to the profile store.
    pub conn: ConnInfo,
    /// Schema holding Tributary's relations (default `tributary`).
    pub schema: String,
    /// Most source changes applied in one sink transaction (default 2500).
    pub batch_max_events: usize,
    /// Longest a batch waits for more transactions before it is applied (default 100 ms).
    pub batch_max_wait_ms: u64,
    /// Connections to the store (default 4).
    pub pool_size: u32,
    /// Memory one source transaction may hold before it is spilled to disk (default 64 MiB).
    pub max_txn_memory_bytes: usize,
    /// Bound on the in-memory merge state (`src/state/`), in bytes.
    pub memory_budget_bytes: usize,
    /// Where large transactions are spilled (default the system temp dir).
    pub spill_dir: PathBuf,
    /// Months of event log to keep (None: keep everything).
    pub events_retention_months: Option<u32>,
}

/// One `[[source]]`.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Unique name, `[a-z0-9_]+`.
    pub name: String,
    /// Connection (also used for the replication connection).
    pub conn: ConnInfo,
    /// Publication name (default `tributary_<name>`).
    pub publication: String,
    /// Replication slot name (default `tributary_<name>`).
    pub slot: String,
    /// Tie-break between sources; higher wins.
    pub priority: i32,
    /// Seconds without changes after which an idle source gets a heartbeat
    /// (`pg_logical_emit_message`) so its slot can advance; 0 = never.
    pub heartbeat_interval_s: u64,
    /// Mapped tables.
    pub tables: Vec<TableConfig>,
}

impl SourceConfig {
    /// The mapping for `schema.table`, if the table is mapped.
    pub fn table(&self, qualified: &str) -> Option<&TableConfig> {
        self.tables.iter().find(|t| t.qualified == qualified)
    }
}

/// One `[[source.table]]`.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `schema.table`.
    pub qualified: String,
    /// Identity kind → column.
    pub identity: BTreeMap<String, String>,
    /// Monotonic row-version column.
    pub version: Option<String>,
    /// Freshness column; default is the source commit time.
    pub updated_at: Option<String>,
    /// Profile field → column.
    pub fields: BTreeMap<String, String>,
    /// Aggregate name → definition.
    pub aggregates: BTreeMap<String, AggregateConfig>,
}

impl TableConfig {
    /// Every column the mapping reads.
    pub fn mapped_columns(&self) -> BTreeSet<&str> {
        let mut cols: BTreeSet<&str> = self.identity.values().map(String::as_str).collect();
        cols.extend(self.fields.values().map(String::as_str));
        cols.extend(self.version.as_deref());
        cols.extend(self.updated_at.as_deref());
        for a in self.aggregates.values() {
            cols.extend(a.column.as_deref());
            cols.extend(a.only_when.keys().map(String::as_str));
        }
        cols
    }
}

/// Aggregate function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggFn {
    /// Number of rows (that pass `only_when`).
    Count,
    /// Sum of `column`.
    Sum,
    /// Largest `column` value.
    Max,
    /// Smallest `column` value.
    Min,
}

/// One aggregate over a table's rows per profile.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateConfig {
    /// Function.
    pub func: AggFn,
    /// Input column (required for sum, max, min).
    pub column: Option<String>,
    /// Row filter: column → accepted values; all must match.
    pub only_when: BTreeMap<String, Vec<Value>>,
}

/// Identifier normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// Trim and lowercase.
    Email,
    /// Lowercase only.
    Lowercase,
    /// Trim surrounding white space.
    Trim,
    /// Keep only ASCII digits (phone numbers).
    Digits,
    /// Use the value as it is.
    None,
}

/// How a field's value is chosen among the rows that have one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Freshest row first, then source priority, then row key.
    #[default]
    Freshest,
    /// Source priority first, then freshness, then row key.
    Priority,
}

/// `[kafka]`.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic prefix (default `tributary`).
    pub topic_prefix: String,
    /// Partitions of the topics Tributary creates.
    pub partitions: i32,
    /// Replication factor of the topics Tributary creates.
    pub replication_factor: i32,
    /// Consumer group of `run --role apply` instances.
    pub group_id: String,
    /// How long the apply lease lasts unless its owner renews it: a standby
    /// takes over at most this long after the owner died.
    pub lease_ttl: std::time::Duration,
    /// librdkafka properties passed through (security.protocol, sasl.*, ssl.*).
    pub options: KafkaOptions,
}

/// librdkafka properties; values may hold secrets, so Debug shows keys only.
#[derive(Clone, Default)]
pub struct KafkaOptions(pub BTreeMap<String, String>);

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// `[metrics]`.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub listen: std::net::SocketAddr,
    /// How often slot and store gauges (WAL retained, profiles) are sampled.
    pub poll_interval: std::time::Duration,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        validate(raw, path)
    }

    /// The source with this name.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Normalisation for an identity kind.
    pub fn normalize_of(&self, kind: &str) -> Normalize {
        self.identity.get(kind).copied().unwrap_or(Normalize::Trim)
    }

    /// Strategy for a field.
    pub fn strategy_of(&self, field: &str) -> Strategy {
        self.fields.get(field).copied().unwrap_or_default()
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key,
        message,
    };

    let sink_conn: ConnInfo = raw
        .sink
        .url
        .0
        .parse()
        .map_err(|e| invalid("sink.url".into(), format!("{e}")))?;
    let schema = raw.sink.schema.unwrap_or_else(|| "tributary".into());
    if !is_name(&schema) {
        return Err(invalid(
            "sink.schema".into(),
            format!("`{schema}` must match [a-z0-9_]+"),
        ));
    }
    let sink = SinkConfig {
        conn: sink_conn,
        schema,
        batch_max_events: raw.sink.batch_max_events.unwrap_or(2500).max(1),
        batch_max_wait_ms: raw.sink.batch_max_wait_ms.unwrap_or(5),
        pool_size: raw.sink.pool_size.unwrap_or(4).max(2),
        max_txn_memory_bytes: raw.sink.max_txn_memory_mb.unwrap_or(64).max(1) * 1024 * 1024,
        memory_budget_bytes: raw.sink.memory_budget_mb.unwrap_or(16) * 1024 * 1024,
        spill_dir: raw.sink.spill_dir.unwrap_or_else(std::env::temp_dir),
        events_retention_months: raw.sink.events_retention_months.filter(|m| *m > 0),
    };

    if raw.source.is_empty() {
        return Err(invalid(
            "source".into(),
            "no [[source]] configured: add at least one source database".into(),
        ));
    }
    let mut sources = Vec::new();
    let mut names = BTreeSet::new();
    let mut field_names = BTreeSet::new();
    let mut agg_names = BTreeSet::new();
    for s in raw.source {
        let key = format!("source.{}", s.name);
        if !is_name(&s.name) {
            return Err(invalid(
                format!("{key}.name"),
                "source names must match [a-z0-9_]+ (e.g. crm, shop_eu)".into(),
            ));
        }
        if !names.insert(s.name.clone()) {
            return Err(invalid(
                format!("{key}.name"),
                "two sources have this name; names must be unique".into(),
            ));
        }
        let conn: ConnInfo = s
            .url
            .0
            .parse()
            .map_err(|e: crate::conninfo::ConnInfoError| {
                invalid(format!("{key}.url"), e.to_string())
            })?;
        let publication = s
            .publication
            .unwrap_or_else(|| format!("tributary_{}", s.name));
        let slot = s.slot.unwrap_or_else(|| format!("tributary_{}", s.name));
        if !is_name(&slot) {
            return Err(invalid(
                format!("{key}.slot"),
                "slot names must match [a-z0-9_]+".into(),
            ));
        }
        if !is_name(&publication) {
            return Err(invalid(
                format!("{key}.publication"),
                "publication names must match [a-z0-9_]+".into(),
            ));
        }
        if s.table.is_empty() {
            return Err(invalid(
                format!("{key}.table"),
                "no [[source.table]] mapped for this source".into(),
            ));
        }
        let mut tables: Vec<TableConfig> = Vec::new();
        for t in s.table {
            let tkey = format!("{key}.table.{}", t.name);
            let Some((schema, name)) = t.name.split_once('.') else {
                return Err(invalid(
                    format!("{tkey}.name"),
                    "write the table as schema.table (e.g. public.contacts)".into(),
                ));
            };
            if tables.iter().any(|x| x.qualified == t.name) {
                return Err(invalid(
                    format!("{tkey}.name"),
                    "this table is mapped twice in one source".into(),
                ));
            }
            if t.identity.is_empty() {
                return Err(invalid(
                    format!("{tkey}.identity"),
                    "a mapped table needs at least one identity column, e.g. identity = { email = \"email\" }".into(),
                ));
            }
            for kind in t.identity.keys() {
                if !is_name(kind) {
                    return Err(invalid(
                        format!("{tkey}.identity.{kind}"),
                        "identity kinds must match [a-z0-9_]+".into(),
                    ));
                }
            }
            let mut aggregates = BTreeMap::new();
            for (aname, a) in t.aggregates {
                let akey = format!("{tkey}.aggregates.{aname}");
                if a.func != AggFn::Count && a.column.is_none() {
                    return Err(invalid(
                        akey,
                        format!(
                            "fn = \"{:?}\" needs a column, e.g. column = \"total_cents\"",
                            a.func
                        )
                        .to_lowercase(),
                    ));
                }
                if !agg_names.insert(aname.clone()) {
                    return Err(invalid(
                        akey,
                        "an aggregate of this name is defined twice; names are global".into(),
                    ));
                }
                aggregates.insert(
                    aname,
                    AggregateConfig {
                        func: a.func,
                        column: a.column,
                        only_when: a.only_when,
                    },
                );
            }
            field_names.extend(t.fields.keys().cloned());
            tables.push(TableConfig {
                schema: schema.to_owned(),
                name: name.to_owned(),
                qualified: t.name.clone(),
                identity: t.identity,
                version: t.version,
                updated_at: t.updated_at,
                fields: t.fields,
                aggregates,
            });
        }
        sources.push(SourceConfig {
            name: s.name,
            conn,
            publication,
            slot,
            priority: s.priority,
            heartbeat_interval_s: s.heartbeat_interval_s.unwrap_or(30),
            tables,
        });
    }
    if let Some(clash) = field_names.intersection(&agg_names).next() {
        return Err(invalid(
            format!("aggregates.{clash}"),
            "a field and an aggregate share this name; both would be written to traits. Rename one"
                .into(),
        ));
    }
    for field in raw.fields.keys() {
        if !field_names.contains(field) {
            return Err(invalid(
                format!("fields.{field}"),
                "no table maps this field; remove the section or map the field".into(),
            ));
        }
    }
    if let Some(n) = raw.merge.max_identities.filter(|n| *n < 1) {
        return Err(invalid(
            "merge.max_identities".into(),
            format!("{n} is not a positive number of identifiers"),
        ));
    }
    let kafka = match raw.kafka {
        None => None,
        Some(k) => {
            if k.brokers.0.trim().is_empty() {
                return Err(invalid(
                    "kafka.brokers".into(),
                    "is empty; list the bootstrap servers, e.g. \"kafka-1:9092,kafka-2:9092\""
                        .into(),
                ));
            }
            let partitions = k.partitions.unwrap_or(6);
            if partitions < 1 {
                return Err(invalid(
                    "kafka.partitions".into(),
                    "must be at least 1".into(),
                ));
            }
            let replication_factor = k.replication_factor.unwrap_or(1);
            if replication_factor < 1 {
                return Err(invalid(
                    "kafka.replication_factor".into(),
                    "must be at least 1 (3 on a production cluster)".into(),
                ));
            }
            let topic_prefix = k.topic_prefix.unwrap_or_else(|| "tributary".into());
            if topic_prefix.is_empty()
                || !topic_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(invalid(
                    "kafka.topic_prefix".into(),
                    format!("`{topic_prefix}`: use letters, digits, `.`, `_` and `-` (Kafka topic names)"),
                ));
            }
            let lease_ttl_ms = k.lease_ttl_ms.unwrap_or(5000);
            if !(1000..=600_000).contains(&lease_ttl_ms) {
                return Err(invalid(
                    "kafka.lease_ttl_ms".into(),
                    format!("{lease_ttl_ms}: use 1000 to 600000 (a standby takes over this long after the owner died; the owner renews it every third of it)"),
                ));
            }
            Some(KafkaConfig {
                brokers: k.brokers.0,
                topic_prefix: topic_prefix.clone(),
                partitions,
                replication_factor,
                group_id: k
                    .group_id
                    .unwrap_or_else(|| format!("{topic_prefix}-apply")),
                lease_ttl: std::time::Duration::from_millis(lease_ttl_ms),
                options: KafkaOptions(
                    k.options
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(key, v)| (key, v.0))
                        .collect(),
                ),
            })
        }
    };
    let metrics = raw
        .metrics
        .map(|m| {
            let poll = m.poll_interval_s.unwrap_or(10);
            if poll == 0 {
                return Err(invalid(
                    "metrics.poll_interval_s".into(),
                    "must be at least 1 (seconds between samples of slot and store gauges)".into(),
                ));
            }
            m.listen
                .parse()
                .map(|listen| MetricsConfig {
                    listen,
                    poll_interval: std::time::Duration::from_secs(poll),
                })
                .map_err(|_| {
                    invalid(
                        "metrics.listen".into(),
                        format!("`{}` is not host:port, e.g. 127.0.0.1:9187", m.listen),
                    )
                })
        })
        .transpose()?;
    if raw.reconcile.interval_s == Some(0) {
        return Err(invalid(
            "reconcile.interval_s".into(),
            "0 is not an interval; remove the key to turn scheduled runs off".into(),
        ));
    }
    if raw.reconcile.sample == Some(0) {
        return Err(invalid(
            "reconcile.sample".into(),
            "0 rows would check nothing; remove the key to check every row".into(),
        ));
    }
    let reconcile = ReconcileConfig {
        interval_s: raw.reconcile.interval_s,
        repair: raw.reconcile.repair.unwrap_or(false),
        sample: raw.reconcile.sample,
        wait_s: raw.reconcile.wait_s.unwrap_or(120),
    };
    Ok(Config {
        path: path.to_owned(),
        sink,
        sources,
        identity: raw
            .identity
            .into_iter()
            .map(|(k, v)| (k, v.normalize))
            .collect(),
        fields: raw
            .fields
            .into_iter()
            .map(|(k, v)| (k, v.strategy))
            .collect(),
        kafka,
        metrics,
        merge: MergeConfig {
            max_identities: raw.merge.max_identities,
        },
        reconcile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[sink]
url = "postgres://tributary@127.0.0.1:5432/profiles"

[[source]]
name = "crm"
url = "postgres://replicator@127.0.0.1/crm?sslmode=disable"
priority = 10

  [[source.table]]
  name = "public.contacts"
  identity = { email = "email", crm_contact = "id" }
  version = "row_version"
  fields = { email = "email", phone = "phone" }

[[source]]
name = "shop"
url = "postgres://replicator@127.0.0.1/shop"

  [[source.table]]
  name = "public.orders"
  identity = { shop_account = "account_id" }
  [source.table.aggregates]
  order_count = { fn = "count" }
  lifetime_value_cents = { fn = "sum", column = "total_cents", only_when = { status = ["paid", "shipped"] } }

[identity.email]
normalize = "email"

[fields.phone]
strategy = "priority"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.sink.schema, "tributary");
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.sources[0].slot, "tributary_crm");
        assert_eq!(c.sources[0].publication, "tributary_crm");
        assert_eq!(c.sources[0].priority, 10);
        let orders = c.source("shop").unwrap().table("public.orders").unwrap();
        assert_eq!(orders.aggregates["lifetime_value_cents"].func, AggFn::Sum);
        assert_eq!(c.normalize_of("email"), Normalize::Email);
        assert_eq!(c.normalize_of("crm_contact"), Normalize::Trim);
        assert_eq!(c.strategy_of("phone"), Strategy::Priority);
        assert_eq!(c.reconcile.interval_s, None);
        assert_eq!(c.reconcile.wait_s, 120);
        let c = parse(&format!(
            "{GOOD}\n[reconcile]\ninterval_s = 3600\nrepair = true\n"
        ))
        .unwrap();
        assert_eq!(
            (c.reconcile.interval_s, c.reconcile.repair),
            (Some(3600), true)
        );
        assert_eq!(c.strategy_of("email"), Strategy::Freshest);
    }

    #[test]
    fn unknown_key_names_the_key_and_its_line() {
        let text = GOOD.replace("priority = 10", "priority = 10\nprioritty = 3");
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("prioritty"), "{msg}");
        let ConfigError::Parse { line, .. } = err else {
            panic!("{msg}")
        };
        let expected = text
            .lines()
            .position(|l| l.starts_with("prioritty"))
            .unwrap()
            + 1;
        assert_eq!(line, expected, "{msg}");
    }

    #[test]
    fn env_vars_are_expanded_and_a_missing_one_is_named() {
        let lookup = |k: &str| (k == "PW").then(|| "s3cret".to_owned());
        assert_eq!(
            expand_env("postgres://u:${PW}@h/db", lookup).unwrap(),
            "postgres://u:s3cret@h/db"
        );
        let e = expand_env("x${NOPE_NOT_SET}y", lookup).unwrap_err();
        assert!(e.contains("NOPE_NOT_SET"), "{e}");
        let text = GOOD.replace("tributary@127", "tributary:${TRIBUTARY_TEST_UNSET_VAR}@127");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(
            msg.contains("TRIBUTARY_TEST_UNSET_VAR") && msg.contains("t.toml:3:"),
            "{msg}"
        );
    }

    #[test]
    fn kafka_options_take_secrets_from_the_environment_and_never_show_them() {
        // PATH stands in for a secret: set everywhere, and long enough to be unique.
        let secret = std::env::var("PATH").unwrap();
        let text = format!(
            "{GOOD}\n[kafka]\nbrokers = \"k:9092\"\noptions = {{ \"sasl.mechanism\" = \"SCRAM-SHA-512\", \"sasl.password\" = \"${{PATH}}\" }}\n"
        );
        let cfg = parse(&text).unwrap();
        let k = cfg.kafka.as_ref().unwrap();
        assert_eq!(k.options.0["sasl.password"], secret);
        assert_eq!(k.options.0["sasl.mechanism"], "SCRAM-SHA-512");
        assert_eq!(k.group_id, "tributary-apply");
        let shown = format!("{cfg:?}");
        assert!(
            shown.contains("sasl.password") && !shown.contains(&secret),
            "{shown}"
        );
        let bad = text.replace(
            "brokers = \"k:9092\"",
            "brokers = \"k:9092\"\npartitions = 0",
        );
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("kafka.partitions"));
        assert_eq!(k.lease_ttl, std::time::Duration::from_secs(5));
        let short = text.replace(
            "brokers = \"k:9092\"",
            "brokers = \"k:9092\"\nlease_ttl_ms = 10",
        );
        let err = parse(&short).unwrap_err().to_string();
        assert!(
            err.contains("kafka.lease_ttl_ms") && err.contains("1000 to 600000"),
            "{err}"
        );
    }

    #[test]
    fn invalid_values_name_the_key_and_the_fix() {
        let cases = [
            (
                GOOD.replace("name = \"crm\"", "name = \"CRM\""),
                "source.CRM.name",
            ),
            (GOOD.replace("name = \"shop\"", "name = \"crm\""), "unique"),
            (GOOD.replace("public.contacts", "contacts"), "schema.table"),
            (
                GOOD.replace(
                    "{ fn = \"sum\", column = \"total_cents\",",
                    "{ fn = \"sum\",",
                ),
                "needs a column",
            ),
            (GOOD.replace("[fields.phone]", "[fields.fax]"), "fields.fax"),
            (
                GOOD.replace("sslmode=disable", "sslmode=sometimes"),
                "verify-full",
            ),
            (
                format!("{GOOD}\n[reconcile]\ninterval_s = 0\n"),
                "reconcile.interval_s",
            ),
            (
                format!("{GOOD}\n[reconcile]\nsample = 0\n"),
                "reconcile.sample",
            ),
        ];
        for (text, needle) in cases {
            let msg = parse(&text).unwrap_err().to_string();
            assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
        }
    }
}
