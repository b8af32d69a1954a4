//! The bounds on what guests may make usernet hold, as flags of `run` and `serve` (flattened
//! into `NetOpts`): each becomes a field of `usernet_core::config::Limits`, which documents
//! what gives way when it is reached.

use clap::Args;
use clap::builder::TypedValueParser;
use std::time::Duration;

use usernet_core::config::Limits;

/// The longest timeout a flag takes, in seconds (a week): longer is a parse error.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Bounds on what guests may make usernet hold; each is logged when reached and counted in
/// `usernet_limit_reached_total{limit=...}`.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Bounds (what a guest may make usernet hold)")]
pub struct LimitOpts {
    /// TCP flows at once, all guests together; a new connection beyond gets a RST.
    #[arg(long = "max-tcp-flows", value_name = "N", default_value_t = Limits::default().max_tcp_flows,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_tcp_flows: usize,
    /// TCP flows at once of one guest (one MAC, all its addresses); a new connection beyond
    /// gets a RST.
    #[arg(long = "max-tcp-flows-per-guest", value_name = "N", default_value_t = Limits::default().max_tcp_flows_per_guest,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_tcp_flows_per_guest: usize,
    /// Guest connects in progress at once; beyond, the oldest is abandoned (the guest gets a RST).
    #[arg(long = "max-pending-connects", value_name = "N", default_value_t = Limits::default().max_pending_connects,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_pending_connects: usize,
    /// UDP flows at once; beyond, the least recently used is closed.
    #[arg(long = "max-udp-flows", value_name = "N", default_value_t = Limits::default().max_udp_flows,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_udp_flows: usize,
    /// Guest bytes held in usernet, all flows together, that host sockets did not take yet
    /// (MiB); beyond, guest data waits in the guest until the host side drains.
    #[arg(long = "max-buffered", value_name = "MIB", default_value_t = (Limits::default().max_buffered >> 20) as u64,
          value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_buffered_mib: u64,
    /// Reset a TCP connection whose host peer takes none of the guest's data for this many
    /// seconds (0: never; at most 604800, a week). Idle connections with nothing to send are
    /// never reset.
    #[arg(long = "tcp-stall-timeout", value_name = "SECONDS", default_value_t = Limits::default().tcp_stall_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_SECS))]
    pub tcp_stall_timeout: u64,
    /// Descriptors kept free for listeners, services and the API: guest flows never take
    /// the last N of the open-file limit (at most half of it).
    #[arg(long = "fd-reserve", value_name = "N", default_value_t = Limits::default().fd_reserve)]
    pub fd_reserve: usize,
    /// DHCP offers not yet taken up at once; beyond, the oldest offer is forgotten.
    #[arg(long = "max-dhcp-offers", value_name = "N", default_value_t = Limits::default().max_dhcp_offers,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_dhcp_offers: usize,
    /// DNS queries in flight to the upstreams from one guest (its MAC, with all its
    /// addresses); beyond, a query is dropped (the guest's resolver asks again).
    #[arg(long = "max-dns-queries-per-guest", value_name = "N", default_value_t = Limits::default().max_dns_queries_per_guest,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_dns_queries_per_guest: usize,
    /// Connections to the HTTP proxy at once (explicit and transparent); beyond, refused.
    #[arg(long = "max-proxy-connections", value_name = "N", default_value_t = Limits::default().max_proxy_connections,
          value_parser = clap::value_parser!(u64).range(1..).map(|v| v as usize))]
    pub max_proxy_connections: usize,
    /// Seconds the proxy waits for a request's whole header (or an intercepted TLS
    /// ClientHello), and for a kept-alive connection's next request (at most 604800, a week).
    #[arg(long = "proxy-header-timeout", value_name = "SECONDS", default_value_t = Limits::default().proxy_header_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    pub proxy_header_timeout: u64,
    /// Seconds a proxied connection (a CONNECT tunnel, a relay, a kept-alive connection)
    /// may carry nothing either way before it is closed (at most 604800, a week).
    #[arg(long = "proxy-idle-timeout", value_name = "SECONDS", default_value_t = Limits::default().proxy_idle_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS))]
    pub proxy_idle_timeout: u64,
}

impl LimitOpts {
    pub fn to_limits(&self) -> Limits {
        Limits {
            max_tcp_flows: self.max_tcp_flows,
            max_tcp_flows_per_guest: self.max_tcp_flows_per_guest,
            max_pending_connects: self.max_pending_connects,
            max_udp_flows: self.max_udp_flows,
            max_buffered: (self.max_buffered_mib as usize) << 20,
            tcp_stall_timeout: Duration::from_secs(self.tcp_stall_timeout),
            fd_reserve: self.fd_reserve,
            max_dhcp_offers: self.max_dhcp_offers,
            max_dns_queries_per_guest: self.max_dns_queries_per_guest,
            max_proxy_connections: self.max_proxy_connections,
            proxy_header_timeout: Duration::from_secs(self.proxy_header_timeout),
            proxy_idle_timeout: Duration::from_secs(self.proxy_idle_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The timeouts take up to a week; beyond (e.g. u64::MAX, which would overflow the
    /// deadlines made from them) is a parse error naming the flag.
    #[test]
    fn timeouts_are_bounded() {
        let parse = |flag: &str, value: &str| {
            crate::Cli::try_parse_from(["usernet", "run", flag, value, "--", "true"]).map(|cli| match cli.command {
                crate::Command::Run(a) => a.net.limits.to_limits(),
                _ => unreachable!(),
            })
        };
        let week = super::MAX_TIMEOUT_SECS.to_string();
        for flag in ["--tcp-stall-timeout", "--proxy-header-timeout", "--proxy-idle-timeout"] {
            assert!(parse(flag, &week).is_ok(), "{flag}");
            for bad in ["604801", "18446744073709551615"] {
                let e = parse(flag, bad).unwrap_err();
                assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{flag} {bad}");
                assert!(e.to_string().contains(flag), "{e}");
            }
        }
        assert_eq!(parse("--tcp-stall-timeout", "0").unwrap().tcp_stall_timeout.as_secs(), 0);
    }
}
