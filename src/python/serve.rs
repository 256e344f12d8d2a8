//! Serving Python RPyC clients: [`serve`] gives a [`ServerBuilder`] whose connections speak
//! RPyC 6 and expose a [`Service`] as their root.

use crate::base::threads::ThreadSet;
use crate::core::config::Config;
use crate::error::Error;
use crate::python::connect::settings;
use crate::python::connection::{Connection, Shared};
use crate::python::service::Service;
use crate::server::{Protocol, Served, ServerBuilder, Started};
use crate::transport::Transport;
use std::sync::Arc;
use std::time::Duration;

/// A server for Python RPyC 6 clients (`rpyc.connect`, `rpyc.ssl_connect` with an
/// [`SslAuthenticator`](crate::SslAuthenticator), `rpyc.ssh_connect`, `rpyc.unix_connect`),
/// exposing `service` as every connection's root: `conn.root.add(1, 2)` calls its `add`. The
/// builder's settings (address, TLS, limits, timeouts) are those of native servers.
///
/// ```
/// use rpyc::python::{self, Service};
/// let service = Service::new("Calc").method("add", |a: i64, b: i64| a + b);
/// let server = python::serve(service).hostname("127.0.0.1").port(0).build()?.spawn()?;
/// println!("Python: rpyc.connect('127.0.0.1', {}).root.add(1, 2)", server.port());
/// server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn serve(service: Service) -> ServerBuilder {
    ServerBuilder::serving(Arc::new(Python(service)), false)
}

/// RPyC 6 with `Service` as the root.
struct Python(Service);

impl Protocol for Python {
    fn establish(
        &self,
        t: Transport,
        config: &Config,
        threads: Arc<ThreadSet>,
    ) -> Result<Started, Error> {
        let shared = Shared::start(t, settings(config), self.0.clone(), threads)?;
        Ok(Started {
            conn: Arc::new(Connection::owned(shared)),
            then: None,
        })
    }
    fn reads_native_hello(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        format!("Python RPyC: {:?}", self.0)
    }
}

impl Served for Connection {
    fn peer(&self) -> String {
        Connection::peer(self).to_string()
    }
    fn is_closed(&self) -> bool {
        Connection::is_closed(self)
    }
    fn close(&self) {
        // At once, without RPyC's CLOSE (a Python client takes the hang-up as the close).
        self.shared().terminate(Error::Closed {
            reason: "the server closed the connection".into(),
        })
    }
    fn terminate(&self, reason: String) {
        self.shared().terminate(Error::Closed { reason })
    }
    fn idle_for(&self) -> Option<Duration> {
        Some(self.shared().idle_for())
    }
    fn on_ended(&self, closed: Box<dyn FnOnce() + Send>, stopped: Box<dyn FnOnce() + Send>) {
        let shared = Arc::downgrade(self.shared());
        self.shared().on_close(Box::new(move || {
            closed();
            match shared.upgrade() {
                Some(s) => s.when_stopped(stopped),
                None => stopped(),
            }
        }));
    }
}
