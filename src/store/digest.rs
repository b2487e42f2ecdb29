//! The digest of a row's mapped columns, computed in the daemon, equal bit for
//! bit to what the store's SQL form ([`crate::source::read::STORE_DIGEST`]) and
//! the source's ([`crate::source::read::TableReader::digest_expr`]) compute:
//!
//! ```text
//! (sum over columns of hashtextextended(coalesce(name || '=' || text, name), 0)::numeric)
//!     % 9223372036854775807
//! ```
//!
//! where `text` is the column's value as `jsonb_each_text` renders it. It used
//! to be computed by the store inside the contributions upsert (a `jsonb` parse
//! and a subquery per row); here it costs a hash of a few short strings.
//! `hashtextextended` on a deterministic collation is PostgreSQL's
//! `hash_bytes_extended` (Bob Jenkins' lookup3, `src/common/hashfn.c`) over
//! the UTF-8 bytes. The test `write_path::digests_computed_in_the_daemon_equal_the_sql_form`
//! compares the two on the server for every kind of value.

use std::fmt::Write;

use serde_json::{Map, Value};

/// The digest of `image` (column name → value, a missing column as NULL).
pub fn digest<'a>(columns: impl IntoIterator<Item = (&'a str, Option<&'a Value>)>) -> i64 {
    let mut sum: i128 = 0;
    let mut buf = String::new();
    for (name, value) in columns {
        buf.clear();
        buf.push_str(name);
        match value {
            None | Some(Value::Null) => {}
            Some(v) => {
                buf.push('=');
                each_text(v, &mut buf);
            }
        }
        // hashtextextended returns the 64 bits as a signed bigint.
        #[allow(clippy::cast_possible_wrap)]
        let h = hash_bytes_extended(buf.as_bytes(), 0) as i64;
        sum += i128::from(h);
    }
    // numeric `%` keeps the dividend's sign, as Rust's `%` does.
    let folded = sum % i128::from(i64::MAX);
    i64::try_from(folded).unwrap_or(0)
}

/// The digest of a JSON object image (for tests and callers holding one).
pub fn digest_of_object(image: &Map<String, Value>) -> i64 {
    digest(image.iter().map(|(k, v)| (k.as_str(), Some(v))))
}

/// A value as `jsonb_each_text` renders it: strings raw, numbers as
/// `numeric` prints them, everything else as `jsonb` prints it.
fn each_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        other => jsonb_text(other, out),
    }
}

/// `jsonb` output: object keys ordered by length then bytes, `", "` and
/// `": "` separators, strings escaped as PostgreSQL's `escape_json` does.
fn jsonb_text(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => numeric_text(&n.to_string(), out),
        Value::String(s) => escape_json(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                jsonb_text(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| {
                a.len()
                    .cmp(&b.len())
                    .then_with(|| a.as_bytes().cmp(b.as_bytes()))
            });
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                escape_json(k, out);
                out.push_str(": ");
                jsonb_text(&map[k], out);
            }
            out.push('}');
        }
    }
}

fn escape_json(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON number's text as `numeric_out` prints it after `numeric_in`:
/// exponents expanded, the scale of the digits kept, no negative zero.
fn numeric_text(text: &str, out: &mut String) {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], body[i + 1..].parse::<i64>().unwrap_or(0)),
        None => (body, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int_part}{frac_part}");
    // value = digits × 10^(exp − frac_len); numeric keeps scale max(0, frac_len − exp)
    let frac_len = i64::try_from(frac_part.len()).unwrap_or(0);
    let scale = (frac_len - exp).max(0);
    let point = i64::try_from(digits.len()).unwrap_or(0) - frac_len + exp; // digits before the point
                                                                           // The digit at position `i` of the expanded number (zeros beyond `digits`).
    let digit = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.as_bytes().get(i))
            .map_or('0', |b| char::from(*b))
    };
    let int_digits: String = (0..point.max(0)).map(digit).collect();
    let frac_digits: String = (point..point + scale).map(digit).collect();
    let int_digits = int_digits.trim_start_matches('0');
    let int_digits = if int_digits.is_empty() {
        "0"
    } else {
        int_digits
    };
    let zero = int_digits == "0" && frac_digits.bytes().all(|b| b == b'0');
    if negative && !zero {
        out.push('-');
    }
    out.push_str(int_digits);
    if !frac_digits.is_empty() {
        out.push('.');
        out.push_str(&frac_digits);
    }
}

