//! `tributary run`: one loop per source, until shutdown.
//!
//! Each loop: make sure the publication exists; if the source was never fully
//! snapshotted, create the slot with an exported snapshot, read the tables in
//! it and apply them; then stream from the stored checkpoint. Transactions are
//! collected into batches (up to `batch_max_events` changes or
//! `batch_max_wait_ms`); a batch and the checkpoint after its last transaction
//! commit in one sink transaction, and only then is that LSN reported to the
//! server as flushed. A crash anywhere therefore replays from the checkpoint,
//! and the store's monotonic upserts make the replay a no-op.
//!
//! Transient failures (connection lost, server restarting) are retried with
//! exponential backoff; definite ones (wal_level, slot lost, auth) stop the
//! daemon with an error that says what to do.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::Role;
use crate::config::{Config, SinkConfig, SourceConfig};
use crate::endpoint::Health;
use crate::event::{ChangeEvent, Lsn, Op};
use crate::mapping::Mapper;
use crate::pgoutput::Decoded;
use crate::retry::Action;
use crate::sink::{Sink, SinkError};
use crate::source::snapshot::{snapshot, SnapshotSink};
use crate::source::spill::TxnBuffer;
use crate::source::{ensure_publication, slot_info, Replication, SourceError, StreamItem};
use crate::store::{Store, StoreError};

/// How often a status update is sent when nothing else prompts one.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// How often a status update is sent while the loop does not read the stream
/// (it waits on the store, or has as much in flight as it takes): the server
/// drops a connection that sends nothing for `wal_sender_timeout` (60 s by
/// default, often lowered), and it would then send everything again.
const REPLY_EVERY: Duration = Duration::from_secs(1);

/// Awaits `work` (a write, the settling of what is in flight) while keeping
/// the replication connection alive: a status update at `flushed`, which
/// acknowledges nothing new, every [`REPLY_EVERY`].
async fn keeping_alive<T, E: Into<LoopError>>(
    rep: &mut Replication,
    flushed: Lsn,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, LoopError> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out.map_err(Into::into),
            () = tokio::time::sleep(REPLY_EVERY) => rep.send_status(flushed).await?,
        }
    }
}

/// Batches of one source in flight at once: one commits while the next is
/// derived (see `store::pipeline`); they commit in order.
const IN_FLIGHT: usize = 2;

