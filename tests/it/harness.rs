//! Test harness: throwaway clusters, databases, SQL helpers, the binary under
//! test, and waiting on conditions with a deadline (never a bare sleep).

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};
use tributary::cluster::{Cluster, ClusterOptions};

/// A cluster with `wal_level = logical`.
pub fn cluster() -> Cluster {
    Cluster::start(&ClusterOptions::default()).expect("start throwaway cluster")
}

/// A cluster with custom options.
pub fn cluster_with(opts: ClusterOptions) -> Cluster {
    Cluster::start(&opts).expect("start throwaway cluster")
}

/// Creates database `name` on `c` and returns its URL.
pub async fn create_db(c: &Cluster, name: &str) -> String {
    let mut conn = PgConnection::connect(&c.url("postgres"))
        .await
        .expect("connect postgres db");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&mut conn)
        .await
        .expect("create database");
    c.url(name)
}

/// Runs SQL (several statements allowed) on `url`.
pub async fn exec(url: &str, sql: &str) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
}

/// One scalar from `url`.
pub async fn scalar<T>(url: &str, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut conn = PgConnection::connect(url).await.expect("connect");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"))
}

/// Writes a config file into a fresh temp dir and returns its path.
pub fn write_config(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tributary-test-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tributary.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The binary under test.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tributary"));
    c.env_remove("TRIBUTARY_CONFIG")
        .env("RUST_LOG", "info,sqlx=warn");
    c
}

/// Runs `tributary --config CFG ARGS...` to completion.
pub fn run_cmd(cfg: &Path, args: &[&str]) -> Output {
    bin()
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .expect("run tributary")
}

/// Text of stdout and stderr together, for assertions and failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Polls `cond` until it returns true or the deadline passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
