//! Column values in pgoutput's text format → JSON, typed from the column's type OID.
//!
//! Timestamps are normalised to UTC with six fraction digits
//! (`2024-01-02T03:04:05.000000Z`), so that their text order is their time
//! order; `numeric` becomes a JSON number when that is exact, else a string.
//! Unknown types stay text.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Number, Value};

/// Type OIDs this module understands (from `pg_type.dat`).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// The element type of an array type, for the common array types.
fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1028 => oid::OID,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1231 => oid::NUMERIC,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1182 => oid::DATE,
        2951 => oid::UUID,
        199 => oid::JSON,
        3807 => oid::JSONB,
        // text-like arrays: text, varchar, bpchar, name, char
        1009 | 1015 | 1014 | 1003 | 1002 => 25,
        _ => return None,
    })
}

/// Why a column's bytes could not be read as sent (see `ChangeEvent::unreadable`).
pub const NOT_UTF8: &str = "bytes that are not UTF-8 (a SQL_ASCII database?)";
/// Why a `json`/`jsonb` value could not be read.
pub const TOO_DEEP: &str = "JSON nested deeper than the 128 levels the parser allows";
/// Why a `json`/`jsonb` value that PostgreSQL accepted could not be read
/// exactly (kept as a string, it would change type silently).
pub const NOT_EXACT_JSON: &str =
    "JSON that cannot be read exactly (a number beyond 64-bit floating point, or an unpaired surrogate escape)";

/// [`text_to_json`] of raw column bytes, and why the value is only a stand-in
/// when it could not be read as sent: bytes that are not UTF-8 (kept with the
/// bad bytes replaced), JSON nested too deep to parse safely (kept as a string).
pub fn bytes_to_json(type_oid: u32, bytes: &[u8]) -> (Value, Option<&'static str>) {
    match std::str::from_utf8(bytes) {
        Ok(text) if matches!(type_oid, oid::JSON | oid::JSONB) => {
            match serde_json::from_str::<Value>(text) {
                Ok(v) => (v, None),
                // The limit keeps a hostile value from overflowing the stack.
                Err(e) if e.to_string().contains("recursion limit") => {
                    (Value::String(text.to_owned()), Some(TOO_DEEP))
                }
                Err(_) => (Value::String(text.to_owned()), Some(NOT_EXACT_JSON)),
            }
        }
        Ok(text) => (text_to_json(type_oid, text), None),
        Err(_) => (
            Value::String(String::from_utf8_lossy(bytes).into_owned()),
            Some(NOT_UTF8),
        ),
    }
}

/// Converts one text-format value of type `type_oid` to JSON.
pub fn text_to_json(type_oid: u32, text: &str) -> Value {
    match type_oid {
        // pgoutput sends t/f; a `::text` cast (the snapshot) gives true/false.
        oid::BOOL => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            other => Value::String(other.to_owned()),
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        oid::FLOAT4 | oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map_or_else(|| Value::String(text.to_owned()), Value::Number),
        oid::NUMERIC => numeric(text),
        oid::JSON | oid::JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        oid::TIMESTAMPTZ => Value::String(timestamptz(text).unwrap_or_else(|| text.to_owned())),
        oid::TIMESTAMP => Value::String(
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
                .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string())
                .unwrap_or_else(|_| text.to_owned()),
        ),
        other => match array_element(other) {
            Some(elem) => parse_array(text, elem).unwrap_or_else(|| Value::String(text.to_owned())),
            None => Value::String(text.to_owned()),
        },
    }
}

/// A `timestamptz` in the server's ISO output → normalised UTC text.
pub fn timestamptz(text: &str) -> Option<String> {
    parse_timestamptz(text).map(|t| format_utc(&t))
}

/// Parses ISO `timestamptz` output (`2024-01-02 03:04:05.123+00`, `+05:30`).
pub fn parse_timestamptz(text: &str) -> Option<DateTime<Utc>> {
    iso_fast(text).or_else(|| iso_general(text))
}

