//! The one write path: everything a `run` process writes goes through [`Sink`].
//!
//! # The durability contract
//!
//! A write of changes read from a source (a live batch, a chunk of a large
//! transaction, the pending batch at a clean stop, initial-snapshot rows and
//! their withdrawals) happens in this order, and only here:
//!
//! 1. **publish**: with `[kafka]`, every change event is sent and acknowledged
//!    by the broker (idempotent producer, `acks=all`);
//! 2. **apply**: in one store transaction holding the apply lock, the events
//!    are logged and merged into contributions, identities and profiles
//!    (role `all` and `apply` only: a `capture` process never writes derived
//!    state);
//! 3. **outbox**: the profile changes and dead letters the apply produced are
//!    delivered to Kafka, still inside the transaction (sent as soon as they
//!    are derived, so the broker's acknowledgements arrive while the store
//!    writes the derived rows; both finish before step 5);
//! 4. **checkpoint**: the source's checkpoint moves to the write's end LSN,
//!    in the same transaction (monotonic: it never moves backwards); a
//!    `capture` process records there too where it published the changes
//!    (`published_offsets`);
//! 5. **commit**;
//! 6. **acknowledge**: only after [`Sink::write`] returned may the caller
//!    report the checkpoint to the source as flushed.
//!
//! A failure or crash before 5 rolls everything back and nothing was
//! acknowledged, so the source sends the changes again: Kafka may see a
//! change twice (at-least-once, documented), the store applies it once (its
//! per-row upserts are monotonic and the event log ignores a change it has).
//!
//! Step 2 runs in two parts (`store::pipeline`): the batch is read and merged
//! without writing (prepared) while the write before it commits, then
//! written and committed in its turn, in one order for every writer.
//!
//! Changes consumed from Kafka (`--role apply`) enter at step 2 through
//! [`Sink::write_consumed`]: they are on Kafka already. Their position, the
//! consumed offsets, takes the checkpoint's place in step 4, in the same
//! transaction, which first checks that the writer still owns the apply
//! lease and holds it until commit (`store::lease`): an owner that lost it
//! neither writes nor publishes.

use std::sync::Arc;

use crate::cli::Role;
use crate::event::{ChangeEvent, Lsn};
use crate::kafka::{PublishError, Publisher};
use crate::mapping::Mapper;
use crate::store::apply::ApplyStats;
use crate::store::{Outbox, Store, StoreError};

/// What failed in a write; nothing of it was committed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store refused or lost the write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka did not acknowledge the change events.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl SinkError {
    /// What the retry policy ([`crate::retry`]) does about it.
    pub fn action(&self) -> crate::retry::Action {
        match self {
            SinkError::Store(e) => e.action(),
            SinkError::Publish(e) => e.action(),
        }
    }
}

/// The one write path of a `run` process (see the module doc).
#[derive(Clone)]
pub struct Sink {
    store: Store,
    mapper: Arc<Mapper>,
    publisher: Option<Arc<Publisher>>,
    role: Role,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("role", &self.role)
            .field("kafka", &self.publisher.is_some())
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// A sink for a process of `role`, publishing when `publisher` is given.
    pub fn new(
        store: Store,
        mapper: Arc<Mapper>,
        publisher: Option<Arc<Publisher>>,
        role: Role,
    ) -> Sink {
        Sink {
            store,
            mapper,
            publisher,
            role,
        }
    }

    /// The store it writes (for reads).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Does this process write derived state (contributions, profiles)?
    pub fn derives(&self) -> bool {
        self.role != Role::Capture
    }

    /// Does this process publish change events to Kafka?
    pub fn publishes(&self) -> bool {
        self.publisher.is_some()
    }

    /// Writes changes of `source` read from the source itself, and moves its
    /// checkpoint to `checkpoint` when given: publish → apply → outbox →
    /// checkpoint → commit. Returns once committed; only then may the caller
    /// acknowledge `checkpoint` to the source.
    pub async fn write(
        &self,
        source: &str,
        events: &[ChangeEvent],
        checkpoint: Option<Lsn>,
    ) -> Result<ApplyStats, SinkError> {
        self.write_after(source, events, checkpoint, None, None)
            .await
    }

