//! The pure merge core: contributions, the identity graph, per-field
//! resolution and aggregates. No I/O.
//!
//! Think in contributions: the latest word of every source row. A row's own
//! changes are ordered by its version column (when configured) and then by
//! (commit LSN, position in the transaction); an older change never replaces a
//! newer one, so duplicates, replays and reordering cannot move anything
//! backwards. Traits are a pure function of a profile's contributions:
//!
//! * fields: among the profile's live rows with a non-null value, the freshest
//!   (`updated_at`, else commit time) wins, then the higher source priority,
//!   then the larger row key (strategy `priority` puts priority first);
//! * aggregates: count/sum/max/min over the profile's live rows that pass the
//!   aggregate's filter, kept incrementally (subtract the old input, add the
//!   new); a max/min whose extreme is withdrawn is recomputed from the rows.
//!
//! Profiles are the connected components of the links the rows' *current*
//! images make: an image that links identifiers of two profiles merges them
//! into the smaller id, and when a row's identifiers are withdrawn (a delete,
//! an identifier changed or set to NULL) the profile it left is split into
//! the components its remaining rows make ([`State::split_unlinked`]); an
//! identifier no live row carries leaves its profile. Only the newest image of
//! a row links (an older or duplicate one is stale and links nothing), so the
//! partition of identifiers into profiles depends only on the rows' current
//! images, never on arrival order or on history.
//!
//! Which part of a split keeps the profile's id: each identifier remembers the
//! profile it belonged to before merges moved it (its *first* profile, kept in
//! [`State::first`] only where it differs from the owner); the part holding
//! the identifier with the smallest first profile keeps the id (a merge's
//! survivor is the smaller id, so that is the part it came from), and every
//! other part gets a new id.
//!
//! [`State`] may hold all of the store (the in-memory [`State`] used by property
//! tests, rebuild and reconciliation) or just the part a batch touches (loaded
//! by the store adapter); the rules are the same. What changed is recorded in
//! [`ChangeLog`] for the adapter to write.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashSet};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::config::{AggFn, AggregateConfig, Strategy};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::identity::Ident;
use crate::mapping::{MapError, Mapper, TableMapping};

/// Profile identifier.
pub type ProfileId = i64;

/// Identity of a source row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowRef {
    /// Source name.
    pub source: String,
    /// `schema.table`.
    pub table: String,
    /// Canonical JSON of the key columns.
    pub row_key: String,
}

/// What one source row says about one profile (its latest word).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contribution {
    /// The row.
    pub row: RowRef,
    /// The profile it belongs to (None for a deleted row).
    pub profile_id: Option<ProfileId>,
    /// Tombstone of a deleted row.
    pub deleted: bool,
    /// Normalised identifiers of the row's latest image.
    pub identities: Vec<Ident>,
    /// Non-null mapped field values.
    pub fields: BTreeMap<String, Value>,
    /// Inputs to aggregates (present only for rows that pass the filter).
    pub aggs: BTreeMap<String, Value>,
    /// Version column value.
    pub version: Option<i64>,
    /// Commit LSN of the change that wrote this.
    pub lsn: Lsn,
    /// Position inside that transaction.
    pub seq: u64,
    /// Freshness of the values.
    pub freshness: DateTime<Utc>,
    /// Source priority.
    pub priority: i32,
    /// The digest of the image's mapped columns ([`crate::store::digest`]),
    /// which reconciliation compares with the source's (None when unknown: an
    /// unchanged TOAST value, or loaded from the store).
    #[serde(skip)]
    pub digest: Option<i64>,
}

/// Is `new` a later word of the row than `old`?
///
/// Versions decide when both rows have one and `old` is not a tombstone (a row
/// re-inserted after a delete starts a new life whose versions may restart);
/// otherwise (commit LSN, position) decides. Equal means the same change: not newer.
pub fn is_newer(new: &Contribution, old: &Contribution) -> bool {
    if let (Some(nv), Some(ov)) = (new.version, old.version) {
        if !old.deleted && nv != ov {
            return nv > ov;
        }
    }
    (new.lsn, new.seq) > (old.lsn, old.seq)
}

/// Running state of one aggregate of one profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AggState {
    /// Rows contributing.
    pub n: i64,
    /// Sum of inputs (sum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<Number>,
    /// Current extreme (max/min).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<Value>,
    /// The extreme was withdrawn and must be recomputed from the rows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// Adds or subtracts two JSON numbers, exactly for integers.
