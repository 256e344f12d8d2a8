//! SSH tunnels: reach an rpyc server that listens on its machine's loopback only, through sshd.
//!
//! RPyC's recommended set-up for untrusted networks binds the server to `localhost`, so nothing
//! outside its machine can reach it, and lets clients in through SSH. [`ssh_connect`](crate::ssh_connect) opens an
//! SSH session to the server's machine (libssh2, through the `ssh2` crate), starts an
//! [`SshTunnel`] whose local end listens on a loopback port of this machine and forwards each
//! connection through a `direct-tcpip` channel to `127.0.0.1:PORT` on the server's side, and
//! runs the rpyc connection through it. The connection owns the tunnel: closing it stops the
//! tunnel, its thread and its SSH session.
//!
//! # Settings
//!
//! An [`SshContext`] names the host and, optionally, everything else. What it leaves out comes
//! from the user's OpenSSH client configuration as `ssh -G HOST` resolves it (`HostName`,
//! `User`, `Port`, `IdentityFile`, `UserKnownHostsFile`, `GlobalKnownHostsFile`,
//! `HostKeyAlias`, `IdentityAgent`, `StrictHostKeyChecking`, `HashKnownHosts`,
//! `ConnectTimeout`, `ServerAliveInterval`), then from OpenSSH's defaults; fields set on the
//! context win. Authentication goes in OpenSSH's order: the agent's keys, then the identity
//! files, then the password.
//!
//! # Routes: jump hosts and proxy commands
//!
//! A host behind a bastion is reached as OpenSSH reaches it, from the context
//! ([`SshContext::proxy_jump`], [`SshContext::proxy_command`]) or the configuration
//! (`ProxyJump`, `ProxyCommand`). Through jump hosts, each hop is an SSH session of its own
//! (host key checked, authenticated) and the next session runs through a `direct-tcpip`
//! channel of it: concretely, an [`SshTunnel`] to the next hop, whose loopback end the next
//! session connects to, so that a dead hop ends every session behind it. Through a proxy
//! command, the session runs over a socket pair whose other end two threads connect to the
//! command's stdin and stdout; the command is killed when the session ends.
//!
//! # The OpenSSH transport
//!
//! [`SshContext::use_openssh`] replaces libssh2 with OpenSSH's own `ssh -W HOST:PORT`: the
//! connection is that process's stdin and stdout, so certificates, `ControlMaster`, FIDO keys
//! and every `ssh_config` option work unchanged, and what `ssh` writes to stderr explains a
//! failure. The process ends with the connection (closed or dropped).
//!
//! # Host keys
//!
//! The server's key is checked against the known_hosts files before anything is sent to it
//! (see [`HostKeyPolicy`]): unknown hosts are refused unless the policy says otherwise, and a
//! changed key is always refused, naming the file and line to fix. `@revoked` keys are
//! refused. libssh2 cannot verify host certificates: a host that known_hosts only vouches for
//! through a `@cert-authority` line is refused with a message naming that line and pointing
//! to the OpenSSH transport, which verifies them.
//!
//! # The tunnel
//!
//! See [`SshTunnel`] for the design of the forwarding thread.

mod config;
mod known_hosts;
pub(crate) mod openssh;
mod tunnel;

pub use tunnel::SshTunnel;

use crate::error::{Error, SshError, SshErrorKind, Timeout};
use known_hosts::{KnownHosts, Verdict};
use ssh2::{ErrorCode, MethodType, Session};
use std::fmt;
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// libssh2's "would block" code.
pub(crate) const EAGAIN: i32 = -37;
/// libssh2's time-out code (from a blocking call with `set_timeout`).
const ETIMEOUT: i32 = -9;
/// Authentication refused or a credential unusable: `FILE`, `METHOD_NONE`,
/// `AUTHENTICATION_FAILED`, `PUBLICKEY_UNVERIFIED`, `KEYFILE_AUTH_FAILED` (wrong passphrase).
const EAUTH: [i32; 5] = [-16, -17, -18, -19, -48];
/// Key exchange failed (no common algorithm, among others).
const EKEX: i32 = -5;

/// libssh2 errors after which the session is unusable (transport, protocol, crypto).
fn session_dead(code: i32) -> bool {
    matches!(
        code,
        -1 | -2 | -3 | -4 | -5 | -7 | -8 | -9 | -12 | -13 | -14 | -30 | -43 | -44 | -45 | -52
    )
}