/// Any form chrono reads: the server's (`%#z` takes `+HH`, `+HH:MM`, and
/// more), or RFC 3339.
fn iso_general(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .or_else(|_| DateTime::parse_from_rfc3339(text))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The server's usual form, `YYYY-MM-DD HH:MM:SS[.f]±HH[:MM]`, read without
/// a format string (chrono interprets its format string on every call: 1.4 %
/// of the daemon's CPU on the 1M backlog, every timestamp of every change).
/// None for anything else (years past 9999, BC, `infinity`, offsets with
/// seconds, leap seconds), which the general parse then reads; where this
/// reads a text, it reads what [`iso_general`] reads
/// (`the_fast_timestamp_parse_agrees_with_chrono`).
fn iso_fast(text: &str) -> Option<DateTime<Utc>> {
    use chrono::{FixedOffset, NaiveDate, NaiveTime, TimeZone};
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let d = b.get(r)?;
        d.iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    if b.len() < 22
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(i32::try_from(num(0..4)?).ok()?, num(5..7)?, num(8..10)?)?;
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos = 0u32;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = num(start..i)? * 10u32.pow(u32::try_from(9 - digits).ok()?);
    }
    let sign = match b.get(i)? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let off_h = num(i + 1..i + 3)?;
    let off_m = match b.len() - (i + 3) {
        0 => 0,
        3 if b[i + 3] == b':' => num(i + 4..i + 6)?,
        _ => return None,
    };
    let time = NaiveTime::from_hms_nano_opt(h, mi, sec, nanos)?;
    let offset = FixedOffset::east_opt(sign * i32::try_from(off_h * 3600 + off_m * 60).ok()?)?;
    offset
        .from_local_datetime(&date.and_time(time))
        .single()
        .map(|t| t.with_timezone(&Utc))
}

/// The canonical text of a UTC instant.
pub fn format_utc(t: &DateTime<Utc>) -> String {
    use chrono::Datelike;
    // The same text as the format string below, without interpreting it per
    // value (this runs for every timestamp of every change).
    if (0..=9999).contains(&t.year()) {
        t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    }
}

fn numeric(text: &str) -> Value {
    if let Ok(i) = text.parse::<i64>() {
        return Value::from(i);
    }
    // An integral value with a scale (`250.00`) stays an integer, so sums stay exact.
    if let Some((int, frac)) = text.split_once('.') {
        if frac.bytes().all(|b| b == b'0') {
            if let Ok(i) = int.parse::<i64>() {
                return Value::from(i);
            }
        }
    }
    match text.parse::<f64>().ok().and_then(Number::from_f64) {
        // exact only when the shortest round-trip text is the same number
        Some(n) if same_decimal(&n.to_string(), text) => Value::Number(n),
        _ => Value::String(text.to_owned()),
    }
}

fn same_decimal(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        let s = s.trim_start_matches('+');
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    norm(a) == norm(b)
}

/// Parses an array literal (`{1,2,NULL}`, `{"a b","c\"d"}`, `{{1,2},{3,4}}`).
fn parse_array(text: &str, elem: u32) -> Option<Value> {
    let chars: Vec<char> = text.chars().collect();
    let mut pos = 0;
    // optional dimension decoration: [1:2]={...}
    if chars.first() == Some(&'[') {
        pos = text.find('=')? + 1;
    }
    let v = parse_array_at(&chars, &mut pos, elem)?;
    (pos == chars.len()).then_some(v)
}

