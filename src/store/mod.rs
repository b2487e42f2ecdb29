//! The profile store (PostgreSQL, via sqlx): migrations, the apply of a batch of
//! source transactions together with its checkpoint in one sink transaction,
//! and the reads that `status` and the tests need.
//!
//! Every relation lives in the configured schema; the pool sets `search_path`
//! to it so that SQL here and in the migrations is written unqualified.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::config::SinkConfig;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Profile-store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Could not reach or log in to the store.
    #[error("cannot connect to the profile store {url}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Cause.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("profile store migration failed")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Any query.
    #[error("profile store query failed")]
    Query(#[from] sqlx::Error),
}

/// A handle on the profile store.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    schema: String,
}

impl Store {
    /// Connects (lazily checked by one round trip) with `search_path` set to the schema.
    pub async fn connect(cfg: &SinkConfig) -> Result<Store, StoreError> {
        let opts = cfg
            .conn
            .pg_options()
            .options([("search_path", cfg.schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pool_size)
            .acquire_timeout(Duration::from_secs(cfg.conn.connect_timeout_s.max(1) * 3))
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Connect {
                url: cfg.conn.to_string(),
                source,
            })?;
        Ok(Store {
            pool,
            schema: cfg.schema.clone(),
        })
    }

    /// Creates the schema if needed and applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // The schema name is validated as [a-z0-9_]+ by the config.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "create schema if not exists {}",
            self.schema
        )))
        .execute(&self.pool)
        .await?;
        MIGRATOR.run(&self.pool).await.map_err(StoreError::Migrate)
    }

    /// The underlying pool (for reads by commands and tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The configured schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }
}
