//! The OpenSSH transport ([`SshContext::use_openssh`]): the connection runs over the stdin and
//! stdout of `ssh -W HOST:PORT`, so everything OpenSSH supports works unchanged. The context's
//! settings become `ssh` options; whatever it leaves unset comes from the user's `ssh_config`,
//! read by `ssh` itself. `ssh` never prompts (`BatchMode`): a password cannot be given, and an
//! unknown host key fails unless the policy accepts new keys.

use super::{HostKeyPolicy, SshContext};
use crate::error::{Error, SshError, SshErrorKind};
use crate::transport::Explain;
use std::process::Command;
use std::sync::Arc;

/// The `ssh` command that connects to `host:port` as seen from the SSH server.
pub(crate) fn command(ctx: &SshContext, host: &str, port: u16) -> Result<Command, Error> {
    if ctx.password.is_some() || ctx.passphrase.is_some() {
        return Err(Error::Misuse(
            "SshContext::use_openssh runs ssh without a prompt: it cannot be given a password or \
             a key passphrase; use an agent or an unencrypted key, or the libssh2 transport"
                .into(),
        ));
    }
    if ctx.host.starts_with('-') {
        return Err(Error::Misuse(format!(
            "the SSH host name {:?} starts with '-'",
            ctx.host
        )));
    }
    let mut cmd = Command::new("ssh");
    let mut opt = |k: &str, v: String| {
        cmd.arg("-o").arg(format!("{k}={v}"));
    };
    opt("BatchMode", "yes".into());
    opt("ExitOnForwardFailure", "yes".into());
    opt("ClearAllForwardings", "yes".into());
    if ctx.agent == Some(false) {
        opt("IdentityAgent", "none".into());
    } else if let Some(a) = &ctx.identity_agent {
        opt("IdentityAgent", a.display().to_string());
    }
    if let Some(k) = &ctx.known_hosts {
        opt("UserKnownHostsFile", k.display().to_string());
        opt("GlobalKnownHostsFile", "/dev/null".into());
    }
    match ctx.policy {
        Some(HostKeyPolicy::Strict) => opt("StrictHostKeyChecking", "yes".into()),
        Some(HostKeyPolicy::AcceptNew) => opt("StrictHostKeyChecking", "accept-new".into()),
        Some(HostKeyPolicy::DangerousAcceptAnyKey) => {
            opt("StrictHostKeyChecking", "no".into());
            opt("UserKnownHostsFile", "/dev/null".into());
        }
        None => {}
    }
    if let Some(d) = ctx.connect_timeout {
        opt("ConnectTimeout", d.as_secs().max(1).to_string());
    }
    if let Some(d) = ctx.keepalive {
        opt("ServerAliveInterval", d.as_secs().max(1).to_string());
    }
    if let Some(c) = &ctx.proxy_command {
        opt("ProxyCommand", c.clone());
    }
    if let Some(f) = &ctx.config_file {
        cmd.arg("-F").arg(f);
    }
    if let Some(p) = ctx.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &ctx.user {
        cmd.arg("-l").arg(u);
    }
    if let Some(k) = &ctx.keyfile {
        cmd.arg("-i").arg(k);
    }
    if let Some(j) = &ctx.proxy_jump {
        cmd.arg("-J").arg(j);
    }
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    cmd.arg("-T").arg("-W").arg(target).arg(&ctx.host);
    Ok(cmd)
}

/// Turns what `ssh` wrote to stderr, and how it exited, into the error to report.
pub(crate) fn explain(ctx: &SshContext) -> Explain {
    let sshd = ctx.host.clone();
    Arc::new(move |stderr: &str, status| {
        if stderr.is_empty() && status.map_or(true, |s| s.success()) {
            return None;
        }
        let has = |s: &str| stderr.contains(s);
        let kind = if has("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            SshErrorKind::HostKeyChanged
        } else if has("revoked") && has("key") {
            SshErrorKind::HostKeyRevoked
        } else if has("Host key verification failed")
            || has("No ED25519 host key is known")
            || has("host key is known")
        {
            SshErrorKind::HostKeyUnknown
        } else if has("Permission denied") || has("Too many authentication failures") {
            SshErrorKind::AuthenticationFailed
        } else if has("administratively prohibited") {
            SshErrorKind::ForwardingRefused
        } else if has("open failed") || has("stdio forwarding failed") {
            SshErrorKind::TargetUnreachable
        } else {
            SshErrorKind::Other
        };
        let how = match status {
            Some(s) => format!("ssh to {sshd} exited ({s})"),
            None => format!("ssh to {sshd} failed"),
        };
        let said = if stderr.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                stderr
                    .lines()
                    .rev()
                    .take(6)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(" / ")
            )
        };
        Some(Error::Ssh(SshError::new(kind, format!("{how}{said}"))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_context_becomes_ssh_options_and_the_target_ends_the_command() {
        let ctx = SshContext::new("lab")
            .port(2222)
            .user("me")
            .keyfile("/k")
            .known_hosts("/kh")
            .host_key_policy(HostKeyPolicy::Strict)
            .proxy_jump("jump:22")
            .use_openssh(true);
        let a = args(&command(&ctx, "127.0.0.1", 18861).unwrap());
        let joined = a.join(" ");
        for want in [
            "BatchMode=yes",
            "UserKnownHostsFile=/kh",
            "StrictHostKeyChecking=yes",
            "-p 2222",
            "-l me",
            "-i /k",
            "-J jump:22",
            "-T -W 127.0.0.1:18861 lab",
        ] {
            assert!(joined.contains(want), "{want} missing from {joined}");
        }
        assert!(joined.ends_with("-W 127.0.0.1:18861 lab"));
    }

    #[test]
    fn a_password_cannot_be_given_to_ssh() {
        let ctx = SshContext::new("lab").password("x").use_openssh(true);
        assert!(matches!(
            command(&ctx, "127.0.0.1", 1),
            Err(Error::Misuse(_))
        ));
    }

    #[test]
    fn stderr_says_what_failed() {
        let e = explain(&SshContext::new("lab"))("Permission denied (publickey).", None).unwrap();
        match e {
            Error::Ssh(e) => {
                assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed);
                assert!(e.message().contains("Permission denied"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
}
