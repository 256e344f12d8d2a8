//! A TLS client presenting a certificate, as in RPyC's SSL docs:
//! `cargo run --example ssl_client -- localhost 18821 client.key client.pem ca.pem`.
//! Without the CA argument the server is verified against the system's trust store.

use rpyc::tls::SslClient;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [host, port, key, cert, rest @ ..] = args.as_slice() else {
        eprintln!("usage: ssl_client HOST PORT KEYFILE CERTFILE [CAFILE]");
        std::process::exit(2);
    };
    let port: u16 = port.parse()?;
    let conn = match rest.first() {
        // Blocking, returns a ready connection; verifies the server against the system store.
        None => rpyc::ssl_connect(host, port, Some(key), Some(cert))?,
        // The same, trusting only a private CA.
        Some(ca) => rpyc::Options::new()
            .tls(SslClient::new().keyfile(key).certfile(cert).ca_certs(ca))
            .connect(host, port)?,
    };
    println!("{}", conn.root().call::<String, _>("hello", ())?);
    match conn.root().call::<String, _>("reboot", ()) {
        Ok(r) => println!("reboot: {r}"),
        Err(e) => println!("reboot refused: {e}"),
    }
    Ok(())
}
