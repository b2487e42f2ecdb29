//! The pure merge core, without a database: the contract's rules one by one,
//! then property tests over random histories (any order, any duplication, the
//! same profiles; the partition of identifiers equal to the connected
//! components of the final rows; aggregates equal to a direct computation
//! over the final rows).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tributary::config::Config;
use tributary::event::{ChangeEvent, Lsn, Op};
use tributary::identity::Ident;
use tributary::mapping::Mapper;
use tributary::resolve::{components, Outcome, State};

pub const CONFIG: &str = r#"
[sink]
url = "postgres://127.0.0.1/profiles"

[[source]]
name = "crm"
url = "postgres://127.0.0.1/crm"
priority = 10
  [[source.table]]
  name = "public.contacts"
  identity = { email = "email", crm_contact = "id" }
  version = "version"
  fields = { email = "email", first_name = "first_name", phone = "phone" }

[[source]]
name = "shop"
url = "postgres://127.0.0.1/shop"
  [[source.table]]
  name = "public.accounts"
  identity = { email = "email", shop_account = "id" }
  fields = { phone = "phone", shop_signup_at = "created_at" }
  [[source.table]]
  name = "public.orders"
  identity = { shop_account = "account_id" }
  [source.table.aggregates]
  order_count = { fn = "count" }
  lifetime_value_cents = { fn = "sum", column = "total_cents", only_when = { status = ["paid", "shipped"] } }
  last_order_at = { fn = "max", column = "created_at" }

[identity.email]
normalize = "email"
"#;

pub fn mapper() -> Mapper {
    Mapper::new(&Config::parse(CONFIG, Path::new("test.toml")).unwrap())
}

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap()
}

/// Builds an event; `clock` is both the LSN and the commit time, in seconds.
/// Like pgoutput, an insert or update carries every column: missing ones are NULL.
fn ev(source: &str, table: &str, op: Op, row: Value, clock: u64) -> ChangeEvent {
    let mut row: Map<String, Value> = row.as_object().unwrap().clone();
    let columns: &[&str] = match table {
        "contacts" => &["id", "email", "first_name", "phone", "version"],
        "accounts" => &["id", "email", "phone", "created_at"],
        _ => &["id", "account_id", "status", "total_cents", "created_at"],
    };
    if op != Op::Delete {
        for c in columns {
            row.entry(c.to_string()).or_insert(Value::Null);
        }
    }
    let key: Map<String, Value> = [("id".to_owned(), row["id"].clone())].into_iter().collect();
    ChangeEvent {
        source: source.into(),
        table: format!("public.{table}"),
        op,
        key,
        row,
        unchanged: vec![],
        unreadable: Vec::new(),
        lsn: Lsn(clock * 100),
        commit_lsn: Lsn(clock * 100),
        seq: 0,
        xid: 1,
        commit_time: t(i64::try_from(clock).unwrap()),
    }
}

fn only(state: &mut State, m: &Mapper) -> Map<String, Value> {
    let c = state.canonical(m);
    assert_eq!(c.len(), 1, "expected one profile, got {c:#?}");
    c.into_values().next().unwrap()
}

#[test]
fn same_field_from_two_sources_resolves_to_the_freshest_then_priority() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "phone": "111", "version": 1}),
            1,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "A@x.com ", "phone": "222"}),
            2,
        ),
    )
    .unwrap();
    assert_eq!(only(&mut s, &m)["phone"], "222", "the shop row is fresher");

    // Equal freshness: the higher priority (crm = 10) wins.
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "a@x.com", "phone": "222"}),
            5,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "phone": "111", "version": 1}),
            5,
        ),
    )
    .unwrap();
    assert_eq!(only(&mut s, &m)["phone"], "111");
}

#[test]
fn strategy_priority_puts_the_source_priority_before_freshness() {
    let text = CONFIG.replace(
        "[identity.email]",
        "[fields.phone]\nstrategy = \"priority\"\n\n[identity.email]",
    );
    let m = Mapper::new(&Config::parse(&text, Path::new("test.toml")).unwrap());
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "phone": "111", "version": 1}),
            1,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "a@x.com", "phone": "222"}),
            2,
        ),
    )
    .unwrap();
    assert_eq!(
        only(&mut s, &m)["phone"],
        "111",
        "crm (priority 10) wins although the shop row is fresher"
    );
}

