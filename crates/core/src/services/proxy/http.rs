//! The HTTP side of the proxy: the explicit proxy's requests and intercepted plain HTTP.
//!
//! Theory of operation: hyper's HTTP/1 server reads the guest's requests one at a time on
//! its connection (keep-alive included), and [`Conn::handle`] routes each one on its own:
//!
//! - [`Mode::Explicit`] (port 3128): requests are absolute-form (`GET http://name/path`) or
//!   `CONNECT name:port`. A CONNECT is answered 200 once the tunnel stands (through the
//!   HTTPS upstream with its own CONNECT, or a direct connection), then hyper hands over the
//!   raw connection and both ends are relayed.
//! - [`Mode::Transparent`]: the guest thinks it talks to the origin; requests are
//!   origin-form and the destination's name comes from the Host header, the port from the
//!   address the guest dialled.
//!
//! A request to the upstream goes in absolute-form with `Proxy-Authorization` when the
//! upstream URL has credentials; a direct one in origin-form, to the resolved name
//! (explicit) or the address the guest dialled (transparent). Hop-by-hop headers are
//! dropped both ways. The connection to the last hop is kept for the next request when it
//! goes the same way; a request that a reused connection could not even send (the far end
//! had just closed it) is sent again once on a new one. Each request is put to the egress
//! policy first (`Proxy::admit`): a denial is a 403. Failures come back as an HTTP
//! error with a one-line `usernet: ...` reason, and a `warn` log line.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixStream;
use tracing::{debug, info, warn};

use super::config::{self, ProxyUrl, split_host_port, valid_host};
use super::idle::{self, Watch};
use super::{Proxy, ProxyError, Slot, dial, dial_upstream, open_tunnel, relay};
use crate::services::activity::{ProxyLogEntry, clip, now_ms};
use crate::services::metrics::ProxyOutcome;

/// How the guest reached the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The gateway's port 3128.
    Explicit,
    /// Intercepted on its way to this destination.
    Transparent(SocketAddr),
}

type Body = BoxBody<Bytes, hyper::Error>;

/// Where one request goes next.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Hop {
    Upstream(ProxyUrl),
    Direct(SocketAddr),
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hop::Upstream(up) => write!(f, "upstream {}", up.authority()),
            Hop::Direct(a) => write!(f, "direct {a}"),
        }
    }
}

/// The destination of one request.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    /// Name or IP literal, lower case, no brackets.
    host: String,
    port: u16,
    /// The address the guest dialled (transparent mode).
    ip: Option<IpAddr>,
    /// Path and query, at least "/".
    path: String,
}

impl Target {
    /// `http://host[:port]/path`.
    fn absolute_uri(&self) -> String {
        format!("http://{}{}", self.host_header(), self.path)
    }

    /// `host` or `host:port` (brackets around IPv6), as a Host header says it.
    fn host_header(&self) -> String {
        if self.port == 80 {
            if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() }
        } else {
            config::authority(&self.host, self.port)
        }
    }
}

/// One guest connection.
struct Conn {
    proxy: Arc<Proxy>,
    mode: Mode,
    guest: SocketAddr,
    /// The connection of the last request, kept for the next one.
    idle: Mutex<Option<(Hop, SendRequest<Body>)>>,
    /// The guest's traffic, for the idle timeout (a CONNECT tunnel's too).
    activity: Watch,
    /// Its place among `--max-proxy-connections`, held by a CONNECT tunnel too.
    slot: Slot,
}