fn num_add(a: Option<&Number>, b: &Value, sign: i64) -> Option<Number> {
    let b_num = match b {
        Value::Number(n) => n.clone(),
        Value::String(s) => match s
            .parse::<i64>()
            .map(Number::from)
            .ok()
            .or_else(|| s.parse::<f64>().ok().and_then(Number::from_f64))
        {
            Some(n) => n,
            // Not a finite number ("NaN", "Infinity"): the sum stays.
            None => return a.cloned(),
        },
        _ => return a.cloned(),
    };
    let a = a.cloned().unwrap_or_else(|| Number::from(0));
    if let (Some(x), Some(y)) = (a.as_i64(), b_num.as_i64()) {
        if let Some(r) = y.checked_mul(sign).and_then(|y| x.checked_add(y)) {
            return Some(Number::from(r));
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let r = a.as_f64().unwrap_or(0.0) + b_num.as_f64().unwrap_or(0.0) * sign as f64;
    // A sum that leaves the finite range keeps its last value rather than
    // becoming nothing (the mapping already refuses non-finite inputs).
    Number::from_f64(r).or(Some(a))
}

/// Total order on JSON scalars for max/min: numbers < strings < others, numbers
/// numerically, strings by text (timestamps are normalised so text order is time order).
pub fn cmp_json(a: &Value, b: &Value) -> Ordering {
    let rank = |v: &Value| match v {
        Value::Number(_) => 0,
        Value::String(_) => 1,
        _ => 2,
    };
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => rank(a)
            .cmp(&rank(b))
            .then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

impl AggState {
    fn add(&mut self, func: AggFn, input: &Value) {
        self.n += 1;
        match func {
            AggFn::Count => {}
            AggFn::Sum => self.s = num_add(self.s.as_ref(), input, 1),
            AggFn::Max | AggFn::Min => self.offer(func, input),
        }
    }

    /// Takes `input` as the extreme if it beats the current one. While the
    /// extreme is stale the rows will be rescanned anyway.
    fn offer(&mut self, func: AggFn, input: &Value) {
        if self.stale {
            return;
        }
        let better = self.v.as_ref().is_none_or(|cur| {
            let o = cmp_json(input, cur);
            (func == AggFn::Max && o == Ordering::Greater)
                || (func == AggFn::Min && o == Ordering::Less)
        });
        if better {
            self.v = Some(input.clone());
        }
    }

    fn remove(&mut self, func: AggFn, input: &Value) {
        self.n -= 1;
        match func {
            AggFn::Count => {}
            AggFn::Sum => self.s = num_add(self.s.as_ref(), input, -1),
            AggFn::Max | AggFn::Min => {
                if self.n == 0 {
                    self.v = None;
                    self.stale = false;
                } else if self
                    .v
                    .as_ref()
                    .is_none_or(|cur| cmp_json(input, cur) == Ordering::Equal)
                {
                    self.stale = true;
                }
            }
        }
    }

    fn merge_from(&mut self, func: AggFn, other: &AggState) {
        self.n += other.n;
        match func {
            AggFn::Count => {}
            AggFn::Sum => {
                if let Some(s) = &other.s {
                    self.s = num_add(self.s.as_ref(), &Value::Number(s.clone()), 1);
                }
            }
            AggFn::Max | AggFn::Min => {
                self.stale |= other.stale;
                if let Some(v) = &other.v {
                    self.offer(func, v);
                }
            }
        }
    }

    /// The trait value, or None when no row contributes.
    pub fn value(&self, func: AggFn) -> Option<Value> {
        if self.n <= 0 {
            return None;
        }
        match func {
            AggFn::Count => Some(Value::from(self.n)),
            AggFn::Sum => Some(Value::Number(
                self.s.clone().unwrap_or_else(|| Number::from(0)),
            )),
            AggFn::Max | AggFn::Min => self.v.clone(),
        }
    }
}

/// Recomputes a max/min from the inputs of a profile's rows.
pub fn extreme<'a>(func: AggFn, inputs: impl Iterator<Item = &'a Value>) -> Option<Value> {
    let it = inputs.filter(|v| !v.is_null());
    match func {
        AggFn::Max => it.max_by(|a, b| cmp_json(a, b)).cloned(),
        AggFn::Min => it.min_by(|a, b| cmp_json(a, b)).cloned(),
        _ => None,
    }
}

/// One profile's non-derived state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileState {
    /// Set when merged into another profile.
    pub merged_into: Option<ProfileId>,
    /// Identifiers the profile owns (for the merge limit).
    #[serde(default, skip)]
    pub identities: i64,
    /// Running aggregates by name.
    pub aggs: BTreeMap<String, AggState>,
}

/// The winning value of a field, with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Winner {
    /// The value.
    pub value: Value,
    /// The row it came from.
    pub row: RowRef,
    /// Its freshness.
    pub freshness: DateTime<Utc>,
    /// Commit LSN of the change that wrote it.
    pub lsn: Lsn,
}

