//! The merge state in memory: an exact write-back cache of the profile
//! store's derived rows (source row → contribution, identifier → profile,
//! profile → aggregate state, traits, winners and the rows that carry its
//! field values), kept by the one process that writes them.
//!
//! Why: without it every batch reads back, before writing, the rows the
//! previous batch just wrote (contributions, owners, profiles, provenance,
//! members), which was a fifth of the store's time in the 1M backlog.
//!
//! Exactness rests on three rules:
//!
//! - **Every cached entry equals its store row as of the last commit, or as
//!   a prepared write will leave it.** A write takes the entries its batch
//!   touches *out* of the cache, runs the pure core ([`crate::resolve`]) on
//!   them and puts the results back, pinned ([`MergeCache::pin`]) until the
//!   write commits, so that the next batch, planned meanwhile, finds them
//!   (see `store::pipeline`). Any failure voids the cache
//!   ([`MergeCache::reset`]) and every write planned on top of it.
//! - **Nobody else wrote since.** Every writer of derived state moves the
//!   store's `write_generation` under the apply lock (see
//!   `store::apply::lock`); a plan made with the cache is written only when
//!   the counter is the one this process's last write left, so `forget`,
//!   `replay`, `reconcile --repair` or a second daemon simply cost a reload.
//!   (`begin`/`committed` are the same rule for a caller that writes one batch
//!   at a time.)
//! - **Absence is known only for a store that started empty.** When the cache
//!   is (re)built over an empty store, every key the process writes is recorded
//!   in a Bloom filter of fixed size ([`known`], an eighth of the budget, kept
//!   across evictions), so a key that was never written needs no lookup (one
//!   the filter merely may have seen is looked up); otherwise misses are read
//!   in one query per batch.
//!
//! The budget (`sink.memory_budget_mb`) bounds the estimated size of the
//! cached entries. Entries live in two generations: a write puts what it
//! touched into the young one; once the young generation holds half of what
//! the budget leaves for entries, the next write drops the old generation
//! (but for keys an uncommitted write pinned; the record of which keys exist
//! stays) and the young one becomes old. So the entries of the last stretch
//! of writes survive, a full cache costs a map swap instead of a rebuild, and
//! what was dropped reloads on demand. After a write that merged profiles the
//! next one waits for its commit and drops them: re-pointing the loser's rows
//! in memory would cost the size of the state, and the store re-points them
//! in one statement.

mod compact;
mod known;

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hash};

use foldhash::fast::FixedState;
use foldhash::{HashMap, HashMapExt, HashSet};

use self::known::KnownKeys;
use serde_json::{Map, Value};

use crate::identity::Ident;
use crate::resolve::{AggState, Contribution, ProfileId, RowRef, Winner};
pub use crate::store::apply::Pins;

/// A profile as the store holds it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CachedProfile {
    /// Set once merged into another profile.
    pub merged_into: Option<ProfileId>,
    /// Running aggregate state.
    pub aggs: BTreeMap<String, AggState>,
    /// `profiles.traits`.
    pub traits: Map<String, Value>,
    /// `profiles.provenance`, when known.
    pub winners: Option<BTreeMap<String, Winner>>,
    /// The live rows of the profile that carry field values, when known.
    pub field_rows: Option<BTreeSet<RowRef>>,
}

/// One kind of entry in two generations (see the module doc), with the
/// estimated bytes of each.
#[derive(Debug)]
struct Generations<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    young_bytes: usize,
    old_bytes: usize,
    size: fn(&K, &V) -> usize,
}

