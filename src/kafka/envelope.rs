//! The change-event envelope on Kafka: the JSON a Debezium PostgreSQL
//! connector writes with `value.converter.schemas.enable=false`, so existing
//! Debezium consumers read it unchanged. Pure: no I/O.
//!
//! ```json
//! {"before": null, "after": {"id": 1, "email": "a@x.com"},
//!  "source": {"version": "0.1.0", "connector": "tributary", "name": "tributary",
//!             "ts_ms": 1700000000000, "snapshot": "false", "db": "crm",
//!             "schema": "public", "table": "contacts", "txId": 743,
//!             "lsn": 24023128, "sequence": "[\"24023040\",\"24023128\"]",
//!             "commit_lsn": "0/16E8A40", "seq": 0},
//!  "op": "c", "ts_ms": 1700000000123, "transaction": null}
//! ```
//!
//! `source.db` is the Tributary source name. `(source.db, source.commit_lsn,
//! source.seq)` identifies a change exactly once: several changes can share
//! one `lsn` (a multi-row insert), never a commit LSN and a position.

use serde_json::{json, Map, Value};

use crate::event::{ChangeEvent, Op};
use crate::store::apply::{DeadLetter, ProfileChange};

/// What Debezium writes for an unchanged TOASTed value it did not receive.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// Debezium's op letter: c(reate), u(pdate), d(elete), r(ead: snapshot), t(runcate).
pub fn op_letter(op: Op) -> &'static str {
    match op {
        Op::Insert => "c",
        Op::Update => "u",
        Op::Delete => "d",
        Op::Snapshot => "r",
        Op::Truncate => "t",
    }
}

/// The topic of a table's changes: `<prefix>.<source>.<schema>.<table>`.
pub fn change_topic(prefix: &str, source: &str, qualified_table: &str) -> String {
    format!("{prefix}.{source}.{qualified_table}")
}

/// The topic of profile changes: `<prefix>.profiles`, keyed by profile id.
pub fn profiles_topic(prefix: &str) -> String {
    format!("{prefix}.profiles")
}

/// The dead-letter topic, mirroring the `dead_letters` table.
pub fn dead_letters_topic(prefix: &str) -> String {
    format!("{prefix}.dead_letters")
}

/// A profile change: `{"profile_id", "merged_into", "changed", "traits",
/// "source", "ts_ms"}`; `changed` holds the traits whose value changed (null
/// when a trait is gone), `traits` the whole profile after the change, so the
/// latest message per key is the profile (a compacted topic works).
pub fn profile_value(source: &str, c: &ProfileChange, now_ms: i64) -> String {
    /// Serialised from borrowed parts (one per changed profile: building a
    /// `Value` of it first copied both maps). Fields in `json!`'s order.
    #[derive(serde::Serialize)]
    struct Message<'a> {
        changed: &'a Map<String, Value>,
        merged_into: Option<crate::resolve::ProfileId>,
        profile_id: crate::resolve::ProfileId,
        source: &'a str,
        traits: &'a Map<String, Value>,
        ts_ms: i64,
    }
    serde_json::to_string(&Message {
        changed: &c.changed,
        merged_into: c.merged_into,
        profile_id: c.profile_id,
        source,
        traits: &c.traits,
        ts_ms: now_ms,
    })
    .unwrap_or_default()
}