/// Runs the daemon until `shutdown` is cancelled or a source fails definitely.
pub async fn run(cfg: Config, role: Role, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::connect(&cfg.sink).await?;
    store.migrate().await?;
    let mapper = Arc::new(Mapper::new(&cfg));
    // An apply-only process streams no source: readiness is the store alone.
    let streamed: Vec<&str> = if role == Role::Apply {
        Vec::new()
    } else {
        cfg.sources.iter().map(|s| s.name.as_str()).collect()
    };
    let health = Arc::new(Health::new(streamed));
    if let Some(m) = &cfg.metrics {
        let handle = crate::metrics::install()?;
        crate::endpoint::serve(
            m.listen,
            handle,
            health.clone(),
            store.clone(),
            shutdown.clone(),
        )
        .await?;
        tokio::spawn(crate::metrics::sample(
            cfg.clone(),
            store.clone(),
            m.poll_interval,
            shutdown.clone(),
        ));
    }
    let publisher = match &cfg.kafka {
        Some(k) => {
            crate::kafka::create_topics(k, &crate::kafka::all_topics(&cfg, k)).await?;
            let p = Arc::new(crate::kafka::Publisher::new(k)?);
            tracing::info!(brokers = %k.brokers, prefix = %k.topic_prefix, "publishing change events to Kafka");
            Some(p)
        }
        None => None,
    };
    let sink = Sink::new(store.clone(), mapper.clone(), publisher, role);
    let shared_cfg = Arc::new(cfg.clone());
    let mut tasks = JoinSet::new();
    // Whether this process writes profiles now: a `run` always, an apply
    // instance while it holds the apply lease, a capture never. Only such a
    // process runs the scheduled reconciliation, so a split deployment runs
    // it once per interval, not once per instance.
    let owning = Arc::new(AtomicBool::new(role == Role::All));
    if let Some(every) = cfg.reconcile.interval_s {
        if role == Role::Capture {
            tracing::info!("scheduled reconciliation runs on the apply lease's owner, not in a capture process");
        } else {
            tokio::spawn(scheduled_reconcile(
                cfg.clone(),
                store.clone(),
                Duration::from_secs(every),
                owning.clone(),
                shutdown.clone(),
            ));
        }
    }
    if let Some(months) = cfg.sink.events_retention_months {
        // Once at start and then daily; a failure is logged and tried again tomorrow.
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = store.drop_old_events(months).await {
                    tracing::warn!(error = %format!("{e:#}"), "event-log retention failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        });
    }
    if role == Role::Apply {
        let k = cfg.kafka.clone().context("--role apply needs [kafka]")?;
        tasks.spawn(crate::kafka::consume::apply_from_kafka(
            cfg.clone(),
            k,
            sink.clone(),
            owning.clone(),
            shutdown.clone(),
        ));
    }
    for src in cfg.sources.clone() {
        if role == Role::Apply {
            break;
        }
        let ctx = SourceCtx {
            cfg: shared_cfg.clone(),
            src,
            settings: cfg.sink.clone(),
            sink: sink.clone(),
            shutdown: shutdown.clone(),
            health: health.clone(),
        };
        tasks.spawn(async move { ctx.run().await });
    }
    let mut first_error = None;
    while let Some(res) = tasks.join_next().await {
        let res = res.context("source task panicked").and_then(|r| r);
        if let Err(e) = res {
            tracing::error!(error = %format!("{e:#}"), "source stopped");
            shutdown.cancel(); // one definite failure stops the daemon: say so loudly, exit 3
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[derive(Clone)]
struct SourceCtx {
    /// The whole config (a table re-snapshot reads its mapping).
    cfg: Arc<Config>,
    src: SourceConfig,
    /// Batch sizes, memory budget, spill directory.
    settings: SinkConfig,
    /// The one write path (it knows the role and the publisher).
    sink: Sink,
    shutdown: CancellationToken,
    health: Arc<Health>,
}

/// What failed inside a source loop, classified by the retry policy.
#[derive(Debug, thiserror::Error)]
enum LoopError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl LoopError {
    /// What [`crate::retry`] does about it.
    fn action(&self) -> Action {
        match self {
            LoopError::Source(e) => e.action(),
            LoopError::Store(e) => e.action(),
            LoopError::Sink(e) => e.action(),
            LoopError::Other(e) => crate::retry::classify_anyhow(e),
        }
    }
}

/// Snapshot batches go through the write path without a checkpoint: the
/// snapshot is only complete, and streaming may start, once every table has
/// been read. Like the stream's, up to [`IN_FLIGHT`] batches are written at
/// once, in order (one is derived while the one before commits), while the
/// next one is read from the source.
struct SnapshotWriter<'a> {
    ctx: &'a SourceCtx,
    /// The slot's consistent point: where the snapshot's rows are.
    consistent_point: Lsn,
    inflight: VecDeque<InFlight>,
    /// Rows withdrawn so far (their `seq` follows on over the tables).
    withdrawn: u64,
}

impl SnapshotWriter<'_> {
    /// Waits until every batch handed over has committed.
    async fn settle(&mut self) -> Result<(), LoopError> {
        while let Some(f) = self.inflight.pop_front() {
            f.finish().await?;
        }
        Ok(())
    }
}

impl SnapshotSink for SnapshotWriter<'_> {
    async fn apply(&mut self, events: Vec<ChangeEvent>) -> anyhow::Result<()> {
        let ctx = self.ctx;
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS, "source" => ctx.src.name.clone())
            .increment(events.len() as u64);
        if self.inflight.len() >= IN_FLIGHT {
            if let Some(oldest) = self.inflight.pop_front() {
                oldest.finish().await?;
            }
        }
        let after = self.inflight.back_mut().and_then(|f| f.placed.take());
        let (sink, source) = (ctx.sink.clone(), ctx.src.name.clone());
        let (placed_tx, placed) = oneshot::channel();
        let task = tokio::spawn(async move {
            Ok(sink
                .write_after(&source, &events, None, after, Some(placed_tx))
                .await?)
        });
        self.inflight.push_back(InFlight {
            end: self.consistent_point,
            started: std::time::Instant::now(),
            task,
            placed: Some(placed),
        });
        Ok(())
    }

    /// Once a table's rows are all written, the rows of it that the store
    /// held from before but the snapshot did not see are gone upstream: they
    /// are withdrawn at the consistent point, and the table is recorded as
    /// done, so that a restart does not read it again.
    async fn table_done(&mut self, table: &str) -> anyhow::Result<()> {
        self.settle().await?;
        let (src, cp) = (&self.ctx.src, self.consistent_point);
        let store = self.ctx.sink.store();
        let gone = store.live_keys_before(&src.name, table, cp).await?;
        if !gone.is_empty() {
            tracing::info!(source = %src.name, table, rows = gone.len(), "withdrawing rows not seen by the snapshot");
            let deletes: Vec<ChangeEvent> = gone
                .into_iter()
                .enumerate()
                .map(|(i, key)| {
                    let key: Map<String, Value> = serde_json::from_str(&key).unwrap_or_default();
                    ChangeEvent {
                        source: src.name.clone(),
                        table: table.to_owned(),
                        op: Op::Delete,
                        row: key.clone(),
                        key,
                        unchanged: Vec::new(),
                        unreadable: Vec::new(),
                        lsn: cp,
                        commit_lsn: cp,
                        // After every row the snapshot read (their seq
                        // counts up from 0 over the tables), and unique
                        // over the tables' withdrawals.
                        seq: WITHDRAWAL_SEQ_BASE + self.withdrawn + i as u64,
                        xid: 0,
                        commit_time: chrono::Utc::now(),
                    }
                })
                .collect();
            self.withdrawn += deletes.len() as u64;
            for chunk in deletes.chunks(self.ctx.settings.batch_max_events) {
                self.ctx.sink.write(&src.name, chunk, None).await?;
            }
        }
        store.snapshot_table_done(&src.name, table).await?;
        Ok(())
    }
}

/// The `seq` of the first withdrawal of an initial snapshot, above any row it
/// can read (`seq` orders changes at one LSN).
const WITHDRAWAL_SEQ_BASE: u64 = 1 << 62;

impl SourceCtx {
    async fn run(&self) -> anyhow::Result<()> {
        let mut backoff = crate::retry::backoff();
        loop {
            let started = Instant::now();
            let result = self.stream_once().await;
            self.health.set_streaming(&self.src.name, false);
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.action() == Action::Retry && !self.shutdown.is_cancelled() => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = crate::retry::backoff(); // it worked for a while: start over
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(source = %self.src.name, error = %format!("{e:#}"), retry_in_ms = delay.as_millis(), "source interrupted; reconnecting");
                    metrics::counter!(crate::metrics::RECONNECTS, "source" => self.src.name.clone()).increment(1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(_) if self.shutdown.is_cancelled() => return Ok(()),
                Err(e) => return Err(anyhow::Error::new(e)),
            }
        }
    }

    /// Connects, snapshots if needed, and streams until shutdown or an error.
    async fn stream_once(&self) -> Result<(), LoopError> {
        let src = &self.src;
        // No transaction of this source is buffered now: a spill file of it is
        // a killed run's (its transaction is received again).
        let spill = &self.settings.spill_dir;
        match crate::source::spill::remove_stale(spill, &src.name) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(source = %src.name, files = n, dir = %spill.display(), "removed spill files of an earlier run");
            }
            Err(e) => {
                return Err(LoopError::Other(anyhow::Error::new(e).context(format!(
                    "remove spill files of an earlier run from {} (sink.spill_dir)",
                    spill.display()
                ))))
            }
        }
        let added = ensure_publication(src).await?;
        let checkpoint = self.sink.store().checkpoint(&src.name).await?;
        if checkpoint.as_ref().is_some_and(|cp| cp.snapshot_completed) && !added.is_empty() {
            // The source streams already: these tables' changes were not in
            // the stream (newly mapped, or removed from the publication for a
            // while). Their rows are read again once the stream runs.
            tracing::warn!(source = %src.name, tables = ?added,
                "tables were not in the publication; their rows will be read again (watermarked) while the stream runs");
            self.sink
                .store()
                .add_pending_table_snapshots(&src.name, &added)
                .await?;
        }
        let slot = slot_info(src).await?;
        let mut rep = Replication::connect(src).await?;
        if let (Some(cp), Some(info)) = (&checkpoint, &slot) {
            if cp.snapshot_completed && info.wal_status.as_deref() == Some("lost") {
                return Err(SourceError::SlotInvalidated {
                    source_name: src.name.clone(),
                    slot: src.slot.clone(),
                    checkpoint: cp.lsn,
                }
                .into());
            }
            if let Some(safe) = info.safe_wal_size.filter(|b| *b < 64 * 1024 * 1024) {
                tracing::warn!(source = %src.name, slot = %src.slot, safe_wal_size = safe, "slot is close to invalidation by max_slot_wal_keep_size");
            }
        }
        let (system_id, timeline, wal_end) = rep.identify().await?;
        if let Some(cp) = checkpoint.as_ref().filter(|cp| cp.snapshot_completed) {
            let left = match &cp.generation {
                Some((_, tli)) if *tli != timeline => rep.switch_point(timeline, *tli).await?,
                _ => None,
            };
            crate::source::same_generation(
                &src.name,
                cp.lsn,
                cp.generation.as_ref(),
                (&system_id, timeline, wal_end),
                left,
            )?;
        }
        let from = match (&checkpoint, &slot) {
            (Some(cp), Some(_)) if cp.snapshot_completed => cp.lsn,
            (Some(cp), None) if cp.snapshot_completed => {
                return Err(SourceError::SlotLost {
                    source_name: src.name.clone(),
                    slot: src.slot.clone(),
                    checkpoint: cp.lsn,
                }
                .into())
            }
            _ => {
                self.initial_snapshot(&mut rep, slot.as_ref(), checkpoint.as_ref())
                    .await?
            }
        };
        self.sink
            .store()
            .record_generation(&src.name, &system_id, timeline)
            .await?;
        rep.start(&src.slot, &src.publication, from).await?;
        self.health.set_streaming(&src.name, true);
        self.start_pending_table_snapshots().await?;
        let watch = self.watch_publication();
        let result = self.stream(&mut rep, from).await;
        watch.abort();
        rep.close().await;
        result
    }

    /// While the stream runs, checks the publication every
    /// `heartbeat_interval_s` (30 s by default; never when 0): a mapped table
    /// someone removed from it is added back, recorded as pending and read
    /// again (its changes in between were not in the stream), as at start.
    fn watch_publication(&self) -> tokio::task::AbortHandle {
        let every = Duration::from_secs(self.src.heartbeat_interval_s);
        let ctx = self.clone();
        tokio::spawn(async move {
            let (src, store, shutdown) = (&ctx.src, ctx.sink.store(), &ctx.shutdown);
            if every.is_zero() {
                return;
            }
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = shutdown.cancelled() => return,
                }
                let added = match ensure_publication(src).await {
                    Ok(added) => added,
                    Err(e) => {
                        tracing::warn!(source = %src.name, error = %format!("{e:#}"), "publication check failed");
                        continue;
                    }
                };
                if added.is_empty() {
                    continue;
                }
                tracing::warn!(source = %src.name, tables = ?added,
                    "tables were removed from the publication while streaming; added back, their rows will be read again");
                let pending = store.add_pending_table_snapshots(&src.name, &added).await;
                if let Err(e) = pending.map_err(LoopError::from) {
                    tracing::warn!(source = %src.name, error = %format!("{e:#}"), "could not record the tables to read again");
                } else if let Err(e) = ctx.start_pending_table_snapshots().await {
                    tracing::warn!(source = %src.name, error = %format!("{e:#}"), "could not start reading the tables again");
                }
            }
        })
        .abort_handle()
    }

    /// Reads again, in the background while this stream runs, the tables
    /// recorded as pending for the source; each is marked done once read. A
    /// failure is logged and tried again at the next connect.
    async fn start_pending_table_snapshots(&self) -> Result<(), LoopError> {
        let store = self.sink.store().clone();
        let pending = store.pending_table_snapshots(&self.src.name).await?;
        if pending.is_empty() {
            return Ok(());
        }
        if !self.sink.derives() {
            // A capture process never writes derived state: the read is left
            // to a process that does (`tributary snapshot --table`, or a
            // `run --role all`), and the record stays until then.
            tracing::warn!(source = %self.src.name, tables = ?pending,
                "tables must be read again (they were out of the publication); run tributary snapshot --source for each");
            return Ok(());
        }
        let (cfg, source, shutdown) = (
            self.cfg.clone(),
            self.src.name.clone(),
            self.shutdown.clone(),
        );
        tokio::spawn(async move {
            for table in pending {
                let read = crate::resnapshot::snapshot(
                    &cfg,
                    &store,
                    &source,
                    Some(&table),
                    Duration::from_secs(600),
                    crate::progress::Progress::hidden(),
                );
                let result = tokio::select! {
                    r = read => r,
                    () = shutdown.cancelled() => return,
                };
                match result {
                    // The re-snapshot cleared the record.
                    Ok(_) => {
                        tracing::info!(source = %source, table = %table, "table read again (it was out of the publication, or its initial snapshot was interrupted)")
                    }
                    Err(e) => {
                        tracing::warn!(source = %source, table = %table, error = %format!("{e:#}"),
                            "re-snapshot of a pending table failed; it is tried again at the next connect");
                    }
                }
            }
        });
        Ok(())
    }

    async fn initial_snapshot(
        &self,
        rep: &mut Replication,
        slot: Option<&crate::source::SlotInfo>,
        checkpoint: Option<&crate::store::Checkpoint>,
    ) -> Result<Lsn, LoopError> {
        let src = &self.src;
        if let Some(slot) = slot {
            if let Some(cp) = self.resumable(slot, checkpoint) {
                return self.resume_snapshot(cp, checkpoint).await;
            }
            // A slot without a completed snapshot: a previous snapshot was
            // interrupted (or the store is new). Its exported snapshot is gone, so
            // start over; rows already applied are overwritten idempotently.
            tracing::warn!(source = %src.name, slot = %src.slot, "slot exists but no completed snapshot in the store; recreating the slot and snapshotting again");
            rep.drop_slot(&src.slot).await?;
        }
        let created = rep.create_slot(&src.slot).await?;
        let store = self.sink.store();
        store
            .begin_snapshot(&src.name, &src.slot, created.consistent_point)
            .await?;
        let mut writer = SnapshotWriter {
            ctx: self,
            consistent_point: created.consistent_point,
            inflight: VecDeque::new(),
            withdrawn: 0,
        };
        let running =
            metrics::gauge!(crate::metrics::SNAPSHOT_RUNNING, "source" => src.name.clone());
        running.set(1.0);
        let rows = snapshot(
            src,
            &created.snapshot_name,
            created.consistent_point,
            self.settings.batch_max_events,
            &mut writer,
        )
        .await;
        running.set(0.0);
        if rows.is_err() {
            // What is in flight commits or fails on its own; a retry starts
            // after it (the next write takes its place in the store's order).
            let _ = writer.settle().await;
        }
        let rows = rows?;
        self.sink
            .complete_snapshot(&src.name, &src.slot, created.consistent_point)
            .await?;
        tracing::info!(source = %src.name, rows, lsn = %created.consistent_point, "initial snapshot complete");
        Ok(created.consistent_point)
    }

    /// The consistent point of an interrupted initial snapshot that can be
    /// resumed: the slot it was taken with still stands at that point, some
    /// of its tables are done, and this process reads tables again itself
    /// (it derives, and publishes nothing: a watermarked read is not sent to
    /// Kafka, so a publishing process reads every table again instead).
    fn resumable(
        &self,
        slot: &crate::source::SlotInfo,
        checkpoint: Option<&crate::store::Checkpoint>,
    ) -> Option<Lsn> {
        let cp = checkpoint?;
        let (slot_name, at) = cp.snapshot.as_ref()?;
        (!cp.snapshot_completed
            && !cp.snapshot_tables_done.is_empty()
            && *slot_name == self.src.slot
            && slot.confirmed_flush == *at
            && self.sink.derives()
            && !self.sink.publishes())
        .then_some(*at)
    }

    /// Resumes an interrupted initial snapshot at `cp`: the tables it
    /// finished stay, the others are read again (watermarked) once the
    /// stream runs from `cp`, as a table added to a streaming source is.
    async fn resume_snapshot(
        &self,
        cp: Lsn,
        checkpoint: Option<&crate::store::Checkpoint>,
    ) -> Result<Lsn, LoopError> {
        let src = &self.src;
        let done = checkpoint.map_or(&[][..], |c| &c.snapshot_tables_done[..]);
        let rest: Vec<String> = src
            .tables
            .iter()
            .map(|t| t.qualified.clone())
            .filter(|t| !done.contains(t))
            .collect();
        tracing::warn!(source = %src.name, slot = %src.slot, lsn = %cp, done = ?done, rest = ?rest,
            "resuming an interrupted initial snapshot: the tables it finished are kept, the rest are read again while the stream runs");
        let store = self.sink.store();
        store.add_pending_table_snapshots(&src.name, &rest).await?;
        self.sink
            .complete_snapshot(&src.name, &src.slot, cp)
            .await?;
        Ok(cp)
    }

    /// The streaming loop: read, batch, apply with checkpoint, acknowledge.
    ///
    /// While batches are applied by background tasks, the next one is read
    /// and decoded. Up to [`IN_FLIGHT`] batches per source are in flight: one
    /// commits while the next is derived, and they commit in order (the store's
    /// write order, `store::pipeline`); a full batch stops reading until the
    /// oldest one in flight is done (that is the backpressure), and an LSN is
    /// acknowledged only after the batch that ends there has committed.
    ///
    /// A transaction is buffered until its commit within `max_txn_memory_mb`
    /// and spilled to disk beyond it; protocol v2 streams in-progress
    /// transactions, buffered the same way per transaction and dropped on
    /// Stream Abort (or only the aborted subtransaction's changes).
    async fn stream(&self, rep: &mut Replication, checkpoint: Lsn) -> Result<(), LoopError> {
        let mut p = Pending {
            flushed: checkpoint,
            batch: Vec::new(),
            end: None,
            deadline: None,
            inflight: VecDeque::new(),
        };
        let result = self.stream_into(rep, &mut p).await;
        if result.is_err() {
            // The batches already being written go on (they need the store,
            // not this connection): waiting a while for them lets the
            // reconnect resume after them instead of streaming them again.
            // A store that does not answer is not waited for: what commits
            // later is recognised as applied when it comes again.
            let written = async {
                while let Some(f) = p.inflight.pop_front() {
                    if f.finish().await.is_err() {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), written).await;
        }
        result
    }

    /// [`SourceCtx::stream`], with its pending batches in `p`.
    async fn stream_into(&self, rep: &mut Replication, p: &mut Pending) -> Result<(), LoopError> {
        let linger = Duration::from_millis(self.settings.batch_max_wait_ms);
        let max = self.settings.batch_max_events;
        let budget = self.settings.max_txn_memory_bytes;
        let spill = self.settings.spill_dir.clone();
        let mut open: Option<TxnBuffer> = None; // the (non-streamed) transaction being received
        let mut streams: HashMap<u32, TxnBuffer> = HashMap::new(); // protocol v2, by top-level xid
        let mut in_stream: Option<u32> = None;
        let heartbeat_every = Duration::from_secs(self.src.heartbeat_interval_s);
        let mut last_data = Instant::now();
        let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
        let io = |e: std::io::Error| {
            LoopError::Other(anyhow::Error::new(e).context(format!(
                "spill a large transaction to {} (sink.spill_dir): free space there or point \
                 sink.spill_dir at a larger disk; nothing was acknowledged, so the transaction \
                 is received again and applied once it fits",
                spill.display()
            )))
        };
        loop {
            if let Some(end) = p.end {
                let due = p.batch.len() >= max || p.deadline.is_some_and(|d| d <= Instant::now());
                if due && p.inflight.len() < IN_FLIGHT {
                    let after = p.inflight.back_mut().and_then(|f| f.placed.take());
                    let f = self.start_apply(std::mem::take(&mut p.batch), end, after);
                    p.inflight.push_back(f);
                    p.end = None;
                    p.deadline = None;
                }
            }
            // A due batch waiting for the one in flight is started when that one
            // completes, not by the timer (which would fire at once, in a loop).
            let reading = p.batch.len() < max;
            // Not reading, the loop sees no keepalive request: it answers unasked.
            let status_every = if reading {
                STATUS_INTERVAL
            } else {
                REPLY_EVERY
            };
            let idle_tick = if heartbeat_every.is_zero() {
                status_every
            } else {
                heartbeat_every.min(status_every)
            };
            let deadline = match p.deadline {
                Some(d) if p.inflight.len() < IN_FLIGHT => d.min(Instant::now() + status_every),
                _ => Instant::now() + idle_tick,
            };
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    let flushed = p.flushed;
                    keeping_alive(rep, flushed, p.settle(self)).await?;
                    rep.send_status(p.flushed).await?;
                    tracing::info!(source = %self.src.name, lsn = %p.flushed, "stopped cleanly");
                    return Ok(());
                }
                res = async { p.inflight.front_mut().map(|f| &mut f.task).expect("guarded by !inflight.is_empty()").await }, if !p.inflight.is_empty() => {
                    let f = p.inflight.pop_front().expect("in flight");
                    let stats = res.map_err(|e| LoopError::Other(anyhow::anyhow!("apply task failed: {e}")))??;
                    tracing::debug!(source = %self.src.name, events = stats.events, stale = stats.stale, dead = stats.dead_letters, merges = stats.merges, lsn = %f.end, ms = f.started.elapsed().as_millis(), "batch applied");
                    p.flushed = f.end;
                    rep.send_status(p.flushed).await?;
                }
                item = rep.next(), if reading => match item? {
                    StreamItem::Decoded(items) => {
                        last_data = Instant::now();
                        for d in items {
                            match d {
                                Decoded::Begin { .. } => open = Some(TxnBuffer::new(budget)),
                                Decoded::Change(ev) => {
                                    let buf = match in_stream {
                                        Some(xid) => streams.entry(xid).or_insert_with(|| TxnBuffer::new(budget)),
                                        None => open.as_mut().ok_or_else(|| SourceError::Decode {
                                            source_name: self.src.name.clone(),
                                            lsn: ev.lsn,
                                            error: crate::pgoutput::DecodeError::OutsideTransaction,
                                        })?,
                                    };
                                    buf.push(ev, &spill).map_err(io)?;
                                }
                                Decoded::Commit { end_lsn, .. } => {
                                    let txn = open.take().unwrap_or_else(|| TxnBuffer::new(budget));
                                    if end_lsn <= p.seen() {
                                        continue; // the server may resend transactions at or before the checkpoint
                                    }
                                    if txn.spilled() || txn.len() > max {
                                        self.apply_large(rep, p, txn, end_lsn, None).await?;
                                    } else {
                                        let mut chunks = txn.into_chunks(max).map_err(io)?;
                                        p.batch.extend(chunks.next_chunk().map_err(io)?);
                                        p.end = Some(end_lsn);
                                        p.deadline.get_or_insert_with(|| Instant::now() + linger);
                                    }
                                }
                                Decoded::StreamStart { xid } => in_stream = Some(xid),
                                Decoded::StreamStop => in_stream = None,
                                Decoded::StreamCommit { xid, commit_lsn, end_lsn, commit_time } => {
                                    let txn = streams.remove(&xid).unwrap_or_else(|| TxnBuffer::new(budget));
                                    if end_lsn > p.seen() {
                                        self.apply_large(rep, p, txn, end_lsn, Some((commit_lsn, commit_time))).await?;
                                    }
                                }
                                Decoded::StreamAbort { xid, subxid } => {
                                    if xid == subxid {
                                        streams.remove(&xid); // dropping the buffer deletes its spill file
                                    } else if let Some(buf) = streams.get_mut(&xid) {
                                        buf.abort_subtransaction(subxid);
                                    }
                                }
                                Decoded::Message { .. } | Decoded::Nothing => {}
                            }
                        }
                    }
                    StreamItem::Keepalive { wal_end, reply } => {
                        metrics::gauge!(crate::metrics::LAG_BYTES, "source" => self.src.name.clone())
                            .set(wal_end.0.saturating_sub(p.flushed.0) as f64);
                        // Nothing received is waiting to be applied: everything the
                        // server has sent up to wal_end is in the store, so the slot
                        // may advance even when the WAL was all unpublished tables.
                        let idle = open.is_none() && streams.is_empty() && p.end.is_none() && p.inflight.is_empty();
                        let advanced = idle && wal_end > p.flushed;
                        if advanced {
                            p.flushed = wal_end;
                        }
                        // The server stops sending keepalives once we report what it
                        // sent, so answering an advance at once cannot ping-pong.
                        if reply || advanced {
                            rep.send_status(p.flushed).await?;
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    if rep.since_status() >= status_every {
                        rep.send_status(p.flushed).await?;
                    }
                    // An idle source gets a heartbeat in its own WAL (fire and forget:
                    // a failure only means the slot advances a little later).
                    let idle = !heartbeat_every.is_zero() && last_data.elapsed() >= heartbeat_every;
                    if idle && heartbeat.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                        let src = self.src.clone();
                        last_data = Instant::now();
                        heartbeat = Some(tokio::spawn(async move {
                            match crate::source::heartbeat(&src).await {
                                Ok(()) => tracing::debug!(source = %src.name, "heartbeat"),
                                Err(e) => tracing::warn!(source = %src.name, error = %format!("{e:#}"), "heartbeat failed"),
                            }
                        }));
                    }
                }
            }
        }
    }

    /// Applies one transaction that does not fit a batch (or was spilled), in
    /// chunks of `batch_max_events`: everything before it is settled first, the
    /// chunks commit one by one and only the last moves the checkpoint to
    /// `end`. A crash between chunks replays the whole transaction, whose
    /// already-applied changes are then stale and change nothing. `stamp`
    /// (commit LSN and time) is given for a streamed transaction, whose changes
    /// learn their place only now.
    async fn apply_large(
        &self,
        rep: &mut Replication,
        p: &mut Pending,
        txn: TxnBuffer,
        end: Lsn,
        stamp: Option<(Lsn, chrono::DateTime<chrono::Utc>)>,
    ) -> Result<(), LoopError> {
        let io = |e: std::io::Error| {
            LoopError::Other(anyhow::Error::new(e).context("read back a spilled transaction"))
        };
        let flushed = p.flushed;
        keeping_alive(rep, flushed, p.settle(self)).await?;
        let started = std::time::Instant::now();
        let total = txn.len();
        let mut chunks = txn
            .into_chunks(self.settings.batch_max_events)
            .map_err(io)?;
        let mut seq: u64 = 0;
        let mut next = chunks.next_chunk().map_err(io)?;
        while !next.is_empty() {
            let mut chunk = std::mem::replace(&mut next, chunks.next_chunk().map_err(io)?);
            if let Some((commit_lsn, commit_time)) = stamp {
                for ev in &mut chunk {
                    ev.commit_lsn = commit_lsn;
                    ev.commit_time = commit_time;
                    ev.seq = seq;
                    seq += 1;
                }
            }
            let last = next.is_empty();
            let write = self.sink.write(&self.src.name, &chunk, last.then_some(end));
            keeping_alive(rep, p.flushed, write).await?;
            // Status updates between chunks keep the connection alive (the
            // server counts them as replies) without acknowledging anything new.
            rep.send_status(if last { end } else { p.flushed }).await?;
        }
        if seq == 0 && stamp.is_some() || total == 0 {
            // Nothing survived (all subtransactions aborted): just move the checkpoint.
            let write = self.sink.write(&self.src.name, &[], Some(end));
            keeping_alive(rep, p.flushed, write).await?;
            rep.send_status(end).await?;
        }
        p.flushed = end;
        tracing::info!(source = %self.src.name, changes = total, lsn = %end, ms = started.elapsed().as_millis(), streamed = stamp.is_some(), "large transaction applied");
        Ok(())
    }

    /// Starts writing a batch (with the checkpoint `end`) in the background,
    /// after the batch in flight whose placement `after` reports.
    fn start_apply(
        &self,
        batch: Vec<ChangeEvent>,
        end: Lsn,
        after: Option<oneshot::Receiver<Option<u64>>>,
    ) -> InFlight {
        let (sink, source) = (self.sink.clone(), self.src.name.clone());
        let (placed_tx, placed) = oneshot::channel();
        let task = tokio::spawn(async move {
            write_batch(&sink, &source, &batch, end, after, Some(placed_tx)).await
        });
        InFlight {
            end,
            started: std::time::Instant::now(),
            task,
            placed: Some(placed),
        }
    }
}

