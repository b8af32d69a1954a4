//! The API over real HTTP on a real Unix socket, against a fake engine: a thread that owns
//! a mio::Poll (for the ControlHandle's waker) and answers every Command, keeping the
//! listeners it is given so the published ports stay bound.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::client::{self, Response};
use super::serve;
use usernet_core::config::NetConfig;
use usernet_core::engine::control::{Command, ControlHandle, FlowInfo, Published, Stats};
use usernet_core::engine::metrics::{
    Counters, DropReason, EngineMetrics, FLOW_STATES, LinkCounters, LinkSample, ListenerSample, LoopCounters,
};
use usernet_core::ports::BoundListener;
use usernet_core::services::dns::DnsRecords;
use usernet_core::services::metrics::{ProxyOutcome, ServicesSample, UpstreamCounters};

const WAKER: mio::Token = mio::Token(0);

/// Starts the fake engine; it stops when every ControlHandle is gone (or after a minute).
fn fake_engine() -> ControlHandle {
    let poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).unwrap());
    let (tx, rx) = mpsc::channel::<Command>();
    std::thread::spawn(move || {
        let mut poll = poll;
        let mut events = mio::Events::with_capacity(8);
        let mut served: Vec<(Published, BoundListener)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
            loop {
                match rx.try_recv() {
                    Ok(cmd) => answer(cmd, &mut served),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        }
    });
    ControlHandle::new(tx, waker)
}

fn answer(cmd: Command, served: &mut Vec<(Published, BoundListener)>) {
    match cmd {
        Command::Publish { listeners, guest_ip, reply } => {
            let mut out = Vec::new();
            for l in listeners {
                let p = Published { host: l.local, proto: l.proto, guest_ip, guest_port: l.guest_port };
                out.push(p.clone());
                served.push((p, l));
            }
            let _ = reply.send(out);
        }
        Command::Unpublish { host, proto, reply } => {
            let before = served.len();
            served.retain(|(p, _)| !(p.host == host && p.proto == proto));
            let _ = reply.send(served.len() != before);
        }
        Command::ListPorts { reply } => {
            let _ = reply.send(served.iter().map(|(p, _)| p.clone()).collect());
        }
        Command::Leases { reply } => {
            let _ = reply.send(vec![(Ipv4Addr::new(192, 168, 65, 2), [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee])]);
        }
        Command::Stats { reply } => {
            let _ = reply.send(Stats {
                frames_in: 10,
                frames_out: 20,
                bytes_in: 1000,
                bytes_out: 2000,
                dropped_in: 1,
                tcp_flows: 2,
                udp_flows: 1,
                icmp_flows: 0,
                capture_dropped: 0,
            });
        }
        Command::Flows { reply } => {
            let _ = reply.send(vec![FlowInfo {
                proto: "tcp",
                guest: "192.168.65.2:40000".into(),
                remote: "127.0.0.1:80".into(),
                host: Some("127.0.0.1:80".into()),
                state: "established",
                bytes_from_guest: 77,
                bytes_to_guest: 1 << 20,
                age_ms: 1500,
                idle_ms: 20,
            }]);
        }
        Command::Tunnel { reply, .. } => {
            let _ = reply.send(Err("no guest in this fake engine".into()));
        }
        Command::Capture { tap } => {
            // Three frames, as the engine would see them: only the TCP ones to port 80
            // pass a `proto=tcp&port=80` filter.
            let mut w = usernet_core::pcap::PcapWriter::live_only();
            w.add_tap(tap);
            for (proto, port) in [(6u8, 80u16), (17, 80), (6, 81)] {
                w.write(&test_frame(proto, port));
            }
        }
        // Only engines of a set of shards pass these to each other.
        Command::Gather(_) => unreachable!("the API never sends Gather"),
        Command::DropLink { .. } => unreachable!("the API never drops a link"),
        Command::Metrics { reply } => {
            let mut counters = Counters::default();
            counters.connect_failed(libc::ECONNREFUSED);
            counters.dropped(DropReason::Fragment);
            let upstream: SocketAddr = "127.0.0.1:5353".parse().unwrap();
            let _ = reply.send(EngineMetrics {
                links: vec![LinkSample {
                    index: 0,
                    name: "tap \"eth0\"".into(),
                    counters: LinkCounters { rx_frames: 3, rx_bytes: 300, tx_frames: 4, tx_bytes: 4000 },
                    guests: vec![(
                        [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
                        vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 65, 2))],
                    )],
                }],
                counters,
                flows: FLOW_STATES.iter().map(|k| (*k, u64::from(*k == ("tcp", "established")))).collect(),
                listeners: served
                    .iter()
                    .map(|(p, _)| ListenerSample {
                        host: p.host,
                        proto: p.proto,
                        guest: std::net::SocketAddr::new(p.guest_ip, p.guest_port),
                        accepted: 7,
                    })
                    .collect(),
                loop_counters: LoopCounters { iterations: 42, busy_nanos: 1_500_000_000 },
                services: Some(ServicesSample {
                    dns_queries: 5,
                    dns_local: 1,
                    upstreams: vec![(upstream, UpstreamCounters { queries: 4, answers: 3, failures: [1, 0, 0, 0] })],
                    proxy: vec![(ProxyOutcome::Forwarded, 2)],
                    limits: Vec::new(),
                }),
            });
        }
    }
}

/// An Ethernet frame with IPv4 192.168.65.2 -> 192.168.65.254 and a 20-byte TCP or UDP
/// header to `port`.
fn test_frame(proto: u8, port: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    usernet_wire::ipv4::Ipv4Header::new([192, 168, 65, 2].into(), [192, 168, 65, 254].into(), proto, 20)
        .emit(&mut f[14..]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f
}

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("usernet-api-test-{}-{name}.sock", std::process::id()))
}

struct Fixture {
    path: PathBuf,
    dns: Arc<DnsRecords>,
    _server: super::ApiServer,
}