impl<K: Eq + Hash + Send + 'static, V: Send + 'static> Generations<K, V> {
    fn new(size: fn(&K, &V) -> usize) -> Self {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            young_bytes: 0,
            old_bytes: 0,
            size,
        }
    }

    fn bytes(&self) -> usize {
        self.young_bytes + self.old_bytes
    }

    fn get<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.young.get(k).or_else(|| self.old.get(k))
    }

    fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<(K, V)>
    where
        K: Borrow<Q>,
    {
        if let Some((k, v)) = self.young.remove_entry(k) {
            self.young_bytes = self.young_bytes.saturating_sub((self.size)(&k, &v));
            Some((k, v))
        } else {
            let (k, v) = self.old.remove_entry(k)?;
            self.old_bytes = self.old_bytes.saturating_sub((self.size)(&k, &v));
            Some((k, v))
        }
    }

    fn insert(&mut self, k: K, v: V) {
        self.remove::<K>(&k);
        self.young_bytes += (self.size)(&k, &v);
        self.young.insert(k, v);
    }

    /// Drops the old generation but for the keys in `keep` (moved to the
    /// young one), and makes the young generation old.
    fn rotate<'a, Q: Hash + Eq + ?Sized + 'a>(&mut self, keep: impl Iterator<Item = &'a Q>)
    where
        K: Borrow<Q>,
    {
        for k in keep {
            if let Some((k, v)) = self.old.remove_entry(k) {
                let size = (self.size)(&k, &v);
                self.old_bytes = self.old_bytes.saturating_sub(size);
                self.young_bytes += size;
                self.young.insert(k, v);
            }
        }
        let capacity = self.young.len();
        let young = std::mem::replace(&mut self.young, HashMap::with_capacity(capacity));
        drop_later(std::mem::replace(&mut self.old, young));
        self.old_bytes = std::mem::take(&mut self.young_bytes);
    }

    fn clear(&mut self) {
        drop_later(std::mem::take(&mut self.young));
        drop_later(std::mem::take(&mut self.old));
        self.young_bytes = 0;
        self.old_bytes = 0;
    }
}

/// Frees `garbage` on a thread of its own. Dropping a generation (a hundred
/// thousand entries, each a few maps and strings) took 15 % of the daemon's
/// CPU in the 1M backlog (`perf`), all of it inside the next batch's plan,
/// which holds the cache lock: the batches waited for the allocator.
fn drop_later<T: Send + 'static>(garbage: T) {
    type Garbage = Box<dyn Send>;
    static DROPPER: std::sync::LazyLock<Option<std::sync::mpsc::Sender<Garbage>>> =
        std::sync::LazyLock::new(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Garbage>();
            std::thread::Builder::new()
                .name("cache-drop".into())
                .spawn(move || rx.into_iter().for_each(drop))
                .ok()
                .map(|_| tx)
        });
    match DROPPER.as_ref() {
        Some(tx) => {
            if let Err(e) = tx.send(Box::new(garbage)) {
                drop(e.0);
            }
        }
        None => drop(garbage),
    }
}

/// The cache; see the module doc.
#[derive(Debug)]
pub struct MergeCache {
    budget: usize,
    peak: usize,
    /// The store's write generation the entries reflect; None: unknown.
    generation: Option<i64>,
    /// Names interned by the entries' compact form ([`compact`]).
    names: compact::Names,
    /// Row key → contribution, both compact.
    contributions: Generations<Box<[u8]>, Box<[u8]>>,
    /// Identifier key (compact) → owner.
    owners: Generations<Box<[u8]>, ProfileId>,
    /// Profile → compact profile.
    profiles: Generations<ProfileId, Box<[u8]>>,
    next_profile_id: Option<ProfileId>,
    suppressions: Option<HashSet<Ident>>,
    /// Whether `known` holds every key of the store.
    authoritative: bool,
    known: KnownKeys,
    /// The write ledger's epoch the entries match (see `store::pipeline`);
    /// None: not built.
    epoch: Option<u64>,
    built: bool,
    /// Keys touched by prepared writes not yet committed, by ticket: kept
    /// through evictions until they commit.
    pins: BTreeMap<u64, Pins>,
    /// The last write planned merged profiles: the next one waits until it
    /// committed and drops the entries.
    settle_next: bool,
}

impl MergeCache {
    /// An empty cache bounded by `budget` bytes (estimated).
    pub fn new(budget: usize) -> MergeCache {
        MergeCache {
            budget,
            peak: 0,
            generation: None,
            names: compact::Names::new(),
            contributions: Generations::new(|k, v| entry_size(k.len(), v.len())),
            owners: Generations::new(|k, _| entry_size(k.len(), 0)),
            profiles: Generations::new(|_, v| entry_size(0, v.len())),
            next_profile_id: None,
            suppressions: None,
            authoritative: false,
            known: KnownKeys::none(),
            epoch: None,
            built: false,
            pins: BTreeMap::new(),
            settle_next: false,
        }
    }

