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
    tracing::info!(listen = %cfg.listen, "metrics endpoint listening");
    Ok(())
}