/// Picks the winning value of every field among a profile's live contributions.
pub fn resolve_fields<'a>(
    contribs: impl IntoIterator<Item = &'a Contribution>,
    strategy: impl Fn(&str) -> Strategy,
) -> BTreeMap<String, Winner> {
    let mut best: BTreeMap<&str, &Contribution> = BTreeMap::new();
    for c in contribs.into_iter().filter(|c| !c.deleted) {
        for field in c.fields.keys() {
            let wins = match best.get(field.as_str()) {
                None => true,
                Some(cur) => {
                    let fresh = c.freshness.cmp(&cur.freshness);
                    let prio = c.priority.cmp(&cur.priority);
                    let first = match strategy(field) {
                        Strategy::Freshest => fresh.then(prio),
                        Strategy::Priority => prio.then(fresh),
                    };
                    first.then_with(|| c.row.cmp(&cur.row)) == Ordering::Greater
                }
            };
            if wins {
                best.insert(field.as_str(), c);
            }
        }
    }
    best.into_iter()
        .map(|(f, c)| {
            (
                f.to_owned(),
                Winner {
                    value: c.fields[f].clone(),
                    row: c.row.clone(),
                    freshness: c.freshness,
                    lsn: c.lsn,
                },
            )
        })
        .collect()
}

/// The traits document: winning fields plus aggregate values.
pub fn traits(
    fields: &BTreeMap<String, Winner>,
    aggs: &BTreeMap<String, AggState>,
    defs: &BTreeMap<String, AggregateConfig>,
) -> Map<String, Value> {
    let mut t: Map<String, Value> = fields
        .iter()
        .map(|(k, w)| (k.clone(), w.value.clone()))
        .collect();
    for (name, st) in aggs {
        if let Some(def) = defs.get(name) {
            if let Some(v) = st.value(def.func) {
                t.insert(name.clone(), v);
            }
        }
    }
    t
}

/// What a batch changed, for the store adapter to write.
#[derive(Debug, Default, Clone)]
pub struct ChangeLog {
    /// Rows whose contribution was written.
    pub contributions: BTreeSet<RowRef>,
    /// Identifiers assigned or re-pointed.
    pub identities: BTreeSet<Ident>,
    /// Profiles created.
    pub created: BTreeSet<ProfileId>,
    /// (loser, survivor) in the order they happened.
    pub merges: Vec<(ProfileId, ProfileId)>,
    /// Profiles whose traits must be recomputed.
    pub dirty: BTreeSet<ProfileId>,
    /// The subset of `dirty` whose field values may have changed (the rest
    /// changed only aggregates).
    pub fields_dirty: BTreeSet<ProfileId>,
    /// Profiles a row's identifiers were withdrawn from: they may have to
    /// split ([`State::split_unlinked`]).
    pub unlinked: BTreeSet<ProfileId>,
    /// (profile, new profile) for every part split off, in order.
    pub splits: Vec<(ProfileId, ProfileId)>,
    /// Identifiers that no live row carries any more: they leave their
    /// profile (their `identities` row is deleted).
    pub removed_identities: BTreeSet<Ident>,
    /// Identifiers moved to a new profile by a split: their first profile is
    /// that one from now on.
    pub first_reset: BTreeSet<Ident>,
}

/// What happened to one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The row's contribution was replaced (or withdrawn, for a delete).
    Applied,
    /// An older or duplicate change: identities linked, nothing else changed.
    Stale,
    /// The table is not mapped.
    Unmapped,
}

/// Contributions, identity owners and profile states: all of the store, or
/// the part a batch touches.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// Contributions by row.
    pub contributions: HashMap<RowRef, Contribution>,
    /// Identifier → owning (live) profile.
    pub owners: HashMap<Ident, ProfileId>,
    /// Profiles.
    pub profiles: HashMap<ProfileId, ProfileState>,
    /// Next profile id to allocate.
    pub next_profile_id: ProfileId,
    /// Identifier → the profile it belonged to before merges moved it, where
    /// that differs from its owner (see the module doc).
    pub first: HashMap<Ident, ProfileId>,
    /// What changed since the log was last taken.
    pub log: ChangeLog,
    /// Aggregate name → function (from the mapper).
    agg_funcs: BTreeMap<String, AggFn>,
    /// Whether the state holds all of the store (then every change's splits
    /// are settled as it is applied); a batch's slice leaves them in
    /// `log.unlinked` for the adapter, which loads the profiles first.
    complete: bool,
    /// Rows and identifiers this state gave a profile (written, linked, moved
    /// by a split), by that profile: with a [`SplitScope`], where a split of
    /// a batch's slice looks besides what was read for it.
    given: HashMap<ProfileId, (Vec<RowRef>, Vec<Ident>)>,
    /// Whether to keep `given` (a slice whose changes may split profiles).
    tracking: bool,
}

impl State {
    /// An empty state for this mapping that holds all of the store,
    /// allocating profile ids from 1.
    pub fn new(mapper: &Mapper) -> State {
        State {
            next_profile_id: 1,
            agg_funcs: mapper
                .aggregates()
                .iter()
                .map(|(k, v)| (k.clone(), v.func))
                .collect(),
            complete: true,
            ..Default::default()
        }
    }

    /// Whether this slice records what it gives each profile, for
    /// [`State::split_unlinked`] with a [`SplitScope`] (off when the batch
    /// cannot split anything).
    pub fn track_splits(&mut self, on: bool) {
        self.tracking = on && !self.complete;
    }

    /// An empty state for the slice of the store one batch touches: splits
    /// are left in `log.unlinked` until [`State::split_unlinked`].
    pub fn slice(mapper: &Mapper) -> State {
        State {
            complete: false,
            tracking: true,
            ..State::new(mapper)
        }
    }

