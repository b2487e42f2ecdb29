//! The docs cannot drift from the code: every key the config parser accepts
//! is in docs/configuration.md, in its section, and every section there is a
//! key the parser accepts.

use std::collections::BTreeMap;
use std::path::Path;

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

/// The profile store's tables, as SQL names them.
const STORE_TABLES: [&str; 18] = [
    "events",
    "event_log_staging",
    "contributions",
    "identities",
    "profiles",
    "profile_fields",
    "profile_view",
    "checkpoints",
    "dead_letters",
    "suppressions",
    "reconcile_runs",
    "reconcile_drift",
    "write_generation",
    "_sqlx_migrations",
    "events_partitions",
    "apply_lease",
    "consumer_offsets",
    "published_offsets",
];

/// `(keyword, table)` pairs in `line` where a store table follows an SQL
/// keyword that reads or writes a relation.
fn store_sql_in(line: &str) -> Vec<String> {
    let lower = line.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| {
            [
                "from", "into", "update", "join", "truncate", "table", "using",
            ]
            .contains(&w[0])
                && STORE_TABLES.contains(&w[1].trim_start_matches("tributary."))
        })
        .map(|w| format!("{} {}", w[0], w[1]))
        .collect()
}

/// The SQL of every `sqlx::query…(…)` and `sqlx::raw_sql(…)` call in
/// `text`: from the call to its first `.bind(`, `.fetch…` or `.execute(`,
/// with the line it starts on.
fn statements(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    for (at, _) in text
        .match_indices("sqlx::query")
        .chain(text.match_indices("sqlx::raw_sql"))
    {
        let rest = &text[at..];
        let end = [".bind(", ".fetch", ".execute("]
            .iter()
            .filter_map(|m| rest.find(m))
            .min()
            .unwrap_or(rest.len().min(2000));
        out.push((text[..at].lines().count(), &rest[..end]));
    }
    out
}

/// Only `src/store/` speaks the profile store's SQL: no other module names a
/// store table in a statement. (`src/demo.rs` is exempt: it reads the store as
/// a user would, through the schema-qualified names the SQL cookbook uses, to
/// show and check the result; it never writes.)
#[test]
fn only_the_store_module_names_the_store_tables_in_sql() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![root.clone()];
    let mut found = Vec::new();
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = p
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if !rel.ends_with(".rs") || rel.starts_with("store/") || rel == "demo.rs" {
            continue;
        }
        scanned += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        for (n, stmt) in statements(&text) {
            for hit in store_sql_in(stmt) {
                found.push(format!("src/{rel}:{n}: {hit}"));
            }
        }
    }
    assert!(scanned > 30, "scanned only {scanned} files");
    assert!(
        found.is_empty(),
        "store SQL outside src/store/:\n{}",
        found.join("\n")
    );
    // The scan itself finds what it is for.
    assert_eq!(
        store_sql_in(r#"sqlx::query("update contributions set x = 1 from tributary.profiles p")"#),
        ["update contributions", "from tributary.profiles"]
    );
    let demo = std::fs::read_to_string(root.join("demo.rs")).unwrap();
    assert!(
        !demo
            .lines()
            .flat_map(store_sql_in)
            .any(|h| !h.starts_with("from ") && !h.starts_with("join ")),
        "src/demo.rs writes the store"
    );
}
