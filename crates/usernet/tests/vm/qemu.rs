//! QEMU guests for the integration tests (included with `#[path]`): Debian's kernel with the
//! busybox initramfs that vm-guest/build-initramfs.sh builds, booted under TCG, its serial
//! console collected; each VM is killed on drop and every wait has a deadline.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{self, TempDir};
use super::harness::collect;

/// How long a VM may take to boot and run its checks (TCG on a busy machine).
pub const VM_TIMEOUT: Duration = Duration::from_secs(150);

/// Root and the tools of these tests (panics otherwise: see [`common::require`]).
pub fn require_vm() {
    match qemu_override() {
        None => common::require(&["qemu-system-x86_64", "busybox", "dnsmasq", "ip", "curl", "python3"]),
        Some(qemu) => {
            common::require(&["busybox", "dnsmasq", "ip", "curl", "python3"]);
            let runs = std::fs::metadata(&qemu).is_ok_and(|m| m.is_file());
            assert!(runs, "USERNET_TEST_QEMU names {}, which is not a file", qemu.display());
        }
    }
}

/// The QEMU the VMs boot with: `USERNET_TEST_QEMU` when set (CI boots the vhost-user VMs
/// again with a newer QEMU than Debian 12's, see .ci/run), else `qemu-system-x86_64` from
/// PATH.
pub fn qemu_bin() -> PathBuf {
    qemu_override().unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

fn qemu_override() -> Option<PathBuf> {
    std::env::var_os("USERNET_TEST_QEMU").filter(|p| !p.is_empty()).map(PathBuf::from)
}

/// The kernel and the initramfs built from vm-guest/.
pub struct Image {
    _dir: TempDir,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Image {
    pub fn build() -> Image {
        Image::build_with(&[])
    }

    /// With build-initramfs.sh's options `extra` (`--with-ssh KEY`).
    pub fn build_with(extra: &[&str]) -> Image {
        let dir = TempDir::new("vm");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../vm-guest/build-initramfs.sh");
        let out = common::run_bounded(
            Command::new("sh").arg(&script).arg(dir.path()).args(extra).env("PATH", common::search_path()),
            Duration::from_secs(60),
        );
        assert!(out.success(), "building the initramfs failed:\n{out}");
        let kernel = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("KERNEL="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no KERNEL= line:\n{out}"));
        let initrd = dir.join("initramfs.cpio");
        Image { _dir: dir, kernel, initrd }
    }
}

/// A QEMU VM, killed on drop.
pub struct Vm {
    name: String,
    pub child: Child,
    console: Arc<Mutex<String>>,
}

impl Vm {
    /// Boots the image with `netdev` (a `-netdev` value with id=n0), MAC `mac`, and `params`
    /// for /init on the kernel command line.
    pub fn boot(name: &str, image: &Image, netdev: &str, mac: &str, params: &str) -> Vm {
        let device = format!("virtio-net-pci,netdev=n0,mac={mac}");
        Vm::boot_with(name, image, &["-netdev", netdev, "-device", &device], params)
    }

    /// Boots the image with the network options `net` (`-netdev ... -device ...` as a VM
    /// tool passes them) and `params` for /init.
    pub fn boot_with(name: &str, image: &Image, net: &[&str], params: &str) -> Vm {
        // As the test user too, when usernet runs as one: QEMU's datagram socket must be
        // one that usernet may send to.
        let mut cmd = common::as_test_user(qemu_bin());
        cmd.args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 {params}"))
            .args(net)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", qemu_bin().display()));
        let console = collect(child.stdout.take().expect("stdout"));
        let errors = collect(child.stderr.take().expect("stderr"));
        let vm = Vm { name: name.to_string(), child, console };
        // QEMU's own complaints go to the console text, to show up in failures.
        let console = vm.console.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            let e = errors.lock().unwrap().clone();
            if !e.is_empty() {
                console.lock().unwrap().push_str(&format!("\n[qemu stderr] {e}"));
            }
        });
        vm
    }

    pub fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits until the console shows `marker` and the rest of its line; panics with the
    /// console on timeout.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            // The whole line: the console arrives in pieces, and a check's detail follows
            // its marker on the same line.
            let console = self.console();
            if console.find(marker).is_some_and(|at| console[at..].contains('\n')) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("VM {} exited ({status}) before {marker:?}:\n{}", self.name, self.console());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("VM {} did not show {marker:?} within {timeout:?}:\n{}", self.name, self.console());
    }

    /// The detail of check `name` when it passed; panics with the console otherwise.
    pub fn check(&self, name: &str) -> String {
        let console = self.console();
        let prefix = format!("CHECK {name} ");
        let line = console
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("VM {}: no check {name}:\n{console}", self.name));
        let rest = &line[prefix.len()..];
        match rest.strip_prefix("ok ") {
            Some(detail) => detail.trim().to_string(),
            None => panic!("VM {}: check {name} failed: {line}\n{console}", self.name),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
