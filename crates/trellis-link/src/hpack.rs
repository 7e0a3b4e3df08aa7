//! HPACK (RFC 7541) for the link: a complete decoder, and an encoder that indexes the
//! header fields that repeat from request to request and copies the others as plain
//! literals.
//!
//! The encoder's choices are what make the link cheap: values unique per request
//! (`x-request-id`, trace context, dates) never enter the dynamic table, where they would
//! only evict the fields that do repeat; sensitive values are sent never-indexed; nothing
//! is Huffman-coded. The decoder accepts any valid HPACK, whoever encoded it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue};

use crate::tables::STATIC;

/// The dynamic table size both ends start with (SETTINGS_HEADER_TABLE_SIZE's default).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// A pseudo-header field of HTTP/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pseudo {
    Authority,
    Method,
    Path,
    Scheme,
    Status,
    Protocol,
}

impl Pseudo {
    fn as_str(self) -> &'static str {
        match self {
            Pseudo::Authority => ":authority",
            Pseudo::Method => ":method",
            Pseudo::Path => ":path",
            Pseudo::Scheme => ":scheme",
            Pseudo::Status => ":status",
            Pseudo::Protocol => ":protocol",
        }
    }

    fn parse(name: &[u8]) -> Option<Pseudo> {
        Some(match name {
            b":authority" => Pseudo::Authority,
            b":method" => Pseudo::Method,
            b":path" => Pseudo::Path,
            b":scheme" => Pseudo::Scheme,
            b":status" => Pseudo::Status,
            b":protocol" => Pseudo::Protocol,
            _ => return None,
        })
    }
}

/// A field's name: a pseudo-header or a (lowercase, valid) header name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Name {
    Pseudo(Pseudo),
    Header(HeaderName),
}

/// A field's name, borrowed: what the encoder takes (it copies a name only into its
/// table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRef<'a> {
    Pseudo(Pseudo),
    Header(&'a HeaderName),
}

impl NameRef<'_> {
    fn as_bytes(&self) -> &[u8] {
        match self {
            NameRef::Pseudo(p) => p.as_str().as_bytes(),
            NameRef::Header(h) => h.as_str().as_bytes(),
        }
    }

    fn to_owned(self) -> Name {
        match self {
            NameRef::Pseudo(p) => Name::Pseudo(p),
            NameRef::Header(h) => Name::Header(h.clone()),
        }
    }
}

impl Name {
    pub fn as_ref(&self) -> NameRef<'_> {
        match self {
            Name::Pseudo(p) => NameRef::Pseudo(*p),
            Name::Header(h) => NameRef::Header(h),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Name::Pseudo(p) => p.as_str().as_bytes(),
            Name::Header(h) => h.as_str().as_bytes(),
        }
    }
}

/// A decoded header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Name,
    pub value: HeaderValue,
}

impl Field {
    /// RFC 7541 §4.1: the size a field takes in the dynamic table.
    pub fn size(&self) -> usize {
        self.name.as_bytes().len() + self.value.len() + 32
    }
}

/// Why a header block could not be decoded: always a connection error
/// (COMPRESSION_ERROR), since the two ends' tables no longer agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpackError {
    Truncated,
    Integer,
    Index(usize),
    Huffman,
    SizeUpdate(usize),
    /// A name that is not a valid lowercase HTTP/2 field name.
    Name,
    /// A value with bytes HTTP does not allow (NUL, CR, LF).
    Value,
}

impl std::fmt::Display for HpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HpackError::Truncated => f.write_str("header block ends inside a field"),
            HpackError::Integer => f.write_str("integer too large"),
            HpackError::Index(i) => write!(f, "no table entry {i}"),
            HpackError::Huffman => f.write_str("invalid Huffman-coded string"),
            HpackError::SizeUpdate(n) => write!(f, "table size update to {n} not allowed here"),
            HpackError::Name => f.write_str("invalid field name"),
            HpackError::Value => f.write_str("invalid field value"),
        }
    }
}