/// What to do with a server whose host key is not in known_hosts.
///
/// A key that is in known_hosts for the host but differs from the server's is refused under
/// every policy: that is what a man-in-the-middle looks like.
///
/// ```
/// use rpyc::SshContext;
/// use rpyc::ssh::HostKeyPolicy;
/// let ctx = SshContext::new("myserver").host_key_policy(HostKeyPolicy::AcceptNew);
/// assert_eq!(HostKeyPolicy::default(), HostKeyPolicy::Strict);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HostKeyPolicy {
    /// Refuse unknown hosts (OpenSSH's `StrictHostKeyChecking yes`). The default.
    #[default]
    Strict,
    /// Trust an unknown host's key on first use and append it to the first user known_hosts
    /// file (OpenSSH's `StrictHostKeyChecking accept-new`).
    AcceptNew,
    /// Check nothing: accept any key, unknown or changed. Dangerous: anyone who can intercept
    /// the connection can read and change everything sent through it. For throwaway test
    /// machines only.
    DangerousAcceptAnyKey,
}

/// Where and how to open an SSH session: host, port, user, credentials, host key checking.
///
/// Only the host is required; every other setting comes, when not set here, from the user's
/// OpenSSH client configuration (`ssh -G`), then from OpenSSH's defaults (port 22, the current
/// user, `~/.ssh/id_*`, `~/.ssh/known_hosts`, the agent at `SSH_AUTH_SOCK`).
///
/// ```no_run
/// let ctx = rpyc::SshContext::new("myserver").user("foo").keyfile("/path/to/my/keyfile");
/// let conn = rpyc::ssh_connect(&ctx, 12345)?;
/// # Ok::<(), rpyc::Error>(())
/// ```
///
/// Every setting, for reference (nothing connects until the context is used):
///
/// ```
/// use rpyc::SshContext;
/// use rpyc::ssh::HostKeyPolicy;
/// use std::time::Duration;
/// let ctx = SshContext::new("db.example.org")
///     .port(2222)
///     .user("deploy")
///     .keyfile("/home/deploy/.ssh/id_ed25519")
///     .key_passphrase("correct horse")
///     .password("tried last")
///     .agent(false)
///     .known_hosts("/etc/myapp/known_hosts")
///     .host_key_policy(HostKeyPolicy::AcceptNew)
///     .connect_timeout(Duration::from_secs(5))
///     .keepalive(Duration::from_secs(30))
///     .config_file("/dev/null");
/// // Secrets stay out of logs.
/// assert!(!format!("{ctx:?}").contains("correct horse"));
/// ```
#[derive(Clone, Default)]
pub struct SshContext {
    host: String,
    port: Option<u16>,
    user: Option<String>,
    keyfile: Option<PathBuf>,
    passphrase: Option<String>,
    password: Option<String>,
    agent: Option<bool>,
    identity_agent: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    policy: Option<HostKeyPolicy>,
    connect_timeout: Option<Duration>,
    keepalive: Option<Duration>,
    config_file: Option<PathBuf>,
    proxy_jump: Option<String>,
    proxy_command: Option<String>,
    openssh: bool,
}

impl fmt::Debug for SshContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are not printed.
        f.debug_struct("SshContext")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("keyfile", &self.keyfile)
            .field("passphrase", &self.passphrase.as_ref().map(|_| "***"))
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("agent", &self.agent)
            .field("identity_agent", &self.identity_agent)
            .field("known_hosts", &self.known_hosts)
            .field("policy", &self.policy)
            .field("connect_timeout", &self.connect_timeout)
            .field("keepalive", &self.keepalive)
            .field("config_file", &self.config_file)
            .field("proxy_jump", &self.proxy_jump)
            .field("proxy_command", &self.proxy_command)
            .field("openssh", &self.openssh)
            .finish()
    }
}

impl SshContext {
    /// A context for `host`: a host name, an address, or an alias of the SSH client
    /// configuration (`Host` block), whose `HostName` is then used.
    pub fn new(host: impl Into<String>) -> SshContext {
        SshContext {
            host: host.into(),
            ..SshContext::default()
        }
    }

    /// The sshd port (default: the configuration's `Port`, else 22).
    pub fn port(mut self, port: u16) -> SshContext {
        self.port = Some(port);
        self
    }

    /// The user to log in as (default: the configuration's `User`, else the current user).
    pub fn user(mut self, user: impl Into<String>) -> SshContext {
        self.user = Some(user.into());
        self
    }

    /// A private key file to authenticate with, instead of the configuration's
    /// `IdentityFile`s. Tried after the agent's keys.
    pub fn keyfile(mut self, path: impl AsRef<Path>) -> SshContext {
        self.keyfile = Some(path.as_ref().to_path_buf());
        self
    }

    /// The passphrase that decrypts [`SshContext::keyfile`].
    pub fn key_passphrase(mut self, passphrase: impl Into<String>) -> SshContext {
        self.passphrase = Some(passphrase.into());
        self
    }

    /// A password, tried last if the server accepts password authentication (RPyC's
    /// "interactive password authentication", without the prompt).
    pub fn password(mut self, password: impl Into<String>) -> SshContext {
        self.password = Some(password.into());
        self
    }

