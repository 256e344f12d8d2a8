//! The client side's entry points: [`Options`], the one builder that carries every client
//! setting (timeouts and limits, the client's own service, TLS or another authenticator, an
//! SSH route) and reaches every transport from it; and the RPyC-named shorthands
//! [`connect`], [`ssl_connect`], [`ssh_connect`], [`unix_connect`], [`connect_stream`] and
//! [`connect_subprocess`], each the builder with its defaults.

use crate::auth::ClientAuthenticator;
use crate::base::threads::ThreadSet;
use crate::core::config::Config;
use crate::core::connection::Connection;
use crate::core::service::Service;
use crate::error::Error;
#[cfg(unix)]
use crate::ssh::{SshContext, SshTunnel};
use crate::tls::SslClient;
use crate::transport::{self, Transport};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every setting of a client connection, with the entry points that open one.
///
/// Defaults: no service exposed, 30 s call timeout (like RPyC's `sync_request_timeout`), 10 s
/// connect and handshake timeouts, 64 MiB largest frame, at most twice that held from the peer
/// at once, 64 workers, 65,536 queued requests, no idle limit, plain TCP. The README's "Limits
/// and hostile peers" gives the arithmetic. A server's connections are configured on its
/// [`ServerBuilder`](crate::ServerBuilder) instead.
///
/// ```
/// # let (server, port) = rpyc::testing::example_server()?;
/// use std::time::Duration;
/// let callbacks = rpyc::Service::new("client").method("notify", |msg: String| println!("{msg}"));
/// let conn = rpyc::Options::new()
///     .service(callbacks)
///     .call_timeout(Duration::from_secs(5))
///     .connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<i64, _>("add", (1, 2))?, 3);
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) config: Config,
    service: Service,
    connect_timeout: Duration,
    authenticator: Option<Arc<dyn ClientAuthenticator>>,
    #[cfg(unix)]
    ssh: Option<SshContext>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            config: Config::default(),
            service: Service::new("void"),
            connect_timeout: Duration::from_secs(10),
            authenticator: None,
            #[cfg(unix)]
            ssh: None,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Options");
        d.field("service", &self.service)
            .field("connect_timeout", &self.connect_timeout)
            .field("config", &self.config)
            .field("authenticator", &self.authenticator.is_some());
        #[cfg(unix)]
        d.field("ssh", &self.ssh);
        d.finish()
    }
}

impl Options {
    /// The defaults.
    ///
    /// ```
    /// let options = rpyc::Options::new();
    /// # let _ = options;
    /// ```
    pub fn new() -> Options {
        Options::default()
    }

    /// The service this client exposes to the server: its callbacks, which server handlers
    /// reach with [`Context::peer_root`](crate::Context::peer_root).
    ///
    /// ```
    /// let me = rpyc::Service::new("client").method("name", || "lab rig 7");
    /// let options = rpyc::Options::new().service(me);
    /// # let _ = options;
    /// ```
    pub fn service(mut self, service: Service) -> Options {
        self.service = service;
        self
    }

    /// Default timeout of calls on this connection (30 s); each call can override it with
    /// [`RemoteObject::call_timeout`](crate::RemoteObject::call_timeout). It covers the whole
    /// call: waiting for the connection's writer (another thread may be sending), sending, and
    /// waiting for the reply. It is also the *stall timeout* (at least 1 s): a peer that takes
    /// none of what this side writes, or sends part of a frame and then nothing, for that long
    /// is dropped, with a warning in the log. `Duration::MAX` means no limit.
    ///
    /// ```
    /// let options = rpyc::Options::new().call_timeout(std::time::Duration::from_secs(5));
    /// # let _ = options;
    /// ```
    pub fn call_timeout(mut self, d: Duration) -> Options {
        self.config.call_timeout = d;
        self
    }

    /// How long establishing a TCP connection may take (10 s).
    ///
    /// ```
    /// let options = rpyc::Options::new().connect_timeout(std::time::Duration::from_secs(2));
    /// # let _ = options;
    /// ```
    pub fn connect_timeout(mut self, d: Duration) -> Options {
        self.connect_timeout = d;
        self
    }