fn statics() -> &'static [Field] {
    static FIELDS: OnceLock<Vec<Field>> = OnceLock::new();
    FIELDS.get_or_init(|| {
        STATIC
            .iter()
            .map(|&(n, v)| Field {
                name: match Pseudo::parse(n.as_bytes()) {
                    Some(p) => Name::Pseudo(p),
                    None => Name::Header(HeaderName::from_static(n)),
                },
                value: HeaderValue::from_static(v),
            })
            .collect()
    })
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 §5.1).
fn integer(src: &[u8], pos: &mut usize, n: u8) -> Result<usize, HpackError> {
    let mask = (1usize << n) - 1;
    let first = *src.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mut v = usize::from(first) & mask;
    if v < mask {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let b = *src.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 28 {
            return Err(HpackError::Integer);
        }
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

/// Writes an integer with an `n`-bit prefix, `flags` in the first byte's high bits.
fn put_integer(dst: &mut BytesMut, flags: u8, n: u8, mut v: usize) {
    let mask = (1usize << n) - 1;
    if v < mask {
        dst.put_u8(flags | v as u8);
        return;
    }
    dst.put_u8(flags | mask as u8);
    v -= mask;
    while v >= 0x80 {
        dst.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// A dynamic table (RFC 7541 §2.3.2), newest entry first.
#[derive(Debug)]
struct Table {
    entries: VecDeque<Field>,
    size: usize,
    max: usize,
}

impl Table {
    fn new(max: usize) -> Table {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.entries.pop_back() {
                Some(f) => self.size -= f.size(),
                None => break,
            }
        }
    }

    fn insert(&mut self, field: Field) {
        let size = field.size();
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - size);
        self.size += size;
        self.entries.push_front(field);
    }
}

/// Decodes header blocks; one per connection direction.
#[derive(Debug)]
pub struct Decoder {
    table: Table,
    /// The most the peer may set the table to: what we advertised.
    limit: usize,
    scratch: Vec<u8>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_TABLE_SIZE)
    }
}

impl Decoder {
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: Table::new(limit),
            limit,
            scratch: Vec::new(),
        }
    }

    fn get(&self, index: usize) -> Result<&Field, HpackError> {
        match index {
            0 => Err(HpackError::Index(0)),
            1..=61 => Ok(&statics()[index - 1]),
            _ => self
                .table
                .entries
                .get(index - 62)
                .ok_or(HpackError::Index(index)),
        }
    }

    /// A string literal (RFC 7541 §5.2): shared with the block when sent as is.
    fn string(&mut self, block: &Bytes, pos: &mut usize) -> Result<Bytes, HpackError> {
        let huffman = block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = integer(block, pos, 7)?;
        let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
        if end > block.len() {
            return Err(HpackError::Truncated);
        }
        let raw = &block[*pos..end];
        *pos = end;
        if !huffman {
            return Ok(block.slice(end - len..end));
        }
        self.scratch.clear();
        crate::huffman::decode(raw, &mut self.scratch).ok_or(HpackError::Huffman)?;
        Ok(Bytes::copy_from_slice(&self.scratch))
    }

    fn name(&mut self, block: &Bytes, pos: &mut usize, index: usize) -> Result<Name, HpackError> {
        if index != 0 {
            return Ok(self.get(index)?.name.clone());
        }
        let raw = self.string(block, pos)?;
        if raw.first() == Some(&b':') {
            return Pseudo::parse(&raw)
                .map(Name::Pseudo)
                .ok_or(HpackError::Name);
        }
        // HTTP/2 field names are lowercase (RFC 9113 §8.2.1): `from_lowercase` refuses
        // any other.
        HeaderName::from_lowercase(&raw)
            .map(Name::Header)
            .map_err(|_| HpackError::Name)
    }

    /// Decodes one whole header block, handing each field to `emit` in order.
    pub fn decode(
        &mut self,
        block: &Bytes,
        mut emit: impl FnMut(Field) -> Result<(), HpackError>,
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut fields_seen = false;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                let index = integer(block, &mut pos, 7)?;
                let field = self.get(index)?.clone();
                fields_seen = true;
                emit(field)?;
            } else if b & 0xc0 == 0x40 {
                let index = integer(block, &mut pos, 6)?;
                let name = self.name(block, &mut pos, index)?;
                let value = self.string(block, &mut pos)?;
                let value = HeaderValue::from_maybe_shared(value).map_err(|_| HpackError::Value)?;
                let field = Field { name, value };
                self.table.insert(field.clone());
                fields_seen = true;
                emit(field)?;
            } else if b & 0xe0 == 0x20 {
                // Size updates come first in a block (RFC 7541 §4.2).
                let size = integer(block, &mut pos, 5)?;
                if fields_seen || size > self.limit {
                    return Err(HpackError::SizeUpdate(size));
                }
                self.table.max = size;
                self.table.evict_to(size);
            } else {
                // Without indexing (0000) or never indexed (0001).
                let index = integer(block, &mut pos, 4)?;
                let name = self.name(block, &mut pos, index)?;
                let value = self.string(block, &mut pos)?;
                let mut value =
                    HeaderValue::from_maybe_shared(value).map_err(|_| HpackError::Value)?;
                if b & 0x10 != 0 {
                    value.set_sensitive(true);
                }
                fields_seen = true;
                emit(Field { name, value })?;
            }
        }
        Ok(())
    }
}

