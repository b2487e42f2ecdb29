//! The change event: what one source row change looks like once it has left the
//! replication protocol behind. Everything downstream (merge, store, event log,
//! Kafka) speaks `ChangeEvent`, never pgoutput.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A PostgreSQL WAL position (`XLogRecPtr`), printed as `16/B374D848`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position, "nothing yet".
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The LSN text was not of the form `HEX/HEX`.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN `{0}`: expected the form 16/B374D848")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<Lsn> for String {
    fn from(l: Lsn) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for Lsn {
    type Error = ParseLsnError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What happened to the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// A new row.
    Insert,
    /// A changed row; `row` is the new image.
    Update,
    /// A removed row; `row` holds what the replica identity gives (usually the key).
    Delete,
    /// The whole table was emptied.
    Truncate,
    /// A row read by the initial snapshot (treated like an insert).
    Snapshot,
}

impl Op {
    /// The name stored in the `events.op` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Snapshot => "snapshot",
        }
    }
}

/// One row change from one source, with its place in the source's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// Source name from the config.
    pub source: String,
    /// `schema.table`.
    pub table: String,
    /// Kind of change.
    pub op: Op,
    /// Primary-key (replica identity) columns and values; `{}` for a truncate.
    pub key: Map<String, Value>,
    /// The row image: the new row for insert/update/snapshot, the old key for delete.
    pub row: Map<String, Value>,
    /// Columns whose value was not sent because it is an unchanged TOASTed value:
    /// "same as before", never NULL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
    /// Columns whose value could not be read as the server sent it (bytes that
    /// are not UTF-8 from a `SQL_ASCII` database, JSON nested deeper than the
    /// parser allows), each with why. `row` holds a stand-in (the text with
    /// bad bytes replaced, the JSON as a string); a mapping that reads such a
    /// column sends the row to `dead_letters` instead of storing the stand-in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<(String, String)>,
    /// WAL position of the change record itself (several changes may share one).
    pub lsn: Lsn,
    /// LSN of the commit record of the transaction that carried this change
    /// (pgoutput's Begin `final_lsn`). Checkpoints store the commit's *end* LSN.
    pub commit_lsn: Lsn,
    /// Position of this change inside its transaction (0-based; for a snapshot,
    /// inside the snapshot), so that changes sharing an LSN still have a total
    /// order and a unique identity.
    pub seq: u64,
    /// Source transaction id.
    pub xid: u32,
    /// Source commit time.
    pub commit_time: DateTime<Utc>,
}

impl ChangeEvent {
    /// The stable row identity used by the merge: the key object rendered as
    /// canonical JSON (keys sorted by `serde_json::Map`'s BTreeMap).
    pub fn row_key(&self) -> String {
        // Serialised in place: wrapping the map in a `Value` would clone it.
        serde_json::to_string(&self.key).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for text in ["0/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "0/1"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("16/B374D848".parse::<Lsn>().unwrap().0, 0x16_B374_D848);
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }
}
