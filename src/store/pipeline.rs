//! Batches in order, the next one planned while the previous one commits.
//!
//! A write is two steps: [`Store::prepare`] reads the slice of state the
//! batch touches and runs the merge (CPU in the daemon, reads on a connection
//! of its own, no writes), and [`Store::finish`] writes the planned rows,
//! moves the checkpoint and commits. The daemon prepares batch N+1 while batch
//! N commits, so the merge and the store's writes overlap instead of taking
//! turns. Exactness rests on four rules:
//!
//! - **One order.** Every write gets a ticket when it is prepared (under the
//!   cache lock, so tickets follow the order the merge state saw the batches);
//!   `finish` waits until every earlier ticket finished. Prepare order, commit
//!   order and the merge state's order are the same.
//! - **What is uncommitted is in memory.** The cache entries a prepared batch
//!   touched stay pinned until it commits, so a later batch finds them there
//!   and never reads an older committed version by key. A read by profile (all
//!   rows of a profile, its provenance, its identifier count) or of a whole
//!   table (a truncate) waits until the earlier batches that touched it
//!   committed (see [`ReadGuard`]).
//! - **A plan counts only if nothing changed under it.** The ledger's
//!   `epoch` moves whenever the cache stops matching the store (a failure, a
//!   merge, a batch written without a plan), and the store's write generation
//!   moves with every writer, this process or another. `finish` writes a plan
//!   only if neither moved since it was prepared; otherwise it derives the
//!   batch again inside its own transaction, under the apply lock, from the
//!   store (the serial path, always exact).
//! - **A failure fails what came after it.** When a write fails (or a
//!   prepared write is dropped unfinished), every write prepared after it
//!   fails too, without writing: it was planned on top of changes that were
//!   rolled back, and its own source must stream them again from its
//!   checkpoint before it (a later batch of the same source must never commit
//!   its checkpoint past a lost one).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::apply::{self, ApplyStats, Plan, ReadGuard};
use super::{Outbox, Store, StoreError};
use crate::event::{ChangeEvent, Lsn};
use crate::failpoint::{self, Stage};
use crate::mapping::Mapper;
use crate::resolve::ProfileId;

/// How many tickets back a failure is remembered for a write that follows it.
const FAILED_HORIZON: u64 = 1 << 16;

/// The order of writes in this process (see the module doc).
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    state: Mutex<LedgerState>,
    changed: Notify,
}

#[derive(Debug)]
struct LedgerState {
    /// The next ticket to hand out (tickets start at 1).
    next_ticket: u64,
    /// Every ticket up to this one has finished.
    done_through: u64,
    /// Tickets dropped before their turn; they count as failed when it comes.
    abandoned: BTreeSet<u64>,
    /// Moves whenever the cache stops matching the store.
    epoch: u64,
    /// The epoch since which the cache's record of which keys exist is void
    /// too (rows written without a plan, a failure).
    known_since: u64,
    /// The store's write generation after the last write of this process
    /// (None: unknown).
    last_generation: Option<i64>,
    /// Tickets strictly between these two fail: they were prepared on top of
    /// a write that failed.
    poison: Option<(u64, u64)>,
    /// Tickets that failed (the recent ones): a write that follows one of
    /// them (the next batch of the same source) must fail too, even when it
    /// took its ticket after the failure.
    failed: BTreeSet<u64>,
}

impl Default for LedgerState {
    fn default() -> Self {
        LedgerState {
            next_ticket: 1,
            done_through: 0,
            abandoned: BTreeSet::new(),
            epoch: 0,
            known_since: 0,
            last_generation: None,
            poison: None,
            failed: BTreeSet::new(),
        }
    }
}

/// How far a committed write left the cache behind the store.
#[derive(Clone, Copy, PartialEq)]
enum Stale {
    /// It matches (the write was the plan made with it).
    No,
    /// Its entries may not (profiles merged: rows the batch did not load were
    /// re-pointed in the store only); which keys exist is still right.
    Entries,
    /// Nothing of it can be trusted (rows written without a plan).
    All,
}

/// How a write ended.
enum Outcome {
    /// Committed; `generation` when it took the apply lock.
    Committed {
        generation: Option<i64>,
        stale: Stale,
    },
    /// Failed or dropped: nothing of it was committed.
    Failed,
}

impl LedgerState {
    fn poisoned(&self, ticket: u64) -> bool {
        self.poison
            .is_some_and(|(failed, until)| ticket > failed && ticket < until)
    }