/// A fast hash of a (name, value) pair, for the encoder's index.
fn hash(name: &[u8], value: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = 0;
    for part in [name, value] {
        let mut chunks = part.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        let mut w = [0u8; 8];
        let rest = chunks.remainder();
        w[..rest.len()].copy_from_slice(rest);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w) ^ (part.len() as u64) << 56).wrapping_mul(K);
    }
    h
}

/// The encoder's index is keyed by [`hash`] already: hashing it again would only cost.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// How the encoder sends one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Enter it in the dynamic table: it is likely to come again.
    Index,
    /// A plain literal: unique per message, not worth a table entry.
    Literal,
    /// A never-indexed literal (RFC 7541 §7.1.3): a secret no intermediary should index.
    Never,
}

/// Values longer than this are never entered in the table: one of them would evict
/// many of the short fields that repeat.
const MAX_INDEXED_VALUE: usize = 256;

fn mode(name: NameRef<'_>, value: &[u8], sensitive: bool) -> Mode {
    let NameRef::Header(h) = name else {
        return if value.len() > MAX_INDEXED_VALUE {
            Mode::Literal
        } else {
            Mode::Index
        };
    };
    if sensitive {
        return Mode::Never;
    }
    match h.as_str() {
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie" => Mode::Never,
        "x-request-id"
        | "traceparent"
        | "tracestate"
        | "b3"
        | "x-b3-traceid"
        | "x-b3-spanid"
        | "x-b3-parentspanid"
        | "date"
        | "x-envoy-upstream-service-time"
        | "age"
        | "etag"
        | "last-modified" => Mode::Literal,
        _ if value.len() > MAX_INDEXED_VALUE => Mode::Literal,
        _ => Mode::Index,
    }
}