    /// How long the handshake may take (10 s), counted from the moment the transport is up:
    /// authentication (TLS) and rpyc's hello together. Over a stream or to a child process,
    /// which cannot time out a read, our end is shut down when the time is up (the child is
    /// killed; a stream peer sees the end of our stream).
    ///
    /// ```
    /// let options = rpyc::Options::new().handshake_timeout(std::time::Duration::from_secs(3));
    /// # let _ = options;
    /// ```
    pub fn handshake_timeout(mut self, d: Duration) -> Options {
        self.config.handshake_timeout = d;
        self
    }

    /// Largest frame (one call or reply, encoded) this side accepts; announced to the peer,
    /// which refuses to send more (its call fails with [`Error::TooLarge`], nothing is sent).
    /// 64 MiB by default; at least 1 KiB, at most 4 GiB - 1.
    ///
    /// ```
    /// // Calls carrying up to about 1 GiB.
    /// let options = rpyc::Options::new().max_frame_size(1 << 30);
    /// # let _ = options;
    /// ```
    pub fn max_frame_size(mut self, bytes: usize) -> Options {
        self.config.set_max_frame(bytes);
        self
    }

    /// Most bytes of the peer's data this side holds for the connection at once: frames being
    /// read, requests queued or running, requests nested in a waiting call, replies not yet
    /// taken by their caller (each frame counted with a small overhead, see the README). A peer
    /// that sends more is closed, with a warning; other connections carry on. Defaults to twice
    /// [`max_frame_size`](Self::max_frame_size); never less than one largest frame.
    ///
    /// ```
    /// let options = rpyc::Options::new().max_frame_size(16 << 20).max_buffered(64 << 20);
    /// # let _ = options;
    /// ```
    pub fn max_buffered(mut self, bytes: usize) -> Options {
        self.config.max_buffered = Some(bytes);
        self
    }

    /// Closes the connection once it has gone this long with no byte either way and nothing
    /// in flight (no call of ours waiting for a reply, no request of the peer running or
    /// queued). No limit by default (`Duration::MAX`). Checked every quarter of the limit (at
    /// least every 50 ms, at most every 5 s); not over streams and pipes, which cannot time out
    /// a read.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = rpyc::Options::new().idle_timeout(Duration::from_secs(600));
    /// # let _ = options;
    /// ```
    pub fn idle_timeout(mut self, d: Duration) -> Options {
        self.config.idle_timeout = d;
        self
    }

    /// Most handlers of the peer's requests running at once (64; nested callbacks do not
    /// count: they run on the thread that waits for them).
    ///
    /// ```
    /// let options = rpyc::Options::new().max_workers(4);
    /// # let _ = options;
    /// ```
    pub fn max_workers(mut self, n: usize) -> Options {
        self.config.set_max_workers(n);
        self
    }

    /// Most requests waiting for a worker (65,536); a peer that sends more is closed as
    /// misbehaving.
    ///
    /// ```
    /// let options = rpyc::Options::new().max_queued(1000);
    /// # let _ = options;
    /// ```
    pub fn max_queued(mut self, n: usize) -> Options {
        self.config.set_max_queued(n);
        self
    }

    /// Connects with TLS, as `client` says (what to present, what to trust). Verification of
    /// the server is on by default; see [`SslClient`].
    ///
    /// ```
    /// # let pki = rpyc::testing::TestPki::temp()?;
    /// # let files = pki.issue("localhost", &["localhost"])?;
    /// # let auth = rpyc::SslAuthenticator::new(&files.key, &files.cert);
    /// # let server = rpyc::ThreadedServer::new(rpyc::Service::new("s").method("ping", || "pong"))
    /// #     .authenticator(auth).build()?.spawn()?;
    /// # let ca = pki.ca_cert();
    /// let options = rpyc::Options::new().tls(rpyc::tls::SslClient::new().ca_certs(ca));
    /// let conn = options.connect("localhost", server.port())?;
    /// assert_eq!(conn.root().call::<String, _>("ping", ())?, "pong");
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn tls(self, client: SslClient) -> Options {
        self.authenticator(client)
    }

