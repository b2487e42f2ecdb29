//! Row-level reconciliation: each source table against the contributions the
//! store holds for it.
//!
//! 1. Hashes per key bucket, in SQL on each side: on the source, the count and
//!    the sum of the digest of every row's mapped columns, read between two
//!    watermarks; on the store, once it has applied past the high watermark,
//!    the same sums over `contributions.digest`. Equal buckets are done; a
//!    store with no drift costs one scan of each source table.
//! 2. Rows of the buckets that differ are read (between watermarks again),
//!    mapped with the daemon's own mapping and compared with the stored
//!    contributions. A difference on a row that a change invisible to the read
//!    touched, or that the store has since moved past the high watermark, is a
//!    change in flight, not drift: such rows are read again, up to
//!    [`ROUNDS`] times, and are reported as unverified if they never settle.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgConnection;

use super::{Drift, DriftKind, Fix};
use crate::config::{SourceConfig, TableConfig};
use crate::event::Lsn;
use crate::mapping::Mapper;
use crate::resnapshot::wait_until_applied;
use crate::resolve::Contribution;
use crate::source::query_err;
use crate::source::read::{
    read_between_watermarks, wal_position, Bind, TableReader, WatermarkedRead,
};
use crate::store::reconcile::RowScope;
use crate::store::Store;

/// Times a row that keeps changing is read again before it counts as unverified.
pub const ROUNDS: usize = 3;

/// The outcome of one table's row-level pass.
#[derive(Debug, Default)]
pub struct TableOutcome {
    /// Source rows covered by the comparison.
    pub rows_checked: u64,
    /// Buckets whose hashes differed.
    pub buckets_differing: u64,
    /// Drifted rows.
    pub drifts: Vec<Drift>,
    /// Rows that kept changing under the comparison.
    pub unverified: u64,
    /// Profiles the sampled buckets' rows belong to (with a sample).
    pub sampled_profiles: Vec<i64>,
    /// The high watermark of the hash pass.
    pub anchor: Lsn,
}

