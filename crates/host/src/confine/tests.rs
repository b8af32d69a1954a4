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
    // For "files": a file this process made (and may remove), in a directory of its own.
    let dir = std::env::temp_dir().join(format!("usernet-confine-{}", std::process::id()));
    if what == "files" {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mine.sock"), b"").unwrap();
        usernet_core::own_files::note(&dir.join("mine.sock"));
    }
    let (files_tx, files_rx) = std::sync::mpsc::channel::<()>();
    let files_dir = dir.clone();
    let files_worker = std::thread::spawn(move || {
        files_rx.recv().unwrap();
        std::fs::write(files_dir.join("from-a-thread"), b"x").map_err(|e| e.raw_os_error())
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
        "arguments" => {
            let errno = |rc: i64| if rc < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { 0 };
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
            let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
            let mut one: libc::c_int = 1;
            // SAFETY: ioctls with pointers to live values of the kinds they take.
            unsafe {
                println!("FIONBIO {}", errno(libc::ioctl(fd, libc::FIONBIO, &mut one) as i64));
                println!("FIONREAD {}", errno(libc::ioctl(fd, libc::FIONREAD, &mut one) as i64));
                let c: libc::c_char = b'x' as libc::c_char;
                println!("TIOCSTI {}", errno(libc::ioctl(0, libc::TIOCSTI, &c) as i64));
            }
            // Threads still start (the C library falls back from clone3 to clone)...
            let t = std::thread::spawn(|| 7).join().unwrap();
            println!("THREAD {t}");
            // SAFETY: a raw clone3 with no arguments: refused before it looks at them.
            println!("CLONE3 {}", errno(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) }));
            // ...but no process does.
            // SAFETY: fork(2) is refused here; were it not, the child exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: the child leaves without running anything of the parent's.
                unsafe { libc::_exit(0) };
            }
            println!("FORK {}", errno(pid as i64));
        }
        "files" => {
            files_tx.send(()).unwrap();
            let os = |r: std::io::Result<()>| r.map_err(|e| e.raw_os_error().unwrap_or(0));
            println!("LANDLOCK {}", confined.removable.is_some());
            println!("DIR {}", dir.display());
            println!("THREAD-CREATE {:?}", files_worker.join().unwrap());
            println!("CREATE {:?}", os(std::fs::write(dir.join("new"), b"x")));
            println!("MKDIR {:?}", os(std::fs::create_dir(dir.join("sub"))));
            println!("CREATE-ELSEWHERE {:?}", os(std::fs::write(std::env::temp_dir().join("usernet-confine-x"), b"x")));
            println!("READ-OWN-PROC {}", std::fs::read("/proc/self/stat").is_ok());
            println!("READ-ETC {:?}", std::fs::read("/etc/passwd").map(drop).map_err(|e| e.raw_os_error()));
            println!("READ-OTHER-PROC {:?}", std::fs::read("/proc/1/environ").map(drop).map_err(|e| e.raw_os_error()));
            println!("LIST-PROC {}", std::fs::read_dir("/proc").is_ok());
            println!("REMOVE-OWN {:?}", os(std::fs::remove_file(dir.join("mine.sock"))));
            let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair still works");
            drop((a, b));
            println!(
                "UNIX-SOCKET {:?}",
                std::os::unix::net::UnixDatagram::unbound().map(drop).map_err(|e| e.raw_os_error())
            );
        }
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

/// ioctl and clone are judged by their arguments: refused with EPERM (usernet goes on),
/// and clone3 answered ENOSYS so that threads come from clone.
#[test]
fn ioctl_and_clone_are_judged_by_their_arguments() {
    let out = run_child("arguments");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for line in [
        "FIONBIO 0".to_string(),
        "FIONREAD 0".to_string(),
        format!("TIOCSTI {}", libc::EPERM),
        "THREAD 7".to_string(),
        format!("CLONE3 {}", libc::ENOSYS),
        format!("FORK {}", libc::EPERM),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in:\n{stdout}");
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

/// Once confined, usernet reads only its own /proc files (and lists /proc), and makes,
/// writes or removes no file, but for removing the files it made
/// (`usernet_core::own_files`); every thread alike, those that existed before too. And it
/// makes no new Unix socket (socketpairs still).
#[test]
fn files_are_read_only_but_for_removing_its_own() {
    let out = run_child("files");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(dir) = stdout.lines().find_map(|l| l.strip_prefix("DIR ")) {
        let _ = std::fs::remove_dir_all(dir);
    }
    assert!(out.status.success(), "{out:?}");
    if stdout.lines().any(|l| l == "LANDLOCK false") {
        panic!("not run: this kernel has no Landlock (the rest of the sandbox applied without it)");
    }
    let eacces = format!("Err({})", libc::EACCES);
    for line in [
        format!("THREAD-CREATE Err(Some({}))", libc::EACCES),
        format!("CREATE {eacces}"),
        format!("MKDIR {eacces}"),
        format!("CREATE-ELSEWHERE {eacces}"),
        "READ-OWN-PROC true".to_string(),
        format!("READ-ETC Err(Some({}))", libc::EACCES),
        format!("READ-OTHER-PROC Err(Some({}))", libc::EACCES),
        "LIST-PROC true".to_string(),
        "REMOVE-OWN Ok(())".to_string(),
        format!("UNIX-SOCKET Err(Some({}))", libc::EPERM),
    ] {
        assert!(stdout.lines().any(|l| l == line), "no {line:?} in:\n{stdout}");
    }
}
