//! The Prometheus endpoint (`[metrics] listen`) and the names of what it exports.
//!
//! Recording goes through the `metrics` facade everywhere; without a
//! `[metrics]` section nothing is installed and recording costs nothing.

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::config::MetricsConfig;

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

/// Starts the endpoint and describes the metrics.
pub fn install(cfg: &MetricsConfig) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(cfg.listen)
        .install()
        .map_err(|e| anyhow::anyhow!("metrics.listen = {}: {e}", cfg.listen))?;
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
    tracing::info!(listen = %cfg.listen, "metrics endpoint listening");
    Ok(())
}
