//! Keys and values: how records and per-meter bookkeeping are laid out in sled's tree.
//!
//! Values the store writes beside the records (its counters, a meter's last failure) are
//! encoded here by hand in postcard's wire format (postcard 1.0's format is specified and
//! stable), so that encoding them cannot fail: a value that could come out empty would be
//! written as an empty value. They are still read with `postcard::from_bytes`, and the tests
//! hold the two to byte-for-byte agreement.

use serde::{Deserialize, Serialize};

use super::super::{LastFailure, Range, Record, StoreError};
use crate::reading::{Cadence, Decimal, EventKind, Flags, Obis, Reading, Stamp, SystemEvent};

/// The key of the chunk of `range` whose first record has sequence number `seq`.
pub(super) fn rkey(range: Range, seq: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = b'r';
    k[1] = range as u8;
    k[2..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// The range and first sequence number of a chunk key; `None` for any other key.
pub(super) fn parse_key(k: &[u8]) -> Option<(Range, u64)> {
    if k.len() != 10 || k[0] != b'r' {
        return None;
    }
    let range = match k[1] {
        0 => Range::Profile,
        1 => Range::Events,
        2 => Range::Billing,
        _ => return None,
    };
    Some((range, u64::from_be_bytes(k[2..].try_into().ok()?)))
}

/// The prefix of every chunk key of `range`.
pub(super) fn range_prefix(range: Range) -> [u8; 2] {
    [b'r', range as u8]
}

/// `b` meter `\0` cadence: the last boundary read.
pub(super) fn mark_key(meter: &str, cadence: Cadence) -> Vec<u8> {
    let mut k = Vec::with_capacity(meter.len() + 12);
    k.push(b'b');
    k.extend_from_slice(meter.as_bytes());
    k.push(0);
    k.extend_from_slice(cadence.as_str().as_bytes());
    k
}

/// `p` meter `\0` profile (`A-B-C-D-E-F`): a profile's high-water mark and row count.
pub(super) fn profile_key(meter: &str, profile: &crate::reading::Obis) -> Vec<u8> {
    let mut k = Vec::with_capacity(meter.len() + 24);
    k.push(b'p');
    k.extend_from_slice(meter.as_bytes());
    k.push(0);
    k.extend_from_slice(profile.to_string().as_bytes());
    k
}

/// A profile's mark as stored: last row (Unix ms) and rows read, 8 bytes big-endian each.
pub(super) fn encode_profile_mark(last_ms: i64, rows: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&last_ms.to_be_bytes());
    v[8..].copy_from_slice(&rows.to_be_bytes());
    v
}

/// The inverse of [`encode_profile_mark`]; `None` for a value of another length.
pub(super) fn decode_profile_mark(v: &[u8]) -> Option<(i64, u64)> {
    let last = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let rows = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    (v.len() == 16).then_some((last, rows))
}

/// `tag` followed by `name`: a meter's last read (`l`), last failure (`f`), or a command id
/// (`c`).
pub(super) fn meter_key(tag: u8, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.push(tag);
    k.extend_from_slice(name.as_bytes());
    k
}

/// A value in postcard's wire format, built without a way to fail.
#[derive(Default)]
pub(super) struct Wire(Vec<u8>);

impl Wire {
    pub(super) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// Unsigned integers wider than a byte: LEB128, seven bits at a time, lowest first.
    pub(super) fn varint(&mut self, mut v: u64) -> &mut Self {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
        self
    }

    /// Signed integers: zig-zag, then as unsigned.
    pub(super) fn zigzag(&mut self, v: i64) -> &mut Self {
        self.varint(((v << 1) ^ (v >> 63)) as u64)
    }

    pub(super) fn option<T>(&mut self, v: Option<T>, some: impl FnOnce(&mut Self, T)) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                some(self, v);
                self
            }
        }
    }

    pub(super) fn str(&mut self, s: &str) -> &mut Self {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    pub(super) fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

/// The value under `f` meter: (Unix ms, kind, message), as postcard writes
/// `(i64, &str, &str)`. The kind is stored by its name, not its index, so that adding a kind
/// never changes what an older store's values mean.
pub(super) fn encode_failure(f: &LastFailure) -> Vec<u8> {
    let mut w = Wire::default();
    w.zigzag(f.at_ms).str(f.kind.as_str()).str(&f.message);
    w.into_vec()
}

/// The inverse of [`encode_failure`]; `None` for bytes it did not write or a kind this
/// version does not know (a newer agent's store).
pub(super) fn decode_failure(v: &[u8]) -> Option<LastFailure> {
    let (at_ms, kind, message) = postcard::from_bytes::<(i64, String, String)>(v).ok()?;
    Some(LastFailure {
        at_ms,
        kind: EventKind::from_name(&kind)?,
        message,
    })
}

/// The top bit of a chunk's count: the chunk is in the dense format ([`encode_chunk`]).
/// Chunks without it (written before) are `[(offset, record)]` as postcard writes them, and
/// are still read ([`decode_chunk`]).
const DENSE: u32 = 1 << 31;

/// A chunk in the dense format: the strings its readings repeat (meter, id type, unit) once,
/// and each reading's times as differences, which are mostly a byte or two. Flash wear is
/// bytes written, and sled writes a chunk's bytes several times over (leaf rewrites), so a
/// byte saved here is saved several times on the disk.
#[derive(Serialize)]
struct DenseOut<'a> {
    strings: Vec<&'a str>,
    items: Vec<(u32, ItemOut<'a>)>,
}

#[derive(Serialize)]
enum ItemOut<'a> {
    Reading(ReadingOut<'a>),
    Event(&'a SystemEvent),
}

/// A reading in a dense chunk: strings as indexes into the chunk's `strings`; `read_at` as
/// the difference from the reading before it in the chunk (from 0 for the first), `timestamp`
/// as the difference from its own `read_at`.
#[derive(Serialize)]
struct ReadingOut<'a> {
    meter: u32,
    id_type: u32,
    series: &'a Obis,
    value: &'a Decimal,
    unit: u32,
    read_at_ms: i64,
    read_at_offset: i32,
    timestamp_ms: i64,
    timestamp_offset: i32,
    cadence: Cadence,
    flags: Flags,
}

#[derive(Deserialize)]
struct DenseIn {
    strings: Vec<String>,
    items: Vec<(u32, ItemIn)>,
}

#[derive(Deserialize)]
enum ItemIn {
    Reading(ReadingIn),
    Event(SystemEvent),
}

#[derive(Deserialize)]
struct ReadingIn {
    meter: u32,
    id_type: u32,
    series: Obis,
    value: Decimal,
    unit: u32,
    read_at_ms: i64,
    read_at_offset: i32,
    timestamp_ms: i64,
    timestamp_offset: i32,
    cadence: Cadence,
    flags: Flags,
}

/// The strings of a chunk, each once.
#[derive(Default)]
struct Strings<'a> {
    list: Vec<&'a str>,
    index: std::collections::HashMap<&'a str, u32>,
}

