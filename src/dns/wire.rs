//! The answer path of UDP and TCP alike: a query read in place, the
//! response assembled from the precomputed bytes of `answers`, nothing
//! allocated per query.
//!
//! Why not hickory-server's loops: its UDP loop spawns a task per datagram
//! and decodes and re-encodes whole messages, which held a stock server to
//! about 0.6× dnsmasq here; its TCP loop needs the zone a second time as
//! hickory records, and drops open connections when it stops (a takeover
//! must let them finish). hickory still parses the zone (`super::answers`).

use super::answers::{Lookup, MAX_NAME};
use super::Served;

/// Response codes (RFC 1035 §4.1.1, RFC 6891 for BADVERS).
pub mod rcode {
    pub const NOERROR: u16 = 0;
    pub const FORMERR: u16 = 1;
    pub const SERVFAIL: u16 = 2;
    pub const NXDOMAIN: u16 = 3;
    pub const NOTIMP: u16 = 4;
    pub const REFUSED: u16 = 5;
    pub const BADVERS: u16 = 16;
}

const HEADER: usize = 12;
const TYPE_OPT: u16 = 41;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;

/// Largest UDP answer offered to EDNS clients: the DNS flag day 2020 size,
/// which avoids IP fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Largest answer without EDNS (RFC 1035).
const CLASSIC_UDP: usize = 512;

/// What was answered, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub qtype: u16,
    pub rcode: u16,
    pub truncated: bool,
}

/// EDNS of a query (RFC 6891).
#[derive(Debug, Clone, Copy)]
struct Edns {
    payload: u16,
    version: u8,
}

fn be16(data: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([data[at], data[at + 1]])
}

/// How a query came, which sets how large its answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// 512 bytes, or the EDNS size up to [`MAX_UDP_PAYLOAD`]; past it the
    /// answer is truncated (TC) and the client asks again over TCP.
    Udp,
    /// Up to the 64 KiB a two-byte length prefix frames.
    Tcp,
}

/// Largest message over TCP (its length prefix is two bytes).
pub const MAX_TCP_MESSAGE: usize = u16::MAX as usize;