#[test]
fn a_later_row_linking_two_profiles_merges_them_into_the_smaller_id() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "first_name": "Ann", "version": 1}),
            1,
        ),
    )
    .unwrap();
    s.apply(&m, &ev("shop", "orders", Op::Insert, json!({"id": 100, "account_id": 9, "status": "paid", "total_cents": 500, "created_at": "2024-01-01T00:00:00.000000Z"}), 2)).unwrap();
    assert_eq!(s.canonical(&m).len(), 2, "no link yet");
    // The account row links email a@x.com with shop_account 9.
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "a@x.com"}),
            3,
        ),
    )
    .unwrap();
    let t = only(&mut s, &m);
    assert_eq!(t["first_name"], "Ann");
    assert_eq!(t["order_count"], 1);
    assert_eq!(t["lifetime_value_cents"], 500);
    assert_eq!(s.log.merges, vec![(2, 1)], "profile 2 merged into 1");
    assert_eq!(s.profiles[&2].merged_into, Some(1));
}

fn email(v: &str) -> Ident {
    ("email".into(), v.into())
}

fn ident(kind: &str, v: &str) -> Ident {
    (kind.into(), v.into())
}

/// The profile that owns an identifier.
fn owner(s: &State, i: &Ident) -> Option<i64> {
    s.owners.get(i).map(|p| s.live(*p))
}

#[test]
fn deleting_the_row_that_joined_two_people_splits_them_and_the_smaller_id_stays() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "first_name": "Ann", "version": 1}),
            1,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "shop",
            "orders",
            Op::Insert,
            json!({"id": 100, "account_id": 9, "status": "paid", "total_cents": 500}),
            2,
        ),
    )
    .unwrap();
    // The account joins them: profile 2 merges into 1.
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "a@x.com"}),
            3,
        ),
    )
    .unwrap();
    assert_eq!(s.canonical(&m).len(), 1);
    s.log = Default::default();
    // The account goes: the e-mail and contact on one side, the orders' account on the other.
    s.apply(&m, &ev("shop", "accounts", Op::Delete, json!({"id": 9}), 4))
        .unwrap();
    let canon = s.canonical(&m);
    assert_eq!(canon.len(), 2, "{canon:?}");
    assert_eq!(
        owner(&s, &email("a@x.com")),
        Some(1),
        "the part that came from profile 1 keeps it"
    );
    let other = owner(&s, &ident("shop_account", "9")).unwrap();
    assert!(
        other > 2,
        "the other part gets a new id, not the merged one's: {other}"
    );
    assert_eq!(s.log.splits, vec![(1, other)]);
    let ann = &canon[&vec![ident("crm_contact", "1"), email("a@x.com")]];
    assert_eq!(
        ann.get("order_count"),
        None,
        "the order left with its account: {ann:?}"
    );
    assert_eq!(ann["first_name"], "Ann");
    let orders = &canon[&vec![ident("shop_account", "9")]];
    assert_eq!(orders["order_count"], 1);
    assert_eq!(orders["lifetime_value_cents"], 500);
    assert_eq!(orders.get("first_name"), None, "{orders:?}");
}

#[test]
fn a_recycled_email_moves_to_its_new_owner_and_leaves_the_old_one() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "old@x.com", "first_name": "Ann", "version": 1}),
            1,
        ),
    )
    .unwrap();
    // Ann changes address; later the old address is given to Bob.
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Update,
            json!({"id": 1, "email": "ann@x.com", "first_name": "Ann", "version": 2}),
            2,
        ),
    )
    .unwrap();
    assert_eq!(
        owner(&s, &email("old@x.com")),
        None,
        "no current row carries it"
    );
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 2, "email": "old@x.com", "first_name": "Bob", "version": 1}),
            3,
        ),
    )
    .unwrap();
    let canon = s.canonical(&m);
    assert_eq!(canon.len(), 2, "{canon:?}");
    assert_eq!(
        canon[&vec![ident("crm_contact", "2"), email("old@x.com")]]["first_name"],
        "Bob"
    );
    assert_eq!(
        canon[&vec![ident("crm_contact", "1"), email("ann@x.com")]]["first_name"],
        "Ann"
    );
}