impl<'a> Strings<'a> {
    fn of(&mut self, s: &'a str) -> u32 {
        let next = self.list.len() as u32;
        *self.index.entry(s).or_insert_with(|| {
            self.list.push(s);
            next
        })
    }
}

/// A record as [`encode_chunk`] and [`SledStore::stage`](super::SledStore) take it: owned
/// by a [`Record`], or borrowed from the batch being appended, which is then never copied.
#[derive(Clone, Copy)]
pub(super) enum RecordRef<'a> {
    Reading(&'a Reading),
    Event(&'a SystemEvent),
}

impl RecordRef<'_> {
    pub(super) fn range(self) -> Range {
        match self {
            RecordRef::Reading(r) => Range::of_reading(r),
            RecordRef::Event(_) => Range::Events,
        }
    }
}

/// What [`encode_chunk`] encodes: a [`Record`] or a [`RecordRef`].
pub(super) trait AsRecord {
    fn as_record(&self) -> RecordRef<'_>;
}

impl AsRecord for &Record {
    fn as_record(&self) -> RecordRef<'_> {
        match self {
            Record::Reading(r) => RecordRef::Reading(r),
            Record::Event(e) => RecordRef::Event(e),
        }
    }
}

impl AsRecord for RecordRef<'_> {
    fn as_record(&self) -> RecordRef<'_> {
        *self
    }
}