/// Writes a batch of whole source transactions with the checkpoint `end`
/// after its last one, and records the batch metrics.
async fn write_batch(
    sink: &Sink,
    source: &str,
    batch: &[ChangeEvent],
    end: Lsn,
    after: Option<oneshot::Receiver<Option<u64>>>,
    placed: Option<oneshot::Sender<Option<u64>>>,
) -> Result<crate::store::apply::ApplyStats, LoopError> {
    let started = std::time::Instant::now();
    let stats = sink
        .write_after(source, batch, Some(end), after, placed)
        .await?;
    let mut commits: Vec<(Lsn, chrono::DateTime<chrono::Utc>)> = batch
        .iter()
        .map(|e| (e.commit_lsn, e.commit_time))
        .collect();
    commits.dedup_by_key(|c| c.0);
    let times: Vec<_> = commits.into_iter().map(|c| c.1).collect();
    crate::metrics::batch_applied(source, &stats, &times, started.elapsed());
    Ok(stats)
}

/// Reconciles every `every` (the first run one interval after start, when the
/// initial snapshots are usually done) while `owning` (an apply standby
/// skips its turns). A failed run is logged and counted; the next one is
/// tried on schedule.
async fn scheduled_reconcile(
    cfg: Config,
    store: Store,
    every: Duration,
    owning: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    use crate::metrics as m;
    let opts = crate::reconcile::Options {
        source: None,
        repair: cfg.reconcile.repair,
        sample: cfg.reconcile.sample,
        wait: Duration::from_secs(cfg.reconcile.wait_s),
        progress: crate::progress::Progress::hidden(),
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        if !owning.load(Ordering::Relaxed) {
            tracing::debug!(
                "scheduled reconciliation skipped: another apply instance owns profile writes"
            );
            continue;
        }
        let started = Instant::now();
        let run = tokio::select! {
            r = crate::reconcile::reconcile(&cfg, &store, &opts) => r,
            () = shutdown.cancelled() => return,
        };
        metrics::histogram!(m::RECONCILE_DURATION).record(started.elapsed().as_secs_f64());
        match run {
            Ok(r) => {
                metrics::counter!(m::RECONCILE_RUNS, "status" => r.status.clone()).increment(1);
                metrics::gauge!(m::RECONCILE_DRIFT).set(r.unrepaired() as f64);
                metrics::gauge!(m::RECONCILE_DRIFT_FOUND).set(r.drift_count as f64);
                metrics::gauge!(m::RECONCILE_ROWS).set(r.rows_checked as f64);
                if r.unrepaired() > 0 {
                    tracing::warn!(
                        run_id = r.run_id,
                        drift = r.unrepaired(),
                        "reconciliation found drift; see `tributary report {}`",
                        r.run_id
                    );
                } else {
                    tracing::info!(run_id = r.run_id, status = %r.status, rows = r.rows_checked, "reconciliation done");
                }
            }
            Err(e) => {
                metrics::counter!(m::RECONCILE_RUNS, "status" => "failed").increment(1);
                tracing::warn!(error = %format!("{e:#}"), "scheduled reconciliation failed; next try in one interval");
            }
        }
    }
}

