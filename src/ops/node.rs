//! A node's agent, read through its admin API (`loopmesh routes`,
//! `loopmesh status`): the JSON it serves, shown as it is, so what the
//! agent adds to `/routes` reaches the verbs without a change here.

use super::OpsError;
use std::net::SocketAddr;
use std::time::Duration;

/// How long the admin API may take to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// The JSON the agent at `addr` serves at `path`. `/ready` answers 503
/// with a JSON body while the agent is not ready: that body is the answer
/// too, so `accept_unready` takes it.
pub async fn fetch(
    addr: SocketAddr,
    path: &'static str,
    accept_unready: bool,
) -> Result<serde_json::Value, OpsError> {
    let admin_error = |reason: String| OpsError::Admin { addr, path, reason };
    let (status, body) = get(addr, path).await.map_err(admin_error)?;
    let unready = accept_unready && status == hyper::StatusCode::SERVICE_UNAVAILABLE;
    if !status.is_success() && !unready {
        return Err(admin_error(format!("status {status}")));
    }
    serde_json::from_str(&body).map_err(|err| admin_error(format!("not JSON: {err}")))
}

/// A GET on the admin API within [`ANSWER_WITHIN`]: status and body.
async fn get(addr: SocketAddr, path: &str) -> Result<(hyper::StatusCode, String), String> {
    use http_body_util::BodyExt;
    let exchange = async {
        let response = crate::http::get(&addr.ip().to_string(), addr.port(), path, "loopmesh").await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| err.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(ANSWER_WITHIN, exchange)
        .await
        .map_err(|_| format!("no answer within {}s", ANSWER_WITHIN.as_secs()))?
}
