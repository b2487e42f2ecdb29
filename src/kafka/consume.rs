//! `tributary run --role apply`: consume the change topics in a consumer group
//! and apply them to the store.
//!
//! One loop: poll up to `batch_max_events` messages (or `batch_max_wait_ms`),
//! apply them per source in the order they came (each partition's order is
//! its rows' commit order), then commit the consumed offsets. A crash or a
//! rebalance between the apply and the commit redelivers messages that are
//! already applied: the store's monotonic per-row upserts make that a no-op,
//! and the event log ignores a change it already has. Different instances may
//! apply the rows of one person at the same time; the apply lock serialises
//! their profile writes, so merges and aggregates stay exact.
//!
//! Writes go through the one write path ([`crate::sink::Sink::write_consumed`]).
//! A transient store failure (the store restarting, a connection cut) is
//! retried with the same backoff as the source loops, for the same batch and
//! before any offset is committed; a definite one stops the process.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, KafkaConfig};
use crate::event::ChangeEvent;
use crate::retry::Action;
use crate::sink::{Sink, SinkError};

/// Runs until `shutdown`; an error here stops the daemon (exit 3).
pub async fn apply_from_kafka(
    cfg: Config,
    k: KafkaConfig,
    sink: Sink,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let c = super::client_config(
        &k,
        "tributary-apply",
        &[
            ("group.id", k.group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
        ],
    );
    let consumer: StreamConsumer = c.create().map_err(|e| {
        anyhow::anyhow!(
            "kafka: cannot create the consumer (check [kafka] brokers and options): {e}"
        )
    })?;
    let topics: Vec<String> = super::change_topics(&cfg, &k).into_iter().collect();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    tracing::info!(group = %k.group_id, topics = topics.len(), "applying change topics from Kafka");
    let max = cfg.sink.batch_max_events;
    let linger = Duration::from_millis(cfg.sink.batch_max_wait_ms);
    loop {
        // Collect a batch: wait for the first message, then up to `linger` more.
        let mut batch: Vec<ChangeEvent> = Vec::new();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut undecodable: Vec<crate::store::apply::DeadLetter> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        while batch.len() < max {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(tokio::time::Instant::now()),
                None => Duration::from_secs(1),
            };
            let msg = tokio::select! {
                () = shutdown.cancelled() => break,
                m = tokio::time::timeout(wait, consumer.recv()) => m,
            };
            let Ok(msg) = msg else {
                if deadline.is_some() {
                    break; // linger over
                }
                continue;
            };
            let m = msg?;
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + linger);
            offsets.insert((m.topic().to_owned(), m.partition()), m.offset());
            match super::envelope::decode(m.key(), m.payload().unwrap_or_default()) {
                Ok(e) => batch.push(e),
                Err(error) => {
                    tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error,
                        "a message that is not a change envelope goes to dead_letters");
                    undecodable.push(super::envelope::undecodable(
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
        // Per source, in arrival order (each partition's order is kept).
        let mut by_source: BTreeMap<String, Vec<ChangeEvent>> = BTreeMap::new();
        for e in batch {
            by_source.entry(e.source.clone()).or_default().push(e);
        }
        for (source, events) in &by_source {
            let started = std::time::Instant::now();
            let what = format!("applying a batch of source {source} from kafka");
            let Some(stats) =
                retrying(&what, &shutdown, || sink.write_consumed(source, events)).await?
            else {
                // Shut down while retrying: nothing of this batch is committed,
                // nor its offsets; the group delivers it again.
                tracing::info!("apply role stopped cleanly");
                return Ok(());
            };
            tracing::debug!(source = %source, events = stats.events, stale = stats.stale, "batch applied from kafka");
            let mut commits: Vec<(crate::event::Lsn, chrono::DateTime<chrono::Utc>)> = events
                .iter()
                .map(|e| (e.commit_lsn, e.commit_time))
                .collect();
            commits.sort();
            commits.dedup_by_key(|c| c.0);
            let times: Vec<_> = commits.into_iter().map(|c| c.1).collect();
            crate::metrics::batch_applied(source, &stats, &times, started.elapsed());
        }
        if !undecodable.is_empty()
            && retrying("recording undecodable messages", &shutdown, || {
                sink.write_undecodable(undecodable.clone())
            })
            .await?
            .is_none()
        {
            tracing::info!("apply role stopped cleanly");
            return Ok(());
        }
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), offset) in &offsets {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
            }
            // After a rebalance the commit of a revoked partition fails; its new
            // owner re-applies from the last commit, which changes nothing.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "offset commit failed (rebalance?); messages will be applied again, idempotently");
            }
        }
        if shutdown.is_cancelled() {
            tracing::info!("apply role stopped cleanly");
            return Ok(());
        }
    }
}

/// Runs `write` until it succeeds (`Some` of its result), retrying transient
/// failures with the daemon's backoff, or until `shutdown` (`None`). `what`
/// names the write in the log.
async fn retrying<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut write: F,
) -> Result<Option<T>, SinkError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SinkError>>,
{
    let mut backoff = crate::retry::backoff();
    loop {
        match write().await {
            Ok(out) => return Ok(Some(out)),
            Err(e) if e.action() == Action::Retry => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis(), "{what} failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}
