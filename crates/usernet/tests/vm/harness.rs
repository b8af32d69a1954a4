//! Shared by the `serve` integration tests (included with `#[path]`): a running
//! `usernet serve`, and output collection.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{self, DnsUpstream, TempDir};

/// Collects a pipe into a shared string from a thread.
pub fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => t.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    text
}

/// `usernet serve` with the given arguments, stopped with SIGTERM on drop.
pub struct Serve {
    child: Child,
    stderr: Arc<Mutex<String>>,
    api: PathBuf,
}

impl Serve {
    /// Starts `usernet serve --dns-upstream DNS --api DIR/api.sock ARGS` and waits until
    /// every path in `wait_paths` exists.
    pub fn start(dir: &TempDir, dns: &DnsUpstream, args: &[String], wait_paths: &[PathBuf]) -> Serve {
        let api = dir.join("api.sock");
        let mut cmd = common::usernet_command();
        cmd.arg("serve").args(["--dns-upstream", &dns.addr()]).arg("--api").arg(&api).args(args);
        let mut all = wait_paths.to_vec();
        all.push(api.clone());
        let mut serve = Serve::spawn(cmd, api.clone(), &all);
        // The API answers once usernet is up (its file may be a stale one of a usernet
        // killed before, on the same paths).
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&api).is_err() {
            assert!(serve.running(), "usernet serve exited:\n{}", serve.log());
            assert!(Instant::now() < deadline, "usernet serve's API never answered:\n{}", serve.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    /// Runs `cmd` (a whole `usernet serve` command line) and waits for `wait_paths`.
    pub fn spawn(mut cmd: Command, api: PathBuf, wait_paths: &[PathBuf]) -> Serve {
        let mut child = cmd
            // What DHCP asked and answered too: the log a failed test shows (see Drop).
            .env("RUST_LOG", "info,usernet_core::services::dhcp=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start usernet serve");
        let stderr = collect(child.stderr.take().expect("stderr"));
        let mut serve = Serve { child, stderr, api };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wait_paths.iter().all(|p| p.exists()) {
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!("usernet serve exited ({status}):\n{}", serve.log());
            }
            assert!(Instant::now() < deadline, "usernet serve did not bind {wait_paths:?}:\n{}", serve.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    /// Kills usernet at once (SIGKILL: a crash, nothing cleaned up) and reaps it.
    #[allow(dead_code)]
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends usernet the signal `sig`.
    #[allow(dead_code)]
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Whether usernet is still running.
    #[allow(dead_code)]
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, once usernet exits within `within` (None if it runs on).
    #[allow(dead_code)]
    pub fn exits_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Whether the log comes to contain `text` within 5 s. The log arrives through a pipe
    /// and a reader thread, so a line usernet wrote before an effect the test just saw
    /// may not be in it yet.
    #[allow(dead_code)]
    pub fn log_shows(&self, text: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log().contains(text) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// One HTTP/1.1 request on the API socket: (status, body).
    #[allow(dead_code)]
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = UnixStream::connect(&self.api).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: usernet\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        let status = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// Exposes 127.0.0.1:PORT (a free port) to `remote` through gvproxy's endpoint.
    #[allow(dead_code)]
    pub fn expose(&self, remote: &str) -> u16 {
        let port = common::free_port();
        let body = format!(r#"{{"local":"127.0.0.1:{port}","remote":"{remote}","protocol":"tcp"}}"#);
        let (status, reply) = self.api("POST", "/services/forwarder/expose", &body);
        assert_eq!(status, 200, "expose failed: {reply}\n{}", self.log());
        port
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A test that failed (a VM's check, say) shows what usernet logged meanwhile.
        if std::thread::panicking() {
            eprintln!("usernet serve's log:\n{}", self.log());
        }
        if let Ok(Some(_)) = self.child.try_wait() {
            return; // reaped already (`kill`): its pid may be another process's by now
        }
        // SIGTERM first: usernet removes its sockets and exits 0.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
