//! One Debian 12 guest under qemu (TCG: these hosts have no usable hardware
//! virtualization), booted from the tier's image (`image.sh`) through a copy-on-write
//! overlay of its own, so every test starts from the same clean disk. The host talks to it
//! through qemu-guest-agent on a virtio-serial port: commands with their exit codes and
//! output, stdin for small files. Bulk files (the package, the Hermes venv) come on a
//! read-only second disk (`payload`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a boot may take before the tier fails (measured 21–37 s on these hosts, alone).
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

/// One guest at a time: each takes two emulated CPUs from a two-core host.
static TURN: Mutex<()> = Mutex::new(());

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest image's directory (built by `image.sh` once, then cached by its recipe).
pub fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let o = Command::new(repo().join("tests/vm/image.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("tests/vm/image.sh");
        assert!(
            o.status.success(),
            "the VM tier cannot build its guest image (tests/vm/image.sh failed; see above)"
        );
        PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
    })
}

/// What a command in the guest did.
#[derive(Debug)]
pub struct Out {
    pub code: i64,
    pub out: String,
    pub err: String,
}

pub struct Vm {
    pub name: String,
    dir: PathBuf,
    payload: PathBuf,
    qemu: Option<Child>,
    qga: Option<Qga>,
    _turn: Option<MutexGuard<'static, ()>>,
    /// Leave the directory (the template's disk) when dropped.
    keep: bool,
}

/// The template guest's disk, with the running guest saved in it as `SNAPSHOT`.
static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
const SNAPSHOT: &str = "booted";

