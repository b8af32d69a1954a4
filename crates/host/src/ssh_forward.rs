//! Unix sockets on the host carried to Unix sockets inside a VM over SSH: gvproxy's
//! `-forward-sock PATH -forward-dest GUESTPATH -forward-user USER -forward-identity KEY`,
//! which Podman machine uses to reach the Podman API socket inside its VM.
//!
//! Theory of operation. Each forward listens on its host socket (mode 0600; a file already
//! there is replaced, as gvproxy does) and keeps one SSH session to the guest's sshd, made
//! with the `russh` client: public-key authentication with the identity file, the guest's
//! host key taken as it is (the connection never leaves this machine: it goes to a port
//! that usernet itself publishes to the guest's port 22). The session is opened when the
//! forward starts, retried with a growing pause while the VM boots (as gvproxy's "Waiting
//! for sshd"), and opened again when it breaks. Every connection to the host socket becomes
//! one `direct-streamlocal@openssh.com` channel to GUESTPATH, and bytes are copied both
//! ways until both sides are done (a half-close is passed on). Everything runs on one
//! thread with its own single-threaded tokio runtime; dropping [`SshForwards`] stops it and
//! removes the sockets.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

/// One forward, as gvproxy's four flags give it.
#[derive(Clone, Debug)]
pub struct ForwardSpec {
    /// The host socket to listen on.
    pub socket: PathBuf,
    /// The socket inside the guest.
    pub dest: String,
    pub user: String,
    pub identity: PathBuf,
    /// Where the guest's sshd is reached from the host.
    pub ssh: SocketAddr,
}

/// How many times a session is tried before the forward waits for the next client.
const CONNECT_TRIES: u32 = 60;
/// The first pause between tries; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long one SSH connection and login may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The running forwards; dropping it stops them and removes their sockets.
pub struct SshForwards {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

impl Drop for SshForwards {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Checks every identity, binds every socket, then starts the forwards on a thread.
pub fn start(specs: Vec<ForwardSpec>) -> io::Result<SshForwards> {
    let mut ready = Vec::new();
    for spec in specs {
        let key = russh::keys::load_secret_key(&spec.identity, None).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("identity {}: {e}", spec.identity.display()))
        })?;
        let listener = bind(&spec.socket)?;
        ready.push((spec, Arc::new(key), listener));
    }
    let sockets = ready.iter().map(|(s, _, _)| s.socket.clone()).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name("usernet-ssh".into()).spawn(move || {
        runtime.block_on(async move {
            for (spec, key, listener) in ready {
                match tokio::net::UnixListener::from_std(listener) {
                    Ok(l) => {
                        tokio::spawn(serve(Arc::new(Forward::new(spec, key)), l));
                    }
                    Err(e) => warn!("ssh forward: {e}"),
                }
            }
            let _ = rx.await;
        });
        runtime.shutdown_timeout(Duration::from_millis(200));
    })?;
    Ok(SshForwards { shutdown: Some(tx), thread: Some(thread), sockets })
}

fn bind(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let l = usernet_core::link::qemu::listen_stream(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The client side of a session: the guest's host key is not checked (see the module's doc).
struct Client;

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

struct Forward {
    spec: ForwardSpec,
    key: Arc<PrivateKey>,
    session: Mutex<Option<client::Handle<Client>>>,
}

impl Forward {
    fn new(spec: ForwardSpec, key: Arc<PrivateKey>) -> Forward {
        Forward { spec, key, session: Mutex::new(None) }
    }

    /// One SSH connection, logged in.
    async fn login(&self) -> Result<client::Handle<Client>, String> {
        let config = Arc::new(client::Config { inactivity_timeout: None, ..Default::default() });
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(self.spec.ssh).await.map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            let mut handle = client::connect_stream(config, tcp, Client).await.map_err(|e| e.to_string())?;
            let hash = handle.best_supported_rsa_hash().await.map_err(|e| e.to_string())?.flatten();
            let auth = handle
                .authenticate_publickey(&self.spec.user, PrivateKeyWithHashAlg::new(self.key.clone(), hash))
                .await
                .map_err(|e| e.to_string())?;
            if !auth.success() {
                return Err(format!("the guest's sshd refused {}'s key", self.spec.user));
            }
            Ok(handle)
        };
        match tokio::time::timeout(LOGIN_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no SSH login within {} s", LOGIN_TIMEOUT.as_secs())),
        }
    }

    /// A session, made (with retries while the guest boots) if there is none.
    async fn connect(&self, guard: &mut Option<client::Handle<Client>>) -> Result<(), String> {
        if guard.as_ref().is_some_and(|h| !h.is_closed()) {
            return Ok(());
        }
        let mut pause = FIRST_BACKOFF;
        let mut last = String::new();
        for attempt in 1..=CONNECT_TRIES {
            match self.login().await {
                Ok(h) => {
                    info!(socket = %self.spec.socket.display(), "ssh forward: connected to {}@{}", self.spec.user, self.spec.ssh);
                    *guard = Some(h);
                    return Ok(());
                }
                Err(e) => {
                    debug!("ssh forward: waiting for sshd (try {attempt}): {e}");
                    last = e;
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
        Err(format!("cannot reach the guest's sshd at {}: {last}", self.spec.ssh))
    }

    /// A channel to the guest's socket; a broken session is made anew (three tries).
    async fn open(&self) -> Result<russh::Channel<client::Msg>, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let mut guard = self.session.lock().await;
            self.connect(&mut guard).await?;
            let Some(handle) = guard.as_ref() else { continue };
            match handle.channel_open_direct_streamlocal(self.spec.dest.clone()).await {
                Ok(ch) => return Ok(ch),
                Err(e) => {
                    last = e.to_string();
                    // The session may be dead (the VM rebooted): drop it and try anew.
                    if handle.send_keepalive(true).await.is_err() || handle.is_closed() {
                        *guard = None;
                    }
                }
            }
            drop(guard);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!("cannot open {} in the guest: {last}", self.spec.dest))
    }
}

async fn serve(forward: Arc<Forward>, listener: tokio::net::UnixListener) {
    // Log in at once, as gvproxy does, so the first client does not wait for the boot.
    {
        let f = forward.clone();
        tokio::spawn(async move {
            let mut guard = f.session.lock().await;
            if let Err(e) = f.connect(&mut guard).await {
                warn!(socket = %f.spec.socket.display(), "ssh forward: {e}");
            }
        });
    }
    loop {
        let (mut client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("ssh forward: accept on {}: {e}", forward.spec.socket.display());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let f = forward.clone();
        tokio::spawn(async move {
            match f.open().await {
                Ok(channel) => {
                    let mut stream = channel.into_stream();
                    match tokio::io::copy_bidirectional(&mut client, &mut stream).await {
                        Ok((up, down)) => debug!("ssh forward {}: {up} bytes in, {down} out", f.spec.dest),
                        Err(e) => debug!("ssh forward {}: {e}", f.spec.dest),
                    }
                }
                Err(e) => warn!(socket = %f.spec.socket.display(), "ssh forward: {e}"),
            }
        });
    }
}
