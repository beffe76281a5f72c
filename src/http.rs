//! One HTTP/1.1 GET over a fresh connection, with hyper: the registrar's
//! HTTP check and `loopmesh routes` (the agent's admin API) both use it.

use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpStream;

/// GETs `path` from `host:port`; the response with its body unread. The
/// error says what failed (connect, or the exchange) for the caller to
/// prefix with the URL.
pub async fn get(
    host: &str,
    port: u16,
    path: &str,
    user_agent: &str,
) -> Result<hyper::Response<Incoming>, String> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| err.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::USER_AGENT, user_agent)
        .body(Empty::<Bytes>::new())
        .map_err(|err| err.to_string())?;
    sender.send_request(request).await.map_err(|err| err.to_string())
}
