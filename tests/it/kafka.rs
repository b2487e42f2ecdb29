//! Publishing to a real Kafka-protocol broker (tansu, started by
//! `tools/kafka-test-broker.sh`): every source change reaches its
//! topic once per delivery attempt, in commit order per key, in the documented
//! envelope; a crash between publishing and the checkpoint loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

use crate::faults::{caught_up, Workload};
use crate::harness::*;

/// The broker's address; starts it (once per machine) if it is not running.
pub fn broker() -> String {
    let port = std::env::var("KAFKA_PORT").unwrap_or_else(|_| "19092".into());
    let addr = format!("127.0.0.1:{port}");
    if std::net::TcpStream::connect(&addr).is_ok() {
        return addr;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/kafka-test-broker.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg("start")
        .env("KAFKA_PORT", &port)
        .env(
            "TANSU_SOURCE",
            std::env::var("TANSU_SOURCE").unwrap_or_else(|_| "pypi".into()),
        )
        .output()
        .expect("run kafka-test-broker.sh");
    // Another test may have started it meanwhile.
    assert!(
        out.status.success() || std::net::TcpStream::connect(&addr).is_ok(),
        "cannot start the test broker: {}",
        text(&out)
    );
    addr
}

/// A unique topic prefix per test.
fn prefix(tag: &str) -> String {
    format!("t{}{tag}", rand::random::<u32>())
}

/// One consumed change: (topic, partition, key, envelope).
type Got = (String, i32, Option<String>, Value);

/// Reads every message of `topics` from the beginning until `want` have
/// arrived (or the deadline), in partition order.
fn consume_all(broker: &str, topics: &[String], want: usize) -> Vec<Got> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", format!("test-{}", rand::random::<u32>()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .unwrap();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let got_one = |m: &rdkafka::message::BorrowedMessage<'_>| -> Got {
        let value: Value = serde_json::from_slice(m.payload().unwrap_or(b"null")).unwrap();
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        (m.topic().to_owned(), m.partition(), key, value)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut got = Vec::new();
    while got.len() < want && std::time::Instant::now() < deadline {
        if want == usize::MAX && !got.is_empty() {
            break; // "everything": read until 2 s pass without a message (below)
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            got.push(got_one(&m.expect("consume")));
        }
    }
    // Until 2 s pass without a message: anything beyond `want` is a duplicate.
    let mut extra = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < extra {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            extra = std::time::Instant::now() + Duration::from_secs(2);
            got.push(got_one(&m));
        }
    }
    got
}

fn topics(prefix: &str) -> Vec<String> {
    [
        "crm.public.contacts",
        "shop.public.accounts",
        "shop.public.orders",
    ]
    .iter()
    .map(|t| format!("{prefix}.{t}"))
    .collect()
}

fn kafka_config(
    crm: &str,
    shop: &str,
    sink: &str,
    tag: &str,
    broker: &str,
    prefix: &str,
) -> String {
    format!(
        "{}\n[kafka]\nbrokers = \"{broker}\"\ntopic_prefix = \"{prefix}\"\npartitions = 3\n",
        pipeline_config(crm, shop, sink, tag)
    )
}

/// `(source, commit_lsn, seq)` of a message: the change's identity.
fn identity(v: &Value) -> (String, String, u64) {
    (
        v["source"]["db"].as_str().unwrap().to_owned(),
        v["source"]["commit_lsn"].as_str().unwrap().to_owned(),
        v["source"]["seq"].as_u64().unwrap(),
    )
}

/// Every logged change of the store as `(source, commit_lsn, seq)`, and per op.
async fn logged(sink: &str) -> (BTreeSet<(String, String, u64)>, BTreeMap<String, i64>) {
    let rows: Vec<(String, String, i64, String)> = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(sink).await.unwrap();
        sqlx::query_as("select source, commit_lsn::text, seq, op from tributary.events")
            .fetch_all(&mut c)
            .await
            .unwrap()
    };
    let mut ops = BTreeMap::new();
    let ids = rows
        .into_iter()
        .map(|(s, l, q, op)| {
            *ops.entry(op).or_insert(0) += 1;
            (s, l, u64::try_from(q).unwrap())
        })
        .collect();
    (ids, ops)
}

