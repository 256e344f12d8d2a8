//! Connecting to Python RPyC servers: [`Client`] (any [`Options`]) and the RPyC-named
//! shorthands [`connect`], [`ssl_connect`], [`ssh_connect`] and [`unix_connect`].

use crate::base::limits::{Budget, FRAME_OVERHEAD};
use crate::base::threads::ThreadSet;
use crate::client::Options;
use crate::core::config::Config;
use crate::error::{Error, PythonError};
use crate::python::connection::{Connection, Settings, Shared};
use crate::python::service::Service;
#[cfg(unix)]
use crate::ssh::SshContext;
use crate::transport::Transport;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

/// Most of our objects a peer may hold at once.
const MAX_OBJECTS: usize = 100_000;

/// The settings of a connection, from a client's or server's configuration.
pub(crate) fn settings(config: &Config) -> Settings {
    Settings {
        call_timeout: config.call_timeout,
        max_frame: config.max_frame,
        max_buffered: config.buffered_limit(),
        max_workers: config.max_workers,
        max_objects: MAX_OBJECTS,
        stall: config.write_timeout(),
        // Decoded values up to `max_buffered`, plus the one frame being decoded.
        budget: Budget::new(
            config.buffered_limit() + config.max_frame + FRAME_OVERHEAD,
            config.server_budget.clone(),
        ),
        threads: config.thread_budget.clone(),
    }
}

/// Connects to Python RPyC 6 servers with any [`Options`]: TLS ([`Options::tls`]), SSH
/// ([`Options::ssh`]), timeouts and limits, and the [`Service`] this side exposes to the server
/// (what the server's `conn.root` is).
///
/// ```no_run
/// use rpyc::{python, tls::SslClient, Options};
/// let options = Options::new()
///     .tls(SslClient::new().ca_certs("ca.pem").keyfile("client.key").certfile("client.pem"))
///     .call_timeout(std::time::Duration::from_secs(5));
/// let py = python::Client::new(options).connect("labhost", 12345)?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    options: Options,
    service: Service,
}

impl Client {
    /// A client with these options; its root service is the default one (see
    /// [`service`](Self::service)).
    pub fn new(options: Options) -> Client {
        Client {
            options,
            service: default_root(),
        }
    }

    /// The service this side exposes: what the server reaches as `conn.root`. By default a
    /// stand-in for RPyC's classic client service (`getmodule`, `eval`, `execute` and
    /// `namespace` exist but refuse, as a Rust program has no Python modules to give), which
    /// classic servers that call their client at connect time (`rpyc_classic -m stdio`) need.
    ///
    /// ```no_run
    /// use rpyc::python::{Client, Service};
    /// let me = Service::new("Rig").method("name", || "lab rig 7");
    /// let py = Client::new(rpyc::Options::new()).service(me).connect("labhost", 18861)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn service(mut self, service: Service) -> Client {
        self.service = service;
        self
    }

    fn establish(&self, t: Transport) -> Result<Connection, Error> {
        let shared = Shared::start(
            t,
            settings(&self.options.config),
            self.service.clone(),
            ThreadSet::clients(),
        )?;
        Ok(Connection::owned(shared))
    }

    /// Connects to `host:port`: over TCP, through SSH if the options say so, with TLS if they
    /// say so.
    ///
    /// ```no_run
    /// let py = rpyc::python::Client::new(rpyc::Options::new()).connect("127.0.0.1", 18861)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect(&self, host: &str, port: u16) -> Result<Connection, Error> {
        self.options.open(
            host,
            port,
            |t| self.establish(t),
            |conn, tunnel| conn.shared().on_close(tunnel),
        )
    }

    /// Connects to a Python server on a Unix socket (`ThreadedServer(socket_path=...)`).
    ///
    /// ```no_run
    /// let py = rpyc::python::Client::new(rpyc::Options::new()).unix_connect("/tmp/rpyc.sock")?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    #[cfg(unix)]
    pub fn unix_connect(&self, path: impl AsRef<Path>) -> Result<Connection, Error> {
        self.establish(self.options.open_unix(path.as_ref())?)
    }

    /// Speaks RPyC over a child process's stdin and stdout: `rpyc_classic -m stdio`, also on
    /// another machine through `ssh host rpyc_classic -m stdio` (no port at all). Closing the
    /// connection closes the child's stdin, and kills it if it has not exited half a second
    /// later.
    ///
    /// ```no_run
    /// let mut cmd = std::process::Command::new("ssh");
    /// cmd.args(["labhost", "rpyc_classic", "-m", "stdio"]);
    /// let py = rpyc::python::Client::new(rpyc::Options::new()).connect_subprocess(cmd)?;
    /// let pid: i64 = py.modules("os")?.call_method("getpid", ())?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect_subprocess(&self, cmd: Command) -> Result<Connection, Error> {
        self.establish(self.options.open_subprocess(cmd)?)
    }

    /// Speaks RPyC over any pair of blocking byte streams (the two directions of a pipe).
    ///
    /// ```no_run
    /// let py = rpyc::python::Client::new(rpyc::Options::new()).connect_stream(std::io::stdin(), std::io::stdout())?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect_stream<R, W>(&self, reader: R, writer: W) -> Result<Connection, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        self.establish(self.options.open_stream(reader, writer)?)
    }
}

