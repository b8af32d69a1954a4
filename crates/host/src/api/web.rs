//! The web dashboard (`--web ADDR:PORT`): the API's read-only GETs and `/metrics` over TCP,
//! behind a token, plus one self-contained page (`dashboard.html`, inline CSS and
//! JavaScript, no external asset) that polls them every second.
//!
//! Theory of operation: the caller binds the TCP listener first (`bind`: a taken port is an
//! error before anything starts) and makes a token ([`new_token`]: 32 random bytes from
//! getrandom(2), in hex). [`ApiServer::serve_web`] then accepts connections on the API's
//! own runtime thread and serves them with hyper's HTTP/1 server, sharing the API's state:
//! a request goes to the same handlers (`routes::dispatch`) as on the Unix socket, but only
//! for the paths of [`READ_ONLY`] and only with GET; nothing on this port changes anything.
//!
//! Every request must carry the token, in one of three ways ([`authorize`]):
//! `?token=...` in the URL (the one usernet prints at start, as Jupyter does), the cookie
//! that the first page load with that URL sets (`usernet_token_<port>`: cookies are shared
//! by all ports of a host, the name keeps two dashboards apart), or
//! `Authorization: Bearer ...`. Without it the answer is 403 and no data. The comparison
//! takes the same time wherever the first difference is. The token is the only guard (the
//! port is plain HTTP): bind a loopback address (`127.0.0.1:PORT`, the usual case); on any
//! other address the token crosses the network in clear text, which usernet warns about.
//!
//! The throughput graph needs the links' byte counters over time, also for a page just
//! opened: while the web port is served, a task of its own asks the engine for them once a
//! second ([`SAMPLE_INTERVAL`]) and keeps the last [`HISTORY`] samples, which the page reads
//! at `/history` (this port only): `{"interval_ms", "samples": [{"t_ms", "links": [{"index",
//! "name", "rx_bytes", "tx_bytes"}]}]}`, oldest first, `t_ms` on usernet's monotonic clock.
//!
//! Answers carry `Cache-Control: no-store`, `Referrer-Policy: no-referrer` (the token never
//! leaves in a Referer) and a Content-Security-Policy that allows only the page's own inline
//! code and requests to this origin. The page writes every value with `textContent`, never
//! as HTML: names in the DNS and proxy logs come from guests.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{debug, warn};

use serde::Serialize;
use usernet_core::config::LogEvery;
use usernet_core::engine::control::Command;

use super::state::{Reply, State};
use super::{ApiServer, HEADER_TIMEOUT, routes};

/// The dashboard page, served at `/`.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// The API paths the web port serves (GET only), besides `/` and `/metrics`.
pub const READ_ONLY: &[&str] = &[
    "/v1/info",
    "/v1/links",
    "/v1/ports",
    "/v1/flows",
    "/v1/stats",
    "/v1/leases",
    "/v1/dns",
    "/v1/resolver",
    "/v1/proxy",
    "/v1/log/dns",
    "/v1/log/proxy",
    "/metrics",
];

/// How often the links' counters are sampled for the graph.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept for the graph (two minutes).
pub const HISTORY: usize = 120;

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 64;

/// Bytes of randomness in a token (64 hex digits).
pub const TOKEN_BYTES: usize = 32;

/// A fresh token: [`TOKEN_BYTES`] random bytes from getrandom(2) (or /dev/urandom where
/// the kernel has no getrandom), in lower-case hex.
pub fn new_token() -> io::Result<String> {
    let mut buf = [0u8; TOKEN_BYTES];
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom(2) writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOSYS) => {
                    use std::io::Read;
                    std::fs::File::open("/dev/urandom")?.read_exact(rest)?;
                    filled = buf.len();
                    continue;
                }
                _ => return Err(e),
            }
        }
        filled += n as usize;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The dashboard's URL with its token, as usernet prints it. An unspecified address
/// (`0.0.0.0`, `[::]`) is shown as the loopback address of its family, where it answers too.
pub fn url(addr: SocketAddr, token: &str) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/?token={token}", SocketAddr::new(ip, addr.port()))
}

/// The name of the cookie that carries the token of the dashboard on `port`.
pub fn cookie_name(port: u16) -> String {
    format!("usernet_token_{port}")
}

/// How a request stands with the token.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// No token, or a wrong one: 403.
    Denied,
    /// The right token; `set_cookie` when it came in the URL (the answer sets the cookie,
    /// so that the page's own requests need not carry it).
    Granted { set_cookie: bool },
}

