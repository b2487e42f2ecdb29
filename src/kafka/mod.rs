//! Publishing change events to Kafka (`[kafka]`), with delivery confirmed
//! before the checkpoint that covers them is committed.
//!
//! The daemon publishes a batch, waits until the broker has acknowledged every
//! message (idempotent producer, `acks=all`), and only then applies the batch
//! to the store with its checkpoint. A crash in between re-reads the batch
//! from the slot and publishes it again: duplicates are possible, loss is not.
//! Consumers de-duplicate on `(source.db, source.commit_lsn, source.seq)`.
//! Within a batch messages are enqueued in commit order and the producer keeps
//! that order per partition; the key (the row's primary key) keeps each row's
//! changes on one partition.

pub mod consume;
pub mod envelope;

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::{Config, KafkaConfig};
use crate::event::ChangeEvent;
use crate::store::apply::ApplyStats;
use crate::store::Outbox;

/// What went wrong talking to Kafka.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The client could not be created (a bad `[kafka] options` property).
    #[error("kafka: cannot create the client (check [kafka] brokers and options): {0}")]
    Client(#[source] KafkaError),
    /// A topic could not be created.
    #[error("kafka: cannot create topic {topic}: {error}")]
    Topic {
        /// The topic.
        topic: String,
        /// What the broker said.
        error: String,
    },
    /// A message was not delivered (the batch is retried).
    #[error("kafka: delivery to {topic} failed: {error}")]
    Delivery {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        error: KafkaError,
    },
}

impl PublishError {
    /// What the retry policy does about it: delivery failures are retried
    /// (the broker may be back); a bad config or a refused topic stops.
    pub fn action(&self) -> crate::retry::Action {
        match self {
            PublishError::Delivery { .. } => crate::retry::Action::Retry,
            _ => crate::retry::Action::Stop,
        }
    }
}

