//! Tributary: PostgreSQL change-data-capture into unified customer profiles.
//!
//! ```text
//!  CRM db ─┐  logical replication (pgoutput)          profile store (PostgreSQL)
//!  shop db ┼─► source loop per db ─► decode ─► map ─► resolve ─► one sink txn:
//!  ...    ─┘   (slot, publication,  (Relation,  (rows →   (identity    events + contributions
//!               keepalive, flush)    TOAST)    identities, merges,     + profiles + checkpoint
//!                                              fields)     freshness)        │
//!                       ◄────────── standby status: flush LSN = committed checkpoint
//! ```
//!
//! * [`pgwire`]: a small PostgreSQL frontend for replication connections (TLS, SCRAM, CopyBoth).
//! * [`pgoutput`]: pgoutput messages → [`event::ChangeEvent`], with the relation cache and TOAST markers.
//! * [`source`]: one loop per source database: slot, publication, snapshot, stream, flush feedback.
//! * [`resolve`]: the pure merge core (contributions, identity merges, field resolution, aggregates).
//! * [`sink`]: the one write path: publish → apply → outbox → checkpoint → commit, by role.
//! * [`store`]: the profile store: migrations, batch apply with checkpoint, reads.
//! * [`retry`]: the one error policy: what is retried with backoff, what stops.
//! * [`config`], [`cli`], [`app`]: the edges.

pub mod app;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conninfo;
pub mod daemon;
pub mod demo;
pub mod endpoint;
pub mod event;
pub mod failpoint;
pub mod forget;
pub mod identity;
pub mod kafka;
pub mod mapping;
pub mod metrics;
pub mod pgoutput;
pub mod pgwire;
pub mod progress;
pub mod reconcile;
pub mod resnapshot;
pub mod resolve;
pub mod retry;
pub mod sink;
pub mod source;
pub mod state;
pub mod status;
pub mod store;
#[cfg(test)]
pub(crate) mod strategies;
