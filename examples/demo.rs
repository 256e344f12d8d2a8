//! A tour in one process: a server, a client with a callback, a remote object, async calls;
//! then the same server over mutual TLS, with a throwaway CA made in a temporary folder.

use rpyc::testing::TestPki;
use rpyc::tls::SslClient;
use rpyc::{Options, RemoteObject, Service, SslAuthenticator, ThreadedServer};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

fn main() -> Result<(), rpyc::Error> {
    env_logger::init();

    let service = Service::new("calculator")
        .method("add", |a: i64, b: i64| a + b)
        .method("div", |a: f64, b: f64| -> Result<f64, String> {
            if b == 0.0 {
                Err("division by zero".into())
            } else {
                Ok(a / b)
            }
        })
        .method_with_context("whoami", |cx: &rpyc::Context| cx.peer().to_string())
        // A remote object: each call returns a new counter living on the server.
        .method("new_counter", || {
            let n = Arc::new(AtomicI64::new(0));
            Service::new("counter").method("incr", move |by: i64| {
                n.fetch_add(by, Ordering::SeqCst) + by
            })
        })
        // A callback: the server calls the client back, here three times.
        .method(
            "countdown",
            |from: u32, tick: RemoteObject| -> Result<String, rpyc::Error> {
                for i in (1..=from).rev() {
                    tick.invoke::<(), _>((i,))?;
                }
                Ok("liftoff".to_string())
            },
        )
        // The client's own service, reached through the context.
        .method_with_context(
            "ask_client",
            |cx: &rpyc::Context| -> Result<String, rpyc::Error> { cx.peer_root().call("name", ()) },
        );

    let server = ThreadedServer::new(service)
        .hostname("127.0.0.1")
        .port(0)
        .build()?;
    let port = server.port();
    let handle = server.spawn()?;
    println!("server listening on 127.0.0.1:{port}");

    let client_service = Service::new("client").method("name", || "the demo client".to_string());
    let conn = Options::new()
        .service(client_service)
        .connect("127.0.0.1", port)?;
    let root = conn.root();

    println!("add(1, 2) = {}", root.call::<i64, _>("add", (1, 2))?);
    match root.call::<f64, _>("div", (1.0, 0.0)) {
        Err(e) => println!("div(1, 0) failed as it should: {e}"),
        Ok(v) => println!("div(1, 0) = {v}?!"),
    }
    println!(
        "the server sees us as {}",
        root.call::<String, _>("whoami", ())?
    );
    println!(
        "the server asked us our name: {}",
        root.call::<String, _>("ask_client", ())?
    );

    let counter: RemoteObject = root.call("new_counter", ())?;
    counter.call::<i64, _>("incr", (5,))?;
    println!(
        "remote counter = {}",
        counter.call::<i64, _>("incr", (10,))?
    );

    let tick = rpyc::callback(|i: u32| println!("  tick {i}"));
    println!(
        "countdown: {}",
        root.call::<String, _>("countdown", (3u32, tick))?
    );

    let pending: Vec<_> = (0..5)
        .map(|i| root.call_async::<i64, _>("add", (i, i)))
        .collect::<Result<_, _>>()?;
    let doubled: Vec<i64> = pending
        .into_iter()
        .map(|p| p.value())
        .collect::<Result<_, _>>()?;
    println!("five async calls: {doubled:?}");

    conn.close();
    handle.close();

    // Mutual TLS: a throwaway CA (removed at the end) signs the server's and alice's
    // certificates; the server requires client certificates signed by it.
    let pki = TestPki::temp()?;
    let server_files = pki.issue("localhost", &["localhost", "127.0.0.1"])?;
    let alice = pki.issue("alice", &[])?;
    let auth = SslAuthenticator::new(&server_files.key, &server_files.cert).ca_certs(pki.ca_cert());
    let secure = Service::new("secure").method_with_context("whoami", |cx: &rpyc::Context| {
        let cert = cx
            .peer_certificate()
            .expect("client certificates are required");
        cert.common_name().unwrap_or("?").to_string()
    });
    let tls_handle = ThreadedServer::new(secure)
        .authenticator(auth)
        .build()?
        .spawn()?;
    println!(
        "TLS server on 127.0.0.1:{}, CA in {}",
        tls_handle.port(),
        pki.dir().display()
    );
    let tls = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(pki.ca_cert())
                .keyfile(&alice.key)
                .certfile(&alice.cert),
        )
        .connect("localhost", tls_handle.port())?;
    println!(
        "over TLS the server knows us by our certificate: {}",
        tls.root().call::<String, _>("whoami", ())?
    );
    match rpyc::Options::new()
        .tls(SslClient::new().ca_certs(pki.ca_cert()))
        .connect("localhost", tls_handle.port())
    {
        Err(e) => println!("without a client certificate: {e}"),
        Ok(_) => println!("connected without a client certificate?!"),
    }
    tls.close();
    tls_handle.close();
    println!("closed cleanly");
    Ok(())
}