fn start(name: &str) -> Fixture {
    let path = sock_path(name);
    let _ = std::fs::remove_file(&path);
    let cfg = Arc::new(NetConfig::default());
    let dns = Arc::new(DnsRecords::from_config(&cfg));
    let server = serve(&path, fake_engine(), dns.clone(), cfg, None).unwrap();
    Fixture { path, dns, _server: server }
}

impl Fixture {
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        client::request(&self.path, method, path, body.map(str::as_bytes)).unwrap()
    }

    fn json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let r = client::request_json(&self.path, method, path, &body).unwrap();
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let r = self.call("GET", path, None);
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    }
}

fn text(r: &Response) -> String {
    String::from_utf8_lossy(&r.body).to_string()
}

/// A TCP port that was free a moment ago on 127.0.0.1.
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn socket_file_lifecycle() {
    let path = sock_path("lifecycle");
    let _ = std::fs::remove_file(&path);
    // A stale socket (bound, nobody listening any more) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let cfg = Arc::new(NetConfig::default());
    let dns = Arc::new(DnsRecords::new());
    let server = serve(&path, fake_engine(), dns.clone(), cfg.clone(), None).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A live one is not.
    let err = serve(&path, fake_engine(), dns.clone(), cfg.clone(), None).err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(server);
    assert!(!path.exists(), "socket file removed on drop");
    // Not a socket: left alone.
    std::fs::write(&path, b"x").unwrap();
    assert!(serve(&path, fake_engine(), dns, cfg, None).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn v1_ports() {
    let f = start("v1ports");
    let (status, body) = f.get("/v1/ports");
    assert_eq!((status, body), (200, json!([])));

    // Picked port on loopback.
    let (status, body) =
        f.json("POST", "/v1/ports", json!({"host_ip":"127.0.0.1","host_port":0,"guest_port":80,"protocol":"tcp"}));
    assert_eq!(status, 201, "{body}");
    let list = body.as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["host_ip"], "127.0.0.1");
    assert_eq!(list[0]["guest_ip"], "192.168.65.2");
    assert_eq!(list[0]["guest_port"], 80);
    assert_eq!(list[0]["protocol"], "tcp");
    let port = list[0]["host_port"].as_u64().unwrap() as u16;
    assert_ne!(port, 0);
    // It is really listening (the fake engine holds the socket).
    TcpStream::connect(("127.0.0.1", port)).unwrap();

    // The same port again: Docker's message, 409.
    let (status, body) = f.json("POST", "/v1/ports", json!({"host_ip":"127.0.0.1","host_port":port,"guest_port":81}));
    assert_eq!(status, 409);
    assert_eq!(body["error"], format!("Bind for 127.0.0.1:{port} failed: port is already allocated"));

    // Docker grammar, UDP, explicit guest.
    let (status, body) = f.json("POST", "/v1/ports", json!({"spec":"127.0.0.1::53/udp","guest_ip":"192.168.65.3"}));
    assert_eq!(status, 201, "{body}");
    assert_eq!(body[0]["protocol"], "udp");
    assert_eq!(body[0]["guest_ip"], "192.168.65.3");
    let udp_port = body[0]["host_port"].as_u64().unwrap() as u16;
    assert!(UdpSocket::bind(("127.0.0.1", udp_port)).is_err());

    // A guest's IPv6 address, of the network's /64 only.
    let (status, body) = f.json("POST", "/v1/ports", json!({"spec":"[::1]::80","guest_ip":"fd75:7365:726e::2"}));
    assert_eq!(status, 201, "{body}");
    assert_eq!((body[0]["host_ip"].as_str(), body[0]["guest_ip"].as_str()), (Some("::1"), Some("fd75:7365:726e::2")));
    let v6_port = body[0]["host_port"].as_u64().unwrap() as u16;
    let (status, body) = f.json("POST", "/v1/ports", json!({"spec":"[::1]::80","guest_ip":"2001:db8::2"}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"].as_str(),
        Some("cannot publish to 2001:db8::2: not in the guest network's fd75:7365:726e::/64")
    );
    let (status, _) = f.json("DELETE", "/v1/ports", json!({"host_ip":"::1","host_port":v6_port}));
    assert_eq!(status, 200);

    let (_, body) = f.get("/v1/ports");
    assert_eq!(body.as_array().unwrap().len(), 2);

    // Errors in Docker's words.
    for (req, msg) in [
        (json!({"guest_port":80,"protocol":"xyz"}), "invalid proto: xyz"),
        (json!({"host_port":70000,"guest_port":80}), "invalid hostPort: 70000"),
        (json!({"spec":"1.2.3:80:80"}), "invalid IP address: 1.2.3"),
    ] {
        let (status, body) = f.json("POST", "/v1/ports", req);
        assert_eq!((status, body["error"].as_str()), (400, Some(msg)));
    }
    let r = f.call("POST", "/v1/ports", Some("{not json"));
    assert_eq!(r.status, 400);
    assert!(r.error_message().starts_with("invalid JSON body"), "{}", text(&r));
    let (status, _) = f.json("POST", "/v1/ports", json!({"guest_port":80,"bogus":1}));
    assert_eq!(status, 400);
    let (status, body) = f.json("POST", "/v1/ports", json!({"guest_port":80,"guest_ip":"x"}));
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid guest IP: x")));

    // Remove.
    let (status, body) =
        f.json("DELETE", "/v1/ports", json!({"host_ip":"127.0.0.1","host_port":port,"protocol":"tcp"}));
    assert_eq!(status, 200);
    assert_eq!(body[0]["host_port"], port);
    let (status, body) = f.json("DELETE", "/v1/ports", json!({"host_port":port}));
    assert_eq!(status, 404);
    assert_eq!(body["error"], format!("no port published at {port}/tcp"));
    let (status, _) = f.json("DELETE", "/v1/ports", json!({"host_port":udp_port,"protocol":"udp"}));
    assert_eq!(status, 200);
    let (_, body) = f.get("/v1/ports");
    assert_eq!(body, json!([]));
}

#[test]
fn v1_ports_every_address() {
    let f = start("v1every");
    let (status, body) = f.json("POST", "/v1/ports", json!({"guest_port":8080}));
    assert_eq!(status, 201, "{body}");
    let list = body.as_array().unwrap();
    assert!(!list.is_empty());
    assert_eq!(list[0]["host_ip"], "0.0.0.0");
    let port = list[0]["host_port"].as_u64().unwrap();
    assert!(list.iter().all(|p| p["host_port"] == port));
    // Removing by port alone removes every address.
    let (status, body) = f.json("DELETE", "/v1/ports", json!({"host_port":port}));
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), list.len());
}

