//! `tributary run --role apply`: one owner applies the change topics to the
//! store; the other instances stand by and take over when it dies.
//!
//! Identity resolution is one global graph, so profile writes have one owner
//! at a time: the instance that holds the store's apply lease
//! (`store::lease`). It reads every partition of the change topics (assigned,
//! not through a group rebalance), and each of its writes moves the consumed
//! offsets in the store, in the write's own transaction, after checking that
//! the lease is still its own. A standby that takes the lease over (it
//! expired: the owner died; or it was released: a clean stop) starts at the
//! store's offsets, so a takeover neither loses nor applies a change twice,
//! and waits for no consumer-group rebalance: it happens within
//! `lease_ttl_ms` plus one try (a fifth of it, at most a second).
//!
//! The owner's loop: read messages into a batch, and hand it over once it
//! holds `batch_max_events` (or is `batch_max_wait_ms` old) and one of two
//! write slots is free, per source in the order it came (each partition's
//! order is its rows' commit order), to the write path
//! ([`crate::sink::Sink::write_consumed`]): one write is derived while the
//! one before commits, and the next batch is read meanwhile. The last write of a batch carries the batch's offsets; writes
//! commit in order, and a failed one fails those after it, so stored offsets
//! never pass a change that is not in the store. A transient failure (the
//! store restarting, the broker away) restarts the owner's loop from the
//! store's offsets after a backoff; a lost lease makes the instance a
//! standby again; a definite failure stops the process.
//!
//! After the store, the offsets are also committed to the consumer group
//! `[kafka] group_id` (best effort), so that the usual lag tools show the
//! owner's progress; they are read only when the store has none yet (an
//! upgrade from instances that kept their offsets in Kafka alone).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, KafkaConfig};
use crate::event::ChangeEvent;
use crate::retry::Action;
use crate::sink::{Sink, SinkError};
use crate::store::apply::{ApplyStats, DeadLetter};
use crate::store::lease::{Consumed, Lease, Offsets};
use crate::store::{Store, StoreError};

/// Writes in flight at once: one commits while the next is derived.
const IN_FLIGHT: usize = 2;

/// How often the owner looks for partitions added to the change topics.
const PARTITIONS_EVERY: Duration = Duration::from_secs(30);

/// Runs until `shutdown`; an error here stops the daemon (exit 3).
/// `owning` says, for the rest of the process (the scheduled
/// reconciliation), whether this instance holds the lease now.
pub async fn apply_from_kafka(
    cfg: Config,
    k: KafkaConfig,
    sink: Sink,
    owning: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let holder = instance_id();
    let store = sink.store().clone();
    let owns = |yes: bool| {
        owning.store(yes, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::APPLY_LEASE_OWNER).set(if yes { 1.0 } else { 0.0 });
    };
    owns(false);
    tracing::info!(holder = %holder, group = %k.group_id, "apply instance started; waiting for the apply lease");
    loop {
        let Some(lease) = standby(&store, &holder, &k, &shutdown).await else {
            tracing::info!("apply role stopped cleanly");
            return Ok(());
        };
        owns(true);
        tracing::info!(holder = %holder, epoch = lease.epoch, "took the apply lease: this instance owns profile writes");
        let lost = CancellationToken::new();
        let renewing = tokio::spawn(renew(store.clone(), lease.clone(), lost.clone()));
        let owner = Owner {
            cfg: &cfg,
            k: &k,
            sink: &sink,
            lease: &lease,
            shutdown: &shutdown,
            lost: &lost,
        };
        let owned = own(owner).await;
        renewing.abort();
        owns(false);
        match owned {
            Ok(()) => {
                // A clean stop: every write committed; the standby need not
                // wait for the lease to expire.
                if let Err(e) = store.release_lease(&lease).await {
                    tracing::warn!(error = %format!("{e:#}"), "could not release the apply lease; a standby takes it once it expires");
                }
                tracing::info!("apply role stopped cleanly");
                return Ok(());
            }
            Err(OwnerError::LeaseLost) => {
                tracing::warn!(
                    epoch = lease.epoch,
                    "lost the apply lease (not renewed in time; another instance took it): standing by"
                );
            }
            Err(OwnerError::Stop(e)) => {
                let _ = store.release_lease(&lease).await;
                return Err(e);
            }
        }
    }
}

