//! `tributary status`: per source the slot, its position and WAL retained, the
//! stored checkpoint and the last event; profile and dead-letter counts; the
//! latest reconciliation; and, when `[metrics] listen` is set, what the
//! running daemon reports (streaming, readiness, its counters).
//!
//! The `--json` shape is documented in docs/operations.md ("Status").

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{Connection, Row};

use crate::config::Config;
use crate::source::query_conn;
use crate::store::Store;

/// One source's replication state.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    /// Source name.
    pub name: String,
    /// Slot name.
    pub slot: String,
    /// Slot exists on the server.
    pub slot_exists: bool,
    /// Someone is streaming from the slot.
    pub active: bool,
    /// Slot's confirmed_flush_lsn.
    pub confirmed_flush_lsn: Option<String>,
    /// Checkpoint stored in the profile store.
    pub checkpoint_lsn: Option<String>,
    /// Initial snapshot finished.
    pub snapshot_completed: bool,
    /// WAL the slot keeps on the server (current WAL LSN − restart_lsn), bytes.
    pub wal_retained_bytes: Option<i64>,
    /// Current WAL LSN − confirmed_flush_lsn, bytes.
    pub lag_bytes: Option<i64>,
    /// The slot's `wal_status` (reserved, extended, unreserved, lost).
    pub wal_status: Option<String>,
    /// Bytes of WAL left before the slot risks invalidation (`max_slot_wal_keep_size`).
    pub safe_wal_size: Option<i64>,
    /// Commit time of the last applied event.
    pub last_event_commit_time: Option<DateTime<Utc>>,
    /// Now − last event commit time, seconds.
    pub lag_seconds: Option<f64>,
    /// Set when the source could not be reached.
    pub error: Option<String>,
    /// What the running daemon reports for this source (None without a daemon endpoint).
    pub daemon: Option<DaemonSource>,
}

/// A source's figures from the running daemon's `/metrics` (since it started).
#[derive(Debug, Default, Serialize)]
pub struct DaemonSource {
    /// The stream is running (not snapshotting or reconnecting).
    pub streaming: bool,
    /// Changes applied.
    pub events_applied: u64,
    /// Transactions applied.
    pub transactions_applied: u64,
    /// Replication bytes received.
    pub bytes_received: u64,
    /// Stream reconnects.
    pub reconnects: u64,
    /// Rows read by snapshots.
    pub snapshot_rows: u64,
    /// Rows sent to dead_letters.
    pub dead_letters: u64,
}

/// The running daemon, reached through `[metrics] listen`.
#[derive(Debug, Serialize)]
pub struct DaemonStatus {
    /// `host:port` asked.
    pub endpoint: String,
    /// It answered.
    pub reachable: bool,
    /// `/readyz` said ready.
    pub ready: bool,
}

pub use crate::store::lease::{ApplyProgress, LeaseHolder, PartitionProgress};
pub use crate::store::stats::LastReconcile;

/// The whole status document (`status --json`).
#[derive(Debug, Serialize)]
pub struct Status {
    /// Per source.
    pub sources: Vec<SourceStatus>,
    /// Live (unmerged) profiles.
    pub profiles: i64,
    /// Profiles merged into another.
    pub merged_profiles: i64,
    /// Identifiers.
    pub identities: i64,
    /// Rows in dead_letters.
    pub dead_letters: i64,
    /// The latest reconciliation, if any ran.
    pub last_reconcile: Option<LastReconcile>,
    /// The daemon's endpoint, when `[metrics] listen` is configured.
    pub daemon: Option<DaemonStatus>,
    /// A deployment split over Kafka: the apply lease's owner and how far it
    /// is behind the capture per partition (None: no apply instance ever ran).
    pub apply: Option<ApplyProgress>,
}

