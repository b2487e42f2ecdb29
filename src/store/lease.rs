//! The apply lease: exactly one `run --role apply` instance writes profiles
//! at a time, and where it is in the change topics is stored with its writes.
//!
//! An instance that holds the lease (`apply_lease`, one row) is the owner; it
//! renews the lease every third of its time to live. The others stand by and
//! take the lease once it has expired (the owner died) or was released (the
//! owner stopped cleanly); every take moves `epoch`. Every write of an owner
//! checks, inside its own transaction, that the lease is still its epoch and
//! unexpired, and holds the lease row until it commits: a standby cannot
//! take the lease between that check and the commit, so an owner that was
//! only paused (a long GC-like stall, a network partition) never writes after
//! its successor started. The check comes first in the write, before the
//! outbox sends anything, so such an owner publishes no profile change
//! either. The hold is `FOR KEY SHARE`: the owner's renewal (an update of
//! `expires_at`, no key column) does not wait for it, so a write longer than
//! the lease never lets it expire under a live owner, while a takeover takes
//! the row `FOR UPDATE` first and so waits for the write to commit. The same
//! transaction moves the owner's offsets in `consumer_offsets`, so a new
//! owner starts exactly after the last change the store has.
//!
//! A capture process records, with each checkpoint, where in the change
//! topics it published the changes that checkpoint covers
//! (`published_offsets`); comparing those with the owner's offsets tells
//! whether the store has *applied* a source up to a position, not only
//! published it ([`Store::apply_caught_up`]).

use std::time::Duration;

use sqlx::PgConnection;

use super::{Store, StoreError};

/// The lease's one row: one owner of profile writes per store.
const LEASE: &str = "profiles";

/// Positions in the change topics: per `(topic, partition)`, the offset
/// after the last message (the next one to read). What a capture published
/// is compared with what the owner consumed.
pub type Offsets = std::collections::BTreeMap<(String, i32), i64>;

/// `offsets` as the three arrays an `unnest($n::text[], $m::int[],
/// $k::bigint[])` takes.
fn columns(offsets: &Offsets) -> (Vec<String>, Vec<i32>, Vec<i64>) {
    let topics = offsets.keys().map(|k| k.0.clone()).collect();
    let partitions = offsets.keys().map(|k| k.1).collect();
    (topics, partitions, offsets.values().copied().collect())
}

/// Rows of `(topic, partition, next_offset)` as [`Offsets`].
fn offsets_of(rows: Vec<(String, i32, i64)>) -> Offsets {
    rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect()
}

/// An owner's hold on the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// This instance (host, process, a random part).
    pub holder: String,
    /// Counts the owners: this one's.
    pub epoch: i64,
    /// The consumer group its offsets belong to.
    pub group: String,
    /// How long the lease lasts unless renewed.
    pub ttl: Duration,
}

/// A write of changes consumed from Kafka by the lease's owner: checked
/// against the lease, and moving these partitions' offsets.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// The owner's lease.
    pub lease: Lease,
    /// The next offset to read in each partition the write consumed from.
    pub offsets: Offsets,
}

/// Who holds (or last held) the lease: for a standby's log and `status`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct LeaseHolder {
    /// The owner instance.
    pub holder: String,
    /// Its epoch (counts the owners so far).
    pub epoch: i64,
    /// The consumer group its offsets belong to.
    #[sqlx(rename = "group_id")]
    pub group: String,
    /// When it took the lease.
    pub acquired_at: chrono::DateTime<chrono::Utc>,
    /// Milliseconds until it expires unless renewed; negative: it expired
    /// (or was released) that long ago, and nobody owns profile writes.
    pub expires_in_ms: i64,
}

/// Where a split deployment stands (`tributary status`): the apply lease and,
/// per change-topic partition, what the capture published and the owner
/// applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyProgress {
    /// The lease (its fields at the top level of the JSON).
    #[serde(flatten)]
    pub lease: LeaseHolder,
    /// Per partition, in topic and partition order.
    pub partitions: Vec<PartitionProgress>,
}

