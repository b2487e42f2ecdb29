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

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::BackoffBuilder;
use serde_json::{Map, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkConfig, SourceConfig};
use crate::event::{ChangeEvent, Lsn, Op};
use crate::mapping::Mapper;
use crate::pgoutput::Decoded;
use crate::source::snapshot::{snapshot, SnapshotSink};
use crate::source::{ensure_publication, slot_info, Replication, SourceError, StreamItem};
use crate::store::{Store, StoreError};

/// How often a status update is sent when nothing else prompts one.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the daemon until `shutdown` is cancelled or a source fails definitely.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = Store::connect(&cfg.sink).await?;
    store.migrate().await?;
    let mapper = Arc::new(Mapper::new(&cfg));
    let mut tasks = JoinSet::new();
    for src in cfg.sources.clone() {
        let ctx = SourceCtx {
            src,
            sink: cfg.sink.clone(),
            store: store.clone(),
            mapper: mapper.clone(),
            shutdown: shutdown.clone(),
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

struct SourceCtx {
    src: SourceConfig,
    sink: SinkConfig,
    store: Store,
    mapper: Arc<Mapper>,
    shutdown: CancellationToken,
}

/// What failed inside a source loop, classified for the retry policy.
#[derive(Debug, thiserror::Error)]
enum LoopError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl LoopError {
    /// The one place that decides what is retried.
    fn is_transient(&self) -> bool {
        match self {
            LoopError::Source(e) => e.is_transient(),
            LoopError::Store(StoreError::Query(e) | StoreError::Connect { source: e, .. }) => {
                matches!(
                    e,
                    sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
                ) || e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| {
                        c.starts_with("08")
                            || matches!(
                                c.as_ref(),
                                "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300"
                            )
                    })
            }
            LoopError::Store(StoreError::Migrate(_)) => false,
            LoopError::Other(e) => e
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().is_some()),
        }
    }
}

/// Snapshot batches go straight into the store (no checkpoint: the snapshot
/// is only complete, and streaming may start, once every table has been read).
struct StoreSink<'a> {
    ctx: &'a SourceCtx,
    rows: u64,
}

impl SnapshotSink for StoreSink<'_> {
    async fn apply(&mut self, events: Vec<ChangeEvent>) -> anyhow::Result<()> {
        self.rows += events.len() as u64;
        self.ctx
            .store
            .apply(&self.ctx.mapper, &self.ctx.src.name, &events, None)
            .await?;
        Ok(())
    }
}