    /// Authenticates connections made with [`connect`](Self::connect) with your own scheme,
    /// before the rpyc handshake (a pre-shared token, say; see
    /// [`ClientAuthenticator`]). [`tls`](Self::tls) is the
    /// same slot, for TLS: the last one given is used.
    ///
    /// ```
    /// use rpyc::auth::{Authenticated, ClientAuthenticator};
    /// struct Token;
    /// impl ClientAuthenticator for Token {
    ///     fn authenticate(&self, mut s: std::net::TcpStream, _host: &str, _t: std::time::Duration)
    ///         -> Result<Authenticated, rpyc::Error> {
    ///         std::io::Write::write_all(&mut s, b"s3cr3t!!")?;
    ///         Ok(Authenticated::new(s))
    ///     }
    /// }
    /// let options = rpyc::Options::new().authenticator(Token);
    /// # let _ = options;
    /// ```
    pub fn authenticator(mut self, a: impl ClientAuthenticator) -> Options {
        self.authenticator = Some(Arc::new(a));
        self
    }

    /// Reaches the server through SSH: [`connect`](Self::connect)`(host, port)` then opens an
    /// SSH session as `ctx` says and a tunnel to `host:port` *as the SSH server sees it*
    /// (usually `localhost`, for a server bound to localhost only), and runs the connection
    /// (with TLS, if set, verified against `host`) through it. The connection owns the tunnel.
    ///
    /// ```no_run
    /// let ctx = rpyc::SshContext::new("myserver").user("foo");
    /// let conn = rpyc::Options::new().ssh(ctx).connect("localhost", 12345)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    #[cfg(unix)]
    pub fn ssh(mut self, ctx: SshContext) -> Options {
        self.ssh = Some(ctx);
        self
    }

