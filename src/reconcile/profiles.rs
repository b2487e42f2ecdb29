//! Profile-level reconciliation: the store's derived state (profile rows,
//! aggregates, provenance, identity ownership) against a recomputation from
//! the profile's contributions with the merge code the daemon uses.
//!
//! Contributions are the mapped image of the sources' rows (the row-level
//! pass proves that), so a profile that matches its recomputation matches the
//! sources. Profiles are read in id ranges, each in one repeatable-read
//! transaction of the store: every apply commits derived state consistent
//! with its contributions, so a consistent read never sees a half-applied
//! batch as drift.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{json, Value};

use super::{Drift, DriftKind, Fix};
use crate::identity::Ident;
use crate::mapping::Mapper;
use crate::resolve::{
    aggregate_from, components, resolve_fields, traits, AggState, Contribution, ProfileId, Winner,
};
use crate::store::reconcile::{ProfileChunk, ProfileChunkState};
use crate::store::{Store, StoreError};

/// Profiles per store transaction.
const CHUNK: i64 = 5_000;

pub use crate::store::reconcile::StoredRow;

/// Everything the store holds about one profile.
#[derive(Debug, Default)]
pub struct Stored<'a> {
    /// The profile row (None: missing).
    pub row: Option<&'a StoredRow>,
    /// `profile_fields` by field.
    pub provenance: Option<&'a BTreeMap<String, Winner>>,
}

/// Compares one profile's stored state with the recomputation from its live
/// contributions. `owners` maps every identifier of those contributions to the
/// profile the store says owns it; `owned` is every identifier the store says
/// `p` owns. Pure.
pub fn compare(
    mapper: &Mapper,
    p: ProfileId,
    contribs: &[Contribution],
    stored: &Stored<'_>,
    owners: &HashMap<Ident, ProfileId>,
    owned: &[Ident],
) -> Vec<Drift> {
    let aggs: BTreeMap<String, AggState> = aggregate_from(contribs, mapper.aggregates())
        .into_iter()
        .filter(|(_, a)| a.n != 0)
        .collect();
    let winners = resolve_fields(contribs, |f| mapper.strategy(f));
    let expected = traits(&winners, &aggs, mapper.aggregates());
    let drift = |field: String, expected: Option<Value>, actual: Option<Value>| {
        let kind = match (&expected, &actual) {
            (Some(_), None) => DriftKind::Missing,
            (None, Some(_)) => DriftKind::Extra,
            _ => DriftKind::Mismatch,
        };
        Drift {
            profile_id: Some(p),
            field,
            expected,
            actual,
            kind,
            repaired: false,
            fix: Fix::Rederive(p),
        }
    };
    let mut out = Vec::new();

    match stored.row {
        None if contribs.is_empty() => return out,
        None => out.push(drift("profile".into(), Some(Value::Object(expected)), None)),
        Some(row) if row.merged_into.is_some() => {
            if !contribs.is_empty() {
                out.push(drift(
                    "profile".into(),
                    Some(Value::Object(expected)),
                    Some(json!({ "merged_into": row.merged_into })),
                ));
            }
            return out;
        }
        Some(row) => {
            let fields: BTreeSet<&String> = expected.keys().chain(row.traits.keys()).collect();
            for f in fields {
                let (e, a) = (expected.get(f), row.traits.get(f));
                if e != a {
                    out.push(drift(f.clone(), e.cloned(), a.cloned()));
                } else if mapper.aggregates().contains_key(f) && aggs.get(f) != row.aggs.get(f) {
                    // The trait is right but the running state behind it is not:
                    // the next change would make it wrong.
                    out.push(drift(
                        f.clone(),
                        aggs.get(f).map(|s| json!(s)),
                        row.aggs.get(f).map(|s| json!(s)),
                    ));
                }
            }
            // Provenance of the fields whose values agree.
            let empty = BTreeMap::new();
            let prov = stored.provenance.unwrap_or(&empty);
            let names: BTreeSet<&String> = winners.keys().chain(prov.keys()).collect();
            for f in names {
                let (e, a) = (winners.get(f), prov.get(f));
                if e != a && expected.get(f) == row.traits.get(f) {
                    out.push(drift(
                        format!("provenance.{f}"),
                        e.map(winner_json),
                        a.map(winner_json),
                    ));
                }
            }
        }
    }

    // The partition: the profile's rows link all of its identifiers into one
    // component, and it owns no identifier that none of them carries.
    let parts = components(contribs.iter().map(|c| c.identities.as_slice()));
    if parts.len() > 1 {
        let render = |part: &BTreeSet<Ident>| {
            json!(part
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>())
        };
        out.push(drift(
            "identities".into(),
            Some(Value::Array(parts.iter().map(render).collect())),
            Some(render(&parts.iter().flatten().cloned().collect())),
        ));
    }
    let carried: BTreeSet<&Ident> = contribs.iter().flat_map(|c| c.identities.iter()).collect();
    for id in owned.iter().filter(|i| !carried.contains(i)) {
        out.push(drift(
            format!("identity.{}:{}", id.0, id.1),
            None,
            Some(json!(p)),
        ));
    }

    // Identity ownership: every identifier of a live row points at its profile.
    let mut seen = BTreeSet::new();
    for c in contribs {
        for id in &c.identities {
            if !seen.insert(id) {
                continue;
            }
            let owner = owners.get(id).copied();
            if owner != Some(p) {
                out.push(drift(
                    format!("identity.{}:{}", id.0, id.1),
                    Some(json!(p)),
                    owner.map(|o| json!(o)),
                ));
            }
        }
    }
    out
}