    /// Whether the entries match the store as of ledger epoch `epoch`.
    pub fn fresh_for(&self, epoch: u64) -> bool {
        self.built && self.epoch == Some(epoch)
    }

    /// Whether the record of which keys exist is void too (the cache was
    /// built before the ledger's epoch `known_since`).
    pub fn known_stale(&self, known_since: u64) -> bool {
        self.epoch.is_none_or(|e| e < known_since)
    }

    /// Forgets everything; to be rebuilt ([`MergeCache::rebuilt`]) for `epoch`.
    pub fn reset(&mut self, epoch: u64) {
        self.known = KnownKeys::none();
        self.drop_entries();
        self.authoritative = false;
        self.suppressions = None;
        self.next_profile_id = None;
        self.generation = None;
        self.pins.clear();
        self.built = false;
        self.epoch = Some(epoch);
    }

    /// Drops the entries but keeps which keys exist (after a merge, which
    /// re-points rows but creates or removes none), for `epoch`.
    pub fn drop_stale_entries(&mut self, epoch: u64) {
        self.drop_entries();
        self.pins.clear();
        self.epoch = Some(epoch);
    }

    /// Marks the cache rebuilt: it matches the store from here on.
    pub fn set_built(&mut self) {
        self.built = true;
    }

    /// Whether it was built for some epoch (else it must be rebuilt).
    pub fn built(&self) -> bool {
        self.built
    }

    /// Drops everything at the next [`MergeCache::reset`] (a plan failed
    /// half-way, with entries taken out).
    pub fn invalidate(&mut self) {
        self.built = false;
        self.epoch = None;
    }

    /// The next write must wait until every earlier one committed.
    pub fn settle_before_next(&mut self) {
        self.settle_next = true;
    }

    /// Whether it must.
    pub fn must_settle(&self) -> bool {
        self.settle_next
    }

    /// Every earlier write committed.
    pub fn settled(&mut self) {
        self.settle_next = false;
    }

    /// Pins the keys a prepared write (ticket `ticket`) touched.
    pub fn pin(&mut self, ticket: u64, pins: Pins) {
        self.pins.insert(ticket, pins);
    }

    /// Unpins the keys of writes up to ticket `ticket` (they finished).
    pub fn unpin_through(&mut self, ticket: u64) {
        self.pins.retain(|t, _| *t > ticket);
    }

    /// Profiles touched by writes not yet committed.
    pub fn pinned_profiles(&self) -> HashSet<ProfileId> {
        self.pins
            .values()
            .flat_map(|p| p.profiles.iter().copied())
            .collect()
    }

    /// Before a write: once the young generation holds half of what the
    /// budget leaves for entries, drops the old generation but the entries an
    /// uncommitted write touched, and makes the young one old; when what is
    /// left is still past the budget (one write touched more than it), that
    /// goes too.
    pub fn evict_unpinned(&mut self) {
        let limit = self.budget.saturating_sub(self.known.bytes());
        let young =
            self.contributions.young_bytes + self.owners.young_bytes + self.profiles.young_bytes;
        if young > limit / 2 || self.entry_bytes() > limit {
            self.rotate();
            if self.entry_bytes() > limit {
                self.rotate();
            }
        }
        metrics::gauge!(crate::metrics::CACHE_BYTES).set(self.bytes() as f64);
    }

    fn rotate(&mut self) {
        metrics::counter!(crate::metrics::CACHE_EVICTIONS).increment(1);
        let (pins, names) = (&self.pins, &self.names);
        let rows: Vec<Box<[u8]>> = pins
            .values()
            .flat_map(|p| p.rows.iter())
            .filter_map(|r| compact::find_row_key(names, r))
            .collect();
        let idents: Vec<Box<[u8]>> = pins
            .values()
            .flat_map(|p| p.idents.iter())
            .filter_map(|i| compact::find_ident_key(names, i))
            .collect();
        self.contributions.rotate(rows.iter().map(|k| &**k));
        self.owners.rotate(idents.iter().map(|k| &**k));
        self.profiles
            .rotate(pins.values().flat_map(|p| p.profiles.iter()));
    }