/// The static table index of a name, for literals with an indexed name.
fn static_name(name: NameRef<'_>) -> usize {
    match name {
        NameRef::Pseudo(Pseudo::Authority) => 1,
        NameRef::Pseudo(Pseudo::Method) => 2,
        NameRef::Pseudo(Pseudo::Path) => 4,
        NameRef::Pseudo(Pseudo::Scheme) => 6,
        NameRef::Pseudo(Pseudo::Status) => 8,
        NameRef::Pseudo(Pseudo::Protocol) => 0,
        NameRef::Header(h) => match h.as_str() {
            "accept-charset" => 15,
            "accept-encoding" => 16,
            "accept-language" => 17,
            "accept-ranges" => 18,
            "accept" => 19,
            "access-control-allow-origin" => 20,
            "age" => 21,
            "allow" => 22,
            "authorization" => 23,
            "cache-control" => 24,
            "content-disposition" => 25,
            "content-encoding" => 26,
            "content-language" => 27,
            "content-length" => 28,
            "content-location" => 29,
            "content-range" => 30,
            "content-type" => 31,
            "cookie" => 32,
            "date" => 33,
            "etag" => 34,
            "expect" => 35,
            "expires" => 36,
            "from" => 37,
            "host" => 38,
            "if-match" => 39,
            "if-modified-since" => 40,
            "if-none-match" => 41,
            "if-range" => 42,
            "if-unmodified-since" => 43,
            "last-modified" => 44,
            "link" => 45,
            "location" => 46,
            "max-forwards" => 47,
            "proxy-authenticate" => 48,
            "proxy-authorization" => 49,
            "range" => 50,
            "referer" => 51,
            "refresh" => 52,
            "retry-after" => 53,
            "server" => 54,
            "set-cookie" => 55,
            "strict-transport-security" => 56,
            "transfer-encoding" => 57,
            "user-agent" => 58,
            "vary" => 59,
            "via" => 60,
            "www-authenticate" => 61,
            _ => 0,
        },
    }
}

/// The static table entry that is exactly this field, for the fields that have one.
fn static_exact(name: NameRef<'_>, value: &[u8]) -> Option<usize> {
    Some(match (name, value) {
        (NameRef::Pseudo(Pseudo::Method), b"GET") => 2,
        (NameRef::Pseudo(Pseudo::Method), b"POST") => 3,
        (NameRef::Pseudo(Pseudo::Path), b"/") => 4,
        (NameRef::Pseudo(Pseudo::Scheme), b"http") => 6,
        (NameRef::Pseudo(Pseudo::Scheme), b"https") => 7,
        (NameRef::Pseudo(Pseudo::Status), b"200") => 8,
        (NameRef::Pseudo(Pseudo::Status), b"204") => 9,
        (NameRef::Pseudo(Pseudo::Status), b"206") => 10,
        (NameRef::Pseudo(Pseudo::Status), b"304") => 11,
        (NameRef::Pseudo(Pseudo::Status), b"400") => 12,
        (NameRef::Pseudo(Pseudo::Status), b"404") => 13,
        (NameRef::Pseudo(Pseudo::Status), b"500") => 14,
        _ => return None,
    })
}

#[derive(Debug)]
struct Entry {
    /// Insertion number: the newest entry has `inserted - 1`.
    seq: u64,
    hash: u64,
    name: Name,
    value: Bytes,
}

impl Entry {
    fn size(&self) -> usize {
        self.name.as_bytes().len() + self.value.len() + 32
    }
}

/// Encodes header blocks; one per connection direction.
#[derive(Debug)]
pub struct Encoder {
    entries: VecDeque<Entry>,
    /// The newest entry for each hash (verified against the entry on use).
    index: HashMap<u64, u64, BuildHasherDefault<Prehashed>>,
    inserted: u64,
    size: usize,
    max: usize,
    /// The smallest size the table took since the last block, then the size it has now,
    /// when the peer changed SETTINGS_HEADER_TABLE_SIZE: said at the next block's start.
    update: Option<(usize, usize)>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            entries: VecDeque::new(),
            index: HashMap::default(),
            inserted: 0,
            size: 0,
            max: DEFAULT_TABLE_SIZE,
            update: None,
        }
    }
}

