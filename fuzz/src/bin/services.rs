//! The gateway's services as a guest talks to them: the DHCP server (a sequence of
//! requests from two MACs, over time, with its leases and offers) and the DNS server's local
//! answers (the table, /etc/hosts' names, the reverse zones), which must also stay valid DNS.
use std::sync::Arc;
use std::time::{Duration, Instant};

use usernet_core::config::NetConfig;
use usernet_core::services::dhcp::DhcpServer;
use usernet_core::services::dns::{DnsServer, Local, records::DnsRecords};

fn main() {
    let cfg = Arc::new(NetConfig::default());
    afl::fuzz!(|data: &[u8]| {
        let Some((&which, input)) = data.split_first() else { return };
        if which & 1 == 0 {
            let mut dhcp = DhcpServer::new(cfg.clone());
            let mut now = Instant::now();
            // Requests separated by 0xff 0xff; each one's first byte picks the MAC and the time step.
            for (i, req) in input.split(|&b| b == 0xff).enumerate() {
                let Some((&meta, payload)) = req.split_first() else { continue };
                now += Duration::from_secs(u64::from(meta >> 2));
                let mac = [2, 0, 0, 0, 0, (meta & 3) + (i as u8 & 1)];
                let _ = dhcp.handle_at(mac, payload, now);
            }
        } else {
            let records = Arc::new(DnsRecords::from_config(&cfg));
            let dns = DnsServer::new(&cfg, records);
            if let Local::Reply(reply) = dns.local(input) {
                check_reply(&reply);
            }
        }
    });
}

/// A reply of ours must at least have a whole header.
fn check_reply(reply: &[u8]) {
    assert!(reply.len() >= 12, "a reply without a header: {reply:?}");
}