/// One change-topic partition in a split deployment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// The offset after the last message the capture had published at its
    /// last checkpoint (None: it recorded none yet).
    pub published: Option<i64>,
    /// The offset after the last message the owner applied (None: none yet).
    pub applied: Option<i64>,
    /// `published - applied` when the capture is ahead: messages on Kafka
    /// the store does not have yet (a lower bound: the capture records where
    /// it is at its checkpoints).
    pub behind: i64,
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes the lease for `holder` when nobody holds it, it expired, or it was
    /// released; None while another instance holds it.
    pub async fn acquire_lease(
        &self,
        holder: &str,
        group: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut tx = self.pool().begin().await?;
        // `FOR UPDATE` waits for a write of the owner that holds the row
        // (`FOR KEY SHARE`, see [`hold`]), which the upsert's own lock would
        // not: it changes no key column.
        sqlx::query("select 1 from apply_lease where name = $1 for update")
            .bind(LEASE)
            .execute(&mut *tx)
            .await?;
        let epoch: Option<i64> = sqlx::query_scalar(
            "insert into apply_lease (name, holder, epoch, group_id, expires_at)
             values ($1, $2, 1, $3, clock_timestamp() + $4 * interval '1 millisecond')
             on conflict (name) do update
                set holder = excluded.holder, epoch = apply_lease.epoch + 1,
                    group_id = excluded.group_id, acquired_at = now(), expires_at = excluded.expires_at
              where apply_lease.expires_at < clock_timestamp()
             returning epoch",
        )
        .bind(LEASE)
        .bind(holder)
        .bind(group)
        .bind(ttl_ms(ttl))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(epoch.map(|epoch| Lease {
            holder: holder.to_owned(),
            epoch,
            group: group.to_owned(),
            ttl,
        }))
    }

    /// Who holds the lease now (None: nobody ever took it).
    pub async fn lease_holder(&self) -> Result<Option<LeaseHolder>, StoreError> {
        Ok(sqlx::query_as(
            "select holder, epoch, group_id, acquired_at,
                    (extract(epoch from expires_at - clock_timestamp()) * 1000)::bigint as expires_in_ms
               from apply_lease where name = $1",
        )
        .bind(LEASE)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Extends `lease` by its time to live; false when it is no longer this
    /// owner's (a standby took it after it expired).
    pub async fn renew_lease(&self, lease: &Lease) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "update apply_lease set expires_at = clock_timestamp() + $4 * interval '1 millisecond'
              where name = $1 and holder = $2 and epoch = $3",
        )
        .bind(LEASE)
        .bind(&lease.holder)
        .bind(lease.epoch)
        .bind(ttl_ms(lease.ttl))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease up (a clean stop): a standby takes it at its next try
    /// instead of waiting for it to expire.
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        sqlx::query(
            "update apply_lease set expires_at = clock_timestamp() - interval '1 millisecond'
              where name = $1 and holder = $2 and epoch = $3",
        )
        .bind(LEASE)
        .bind(&lease.holder)
        .bind(lease.epoch)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The offsets the store has for `group`.
    pub async fn consumer_offsets(&self, group: &str) -> Result<Offsets, StoreError> {
        let rows = sqlx::query_as(
            "select topic, partition, next_offset from consumer_offsets where group_id = $1",
        )
        .bind(group)
        .fetch_all(self.pool())
        .await?;
        Ok(offsets_of(rows))
    }

    /// Where the capture process has published `source` so far, as recorded
    /// with its checkpoints (empty: never published, or not split over Kafka).
    pub async fn published_offsets(&self, source: &str) -> Result<Offsets, StoreError> {
        let rows = sqlx::query_as(
            "select topic, partition, next_offset from published_offsets where source = $1",
        )
        .bind(source)
        .fetch_all(self.pool())
        .await?;
        Ok(offsets_of(rows))
    }

    /// The apply lease and per-partition progress (None: no apply instance
    /// ever took the lease: not a split deployment).
    pub async fn apply_progress(&self) -> Result<Option<ApplyProgress>, StoreError> {
        let Some(lease) = self.lease_holder().await? else {
            return Ok(None);
        };
        let rows: Vec<(String, i32, Option<i64>, Option<i64>)> = sqlx::query_as(
            "select coalesce(p.topic, c.topic), coalesce(p.partition, c.partition),
                    p.next_offset, c.next_offset
               from published_offsets p
               full join (select topic, partition, next_offset from consumer_offsets
                           where group_id = $1) c
                 on c.topic = p.topic and c.partition = p.partition
              order by 1, 2",
        )
        .bind(&lease.group)
        .fetch_all(self.pool())
        .await?;
        let partitions = rows
            .into_iter()
            .map(|(topic, partition, published, applied)| PartitionProgress {
                topic,
                partition,
                published,
                applied,
                behind: (published.unwrap_or(0) - applied.unwrap_or(0)).max(0),
            })
            .collect();
        Ok(Some(ApplyProgress { lease, partitions }))
    }

    /// Has the apply owner applied every message up to `published`? True when
    /// nothing in the store applies from Kafka (no apply lease was ever taken):
    /// then the capture's checkpoint is all there is.
    pub async fn apply_caught_up(&self, published: &Offsets) -> Result<bool, StoreError> {
        if published.is_empty() {
            return Ok(true);
        }
        let (topics, partitions, next) = columns(published);
        let behind: Option<i64> = sqlx::query_scalar(
            "select count(*) from unnest($1::text[], $2::int[], $3::bigint[]) as p(topic, partition, next_offset)
               cross join apply_lease l
              where l.name = $4
                and coalesce((select c.next_offset from consumer_offsets c
                               where c.group_id = l.group_id and c.topic = p.topic and c.partition = p.partition), 0)
                    < p.next_offset",
        )
        .bind(topics)
        .bind(partitions)
        .bind(next)
        .bind(LEASE)
        .fetch_one(self.pool())
        .await?;
        Ok(behind.unwrap_or(0) == 0)
    }
}

