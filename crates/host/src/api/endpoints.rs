//! More places to serve the API on than its Unix socket: gvproxy's `-listen` and
//! `-services` take `unix://PATH` and `tcp://HOST:PORT` endpoints, each served with the whole
//! API (as gvproxy serves its own there). [`ApiServer::serve_also`] binds one (so that a
//! taken port or a bad path is the caller's error at once) and accepts on the API's runtime;
//! the socket file of a `unix://` endpoint is removed when the server goes.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tracing::warn;

use super::ApiServer;

/// Where to serve the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// `unix://PATH` (also `unix:PATH`) or `tcp://HOST:PORT` with an IP address for HOST.
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let addr = rest.trim_end_matches('/');
            return addr
                .parse::<SocketAddr>()
                .map(Endpoint::Tcp)
                .map_err(|_| format!("invalid endpoint {s:?}: want tcp://IP:PORT"));
        }
        if let Some(rest) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if rest.is_empty() {
                return Err(format!("invalid endpoint {s:?}: empty path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(rest)));
        }
        match s.split_once("://") {
            Some((scheme, _)) => Err(format!("unsupported endpoint scheme {scheme}:// in {s:?} (unix:// or tcp://)")),
            None => Err(format!("invalid endpoint {s:?}: want unix://PATH or tcp://IP:PORT")),
        }
    }
}

/// A bound extra endpoint, kept to remove its socket file.
pub(super) struct Bound {
    unix: Option<(PathBuf, (u64, u64))>,
}

impl Bound {
    pub(super) fn remove(self) {
        if let Some((path, ident)) = self.unix {
            super::remove_if_ours(&path, ident);
        }
    }
}

/// A listening socket of the API's (Unix or TCP).
trait Listener: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next(&self) -> impl std::future::Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> io::Result<Self::Stream> {
        Ok(self.accept().await?.0)
    }
}

/// Serves every connection of `listener` as an API connection from the host (no caller).
async fn accept_loop(state: std::sync::Arc<super::state::State>, listener: impl Listener) {
    loop {
        match listener.next().await {
            Ok(stream) => {
                tokio::spawn(super::serve_connection(state.clone(), stream, None, None));
            }
            Err(e) => {
                warn!("api: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl ApiServer {
    /// Serves the API on `endpoint` too; returns where it listens (a TCP port 0 resolved).
    pub fn serve_also(&self, endpoint: &Endpoint) -> io::Result<Endpoint> {
        use std::os::unix::fs::MetadataExt;
        let state = self.guest.state.clone();
        let _entered = self.guest.runtime.enter();
        match endpoint {
            Endpoint::Unix(path) => {
                let listener = super::bind_socket(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                listener.set_nonblocking(true)?;
                let listener = tokio::net::UnixListener::from_std(listener)?;
                self.guest.runtime.spawn(accept_loop(state, listener));
                let bound = Bound { unix: Some((path.clone(), (meta.dev(), meta.ino()))) };
                self.extra.lock().unwrap_or_else(|e| e.into_inner()).push(bound);
                Ok(endpoint.clone())
            }
            Endpoint::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                let local = listener.local_addr()?;
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                self.guest.runtime.spawn(accept_loop(state, listener));
                Ok(Endpoint::Tcp(local))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("unix:///run/a.sock".parse(), Ok(Endpoint::Unix("/run/a.sock".into())));
        assert_eq!("unix:rel.sock".parse(), Ok(Endpoint::Unix("rel.sock".into())));
        assert_eq!("tcp://127.0.0.1:7777".parse(), Ok(Endpoint::Tcp("127.0.0.1:7777".parse().unwrap())));
        assert!("tcp://localhost:1".parse::<Endpoint>().is_err());
        assert!("vsock://:1024".parse::<Endpoint>().unwrap_err().contains("unsupported endpoint scheme vsock://"));
        assert!("unix://".parse::<Endpoint>().is_err());
        assert!("/plain/path".parse::<Endpoint>().is_err());
    }
}