    /// Whether to try the ssh-agent's keys (default: yes, when an agent is configured).
    pub fn agent(mut self, enabled: bool) -> SshContext {
        self.agent = Some(enabled);
        self
    }

    /// The agent's socket (default: the configuration's `IdentityAgent`, else
    /// `SSH_AUTH_SOCK`). Passed to libssh2 directly: the environment is not changed.
    pub fn identity_agent(mut self, socket: impl AsRef<Path>) -> SshContext {
        self.identity_agent = Some(socket.as_ref().to_path_buf());
        self.agent = Some(true);
        self
    }

    /// The known_hosts file to check the server's key against and to add new keys to
    /// (default: the configuration's `UserKnownHostsFile`s and `GlobalKnownHostsFile`s).
    pub fn known_hosts(mut self, path: impl AsRef<Path>) -> SshContext {
        self.known_hosts = Some(path.as_ref().to_path_buf());
        self
    }

    /// What to do with a host whose key is not known (default: the configuration's
    /// `StrictHostKeyChecking` when it is `accept-new`, else [`HostKeyPolicy::Strict`]).
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> SshContext {
        self.policy = Some(policy);
        self
    }

    /// How long reaching sshd, the SSH handshake and authentication may take together
    /// (default: the configuration's `ConnectTimeout`, else 10 s). Exceeding it fails with
    /// [`Error::Timeout`]`(`[`Timeout::Connect`]`)`.
    pub fn connect_timeout(mut self, d: Duration) -> SshContext {
        self.connect_timeout = Some(d);
        self
    }

    /// Send an SSH keepalive after this long without traffic (default: the configuration's
    /// `ServerAliveInterval`, else none). Whole seconds, at least 2.
    pub fn keepalive(mut self, interval: Duration) -> SshContext {
        self.keepalive = Some(interval);
        self
    }

