//! Identifiers: normalisation per kind, so that ` Ann@X.com ` and `ann@x.com`
//! are one identity.

use serde_json::Value;

use crate::config::Normalize;

/// A normalised identifier: `(kind, value)`, e.g. `("email", "ann@x.com")`.
pub type Ident = (String, String);

/// Why a value cannot be an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    /// Objects, arrays and booleans are not identifiers.
    #[error("identity {kind}: value {value} is not a string or number")]
    NotScalar {
        /// Identity kind.
        kind: String,
        /// The value as JSON.
        value: String,
    },
    /// An email without `@`, or a value that normalises to nothing.
    #[error("identity {kind}: `{value}` is not a valid {kind} after normalisation ({rule:?})")]
    Unparsable {
        /// Identity kind.
        kind: String,
        /// The raw value.
        value: String,
        /// The normalisation applied.
        rule: Normalize,
    },
    /// Longer than the store's index on identifiers can hold.
    #[error("identity {kind}: value is {bytes} bytes, longer than the {MAX_STORED_KEY_BYTES} the store's index holds")]
    TooLong {
        /// Identity kind.
        kind: String,
        /// Its length in bytes.
        bytes: usize,
    },
}

/// The longest identifier value or row key the store takes. A B-tree entry
/// holds at most about 2,700 bytes (a third of a page) and the store indexes
/// both, so anything longer would fail the whole write; refusing it here sends
/// the row to `dead_letters` instead. Whether PostgreSQL would have compressed
/// it below the limit does not matter: the rule is the same for every value.
pub const MAX_STORED_KEY_BYTES: usize = 2000;

/// Normalises a column value into an identifier value; `Ok(None)` for NULL.
pub fn normalize(kind: &str, rule: Normalize, v: &Value) -> Result<Option<String>, IdentError> {
    let raw = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(IdentError::NotScalar {
                kind: kind.to_owned(),
                value: other.to_string(),
            })
        }
    };
    let out = match rule {
        Normalize::Email => raw.trim().to_lowercase(),
        Normalize::Lowercase => raw.to_lowercase(),
        Normalize::Trim => raw.trim().to_owned(),
        Normalize::Digits => raw.chars().filter(char::is_ascii_digit).collect(),
        Normalize::None => raw.clone(),
    };
    let bad_email = rule == Normalize::Email && {
        let mut parts = out.splitn(2, '@');
        let (local, domain) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        local.is_empty() || domain.is_empty() || out.chars().any(char::is_whitespace)
    };
    if out.len() > MAX_STORED_KEY_BYTES {
        return Err(IdentError::TooLong {
            kind: kind.to_owned(),
            bytes: out.len(),
        });
    }
    if out.is_empty() || bad_email {
        return Err(IdentError::Unparsable {
            kind: kind.to_owned(),
            value: raw,
            rule,
        });
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn normalisations() {
        assert_eq!(
            normalize("email", Normalize::Email, &json!("  Ann@Example.COM "))
                .unwrap()
                .unwrap(),
            "ann@example.com"
        );
        assert_eq!(
            normalize("phone", Normalize::Digits, &json!("+1 (555) 010-99"))
                .unwrap()
                .unwrap(),
            "155501099"
        );
        assert_eq!(
            normalize("crm", Normalize::Trim, &json!(42))
                .unwrap()
                .unwrap(),
            "42"
        );
        assert_eq!(
            normalize("x", Normalize::None, &json!(" A "))
                .unwrap()
                .unwrap(),
            " A "
        );
        assert_eq!(
            normalize("email", Normalize::Email, &json!(null)).unwrap(),
            None
        );
    }

    #[test]
    fn bad_identifiers_are_errors() {
        assert!(normalize("email", Normalize::Email, &json!("not-an-email")).is_err());
        assert!(normalize("email", Normalize::Email, &json!("a b@x.com")).is_err());
        assert!(normalize("phone", Normalize::Digits, &json!("n/a")).is_err());
        assert!(normalize("crm", Normalize::Trim, &json!({"a": 1})).is_err());
    }
}