/// Checks commit order per key: within a partition, the changes of one key
/// come in increasing (commit_lsn, seq).
fn assert_ordered_per_key(got: &[Got]) {
    let mut last: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for (topic, _, key, v) in got {
        let Some(key) = key else { continue };
        let lsn: tributary::event::Lsn =
            v["source"]["commit_lsn"].as_str().unwrap().parse().unwrap();
        let pos = (lsn.0, v["source"]["seq"].as_u64().unwrap());
        if let Some(prev) = last.insert((topic.clone(), key.clone()), pos) {
            assert!(prev < pos, "{topic} key {key}: {prev:?} then {pos:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_published_once_in_commit_order_per_key() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    exec(&crm, "insert into contacts (id, email, first_name) select g, 'pre' || g || '@x.com', 'Pre' || g from generate_series(10001, 10100) g").await;
    let prefix = prefix("once");
    let cfg = write_config(&kafka_config(&crm, &shop, &sink, "ka", &broker, &prefix));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 2000, 21, |_| {}).await;
    // A dead letter (an order without an account), then gone again.
    exec(
        &shop,
        "insert into orders (id, account_id, status, total_cents) values (90000, null, 'paid', 1)",
    )
    .await;
    exec(&shop, "delete from orders where id = 90000").await;
    *w.changes.entry("shop").or_default() += 2;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !caught_up(&shop, &sink, &w).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the store did not catch up:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ids, ops) = logged(&sink).await;
    let got = tokio::task::block_in_place(|| consume_all(&broker, &topics(&prefix), ids.len()));
    let profile_msgs = tokio::task::block_in_place(|| {
        consume_all(&broker, &[format!("{prefix}.profiles")], usize::MAX)
    });
    let dead_msgs = tokio::task::block_in_place(|| {
        consume_all(&broker, &[format!("{prefix}.dead_letters")], usize::MAX)
    });
    assert_eq!(daemon.stop(), Some(0));

    // The profiles topic: the latest message per profile id is the stored profile.
    let mut latest: BTreeMap<i64, Value> = BTreeMap::new();
    for (_, _, key, v) in &profile_msgs {
        let id = v["profile_id"].as_i64().unwrap();
        assert_eq!(
            key.as_deref(),
            Some(id.to_string().as_str()),
            "keyed by profile id"
        );
        // Each message is a change: never the same profile state twice in a row.
        if let Some(prev) = latest.insert(id, v.clone()) {
            assert!(
                prev["traits"] != v["traits"] || prev["merged_into"] != v["merged_into"],
                "a no-op message for profile {id}: {v}"
            );
        }
    }
    let stored: Vec<(i64, Option<i64>, Value)> = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&sink).await.unwrap();
        sqlx::query_as("select profile_id, merged_into, traits from tributary.profiles")
            .fetch_all(&mut c)
            .await
            .unwrap()
    };
    let merged = stored.iter().filter(|p| p.1.is_some()).count();
    assert!(merged > 0, "the workload merges profiles");
    for (id, merged_into, traits) in &stored {
        let v = latest
            .get(id)
            .unwrap_or_else(|| panic!("profile {id} never published"));
        assert_eq!(
            &v["traits"], traits,
            "profile {id}: latest message = stored traits"
        );
        assert_eq!(v["merged_into"].as_i64(), *merged_into, "profile {id}");
    }
    // The dead-letter topic mirrors the table.
    let dead: i64 = scalar(&sink, "select count(*) from tributary.dead_letters").await;
    assert!(dead >= 1);
    assert_eq!(
        i64::try_from(dead_msgs.len()).unwrap(),
        dead,
        "{dead_msgs:?}"
    );
    assert!(dead_msgs
        .iter()
        .all(|m| m.3["error"].is_string() && m.3["table"] == "public.orders"));

    // Once each: the same set as the store's event log, no duplicates.
    let published: Vec<(String, String, u64)> = got.iter().map(|g| identity(&g.3)).collect();
    let unique: BTreeSet<_> = published.iter().cloned().collect();
    assert_eq!(
        published.len(),
        unique.len(),
        "a change was published twice"
    );
    assert_eq!(
        unique.len(),
        ids.len(),
        "missing: {:?}",
        ids.difference(&unique).take(5).collect::<Vec<_>>()
    );
    assert_eq!(unique, ids, "published = logged");
    // Per op, as logged.
    let mut per_op: BTreeMap<&str, i64> = BTreeMap::new();
    for g in &got {
        *per_op.entry(g.3["op"].as_str().unwrap()).or_default() += 1;
    }
    for (letter, op) in [
        ("r", "snapshot"),
        ("c", "insert"),
        ("u", "update"),
        ("d", "delete"),
    ] {
        assert_eq!(
            per_op.get(letter).copied().unwrap_or(0),
            ops.get(op).copied().unwrap_or(0),
            "{op} messages"
        );
    }
    assert_ordered_per_key(&got);

    // The envelope, on one update of a contact.
    let (topic, _, key, v) = got
        .iter()
        .find(|g| g.3["op"] == "u" && g.0.ends_with(".crm.public.contacts"))
        .expect("an update of a contact");
    assert_eq!(topic, &format!("{prefix}.crm.public.contacts"));
    let id = v["after"]["id"].as_i64().unwrap();
    assert_eq!(key.as_deref(), Some(format!("{{\"id\":{id}}}").as_str()));
    assert!(v["before"].is_null());
    assert_eq!(v["source"]["schema"], "public");
    assert_eq!(v["source"]["table"], "contacts");
    assert!(
        v["source"]["txId"].is_u64()
            && v["source"]["lsn"].is_u64()
            && v["source"]["ts_ms"].is_i64()
    );
    assert!(v["ts_ms"].as_i64() >= v["source"]["ts_ms"].as_i64());
}