    fn record(&mut self, ticket: u64, outcome: Outcome) {
        debug_assert_eq!(ticket, self.done_through + 1);
        self.done_through = ticket;
        match outcome {
            Outcome::Committed { generation, stale } => {
                if generation.is_some() {
                    self.last_generation = generation;
                }
                if stale != Stale::No {
                    self.epoch += 1;
                }
                if stale == Stale::All {
                    self.known_since = self.epoch;
                }
            }
            Outcome::Failed => {
                self.epoch += 1;
                self.known_since = self.epoch;
                self.last_generation = None;
                self.poison = Some((ticket, self.next_ticket));
                self.failed.insert(ticket);
                // A follower takes its ticket right after its predecessor's.
                let horizon = ticket.saturating_sub(FAILED_HORIZON);
                self.failed = self.failed.split_off(&horizon);
            }
        }
        while self.abandoned.remove(&(self.done_through + 1)) {
            let t = self.done_through + 1;
            self.record(t, Outcome::Failed);
        }
    }
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        // A panic while holding it leaves plain counters behind.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ticket(&self) -> u64 {
        let mut st = self.lock();
        let t = st.next_ticket;
        st.next_ticket += 1;
        t
    }

    fn finished(&self, ticket: u64, outcome: Outcome) {
        self.lock().record(ticket, outcome);
        self.changed.notify_waiters();
    }

    fn abandon(&self, ticket: u64) {
        {
            let mut st = self.lock();
            if st.done_through + 1 == ticket {
                st.record(ticket, Outcome::Failed);
            } else if ticket > st.done_through {
                st.abandoned.insert(ticket);
            }
        }
        self.changed.notify_waiters();
    }

    /// Waits until every ticket before `ticket` finished; Err when one of
    /// them failed after `ticket` was prepared, or `after` failed.
    async fn turn_after(&self, ticket: u64, after: Option<u64>) -> Result<(), StoreError> {
        self.turn(ticket).await?;
        match after {
            Some(a) if self.lock().failed.contains(&a) => Err(StoreError::EarlierWriteFailed),
            _ => Ok(()),
        }
    }

    /// Waits until every ticket before `ticket` finished; Err when one of
    /// them failed after `ticket` was prepared.
    async fn turn(&self, ticket: u64) -> Result<(), StoreError> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let st = self.lock();
                if st.done_through + 1 >= ticket {
                    return if st.poisoned(ticket) {
                        Err(StoreError::EarlierWriteFailed)
                    } else {
                        Ok(())
                    };
                }
            }
            changed.await;
        }
    }
}

/// Waits for earlier uncommitted writes before the reads that need them.
struct Guard<'l> {
    ledger: &'l Ledger,
    ticket: u64,
    /// Profiles touched by earlier writes not yet committed.
    in_flight: foldhash::HashSet<ProfileId>,
    settled: bool,
}

impl ReadGuard for Guard<'_> {
    fn before_profile_reads<'a>(
        &'a mut self,
        profiles: &'a [ProfileId],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if !self.settled && profiles.iter().any(|p| self.in_flight.contains(p)) {
                self.quiesce().await?;
            }
            Ok(())
        })
    }

    fn quiesce(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if !self.settled {
                self.ledger.turn(self.ticket).await?;
                self.settled = true;
            }
            Ok(())
        })
    }
}

/// A write prepared by [`Store::prepare`], to be given to [`Store::finish`].
/// Dropped unfinished, it counts as failed (and so does every write prepared
/// after it).
pub struct Prepared<'a> {
    ledger: Arc<Ledger>,
    ticket: u64,
    epoch: u64,
    mapper: &'a Mapper,
    source: &'a str,
    events: &'a [ChangeEvent],
    checkpoint: Option<Lsn>,
    /// The write this one follows (the previous batch of its source).
    after: Option<u64>,
    /// None: derived in `finish`, under the apply lock.
    plan: Option<Plan>,
    /// Planned while an earlier write was still uncommitted.
    overlapped: bool,
    /// Consumed from Kafka by the apply lease's owner: checked against the
    /// lease and moving its offsets, in the write's transaction.
    consumed: Option<super::lease::Consumed>,
    /// Published to Kafka by a capture process: where, recorded with the
    /// checkpoint.
    published: Option<super::lease::Offsets>,
    finished: bool,
}

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("ticket", &self.ticket)
            .field("source", &self.source)
            .field("events", &self.events.len())
            .field("planned", &self.plan.is_some())
            .finish_non_exhaustive()
    }
}

