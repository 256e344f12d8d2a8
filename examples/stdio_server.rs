//! Serves a small service over this process's stdin/stdout, for `rpyc::connect_subprocess`.
//!
//! The parent talks rpyc on our stdout, so nothing else may be printed there: log to stderr.
//! The process exits when the parent closes the connection (our stdin reaches its end).

use rpyc::{Options, Service};

fn main() -> Result<(), rpyc::Error> {
    env_logger::init();

    let service = Service::new("stdio_server")
        .method("add", |a: i64, b: i64| a + b)
        .method("upper", |s: String| s.to_uppercase())
        .method("pid", std::process::id);

    let conn = Options::new()
        .service(service)
        .connect_stream(std::io::stdin(), std::io::stdout())?;
    conn.wait_closed();
    eprintln!(
        "stdio_server: connection closed ({}), exiting",
        conn.close_reason().unwrap_or_default()
    );
    Ok(())
}