/// What a Rust client offers a server that asks for its root: a classic client's methods,
/// refusing (a classic stdio server asks for them at connect time, and exits if they are
/// missing).
fn default_root() -> Service {
    let refuse = |what: &str| {
        PythonError::new(
            "PermissionError",
            (format!("a Rust rpyc client has no Python {what} to give"),),
        )
    };
    Service::new("RustClient")
        .method("getmodule", |name: String| {
            Service::new(&format!("module {name}"))
        })
        .method("eval", move |_code: String| -> Result<(), PythonError> {
            Err(refuse("eval"))
        })
        .method("execute", move |_code: String| -> Result<(), PythonError> {
            Err(refuse("execute"))
        })
        .attribute("namespace", ())
}

/// Connects over TCP with default [`Options`] (`rpyc.connect(host, port)`).
///
/// ```no_run
/// let py = rpyc::python::connect("127.0.0.1", 18861)?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect(host: &str, port: u16) -> Result<Connection, Error> {
    Client::new(Options::new()).connect(host, port)
}

/// Connects over TLS, as RPyC's `ssl_connect`, but verifying the server's certificate and
/// host name against the system's trust store (Python's client verifies nothing by default):
/// for a private CA use [`Client`] with [`Options::tls`] and
/// [`SslClient::ca_certs`](crate::tls::SslClient::ca_certs). Presents `keyfile`/`certfile` when
/// given (servers whose `SSLAuthenticator` has a CA require them).
///
/// ```no_run
/// let py = rpyc::python::ssl_connect("labhost", 12345, Some("client.key"), Some("client.cert"))?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn ssl_connect(
    host: &str,
    port: u16,
    keyfile: Option<&str>,
    certfile: Option<&str>,
) -> Result<Connection, Error> {
    Client::new(Options::new().tls(crate::client::ssl_client(keyfile, certfile)))
        .connect(host, port)
}

/// Connects through SSH, as RPyC's `ssh_connect`: a tunnel to `port` on the SSH server's own
/// localhost, where a Python RPyC server listens.
///
/// ```no_run
/// let ctx = rpyc::SshContext::new("labhost").user("lab").keyfile("/home/me/.ssh/id_ed25519");
/// let py = rpyc::python::ssh_connect(&ctx, 18812)?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[cfg(unix)]
pub fn ssh_connect(ctx: &SshContext, port: u16) -> Result<Connection, Error> {
    Client::new(Options::new().ssh(ctx.clone())).connect("127.0.0.1", port)
}

/// Connects to a Python server on a Unix socket with default [`Options`].
///
/// ```no_run
/// let py = rpyc::python::unix_connect("/tmp/rpyc.sock")?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[cfg(unix)]
pub fn unix_connect(path: impl AsRef<Path>) -> Result<Connection, Error> {
    Client::new(Options::new()).unix_connect(path)
}