/// Checks the token of a request: its URL query, its `Cookie` headers and its
/// `Authorization` header, in that order; any one with the right token is enough.
pub fn authorize<'a>(
    token: &str,
    cookie: &str,
    query: Option<&str>,
    cookies: impl IntoIterator<Item = &'a str>,
    authorization: Option<&str>,
) -> Access {
    if let Some(q) = query
        && q.split('&').filter_map(|kv| kv.strip_prefix("token=")).any(|t| same(t, token))
    {
        return Access::Granted { set_cookie: true };
    }
    let in_cookie = cookies.into_iter().flat_map(|h| h.split(';')).any(|c| {
        c.trim().split_once('=').is_some_and(|(name, value)| name.trim() == cookie && same(value.trim(), token))
    });
    let in_header = authorization.is_some_and(|a| bearer_is(a, token));
    if in_cookie || in_header { Access::Granted { set_cookie: false } } else { Access::Denied }
}

/// True when an `Authorization` header's value is `Bearer TOKEN` with this token.
pub(super) fn bearer_is(authorization: &str, token: &str) -> bool {
    authorization
        .trim()
        .split_once(' ')
        .is_some_and(|(scheme, t)| scheme.eq_ignore_ascii_case("bearer") && same(t.trim(), token))
}

/// Compares a given token with the real one in a time that does not depend on where they
/// differ (only on the given one's length).
fn same(given: &str, token: &str) -> bool {
    let (a, b) = (given.as_bytes(), token.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0 && !token.is_empty()
}

/// What the web port answers for a path and method, once the token is checked: the page,
/// an API answer, 404 or 405.
enum Route {
    Page,
    /// The graph's samples.
    History,
    Api,
    NotFound,
    MethodNotAllowed,
}

fn route(method: &Method, path: &str) -> Route {
    let known = path == "/" || path == "/history" || READ_ONLY.contains(&path.trim_end_matches('/'));
    match (known, *method == Method::GET) {
        (false, _) => Route::NotFound,
        (true, false) => Route::MethodNotAllowed,
        (true, true) if path == "/" => Route::Page,
        (true, true) if path == "/history" => Route::History,
        (true, true) => Route::Api,
    }
}

/// One link in one sample of the graph's history.
#[derive(Clone, Debug, Serialize)]
pub struct LinkBytes {
    pub index: usize,
    pub name: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// The links' counters at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Milliseconds since the web port started (usernet's monotonic clock).
    pub t_ms: u64,
    pub links: Vec<LinkBytes>,
}

/// The last [`HISTORY`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: std::sync::Mutex<std::collections::VecDeque<Sample>>,
}

impl History {
    pub fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() >= HISTORY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn snapshot(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}

/// Samples the links' counters every [`SAMPLE_INTERVAL`] until the engine is gone.
async fn sample_links(web: Arc<Web>) {
    let start = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(m) = web.state.control.ask(|reply| Command::Metrics { reply }).await else {
            return;
        };
        let links = m
            .links
            .iter()
            .map(|l| LinkBytes {
                index: l.index,
                name: l.name.clone(),
                rx_bytes: l.counters.rx_bytes,
                tx_bytes: l.counters.tx_bytes,
            })
            .collect();
        web.history.push(Sample { t_ms: start.elapsed().as_millis() as u64, links });
    }
}

impl ApiServer {
    /// Serves the dashboard and the read-only API on `listener` (bound by the caller) with
    /// `token`, on the API's runtime, until the API server stops.
    pub fn serve_web(&self, listener: std::net::TcpListener, token: String) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let listener = {
            let _entered = self.guest.runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let web = Arc::new(Web {
            state: self.guest.state.clone(),
            token,
            cookie: cookie_name(port),
            history: History::default(),
        });
        self.guest.runtime.spawn(sample_links(web.clone()));
        self.guest.runtime.spawn(accept_loop(listener, web));
        Ok(())
    }
}

/// What every web connection shares.
struct Web {
    state: Arc<State>,
    token: String,
    cookie: String,
    history: History,
}