/// Who this instance is in the lease: host, process id, a random part.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Waits until this instance holds the lease (None: shut down first).
async fn standby(
    store: &Store,
    holder: &str,
    k: &KafkaConfig,
    shutdown: &CancellationToken,
) -> Option<Lease> {
    let every = (k.lease_ttl / 5).min(Duration::from_secs(1));
    let mut said: Option<i64> = None;
    loop {
        match store.acquire_lease(holder, &k.group_id, k.lease_ttl).await {
            Ok(Some(lease)) => return Some(lease),
            Ok(None) => {
                if let Ok(Some(h)) = store.lease_holder().await {
                    if said != Some(h.epoch) {
                        tracing::info!(owner = %h.holder, epoch = h.epoch, expires_in_ms = h.expires_in_ms,
                            "standing by: another apply instance owns profile writes; taking over when its lease expires");
                        said = Some(h.epoch);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reach the store to take the apply lease; trying again");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return None,
        }
    }
}

/// Renews `lease` every third of its time to live; cancels `lost` once it
/// is another instance's. A store that cannot be reached is tried again: the
/// writes themselves check the lease, so an expired one never writes.
async fn renew(store: Store, lease: Lease, lost: CancellationToken) {
    loop {
        tokio::time::sleep(lease.ttl / 3).await;
        match store.renew_lease(&lease).await {
            Ok(true) => {}
            Ok(false) => {
                lost.cancel();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "renewing the apply lease failed; trying again");
            }
        }
    }
}

/// Why the owner stopped owning.
enum OwnerError {
    /// Another instance holds the lease now.
    LeaseLost,
    /// A definite failure: the process stops.
    Stop(anyhow::Error),
}

/// What the owner works with while it holds the lease.
#[derive(Clone, Copy)]
struct Owner<'a> {
    cfg: &'a Config,
    k: &'a KafkaConfig,
    sink: &'a Sink,
    lease: &'a Lease,
    shutdown: &'a CancellationToken,
    /// Cancelled once the lease is another instance's.
    lost: &'a CancellationToken,
}

/// The owner's work until shutdown (Ok) or until it is no longer the owner.
/// Transient failures start it over from the store's offsets.
async fn own(o: Owner<'_>) -> Result<(), OwnerError> {
    let Owner { shutdown, lost, .. } = o;
    let mut backoff = crate::retry::backoff();
    loop {
        let err = match apply_owned(o).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if lost.is_cancelled() || is_lease_lost(&err) {
            return Err(OwnerError::LeaseLost);
        }
        if crate::retry::classify_anyhow(&err) == Action::Stop {
            return Err(OwnerError::Stop(err));
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        tracing::warn!(error = %format!("{err:#}"), retry_in_ms = delay.as_millis(),
            "applying from kafka failed; starting again from the store's offsets");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return Ok(()),
            () = lost.cancelled() => return Err(OwnerError::LeaseLost),
        }
    }
}

fn is_lease_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::LeaseLost { .. })
        ) || matches!(
            c.downcast_ref::<SinkError>(),
            Some(SinkError::Store(StoreError::LeaseLost { .. }))
        )
    })
}

/// A Kafka failure while consuming (the broker away, a partition leader
/// moving): retried from the store's offsets.
#[derive(Debug, thiserror::Error)]
#[error("kafka: {what}: {error}")]
pub struct ConsumeError {
    what: &'static str,
    #[source]
    error: rdkafka::error::KafkaError,
}

impl ConsumeError {
    /// What the retry policy does about it: the broker may be back.
    pub fn action(&self) -> Action {
        Action::Retry
    }
}

/// A write handed to the write path, not yet known to have committed.
struct InFlight {
    source: String,
    task: JoinHandle<Result<ApplyStats, SinkError>>,
    /// Its place in the write order, for the write after it.
    placed: Option<oneshot::Receiver<Option<u64>>>,
    /// One commit time per transaction (for the latency metrics).
    times: Vec<chrono::DateTime<chrono::Utc>>,
    started: std::time::Instant,
    /// The offsets it moves (the last write of a batch).
    offsets: Offsets,
}

