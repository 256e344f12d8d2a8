//! An idle tunnel uses no CPU: its thread sleeps in poll(2) until something happens, keepalives
//! included. (Its own test binary, so no other test's work adds CPU time.)

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::procfs::{process_cpu, threads_cpu};
use rpyc::Service;
use std::time::Duration;

#[test]
fn idle_tunnels_use_no_cpu_and_keepalives_keep_them_usable() {
    let d = sshd::shared();
    let server = common::serve(Service::new("svc").method("add", |a: i64, b: i64| a + b));
    let ctx = d.context().keepalive(Duration::from_secs(2));
    let conns: Vec<_> = (0..3)
        .map(|_| {
            common::options()
                .clone()
                .ssh(ctx.clone())
                .connect("127.0.0.1", server.port)
                .unwrap()
        })
        .collect();
    for c in &conns {
        for i in 0..100 {
            assert_eq!(c.root().call::<i64, _>("add", (i, 1)).unwrap(), i + 1);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (tunnel_before, all_before) = (threads_cpu("rpyc-ssh-tunnel"), process_cpu());
    // Long enough for a keepalive round on each session.
    std::thread::sleep(Duration::from_millis(2500));
    let tunnel_used = threads_cpu("rpyc-ssh-tunnel").saturating_sub(tunnel_before);
    let all_used = process_cpu() - all_before;
    // One and four clock ticks of 10 ms (/proc counts CPU time in ticks).
    assert!(
        tunnel_used <= Duration::from_millis(10),
        "3 idle tunnel threads used {tunnel_used:?} of CPU in 2.5 s"
    );
    assert!(
        all_used <= Duration::from_millis(40),
        "the process used {all_used:?} of CPU in 2.5 s"
    );
    for c in &conns {
        assert_eq!(c.root().call::<i64, _>("add", (2, 2)).unwrap(), 4);
    }
}
