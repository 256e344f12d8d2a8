//! N connects (connect, one 16-byte call, close), N sequential 16-byte calls, or N pipelined
//! async calls against an in-process server, for `perf stat` (CPU and context switches per
//! operation, both sides together): `cpu_cost connect|call|async [N]`.

use rpyc::{Bytes, Service, ThreadedServer};
use std::hint::black_box;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WINDOW: usize = 256;

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "connect".into());
    let n: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let service = Service::new("bench").method("echo", |b: Bytes| b);
    let server = ThreadedServer::new(service)
        .hostname("127.0.0.1")
        .port(0)
        .build()?;
    let port = server.port();
    let handle = server.spawn()?;
    let p = Bytes::from(vec![0x42; 16]);
    let start = std::time::Instant::now();
    match what.as_str() {
        "connect" => {
            for _ in 0..n {
                let c = rpyc::connect("127.0.0.1", port)?;
                black_box(c.root().call::<Bytes, _>("echo", (&p,))?);
                c.close();
            }
        }
        "call" => {
            let c = rpyc::connect("127.0.0.1", port)?;
            for _ in 0..n {
                black_box(c.root().call::<Bytes, _>("echo", (&p,))?);
            }
        }
        "async" => {
            let c = rpyc::connect("127.0.0.1", port)?;
            let root = c.root();
            for _ in 0..n.div_ceil(WINDOW) {
                let pending = (0..WINDOW)
                    .map(|_| root.call_async::<Bytes, _>("echo", (&p,)))
                    .collect::<Result<Vec<_>, _>>()?;
                for a in pending {
                    black_box(a.value()?);
                }
            }
        }
        other => return Err(format!("unknown case {other}: connect, call or async").into()),
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    eprintln!("{what}: {n} in {:?}, {per:.2} µs each", start.elapsed());
    handle.close();
    Ok(())
}