/// A consumed message that is not a change envelope, as a dead letter: the
/// source is read from the topic name (`<prefix>.<source>.<schema>.<table>`,
/// `kafka` when it is not one), the table is the topic, and the row holds
/// where the message was and its key and value as text.
pub fn undecodable(
    prefix: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    value: &[u8],
    error: &str,
) -> DeadLetter {
    let source = topic
        .strip_prefix(prefix)
        .and_then(|t| t.strip_prefix('.'))
        .and_then(|t| t.split('.').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("kafka");
    let mut row = Map::new();
    row.insert("topic".into(), json!(topic));
    row.insert("partition".into(), json!(partition));
    row.insert("offset".into(), json!(offset));
    row.insert(
        "key".into(),
        key.map_or(Value::Null, |k| json!(String::from_utf8_lossy(k))),
    );
    row.insert("value".into(), json!(String::from_utf8_lossy(value)));
    DeadLetter {
        source: source.to_owned(),
        table: topic.to_owned(),
        lsn: crate::event::Lsn(0),
        row,
        error: format!("not a change envelope: {error}"),
    }
}

/// A dead letter, as in the `dead_letters` table.
pub fn dead_letter_value(d: &DeadLetter, now_ms: i64) -> String {
    json!({
        "source": d.source,
        "table": d.table,
        "lsn": d.lsn.to_string(),
        "row": d.row,
        "error": d.error,
        "ts_ms": now_ms,
    })
    .to_string()
}

/// The message key: the row's primary key as a JSON object (`{"id":1}`), as
/// Debezium keys without schemas; none for a truncate.
pub fn key(e: &ChangeEvent) -> Option<String> {
    (e.op != Op::Truncate).then(|| serde_json::to_string(&e.key).unwrap_or_default())
}

/// The message value. `now_ms` is the publish time (`ts_ms` of the envelope).
pub fn value(prefix: &str, e: &ChangeEvent, now_ms: i64) -> String {
    let (schema, table) = e.table.split_once('.').unwrap_or(("public", &e.table));
    let mut after = e.row.clone();
    for col in &e.unchanged {
        after.insert(col.clone(), Value::String(UNAVAILABLE.into()));
    }
    let (before, after) = match e.op {
        Op::Insert | Op::Update | Op::Snapshot => (Value::Null, Value::Object(after)),
        Op::Delete => (Value::Object(e.row.clone()), Value::Null),
        Op::Truncate => (Value::Null, Value::Null),
    };
    let mut source = Map::new();
    source.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    source.insert("connector".into(), json!("tributary"));
    source.insert("name".into(), json!(prefix));
    source.insert("ts_ms".into(), json!(e.commit_time.timestamp_millis()));
    source.insert("ts_us".into(), json!(e.commit_time.timestamp_micros()));
    source.insert(
        "snapshot".into(),
        json!(if e.op == Op::Snapshot {
            "true"
        } else {
            "false"
        }),
    );
    source.insert("db".into(), json!(e.source));
    source.insert("schema".into(), json!(schema));
    source.insert("table".into(), json!(table));
    source.insert("txId".into(), json!(e.xid));
    source.insert("lsn".into(), json!(e.lsn.0));
    source.insert(
        "sequence".into(),
        json!(format!("[\"{}\",\"{}\"]", e.commit_lsn.0, e.lsn.0)),
    );
    source.insert("commit_lsn".into(), json!(e.commit_lsn.to_string()));
    source.insert("seq".into(), json!(e.seq));
    if !e.unreadable.is_empty() {
        // Columns the capture could not read (the apply role dead-letters the
        // row as the capture would have).
        source.insert("unreadable".into(), json!(e.unreadable));
    }
    json!({
        "before": before,
        "after": after,
        "source": source,
        "op": op_letter(e.op),
        "ts_ms": now_ms,
        "transaction": null,
    })
    .to_string()
}

/// The parts of an envelope [`decode`] reads; anything else is skipped
/// without being built (the apply role decodes every message: a `Value` tree
/// of the whole envelope and a copy of its row cost it a fifth of its CPU).
#[derive(serde::Deserialize)]
struct Wire<'a> {
    #[serde(default)]
    before: Option<Map<String, Value>>,
    #[serde(default)]
    after: Option<Map<String, Value>>,
    #[serde(default, borrow)]
    source: Option<WireSource<'a>>,
    #[serde(default, borrow)]
    op: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct WireSource<'a> {
    #[serde(default, borrow)]
    db: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    schema: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    table: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    commit_lsn: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    ts_us: Option<i64>,
    #[serde(default)]
    ts_ms: Option<i64>,
    #[serde(default)]
    lsn: Option<u64>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, rename = "txId")]
    tx_id: Option<u64>,
    #[serde(default)]
    unreadable: Option<Value>,
}

