//! Routing: (method, path) to a handler.
//!
//! Paths under `/v1/` answer JSON errors (`{"error": "..."}`), 404 for an unknown path and
//! 405 (with `Allow`) for a known path asked with the wrong method. The gvisor-tap-vsock
//! paths behave as gvproxy's Go `http.ServeMux` does: plain-text errors, "post only" with
//! 400 for a GET on a POST endpoint, and any method accepted on its read-only endpoints.

use hyper::{Method, StatusCode};

use super::state::{Reply, State};
use super::{gvproxy, metrics, v1};

/// Calls the handler for `method` and `path` with the whole request `body`; `caller` is
/// the guest's address when the request comes from inside the guest network.
pub async fn dispatch(
    state: &State,
    caller: Option<std::net::Ipv4Addr>,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Reply {
    if let Some(guest) = caller
        && let Some(refused) = guest_may_not(guest, method, path, body)
    {
        return refused;
    }
    // gvproxy's endpoints, with gvproxy's own method rules.
    match path {
        "/services/forwarder/expose" => return post_only(method, gvproxy::expose(state, caller, body)).await,
        "/services/forwarder/unexpose" => {
            return post_only(method, gvproxy::unexpose(state, body)).await;
        }
        "/services/dns/add" => return post_only(method, async { gvproxy::dns_add(state, body) }).await,
        "/services/forwarder/all" => return gvproxy::all(state).await,
        "/services/dhcp/leases" | "/leases" => return gvproxy::leases(state).await,
        "/cam" => return gvproxy::cam(state).await,
        // A valid `/tunnel` is taken before hyper (see `endpoints`): what comes here lacks
        // its address, as gvproxy's answer says.
        "/tunnel" => {
            return Reply::text(StatusCode::INTERNAL_SERVER_ERROR, "ip is mandatory (/tunnel?ip=IP&port=PORT)");
        }
        "/services/dns/all" => return gvproxy::dns_all(state),
        "/stats" => return gvproxy::stats(state).await,
        // Prometheus' text format (what a scraper asks for; any other method is refused).
        "/metrics" if *method == Method::GET => return metrics::metrics(state).await,
        "/metrics" => return Reply::method_not_allowed("GET"),
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
        ("resolver", &Method::GET) => v1::resolver(state),
        ("resolver", _) => Reply::method_not_allowed("GET"),
        ("leases", &Method::GET) => v1::leases(state).await,
        ("leases", _) => Reply::method_not_allowed("GET"),
        ("stats", &Method::GET) => v1::stats(state).await,
        ("stats", _) => Reply::method_not_allowed("GET"),
        ("flows", &Method::GET) => v1::flows(state).await,
        ("info", &Method::GET) => v1::info(state).await,
        ("info", _) => Reply::method_not_allowed("GET"),
        ("links", &Method::GET) => v1::links(state).await,
        ("links", _) => Reply::method_not_allowed("GET"),
        ("log/dns", &Method::GET) => v1::dns_log(state),
        ("log/proxy", &Method::GET) => v1::proxy_log(state),
        ("log/dns" | "log/proxy", _) => Reply::method_not_allowed("GET"),
        ("flows", _) => Reply::method_not_allowed("GET"),
        ("proxy", &Method::GET) => v1::get_proxy(state),
        ("proxy", &Method::PUT) => v1::put_proxy(state, body),
        ("proxy", _) => Reply::method_not_allowed("GET, PUT"),
        ("policy", &Method::GET) => v1::get_policy(state),
        ("policy", &Method::PUT) => v1::set_policy(state, body, false),
        ("policy", &Method::POST) => v1::set_policy(state, body, true),
        ("policy", _) => Reply::method_not_allowed("GET, PUT, POST"),
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

/// What a guest may ask of the API (at the gateway's port 80): what gvproxy offers its
/// guests (`/services/forwarder/all`, `expose` and `unexpose`), publishing to the guest's
/// own address only, and usernet's read-only views of the ports and the instance. The rest
/// (DNS records, the proxy, other guests' ports, captures, leases) is the host's: 403.
fn guest_may_not(guest: std::net::Ipv4Addr, method: &Method, path: &str, body: &[u8]) -> Option<Reply> {
    let refuse = |why: &str| Some(Reply::text(StatusCode::FORBIDDEN, format!("not available to guests: {why}")));
    match path.trim_end_matches('/') {
        "/services/forwarder/all" | "/services/forwarder/unexpose" => None,
        "/services/forwarder/expose" => {
            // The remote must be the guest itself: ":PORT" or its own address.
            let remote = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("remote").and_then(|r| r.as_str()).map(str::to_string))
                .unwrap_or_default();
            let host = remote.rsplit_once(':').map_or("", |(h, _)| h);
            if host.is_empty() || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip == guest) {
                None
            } else {
                refuse("a guest publishes only its own ports")
            }
        }
        "/v1/ports" | "/v1/info" if *method == Method::GET => None,
        _ => refuse(path),
    }
}

/// gvproxy answers a non-POST on its POST endpoints with 400 "post only".
async fn post_only(method: &Method, handler: impl Future<Output = Reply>) -> Reply {
    if *method == Method::POST { handler.await } else { Reply::text(StatusCode::BAD_REQUEST, "post only") }
}
