//! The user's OpenSSH client configuration, as `ssh -G` resolves it.
//!
//! `ssh -G [-F FILE] HOST` prints every option after applying `Host` and `Match` blocks,
//! defaults and token expansion, which no parser of our own would match exactly. When `ssh` is
//! not installed, the plain OpenSSH defaults are used instead (logged at debug level).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// What we take from the client configuration for one host.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostConfig {
    /// The real host name (`HostName`), or the alias itself.
    pub hostname: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// `IdentityFile` entries, `~` expanded (not all of them exist).
    pub identity_files: Vec<PathBuf>,
    /// `UserKnownHostsFile` entries; new keys are appended to the first.
    pub user_known_hosts: Vec<PathBuf>,
    /// `GlobalKnownHostsFile` entries (read only).
    pub global_known_hosts: Vec<PathBuf>,
    /// `IdentityAgent`, when set (`none` disables the agent).
    pub identity_agent: Option<String>,
    /// `HostKeyAlias`: the name looked up in known_hosts instead of the host name.
    pub host_key_alias: Option<String>,
    /// `StrictHostKeyChecking` as written (`yes`, `ask`, `accept-new`, `no`, `off`).
    pub strict_host_key_checking: Option<String>,
    pub hash_known_hosts: bool,
    pub connect_timeout: Option<Duration>,
    pub server_alive_interval: Option<Duration>,
    /// `ProxyJump` as written (`none` when unset in some versions).
    pub proxy_jump: Option<String>,
    /// `ProxyCommand` as written.
    pub proxy_command: Option<String>,
}

/// Resolves `host` through `ssh -G`, reading `config_file` instead of `~/.ssh/config` when given
/// (which also skips the system-wide file, as `ssh -F` does).
pub(crate) fn resolve(host: &str, config_file: Option<&Path>) -> HostConfig {
    let mut cmd = Command::new("ssh");
    cmd.arg("-G");
    if let Some(f) = config_file {
        cmd.arg("-F").arg(f);
    }
    // `--` is not accepted by every ssh; a host starting with '-' is refused instead.
    if host.starts_with('-') {
        log::debug!("ssh config: not resolving host name {host:?} starting with '-'");
        return defaults();
    }
    cmd.arg(host)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match cmd.output() {
        Ok(out) if out.status.success() => parse(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => {
            log::warn!(
                "ssh config: `ssh -G {host}` failed ({}): {}; using OpenSSH's defaults",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            defaults()
        }
        Err(e) => {
            log::debug!("ssh config: cannot run `ssh -G` ({e}); using OpenSSH's defaults");
            defaults()
        }
    }
}

/// OpenSSH's defaults, for when `ssh` is not installed.
pub(crate) fn defaults() -> HostConfig {
    let ids = ["id_rsa", "id_ecdsa", "id_ed25519"];
    HostConfig {
        identity_files: ids
            .iter()
            .map(|f| expand_tilde(&format!("~/.ssh/{f}")))
            .collect(),
        user_known_hosts: vec![expand_tilde("~/.ssh/known_hosts")],
        global_known_hosts: vec![PathBuf::from("/etc/ssh/ssh_known_hosts")],
        ..HostConfig::default()
    }
}

/// Parses the `key value...` lines `ssh -G` prints.
pub(crate) fn parse(text: &str) -> HostConfig {
    let mut c = HostConfig::default();
    let secs = |v: &str| -> Option<Duration> {
        v.parse::<u64>()
            .ok()
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
    };
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(' ') else {
            continue;
        };
        let value = value.trim();
        match key.to_ascii_lowercase().as_str() {
            "hostname" => c.hostname = Some(value.to_string()),
            "user" => c.user = Some(value.to_string()),
            "port" => c.port = value.parse().ok(),
            "identityfile" => c.identity_files.push(expand_tilde(value)),
            "userknownhostsfile" => {
                c.user_known_hosts = value.split_whitespace().map(expand_tilde).collect()
            }
            "globalknownhostsfile" => {
                c.global_known_hosts = value.split_whitespace().map(expand_tilde).collect()
            }
            "identityagent" => c.identity_agent = Some(value.to_string()),
            "hostkeyalias" => c.host_key_alias = Some(value.to_string()),
            "stricthostkeychecking" => c.strict_host_key_checking = Some(value.to_lowercase()),
            "hashknownhosts" => c.hash_known_hosts = value == "yes",
            "connecttimeout" => c.connect_timeout = secs(value),
            "serveraliveinterval" => c.server_alive_interval = secs(value),
            "proxyjump" => c.proxy_jump = Some(value.to_string()),
            "proxycommand" => c.proxy_command = Some(value.to_string()),
            _ => {}
        }
    }
    c
}

/// `~/x` -> `$HOME/x`.
pub(crate) fn expand_tilde(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_ssh_g_prints() {
        let c = parse(
            "host alias\nuser foo\nhostname 10.0.0.1\nport 2222\n\
             identityfile ~/.ssh/id_rsa\nidentityfile /k/id_ed25519\n\
             userknownhostsfile /a/kh /a/kh2\nconnecttimeout none\nserveraliveinterval 15\n\
             stricthostkeychecking accept-new\nhashknownhosts yes\nidentityagent /tmp/agent\n",
        );
        assert_eq!(c.user.as_deref(), Some("foo"));
        assert_eq!(c.hostname.as_deref(), Some("10.0.0.1"));
        assert_eq!(c.port, Some(2222));
        assert_eq!(c.identity_files.len(), 2);
        assert_eq!(c.identity_files[1], PathBuf::from("/k/id_ed25519"));
        assert_eq!(
            c.user_known_hosts,
            vec![PathBuf::from("/a/kh"), PathBuf::from("/a/kh2")]
        );
        assert_eq!(c.connect_timeout, None);
        assert_eq!(c.server_alive_interval, Some(Duration::from_secs(15)));
        assert_eq!(c.strict_host_key_checking.as_deref(), Some("accept-new"));
        assert!(c.hash_known_hosts);
        assert_eq!(c.identity_agent.as_deref(), Some("/tmp/agent"));
    }
}