#[test]
fn v1_other_resources() {
    let f = start("v1other");
    assert_eq!(f.get("/v1/leases"), (200, json!([{"ip":"192.168.65.2","mac":"5a:94:ef:e4:0c:ee"}])));
    let (status, body) = f.get("/v1/stats");
    assert_eq!(status, 200);
    assert_eq!(body["frames_in"], 10);
    assert_eq!(body["tcp_flows"], 2);
    let (status, body) = f.get("/v1/flows");
    assert_eq!(status, 200);
    assert_eq!(body[0]["remote"], "127.0.0.1:80");
    assert_eq!(
        (&body[0]["bytes_to_guest"], &body[0]["idle_ms"], &body[0]["state"]),
        (&json!(1 << 20), &json!(20), &json!("established"))
    );

    // DNS.
    let (status, body) = f.get("/v1/dns");
    assert_eq!(status, 200);
    assert!(body.as_array().unwrap().contains(&json!({"name":"host.docker.internal","ip":"192.168.65.254"})));
    let (status, body) = f.json("POST", "/v1/dns", json!({"name":"Web.Test.","ip":"192.168.65.2"}));
    assert_eq!((status, body), (201, json!({"name":"web.test","ip":"192.168.65.2"})));
    assert_eq!(f.dns.lookup("web.test"), Some(Ipv4Addr::new(192, 168, 65, 2)));
    let (status, body) = f.json("POST", "/v1/dns", json!({"name":"h.test","ip":"host-gateway"}));
    let both = json!({"name":"h.test","ip":"192.168.65.254","ips":["192.168.65.254","fd75:7365:726e::254"]});
    assert_eq!((status, &body), (201, &both));
    assert_eq!(f.get("/v1/dns/h.test"), (200, both));
    assert_eq!(f.get("/v1/dns/web.test"), (200, json!({"name":"web.test","ip":"192.168.65.2"})));
    let (status, _) = f.json("POST", "/v1/dns", json!({"name":"x..y","ip":"1.2.3.4"}));
    assert_eq!(status, 400);
    let (status, _) = f.json("POST", "/v1/dns", json!({"name":"x","ip":"1.2.3"}));
    assert_eq!(status, 400);
    assert_eq!(f.call("DELETE", "/v1/dns/web.test", None).status, 204);
    assert_eq!(f.call("DELETE", "/v1/dns/web.test", None).status, 404);
    assert_eq!(f.dns.lookup("web.test"), None);
    assert_eq!(f.get("/v1/dns/web.test").0, 404);
}

/// `/v1/dns` holds AAAA records too: listed after the name's A record, added by a POST with
/// an IPv6 `ip`, shown by `GET /v1/dns/NAME` (`ips` when the name has both), removed with
/// the A record by a DELETE.
#[test]
fn v1_dns_both_families() {
    let f = start("v1dns6");
    let net = NetConfig::default().v6.unwrap();
    let (status, body) = f.get("/v1/dns");
    assert_eq!(status, 200);
    let list = body.as_array().unwrap();
    let at = list.iter().position(|r| r["name"] == "host.docker.internal").unwrap();
    assert_eq!(
        list[at..at + 2],
        [
            json!({"name":"host.docker.internal","ip":"192.168.65.254"}),
            json!({"name":"host.docker.internal","ip":net.host.to_string()})
        ],
        "{body}"
    );
    assert_eq!(
        f.get("/v1/dns/host.docker.internal"),
        (
            200,
            json!({"name":"host.docker.internal","ip":"192.168.65.254","ips":["192.168.65.254",net.host.to_string()]})
        )
    );

    // An AAAA record alone: no A record, and GET's body as for an A record alone.
    let (status, body) = f.json("POST", "/v1/dns", json!({"name":"Six.Test.","ip":"fd00::5"}));
    assert_eq!((status, body), (201, json!({"name":"six.test","ip":"fd00::5"})));
    assert_eq!(f.dns.lookup6("six.test"), Some("fd00::5".parse().unwrap()));
    assert_eq!(f.dns.lookup("six.test"), None);
    assert_eq!(f.get("/v1/dns/six.test"), (200, json!({"name":"six.test","ip":"fd00::5"})));

    // Then an A record too: the AAAA record stays; GET's `ip` is the IPv4 address.
    let (status, _) = f.json("POST", "/v1/dns", json!({"name":"six.test","ip":"10.0.0.5"}));
    assert_eq!(status, 201);
    let (status, body) = f.json("POST", "/v1/dns", json!({"name":"six.test","ip":"[fd00::6]"}));
    assert_eq!((status, body), (201, json!({"name":"six.test","ip":"fd00::6"})), "replaces the AAAA record");
    assert_eq!(f.dns.lookup("six.test"), Some(Ipv4Addr::new(10, 0, 0, 5)));
    assert_eq!(f.dns.lookup6("six.test"), Some("fd00::6".parse().unwrap()));
    assert_eq!(
        f.get("/v1/dns/six.test"),
        (200, json!({"name":"six.test","ip":"10.0.0.5","ips":["10.0.0.5","fd00::6"]}))
    );
    let (_, body) = f.get("/v1/dns");
    let six: Vec<&Value> = body.as_array().unwrap().iter().filter(|r| r["name"] == "six.test").collect();
    assert_eq!(six, [&json!({"name":"six.test","ip":"10.0.0.5"}), &json!({"name":"six.test","ip":"fd00::6"})]);
    let names: Vec<&str> = body.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(names.is_sorted(), "{names:?}");

    // A bad address is a 400 that says what it wants, and adds nothing.
    let (status, body) = f.json("POST", "/v1/dns", json!({"name":"bad.test","ip":"fd00::zz"}));
    assert_eq!(
        (status, body),
        (400, json!({"error":"invalid IP address: \"fd00::zz\" (want an IPv4 or IPv6 address, or host-gateway)"}))
    );
    assert_eq!(f.get("/v1/dns/bad.test").0, 404);

    // DELETE takes both records.
    assert_eq!(f.call("DELETE", "/v1/dns/Six.Test", None).status, 204);
    assert_eq!((f.dns.lookup("six.test"), f.dns.lookup6("six.test")), (None, None));
    assert_eq!(f.get("/v1/dns/six.test").0, 404);
    let (_, body) = f.get("/v1/dns");
    assert!(!body.as_array().unwrap().iter().any(|r| r["name"] == "six.test"), "{body}");
    assert_eq!(f.call("DELETE", "/v1/dns/six.test", None).status, 404);
}

