//! Authentication against a real sshd: key files (with and without passphrase), the agent
//! (every identity tried), passwords, in OpenSSH's order; and defaults from an OpenSSH client
//! configuration file, with explicit fields winning.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::{ssh_error, works_through};
use rpyc::{Error, SshContext, SshErrorKind};
use std::process::Command;
use std::time::Duration;

/// A context with no credentials at all (no key file, no agent, no config).
fn bare(d: &sshd::Sshd) -> SshContext {
    SshContext::new("127.0.0.1")
        .port(d.port)
        .user(&d.user)
        .known_hosts(&d.known_hosts)
        .config_file("/dev/null")
        .agent(false)
        .connect_timeout(Duration::from_secs(10))
}

#[test]
fn key_file_authenticates() {
    let d = sshd::shared();
    works_through(&bare(d).keyfile(&d.client_key)).unwrap();
}

#[test]
fn passphrase_protected_key_authenticates_with_its_passphrase() {
    let d = sshd::shared();
    works_through(
        &bare(d)
            .keyfile(&d.client_key_pass)
            .key_passphrase(sshd::PASSPHRASE),
    )
    .unwrap();
}

#[test]
fn wrong_passphrase_is_a_configuration_error_with_a_hint() {
    let d = sshd::shared();
    let err =
        works_through(&bare(d).keyfile(&d.client_key_pass).key_passphrase("wrong")).unwrap_err();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::Config, "{e}");
    let m = e.message();
    assert!(m.contains("wrong or missing passphrase?"), "{m}");
    assert!(m.contains("id_ed25519_pass"), "{m}");
}

#[test]
fn agent_identities_are_tried_one_by_one_before_key_files() {
    let d = sshd::shared();
    let dir = d.path("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    // ssh-agent in the foreground, killed when this test binary exits.
    let (_shell, pid) = sshd::supervise(
        "ssh-agent -D -a \"$1\" >/dev/null",
        &[sock.as_os_str(), dir.join("unused").as_os_str()],
    );
    assert!(common::wait_until(Duration::from_secs(5), || sock.exists()));
    // First a key the server refuses, then one it accepts: libssh2's own helper would stop
    // after the first.
    for key in [&d.stranger_key, &d.client_key] {
        sshd::run(
            Command::new("ssh-add")
                .arg("-q")
                .arg(key)
                .env("SSH_AUTH_SOCK", &sock),
        );
    }
    // The key file given is refused: only the agent's second key can let us in.
    works_through(&bare(d).keyfile(&d.stranger_key).identity_agent(&sock)).unwrap();
    // The same through the client configuration's IdentityAgent.
    let cfg = d.path("agent_ssh_config");
    std::fs::write(
        &cfg,
        format!("Host *\n  IdentityAgent {}\n", sock.display()),
    )
    .unwrap();
    works_through(
        &bare(d)
            .keyfile(&d.stranger_key)
            .config_file(&cfg)
            .agent(true),
    )
    .unwrap();
    // And with the agent switched off, the refused key file is all there is.
    let err = works_through(&bare(d).keyfile(&d.stranger_key).config_file(&cfg)).unwrap_err();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed, "{e}");
    let m = e.message();
    assert!(m.contains("id_stranger (refused)"), "{m}");
    assert!(!m.contains("agent"), "{m}");
    // When everything is refused, the message shows OpenSSH's order: agent, key files, password.
    let err = works_through(
        &bare(d)
            .user("rpyc-no-such-user")
            .keyfile(&d.stranger_key)
            .identity_agent(&sock)
            .password("nope"),
    )
    .unwrap_err();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed, "{e}");
    let m = e.message();
    let (agent, key, password) = (
        m.find("the agent's keys").expect(m),
        m.find("id_stranger (refused)").expect(m),
        m.find("the password (refused)").expect(m),
    );
    assert!(agent < key && key < password, "{m}");
    let _ = Command::new("kill").arg(pid.to_string()).status();
}

#[test]
fn password_authentication_comes_after_refused_keys() {
    let d = sshd::shared();
    assert!(
        sshd::is_root(),
        "\n\n=== password_authentication_comes_after_refused_keys needs root, to create a \
         user with a password (useradd, chpasswd); run the tests as root (CI does).\n\n"
    );
    let user = "rpycsshpw";
    let password = "pw-Pa55-rpyc";
    if Command::new("id")
        .arg(user)
        .output()
        .unwrap()
        .status
        .success()
    {
        // Left by an earlier run: reset its password.
    } else {
        sshd::run(Command::new("useradd").args(["-m", "-s", "/bin/sh", user]));
    }
    let mut chpasswd = Command::new("chpasswd")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    chpasswd
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{user}:{password}\n").as_bytes())
        .unwrap();
    assert!(chpasswd.wait().unwrap().success());

    // The stranger key is refused first; then the password gets in.
    let ctx = bare(d).user(user).keyfile(&d.stranger_key);
    works_through(&ctx.clone().password(password)).unwrap();
    let err = works_through(&ctx.password("not the password")).unwrap_err();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed, "{e}");
    let m = e.message();
    assert!(m.contains("the password (refused)"), "{m}");
    assert!(m.contains(&format!("authentication as {user}")), "{m}");
}

#[test]
fn client_config_supplies_host_port_user_key_and_known_hosts() {
    let d = sshd::shared();
    let cfg = d.path("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host rpyc-test-alias\n  HostName 127.0.0.1\n  Port {}\n  User {}\n  \
             IdentityFile {}\n  UserKnownHostsFile {}\n",
            d.port,
            d.user,
            d.client_key.display(),
            d.known_hosts.display()
        ),
    )
    .unwrap();
    // "If the two machines are acquainted and your ssh config is set up, the context can be
    // pretty much empty."
    works_through(
        &SshContext::new("rpyc-test-alias")
            .config_file(&cfg)
            .agent(false),
    )
    .unwrap();
    // Explicit fields win: a wrong explicit port is used (and fails), a wrong explicit user
    // is used (and is refused).
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = works_through(
        &SshContext::new("rpyc-test-alias")
            .config_file(&cfg)
            .agent(false)
            .port(closed_port),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Connect { addr, .. } if addr.contains(&closed_port.to_string())),
        "{err:?}"
    );
    let err = works_through(
        &SshContext::new("rpyc-test-alias")
            .config_file(&cfg)
            .agent(false)
            .user("rpyc-no-such-user"),
    )
    .unwrap_err();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed, "{e}");
    assert!(
        e.message().contains("authentication as rpyc-no-such-user"),
        "{e}"
    );
}
