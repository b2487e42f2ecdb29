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