/// Gathers the status; a source that cannot be reached is reported, not fatal.
pub async fn status(cfg: &Config) -> anyhow::Result<Status> {
    let store = Store::connect(&cfg.sink).await?;
    let counts = store.counts().await?;
    let last_reconcile = store.last_reconcile().await?;
    let apply = store.apply_progress().await?;
    let scraped = match &cfg.metrics {
        Some(m) => Some((m.listen, daemon_endpoint(m.listen).await)),
        None => None,
    };
    let mut sources = Vec::new();
    for src in &cfg.sources {
        let progress = store.source_progress(&src.name).await?;
        let last = progress.last_event_commit_time;
        let mut s = SourceStatus {
            name: src.name.clone(),
            slot: src.slot.clone(),
            slot_exists: false,
            active: false,
            confirmed_flush_lsn: None,
            checkpoint_lsn: progress.checkpoint_lsn,
            snapshot_completed: progress.snapshot_completed,
            wal_retained_bytes: None,
            lag_bytes: None,
            wal_status: None,
            safe_wal_size: None,
            last_event_commit_time: last,
            #[allow(clippy::cast_precision_loss)]
            lag_seconds: last.map(|t| (Utc::now() - t).num_milliseconds() as f64 / 1000.0),
            error: None,
            daemon: scraped
                .as_ref()
                .and_then(|(_, d)| d.as_ref())
                .map(|(_, metrics)| daemon_source(metrics, &src.name)),
        };
        match query_conn(src).await {
            Ok(mut conn) => {
                let row = sqlx::query(
                    "select active, confirmed_flush_lsn::text as flush,
                            pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint as retained,
                            pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint as lag,
                            wal_status, safe_wal_size
                       from pg_replication_slots where slot_name = $1",
                )
                .bind(&src.slot)
                .fetch_optional(&mut conn)
                .await;
                match row {
                    Ok(Some(r)) => {
                        s.slot_exists = true;
                        s.active = r.get("active");
                        s.confirmed_flush_lsn = r.get("flush");
                        s.wal_retained_bytes = r.get("retained");
                        s.lag_bytes = r.get("lag");
                        s.wal_status = r.get("wal_status");
                        s.safe_wal_size = r.get("safe_wal_size");
                    }
                    Ok(None) => {}
                    Err(e) => s.error = Some(e.to_string()),
                }
                conn.close().await.ok();
            }
            Err(e) => s.error = Some(format!("{e:#}")),
        }
        sources.push(s);
    }
    Ok(Status {
        sources,
        profiles: counts.live,
        merged_profiles: counts.merged,
        identities: counts.identities,
        dead_letters: counts.dead,
        last_reconcile,
        daemon: scraped.map(|(listen, d)| DaemonStatus {
            endpoint: listen.to_string(),
            reachable: d.is_some(),
            ready: d.is_some_and(|(ready, _)| ready),
        }),
        apply,
    })
}

/// `/readyz` and `/metrics` of the daemon at `listen`; None when it does not answer.
async fn daemon_endpoint(listen: std::net::SocketAddr) -> Option<(bool, String)> {
    let (ready, _) = http_get(listen, "/readyz").await?;
    let (_, metrics) = http_get(listen, "/metrics").await?;
    Some((ready == 200, metrics))
}

/// A plain HTTP/1.1 GET against our own endpoint: (status, body). Two seconds
/// at most; anything unexpected is None.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).await.ok()?;
        let code = resp.split(' ').nth(1)?.parse().ok()?;
        let (_, body) = resp.split_once("\r\n\r\n")?;
        Some((code, body.to_owned()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), fetch)
        .await
        .ok()
        .flatten()
}

/// One source's figures from a Prometheus text scrape.
fn daemon_source(metrics: &str, source: &str) -> DaemonSource {
    use crate::metrics as m;
    let label = format!("{{source=\"{source}\"}}");
    let get = |name: &str| -> u64 {
        let series = format!("{name}{label} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = v.max(0.0) as u64;
                n
            })
    };
    DaemonSource {
        streaming: get(m::STREAMING) == 1,
        events_applied: get(m::EVENTS),
        transactions_applied: get(m::TRANSACTIONS),
        bytes_received: get(m::BYTES_RECEIVED),
        reconnects: get(m::RECONNECTS),
        snapshot_rows: get(m::SNAPSHOT_ROWS),
        dead_letters: get(m::DEAD_LETTERS),
    }
}