/// A change envelope read back into the event it was made from (the apply
/// role). `source.ts_us` keeps the commit time to the microsecond.
pub fn decode(key: Option<&[u8]>, value: &[u8]) -> Result<ChangeEvent, String> {
    let w: Wire<'_> = serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let src = w.source.ok_or("source missing")?;
    fn text<'a>(
        v: Option<std::borrow::Cow<'a, str>>,
        f: &str,
    ) -> Result<std::borrow::Cow<'a, str>, String> {
        v.ok_or_else(|| format!("source.{f} missing"))
    }
    let op = match w.op.as_deref() {
        Some("c") => Op::Insert,
        Some("u") => Op::Update,
        Some("d") => Op::Delete,
        Some("r") => Op::Snapshot,
        Some("t") => Op::Truncate,
        other => return Err(format!("unknown op {other:?}")),
    };
    let image = match op {
        Op::Delete => w.before,
        _ => w.after,
    };
    let mut row = image.unwrap_or_default();
    let unchanged: Vec<String> = row
        .iter()
        .filter(|(_, v)| v.as_str() == Some(UNAVAILABLE))
        .map(|(k, _)| k.clone())
        .collect();
    for c in &unchanged {
        row.remove(c);
    }
    let key: Map<String, Value> = match key {
        Some(k) => {
            serde_json::from_slice(k).map_err(|e| format!("key is not a JSON object: {e}"))?
        }
        None => Map::new(),
    };
    let commit_lsn = text(src.commit_lsn, "commit_lsn")?
        .parse()
        .map_err(|e| format!("source.commit_lsn: {e}"))?;
    let micros = src
        .ts_us
        .or_else(|| src.ts_ms.map(|m| m * 1000))
        .ok_or("source.ts_us missing")?;
    Ok(ChangeEvent {
        source: text(src.db, "db")?.into_owned(),
        table: format!(
            "{}.{}",
            text(src.schema, "schema")?,
            text(src.table, "table")?
        ),
        op,
        key,
        row,
        unchanged,
        unreadable: src
            .unreadable
            .and_then(|u| serde_json::from_value(u).ok())
            .unwrap_or_default(),
        lsn: crate::event::Lsn(src.lsn.ok_or("source.lsn missing")?),
        commit_lsn,
        seq: src.seq.ok_or("source.seq missing")?,
        xid: src
            .tx_id
            .and_then(|x| u32::try_from(x).ok())
            .ok_or("source.txId missing")?,
        commit_time: chrono::DateTime::from_timestamp_micros(micros)
            .ok_or("source.ts_us out of range")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Lsn;

    fn ev(op: Op) -> ChangeEvent {
        let row: Map<String, Value> =
            serde_json::from_str(r#"{"id": 7, "email": "a@x.com"}"#).unwrap();
        ChangeEvent {
            source: "crm".into(),
            table: "public.contacts".into(),
            op,
            key: serde_json::from_str(r#"{"id": 7}"#).unwrap(),
            row,
            unchanged: vec!["bio".into()],
            unreadable: Vec::new(),
            lsn: Lsn(0x16E_8A58),
            commit_lsn: Lsn(0x16E_8A40),
            seq: 3,
            xid: 743,
            commit_time: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        }
    }

    #[test]
    fn an_envelope_decodes_to_the_event_it_was_made_from() {
        for op in [
            Op::Insert,
            Op::Update,
            Op::Delete,
            Op::Snapshot,
            Op::Truncate,
        ] {
            let mut e = ev(op);
            e.commit_time = chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap();
            if op == Op::Truncate {
                e.key = Map::new();
                e.row = Map::new();
                e.unchanged.clear();
            }
            if op == Op::Delete {
                e.unchanged.clear();
            }
            let k = key(&e);
            let back = decode(
                k.as_deref().map(str::as_bytes),
                value("p", &e, 0).as_bytes(),
            )
            .unwrap();
            assert_eq!(back, e, "{op:?}");
        }
        assert!(decode(None, b"{}").is_err());
        assert!(decode(None, b"not json")
            .unwrap_err()
            .starts_with("not JSON"));
        let no_lsn = value("p", &ev(Op::Insert), 0).replace("\"commit_lsn\"", "\"x\"");
        assert_eq!(
            decode(None, no_lsn.as_bytes()).unwrap_err(),
            "source.commit_lsn missing"
        );
    }

    #[test]
    fn a_profile_message_is_the_documented_object() {
        let c = ProfileChange {
            profile_id: 42,
            merged_into: None,
            changed: serde_json::from_str(r#"{"phone": "+1", "nickname": null}"#).unwrap(),
            traits: serde_json::from_str(r#"{"phone": "+1", "order_count": 7}"#).unwrap(),
        };
        let v: Value = serde_json::from_str(&profile_value("shop", &c, 5)).unwrap();
        assert_eq!(
            v,
            json!({"profile_id": 42, "merged_into": null,
                   "changed": {"phone": "+1", "nickname": null},
                   "traits": {"phone": "+1", "order_count": 7},
                   "source": "shop", "ts_ms": 5})
        );
    }

    #[test]
    fn an_update_reads_like_debezium() {
        let v: Value = serde_json::from_str(&value("tributary", &ev(Op::Update), 5)).unwrap();
        assert_eq!(v["op"], "u");
        assert_eq!(v["before"], Value::Null);
        assert_eq!(v["after"]["email"], "a@x.com");
        assert_eq!(
            v["after"]["bio"], UNAVAILABLE,
            "unchanged TOAST is not NULL"
        );
        assert_eq!(v["source"]["db"], "crm");
        assert_eq!(v["source"]["schema"], "public");
        assert_eq!(v["source"]["table"], "contacts");
        assert_eq!(v["source"]["txId"], 743);
        assert_eq!(v["source"]["lsn"], 0x16E_8A58);
        assert_eq!(v["source"]["ts_ms"], 1_700_000_000_000_i64);
        assert_eq!(v["source"]["snapshot"], "false");
        assert_eq!(v["source"]["commit_lsn"], "0/16E8A40");
        assert_eq!(v["source"]["seq"], 3);
        assert_eq!(v["ts_ms"], 5);
        assert_eq!(key(&ev(Op::Update)).as_deref(), Some(r#"{"id":7}"#));
    }

    #[test]
    fn deletes_snapshots_and_truncates_have_their_letters_and_images() {
        let d: Value = serde_json::from_str(&value("p", &ev(Op::Delete), 0)).unwrap();
        assert_eq!((d["op"].as_str(), d["after"].is_null()), (Some("d"), true));
        assert_eq!(d["before"]["id"], 7);
        let r: Value = serde_json::from_str(&value("p", &ev(Op::Snapshot), 0)).unwrap();
        assert_eq!(
            (r["op"].as_str(), r["source"]["snapshot"].as_str()),
            (Some("r"), Some("true"))
        );
        let t: Value = serde_json::from_str(&value("p", &ev(Op::Truncate), 0)).unwrap();
        assert_eq!(t["op"], "t");
        assert!(t["before"].is_null() && t["after"].is_null());
        assert_eq!(key(&ev(Op::Truncate)), None);
        assert_eq!(op_letter(Op::Insert), "c");
        assert_eq!(
            change_topic("p", "crm", "public.contacts"),
            "p.crm.public.contacts"
        );
    }
}
