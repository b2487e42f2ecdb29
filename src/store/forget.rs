//! The store side of `tributary forget` (see `crate::forget`): one
//! transaction under the apply lock that suppresses the person's identifiers
//! and deletes their profile, identities, contributions and logged events.

use serde::Serialize;

use super::apply::lock;
use super::{Store, StoreError};
use crate::identity::Ident;

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

impl Store {
    /// Erases the person owning the (normalised) identifier `kind`=`value`;
    /// with `outbox`, the erasure reaches it (tombstones) before the commit.
    pub async fn forget(
        &self,
        kind: &str,
        value: &str,
        outbox: Option<&dyn super::Outbox>,
    ) -> Result<ForgetReport, StoreError> {
        let mut tx = self.pool().begin().await?;
        lock(&mut tx).await?;
        let profile: Option<i64> =
            sqlx::query_scalar("select profile_id from identities where kind = $1 and value = $2")
                .bind(kind)
                .bind(value)
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
        if !suppressed.iter().any(|(k, v)| k == kind && v == value) {
            suppressed.push((kind.to_owned(), value.to_owned()));
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
             or exists (select 1 from json_array_elements(c.identities) e
                          join unnest($2::text[], $3::text[]) as u(k, v) on e ->> 0 = u.k and e ->> 1 = u.v)",
    )
    .bind(profile)
    .bind(&kinds)
    .bind(&values)
    .execute(&mut *tx)
    .await?;
        if let Some(o) = outbox {
            let rows: Vec<(String, String, String)> = sqlx::query_as(
                "select source, table_name, row_key from forget_rows order by 1, 2, 3",
            )
            .fetch_all(&mut *tx)
            .await?;
            let profiles: Vec<i64> = sqlx::query_scalar(
                "select profile_id from profiles where profile_id = $1 or merged_into = $1 order by 1",
            )
            .bind(profile)
            .fetch_all(&mut *tx)
            .await?;
            o.erase(&profiles, &rows)
                .await
                .map_err(StoreError::Outbox)?;
        }
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
}