impl InFlight {
    /// Waits for the write to complete, then [`InFlight::done`].
    async fn finish(mut self, consumer: &StreamConsumer) -> anyhow::Result<()> {
        let res = (&mut self.task).await;
        self.done(res, consumer)
    }

    /// Settles a completed write: its error, or its metrics and the group
    /// commit of its offsets.
    fn done(
        self,
        res: Result<Result<ApplyStats, SinkError>, tokio::task::JoinError>,
        consumer: &StreamConsumer,
    ) -> anyhow::Result<()> {
        let stats = res??;
        tracing::debug!(source = %self.source, events = stats.events, stale = stats.stale, "batch applied from kafka");
        crate::metrics::batch_applied(&self.source, &stats, &self.times, self.started.elapsed());
        commit_to_group(consumer, &self.offsets);
        Ok(())
    }
}

/// Commits `offsets` to the consumer group too, for lag tools (best effort:
/// the store's are the ones that count).
fn commit_to_group(consumer: &StreamConsumer, offsets: &Offsets) {
    if offsets.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "committing offsets to the consumer group failed (the store has them)");
    }
}

/// The owner's loop proper (see the module doc): Ok at shutdown, Err on any
/// failure, with the writes in flight settled or abandoned.
async fn apply_owned(o: Owner<'_>) -> anyhow::Result<()> {
    let Owner {
        cfg,
        k,
        sink,
        lease,
        ..
    } = o;
    let c = super::client_config(
        k,
        "tributary-apply",
        &[
            ("group.id", k.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
        ],
    );
    let consumer: StreamConsumer = c.create().map_err(|e| {
        anyhow::anyhow!(
            "kafka: cannot create the consumer (check [kafka] brokers and options): {e}"
        )
    })?;
    let consumer = Arc::new(consumer);
    let topics: Vec<String> = super::change_topics(cfg, k).into_iter().collect();
    let mut positions = start_positions(&consumer, sink.store(), &topics, &lease.group).await?;
    assign(&consumer, &positions)?;
    tracing::info!(group = %k.group_id, topics = topics.len(), partitions = positions.len(), "applying change topics from Kafka");
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let out = consume(o, &consumer, &topics, &mut positions, &mut inflight).await;
    match out {
        Ok(()) => {
            // A clean stop: what was handed over commits.
            while let Some(f) = inflight.pop_front() {
                f.finish(&consumer).await?;
            }
            Ok(())
        }
        Err(e) => {
            // Not aborted: a write stopped inside its commit would leave the
            // write order waiting for it. Those after a failed one fail at
            // once; the others commit, and the store's offsets say so.
            for f in inflight {
                let _ = f.task.await;
            }
            Err(e)
        }
    }
}

/// Where to start in each partition: the store's offset, else (a store
/// without any, after an upgrade) the consumer group's, else the beginning.
async fn start_positions(
    consumer: &Arc<StreamConsumer>,
    store: &Store,
    topics: &[String],
    group: &str,
) -> anyhow::Result<BTreeMap<(String, i32), Offset>> {
    let parts = partitions(consumer, topics).await?;
    let stored = store.consumer_offsets(group).await?;
    let mut start: BTreeMap<(String, i32), Offset> = parts
        .iter()
        .map(|tp| {
            let at = stored
                .get(tp)
                .map_or(Offset::Beginning, |o| Offset::Offset(*o));
            (tp.clone(), at)
        })
        .collect();
    if stored.is_empty() && !parts.is_empty() {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            tpl.add_partition(t, *p);
        }
        let c = consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || c.committed_offsets(tpl, Duration::from_secs(10)))
                .await?;
        match committed {
            Ok(tpl) => {
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        start.insert((e.topic().to_owned(), e.partition()), Offset::Offset(o));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the consumer group's offsets; starting at the beginning of each partition (re-applying is idempotent)");
            }
        }
    }
    Ok(start)
}