    /// Read this OpenSSH client configuration file instead of `~/.ssh/config` and
    /// `/etc/ssh/ssh_config` (like `ssh -F`); `/dev/null` reads none.
    pub fn config_file(mut self, path: impl AsRef<Path>) -> SshContext {
        self.config_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// Reach the host through jump hosts, as OpenSSH's `ProxyJump` (`ssh -J`):
    /// `[user@]host[:port]`, several separated by commas, the first reached first (default:
    /// the configuration's `ProxyJump`; `none` turns it off). Each hop is an SSH session
    /// whose host key is checked and which authenticates as its own configuration says, with
    /// this context's known_hosts file, host key policy, key file, agent, timeout and
    /// configuration file; the next hop's session runs through a `direct-tcpip` channel of
    /// the one before.
    ///
    /// ```
    /// let ctx = rpyc::SshContext::new("lab-target").proxy_jump("me@bastion.example:2222");
    /// # let _ = ctx;
    /// ```
    pub fn proxy_jump(mut self, hops: impl Into<String>) -> SshContext {
        self.proxy_jump = Some(hops.into());
        self
    }

    /// Reach the host through a command's stdin and stdout, as OpenSSH's `ProxyCommand`
    /// (default: the configuration's). `%h`, `%p`, `%r`, `%n` and `%%` are expanded as
    /// OpenSSH does (host name, port, user, the name as given, a `%`); the command runs under
    /// `/bin/sh` and is ended when the session closes.
    ///
    /// ```
    /// let ctx = rpyc::SshContext::new("lab-target").proxy_command("ssh -W %h:%p bastion");
    /// # let _ = ctx;
    /// ```
    pub fn proxy_command(mut self, command: impl Into<String>) -> SshContext {
        self.proxy_command = Some(command.into());
        self
    }

    /// Run OpenSSH's own `ssh` instead of libssh2: the connection is `ssh -W HOST:PORT`'s
    /// stdin and stdout, so everything OpenSSH supports works unchanged (host and user
    /// certificates, `ControlMaster`, FIDO keys, GSSAPI, every `ssh_config` option). This
    /// context's settings become `ssh` options; a password cannot be given this way (there is
    /// no prompt), so a context with one is refused. What `ssh` writes to stderr explains a
    /// failure. The `ssh` process ends with the connection.
    ///
    /// ```
    /// let ctx = rpyc::SshContext::new("lab-target").use_openssh(true);
    /// # let _ = ctx;
    /// ```
    pub fn use_openssh(mut self, enabled: bool) -> SshContext {
        self.openssh = enabled;
        self
    }

    /// Whether connections go through OpenSSH's `ssh` ([`use_openssh`](Self::use_openssh)).
    pub(crate) fn uses_openssh(&self) -> bool {
        self.openssh
    }

    /// The context for jump host `spec` (`[user@]host[:port]`) of this one, reached through
    /// `before` (the hops before it).
    fn jump_context(&self, spec: &str, before: Option<String>) -> SshContext {
        let (user, rest) = match spec.rsplit_once('@') {
            Some((u, r)) => (Some(u.to_string()), r),
            None => (None, spec),
        };
        // `[v6::addr]:port`, `host:port` or `host`.
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            match r.split_once(']') {
                Some((h, p)) => (
                    h.to_string(),
                    p.strip_prefix(':').and_then(|p| p.parse().ok()),
                ),
                None => (rest.to_string(), None),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()),
                _ => (rest.to_string(), None),
            }
        };
        SshContext {
            host,
            port,
            user,
            keyfile: self.keyfile.clone(),
            passphrase: self.passphrase.clone(),
            password: None,
            agent: self.agent,
            identity_agent: self.identity_agent.clone(),
            known_hosts: self.known_hosts.clone(),
            policy: self.policy,
            connect_timeout: self.connect_timeout,
            keepalive: self.keepalive,
            config_file: self.config_file.clone(),
            proxy_jump: Some(before.unwrap_or_else(|| "none".into())),
            proxy_command: Some("none".into()),
            openssh: false,
        }
    }

    /// The settings to use: this context's, then the client configuration's, then defaults.
    fn resolve(&self) -> Resolved {
        let cfg = config::resolve(&self.host, self.config_file.as_deref());
        let hostname = cfg.hostname.clone().unwrap_or_else(|| self.host.clone());
        let port = self.port.or(cfg.port).unwrap_or(22);
        let user = self
            .user
            .clone()
            .or(cfg.user.clone())
            .or_else(current_user)
            .unwrap_or_else(|| "root".into());
        let (identity_files, explicit_key) = match &self.keyfile {
            Some(k) => (vec![k.clone()], true),
            None => (
                cfg.identity_files
                    .iter()
                    .filter(|p| p.is_file())
                    .cloned()
                    .collect(),
                false,
            ),
        };
        let (known_hosts_write, mut known_hosts_read) = match &self.known_hosts {
            Some(k) => (Some(k.clone()), vec![k.clone()]),
            None => (
                cfg.user_known_hosts.first().cloned(),
                cfg.user_known_hosts.clone(),
            ),
        };
        if self.known_hosts.is_none() {
            known_hosts_read.extend(cfg.global_known_hosts.iter().cloned());
        }
        let policy = self
            .policy
            .unwrap_or(match cfg.strict_host_key_checking.as_deref() {
                // OpenSSH's "no" also lets changed keys through in part; here it only accepts
                // new keys: a changed key is always refused.
                Some("accept-new") | Some("no") | Some("off") => HostKeyPolicy::AcceptNew,
                _ => HostKeyPolicy::Strict,
            });
        let agent = if self.agent == Some(false) {
            None
        } else if let Some(s) = &self.identity_agent {
            Some(s.clone())
        } else {
            match cfg.identity_agent.as_deref() {
                Some("none") => None,
                Some("SSH_AUTH_SOCK") | None => std::env::var_os("SSH_AUTH_SOCK")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from),
                Some(v) => match v.strip_prefix('$') {
                    Some(var) => std::env::var_os(var).map(PathBuf::from),
                    None => Some(config::expand_tilde(v)),
                },
            }
        };
        let set = |v: Option<String>| v.filter(|v| !v.is_empty() && v != "none");
        let route = match (
            set(self.proxy_jump.clone().or(cfg.proxy_jump.clone())),
            set(self.proxy_command.clone().or(cfg.proxy_command.clone())),
        ) {
            // As in OpenSSH, the first one set wins; the context's own settings first.
            (Some(j), _) if self.proxy_jump.is_some() || self.proxy_command.is_none() => {
                Route::Jump(j)
            }
            (_, Some(c)) => Route::Command(c),
            (Some(j), None) => Route::Jump(j),
            (None, None) => Route::Direct,
        };
        Resolved {
            route,
            passphrase: self.passphrase.clone(),
            password: self.password.clone(),
            key_host: cfg
                .host_key_alias
                .clone()
                .unwrap_or_else(|| hostname.clone()),
            hostname,
            port,
            user,
            identity_files,
            explicit_key,
            known_hosts_read,
            known_hosts_write,
            hash_known_hosts: cfg.hash_known_hosts,
            policy,
            agent,
            connect_timeout: self
                .connect_timeout
                .or(cfg.connect_timeout)
                .unwrap_or(Duration::from_secs(10)),
            keepalive: self.keepalive.or(cfg.server_alive_interval),
        }
    }
}

/// How a session reaches sshd.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    /// A TCP connection.
    Direct,
    /// Through jump hosts (`ProxyJump`'s list).
    Jump(String),
    /// Through a command's stdin and stdout (`ProxyCommand`, not yet expanded).
    Command(String),
}