    fn func(&self, agg: &str) -> AggFn {
        self.agg_funcs.get(agg).copied().unwrap_or(AggFn::Count)
    }

    /// The live profile `p` was merged into (itself when it was not).
    pub fn live(&self, mut p: ProfileId) -> ProfileId {
        // Identities are re-pointed on merge, but follow chains defensively.
        for _ in 0..64 {
            match self.profiles.get(&p).and_then(|s| s.merged_into) {
                Some(next) => p = next,
                None => break,
            }
        }
        p
    }

    /// Links identifiers into one profile (creating or merging); returns it.
    /// Refused, with nothing changed, when the profile would own more than
    /// `limit` identifiers.
    fn link(&mut self, idents: &[Ident], limit: Option<i64>) -> Result<ProfileId, MapError> {
        let mut owners: BTreeSet<ProfileId> = idents
            .iter()
            .filter_map(|i| self.owners.get(i))
            .map(|p| self.live(*p))
            .collect();
        if let Some(limit) = limit {
            let unowned = idents
                .iter()
                .filter(|i| !self.owners.contains_key(*i))
                .count();
            let size = owners
                .iter()
                .map(|p| self.profiles.get(p).map_or(0, |s| s.identities))
                .sum::<i64>()
                + i64::try_from(unowned).unwrap_or(i64::MAX);
            let largest = owners
                .iter()
                .map(|p| self.profiles.get(p).map_or(0, |s| s.identities))
                .max()
                .unwrap_or(0);
            if size > limit && size > largest {
                return Err(MapError::MergeLimit {
                    identities: size,
                    limit,
                    profiles: owners.len(),
                });
            }
        }
        let target = match owners.pop_first() {
            Some(p) => p,
            None => {
                let p = self.next_profile_id;
                self.next_profile_id += 1;
                self.profiles.insert(p, ProfileState::default());
                self.log.created.insert(p);
                self.log.dirty.insert(p);
                p
            }
        };
        for loser in owners {
            self.merge(loser, target);
        }
        for i in idents {
            if self.owners.get(i) != Some(&target) {
                if self.owners.insert(i.clone(), target).is_none() {
                    // Owned by nobody: it starts in this profile (it may
                    // have left another earlier in the batch).
                    self.log.removed_identities.remove(i);
                    self.log.first_reset.insert(i.clone());
                }
                self.log.identities.insert(i.clone());
                self.profiles.entry(target).or_default().identities += 1;
                if self.tracking {
                    self.given.entry(target).or_default().1.push(i.clone());
                }
            }
        }
        Ok(target)
    }

    fn merge(&mut self, loser: ProfileId, survivor: ProfileId) {
        let loser_state = self
            .profiles
            .get_mut(&loser)
            .map(std::mem::take)
            .unwrap_or_default();
        if let Some(l) = self.profiles.get_mut(&loser) {
            l.merged_into = Some(survivor);
        }
        for (name, st) in &loser_state.aggs {
            let func = self.func(name);
            let surv = self.profiles.entry(survivor).or_default();
            surv.aggs
                .entry(name.clone())
                .or_default()
                .merge_from(func, st);
        }
        for (ident, owner) in &mut self.owners {
            if *owner == loser {
                *owner = survivor;
                self.log.identities.insert(ident.clone());
                self.first.entry(ident.clone()).or_insert(loser);
            }
        }
        // Identifiers re-pointed here and in the store (those not loaded) alike.
        self.profiles.entry(survivor).or_default().identities += loser_state.identities;
        for c in self.contributions.values_mut() {
            if c.profile_id == Some(loser) {
                c.profile_id = Some(survivor);
                self.log.contributions.insert(c.row.clone());
            }
        }
        self.log.merges.push((loser, survivor));
        self.log.dirty.insert(survivor);
        self.log.dirty.insert(loser);
        self.log.fields_dirty.insert(survivor);
        self.log.fields_dirty.insert(loser);
    }

    /// Takes a row's contribution out of its profile's aggregates.
    fn withdraw(&mut self, c: &Contribution) {
        if let Some(p) = c.profile_id.map(|p| self.live(p)) {
            self.account(c, p, false);
        }
    }

    /// Adds a row's contribution to profile `p`'s aggregates.
    fn contribute(&mut self, c: &Contribution, p: ProfileId) {
        self.account(c, p, true);
    }

    /// Adds or subtracts `c`'s aggregate inputs in `p`, and marks what must be
    /// recomputed (fields too when the row has any).
    fn account(&mut self, c: &Contribution, p: ProfileId, add: bool) {
        for (name, input) in &c.aggs {
            let func = self.func(name);
            let st = self
                .profiles
                .entry(p)
                .or_default()
                .aggs
                .entry(name.clone())
                .or_default();
            if add {
                st.add(func, input);
            } else {
                st.remove(func, input);
            }
        }
        self.log.dirty.insert(p);
        if !c.fields.is_empty() {
            self.log.fields_dirty.insert(p);
        }
    }

