//! What the daemon exports to Prometheus, and the sampler for the gauges that
//! need a query (WAL retained by each slot, profile and identity counts).
//!
//! Recording goes through the `metrics` facade everywhere; without a
//! `[metrics]` section nothing is installed and recording costs nothing. The
//! HTTP side (`/metrics`, `/healthz`, `/readyz`) is in [`crate::endpoint`].

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;

/// Unrepaired drift found by the latest scheduled reconciliation.
pub const RECONCILE_DRIFT: &str = "tributary_reconcile_drift";
/// Drift found by the latest scheduled reconciliation, before repair.
pub const RECONCILE_DRIFT_FOUND: &str = "tributary_reconcile_drift_found";
/// Scheduled reconciliation runs, by status.
pub const RECONCILE_RUNS: &str = "tributary_reconcile_runs_total";
/// Wall time of a reconciliation run.
pub const RECONCILE_DURATION: &str = "tributary_reconcile_duration_seconds";
/// Source rows the latest reconciliation covered.
pub const RECONCILE_ROWS: &str = "tributary_reconcile_rows_checked";

/// Source changes applied to the store, per source.
pub const EVENTS: &str = "tributary_source_events_applied_total";
/// Source transactions applied, per source.
pub const TRANSACTIONS: &str = "tributary_source_transactions_applied_total";
/// Seconds between now and the commit time of the last applied transaction.
pub const LAG_SECONDS: &str = "tributary_source_lag_seconds";
/// Bytes between the server's WAL end and what the store has applied.
pub const LAG_BYTES: &str = "tributary_source_lag_bytes";
/// Reconnects of a source's stream.
pub const RECONNECTS: &str = "tributary_source_reconnects_total";
/// Events per applied batch.
pub const BATCH_EVENTS: &str = "tributary_sink_batch_events";
/// Wall time of one batch's store transaction.
pub const APPLY_SECONDS: &str = "tributary_sink_apply_duration_seconds";
/// Source commit to profile committed, per transaction.
pub const END_TO_END_SECONDS: &str = "tributary_end_to_end_latency_seconds";
/// Rows sent to `dead_letters`.
pub const DEAD_LETTERS: &str = "tributary_dead_letters_total";
/// Identity merges.
pub const MERGES: &str = "tributary_merges_total";
/// Bytes of logical replication data received, per source.
pub const BYTES_RECEIVED: &str = "tributary_source_bytes_received_total";
/// WAL the source server keeps for the slot (current WAL − restart_lsn), per source.
pub const WAL_RETAINED: &str = "tributary_source_wal_retained_bytes";
/// 1 while the source's stream is running, 0 while snapshotting or reconnecting.
pub const STREAMING: &str = "tributary_source_streaming";
/// Rows read by snapshots (initial or `tributary snapshot`), per source.
pub const SNAPSHOT_ROWS: &str = "tributary_snapshot_rows_total";
/// 1 while a source's initial snapshot runs.
pub const SNAPSHOT_RUNNING: &str = "tributary_snapshot_running";
/// Live (unmerged) profiles in the store.
pub const PROFILES: &str = "tributary_profiles";
/// Identifiers in the store.
pub const IDENTITIES: &str = "tributary_identities";

/// Estimated bytes of the in-memory merge state after the last commit.
pub const CACHE_BYTES: &str = "tributary_merge_cache_bytes";
/// Generations of the merge state dropped to stay within its budget.
pub const CACHE_EVICTIONS: &str = "tributary_merge_cache_evictions_total";
/// Rows a batch touched, by where they came from (`hit`, `read`, `new`).
pub const CACHE_ROWS: &str = "tributary_merge_cache_rows_total";
/// Identifiers whose owner a batch needed, by where it came from (`hit`,
/// `carried` by a loaded row of the batch, `read`, `new`).
pub const CACHE_IDENTIFIERS: &str = "tributary_merge_cache_identifiers_total";

/// Writes with derived rows, by how they were derived: `overlapped` (while
/// the write before it was still committing), `planned` (in its own turn),
/// `rederived` (the plan no longer held: derived again under the apply lock),
/// `unplanned` (no merge state in memory).
pub const WRITES: &str = "tributary_sink_writes_total";