/// Writes the response to `query` into `out`. `None`: the message is not a
/// query worth answering (too short to carry an id, or a response), and is
/// dropped.
pub fn respond(served: &Served, query: &[u8], out: &mut Vec<u8>, transport: Transport) -> Option<Answered> {
    out.clear();
    if query.len() < HEADER || query[2] & 0x80 != 0 {
        return None;
    }
    let opcode = (query[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Some(header_only(query, out, rcode::NOTIMP));
    }
    let (qd, an, ns, ar) = (be16(query, 4), be16(query, 6), be16(query, 8), be16(query, 10));
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return Some(header_only(query, out, rcode::FORMERR));
    }
    // The question: a name (lowercased into `name`), type and class.
    let mut name = [0u8; MAX_NAME];
    let mut name_len = 0;
    let mut at = HEADER;
    loop {
        let Some(&len) = query.get(at) else {
            return Some(header_only(query, out, rcode::FORMERR));
        };
        let len = usize::from(len);
        // Compression pointers have no place in a question; labels are ≤ 63.
        if len > 63 || at + 1 + len > query.len() || name_len + 1 + len > MAX_NAME {
            return Some(header_only(query, out, rcode::FORMERR));
        }
        name[name_len] = len as u8;
        for (slot, byte) in name[name_len + 1..].iter_mut().zip(&query[at + 1..at + 1 + len]) {
            *slot = byte.to_ascii_lowercase();
        }
        name_len += 1 + len;
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    if at + 4 > query.len() {
        return Some(header_only(query, out, rcode::FORMERR));
    }
    let (qtype, qclass) = (be16(query, at), be16(query, at + 2));
    let question_end = at + 4;
    let edns = if ar == 1 {
        match read_opt(query, question_end) {
            Some(edns) => Some(edns),
            None => return Some(header_only(query, out, rcode::FORMERR)),
        }
    } else {
        None
    };
    let limit = match transport {
        Transport::Udp => edns.map_or(CLASSIC_UDP, |e| {
            usize::from(e.payload.clamp(512, MAX_UDP_PAYLOAD))
        }),
        Transport::Tcp => MAX_TCP_MESSAGE,
    };

    // Header, with the question echoed as sent (resolvers using 0x20 case
    // randomisation check it byte for byte).
    out.extend_from_slice(&query[..HEADER]);
    out.extend_from_slice(&query[HEADER..question_end]);
    if edns.is_some_and(|e| e.version > 0) {
        return Some(finish(
            out,
            query,
            qtype,
            edns,
            rcode::BADVERS,
            false,
            (0, 0, 0),
            limit,
        ));
    }
    if qclass != CLASS_IN && qclass != CLASS_ANY || qtype == TYPE_AXFR || qtype == TYPE_IXFR {
        return Some(finish(
            out,
            query,
            qtype,
            edns,
            rcode::REFUSED,
            false,
            (0, 0, 0),
            limit,
        ));
    }
    let (code, authoritative, counts) = match served.lookup(&name[..name_len], qtype) {
        Lookup::Found(sets) => {
            let (mut answers, mut additionals) = (0, 0);
            for set in sets.iter() {
                out.extend_from_slice(set.answer_wire);
                answers += set.answers;
            }
            for set in sets.iter() {
                out.extend_from_slice(set.additional_wire);
                additionals += set.additionals;
            }
            (rcode::NOERROR, true, (answers, 0, additionals))
        }
        Lookup::NoData(negative) => {
            out.extend_from_slice(&negative.wire);
            (rcode::NOERROR, true, (0, 1, 0))
        }
        Lookup::NxDomain(negative) => {
            out.extend_from_slice(&negative.wire);
            (rcode::NXDOMAIN, true, (0, 1, 0))
        }
        Lookup::Refused => (rcode::REFUSED, false, (0, 0, 0)),
        Lookup::NotLoaded => (rcode::SERVFAIL, false, (0, 0, 0)),
    };
    Some(finish(
        out,
        query,
        qtype,
        edns,
        code,
        authoritative,
        counts,
        limit,
    ))
}

/// Reads the OPT record that must be a query's only additional record.
fn read_opt(query: &[u8], at: usize) -> Option<Edns> {
    // Root owner (one zero byte), type, class = payload size, TTL = extended
    // rcode, version, flags; then RDATA (options, ignored).
    let fixed = query.get(at..at + 11)?;
    if fixed[0] != 0 || be16(fixed, 1) != TYPE_OPT {
        return None;
    }
    let rdlen = usize::from(be16(fixed, 9));
    if at + 11 + rdlen > query.len() {
        return None;
    }
    Some(Edns {
        payload: be16(fixed, 3),
        version: fixed[6],
    })
}

/// Sets the header of a response whose question and sections are in `out`,
/// truncating to `limit` (TC set, sections dropped) and appending OPT.
#[allow(clippy::too_many_arguments)]
fn finish(
    out: &mut Vec<u8>,
    query: &[u8],
    qtype: u16,
    edns: Option<Edns>,
    code: u16,
    authoritative: bool,
    (answers, authority, additional): (u16, u16, u16),
    limit: usize,
) -> Answered {
    let opt_len = if edns.is_some() { 11 } else { 0 };
    let mut counts = [1, answers, authority, additional];
    let truncated = out.len() + opt_len > limit;
    if truncated {
        // Whole records only: send none, and the client retries over TCP.
        let question_end = HEADER + question_len(query);
        out.truncate(question_end);
        counts = [1, 0, 0, 0];
    }
    if let Some(_edns) = edns {
        out.push(0); // root
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
        out.push((code >> 4) as u8); // extended rcode
        out.extend_from_slice(&[0, 0, 0, 0, 0]); // version 0, flags, no options
        counts[3] += 1;
    }
    let rd = query[2] & 0x01;
    out[2] = 0x80 | (u8::from(authoritative) << 2) | (u8::from(truncated) << 1) | rd;
    out[3] = (code & 0x0f) as u8;
    for (slot, count) in counts.iter().enumerate() {
        out[4 + 2 * slot..6 + 2 * slot].copy_from_slice(&count.to_be_bytes());
    }
    Answered {
        qtype,
        rcode: code,
        truncated,
    }
}

/// Bytes of the (already validated) question section.
fn question_len(query: &[u8]) -> usize {
    let mut at = HEADER;
    while query[at] != 0 {
        at += usize::from(query[at]) + 1;
    }
    at + 1 + 4 - HEADER
}

/// A response of just a header (no question): for messages whose question
/// cannot be trusted.
fn header_only(query: &[u8], out: &mut Vec<u8>, code: u16) -> Answered {
    out.clear();
    out.extend_from_slice(&query[..HEADER]);
    let opcode = query[2] & 0x78;
    out[2] = 0x80 | opcode | (query[2] & 0x01);
    out[3] = (code & 0x0f) as u8;
    out[4..HEADER].fill(0);
    Answered {
        qtype: 0,
        rcode: code,
        truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::answers::{wire_name, Answers, TEST_ZONE as ZONE};
    use hickory_server::proto::op::{Edns, Message, Query, ResponseCode};
    use hickory_server::proto::rr::{Name, RData, RecordType};

    fn served() -> Served {
        let zone = Name::from_ascii("mesh.internal.").unwrap();
        Served {
            origin_wire: wire_name(&zone),
            answers: Some(Answers::parse(ZONE, &zone).unwrap()),
        }
    }

    fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(payload) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            message.set_edns(e);
        }
        message.to_vec().unwrap()
    }

    fn ask(served: &Served, bytes: &[u8]) -> Message {
        let mut out = Vec::new();
        respond(served, bytes, &mut out, Transport::Udp).expect("answered");
        Message::from_vec(&out).expect("a well-formed response")
    }

    #[test]
    fn answers_echo_the_question_as_asked_with_aa_and_rd() {
        let served = served();
        let reply = ask(&served, &query("WeB.MESH.internal.", RecordType::A, None));
        assert_eq!(reply.metadata.id, 4242);
        assert!(reply.metadata.authoritative && reply.metadata.recursion_desired);
        assert!(!reply.metadata.recursion_available);
        assert_eq!(
            reply.queries[0].name().to_ascii(),
            "WeB.MESH.internal.",
            "0x20 case kept"
        );
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(
            reply.answers[0].data,
            RData::A("127.100.0.8".parse::<std::net::Ipv4Addr>().unwrap().into())
        );
        assert_eq!(reply.answers[0].ttl, 300);
        assert!(reply.edns.is_none(), "no OPT for a query without one");

        let srv = ask(
            &served,
            &query("_web._tcp.mesh.internal.", RecordType::SRV, Some(1232)),
        );
        assert_eq!(srv.answers.len(), 1);
        assert_eq!(srv.additionals.len(), 1, "the target's A rides along");
        assert_eq!(srv.edns.as_ref().map(|e| e.max_payload()), Some(MAX_UDP_PAYLOAD));
    }

    #[test]
    fn negative_answers_carry_the_soa_and_strangers_are_refused() {
        let served = served();
        let nx = ask(&served, &query("nope.mesh.internal.", RecordType::A, None));
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(nx.metadata.authoritative);
        assert_eq!(nx.authorities.len(), 1);
        assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
        let nodata = ask(&served, &query("web.mesh.internal.", RecordType::AAAA, None));
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authorities.len(), 1);
        let refused = ask(&served, &query("example.com.", RecordType::A, None));
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
        assert!(!refused.metadata.authoritative);
        let axfr = ask(&served, &query("mesh.internal.", RecordType::AXFR, None));
        assert_eq!(axfr.metadata.response_code, ResponseCode::Refused);
        let not_loaded = Served {
            origin_wire: served.origin_wire.clone(),
            answers: None,
        };
        let early = ask(&not_loaded, &query("web.mesh.internal.", RecordType::A, None));
        assert_eq!(early.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn big_answers_are_truncated_whole_and_fit_with_edns() {
        let mut zone = ZONE.to_string();
        for i in 0..60 {
            zone.push_str(&format!("big IN A 10.0.0.{i}\n"));
        }
        let name = Name::from_ascii("mesh.internal.").unwrap();
        let served = Served {
            origin_wire: wire_name(&name),
            answers: Some(Answers::parse(&zone, &name).unwrap()),
        };
        let classic = ask(&served, &query("big.mesh.internal.", RecordType::A, None));
        assert!(classic.metadata.truncation, "60 A records exceed 512 bytes");
        assert!(classic.answers.is_empty());
        let edns = ask(&served, &query("big.mesh.internal.", RecordType::A, Some(4096)));
        assert!(!edns.metadata.truncation);
        assert_eq!(edns.answers.len(), 60);
    }

    #[test]
    fn malformed_queries_get_formerr_and_responses_are_dropped() {
        let served = served();
        let mut out = Vec::new();
        assert!(
            respond(&served, &[0; 5], &mut out, Transport::Udp).is_none(),
            "too short for a header"
        );
        let mut response = query("web.mesh.internal.", RecordType::A, None);
        response[2] |= 0x80;
        assert!(
            respond(&served, &response, &mut out, Transport::Udp).is_none(),
            "a response is never answered"
        );
        let good = query("web.mesh.internal.", RecordType::A, None);
        for cut in [13, 20, good.len() - 2] {
            let answered = respond(&served, &good[..cut], &mut out, Transport::Udp).unwrap();
            assert_eq!(answered.rcode, rcode::FORMERR, "cut at {cut}");
            assert_eq!(&out[..2], &good[..2], "the id is kept");
        }
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert_eq!(
            respond(&served, &pointer, &mut out, Transport::Udp)
                .unwrap()
                .rcode,
            rcode::FORMERR
        );
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        assert_eq!(
            respond(&served, &notify, &mut out, Transport::Udp).unwrap().rcode,
            rcode::NOTIMP
        );
        let mut edns1 = query("web.mesh.internal.", RecordType::A, Some(1232));
        let version = edns1.len() - 5;
        edns1[version] = 1;
        let answered = respond(&served, &edns1, &mut out, Transport::Udp).unwrap();
        assert_eq!(answered.rcode, rcode::BADVERS);
        let reply = Message::from_vec(&out).unwrap();
        // 16 is BADVERS in an OPT (hickory names it BADSIG, the TSIG meaning).
        assert_eq!(
            u16::from(reply.metadata.response_code),
            16,
            "extended rcode in the OPT"
        );
    }
}