    fn put(&mut self, c: Contribution) {
        if let Some(p) = c.profile_id.filter(|_| self.tracking) {
            self.given.entry(p).or_default().0.push(c.row.clone());
        }
        self.log.contributions.insert(c.row.clone());
        self.contributions.insert(c.row.clone(), c);
    }

    /// Applies one change event (insert, update, snapshot or delete; a
    /// truncate must first be expanded into deletes with [`truncate_as_deletes`]).
    ///
    /// An error means the image cannot be mapped (it becomes a dead letter);
    /// when its identifiers are NULL or unparsable, the row's previous
    /// contribution has been withdrawn all the same.
    pub fn apply(&mut self, mapper: &Mapper, ev: &ChangeEvent) -> Result<Outcome, MapError> {
        let Some(mapping) = mapper.table(&ev.source, &ev.table) else {
            return Ok(Outcome::Unmapped);
        };
        let row = RowRef {
            source: ev.source.clone(),
            table: ev.table.clone(),
            row_key: ev.row_key(),
        };
        if let Some((column, why)) = ev
            .unreadable
            .iter()
            .find(|(c, _)| ev.key.contains_key(c) || mapping.mapped.contains(c))
        {
            // The row holds a stand-in for a value it reads: the row's last
            // good word stays until the source sends one it can read.
            return Err(MapError::Unstorable {
                column: column.clone(),
                why: why.clone(),
            });
        }
        if row.row_key.len() > crate::identity::MAX_STORED_KEY_BYTES {
            // Never stored, so there is nothing of it to withdraw either.
            return Err(MapError::key_too_long(row.row_key.len()));
        }
        // Taken out rather than cloned (a contribution owns its strings and
        // maps); a path that does not replace it leaves the slot empty, and
        // it is put back.
        let prev = self.contributions.remove(&row);
        let merges_before = self.log.merges.len();
        let outcome = match ev.op {
            Op::Insert | Op::Update | Op::Snapshot => {
                self.apply_image(mapper, mapping, ev, row, prev.as_ref())
            }
            Op::Delete | Op::Truncate => {
                Ok(self.remove_row(row, prev.as_ref(), ev, mapping.priority))
            }
        };
        if let Some(mut prev) = prev.filter(|p| !self.contributions.contains_key(&p.row)) {
            // The merges this change made while the row was out re-pointed
            // the rows they could see: this one too.
            for &(loser, survivor) in &self.log.merges[merges_before..] {
                if prev.profile_id == Some(loser) {
                    prev.profile_id = Some(survivor);
                    self.log.contributions.insert(prev.row.clone());
                }
            }
            self.contributions.insert(prev.row.clone(), prev);
        }
        if self.complete && !self.log.unlinked.is_empty() {
            self.split_unlinked(&mut HashMap::default(), None);
        }
        outcome
    }