/// An [`SshContext`] with every setting decided.
#[derive(Clone)]
struct Resolved {
    route: Route,
    passphrase: Option<String>,
    password: Option<String>,
    hostname: String,
    /// The name looked up in known_hosts (`HostKeyAlias`, else the host name).
    key_host: String,
    port: u16,
    user: String,
    identity_files: Vec<PathBuf>,
    explicit_key: bool,
    known_hosts_read: Vec<PathBuf>,
    known_hosts_write: Option<PathBuf>,
    hash_known_hosts: bool,
    policy: HostKeyPolicy,
    agent: Option<PathBuf>,
    connect_timeout: Duration,
    keepalive: Option<Duration>,
}

impl Resolved {
    fn addr(&self) -> String {
        format!("{}:{}", self.hostname, self.port)
    }
}

/// The current user's name, from the environment or `/etc/passwd`.
fn current_user() -> Option<String> {
    for var in ["USER", "LOGNAME"] {
        if let Some(u) = std::env::var(var).ok().filter(|u| !u.is_empty()) {
            return Some(u);
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
    })
}

fn code(e: &ssh2::Error) -> i32 {
    match e.code() {
        ErrorCode::Session(c) | ErrorCode::SFTP(c) => c,
    }
}

fn ssh_error(kind: SshErrorKind, message: impl Into<String>) -> Error {
    Error::Ssh(SshError::new(kind, message))
}

/// Opens an authenticated SSH session (blocking mode) to the host `ctx` names.
fn open_session(ctx: &SshContext) -> Result<(Session, Link, Resolved), Error> {
    let r = ctx.resolve();
    log::debug!("ssh: connecting to {} as {}", r.addr(), r.user);
    let timeout = r.connect_timeout;
    let deadline = crate::base::deadline(timeout);
    let left = || deadline.saturating_duration_since(Instant::now());
    let timed_out = || Error::Timeout(Timeout::Connect(timeout));

    // Reach sshd: over TCP, through jump hosts, or through a command.
    let addr = r.addr();
    let mut sess = Session::new()
        .map_err(|e| ssh_error(SshErrorKind::Other, format!("cannot create a session: {e}")))?;
    let link = match &r.route {
        Route::Direct => {
            let tcp = tcp_connect(&r.hostname, r.port, &addr, deadline, timeout)?;
            let link = Link::new(&tcp, Vec::new()).map_err(|e| tcp_error(&addr, e))?;
            sess.set_tcp_stream(tcp);
            link
        }
        Route::Jump(hops) => {
            let hops: Vec<&str> = hops
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .collect();
            let (last, before) = hops.split_last().expect("a jump route has hops");
            let via = ctx.jump_context(last, (!before.is_empty()).then(|| before.join(",")));
            let tunnel = SshTunnel::open(&via, &r.hostname, r.port).map_err(|e| match e {
                Error::Ssh(e) => ssh_error(
                    e.kind(),
                    format!("jump host {last} (on the way to {addr}): {}", e.message()),
                ),
                other => other,
            })?;
            log::debug!("ssh: reaching {addr} through jump host {last}");
            let local = format!(
                "127.0.0.1:{} (jump host {last} to {addr})",
                tunnel.local_port()
            );
            let tcp = tcp_connect("127.0.0.1", tunnel.local_port(), &local, deadline, timeout)?;
            let link = Link::new(&tcp, vec![Box::new(tunnel)]).map_err(|e| tcp_error(&addr, e))?;
            sess.set_tcp_stream(tcp);
            link
        }
        Route::Command(command) => {
            let (stream, child) = proxy_command(command, &r, &ctx.host)?;
            let link =
                Link::new(&stream, vec![Box::new(child)]).map_err(|e| tcp_error(&addr, e))?;
            sess.set_tcp_stream(stream);
            link
        }
    };

    // SSH handshake, host key, authentication: blocking, bounded by what is left of the timeout.
    let set_timeout = |s: &Session| -> Result<(), Error> {
        let ms = left().as_millis();
        if ms == 0 {
            return Err(timed_out());
        }
        s.set_timeout(ms.min(u32::MAX as u128) as u32);
        Ok(())
    };
    set_timeout(&sess)?;
    let known = KnownHosts::load(&r.known_hosts_read);
    let known_types = known.key_types(&r.key_host, r.port);
    let mut restricted = None;
    if !known_types.is_empty() && r.policy != HostKeyPolicy::DangerousAcceptAnyKey {
        // Ask for a key type we can check: a server that also has a key of another type
        // would otherwise offer that one, which would look unknown or changed.
        let supported = sess.supported_algs(MethodType::HostKey).unwrap_or_default();
        let prefs: Vec<&str> = known_types
            .iter()
            .flat_map(|t| known_hosts::algorithms_for(t).iter().copied())
            .filter(|a| supported.contains(a))
            .collect();
        if !prefs.is_empty() {
            let prefs = prefs.join(",");
            sess.method_pref(MethodType::HostKey, &prefs).map_err(|e| {
                ssh_error(
                    SshErrorKind::Other,
                    format!("cannot set host key algorithms {prefs}: {e}"),
                )
            })?;
            restricted = Some(prefs);
        }
    }
    if let Err(e) = sess.handshake() {
        return Err(match code(&e) {
            ETIMEOUT => timed_out(),
            EKEX if restricted.is_some() => ssh_error(
                SshErrorKind::Handshake,
                format!(
                    "handshake with {addr} failed: the server offers none of the host key types \
                     known_hosts lists for {} ({}): {e}",
                    r.key_host,
                    restricted.unwrap_or_default()
                ),
            ),
            _ => ssh_error(
                SshErrorKind::Handshake,
                format!("handshake with {addr} failed: {e}"),
            ),
        });
    }
    log::debug!(
        "ssh: {addr}: kex {}, host key {}, ciphers {} / {}",
        sess.methods(MethodType::Kex).unwrap_or("?"),
        sess.methods(MethodType::HostKey).unwrap_or("?"),
        sess.methods(MethodType::CryptCs).unwrap_or("?"),
        sess.methods(MethodType::CryptSc).unwrap_or("?")
    );
    check_host_key(&sess, &r, &known)?;
    set_timeout(&sess)?;
    authenticate(&sess, &r)?;
    Ok((sess, link, r))
}