#[test]
fn metrics_in_prometheus_text_format() {
    let f = start("metrics");
    let port = free_tcp_port();
    let (status, _) = f.json("POST", "/v1/ports", json!({"host_ip":"127.0.0.1","host_port":port,"guest_port":80}));
    assert_eq!(status, 201);
    let r = f.call("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let body = text(&r);
    for line in [
        "# TYPE usernet_build_info gauge",
        &format!("usernet_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        "# TYPE usernet_link_bytes_total counter",
        r#"usernet_link_bytes_total{link="0",name="tap \"eth0\"",direction="rx"} 300"#,
        r#"usernet_link_frames_total{link="0",name="tap \"eth0\"",direction="tx"} 4"#,
        r#"usernet_dropped_frames_total{direction="rx",reason="fragment"} 1"#,
        r#"usernet_dropped_frames_total{direction="tx",reason="send_error"} 0"#,
        r#"usernet_flows{proto="tcp",state="established"} 1"#,
        r#"usernet_flows{proto="udp",state="open"} 0"#,
        r#"usernet_connect_failures_total{reason="refused"} 1"#,
        r#"usernet_connect_failures_total{reason="timeout"} 0"#,
        r#"usernet_tcp_resent_bytes_total{cause="sack"} 0"#,
        r#"usernet_tcp_resent_bytes_total{cause="probe"} 0"#,
        r#"usernet_published_ports{proto="tcp"} 1"#,
        &format!(
            r#"usernet_published_connections_accepted_total{{host="127.0.0.1:{port}",guest="192.168.65.2:80",proto="tcp"}} 7"#
        ),
        "usernet_event_loop_iterations_total 42",
        "usernet_event_loop_busy_seconds_total 1.5",
        "usernet_dns_queries_total 5",
        r#"usernet_dns_upstream_queries_total{upstream="127.0.0.1:5353"} 4"#,
        r#"usernet_dns_upstream_answers_total{upstream="127.0.0.1:5353"} 3"#,
        r#"usernet_dns_upstream_failures_total{upstream="127.0.0.1:5353",reason="timeout"} 1"#,
        r#"usernet_proxy_requests_total{outcome="forwarded"} 2"#,
    ] {
        assert!(body.lines().any(|l| l == line), "no line {line:?} in\n{body}");
    }
    assert!(body.lines().any(|l| l.starts_with("process_start_time_seconds ")), "{body}");
    // Every family's samples follow its TYPE line, and no family comes twice.
    let mut families = Vec::new();
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(!families.contains(&name), "{name} twice");
            families.push(name);
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            assert_eq!(Some(name), families.last().map(String::as_str), "{l} outside its family");
        }
    }
    assert_eq!(f.call("POST", "/metrics", None).status, 405);
}