    fn entry_bytes(&self) -> usize {
        self.contributions.bytes() + self.owners.bytes() + self.profiles.bytes()
    }

    /// Starts a batch under the apply lock, which moved the store's write
    /// generation to `generation`. Returns false when the entries cannot be
    /// trusted (someone else wrote, or an earlier batch did not commit): the
    /// cache is then empty and the caller tells [`MergeCache::rebuilt`]
    /// whether the store is empty.
    pub fn begin(&mut self, generation: i64) -> bool {
        let valid = self.generation == Some(generation - 1);
        // Unknown until this batch commits.
        self.generation = None;
        if !valid {
            self.known = KnownKeys::none();
            self.drop_entries();
            self.authoritative = false;
            self.suppressions = None;
            self.next_profile_id = None;
        }
        valid
    }

    /// After a failed [`MergeCache::begin`]: whether the store holds no
    /// contributions and no identities (then every key is known from here on).
    pub fn rebuilt(&mut self, store_empty: bool) {
        self.authoritative = store_empty;
        self.known = if store_empty {
            KnownKeys::with_bytes((self.budget / KNOWN_SHARE).min(KNOWN_MAX))
        } else {
            KnownKeys::none()
        };
    }

    /// The batch's writes committed at `generation`.
    pub fn committed(&mut self, generation: i64, merged: bool) {
        self.generation = Some(generation);
        if merged || self.bytes() > self.budget {
            if !merged {
                metrics::counter!(crate::metrics::CACHE_EVICTIONS).increment(1);
            }
            self.drop_entries();
        }
        metrics::gauge!(crate::metrics::CACHE_BYTES).set(self.bytes() as f64);
    }

    fn drop_entries(&mut self) {
        self.contributions.clear();
        self.owners.clear();
        self.profiles.clear();
    }

    /// Whether the store may hold this row (false only when that is known).
    pub fn may_hold_row(&self, r: &RowRef) -> bool {
        !self.authoritative || self.known.may_contain(hash_of(r))
    }

    /// Whether the store may hold this identifier.
    pub fn may_hold_ident(&self, i: &Ident) -> bool {
        !self.authoritative || self.known.may_contain(hash_of(i))
    }

    /// Takes a row's contribution out (a batch's working copy).
    pub fn take_contribution(&mut self, r: &RowRef) -> Option<Contribution> {
        let k = compact::find_row_key(&self.names, r)?;
        let (_, v) = self.contributions.remove::<[u8]>(&k)?;
        Some(decoded(compact::decode_contribution(
            &self.names,
            r.clone(),
            &v,
        )))
    }

    /// The cached contribution of a row (a copy).
    pub fn contribution(&self, r: &RowRef) -> Option<Contribution> {
        let k = compact::find_row_key(&self.names, r)?;
        let v = self.contributions.get::<[u8]>(&k)?;
        Some(decoded(compact::decode_contribution(
            &self.names,
            r.clone(),
            v,
        )))
    }

    /// What the cache knows of an identifier's owner: `Some(Some(p))` owned
    /// by `p`, `Some(None)` owned by nobody (a write took it out of its
    /// profile; the store has no row for it once that write commits, and
    /// every later write commits after it), `None` not cached.
    pub fn owner(&self, i: &Ident) -> Option<Option<ProfileId>> {
        let k = compact::find_ident_key(&self.names, i)?;
        self.owners
            .get::<[u8]>(&k)
            .map(|p| Some(*p).filter(|p| *p != NO_OWNER))
    }

    /// Takes a profile out.
    pub fn take_profile(&mut self, p: ProfileId) -> Option<CachedProfile> {
        let (_, v) = self.profiles.remove(&p)?;
        Some(decoded(compact::decode_profile(&self.names, &v)))
    }

    /// The next profile id, when known.
    pub fn next_profile_id(&self) -> Option<ProfileId> {
        self.next_profile_id
    }