/// Every partition of `topics` (a topic not created yet has none).
async fn partitions(
    consumer: &Arc<StreamConsumer>,
    topics: &[String],
) -> anyhow::Result<BTreeSet<(String, i32)>> {
    let c = consumer.clone();
    let topics = topics.to_vec();
    let parts = tokio::task::spawn_blocking(move || {
        let mut parts = BTreeSet::new();
        for t in &topics {
            let md = c
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .map_err(|error| ConsumeError {
                    what: "reading the change topics' partitions",
                    error,
                })?;
            for topic in md.topics() {
                for p in topic.partitions() {
                    parts.insert((topic.name().to_owned(), p.id()));
                }
            }
        }
        Ok::<_, ConsumeError>(parts)
    })
    .await??;
    Ok(parts)
}

fn assign(
    consumer: &StreamConsumer,
    positions: &BTreeMap<(String, i32), Offset>,
) -> anyhow::Result<()> {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), at) in positions {
        tpl.add_partition_offset(t, *p, *at)?;
    }
    consumer.assign(&tpl).map_err(|error| ConsumeError {
        what: "assigning the change topics' partitions",
        error,
    })?;
    Ok(())
}

/// Messages read and not yet handed to the write path.
#[derive(Default)]
struct Batch {
    events: Vec<ChangeEvent>,
    /// The next offset to read in each partition the batch came from.
    next: Offsets,
    undecodable: Vec<DeadLetter>,
    /// When the batch is due even if not full (`batch_max_wait_ms` after its
    /// first message).
    deadline: Option<tokio::time::Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.undecodable.is_empty()
    }

    fn len(&self) -> usize {
        self.events.len() + self.undecodable.len()
    }
}

