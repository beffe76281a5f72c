//! HPACK (RFC 7541), as the HTTP/2 server needs it.
//!
//! The decoder keeps the client's dynamic table and decodes header blocks
//! into one reused buffer: no allocation per field, one per entry the
//! client adds to its table (rare: a client indexes what repeats).
//! The encoder is stateless: static-table names and plain literals, never
//! the dynamic table, so encoding needs no connection state and the
//! client's table size never matters.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::OnceLock;

/// Why a header block cannot be decoded: a connection error
/// (COMPRESSION_ERROR), the client's and our tables are out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("hpack: header block ends inside a field")]
    Truncated,
    #[error("hpack: integer too large")]
    Overflow,
    #[error("hpack: index {0} is not in the table")]
    BadIndex(usize),
    #[error("hpack: invalid huffman string")]
    Huffman,
    #[error("hpack: table size update to {0} above the limit")]
    TableSize(usize),
    #[error("hpack: table size update after a field")]
    LateSizeUpdate,
    #[error("hpack: header list larger than {0} bytes")]
    TooLarge(usize),
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// An entry's size in the table's accounting (RFC 7541 4.1).
const ENTRY_OVERHEAD: usize = 32;

/// A decoded header block: names and values as ranges of one buffer.
#[derive(Default)]
pub struct Fields {
    pub bytes: Vec<u8>,
    pub fields: Vec<(Range<usize>, Range<usize>)>,
}

impl Fields {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.fields.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        self.fields
            .iter()
            .map(|(name, value)| (&self.bytes[name.clone()], &self.bytes[value.clone()]))
    }

    fn push(&mut self, name: &[u8], value: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(name);
        let name = start..self.bytes.len();
        self.bytes.extend_from_slice(value);
        let value = name.end..self.bytes.len();
        self.fields.push((name, value));
    }
}

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The client's dynamic table and the size it may grow to.
pub struct Decoder {
    /// Newest first: entry `i` is index 62 + i.
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// What our SETTINGS_HEADER_TABLE_SIZE allows.
    limit: usize,
}

impl Decoder {
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes one whole header block into `out` (cleared first); fails
    /// past `max_list` bytes of header list (RFC 9113 6.5.2 accounting).
    pub fn decode(&mut self, mut block: &[u8], out: &mut Fields, max_list: usize) -> Result<(), HpackError> {
        out.clear();
        let mut list = 0usize;
        let mut fields_seen = false;
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                let (name, value) = self.entry(index)?;
                list += name.len() + value.len() + ENTRY_OVERHEAD;
                if list > max_list {
                    return Err(HpackError::TooLarge(max_list));
                }
                out.push(name, value);
                fields_seen = true;
                continue;
            }
            if first & 0xe0 == 0x20 {
                if fields_seen {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = integer(&mut block, 5)?;
                if size > self.limit {
                    return Err(HpackError::TableSize(size));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            }
            let (prefix, indexed) = if first & 0xc0 == 0x40 {
                (6, true)
            } else {
                (4, false)
            };
            let index = integer(&mut block, prefix)?;
            let start = out.bytes.len();
            if index == 0 {
                string(&mut block, &mut out.bytes)?;
            } else {
                out.bytes.extend_from_slice(self.entry(index)?.0);
            }
            let name = start..out.bytes.len();
            string(&mut block, &mut out.bytes)?;
            let value = name.end..out.bytes.len();
            list += out.bytes.len() - start + ENTRY_OVERHEAD;
            if list > max_list {
                return Err(HpackError::TooLarge(max_list));
            }
            if indexed {
                let entry = (
                    out.bytes[name.clone()].to_vec().into_boxed_slice(),
                    out.bytes[value.clone()].to_vec().into_boxed_slice(),
                );
                self.insert(entry);
            }
            out.fields.push((name, value));
            fields_seen = true;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => index
                .checked_sub(62)
                .and_then(|i| self.table.get(i))
                .map(|(name, value)| (&name[..], &value[..]))
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.0.len() + entry.1.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // Larger than the whole table: it empties it (RFC 7541 4.4).
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front(entry);
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 5.1).
fn integer(block: &mut &[u8], n: u8) -> Result<usize, HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError::Truncated)?;
    let mask = (1u8 << n) - 1;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        *block = rest;
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&byte, after) = rest.split_first().ok_or(HpackError::Truncated)?;
        rest = after;
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value = value
            .checked_add(usize::from(byte & 0x7f) << shift)
            .ok_or(HpackError::Overflow)?;
        shift += 7;
        if byte & 0x80 == 0 {
            *block = rest;
            return Ok(value);
        }
    }
}