    /// Connects to `host:port`: over TCP, through SSH if [`ssh`](Self::ssh) was set, with TLS
    /// (or another authenticator) if set.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// let conn = rpyc::Options::new().connect("127.0.0.1", port)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect(&self, host: &str, port: u16) -> Result<Connection, Error> {
        self.open(
            host,
            port,
            |t| self.establish(t),
            |conn, tunnel| conn.on_close(tunnel),
        )
    }

    /// Opens the transport to `host:port` these options describe (TCP, through SSH if set,
    /// with TLS or another authenticator if set) and runs `establish` on it. A connection
    /// through SSH keeps its tunnel until it closes: `keep` hands it the tunnel's drop.
    pub(crate) fn open<C>(
        &self,
        host: &str,
        port: u16,
        establish: impl FnOnce(Transport) -> Result<C, Error>,
        keep: impl FnOnce(&C, Box<dyn FnOnce() + Send>),
    ) -> Result<C, Error> {
        #[cfg(unix)]
        if let Some(ctx) = &self.ssh {
            if ctx.uses_openssh() {
                if self.authenticator.is_some() {
                    return Err(Error::Misuse(
                        "TLS (or another authenticator) through SshContext::use_openssh is not \
                         supported: use the libssh2 transport (use_openssh(false)) or no TLS"
                            .into(),
                    ));
                }
                let cmd = crate::ssh::openssh::command(ctx, host, port)?;
                let explain = crate::ssh::openssh::explain(ctx);
                let t = transport::subprocess_explained(cmd, self.config.write_timeout(), explain)?;
                return establish(t);
            }
            let tunnel = SshTunnel::open(ctx, host, port)?;
            let opened = self
                .open_tcp(host, "127.0.0.1", tunnel.local_port())
                .and_then(establish);
            return match opened {
                Ok(conn) => {
                    keep(&conn, Box::new(move || drop(tunnel)));
                    Ok(conn)
                }
                Err(e) => {
                    // The tunnel knows better why the connection failed (the remote port
                    // refused, forwarding prohibited, the session died).
                    let why = tunnel.failure();
                    drop(tunnel);
                    Err(why.map(Error::Ssh).unwrap_or(e))
                }
            };
        }
        let _ = keep;
        self.open_tcp(host, host, port).and_then(establish)
    }

    /// Connects to `dial:port`, authenticating the peer as `host`.
    fn open_tcp(&self, host: &str, dial: &str, port: u16) -> Result<Transport, Error> {
        let s = transport::tcp_connect(dial, port, self.connect_timeout)?;
        let started = Instant::now();
        let write_timeout = self.config.write_timeout();
        let mut t = match &self.authenticator {
            None => transport::tcp(s, write_timeout)?,
            Some(a) => a
                .authenticate(s, host, self.config.handshake_timeout)?
                .into_transport(write_timeout)?,
        };
        t.started = started;
        Ok(t)
    }

    fn establish(&self, t: Transport) -> Result<Connection, Error> {
        Connection::establish(t, &self.config, self.service.clone(), ThreadSet::clients())
    }

    /// Refuses settings that only a TCP connection can use.
    fn tcp_only(&self, what: &str) -> Result<(), Error> {
        let set = if self.authenticator.is_some() {
            Some("tls/authenticator")
        } else {
            #[cfg(unix)]
            {
                self.ssh.as_ref().map(|_| "ssh")
            }
            #[cfg(not(unix))]
            None
        };
        match set {
            Some(setting) => Err(Error::Misuse(format!(
                "Options::{setting} applies to TCP connections (Options::connect), not to {what}; \
                 use Options without it"
            ))),
            None => Ok(()),
        }
    }

    /// Connects to a server listening on the Unix socket at `path`.
    ///
    /// ```no_run
    /// let conn = rpyc::Options::new().unix_connect("/tmp/rpyc.sock")?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    #[cfg(unix)]
    pub fn unix_connect(&self, path: impl AsRef<Path>) -> Result<Connection, Error> {
        self.establish(self.open_unix(path.as_ref())?)
    }

    /// The transport to a Unix socket (these options may not ask for TLS or SSH).
    #[cfg(unix)]
    pub(crate) fn open_unix(&self, path: &Path) -> Result<Transport, Error> {
        self.tcp_only("Unix sockets")?;
        let s = std::os::unix::net::UnixStream::connect(path).map_err(|e| Error::Connect {
            addr: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(transport::unix(
            s,
            path.display().to_string(),
            self.config.write_timeout(),
        )?)
    }

    /// Runs the protocol over any byte stream: `reader` carries the peer's bytes to us,
    /// `writer` ours to it. Both ends are symmetric, so this also *serves* a stream (see the
    /// `stdio_server` example). Both must be blocking. Closing drops `writer`; the reading
    /// thread ends when `reader` reports the end of the stream (so pass the two directions of
    /// a pipe pair, not two handles of one socket: use [`Options::connect`] or
    /// [`Options::unix_connect`] for sockets).
    ///
    /// ```no_run
    /// // Serve the service on this process's stdin/stdout until the parent goes away.
    /// let svc = rpyc::Service::new("child").method("pid", || std::process::id());
    /// let conn = rpyc::Options::new().service(svc).connect_stream(std::io::stdin(), std::io::stdout())?;
    /// conn.wait_closed();
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect_stream<R, W>(&self, reader: R, writer: W) -> Result<Connection, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        self.establish(self.open_stream(reader, writer)?)
    }

    /// A transport over a byte stream (these options may not ask for TLS or SSH).
    pub(crate) fn open_stream<R, W>(&self, reader: R, writer: W) -> Result<Transport, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        self.tcp_only("streams")?;
        Ok(transport::stream(reader, writer, "stream".into()))
    }

    /// Starts `cmd` with its stdin and stdout piped and connects to the rpyc peer it runs
    /// there. Closing the connection closes the child's stdin, and kills the child if it has
    /// not exited half a second later.
    ///
    /// ```no_run
    /// let conn = rpyc::Options::new().connect_subprocess(std::process::Command::new("./my-worker"))?;
    /// let pid: u32 = conn.root().call("pid", ())?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect_subprocess(&self, cmd: Command) -> Result<Connection, Error> {
        self.establish(self.open_subprocess(cmd)?)
    }

    /// A transport to a child process's stdin and stdout (these options may not ask for TLS or
    /// SSH).
    pub(crate) fn open_subprocess(&self, cmd: Command) -> Result<Transport, Error> {
        self.tcp_only("child processes")?;
        transport::subprocess(cmd, self.config.write_timeout())
    }
}

