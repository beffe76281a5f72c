//! The mesh zone, parsed once per reload into answers ready to send.
//!
//! Why precompute: a stock hickory-dns server answers at about 0.6× dnsmasq
//! on this class of machine, mostly per-query work (lookups through an
//! authority, record sets cloned, every name encoded). The zone only changes
//! when the catalog does, so each (name, type) gets its records and their
//! wire form built here, and a query costs one hash lookup and a copy.
//! A new zone is built whole beside the old one and swapped in (see
//! `super::ZoneCell`), so no query ever sees half of one.

use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType, RrKey};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};
use hickory_server::proto::serialize::txt::Parser;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;

/// Longest name on the wire (RFC 1035 §2.3.4).
pub const MAX_NAME: usize = 255;

/// Records of one type at one name, in wire form only: the parsed records
/// are not kept (UDP and TCP both answer from these bytes).
#[derive(Debug, Clone, Copy)]
pub struct RrSet<'a> {
    pub rtype: u16,
    /// Answer records whose owner is a pointer to the question (offset 12).
    pub answer_wire: &'a [u8],
    pub answers: u16,
    /// In-zone address records of the names these records point at (SRV,
    /// NS and MX targets), sent in the additional section.
    pub additional_wire: &'a [u8],
    pub additionals: u16,
}

/// Where a record set's bytes are in the zone's one byte buffer.
#[derive(Debug, Clone, Copy)]
struct SetEntry {
    rtype: u16,
    answers: u16,
    additionals: u16,
    answer: (u32, u32),
    additional: (u32, u32),
}

/// A name of the zone: its hash, where its wire form is, and its sets.
#[derive(Debug, Clone, Copy)]
struct NameEntry {
    hash: u64,
    name: (u32, u32),
    first_set: u32,
    sets: u16,
}

/// Record sets found for a question: one, or every set at the name for
/// ANY.
#[derive(Debug, Clone, Copy)]
pub struct Sets<'a> {
    entries: &'a [SetEntry],
    bytes: &'a [u8],
}

