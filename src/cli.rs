//! The command line: `tributary <command>`, as in the contract.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Change-data-capture from PostgreSQL into unified customer profiles.
#[derive(Debug, Parser)]
#[command(name = "tributary", version, about)]
pub struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "TRIBUTARY_CONFIG",
        default_value = "tributary.toml"
    )]
    pub config: PathBuf,
    /// One JSON document on stdout instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format on stderr (default: human on a terminal, JSON otherwise).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// What a `run` process does (scaling out over Kafka partitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Sources to the store (and to Kafka when configured), in one process.
    All,
    /// Sources to Kafka only (the store keeps only the checkpoints).
    Capture,
    /// Kafka change topics to the store, in a consumer group.
    Apply,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Self-contained first run on throwaway local clusters; needs no config.
    Demo {
        /// Seconds of live changes to stream.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Keep the clusters running (until Ctrl-C) and print how to connect.
        #[arg(long)]
        keep: bool,
    },
    /// Validate the config and every database; one line per check with the fix.
    Check,
    /// Apply the profile-store migrations.
    Migrate,
    /// The daemon: snapshot new sources, then stream all sources until SIGINT/SIGTERM.
    Run {
        /// `all`: stream sources into the store (and Kafka if configured);
        /// `capture`: stream sources into Kafka only; `apply`: consume the
        /// change topics in a consumer group and apply them to the store.
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
    },
    /// Per-source replication state, profile counts and dead letters.
    Status,
    /// Re-apply the logged change events of a source from an LSN (idempotent).
    Replay {
        /// Source name.
        #[arg(long)]
        source: String,
        /// First commit LSN to replay, e.g. 16/B374D848.
        #[arg(long)]
        from_lsn: crate::event::Lsn,
        /// Last commit LSN to replay.
        #[arg(long)]
        to_lsn: Option<crate::event::Lsn>,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-snapshot one source (or one of its tables) while the daemon streams.
    Snapshot {
        /// Source name.
        #[arg(long)]
        source: String,
        /// Only this table (`schema.table`, or `table` in `public`).
        #[arg(long)]
        table: Option<String>,
        /// Seconds to wait for the daemon to apply up to each chunk's watermark.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// Compare the sources' current rows with the profile store and record a report.
    /// Exit 1 when unrepaired drift remains.
    Reconcile {
        /// Only this source's tables (profiles are always checked).
        #[arg(long)]
        source: Option<String>,
        /// Repair drifted rows and profiles through the apply path.
        #[arg(long)]
        repair: bool,
        /// Check only about N rows per table, and the profiles they belong to.
        #[arg(long, value_name = "N")]
        sample: Option<u64>,
        /// Seconds to wait for the daemon to apply up to an anchor.
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
    /// List reconciliation runs, or show one run's drift (`latest` for the newest).
    Report {
        /// A run id or `latest`.
        run: Option<String>,
    },
    /// Rebuild all derived state (profiles, identities, provenance) from the event log.
    Rebuild,
    /// Erase a person: profile, identities, provenance, logged events; suppress
    /// their identifiers so nothing brings them back.
    Forget {
        /// KIND=VALUE, e.g. email=ann@example.com.
        #[arg(long)]
        identity: String,
    },
}