    /// [`Sink::write`] of a batch that follows another one of the same source
    /// still in flight: it starts once that one took its place in the write
    /// order (`after` gives its ticket; dropped unfired, that one failed and
    /// so does this one), commits only if that one did, sends its own ticket
    /// to `placed`, and is derived while the one before commits (see
    /// `store::pipeline`).
    pub async fn write_after(
        &self,
        source: &str,
        events: &[ChangeEvent],
        checkpoint: Option<Lsn>,
        after: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
        placed: Option<tokio::sync::oneshot::Sender<Option<u64>>>,
    ) -> Result<ApplyStats, SinkError> {
        let after = turn_after(after).await?;
        let mut published = None;
        if let Some(p) = &self.publisher {
            if !events.is_empty() {
                published = Some(p.publish(events).await?);
                crate::failpoint::hit(crate::failpoint::Stage::AfterPublish);
            }
        }
        let events = if self.derives() { events } else { &[] };
        // Split over Kafka: the store records where the changes went (initial
        // snapshot rows too), so that "applied up to here" can be told from
        // "published".
        let position = match published.filter(|_| !self.derives()) {
            Some(p) => Position::Published(p),
            None => Position::Checkpoint,
        };
        if events.is_empty() && checkpoint.is_none() && matches!(position, Position::Checkpoint) {
            // Nothing to write: the next batch follows the one before.
            if let Some(p) = placed {
                let _ = p.send(after);
            }
            return Ok(ApplyStats::default());
        }
        self.write_in_order(source, events, checkpoint, after, position, placed)
            .await
    }

    /// Steps 2-5 of a write whose turn follows the write with ticket `after`:
    /// prepare (its ticket goes to `placed`), then finish with the outbox.
    async fn write_in_order(
        &self,
        source: &str,
        events: &[ChangeEvent],
        checkpoint: Option<Lsn>,
        after: Option<u64>,
        position: Position,
        placed: Option<tokio::sync::oneshot::Sender<Option<u64>>>,
    ) -> Result<ApplyStats, SinkError> {
        let mut prepared = self
            .store
            .prepare_after(
                &self.mapper,
                source,
                events,
                checkpoint,
                after,
                self.publisher.is_some(),
            )
            .await?;
        match position {
            Position::Checkpoint => {}
            Position::Published(p) => prepared.published(p),
            Position::Consumed(c) => prepared.consumed(c),
        }
        if let Some(p) = placed {
            let _ = p.send(Some(prepared.ticket()));
        }
        let outbox = self.publisher.as_deref().map(|p| p as &dyn Outbox);
        Ok(self.store.finish(prepared, outbox).await?)
    }

    /// Writes change events consumed from Kafka by the apply lease's owner
    /// (`--role apply`): apply → outbox → offsets → commit, only while the
    /// lease in `consumed` is the owner's. Like [`Sink::write_after`] it
    /// follows the write with ticket `after` (the one consumed before it),
    /// sends its own to `placed`, and is derived while that one commits. The
    /// events are on Kafka already: they are not published again.
    pub async fn write_consumed(
        &self,
        source: &str,
        events: &[ChangeEvent],
        consumed: crate::store::lease::Consumed,
        after: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
        placed: Option<tokio::sync::oneshot::Sender<Option<u64>>>,
    ) -> Result<ApplyStats, SinkError> {
        let after = turn_after(after).await?;
        self.write_in_order(
            source,
            events,
            None,
            after,
            Position::Consumed(consumed),
            placed,
        )
        .await
    }

    /// Records Kafka messages that are not change events (`--role apply`) in
    /// `dead_letters` and on the dead-letter topic, with `consumed`'s offsets
    /// (checked against its lease). The caller has no write in flight.
    pub async fn write_undecodable(
        &self,
        letters: Vec<crate::store::apply::DeadLetter>,
        consumed: &crate::store::lease::Consumed,
    ) -> Result<(), SinkError> {
        let source = letters
            .first()
            .map(|d| d.source.clone())
            .unwrap_or_default();
        let outbox = self.publisher.as_deref().map(|p| p as &dyn Outbox);
        Ok(self
            .store
            .record_undecodable(&source, letters, Some(consumed), outbox)
            .await?)
    }

    /// Records that the initial snapshot of `source` is complete: streaming
    /// starts from `consistent_point`. Called after the snapshot's rows and
    /// withdrawals were written.
    pub async fn complete_snapshot(
        &self,
        source: &str,
        slot: &str,
        consistent_point: Lsn,
    ) -> Result<(), SinkError> {
        Ok(self
            .store
            .complete_snapshot(source, slot, consistent_point)
            .await?)
    }
}

/// Where a write's changes stand besides its checkpoint.
enum Position {
    /// Read from the source; the checkpoint says it all.
    Checkpoint,
    /// Published to Kafka by a capture process, to these offsets.
    Published(crate::store::lease::Offsets),
    /// Consumed from Kafka by the apply lease's owner.
    Consumed(crate::store::lease::Consumed),
}

/// The ticket of the write this one follows, once that one took its place
/// (None: it follows none); Err when that one was dropped unfired (failed).
async fn turn_after(
    after: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
) -> Result<Option<u64>, SinkError> {
    match after {
        Some(before) => Ok(before.await.map_err(|_| StoreError::EarlierWriteFailed)?),
        None => Ok(None),
    }
}