/// `/v1/policy`: GET shows the rules, PUT replaces them, POST adds to them, a bad rule is a
/// 400 that changes nothing; the change is live in the shared configuration; `/metrics`
/// counts denials by protocol and reason.
#[test]
fn v1_policy() {
    use usernet_core::policy::{DenyReason, Verdict, Via};
    let path = sock_path("policy");
    let _ = std::fs::remove_file(&path);
    let cfg = Arc::new(NetConfig::default());
    let dns = Arc::new(DnsRecords::from_config(&cfg));
    let server = serve(&path, fake_engine(), dns.clone(), cfg.clone(), None).unwrap();
    let f = Fixture { path, dns, _server: server };
    let (status, v) = f.get("/v1/policy");
    assert_eq!(status, 200);
    assert_eq!(v, json!({"allow": [], "deny": [], "allow_domains": [], "default": "allow", "learnt": []}));

    let (status, v) = f.json(
        "PUT",
        "/v1/policy",
        json!({"allow": ["198.51.100.0/24:80,443"], "deny": ["198.51.100.66/32"], "allow_domains": ["*.Ok.test."]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"allow": ["198.51.100.0/24:80,443"], "deny": ["198.51.100.66"], "allow_domains": ["ok.test"],
               "default": "deny", "learnt": []})
    );
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(cfg.policy.check(ip("198.51.100.5"), Some(443)), Verdict::Allow);
    assert_eq!(cfg.policy.check(ip("198.51.100.5"), Some(22)), Verdict::Deny(DenyReason::NotAllowed));

    let (status, v) =
        f.json("POST", "/v1/policy", json!({"deny": ["203.0.113.0/24"], "allow": ["198.51.100.0/24:80,443"]}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["deny"], json!(["198.51.100.66", "203.0.113.0/24"]));
    assert_eq!(v["allow"], json!(["198.51.100.0/24:80,443"]), "a rule already there is not added twice");

    for bad in [json!({"deny": ["203.0.113.0/33"]}), json!({"allow_domains": ["a b"]}), json!({"nope": []})] {
        let (status, v) = f.json("PUT", "/v1/policy", bad.clone());
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    assert_eq!(f.get("/v1/policy").1["deny"], json!(["198.51.100.66", "203.0.113.0/24"]), "unchanged");
    assert_eq!(f.call("DELETE", "/v1/policy", None).status, 405);

    // PUT with nothing: no rule, everything allowed again.
    let (status, v) = f.json("PUT", "/v1/policy", json!({}));
    assert_eq!((status, v["default"].as_str()), (200, Some("allow")));
    assert!(!cfg.policy.is_active());

    cfg.policy.denied(Via::Tcp, DenyReason::DenyRule, "203.0.113.1:80", None);
    let body = text(&f.call("GET", "/metrics", None));
    for line in [
        r#"usernet_policy_denied_total{proto="tcp",reason="deny_rule"} 1"#,
        r#"usernet_policy_denied_total{proto="proxy",reason="not_allowed"} 0"#,
        "usernet_policy_learnt_addresses 0",
    ] {
        assert!(body.lines().any(|l| l == line), "no line {line:?} in\n{body}");
    }
}

#[test]
fn routing_errors() {
    let f = start("routing");
    let r = f.call("GET", "/v1/nothing", None);
    assert_eq!(r.status, 404);
    assert!(r.error_message().contains("/v1/nothing"));
    assert_eq!(f.call("GET", "/nothing", None).status, 404);
    assert_eq!(f.call("GET", "/services/nothing", None).status, 404);
    let r = f.call("PUT", "/v1/ports", Some("{}"));
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST, DELETE"));
    assert_eq!(f.call("POST", "/v1/stats", None).status, 405);
    assert_eq!(f.call("PATCH", "/v1/dns/x", None).status, 405);
    // Too large a body.
    let big = vec![b' '; super::MAX_BODY + 1];
    let r = client::request(&f.path, "POST", "/v1/ports", Some(&big)).unwrap();
    assert_eq!(r.status, 413);
}

#[test]
fn gvproxy_forwarder() {
    let f = start("gvfwd");
    let port = free_tcp_port();
    let local = format!("127.0.0.1:{port}");
    let expose = json!({"local": local, "remote": "192.168.65.2:80", "protocol": "tcp"});
    let r = client::request_json(&f.path, "POST", "/services/forwarder/expose", &expose).unwrap();
    assert_eq!((r.status, text(&r)), (200, String::new()));
    TcpStream::connect(("127.0.0.1", port)).unwrap();

    // Same again: gvproxy's 500.
    let r = client::request_json(&f.path, "POST", "/services/forwarder/expose", &expose).unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(text(&r), format!("proxy already running for tcp on {local}\n"));

    // Remote without IP (the first guest), protocol defaulting to tcp, UDP.
    let udp_port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let udp_local = format!("127.0.0.1:{udp_port}");
    let (status, _) =
        f.json("POST", "/services/forwarder/expose", json!({"local": udp_local, "remote": ":53", "protocol": "udp"}));
    assert_eq!(status, 200);
    // A port published through /v1 is listed too.
    let (status, body) = f.json("POST", "/v1/ports", json!({"spec":"127.0.0.1::81"}));
    assert_eq!(status, 201);
    let v1_port = body[0]["host_port"].as_u64().unwrap();
    // A guest's IPv6 address as the remote.
    let v6_port = TcpListener::bind("[::1]:0").unwrap().local_addr().unwrap().port();
    let v6_local = format!("[::1]:{v6_port}");
    let (status, _) =
        f.json("POST", "/services/forwarder/expose", json!({"local": v6_local, "remote": "[fd75:7365:726e::2]:80"}));
    assert_eq!(status, 200);

    let (status, all) = f.get("/services/forwarder/all");
    assert_eq!(status, 200);
    let mut expected = vec![
        json!({"local": local, "remote": "192.168.65.2:80", "protocol": "tcp"}),
        json!({"local": udp_local, "remote": "192.168.65.2:53", "protocol": "udp"}),
        json!({"local": format!("127.0.0.1:{v1_port}"), "remote": "192.168.65.2:81", "protocol": "tcp"}),
        json!({"local": v6_local, "remote": "[fd75:7365:726e::2]:80", "protocol": "tcp"}),
    ];
    expected.sort_by_key(|v| (v["local"].as_str().unwrap().to_string(), v["protocol"].as_str().unwrap().to_string()));
    assert_eq!(all, Value::Array(expected));

    // Port taken by someone else: 500 with Docker's message.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let r = client::request_json(
        &f.path,
        "POST",
        "/services/forwarder/expose",
        &json!({"local": format!("127.0.0.1:{taken_port}"), "remote": "192.168.65.2:80"}),
    )
    .unwrap();
    assert_eq!(r.status, 500);
    assert_eq!(text(&r), format!("Bind for 127.0.0.1:{taken_port} failed: port is already allocated\n"));

    // Bad requests.
    let r = f.call("POST", "/services/forwarder/expose", Some("nope"));
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let r = client::request_json(
        &f.path,
        "POST",
        "/services/forwarder/expose",
        &json!({"local": "127.0.0.1:1", "remote": "192.168.65.2"}),
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(text(&r), "address 192.168.65.2: missing port in address\n");
    let r = f.call("GET", "/services/forwarder/expose", None);
    assert_eq!((r.status, text(&r)), (400, "post only\n".to_string()));
    let r = client::request_json(
        &f.path,
        "POST",
        "/services/forwarder/expose",
        &json!({"local": "127.0.0.1:1", "remote": ":80", "protocol": "sctp"}),
    )
    .unwrap();
    assert_eq!((r.status, text(&r)), (500, "unknown protocol sctp\n".to_string()));

    // Unexpose.
    let unexpose = json!({"local": local, "protocol": "tcp"});
    let r = client::request_json(&f.path, "POST", "/services/forwarder/unexpose", &unexpose).unwrap();
    assert_eq!(r.status, 200);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    let r = client::request_json(&f.path, "POST", "/services/forwarder/unexpose", &unexpose).unwrap();
    assert_eq!((r.status, text(&r)), (500, "proxy not found\n".to_string()));
    let (status, _) = f.json("POST", "/services/forwarder/unexpose", json!({"local": udp_local, "protocol": "udp"}));
    assert_eq!(status, 200);
    // A /v1 port can be unexposed by its address too.
    let (status, _) = f.json("POST", "/services/forwarder/unexpose", json!({"local": format!("127.0.0.1:{v1_port}")}));
    assert_eq!(status, 200);
    let (status, _) = f.json("POST", "/services/forwarder/unexpose", json!({"local": v6_local}));
    assert_eq!(status, 200);
    assert_eq!(f.get("/services/forwarder/all"), (200, json!([])));
}

#[test]
fn gvproxy_every_address() {
    let f = start("gvevery");
    let port = free_tcp_port();
    let (status, _) =
        f.json("POST", "/services/forwarder/expose", json!({"local": format!(":{port}"), "remote": "192.168.65.2:80"}));
    assert_eq!(status, 200);
    let (_, all) = f.get("/services/forwarder/all");
    assert_eq!(all, json!([{"local": format!(":{port}"), "remote": "192.168.65.2:80", "protocol": "tcp"}]));
    let (_, v1) = f.get("/v1/ports");
    assert!(v1[0]["host_ip"] == "0.0.0.0");
    // Removed through /v1: the exposure is gone and may be made again.
    let (status, _) = f.json("DELETE", "/v1/ports", json!({"host_port": port}));
    assert_eq!(status, 200);
    let (status, _) =
        f.json("POST", "/services/forwarder/expose", json!({"local": format!(":{port}"), "remote": "192.168.65.2:80"}));
    assert_eq!(status, 200);
    assert_eq!(f.get("/services/forwarder/all").1.as_array().map(Vec::len), Some(1));
    let (status, _) = f.json("POST", "/services/forwarder/unexpose", json!({"local": format!(":{port}")}));
    assert_eq!(status, 200);
    assert_eq!(f.get("/v1/ports"), (200, json!([])));
}

#[test]
fn gvproxy_dhcp_dns_stats() {
    let f = start("gvother");
    let r = f.call("GET", "/services/dhcp/leases", None);
    assert_eq!(r.status, 200);
    assert_eq!(text(&r), "{\"192.168.65.2\":\"5a:94:ef:e4:0c:ee\"}\n");
    // gvproxy serves the leases at /leases too, and its switch's table at /cam.
    assert_eq!(text(&f.call("GET", "/leases", None)), text(&r));
    let (status, cam) = f.get("/cam");
    assert_eq!(status, 200);
    assert!(cam.is_object(), "{cam}");

    let (status, zones) = f.get("/services/dns/all");
    assert_eq!(status, 200);
    let docker = zones.as_array().unwrap().iter().find(|z| z["Name"] == "docker.internal.").unwrap();
    assert_eq!(docker["DefaultIP"], "");
    let records = docker["Records"].as_array().unwrap();
    assert!(records.contains(&json!({"Name":"host","IP":"192.168.65.254"})));
    assert!(records.contains(&json!({"Name":"gateway","IP":"192.168.65.1"})));
    // gvproxy's zones are A records: not the AAAA records /v1/dns lists.
    assert_eq!(records.iter().filter(|r| r["Name"] == "host").count(), 1, "{zones}");

    let zone =
        json!({"Name":"apps.test.","Records":[{"Name":"web","IP":"192.168.65.2"},{"Name":"db","IP":"192.168.65.3"}]});
    let r = client::request_json(&f.path, "POST", "/services/dns/add", &zone).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(f.dns.lookup("web.apps.test"), Some(Ipv4Addr::new(192, 168, 65, 2)));
    assert_eq!(f.dns.lookup("db.apps.test"), Some(Ipv4Addr::new(192, 168, 65, 3)));
    let (_, zones) = f.get("/services/dns/all");
    assert!(
        zones
            .as_array()
            .unwrap()
            .iter()
            .any(|z| z["Name"] == "apps.test." && z["Records"].as_array().unwrap().len() == 2)
    );
    // Go's decoder matches field names case-insensitively; lower case works too.
    let (status, _) =
        f.json("POST", "/services/dns/add", json!({"name":"x.test","records":[{"name":"a","ip":"10.0.0.1"}]}));
    assert_eq!(status, 200);
    assert_eq!(f.dns.lookup("a.x.test"), Some(Ipv4Addr::new(10, 0, 0, 1)));
    // Bad records change nothing.
    let (status, _) = f.json(
        "POST",
        "/services/dns/add",
        json!({"Name":"y.test","Records":[{"Name":"ok","IP":"10.0.0.2"},{"Name":"bad","IP":"nope"}]}),
    );
    assert_eq!(status, 400);
    assert_eq!(f.dns.lookup("ok.y.test"), None);
    assert_eq!(f.call("GET", "/services/dns/add", None).status, 400);

    let (status, stats) = f.get("/stats");
    assert_eq!(status, 200);
    assert_eq!(stats["BytesSent"], 2000);
    assert_eq!(stats["BytesReceived"], 1000);
    assert_eq!(stats["IP"]["PacketsReceived"], 10);
}

#[test]
fn engine_gone() {
    let path = sock_path("gone");
    let _ = std::fs::remove_file(&path);
    let poll = mio::Poll::new().unwrap();
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).unwrap());
    let (tx, rx) = mpsc::channel::<Command>();
    drop(rx);
    let cfg = Arc::new(NetConfig::default());
    let server = serve(&path, ControlHandle::new(tx, waker), Arc::new(DnsRecords::new()), cfg, None).unwrap();
    let r = client::request(&path, "GET", "/v1/ports", None).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.error_message(), "the network engine is not running");
    let r = client::request(&path, "GET", "/services/forwarder/all", None).unwrap();
    assert_eq!(r.status, 500);
    // A port bound for a gone engine is released again.
    let port = free_tcp_port();
    let r = client::request_json(
        &path,
        "POST",
        "/v1/ports",
        &json!({"host_ip":"127.0.0.1","host_port":port,"guest_port":80}),
    )
    .unwrap();
    assert_eq!(r.status, 503);
    TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    drop(server);
}

