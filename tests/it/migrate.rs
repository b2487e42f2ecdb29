//! `tributary migrate` creates every relation of the contract, idempotently,
//! also when several processes migrate a new store at once.

use crate::harness::*;

#[tokio::test]
async fn migrate_creates_the_contract_relations_and_is_idempotent() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    let cfg = contacts_config(&sink, "");
    for _ in 0..2 {
        let out = run_cmd(&cfg, &["migrate"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    for rel in [
        "profiles",
        "identities",
        "profile_fields",
        "checkpoints",
        "events",
        "reconcile_runs",
        "reconcile_drift",
        "dead_letters",
        "suppressions",
        "profile_view",
        "contributions",
    ] {
        let n: i64 = scalar(
            &sink,
            &format!("select count(*) from information_schema.tables where table_schema = 'tributary' and table_name = '{rel}'"),
        )
        .await;
        assert_eq!(n, 1, "relation {rel} missing");
    }
    let partitioned: bool =
        scalar(&sink, "select exists (select 1 from pg_partitioned_table p join pg_class c on c.oid = p.partrelid where c.relname = 'events')").await;
    assert!(partitioned, "events must be partitioned");
}

/// Instances started together against a new store (a capture process and
/// apply instances, say) all migrate it at once: each must succeed. The
/// schema's `create schema if not exists` raced with itself (a unique
/// violation in `pg_namespace`), and the loser stopped; the Kafka scale-out
/// test lost an apply instance that way about one run in twenty.
#[tokio::test]
async fn several_processes_migrating_a_new_store_at_once_all_succeed() {
    let pg = cluster();
    for round in 0..20 {
        let sink = create_db(&pg, &format!("profiles{round}")).await;
        let cfg = contacts_config(&sink, "");
        let children: Vec<_> = (0..8)
            .map(|_| {
                bin()
                    .arg("--config")
                    .arg(&*cfg)
                    .arg("migrate")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn tributary migrate")
            })
            .collect();
        for child in children {
            let out = child
                .wait_with_output()
                .expect("wait for tributary migrate");
            assert!(out.status.success(), "round {round}: {}", text(&out));
        }
    }
}

#[tokio::test]
async fn event_log_retention_drops_partitions_past_the_kept_months() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    let cfg = write_config(&format!(
        r#"
[sink]
url = "{sink}"
events_retention_months = 3

[[source]]
name = "crm"
url = "{sink}"
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email" }}
"#
    ));
    assert!(run_cmd(&cfg, &["migrate"]).status.success());
    exec(
        &sink,
        "create table tributary.events_y2020m01 partition of tributary.events for values from ('2020-01-01 00:00:00+00') to ('2020-02-01 00:00:00+00');
         insert into tributary.events (source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key)
         values ('crm', '0/1', '0/1', 0, 1, '2020-01-15', 'public.contacts', 'insert', '{\"id\": 1}')",
    )
    .await;
    let partitions = || async {
        scalar::<Vec<String>>(&sink, "select coalesce(array_agg(c.relname::text order by c.relname), '{}') from pg_inherits i join pg_class c on c.oid = i.inhrelid where i.inhparent = 'tributary.events'::regclass").await
    };
    let before = partitions().await;
    assert!(before.contains(&"events_y2020m01".to_owned()), "{before:?}");
    let out = run_cmd(&cfg, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = partitions().await;
    assert!(
        !after.contains(&"events_y2020m01".to_owned()),
        "old partition kept: {after:?}"
    );
    // Last month, this month and the months ahead stay.
    assert_eq!(after.len(), before.len() - 1, "{before:?} -> {after:?}");
    let old: i64 = scalar(
        &sink,
        "select count(*) from tributary.events where commit_time < '2021-01-01'",
    )
    .await;
    assert_eq!(old, 0);
}

/// A store built before `profile_fields` became a view over
/// `profiles.provenance` keeps its provenance, row for row, through `migrate`.
#[tokio::test]
async fn migrating_an_existing_store_keeps_its_field_provenance() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    // The store as the previous release left it: every migration but the view.
    store_before(&sink, 20261201000001).await;
    exec(
        &sink,
        "insert into tributary.profiles (profile_id, traits) values
           (1, '{\"email\": \"a@x.com\", \"first_name\": \"Ann\"}'), (2, '{}');
         insert into tributary.profile_fields (profile_id, field, value, source, table_name, row_key, freshness, lsn) values
           (1, 'email', '\"a@x.com\"', 'crm', 'public.contacts', '{\"id\":1}', '2026-11-30 10:00:00.123456+00', '0/16B3748'),
           (1, 'first_name', '\"Ann\"', 'shop', 'public.accounts', '{\"id\":7}', '2026-11-30 11:00:00+00', '1/0');",
    )
    .await;
    let dump = "select string_agg(format('%s %s %s %s %s %s %s %s', profile_id, field, value::text, source, table_name,
                  row_key, freshness, lsn), ' | ' order by profile_id, field) from tributary.profile_fields";
    let before: String = scalar(&sink, dump).await;
    let cfg = contacts_config(&sink, "");
    let out = run_cmd(&cfg, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let kind: String = scalar(
        &sink,
        "select table_type::text from information_schema.tables where table_schema = 'tributary' and table_name = 'profile_fields'",
    )
    .await;
    assert_eq!(kind, "VIEW");
    let after: String = scalar(&sink, dump).await;
    assert_eq!(after, before);
}

