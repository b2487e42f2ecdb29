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

/// Databases `crm` and `shop` (with their schemas) and `profiles` on `pg`; their URLs.
pub async fn two_sources(pg: &Cluster) -> (String, String, String) {
    sources_and_store(pg, pg).await
}

/// Databases `crm` and `shop` (with their schemas) on `sources` and `profiles` on
/// `store`, so that a test can stop or restart one server without the other.
pub async fn sources_and_store(sources: &Cluster, store: &Cluster) -> (String, String, String) {
    let crm = create_db(sources, "crm").await;
    let shop = create_db(sources, "shop").await;
    let sink = create_db(store, "profiles").await;
    exec(&crm, CRM_SCHEMA).await;
    exec(&shop, SHOP_SCHEMA).await;
    (crm, shop, sink)
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

/// A config file in its own temp dir, deleted (with the daemon logs next to
/// it) when dropped. Derefs to its path.
pub struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl std::ops::Deref for ConfigFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

/// Writes a config file into a fresh temp dir.
pub fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::Builder::new()
        .prefix("tributary-test-")
        .tempdir()
        .unwrap();
    let path = dir.path().join("tributary.toml");
    std::fs::write(&path, text).unwrap();
    ConfigFile { _dir: dir, path }
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

/// A `tributary run` child process; killed (SIGKILL) if still running when dropped.
pub struct Daemon {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `tributary run` with the config; logs go to a file next to it.
    pub fn start(cfg: &Path) -> Daemon {
        Daemon::start_with_env(cfg, &[])
    }

    /// Starts `tributary run` with extra environment variables.
    pub fn start_with_env(cfg: &Path, env: &[(&str, &str)]) -> Daemon {
        let log = cfg.with_extension(format!("log.{}", rand::random::<u16>()));
        Daemon::spawn(cfg, &["run"], env, &log)
    }

    /// Starts `tributary <args>` (a long-running command), logging to `log`.
    pub fn spawn_args(cfg: &Path, args: &[&str], log: &Path) -> Daemon {
        Daemon::spawn(cfg, args, &[], log)
    }

    fn spawn(cfg: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Daemon {
        let log = log.to_owned();
        let out = std::fs::File::create(&log).unwrap();
        let child = bin()
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,tributary=debug,sqlx=warn")
            .arg("--config")
            .arg(cfg)
            .arg("--log-format")
            .arg("human")
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn tributary run");
        Daemon { child, log }
    }

    /// Sends a signal with kill(1); true when it was delivered.
    fn signal(&self, sig: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGSTOP: the process stalls (a pause, a partition) without dying.
    pub fn pause(&self) {
        assert!(self.signal("STOP"), "kill -STOP {}", self.child.id());
    }

    /// SIGCONT after [`Daemon::pause`].
    pub fn resume(&self) {
        assert!(self.signal("CONT"), "kill -CONT {}", self.child.id());
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit code of a daemon that stopped by itself (None while it runs,
    /// or when a signal ended it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("KILL");
            let _ = self.child.wait();
        }
    }
}

/// The shop/CRM schema used by the pipeline tests.
pub const CRM_SCHEMA: &str = "
create table contacts (id bigint primary key, email text, first_name text, last_name text, phone text,
  opted_in boolean, row_version bigint not null default 1, modified_at timestamptz not null default now(), bio text);
alter table contacts alter column bio set storage external;";

pub const SHOP_SCHEMA: &str = "
create table accounts (id bigint primary key, email text, phone text, created_at timestamptz not null default now());
create table orders (id bigint primary key, account_id bigint, status text not null, total_cents bigint not null,
  created_at timestamptz not null default now(), updated_at timestamptz not null default now());";

/// A two-source config (crm + shop) into `sink`, with slot/publication suffix `tag`.
pub fn pipeline_config(crm: &str, shop: &str, sink: &str, tag: &str) -> String {
    format!(
        r#"
[sink]
url = "{sink}"
batch_max_wait_ms = 20

[[source]]
name = "crm"
url = "{crm}"
slot = "crm_{tag}"
publication = "crm_{tag}"
priority = 10
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email", crm_contact = "id" }}
  version = "row_version"
  updated_at = "modified_at"
  fields = {{ email = "email", first_name = "first_name", last_name = "last_name", phone = "phone", marketing_opt_in = "opted_in", bio = "bio" }}

[[source]]
name = "shop"
url = "{shop}"
slot = "shop_{tag}"
publication = "shop_{tag}"
  [[source.table]]
  name = "public.accounts"
  identity = {{ email = "email", shop_account = "id" }}
  fields = {{ shop_signup_at = "created_at", phone = "phone" }}
  [[source.table]]
  name = "public.orders"
  identity = {{ shop_account = "account_id" }}
  updated_at = "updated_at"
  [source.table.aggregates]
  order_count = {{ fn = "count" }}
  lifetime_value_cents = {{ fn = "sum", column = "total_cents", only_when = {{ status = ["paid", "shipped"] }} }}
  last_order_at = {{ fn = "max", column = "created_at" }}

[identity.email]
normalize = "email"
"#
    )
}

/// Every live profile as (sorted identities, traits), from `profile_view`.
pub async fn profiles(sink: &str) -> Vec<(serde_json::Value, serde_json::Value)> {
    let mut conn = PgConnection::connect(sink).await.expect("connect sink");
    let rows: Vec<(serde_json::Value, serde_json::Value)> = sqlx::query_as(
        "select identities, traits from tributary.profile_view order by identities::text",
    )
    .fetch_all(&mut conn)
    .await
    .expect("read profile_view");
    rows
}

/// The traits of the live profile owning identity kind=value (None also
/// while the store is not migrated yet).
pub async fn traits_of(sink: &str, kind: &str, value: &str) -> Option<serde_json::Value> {
    let mut conn = PgConnection::connect(sink).await.expect("connect sink");
    let migrated: bool =
        sqlx::query_scalar("select to_regclass('tributary.profile_view') is not null")
            .fetch_one(&mut conn)
            .await
            .expect("query");
    if !migrated {
        return None;
    }
    sqlx::query_scalar(
        "select p.traits from tributary.identities i join tributary.profiles p on p.profile_id = i.profile_id
          where i.kind = $1 and i.value = $2 and p.merged_into is null",
    )
    .bind(kind)
    .bind(value)
    .fetch_optional(&mut conn)
    .await
    .expect("read traits")
}

/// Every live profile's provenance as (identities, {field: [value, source, table, row_key]}),
/// and a check that each provenance value is the trait's value.
pub async fn provenance(sink: &str) -> Vec<(serde_json::Value, serde_json::Value)> {
    let mut conn = PgConnection::connect(sink).await.expect("connect sink");
    let inconsistent: i64 = sqlx::query_scalar(
        "select count(*) from tributary.profile_fields pf join tributary.profiles p on p.profile_id = pf.profile_id
          where p.traits -> pf.field is distinct from pf.value or p.merged_into is not null",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        inconsistent, 0,
        "profile_fields disagrees with traits in {sink}"
    );
    sqlx::query_as(
        "select v.identities, coalesce((select jsonb_object_agg(pf.field, jsonb_build_array(pf.value, pf.source, pf.table_name, pf.row_key))
                                          from tributary.profile_fields pf where pf.profile_id = v.profile_id), '{}')
           from tributary.profile_view v order by v.identities::text",
    )
    .fetch_all(&mut conn)
    .await
    .expect("read provenance")
}

/// What two stores built from the same sources must agree on: every live
/// profile ([`profiles`]) and its provenance ([`provenance`]).
pub async fn profiles_and_provenance(
    sink: &str,
) -> (
    Vec<(serde_json::Value, serde_json::Value)>,
    Vec<(serde_json::Value, serde_json::Value)>,
) {
    (profiles(sink).await, provenance(sink).await)
}

/// Waits until `n` sources have completed their initial snapshot in `sink`.
pub async fn wait_snapshots(sink: &str, n: i64) {
    wait_until("initial snapshots", Duration::from_secs(60), || async {
        scalar::<i64>(sink, "select count(*) from pg_catalog.pg_tables where schemaname = 'tributary' and tablename = 'checkpoints'").await == 1
            && scalar::<i64>(sink, "select count(*) from tributary.checkpoints where snapshot_completed_at is not null").await == n
    })
    .await;
}

/// A loopback TCP proxy the test controls: `cut()` drops every open connection
/// (new ones are accepted again), so a client sees its connection reset.
pub struct Proxy {
    pub port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<new port> to 127.0.0.1:`target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            port,
            conns,
            accept,
        }
    }

    /// Drops every open connection; returns how many there were.
    pub fn cut(&self) -> usize {
        let mut list = self.conns.lock().unwrap();
        let n = list.iter().filter(|h| !h.is_finished()).count();
        for h in list.drain(..) {
            h.abort();
        }
        n
    }

    /// A URL for database `db` through the proxy.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

impl Daemon {
    /// Peak resident memory of the daemon so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// `GET path` from the daemon's HTTP endpoint: (status, body); (0, "") when
/// nothing listens.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.ok();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

/// `GET /metrics` from the daemon's endpoint (empty when nothing listens).
pub async fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics").await.1
}

/// A free loopback `host:port` for the daemon's endpoint.
pub fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `[identity.email]` with the email normalisation, for [`source_config`].
pub const EMAIL: &str = "\n[identity.email]\nnormalize = \"email\"\n";

/// A store and one source `(name, url, tag)` whose slot and publication are
/// named after `tag`, then `rest` (its `[[source.table]]`s, and sections).
pub fn source_config(sink: &str, (name, src, tag): (&str, &str, &str), rest: &str) -> String {
    format!(
        "[sink]\nurl = \"{sink}\"\nbatch_max_wait_ms = 20\n{}\n[[source]]\nname = \"{name}\"\nurl = \"{src}\"\n\
         slot = \"{tag}_slot\"\npublication = \"{tag}_pub\"\n{}",
        if rest.contains("[identity.") { EMAIL } else { "" },
        rest.replace(EMAIL, ""),
    )
}

/// `public.people`, identified by email, with `fields`.
pub fn people_table(fields: &str) -> String {
    format!(
        "\n  [[source.table]]\n  name = \"public.people\"\n  identity = {{ email = \"email\" }}\n  fields = {{ {fields} }}\n"
    )
}

/// Waits for the daemon to exit by itself and returns its code and log.
pub async fn exits_by_itself(mut daemon: Daemon, within: Duration) -> (Option<i32>, String) {
    let deadline = std::time::Instant::now() + within;
    while daemon.alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon is still running (retrying?):\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (daemon.exit_code(), daemon.log_text())
}