/// What the streaming loop has read but not yet acknowledged.
struct Pending {
    /// What the store has committed (or what needs nothing): reported as flushed.
    flushed: Lsn,
    /// Whole transactions waiting to be applied.
    batch: Vec<ChangeEvent>,
    /// End LSN of the last transaction in `batch`.
    end: Option<Lsn>,
    /// When `batch` is due even if not full.
    deadline: Option<Instant>,
    /// The batches being applied, oldest first (at most [`IN_FLIGHT`]).
    inflight: VecDeque<InFlight>,
}

impl Pending {
    /// The highest end LSN received: a transaction ending at or before it is a resend.
    fn seen(&self) -> Lsn {
        self.flushed
            .max(self.inflight.back().map_or(Lsn::ZERO, |f| f.end))
            .max(self.end.unwrap_or_default())
    }

    /// Waits for the batch in flight and writes the pending one, through the
    /// same write path as every batch (published, applied as the role says).
    async fn settle(&mut self, ctx: &SourceCtx) -> Result<(), LoopError> {
        while let Some(f) = self.inflight.pop_front() {
            self.flushed = f.finish().await?;
        }
        if let Some(end) = self.end.take() {
            write_batch(&ctx.sink, &ctx.src.name, &self.batch, end, None, None).await?;
            self.batch.clear();
            self.deadline = None;
            self.flushed = end;
        }
        Ok(())
    }
}

/// A batch being applied by a background task. Dropped unfinished (the loop
/// failed), the task is left to finish on its own: it commits or rolls back
/// as a whole, nothing was acknowledged, and the batch is streamed again after
/// the reconnect, where what committed is recognised as already applied.
/// (Aborting it could cut a statement's exchange in half, and sqlx then
/// hands the connection back to the pool out of step with the server.)
struct InFlight {
    end: Lsn,
    started: std::time::Instant,
    task: tokio::task::JoinHandle<Result<crate::store::apply::ApplyStats, LoopError>>,
    /// Fires once the batch took its place in the write order; the next
    /// batch of the source waits for it.
    placed: Option<oneshot::Receiver<Option<u64>>>,
}

impl InFlight {
    /// Waits for the batch to commit; returns its end LSN.
    async fn finish(mut self) -> Result<Lsn, LoopError> {
        (&mut self.task)
            .await
            .map_err(|e| LoopError::Other(anyhow::anyhow!("apply task failed: {e}")))??;
        Ok(self.end)
    }
}