/// Serves one guest connection until it closes. A request's header must come whole within
/// `--proxy-header-timeout` (hyper's header read timeout, which also runs while a kept-alive
/// connection waits for its next request); a connection, or a CONNECT tunnel, that carries
/// nothing either way for `--proxy-idle-timeout` (a request waiting on a silent next hop) is
/// closed.
pub async fn serve(proxy: Arc<Proxy>, sock: UnixStream, mode: Mode, guest: SocketAddr, slot: Slot) {
    let (sock, activity) = idle::watch(sock);
    let limits = proxy.cfg.limits;
    let what = match mode {
        Mode::Explicit => format!("{guest} (explicit proxy)"),
        Mode::Transparent(dst) => format!("{guest} -> {dst} (HTTP)"),
    };
    let conn =
        Arc::new(Conn { proxy: proxy.clone(), mode, guest, idle: Mutex::new(None), activity: activity.clone(), slot });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move {
            let (method, host) = (req.method().to_string(), logged_host(&req, conn.mode));
            let resp = conn.handle(req).await;
            let outcome = outcome(&resp);
            conn.proxy.dns.metrics().proxy_request(outcome);
            conn.proxy.dns.activity().proxy.push(ProxyLogEntry {
                time_ms: now_ms(),
                guest: conn.guest.to_string(),
                mode: match conn.mode {
                    Mode::Explicit => "explicit",
                    Mode::Transparent(_) => "transparent",
                },
                method: clip(&method),
                host: clip(&host),
                status: Some(resp.status().as_u16()),
                outcome: outcome.as_str(),
                via: resp.extensions().get::<Via>().map_or(String::new(), |v| clip(&v.0)),
            });
            Ok::<_, Infallible>(resp)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper adds it to the time: one too long for that (no flag allows one) is as
        // good as never.
        .header_read_timeout(limits.proxy_header_timeout.min(super::NEVER))
        .serve_connection(TokioIo::new(sock), service)
        .with_upgrades();
    tokio::select! {
        r = served => match r {
            // The guest had sent nothing since its last answer: a kept-alive connection
            // that was not used again, closed as any server would.
            Err(e) if e.is_timeout() && activity.answered_last() => debug!("proxy: {what}: kept-alive connection closed"),
            Err(e) if e.is_timeout() => proxy.header_timed_out(&what),
            Err(e) => debug!("proxy: {guest}: connection: {e}"),
            Ok(()) => {}
        },
        () = activity.idle(limits.proxy_idle_timeout) => proxy.idle_closed(&what),
    }
}

/// The destination of a request as the proxy log shows it: the URL's authority (CONNECT's
/// target), else the Host header, else the address the guest dialled.
fn logged_host(req: &Request<Incoming>, mode: Mode) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| match mode {
            Mode::Transparent(dst) => dst.to_string(),
            Mode::Explicit => "?".to_string(),
        })
}

/// Where a forwarded request went (`direct ADDR`, `upstream HOST:PORT`), for the proxy log
/// (a response extension: never sent).
#[derive(Clone)]
struct Via(String);

/// Marks the answers the proxy makes itself (a response extension: never sent).
#[derive(Clone, Copy)]
struct OwnAnswer;

/// Marks the answers to requests the egress policy denied (a response extension).
#[derive(Clone, Copy)]
struct Denied;

/// How a request ended, for `/metrics`: answers of our own are errors (4xx: the guest's
/// request was wrong; otherwise the next hop failed), the others came from the next hop.
fn outcome(resp: &Response<Body>) -> ProxyOutcome {
    if resp.extensions().get::<OwnAnswer>().is_none() {
        ProxyOutcome::Forwarded
    } else if resp.extensions().get::<Denied>().is_some() {
        ProxyOutcome::Denied
    } else if matches!(resp.status().as_u16(), 400 | 405) {
        ProxyOutcome::BadRequest
    } else {
        ProxyOutcome::UpstreamError
    }
}

/// A plain-text answer of usernet's own: `usernet: <reason>`.
fn error_response(status: u16, reason: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("usernet: {reason}\n"))).map_err(|never| match never {}).boxed();
    let mut r = Response::new(body);
    r.extensions_mut().insert(OwnAnswer);
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed()
}

