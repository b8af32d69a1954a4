//! What every handler shares (the engine's control handle, the DNS table, the proxy
//! settings, gvproxy's exposed ports) and the reply type every handler returns.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;

use usernet_core::config::NetConfig;
use usernet_core::engine::control::ControlHandle;
use usernet_core::ports::Proto;
use usernet_core::services::dns::DnsRecords;

/// A port exposed through `/services/forwarder/expose`.
#[derive(Clone, Debug)]
pub struct Exposed {
    /// The remote as gvproxy would list it (`192.168.65.2:80`).
    pub remote: String,
    pub proto: Proto,
    /// Every host socket the engine serves for it.
    pub hosts: Vec<SocketAddr>,
}

/// What every handler shares.
pub struct State {
    pub control: ControlHandle,
    pub dns: Arc<DnsRecords>,
    pub cfg: Arc<NetConfig>,
    /// Ports exposed through gvproxy's `/services/forwarder/expose`, keyed by
    /// (`local` as the client wrote it, protocol), so that `/all` and `/unexpose` see the
    /// same strings the client used. Held across a whole expose/unexpose, which serialises
    /// them.
    pub exposed: tokio::sync::Mutex<BTreeMap<(String, &'static str), Exposed>>,
    /// The HTTP proxy configuration (`/v1/proxy`), shared with the proxy service; None when
    /// the API was started without one.
    pub proxy: Option<usernet_core::services::proxy::ProxySettings>,
    /// What `/v1/info` tells about this instance beyond the engine's state (set once, by
    /// [`ApiServer::set_about`](super::ApiServer::set_about)).
    pub about: std::sync::OnceLock<About>,
    /// The services' recent DNS queries and proxy requests (`/v1/log/*`), set once by
    /// [`ApiServer::set_activity`](super::ApiServer::set_activity).
    pub activity: std::sync::OnceLock<Arc<usernet_core::services::activity::Activity>>,
}

/// The instance as `/v1/info` describes it: how it was started, and when.
#[derive(Clone, Debug)]
pub struct About {
    /// `run` or `serve`.
    pub mode: String,
    /// `run`'s COMMAND; `serve`'s transports.
    pub command: Vec<String>,
    pub started: std::time::SystemTime,
    /// The API socket (filled in by `set_about`).
    pub api: Option<String>,
}

impl State {
    pub fn new(
        control: ControlHandle,
        dns: Arc<DnsRecords>,
        cfg: Arc<NetConfig>,
        proxy: Option<usernet_core::services::proxy::ProxySettings>,
    ) -> State {
        State {
            control,
            dns,
            cfg,
            exposed: tokio::sync::Mutex::new(BTreeMap::new()),
            proxy,
            about: std::sync::OnceLock::new(),
            activity: std::sync::OnceLock::new(),
        }
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

    pub fn method_not_allowed(allow: &'static str) -> Reply {
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
