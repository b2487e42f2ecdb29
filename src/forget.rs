//! `tributary forget --identity KIND=VALUE`: erase a person.
//!
//! In one transaction under the apply lock: every identifier of the person's
//! profile becomes a suppression; the profile (and the profiles merged into
//! it), its identities, field provenance, the contributions of its rows (and
//! tombstones that carry its identifiers) and the logged events of those rows
//! are deleted. The apply path drops any later change that carries a
//! suppressed identifier, so neither late events, replays, rebuilds nor
//! re-snapshots bring the person back.

use serde::Serialize;

use crate::config::Config;
use crate::identity::{normalize, Ident};
use crate::store::apply::lock;
use crate::store::{Store, StoreError};

/// What `forget` erased.
#[derive(Debug, Serialize)]
pub struct ForgetReport {
    /// The person's profile, if one existed.
    pub profile_id: Option<i64>,
    /// Identifiers now suppressed.
    pub suppressed: Vec<Ident>,
    /// Source rows whose contributions were deleted.
    pub rows: u64,
    /// Logged events deleted.
    pub events: u64,
}

/// Why `forget` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// Not `KIND=VALUE`, or a value that does not normalise.
    #[error("--identity must be KIND=VALUE with a valid value (e.g. email=ann@example.com): {0}")]
    Usage(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    let mut tx = store.pool().begin().await?;
    lock(&mut tx).await?;
    let profile: Option<i64> =
        sqlx::query_scalar("select profile_id from identities where kind = $1 and value = $2")
            .bind(kind)
            .bind(&value)
            .fetch_optional(&mut *tx)
            .await?;
    let mut suppressed: Vec<Ident> = match profile {
        Some(p) => {
            sqlx::query_as("select kind, value from identities where profile_id = $1")
                .bind(p)
                .fetch_all(&mut *tx)
                .await?
        }
        None => Vec::new(),
    };
    if !suppressed.iter().any(|(k, v)| k == kind && v == &value) {
        suppressed.push((kind.to_owned(), value.clone()));
    }
    suppressed.sort();
    let kinds: Vec<&str> = suppressed.iter().map(|(k, _)| k.as_str()).collect();
    let values: Vec<&str> = suppressed.iter().map(|(_, v)| v.as_str()).collect();
    sqlx::query("insert into suppressions (kind, value) select * from unnest($1::text[], $2::text[]) on conflict do nothing")
        .bind(&kinds)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
    // The person's rows: live contributions of the profile, and tombstones that
    // still carry one of the identifiers.
    sqlx::query(
        "create temporary table forget_rows on commit drop as
         select source, table_name, row_key from contributions c
          where c.profile_id = $1
             or exists (select 1 from jsonb_array_elements(c.identities) e
                          join unnest($2::text[], $3::text[]) as u(k, v) on e ->> 0 = u.k and e ->> 1 = u.v)",
    )
    .bind(profile)
    .bind(&kinds)
    .bind(&values)
    .execute(&mut *tx)
    .await?;
    let events = sqlx::query(
        "delete from events e using forget_rows r
          where e.source = r.source and e.table_name = r.table_name and e.key = r.row_key::jsonb",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let rows = sqlx::query(
        "delete from contributions c using forget_rows r
          where c.source = r.source and c.table_name = r.table_name and c.row_key = r.row_key",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if let Some(p) = profile {
        sqlx::query("delete from identities where profile_id = $1")
            .bind(p)
            .execute(&mut *tx)
            .await?;
        sqlx::query("delete from profiles where profile_id = $1 or merged_into = $1")
            .bind(p)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    tracing::info!(profile = ?profile, identifiers = suppressed.len(), rows, events, "forgot a person");
    Ok(ForgetReport {
        profile_id: profile,
        suppressed,
        rows,
        events,
    })
}
