//! The control API: HTTP/1.1 with JSON on a Unix socket (`--api PATH`).
//!
//! Theory of operation: [`serve`] binds the socket synchronously (so a bad path is reported
//! to the caller at once), then starts a thread with a single-threaded tokio runtime that
//! accepts connections and serves each with hyper's HTTP/1 server. Every request is read
//! whole (at most [`MAX_BODY`] bytes) and handed to [`routes::dispatch`], which matches
//! method and path and calls one handler:
//!
//! - `v1`: usernet's own resources (`/v1/ports`, `/v1/dns`, `/v1/leases`, `/v1/stats`,
//!   `/v1/flows`, `/v1/info`, `/v1/links`, `/v1/log/dns`, `/v1/log/proxy`); JSON in, JSON
//!   out, errors as `{"error": "..."}`.
//! - `gvproxy`: the endpoints of gvisor-tap-vsock that Podman, Lima and CRC call
//!   (`/services/forwarder/*`, `/services/dhcp/leases`, `/services/dns/*`, `/stats`),
//!   with gvproxy's JSON shapes, status codes and plain-text errors.
//! - `metrics`: `GET /metrics`, every counter in Prometheus' text format (version 0.0.4).
//! - `capture`: `GET /v1/capture`, a live pcap stream of the guest links (the only answer
//!   that is not read whole: it lasts as long as the client reads).
//!
//! The handlers never touch the engine's state directly: they send an
//! [`engine::control::Command`](usernet_core::engine::control::Command) through the
//! [`ControlHandle`] and await the answer. Publishing a port binds the host sockets here
//! (`ports`, with `publish::listen::bind`, a plain syscall) so that "port is already
//! allocated" comes back as an HTTP error; only bound listeners travel to the engine.
//! DNS records live in the shared [`DnsRecords`] table and are changed in place.
//!
//! The socket file is created with mode 0600 (bound inside a private directory, then
//! renamed into place, so it is never reachable with looser permissions). A stale socket
//! file (nobody accepting) is replaced; a live one or any other kind of file is an error.
//! Dropping [`ApiServer`] stops the runtime and removes the socket file if it is still ours.
//!
//! Inside the guest network (`serve --guest-api`), the same API answers at the gateway's
//! port 80, as gvproxy's does: the engine hands each guest connection to that port to
//! [`GuestApi::connect`], which serves it on one end of a socketpair on the API's runtime,
//! knowing the guest's address, so that `/services/forwarder/expose` with a `remote`
//! without IP (`":8080"`) forwards to the calling guest. [`serve_without_socket`] runs the
//! API for guests alone when there is no `--api` socket.
//!
//! `web` serves the same read-only GETs (and `/metrics`) over TCP with a token, plus the
//! dashboard page, for `--web ADDR:PORT`: [`ApiServer::serve_web`] runs it on this runtime.
//!
//! `client` is the small blocking HTTP/1.1 client that `usernet port`, `ps`, `flows`, `top`
//! and `capture` use; `registry` is where they find the running instances (every `run`
//! and `serve` registers its API socket there).

mod capture;
pub mod client;
mod endpoints;
mod gvproxy;
pub mod metrics;
mod ports;
pub mod registry;
mod routes;
mod state;
mod v1;
pub mod web;

pub use endpoints::{Connect, Endpoint};
pub use state::About;
pub use v1::{FlowView, Info, Lease, LinkGuest, LinkView, Port, StatsView};

#[cfg(test)]
mod tests;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{debug, warn};

use usernet_core::config::{LogEvery, NetConfig};
use usernet_core::engine::control::ControlHandle;
use usernet_core::services::dns::DnsRecords;
use usernet_core::services::proxy::ProxySettings;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A running API server; dropping it stops the server and removes the socket file.
pub struct ApiServer {
    /// Where the API listens (empty when it serves guests only).
    path: PathBuf,
    /// (device, inode) of the socket file we created, to remove only our own.
    ident: (u64, u64),
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    guest: GuestApi,
    /// More sockets the API is served on ([`ApiServer::serve_also`]), removed on drop.
    extra: std::sync::Mutex<Vec<endpoints::Bound>>,
}

