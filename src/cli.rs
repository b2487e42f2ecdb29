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
    Run,
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