/// 1 while this `run --role apply` instance owns the apply lease (writes
/// profiles), 0 while it stands by; only apply instances export it.
pub const APPLY_LEASE_OWNER: &str = "tributary_apply_lease_owner";

/// The merge-state metrics: exported once the cache is used (not with
/// `memory_budget_mb = 0`; evictions only once the budget is exceeded), so
/// they are not in [`ALL`].
pub const CACHE: &[&str] = &[
    CACHE_BYTES,
    CACHE_EVICTIONS,
    CACHE_ROWS,
    CACHE_IDENTIFIERS,
    WRITES,
];

/// Every metric the daemon exports (the dashboard test checks against a scrape).
pub const ALL: &[&str] = &[
    EVENTS,
    TRANSACTIONS,
    BYTES_RECEIVED,
    LAG_SECONDS,
    LAG_BYTES,
    WAL_RETAINED,
    STREAMING,
    RECONNECTS,
    SNAPSHOT_ROWS,
    SNAPSHOT_RUNNING,
    BATCH_EVENTS,
    APPLY_SECONDS,
    END_TO_END_SECONDS,
    DEAD_LETTERS,
    MERGES,
    PROFILES,
    IDENTITIES,
    RECONCILE_DRIFT,
    RECONCILE_DRIFT_FOUND,
    RECONCILE_RUNS,
    RECONCILE_DURATION,
    RECONCILE_ROWS,
];

/// Records one applied batch of `source`: `commit_times` holds one commit time
/// per transaction in it.
pub fn batch_applied(
    source: &str,
    stats: &crate::store::apply::ApplyStats,
    commit_times: &[chrono::DateTime<chrono::Utc>],
    apply: std::time::Duration,
) {
    let src = source.to_owned();
    metrics::counter!(EVENTS, "source" => src.clone()).increment(stats.events as u64);
    metrics::counter!(TRANSACTIONS, "source" => src.clone()).increment(commit_times.len() as u64);
    metrics::counter!(DEAD_LETTERS, "source" => src.clone()).increment(stats.dead_letters as u64);
    metrics::counter!(MERGES).increment(stats.merges as u64);
    metrics::histogram!(BATCH_EVENTS).record(stats.events as f64);
    metrics::histogram!(APPLY_SECONDS).record(apply.as_secs_f64());
    let now = chrono::Utc::now();
    for t in commit_times {
        let secs = (now - *t).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::histogram!(END_TO_END_SECONDS).record(secs.max(0.0));
    }
    if let Some(last) = commit_times.iter().max() {
        let secs = (now - *last).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::gauge!(LAG_SECONDS, "source" => src).set(secs.max(0.0));
    }
}

const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
const EVENTS_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0];
const RECONCILE_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];

/// Installs the process-wide recorder and describes the metrics. Histograms
/// are real Prometheus histograms (buckets), so `histogram_quantile` works
/// across instances.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(APPLY_SECONDS.into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(END_TO_END_SECONDS.into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), EVENTS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(RECONCILE_DURATION.into()), RECONCILE_BUCKETS)?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

/// The profile and identity counts are exact (a scan of `profiles` and of
/// `identities`), so they cost time in proportion to the store: about 50 ms
/// at 100,000 profiles. Taken every poll interval on two busy cores, that
/// scan was one of the bursts in the latency benchmark's p99
/// (`benches/latency.sh`, same hour: p99 40-75 ms with it, 40-45 ms without;
/// `docs/design.md`, "Throughput"). So the next count waits at least
/// this many times as long as the last one took: at most a thousandth of one
/// core, every poll interval on a small store, every minute or so at 100,000
/// profiles.
const COUNT_SPACING: u32 = 1000;