/// Inside a capture's checkpoint transaction: records where `source`'s
/// changes up to that checkpoint were published (never backwards).
pub(crate) async fn record_published(
    tx: &mut PgConnection,
    source: &str,
    published: &Offsets,
) -> Result<(), StoreError> {
    if published.is_empty() {
        return Ok(());
    }
    let (topics, partitions, next) = columns(published);
    sqlx::query(
        "insert into published_offsets (source, topic, partition, next_offset)
         select $1, t, p, o from unnest($2::text[], $3::int[], $4::bigint[]) as u(t, p, o)
         on conflict (topic, partition) do update
            set next_offset = excluded.next_offset, source = excluded.source, updated_at = now()
          where published_offsets.next_offset < excluded.next_offset",
    )
    .bind(source)
    .bind(topics)
    .bind(partitions)
    .bind(next)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Inside a write's transaction: fails with [`StoreError::LeaseLost`] unless
/// `consumed`'s lease is still the owner's and unexpired, then holds the
/// lease row until the transaction ends and moves the offsets (never
/// backwards).
pub async fn hold(tx: &mut PgConnection, consumed: &Consumed) -> Result<(), StoreError> {
    let lease = &consumed.lease;
    let held: Option<i32> = sqlx::query_scalar(
        "select 1 from apply_lease
          where name = $1 and holder = $2 and epoch = $3 and expires_at > clock_timestamp()
          for key share",
    )
    .bind(LEASE)
    .bind(&lease.holder)
    .bind(lease.epoch)
    .fetch_optional(&mut *tx)
    .await?;
    if held.is_none() {
        return Err(StoreError::LeaseLost { epoch: lease.epoch });
    }
    if consumed.offsets.is_empty() {
        return Ok(());
    }
    let (topics, partitions, next) = columns(&consumed.offsets);
    sqlx::query(
        "insert into consumer_offsets (group_id, topic, partition, next_offset)
         select $1, t, p, o from unnest($2::text[], $3::int[], $4::bigint[]) as u(t, p, o)
         on conflict (group_id, topic, partition) do update
            set next_offset = excluded.next_offset, updated_at = now()
          where consumer_offsets.next_offset < excluded.next_offset",
    )
    .bind(&lease.group)
    .bind(topics)
    .bind(partitions)
    .bind(next)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
