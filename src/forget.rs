//! `tributary forget --identity KIND=VALUE`: erase a person.
//!
//! In one transaction under the apply lock: every identifier of the person's
//! profile becomes a suppression; the profile (and the profiles merged into
//! it), its identities, field provenance, the contributions of its rows (and
//! tombstones that carry its identifiers) and the logged events of those rows
//! are deleted. The apply path drops any later change that carries a
//! suppressed identifier, so neither late events, replays, rebuilds nor
//! re-snapshots bring the person back.

use crate::config::Config;
use crate::identity::normalize;
pub use crate::store::forget::ForgetReport;
use crate::store::{Store, StoreError};

/// Why `forget` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// Not `KIND=VALUE`, or a value that does not normalise.
    #[error("--identity must be KIND=VALUE with a valid value (e.g. email=ann@example.com): {0}")]
    Usage(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The Kafka client could not be created.
    #[error("kafka: {0}")]
    Kafka(String),
}

impl From<sqlx::Error> for ForgetError {
    fn from(e: sqlx::Error) -> Self {
        ForgetError::Store(e.into())
    }
}

/// Erases the person owning `identity` (`KIND=VALUE`).
pub async fn forget(
    store: &Store,
    cfg: &Config,
    identity: &str,
) -> Result<ForgetReport, ForgetError> {
    let (kind, raw) = identity
        .split_once('=')
        .ok_or_else(|| ForgetError::Usage(identity.to_owned()))?;
    let value = normalize(
        kind,
        cfg.normalize_of(kind),
        &serde_json::Value::String(raw.to_owned()),
    )
    .map_err(|e| ForgetError::Usage(e.to_string()))?
    .ok_or_else(|| ForgetError::Usage(identity.to_owned()))?;
    // With Kafka, the person leaves the topics too: tombstones for the
    // profile and for every row, sent before the store's erasure commits.
    let publisher = match &cfg.kafka {
        Some(k) => {
            Some(crate::kafka::Publisher::new(k).map_err(|e| ForgetError::Kafka(e.to_string()))?)
        }
        None => None,
    };
    let outbox = publisher.as_ref().map(|p| p as &dyn crate::store::Outbox);
    Ok(store.forget(kind, &value, outbox).await?)
}