/// Samples the gauges that need a query, every `every` (the counts no more
/// often than [`COUNT_SPACING`] allows), until `shutdown`. A failed sample is
/// logged at debug (the stream's own errors say more) and leaves the gauge at
/// its last value.
pub async fn sample(cfg: Config, store: Store, every: Duration, shutdown: CancellationToken) {
    let mut next_count = tokio::time::Instant::now();
    loop {
        for src in &cfg.sources {
            match crate::source::slot_info(src).await {
                Ok(Some(info)) => {
                    if let Some(b) = info.wal_retained_bytes {
                        metrics::gauge!(WAL_RETAINED, "source" => src.name.clone()).set(b as f64);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(source = %src.name, error = %e, "cannot sample the slot"),
            }
        }
        let started = tokio::time::Instant::now();
        if started >= next_count {
            let counts = store.counts().await.map(|c| (c.live, c.identities));
            match counts {
                Ok((profiles, identities)) => {
                    metrics::gauge!(PROFILES).set(profiles as f64);
                    metrics::gauge!(IDENTITIES).set(identities as f64);
                }
                Err(e) => tracing::debug!(error = %e, "cannot sample the store"),
            }
            next_count = started + started.elapsed() * COUNT_SPACING;
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn describe() {
    metrics::describe_gauge!(
        RECONCILE_DRIFT,
        "Drift left unrepaired by the latest scheduled reconciliation"
    );
    metrics::describe_gauge!(
        RECONCILE_DRIFT_FOUND,
        "Drift found by the latest scheduled reconciliation, before repair"
    );
    metrics::describe_counter!(RECONCILE_RUNS, "Scheduled reconciliation runs by status");
    metrics::describe_histogram!(
        RECONCILE_DURATION,
        metrics::Unit::Seconds,
        "Wall time of a reconciliation run"
    );
    metrics::describe_gauge!(
        RECONCILE_ROWS,
        "Source rows the latest reconciliation covered"
    );
    metrics::describe_counter!(EVENTS, "Source changes applied to the store");
    metrics::describe_counter!(TRANSACTIONS, "Source transactions applied to the store");
    metrics::describe_gauge!(
        LAG_SECONDS,
        metrics::Unit::Seconds,
        "Now minus the commit time of the last applied transaction"
    );
    metrics::describe_gauge!(
        LAG_BYTES,
        metrics::Unit::Bytes,
        "Server WAL end minus the position the store has applied"
    );
    metrics::describe_counter!(RECONNECTS, "Reconnects of a source's stream");
    metrics::describe_histogram!(BATCH_EVENTS, "Events per applied batch");
    metrics::describe_histogram!(
        APPLY_SECONDS,
        metrics::Unit::Seconds,
        "Wall time of one batch's store transaction"
    );
    metrics::describe_histogram!(
        END_TO_END_SECONDS,
        metrics::Unit::Seconds,
        "Source commit to profile committed, per transaction"
    );
    metrics::describe_counter!(DEAD_LETTERS, "Rows sent to dead_letters");
    metrics::describe_counter!(MERGES, "Identity merges");
    metrics::describe_gauge!(
        CACHE_BYTES,
        metrics::Unit::Bytes,
        "Estimated size of the in-memory merge state after the last commit"
    );
    metrics::describe_counter!(
        CACHE_EVICTIONS,
        "Generations of the merge state dropped to stay within its budget"
    );
    metrics::describe_counter!(
        CACHE_ROWS,
        "Rows a batch touched: hit (memory), read (store), new (no lookup)"
    );
    metrics::describe_counter!(
        CACHE_IDENTIFIERS,
        "Identifiers whose owner a batch needed: hit (memory), carried (by a row the batch loaded), read (store), new (no lookup)"
    );
    metrics::describe_counter!(
        WRITES,
        "Writes with derived rows: overlapped (derived while the one before committed), planned, rederived, unplanned"
    );
    metrics::describe_counter!(
        BYTES_RECEIVED,
        metrics::Unit::Bytes,
        "Logical replication data received"
    );
    metrics::describe_gauge!(
        WAL_RETAINED,
        metrics::Unit::Bytes,
        "WAL the source keeps for the slot (current WAL minus restart_lsn)"
    );
    metrics::describe_gauge!(
        STREAMING,
        "1 while the source streams, 0 while it snapshots or reconnects"
    );
    metrics::describe_counter!(SNAPSHOT_ROWS, "Rows read by snapshots");
    metrics::describe_gauge!(SNAPSHOT_RUNNING, "1 while the initial snapshot runs");
    metrics::describe_gauge!(PROFILES, "Live (unmerged) profiles");
    metrics::describe_gauge!(IDENTITIES, "Identifiers in the identity graph");
    metrics::describe_gauge!(
        APPLY_LEASE_OWNER,
        "1 while this apply instance owns profile writes (the apply lease), 0 while it stands by"
    );
}
