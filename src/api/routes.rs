//! Routing: (method, path) to a handler, and the reply type every handler returns.
//!
//! Paths under `/v1/` answer JSON errors (`{"error": "..."}`), 404 for an unknown path and
//! 405 (with `Allow`) for a known path asked with the wrong method. The gvisor-tap-vsock
//! paths behave as gvproxy's Go `http.ServeMux` does: plain-text errors, "post only" with
//! 400 for a GET on a POST endpoint, and any method accepted on its read-only endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode};
use serde::Serialize;

use crate::config::NetConfig;
use crate::engine::control::ControlHandle;
use crate::services::dns::DnsRecords;

use super::{gvproxy, v1};

/// What every handler shares.
pub struct State {
    pub control: ControlHandle,
    pub dns: Arc<DnsRecords>,
    pub cfg: Arc<NetConfig>,
    /// Ports exposed through gvproxy's `/services/forwarder/expose`, keyed by
    /// (`local` as the client wrote it, protocol), so that `/all` and `/unexpose` see the
    /// same strings the client used. Held across a whole expose/unexpose, which serialises
    /// them.
    pub exposed: tokio::sync::Mutex<BTreeMap<(String, &'static str), gvproxy::Exposed>>,
    /// The HTTP proxy configuration (`/v1/proxy`), shared with the proxy service; None when
    /// the API was started without one.
    pub proxy: Option<crate::services::proxy::ProxySettings>,
}

impl State {
    pub fn new(
        control: ControlHandle,
        dns: Arc<DnsRecords>,
        cfg: Arc<NetConfig>,
        proxy: Option<crate::services::proxy::ProxySettings>,
    ) -> State {
        State { control, dns, cfg, exposed: tokio::sync::Mutex::new(BTreeMap::new()), proxy }
    }
}

/// An HTTP answer, before hyper sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<&'static str>,
    pub allow: Option<&'static str>,
    pub body: Vec<u8>,
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

impl Reply {
    /// A JSON body (with a trailing newline, as Go's json.Encoder writes it).
    pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Reply { status, content_type: Some(JSON), allow: None, body }
            }
            Err(e) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    /// usernet's own error shape: `{"error": "..."}`.
    pub fn error(status: StatusCode, message: impl Into<String>) -> Reply {
        #[derive(Serialize)]
        struct Error {
            error: String,
        }
        let mut body = serde_json::to_vec(&Error { error: message.into() }).unwrap_or_default();
        body.push(b'\n');
        Reply { status, content_type: Some(JSON), allow: None, body }
    }

    /// gvproxy's error shape (Go's `http.Error`): the message and a newline, as text.
    pub fn text(status: StatusCode, message: impl std::fmt::Display) -> Reply {
        Reply { status, content_type: Some(TEXT), allow: None, body: format!("{message}\n").into_bytes() }
    }

    /// No body.
    pub fn empty(status: StatusCode) -> Reply {
        Reply { status, content_type: None, allow: None, body: Vec::new() }
    }

    fn method_not_allowed(allow: &'static str) -> Reply {
        let mut r = Reply::error(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed (allowed: {allow})"));
        r.allow = Some(allow);
        r
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder().status(self.status);
        if let Some(ct) = self.content_type {
            builder = builder.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Some(allow) = self.allow {
            builder = builder.header(hyper::header::ALLOW, allow);
        }
        builder.body(Full::new(Bytes::from(self.body))).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// The answer when the engine does not answer (it has stopped).
pub fn engine_gone() -> Reply {
    Reply::error(StatusCode::SERVICE_UNAVAILABLE, "the network engine is not running")
}

/// Calls the handler for `method` and `path` with the whole request `body`; `caller` is
/// the guest's address when the request comes from inside the guest network.
pub async fn dispatch(
    state: &State,
    caller: Option<std::net::Ipv4Addr>,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Reply {
    // gvproxy's endpoints, with gvproxy's own method rules.
    match path {
        "/services/forwarder/expose" => return post_only(method, gvproxy::expose(state, caller, body)).await,
        "/services/forwarder/unexpose" => {
            return post_only(method, gvproxy::unexpose(state, body)).await;
        }
        "/services/dns/add" => return post_only(method, async { gvproxy::dns_add(state, body) }).await,
        "/services/forwarder/all" => return gvproxy::all(state).await,
        "/services/dhcp/leases" => return gvproxy::leases(state).await,
        "/services/dns/all" => return gvproxy::dns_all(state),
        "/stats" => return gvproxy::stats(state).await,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v1/") else {
        return if path.starts_with("/services/") || !path.starts_with("/v1") {
            Reply::text(StatusCode::NOT_FOUND, "404 page not found")
        } else {
            Reply::error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))
        };
    };
    let rest = rest.trim_end_matches('/');
    match (rest, method) {
        ("ports", &Method::GET) => v1::list_ports(state).await,
        ("ports", &Method::POST) => v1::add_ports(state, body).await,
        ("ports", &Method::DELETE) => v1::remove_ports(state, body).await,
        ("ports", _) => Reply::method_not_allowed("GET, POST, DELETE"),
        ("dns", &Method::GET) => v1::list_dns(state),
        ("dns", &Method::POST) => v1::add_dns(state, body),
        ("dns", _) => Reply::method_not_allowed("GET, POST"),
        ("leases", &Method::GET) => v1::leases(state).await,
        ("leases", _) => Reply::method_not_allowed("GET"),
        ("stats", &Method::GET) => v1::stats(state).await,
        ("stats", _) => Reply::method_not_allowed("GET"),
        ("flows", &Method::GET) => v1::flows(state).await,
        ("flows", _) => Reply::method_not_allowed("GET"),
        ("proxy", &Method::GET) => v1::get_proxy(state),
        ("proxy", &Method::PUT) => v1::put_proxy(state, body),
        ("proxy", _) => Reply::method_not_allowed("GET, PUT"),
        _ => match rest.strip_prefix("dns/") {
            Some(name) if !name.is_empty() && !name.contains('/') => match *method {
                Method::DELETE => v1::remove_dns(state, name),
                Method::GET => v1::get_dns(state, name),
                _ => Reply::method_not_allowed("GET, DELETE"),
            },
            _ => Reply::error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
        },
    }
}

/// gvproxy answers a non-POST on its POST endpoints with 400 "post only".
async fn post_only(method: &Method, handler: impl Future<Output = Reply>) -> Reply {
    if *method == Method::POST { handler.await } else { Reply::text(StatusCode::BAD_REQUEST, "post only") }
}