async fn accept_loop(listener: tokio::net::TcpListener, web: Arc<Web>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut accept_errors = LogEvery::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let web = web.clone();
                tokio::spawn(async move {
                    serve_connection(web, stream, peer).await;
                    drop(permit);
                });
            }
            Err(e) => {
                if let Some(times) = accept_errors.due(std::time::Instant::now()) {
                    warn!(times, "web: accept: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(web: Arc<Web>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let service = hyper::service::service_fn(move |req| {
        let web = web.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(&web, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!("web: connection from {peer}: {e}");
    }
}

async fn handle(web: &Web, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let cookies = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let access = authorize(&web.token, &web.cookie, req.uri().query(), cookies, authorization);
    let path = req.uri().path();
    let mut resp = match access {
        Access::Denied => {
            debug!("web: {} {path} -> 403 (no token)", req.method());
            Reply::text(
                StatusCode::FORBIDDEN,
                "403 Forbidden: this usernet dashboard needs its token; open the URL usernet printed at start",
            )
            .into_response()
        }
        Access::Granted { set_cookie } => {
            let mut resp = match route(req.method(), path) {
                Route::Page => Response::builder()
                    .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                    .body(Full::new(Bytes::from_static(DASHBOARD.as_bytes())))
                    .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
                Route::History => {
                    #[derive(Serialize)]
                    struct View {
                        interval_ms: u64,
                        samples: Vec<Sample>,
                    }
                    let view =
                        View { interval_ms: SAMPLE_INTERVAL.as_millis() as u64, samples: web.history.snapshot() };
                    Reply::json(StatusCode::OK, &view).into_response()
                }
                Route::Api => routes::dispatch(&web.state, None, &Method::GET, path, &[]).await.into_response(),
                Route::NotFound => Reply::error(StatusCode::NOT_FOUND, format!("no such page: {path}")).into_response(),
                Route::MethodNotAllowed => {
                    Reply::error(StatusCode::METHOD_NOT_ALLOWED, "the web port is read-only (GET)").into_response()
                }
            };
            if matches!(route(req.method(), path), Route::MethodNotAllowed) {
                resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            debug!("web: {} {path} -> {}", req.method(), resp.status());
            if set_cookie
                && let Ok(v) =
                    HeaderValue::from_str(&format!("{}={}; Path=/; HttpOnly; SameSite=Strict", web.cookie, web.token))
            {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn check(query: Option<&str>, cookies: &[&str], auth: Option<&str>) -> Access {
        authorize(T, "usernet_token_8080", query, cookies.iter().copied(), auth)
    }

    #[test]
    fn the_token_in_any_of_its_places_grants() {
        assert_eq!(check(Some(&format!("token={T}")), &[], None), Access::Granted { set_cookie: true });
        assert_eq!(check(Some(&format!("a=1&token={T}&b")), &[], None), Access::Granted { set_cookie: true });
        let cookie = format!("other=1; usernet_token_8080={T}");
        assert_eq!(check(None, &["x=y", &cookie], None), Access::Granted { set_cookie: false });
        assert_eq!(check(None, &[], Some(&format!("Bearer {T}"))), Access::Granted { set_cookie: false });
        assert_eq!(check(None, &[], Some(&format!("bearer  {T} "))), Access::Granted { set_cookie: false });
    }

    #[test]
    fn anything_else_is_denied() {
        assert_eq!(check(None, &[], None), Access::Denied);
        assert_eq!(check(Some("token="), &[], None), Access::Denied);
        assert_eq!(check(Some(&format!("token={}", &T[..63])), &[], None), Access::Denied);
        assert_eq!(check(Some(&format!("token={T}0")), &[], None), Access::Denied);
        assert_eq!(check(Some(&format!("xtoken={T}")), &[], None), Access::Denied);
        assert_eq!(check(Some(&format!("token={}", T.to_uppercase())), &[], None), Access::Denied);
        // Another port's cookie, or the right cookie with a wrong value.
        assert_eq!(check(None, &[&format!("usernet_token_8081={T}")], None), Access::Denied);
        assert_eq!(check(None, &["usernet_token_8080=00"], None), Access::Denied);
        assert_eq!(check(None, &[], Some(&format!("Basic {T}"))), Access::Denied);
        assert_eq!(check(None, &[], Some(T)), Access::Denied);
        // An empty token never matches, not even an empty one given.
        assert_eq!(authorize("", "c", Some("token="), [], Some("Bearer ")), Access::Denied);
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), TOKEN_BYTES * 2);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn urls() {
        let t = "ab";
        assert_eq!(url("127.0.0.1:8080".parse().unwrap(), t), "http://127.0.0.1:8080/?token=ab");
        assert_eq!(url("0.0.0.0:80".parse().unwrap(), t), "http://127.0.0.1:80/?token=ab");
        assert_eq!(url("[::]:80".parse().unwrap(), t), "http://[::1]:80/?token=ab");
        assert_eq!(url("[fd00::1]:80".parse().unwrap(), t), "http://[fd00::1]:80/?token=ab");
    }

    #[test]
    fn only_reads_are_routed() {
        assert!(matches!(route(&Method::GET, "/"), Route::Page));
        assert!(matches!(route(&Method::GET, "/metrics"), Route::Api));
        assert!(matches!(route(&Method::GET, "/v1/flows/"), Route::Api));
        assert!(matches!(route(&Method::POST, "/v1/ports"), Route::MethodNotAllowed));
        assert!(matches!(route(&Method::DELETE, "/v1/dns"), Route::MethodNotAllowed));
        assert!(matches!(route(&Method::GET, "/v1/capture"), Route::NotFound));
        assert!(matches!(route(&Method::GET, "/services/forwarder/all"), Route::NotFound));
        assert!(matches!(route(&Method::GET, "/v1/dns/x"), Route::NotFound));
        assert!(matches!(route(&Method::GET, "/history"), Route::History));
    }

    #[test]
    fn history_is_bounded() {
        let h = History::default();
        for t in 0..(HISTORY as u64 + 30) {
            h.push(Sample { t_ms: t, links: vec![] });
        }
        let s = h.snapshot();
        assert_eq!(s.len(), HISTORY);
        assert_eq!((s[0].t_ms, s[HISTORY - 1].t_ms), (30, HISTORY as u64 + 29));
    }
}