/// Reads a string literal (RFC 7541 5.2), Huffman-decoded, onto `out`.
fn string(block: &mut &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let huffman = block.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(block, 7)?;
    if block.len() < len {
        return Err(HpackError::Truncated);
    }
    let (bytes, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(bytes, out)
    } else {
        out.extend_from_slice(bytes);
        Ok(())
    }
}

/// Writes an integer with an `n`-bit prefix; `flags` fills the first
/// byte's other bits.
fn put_integer(out: &mut Vec<u8>, flags: u8, n: u8, mut value: usize) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    put_integer(out, 0, 7, bytes.len());
    out.extend_from_slice(bytes);
}

/// Encodes `:status` (indexed when the static table has it).
pub fn encode_status(out: &mut Vec<u8>, status: u16) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            // Literal without indexing, name `:status` (index 8).
            put_integer(out, 0, 4, 8);
            let digits = [
                b'0' + (status / 100 % 10) as u8,
                b'0' + (status / 10 % 10) as u8,
                b'0' + (status % 10) as u8,
            ];
            put_string(out, &digits);
            return;
        }
    };
    out.push(0x80 | index);
}

/// Encodes one field as a literal without indexing (the name from the
/// static table when it is there), its name lowercased as HTTP/2 wants.
pub fn encode_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    match static_name(name) {
        Some(index) => put_integer(out, 0, 4, index),
        None => {
            out.push(0);
            put_integer(out, 0, 7, name.len());
            out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    put_string(out, value);
}

/// The static-table index of a (regular) header name, whatever its case.
fn static_name(name: &str) -> Option<usize> {
    static BY_LENGTH: OnceLock<Vec<Vec<(&'static str, usize)>>> = OnceLock::new();
    let by_length = BY_LENGTH.get_or_init(|| {
        let mut by_length = vec![Vec::new(); 32];
        for (i, (name, _)) in STATIC_TABLE.iter().enumerate().skip(14) {
            by_length[name.len()].push((*name, i + 1));
        }
        by_length
    });
    by_length
        .get(name.len())?
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
        .map(|&(_, index)| index)
}

/// One step of the Huffman decoder: a state (an inner node of the code
/// tree) reading four bits.
#[derive(Clone, Copy, Default)]
struct Step {
    next: u8,
    symbol: u8,
    emits: bool,
    fails: bool,
}

struct HuffmanTable {
    steps: Vec<[Step; 16]>,
    /// Whether input may end in this state: only a prefix of EOS (all
    /// ones), shorter than a byte, as padding (RFC 7541 5.2).
    accepts: Vec<bool>,
}

/// The decoder's table, built once from the code (4 bits at a time, as
/// nghttp2 and the h2 crate decode).
fn huffman_table() -> &'static HuffmanTable {
    static TABLE: OnceLock<HuffmanTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        // Inner nodes: children, a leaf as -(symbol + 1); root is 0.
        let mut nodes: Vec<[i32; 2]> = vec![[0, 0]];
        let mut accepts = vec![true];
        let codes = (0..256)
            .map(|s| (ENCODE_CODES[s], ENCODE_CODE_LENGTHS[s], s as i32))
            .chain(std::iter::once((EOS_CODE, EOS_LENGTH, 256)));
        for (code, len, symbol) in codes {
            let mut node = 0usize;
            for depth in (0..len).rev() {
                let bit = ((code >> depth) & 1) as usize;
                if depth == 0 {
                    nodes[node][bit] = -(symbol + 1);
                } else {
                    if nodes[node][bit] == 0 {
                        nodes.push([0, 0]);
                        let ones = accepts[node] && bit == 1 && len - depth <= 7;
                        accepts.push(ones);
                        nodes[node][bit] = (nodes.len() - 1) as i32;
                    }
                    node = nodes[node][bit] as usize;
                }
            }
        }
        let steps = (0..nodes.len())
            .map(|state| {
                let mut row = [Step::default(); 16];
                for (nibble, step) in row.iter_mut().enumerate() {
                    let mut node = state;
                    for shift in (0..4).rev() {
                        let child = nodes[node][(nibble >> shift) & 1];
                        if child < 0 {
                            let symbol = -child - 1;
                            if symbol == 256 {
                                step.fails = true;
                                break;
                            }
                            step.symbol = symbol as u8;
                            step.emits = true;
                            node = 0;
                        } else {
                            node = child as usize;
                        }
                    }
                    step.next = node as u8;
                }
                row
            })
            .collect();
        HuffmanTable { steps, accepts }
    })
}