/// Polls the change topics and hands batches to the write path until
/// shutdown (Ok) or a failure; `positions` follows what was handed over,
/// `inflight` holds the writes not yet known to have committed.
///
/// As a source loop does, it keeps reading while its writes are in flight:
/// a batch is handed over once it is full or `batch_max_wait_ms` old *and* a
/// write slot is free, so under a backlog every write carries a full batch
/// (handing over whatever the linger collected gave writes of a few hundred
/// changes, each paying a commit and the lease check).
async fn consume(
    o: Owner<'_>,
    consumer: &Arc<StreamConsumer>,
    topics: &[String],
    positions: &mut BTreeMap<(String, i32), Offset>,
    inflight: &mut VecDeque<InFlight>,
) -> anyhow::Result<()> {
    let Owner {
        cfg,
        k,
        lease,
        shutdown,
        lost,
        ..
    } = o;
    let max = cfg.sink.batch_max_events;
    let linger = Duration::from_millis(cfg.sink.batch_max_wait_ms);
    let mut looked = tokio::time::Instant::now();
    let mut batch = Batch::default();
    loop {
        let due = batch.len() >= max
            || batch
                .deadline
                .is_some_and(|d| d <= tokio::time::Instant::now());
        if due && inflight.len() < IN_FLIGHT {
            hand_over(o, consumer, std::mem::take(&mut batch), positions, inflight).await?;
        }
        // Partitions are re-assigned from `positions`, which do not cover the
        // batch being read: only between batches (right after a hand-over,
        // so that a steady backlog does not put it off for ever).
        if batch.is_empty() && looked.elapsed() >= PARTITIONS_EVERY {
            looked = tokio::time::Instant::now();
            let now = partitions(consumer, topics).await?;
            let new: Vec<_> = now
                .difference(&positions.keys().cloned().collect())
                .cloned()
                .collect();
            if !new.is_empty() {
                tracing::info!(
                    partitions = new.len(),
                    "new partitions on the change topics; reading them from their beginning"
                );
                for tp in new {
                    positions.insert(tp, Offset::Beginning);
                }
                assign(consumer, positions)?;
            }
        }
        let reading = batch.len() < max;
        // A due batch waiting for a write slot is handed over when a write
        // completes, not by the timer (which would fire at once, in a loop).
        let wake = match batch.deadline {
            Some(d) if inflight.len() < IN_FLIGHT => d,
            _ => tokio::time::Instant::now() + Duration::from_secs(1),
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // A clean stop: what was read is written (the caller waits
                // for every write in flight).
                if !batch.is_empty() {
                    hand_over(o, consumer, batch, positions, inflight).await?;
                }
                return Ok(());
            }
            () = lost.cancelled() => {
                // Nothing of the batch is written; the new owner reads it again.
                return Err(StoreError::LeaseLost { epoch: lease.epoch }.into());
            }
            res = async { (&mut inflight.front_mut().expect("guarded by !inflight.is_empty()").task).await }, if !inflight.is_empty() => {
                let f = inflight.pop_front().expect("in flight");
                f.done(res, consumer)?;
            }
            msg = consumer.recv(), if reading => {
                let m = msg.map_err(|error| ConsumeError {
                    what: "receiving from the change topics",
                    error,
                })?;
                batch.deadline.get_or_insert_with(|| tokio::time::Instant::now() + linger);
                batch.next.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
                match super::envelope::decode(m.key(), m.payload().unwrap_or_default()) {
                    Ok(e) => batch.events.push(e),
                    Err(error) => {
                        tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error,
                            "a message that is not a change envelope goes to dead_letters");
                        batch.undecodable.push(super::envelope::undecodable(
                            &k.topic_prefix,
                            m.topic(),
                            m.partition(),
                            m.offset(),
                            m.key(),
                            m.payload().unwrap_or_default(),
                            &error,
                        ));
                    }
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Hands `batch` to the write path: one write per source, in the order the
/// messages came (each partition's order is kept); the last write carries the
/// batch's offsets. Waits for the oldest write when both slots are taken.
async fn hand_over(
    o: Owner<'_>,
    consumer: &Arc<StreamConsumer>,
    batch: Batch,
    positions: &mut BTreeMap<(String, i32), Offset>,
    inflight: &mut VecDeque<InFlight>,
) -> anyhow::Result<()> {
    let Owner { sink, lease, .. } = o;
    let Batch {
        events,
        next,
        undecodable,
        ..
    } = batch;
    for (tp, o) in &next {
        positions.insert(tp.clone(), Offset::Offset(*o));
    }
    let mut by_source: BTreeMap<String, Vec<ChangeEvent>> = BTreeMap::new();
    for e in events {
        match by_source.get_mut(&e.source) {
            Some(events) => events.push(e),
            None => {
                by_source.insert(e.source.clone(), vec![e]);
            }
        }
    }
    if !undecodable.is_empty() {
        // Rare: written alone, after every write before it committed,
        // with the batch's offsets when nothing else carries them.
        while let Some(f) = inflight.pop_front() {
            f.finish(consumer).await?;
        }
        let consumed = Consumed {
            lease: lease.clone(),
            offsets: if by_source.is_empty() {
                next.clone()
            } else {
                Offsets::new()
            },
        };
        sink.write_undecodable(undecodable, &consumed).await?;
        if by_source.is_empty() {
            commit_to_group(consumer, &next);
        }
    }
    let writes = by_source.len();
    for (i, (source, events)) in by_source.into_iter().enumerate() {
        if inflight.len() >= IN_FLIGHT {
            if let Some(oldest) = inflight.pop_front() {
                oldest.finish(consumer).await?;
            }
        }
        let mut commits: Vec<(crate::event::Lsn, chrono::DateTime<chrono::Utc>)> = events
            .iter()
            .map(|e| (e.commit_lsn, e.commit_time))
            .collect();
        commits.sort();
        commits.dedup_by_key(|c| c.0);
        let times = commits.into_iter().map(|c| c.1).collect();
        let offsets = if i + 1 == writes {
            next.clone()
        } else {
            Offsets::new()
        };
        let consumed = Consumed {
            lease: lease.clone(),
            offsets: offsets.clone(),
        };
        let after = inflight.back_mut().and_then(|f| f.placed.take());
        let (placed_tx, placed) = oneshot::channel();
        let (sink, src) = (sink.clone(), source.clone());
        let task = tokio::spawn(async move {
            sink.write_consumed(&src, &events, consumed, after, Some(placed_tx))
                .await
        });
        inflight.push_back(InFlight {
            source,
            task,
            placed: Some(placed),
            times,
            started: std::time::Instant::now(),
            offsets,
        });
    }
    Ok(())
}