impl SourceCtx {
    async fn run(&self) -> anyhow::Result<()> {
        let mut backoff = self.backoff();
        loop {
            let started = Instant::now();
            match self.stream_once().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && !self.shutdown.is_cancelled() => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = self.backoff(); // it worked for a while: start over
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(source = %self.src.name, error = %format!("{e:#}"), retry_in_ms = delay.as_millis(), "source interrupted; reconnecting");
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

    fn backoff(&self) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Connects, snapshots if needed, and streams until shutdown or an error.
    async fn stream_once(&self) -> Result<(), LoopError> {
        let src = &self.src;
        ensure_publication(src).await?;
        let checkpoint = self.store.checkpoint(&src.name).await?;
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
            _ => self.initial_snapshot(&mut rep, slot.is_some()).await?,
        };
        rep.start(&src.slot, &src.publication, from).await?;
        let result = self.stream(&mut rep, from).await;
        rep.close().await;
        result
    }

    async fn initial_snapshot(
        &self,
        rep: &mut Replication,
        slot_exists: bool,
    ) -> Result<Lsn, LoopError> {
        let src = &self.src;
        if slot_exists {
            // A slot without a completed snapshot: a previous snapshot was
            // interrupted (or the store is new). Its exported snapshot is gone, so
            // start over; rows already applied are overwritten idempotently.
            tracing::warn!(source = %src.name, slot = %src.slot, "slot exists but no completed snapshot in the store; recreating the slot and snapshotting again");
            rep.drop_slot(&src.slot).await?;
        }
        let created = rep.create_slot(&src.slot).await?;
        let mut sink = StoreSink { ctx: self, rows: 0 };
        let rows = snapshot(
            src,
            &created.snapshot_name,
            created.consistent_point,
            self.sink.batch_max_events,
            &mut sink,
        )
        .await?;
        // Rows the store knows from before this snapshot but the snapshot did
        // not see are gone upstream: withdraw them at the consistent point.
        let gone = self
            .store
            .live_rows_before(&src.name, created.consistent_point)
            .await?;
        if !gone.is_empty() {
            tracing::info!(source = %src.name, rows = gone.len(), "withdrawing rows not seen by the snapshot");
            let deletes: Vec<ChangeEvent> = gone
                .into_iter()
                .enumerate()
                .map(|(i, (table, key))| {
                    let key: Map<String, Value> = serde_json::from_str(&key).unwrap_or_default();
                    ChangeEvent {
                        source: src.name.clone(),
                        table,
                        op: Op::Delete,
                        row: key.clone(),
                        key,
                        unchanged: Vec::new(),
                        lsn: created.consistent_point,
                        commit_lsn: created.consistent_point,
                        seq: rows + i as u64,
                        xid: 0,
                        commit_time: chrono::Utc::now(),
                    }
                })
                .collect();
            for chunk in deletes.chunks(self.sink.batch_max_events) {
                self.store
                    .apply(&self.mapper, &src.name, chunk, None)
                    .await?;
            }
        }
        self.store
            .complete_snapshot(&src.name, &src.slot, created.consistent_point)
            .await?;
        tracing::info!(source = %src.name, rows, lsn = %created.consistent_point, "initial snapshot complete");
        Ok(created.consistent_point)
    }

    /// The streaming loop: read, batch, apply with checkpoint, acknowledge.
    ///
    /// While one batch is applied by a background task, the next one is read
    /// and decoded. At most one batch per source is in flight, so batches commit
    /// in order; a full batch stops reading until the one in flight is done
    /// (that is the backpressure), and an LSN is acknowledged only after the
    /// batch that ends there has committed.
    async fn stream(&self, rep: &mut Replication, checkpoint: Lsn) -> Result<(), LoopError> {
        let linger = Duration::from_millis(self.sink.batch_max_wait_ms);
        let max = self.sink.batch_max_events;
        let mut flushed = checkpoint; // what the store has committed (or what needs nothing)
        let mut open: Option<Vec<ChangeEvent>> = None; // the transaction being received
        let mut batch: Vec<ChangeEvent> = Vec::new();
        let mut batch_end: Option<Lsn> = None; // end LSN of the last whole transaction in `batch`
        let mut batch_deadline: Option<Instant> = None;
        let mut inflight: Option<InFlight> = None;
        loop {
            if let Some(end) = batch_end {
                let due = batch.len() >= max || batch_deadline.is_some_and(|d| d <= Instant::now());
                if due && inflight.is_none() {
                    inflight = Some(self.start_apply(std::mem::take(&mut batch), end));
                    batch_end = None;
                    batch_deadline = None;
                }
            }
            // A due batch waiting for the one in flight is started when that one
            // completes, not by the timer (which would fire at once, in a loop).
            let deadline = match batch_deadline {
                Some(d) if inflight.is_none() => d,
                _ => Instant::now() + STATUS_INTERVAL,
            };
            let reading = batch.len() < max;
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    if let Some(f) = inflight.take() {
                        flushed = f.finish().await?;
                    }
                    if let Some(end) = batch_end {
                        self.store.apply(&self.mapper, &self.src.name, &batch, Some(end)).await?;
                        flushed = end;
                    }
                    rep.send_status(flushed).await?;
                    tracing::info!(source = %self.src.name, lsn = %flushed, "stopped cleanly");
                    return Ok(());
                }
                res = async { inflight.as_mut().map(|f| &mut f.task).expect("guarded by inflight.is_some()").await }, if inflight.is_some() => {
                    let f = inflight.take().expect("in flight");
                    let stats = res.map_err(|e| LoopError::Other(anyhow::anyhow!("apply task failed: {e}")))??;
                    tracing::debug!(source = %self.src.name, events = stats.events, stale = stats.stale, dead = stats.dead_letters, merges = stats.merges, lsn = %f.end, ms = f.started.elapsed().as_millis(), "batch applied");
                    flushed = f.end;
                    rep.send_status(flushed).await?;
                }
                item = rep.next(), if reading => match item? {
                    StreamItem::Decoded(items) => {
                        for d in items {
                            match d {
                                Decoded::Begin { .. } => open = Some(Vec::new()),
                                Decoded::Change(ev) => match open.as_mut() {
                                    Some(txn) => txn.push(ev),
                                    None => return Err(SourceError::Decode { source_name: self.src.name.clone(), lsn: ev.lsn, error: crate::pgoutput::DecodeError::OutsideTransaction }.into()),
                                },
                                Decoded::Commit { end_lsn, .. } => {
                                    let txn = open.take().unwrap_or_default();
                                    // The server may resend transactions at or before the checkpoint.
                                    let seen = flushed.max(inflight.as_ref().map_or(Lsn::ZERO, |f| f.end)).max(batch_end.unwrap_or_default());
                                    if end_lsn <= seen {
                                        continue;
                                    }
                                    batch.extend(txn);
                                    batch_end = Some(end_lsn);
                                    batch_deadline.get_or_insert_with(|| Instant::now() + linger);
                                }
                                Decoded::Message { .. } | Decoded::Nothing => {}
                            }
                        }
                    }
                    StreamItem::Keepalive { wal_end, reply } => {
                        // Nothing received is waiting to be applied: everything the
                        // server has sent up to wal_end is in the store, so the slot
                        // may advance even when the WAL was all unpublished tables.
                        let advanced = open.is_none() && batch_end.is_none() && inflight.is_none() && wal_end > flushed;
                        if advanced {
                            flushed = wal_end;
                        }
                        // The server stops sending keepalives once we report what it
                        // sent, so answering an advance at once cannot ping-pong.
                        if reply || advanced {
                            rep.send_status(flushed).await?;
                        }
                    }
                },
                () = tokio::time::sleep_until(deadline) => {
                    if rep.since_status() >= STATUS_INTERVAL {
                        rep.send_status(flushed).await?;
                    }
                }
            }
        }
    }

    /// Starts applying a batch (with the checkpoint `end`) in the background.
    fn start_apply(&self, batch: Vec<ChangeEvent>, end: Lsn) -> InFlight {
        let (store, mapper, source) = (
            self.store.clone(),
            self.mapper.clone(),
            self.src.name.clone(),
        );
        let task =
            tokio::spawn(async move { store.apply(&mapper, &source, &batch, Some(end)).await });
        InFlight {
            end,
            started: std::time::Instant::now(),
            task,
        }
    }
}

/// A batch being applied by a background task. Dropped unfinished (the loop
/// failed), the task is aborted: its transaction rolls back, nothing was
/// acknowledged, and the batch is streamed again after the reconnect.
struct InFlight {
    end: Lsn,
    started: std::time::Instant,
    task: tokio::task::JoinHandle<Result<crate::store::apply::ApplyStats, StoreError>>,
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

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}
