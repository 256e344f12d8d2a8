//! An open connection with nothing to do uses no CPU: no thread polls once activity stops,
//! over plain TCP and over TLS. (Its own test binary, so no other test's threads add CPU time.)

mod common;

use common::procfs::process_cpu;
use rpyc::{Options, Service, ThreadedServer};
use std::time::Duration;

#[test]
fn idle_connections_use_no_cpu() {
    let service = Service::new("idle").method("add", |a: i64, b: i64| a + b);
    let handle = ThreadedServer::new(service)
        .hostname("127.0.0.1")
        .port(0)
        .build()
        .unwrap()
        .spawn()
        .unwrap();
    let pki = common::tls::pki();
    let tls_handle =
        ThreadedServer::new(Service::new("idle").method("add", |a: i64, b: i64| a + b))
            .authenticator(pki.authenticator())
            .build()
            .unwrap()
            .spawn()
            .unwrap();
    let client_service = Service::new("client").method("ping", || "pong");
    let options = Options::new()
        .service(client_service)
        .call_timeout(Duration::from_secs(10));
    let mut conns: Vec<_> = (0..4)
        .map(|_| options.connect("127.0.0.1", handle.port()).unwrap())
        .collect();
    conns.extend((0..4).map(|_| {
        options
            .clone()
            .tls(pki.tls())
            .connect("localhost", tls_handle.port())
            .unwrap()
    }));
    // Activity first: sequential calls, async calls, threads.
    for c in &conns {
        for i in 0..200 {
            assert_eq!(c.root().call::<i64, _>("add", (i, 1)).unwrap(), i + 1);
        }
        let pending: Vec<_> = (0..50)
            .map(|i| c.root().call_async::<i64, _>("add", (i, i)).unwrap())
            .collect();
        for (i, p) in pending.into_iter().enumerate() {
            assert_eq!(p.value().unwrap(), 2 * i as i64);
        }
    }
    // Let watchers notice the quiet (they linger 50 ms).
    std::thread::sleep(Duration::from_millis(300));
    let before = process_cpu();
    std::thread::sleep(Duration::from_secs(1));
    let used = process_cpu() - before;
    // Three clock ticks of 10 ms (/proc counts CPU time in ticks).
    assert!(
        used <= Duration::from_millis(30),
        "8 idle connections, 4 of them TLS (both ends in this process), used {used:?} of CPU \
         in 1 s"
    );
    // And they still work.
    for c in &conns {
        assert_eq!(c.root().call::<i64, _>("add", (2, 2)).unwrap(), 4);
    }
    drop(conns);
    handle.close();
    tls_handle.close();
}
