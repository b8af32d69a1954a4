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
