//! `tributary check`: preflight of the config and every database, one line per
//! check, each failure with the fix. Exit 1 when any check fails.

use serde::Serialize;
use sqlx::{Connection, PgConnection, Row};

use crate::config::{Config, SourceConfig};
use crate::store::{Store, MIGRATOR};

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// `source:<name>` or `sink`.
    pub target: String,
    /// Short name of the check, e.g. `wal_level`.
    pub check: String,
    /// Passed?
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

struct Checks {
    target: String,
    out: Vec<CheckResult>,
}

impl Checks {
    fn pass(&mut self, check: &str, detail: impl Into<String>) {
        self.out.push(CheckResult {
            target: self.target.clone(),
            check: check.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        });
    }
    fn fail(&mut self, check: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.out.push(CheckResult {
            target: self.target.clone(),
            check: check.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        });
    }
}

/// Runs every check; never fails as a whole (failures are results).
pub async fn run_checks(cfg: &Config) -> Vec<CheckResult> {
    let mut all = Vec::new();
    for src in &cfg.sources {
        let mut c = Checks {
            target: format!("source:{}", src.name),
            out: Vec::new(),
        };
        if let Err(e) = check_source(src, &mut c).await {
            c.fail(
                "query",
                format!("{e}"),
                "see the error; the role may lack privileges",
            );
        }
        all.extend(c.out);
    }
    let mut c = Checks {
        target: "sink".into(),
        out: Vec::new(),
    };
    check_sink(cfg, &mut c).await;
    all.extend(c.out);
    all
}

async fn check_source(src: &SourceConfig, c: &mut Checks) -> Result<(), sqlx::Error> {
    let mut conn = match PgConnection::connect_with(&src.conn.source_options()).await {
        Ok(conn) => {
            c.pass("connect", src.conn.to_string());
            conn
        }
        Err(e) => {
            c.fail(
                "connect",
                format!("{}: {e}", src.conn),
                "check host, port, credentials, sslmode and pg_hba.conf",
            );
            return Ok(());
        }
    };
    let version: i32 = sqlx::query_scalar("select current_setting('server_version_num')::int")
        .fetch_one(&mut conn)
        .await?;
    match crate::source::supported_server(&src.name, version) {
        Ok(()) => c.pass("server_version", crate::source::server_major_of(version)),
        Err(e) => c.fail(
            "server_version",
            crate::source::server_major_of(version),
            e.to_string(),
        ),
    }
    let wal_level: String = sqlx::query_scalar("select current_setting('wal_level')")
        .fetch_one(&mut conn)
        .await?;
    if wal_level == "logical" {
        c.pass("wal_level", "logical");
    } else {
        c.fail(
            "wal_level",
            format!("wal_level is {wal_level}"),
            "set wal_level = logical (ALTER SYSTEM SET wal_level = logical; then restart the server)",
        );
    }
    let row = sqlx::query(
        "select current_setting('max_replication_slots')::int as slots,
                (select count(*) from pg_replication_slots)::int as used,
                (select count(*) from pg_replication_slots where slot_name = $1)::int as ours,
                current_setting('max_wal_senders')::int as senders,
                (select count(*) from pg_stat_replication)::int as senders_used",
    )
    .bind(&src.slot)
    .fetch_one(&mut conn)
    .await?;
    let (slots, used, ours, senders, senders_used): (i32, i32, i32, i32, i32) = (
        row.get("slots"),
        row.get("used"),
        row.get("ours"),
        row.get("senders"),
        row.get("senders_used"),
    );
    if ours == 1 || used < slots {
        c.pass(
            "replication_slots",
            format!(
                "{used}/{slots} used, slot {} {}",
                src.slot,
                if ours == 1 {
                    "exists"
                } else {
                    "will be created"
                }
            ),
        );
    } else {
        c.fail(
            "replication_slots",
            format!("all {slots} slots in use"),
            "raise max_replication_slots (restart needed) or drop an unused slot",
        );
    }
    if senders_used < senders {
        c.pass("wal_senders", format!("{senders_used}/{senders} in use"));
    } else {
        c.fail(
            "wal_senders",
            format!("all {senders} wal senders in use"),
            "raise max_wal_senders (restart needed)",
        );
    }
    let (rep, sup): (bool, bool) = sqlx::query_as(
        "select rolreplication, rolsuper from pg_roles where rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await?;
    if rep || sup {
        c.pass("replication_privilege", "role has REPLICATION");
    } else {
        c.fail(
            "replication_privilege",
            "role lacks REPLICATION",
            format!("ALTER ROLE {} WITH REPLICATION", src.conn.user),
        );
    }
    for t in &src.tables {
        let row = sqlx::query(
            "select c.oid::bigint as oid, c.relreplident::text as ident,
                    has_table_privilege(c.oid, 'SELECT') as can_select,
                    exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary) as has_pk
               from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where n.nspname = $1 and c.relname = $2",
        )
        .bind(&t.schema)
        .bind(&t.name)
        .fetch_optional(&mut conn)
        .await?;
        let Some(row) = row else {
            c.fail(
                &format!("table {}", t.qualified),
                "table not found",
                "create the table or fix source.table.name",
            );
            continue;
        };
        let (ident, can_select, has_pk): (String, bool, bool) =
            (row.get("ident"), row.get("can_select"), row.get("has_pk"));
        if !can_select {
            c.fail(
                &format!("table {}", t.qualified),
                "no SELECT privilege",
                format!("GRANT SELECT ON {} TO {}", t.qualified, src.conn.user),
            );
        } else if !(has_pk || ident == "f" || ident == "i") {
            c.fail(
                &format!("table {}", t.qualified),
                "no primary key or replica identity",
                format!(
                    "add a primary key, or ALTER TABLE {} REPLICA IDENTITY FULL",
                    t.qualified
                ),
            );
        } else {
            c.pass(&format!("table {}", t.qualified), "readable, has a key");
        }
        let oid: i64 = row.get("oid");
        let cols: Vec<String> = sqlx::query_scalar("select attname::text from pg_attribute where attrelid = $1::bigint::oid and attnum > 0 and not attisdropped")
            .bind(oid)
            .fetch_all(&mut conn)
            .await?;
        let missing: Vec<&str> = t
            .mapped_columns()
            .into_iter()
            .filter(|m| !cols.iter().any(|c| c == m))
            .collect();
        if !missing.is_empty() {
            c.fail(
                &format!("columns {}", t.qualified),
                format!("mapped columns missing: {}", missing.join(", ")),
                "fix the mapping or add the columns",
            );
        }
    }
    for (table, column, expression) in crate::source::generated_columns(&mut conn, src).await? {
        c.fail(
            &format!("columns {table}"),
            crate::source::generated_column_text(&table, &column, &expression),
            format!("map the columns {column} is computed from, not {column}"),
        );
    }
    check_publication(src, c, &mut conn).await?;
    check_slot(src, c, &mut conn).await?;
    conn.close().await.ok();
    Ok(())
}