fn parse_array_at(c: &[char], pos: &mut usize, elem: u32) -> Option<Value> {
    if c.get(*pos) != Some(&'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if c.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(Value::Array(items));
    }
    loop {
        match c.get(*pos)? {
            '{' => items.push(parse_array_at(c, pos, elem)?),
            '"' => {
                *pos += 1;
                let mut s = String::new();
                loop {
                    match c.get(*pos)? {
                        '\\' => {
                            s.push(*c.get(*pos + 1)?);
                            *pos += 2;
                        }
                        '"' => {
                            *pos += 1;
                            break;
                        }
                        ch => {
                            s.push(*ch);
                            *pos += 1;
                        }
                    }
                }
                items.push(text_to_json(elem, &s));
            }
            _ => {
                let start = *pos;
                while !matches!(c.get(*pos)?, ',' | '}') {
                    *pos += 1;
                }
                let s: String = c[start..*pos].iter().collect();
                items.push(if s == "NULL" {
                    Value::Null
                } else {
                    text_to_json(elem, &s)
                });
            }
        }
        match c.get(*pos)? {
            ',' => *pos += 1,
            '}' => {
                *pos += 1;
                return Some(Value::Array(items));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// JSON that PostgreSQL accepts but the daemon cannot read exactly is
    /// named as unreadable (its row becomes a dead letter when mapped),
    /// never turned into a string silently.
    #[test]
    fn json_that_cannot_be_read_exactly_is_named_not_retyped() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(bytes_to_json(oid::JSONB, deep.as_bytes()).1, Some(TOO_DEEP));
        for text in [r#"{"n": 1e400}"#, r#""\ud800""#] {
            let (v, why) = bytes_to_json(oid::JSON, text.as_bytes());
            assert_eq!(
                (v, why),
                (Value::String(text.to_owned()), Some(NOT_EXACT_JSON)),
                "{text}"
            );
        }
        assert_eq!(
            bytes_to_json(oid::JSON, br#"{"a": [1, "x"]}"#),
            (serde_json::json!({"a": [1, "x"]}), None)
        );
        assert_eq!(bytes_to_json(25, b"caf\xe9").1, Some(NOT_UTF8));
    }

    use super::*;

    #[test]
    fn scalars_are_typed() {
        assert_eq!(text_to_json(oid::INT8, "42"), json!(42));
        assert_eq!(text_to_json(oid::BOOL, "t"), json!(true));
        assert_eq!(text_to_json(oid::BOOL, "false"), json!(false));
        assert_eq!(text_to_json(oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(text_to_json(oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(text_to_json(oid::NUMERIC, "12.50"), json!(12.5));
        assert_eq!(text_to_json(oid::NUMERIC, "250.00"), json!(250));
        assert_eq!(text_to_json(oid::NUMERIC, "-3.0"), json!(-3));
        assert_eq!(
            text_to_json(oid::NUMERIC, "123456789012345678901234567890"),
            json!("123456789012345678901234567890")
        );
        assert_eq!(
            text_to_json(oid::JSONB, r#"{"a": [1, 2]}"#),
            json!({"a": [1, 2]})
        );
        assert_eq!(
            text_to_json(oid::UUID, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(text_to_json(25, "plain"), json!("plain"));
        assert_eq!(text_to_json(oid::DATE, "2024-02-29"), json!("2024-02-29"));
    }

    #[test]
    fn timestamps_are_normalised_to_utc() {
        assert_eq!(
            text_to_json(oid::TIMESTAMPTZ, "2024-01-02 03:04:05.123+00"),
            json!("2024-01-02T03:04:05.123000Z")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMPTZ, "2024-01-02 08:34:05+05:30"),
            json!("2024-01-02T03:04:05.000000Z")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMP, "2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05.000000")
        );
        assert_eq!(
            text_to_json(oid::TIMESTAMPTZ, "infinity"),
            json!("infinity")
        );
    }

    #[test]
    fn arrays_become_json_arrays() {
        assert_eq!(text_to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(
            text_to_json(1009, r#"{"a b","c\"d",plain}"#),
            json!(["a b", "c\"d", "plain"])
        );
        assert_eq!(text_to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(text_to_json(1009, "{}"), json!([]));
        assert_eq!(text_to_json(1007, "{1,2"), json!("{1,2"));
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Texts of the server's form, valid or not (any digits in every
        /// place, fractions of 0-10 digits, offsets by hour, minute or with
        /// seconds), and texts of any other shape: where the fast parse reads
        /// one, it reads what chrono's general parse reads.
        #[test]
        fn the_fast_timestamp_parse_agrees_with_chrono(
            text in prop_oneof![
                "[0-9]{4}-[0-1][0-9]-[0-3][0-9] [0-2][0-9]:[0-6][0-9]:[0-6][0-9](\\.[0-9]{0,10})?[+-][0-1][0-9](:[0-5][0-9](:[0-5][0-9])?)?",
                "(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8]) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,6})?[+-](0[0-9]|1[0-4])(:(00|30|45))?",
                "\\PC{0,30}",
            ]
        ) {
            if let Some(fast) = iso_fast(&text) {
                prop_assert_eq!(Some(fast), iso_general(&text), "{}", text);
            }
        }
    }

    #[test]
    fn the_fast_timestamp_parse_reads_the_servers_usual_forms() {
        for text in [
            "2026-12-01 06:04:34+00",
            "2026-12-01 06:04:34.1+05:30",
            "1999-01-01 00:00:00.123456789+00",
            "2026-12-02 09:57:55.604123-08",
        ] {
            assert!(iso_fast(text).is_some(), "{text}");
            assert_eq!(iso_fast(text), iso_general(text), "{text}");
        }
        for text in [
            "infinity",
            "0044-03-15 12:00:00+00 BC",
            "12026-01-01 00:00:00+00",
            "2026-12-01 06:04:34+05:53:28",
        ] {
            assert!(iso_fast(text).is_none(), "{text}");
        }
    }

    #[test]
    fn format_utc_equals_the_format_string_it_replaces() {
        for text in [
            "2026-12-01 06:04:34+00",
            "2026-12-01 06:04:34.1+05:30",
            "1999-01-01 00:00:00.123456789+00",
            "0001-02-03 04:05:06.000001+00",
        ] {
            let t = parse_timestamptz(text).unwrap();
            assert_eq!(
                format_utc(&t),
                t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                "{text}"
            );
        }
    }
}
