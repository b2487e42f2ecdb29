//! The daemon's HTTP endpoint on `[metrics] listen`: `/metrics` (Prometheus
//! text), `/healthz` (the process answers) and `/readyz` (every source is
//! streaming and the profile store answers a query).
//!
//! Readiness is what a load balancer or an orchestrator should act on: a
//! source that is snapshotting, reconnecting or failed, or a store that does
//! not answer within two seconds, makes the daemon unready. The body says
//! which, so a `curl` at 3 a.m. names the part to look at. The store is asked
//! on a connection of its own, at most once a second however many requests
//! come (`store::Probe`): the endpoint is unauthenticated, and a flood of
//! requests must not take the connections the apply path writes with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::store::{Probe, Store};

/// How long `/readyz` waits for the store.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Which sources are streaming right now; written by the source loops.
#[derive(Debug, Default)]
pub struct Health {
    streaming: Mutex<BTreeMap<String, bool>>,
}

impl Health {
    /// A health record with every source not (yet) streaming.
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a str>) -> Health {
        Health {
            streaming: Mutex::new(sources.into_iter().map(|s| (s.to_owned(), false)).collect()),
        }
    }

    /// Marks `source` streaming or not, and mirrors it to the metric.
    pub fn set_streaming(&self, source: &str, on: bool) {
        self.streaming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(source.to_owned(), on);
        metrics::gauge!(crate::metrics::STREAMING, "source" => source.to_owned()).set(if on {
            1.0
        } else {
            0.0
        });
    }

    fn sources(&self) -> BTreeMap<String, bool> {
        self.streaming
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    store: Arc<Probe>,
}

/// Binds `listen` (an error names the key) and serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen = {listen}: cannot listen: {e}"))?;
    let upkeep = metrics.clone();
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            health,
            store: Arc::new(store.probe()),
        });
    tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        // Histogram upkeep keeps the exporter's memory bounded.
        let keep = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                    () = keep.cancelled() => return,
                }
            }
        });
        let stop = shutdown.clone();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    }))
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let sources = s.health.sources();
    let store = s.store.check(STORE_TIMEOUT).await;
    let ready = store.is_ok() && sources.values().all(|on| *on);
    let body = json!({
        "ready": ready,
        "sources": sources
            .iter()
            .map(|(name, on)| (name.clone(), json!(if *on { "streaming" } else { "not streaming" })))
            .collect::<serde_json::Map<_, _>>(),
        "store": match &store { Ok(()) => "reachable".to_owned(), Err(e) => format!("unreachable: {e}") },
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}