/// Removes the hop-by-hop headers (RFC 9110 7.6.1), those named by Connection included.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in ["connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "trailer", "upgrade"] {
        headers.remove(name);
    }
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return self.connect(req).await;
        }
        let target = match self.target(&req) {
            Ok(t) => t,
            Err(reason) => return error_response(400, reason),
        };
        let cfg = self.proxy.settings.get();
        let upstream = match &cfg.http {
            Some(up)
                if !self.proxy.is_local(&target.host)
                    && !cfg.no_proxy.matches(Some(&target.host), target.ip, target.port) =>
            {
                Some(up.clone())
            }
            _ => None,
        };
        // The egress policy: the engine judged the address an intercepted guest dialled;
        // the rest is judged here, by the name an upstream resolves or the address dialled.
        let hop = match upstream {
            Some(up) => match self.proxy.admit(&target.host, None, target.port, self.guest).await {
                Ok(()) => Hop::Upstream(up),
                Err(e) => return self.fail(&target.absolute_uri(), e),
            },
            None => match self.mode {
                Mode::Transparent(dst) => Hop::Direct(dst),
                Mode::Explicit => match self.proxy.resolve(&target.host, target.port).await {
                    Ok(a) => match self.proxy.admit(&target.host, Some(a.ip()), target.port, self.guest).await {
                        Ok(()) => Hop::Direct(a),
                        Err(e) => return self.fail(&target.absolute_uri(), e),
                    },
                    Err(e) => return self.fail(&target.absolute_uri(), e),
                },
            },
        };
        let method = req.method().clone();
        let mut req = match outgoing(req, &target, &hop) {
            Ok(r) => r,
            Err(reason) => return error_response(400, reason),
        };
        // A request with no body and an idempotent method may go again on a new connection
        // when a reused one closes under it after it was written (RFC 9110 9.2.2): the far
        // end had closed it (tinyproxy closes after each answer) just as it went out.
        let mut again =
            (is_idempotent(&method) && hyper::body::Body::is_end_stream(req.body())).then(|| without_body(&req));
        // Once on the kept connection (if any), once more on a new one if it had closed.
        for fresh in [false, true] {
            let (mut sender, reused) = match self.sender(&hop, fresh).await {
                Ok(s) => s,
                Err(e) => return self.fail(&target.absolute_uri(), e),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some((hop.clone(), sender));
                    return self.answer(resp, &method, &target, &hop);
                }
                Err(mut e) => match (e.take_message(), again.take()) {
                    (Some(r), _) if !fresh => req = r,
                    (None, Some(r)) if !fresh && reused => {
                        debug!(
                            "proxy: {} {method} via {hop}: the kept connection closed; again on a new one",
                            self.guest
                        );
                        req = r;
                    }
                    _ => {
                        let err = e.into_error();
                        let pe = match &hop {
                            Hop::Upstream(up) => ProxyError::Unreachable {
                                proxy: up.authority(),
                                err: std::io::Error::other(err.to_string()),
                            },
                            Hop::Direct(a) => {
                                ProxyError::Dial { target: a.to_string(), err: std::io::Error::other(err.to_string()) }
                            }
                        };
                        return self.fail(&target.absolute_uri(), pe);
                    }
                },
            }
        }
        error_response(502, "no connection")
    }

    /// The response of the next hop, for the guest.
    fn answer(&self, resp: Response<Incoming>, method: &Method, target: &Target, hop: &Hop) -> Response<Body> {
        let uri = target.absolute_uri();
        if let Hop::Upstream(up) = hop
            && resp.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED
        {
            let reason = resp.status().canonical_reason().unwrap_or("").to_string();
            return self
                .fail(&uri, ProxyError::Refused { proxy: up.authority(), target: uri.clone(), status: 407, reason });
        }
        let status = resp.status();
        if matches!(hop, Hop::Upstream(_)) && matches!(status.as_u16(), 401 | 403 | 502 | 503 | 504) {
            // Most likely the upstream's own refusal (tinyproxy answers a wrong password with
            // 401): the guest gets the answer as it is, the log says so.
            warn!("proxy: {} {method} {uri} via {hop}: answered {status}", self.guest);
        } else {
            info!("proxy: {} {method} {uri} via {hop}: {}", self.guest, status.as_u16());
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.extensions.insert(Via(hop.to_string()));
        Response::from_parts(parts, body.boxed())
    }

    fn fail(&self, what: &str, e: ProxyError) -> Response<Body> {
        let denied = matches!(e, ProxyError::Denied { .. });
        if matches!(e, ProxyError::Forbidden(_)) {
            // The loopback guard (or the virtual subnet): counted with the policy's denials.
            self.proxy.cfg.policy.count(crate::policy::Via::Proxy, crate::policy::DenyReason::Loopback);
        }
        // A denial is logged by the policy, once per destination.
        if !denied {
            warn!("proxy: {} {what}: {e}", self.guest);
        }
        let mut r = error_response(e.status(), &e.to_string());
        if denied {
            r.extensions_mut().insert(Denied);
        }
        r
    }

    /// The destination of a request (not CONNECT), or why it cannot have one.
    fn target(&self, req: &Request<Incoming>) -> Result<Target, &'static str> {
        let uri = req.uri();
        let path = uri.path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
        let path = if path.starts_with('/') { path } else { "/".to_string() };
        match self.mode {
            Mode::Explicit => {
                match uri.scheme_str() {
                    Some(s) if s.eq_ignore_ascii_case("http") => {}
                    Some(_) => return Err("only http:// URLs can be proxied this way; use CONNECT for https"),
                    None => {
                        return Err("this is an HTTP proxy: send absolute-form requests (GET http://host/path)");
                    }
                }
                let auth = uri.authority().ok_or("no host in the URL")?;
                let (host, _) = split_host_port(auth.host()).ok_or("bad host in the URL")?;
                if !valid_host(&host) {
                    return Err("bad host in the URL");
                }
                Ok(Target { host, port: auth.port_u16().unwrap_or(80), ip: None, path })
            }
            Mode::Transparent(dst) => {
                let named = uri
                    .authority()
                    .map(|a| a.as_str().to_string())
                    .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
                    .and_then(|h| split_host_port(h.trim()))
                    .map(|(h, _)| h)
                    .filter(|h| valid_host(h));
                let host = named.unwrap_or_else(|| dst.ip().to_string());
                Ok(Target { host, port: dst.port(), ip: Some(dst.ip()), path })
            }
        }
    }

    /// A sender on the kept connection when it goes the same way and is usable (unless
    /// `fresh`), else on a new one; and whether it is the kept one.
    async fn sender(&self, hop: &Hop, fresh: bool) -> Result<(SendRequest<Body>, bool), ProxyError> {
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((h, mut s)) = kept
            && !fresh
            && h == *hop
            && s.ready().await.is_ok()
        {
            return Ok((s, true));
        }
        let (stream, what) = match hop {
            Hop::Upstream(up) => (dial_upstream(up).await?, up.authority()),
            Hop::Direct(a) => (dial(*a).await?, a.to_string()),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ProxyError::Dial { target: what.clone(), err: std::io::Error::other(e.to_string()) })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!("proxy: connection to {what}: {e}");
            }
        });
        Ok((sender, false))
    }

    /// `CONNECT host:port`: a tunnel through the HTTPS upstream, or direct.
    async fn connect(&self, req: Request<Incoming>) -> Response<Body> {
        if let Mode::Transparent(_) = self.mode {
            return error_response(405, "CONNECT is for the explicit proxy (http.docker.internal:3128)");
        }
        let Some((host, port)) = req
            .uri()
            .authority()
            .and_then(|a| split_host_port(a.as_str()))
            .filter(|(h, _)| valid_host(h))
            .map(|(h, p)| (h, p.unwrap_or(443)))
        else {
            return error_response(400, "CONNECT needs host:port");
        };
        let target = config::authority(&host, port);
        let cfg = self.proxy.settings.get();
        let upstream = match &cfg.https {
            Some(up) if !self.proxy.is_local(&host) && !cfg.no_proxy.matches(Some(&host), host.parse().ok(), port) => {
                Some(up.clone())
            }
            _ => None,
        };
        let result = match &upstream {
            Some(up) => match self.proxy.admit(&host, None, port, self.guest).await {
                Ok(()) => {
                    open_tunnel(up, &target).await.map(|(s, rest)| (s, rest, format!("upstream {}", up.authority())))
                }
                Err(e) => Err(e),
            },
            None => match self.proxy.resolve(&host, port).await {
                Ok(addr) => match self.proxy.admit(&host, Some(addr.ip()), port, self.guest).await {
                    Ok(()) => dial(addr).await.map(|s| (s, Vec::new(), format!("direct {addr}"))),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
        };
        let (stream, rest, via) = match result {
            Ok(t) => t,
            Err(e) => return self.fail(&format!("CONNECT {target}"), e),
        };
        info!("proxy: {} CONNECT {target} via {via}", self.guest);
        let guest = self.guest;
        let (proxy, activity, slot) = (self.proxy.clone(), self.activity.clone(), self.slot.clone());
        tokio::spawn(async move {
            let _slot = slot;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let what = format!("{guest} CONNECT {target}");
                    relay(&proxy, TokioIo::new(upgraded), &activity, stream, rest, &what).await
                }
                Err(e) => debug!("proxy: {guest} CONNECT {target}: upgrade: {e}"),
            }
        });
        let mut resp = Response::new(empty());
        resp.extensions_mut().insert(Via(via));
        resp
    }
}