fn huffman_decode(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let table = huffman_table();
    let mut state = 0usize;
    for &byte in bytes {
        for nibble in [byte >> 4, byte & 0x0f] {
            let step = table.steps[state][usize::from(nibble)];
            if step.fails {
                return Err(HpackError::Huffman);
            }
            if step.emits {
                out.push(step.symbol);
            }
            state = usize::from(step.next);
        }
    }
    if table.accepts[state] {
        Ok(())
    } else {
        Err(HpackError::Huffman)
    }
}

const EOS_CODE: u32 = 0x3fff_ffff;
const EOS_LENGTH: u8 = 30;

// The Huffman code of RFC 7541 Appendix B, as the h2 crate generates it
// (src/hpack/huffman/table.rs, MIT).
const ENCODE_CODES: [u32; 256] = [
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8, 0xffffea,
    0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed, 0xfffffee, 0xfffffef,
    0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7,
    0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa,
    0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18, 0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
    0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64,
    0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd,
    0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74,
    0x75, 0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe,
    0x7fc, 0x3ffd, 0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5,
    0x7fffd9, 0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf, 0xffffec,
    0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3, 0x7fffe4, 0x1fffdc, 0x3fffd8,
    0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc,
    0x7fffe8, 0x7fffe9, 0x1fffde, 0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb,
    0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea,
    0x3fffe2, 0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb,
    0x7fff1, 0x3fffe7, 0x7ffff2, 0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf,
    0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2,
    0xfffff2, 0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5, 0xfffec,
    0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3, 0x3fffea, 0x3fffeb, 0x1ffffee,
    0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed,
    0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea, 0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee,
    0x7ffffef, 0x7fffff0, 0x3ffffee,
];