#[test]
fn v1_info() {
    let f = start("v1info");
    let (status, body) = f.get("/v1/info");
    assert_eq!(status, 200);
    assert_eq!(body["pid"], std::process::id());
    assert_eq!(body["mode"], "unknown");
    assert_eq!(body["guests"], json!([{"ip":"192.168.65.2","mac":"5a:94:ef:e4:0c:ee"}]));
    f._server.set_about(super::About {
        mode: "run".into(),
        command: vec!["sleep".into(), "9".into()],
        started: std::time::SystemTime::now() - Duration::from_secs(90),
        api: None,
    });
    let (_, body) = f.get("/v1/info");
    assert_eq!((&body["mode"], &body["command"]), (&json!("run"), &json!(["sleep", "9"])));
    assert_eq!(body["api"], f.path.display().to_string());
    let up = body["uptime_ms"].as_u64().unwrap();
    assert!((90_000..100_000).contains(&up), "{up}");
    assert_eq!(body["subnet"], "192.168.65.0/24");
    assert_eq!(f.call("POST", "/v1/info", None).status, 405);
}

#[test]
fn v1_capture_streams_pcap_through_the_filter() {
    use std::io::Read;
    let f = start("v1capture");
    let mut s = client::stream(&f.path, "/v1/capture?proto=tcp&port=80&snaplen=64").unwrap();
    assert_eq!(s.status, 200);
    assert_eq!(
        s.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("content-type")).unwrap().1,
        "application/vnd.tcpdump.pcap"
    );
    // The fake engine drops its tap after writing: the stream ends after the one match.
    let mut data = Vec::new();
    s.read_to_end(&mut data).unwrap();
    let mut r = pcap_file::pcap::PcapReader::new(&data[..]).unwrap();
    assert_eq!(r.header().snaplen, 64);
    let p = r.next_packet().unwrap().unwrap();
    assert_eq!(&p.data[..], &test_frame(6, 80)[..]);
    assert!(r.next_packet().is_none(), "UDP and port 81 were filtered out");

    let s = client::stream(&f.path, "/v1/capture?proto=sctp").unwrap();
    assert_eq!(s.status, 400);
    assert!(s.into_response().unwrap().error_message().contains("unknown protocol"));
    assert_eq!(f.call("POST", "/v1/capture", None).status, 405);
}

