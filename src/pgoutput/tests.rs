//! Byte-level fixtures for the decoder, and a property test that random and
//! truncated input yields errors, never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use serde_json::json;

use super::*;

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn relation_msg() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(16384);
    cstr(&mut b, "public");
    cstr(&mut b, "contacts");
    b.put_u8(b'd');
    b.put_i16(3);
    for (flags, name, oid) in [(1u8, "id", 20u32), (0, "email", 25), (0, "bio", 25)] {
        b.put_u8(flags);
        cstr(&mut b, name);
        b.put_u32(oid);
        b.put_i32(-1);
    }
    b.freeze()
}

fn begin_msg() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(0x0100_0000_0000_0100);
    b.put_i64(0); // 2000-01-01
    b.put_u32(777);
    b.freeze()
}

fn tuple(b: &mut BytesMut, vals: &[Option<&str>], unchanged_at: Option<usize>) {
    b.put_i16(i16::try_from(vals.len()).unwrap());
    for (i, v) in vals.iter().enumerate() {
        if Some(i) == unchanged_at {
            b.put_u8(b'u');
            continue;
        }
        match v {
            None => b.put_u8(b'n'),
            Some(s) => {
                b.put_u8(b't');
                b.put_i32(i32::try_from(s.len()).unwrap());
                b.put_slice(s.as_bytes());
            }
        }
    }
}

fn decoder_in_txn() -> Decoder {
    let mut d = Decoder::new("crm");
    d.decode(Lsn(1), relation_msg()).unwrap();
    d.decode(Lsn(2), begin_msg()).unwrap();
    d
}

#[test]
fn insert_becomes_a_typed_change_event() {
    let mut d = decoder_in_txn();
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16384);
    b.put_u8(b'N');
    tuple(&mut b, &[Some("7"), Some("a@x.com"), None], None);
    let out = d.decode(Lsn(3), b.freeze()).unwrap();
    let [Decoded::Change(ev)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(ev.table, "public.contacts");
    assert_eq!(ev.op, Op::Insert);
    assert_eq!(Value::Object(ev.key.clone()), json!({"id": 7}));
    assert_eq!(
        Value::Object(ev.row.clone()),
        json!({"id": 7, "email": "a@x.com", "bio": null})
    );
    assert_eq!(
        (ev.xid, ev.seq, ev.lsn, ev.commit_lsn),
        (777, 0, Lsn(3), Lsn(0x0100_0000_0000_0100))
    );
    assert_eq!(ev.commit_time.to_rfc3339(), "2000-01-01T00:00:00+00:00");
}

#[test]
fn unchanged_toast_is_listed_not_nulled() {
    let mut d = decoder_in_txn();
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(16384);
    b.put_u8(b'N');
    tuple(&mut b, &[Some("7"), Some("b@x.com"), None], Some(2));
    let out = d.decode(Lsn(4), b.freeze()).unwrap();
    let [Decoded::Change(ev)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(ev.op, Op::Update);
    assert_eq!(ev.unchanged, vec!["bio".to_owned()]);
    assert!(
        !ev.row.contains_key("bio"),
        "an unchanged TOAST value must not appear as NULL"
    );
}

#[test]
fn key_change_is_a_delete_and_an_insert() {
    let mut d = decoder_in_txn();
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(16384);
    b.put_u8(b'K');
    tuple(&mut b, &[Some("7"), None, None], None);
    b.put_u8(b'N');
    tuple(&mut b, &[Some("8"), Some("a@x.com"), Some("hi")], None);
    let out = d.decode(Lsn(5), b.freeze()).unwrap();
    let ops: Vec<(Op, Value)> = out
        .iter()
        .map(|x| match x {
            Decoded::Change(e) => (e.op, Value::Object(e.key.clone())),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            (Op::Delete, json!({"id": 7})),
            (Op::Insert, json!({"id": 8}))
        ]
    );
}

#[test]
fn delete_truncate_commit_and_message() {
    let mut d = decoder_in_txn();
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    b.put_u32(16384);
    b.put_u8(b'K');
    tuple(&mut b, &[Some("7"), None, None], None);
    let out = d.decode(Lsn(6), b.freeze()).unwrap();
    assert!(
        matches!(&out[..], [Decoded::Change(e)] if e.op == Op::Delete && e.key == *json!({"id": 7}).as_object().unwrap())
    );

    let mut b = BytesMut::new();
    b.put_u8(b'T');
    b.put_u32(1);
    b.put_u8(0);
    b.put_u32(16384);
    let out = d.decode(Lsn(7), b.freeze()).unwrap();
    assert!(matches!(&out[..], [Decoded::Change(e)] if e.op == Op::Truncate && e.seq == 1));

    let mut b = BytesMut::new();
    b.put_u8(b'M');
    b.put_u8(1);
    b.put_u64(9);
    cstr(&mut b, "tributary");
    b.put_u32(2);
    b.put_slice(b"hb");
    assert_eq!(
        d.decode(Lsn(8), b.freeze()).unwrap(),
        vec![Decoded::Message {
            prefix: "tributary".into(),
            content: Bytes::from_static(b"hb")
        }]
    );

    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(0x100);
    b.put_u64(0x180);
    b.put_i64(0);
    assert_eq!(
        d.decode(Lsn(9), b.freeze()).unwrap(),
        vec![Decoded::Commit {
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x180)
        }]
    );
}