fn winner_json(w: &Winner) -> Value {
    json!({
        "value": w.value,
        "source": w.row.source,
        "table": w.row.table,
        "row_key": w.row.row_key,
        "freshness": crate::pgoutput::value::format_utc(&w.freshness),
        "lsn": w.lsn.to_string(),
    })
}

/// Which profiles a pass covers.
pub enum Scope<'a> {
    /// Every profile in the store.
    All,
    /// These profiles.
    Only(&'a [ProfileId]),
}

/// Chunks checked at once (each on its own store connection): the store's
/// reads of one overlap the recomputation of another.
const PARALLEL: usize = 3;

/// Checks the profiles in `scope`; returns the drifts and the number checked.
pub async fn check(
    store: &Store,
    mapper: &Mapper,
    scope: Scope<'_>,
    progress: &crate::progress::Progress,
) -> Result<(Vec<Drift>, u64), StoreError> {
    let total: u64;
    let chunks: Vec<ProfileChunk<'_>> = match scope {
        Scope::All => {
            let (lo, hi, n) = store.profile_id_range().await?;
            total = u64::try_from(n).unwrap_or(0);
            match (lo, hi) {
                (Some(lo), Some(hi)) => (lo..=hi)
                    .step_by(usize::try_from(CHUNK).unwrap_or(5000))
                    .map(|start| ProfileChunk::Range(start, start.saturating_add(CHUNK)))
                    .collect(),
                _ => Vec::new(),
            }
        }
        Scope::Only(ids) => {
            total = ids.len() as u64;
            ids.chunks(usize::try_from(CHUNK).unwrap_or(5000))
                .map(ProfileChunk::Ids)
                .collect()
        }
    };
    let stage = progress.stage("profiles", Some(total));
    let mapper = Arc::new(mapper.clone());
    let mut drifts = Vec::new();
    let mut checked = 0u64;
    let mut chunks = chunks.into_iter().peekable();
    while chunks.peek().is_some() {
        let mut group: Vec<futures_util::future::BoxFuture<'_, ChunkResult>> = Vec::new();
        for chunk in chunks.by_ref().take(PARALLEL) {
            group.push(Box::pin(check_chunk(store, &mapper, chunk)));
        }
        for (d, n) in futures_util::future::try_join_all(group).await? {
            drifts.extend(d);
            checked += n;
            stage.inc(n);
        }
    }
    stage.done();
    drifts.sort_by(|a, b| (a.profile_id, &a.field).cmp(&(b.profile_id, &b.field)));
    Ok((drifts, checked))
}

type ChunkResult = Result<(Vec<Drift>, u64), StoreError>;

async fn check_chunk(store: &Store, mapper: &Arc<Mapper>, chunk: ProfileChunk<'_>) -> ChunkResult {
    let state = store.profile_chunk(chunk).await?;
    // The recomputation is CPU work: on a blocking thread, the chunks read
    // at once are recomputed on every core while the next reads wait on the
    // store.
    let mapper = Arc::clone(mapper);
    let compared = tokio::task::spawn_blocking(move || compare_chunk(&mapper, state)).await;
    Ok(compared.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
}

fn compare_chunk(mapper: &Mapper, state: ProfileChunkState) -> (Vec<Drift>, u64) {
    let ProfileChunkState {
        contributions: by_profile,
        profiles,
        provenance,
        owners,
    } = state;
    let all: BTreeSet<i64> = by_profile
        .keys()
        .copied()
        .chain(
            profiles
                .iter()
                .filter(|(_, r)| r.merged_into.is_none())
                .map(|(p, _)| *p),
        )
        .collect();
    // What each profile of the chunk owns (the owners of claimed identifiers
    // outside the chunk are checked in their own chunk).
    let mut owned: HashMap<ProfileId, Vec<Ident>> = HashMap::new();
    for (i, o) in owners.iter().filter(|(_, o)| all.contains(*o)) {
        owned.entry(*o).or_default().push(i.clone());
    }
    let empty = Vec::new();
    let no_idents = Vec::new();
    let mut drifts = Vec::new();
    for p in &all {
        let stored = Stored {
            row: profiles.get(p),
            provenance: provenance.get(p),
        };
        drifts.extend(compare(
            mapper,
            *p,
            by_profile.get(p).unwrap_or(&empty),
            &stored,
            &owners,
            owned.get(p).unwrap_or(&no_idents),
        ));
    }
    (drifts, all.len() as u64)
}