#[test]
fn a_typo_corrected_inside_one_transaction_never_joins_two_people() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "bob@x.com", "first_name": "Bob", "version": 1}),
            1,
        ),
    )
    .unwrap();
    // One transaction (one commit LSN): insert with Bob's address by mistake, then corrected.
    let mut typo = ev(
        "crm",
        "contacts",
        Op::Insert,
        json!({"id": 2, "email": "bob@x.com", "first_name": "Cy", "version": 1}),
        2,
    );
    let mut fixed = ev(
        "crm",
        "contacts",
        Op::Update,
        json!({"id": 2, "email": "cy@x.com", "first_name": "Cy", "version": 2}),
        2,
    );
    typo.seq = 0;
    fixed.seq = 1;
    s.apply(&m, &typo).unwrap();
    s.apply(&m, &fixed).unwrap();
    let canon = s.canonical(&m);
    assert_eq!(canon.len(), 2, "{canon:?}");
    assert_eq!(
        canon[&vec![ident("crm_contact", "1"), email("bob@x.com")]]["first_name"],
        "Bob"
    );
    assert_eq!(
        canon[&vec![ident("crm_contact", "2"), email("cy@x.com")]]["first_name"],
        "Cy"
    );
    // Delivered again, the older image links nothing.
    s.apply(&m, &typo).unwrap();
    assert_eq!(s.canonical(&m), canon, "a stale image links nothing");
}

#[test]
fn deletes_withdraw_and_orders_move_between_accounts() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com"}),
            1,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 2, "email": "b@x.com"}),
            2,
        ),
    )
    .unwrap();
    let order = |acct: i64, status: &str, total: i64, ts: &str| json!({"id": 7, "account_id": acct, "status": status, "total_cents": total, "created_at": ts});
    s.apply(
        &m,
        &ev(
            "shop",
            "orders",
            Op::Insert,
            order(1, "paid", 300, "2024-01-01T00:00:00.000000Z"),
            3,
        ),
    )
    .unwrap();
    s.apply(&m, &ev("shop", "orders", Op::Insert, json!({"id": 8, "account_id": 1, "status": "paid", "total_cents": 50, "created_at": "2023-01-01T00:00:00.000000Z"}), 4)).unwrap();
    let by_email = |s: &mut State, e: &str| {
        s.canonical(&m)
            .into_iter()
            .find(|(ids, _)| ids.iter().any(|(_, v)| v == e))
            .unwrap()
            .1
    };
    assert_eq!(by_email(&mut s, "a@x.com")["lifetime_value_cents"], 350);
    assert_eq!(
        by_email(&mut s, "a@x.com")["last_order_at"],
        "2024-01-01T00:00:00.000000Z"
    );
    // Order 7 moves to account 2 and is cancelled: a loses it, b counts it but not its value.
    s.apply(
        &m,
        &ev(
            "shop",
            "orders",
            Op::Update,
            order(2, "cancelled", 300, "2024-01-01T00:00:00.000000Z"),
            5,
        ),
    )
    .unwrap();
    let a = by_email(&mut s, "a@x.com");
    assert_eq!(
        (a["order_count"].clone(), a["lifetime_value_cents"].clone()),
        (json!(1), json!(50))
    );
    assert_eq!(
        a["last_order_at"], "2023-01-01T00:00:00.000000Z",
        "max recomputed after the extreme left"
    );
    let b = by_email(&mut s, "b@x.com");
    assert_eq!(b["order_count"], 1);
    assert!(
        b.get("lifetime_value_cents").is_none(),
        "no paid order: absent"
    );
    // Deleting order 8 leaves a with no orders at all.
    s.apply(&m, &ev("shop", "orders", Op::Delete, json!({"id": 8}), 6))
        .unwrap();
    let a = by_email(&mut s, "a@x.com");
    assert!(
        a.get("order_count").is_none() && a.get("last_order_at").is_none(),
        "{a:?}"
    );
}