/// A store whose provenance documents name the winning row once per field
/// (as the daemon wrote them before) reads the same `profile_fields` after
/// `migrate`, and each document then names each winning row once.
#[tokio::test]
async fn migrating_provenance_to_one_group_per_row_keeps_profile_fields() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    store_before(&sink, 20261206000001).await;
    let crm = r#""s":"crm","t":"public.contacts","k":"{\"id\":1}","f":"2026-11-30T10:00:00.123456Z","l":"0/16B3748""#;
    exec(
        &sink,
        &format!(
            r#"insert into tributary.profiles (profile_id, traits, provenance) values
                 (1, '{{"email": "a@x.com", "first_name": "Ann", "phone": "+1"}}',
                  '{{"email":{{"v":"a@x.com",{crm}}},"first_name":{{"v":"Ann",{crm}}},
                     "phone":{{"v":"+1","s":"shop","t":"public.accounts","k":"{{\"id\":7}}","f":"2026-11-30T11:00:00Z","l":"1/0"}}}}'),
                 (2, '{{}}', '{{}}');"#
        ),
    )
    .await;
    let dump = "select string_agg(format('%s %s %s %s %s %s %s %s', profile_id, field, value::text, source, table_name,
                  row_key, freshness, lsn), ' | ' order by profile_id, field) from tributary.profile_fields";
    let before: String = scalar(&sink, dump).await;
    assert_eq!(before.matches(" | ").count(), 2, "{before}");
    let cfg = contacts_config(&sink, "");
    let out = run_cmd(&cfg, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let after: String = scalar(&sink, dump).await;
    assert_eq!(after, before);
    let groups: String = scalar(
        &sink,
        "select string_agg(format('%s:%s', profile_id, json_array_length(provenance)), ' ' order by profile_id) from tributary.profiles",
    )
    .await;
    assert_eq!(groups, "1:2 2:0");
}