    /// The suppressed identifiers, when loaded.
    pub fn suppressions(&self) -> Option<&HashSet<Ident>> {
        self.suppressions.as_ref()
    }

    /// Sets the suppressed identifiers (all of them).
    pub fn set_suppressions(&mut self, s: HashSet<Ident>) {
        self.suppressions = Some(s);
    }

    /// Puts a contribution (as the batch leaves it) back.
    pub fn put_contribution(&mut self, c: Contribution) {
        if self.authoritative {
            self.know(hash_of(&c.row));
        }
        let k = compact::row_key(&mut self.names, &c.row);
        let v = compact::encode_contribution(&mut self.names, &c);
        self.contributions.insert(k, v);
        self.peak = self.peak.max(self.bytes());
    }

    /// Puts an identifier's owner back.
    pub fn put_owner(&mut self, i: Ident, p: ProfileId) {
        if self.authoritative {
            self.know(hash_of(&i));
        }
        let k = compact::ident_key(&mut self.names, &i);
        self.owners.insert(k, p);
        self.peak = self.peak.max(self.bytes());
    }

    /// Records that an identifier has no owner any more (no live row carries
    /// it): without the record, a write planned before this one commits
    /// would read the owner the store still holds.
    pub fn remove_owner(&mut self, i: Ident) {
        self.put_owner(i, NO_OWNER);
    }

    /// Puts a profile back.
    pub fn put_profile(&mut self, p: ProfileId, c: CachedProfile) {
        let v = compact::encode_profile(&mut self.names, &c);
        self.profiles.insert(p, v);
        self.peak = self.peak.max(self.bytes());
    }

    /// Sets the next profile id.
    pub fn set_next_profile_id(&mut self, p: ProfileId) {
        self.next_profile_id = Some(p);
    }

    /// Records a key the store now holds ([`known`]; its fixed size counts
    /// against the budget).
    fn know(&mut self, h: u64) {
        self.known.insert(h);
    }

    /// Estimated bytes held now.
    pub fn bytes(&self) -> usize {
        self.known.bytes() + self.entry_bytes()
    }

    /// The largest estimate seen, for the budget test and the metrics.
    pub fn peak_bytes(&self) -> usize {
        self.peak
    }
}

/// The owner recorded for an identifier that has none (profile ids start at 1).
const NO_OWNER: ProfileId = 0;

/// The key hash recorded for a written key: the same for the process's life
/// (a collision only costs a lookup of a key that is not there).
fn hash_of<T: Hash + ?Sized>(t: &T) -> u64 {
    FixedState::with_seed(0x7472_6962_7574_6172).hash_one(t)
}

/// An entry that does not decode is a bug of `compact` (its property tests
/// prove the round trip), never bad input: stop rather than merge on it.
fn decoded<T>(r: Result<T, compact::Corrupt>) -> T {
    r.expect("a cache entry decodes to what was encoded (state::compact)")
}

// Estimated bytes, as allocated on 64-bit Linux: a hash map slot (two words
// of key and value, a control byte) counted twice over for its load factor,
// and each boxed slice rounded up to mimalloc's 16-byte size classes.
const SLOT_FACTOR: usize = 2;
const SLOT: usize = 2 * std::mem::size_of::<Box<[u8]>>() + 1;
/// The record of which keys exist ([`known`]) takes an eighth of the budget,
/// at most 8 MiB: 2 MiB at the default 16 MB, where the 1M backlog's 1.25
/// million keys leave about one new key in 200 looked up for nothing.
const KNOWN_SHARE: usize = 8;
const KNOWN_MAX: usize = 8 << 20;

fn heap(len: usize) -> usize {
    len.div_ceil(16) * 16
}

