//! Starting the network: the same for `run` and `serve`.

use usernet_core::config::NetConfig;

/// What `run` and `serve` start alike: the gateway services with the proxy configured, and
/// the engine on top of them (with `link` as its first guest link, when given).
pub struct Network {
    pub engine: usernet_core::engine::Engine,
    pub dns_records: std::sync::Arc<usernet_core::services::dns::DnsRecords>,
    pub proxy_settings: usernet_core::services::proxy::ProxySettings,
    /// The transparent proxy's hook; the caller installs it once its own hooks are in.
    pub proxy_hook: usernet_core::services::TcpHook,
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
    if proxy.has_upstream() {
        tracing::info!("proxy: {}", usernet_core::services::proxy::describe(&proxy));
    }
    let proxy_settings = services.proxy_settings();
    proxy_settings.set(proxy);
    let proxy_hook = services.proxy_hook();
    let mut engine =
        usernet_core::engine::Engine::without_link(cfg.clone(), services, pcap).context("network engine")?;
    if let Some(link) = link {
        engine.add_link(link);
    }
    Ok(Network { engine, dns_records, proxy_settings, proxy_hook })
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
/// `--api PATH` is an error; without it, the instance runs on without an API.
pub fn start_api(
    api: Option<&std::path::Path>,
    runtime: Option<&std::path::Path>,
    handle: usernet_core::engine::control::ControlHandle,
    dns_records: std::sync::Arc<usernet_core::services::dns::DnsRecords>,
    cfg: &std::sync::Arc<NetConfig>,
    proxy: &usernet_core::services::proxy::ProxySettings,
    about: usernet_host::api::About,
) -> anyhow::Result<Option<Api>> {
    use anyhow::Context;
    use usernet_host::api::registry;
    let serve = |path: &std::path::Path| {
        usernet_host::api::serve(path, handle.clone(), dns_records.clone(), cfg.clone(), Some(proxy.clone()))
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
            (server, registration)
        }
        (None, Some(dir)) => match serve(&registry::entry_path(dir, std::process::id())) {
            Ok(server) => (server, None),
            Err(e) => {
                tracing::warn!("`usernet ps` will not list this instance: {}: {e}", dir.display());
                return Ok(None);
            }
        },
        (None, None) => return Ok(None),
    };
    server.set_about(about);
    Ok(Some(Api { server, _registration: registration }))
}
