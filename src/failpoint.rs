//! Fault points for the crash tests, compiled into debug builds only (the
//! test binary's); in a release binary [`hit`] is an empty inline function.
//!
//! `TRIBUTARY_TEST_CRASH=<stage>:<n>` makes the process abort (no unwinding,
//! no flushing: as close to SIGKILL as a process can do to itself) the `n`th
//! time a write reaches `<stage>`. The stages are the steps of the durability
//! contract in [`crate::sink`]:
//!
//! | stage | where |
//! |---|---|
//! | `after_publish` | Kafka acknowledged the events, nothing is in the store |
//! | `event_log` | a write's event log is half done: a chunk written on its own connection, more follow |
//! | `derived` | event log, contributions, identities and profiles written and the outbox delivered (beside them), nothing committed |
//! | `before_commit` | checkpoint written, neither transaction committed |
//! | `log_committed` | a large batch's event log committed (its own transaction), the batch's not |
//! | `after_commit` | committed, the source not yet acknowledged |
//!
//! `TRIBUTARY_TEST_CRASH_AFTER_PUBLISH=<n>` is the older spelling of
//! `after_publish:<n>`.
//!
//! `TRIBUTARY_TEST_PAUSE=before_commit:<ms>` holds every write that long
//! before its commit (see [`pause`]), so that a test can make the next write
//! be planned while this one is uncommitted.

/// A step of a write where a crash test may stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    AfterPublish,
    EventLog,
    Derived,
    BeforeCommit,
    LogCommitted,
    AfterCommit,
}

impl Stage {
    /// The name used in `TRIBUTARY_TEST_CRASH`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::AfterPublish => "after_publish",
            Stage::EventLog => "event_log",
            Stage::Derived => "derived",
            Stage::BeforeCommit => "before_commit",
            Stage::LogCommitted => "log_committed",
            Stage::AfterCommit => "after_commit",
        }
    }
}

/// Aborts the process if the crash plan names `stage` and this is its `n`th hit.
#[cfg(debug_assertions)]
pub fn hit(stage: Stage) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let plan = PLAN.get_or_init(|| {
        let parse = |v: String| -> Option<(String, u64)> {
            let (s, n) = v.split_once(':')?;
            Some((s.to_owned(), n.parse().ok()?))
        };
        std::env::var("TRIBUTARY_TEST_CRASH")
            .ok()
            .and_then(parse)
            .or_else(|| {
                std::env::var("TRIBUTARY_TEST_CRASH_AFTER_PUBLISH")
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .map(|n| (Stage::AfterPublish.name().to_owned(), n))
            })
    });
    if let Some((name, at)) = plan {
        if name == stage.name() && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *at {
            if stage == Stage::AfterPublish {
                // The wording the Kafka crash test looks for.
                eprintln!("TRIBUTARY_TEST_CRASH: aborting after publishing batch {at}");
            }
            eprintln!("TRIBUTARY_TEST_CRASH: aborting at {name}, hit {at}");
            std::process::abort();
        }
    }
}

/// Release builds carry no fault points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_stage: Stage) {}

/// Holds the write for the pause `TRIBUTARY_TEST_PAUSE` gives `stage`, if any.
#[cfg(debug_assertions)]
pub async fn pause(stage: Stage) {
    use std::sync::OnceLock;
    static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
    let plan = PLAN.get_or_init(|| {
        let v = std::env::var("TRIBUTARY_TEST_PAUSE").ok()?;
        let (s, ms) = v.split_once(':')?;
        Some((s.to_owned(), ms.parse().ok()?))
    });
    if let Some((name, ms)) = plan {
        if name == stage.name() {
            tokio::time::sleep(std::time::Duration::from_millis(*ms)).await;
        }
    }
}

/// Release builds carry no fault points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn pause(_stage: Stage) {}