/// Compares one table. `sample`: check only about this many rows.
pub async fn check_table(
    store: &Store,
    mapper: &Mapper,
    src: &SourceConfig,
    t: &TableConfig,
    conn: &mut PgConnection,
    sample: Option<u64>,
    wait: Duration,
) -> anyhow::Result<TableOutcome> {
    let reader = TableReader::load(conn, src, t).await?;
    let live = store.live_rows(&src.name, &t.qualified).await?;
    let nbuckets = u64::try_from(live / 256)
        .unwrap_or(0)
        .max(1)
        .next_power_of_two()
        .min(1 << 16);
    let mask = i64::try_from(nbuckets - 1).unwrap_or(0);
    let chosen: Option<Vec<i64>> = sample.map(|n| {
        let want = (u64::try_from(live).unwrap_or(0).max(1).min(n) * nbuckets)
            .div_ceil(u64::try_from(live).unwrap_or(1).max(1))
            .clamp(1, nbuckets);
        let mut all: Vec<i64> = (0..i64::try_from(nbuckets).unwrap_or(1)).collect();
        use rand::seq::SliceRandom;
        all.shuffle(&mut rand::rng());
        all.truncate(usize::try_from(want).unwrap_or(1));
        all
    });
    let key_hash = format!("(hashtextextended({}, 0) & {mask})", reader.key_text_expr());

    // 1. Hashes per bucket on the source, between watermarks.
    let bucket_filter = chosen
        .as_ref()
        .map_or_else(String::new, |_| format!(" where {key_hash} = any($1)"));
    // One statement: one snapshot. The WAL position after it is the anchor.
    let timer = std::time::Instant::now();
    let source_buckets: Vec<(i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {key_hash} as b, count(*), coalesce(sum({}::numeric), 0)::text from {}{bucket_filter} group by 1",
        reader.digest_expr(),
        reader.relation()
    )))
    .bind(chosen.clone().unwrap_or_default())
    .fetch_all(&mut *conn)
    .await
    .map_err(query_err(src, "hash the table by key bucket"))?;
    let high = wal_position(conn, src).await?;
    let hashed_source = timer.elapsed();
    wait_until_applied(store, src, high, wait).await?;
    let waited = timer.elapsed();

    let store_buckets = store
        .row_buckets(&src.name, &t.qualified, mask, chosen.as_deref())
        .await?;

    tracing::debug!(source = %src.name, table = %t.qualified, buckets = nbuckets,
        source_ms = hashed_source.as_millis(), wait_ms = (waited - hashed_source).as_millis(),
        store_ms = (timer.elapsed() - waited).as_millis(), "bucket hashes compared");
    let mut out = TableOutcome {
        anchor: high,
        ..Default::default()
    };
    let src_map: HashMap<i64, (i64, String)> = source_buckets
        .into_iter()
        .map(|(b, n, s)| {
            out.rows_checked += u64::try_from(n).unwrap_or(0);
            (b, (n, s))
        })
        .collect();
    let store_map: HashMap<i64, (i64, String, i64)> = store_buckets
        .into_iter()
        .map(|(b, n, s, d)| (b, (n, s, d)))
        .collect();
    let mut suspects: BTreeSet<i64> = BTreeSet::new();
    for b in src_map.keys().chain(store_map.keys()) {
        let same = match (src_map.get(b), store_map.get(b)) {
            (Some((n, s)), Some((m, t, d))) => n == m && s == t && m == d,
            _ => false,
        };
        if !same {
            suspects.insert(*b);
        }
    }
    out.buckets_differing = suspects.len() as u64;
    if let Some(chosen) = &chosen {
        out.sampled_profiles = store
            .profiles_in_buckets(&src.name, &t.qualified, mask, chosen)
            .await?;
    }

    // 2. Rows of the differing buckets, then the rows still changing, until they settle.
    let mut todo = Todo::Buckets(suspects.into_iter().collect());
    for round in 1..=ROUNDS {
        let (read, scope) = match &todo {
            Todo::Buckets(b) => (
                read_between_watermarks(
                    conn,
                    src,
                    &reader,
                    &format!("where {key_hash} = any($1::text[]::bigint[])"),
                    &[Bind::TextArray(b.iter().map(i64::to_string).collect())],
                )
                .await?,
                Scope::Buckets(b),
            ),
            Todo::Keys(k) => (read_keys(conn, src, &reader, k).await?, Scope::Keys(k)),
        };
        wait_until_applied(store, src, read.marks.high, wait).await?;
        let cmp = compare(store, mapper, src, t, mask, scope, &read).await?;
        out.drifts.extend(cmp.drifts);
        if cmp.unsettled.is_empty() {
            break;
        }
        if round == ROUNDS {
            out.unverified += cmp.unsettled.len() as u64;
            break;
        }
        todo = Todo::Keys(cmp.unsettled);
    }
    Ok(out)
}

/// Rows left to compare.
enum Todo {
    Buckets(Vec<i64>),
    Keys(Vec<String>),
}