/// The publication exists with every mapped table and every operation, or
/// the role can create or complete it (`run` does that itself).
async fn check_publication(
    src: &SourceConfig,
    c: &mut Checks,
    conn: &mut PgConnection,
) -> Result<(), sqlx::Error> {
    let p = crate::source::quote_ident(&src.publication);
    let row = sqlx::query(
        "select p.pubinsert and p.pubupdate and p.pubdelete and p.pubtruncate as all_ops,
                p.pubowner = r.oid or r.rolsuper as owned, p.pubviaroot as via_root,
                exists (select 1 from pg_class c where c.relkind = 'p'
                           and c.oid = any(select to_regclass(t)::oid from unnest($2::text[]) t)) as partitioned
           from pg_publication p, pg_roles r
          where p.pubname = $1 and r.rolname = current_user",
    )
    .bind(&src.publication)
    .bind(src.tables.iter().map(|t| t.qualified.clone()).collect::<Vec<_>>())
    .fetch_optional(&mut *conn)
    .await?;
    let tables = src
        .tables
        .iter()
        .map(|t| t.qualified.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(row) = row else {
        // CREATE PUBLICATION ... FOR TABLE needs CREATE on the database and
        // ownership of every table.
        let (create, owns_all): (bool, bool) = sqlx::query_as(
            "select has_database_privilege(current_database(), 'CREATE')
                    or (select rolsuper from pg_roles where rolname = current_user),
                    coalesce(bool_and(pg_has_role(c.relowner, 'USAGE')), true)
               from pg_class c where c.oid = any(select to_regclass(t)::oid from unnest($1::text[]) t)",
        )
        .bind(src.tables.iter().map(|t| t.qualified.clone()).collect::<Vec<_>>())
        .fetch_one(&mut *conn)
        .await?;
        if create && owns_all {
            c.pass(
                "publication",
                format!("{} missing; run will create it", src.publication),
            );
        } else {
            c.fail(
                "publication",
                format!(
                    "{} missing and the role cannot create it (needs CREATE on the database and ownership of the tables)",
                    src.publication
                ),
                format!("as the tables' owner: CREATE PUBLICATION {p} FOR TABLE {tables} WITH (publish_via_partition_root = true)"),
            );
        }
        return Ok(());
    };
    let (all_ops, owned): (bool, bool) = (row.get("all_ops"), row.get("owned"));
    if row.get::<bool, _>("partitioned") && !row.get::<bool, _>("via_root") {
        // Changes of a partitioned table would arrive under its partitions'
        // names, which no mapping names.
        let fix = format!("ALTER PUBLICATION {p} SET (publish_via_partition_root = true)");
        if owned {
            c.pass(
                "publication_partitions",
                format!("{} publishes partitions under their own names; run will set publish_via_partition_root", src.publication),
            );
        } else {
            c.fail(
                "publication_partitions",
                format!(
                    "{} publishes a mapped partitioned table under its partitions' names",
                    src.publication
                ),
                format!("as the publication's owner: {fix}"),
            );
            return Ok(());
        }
    }
    let present: Vec<String> = sqlx::query_scalar(
        "select schemaname || '.' || tablename from pg_publication_tables where pubname = $1",
    )
    .bind(&src.publication)
    .fetch_all(&mut *conn)
    .await?;
    let missing: Vec<&str> = src
        .tables
        .iter()
        .map(|t| t.qualified.as_str())
        .filter(|t| !present.iter().any(|p| p == t))
        .collect();
    if !all_ops {
        c.fail(
            "publication",
            format!("{} does not publish every operation", src.publication),
            format!("ALTER PUBLICATION {p} SET (publish = 'insert, update, delete, truncate')"),
        );
    } else if missing.is_empty() {
        c.pass(
            "publication",
            format!("{} publishes every mapped table", src.publication),
        );
    } else if owned {
        c.pass(
            "publication",
            format!(
                "{} lacks {}; run will add them",
                src.publication,
                missing.join(", ")
            ),
        );
    } else {
        c.fail(
            "publication",
            format!("{} lacks {}", src.publication, missing.join(", ")),
            format!(
                "as the publication's owner: ALTER PUBLICATION {p} ADD TABLE {}",
                missing.join(", ")
            ),
        );
    }
    Ok(())
}

/// The slot, when it exists, is a pgoutput slot of this database whose WAL is
/// still there.
async fn check_slot(
    src: &SourceConfig,
    c: &mut Checks,
    conn: &mut PgConnection,
) -> Result<(), sqlx::Error> {
    let row = sqlx::query(
        "select plugin::text, database::text = current_database() as same_db, active,
                coalesce(wal_status, '') as wal_status
           from pg_replication_slots where slot_name = $1",
    )
    .bind(&src.slot)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        c.pass(
            "slot",
            format!("{} missing; run will create it and snapshot", src.slot),
        );
        return Ok(());
    };
    let (plugin, same_db, active, wal_status): (Option<String>, Option<bool>, bool, String) = (
        row.get("plugin"),
        row.get("same_db"),
        row.get("active"),
        row.get("wal_status"),
    );
    if plugin.as_deref() != Some("pgoutput") || same_db != Some(true) {
        c.fail(
            "slot",
            format!(
                "{} exists but is a {} slot{}",
                src.slot,
                plugin.as_deref().unwrap_or("physical"),
                if same_db == Some(true) {
                    ""
                } else {
                    " of another database"
                }
            ),
            "set source.slot to an unused name, or drop that slot if nothing uses it",
        );
    } else if wal_status == "lost" {
        c.fail(
            "slot",
            format!("{} was invalidated: the WAL it needed is gone", src.slot),
            "re-snapshot the source: see \"Slots and WAL retention\" in docs/operations.md",
        );
    } else {
        c.pass(
            "slot",
            format!(
                "{} ({}{})",
                src.slot,
                if active { "active" } else { "inactive" },
                if wal_status.is_empty() {
                    String::new()
                } else {
                    format!(", wal {wal_status}")
                }
            ),
        );
    }
    Ok(())
}

async fn check_sink(cfg: &Config, c: &mut Checks) {
    let store = match Store::connect(&cfg.sink).await {
        Ok(s) => {
            c.pass("connect", cfg.sink.conn.to_string());
            s
        }
        Err(e) => {
            c.fail(
                "connect",
                format!("{e}: {}", e.source_text()),
                "check sink.url, credentials, sslmode and that the database exists",
            );
            return;
        }
    };
    let applied = store.applied_migrations().await;
    let want = MIGRATOR.iter().count();
    match applied {
        Ok(v) if v.len() >= want => c.pass("migrated", format!("{} migrations applied", v.len())),
        Ok(v) => c.fail(
            "migrated",
            format!("{} of {want} migrations applied", v.len()),
            "run `tributary migrate` (run also migrates)",
        ),
        Err(_) => c.fail(
            "migrated",
            "schema not created",
            "run `tributary migrate` (run also migrates)",
        ),
    }
}

trait SourceText {
    fn source_text(&self) -> String;
}

impl<E: std::error::Error> SourceText for E {
    fn source_text(&self) -> String {
        self.source().map(|s| s.to_string()).unwrap_or_default()
    }
}
