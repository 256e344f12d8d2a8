//! sshd killed during a call: the waiting call fails promptly, later calls fail fast, and the
//! tunnel's thread ends. (Its own test binary and its own sshd, which it kills.)

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use rpyc::{Error, Service};
use std::thread;
use std::time::{Duration, Instant};

fn tunnel_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.trim() == "rpyc-ssh-tunnel")
                .unwrap_or(false)
        })
        .count()
}

#[test]
fn killing_sshd_fails_the_waiting_call_and_later_calls_fast() {
    let d = sshd::Sshd::start(sshd::SshdConfig::default());
    let server = common::serve(
        Service::new("svc")
            .method("add", |a: i64, b: i64| a + b)
            .method("sleep_ms", |ms: u64| {
                thread::sleep(Duration::from_millis(ms))
            }),
    );
    let conn = common::options()
        .ssh(d.context().clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    assert_eq!(tunnel_threads(), 1);

    let waiting = {
        let conn = conn.clone();
        thread::spawn(move || {
            let r = conn.root().call::<(), _>("sleep_ms", (3000u64,));
            (r, Instant::now())
        })
    };
    thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    d.kill();
    let (r, failed_at) = waiting.join().unwrap();
    let took = failed_at - killed;
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
    assert!(
        took < Duration::from_secs(2),
        "the waiting call failed after {took:?}"
    );

    let t = Instant::now();
    let r = conn.root().call::<i64, _>("add", (1, 2));
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
    // At once: well before the call timeout it would otherwise wait out.
    assert!(t.elapsed() < common::CALL_TIMEOUT / 20, "{:?}", t.elapsed());
    assert!(conn.is_closed());
    assert!(
        common::wait_until(Duration::from_secs(5), || tunnel_threads() == 0),
        "the tunnel thread is still running"
    );

    // A new connection to the dead sshd fails at once too.
    let t = Instant::now();
    let err = rpyc::ssh_connect(&d.context(), server.port).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
}
