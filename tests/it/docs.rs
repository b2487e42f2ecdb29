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

/// `${NAME}` references replaced by a placeholder (the parser would read the
/// environment).
fn without_env_refs(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').map_or(rest.len(), |e| i + e + 1);
        out.push_str("secret");
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Every complete config example in the docs (a `toml` block with a `[sink]`)
/// is accepted by the parser (docker/tributary.toml is checked in deploy.rs).
#[test]
fn every_config_example_in_the_docs_parses() {
    let mut checked = 0;
    for entry in std::fs::read_dir("docs").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("md") {
            continue;
        }
        let doc = std::fs::read_to_string(&path).unwrap();
        for block in doc.split("```toml").skip(1) {
            let block = block.split("```").next().unwrap();
            if !block.contains("[sink]") {
                continue;
            }
            // Indented blocks (inside a list) are dedented by their first line.
            let indent = block
                .lines()
                .find(|l| !l.trim().is_empty())
                .map_or(0, |l| l.len() - l.trim_start().len());
            let text: String = block
                .lines()
                .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
                .collect::<Vec<_>>()
                .join("\n");
            tributary::config::Config::parse(&without_env_refs(&text), &path).unwrap_or_else(|e| {
                panic!("{}: example does not parse: {e}\n{text}", path.display())
            });
            checked += 1;
        }
    }
    assert!(checked >= 1, "no config example found in docs/");
}