/// The request as the next hop gets it: absolute-form with credentials for the upstream,
/// origin-form for a direct hop; HTTP/1.1, hop-by-hop headers dropped, Host present.
fn outgoing(req: Request<Incoming>, target: &Target, hop: &Hop) -> Result<Request<Body>, &'static str> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        let host = HeaderValue::from_str(&target.host_header()).map_err(|_| "bad host")?;
        parts.headers.insert(header::HOST, host);
    }
    let uri = match hop {
        Hop::Upstream(up) => {
            if let Some(auth) = up.basic_auth() {
                let value = HeaderValue::from_str(&auth).map_err(|_| "bad proxy credentials")?;
                parts.headers.insert(header::PROXY_AUTHORIZATION, value);
            }
            target.absolute_uri()
        }
        Hop::Direct(_) => target.path.clone(),
    };
    parts.uri = uri.parse::<Uri>().map_err(|_| "bad request target")?;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body.boxed()))
}

/// Methods that may be sent twice (RFC 9110 9.2.2).
fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// A copy of a request that has no body, to send again.
fn without_body(req: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, X-Private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic guest"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn target_forms() {
        let t = Target { host: "a.test".into(), port: 80, ip: None, path: "/x?y".into() };
        assert_eq!(t.absolute_uri(), "http://a.test/x?y");
        let t = Target { host: "::1".into(), port: 8080, ip: None, path: "/".into() };
        assert_eq!(t.absolute_uri(), "http://[::1]:8080/");
        let t = Target { host: "::1".into(), port: 80, ip: None, path: "/".into() };
        assert_eq!(t.host_header(), "[::1]");
    }

    #[test]
    fn outcomes_of_answers() {
        assert_eq!(outcome(&error_response(400, "bad")), ProxyOutcome::BadRequest);
        assert_eq!(outcome(&error_response(405, "no CONNECT here")), ProxyOutcome::BadRequest);
        assert_eq!(outcome(&error_response(502, "down")), ProxyOutcome::UpstreamError);
        assert_eq!(outcome(&error_response(403, "refused upstream")), ProxyOutcome::UpstreamError);
        // An answer of the next hop, whatever its status.
        let mut theirs = Response::new(empty());
        *theirs.status_mut() = StatusCode::BAD_GATEWAY;
        assert_eq!(outcome(&theirs), ProxyOutcome::Forwarded);
    }

    #[test]
    fn error_bodies_are_one_line() {
        let r = error_response(502, "upstream proxy 127.0.0.1:1 unreachable: Connection refused");
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
    }
}