/// The socket a session runs over, and what must live as long as it does (the tunnel through a
/// jump host, a proxy command's process).
pub(crate) struct Link {
    /// A second handle of the session's socket, so its descriptor stays valid while polled.
    sock: OwnedFd,
    _keep: Vec<Box<dyn Send>>,
}

impl Link {
    fn new<S: AsFd>(s: &S, keep: Vec<Box<dyn Send>>) -> io::Result<Link> {
        Ok(Link {
            sock: s.as_fd().try_clone_to_owned()?,
            _keep: keep,
        })
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

fn tcp_error(addr: &str, e: io::Error) -> Error {
    Error::Connect {
        addr: format!("{addr} (sshd)"),
        source: Arc::new(e),
    }
}

/// Connects to `host:port` (sshd, or a jump tunnel's local end) before `deadline`; a failure
/// names the connection as `addr`.
fn tcp_connect(
    host: &str,
    port: u16,
    addr: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let s = crate::transport::tcp_connect_until(host, port, deadline, timeout).map_err(
        |e| match e {
            Error::Connect { source, .. } => Error::Connect {
                addr: format!("{addr} (sshd)"),
                source,
            },
            other => other,
        },
    )?;
    s.set_nodelay(true).map_err(|e| tcp_error(addr, e))?;
    Ok(s)
}

/// A proxy command's process and the threads that carry bytes between its pipes and the
/// session's socket; dropping it ends all of them.
struct ProxyChild {
    child: std::process::Child,
    ours: UnixStream,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        let _ = self.ours.shutdown(std::net::Shutdown::Both);
        // The whole process group: a command that is a pipeline (`a | b`) leaves its parts
        // holding the pipes when only the shell dies.
        let _ = crate::base::sys::kill_group(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The pumps end once the pipes close; a process that left the group could keep one
        // open, so they get half a second and are then left to end on their own.
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for p in self.pumps.drain(..) {
            if p.is_finished() {
                let _ = p.join();
            } else {
                log::debug!("ssh: a ProxyCommand pipe is still open; leaving its pump thread");
            }
        }
    }
}

/// OpenSSH's `%` tokens of `ProxyCommand`.
fn expand_tokens(command: &str, r: &Resolved, alias: &str) -> String {
    let mut out = String::new();
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(&r.hostname),
            Some('p') => out.push_str(&r.port.to_string()),
            Some('r') => out.push_str(&r.user),
            Some('n') => out.push_str(alias),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Copies `from` to `to` until either ends. (Not `io::copy`, whose kernel-side copying
/// between a socket and a pipe saw an early end of stream here.)
fn pump(from: &mut impl io::Read, to: &mut impl io::Write) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Starts a proxy command; the session runs over the returned socket, whose other end two
/// threads connect to the command's stdin and stdout.
fn proxy_command(
    command: &str,
    r: &Resolved,
    alias: &str,
) -> Result<(UnixStream, ProxyChild), Error> {
    use std::process::{Command, Stdio};
    let expanded = expand_tokens(command, r, alias);
    log::debug!("ssh: reaching {} through ProxyCommand {expanded}", r.addr());
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("exec {expanded}"))
        // A group of its own, ended as a whole (see `ProxyChild`'s drop).
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            ssh_error(
                SshErrorKind::Config,
                format!("cannot start ProxyCommand {expanded:?}: {e}"),
            )
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let (ours, theirs) = UnixStream::pair()?;
    let (mut up, mut down) = (ours.try_clone()?, ours.try_clone()?);
    let mut pumps = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new().name(name.into()).spawn(f)
    };
    // The command's output -> the session; its end ends the session's input.
    pumps.push(spawn(
        "rpyc-ssh-proxy-out",
        Box::new(move || {
            pump(&mut stdout, &mut down);
            let _ = down.shutdown(std::net::Shutdown::Write);
        }),
    )?);
    // The session's output -> the command; its end closes the command's stdin.
    pumps.push(spawn(
        "rpyc-ssh-proxy-in",
        Box::new(move || {
            pump(&mut up, &mut stdin);
        }),
    )?);
    Ok((theirs, ProxyChild { child, ours, pumps }))
}

fn check_host_key(sess: &Session, r: &Resolved, known: &KnownHosts) -> Result<(), Error> {
    let (blob, _) = sess.host_key().ok_or_else(|| {
        ssh_error(
            SshErrorKind::Handshake,
            format!("{} sent no host key", r.addr()),
        )
    })?;
    if r.policy == HostKeyPolicy::DangerousAcceptAnyKey {
        log::warn!(
            "ssh: host key of {} NOT checked (HostKeyPolicy::DangerousAcceptAnyKey)",
            r.addr()
        );
        return Ok(());
    }
    let name = known_hosts::host_field(&r.key_host, r.port);
    let key_type = known_hosts::blob_key_type(blob).unwrap_or_else(|| "unknown".into());
    let what = format!(
        "{} key {}",
        known_hosts::key_type_label(&key_type),
        known_hosts::fingerprint(blob)
    );
    let files = || {
        r.known_hosts_read
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match known.check(&r.key_host, r.port, blob) {
        Verdict::Known => Ok(()),
        Verdict::Revoked { file, line } => Err(ssh_error(
            SshErrorKind::HostKeyRevoked,
            format!(
                "host key of {name} ({what}) is marked @revoked in {}:{line}; refusing to connect",
                file.display()
            ),
        )),
        Verdict::Changed { file, line } => Err(ssh_error(
            SshErrorKind::HostKeyChanged,
            format!(
                "HOST KEY OF {name} HAS CHANGED: the server sent {what}, but {}:{line} lists a \
                 different {key_type} key. Someone may be intercepting the connection, or the host \
                 key was replaced; if you are sure it was replaced, remove line {line} of {} \
                 (ssh-keygen -R '{name}') and verify the new key",
                file.display(),
                file.display()
            ),
        )),
        Verdict::Unknown {
            authority: Some((file, line)),
            ..
        } => Err(ssh_error(
            SshErrorKind::HostKeyUnknown,
            format!(
                "{name} is vouched for by a certificate authority ({}:{line}, @cert-authority), \
                 but the libssh2 transport cannot verify host certificates: connect with \
                 SshContext::use_openssh(true) (OpenSSH verifies them), or list the host's own \
                 key ({what})",
                file.display()
            ),
        )),
        Verdict::Unknown { other_types, .. } => {
            let also = if other_types.is_empty() {
                String::new()
            } else {
                format!(" (it lists {} keys for it)", other_types.join(", "))
            };
            match (r.policy, &r.known_hosts_write) {
                (HostKeyPolicy::AcceptNew, Some(file)) => {
                    known_hosts::append(file, &r.key_host, r.port, blob, r.hash_known_hosts)
                        .map_err(|e| {
                            ssh_error(
                                SshErrorKind::Config,
                                format!(
                                    "cannot add the host key of {name} ({what}) to {}: {e}",
                                    file.display()
                                ),
                            )
                        })?;
                    log::info!(
                        "ssh: added the host key of {name} ({what}) to {}",
                        file.display()
                    );
                    Ok(())
                }
                _ => Err(ssh_error(
                    SshErrorKind::HostKeyUnknown,
                    format!(
                        "host key for {name} is not in {}{also} ({what}); verify it and add it \
                         (ssh-keyscan -p {} {} >> FILE), or use HostKeyPolicy::AcceptNew",
                        files(),
                        r.port,
                        r.key_host
                    ),
                )),
            }
        }
    }
}

/// Agent keys, then identity files, then the password, as OpenSSH does.
fn authenticate(sess: &Session, r: &Resolved) -> Result<(), Error> {
    let user = &r.user;
    let addr = r.addr();
    let failed = |e: ssh2::Error, what: String| auth_error(&e, what, r.connect_timeout);
    let methods = match sess.auth_methods(user) {
        Ok(m) => m.to_string(),
        Err(e) if sess.authenticated() => {
            log::debug!("ssh: {addr} let {user} in without authentication ({e})");
            return Ok(());
        }
        Err(e) => {
            let what = format!("asking {addr} how to log in failed: {e}");
            return Err(failed(e, what));
        }
    };
    let mut tried: Vec<String> = Vec::new();
    // The key file given explicitly could not be read: a setting to fix, whatever else failed.
    let mut unreadable_key = false;
    // Stop at transport failures; only refusals move on to the next credential.
    let refused = |e: &ssh2::Error| EAUTH.contains(&code(e));
    let fatal = |e: ssh2::Error| {
        let what = format!("authentication with {addr} failed: {e}");
        failed(e, what)
    };
    if methods.contains("publickey") {
        if let Some(sock) = &r.agent {
            match agent_auth(sess, user, sock) {
                Ok(true) => return Ok(()),
                Ok(false) => tried.push(format!("the agent's keys ({})", sock.display())),
                Err(e) if code(&e) == ETIMEOUT => return Err(fatal(e)),
                Err(e) => tried.push(format!("the agent at {} ({e})", sock.display())),
            }
        }
        for key in &r.identity_files {
            let pass = if r.explicit_key {
                r.passphrase.as_deref()
            } else {
                None
            };
            match sess.userauth_pubkey_file(user, None, key, pass) {
                Ok(()) => return Ok(()),
                Err(e) if refused(&e) => {
                    let msg = e.message().to_string();
                    if msg.contains("Unsupported private key format")
                        || msg.contains("Unable to extract public key")
                        || msg.contains("Wrong passphrase")
                    {
                        unreadable_key |= r.explicit_key;
                        tried.push(format!(
                            "key {} (cannot be read: {msg}; wrong or missing passphrase?)",
                            key.display()
                        ));
                    } else {
                        tried.push(format!("key {} (refused)", key.display()));
                    }
                }
                Err(e) if code(&e) == ETIMEOUT => return Err(fatal(e)),
                Err(e) => tried.push(format!("key {} ({e})", key.display())),
            }
        }
    }
    if methods.contains("password") {
        if let Some(pw) = &r.password {
            match sess.userauth_password(user, pw) {
                Ok(()) => return Ok(()),
                Err(e) if refused(&e) => tried.push("the password (refused)".into()),
                Err(e) => return Err(fatal(e)),
            }
        }
    }
    if tried.is_empty() {
        tried.push("nothing: no agent, no key file, no password".into());
    }
    Err(ssh_error(
        if unreadable_key {
            SshErrorKind::Config
        } else {
            SshErrorKind::AuthenticationFailed
        },
        format!(
            "authentication as {user} to {addr} refused; tried {}; the server accepts: {methods}",
            tried.join(", ")
        ),
    ))
}

/// A failure during authentication that is not a refusal: out of time (the session's timeout
/// is what is left of the connect timeout, `timeout`), the session broke, or the server's answer
/// ends the attempt (e.g. the password has expired).
fn auth_error(e: &ssh2::Error, what: String, timeout: Duration) -> Error {
    match code(e) {
        ETIMEOUT => Error::Timeout(Timeout::Connect(timeout)),
        c if session_dead(c) => ssh_error(SshErrorKind::SessionLost, what),
        _ => ssh_error(SshErrorKind::AuthenticationFailed, what),
    }
}

/// Tries each of the agent's keys (libssh2's `userauth_agent` tries only the first).
/// `Ok(false)`: every key was refused.
fn agent_auth(sess: &Session, user: &str, sock: &Path) -> Result<bool, ssh2::Error> {
    let mut agent = sess.agent()?;
    agent.set_identity_path(sock)?;
    agent.connect()?;
    let result = (|| {
        agent.list_identities()?;
        for id in agent.identities()? {
            match agent.userauth(user, &id) {
                Ok(()) => return Ok(true),
                Err(e) if code(&e) == ETIMEOUT => return Err(e),
                Err(e) => log::debug!("ssh: agent key {} refused: {e}", id.comment()),
            }
        }
        Ok(false)
    })();
    let _ = agent.disconnect();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(code: i32) -> Option<SshErrorKind> {
        let e = ssh2::Error::new(ErrorCode::Session(code), "test");
        match auth_error(&e, "authentication failed".into(), Duration::from_secs(1)) {
            Error::Ssh(e) => Some(e.kind()),
            _ => None,
        }
    }

    #[test]
    fn only_a_broken_session_is_reported_lost_during_authentication() {
        assert_eq!(kind(ETIMEOUT), None, "a time-out is Error::Timeout");
        // LIBSSH2_ERROR_SOCKET_DISCONNECT, LIBSSH2_ERROR_SOCKET_RECV.
        assert_eq!(kind(-13), Some(SshErrorKind::SessionLost));
        assert_eq!(kind(-43), Some(SshErrorKind::SessionLost));
        // LIBSSH2_ERROR_PASSWORD_EXPIRED: the session is fine, the login is not.
        assert_eq!(kind(-15), Some(SshErrorKind::AuthenticationFailed));
    }
}
