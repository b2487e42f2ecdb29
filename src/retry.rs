//! The one error policy: which failures are retried with backoff and which
//! stop the process with the fix.
//!
//! Transient means "the same call can succeed later without anyone acting":
//! a connection lost or refused, a server shutting down or starting up, a
//! serialization failure or deadlock, too many connections, a slot still held
//! by a walsender that has not noticed its client is gone. Everything else
//! (permissions, a missing slot, `wal_level`, a bad config, a broken
//! invariant) is definite: retrying it only hides it, so it stops the source
//! (exit 3) with a message that says what to do.
//!
//! The source loops, the initial snapshot and the Kafka apply role all ask
//! [`classify`]; the error types of the layers ask [`sqlstate`] and
//! [`sqlx_error`]. There is no other list of SQLSTATEs in the crate.

use std::time::Duration;

use backon::BackoffBuilder;

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: back off and try again.
    Retry,
    /// Definite: stop and say what to do.
    Stop,
}

/// The SQLSTATE table (PostgreSQL appendix A).
pub fn sqlstate(code: &str) -> Action {
    match code {
        // Class 08, connection exception: the connection is gone or was refused.
        c if c.starts_with("08") => Action::Retry,
        // Serialization failure, deadlock detected: the transaction may be retried.
        "40001" | "40P01" => Action::Retry,
        // Admin shutdown, crash shutdown, cannot connect now (starting up, in recovery).
        "57P01" | "57P02" | "57P03" => Action::Retry,
        // Too many connections: another client will let one go.
        "53300" => Action::Retry,
        // Object in use: a replication slot still held by the walsender of a
        // connection the server has not yet noticed is dead.
        "55006" => Action::Retry,
        _ => Action::Stop,
    }
}

/// A sqlx error: I/O, pool and TLS-transport failures are transient; a
/// database error goes by its SQLSTATE; anything else is definite.
pub fn sqlx_error(e: &sqlx::Error) -> Action {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => Action::Retry,
        sqlx::Error::Database(d) => d.code().map_or(Action::Stop, |c| sqlstate(&c)),
        _ => Action::Stop,
    }
}

/// Any error of the crate, by the first cause in its chain that a layer
/// classifies (a source, the store, Kafka, the wire client, sqlx, I/O).
/// Unknown errors are definite.
pub fn classify(e: &(dyn std::error::Error + 'static)) -> Action {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(a) = layer_action(err) {
            return a;
        }
        cur = err.source();
    }
    Action::Stop
}

/// [`classify`] for an `anyhow` chain (its contexts are the chain's outer links).
pub fn classify_anyhow(e: &anyhow::Error) -> Action {
    classify(e.as_ref())
}

fn layer_action(err: &(dyn std::error::Error + 'static)) -> Option<Action> {
    use crate::kafka::PublishError;
    use crate::pgwire::PgWireError;
    use crate::sink::SinkError;
    use crate::source::SourceError;
    use crate::store::StoreError;
    if let Some(e) = err.downcast_ref::<SourceError>() {
        return Some(e.action());
    }
    if let Some(e) = err.downcast_ref::<StoreError>() {
        return Some(e.action());
    }
    if let Some(e) = err.downcast_ref::<SinkError>() {
        return Some(e.action());
    }
    if let Some(e) = err.downcast_ref::<PublishError>() {
        return Some(e.action());
    }
    if let Some(e) = err.downcast_ref::<crate::kafka::consume::ConsumeError>() {
        return Some(e.action());
    }
    if let Some(e) = err.downcast_ref::<PgWireError>() {
        return Some(e.action());
    }
    if let Some(e) = err.downcast_ref::<sqlx::Error>() {
        return Some(sqlx_error(e));
    }
    if err.downcast_ref::<std::io::Error>().is_some() {
        return Some(Action::Retry);
    }
    None
}

/// The backoff between retries: from 200 ms, doubling with jitter, at most 30 s, for ever.
pub fn backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_shutdown_and_contention_states_are_retried() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", "08P01", "40001", "40P01", "57P01",
            "57P02", "57P03", "53300", "55006",
        ] {
            assert_eq!(sqlstate(code), Action::Retry, "{code}");
        }
    }

    #[test]
    fn permission_schema_and_data_states_stop() {
        for code in [
            "42501", // insufficient privilege
            "42P01", // undefined table
            "42704", // undefined object (a missing slot)
            "28P01", // invalid password
            "22P02", // invalid text representation
            "23505", // unique violation: a bug, never hidden by a retry
            "55000", // object not in prerequisite state (wal_level)
            "53100", // disk full: an operator must act
            "XX000",
        ] {
            assert_eq!(sqlstate(code), Action::Stop, "{code}");
        }
    }

    #[test]
    fn sqlx_transport_errors_are_retried_and_config_errors_stop() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(sqlx_error(&io), Action::Retry);
        assert_eq!(sqlx_error(&sqlx::Error::PoolTimedOut), Action::Retry);
        assert_eq!(sqlx_error(&sqlx::Error::PoolClosed), Action::Retry);
        assert_eq!(
            sqlx_error(&sqlx::Error::Configuration("bad url".into())),
            Action::Stop
        );
        assert_eq!(sqlx_error(&sqlx::Error::RowNotFound), Action::Stop);
    }

    #[test]
    fn an_anyhow_chain_is_classified_by_its_first_known_cause() {
        let io = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("read snapshot rows")
            .context("source crm");
        assert_eq!(classify_anyhow(&io), Action::Retry);
        let store = anyhow::Error::new(crate::store::StoreError::Query(sqlx::Error::PoolTimedOut))
            .context("apply a snapshot batch");
        assert_eq!(classify_anyhow(&store), Action::Retry);
        let unknown = anyhow::anyhow!("something else");
        assert_eq!(classify_anyhow(&unknown), Action::Stop);
        let definite = anyhow::Error::new(crate::source::SourceError::WalLevel {
            source_name: "crm".into(),
            wal_level: "replica".into(),
        });
        assert_eq!(classify_anyhow(&definite), Action::Stop);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let delays: Vec<Duration> = backoff().take(12).collect();
        assert_eq!(delays.len(), 12, "never gives up");
        assert!(delays[0] < Duration::from_secs(1));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(delays[11] > delays[0]);
    }
}