impl Encoder {
    /// The peer's SETTINGS_HEADER_TABLE_SIZE changed.
    pub fn set_max_size(&mut self, max: usize) {
        let low = self.update.map_or(max, |(low, _)| low.min(max));
        self.update = Some((low, max));
        self.max = max;
        self.evict_to(max);
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let Some(e) = self.entries.pop_back() else {
                break;
            };
            self.size -= e.size();
            if self.index.get(&e.hash) == Some(&e.seq) {
                self.index.remove(&e.hash);
            }
        }
    }

    /// Starts a header block: table size updates owed to the peer come first.
    pub fn begin(&mut self, dst: &mut BytesMut) {
        if let Some((low, now)) = self.update.take() {
            if low < now {
                put_integer(dst, 0x20, 5, low);
            }
            put_integer(dst, 0x20, 5, now);
        }
    }

    fn literal(dst: &mut BytesMut, flags: u8, prefix: u8, name: NameRef<'_>, value: &[u8]) {
        let index = static_name(name);
        put_integer(dst, flags, prefix, index);
        if index == 0 {
            let n = name.as_bytes();
            put_integer(dst, 0, 7, n.len());
            dst.put_slice(n);
        }
        put_integer(dst, 0, 7, value.len());
        dst.put_slice(value);
    }

    /// Encodes one field.
    pub fn encode(&mut self, name: NameRef<'_>, value: &[u8], sensitive: bool, dst: &mut BytesMut) {
        if let Some(i) = static_exact(name, value) {
            put_integer(dst, 0x80, 7, i);
            return;
        }
        match mode(name, value, sensitive) {
            Mode::Never => Self::literal(dst, 0x10, 4, name, value),
            Mode::Literal => Self::literal(dst, 0x00, 4, name, value),
            Mode::Index => {
                let h = hash(name.as_bytes(), value);
                if let Some(&seq) = self.index.get(&h) {
                    let found = self
                        .entries
                        .get((self.inserted - 1 - seq) as usize)
                        .filter(|e| {
                            e.seq == seq && e.name.as_bytes() == name.as_bytes() && e.value == value
                        });
                    if found.is_some() {
                        put_integer(dst, 0x80, 7, 62 + (self.inserted - 1 - seq) as usize);
                        return;
                    }
                }
                let entry = Entry {
                    seq: self.inserted,
                    hash: h,
                    name: name.to_owned(),
                    value: Bytes::copy_from_slice(value),
                };
                let size = entry.size();
                if size > self.max {
                    // It would empty the table and not fit: send it plainly instead.
                    Self::literal(dst, 0x00, 4, name, value);
                    return;
                }
                Self::literal(dst, 0x40, 6, name, value);
                self.evict_to(self.max - size);
                self.size += size;
                self.index.insert(h, entry.seq);
                self.entries.push_front(entry);
                self.inserted += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hname(s: &'static str) -> Name {
        Name::Header(HeaderName::from_static(s))
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut out = Vec::new();
        d.decode(&Bytes::copy_from_slice(block), |f| {
            out.push((
                String::from_utf8_lossy(f.name.as_bytes()).into_owned(),
                String::from_utf8_lossy(f.value.as_bytes()).into_owned(),
            ));
            Ok(())
        })?;
        Ok(out)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn decodes_the_rfc_request_examples_with_huffman() {
        // RFC 7541 C.4: three requests on one connection, sharing the dynamic table.
        let mut d = Decoder::default();
        let first =
            decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).expect("first");
        assert_eq!(
            first,
            [
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let second = decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")).expect("second");
        assert_eq!(second[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        let third = decode_all(
            &mut d,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        )
        .expect("third");
        assert_eq!(third[2], (":path".into(), "/index.html".into()));
        assert_eq!(third[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(third[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.table.size, 164);
    }

    #[test]
    fn what_the_encoder_writes_decodes_to_the_same_fields() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        let long = "v".repeat(300);
        let fields: Vec<(Name, String, bool)> = vec![
            (Name::Pseudo(Pseudo::Method), "GET".into(), false),
            (Name::Pseudo(Pseudo::Method), "PATCH".into(), false),
            (Name::Pseudo(Pseudo::Scheme), "http".into(), false),
            (
                Name::Pseudo(Pseudo::Authority),
                "reviews:9080".into(),
                false,
            ),
            (Name::Pseudo(Pseudo::Path), "/reviews/1?x=1".into(), false),
            (hname("user-agent"), "curl/8".into(), false),
            (hname("x-request-id"), "abc-123".into(), false),
            (hname("authorization"), "Bearer x".into(), false),
            (hname("x-custom"), "secret".into(), true),
            (hname("x-long"), long.clone(), false),
        ];
        for round in 0..3 {
            let mut block = BytesMut::new();
            e.begin(&mut block);
            for (n, v, s) in &fields {
                e.encode(n.as_ref(), v.as_bytes(), *s, &mut block);
            }
            let block = block.freeze();
            let mut got = Vec::new();
            d.decode(&block, |f| {
                got.push(f);
                Ok(())
            })
            .expect("decodes");
            assert_eq!(got.len(), fields.len());
            for (f, (n, v, _)) in got.iter().zip(&fields) {
                assert_eq!(&f.name, n, "round {round}");
                assert_eq!(f.value.as_bytes(), v.as_bytes(), "round {round}");
            }
            assert!(got[7].value.is_sensitive() && got[8].value.is_sensitive());
            if round > 0 {
                // Repeated fields are one byte each now; the unique and secret ones are not.
                assert!(
                    block.len() < 7 + 20 + 20 + 20 + 310,
                    "{} bytes",
                    block.len()
                );
            }
        }
        // The table holds what repeats, never the per-request or secret values.
        let held: Vec<&[u8]> = d.table.entries.iter().map(|f| f.value.as_bytes()).collect();
        assert!(held.contains(&&b"reviews:9080"[..]) && held.contains(&&b"curl/8"[..]));
        assert!(
            !held
                .iter()
                .any(|v| *v == b"abc-123" || *v == b"Bearer x" || *v == b"secret")
        );
        assert_eq!(e.size, d.table.size);
    }

    #[test]
    fn encoder_and_decoder_agree_through_evictions_and_size_changes() {
        let mut e = Encoder::default();
        let mut d = Decoder::default();
        for i in 0..500u32 {
            if i == 200 {
                e.set_max_size(100);
                e.set_max_size(1000);
            }
            let mut block = BytesMut::new();
            e.begin(&mut block);
            let v = format!("value-{}", i % 37);
            e.encode(hname("x-varied").as_ref(), v.as_bytes(), false, &mut block);
            e.encode(
                NameRef::Pseudo(Pseudo::Authority),
                b"a.b",
                false,
                &mut block,
            );
            let got = decode_all(&mut d, &block).expect("decodes");
            assert_eq!(got[0].1, v);
            assert_eq!(got[1].1, "a.b");
            assert_eq!(e.size, d.table.size, "block {i}");
            assert!(e.size <= e.max);
        }
        assert_eq!(d.table.max, 1000);
    }

    #[test]
    fn bad_blocks_are_errors_not_panics() {
        let mut d = Decoder::default();
        for bad in [
            &[0x80][..],                                     // index 0
            &[0xbf][..],                                     // index 62 with an empty table
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f][..], // integer overflow
            &[0x40, 0x05, b'a'][..],                         // truncated name
            &[0x40, 0x01, b'A', 0x00][..],                   // uppercase name
            &[0x40, 0x02, b':', b'x', 0x00][..],             // unknown pseudo-header
            &[0x04, 0x02, b'a', b'\n'][..],                  // newline in a value
            &[0x3f, 0xe2, 0x1f][..],                         // size update above the limit (4097)
            &[0x82, 0x20][..],                               // size update after a field
            &[0x04, 0x84, 0xff, 0xff, 0xff, 0xff][..],       // Huffman EOS
        ] {
            assert!(decode_all(&mut d, bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn integers_round_trip() {
        for n in [1u8, 4, 5, 6, 7, 8] {
            for v in [0usize, 1, 14, 15, 30, 31, 126, 127, 128, 255, 1337, 1 << 20] {
                let mut b = BytesMut::new();
                put_integer(&mut b, 0, n, v);
                let mut pos = 0;
                assert_eq!(integer(&b, &mut pos, n), Ok(v), "{v} with {n} bits");
                assert_eq!(pos, b.len());
            }
        }
    }
}