/// Encodes a chunk whose first record has sequence number `first`, in the dense format. An
/// error (which our own types should never give) aborts the batch: the caller keeps its
/// records and tries again, rather than the store writing a chunk that says it holds records
/// it does not.
pub(super) fn encode_chunk<R: AsRecord>(
    first: u64,
    items: &[(u64, R)],
) -> Result<Vec<u8>, StoreError> {
    let mut strings = Strings::default();
    let mut prev_ms = 0i64;
    let body: Vec<(u32, ItemOut<'_>)> = items
        .iter()
        .map(|(seq, r)| {
            let item = match r.as_record() {
                RecordRef::Reading(r) => {
                    let read_at_ms = r.read_at.ms.wrapping_sub(prev_ms);
                    prev_ms = r.read_at.ms;
                    ItemOut::Reading(ReadingOut {
                        meter: strings.of(&r.meter),
                        id_type: strings.of(&r.id_type),
                        series: &r.series,
                        value: &r.value,
                        unit: strings.of(&r.unit),
                        read_at_ms,
                        read_at_offset: r.read_at.offset,
                        timestamp_ms: r.timestamp.ms.wrapping_sub(r.read_at.ms),
                        timestamp_offset: r.timestamp.offset,
                        cadence: r.cadence,
                        flags: r.flags,
                    })
                }
                RecordRef::Event(e) => ItemOut::Event(e),
            };
            ((seq - first) as u32, item)
        })
        .collect();
    let dense = DenseOut {
        strings: strings.list,
        items: body,
    };
    let encoded = postcard::to_stdvec(&dense).map_err(|e| {
        StoreError::Unavailable(format!("could not encode records for the disk: {e}"))
    })?;
    let mut v = Vec::with_capacity(4 + encoded.len());
    v.extend_from_slice(&(items.len() as u32 | DENSE).to_le_bytes());
    v.extend(encoded);
    Ok(v)
}

/// The records of a chunk with their sequence numbers, in either format.
pub(super) fn decode_chunk(first: u64, v: &[u8]) -> Result<Vec<(u64, Record)>, postcard::Error> {
    let (header, body) = v
        .split_first_chunk::<4>()
        .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
    if u32::from_le_bytes(*header) & DENSE == 0 {
        let items: Vec<(u32, Record)> = postcard::from_bytes(body)?;
        return Ok(items
            .into_iter()
            .map(|(off, r)| (first + u64::from(off), r))
            .collect());
    }
    let dense: DenseIn = postcard::from_bytes(body)?;
    let string = |i: u32| {
        dense
            .strings
            .get(i as usize)
            .cloned()
            .ok_or(postcard::Error::SerdeDeCustom)
    };
    let mut prev_ms = 0i64;
    let mut out = Vec::with_capacity(dense.items.len());
    for (off, item) in dense.items {
        let record = match item {
            ItemIn::Reading(r) => {
                let read_at = Stamp {
                    ms: prev_ms.wrapping_add(r.read_at_ms),
                    offset: r.read_at_offset,
                };
                prev_ms = read_at.ms;
                Record::Reading(Reading {
                    meter: string(r.meter)?,
                    id_type: string(r.id_type)?,
                    series: r.series,
                    value: r.value,
                    unit: string(r.unit)?,
                    timestamp: Stamp {
                        ms: read_at.ms.wrapping_add(r.timestamp_ms),
                        offset: r.timestamp_offset,
                    },
                    read_at,
                    cadence: r.cadence,
                    flags: r.flags,
                })
            }
            ItemIn::Event(e) => Record::Event(e),
        };
        out.push((first + u64::from(off), record));
    }
    Ok(out)
}

/// The record count from a chunk's header, without decoding it.
pub(super) fn chunk_count(v: &[u8]) -> u64 {
    v.get(..4)
        .and_then(|h| h.try_into().ok())
        .map_or(0, |h| u64::from(u32::from_le_bytes(h) & !DENSE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{EventKind, Stamp, SystemEvent};

    fn event(n: u32) -> Record {
        Record::Event(SystemEvent::new(
            EventKind::LinkError,
            Stamp { ms: 1, offset: 0 },
            format!("e{n}"),
        ))
    }

    #[test]
    fn a_failure_record_should_be_what_postcard_writes_and_reads() {
        let long = "é".repeat(200);
        for (at_ms, kind, message) in [
            (0, EventKind::Overrun, ""),
            (
                1_774_092_896_000,
                EventKind::LinkError,
                "serial line: no such device",
            ),
            (-1, EventKind::SecurityError, long.as_str()),
            (i64::MIN, EventKind::MeterNotAnswering, "m"),
            (i64::MAX, EventKind::StoreError, "m"),
        ] {
            let f = LastFailure {
                at_ms,
                kind,
                message: message.to_owned(),
            };
            let ours = encode_failure(&f);
            assert_eq!(
                ours,
                postcard::to_stdvec(&(at_ms, kind.as_str(), message)).unwrap()
            );
            assert_eq!(decode_failure(&ours), Some(f));
        }
    }

    #[test]
    fn a_failure_of_a_kind_this_version_does_not_know_should_be_left_out() {
        let v = postcard::to_stdvec(&(1_i64, "from_the_future", "m")).unwrap();
        assert_eq!(decode_failure(&v), None);
        assert_eq!(decode_failure(b"\xff"), None);
    }

    #[test]
    fn chunk_keys_should_sort_by_range_then_sequence_and_parse_back() {
        let a = rkey(Range::Profile, 300);
        let b = rkey(Range::Profile, 1 << 40);
        let c = rkey(Range::Events, 1);
        assert!(a < b && b < c);
        assert_eq!(parse_key(&b), Some((Range::Profile, 1 << 40)));
        assert!(b.starts_with(&range_prefix(Range::Profile)));
        assert_eq!(parse_key(&mark_key("m", Cadence::Daily)), None);
        assert_eq!(parse_key(b"r\x07aaaaaaaa"), None);
    }

    #[test]
    fn a_chunk_with_gaps_should_decode_to_its_records_and_sequence_numbers() {
        let (r1, r2) = (event(1), event(2));
        let v = encode_chunk(100, &[(100, &r1), (103, &r2)]).unwrap();
        assert_eq!(chunk_count(&v), 2);
        assert_eq!(decode_chunk(100, &v).unwrap(), vec![(100, r1), (103, r2)]);
    }

    /// A chunk as the store wrote them before the dense format.
    fn encode_chunk_before(first: u64, items: &[(u64, &Record)]) -> Vec<u8> {
        let body: Vec<(u32, &Record)> = items
            .iter()
            .map(|(seq, r)| ((seq - first) as u32, *r))
            .collect();
        let mut v = (items.len() as u32).to_le_bytes().to_vec();
        v.extend(postcard::to_stdvec(&body).unwrap());
        v
    }

    fn readings_of_a_poll() -> Vec<Record> {
        let mut out = Vec::new();
        for m in 0..3 {
            for (i, unit) in ["kWh", "kvarh", "V"].iter().enumerate() {
                let mut r = crate::store::tests::reading(
                    &format!("meter-{m}"),
                    if i == 2 {
                        Cadence::Daily
                    } else {
                        Cadence::Quarterly
                    },
                    i as i64 * 1000 - 7,
                    1_790_000_000_000 + m * 900_000,
                );
                r.unit = (*unit).into();
                r.timestamp.ms -= 12_345;
                r.timestamp.offset = -3600;
                if i == 1 {
                    r.flags.insert(Flags::LATE);
                    r.read_at.ms = i64::MIN + 5;
                }
                out.push(Record::Reading(r));
            }
            out.push(event(m as u32));
        }
        out
    }

    #[test]
    fn a_dense_chunk_should_decode_to_exactly_its_records_and_be_smaller() {
        let records = readings_of_a_poll();
        let items: Vec<(u64, &Record)> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (1_000 + 2 * i as u64, r))
            .collect();
        let dense = encode_chunk(1_000, &items).unwrap();
        let before = encode_chunk_before(1_000, &items);
        assert_eq!(chunk_count(&dense), records.len() as u64);
        let back = decode_chunk(1_000, &dense).unwrap();
        let want: Vec<(u64, Record)> = items.iter().map(|(s, r)| (*s, (*r).clone())).collect();
        assert_eq!(back, want);
        assert!(
            dense.len() < before.len(),
            "{} >= {}",
            dense.len(),
            before.len()
        );
    }

    #[test]
    fn a_chunk_written_before_the_dense_format_should_still_decode() {
        let records = readings_of_a_poll();
        let items: Vec<(u64, &Record)> = records
            .iter()
            .enumerate()
            .map(|(i, r)| (50 + i as u64, r))
            .collect();
        let v = encode_chunk_before(50, &items);
        assert_eq!(chunk_count(&v), records.len() as u64);
        let want: Vec<(u64, Record)> = items.iter().map(|(s, r)| (*s, (*r).clone())).collect();
        assert_eq!(decode_chunk(50, &v).unwrap(), want);
    }

    #[test]
    fn a_dense_chunk_naming_a_string_it_lacks_should_not_decode() {
        let r = readings_of_a_poll().remove(0);
        let mut v = encode_chunk(1, &[(1, &r)]).unwrap();
        // strings: 3 of them, the count right after the header; claim none.
        assert_eq!(v[4], 3);
        v[4] = 0;
        assert!(decode_chunk(1, &v).is_err());
    }

    #[test]
    fn a_truncated_chunk_should_not_decode() {
        let v = encode_chunk(7, &[(7, &event(1))]).unwrap();
        assert!(decode_chunk(7, &v[..v.len() - 1]).is_err());
        assert!(decode_chunk(7, &v[..2]).is_err());
        assert_eq!(chunk_count(&v[..2]), 0);
    }
}