/// Human rendering.
pub fn print_human(s: &Status) {
    for src in &s.sources {
        println!(
            "source {:<12} slot {} ({}) confirmed_flush {} checkpoint {} snapshot {} wal_retained {} lag {} last_event {}",
            src.name,
            src.slot,
            if !src.slot_exists { "missing" } else if src.active { "active" } else { "inactive" },
            src.confirmed_flush_lsn.as_deref().unwrap_or("-"),
            src.checkpoint_lsn.as_deref().unwrap_or("-"),
            if src.snapshot_completed { "done" } else { "pending" },
            src.wal_retained_bytes.map_or("-".into(), |b| format!("{b}B")),
            src.lag_bytes.map_or("-".into(), |b| format!("{b}B")),
            src.last_event_commit_time.map_or("-".into(), |t| t.to_rfc3339()),
        );
        if let Some(d) = &src.daemon {
            println!(
                "  daemon: {} events {} transactions {} received {}B reconnects {} snapshot rows {} dead letters {}",
                if d.streaming { "streaming" } else { "NOT streaming" },
                d.events_applied,
                d.transactions_applied,
                d.bytes_received,
                d.reconnects,
                d.snapshot_rows,
                d.dead_letters,
            );
        }
        if let Some(e) = &src.error {
            println!("  error: {e}");
        }
        match (src.wal_status.as_deref(), src.safe_wal_size) {
            (Some("lost"), _) => println!("  SLOT INVALIDATED: the WAL it needed is gone; re-snapshot the source (docs/operations.md)"),
            (_, Some(safe)) if safe < 64 * 1024 * 1024 => {
                println!("  warning: only {safe} bytes of WAL left before max_slot_wal_keep_size invalidates the slot")
            }
            _ => {}
        }
    }
    println!(
        "profiles {} (merged {}), identities {}, dead letters {}",
        s.profiles, s.merged_profiles, s.identities, s.dead_letters
    );
    match &s.last_reconcile {
        Some(r) => println!(
            "last reconcile: run {} {} started {} drift {} repaired {}",
            r.run_id,
            r.status,
            r.started_at.to_rfc3339(),
            r.drift_count,
            r.repaired_count
        ),
        None => println!("last reconcile: never"),
    }
    match &s.daemon {
        Some(d) if d.reachable => println!(
            "daemon at {}: {}",
            d.endpoint,
            if d.ready {
                "ready"
            } else {
                "NOT ready (curl /readyz says why)"
            }
        ),
        Some(d) => println!("daemon at {}: not answering (not running?)", d.endpoint),
        None => {}
    }
    if let Some(a) = &s.apply {
        print_apply(a);
    }
}

/// The split deployment's lines: who owns profile writes, and per partition
/// how far the owner is behind the capture.
fn print_apply(progress: &ApplyProgress) {
    #[allow(clippy::cast_precision_loss)]
    let secs = |ms: i64| ms as f64 / 1000.0;
    let a = &progress.lease;
    if a.expires_in_ms > 0 {
        println!(
            "apply owner {} (epoch {}, group {}, since {}), lease renewed within {:.1} s",
            a.holder,
            a.epoch,
            a.group,
            a.acquired_at.to_rfc3339(),
            secs(a.expires_in_ms)
        );
    } else {
        println!(
            "apply lease FREE for {:.1} s (last owner {}, epoch {}): nothing applies from Kafka; start `tributary run --role apply`",
            secs(-a.expires_in_ms),
            a.holder,
            a.epoch
        );
    }
    let partitions = &progress.partitions;
    let behind: i64 = partitions.iter().map(|p| p.behind).sum();
    println!(
        "  {} partitions, {} messages published and not applied",
        partitions.len(),
        behind
    );
    for p in partitions.iter().filter(|p| p.behind > 0) {
        println!(
            "  {}[{}] published {} applied {} behind {}",
            p.topic,
            p.partition,
            p.published.map_or("-".into(), |o| o.to_string()),
            p.applied.map_or("-".into(), |o| o.to_string()),
            p.behind
        );
    }
}
