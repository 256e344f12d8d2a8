//! Reaches an rpyc server that listens on its machine's localhost only, through SSH.
//!
//! ```text
//! cargo run --example ssh_tunnel -- HOST [USER] [KEYFILE] [PORT]
//! ```
//!
//! On the server's machine, serve on 127.0.0.1 only (e.g. `ThreadedServer::new(svc)
//! .hostname("127.0.0.1").port(12345)`), and authorize the client's public key for USER
//! (`~USER/.ssh/authorized_keys`). On the client, the server's host key must be in
//! `~/.ssh/known_hosts` (connect once with `ssh HOST`, or `ssh-keyscan HOST >> ~/.ssh/known_hosts`
//! after checking the fingerprint). USER and KEYFILE default to what `~/.ssh/config` says for
//! HOST, then to the current user and `~/.ssh/id_*`; the ssh-agent is tried first.
//!
//! Without arguments it starts its own demo server on this machine's localhost and connects to
//! it through `localhost`'s sshd, which works where you can `ssh localhost` without a password.

use rpyc::{Service, SshContext, ThreadedServer};

fn main() {
    env_logger::init();
    if let Err(e) = run() {
        eprintln!("ssh_tunnel: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), rpyc::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let host = args.first().cloned().unwrap_or_else(|| "localhost".into());
    let port: u16 = args.get(3).and_then(|p| p.parse().ok()).unwrap_or(12345);

    // Without a HOST, serve a demo service on localhost only, as the server side would.
    let _server = if args.is_empty() {
        let svc = Service::new("demo").method("add", |a: i64, b: i64| a + b);
        let server = ThreadedServer::new(svc)
            .hostname("127.0.0.1")
            .port(0)
            .build()?;
        let port = server.port();
        Some((server.spawn()?, port))
    } else {
        None
    };
    let port = _server.as_ref().map_or(port, |(_, p)| *p);

    // The snippet from RPyC's docs, in Rust.
    let mut ctx = SshContext::new(host);
    if let Some(user) = args.get(1) {
        ctx = ctx.user(user);
    }
    if let Some(key) = args.get(2) {
        ctx = ctx.keyfile(key);
    }
    let conn = rpyc::ssh_connect(&ctx, port)?;

    let sum: i64 = conn.root().call("add", (1, 2))?;
    println!("add(1, 2) = {sum}, through SSH (local end {})", conn.peer());
    conn.close();
    Ok(())
}
