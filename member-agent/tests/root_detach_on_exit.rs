//! `--detach-on-exit` with the real agent on a real cgroup (root: BPF, cgroups).
//!
//! - `always` (what `auto` does when the DaemonSet is gone: an uninstall): after SIGTERM no
//!   ballast program is attached to the cgroup (`bpftool cgroup show`) and the pin dir is gone.
//! - `never` (what `auto` does on a restart, update or drain): a client connecting through the
//!   VIP in a loop sees 0 failed connects while the agent is SIGTERMed and started again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIP: &str = "127.96.0.80";

use common::{env, Env};

fn start(e: &Env, detach: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ballast-agent"))
        .args(["--cluster-id", "east", "--node-name", "detach"])
        .args(["--discovery", "topology", "--topology"])
        .arg(&e.topology)
        .args(["--topology-poll-interval", "100ms", "--cgroup"])
        .arg(&e.cgroup)
        .arg("--pin-dir")
        .arg(&e.pin_dir)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", e.port))
        .env("BALLAST_DETACH_ON_EXIT", detach)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn connect_via_vip(cgroup: &Path) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec 3<>/dev/tcp/{VIP}/80 && head -1 <&3",
            cgroup.display()
        ))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait_steering(e: &mut Env) {
    let port = e.port;
    assert!(
        wait_ready(port, e.agent.as_mut().unwrap()),
        "the agent is not ready"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while connect_via_vip(&e.cgroup) != "east" {
        assert!(Instant::now() < deadline, "the agent does not steer");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sigterm(child: &mut Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = child.wait().unwrap();
    assert!(st.success(), "clean exit on SIGTERM: {st}");
}

fn cgroup_programs(cgroup: &Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "tree"])
        .arg(cgroup)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn root_detach_always_leaves_nothing_attached_after_sigterm() {
    let Some(mut e) = env("detach", "always", VIP) else {
        return;
    };
    e.agent = Some(start(&e, "always"));
    wait_steering(&mut e);
    assert!(
        cgroup_programs(&e.cgroup).contains("blst_"),
        "attached while running"
    );
    let mut a = e.agent.take().unwrap();
    sigterm(&mut a);
    let tree = cgroup_programs(&e.cgroup);
    assert!(
        !tree.contains("blst_"),
        "a ballast program is still attached: {tree}"
    );
    assert!(!e.pin_dir.exists(), "pin dir {} left", e.pin_dir.display());
    assert_eq!(
        connect_via_vip(&e.cgroup),
        "",
        "the VIP is no longer steered"
    );
}

#[test]
fn root_detach_never_keeps_steering_across_a_sigterm_restart() {
    let Some(mut e) = env("detach", "never", VIP) else {
        return;
    };
    e.agent = Some(start(&e, "never"));
    wait_steering(&mut e);
    let stop_file = e._dir.path().join("stop");
    let script = format!(
        "echo $$ > {cg}/cgroup.procs
while [ ! -e {stop} ]; do
  if exec 3<>/dev/tcp/{VIP}/80; then
    if read -r line <&3; then echo \"$line\"; else echo FAIL-READ; fi
    exec 3<&-
  else
    echo FAIL-CONNECT
  fi
done",
        cg = e.cgroup.display(),
        stop = stop_file.display()
    );
    let mut client = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(client.stdout.take().unwrap());
    let reader = std::thread::spawn(move || out.lines().map(Result::unwrap).collect::<Vec<_>>());

    std::thread::sleep(Duration::from_millis(500));
    let mut a = e.agent.take().unwrap();
    sigterm(&mut a);
    assert!(
        cgroup_programs(&e.cgroup).contains("blst_"),
        "still attached with never"
    );
    std::thread::sleep(Duration::from_millis(500)); // no agent at all
    e.agent = Some(start(&e, "never"));
    let port = e.port;
    assert!(
        wait_ready(port, e.agent.as_mut().unwrap()),
        "restarted agent not ready"
    );
    std::thread::sleep(Duration::from_millis(500)); // steering under the new agent
    std::fs::write(&stop_file, b"").unwrap();
    client.wait().unwrap();
    let lines = reader.join().unwrap();

    let fails = lines.iter().filter(|l| l.starts_with("FAIL")).count();
    let ok = lines.iter().filter(|l| *l == "east").count();
    println!("{ok} connects through the restart, {fails} failed");
    assert_eq!(fails, 0, "failed connects during the restart");
    assert!(ok > 100, "too few connects to mean anything: {ok}");
    assert_eq!(ok, lines.len());
}

/// Waits until the agent at `port` answers `/ready` with 200 (it has installed its signal
/// handler and applied the catalog); false if it exits first.
fn wait_ready(port: u16, agent: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /ready HTTP/1.0\r\nHost: x\r\n\r\n");
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
            if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
                return true;
            }
        }
        if agent.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