fn entry_size(key: usize, value: usize) -> usize {
    SLOT_FACTOR * SLOT + heap(key) + heap(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: &str) -> RowRef {
        RowRef {
            source: "crm".into(),
            table: "public.contacts".into(),
            row_key: k.into(),
        }
    }

    fn contribution(k: &str) -> Contribution {
        Contribution {
            row: row(k),
            profile_id: Some(1),
            deleted: false,
            identities: vec![("email".into(), format!("{k}@x"))],
            fields: BTreeMap::from([("name".to_owned(), Value::from("A"))]),
            aggs: BTreeMap::new(),
            version: None,
            lsn: Default::default(),
            seq: 0,
            freshness: chrono::Utc::now(),
            priority: 0,
            digest: None,
        }
    }

    #[test]
    fn a_cache_is_trusted_only_after_its_own_last_commit() {
        let mut c = MergeCache::new(1 << 20);
        assert!(!c.begin(1), "a new cache knows nothing");
        c.rebuilt(true);
        c.put_contribution(contribution("1"));
        c.committed(1, false);
        assert!(c.begin(2), "nobody wrote in between");
        assert!(c.contribution(&row("1")).is_some());
        c.committed(2, false);
        // Generation 3 was someone else's write.
        assert!(!c.begin(4));
        assert!(c.contribution(&row("1")).is_none());
        assert!(
            c.may_hold_row(&row("1")),
            "absence is unknown after a foreign write"
        );
    }

    #[test]
    fn a_batch_that_did_not_commit_leaves_the_cache_unknown() {
        let mut c = MergeCache::new(1 << 20);
        c.begin(1);
        c.rebuilt(true);
        c.committed(1, false);
        assert!(c.begin(2));
        c.put_contribution(contribution("1"));
        // No `committed(2)`: the batch failed or was dropped.
        assert!(!c.begin(3));
        assert!(c.contribution(&row("1")).is_none());
    }

    #[test]
    fn keys_of_a_store_that_started_empty_stay_known_past_the_budget() {
        // Less than one entry and its key hash.
        let mut c = MergeCache::new(100);
        c.begin(1);
        c.rebuilt(true);
        assert!(!c.may_hold_row(&row("1")));
        c.put_contribution(contribution("1"));
        c.committed(1, false);
        assert!(
            c.contribution(&row("1")).is_none(),
            "over the budget: entries dropped"
        );
        assert!(c.contribution(&row("1")).is_none());
        assert!(
            c.may_hold_row(&row("1")),
            "the written key is known to exist"
        );
        assert!(!c.may_hold_row(&row("2")));
    }

    #[test]
    fn past_the_budget_the_oldest_entries_go_first_and_pinned_ones_stay() {
        let one = {
            let mut c = MergeCache::new(usize::MAX);
            c.put_contribution(contribution("1"));
            c.bytes()
        };
        // Room for four entries (which keys exist is not tracked: not rebuilt).
        let mut c = MergeCache::new(4 * one);
        let has = |c: &MergeCache, k: &str| c.contribution(&row(k)).is_some();
        c.put_contribution(contribution("1"));
        c.evict_unpinned();
        assert!(has(&c, "1"), "under half the budget nothing moves");
        c.put_contribution(contribution("2"));
        c.put_contribution(contribution("3"));
        c.evict_unpinned();
        assert!(
            ["1", "2", "3"].iter().all(|k| has(&c, k)),
            "the young generation became old, nothing dropped"
        );
        c.pin(
            1,
            Pins {
                rows: vec![row("1")],
                ..Pins::default()
            },
        );
        for k in ["4", "5", "6"] {
            c.put_contribution(contribution(k));
        }
        c.evict_unpinned();
        assert!(["1", "4", "5", "6"].iter().all(|k| has(&c, k)));
        assert!(
            !has(&c, "2") && !has(&c, "3"),
            "the old generation was dropped"
        );
        assert!(c.bytes() <= 4 * one);
        c.unpin_through(1);
        for k in 7..=12 {
            c.put_contribution(contribution(&k.to_string()));
        }
        c.evict_unpinned();
        assert!(
            !has(&c, "7") && !has(&c, "1"),
            "one write past the budget drops everything unpinned"
        );
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_merge_drops_the_entries() {
        let mut c = MergeCache::new(1 << 20);
        c.begin(1);
        c.rebuilt(false);
        c.put_owner(("email".into(), "a@x".into()), 1);
        c.committed(1, true);
        assert_eq!(c.owner(&("email".into(), "a@x".into())), None);
        assert!(c.begin(2), "a merge is not a foreign write");
    }
}
