//! Starting the network: the same for `run` and `serve`.

use usernet_core::config::NetConfig;

/// What `run` and `serve` start alike: the gateway services with the proxy configured, and
/// the engine on top of them (with `link` as its first guest link, when given).
pub struct Network {
    pub engine: usernet_core::engine::Engine,
    /// What the control API shares with the services.
    pub shared: Shared,
    /// The transparent proxy's hook; the caller installs it once its own hooks are in.
    pub proxy_hook: usernet_core::services::TcpHook,
    /// A handle on the engine's gateway services, for more engines serving the same guest
    /// (`run --engine-threads`).
    pub services: usernet_core::services::ServiceHub,
}

/// The gateway services' state that the control API reads and changes.
#[derive(Clone)]
pub struct Shared {
    pub dns_records: std::sync::Arc<usernet_core::services::dns::DnsRecords>,
    pub proxy_settings: usernet_core::services::proxy::ProxySettings,
    /// The recent DNS queries and proxy requests (`/v1/log/*`, the dashboard).
    pub activity: std::sync::Arc<usernet_core::services::activity::Activity>,
}

pub fn start_network(
    cfg: &std::sync::Arc<NetConfig>,
    proxy: usernet_core::services::proxy::ProxyConfig,
    pcap: Option<usernet_core::pcap::PcapWriter>,
    link: Option<Box<dyn usernet_core::link::Link>>,
) -> anyhow::Result<Network> {
    use anyhow::Context;
    let services = usernet_core::services::ServiceHub::start(cfg.clone()).context("starting gateway services")?;
    let dns_records = services.dns_records();
    let activity = services.activity();
    if proxy.has_upstream() {
        tracing::info!("proxy: {}", usernet_core::services::proxy::describe(&proxy));
    }
    let proxy_settings = services.proxy_settings();
    proxy_settings.set(proxy);
    let proxy_hook = services.proxy_hook();
    let handle = services.handle();
    let mut engine =
        usernet_core::engine::Engine::without_link(cfg.clone(), services, pcap).context("network engine")?;
    // The drop-in modes have no `--busy-poll`; `run` and `serve` set theirs afterwards.
    if let Some(us) = busy_poll_from_env()? {
        engine.set_busy_poll(std::time::Duration::from_micros(us));
    }
    if let Some(link) = link {
        engine.add_link(link);
    }
    Ok(Network { engine, shared: Shared { dns_records, proxy_settings, activity }, proxy_hook, services: handle })
}

/// `USERNET_BUSY_POLL`, the busy-poll window in microseconds (see `--busy-poll`), if set.
fn busy_poll_from_env() -> anyhow::Result<Option<u64>> {
    let Some(value) = std::env::var_os("USERNET_BUSY_POLL") else { return Ok(None) };
    parse_busy_poll(&value.to_string_lossy()).map(Some)
}

fn parse_busy_poll(value: &str) -> anyhow::Result<u64> {
    match value.trim().parse::<u64>() {
        Ok(us) if us <= crate::net_opts::MAX_BUSY_POLL_US => Ok(us),
        _ => anyhow::bail!(
            "USERNET_BUSY_POLL={value}: not a number of microseconds from 0 to {}",
            crate::net_opts::MAX_BUSY_POLL_US
        ),
    }
}

/// The runtime directory where this instance registers its API (see
/// `usernet_host::api::registry`), created if needed; None, with a warning, when there is
/// no usable one. Call it early: `run` may later join a user namespace, where the
/// directory's owner would look different.
pub fn runtime_dir() -> Option<std::path::PathBuf> {
    match usernet_host::api::registry::create_runtime_dir() {
        Ok(dir) => Some(dir),
        Err(e) => {
            tracing::warn!("`usernet ps` will not list this instance: {e}");
            None
        }
    }
}

/// A running control API and the entry that registers it in the runtime directory; both
/// go when it is dropped.
pub struct Api {
    pub server: usernet_host::api::ApiServer,
    _registration: Option<usernet_host::api::registry::Registration>,
}

/// Serves the control API: on `api` (`--api PATH`), registered in `runtime` with a symlink,
/// or else on this instance's own entry in `runtime` (`<pid>.sock`). Only a failure on
/// `--api PATH` is an error; without it, the instance runs on without an API socket. With
/// `web` (`--web`), the dashboard is served too (by an API without a socket if there is
/// none), and its URL printed on stderr.
pub fn start_api(
    api: Option<&std::path::Path>,
    runtime: Option<&std::path::Path>,
    handle: usernet_core::engine::control::ControlHandle,
    shared: &Shared,
    cfg: &std::sync::Arc<NetConfig>,
    about: usernet_host::api::About,
    web: Option<crate::net_opts::WebPort>,
) -> anyhow::Result<Option<Api>> {
    use anyhow::Context;
    use usernet_host::api::registry;
    let proxy = Some(shared.proxy_settings.clone());
    let serve = |path: &std::path::Path| {
        usernet_host::api::serve(path, handle.clone(), shared.dns_records.clone(), cfg.clone(), proxy.clone())
    };
    let (server, registration) = match (api, runtime) {
        (Some(path), _) => {
            let server = serve(path).with_context(|| format!("cannot serve the control API on {}", path.display()))?;
            let registration = runtime.and_then(|dir| match registry::Registration::link(dir, path) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("`usernet ps` will not list this instance: {}: {e}", dir.display());
                    None
                }
            });
            (Some(server), registration)
        }
        (None, Some(dir)) => match serve(&registry::entry_path(dir, std::process::id())) {
            Ok(server) => (Some(server), None),
            Err(e) => {
                tracing::warn!("`usernet ps` will not list this instance: {}: {e}", dir.display());
                (None, None)
            }
        },
        (None, None) => (None, None),
    };
    let server = match (server, &web) {
        (Some(server), _) => server,
        (None, Some(_)) => {
            usernet_host::api::serve_without_socket(handle, shared.dns_records.clone(), cfg.clone(), proxy)
                .context("the dashboard's API")?
        }
        (None, None) => return Ok(None),
    };
    server.set_about(about);
    server.set_activity(shared.activity.clone());
    if let Some(web) = web {
        let url = usernet_host::api::web::url(web.addr, &web.token);
        server
            .serve_web(web.listener, web.token)
            .with_context(|| format!("cannot serve the dashboard on {}", web.addr))?;
        eprintln!("usernet: dashboard at {url}");
    }
    Ok(Some(Api { server, _registration: registration }))
}

/// Confines the process once a mode's setup is done (`usernet_host::confine`), unless
/// `no_sandbox`. A failure is one warning: usernet still serves, with what it holds.
pub fn confine(no_sandbox: bool) {
    confine_prepared(no_sandbox, None);
}

/// [`confine`] with the sandbox prepared beforehand (`usernet_host::confine::prepare`, while
/// waiting for something else); None: prepared now.
pub fn confine_prepared(
    no_sandbox: bool,
    prepared: Option<Result<usernet_host::confine::Prepared, usernet_host::confine::ConfineError>>,
) {
    if let Err(e) = usernet_host::confine::apply_unless(no_sandbox, prepared) {
        tracing::warn!("the sandbox is not on: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::parse_busy_poll;

    #[test]
    fn busy_poll_from_the_environment() {
        assert_eq!(parse_busy_poll("0").unwrap(), 0);
        assert_eq!(parse_busy_poll("250").unwrap(), 250);
        for bad in ["", "-1", "1e3", "10001", "fast"] {
            let e = parse_busy_poll(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("USERNET_BUSY_POLL={bad}:")), "{e}");
        }
    }
}