/// PostgreSQL's `hash_bytes_extended` (little-endian byte order, which every
/// platform PostgreSQL hashes the same way for this function's input).
pub fn hash_bytes_extended(k: &[u8], seed: u64) -> u64 {
    #[inline]
    fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    }
    #[inline]
    fn finalize(a: &mut u32, b: &mut u32, c: &mut u32) {
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
    }
    let word = |s: &[u8]| u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    #[allow(clippy::cast_possible_truncation)]
    let len = k.len() as u32;
    let init = 0x9e37_79b9_u32.wrapping_add(len).wrapping_add(3_923_095);
    let (mut a, mut b, mut c) = (init, init, init);
    if seed != 0 {
        #[allow(clippy::cast_possible_truncation)]
        {
            a = a.wrapping_add((seed >> 32) as u32);
            b = b.wrapping_add(seed as u32);
        }
        mix(&mut a, &mut b, &mut c);
    }
    let mut rest = k;
    while rest.len() >= 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    // The last 0-11 bytes; the lowest byte of c is left for the length.
    let byte = |i: usize, shift: u32| u32::from(rest[i]) << shift;
    let n = rest.len();
    if n >= 11 {
        c = c.wrapping_add(byte(10, 24));
    }
    if n >= 10 {
        c = c.wrapping_add(byte(9, 16));
    }
    if n >= 9 {
        c = c.wrapping_add(byte(8, 8));
    }
    if n >= 8 {
        b = b.wrapping_add(byte(7, 24));
    }
    if n >= 7 {
        b = b.wrapping_add(byte(6, 16));
    }
    if n >= 6 {
        b = b.wrapping_add(byte(5, 8));
    }
    if n >= 5 {
        b = b.wrapping_add(byte(4, 0));
    }
    if n >= 4 {
        a = a.wrapping_add(byte(3, 24));
    }
    if n >= 3 {
        a = a.wrapping_add(byte(2, 16));
    }
    if n >= 2 {
        a = a.wrapping_add(byte(1, 8));
    }
    if n >= 1 {
        a = a.wrapping_add(byte(0, 0));
    }
    finalize(&mut a, &mut b, &mut c);
    (u64::from(b) << 32) | u64::from(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &str) -> String {
        let mut out = String::new();
        numeric_text(s, &mut out);
        out
    }

    #[test]
    fn numbers_render_as_numeric_prints_them() {
        assert_eq!(num("0"), "0");
        assert_eq!(num("42"), "42");
        assert_eq!(num("-7"), "-7");
        assert_eq!(num("1.50"), "1.50");
        assert_eq!(num("1e3"), "1000");
        assert_eq!(num("1.5e3"), "1500");
        assert_eq!(num("1.5e-7"), "0.00000015");
        assert_eq!(num("1e-7"), "0.0000001");
        assert_eq!(num("-0.0"), "0.0");
        assert_eq!(num("123.456e1"), "1234.56");
        assert_eq!(num("0.001"), "0.001");
    }

    #[test]
    fn nested_values_render_as_jsonb_prints_them() {
        let v: Value =
            serde_json::from_str(r#"{"bb": [1, "x\n"], "a": {"z": null, "yy": true}}"#).unwrap();
        let mut out = String::new();
        jsonb_text(&v, &mut out);
        assert_eq!(out, r#"{"a": {"z": null, "yy": true}, "bb": [1, "x\n"]}"#);
    }
}