/// The daemon aborts right after a batch is acknowledged by the broker and
/// before the store commits it (fault injection). After a restart every change
/// is on Kafka: the batch is published again (a duplicate, allowed and
/// documented), nothing is missing, and first deliveries keep commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_publish_and_checkpoint_loses_no_event() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix("crash");
    let cfg = write_config(&kafka_config(&crm, &shop, &sink, "kc", &broker, &prefix));
    let mut first = Daemon::start_with_env(&cfg, &[("TRIBUTARY_TEST_CRASH_AFTER_PUBLISH", "2")]);
    wait_snapshots(&sink, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 1500, 31, |_| {}).await;
    wait_until(
        "the crash after publishing",
        Duration::from_secs(60),
        || {
            let alive = first.alive();
            async move { !alive }
        },
    )
    .await;
    assert!(
        first
            .log_text()
            .contains("aborting after publishing batch 2"),
        "{}",
        first.log_text()
    );
    let daemon = Daemon::start(&cfg);
    wait_until("the store caught up", Duration::from_secs(120), || async {
        caught_up(&shop, &sink, &w).await
    })
    .await;
    let (ids, _) = logged(&sink).await;
    let got = tokio::task::block_in_place(|| consume_all(&broker, &topics(&prefix), ids.len() + 1));
    assert_eq!(daemon.stop(), Some(0));

    let published: Vec<(String, String, u64)> = got.iter().map(|g| identity(&g.3)).collect();
    let unique: BTreeSet<_> = published.iter().cloned().collect();
    let missing: Vec<_> = ids.difference(&unique).take(5).collect();
    assert!(missing.is_empty(), "lost on Kafka: {missing:?}");
    assert!(
        published.len() > unique.len(),
        "the batch acknowledged before the crash is published again"
    );
    // First deliveries are in commit order per key.
    let mut seen = BTreeSet::new();
    let firsts: Vec<Got> = got
        .into_iter()
        .filter(|g| seen.insert(identity(&g.3)))
        .collect();
    assert_ordered_per_key(&firsts);
}

/// Starts `tributary run --role <role>`.
fn start_role(cfg: &std::path::Path, role: &str) -> Daemon {
    let log = cfg.with_extension(format!("{role}.log.{}", rand::random::<u16>()));
    Daemon::spawn_args(cfg, &["run", "--role", role], &log)
}

/// A deployment split over Kafka, started by [`start_split`].
struct Split {
    capture: Daemon,
    /// The apply instance that took the lease first.
    owner: Daemon,
    /// A second apply instance, standing by (when asked for).
    standby: Option<Daemon>,
}

/// Starts a capture, an apply instance and waits until it owns the lease,
/// then (with `standby`) a second one and waits until it stands by; returns
/// once `sink` has both sources' snapshots.
async fn start_split(cfg: &std::path::Path, sink: &str, standby: bool) -> Split {
    let capture = start_role(cfg, "capture");
    let owner = start_role(cfg, "apply");
    wait_log(&owner, "took the apply lease", Duration::from_secs(60)).await;
    let standby = if standby {
        let s = start_role(cfg, "apply");
        wait_log(&s, "standing by", Duration::from_secs(60)).await;
        Some(s)
    } else {
        None
    };
    wait_snapshots(sink, 2).await;
    Split {
        capture,
        owner,
        standby,
    }
}

/// Two people: `gone@x.com` (contact 1 and shop account 7) and `stays@x.com`
/// (contact 2).
async fn insert_gone_and_stays(crm: &str, shop: &str) {
    exec(crm, "insert into contacts (id, email, first_name) values (1, 'gone@x.com', 'G'), (2, 'stays@x.com', 'S')").await;
    exec(
        shop,
        "insert into accounts (id, email) values (7, 'gone@x.com')",
    )
    .await;
}