#[test]
fn a_delete_lets_the_next_best_value_take_over_and_stale_changes_are_ignored() {
    let m = mapper();
    let mut s = State::new(&m);
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "phone": "111", "version": 1}),
            1,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "a@x.com", "phone": "222"}),
            2,
        ),
    )
    .unwrap();
    s.apply(&m, &ev("shop", "accounts", Op::Delete, json!({"id": 9}), 3))
        .unwrap();
    assert_eq!(only(&mut s, &m)["phone"], "111");
    // A replayed older image of the account cannot resurrect it.
    let out = s
        .apply(
            &m,
            &ev(
                "shop",
                "accounts",
                Op::Insert,
                json!({"id": 9, "email": "a@x.com", "phone": "222"}),
                2,
            ),
        )
        .unwrap();
    assert_eq!(out, Outcome::Stale);
    assert_eq!(only(&mut s, &m)["phone"], "111");
    // A lower version never moves a field backwards, even with a later LSN.
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Update,
            json!({"id": 1, "email": "a@x.com", "phone": "333", "version": 5}),
            4,
        ),
    )
    .unwrap();
    let out = s
        .apply(
            &m,
            &ev(
                "crm",
                "contacts",
                Op::Update,
                json!({"id": 1, "email": "a@x.com", "phone": "000", "version": 4}),
                9,
            ),
        )
        .unwrap();
    assert_eq!(out, Outcome::Stale);
    assert_eq!(only(&mut s, &m)["phone"], "333");
}

#[test]
fn a_row_without_any_identifier_is_a_mapping_error() {
    let m = mapper();
    let mut s = State::new(&m);
    let e = s.apply(&m, &ev("shop", "orders", Op::Insert, json!({"id": 1, "account_id": null, "status": "paid", "total_cents": 1, "created_at": null}), 1));
    assert!(e.unwrap_err().to_string().contains("no identifier"));
    let e = s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 2, "email": "nope", "version": 1}),
            2,
        ),
    );
    assert!(e.unwrap_err().to_string().contains("nope"));
}

// ---------------------------------------------------------------- properties

/// One step of a random history.
#[derive(Debug, Clone)]
pub enum Step {
    Contact {
        id: u8,
        email: Option<u8>,
        name: u8,
        phone: Option<u8>,
    },
    Account {
        id: u8,
        email: Option<u8>,
        phone: Option<u8>,
    },
    Order {
        id: u8,
        account: u8,
        status: u8,
        total: u16,
        day: u8,
    },
    Delete {
        table: u8,
        id: u8,
    },
}

pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            0u8..6,
            proptest::option::weighted(0.8, 0u8..5),
            0u8..4,
            proptest::option::of(0u8..4)
        )
            .prop_map(|(id, email, name, phone)| Step::Contact {
                id,
                email,
                name,
                phone
            }),
        (
            0u8..5,
            proptest::option::weighted(0.8, 0u8..5),
            proptest::option::of(0u8..4)
        )
            .prop_map(|(id, email, phone)| Step::Account { id, email, phone }),
        (0u8..10, 0u8..5, 0u8..3, 0u16..1000, 0u8..30).prop_map(
            |(id, account, status, total, day)| Step::Order {
                id,
                account,
                status,
                total,
                day
            }
        ),
        (0u8..3, 0u8..10).prop_map(|(table, id)| Step::Delete { table, id }),
    ]
}

/// The source tables after a history, and the events it produced in commit order.
#[derive(Default, Debug)]
pub struct History {
    pub tables: BTreeMap<&'static str, BTreeMap<u8, Value>>,
    pub events: Vec<ChangeEvent>,
}