impl Prepared<'_> {
    /// Its place in the write order, for a write that must follow it
    /// ([`Store::prepare_after`]).
    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    /// Makes it a write of changes consumed from Kafka: it commits only while
    /// `consumed`'s lease is the owner's, and moves its offsets with it.
    pub fn consumed(&mut self, consumed: super::lease::Consumed) {
        self.consumed = Some(consumed);
    }

    /// Makes it the write of a capture process that published its changes
    /// to these offsets: they are recorded in its transaction.
    pub fn published(&mut self, published: super::lease::Offsets) {
        self.published = Some(published);
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.ledger.abandon(self.ticket);
        }
    }
}

impl Store {
    /// Step one of a write (see the module doc): takes the write's place in
    /// the order and, when the merge state in memory can be trusted, reads
    /// and derives the batch without writing. `events` empty: a checkpoint
    /// alone. `publish`: the write's profile changes will go to an outbox
    /// (they are computed only then; a plan without them that is finished
    /// with an outbox is derived again).
    pub async fn prepare<'a>(
        &self,
        mapper: &'a Mapper,
        source: &'a str,
        events: &'a [ChangeEvent],
        checkpoint: Option<Lsn>,
        publish: bool,
    ) -> Result<Prepared<'a>, StoreError> {
        self.prepare_after(mapper, source, events, checkpoint, None, publish)
            .await
    }

    /// [`Store::prepare`] of a write that must not commit unless the write
    /// with ticket `after` (the previous batch of the same source) did: a
    /// source's checkpoint never moves past changes that were not written.
    pub async fn prepare_after<'a>(
        &self,
        mapper: &'a Mapper,
        source: &'a str,
        events: &'a [ChangeEvent],
        checkpoint: Option<Lsn>,
        after: Option<u64>,
        publish: bool,
    ) -> Result<Prepared<'a>, StoreError> {
        self.ensure_partitions(events).await?;
        let cache = match (&self.cache, events.is_empty()) {
            (Some(c), false) => Some(c.lock().await),
            _ => None,
        };
        let ticket = self.ledger.ticket();
        let mut prepared = Prepared {
            ledger: self.ledger.clone(),
            ticket,
            epoch: 0,
            mapper,
            source,
            events,
            checkpoint,
            after,
            plan: None,
            overlapped: false,
            consumed: None,
            published: None,
            finished: false,
        };
        let Some(mut cache) = cache else {
            return Ok(prepared);
        };
        let snapshot = |l: &Ledger| {
            let st = l.lock();
            (
                st.done_through,
                st.epoch,
                st.known_since,
                st.last_generation,
            )
        };
        let (done_through, mut epoch, _, mut last_generation) = snapshot(&self.ledger);
        cache.unpin_through(done_through);
        let mut settled = done_through + 1 == ticket;
        if cache.must_settle() || !cache.fresh_for(epoch) || last_generation.is_none() {
            // The cache is behind the store (or about to be: the batch before
            // merged profiles): once every earlier write committed, its
            // entries are dropped and reload from the store.
            self.ledger.turn(ticket).await?;
            settled = true;
            let known_since;
            (_, epoch, known_since, last_generation) = snapshot(&self.ledger);
            if !cache.fresh_for(epoch) {
                if cache.known_stale(known_since) {
                    cache.reset(epoch);
                } else {
                    cache.drop_stale_entries(epoch);
                }
            }
            cache.unpin_through(ticket - 1);
            cache.settled();
        }
        cache.evict_unpinned();
        prepared.epoch = epoch;
        let mut conn = self.pool.acquire().await?;
        let mut rtx = sqlx::Connection::begin_with(&mut *conn, apply::BEGIN_PROBES_ONLY).await?;
        if !cache.built() || last_generation.is_none() {
            // Settled above: nothing of this process is uncommitted.
            let (generation, empty): (i64, bool) = sqlx::query_as(
                "select (select generation from write_generation),
                        not exists (select 1 from contributions) and not exists (select 1 from identities)",
            )
            .fetch_one(&mut *rtx)
            .await?;
            if !cache.built() {
                cache.rebuilt(empty);
                cache.set_built();
            }
            self.ledger.lock().last_generation = Some(generation);
        }
        let mut guard = Guard {
            ledger: &self.ledger,
            ticket,
            in_flight: cache.pinned_profiles(),
            settled,
        };
        let plan_for = apply::PlanFor {
            dead_letters: true,
            publish,
        };
        let planned = apply::plan(
            &mut rtx,
            mapper,
            source,
            events,
            plan_for,
            Some(&mut *cache),
            Some(&mut guard),
        )
        .await;
        let guard_settled = guard.settled;
        let mut planned = match planned {
            Ok(p) => p,
            Err(e) => {
                // Entries were taken out of the cache: it is rebuilt later.
                cache.invalidate();
                return Err(e);
            }
        };
        rtx.commit().await?;
        cache.pin(ticket, std::mem::take(&mut planned.pins));
        prepared.overlapped = !guard_settled;
        if planned.stats.regrouped() {
            cache.settle_before_next();
        }
        prepared.plan = Some(planned);
        Ok(prepared)
    }

    /// Step two of a write: waits for its turn, then publishes nothing new
    /// but writes, in one store transaction, the planned rows (or derives
    /// them now, under the apply lock, when the plan no longer holds), hands
    /// the profile changes to `outbox`, moves the checkpoint and commits.
    pub async fn finish(
        &self,
        mut prepared: Prepared<'_>,
        outbox: Option<&dyn Outbox>,
    ) -> Result<ApplyStats, StoreError> {
        let ticket = prepared.ticket;
        prepared.finished = true;
        if let Err(e) = self.ledger.turn_after(ticket, prepared.after).await {
            self.ledger.finished(ticket, Outcome::Failed);
            return Err(e);
        }
        match self.write_turn(&mut prepared, outbox).await {
            Ok((stats, outcome)) => {
                self.ledger.finished(ticket, outcome);
                self.trim_cache();
                failpoint::hit(Stage::AfterCommit);
                Ok(stats)
            }
            Err(e) => {
                self.ledger.finished(ticket, Outcome::Failed);
                Err(e)
            }
        }
    }

    /// After a commit: the entries the finished writes pinned are unpinned,
    /// and past the budget the old generation goes, so that the budget holds
    /// while the stream is idle too, not only once the next write is planned
    /// (which trims first anyway: a write being planned holds the cache, and
    /// this then leaves it alone rather than wait).
    fn trim_cache(&self) {
        let Some(cache) = &self.cache else { return };
        let Ok(mut cache) = cache.try_lock() else {
            return;
        };
        let done_through = self.ledger.lock().done_through;
        cache.unpin_through(done_through);
        cache.evict_unpinned();
    }

    async fn write_turn(
        &self,
        p: &mut Prepared<'_>,
        outbox: Option<&dyn Outbox>,
    ) -> Result<(ApplyStats, Outcome), StoreError> {
        let events = p.events;
        // A large batch's event log goes by `COPY` on a connection of its
        // own pool, taken before the lock: only the lock holder logs, so it
        // never waits on another. A small one's goes in the batch's write
        // statement (`apply::write_plan`).
        let mut log = if super::event_log::by_copy(events.len()) {
            Some(self.log_pool.acquire().await?)
        } else {
            None
        };
        let mut tx = self.pool.begin().await?;
        // The event log is written in a transaction of its own, committed
        // once its `COPY` is done, while the derived rows are still being
        // written (`apply::write_plan`): before this one, never long ahead.
        let mut log = match log.as_deref_mut() {
            Some(c) => Some(sqlx::Connection::begin(c).await?),
            None => None,
        };
        // A checkpoint alone (a capture process, an empty transaction) takes
        // no lock.
        let mut outcome = Outcome::Committed {
            generation: None,
            stale: Stale::No,
        };
        if let Some(c) = &p.consumed {
            // First: an owner whose lease is gone publishes nothing either,
            // and the row lock keeps a takeover waiting until this commits.
            super::lease::hold(&mut tx, c).await?;
        }
        let stats = if events.is_empty() {
            ApplyStats::default()
        } else {
            let generation = apply::lock_probes_only(&mut tx).await?;
            let valid = {
                let st = self.ledger.lock();
                st.epoch == p.epoch && st.last_generation == Some(generation - 1)
            };
            // A plan made without the profile changes never reaches an
            // outbox: derived again, it has them.
            let valid = valid && (outbox.is_none() || p.plan.as_ref().is_some_and(|p| p.publishes));
            let how = match &p.plan {
                None => "unplanned",
                Some(_) if !valid => "rederived",
                Some(_) if p.overlapped => "overlapped",
                Some(_) => "planned",
            };
            metrics::counter!(crate::metrics::WRITES, "plan" => how).increment(1);
            let (plan, planned) = match p.plan.take() {
                Some(plan) if valid => (plan, true),
                _ => {
                    // Derived again from the store, inside this transaction.
                    let plan_for = apply::PlanFor {
                        dead_letters: true,
                        publish: outbox.is_some(),
                    };
                    let plan =
                        apply::plan(&mut tx, p.mapper, p.source, events, plan_for, None, None)
                            .await?;
                    (plan, false)
                }
            };
            // The outbox waits for the broker's acknowledgements (a round
            // trip plus its linger, 17 ms a write measured): beside the
            // derived rows' statements, not after them. Both finish before
            // the commit, so a failure of either still rolls the write back.
            let deliver = async {
                match outbox.filter(|_| plan.stats.publishes_anything()) {
                    Some(o) => o
                        .deliver(p.source, &plan.stats)
                        .await
                        .map_err(StoreError::Outbox),
                    None => Ok(()),
                }
            };
            tokio::try_join!(apply::write_plan(&mut tx, log.take(), &plan), deliver)?;
            outcome = Outcome::Committed {
                generation: Some(generation),
                stale: if !planned {
                    Stale::All
                } else if plan.stats.regrouped() {
                    Stale::Entries
                } else {
                    Stale::No
                },
            };
            plan.stats
        };
        failpoint::hit(Stage::Derived);
        if let Some(lsn) = p.checkpoint {
            sqlx::query(
                "insert into checkpoints (source, lsn) values ($1, $2::pg_lsn)
                 on conflict (source) do update set lsn = excluded.lsn, updated_at = now()
                 where checkpoints.lsn < excluded.lsn",
            )
            .bind(p.source)
            .bind(lsn.to_string())
            .execute(&mut *tx)
            .await?;
        }
        if let Some(published) = &p.published {
            super::lease::record_published(&mut tx, p.source, published).await?;
        }
        failpoint::pause(Stage::BeforeCommit).await;
        failpoint::hit(Stage::BeforeCommit);
        tx.commit().await?;
        Ok((stats, outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed() -> Outcome {
        Outcome::Committed {
            generation: Some(1),
            stale: Stale::No,
        }
    }

    #[tokio::test]
    async fn a_write_waits_for_every_earlier_one() {
        let ledger = Arc::new(Ledger::default());
        let (first, second) = (ledger.ticket(), ledger.ticket());
        let waiting = {
            let l = ledger.clone();
            tokio::spawn(async move { l.turn(second).await })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "ticket 2 went before ticket 1 finished"
        );
        ledger
            .turn(first)
            .await
            .expect("the first ticket's turn is now");
        ledger.finished(first, committed());
        waiting.await.unwrap().expect("its turn, after a commit");
    }

    #[tokio::test]
    async fn a_failure_fails_the_writes_prepared_after_it_and_only_those() {
        let ledger = Ledger::default();
        let (a, b, c) = (ledger.ticket(), ledger.ticket(), ledger.ticket());
        ledger.finished(a, Outcome::Failed);
        assert!(
            matches!(ledger.turn(b).await, Err(StoreError::EarlierWriteFailed)),
            "planned on top of a rolled-back write"
        );
        ledger.finished(b, Outcome::Failed);
        assert!(ledger.turn(c).await.is_err());
        ledger.finished(c, Outcome::Failed);
        let d = ledger.ticket();
        ledger
            .turn(d)
            .await
            .expect("a write prepared after the failure was known is fine");
        let st = ledger.lock();
        assert!(st.last_generation.is_none());
        assert_eq!(st.known_since, st.epoch, "the cache must be rebuilt");
    }

    #[tokio::test]
    async fn the_next_batch_of_a_source_fails_when_the_one_before_failed() {
        let ledger = Ledger::default();
        let batch = ledger.ticket();
        ledger.finished(batch, Outcome::Failed);
        // The source's next batch took its ticket after the failure was known:
        // not poisoned, but it follows the failed one.
        let next = ledger.ticket();
        ledger
            .turn(next)
            .await
            .expect("an unrelated write would go ahead");
        assert!(matches!(
            ledger.turn_after(next, Some(batch)).await,
            Err(StoreError::EarlierWriteFailed)
        ));
        let other = ledger.ticket();
        ledger.finished(next, Outcome::Failed);
        ledger
            .turn_after(other, Some(next - 1))
            .await
            .expect_err("still remembered");
    }

    #[tokio::test]
    async fn a_write_dropped_unfinished_counts_as_failed() {
        let ledger = Ledger::default();
        let (a, b, c) = (ledger.ticket(), ledger.ticket(), ledger.ticket());
        // b is dropped while a is still in flight: it fails at its turn.
        ledger.abandon(b);
        ledger.finished(a, committed());
        assert_eq!(ledger.lock().done_through, b);
        assert!(matches!(
            ledger.turn(c).await,
            Err(StoreError::EarlierWriteFailed)
        ));
    }

    #[test]
    fn a_merge_voids_the_entries_but_not_which_keys_exist() {
        let ledger = Ledger::default();
        let a = ledger.ticket();
        ledger.finished(
            a,
            Outcome::Committed {
                generation: Some(7),
                stale: Stale::Entries,
            },
        );
        let st = ledger.lock();
        assert_eq!((st.epoch, st.known_since), (1, 0));
        assert_eq!(st.last_generation, Some(7));
    }
}
