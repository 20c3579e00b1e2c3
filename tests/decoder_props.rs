//! Property tests of the relay's pure parts, on arbitrary and corrupted input.
//!
//! Responsible for: the pgoutput decoder and the replication frame parsers
//! never panicking on any bytes (random, or real PostgreSQL 15 messages from
//! `tests/fixtures/pgoutput/*.hex` with flipped bytes, cuts, insertions and
//! hostile length fields), frames split at any read boundary reassembling
//! exactly, `Lsn` printing and ordering, and the ack tracker confirming only
//! positions whose records were all delivered (checked against a reference
//! model). Not responsible for anything needing a server: see
//! `tests/integration/`.
//!
//! Bounded for CI (a few seconds in a debug build). For a longer run set
//! `PROPTEST_CASES`, which replaces every per-property case count below:
//! `PROPTEST_CASES=200000 cargo test --release --test decoder_props`.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use proptest::prelude::*;
use proptest::sample::Index;
use tokio::io::{AsyncRead, ReadBuf};

use outbox_relay::ack::{AckTracker, Seq};
use outbox_relay::lsn::Lsn;
use outbox_relay::pgoutput::{decode, DecodeError};
use outbox_relay::replication::{
    parse_copy_data, split_frame, CopyData, FrameReader, ReplicationError,
};

/// The case count for one property: `PROPTEST_CASES` when set, else `default`.
///
/// proptest reads `PROPTEST_CASES` only into `ProptestConfig::default()`, and
/// an explicit `cases` overrides it, so the variable is honoured here.
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Fixtures and mutations
// ---------------------------------------------------------------------------

/// Every message of every `tests/fixtures/pgoutput/*.hex` file, as
/// (`file:line`, bytes).
fn fixtures() -> &'static [(String, Bytes)] {
    static FIXTURES: OnceLock<Vec<(String, Bytes)>> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgoutput");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "hex"))
            .collect();
        files.sort();
        let mut out = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                assert!(
                    line.len() % 2 == 0,
                    "{name}:{}: odd number of hex digits",
                    i + 1
                );
                let bytes: Vec<u8> = (0..line.len())
                    .step_by(2)
                    .map(|j| u8::from_str_radix(&line[j..j + 2], 16).unwrap())
                    .collect();
                out.push((format!("{name}:{}", i + 1), Bytes::from(bytes)));
            }
        }
        assert!(
            out.len() >= 20,
            "expected the captured fixtures in {}, found {} messages",
            dir.display(),
            out.len()
        );
        out
    })
}

fn fixture(i: &Index) -> &'static (String, Bytes) {
    i.get(fixtures())
}

