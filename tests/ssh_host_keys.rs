//! Host keys are checked against known_hosts: unknown hosts refused by default (naming the
//! fingerprint and the file), accept-new adds them, changed and revoked keys are always
//! refused, hashed and `[host]:port` entries work, and a host known only by its RSA key is
//! asked for that key. Each refusal has its own kind.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::{ssh_error, works_through};
use rpyc::ssh::HostKeyPolicy;
use rpyc::SshErrorKind;
use std::process::Command;

/// `SHA256:...` of a public key line, as ssh-keygen prints it.
fn fingerprint(pub_line: &str, dir: &std::path::Path, name: &str) -> String {
    let f = dir.join(name);
    std::fs::write(&f, format!("{pub_line}\n")).unwrap();
    let out = sshd::run(Command::new("ssh-keygen").arg("-lf").arg(&f));
    out.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn unknown_host_is_refused_by_default_naming_fingerprint_and_file() {
    let d = sshd::shared();
    let kh = d.path("empty_known_hosts");
    std::fs::write(&kh, "# nothing yet\n").unwrap();
    let err = works_through(&d.context().known_hosts(&kh)).unwrap_err();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::HostKeyUnknown, "{e}");
    let m = e.message();
    let ed = fingerprint(&d.host_key_ed25519, &d.dir, "fp_ed.pub");
    let rsa = fingerprint(&d.host_key_rsa, &d.dir, "fp_rsa.pub");
    assert!(
        m.contains(&ed) || m.contains(&rsa),
        "{m}\n(expected {ed} or {rsa})"
    );
    assert!(m.contains(&kh.display().to_string()), "{m}");
    assert!(m.contains(&format!("[127.0.0.1]:{}", d.port)), "{m}");
    assert!(m.contains("HostKeyPolicy::AcceptNew"), "{m}");
    // Nothing was added.
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), "# nothing yet\n");
}

#[test]
fn accept_new_adds_the_key_and_later_connections_trust_it() {
    let d = sshd::shared();
    let kh = d.path("accept_new/sub/known_hosts");
    works_through(
        &d.context()
            .known_hosts(&kh)
            .host_key_policy(HostKeyPolicy::AcceptNew),
    )
    .unwrap();
    let text = std::fs::read_to_string(&kh).unwrap();
    assert!(
        text.starts_with(&format!("[127.0.0.1]:{} ", d.port)),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1);
    // Now known: the strict default accepts it, and nothing more is added.
    works_through(&d.context().known_hosts(&kh)).unwrap();
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), text);
}

#[test]
fn changed_key_is_refused_even_under_accept_new() {
    let d = sshd::shared();
    let kh = d.path("changed_known_hosts");
    // An ed25519 key for this host that is not the server's.
    let impostor = sshd::read_pub(&d.stranger_key);
    std::fs::write(
        &kh,
        format!("# first line\n[127.0.0.1]:{} {impostor}\n", d.port),
    )
    .unwrap();
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let err = works_through(&d.context().known_hosts(&kh).host_key_policy(policy)).unwrap_err();
        let e = ssh_error(&err);
        assert_eq!(e.kind(), SshErrorKind::HostKeyChanged, "{e}");
        let m = e.message();
        assert!(m.contains(&format!("{}:2", kh.display())), "{m}");
        assert!(m.contains("ssh-keygen -R"), "{m}");
    }
    // The file is untouched.
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 2);
    // Only the visibly dangerous policy lets it through.
    works_through(
        &d.context()
            .known_hosts(&kh)
            .host_key_policy(HostKeyPolicy::DangerousAcceptAnyKey),
    )
    .unwrap();
}

#[test]
fn hashed_entries_among_bad_lines_are_understood() {
    let d = sshd::shared();
    let kh = d.path("hashed_known_hosts");
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}\n", d.port, d.host_key_ed25519),
    )
    .unwrap();
    sshd::run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh));
    // A line libssh2's own reader would stop at, before the hashed entry.
    let text = format!(
        "this line is not a known_hosts line\n{}",
        std::fs::read_to_string(&kh).unwrap()
    );
    std::fs::write(&kh, &text).unwrap();
    assert!(text.contains("|1|"), "ssh-keygen -H did not hash: {text}");
    assert!(!text.contains("127.0.0.1"), "{text}");
    works_through(&d.context().known_hosts(&kh)).unwrap();
}

#[test]
fn host_known_only_by_its_rsa_key_is_asked_for_that_key() {
    let d = sshd::shared();
    let kh = d.path("rsa_known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {}\n", d.port, d.host_key_rsa)).unwrap();
    works_through(&d.context().known_hosts(&kh)).unwrap();
}

#[test]
fn port_22_entries_do_not_vouch_for_other_ports() {
    let d = sshd::shared();
    let kh = d.path("port22_known_hosts");
    std::fs::write(&kh, format!("127.0.0.1 {}\n", d.host_key_ed25519)).unwrap();
    let err = works_through(&d.context().known_hosts(&kh)).unwrap_err();
    assert_eq!(
        common::ssh_kind(&err),
        SshErrorKind::HostKeyUnknown,
        "{err}"
    );
}

#[test]
fn revoked_host_keys_are_refused_even_under_accept_new() {
    let d = sshd::shared();
    let kh = d.path("revoked_known_hosts");
    // Both of the server's keys, whichever it offers.
    std::fs::write(
        &kh,
        format!(
            "@revoked * {}\n@revoked * {}\n",
            d.host_key_ed25519, d.host_key_rsa
        ),
    )
    .unwrap();
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let err = works_through(&d.context().known_hosts(&kh).host_key_policy(policy)).unwrap_err();
        assert_eq!(
            common::ssh_kind(&err),
            SshErrorKind::HostKeyRevoked,
            "{err}"
        );
    }
    // Nothing was added.
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 2);
}
