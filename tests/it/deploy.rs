//! What can be checked of docker/ without a Docker engine: the Compose config
//! parses as a Tributary config, and the seed SQL runs on a real cluster.

use std::path::Path;

use crate::harness::*;

#[tokio::test]
async fn docker_config_parses_and_seed_sql_runs() {
    let text = std::fs::read_to_string("docker/tributary.toml").unwrap();
    let text = text
        .replace("${SINK_PASSWORD}", "x")
        .replace("${CRM_PASSWORD}", "x")
        .replace("${SHOP_PASSWORD}", "x");
    let cfg = tributary::config::Config::parse(&text, Path::new("docker/tributary.toml"))
        .expect("docker/tributary.toml is valid");
    assert_eq!(cfg.sources.len(), 2);

    let pg = cluster();
    for (db, seed) in [
        ("crm", "docker/seed/crm.sql"),
        ("shop", "docker/seed/shop.sql"),
    ] {
        let url = create_db(&pg, db).await;
        exec(&url, &std::fs::read_to_string(seed).unwrap()).await;
    }
    let orders: i64 = scalar(&pg.url("shop"), "select count(*) from orders").await;
    assert_eq!(orders, 3000);
}

fn yaml(path: &str) -> yaml_rust2::Yaml {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut docs = yaml_rust2::YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    docs.remove(0)
}