/// Connects over TCP with default [`Options`].
///
/// ```
/// # let (server, port) = rpyc::testing::example_server()?;
/// let conn = rpyc::connect("127.0.0.1", port)?;
/// let sum: i64 = conn.root().call("add", (1, 2))?;
/// assert_eq!(sum, 3);
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect(host: &str, port: u16) -> Result<Connection, Error> {
    Options::new().connect(host, port)
}

/// Connects over TLS, as RPyC's `ssl_connect`: verifies the server against the system's trust
/// store and its certificate against `host`, and presents `keyfile`/`certfile` when given
/// (servers that require client certificates). For a private CA, another name, or other
/// settings, give [`Options::tls`] an [`SslClient`] (the one-line private-CA form is below);
/// keep that `Options` to connect often: it reads the files and the system's trust store (tens
/// of milliseconds) once, where `ssl_connect` reads them on every call.
///
/// ```no_run
/// let conn = rpyc::ssl_connect("myserver.example", 18821, Some("client.key"), Some("client.pem"))?;
/// let answer: i64 = conn.root().call("add", (1, 2))?;
///
/// // The same with your own CA (as RPyC's `ca_certs`):
/// use rpyc::tls::SslClient;
/// let conn = rpyc::Options::new()
///     .tls(SslClient::new().ca_certs("ca.pem").keyfile("client.key").certfile("client.pem"))
///     .connect("myserver.example", 18821)?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn ssl_connect(
    host: &str,
    port: u16,
    keyfile: Option<&str>,
    certfile: Option<&str>,
) -> Result<Connection, Error> {
    Options::new()
        .tls(ssl_client(keyfile, certfile))
        .connect(host, port)
}

/// The TLS settings of RPyC's `ssl_connect(host, port, keyfile, certfile)`: the system's trust
/// store, the host name verified, a client certificate when both files are given.
pub(crate) fn ssl_client(keyfile: Option<&str>, certfile: Option<&str>) -> SslClient {
    let mut client = SslClient::new();
    if let Some(k) = keyfile {
        client = client.keyfile(k);
    }
    if let Some(c) = certfile {
        client = client.certfile(c);
    }
    client
}

/// Connects through SSH, as RPyC's `ssh_connect`: opens an SSH session as `ctx` says and a
/// tunnel to port `port` on the SSH server's own localhost, and connects to the rpyc server
/// there with default [`Options`] (use [`Options::ssh`] for other settings). The connection owns
/// the tunnel: closing it (or dropping its last handle) closes the tunnel and the session.
///
/// ```no_run
/// let ctx = rpyc::SshContext::new("myserver").user("foo").keyfile("/path/to/my/keyfile");
/// let conn = rpyc::ssh_connect(&ctx, 12345)?;
/// let sum: i64 = conn.root().call("add", (1, 2))?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[cfg(unix)]
pub fn ssh_connect(ctx: &SshContext, port: u16) -> Result<Connection, Error> {
    Options::new().ssh(ctx.clone()).connect("127.0.0.1", port)
}

/// Connects to a Unix socket with default [`Options`].
///
/// ```no_run
/// let conn = rpyc::unix_connect("/tmp/rpyc.sock")?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[cfg(unix)]
pub fn unix_connect(path: impl AsRef<Path>) -> Result<Connection, Error> {
    Options::new().unix_connect(path)
}

/// Runs the protocol over a byte stream with default [`Options`]; see
/// [`Options::connect_stream`].
///
/// ```no_run
/// let conn = rpyc::connect_stream(std::io::stdin(), std::io::stdout())?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect_stream<R, W>(reader: R, writer: W) -> Result<Connection, Error>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    Options::new().connect_stream(reader, writer)
}

/// Starts a child process and connects to it with default [`Options`]; see
/// [`Options::connect_subprocess`].
///
/// ```no_run
/// let conn = rpyc::connect_subprocess(std::process::Command::new("./my-worker"))?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect_subprocess(cmd: Command) -> Result<Connection, Error> {
    Options::new().connect_subprocess(cmd)
}