/// A request from guest `ip` through the gateway's port 80 (as the engine hands it over):
/// the status code and the body.
fn guest_call(f: &Fixture, ip: Ipv4Addr, method: &str, path: &str, body: &str) -> (u16, String) {
    guest_call_with(f, None, None, ip, method, path, body)
}

/// [`guest_call`] to a guest API that asks for `token`, sending `sent` as the bearer token.
fn guest_call_with(
    f: &Fixture,
    token: Option<&str>,
    sent: Option<&str>,
    ip: Ipv4Addr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let fd = f._server.guest_api(token).connect(std::net::SocketAddrV4::new(ip, 40000)).unwrap();
    let mut s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let auth = sent.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    // One write: the API may answer (a 401) and close before it reads a body sent apart.
    let request = format!("{method} {path} HTTP/1.0\r\n{auth}Content-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string()))
}

/// With a token (`serve --guest-api`), a guest's request without it, or with another, is a
/// 401 and changes nothing; with it, the safe subset answers.
#[test]
fn guest_api_token_is_required() {
    let f = start("guest-token");
    let me = Ipv4Addr::new(192, 168, 65, 2);
    let token = "0123456789abcdef0123456789abcdef";
    let expose = r#"{"local":"127.0.0.1:0","remote":"192.168.65.2:80"}"#;
    for sent in [None, Some("0123456789abcdef0123456789abcdee"), Some("")] {
        let (status, body) = guest_call_with(&f, Some(token), sent, me, "POST", "/services/forwarder/expose", expose);
        assert_eq!(status, 401, "{sent:?}: {body}");
        assert!(body.contains("Authorization: Bearer"), "{body}");
        assert_eq!(guest_call_with(&f, Some(token), sent, me, "GET", "/v1/ports", "").0, 401);
    }
    assert_eq!(f.get("/v1/ports").1, json!([]));
    let (status, body) = guest_call_with(&f, Some(token), Some(token), me, "GET", "/services/forwarder/all", "");
    assert_eq!(status, 200, "{body}");
    // The host's own socket needs no token.
    assert_eq!(f.get("/v1/ports").0, 200);
}

/// Guests get gvproxy's forwarder endpoints, for their own address only, and read-only
/// views; the host's API is not theirs (DNS records, the proxy, leases, captures).
#[test]
fn guests_get_a_safe_subset() {
    let f = start("guest-subset");
    let me = Ipv4Addr::new(192, 168, 65, 2);
    assert_eq!(guest_call(&f, me, "GET", "/services/forwarder/all", "").0, 200);
    assert_eq!(guest_call(&f, me, "GET", "/v1/ports", "").0, 200);
    let other = r#"{"local":"127.0.0.1:0","remote":"192.168.65.3:80"}"#;
    let (status, body) = guest_call(&f, me, "POST", "/services/forwarder/expose", other);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("only its own"), "{body}");
    for (method, path, body) in [
        ("POST", "/services/dns/add", r#"{"Name":"x.","Records":[]}"#),
        ("POST", "/v1/dns", r#"{"name":"a.test","ip":"10.0.0.1"}"#),
        ("PUT", "/v1/proxy", "{}"),
        ("POST", "/v1/ports", r#"{"guest_port":80}"#),
        ("GET", "/services/dhcp/leases", ""),
        ("GET", "/v1/capture", ""),
        ("GET", "/metrics", ""),
    ] {
        let (status, text) = guest_call(&f, me, method, path, body);
        assert_eq!(status, 403, "{method} {path}: {text}");
    }
    assert_eq!(f.dns.lookup("a.test"), None);
}

#[test]
fn v1_links_and_logs() {
    use usernet_core::services::activity::{Activity, ProxyLogEntry};
    let f = start("v1links");
    let (status, body) = f.get("/v1/links");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!([{"index": 0, "name": "tap \"eth0\"", "rx_frames": 3, "rx_bytes": 300, "tx_frames": 4,
                "tx_bytes": 4000, "guests": [{"mac": "5a:94:ef:e4:0c:ee", "ips": ["192.168.65.2"]}]}])
    );
    // No log until the services' is given.
    assert_eq!(f.get("/v1/log/dns").0, 503);
    let activity = Arc::new(Activity::default());
    f._server.set_activity(activity.clone());
    for (i, host) in ["a.test", "b.test"].iter().enumerate() {
        activity.proxy.push(ProxyLogEntry {
            time_ms: i as u64,
            guest: "192.168.65.2:40000".into(),
            mode: "explicit",
            method: "GET".into(),
            host: host.to_string(),
            status: Some(200),
            outcome: "forwarded",
            via: String::new(),
        });
    }
    let (status, body) = f.get("/v1/log/proxy");
    assert_eq!(status, 200);
    assert_eq!(body["total"], 2);
    // Newest first.
    assert_eq!(body["entries"][0]["host"], "b.test");
    assert_eq!(body["entries"][1]["status"], 200);
    assert_eq!(f.get("/v1/log/dns").1, json!({"total": 0, "entries": []}));
    assert_eq!(f.call("POST", "/v1/log/dns", None).status, 405);
}

/// True once `cond` holds, polled for at most 10 s.
fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// One HTTP/1.1 request on a fresh TCP connection: (status, headers, body).
fn tcp_request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(&format!("{h}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn web_port_needs_its_token_and_only_reads() {
    let f = start("web");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let token = super::web::new_token().unwrap();
    f._server.serve_web(listener, token.clone()).unwrap();
    let bearer = format!("Authorization: Bearer {token}");
    let cookie = format!("Cookie: {}={token}", super::web::cookie_name(addr.port()));

    // No token, a wrong one, another port's cookie: 403 and nothing else.
    for headers in [vec![], vec!["Authorization: Bearer 00"], vec![&*format!("Cookie: usernet_token_1={token}")]] {
        for path in ["/", "/v1/info", "/metrics", "/v1/flows"] {
            let (status, _, body) = tcp_request(addr, "GET", path, &headers);
            assert_eq!(status, 403, "{path} {headers:?}");
            assert!(!body.contains("192.168.65"), "{body}");
        }
    }
    assert_eq!(tcp_request(addr, "GET", "/v1/info?token=nope", &[]).0, 403);

    // The URL's token: the page, and a cookie for what the page asks next.
    let (status, head, body) = tcp_request(addr, "GET", &format!("/?token={token}"), &[]);
    assert_eq!(status, 200);
    assert!(body.starts_with("<!DOCTYPE html>") && body.contains("<script>"), "{body}");
    assert!(!body.contains("src=\"http") && !body.contains("href=\"http"), "external assets");
    assert!(head.contains(&format!("set-cookie: {}={token}", super::web::cookie_name(addr.port()))), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");

    // The cookie and the header work too; the API answers as on the socket.
    let (status, _, body) = tcp_request(addr, "GET", "/v1/info", &[&cookie]);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["gateway"], "192.168.65.1");
    let (status, head, body) = tcp_request(addr, "GET", "/metrics", &[&bearer]);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    assert!(body.contains("usernet_link_bytes_total{"), "{body}");
    assert!(!head.contains("set-cookie"), "{head}");

    // The graph's samples: the first is taken at once.
    assert!(
        wait_for(|| {
            let (status, _, body) = tcp_request(addr, "GET", "/history", &[&bearer]);
            status == 200 && body.contains("\"links\":[{\"index\":0,\"name\":\"tap \\\"eth0\\\"\",\"rx_bytes\":300")
        }),
        "{:?}",
        tcp_request(addr, "GET", "/history", &[&bearer])
    );
    assert_eq!(tcp_request(addr, "GET", "/history", &[]).0, 403);

    // Nothing that changes anything, and no capture.
    let (status, head, _) = tcp_request(addr, "POST", "/v1/ports", &[&bearer, "Content-Length: 0"]);
    assert_eq!(status, 405);
    assert!(head.contains("allow: get"), "{head}");
    assert_eq!(tcp_request(addr, "DELETE", "/v1/dns/x", &[&bearer]).0, 404);
    assert_eq!(tcp_request(addr, "PUT", "/v1/proxy", &[&bearer, "Content-Length: 0"]).0, 405);
    assert_eq!(tcp_request(addr, "GET", "/v1/capture", &[&bearer]).0, 404);
    assert_eq!(tcp_request(addr, "GET", "/services/forwarder/all", &[&bearer]).0, 404);
    assert_eq!(f.get("/v1/ports").1, json!([]));
}

/// gvproxy's `-listen`: the same API on another Unix socket (made 0600, removed with the
/// server) and on a TCP port (0: one picked, and said).
#[test]
fn the_api_on_more_endpoints() {
    use super::endpoints::Endpoint;
    let f = start("also");
    let extra = sock_path("also-extra");
    let _ = std::fs::remove_file(&extra);
    let at = f._server.serve_also(&Endpoint::Unix(extra.clone()), None).unwrap();
    assert_eq!(at, Endpoint::Unix(extra.clone()));
    assert_eq!(std::fs::metadata(&extra).unwrap().permissions().mode() & 0o777, 0o600);
    let r = client::request(&extra, "GET", "/services/forwarder/all", None).unwrap();
    assert_eq!(r.status, 200);
    let tcp: Endpoint = "tcp://127.0.0.1:0".parse().unwrap();
    let Endpoint::Tcp(addr) = f._server.serve_also(&tcp, None).unwrap() else { panic!("not tcp") };
    assert_ne!(addr.port(), 0);
    let (status, _, body) = tcp_request(addr, "GET", "/v1/info", &[]);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["gateway"], "192.168.65.1");
    drop(f);
    assert!(!extra.exists(), "the extra socket was left behind");
}