#[test]
fn unknown_relation_and_wrong_width_are_errors() {
    let mut d = Decoder::new("crm");
    d.decode(Lsn(2), begin_msg()).unwrap();
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(99);
    b.put_u8(b'N');
    tuple(&mut b, &[Some("1")], None);
    assert_eq!(
        d.decode(Lsn(3), b.freeze()).unwrap_err(),
        DecodeError::UnknownRelation(99)
    );

    d.decode(Lsn(1), relation_msg()).unwrap();
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16384);
    b.put_u8(b'N');
    tuple(&mut b, &[Some("1")], None);
    assert!(matches!(
        d.decode(Lsn(3), b.freeze()).unwrap_err(),
        DecodeError::Width {
            got: 1,
            want: 3,
            ..
        }
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut d = decoder_in_txn();
        let _ = d.decode(Lsn(1), Bytes::from(data));
    }

    #[test]
    fn truncated_valid_messages_are_errors(cut in 0usize..40, which in 0usize..3) {
        let mut full = BytesMut::new();
        match which {
            0 => full.put_slice(&relation_msg()),
            1 => full.put_slice(&begin_msg()),
            _ => {
                full.put_u8(b'I');
                full.put_u32(16384);
                full.put_u8(b'N');
                tuple(&mut full, &[Some("7"), Some("a@x.com"), Some("bio")], None);
            }
        }
        let full = full.freeze();
        prop_assume!(cut < full.len());
        let mut d = decoder_in_txn();
        prop_assert!(d.decode(Lsn(1), full.slice(..cut)).is_err());
    }
}

#[test]
fn protocol_v2_stream_messages_carry_the_xid_inside_a_block() {
    let mut d = Decoder::new("crm");
    let mut b = BytesMut::new();
    b.put_u8(b'S');
    b.put_u32(900);
    b.put_u8(1);
    assert_eq!(
        d.decode(Lsn(1), b.freeze()).unwrap(),
        vec![Decoded::StreamStart { xid: 900 }]
    );
    // Inside the block, Relation and Insert carry the (sub)transaction id first.
    let rel = relation_msg();
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(900);
    b.put_slice(&rel[1..]);
    d.decode(Lsn(2), b.freeze()).unwrap();
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(901);
    b.put_u32(16384);
    b.put_u8(b'N');
    tuple(&mut b, &[Some("7"), Some("a@x.com"), None], None);
    let out = d.decode(Lsn(3), b.freeze()).unwrap();
    let [Decoded::Change(ev)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(
        (ev.xid, ev.commit_lsn),
        (901, Lsn::ZERO),
        "a streamed change belongs to its subtransaction"
    );
    let mut b = BytesMut::new();
    b.put_u8(b'E');
    assert_eq!(
        d.decode(Lsn(4), b.freeze()).unwrap(),
        vec![Decoded::StreamStop]
    );
    let mut b = BytesMut::new();
    b.put_u8(b'A');
    b.put_u32(900);
    b.put_u32(901);
    assert_eq!(
        d.decode(Lsn(5), b.freeze()).unwrap(),
        vec![Decoded::StreamAbort {
            xid: 900,
            subxid: 901
        }]
    );
    let mut b = BytesMut::new();
    b.put_u8(b'c');
    b.put_u32(900);
    b.put_u8(0);
    b.put_u64(0x200);
    b.put_u64(0x280);
    b.put_i64(0);
    let out = d.decode(Lsn(6), b.freeze()).unwrap();
    assert!(
        matches!(
            &out[..],
            [Decoded::StreamCommit {
                xid: 900,
                commit_lsn: Lsn(0x200),
                end_lsn: Lsn(0x280),
                ..
            }]
        ),
        "{out:?}"
    );
}
