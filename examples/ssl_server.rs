//! A TLS server requiring client certificates, as in RPyC's SSL docs:
//! `cargo run --example ssl_server -- server.key server.pem ca.pem [port]`
//! (see README, "Certificates with the openssl command line", to make the files).

use rpyc::{Service, SslAuthenticator, ThreadedServer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [key, cert, ca, rest @ ..] = args.as_slice() else {
        eprintln!("usage: ssl_server KEYFILE CERTFILE CAFILE [PORT]");
        std::process::exit(2);
    };
    let port: u16 = rest.first().map_or(Ok(18821), |p| p.parse())?;

    // The server's key and certificate; with a CA, clients must present a certificate it signed.
    let auth = SslAuthenticator::new(key, cert).ca_certs(ca);
    // Handlers see the verified client certificate and decide per client what they allow.
    let service = Service::new("greeter")
        .method_with_context("hello", |cx: &rpyc::Context| {
            let who = cx
                .peer_certificate()
                .and_then(|c| c.common_name())
                .unwrap_or("stranger");
            format!("hello, {who}")
        })
        .method_with_context("reboot", |cx: &rpyc::Context| {
            let cert = cx.peer_certificate().ok_or("no client certificate")?;
            if cert.common_name() != Some("admin") {
                return Err(format!("{} may not reboot the lab", cert.subject()));
            }
            Ok("rebooting")
        });
    let server = ThreadedServer::new(service)
        .port(port)
        .authenticator(auth)
        .build()?;
    println!("serving TLS on 127.0.0.1:{}", server.port());
    server.start()?;
    Ok(())
}