/// Waits for `what` in `d`'s log; returns how long it took.
async fn wait_log(d: &Daemon, what: &str, within: Duration) -> Duration {
    let t0 = std::time::Instant::now();
    while !d.log_text().contains(what) {
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for `{what}` in the log:\n{}",
            quiet(d)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// A daemon's log without its debug lines (for a failure message).
fn quiet(d: &Daemon) -> String {
    d.log_text()
        .lines()
        .filter(|l| !l.contains("DEBUG"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many batches an apply instance has written.
fn applied(d: &Daemon) -> usize {
    d.log_text().matches("batch applied from kafka").count()
}

/// The config of the scale-out tests: [`kafka_config`] with a 2 s apply lease.
fn split_config(
    crm: &str,
    shop: &str,
    sink: &str,
    tag: &str,
    broker: &str,
    prefix: &str,
) -> ConfigFile {
    write_config(&format!(
        "{}lease_ttl_ms = 2000\n",
        kafka_config(crm, shop, sink, tag, broker, prefix)
    ))
}

/// One capture and two apply instances over Kafka: exactly one apply
/// instance (the lease's owner) writes while the other stands by; the owner
/// is SIGKILLed mid-stream, the standby takes over within the lease's time
/// to live, and the final store equals a single-process (`--role all`) run
/// of the same workload into a second store: nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_and_two_apply_instances_equal_a_single_process_run() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let reference = create_db(&pg, "reference").await;
    let prefix = prefix("scale");
    let split = split_config(&crm, &shop, &sink, "sp", &broker, &prefix);
    let single = write_config(&pipeline_config(&crm, &shop, &reference, "sg"));
    let one = Daemon::start(&single);
    let Split {
        capture,
        owner,
        standby,
    } = start_split(&split, &sink, true).await;
    let standby = standby.expect("started");
    wait_snapshots(&reference, 2).await;
    let mut w = Workload::default();
    w.run(&crm, &shop, 1500, 41, |_| {}).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while applied(&owner) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the owner applied nothing:\n{}",
            quiet(&owner)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        applied(&standby),
        0,
        "the standby wrote while another instance owned the lease:\n{}",
        quiet(&standby)
    );
    // Mid-stream: the second half of the workload runs while the owner dies.
    let more = {
        let (crm, shop) = (crm.clone(), shop.clone());
        let mut w2 = std::mem::take(&mut w);
        tokio::spawn(async move {
            w2.run(&crm, &shop, 1500, 42, |_| {}).await;
            w2
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    owner.kill9();
    let takeover = wait_log(&standby, "took the apply lease", Duration::from_secs(30)).await;
    eprintln!("takeover after SIGKILL of the owner: {takeover:?}");
    assert!(
        takeover < Duration::from_millis(2000 + 2000),
        "the standby took {takeover:?} to take over a 2 s lease"
    );
    let w = more.await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !(caught_up(&shop, &reference, &w).await
        && profiles(&sink).await == profiles(&reference).await)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the split run did not converge to the single-process run:\ncapture:\n{}\nstandby:\n{}",
            quiet(&capture),
            quiet(&standby),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        caught_up(&shop, &sink, &w).await,
        "aggregates exact in the split store"
    );
    assert_eq!(
        provenance(&sink).await,
        provenance(&reference).await,
        "field provenance equal too"
    );
    let logged = |db: String| async move {
        scalar::<i64>(
            &db,
            "select count(*) from tributary.events where op <> 'snapshot'",
        )
        .await
    };
    assert_eq!(
        logged(sink.clone()).await,
        logged(reference.clone()).await,
        "every streamed change logged once in both stores"
    );
    assert_eq!(standby.stop(), Some(0));
    assert_eq!(capture.stop(), Some(0));
    assert_eq!(one.stop(), Some(0));
}

/// An owner that stops answering (SIGSTOP: a stall, a partition) loses the
/// lease to the standby; woken up, it writes nothing more (its writes check
/// the lease inside their transaction) and stands by again. A clean stop of
/// the new owner releases the lease, and the first one takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_apply_owner_is_fenced_off_and_a_clean_stop_hands_over_at_once() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let reference = create_db(&pg, "reference").await;
    let prefix = prefix("fence");
    let split = split_config(&crm, &shop, &sink, "fp", &broker, &prefix);
    let single = write_config(&pipeline_config(&crm, &shop, &reference, "fg"));
    let one = Daemon::start(&single);
    let Split {
        capture,
        owner: first,
        standby: second,
    } = start_split(&split, &sink, true).await;
    let second = second.expect("started");
    let mut w = Workload::default();
    w.run(&crm, &shop, 300, 7, |_| {}).await;
    wait_until(
        "the owner applied the changes",
        Duration::from_secs(60),
        || {
            let (shop, sink, w) = (&shop, &sink, &w);
            async move { caught_up(shop, sink, w).await }
        },
    )
    .await;
    // Idle for a poll, so every write it made is logged.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = applied(&first);
    assert!(before > 0, "the owner applied nothing:\n{}", quiet(&first));
    first.pause();
    wait_log(&second, "took the apply lease", Duration::from_secs(30)).await;
    w.run(&crm, &shop, 300, 8, |_| {}).await;
    first.resume();
    wait_log(&first, "lost the apply lease", Duration::from_secs(30)).await;
    wait_log(&first, "standing by", Duration::from_secs(30)).await;
    assert_eq!(
        applied(&first),
        before,
        "the fenced-off owner committed a write after its lease was taken:\n{}",
        quiet(&first)
    );
    let epoch = |db: String| async move {
        scalar::<i64>(&db, "select epoch from tributary.apply_lease").await
    };
    assert_eq!(epoch(sink.clone()).await, 2);
    // Counted before the stop: the standby may take the released lease
    // before the stopped process has exited.
    let handed = first.log_text().matches("took the apply lease").count();
    assert_eq!(second.stop(), Some(0), "a clean stop of the owner");
    let t0 = std::time::Instant::now();
    while first.log_text().matches("took the apply lease").count() == handed {
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "a released lease waited for its expiry:\n{}",
            quiet(&first)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.run(&crm, &shop, 300, 9, |_| {}).await;
    wait_until(
        "the store equals the single-process run",
        Duration::from_secs(90),
        || {
            let (shop, sink, reference, w) = (&shop, &sink, &reference, &w);
            async move {
                caught_up(shop, reference, w).await
                    && caught_up(shop, sink, w).await
                    && profiles(sink).await == profiles(reference).await
            }
        },
    )
    .await;
    assert_eq!(epoch(sink.clone()).await, 3);
    assert_eq!(first.stop(), Some(0));
    assert_eq!(capture.stop(), Some(0));
    assert_eq!(one.stop(), Some(0));
}

/// Every change reaches Kafka when the write path settles a pending batch:
/// ahead of a transaction larger than a batch, and at a clean stop. In the
/// `capture` role the store gets checkpoints only, never derived state.
async fn every_change_reaches_kafka_across_a_clean_stop_and_a_large_transaction(role: &str) {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix(&format!("settle{role}"));
    // Small batches that linger: small transactions wait in the pending batch.
    let cfg = write_config(
        &kafka_config(&crm, &shop, &sink, &format!("st{role}"), &broker, &prefix).replace(
            "batch_max_wait_ms = 20",
            "batch_max_wait_ms = 8000\nbatch_max_events = 50",
        ),
    );
    let daemon = start_role(&cfg, role);
    wait_snapshots(&sink, 2).await;
    let insert = |ids: std::ops::RangeInclusive<u32>| {
        format!(
            "insert into contacts (id, email, first_name) select g, 'c' || g || '@x.com', 'C' || g from generate_series({}, {}) g",
            ids.start(),
            ids.end()
        )
    };
    // Small transactions, then one larger than a batch: the pending small
    // ones are written first, through the same path.
    for id in 1..=5 {
        exec(&crm, &insert(id..=id)).await;
    }
    exec(&crm, &insert(101..=300)).await;
    // More small ones, pending when the daemon is told to stop.
    let before_last: String = scalar(&crm, "select pg_current_wal_lsn()::text").await;
    for id in 6..=8 {
        exec(&crm, &insert(id..=id)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(daemon.stop(), Some(0));
    let cp_past: bool = scalar(
        &sink,
        &format!(
            "select lsn > '{before_last}'::pg_lsn from tributary.checkpoints where source = 'crm'"
        ),
    )
    .await;
    assert!(
        cp_past,
        "the clean stop wrote the pending batch and its checkpoint"
    );

    let want: BTreeSet<u64> = (1..=8).chain(101..=300).collect();
    let topic = format!("{prefix}.crm.public.contacts");
    let got = tokio::task::block_in_place(|| consume_all(&broker, &[topic], want.len()));
    let ids: BTreeSet<u64> = got
        .iter()
        .map(|(_, _, key, _)| {
            let key: Value = serde_json::from_str(key.as_deref().expect("keyed")).unwrap();
            key["id"].as_u64().unwrap()
        })
        .collect();
    let missing: Vec<_> = want.difference(&ids).collect();
    assert!(missing.is_empty(), "not on Kafka: {missing:?}");

    let derived: i64 = scalar(
        &sink,
        "select (select count(*) from tributary.contributions) + (select count(*) from tributary.profiles)
              + (select count(*) from tributary.identities) + (select count(*) from tributary.events)",
    )
    .await;
    if role == "capture" {
        assert_eq!(derived, 0, "a capture process never writes derived state");
    } else {
        let logged: i64 = scalar(&sink, "select count(*) from tributary.events").await;
        assert_eq!(
            logged,
            i64::try_from(want.len()).unwrap(),
            "every change applied once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_kafka_across_a_clean_stop_and_a_large_transaction_role_all() {
    every_change_reaches_kafka_across_a_clean_stop_and_a_large_transaction("all").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_reaches_kafka_across_a_clean_stop_and_a_large_transaction_role_capture() {
    every_change_reaches_kafka_across_a_clean_stop_and_a_large_transaction("capture").await;
}

/// The apply role meets a message that is not a change envelope on a change
/// topic: it goes to `dead_letters` and to the dead-letter topic with where
/// it was and why, and the changes after it apply. Before, it was skipped
/// with a log line only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apply_role_sends_a_message_it_cannot_decode_to_the_dead_letters() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix("undec");
    let cfg = write_config(&kafka_config(&crm, &shop, &sink, "ud", &broker, &prefix));
    let capture = start_role(&cfg, "capture");
    let apply = start_role(&cfg, "apply");
    wait_snapshots(&sink, 2).await;
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (1, 'before@x.com', 'B')",
    )
    .await;
    wait_until(
        "a change applied through kafka",
        Duration::from_secs(60),
        || async { traits_of(&sink, "email", "before@x.com").await.is_some() },
    )
    .await;
    let topic = format!("{prefix}.crm.public.contacts");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker)
        .create()
        .unwrap();
    producer
        .send(
            BaseRecord::to(&topic)
                .key("{\"id\": 9}")
                .payload("this is not an envelope"),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    exec(
        &crm,
        "insert into contacts (id, email, first_name) values (2, 'after@x.com', 'A')",
    )
    .await;
    wait_until(
        "the change after it applied",
        Duration::from_secs(60),
        || async { traits_of(&sink, "email", "after@x.com").await.is_some() },
    )
    .await;
    let row: (String, String, String) = {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&sink).await.unwrap();
        sqlx::query_as(
            "select source, table_name, row ->> 'value' || ' | ' || error from tributary.dead_letters",
        )
        .fetch_one(&mut c)
        .await
        .unwrap()
    };
    assert_eq!(
        (row.0.as_str(), row.1.as_str()),
        ("crm", topic.as_str()),
        "{row:?}"
    );
    assert!(
        row.2.contains("this is not an envelope") && row.2.contains("not a change envelope"),
        "{row:?}"
    );
    let letters = consume_all(&broker, &[format!("{prefix}.dead_letters")], 1);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(apply.stop(), Some(0));
    assert_eq!(capture.stop(), Some(0));
}

/// `forget` reaches Kafka: a tombstone (the key, no value) for the person's
/// profile on the profiles topic and for each of their rows on its change
/// topic, so that compacted topics drop them; the store is erased as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_sends_tombstones_for_the_profile_and_every_row() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix("forget");
    let cfg = write_config(&kafka_config(&crm, &shop, &sink, "fg", &broker, &prefix));
    let daemon = Daemon::start(&cfg);
    wait_snapshots(&sink, 2).await;
    insert_gone_and_stays(&crm, &shop).await;
    wait_until("both rows joined one profile", Duration::from_secs(60), || async {
        traits_of(&sink, "shop_account", "7").await.is_some()
            && traits_of(&sink, "email", "stays@x.com").await.is_some()
            && scalar::<i64>(&sink, "select count(distinct profile_id) from tributary.identities where kind <> 'email' or value = 'gone@x.com'").await == 2
    })
    .await;
    let profile: i64 = scalar(
        &sink,
        "select profile_id from tributary.identities where kind = 'email' and value = 'gone@x.com'",
    )
    .await;
    let out = run_cmd(
        &cfg,
        &["--json", "forget", "--identity", "email=gone@x.com"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(traits_of(&sink, "email", "gone@x.com").await.is_none());

    let watched = [
        format!("{prefix}.profiles"),
        format!("{prefix}.crm.public.contacts"),
        format!("{prefix}.shop.public.accounts"),
    ];
    let got = consume_all(&broker, &watched, usize::MAX);
    let tombstones: BTreeSet<(String, String)> = got
        .iter()
        .filter(|(_, _, _, v)| v.is_null())
        .map(|(t, _, k, _)| (t.clone(), k.clone().unwrap_or_default()))
        .collect();
    let want: BTreeSet<(String, String)> = [
        (watched[0].clone(), profile.to_string()),
        (watched[1].clone(), "{\"id\":1}".to_owned()),
        (watched[2].clone(), "{\"id\":7}".to_owned()),
    ]
    .into();
    assert_eq!(tombstones, want, "{got:?}");
    assert_eq!(daemon.stop(), Some(0));
}

/// A migrated store on a throwaway cluster, for the store-level lease tests
/// (no broker, no daemon): the cluster (kept up while it lives), the store's
/// URL, the config and the store.
async fn lease_store(
    tag: &str,
) -> (
    tributary::cluster::Cluster,
    String,
    tributary::config::Config,
    tributary::store::Store,
) {
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let cfg = write_config(&pipeline_config(&crm, &shop, &sink, tag));
    let config = tributary::config::Config::load(&cfg).unwrap();
    let store = tributary::store::Store::connect(&config.sink)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    (pg, sink, config, store)
}

/// The fence, at the store: a write made under a lease that expired and was
/// taken over commits nothing (neither its rows nor its offsets); the new
/// owner's writes commit, and offsets never move backwards. Needs no broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_under_a_lease_taken_over_commits_nothing() {
    use tributary::cli::Role;
    use tributary::event::{ChangeEvent, Lsn, Op};
    use tributary::mapping::Mapper;
    use tributary::sink::{Sink, SinkError};
    use tributary::store::lease::Offsets;
    use tributary::store::StoreError;

    let (_pg, sink, config, store) = lease_store("fs").await;
    let writer = Sink::new(
        store.clone(),
        std::sync::Arc::new(Mapper::new(&config)),
        None,
        Role::Apply,
    );
    let contact = |id: i64, lsn: u64| {
        let key: serde_json::Map<String, Value> =
            serde_json::from_value(serde_json::json!({ "id": id })).unwrap();
        let row = serde_json::from_value(
            serde_json::json!({ "id": id, "email": format!("c{id}@x.com"), "first_name": "C",
                "last_name": null, "phone": null, "opted_in": null, "bio": null,
                "row_version": 1, "modified_at": null }),
        )
        .unwrap();
        vec![ChangeEvent {
            source: "crm".into(),
            table: "public.contacts".into(),
            op: Op::Insert,
            key,
            row,
            unchanged: Vec::new(),
            unreadable: Vec::new(),
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            seq: 0,
            xid: 1,
            commit_time: chrono::Utc::now(),
        }]
    };
    let ttl = Duration::from_millis(1000);
    let a = store
        .acquire_lease("a", "g", ttl)
        .await
        .unwrap()
        .expect("a free lease");
    assert!(
        store.acquire_lease("b", "g", ttl).await.unwrap().is_none(),
        "a held lease must not be taken"
    );
    let at = |next: i64| Offsets::from([(("topic".to_owned(), 0), next)]);
    let consumed =
        |lease: &tributary::store::lease::Lease, next: i64| tributary::store::lease::Consumed {
            lease: lease.clone(),
            offsets: at(next),
        };
    writer
        .write_consumed("crm", &contact(1, 100), consumed(&a, 5), None, None)
        .await
        .expect("the owner writes");
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let b = store
        .acquire_lease("b", "g", ttl)
        .await
        .unwrap()
        .expect("an expired lease is taken");
    assert_eq!(b.epoch, a.epoch + 1);
    let late = writer
        .write_consumed("crm", &contact(2, 200), consumed(&a, 9), None, None)
        .await;
    assert!(
        matches!(late, Err(SinkError::Store(StoreError::LeaseLost { .. }))),
        "a write under a lost lease must fail: {late:?}"
    );
    assert!(
        traits_of(&sink, "email", "c2@x.com").await.is_none(),
        "its rows were committed"
    );
    assert_eq!(store.consumer_offsets("g").await.unwrap(), at(5));
    assert!(
        !store.renew_lease(&a).await.unwrap(),
        "the old owner renewed a lease it lost"
    );
    writer
        .write_consumed("crm", &contact(3, 300), consumed(&b, 12), None, None)
        .await
        .expect("the new owner writes");
    writer
        .write_consumed("crm", &contact(4, 400), consumed(&b, 7), None, None)
        .await
        .expect("a write with older offsets");
    assert!(traits_of(&sink, "email", "c1@x.com").await.is_some());
    assert!(traits_of(&sink, "email", "c3@x.com").await.is_some());
    assert_eq!(
        scalar::<i64>(&sink, "select count(*) from tributary.dead_letters").await,
        0
    );
    assert_eq!(
        store.consumer_offsets("g").await.unwrap(),
        at(12),
        "offsets never move backwards"
    );
    store.release_lease(&b).await.unwrap();
    let c = store.acquire_lease("c", "g", ttl).await.unwrap();
    assert_eq!(
        c.map(|l| l.epoch),
        Some(b.epoch + 1),
        "a released lease is free at once"
    );
}

/// The fence's lock: a write of the owner holds the lease row from its start
/// (before it publishes anything) to its commit. The owner's renewal goes
/// through meanwhile, so a write longer than the lease never lets it expire
/// under a live owner; a standby's takeover of an expired lease waits until
/// the write committed. Needs no broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_write_of_the_owner_lets_it_renew_and_keeps_a_takeover_waiting() {
    use sqlx::{Connection, PgConnection};
    use tributary::store::lease::{hold, Consumed, Offsets};

    let (_pg, sink, _config, store) = lease_store("lw").await;
    let ttl = Duration::from_millis(1000);
    let a = store
        .acquire_lease("a", "g", ttl)
        .await
        .unwrap()
        .expect("a free lease");
    // A write of the owner, begun and not committed.
    let mut conn = PgConnection::connect(&sink).await.unwrap();
    sqlx::query("set search_path to tributary")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut write = conn.begin().await.unwrap();
    let consumed = Consumed {
        lease: a.clone(),
        offsets: Offsets::new(),
    };
    hold(&mut write, &consumed)
        .await
        .expect("the owner's lease");
    let renewed = tokio::time::timeout(Duration::from_secs(2), store.renew_lease(&a)).await;
    assert!(
        matches!(renewed, Ok(Ok(true))),
        "the owner's renewal waited for its own write: {renewed:?}"
    );
    // No more renewals: the lease expires while the write is still open.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let taking = {
        let store = store.clone();
        tokio::spawn(async move { store.acquire_lease("b", "g", ttl).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !taking.is_finished(),
        "a standby took the lease while a write of the owner was open"
    );
    write.commit().await.unwrap();
    let b = taking
        .await
        .unwrap()
        .unwrap()
        .expect("taken once the write committed");
    assert_eq!(b.epoch, a.epoch + 1);
}

/// Reconciliation of a deployment split over Kafka waits for the apply owner,
/// not only for the capture's checkpoint (which says "published", not
/// "applied"): with the owner stopped, changes the capture published are not
/// reported as drift; reconcile waits and says the owner is behind. Once the
/// owner runs again, the run is clean. `status` shows the owner and how far
/// it is behind the capture, per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_of_a_split_deployment_waits_for_the_apply_owner() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix("recon");
    let split = split_config(&crm, &shop, &sink, "rc", &broker, &prefix);
    let Split { capture, owner, .. } = start_split(&split, &sink, false).await;
    exec(
        &crm,
        "insert into contacts (id, email, first_name) select g, 'r' || g || '@x.com', 'F' from generate_series(1, 50) g",
    )
    .await;
    wait_until(
        "the owner applied the rows",
        Duration::from_secs(60),
        || async { traits_of(&sink, "email", "r50@x.com").await.is_some() },
    )
    .await;
    owner.pause();
    exec(
        &crm,
        "update contacts set first_name = 'G', row_version = row_version + 1 where id <= 10",
    )
    .await;
    // `status` shows the owner and, once the capture checkpointed the
    // updates, that the owner is behind it.
    let behind = |out: &std::process::Output| -> (Option<i64>, i64) {
        assert!(out.status.success(), "{}", text(out));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
        let apply = &doc["apply"];
        let behind = apply["partitions"].as_array().map_or(0, |ps| {
            ps.iter().map(|p| p["behind"].as_i64().unwrap_or(0)).sum()
        });
        (apply["epoch"].as_i64(), behind)
    };
    wait_until(
        "status shows the stopped owner behind the capture",
        Duration::from_secs(30),
        || async { behind(&run_cmd(&split, &["--json", "status"])).1 >= 10 },
    )
    .await;
    let out = run_cmd(&split, &["--json", "reconcile", "--wait-secs", "3"]);
    let said = text(&out);
    owner.resume();
    assert!(
        !out.status.success() && said.contains("apply owner has not applied"),
        "reconcile did not wait for the stopped apply owner: {said}"
    );
    assert_eq!(
        scalar::<i64>(&sink, "select count(*) from tributary.reconcile_drift").await,
        0,
        "changes published but not yet applied were reported as drift"
    );
    wait_until(
        "the owner applied the updates",
        Duration::from_secs(60),
        || async {
            traits_of(&sink, "email", "r1@x.com")
                .await
                .is_some_and(|t| t["first_name"] == "G")
        },
    )
    .await;
    let out = run_cmd(&split, &["--json", "reconcile", "--wait-secs", "60"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = run_cmd(&split, &["--json", "status"]);
    let (epoch, left) = behind(&status);
    assert!(
        epoch.is_some() && left == 0,
        "status after the owner caught up: {}",
        text(&status)
    );
    let human = text(&run_cmd(&split, &["status"]));
    assert!(
        human.contains("apply owner") && human.contains("0 messages published and not applied"),
        "{human}"
    );
    assert_eq!(owner.stop(), Some(0));
    assert_eq!(capture.stop(), Some(0));
}

/// Admin commands work against a running apply owner: `forget` run beside
/// it erases the person, and the owner, whose merge state in memory still
/// knew them, neither brings them back when their row changes again nor
/// loses a change of anyone else; it keeps the lease throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_beside_a_running_apply_owner_stays_forgotten() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix("ownfg");
    let split = split_config(&crm, &shop, &sink, "of", &broker, &prefix);
    let Split { capture, owner, .. } = start_split(&split, &sink, false).await;
    insert_gone_and_stays(&crm, &shop).await;
    wait_until(
        "the owner joined both rows of the person",
        Duration::from_secs(60),
        || async {
            traits_of(&sink, "shop_account", "7").await.is_some()
                && traits_of(&sink, "email", "stays@x.com").await.is_some()
        },
    )
    .await;
    let out = run_cmd(
        &split,
        &["--json", "forget", "--identity", "email=gone@x.com"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(traits_of(&sink, "email", "gone@x.com").await.is_none());
    // The forgotten person's rows change again, and so does someone else's.
    exec(
        &crm,
        "update contacts set first_name = 'Again', row_version = row_version + 1 where id = 1;
         update contacts set first_name = 'S2', row_version = row_version + 1 where id = 2",
    )
    .await;
    exec(
        &shop,
        "update accounts set email = 'gone@x.com' where id = 7",
    )
    .await;
    wait_until(
        "the owner applied the change after the forget",
        Duration::from_secs(60),
        || async {
            traits_of(&sink, "email", "stays@x.com")
                .await
                .is_some_and(|t| t["first_name"] == "S2")
        },
    )
    .await;
    assert!(
        traits_of(&sink, "email", "gone@x.com").await.is_none()
            && traits_of(&sink, "shop_account", "7").await.is_none(),
        "the owner brought a forgotten person back"
    );
    assert_eq!(
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.identities where value in ('gone@x.com', '7')"
        )
        .await,
        0,
        "identifiers of the forgotten person in the store"
    );
    assert!(
        !owner.log_text().contains("lost the apply lease"),
        "the owner lost its lease:\n{}",
        quiet(&owner)
    );
    assert_eq!(owner.stop(), Some(0));
    assert_eq!(capture.stop(), Some(0));
}

/// `[reconcile] interval_s` in a split deployment: the scheduled run happens
/// in the apply lease's owner only (not once per instance: standbys and
/// captures skip it), and moves with the lease when the owner dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_reconciliation_runs_on_the_apply_owner_only() {
    let broker = broker();
    let pg = cluster();
    let (crm, shop, sink) = two_sources(&pg).await;
    let prefix = prefix("sched");
    let split = write_config(&format!(
        "{}lease_ttl_ms = 2000\n\n[reconcile]\ninterval_s = 1\n",
        kafka_config(&crm, &shop, &sink, "sc", &broker, &prefix)
    ));
    let Split {
        capture,
        owner,
        standby,
    } = start_split(&split, &sink, true).await;
    let standby = standby.expect("started");
    exec(
        &crm,
        "insert into contacts (id, email, first_name) select g, 's' || g || '@x.com', 'F' from generate_series(1, 20) g",
    )
    .await;
    let done = |d: &Daemon| d.log_text().matches("reconciliation done").count();
    wait_until(
        "the owner ran two scheduled reconciliations",
        Duration::from_secs(90),
        || async { done(&owner) >= 2 },
    )
    .await;
    for (who, d) in [("standby", &standby), ("capture", &capture)] {
        let log = d.log_text();
        assert!(
            !log.contains("reconciliation done")
                && !log.contains("reconciliation found drift")
                && !log.contains("scheduled reconciliation failed"),
            "the {who} ran a scheduled reconciliation:\n{}",
            quiet(d)
        );
    }
    assert!(
        capture
            .log_text()
            .contains("scheduled reconciliation runs on the apply lease's owner"),
        "{}",
        quiet(&capture)
    );
    owner.kill9();
    wait_log(&standby, "took the apply lease", Duration::from_secs(30)).await;
    wait_until(
        "the new owner runs the schedule",
        Duration::from_secs(90),
        || async { done(&standby) >= 1 },
    )
    .await;
    assert_eq!(
        scalar::<i64>(
            &sink,
            "select count(*) from tributary.reconcile_runs where drift_count > 0"
        )
        .await,
        0,
        "a scheduled run found drift"
    );
    assert_eq!(standby.stop(), Some(0));
    assert_eq!(capture.stop(), Some(0));
}