/// Values written over a length or count field: the extremes, off-by-ones
/// around the bytes actually left, and anything else.
#[derive(Debug, Clone)]
enum FieldValue {
    Abs(i32),
    /// The number of bytes after the field, plus this.
    Remaining(i8),
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0,
            -1,
            i32::MIN,
            i32::MAX,
            0x7fff_ffff,
            1,
            3,
            4,
            5,
            0xffff,
            0x1_0000,
            0x4000_0000,
            0x4000_0001,
        ])
        .prop_map(FieldValue::Abs),
        2 => any::<i8>().prop_map(FieldValue::Remaining),
        1 => any::<i32>().prop_map(FieldValue::Abs),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip(Index, u8),
    /// Keep only a prefix.
    Truncate(Index),
    /// Insert bytes at a position (possibly the end).
    Insert(Index, Vec<u8>),
    /// Remove up to this many bytes at a position.
    Remove(Index, u8),
    /// Overwrite a big-endian 4-byte field at any position.
    Field32(Index, FieldValue),
    /// Overwrite a big-endian 2-byte count at any position.
    Field16(Index, u16),
    /// Overwrite the 4-byte length after a tuple column kind (`t` or `b`).
    ValueLength(Index, FieldValue),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<Index>(), 1..=16u8).prop_map(|(i, n)| Mutation::Remove(i, n)),
        2 => (any::<Index>(), field_value()).prop_map(|(i, v)| Mutation::Field32(i, v)),
        1 => (any::<Index>(), prop::sample::select(vec![0u16, 1, 2, 0x7fff, 0x8000, 0xffff]))
            .prop_map(|(i, v)| Mutation::Field16(i, v)),
        2 => (any::<Index>(), field_value()).prop_map(|(i, v)| Mutation::ValueLength(i, v)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

fn put_i32_at(buf: &mut [u8], pos: usize, v: &FieldValue) {
    let v = match *v {
        FieldValue::Abs(v) => v,
        FieldValue::Remaining(d) => {
            let rest = (buf.len() - pos - 4) as i64;
            (rest + i64::from(d)).clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
        }
    };
    buf[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
}

fn apply(buf: &mut Vec<u8>, m: &Mutation) {
    let len = buf.len();
    match m {
        Mutation::Insert(i, bytes) => {
            let at = i.index(len + 1);
            buf.splice(at..at, bytes.iter().copied());
        }
        _ if len == 0 => {}
        Mutation::Flip(i, mask) => buf[i.index(len)] ^= mask,
        Mutation::Truncate(i) => buf.truncate(i.index(len)),
        Mutation::Remove(i, n) => {
            let at = i.index(len);
            buf.drain(at..(at + usize::from(*n)).min(len));
        }
        Mutation::Field32(i, v) if len >= 4 => put_i32_at(buf, i.index(len - 3), v),
        Mutation::Field16(i, v) if len >= 2 => {
            let at = i.index(len - 1);
            buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
        Mutation::ValueLength(i, v) => {
            let kinds: Vec<usize> = (0..len.saturating_sub(4))
                .filter(|&p| matches!(buf[p], b't' | b'b'))
                .collect();
            if !kinds.is_empty() {
                put_i32_at(buf, i.get(&kinds) + 1, v);
            }
        }
        Mutation::Field32(..) | Mutation::Field16(..) => {}
    }
}

fn mutate(original: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut buf = original.to_vec();
    for m in ms {
        apply(&mut buf, m);
    }
    buf
}

/// Decodes `bytes` (which must not panic) and checks what holds of every
/// successful decode: it is deterministic and consumes exactly the input.
fn check_decode(bytes: &[u8]) -> Result<(), TestCaseError> {
    let first = decode(Bytes::copy_from_slice(bytes));
    let again = decode(Bytes::copy_from_slice(bytes));
    prop_assert_eq!(&first, &again, "decode is not deterministic");
    if first.is_ok() {
        let mut longer = bytes.to_vec();
        longer.push(0);
        prop_assert!(
            matches!(
                decode(Bytes::from(longer)),
                Err(DecodeError::Trailing { extra: 1, .. })
            ),
            "a decodable message followed by one byte must be a trailing-bytes error"
        );
    }
    Ok(())
}

/// The pgoutput message tags, so random bodies get past the first byte.
fn tag() -> impl Strategy<Value = u8> {
    prop::sample::select(b"BCORYIUDTM".to_vec())
}

// ---------------------------------------------------------------------------
// pgoutput decoder
// ---------------------------------------------------------------------------

#[test]
fn every_fixture_message_decodes() {
    for (name, msg) in fixtures() {
        let first = decode(msg.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            decode(msg.clone()).unwrap(),
            first,
            "{name}: not deterministic"
        );
    }
}

/// Every 4-byte window of every real message overwritten with each extreme
/// length, and every 2-byte window with each extreme count: exhaustive, so a
/// length field the random properties happen to miss is still covered.
#[test]
fn every_field_of_every_fixture_overwritten_with_extremes() {
    let values32 = [0, -1, i32::MIN, i32::MAX, 1, 4, 0xffff, 0x4000_0000];
    let values16 = [0u16, 1, 0x8000, 0xffff];
    for (name, msg) in fixtures() {
        let mut buf = msg.to_vec();
        for pos in 0..buf.len().saturating_sub(3) {
            let saved = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
            for v in values32 {
                buf[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
                let r = std::panic::catch_unwind(|| decode(Bytes::copy_from_slice(&buf)));
                assert!(r.is_ok(), "{name}: decode panicked with {v} at byte {pos}");
            }
            buf[pos..pos + 4].copy_from_slice(&saved);
            for v in values16 {
                buf[pos..pos + 2].copy_from_slice(&v.to_be_bytes());
                let r = std::panic::catch_unwind(|| decode(Bytes::copy_from_slice(&buf)));
                assert!(
                    r.is_ok(),
                    "{name}: decode panicked with count {v} at byte {pos}"
                );
            }
            buf[pos..pos + 4].copy_from_slice(&saved);
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        check_decode(&bytes)?;
    }

    #[test]
    fn decode_never_panics_on_a_known_tag_and_arbitrary_body(
        tag in tag(),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&body);
        check_decode(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn decode_never_panics_on_mutated_fixtures(which in any::<Index>(), ms in mutations()) {
        let (_, msg) = fixture(&which);
        check_decode(&mutate(msg, &ms))?;
    }
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn a_fixture_message_is_consumed_exactly(
        which in any::<Index>(),
        suffix in prop::collection::vec(any::<u8>(), 1..64),
        cut in any::<Index>(),
    ) {
        let (name, msg) = fixture(&which);
        let mut longer = msg.to_vec();
        longer.extend_from_slice(&suffix);
        prop_assert_eq!(
            decode(Bytes::from(longer)),
            Err(DecodeError::Trailing {
                message: message_name(msg[0]),
                extra: suffix.len()
            }),
            "{}", name
        );
        let prefix = msg.slice(..cut.index(msg.len()));
        prop_assert!(decode(prefix).is_err(), "{}: a strict prefix decoded", name);
    }
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        other => panic!("not a fixture tag: {other}"),
    }
}

// ---------------------------------------------------------------------------
// CopyData payloads
// ---------------------------------------------------------------------------

/// What `parse_copy_data` must answer for `body`, straight from the protocol
/// documentation: XLogData is `w`, two LSNs and a timestamp before the data;
/// a keepalive is `k`, an LSN, a timestamp and the reply flag.
fn check_copy_data(body: &[u8]) -> Result<(), TestCaseError> {
    let be64 = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().unwrap());
    let got = parse_copy_data(Bytes::copy_from_slice(body));
    match body.first() {
        Some(b'w') if body.len() >= 25 => {
            prop_assert_eq!(
                got.unwrap(),
                CopyData::XLogData {
                    start: Lsn(be64(1)),
                    wal_end: Lsn(be64(9)),
                    data: Bytes::copy_from_slice(&body[25..]),
                }
            );
            // What the relay does next with the data must not panic either.
            let _ = decode(Bytes::copy_from_slice(&body[25..]));
        }
        Some(b'k') if body.len() >= 18 => {
            prop_assert_eq!(
                got.unwrap(),
                CopyData::Keepalive {
                    wal_end: Lsn(be64(1)),
                    reply: body[17] == 1,
                }
            );
        }
        _ => prop_assert!(got.is_err(), "{:?} parsed from {:?}", got, body),
    }
    Ok(())
}

fn xlogdata(start: u64, wal_end: u64, time: i64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(25 + data.len());
    b.put_u8(b'w');
    b.put_u64(start);
    b.put_u64(wal_end);
    b.put_i64(time);
    b.put_slice(data);
    b
}

fn keepalive(wal_end: u64, time: i64, reply: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(18);
    b.put_u8(b'k');
    b.put_u64(wal_end);
    b.put_i64(time);
    b.put_u8(reply);
    b
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn copy_data_never_panics_on_arbitrary_bytes(
        kind in prop::sample::select(vec![None, Some(b'w'), Some(b'k')]),
        rest in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut body: Vec<u8> = kind.into_iter().collect();
        body.extend_from_slice(&rest);
        check_copy_data(&body)?;
    }
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn copy_data_never_panics_on_mutated_payloads(
        start in any::<u64>(),
        wal_end in any::<u64>(),
        time in any::<i64>(),
        reply in any::<u8>(),
        which in any::<Index>(),
        is_keepalive in any::<bool>(),
        ms in mutations(),
    ) {
        let valid = if is_keepalive {
            keepalive(wal_end, time, reply)
        } else {
            xlogdata(start, wal_end, time, &fixture(&which).1)
        };
        check_copy_data(&valid)?;
        check_copy_data(&mutate(&valid, &ms))?;
    }
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(5 + body.len());
    b.put_u8(tag);
    b.put_i32(4 + body.len() as i32);
    b.put_slice(body);
    b
}

/// Splits every frame `split_frame` finds off `input`, checking that each is
/// exactly the bytes its header announced and never longer than the buffer.
fn split_all(input: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(input);
    let mut offset = 0;
    loop {
        let before = buf.clone();
        match split_frame(&mut buf) {
            Ok(Some((tag, body))) => {
                prop_assert!(
                    body.len() + 5 <= before.len(),
                    "frame longer than the buffer"
                );
                prop_assert_eq!(tag, before[0]);
                let len = i32::from_be_bytes(before[1..5].try_into().unwrap());
                prop_assert_eq!(len as usize, body.len() + 4);
                prop_assert_eq!(&body[..], &before[5..5 + body.len()]);
                prop_assert_eq!(&buf[..], &before[5 + body.len()..]);
                offset += 5 + body.len();
            }
            Ok(None) => {
                prop_assert_eq!(
                    &buf[..],
                    &before[..],
                    "an incomplete frame must stay buffered"
                );
                break;
            }
            Err(_) => {
                prop_assert_eq!(
                    &buf[..],
                    &before[..],
                    "a rejected frame must not consume bytes"
                );
                break;
            }
        }
    }
    prop_assert_eq!(&input[offset..], &buf[..]);
    Ok(())
}

/// A socket that hands out `data` in the given chunk sizes and is not ready
/// before every other chunk, then reports end of stream.
struct ChunkedReader {
    data: Bytes,
    chunks: VecDeque<usize>,
    stall: bool,
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Polled through `now_or_never`, which re-polls: no waker needed.
        self.stall = !self.stall;
        if self.stall {
            return Poll::Pending;
        }
        let want = self.chunks.pop_front().unwrap_or(usize::MAX);
        let n = want.min(out.remaining()).min(self.data.len());
        if n < want && n < self.data.len() {
            self.chunks.push_front(want - n);
        }
        let chunk = self.data.split_to(n);
        out.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

fn frames() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    let body = prop_oneof![
        20 => prop::collection::vec(any::<u8>(), 0..300),
        // Larger than the reader's initial 64 KiB buffer; the content of these
        // matters less than their size, so it is cheap to generate.
        1 => (60_000..140_000usize, any::<u8>()).prop_map(|(n, seed)| {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        }),
    ];
    prop::collection::vec((any::<u8>(), body), 0..12)
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![3 => 1..16usize, 1 => 1..100_000usize], 0..64)
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn split_frame_never_panics_on_arbitrary_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        split_all(&bytes)?;
    }
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn split_frame_never_panics_on_mutated_frames(
        tags in prop::collection::vec(any::<u8>(), 1..6),
        which in any::<Index>(),
        ms in mutations(),
    ) {
        let mut wire = Vec::new();
        for tag in tags {
            wire.extend(frame(tag, &xlogdata(1, 2, 3, &fixture(&which).1)));
        }
        split_all(&mutate(&wire, &ms))?;
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Frames written back to back and delivered in arbitrary pieces come out
    /// of `split_frame` whole and in order, whatever the read boundaries.
    #[test]
    fn frames_split_at_any_read_boundary_reassemble_exactly(
        sent in frames(),
        chunks in chunk_sizes(),
    ) {
        let wire: Vec<u8> = sent.iter().flat_map(|(t, b)| frame(*t, b)).collect();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut chunks = chunks.into_iter();
        while !rest.is_empty() {
            let n = chunks.next().unwrap_or(rest.len()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some((tag, body)) = split_frame(&mut buf).unwrap() {
                got.push((tag, body.to_vec()));
            }
        }
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
        prop_assert_eq!(got, sent);
    }

    /// The same through `FrameReader` on a socket that returns short reads and
    /// is not ready half the time, with `next` cancelled at every such point.
    #[test]
    fn frame_reader_reassembles_exactly_when_cancelled_between_reads(
        sent in frames(),
        chunks in chunk_sizes(),
    ) {
        let wire: Vec<u8> = sent.iter().flat_map(|(t, b)| frame(*t, b)).collect();
        let mut reader = FrameReader::new(ChunkedReader {
            data: Bytes::from(wire),
            chunks: chunks.into(),
            stall: false,
        });
        let mut got = Vec::new();
        loop {
            // `now_or_never` polls once and drops the future when it is pending.
            match reader.next("testing").now_or_never() {
                None => continue,
                Some(Ok((tag, body))) => got.push((tag, body.to_vec())),
                Some(Err(ReplicationError::Closed { .. })) => break,
                Some(Err(e)) => return Err(TestCaseError::fail(e.to_string())),
            }
        }
        prop_assert_eq!(got, sent);
    }
}

// ---------------------------------------------------------------------------
// Lsn
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn lsn_display_parses_back(v in any::<u64>()) {
        let text = Lsn(v).to_string();
        prop_assert_eq!(text.parse::<Lsn>(), Ok(Lsn(v)));
        prop_assert_eq!(text.to_lowercase().parse::<Lsn>(), Ok(Lsn(v)));
    }

    #[test]
    fn lsn_orders_like_its_position(a in any::<u64>(), b in any::<u64>()) {
        prop_assert_eq!(Lsn(a).cmp(&Lsn(b)), a.cmp(&b));
        prop_assert_eq!(Lsn(a).bytes_since(Lsn(b)), a.saturating_sub(b));
    }

    #[test]
    fn lsn_parse_never_panics_and_accepts_only_two_hex_parts(s in "\\PC{0,24}") {
        if let Ok(lsn) = s.parse::<Lsn>() {
            let (hi, lo) = s.trim().split_once('/').unwrap();
            prop_assert!(hi.len() <= 8 && lo.len() <= 8);
            prop_assert_eq!(
                lsn.0,
                (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
            );
        }
    }

    #[test]
    fn lsn_parses_every_hex_pair_of_up_to_eight_digits(
        hi in "[0-9a-fA-F]{1,9}",
        lo in "[0-9a-fA-F]{1,9}",
    ) {
        let parsed = format!("{hi}/{lo}").parse::<Lsn>();
        if hi.len() <= 8 && lo.len() <= 8 {
            let want = (u64::from_str_radix(&hi, 16).unwrap() << 32)
                | u64::from_str_radix(&lo, 16).unwrap();
            prop_assert_eq!(parsed, Ok(Lsn(want)));
        } else {
            prop_assert!(parsed.is_err());
        }
    }
}

// ---------------------------------------------------------------------------
// AckTracker against a reference model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum AckOp {
    Begin,
    Record,
    /// Commit the open transaction, its end this far past the last WAL position.
    Commit(u64),
    /// A delivery report for one of the registered records (repeats included).
    Ack(Index),
    /// A delivery report for a sequence number never handed out.
    AckUnknown(u64),
    /// A keepalive this far past the last WAL position.
    Keepalive(u64),
    /// A keepalive at or behind the confirmed position (must not move it back).
    StaleKeepalive(u64),
}

fn ack_op() -> impl Strategy<Value = AckOp> {
    prop_oneof![
        3 => Just(AckOp::Begin),
        6 => Just(AckOp::Record),
        3 => (1..500u64).prop_map(AckOp::Commit),
        8 => any::<Index>().prop_map(AckOp::Ack),
        1 => (0..8u64).prop_map(AckOp::AckUnknown),
        2 => (0..500u64).prop_map(AckOp::Keepalive),
        1 => any::<u64>().prop_map(AckOp::StaleKeepalive),
    ]
}

/// The confirmation rule written the obvious way: a transaction is
/// confirmable when it and every record registered before its end are
/// acknowledged; a keepalive counts only when no transaction is open and no
/// record is unacknowledged.
#[derive(Debug)]
struct Model {
    confirmed: Lsn,
    /// Delivery flag of every registered record, by sequence number.
    acked: Vec<bool>,
    /// Committed transactions: (end LSN, records registered up to its end).
    committed: Vec<(Lsn, usize)>,
    open: bool,
    /// Committed transactions confirmable so far.
    confirmable: usize,
}

impl Model {
    /// Returns how many more transactions became confirmable.
    fn settle(&mut self) -> usize {
        let confirmable = self
            .committed
            .iter()
            .take_while(|(_, upto)| self.acked[..*upto].iter().all(|&a| a))
            .count();
        for (end, _) in &self.committed[..confirmable] {
            self.confirmed = self.confirmed.max(*end);
        }
        let newly = confirmable - self.confirmable;
        self.confirmable = confirmable;
        newly
    }

    fn unacked(&self) -> usize {
        self.acked.iter().filter(|&&a| !a).count()
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn ack_tracker_confirms_only_fully_delivered_prefixes(
        start in 0..2_000u64,
        wal_start in 0..4_000u64,
        ops in prop::collection::vec(ack_op(), 0..200),
    ) {
        let mut t = AckTracker::new(Lsn(start));
        let mut m = Model {
            confirmed: Lsn(start),
            acked: Vec::new(),
            committed: Vec::new(),
            open: false,
            confirmable: 0,
        };
        let mut wal = wal_start;
        let mut keepalive_floor = Lsn(start);
        for op in ops {
            let before = t.confirmed();
            match op {
                // The relay sees pgoutput's Begin, rows, Commit: no nesting,
                // no rows or commit outside a transaction.
                AckOp::Begin if !m.open => {
                    m.open = true;
                    t.begin();
                }
                AckOp::Record if m.open => {
                    prop_assert_eq!(t.record(), m.acked.len() as Seq);
                    m.acked.push(false);
                }
                AckOp::Commit(d) if m.open => {
                    wal += d;
                    m.open = false;
                    m.committed.push((Lsn(wal), m.acked.len()));
                    prop_assert_eq!(t.commit(Lsn(wal)), m.settle(), "commit at {}", wal);
                }
                AckOp::Ack(i) if !m.acked.is_empty() => {
                    let seq = i.index(m.acked.len());
                    m.acked[seq] = true;
                    prop_assert_eq!(t.ack(seq as Seq), m.settle(), "ack of {}", seq);
                }
                AckOp::AckUnknown(d) => {
                    let seq = m.acked.len() as Seq + d;
                    prop_assert_eq!(t.ack(seq), 0);
                }
                AckOp::Keepalive(d) => {
                    wal += d;
                    t.keepalive(Lsn(wal));
                    if !m.open && m.unacked() == 0 {
                        m.confirmed = m.confirmed.max(Lsn(wal));
                        keepalive_floor = keepalive_floor.max(Lsn(wal));
                    }
                }
                AckOp::StaleKeepalive(v) => {
                    let v = v % (m.confirmed.0 + 1);
                    t.keepalive(Lsn(v));
                }
                _ => continue,
            }
            let now = t.confirmed();
            prop_assert!(now >= before, "confirmed went back from {} to {}", before, now);
            // The bound the user cares about, stated on its own: never past the
            // last fully delivered transaction, except by an idle keepalive.
            let delivered = m.committed[..m.confirmable]
                .iter()
                .map(|(end, _)| *end)
                .max()
                .unwrap_or(Lsn::ZERO);
            prop_assert!(
                now <= Lsn(start).max(delivered).max(keepalive_floor),
                "confirmed {} past the last delivered transaction {}",
                now,
                delivered
            );
            prop_assert_eq!(now, m.confirmed);
            prop_assert_eq!(t.in_flight(), m.unacked());
            let oldest_unacked = m.acked.iter().position(|&a| !a).unwrap_or(m.acked.len());
            prop_assert_eq!(t.window(), m.acked.len() - oldest_unacked);
        }
    }
}