const ENCODE_CODE_LENGTHS: [u8; 256] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28,
    28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6,
    6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7,
    8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7,
    15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24,
    23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23,
    23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26,
    26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20,
    21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27,
    27, 27, 26,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn decoded(decoder: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut fields = Fields::default();
        decoder.decode(block, &mut fields, 1 << 16).unwrap();
        fields
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn huffman_encode(text: &[u8]) -> Vec<u8> {
        let (mut bits, mut count, mut out) = (0u64, 0u32, Vec::new());
        for &b in text {
            bits = (bits << ENCODE_CODE_LENGTHS[b as usize]) | u64::from(ENCODE_CODES[b as usize]);
            count += u32::from(ENCODE_CODE_LENGTHS[b as usize]);
            while count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
            }
        }
        if count > 0 {
            out.push(((bits << (8 - count)) as u8) | (0xff >> count));
        }
        out
    }

    #[test]
    fn the_rfc_request_examples_decode_with_huffman_and_the_dynamic_table() {
        // RFC 7541 C.4: three requests on one connection.
        let mut decoder = Decoder::new(4096);
        let first = decoded(&mut decoder, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(
            first,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(decoder.size, 57);
        let second = decoded(&mut decoder, &hex("8286 84be 5886 a8eb 1064 9cbf"));
        assert_eq!(
            second,
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third = decoded(
            &mut decoder,
            &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        );
        assert_eq!(
            third,
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(decoder.size, 164);
    }

    #[test]
    fn every_byte_survives_a_huffman_round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        huffman_decode(&huffman_encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
        for text in [&b""[..], b"a", b"no-cache", b"0123456789/?&=%"] {
            out.clear();
            huffman_decode(&huffman_encode(text), &mut out).unwrap();
            assert_eq!(out, text);
        }
    }

    #[test]
    fn bad_huffman_padding_and_eos_are_refused() {
        let mut out = Vec::new();
        // "a" is 00011 (5 bits): padded with zeros instead of ones.
        assert_eq!(huffman_decode(&[0b0001_1000], &mut out), Err(HpackError::Huffman));
        // A whole byte of ones after a symbol is padding longer than 7 bits.
        let mut long = huffman_encode(b"ab");
        long.push(0xff);
        assert_eq!(huffman_decode(&long, &mut out), Err(HpackError::Huffman));
        // EOS itself, 30 ones.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff], &mut out),
            Err(HpackError::Huffman)
        );
    }

    #[test]
    fn what_the_encoder_writes_decodes_to_the_same_fields() {
        let mut block = Vec::new();
        encode_status(&mut block, 200);
        encode_status(&mut block, 418);
        encode_field(&mut block, "content-length", b"3");
        encode_field(&mut block, "Content-Type", b"text/plain");
        encode_field(&mut block, "X-Mixed-Case", b"1");
        encode_field(&mut block, "x-custom", &[b'v'; 300]);
        let mut decoder = Decoder::new(4096);
        let long = "v".repeat(300);
        assert_eq!(
            decoded(&mut decoder, &block),
            pairs(&[
                (":status", "200"),
                (":status", "418"),
                ("content-length", "3"),
                ("content-type", "text/plain"),
                ("x-mixed-case", "1"),
                ("x-custom", &long)
            ])
        );
        // Nothing was added to the table: the encoder needs no state.
        assert_eq!(decoder.size, 0);
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut decoder = Decoder::new(4096);
        let mut fields = Fields::default();
        assert_eq!(
            decoder.decode(&[0x80], &mut fields, 1 << 16),
            Err(HpackError::BadIndex(0))
        );
        assert_eq!(
            decoder.decode(&[0xbe], &mut fields, 1 << 16),
            Err(HpackError::BadIndex(62))
        );
        assert_eq!(
            decoder.decode(&[0x40, 0x05, b'a'], &mut fields, 1 << 16),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            decoder.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], &mut fields, 1 << 16),
            Err(HpackError::Overflow)
        );
        // A size update above our limit, and one after a field.
        assert_eq!(
            decoder.decode(&[0x3f, 0xe2, 0x1f], &mut fields, 1 << 16),
            Err(HpackError::TableSize(4097))
        );
        assert_eq!(
            decoder.decode(&[0x82, 0x20], &mut fields, 1 << 16),
            Err(HpackError::LateSizeUpdate)
        );
        // A header list over the limit.
        let mut block = Vec::new();
        encode_field(&mut block, "x-big", &[b'x'; 100]);
        assert_eq!(
            decoder.decode(&block, &mut fields, 64),
            Err(HpackError::TooLarge(64))
        );
    }

    #[test]
    fn a_size_update_evicts_and_an_entry_larger_than_the_table_empties_it() {
        let mut decoder = Decoder::new(4096);
        decoded(&mut decoder, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"));
        assert_eq!(decoder.table.len(), 1);
        // Size update to 0, then back to 4096 in the next block.
        decoded(&mut decoder, &[0x20]);
        assert_eq!((decoder.table.len(), decoder.size), (0, 0));
        let mut block = vec![0x3f, 0xe1, 0x1f];
        block.extend([0x40, 0x01, b'a', 0x7f, 0x80, 0x20]);
        block.extend(std::iter::repeat_n(b'x', 4096 + 127));
        decoded(&mut decoder, &block);
        assert_eq!((decoder.table.len(), decoder.size), (0, 0));
    }

    #[test]
    fn random_blocks_decode_or_fail_without_panicking() {
        // xorshift: reproducible, no dependency.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut decoder = Decoder::new(4096);
        let mut fields = Fields::default();
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            match decoder.decode(&block, &mut fields, 1 << 16) {
                Ok(()) => ok += 1,
                Err(_) => {
                    failed += 1;
                    // A connection would end here; a fresh table goes on.
                    decoder = Decoder::new(4096);
                }
            }
        }
        assert!(
            ok > 0 && failed > 0,
            "both outcomes seen: {ok} ok, {failed} failed"
        );
    }
}
