//! The sandbox applied for real, in a child process: this test binary run again with one
//! test selected and `CONFINE_CHILD` saying what the child does once confined.

use std::process::Command;

use super::seccomp::stopped_line;

const CHILD: &str = "CONFINE_CHILD";

/// Runs `confine::tests::child` in a new process of this test binary, doing `what`.
fn run_child(what: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args(["--exact", "confine::tests::child", "--nocapture", "--test-threads=1"])
        .env(CHILD, what)
        .env_remove("USERNET_SECCOMP_LOG")
        .env_remove("USERNET_NO_SANDBOX")
        .output()
        .unwrap()
}

/// Not a test of its own: the child's side, run only by `child()`.
#[test]
fn child() {
    let Ok(what) = std::env::var(CHILD) else { return };
    // Threads that exist before the sandbox is applied get it too.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (status_tx, status_rx) = std::sync::mpsc::channel::<String>();
    let worker = std::thread::spawn(move || {
        rx.recv().unwrap();
        // SAFETY: gettid(2) has no arguments.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        status_tx.send(std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap()).unwrap();
    });
    let confined = super::apply().expect("apply");
    println!("KEPT {:?}", confined.kept);
    tx.send(()).unwrap();
    let status = status_rx.recv().unwrap();
    worker.join().unwrap();
    for field in ["CapEff:", "CapPrm:", "NoNewPrivs:", "Seccomp:"] {
        println!("WORKER {}", status.lines().find(|l| l.starts_with(field)).unwrap());
    }
    // A socket still works, a file still opens.
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
    drop(s);
    std::fs::read_to_string("/proc/self/status").expect("open");
    match what.as_str() {
        "forbidden" => {
            // mount(2) is not in the list: this must not return.
            // SAFETY: the call is stopped before it does anything.
            unsafe { libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0) };
            println!("RETURNED");
        }
        _ => println!("FINE"),
    }
}

#[test]
fn threads_are_confined_and_keep_working() {
    let out = run_child("fine");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("FINE"), "{out:?}");
    assert!(stdout.contains("WORKER NoNewPrivs:\t1"), "{stdout}");
    assert!(stdout.contains("WORKER Seccomp:\t2"), "{stdout}");
    // Only CAP_NET_BIND_SERVICE (bit 10) and CAP_NET_RAW (bit 13) may stay, if held.
    for field in ["CapEff:", "CapPrm:"] {
        let line = stdout.lines().find(|l| l.starts_with(&format!("WORKER {field}"))).unwrap();
        let caps = u64::from_str_radix(line.rsplit('\t').next().unwrap().trim(), 16).unwrap();
        assert_eq!(caps & !0x2400, 0, "{line}");
    }
}

#[test]
fn a_forbidden_call_ends_the_process_with_one_line() {
    let out = run_child("forbidden");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(!stdout.contains("RETURNED"), "{stdout}");
    assert!(stderr.contains("usernet: the sandbox stopped a forbidden system call: mount (number "), "{stderr}");
}

#[test]
fn the_line_names_the_call() {
    let mut buf = [0u8; 256];
    let n = stopped_line(&mut buf, libc::SYS_ptrace);
    let line = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(
        line.starts_with(&format!(
            "usernet: the sandbox stopped a forbidden system call: ptrace (number {}).",
            libc::SYS_ptrace
        )),
        "{line}"
    );
    assert!(line.ends_with('\n'));
    let n = stopped_line(&mut buf, 99_999);
    assert!(std::str::from_utf8(&buf[..n]).unwrap().contains("unknown (number 99999)"));
}