/// Which rows a comparison covers.
#[derive(Clone, Copy)]
enum Scope<'a> {
    Buckets(&'a [i64]),
    Keys(&'a [String]),
}

/// Reads the rows with these keys (canonical row-key JSON) between watermarks.
pub(crate) async fn read_keys(
    conn: &mut PgConnection,
    src: &SourceConfig,
    reader: &TableReader,
    keys: &[String],
) -> anyhow::Result<WatermarkedRead> {
    Ok(read_between_watermarks(
        conn,
        src,
        reader,
        &format!("where {} = any($1::text[]::jsonb[])", reader.key_expr()),
        &[Bind::TextArray(keys.to_vec())],
    )
    .await?)
}

struct Compared {
    drifts: Vec<Drift>,
    /// Rows still changing (row keys).
    unsettled: Vec<String>,
}

/// What a source row should look like in the store.
enum Expected {
    Row(Box<Contribution>),
    Unmappable,
}

async fn compare(
    store: &Store,
    mapper: &Mapper,
    src: &SourceConfig,
    t: &TableConfig,
    mask: i64,
    scope: Scope<'_>,
    read: &WatermarkedRead,
) -> anyhow::Result<Compared> {
    let mut out = Compared {
        drifts: Vec::new(),
        unsettled: Vec::new(),
    };
    let Some(mapping) = mapper.table(&src.name, &t.qualified) else {
        return Ok(out);
    };
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    for e in &read.rows {
        let exp = match mapping.contribution(e, None) {
            Ok(c) => Expected::Row(Box::new(c)),
            Err(_) => Expected::Unmappable,
        };
        expected.insert(e.row_key(), exp);
    }
    let stored_scope = match scope {
        Scope::Buckets(b) => RowScope::Buckets(mask, b),
        Scope::Keys(k) => RowScope::Keys(k),
    };
    let (stored, changed) = store
        .rows_in_scope(&src.name, &t.qualified, stored_scope, &read.marks)
        .await?;
    let in_scope: BTreeSet<&String> = expected
        .keys()
        .chain(stored.iter().filter(|(_, c)| !c.deleted).map(|(k, _)| k))
        .filter(|k| match scope {
            Scope::Keys(ks) => ks.contains(k),
            Scope::Buckets(_) => true,
        })
        .collect();
    for key in in_scope {
        let exp = expected.get(key);
        let act = stored.get(key).filter(|c| !c.deleted);
        let same = match (exp, act) {
            (Some(Expected::Unmappable), _) => true, // a dead letter, reported there
            (Some(Expected::Row(e)), Some(a)) => same_image(e, a, t.updated_at.is_some()),
            (None, None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        let in_flight = changed.as_ref().is_none_or(|c| c.contains(key))
            || stored.get(key).is_some_and(|c| c.lsn > read.marks.high);
        if in_flight {
            out.unsettled.push(key.clone());
            continue;
        }
        tracing::debug!(key = %key, marks = ?read.marks, stored = ?stored.get(key).map(|c| (c.lsn, c.seq, c.deleted)),
            "row differs and no change in flight explains it: drift");
        let e = match exp {
            Some(Expected::Row(e)) => Some(e.as_ref()),
            _ => None,
        };
        let profile_id = act.and_then(|a| a.profile_id);
        out.drifts.push(Drift {
            profile_id,
            field: format!("row {}/{} {key}", src.name, t.qualified),
            expected: e.map(image_json),
            actual: act.map(image_json),
            kind: match (e, act) {
                (Some(_), None) => DriftKind::Missing,
                (None, Some(_)) => DriftKind::Extra,
                _ => DriftKind::Mismatch,
            },
            repaired: false,
            fix: Fix::Row {
                source: src.name.clone(),
                table: t.qualified.clone(),
                row_key: key.clone(),
            },
        });
    }
    Ok(out)
}

/// Do a mapped source row and a stored contribution say the same?
fn same_image(e: &Contribution, a: &Contribution, freshness_from_row: bool) -> bool {
    let mut ei = e.identities.clone();
    let mut ai = a.identities.clone();
    ei.sort();
    ai.sort();
    ei == ai
        && e.fields == a.fields
        && e.aggs == a.aggs
        && e.version == a.version
        && (!freshness_from_row || e.freshness == a.freshness)
}

/// What reports show of a row's word.
fn image_json(c: &Contribution) -> Value {
    json!({
        "identities": c.identities,
        "fields": c.fields,
        "aggs": c.aggs,
        "version": c.version,
    })
}

/// Compares the rows with these keys again (after a repair): the drifts left
/// and the rows still changing.
pub(crate) async fn verify_keys(
    store: &Store,
    mapper: &Mapper,
    src: &SourceConfig,
    t: &TableConfig,
    conn: &mut PgConnection,
    keys: &[String],
    wait: Duration,
) -> anyhow::Result<(Vec<Drift>, Vec<String>)> {
    let reader = TableReader::load(conn, src, t).await?;
    let read = read_keys(conn, src, &reader, keys).await?;
    wait_until_applied(store, src, read.marks.high, wait).await?;
    let cmp = compare(store, mapper, src, t, 0, Scope::Keys(keys), &read).await?;
    Ok((cmp.drifts, cmp.unsettled))
}
