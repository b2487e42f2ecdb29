//! Integration tests, all in one binary to keep link time down. Each test starts
//! its own throwaway PostgreSQL cluster(s) from the machine's server binaries.

mod check;
mod dead_letters;
mod demo;
mod deploy;
mod docs;
mod faults;
mod forget;
mod harness;
mod hostile_source;
mod kafka;
mod large;
mod merge;
mod migrate;
mod operate;
mod pipeline;
mod reconcile;
mod replay;
mod replication;
mod resilience;
mod schema;
mod secrets;
mod snapshot;
mod tls;
mod unusual_sources;
mod wal;
mod write_path;