pub fn simulate(steps: &[Step]) -> History {
    let mut h = History::default();
    let mut versions: BTreeMap<u8, i64> = BTreeMap::new();
    for (i, st) in steps.iter().enumerate() {
        let clock = u64::try_from(i).unwrap() + 1;
        let (source, table, id, row) = match st {
            Step::Contact {
                id,
                email,
                name,
                phone,
            } => {
                let v = versions.entry(*id).or_insert(0);
                *v += 1; // never decreases for a key, even across delete and re-insert
                (
                    "crm",
                    "contacts",
                    *id,
                    json!({"id": id, "email": email.map(|e| format!("P{e}@x.com")), "first_name": format!("N{name}"), "phone": phone.map(|p| format!("{p}")), "version": *v}),
                )
            }
            Step::Account { id, email, phone } => (
                "shop",
                "accounts",
                *id,
                json!({"id": id, "email": email.map(|e| format!("p{e}@X.com")), "phone": phone.map(|p| format!("{p}")), "created_at": null}),
            ),
            Step::Order {
                id,
                account,
                status,
                total,
                day,
            } => {
                let status = ["paid", "shipped", "cancelled"][usize::from(*status)];
                (
                    "shop",
                    "orders",
                    *id,
                    json!({"id": id, "account_id": account, "status": status, "total_cents": total, "created_at": format!("2024-01-{:02}T00:00:00.000000Z", day + 1)}),
                )
            }
            Step::Delete { table, id } => {
                let (source, name) = [
                    ("crm", "contacts"),
                    ("shop", "accounts"),
                    ("shop", "orders"),
                ][usize::from(*table)];
                if h.tables.entry(name).or_default().remove(id).is_some() {
                    h.events
                        .push(ev(source, name, Op::Delete, json!({"id": id}), clock));
                }
                continue;
            }
        };
        // A contact or account without an email still has its own id as identity.
        let existed = h
            .tables
            .entry(table)
            .or_default()
            .insert(id, row.clone())
            .is_some();
        h.events.push(ev(
            source,
            table,
            if existed { Op::Update } else { Op::Insert },
            row,
            clock,
        ));
    }
    h
}

