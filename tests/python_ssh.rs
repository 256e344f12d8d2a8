//! The Rust client reaching real Python RPyC 6.0.2 servers through SSH, with a real OpenSSH
//! sshd on loopback: `python::ssh_connect` (libssh2 tunnel) and the OpenSSH transport to a
//! `ThreadedServer` bound to localhost, and `ssh host rpyc_classic -m stdio` as a child process
//! (no port at all), which leaves no process behind.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::python::{python, PyProcess};
use common::{expect_within, CALL_TIMEOUT, SETTLE};
use rpyc::python::{self, Client};
use rpyc::Options;
use std::process::Command;

fn client(ctx: Option<rpyc::SshContext>) -> Client {
    let mut o = Options::new().call_timeout(CALL_TIMEOUT);
    if let Some(ctx) = ctx {
        o = o.ssh(ctx);
    }
    Client::new(o)
}

#[test]
fn ssh_connect_reaches_a_python_server_bound_to_localhost() {
    let d = sshd::shared();
    let server = PyProcess::server("demo_server.py", &[]);
    let py = python::ssh_connect(&d.context(), server.port).unwrap();
    let sum: i64 = py.root().unwrap().call_method("add", (20, 22)).unwrap();
    assert_eq!(sum, 42);
    let r: i64 = py
        .root()
        .unwrap()
        .call_method("apply", (python::callback(|x: i64| x * 2), 5))
        .unwrap();
    assert_eq!(r, 11);
    py.close();
}

#[test]
fn the_openssh_transport_reaches_a_python_server() {
    let d = sshd::shared();
    let server = PyProcess::server("demo_server.py", &[]);
    let py = client(Some(d.context().use_openssh(true)))
        .connect("127.0.0.1", server.port)
        .unwrap();
    let pid: u32 = py.root().unwrap().call_method("pid", ()).unwrap();
    assert_eq!(pid, server.pid());
    py.close();
}

#[test]
fn rpyc_classic_over_ssh_stdio_needs_no_port_and_leaves_no_process() {
    let d = sshd::shared();
    let classic = python()
        .parent()
        .expect("python is in a bin directory")
        .join("rpyc_classic");
    let marker = format!("rpyc-stdio-{}", std::process::id());
    let mut cmd = Command::new("ssh");
    cmd.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentityAgent=none",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", d.known_hosts.display()))
    .arg("-o")
    .arg(format!("SetEnv=RPYC_MARK={marker}"))
    .arg("-i")
    .arg(&d.client_key)
    .args(["-p", &d.port.to_string(), "-l", &d.user, "127.0.0.1"])
    .arg(classic)
    .args(["-m", "stdio"]);
    let py = client(None).connect_subprocess(cmd).unwrap();
    let pid: i64 = py.modules("os").unwrap().call_method("getpid", ()).unwrap();
    assert!(pid > 1);
    let six: i64 = py.eval("6 * 7").unwrap();
    assert_eq!(six, 42);
    let running = || {
        let out = Command::new("pgrep")
            .args(["-f", &marker])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    };
    assert!(running(), "ssh should be running");
    py.close();
    expect_within("ssh has ended", SETTLE, || !running());
    // The remote rpyc_classic ended with it.
    expect_within("the remote rpyc_classic has ended", SETTLE, || {
        let out = Command::new("pgrep")
            .args(["-f", "rpyc_classic -m stdio"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|p| p.trim().parse::<u32>().ok())
            .all(|p| p != pid as u32)
    });
}