    /// [`State::apply`] of an insert, update or snapshot image, with the row's
    /// previous contribution taken out of the state.
    fn apply_image(
        &mut self,
        mapper: &Mapper,
        mapping: &TableMapping,
        ev: &ChangeEvent,
        row: RowRef,
        prev: Option<&Contribution>,
    ) -> Result<Outcome, MapError> {
        let mut new = match mapping.contribution(ev, prev.filter(|p| !p.deleted)) {
            Ok(c) => c,
            // The row's identifiers became NULL or unparsable: as it is
            // now it links nobody, so it contributes nothing any more
            // (like a delete), and the image goes to dead_letters. Other
            // errors (a mapped column dropped upstream) keep the row's
            // last good word until the mapping is fixed.
            Err(err @ (MapError::NoIdentity(_) | MapError::Identity(_))) => {
                if prev.is_some() {
                    self.remove_row(row, prev, ev, mapping.priority);
                }
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        // Only the row's newest image links: an older or duplicate one is
        // not what the row says now.
        if prev.is_some_and(|prev| !is_newer(&new, prev)) {
            return Ok(Outcome::Stale);
        }
        let p = self.link(&new.identities, mapper.max_identities())?;
        if let Some(prev) = prev {
            self.withdraw(prev);
            self.note_unlinked(prev, &new.identities);
        }
        new.profile_id = Some(p);
        self.contribute(&new, p);
        self.put(new);
        Ok(Outcome::Applied)
    }

    /// The row contributes nothing from `ev` on: its previous contribution is
    /// withdrawn and a tombstone at `ev`'s position keeps an older change from
    /// bringing it back. Stale when the stored word is newer.
    fn remove_row(
        &mut self,
        row: RowRef,
        prev: Option<&Contribution>,
        ev: &ChangeEvent,
        priority: i32,
    ) -> Outcome {
        let tomb = Contribution {
            row,
            profile_id: None,
            deleted: true,
            identities: prev.map(|p| p.identities.clone()).unwrap_or_default(),
            fields: BTreeMap::new(),
            aggs: BTreeMap::new(),
            version: prev.and_then(|p| p.version),
            lsn: ev.commit_lsn,
            seq: ev.seq,
            freshness: ev.commit_time,
            priority,
            digest: None,
        };
        if let Some(prev) = prev {
            if !is_newer(&tomb, prev) {
                return Outcome::Stale;
            }
            self.withdraw(prev);
            self.note_unlinked(prev, &[]);
        }
        self.put(tomb);
        Outcome::Applied
    }

    /// Records that `prev`'s profile may have to split when the row's new
    /// identifiers (`now`) no longer hold all of `prev`'s: an identifier it
    /// alone carried, or a link it alone made, went with it.
    fn note_unlinked(&mut self, prev: &Contribution, now: &[Ident]) {
        if prev.deleted || prev.identities.iter().all(|i| now.contains(i)) {
            return;
        }
        if let Some(p) = prev.profile_id {
            let p = self.live(p);
            self.log.unlinked.insert(p);
        }
    }

    /// Splits every profile in `log.unlinked` into the connected components
    /// of its live rows' identifiers, and takes the identifiers no live row
    /// carries out of it. The state must hold every live row and every
    /// identifier of those profiles (the complete state does; the store
    /// adapter loads them first). `firsts` gives the first profile of
    /// identifiers the state did not load it for (see the module doc); the
    /// part holding the smallest keeps the id, the others get new ones, and
    /// the aggregates of every part are recomputed from its rows.
    pub fn split_unlinked(
        &mut self,
        firsts: &mut HashMap<Ident, ProfileId>,
        within: Option<&SplitScope>,
    ) {
        let candidates: BTreeSet<ProfileId> = std::mem::take(&mut self.log.unlinked)
            .into_iter()
            .map(|p| self.live(p))
            .filter(|p| self.profiles.get(p).is_none_or(|s| s.merged_into.is_none()))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let mut rows: BTreeMap<ProfileId, Vec<RowRef>> = BTreeMap::new();
        let mut take_row = |c: &Contribution| {
            if let Some(p) = c.profile_id.filter(|_| !c.deleted).map(|p| self.live(p)) {
                if candidates.contains(&p) {
                    rows.entry(p).or_default().push(c.row.clone());
                }
            }
        };
        // With a scope: what was read for the profiles, and what this state
        // gave them or the profiles merged into them since.
        let givers: Vec<&(Vec<RowRef>, Vec<Ident>)> = match within {
            Some(_) => candidates
                .iter()
                .copied()
                .chain(
                    self.log
                        .merges
                        .iter()
                        .map(|(loser, _)| *loser)
                        .filter(|l| candidates.contains(&self.live(*l))),
                )
                .filter_map(|p| self.given.get(&p))
                .collect(),
            None => Vec::new(),
        };
        match within {
            Some(scope) => scope
                .rows
                .iter()
                .chain(givers.iter().flat_map(|g| g.0.iter()))
                .collect::<HashSet<&RowRef>>()
                .into_iter()
                .filter_map(|r| self.contributions.get(r))
                .for_each(&mut take_row),
            None => self.contributions.values().for_each(&mut take_row),
        }
        let mut idents: BTreeMap<ProfileId, Vec<Ident>> = BTreeMap::new();
        let mut take_ident = |i: &Ident, o: ProfileId| {
            let o = self.live(o);
            if candidates.contains(&o) {
                idents.entry(o).or_default().push(i.clone());
            }
        };
        match within {
            Some(scope) => scope
                .idents
                .iter()
                .chain(givers.iter().flat_map(|g| g.1.iter()))
                .collect::<HashSet<&Ident>>()
                .into_iter()
                .filter_map(|i| self.owners.get(i).map(|o| (i, *o)))
                .for_each(|(i, o)| take_ident(i, o)),
            None => self.owners.iter().for_each(|(i, o)| take_ident(i, *o)),
        }
        for p in candidates {
            let rows = rows.remove(&p).unwrap_or_default();
            let mut ids = idents.remove(&p).unwrap_or_default();
            ids.sort();
            self.split_one(p, &rows, &ids, firsts);
        }
    }

    /// [`State::split_unlinked`] of one profile, given its live rows and
    /// identifiers (sorted).
    fn split_one(
        &mut self,
        p: ProfileId,
        rows: &[RowRef],
        idents: &[Ident],
        firsts: &mut HashMap<Ident, ProfileId>,
    ) {
        let index: HashMap<&Ident, usize> =
            idents.iter().enumerate().map(|(n, i)| (i, n)).collect();
        let mut parts = Partition::new(idents.len());
        let mut carried = vec![false; idents.len()];
        for r in rows {
            let Some(c) = self.contributions.get(r) else {
                continue;
            };
            let mut first: Option<usize> = None;
            for n in c.identities.iter().filter_map(|i| index.get(i).copied()) {
                carried[n] = true;
                match first {
                    Some(f) => parts.union(f, n),
                    None => first = Some(n),
                }
            }
        }
        for (_, i) in idents.iter().enumerate().filter(|(n, _)| !carried[*n]) {
            self.owners.remove(i);
            self.first.remove(i);
            firsts.remove(i);
            self.log.identities.remove(i);
            self.log.removed_identities.insert(i.clone());
            if let Some(st) = self.profiles.get_mut(&p) {
                st.identities -= 1;
            }
        }
        // The components, each by its root, in order of their smallest
        // identifier.
        let mut components: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for n in (0..idents.len()).filter(|n| carried[*n]) {
            components.entry(parts.find(n)).or_default().push(n);
        }
        if components.len() <= 1 {
            return;
        }
        let first_of = |n: usize| -> ProfileId {
            let i = &idents[n];
            firsts
                .get(i)
                .or_else(|| self.first.get(i))
                .copied()
                .unwrap_or(p)
        };
        let keeper = components
            .iter()
            .map(|(root, members)| {
                let smallest = members.iter().map(|n| first_of(*n)).min().unwrap_or(p);
                (smallest, members[0], *root)
            })
            .min()
            .map(|(_, _, root)| root);
        let mut owner_of_root: HashMap<usize, ProfileId> = HashMap::default();
        for (root, members) in &components {
            if Some(*root) == keeper {
                owner_of_root.insert(*root, p);
                continue;
            }
            let n = self.next_profile_id;
            self.next_profile_id += 1;
            owner_of_root.insert(*root, n);
            self.profiles.insert(
                n,
                ProfileState {
                    identities: i64::try_from(members.len()).unwrap_or(i64::MAX),
                    ..ProfileState::default()
                },
            );
            if let Some(st) = self.profiles.get_mut(&p) {
                st.identities -= i64::try_from(members.len()).unwrap_or(0);
            }
            self.log.created.insert(n);
            self.log.splits.push((p, n));
            for m in members {
                let i = &idents[*m];
                self.owners.insert(i.clone(), n);
                if self.tracking {
                    self.given.entry(n).or_default().1.push(i.clone());
                }
                self.first.remove(i);
                firsts.remove(i);
                self.log.identities.insert(i.clone());
                self.log.first_reset.insert(i.clone());
            }
        }
        // Rows follow their identifiers; every part's aggregates are
        // recomputed from its rows.
        let mut aggs: BTreeMap<ProfileId, BTreeMap<String, AggState>> = owner_of_root
            .values()
            .map(|o| (*o, BTreeMap::new()))
            .collect();
        for r in rows {
            let Some(c) = self.contributions.get(r) else {
                continue;
            };
            let Some(owner) = c
                .identities
                .iter()
                .find_map(|i| index.get(i))
                .and_then(|n| owner_of_root.get(&parts.find(*n)))
                .copied()
            else {
                continue;
            };
            let target = aggs.entry(owner).or_default();
            for (name, input) in &c.aggs {
                let func = self.agg_funcs.get(name).copied().unwrap_or(AggFn::Count);
                target.entry(name.clone()).or_default().add(func, input);
            }
            if owner != p {
                if let Some(c) = self.contributions.get_mut(r) {
                    c.profile_id = Some(owner);
                }
                if self.tracking {
                    self.given.entry(owner).or_default().0.push(r.clone());
                }
                self.log.contributions.insert(r.clone());
            }
        }
        for (owner, a) in aggs {
            self.profiles.entry(owner).or_default().aggs = a;
            self.log.dirty.insert(owner);
            self.log.fields_dirty.insert(owner);
        }
    }

    /// Live contributions of a profile (full state only).
    pub fn contributions_of(&self, p: ProfileId) -> impl Iterator<Item = &Contribution> {
        self.contributions
            .values()
            .filter(move |c| c.profile_id == Some(p) && !c.deleted)
    }

    /// Recomputes stale max/min aggregates of `p` from its contributions (full state only).
    pub fn refresh_extremes(&mut self, p: ProfileId) {
        let stale: Vec<String> = self
            .profiles
            .get(&p)
            .map(|s| {
                s.aggs
                    .iter()
                    .filter(|(_, a)| a.stale)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for name in stale {
            let func = self.func(&name);
            let v = extreme(
                func,
                self.contributions_of(p).filter_map(|c| c.aggs.get(&name)),
            );
            if let Some(a) = self
                .profiles
                .get_mut(&p)
                .and_then(|s| s.aggs.get_mut(&name))
            {
                a.v = v;
                a.stale = false;
            }
        }
    }

    /// The identifiers of every profile, as sets (full state only): the
    /// partition that must equal [`components`] of the live rows.
    pub fn partition(&self) -> BTreeSet<BTreeSet<Ident>> {
        let mut by: BTreeMap<ProfileId, BTreeSet<Ident>> = BTreeMap::new();
        for (i, p) in &self.owners {
            by.entry(self.live(*p)).or_default().insert(i.clone());
        }
        by.into_values().collect()
    }

    /// Traits of every live profile, keyed by the profile's sorted identifiers
    /// (independent of id allocation order): the canonical form for comparing
    /// two states.
    pub fn canonical(&mut self, mapper: &Mapper) -> BTreeMap<Vec<Ident>, Map<String, Value>> {
        let ids: Vec<ProfileId> = self
            .profiles
            .iter()
            .filter(|(_, s)| s.merged_into.is_none())
            .map(|(p, _)| *p)
            .collect();
        let mut out = BTreeMap::new();
        for p in ids {
            self.refresh_extremes(p);
            let mut idents: Vec<Ident> = self
                .owners
                .iter()
                .filter(|(_, o)| **o == p)
                .map(|(i, _)| i.clone())
                .collect();
            if idents.is_empty() {
                // Every row of it went: an empty profile is no component.
                continue;
            }
            idents.sort();
            let fields = resolve_fields(self.contributions_of(p), |f| mapper.strategy(f));
            let t = traits(&fields, &self.profiles[&p].aggs, mapper.aggregates());
            out.insert(idents, t);
        }
        out
    }
}

/// Where the rows and identifiers of the profiles to split are, for a state
/// that holds much more than them (a batch's slice): a superset of their
/// keys, so that a split costs the size of the profiles, not of the state.
#[derive(Debug, Default)]
pub struct SplitScope {
    /// Rows.
    pub rows: BTreeSet<RowRef>,
    /// Identifiers.
    pub idents: BTreeSet<Ident>,
}

/// Union-find over `0..n` (path halving, union by size): the connected
/// components of a profile's identifiers.
#[derive(Debug)]
pub struct Partition {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl Partition {
    /// `n` singletons.
    pub fn new(n: usize) -> Partition {
        Partition {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    /// The root of `x`'s component.
    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    /// Joins the components of `a` and `b`.
    pub fn union(&mut self, a: usize, b: usize) {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return;
        }
        if self.size[a] < self.size[b] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b] = a;
        self.size[a] += self.size[b];
    }
}

/// The connected components of the links `rows` make (each row's identifiers
/// are linked): what the partition of identifiers into profiles must be.
/// Components are sorted sets, in order.
pub fn components<'a>(rows: impl IntoIterator<Item = &'a [Ident]>) -> BTreeSet<BTreeSet<Ident>> {
    let mut index: HashMap<&Ident, usize> = HashMap::default();
    let mut all: Vec<&Ident> = Vec::new();
    let mut links: Vec<(usize, usize)> = Vec::new();
    for row in rows {
        let mut first = None;
        for i in row {
            let n = *index.entry(i).or_insert_with(|| {
                all.push(i);
                all.len() - 1
            });
            match first {
                Some(f) => links.push((f, n)),
                None => first = Some(n),
            }
        }
    }
    let mut parts = Partition::new(all.len());
    for (a, b) in links {
        parts.union(a, b);
    }
    let mut out: BTreeMap<usize, BTreeSet<Ident>> = BTreeMap::new();
    for (n, i) in all.iter().enumerate() {
        out.entry(parts.find(n)).or_default().insert((*i).clone());
    }
    out.into_values().collect()
}

/// Aggregate state computed from scratch over a profile's live contributions
/// (what the incremental updates must always equal).
pub fn aggregate_from<'a>(
    contribs: impl IntoIterator<Item = &'a Contribution>,
    defs: &BTreeMap<String, AggregateConfig>,
) -> BTreeMap<String, AggState> {
    let mut out: BTreeMap<String, AggState> = BTreeMap::new();
    for c in contribs.into_iter().filter(|c| !c.deleted) {
        for (name, input) in &c.aggs {
            if let Some(def) = defs.get(name) {
                out.entry(name.clone()).or_default().add(def.func, input);
            }
        }
    }
    out
}

/// A truncate withdraws every live row of the table: one delete per row, all
/// at the truncate's position.
pub fn truncate_as_deletes(
    ev: &ChangeEvent,
    live_row_keys: impl IntoIterator<Item = Map<String, Value>>,
) -> Vec<ChangeEvent> {
    live_row_keys
        .into_iter()
        .map(|key| ChangeEvent {
            op: Op::Delete,
            row: key.clone(),
            key,
            unchanged: Vec::new(),
            unreadable: Vec::new(),
            ..ev.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A sum is never reset: not by an input that is not a finite number
    /// (PostgreSQL's numeric and float columns send "NaN", "Infinity" and
    /// "-Infinity"), not by a total that leaves the finite range.
    #[test]
    fn a_sum_is_never_reset_by_a_value_that_is_not_a_finite_number() {
        let sum = Number::from(100);
        for bad in ["NaN", "Infinity", "-Infinity", "inf", "nan"] {
            for sign in [1, -1] {
                assert_eq!(
                    num_add(Some(&sum), &json!(bad), sign),
                    Some(sum.clone()),
                    "{bad}"
                );
            }
        }
        let big = Number::from_f64(f64::MAX).unwrap();
        assert_eq!(num_add(Some(&big), &json!(f64::MAX), 1), Some(big.clone()));
        assert_eq!(
            num_add(Some(&sum), &json!("2.5"), 1),
            Number::from_f64(102.5)
        );
        assert_eq!(num_add(Some(&sum), &json!("7"), -1), Some(Number::from(93)));
    }
}