impl ApiServer {
    /// Where the API listens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells `/v1/info` how this instance was started (the first call wins).
    pub fn set_about(&self, mut about: About) {
        if !self.path.as_os_str().is_empty() {
            about.api = Some(self.path.display().to_string());
        }
        let _ = self.guest.state.about.set(about);
    }

    /// Gives `/v1/log/dns` and `/v1/log/proxy` the services' logs (the first call wins).
    pub fn set_activity(&self, activity: Arc<usernet_core::services::activity::Activity>) {
        let _ = self.guest.state.activity.set(activity);
    }

    /// The API as the guests reach it (gateway:80), sharing this server's state. With
    /// `token`, a guest's request without `Authorization: Bearer TOKEN` gets a 401.
    pub fn guest_api(&self, token: Option<&str>) -> GuestApi {
        GuestApi { token: token.map(Arc::from), ..self.guest.clone() }
    }
}

/// Serves API connections from inside the guest network (see the module's doc).
#[derive(Clone)]
pub struct GuestApi {
    state: Arc<state::State>,
    runtime: tokio::runtime::Handle,
    /// The bearer token guests must send (`serve --guest-api`); None: none asked.
    token: Option<Arc<str>>,
}

impl GuestApi {
    /// A connection from `guest`: returns the engine's end (non-blocking) of a stream
    /// socketpair whose other end is served as an API connection from that guest.
    pub fn connect(&self, guest: SocketAddrV4) -> io::Result<OwnedFd> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(true)?;
        let stream = {
            let _entered = self.runtime.enter();
            tokio::net::UnixStream::from_std(theirs)?
        };
        let state = self.state.clone();
        debug!("api: connection from guest {guest}");
        self.runtime.spawn(serve_connection(state, stream, Some(*guest.ip()), self.token.clone()));
        Ok(OwnedFd::from(ours))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.path.as_os_str().is_empty() {
            remove_if_ours(&self.path, self.ident);
        }
        for bound in self.extra.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            bound.remove();
        }
    }
}

/// Removes the socket file at `path` if it is still the one we made (device, inode).
fn remove_if_ours(path: &Path, ident: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && (meta.dev(), meta.ino()) == ident
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Starts serving the API at `path` on a thread of its own.
pub fn serve(
    path: &Path,
    control: ControlHandle,
    dns: Arc<DnsRecords>,
    cfg: Arc<NetConfig>,
    proxy: Option<ProxySettings>,
) -> std::io::Result<ApiServer> {
    let listener = bind_socket(path)?;
    let meta = std::fs::symlink_metadata(path)?;
    let ident = (meta.dev(), meta.ino());
    listener.set_nonblocking(true)?;
    let mut server = start(Some(listener), control, dns, cfg, proxy)?;
    server.path = path.to_path_buf();
    server.ident = ident;
    Ok(server)
}

/// Starts the API without a Unix socket, for guests only (`serve --guest-api` without
/// `--api`): reach it through [`ApiServer::guest_api`].
pub fn serve_without_socket(
    control: ControlHandle,
    dns: Arc<DnsRecords>,
    cfg: Arc<NetConfig>,
    proxy: Option<ProxySettings>,
) -> std::io::Result<ApiServer> {
    start(None, control, dns, cfg, proxy)
}

fn start(
    listener: Option<StdUnixListener>,
    control: ControlHandle,
    dns: Arc<DnsRecords>,
    cfg: Arc<NetConfig>,
    proxy: Option<ProxySettings>,
) -> std::io::Result<ApiServer> {
    let state = Arc::new(state::State::new(control, dns, cfg, proxy));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let guest = GuestApi { state: state.clone(), runtime: runtime.handle().clone(), token: None };
    let thread = std::thread::Builder::new().name("usernet-api".into()).spawn(move || {
        runtime.block_on(accept_loop(listener, state, rx));
        runtime.shutdown_timeout(Duration::from_millis(200));
    })?;
    Ok(ApiServer {
        path: PathBuf::new(),
        ident: (0, 0),
        shutdown: Some(tx),
        thread: Some(thread),
        guest,
        extra: std::sync::Mutex::new(Vec::new()),
    })
}

/// Binds a Unix socket at `path` with mode 0600, replacing a stale socket file.
fn bind_socket(path: &Path) -> io::Result<StdUnixListener> {
    let probe = |p: &Path| {
        let connected = std::os::unix::net::UnixStream::connect(p).map(drop);
        if connected.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused) {
            debug!("api: replacing stale socket {}", p.display());
        }
        connected
    };
    usernet_core::link::qemu::clear_stale_socket(path, probe)?;
    // Never reachable under `path` with the process umask's permissions.
    usernet_core::link::qemu::listen_owner_only(path)
}