/// The producer side.
pub struct Publisher {
    producer: FutureProducer,
    prefix: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A librdkafka config: the brokers, `client.id`, the client's own
/// `defaults`, then `[kafka] options` (which may override any of them).
pub(crate) fn client_config(
    k: &KafkaConfig,
    client_id: &str,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("client.id", client_id);
    for (key, v) in defaults {
        c.set(*key, *v);
    }
    for (key, v) in &k.options.0 {
        c.set(key, v);
    }
    c
}

impl Outbox for Publisher {
    fn deliver<'a>(
        &'a self,
        source: &'a str,
        stats: &'a ApplyStats,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>
    {
        Box::pin(async move {
            self.publish_derived(source, stats)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
    }

    fn erase<'a>(
        &'a self,
        profiles: &'a [i64],
        rows: &'a [(String, String, String)],
    ) -> futures_util::future::BoxFuture<'a, Result<(), Box<dyn std::error::Error + Send + Sync>>>
    {
        Box::pin(async move {
            self.publish_tombstones(profiles, rows)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
    }
}

/// Every topic the daemon writes: the change topics, profiles, dead letters.
pub fn all_topics(cfg: &Config, k: &KafkaConfig) -> BTreeSet<String> {
    let mut t = change_topics(cfg, k);
    t.insert(envelope::profiles_topic(&k.topic_prefix));
    t.insert(envelope::dead_letters_topic(&k.topic_prefix));
    t
}

/// Every change topic of the config.
pub fn change_topics(cfg: &Config, k: &KafkaConfig) -> BTreeSet<String> {
    cfg.sources
        .iter()
        .flat_map(|s| {
            s.tables
                .iter()
                .map(|t| envelope::change_topic(&k.topic_prefix, &s.name, &t.qualified))
        })
        .collect()
}

/// Creates the topics that do not exist yet (existing ones are left alone).
pub async fn create_topics(k: &KafkaConfig, topics: &BTreeSet<String>) -> Result<(), PublishError> {
    let admin: AdminClient<DefaultClientContext> = client_config(k, "tributary", &[])
        .create()
        .map_err(PublishError::Client)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                k.partitions,
                TopicReplication::Fixed(k.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(PublishError::Client)?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(PublishError::Topic {
                    topic,
                    error: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

impl Publisher {
    /// An idempotent producer (`acks=all`, Java-compatible murmur2
    /// partitioning); `[kafka] options` may add or override properties.
    pub fn new(k: &KafkaConfig) -> Result<Publisher, PublishError> {
        let c = client_config(
            k,
            "tributary",
            &[
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("partitioner", "murmur2_random"),
                ("linger.ms", "5"),
                ("message.timeout.ms", "30000"),
            ],
        );
        Ok(Publisher {
            producer: c.create().map_err(PublishError::Client)?,
            prefix: k.topic_prefix.clone(),
        })
    }

    /// Publishes `events` in order and returns once the broker acknowledged
    /// every one of them.
    /// Returns, per `(topic, partition)`, the offset after the last message.
    pub async fn publish(
        &self,
        events: &[ChangeEvent],
    ) -> Result<crate::store::lease::Offsets, PublishError> {
        let now = chrono::Utc::now().timestamp_millis();
        self.send_all(events.iter().map(|e| {
            (
                envelope::change_topic(&self.prefix, &e.source, &e.table),
                envelope::key(e),
                envelope::value(&self.prefix, e, now),
            )
        }))
        .await
    }

    /// Publishes a batch's profile changes (keyed by profile id) and dead
    /// letters, and waits for every acknowledgement.
    pub async fn publish_derived(
        &self,
        source: &str,
        stats: &ApplyStats,
    ) -> Result<(), PublishError> {
        let now = chrono::Utc::now().timestamp_millis();
        let profiles = envelope::profiles_topic(&self.prefix);
        let dead = envelope::dead_letters_topic(&self.prefix);
        let changes = stats.profile_changes.iter().map(|c| {
            (
                profiles.clone(),
                Some(c.profile_id.to_string()),
                envelope::profile_value(source, c, now),
            )
        });
        let letters = stats.dead.iter().map(|d| {
            (
                dead.clone(),
                Some(format!("{}:{}", d.source, d.table)),
                envelope::dead_letter_value(d, now),
            )
        });
        self.send_all(changes.chain(letters)).await.map(|_| ())
    }

    /// Tombstones (a key with no value) for a forgotten person: their
    /// profiles on the profiles topic, their rows on the change topics (the
    /// key is the row key, as in the change events), so that a compacted
    /// topic drops everything it held of them.
    pub async fn publish_tombstones(
        &self,
        profiles: &[i64],
        rows: &[(String, String, String)],
    ) -> Result<(), PublishError> {
        let topic = envelope::profiles_topic(&self.prefix);
        let profiles = profiles
            .iter()
            .map(|p| (topic.clone(), Some(p.to_string()), None));
        let rows = rows.iter().map(|(source, table, key)| {
            (
                envelope::change_topic(&self.prefix, source, table),
                Some(key.clone()),
                None,
            )
        });
        self.send_records(profiles.chain(rows)).await.map(|_| ())
    }

    /// Enqueues every `(topic, key, value)` in order, then waits for all
    /// acknowledgements (a full local queue waits for the oldest first).
    async fn send_all(
        &self,
        messages: impl Iterator<Item = (String, Option<String>, String)>,
    ) -> Result<crate::store::lease::Offsets, PublishError> {
        self.send_records(messages.map(|(t, k, v)| (t, k, Some(v))))
            .await
    }

    /// [`Publisher::send_all`] where a `None` value is a tombstone.
    async fn send_records(
        &self,
        messages: impl Iterator<Item = (String, Option<String>, Option<String>)>,
    ) -> Result<crate::store::lease::Offsets, PublishError> {
        let mut published = crate::store::lease::Offsets::new();
        let mut delivered = |topic: String, d: rdkafka::producer::future_producer::Delivery| {
            let next = published.entry((topic, d.partition)).or_insert(0);
            *next = (*next).max(d.offset + 1);
        };
        let mut pending: std::collections::VecDeque<(String, DeliveryFuture)> =
            std::collections::VecDeque::new();
        for (topic, key, value) in messages {
            let mut record = FutureRecord::<String, String>::to(&topic);
            if let Some(v) = &value {
                record = record.payload(v);
            }
            if let Some(k) = &key {
                record = record.key(k);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        pending.push_back((topic.clone(), f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        match pending.pop_front() {
                            Some((t, f)) => {
                                let d = Self::confirm(&t, f).await?;
                                delivered(t, d);
                            }
                            None => self.producer.poll(Duration::from_millis(10)),
                        }
                    }
                    Err((error, _)) => return Err(PublishError::Delivery { topic, error }),
                }
            }
        }
        for (topic, f) in pending {
            let d = Self::confirm(&topic, f).await?;
            delivered(topic, d);
        }
        Ok(published)
    }

    async fn confirm(
        topic: &str,
        f: DeliveryFuture,
    ) -> Result<rdkafka::producer::future_producer::Delivery, PublishError> {
        match f.await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err((error, _))) => Err(PublishError::Delivery {
                topic: topic.to_owned(),
                error,
            }),
            Err(_) => Err(PublishError::Delivery {
                topic: topic.to_owned(),
                error: KafkaError::Canceled,
            }),
        }
    }
}