impl<'a> Sets<'a> {
    pub fn iter(self) -> impl Iterator<Item = RrSet<'a>> + 'a {
        let bytes = self.bytes;
        let span = move |(at, len): (u32, u32)| &bytes[at as usize..(at + len) as usize];
        self.entries.iter().map(move |set| RrSet {
            rtype: set.rtype,
            answer_wire: span(set.answer),
            answers: set.answers,
            additional_wire: span(set.additional),
            additionals: set.additionals,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What the zone says about one question.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// Record sets to answer with: one, or every set at the name for ANY.
    Found(Sets<'a>),
    /// The name exists without records of that type: NOERROR, SOA in authority.
    NoData(&'a Negative),
    /// Inside the zone, no such name: NXDOMAIN, SOA in authority.
    NxDomain(&'a Negative),
    /// Outside the zone: REFUSED, the agent answers for nothing else.
    Refused,
    /// Inside the zone, but no zone has loaded yet: SERVFAIL (try later).
    NotLoaded,
}

/// The SOA sent with negative answers (TTL per RFC 2308), in wire form.
#[derive(Debug)]
pub struct Negative {
    /// Its TTL: the SOA's minimum, or its own TTL if lower.
    pub ttl: u32,
    pub wire: Vec<u8>,
}

/// Everything the server answers from: one parsed, validated zone.
///
/// Three buffers whatever the zone's size: every name and record in wire
/// form in one byte buffer, the record sets, and the names sorted by hash.
/// A zone of 10k services is then a few large allocations rather than
/// 100k small ones, which a rebuild would leave scattered through the heap
/// (the parse's garbage between them) for good.
#[derive(Debug)]
pub struct Answers {
    origin: Name,
    /// The apex in lowercase wire form.
    origin_wire: Vec<u8>,
    serial: u32,
    negative: Negative,
    bytes: Vec<u8>,
    sets: Vec<SetEntry>,
    /// Lowercase wire names by hash; names that only hold others
    /// (`_tcp.zone`) are present with no sets, so they answer NODATA.
    names: Vec<NameEntry>,
    records: usize,
}

impl Answers {
    /// Parses zone text (RFC 1035 master format) for apex `zone`.
    pub fn parse(text: &str, zone: &Name) -> Result<Answers, String> {
        // The last $ORIGIN may name a subdomain; the apex is dns.zone, and
        // the SOA and every record must sit there or below.
        let (_, sets) = parse_text(text, zone).map_err(|err| match first_failing_line(text, zone, &err) {
            Some(line) => format!("line {line}: {err}"),
            None => err,
        })?;
        let origin = zone.to_lowercase();
        let origin_wire = wire_name(&origin);
        let mut by_name: HashMap<Box<[u8]>, RecordsByType> = HashMap::new();
        let mut soa = None;
        let mut records = 0;
        for set in sets.values() {
            let name = set.name();
            if !origin.zone_of(name) {
                return Err(format!("record {name} lies outside the zone {origin}"));
            }
            let set_records: Vec<Record> = set.records_without_rrsigs().cloned().collect();
            for record in &set_records {
                if record.dns_class != DNSClass::IN {
                    return Err(format!(
                        "record {name} has class {}, only IN is served",
                        record.dns_class
                    ));
                }
            }
            if set.record_type() == RecordType::SOA {
                if name.to_lowercase() != origin {
                    return Err(format!(
                        "SOA at {name}: the only SOA belongs at the apex {origin}"
                    ));
                }
                soa = set_records.first().cloned();
            }
            records += set_records.len();
            let wire = wire_name(name);
            // Every name between this one and the apex exists (empty non-terminals).
            let mut at = 0;
            while wire[at..] != origin_wire[..] {
                by_name.entry(wire[at..].into()).or_default();
                at += usize::from(wire[at]) + 1;
            }
            by_name
                .entry(wire.into())
                .or_default()
                .push((u16::from(set.record_type()), set_records));
        }
        let soa = soa.ok_or_else(|| format!("it has no SOA record at {origin}"))?;
        let RData::SOA(soa_data) = &soa.data else {
            return Err("its SOA record has no SOA data".into());
        };
        let mut negative_soa = soa.clone();
        negative_soa.ttl = soa.ttl.min(soa_data.minimum);
        let serial = soa_data.serial;
        let negative = Negative {
            wire: encode_full(std::slice::from_ref(&negative_soa))?,
            ttl: negative_soa.ttl,
        };

        // Addresses of SRV/NS/MX targets inside the zone, for the additional
        // section, found before the record sets are moved into their answers.
        let address_of = |target: &Name| -> Vec<Record> {
            let Some(sets) = by_name.get(wire_name(target).as_slice()) else {
                return Vec::new();
            };
            sets.iter()
                .filter(|(rtype, _)| {
                    *rtype == u16::from(RecordType::A) || *rtype == u16::from(RecordType::AAAA)
                })
                .flat_map(|(_, records)| records.iter().cloned())
                .collect()
        };
        let mut extra: HashMap<(Box<[u8]>, u16), Vec<Record>> = HashMap::new();
        for (wire, sets) in &by_name {
            for (rtype, records) in sets {
                let additionals: Vec<Record> = records
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::SRV(srv) => Some(&srv.target),
                        RData::NS(ns) => Some(&ns.0),
                        RData::MX(mx) => Some(&mx.exchange),
                        _ => None,
                    })
                    .flat_map(address_of)
                    .collect();
                if !additionals.is_empty() {
                    extra.insert((wire.clone(), *rtype), additionals);
                }
            }
        }
        let mut bytes = Vec::new();
        let mut all_sets = Vec::new();
        let mut names = Vec::with_capacity(by_name.len());
        for (wire, sets) in by_name {
            let name = append(&mut bytes, &wire)?;
            let first_set = u32::try_from(all_sets.len()).map_err(|_| "too many record sets".to_string())?;
            let count =
                u16::try_from(sets.len()).map_err(|_| format!("too many record types at {name:?}"))?;
            for (rtype, records) in sets {
                let additionals = extra.remove(&(wire.clone(), rtype)).unwrap_or_default();
                all_sets.push(rrset(&mut bytes, rtype, records, additionals)?);
            }
            names.push(NameEntry {
                hash: fnv(&wire),
                name,
                first_set,
                sets: count,
            });
        }
        names.sort_unstable_by_key(|entry| entry.hash);
        bytes.shrink_to_fit();
        all_sets.shrink_to_fit();
        Ok(Answers {
            origin,
            origin_wire,
            serial,
            negative,
            bytes,
            sets: all_sets,
            names,
            records,
        })
    }

    /// The zone's apex.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The SOA serial (the catalog revision the zone was rendered from).
    pub fn serial(&self) -> u32 {
        self.serial
    }

    /// Records in the zone.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether the zone holds no records (never: it has an SOA).
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Answers a question; `name` is the lowercase wire form.
    pub fn lookup(&self, name: &[u8], rtype: u16) -> Lookup<'_> {
        if !in_zone(name, &self.origin_wire) {
            return Lookup::Refused;
        }
        let Some(entry) = self.find(name) else {
            return Lookup::NxDomain(&self.negative);
        };
        let start = entry.first_set as usize;
        let sets = &self.sets[start..start + usize::from(entry.sets)];
        let found = |entries| {
            Lookup::Found(Sets {
                entries,
                bytes: &self.bytes,
            })
        };
        if rtype == u16::from(RecordType::ANY) && !sets.is_empty() {
            // ANY: every record at the name (RFC 8482 would allow less).
            return found(sets);
        }
        let cname = u16::from(RecordType::CNAME);
        let at = sets
            .iter()
            .position(|set| set.rtype == rtype)
            // A name with a CNAME has nothing else: answer the alias, the
            // resolver follows it.
            .or_else(|| sets.iter().position(|set| set.rtype == cname));
        match at {
            Some(at) => found(&sets[at..=at]),
            None => Lookup::NoData(&self.negative),
        }
    }

    /// The entry of wire name `name`, if the zone has it.
    fn find(&self, name: &[u8]) -> Option<&NameEntry> {
        let hash = fnv(name);
        let first = self.names.partition_point(|entry| entry.hash < hash);
        self.names[first..]
            .iter()
            .take_while(|entry| entry.hash == hash)
            .find(|entry| {
                let (at, len) = entry.name;
                &self.bytes[at as usize..(at + len) as usize] == name
            })
    }
}

/// Record sets of one name, by type.
type RecordsByType = Vec<(u16, Vec<Record>)>;

/// FNV-1a for the name map: names are short, so SipHash's setup cost
/// dominated the lookup; the keys are the zone's own (queries only look
/// up), so a hash an attacker can predict cannot degrade the table.
#[derive(Default)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let start = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        self.0 = bytes.iter().fold(start, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    }
}

type ParsedZone = BTreeMap<RrKey, RecordSet>;

fn parse_text(text: &str, zone: &Name) -> Result<(Name, ParsedZone), String> {
    Parser::new(text, None, Some(zone.clone()))
        .parse()
        .map_err(|err| err.to_string())
}

/// The line a parse error comes from, which hickory's message leaves out:
/// the shortest prefix of the text that fails the same way (bisected, so
/// only the error path pays, about log2(lines) parses).
fn first_failing_line(text: &str, zone: &Name, error: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let fails_alike = |n: usize| parse_text(&lines[..n].join("\n"), zone).err().as_deref() == Some(error);
    if !fails_alike(lines.len()) {
        return None;
    }
    let (mut good, mut bad) = (0, lines.len());
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if fails_alike(mid) {
            bad = mid;
        } else {
            good = mid;
        }
    }
    Some(bad)
}

/// Whether wire name `name` is `origin` or below it (label-aligned).
pub fn in_zone(name: &[u8], origin: &[u8]) -> bool {
    let mut at = 0;
    while at < name.len() {
        if name[at..] == *origin {
            return true;
        }
        at += usize::from(name[at]) + 1;
    }
    false
}

/// A name in lowercase wire form: length-prefixed labels, then the root.
pub fn wire_name(name: &Name) -> Vec<u8> {
    let mut wire = Vec::with_capacity(MAX_NAME);
    for label in name.iter() {
        wire.push(label.len() as u8);
        wire.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    wire.push(0);
    wire
}

/// FNV-1a of a wire name (see [`Fnv`]).
fn fnv(bytes: &[u8]) -> u64 {
    let mut hasher = Fnv::default();
    hasher.write(bytes);
    hasher.finish()
}

/// Appends `data` to the zone's byte buffer; where it is.
fn append(bytes: &mut Vec<u8>, data: &[u8]) -> Result<(u32, u32), String> {
    let at = u32::try_from(bytes.len()).map_err(|_| "the zone is larger than 4 GiB".to_string())?;
    bytes.extend_from_slice(data);
    Ok((at, data.len() as u32))
}

fn rrset(
    bytes: &mut Vec<u8>,
    rtype: u16,
    records: Vec<Record>,
    additionals: Vec<Record>,
) -> Result<SetEntry, String> {
    let mut answer_wire = Vec::new();
    for record in &records {
        // The owner is the question's name: a pointer to offset 12.
        answer_wire.extend_from_slice(&[0xc0, 0x0c]);
        encode_after_owner(record, &mut answer_wire)?;
    }
    let additional_wire = encode_full(&additionals)?;
    Ok(SetEntry {
        rtype,
        answers: count(&records)?,
        additionals: count(&additionals)?,
        answer: append(bytes, &answer_wire)?,
        additional: append(bytes, &additional_wire)?,
    })
}

/// A section's record count as the header carries it.
fn count(records: &[Record]) -> Result<u16, String> {
    u16::try_from(records.len()).map_err(|_| format!("{} records of one type at one name", records.len()))
}

/// Records with their owner names written out (no compression).
fn encode_full(records: &[Record]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for record in records {
        out.extend_from_slice(&wire_name(&record.name));
        encode_after_owner(record, &mut out)?;
    }
    Ok(out)
}

/// Type, class, TTL and RDATA of a record, names inside uncompressed so the
/// bytes are valid at any offset of any message.
fn encode_after_owner(record: &Record, out: &mut Vec<u8>) -> Result<(), String> {
    let mut rdata = Vec::new();
    {
        let mut encoder = BinEncoder::new(&mut rdata);
        encoder.set_name_encoding(NameEncoding::Uncompressed);
        record
            .data
            .emit(&mut encoder)
            .map_err(|err| format!("record {} cannot be encoded: {err}", record.name))?;
    }
    let length = u16::try_from(rdata.len()).map_err(|_| format!("record {} is too large", record.name))?;
    out.extend_from_slice(&u16::from(record.record_type()).to_be_bytes());
    out.extend_from_slice(&u16::from(record.dns_class).to_be_bytes());
    out.extend_from_slice(&record.ttl.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&rdata);
    Ok(())
}

/// A small zone for the DNS unit tests.
#[cfg(test)]
pub const TEST_ZONE: &str = "$ORIGIN mesh.internal.
$TTL 300
@ IN SOA ns.mesh.internal. hostmaster.mesh.internal. ( 42 3600 600 86400 30 )
@ IN NS ns.mesh.internal.
ns IN A 127.0.0.153
web IN A 127.100.0.8
_web._tcp IN SRV 0 0 8080 web.mesh.internal.
";

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = TEST_ZONE;

    fn zone() -> Name {
        Name::from_ascii("mesh.internal.").unwrap()
    }

    fn wire(name: &str) -> Vec<u8> {
        wire_name(&Name::from_ascii(name).unwrap())
    }

    #[test]
    fn answers_by_name_and_type_and_tells_nodata_from_nxdomain() {
        let answers = Answers::parse(ZONE, &zone()).unwrap();
        assert_eq!(answers.serial(), 42);
        assert_eq!(answers.len(), 5);
        let a = u16::from(RecordType::A);
        let Lookup::Found(sets) = answers.lookup(&wire("web.mesh.internal."), a) else {
            panic!("web A not found");
        };
        let [set] = sets.iter().collect::<Vec<_>>()[..] else {
            panic!("one set");
        };
        assert_eq!(set.answers, 1);
        // Pointer to the question, type A, class IN, TTL, length 4, address.
        assert_eq!(&set.answer_wire[..4], &[0xc0, 0x0c, 0, 1]);
        assert_eq!(&set.answer_wire[set.answer_wire.len() - 4..], &[127, 100, 0, 8]);
        let Lookup::Found(sets) = answers.lookup(&wire("_web._tcp.mesh.internal."), 33) else {
            panic!("SRV not found");
        };
        let [srv] = sets.iter().collect::<Vec<_>>()[..] else {
            panic!("one set");
        };
        assert_eq!(
            srv.additionals, 1,
            "the SRV target's address goes in the additional section"
        );
        assert!(matches!(
            answers.lookup(&wire("web.mesh.internal."), 28),
            Lookup::NoData(_)
        ));
        assert!(matches!(
            answers.lookup(&wire("_tcp.mesh.internal."), a),
            Lookup::NoData(_)
        ));
        let Lookup::NxDomain(negative) = answers.lookup(&wire("nope.mesh.internal."), a) else {
            panic!("nope should not exist");
        };
        assert_eq!(negative.ttl, 30, "negative TTL is the SOA minimum");
        assert!(matches!(
            answers.lookup(&wire("example.com."), a),
            Lookup::Refused
        ));
        assert!(matches!(
            answers.lookup(&wire("xmesh.internal."), a),
            Lookup::Refused
        ));
        assert!(matches!(answers.lookup(&wire("internal."), a), Lookup::Refused));
    }

    #[test]
    fn refuses_zones_that_do_not_fit() {
        let cases = [
            (
                ZONE.replace("mesh.internal.", "other.internal."),
                "outside the zone",
            ),
            (ZONE.replace("@ IN SOA", "; @ IN SOA"), "no SOA"),
            (
                format!("{ZONE}www.example.com. IN A 10.0.0.1\n"),
                "outside the zone",
            ),
            (format!("{ZONE}web IN A not-an-address\n"), "line 8: "),
        ];
        for (text, expected) in cases {
            let err = Answers::parse(&text, &zone()).unwrap_err();
            assert!(err.contains(expected), "{err:?} should mention {expected:?}");
        }
    }
}