fn apply_all(m: &Mapper, events: &[ChangeEvent]) -> State {
    let mut s = State::new(m);
    for e in events {
        s.apply(m, e).unwrap();
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_order_and_any_duplication_give_the_same_profiles(
        steps in proptest::collection::vec(step(), 1..60),
        seed in any::<u64>(),
    ) {
        let m = mapper();
        let h = simulate(&steps);
        let expected = apply_all(&m, &h.events).canonical(&m);

        // Shuffled, with every event delivered once or twice.
        let mut rng = seed;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut shuffled: Vec<ChangeEvent> = h.events.iter().flat_map(|e| {
            if next() % 3 == 0 { vec![e.clone(), e.clone()] } else { vec![e.clone()] }
        }).collect();
        for i in (1..shuffled.len()).rev() {
            let j = usize::try_from(next() % (u64::try_from(i).unwrap() + 1)).unwrap();
            shuffled.swap(i, j);
        }
        let got = apply_all(&m, &shuffled).canonical(&m);
        prop_assert_eq!(&got, &expected);

        // Replaying the whole log on top changes nothing.
        let mut again = apply_all(&m, &h.events);
        for e in &h.events { again.apply(&m, e).unwrap(); }
        prop_assert_eq!(again.canonical(&m), expected);
    }

    /// The contract's partition: the profiles' identifier sets are the
    /// connected components of the links the final rows make (computed here
    /// with a union-find of the test's own over the final tables), whatever
    /// the order and duplication of delivery, with identifier changes,
    /// removals, deletes and re-inserts in the history.
    #[test]
    fn the_partition_equals_the_connected_components_of_the_final_rows(
        steps in proptest::collection::vec(step(), 1..80),
        seed in any::<u64>(),
    ) {
        let m = mapper();
        let h = simulate(&steps);
        let mut finals: Vec<Vec<Ident>> = Vec::new();
        for (table, rows) in &h.tables {
            let source = if *table == "contacts" { "crm" } else { "shop" };
            let mapping = m.table(source, &format!("public.{table}")).unwrap();
            for row in rows.values() {
                let e = ev(source, &format!("public.{table}"), Op::Insert, row.clone(), 1);
                if let Ok(ids) = mapping.identities(&e, None) {
                    finals.push(ids);
                }
            }
        }
        let expected = union_find(&finals);
        prop_assert_eq!(&expected, &components(finals.iter().map(Vec::as_slice)));

        let mut rng = seed;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut shuffled: Vec<ChangeEvent> = h.events.iter().flat_map(|e| {
            if next() % 3 == 0 { vec![e.clone(), e.clone()] } else { vec![e.clone()] }
        }).collect();
        for i in (1..shuffled.len()).rev() {
            let j = usize::try_from(next() % (u64::try_from(i).unwrap() + 1)).unwrap();
            shuffled.swap(i, j);
        }
        prop_assert_eq!(&apply_all(&m, &h.events).partition(), &expected, "in order");
        prop_assert_eq!(&apply_all(&m, &shuffled).partition(), &expected, "shuffled and duplicated");
    }

    #[test]
    fn aggregates_equal_a_direct_computation_over_the_final_rows(steps in proptest::collection::vec(step(), 1..80)) {
        let m = mapper();
        let h = simulate(&steps);
        let mut s = apply_all(&m, &h.events);
        let canon = s.canonical(&m);
        for (idents, traits) in &canon {
            let accounts: Vec<String> = idents.iter().filter(|(k, _)| k == "shop_account").map(|(_, v)| v.clone()).collect();
            let orders: Vec<&Value> = h.tables.get("orders").map(|t| t.values().filter(|o| accounts.contains(&o["account_id"].to_string())).collect()).unwrap_or_default();
            let count = orders.len();
            let paid: Vec<&&Value> = orders.iter().filter(|o| o["status"] == "paid" || o["status"] == "shipped").collect();
            let value: i64 = paid.iter().map(|o| o["total_cents"].as_i64().unwrap()).sum();
            let last = orders.iter().map(|o| o["created_at"].as_str().unwrap().to_owned()).max();
            prop_assert_eq!(traits.get("order_count").cloned(), (count > 0).then(|| json!(count)), "{:?}", idents);
            prop_assert_eq!(traits.get("lifetime_value_cents").cloned(), (!paid.is_empty()).then(|| json!(value)), "{:?}", idents);
            prop_assert_eq!(traits.get("last_order_at").cloned(), last.map(Value::from), "{:?}", idents);
        }
    }
}

#[test]
fn a_row_that_would_exceed_the_merge_limit_is_refused_and_changes_nothing() {
    let text = CONFIG.replace(
        "[identity.email]",
        "[merge]\nmax_identities = 3\n\n[identity.email]",
    );
    let m = Mapper::new(&Config::parse(&text, Path::new("test.toml")).unwrap());
    let mut s = State::new(&m);
    // email + crm_contact 1, then shop_account 9 links in: 3 identifiers, allowed.
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 1, "email": "a@x.com", "version": 1}),
            1,
        ),
    )
    .unwrap();
    s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "a@x.com", "phone": "1"}),
            2,
        ),
    )
    .unwrap();
    let before = s.canonical(&m);
    // Another account with the same email would make 4.
    let err = s
        .apply(
            &m,
            &ev(
                "shop",
                "accounts",
                Op::Insert,
                json!({"id": 10, "email": "a@x.com"}),
                3,
            ),
        )
        .unwrap_err();
    assert!(err.to_string().contains("max_identities = 3"), "{err}");
    assert_eq!(s.canonical(&m), before, "a refused row changes nothing");
    // Rows within the limit still apply (an order of account 9 adds no identifier).
    s.apply(
        &m,
        &ev(
            "shop",
            "orders",
            Op::Insert,
            json!({"id": 5, "account_id": 9, "status": "paid", "total_cents": 7}),
            4,
        ),
    )
    .unwrap();
    assert_eq!(only(&mut s, &m)["order_count"], 1);
    // A merge of two profiles that would exceed it is refused too.
    s.apply(
        &m,
        &ev(
            "crm",
            "contacts",
            Op::Insert,
            json!({"id": 2, "email": "b@x.com", "version": 1}),
            5,
        ),
    )
    .unwrap();
    let err = s.apply(
        &m,
        &ev(
            "shop",
            "accounts",
            Op::Insert,
            json!({"id": 9, "email": "b@x.com"}),
            6,
        ),
    );
    assert!(err.is_err(), "merging 3 + 2 identifiers exceeds 3");
}

/// Connected components by a plain quadratic merge of sets: the test's own
/// computation, independent of the crate's.
fn union_find(rows: &[Vec<Ident>]) -> BTreeSet<BTreeSet<Ident>> {
    let mut sets: Vec<BTreeSet<Ident>> = Vec::new();
    for row in rows {
        let mut joined: BTreeSet<Ident> = row.iter().cloned().collect();
        sets.retain(|s| {
            if s.iter().any(|i| joined.contains(i)) {
                joined.extend(s.iter().cloned());
                false
            } else {
                true
            }
        });
        if !joined.is_empty() {
            sets.push(joined);
        }
    }
    sets.into_iter().collect()
}
