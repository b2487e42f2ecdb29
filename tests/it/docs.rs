//! The docs cannot drift from the code: every key the config parser accepts
//! is in docs/configuration.md, in its section, and every section there is a
//! key the parser accepts.

use std::collections::BTreeMap;

/// The keys of each `Raw*` struct in src/config.rs (serde renames applied).
fn config_keys() -> BTreeMap<String, Vec<String>> {
    let src = std::fs::read_to_string("src/config.rs").unwrap();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut rename: Option<String> = None;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("struct Raw") {
            current = rest.split_whitespace().next().map(str::to_owned);
            continue;
        }
        let Some(name) = &current else { continue };
        if t == "}" {
            current = None;
            continue;
        }
        if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
            rename = r.split('"').next().map(str::to_owned);
            continue;
        }
        if let Some((field, _)) = t.split_once(':') {
            if !field.is_empty() && field.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                let key = rename.take().unwrap_or_else(|| field.to_owned());
                out.entry(name.clone()).or_default().push(key);
            }
        }
    }
    out
}

/// The text of the section whose heading contains `heading`, up to the next `## `.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("## {heading}"))
        .or_else(|| doc.find(&format!("### {heading}")))
        .unwrap_or_else(|| panic!("docs/configuration.md has no section {heading}"));
    let rest = &doc[start + 3..];
    let end = rest.find("\n## ").map_or(rest.len(), |e| e + 1);
    &rest[..end]
}

#[test]
fn every_config_key_is_in_the_configuration_reference() {
    let doc = std::fs::read_to_string("docs/configuration.md").unwrap();
    let keys = config_keys();
    let sections = [
        ("Sink", "`[sink]`"),
        ("Source", "`[[source]]`"),
        ("Table", "`[[source.table]]`"),
        ("Aggregate", "`[[source.table]]`"),
        ("IdentityKind", "`[identity.<kind>]`"),
        ("Field", "`[fields.<field>]`"),
        ("Kafka", "`[kafka]`"),
        ("Metrics", "`[metrics]`"),
        ("Merge", "`[merge]`"),
        ("Reconcile", "`[reconcile]`"),
    ];
    assert_eq!(
        keys.len(),
        sections.len() + 1,
        "a Raw* struct without a docs section: {:?}",
        keys.keys().collect::<Vec<_>>()
    );
    let mut checked = 0;
    for (st, heading) in sections {
        let text = section(&doc, heading);
        for key in keys.get(st).unwrap_or_else(|| panic!("no struct Raw{st}")) {
            assert!(
                text.contains(&format!("`{key}`")) || text.contains(&format!("{key} =")),
                "key `{key}` of {heading} is not in docs/configuration.md"
            );
            checked += 1;
        }
    }
    // The top level: each section the parser accepts has a heading.
    for key in &keys["Config"] {
        let heading = match key.as_str() {
            "source" => "[[source]]".to_owned(),
            "identity" => "[identity.".to_owned(),
            "fields" => "[fields.".to_owned(),
            k => format!("[{k}]"),
        };
        assert!(
            doc.contains(&format!("`{heading}")),
            "section {key} is not in docs/configuration.md"
        );
        checked += 1;
    }
    assert!(
        checked > 35,
        "only {checked} keys found: is the parser of src/config.rs still right?"
    );
}
