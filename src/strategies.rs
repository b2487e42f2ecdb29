//! Proptest strategies shared by the property tests of more than one module
//! (test builds only).

use proptest::prelude::*;
use serde_json::{Number, Value};

/// Any JSON number serde_json holds: i64, u64, finite f64.
pub(crate) fn number() -> impl Strategy<Value = Number> {
    prop_oneof![
        any::<i64>().prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        any::<f64>().prop_filter_map("finite", Number::from_f64),
    ]
}

/// Any JSON value, nested up to three levels (strings of any printable
/// characters, quotes and backslashes included).
pub(crate) fn json_value() -> impl Strategy<Value = Value> {
    json_value_with("\\PC{0,24}")
}

/// Any JSON value, nested up to three levels, with string values from
/// `strings` (a writer of JSON text also wants control characters).
pub(crate) fn json_value_with(
    strings: impl Strategy<Value = String> + 'static,
) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number().prop_map(Value::Number),
        strings.prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