/// A store whose event log was written as `jsonb` keeps every logged change
/// through `migrate` (the row becomes `json`, equal as JSON), and `rebuild`
/// reads the migrated log in the order it was first applied.
#[tokio::test]
async fn migrating_an_existing_event_log_keeps_its_changes_and_rebuild_reads_them() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    store_before(&sink, 20261201000004).await;
    // Applied in this order: contact 2, then contact 1 and its later update.
    exec(
        &sink,
        "create table tributary.events_y2026m11 partition of tributary.events for values from ('2026-11-01 00:00:00+00') to ('2026-12-01 00:00:00+00');
         insert into tributary.events (source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key, row) values
           ('crm', '0/20', '0/28', 0, 11, '2026-11-30 10:00:02+00', 'public.contacts', 'insert', '{\"id\": 2}', '{\"id\": 2, \"email\": \"b@x.com\", \"name\": \"Bea\"}'),
           ('crm', '0/10', '0/18', 0, 10, '2026-11-30 10:00:01+00', 'public.contacts', 'insert', '{\"id\": 1}', '{\"id\": 1, \"email\": \"a@x.com\", \"name\": \"Ann\"}'),
           ('crm', '0/30', '0/38', 0, 12, '2026-11-30 10:00:03+00', 'public.contacts', 'update', '{\"id\": 1}', '{\"id\": 1, \"email\": \"a@x.com\", \"name\": \"Anna\"}');",
    )
    .await;
    let dump = "select string_agg(format('%s %s %s %s %s', source, commit_lsn, seq, key::text, row::jsonb::text), ' | ' order by applied_seq) from tributary.events";
    let before: String = scalar(&sink, dump).await;
    let cfg = contacts_config(&sink, r#"fields = { name = "name" }"#);
    let out = run_cmd(&cfg, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let row_type: String = scalar(
        &sink,
        "select data_type::text from information_schema.columns where table_schema = 'tributary' and table_name = 'events' and column_name = 'row'",
    )
    .await;
    assert_eq!(row_type, "json");
    let after: String = scalar(&sink, dump).await;
    assert_eq!(after, before);

    let out = run_cmd(&cfg, &["--json", "rebuild"]);
    assert!(out.status.success(), "{}", text(&out));
    let profiles: String = scalar(
        &sink,
        "select string_agg(format('%s=%s', i.value, p.traits ->> 'name'), ', ' order by i.value)
           from tributary.identities i join tributary.profiles p using (profile_id)
          where i.kind = 'email' and p.merged_into is null",
    )
    .await;
    assert_eq!(profiles, "a@x.com=Anna, b@x.com=Bea");
}

/// A store written while contributions and aggregate state were `jsonb`
/// keeps them, equal as JSON, through `migrate`, and they are `json` after it.
#[tokio::test]
async fn migrating_contributions_to_json_keeps_their_values() {
    let pg = cluster();
    let sink = create_db(&pg, "profiles").await;
    store_before(&sink, 20261205000001).await;
    exec(
        &sink,
        "insert into tributary.profiles (profile_id, traits, agg_state) values
           (1, '{\"email\": \"a@x.com\", \"order_count\": 2}', '{\"order_count\": {\"n\": 2, \"v\": 2}}');
         insert into tributary.contributions (source, table_name, row_key, profile_id, identities, fields, aggs, version, lsn, seq, freshness, priority) values
           ('crm', 'public.contacts', '{\"id\":1}', 1, '[[\"email\", \"a@x.com\"]]', '{\"email\": \"a@x.com\", \"note\": \"\\u00e9 \\\"q\\\"\"}', '{}', 1, '0/10', 0, now(), 0),
           ('shop', 'public.orders', '{\"id\":7}', 1, '[]', '{}', '{\"order_count\": 1, \"ltv\": 12.50}', 1, '0/20', 0, now(), 0);",
    )
    .await;
    let dump = "select string_agg(format('%s %s %s %s', row_key, identities::jsonb::text, fields::jsonb::text, aggs::jsonb::text), ' | ' order by row_key)
                  || ' / ' || (select string_agg(agg_state::jsonb::text, ',') from tributary.profiles)
                  from tributary.contributions";
    let before: String = scalar(&sink, dump).await;
    let cfg = contacts_config(&sink, "");
    let out = run_cmd(&cfg, &["migrate"]);
    assert!(out.status.success(), "{}", text(&out));
    let types: String = scalar(
        &sink,
        "select string_agg(table_name || '.' || column_name || ' ' || data_type, ', ' order by table_name, column_name)
           from information_schema.columns
          where table_schema = 'tributary' and column_name in ('identities', 'fields', 'aggs', 'agg_state', 'traits')
            and table_name in ('contributions', 'profiles')",
    )
    .await;
    assert_eq!(
        types,
        "contributions.aggs json, contributions.fields json, contributions.identities json, profiles.agg_state json, profiles.traits jsonb"
    );
    let after: String = scalar(&sink, dump).await;
    assert_eq!(after, before);
}

/// A store with the migrations before `version` applied, as an earlier
/// release left it.
async fn store_before(sink: &str, version: i64) {
    use sqlx::postgres::PgPoolOptions;
    exec(sink, "create schema tributary").await;
    let mut old = sqlx::migrate::Migrator::DEFAULT;
    old.migrations = tributary::store::MIGRATOR
        .migrations
        .iter()
        .filter(|m| m.version < version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{sink}&options=-csearch_path%3Dtributary"))
        .await
        .unwrap();
    old.run(&pool).await.unwrap();
    pool.close().await;
}

/// A config with one source, `public.contacts` of the sink's own database
/// mapped by email (`table_extra`: more lines of the table's section).
fn contacts_config(sink: &str, table_extra: &str) -> ConfigFile {
    write_config(&format!(
        r#"
[sink]
url = "{sink}"

[[source]]
name = "crm"
url = "{sink}"
  [[source.table]]
  name = "public.contacts"
  identity = {{ email = "email" }}
  {table_extra}
"#
    ))
}
