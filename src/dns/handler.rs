//! DNS over TCP through hickory-server, answering from the same precomputed
//! zone as the UDP path. TCP carries what did not fit a UDP answer, so it
//! favours hickory's complete message handling over raw speed.

use super::answers::{wire_name, Lookup};
use super::wire::{Answered, MAX_UDP_PAYLOAD};
use super::{QueryMetrics, ZoneCell};
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use std::sync::Arc;
use std::time::Instant;

/// Answers TCP queries from the zone in `zone`.
pub struct TcpHandler {
    pub zone: Arc<ZoneCell>,
    pub metrics: Arc<QueryMetrics>,
}

#[async_trait::async_trait]
impl RequestHandler for TcpHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let mut builder = MessageResponseBuilder::from_message_request(request);
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        if request.edns.is_some() {
            builder.edns(&edns);
        }
        let empty = std::iter::empty::<&Record>;
        let query = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => info.query,
            Ok(_) => {
                return self
                    .fail(request, builder, response, ResponseCode::NotImp, started)
                    .await
            }
            Err(_) => {
                return self
                    .fail(request, builder, response, ResponseCode::FormErr, started)
                    .await
            }
        };
        let qtype = query.query_type();
        let class_served = matches!(query.query_class(), DNSClass::IN | DNSClass::ANY);
        if !class_served || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return self
                .fail(request, builder, response, ResponseCode::Refused, started)
                .await;
        }
        let served = self.zone.current();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let sent = match served.lookup(&wire_name(query.name()), u16::from(qtype)) {
            Lookup::Found(sets) => {
                let answers = sets.iter().flat_map(|set| &set.records);
                let additionals = sets.iter().flat_map(|set| &set.additionals);
                let message = builder.build(metadata, answers, empty(), empty(), additionals);
                response.send_response(message).await
            }
            Lookup::NoData(negative) => {
                let message = builder.build(metadata, empty(), empty(), [&negative.soa], empty());
                response.send_response(message).await
            }
            Lookup::NxDomain(negative) => {
                metadata.response_code = ResponseCode::NXDomain;
                let message = builder.build(metadata, empty(), empty(), [&negative.soa], empty());
                response.send_response(message).await
            }
            Lookup::Refused => {
                return self
                    .fail(request, builder, response, ResponseCode::Refused, started)
                    .await
            }
            Lookup::NotLoaded => {
                return self
                    .fail(request, builder, response, ResponseCode::ServFail, started)
                    .await
            }
        };
        self.finish(sent, request, u16::from(qtype), started)
    }
}

impl TcpHandler {
    /// Sends an error response (no records, not authoritative).
    async fn fail<R: ResponseHandler>(
        &self,
        request: &Request,
        builder: MessageResponseBuilder<'_>,
        mut response: R,
        code: ResponseCode,
        started: Instant,
    ) -> ResponseInfo {
        let qtype = request
            .request_info()
            .map_or(0, |info| u16::from(info.query.query_type()));
        let sent = response
            .send_response(builder.error_msg(&request.metadata, code))
            .await;
        self.finish(sent, request, qtype, started)
    }

    fn finish<E: std::fmt::Display>(
        &self,
        sent: Result<ResponseInfo, E>,
        request: &Request,
        qtype: u16,
        started: Instant,
    ) -> ResponseInfo {
        match sent {
            Ok(info) => {
                let answered = Answered {
                    qtype,
                    rcode: u16::from(info.response_code),
                    truncated: false,
                };
                self.metrics.record(answered, "tcp", Some(started.elapsed()));
                info
            }
            Err(err) => {
                tracing::debug!("dns: cannot answer {} over tcp: {err}", request.src());
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