impl Vm {
    /// Boot a fresh guest (its own overlay on the image) with `payload` as its second disk,
    /// and wait until systemd says the boot is done.
    pub fn boot(name: &str, payload: &Path) -> Vm {
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        let image = image();
        let dir = PathBuf::from(format!(
            "/var/tmp/hermes-mgr-vm/runs/{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let template = TEMPLATE.get_or_init(|| {
            sweep();
            // Booted once per test process, then saved (`savevm`): a test resumes a copy of
            // that running guest in about a second instead of booting for forty.
            let dir = PathBuf::from(format!(
                "/var/tmp/hermes-mgr-vm/runs/template-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let o = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(image.join("base.qcow2"))
                .arg(dir.join("disk.qcow2"))
                .output()
                .unwrap();
            assert!(o.status.success(), "qemu-img: {o:?}");
            let mut t = Vm {
                name: "template".into(),
                dir: dir.clone(),
                payload: payload.to_path_buf(),
                qemu: None,
                qga: None,
                _turn: None,
                keep: false,
            };
            t.power_on();
            t.monitor(&format!("savevm {SNAPSHOT}"));
            t.monitor("quit");
            if let Some(mut c) = t.qemu.take() {
                let _ = c.wait();
            }
            t.qga = None;
            t.keep = true;
            dir.join("disk.qcow2")
        });
        std::fs::copy(template, dir.join("disk.qcow2")).unwrap();
        let mut vm = Vm {
            name: name.to_string(),
            dir,
            payload: payload.to_path_buf(),
            qemu: None,
            qga: None,
            _turn: Some(turn),
            keep: false,
        };
        vm.resume();
        vm
    }

    /// Start the saved guest on this guest's disk (a copy of the template's) where it was
    /// saved: booted, the payload mounted. Its clock is set to now.
    fn resume(&mut self) {
        self.start_qemu(Some(SNAPSHOT));
        let deadline = Instant::now() + BOOT_DEADLINE;
        self.wait_for_agent(deadline);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let qga = self.qga.as_mut().unwrap();
        qga.call(
            "guest-set-time",
            json!({"time": now}),
            Duration::from_secs(30),
        )
        .expect("guest-set-time");
    }

    /// A command to qemu's human monitor; what it printed.
    fn monitor(&mut self, cmd: &str) -> String {
        let mut sock = UnixStream::connect(self.dir.join("monitor.sock")).unwrap();
        sock.set_read_timeout(Some(BOOT_DEADLINE)).unwrap();
        let mut seen = Vec::new();
        let prompt = |sock: &mut UnixStream, seen: &mut Vec<u8>| {
            let mut chunk = [0u8; 4096];
            while !seen.ends_with(b"(qemu) ") {
                match sock.read(&mut chunk) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
            true
        };
        assert!(
            prompt(&mut sock, &mut seen),
            "{}",
            self.why("no monitor prompt")
        );
        seen.clear();
        sock.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        // `quit` closes the socket instead of prompting again.
        prompt(&mut sock, &mut seen);
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// Start qemu on this guest's disk (cold) and wait for the boot to finish.
    pub fn power_on(&mut self) {
        self.start_qemu(None);
        let deadline = Instant::now() + BOOT_DEADLINE;
        self.wait_for_agent(deadline);
        self.booted("the boot");
        // The payload disk where the host's Hermes venv is (its scripts name that path).
        let venv = venv();
        self.ok(&format!(
            "mkdir -p /payload {v} && mount -o ro /dev/vdb /payload && mount --bind /payload/venv {v}",
            v = venv.display()
        ));
    }

    /// Start qemu on this guest's disk, from the saved state `loadvm` if given, and connect
    /// to its agent's socket.
    fn start_qemu(&mut self, loadvm: Option<&str>) {
        let image = image();
        let sock = self.dir.join("qga.sock");
        let _ = std::fs::remove_file(&sock);
        let console = self.dir.join("console.log");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "2048",
            ])
            .args([
                "-smp",
                "2",
                "-display",
                "none",
                "-no-user-config",
                "-nodefaults",
            ])
            .arg("-kernel")
            .arg(image.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.join("initrd.img"))
            .args(["-append", "root=/dev/vda rw console=ttyS0"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                self.dir.join("disk.qcow2").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,readonly=on",
                self.payload.display()
            ))
            .arg("-chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=qga0",
                sock.display()
            ))
            .args(["-device", "virtio-serial"])
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.dir.join("monitor.sock").display()
            ))
            .args(loadvm.map(|s| ["-loadvm", s]).into_iter().flatten())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("qemu.err")).unwrap())
            .spawn()
            .expect("qemu-system-x86_64 (tests/vm/image.sh installs qemu-system-x86)");
        self.qemu = Some(child);
        let deadline = Instant::now() + BOOT_DEADLINE;
        self.qga = Some(loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break Qga::new(s);
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{}",
                self.why("qemu never opened its agent socket")
            );
            std::thread::sleep(Duration::from_millis(50));
        });
    }

    /// systemd says the boot is done and nothing failed.
    fn booted(&mut self, what: &str) {
        let o = self.sh("systemctl is-system-running --wait");
        if o.out.trim() != "running" {
            let failed = self.sh("systemctl --failed --no-legend").out;
            panic!(
                "{}",
                self.why(&format!(
                    "after {what}, the guest is {}: {failed}",
                    o.out.trim()
                ))
            );
        }
    }

    fn wait_for_agent(&mut self, deadline: Instant) {
        loop {
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{}",
                self.why(&format!("the guest did not boot within {BOOT_DEADLINE:?}"))
            );
            if self.qga.as_mut().unwrap().sync(Duration::from_secs(2)) {
                return;
            }
        }
    }

    fn check_alive(&mut self) {
        if let Some(st) = self.qemu.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("{}", self.why(&format!("qemu exited ({st})")));
        }
    }

    /// A failure message with the end of the guest's console and qemu's errors.
    pub fn why(&self, what: &str) -> String {
        let tail = |p: &str| {
            let s = std::fs::read_to_string(self.dir.join(p)).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "VM {}: {what}\n--- console (last 40 lines) ---\n{}\n--- qemu ---\n{}",
            self.name,
            tail("console.log"),
            tail("qemu.err")
        )
    }

    /// Run `cmd` with `/bin/sh -c` in the guest, as root; what it did.
    pub fn sh(&mut self, cmd: &str) -> Out {
        self.sh_with_input(cmd, None)
    }

    pub fn sh_with_input(&mut self, cmd: &str, input: Option<&[u8]>) -> Out {
        self.try_sh(cmd, input, Duration::from_secs(120))
            .unwrap_or_else(|| {
                panic!(
                    "{}",
                    self.why(&format!("the guest agent stopped answering `{cmd}`"))
                )
            })
    }

    /// `sh_with_input`, or `None` when the agent does not answer within `wait` (it may be
    /// going down with its guest).
    fn try_sh(&mut self, cmd: &str, input: Option<&[u8]>, wait: Duration) -> Option<Out> {
        let qga = self.qga.as_mut().expect("the guest is off");
        let mut args = json!({"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": true});
        if let Some(i) = input {
            args["input-data"] = json!(b64::encode(i));
        }
        let pid = qga.call("guest-exec", args, wait)?["pid"].as_i64().unwrap();
        loop {
            let st = qga.call("guest-exec-status", json!({"pid": pid}), wait)?;
            if st["exited"].as_bool() == Some(true) {
                let text = |k: &str| {
                    st[k].as_str().map_or_else(String::new, |b| {
                        String::from_utf8_lossy(&b64::decode(b)).into_owned()
                    })
                };
                return Some(Out {
                    code: st["exitcode"]
                        .as_i64()
                        .or_else(|| st["signal"].as_i64().map(|s| 128 + s))
                        .unwrap_or(-1),
                    out: text("out-data"),
                    err: text("err-data"),
                });
            }
            // The agent's protocol has no "wait": ask again shortly.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Run `cmd`, which must succeed; its stdout.
    pub fn ok(&mut self, cmd: &str) -> String {
        let o = self.sh(cmd);
        assert!(
            o.code == 0,
            "VM {}: `{cmd}` exited {}:\n{}{}",
            self.name,
            o.code,
            o.out,
            o.err
        );
        o.out
    }

    /// Write `bytes` to `path` in the guest with `mode`.
    pub fn write(&mut self, path: &str, bytes: &[u8], mode: &str) {
        let o = self.sh_with_input(
            &format!("cat > '{path}' && chmod {mode} '{path}'"),
            Some(bytes),
        );
        assert!(o.code == 0, "write {path}: {o:?}");
    }

    /// Wait (polling the guest: it cannot notify the host) until `cmd` succeeds; its stdout.
    pub fn wait_ok(&mut self, what: &str, within: Duration, cmd: &str) -> String {
        let deadline = Instant::now() + within;
        loop {
            let o = self.sh(cmd);
            if o.code == 0 {
                return o.out;
            }
            assert!(
                Instant::now() < deadline,
                "VM {}: {what}: not within {within:?}; last `{cmd}`: {}{}",
                self.name,
                o.out,
                o.err
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// This boot's id.
    pub fn boot_id(&mut self) -> String {
        self.ok("cat /proc/sys/kernel/random/boot_id")
            .trim()
            .to_string()
    }

    /// Pull the plug: qemu is killed; what the guest had not written to its disk is lost.
    pub fn power_cut(&mut self) {
        self.qga = None;
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `systemctl reboot` in the guest, then wait for the next boot to finish.
    pub fn reboot(&mut self) {
        let before = self.boot_id();
        // The agent dies with the guest; qemu resets the machine and boots it again.
        let _ = self.sh("systemd-run --on-active=1 systemctl reboot");
        let deadline = Instant::now() + BOOT_DEADLINE;
        // The old agent may still answer for a moment, or go down in the middle of an
        // answer: wait for an agent that says a new boot id.
        loop {
            self.wait_for_agent(deadline);
            let o = self.try_sh(
                "cat /proc/sys/kernel/random/boot_id",
                None,
                Duration::from_secs(5),
            );
            if o.is_some_and(|o| o.code == 0 && o.out.trim() != before) {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.booted("the reboot");
        let venv = venv();
        self.ok(&format!(
            "mount -o ro /dev/vdb /payload && mount --bind /payload/venv {}",
            venv.display()
        ));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.power_cut();
        if !std::thread::panicking() && !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// qemu-guest-agent's JSON protocol over its socket.
struct Qga {
    sock: UnixStream,
    buf: Vec<u8>,
    id: u64,
}

impl Qga {
    fn new(sock: UnixStream) -> Qga {
        let id = u64::from(std::process::id()) << 20;
        Qga {
            sock,
            buf: Vec::new(),
            id,
        }
    }

    /// Resynchronise with the agent (`guest-sync-delimited`, a fresh id each time: answers to
    /// an earlier client, or an earlier attempt, are skipped). False if it did not answer
    /// within `wait` (not up yet).
    fn sync(&mut self, wait: Duration) -> bool {
        self.id += 1;
        let id = self.id;
        // 0xFF first: the agent drops any half-read request of a previous client.
        let mut req = vec![0xff];
        req.extend(
            serde_json::to_vec(
                &json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            )
            .unwrap(),
        );
        req.push(b'\n');
        if self.sock.write_all(&req).is_err() {
            return false;
        }
        let deadline = Instant::now() + wait;
        while let Some(line) = self.line(deadline) {
            let line: Vec<u8> = line.into_iter().filter(|b| *b != 0xff).collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                if v["return"].as_u64() == Some(id) {
                    return true;
                }
            }
        }
        false
    }

    fn line(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Some(line);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return None,
            }
        }
    }

    /// One request; its `return`, or `None` without an answer within `wait`.
    fn call(&mut self, cmd: &str, args: Value, wait: Duration) -> Option<Value> {
        let mut req = serde_json::to_vec(&json!({"execute": cmd, "arguments": args})).unwrap();
        req.push(b'\n');
        self.sock.write_all(&req).ok()?;
        let line = self.line(Instant::now() + wait)?;
        let v: Value = serde_json::from_slice(&line).unwrap();
        match v.get("return") {
            Some(r) => Some(r.clone()),
            None => panic!("guest agent, {cmd}: {v}"),
        }
    }
}

/// Remove what earlier test processes left under /var/tmp/hermes-mgr-vm (a guest's
/// directory is kept when its test failed, a template and a payload always): names end
/// in the process id, and a process that is gone needs none of them.
fn sweep() {
    let dead = |name: &str| {
        let pid = name
            .trim_end_matches(".raw")
            .rsplit('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
    };
    for dir in ["/var/tmp/hermes-mgr-vm", "/var/tmp/hermes-mgr-vm/runs"] {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("payload-") || dir.ends_with("runs")) && dead(&name) {
                let _ = std::fs::remove_dir_all(e.path());
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The host's Hermes venv (tests/setup.sh), mounted at the same path in the guest.
pub fn venv() -> PathBuf {
    std::env::var_os("HERMES_MGR_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/hermes-venv"))
}

/// The agent's base64 (standard alphabet, padded), both ways; no crate for twenty lines.
mod b64 {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for b in text.bytes() {
            let Some(v) = ABC.iter().position(|x| *x == b) else {
                continue;
            };
            acc = (acc << 6) | v as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }

    #[test]
    fn round_trips() {
        for s in ["", "a", "ab", "abc", "abcd", "h\u{e9}llo\n\u{0}"] {
            assert_eq!(decode(&encode(s.as_bytes())), s.as_bytes());
        }
        assert_eq!(encode(b"ab"), "YWI=");
    }
}
