//! An idle tunnel uses no CPU: its thread sleeps in poll(2) until something happens, keepalives
//! included. (Its own test binary, so no other test's work adds CPU time.)

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use rpyc::Service;
use std::time::Duration;

/// CPU ticks (user + system) used so far by the threads named `name`.
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    total
}

fn process_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

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
    let (tunnel_before, all_before) = (thread_ticks("rpyc-ssh-tunnel"), process_ticks());
    // Long enough for a keepalive round on each session.
    std::thread::sleep(Duration::from_millis(2500));
    let tunnel_used = thread_ticks("rpyc-ssh-tunnel") - tunnel_before;
    let all_used = process_ticks() - all_before;
    assert!(
        tunnel_used <= 1,
        "3 idle tunnel threads used {tunnel_used} ticks of CPU in 2.5 s"
    );
    assert!(all_used <= 4, "the process used {all_used} ticks in 2.5 s");
    for c in &conns {
        assert_eq!(c.root().call::<i64, _>("add", (2, 2)).unwrap(), 4);
    }
}