async fn accept_loop(
    listener: Option<StdUnixListener>,
    state: Arc<state::State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let Some(listener) = listener else {
        // Guests only: their connections are spawned by GuestApi::connect.
        let _ = shutdown.await;
        return;
    };
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("api: cannot serve: {e}");
            return;
        }
    };
    let mut accept_errors = LogEvery::default();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(state.clone(), stream, None, None));
                }
                Err(e) => {
                    if let Some(times) = accept_errors.due(std::time::Instant::now()) {
                        warn!(times, "api: accept: {e}");
                    }
                    // Out of file descriptors and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves one API connection; `caller` is the guest's address for connections from the
/// guest network, None on the Unix socket.
async fn serve_connection<S>(state: Arc<state::State>, stream: S, caller: Option<Ipv4Addr>, token: Option<Arc<str>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let token = token.clone();
        async move {
            if let Some(token) = &token
                && !bearer_matches(&req, token)
            {
                debug!("api: {} {} from guest {caller:?} without its token -> 401", req.method(), req.uri().path());
                let reply = state::Reply::text(
                    hyper::StatusCode::UNAUTHORIZED,
                    "usernet: this API needs the token given to `usernet serve --guest-api` \
                     (header Authorization: Bearer TOKEN)",
                );
                return Ok::<_, std::convert::Infallible>(reply.into_response().map(http_body_util::Either::Left));
            }
            Ok(handle(&state, req, caller).await)
        }
    });
    // Guests' clients (busybox nc) shut down their sending side after the request and
    // still wait for the answer: keep such half-closed connections open.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .half_close(caller.is_some())
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!("api: connection: {e}");
    }
}

/// True when `req` carries `Authorization: Bearer TOKEN` with this token.
fn bearer_matches(req: &Request<Incoming>, token: &str) -> bool {
    req.headers()
        .get_all(hyper::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| web::bearer_is(v, token))
}

/// An answer's body: whole, or a live capture.
type Body = http_body_util::Either<Full<Bytes>, capture::CaptureBody>;

async fn handle(state: &state::State, req: Request<Incoming>, caller: Option<Ipv4Addr>) -> Response<Body> {
    if req.uri().path().trim_end_matches('/') == "/v1/capture" {
        let reply = if req.method() != hyper::Method::GET {
            state::Reply::method_not_allowed("GET")
        } else {
            match capture::start(state, caller, req.uri().query().unwrap_or("")) {
                Ok(body) => {
                    debug!("api: GET {} -> live capture", req.uri());
                    return Response::builder()
                        .header(hyper::header::CONTENT_TYPE, "application/vnd.tcpdump.pcap")
                        .body(http_body_util::Either::Right(body))
                        .unwrap_or_else(|_| Response::new(http_body_util::Either::Left(Full::new(Bytes::new()))));
                }
                Err(reply) => reply,
            }
        };
        return reply.into_response().map(http_body_util::Either::Left);
    }
    let (parts, body) = req.into_parts();
    let reply = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => {
            let body = collected.to_bytes();
            routes::dispatch(state, caller, &parts.method, parts.uri.path(), &body).await
        }
        Err(e) => {
            debug!("api: reading body: {e}");
            state::Reply::error(
                hyper::StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY} bytes or unreadable"),
            )
        }
    };
    debug!("api: {} {} -> {}", parts.method, parts.uri.path(), reply.status);
    reply.into_response().map(http_body_util::Either::Left)
}