/// The Compose file parses, has every service the issue names, mounts only
/// files that exist, and wires Prometheus to the port Tributary listens on.
#[test]
fn compose_file_parses_and_wires_every_service() {
    let doc = yaml("docker/compose.yaml");
    let services = doc["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for want in [
        "crm-db",
        "shop-db",
        "profiles-db",
        "tributary",
        "prometheus",
        "grafana",
        "kafka",
    ] {
        assert!(names.contains(&want), "service {want} missing: {names:?}");
    }
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        // Volumes from the repository must exist (paths relative to docker/).
        for v in svc["volumes"].as_vec().into_iter().flatten() {
            let v = v.as_str().unwrap();
            if let Some(rel) = v.strip_prefix("./") {
                let host = rel.split(':').next().unwrap();
                assert!(
                    Path::new("docker").join(host).exists(),
                    "{name}: volume {v} names a missing file"
                );
            }
        }
        // depends_on names real services (list or map form).
        let deps: Vec<String> = match &svc["depends_on"] {
            yaml_rust2::Yaml::Array(a) => a
                .iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect(),
            yaml_rust2::Yaml::Hash(h) => h
                .keys()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        for d in deps {
            assert!(names.contains(&d.as_str()), "{name} depends on unknown {d}");
        }
    }
    // Sources run with logical replication.
    // (`<<: *pg` is a YAML merge key: the command may come from the anchor.)
    let crm = &services[&yaml_rust2::Yaml::from_str("crm-db")];
    let command = if crm["command"].is_badvalue() {
        &crm["<<"]["command"]
    } else {
        &crm["command"]
    };
    let cmd: Vec<&str> = command
        .as_vec()
        .expect("crm-db command")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(cmd.contains(&"wal_level=logical"), "{cmd:?}");
    // Prometheus scrapes the port the daemon's config listens on.
    let prom = yaml("docker/prometheus/prometheus.yml");
    let target = prom["scrape_configs"][0]["static_configs"][0]["targets"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let toml_text = std::fs::read_to_string("docker/tributary.toml").unwrap();
    let port = target.rsplit(':').next().unwrap();
    assert!(
        toml_text.contains(&format!("listen = \"0.0.0.0:{port}\"")),
        "prometheus scrapes {target}, which the daemon must listen on"
    );
    assert!(target.starts_with("tributary:"), "{target}");
    // Grafana's datasource uid is the one the dashboard's panels use.
    let ds = yaml("docker/grafana/provisioning/datasources/prometheus.yaml");
    assert_eq!(ds["datasources"][0]["uid"].as_str(), Some("prometheus"));
    let provider = yaml("docker/grafana/provisioning/dashboards/tributary.yaml");
    assert_eq!(
        provider["providers"][0]["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
}

/// Metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tributary_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "expr" {
                    out.push(v.as_str().unwrap_or_default().to_owned());
                } else {
                    exprs(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// The dashboard is valid JSON, covers lag, throughput, latency, drift and
/// dead letters, and every query names a metric the binary exports (the live
/// test in operate.rs shows that every name in `metrics::ALL` is scraped).
#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let text = std::fs::read_to_string("docker/grafana/dashboards/tributary.json").unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    assert!(all.len() >= 10, "{all:?}");
    let mut used = std::collections::BTreeSet::new();
    for e in &all {
        let names = metric_names(e);
        assert!(!names.is_empty(), "query names no tributary metric: {e}");
        for n in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .filter(|b| tributary::metrics::ALL.contains(b))
                .unwrap_or(&n)
                .to_owned();
            assert!(
                tributary::metrics::ALL.contains(&base.as_str()),
                "dashboard query uses {n}, which the binary does not export: {e}"
            );
            used.insert(base);
        }
    }
    for m in [
        tributary::metrics::LAG_SECONDS,
        tributary::metrics::LAG_BYTES,
        tributary::metrics::EVENTS,
        tributary::metrics::END_TO_END_SECONDS,
        tributary::metrics::RECONCILE_DRIFT,
        tributary::metrics::DEAD_LETTERS,
    ] {
        assert!(used.contains(m), "the dashboard has no panel for {m}");
    }
    for p in dash["panels"].as_array().unwrap() {
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
    }
}

/// The image build copies every path Cargo needs to build: a target missing
/// from the build context fails `cargo build` inside `docker build`.
#[test]
fn dockerfile_copies_everything_cargo_needs() {
    let docker = std::fs::read_to_string("docker/Dockerfile").unwrap();
    let copied: Vec<&str> = docker
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[1..parts.len() - 1].to_vec()
        })
        .collect();
    let manifest: toml::Table = std::fs::read_to_string("Cargo.toml")
        .unwrap()
        .parse()
        .unwrap();
    let mut paths = vec!["Cargo.lock".to_owned(), "migrations".to_owned()];
    for kind in ["lib", "bin", "test", "bench"] {
        match &manifest.get(kind) {
            Some(toml::Value::Table(t)) => {
                paths.extend(t.get("path").and_then(|p| p.as_str()).map(str::to_owned))
            }
            Some(toml::Value::Array(a)) => paths.extend(
                a.iter()
                    .filter_map(|t| t.get("path").and_then(|p| p.as_str()).map(str::to_owned)),
            ),
            _ => {}
        }
    }
    for p in paths {
        let top = p.split('/').next().unwrap();
        assert!(
            copied.contains(&top),
            "docker/Dockerfile does not COPY {top} (needed for {p}); copied: {copied:?}"
        );
    }
    assert!(
        docker.contains("\nUSER ") && !docker.contains("USER root"),
        "the runtime image runs as a non-root user"
    );
    assert!(
        docker.matches("\nFROM ").count() + usize::from(docker.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
}

/// The systemd unit passes `systemd-analyze verify`, and its hardening keeps
/// the exposure score low (systemd's own scale: below 2 is "OK").
#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string("deploy/tributary.service").unwrap();
    for key in [
        "User=tributary",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "RestartPreventExitStatus=2",
    ] {
        assert!(unit.contains(key), "deploy/tributary.service lacks {key}");
    }
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: only the keys were checked");
        return;
    };
    // Verify a copy whose binary exists on this machine.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tributary.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/tributary", "/bin/true")).unwrap();
    let out = std::process::Command::new(&analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("tributary.service:"),
        "systemd-analyze verify: {err}"
    );
    let out = std::process::Command::new(&analyze)
        .args(["security", "--offline=yes"])
        .arg(&copy)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .split("Overall exposure level for tributary.service:")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    assert!(score < 2.0, "exposure {score}:\n{text}");
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .ok_or(())
}
