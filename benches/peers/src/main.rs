//! The peers in one run (issue 12): rpyc next to a raw TCP floor, tarpc and Python RPyC 6,
//! all on 127.0.0.1, in one process and one sitting, with the same payloads.
//!
//! * raw: a blocking std TCP ping-pong (4-byte big-endian length + payload, `TCP_NODELAY`,
//!   one server thread per connection), the same floor as `examples/bench.rs`;
//! * rpyc: `rpyc::ThreadedServer` serving `echo(Bytes) -> Bytes`, called through
//!   `rpyc::connect`;
//! * tarpc: a tarpc 0.38 service `echo(Vec<u8>) -> Vec<u8>` over TCP (`TCP_NODELAY`,
//!   length-delimited frames, bincode), server and client on one multi-threaded tokio runtime;
//!   the benchmark thread drives each call with `Runtime::block_on`;
//! * python: Python RPyC 6 on both ends: testdata/python/bench_client.py (Python's own
//!   client, one CALLATTR `echo(payload)` per call) against testdata/python/demo_server.py
//!   (a Python `ThreadedServer`), from `RPYC_TEST_PYTHON`, else `../../target/pyenv/bin/python`.
//!
//! Rows: `call.16B` (sequential calls, µs/call), `async.16B` (pipelined calls, windows of
//! `WINDOW` outstanding calls, calls/s), `echo.1MiB` (bytes out + bytes back, MB/s). For each
//! row, every peer is warmed up, then their batches alternate (in a rotating order) so that
//! drift hits all alike; each figure is the median batch. Ratios are peer / raw floor of the
//! same run, of the shown values (time rows: lower is better; rate rows: higher is better).

use futures::prelude::*;
use rpyc::Bytes;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;
use tarpc::{client, context, serde_transport, server};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HOST: &str = "127.0.0.1";
const MIB: usize = 1 << 20;
/// Outstanding calls per window in `async.16B`.
const WINDOW: usize = 64;
/// Frame limit of the tarpc transports (its default, 8 MiB, would do too).
const TARPC_MAX_FRAME: usize = 16 * MIB;
const COMMAND: &str = "cd benches/peers && cargo run --release";

// The raw floor and the rpyc side: the same code as examples/bench.rs
// (examples/common/raw_floor.rs).
#[path = "../../../examples/common/raw_floor.rs"]
mod raw_floor;

use raw_floor::{frame, raw_server, rpyc_echo, rpyc_server, RawConn, RawPipe};

// ---------------------------------------------------------------------------------------------
// tarpc.

#[tarpc::service]
trait Echo {
    async fn echo(data: Vec<u8>) -> Vec<u8>;
}

#[derive(Clone)]
struct EchoServer;

impl Echo for EchoServer {
    async fn echo(self, _: context::Context, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// Starts the tarpc server on `rt`; returns its port.
fn tarpc_server(rt: &tokio::runtime::Runtime) -> Res<u16> {
    let listener = rt.block_on(tokio::net::TcpListener::bind((HOST, 0)))?;
    let port = listener.local_addr()?.port();
    rt.spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let framed = LengthDelimitedCodec::builder()
                .max_frame_length(TARPC_MAX_FRAME)
                .new_framed(s);
            let transport = serde_transport::new(framed, Bincode::default());
            let channel = server::BaseChannel::with_defaults(transport);
            tokio::spawn(
                server::Channel::execute(channel, EchoServer.serve()).for_each(|f| async {
                    tokio::spawn(f);
                }),
            );
        }
    });
    Ok(port)
}

fn tarpc_client(rt: &tokio::runtime::Runtime, port: u16) -> Res<EchoClient> {
    rt.block_on(async {
        let s = tokio::net::TcpStream::connect((HOST, port)).await?;
        s.set_nodelay(true)?;
        let framed = LengthDelimitedCodec::builder()
            .max_frame_length(TARPC_MAX_FRAME)
            .new_framed(s);
        let transport = serde_transport::new(framed, Bincode::default());
        Ok(EchoClient::new(client::Config::default(), transport).spawn())
    })
}

// ---------------------------------------------------------------------------------------------
// Python RPyC 6 (its own client and server).

#[path = "../../../examples/common/py_child.rs"]
mod py_child;

use py_child::{find_python, PyChild};

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---------------------------------------------------------------------------------------------
// Measurement.

#[derive(Clone, Copy)]
struct Plan {
    batches: usize,
    batch: Duration,
    warmup: Duration,
}

type Op<'a> = Box<dyn FnMut() -> Res<u64> + 'a>;

/// Runs `op` (one iteration, returning the units it processed) for one batch; seconds per unit.
fn batch(plan: &Plan, op: &mut Op) -> Res<f64> {
    let start = Instant::now();
    let mut units = 0u64;
    while units == 0 || start.elapsed() < plan.batch {
        units += op()?;
    }
    Ok(start.elapsed().as_secs_f64() / units as f64)
}

fn warm_up(plan: &Plan, op: &mut Op) -> Res<()> {
    let start = Instant::now();
    while start.elapsed() < plan.warmup {
        op()?;
    }
    Ok(())
}

/// Warms every side up, then runs their batches in turns, rotating which side goes first.
/// Returns the median seconds per unit of each side.
fn measure(plan: Plan, ops: &mut [Op]) -> Res<Vec<f64>> {
    for op in ops.iter_mut() {
        warm_up(&plan, op)?;
    }
    let n = ops.len();
    let mut samples = vec![Vec::new(); n];
    for b in 0..plan.batches {
        for k in 0..n {
            let i = (b + k) % n;
            samples[i].push(batch(&plan, &mut ops[i])?);
        }
    }
    Ok(samples
        .into_iter()
        .map(|mut v| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Reporting.

#[derive(Clone, Copy)]
enum Unit {
    /// µs per call; lower is better.
    Micros,
    /// calls/s; higher is better.
    Rate,
    /// MB/s (10^6 bytes); higher is better.
    MegaBytes,
}

impl Unit {
    fn value(self, secs_per_unit: f64) -> f64 {
        match self {
            Unit::Micros => secs_per_unit * 1e6,
            Unit::Rate => 1.0 / secs_per_unit,
            Unit::MegaBytes => 1.0 / secs_per_unit / 1e6,
        }
    }

    fn show(self, secs_per_unit: f64) -> String {
        let v = self.value(secs_per_unit);
        match self {
            Unit::Micros => format!("{v:.2} µs/call"),
            Unit::Rate => format!("{:.1}k calls/s", v / 1e3),
            Unit::MegaBytes => format!("{v:.0} MB/s"),
        }
    }
}

/// One cell: a median in seconds per unit, or why there is none.
type Cell = Result<f64, String>;

struct Row {
    name: &'static str,
    unit: Unit,
    raw: f64,
    rpyc: Cell,
    tarpc: Cell,
    python: Cell,
}

impl Row {
    fn cell(&self, c: &Cell) -> String {
        match c {
            Ok(s) => format!(
                "{} ({:.2})",
                self.unit.show(*s),
                self.unit.value(*s) / self.unit.value(self.raw)
            ),
            Err(why) => format!("n/a ({why})"),
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------------

fn main() -> Res<()> {
    let started = Instant::now();
    let plan = Plan {
        batches: 11,
        batch: Duration::from_millis(200),
        warmup: Duration::from_millis(150),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let raw_port = raw_server()?;
    // The default frame limit.
    let (rpyc_port, rpyc_handle) = rpyc_server(64 << 20)?;
    let tarpc_port = tarpc_server(&rt)?;

    let python = find_python(&repo_dir());
    let py_label = match &python {
        Ok((path, version)) => {
            println!(
                "python column: Python RPyC {version} on both ends ({}): Python's own client \
                 (testdata/python/bench_client.py, one CALLATTR echo per call) against \
                 testdata/python/demo_server.py",
                path.display()
            );
            format!("Python RPyC {version}")
        }
        Err(why) => {
            println!("python column skipped: no Python with rpyc 6: {why}");
            "Python RPyC".to_string()
        }
    };
    let py_server = match &python {
        Ok((path, _)) => Some(PyChild::server(
            path,
            &repo_dir(),
            &["testdata/python/demo_server.py"],
        )?),
        Err(_) => None,
    };
    let py_skip = |why: &str| -> String {
        match &python {
            Err(_) => "no Python with rpyc 6".to_string(),
            Ok(_) => why.to_string(),
        }
    };

    let conn = rpyc::connect(HOST, rpyc_port)?;
    let tarpc = tarpc_client(&rt, tarpc_port)?;
    let mut raw = RawConn::connect(raw_port)?;
    let mut rows = Vec::new();

    // call.16B and echo.1MiB: sequential round trips; echo counts bytes out + bytes back.
    for (name, size, unit) in [
        ("call.16B", 16, Unit::Micros),
        ("echo.1MiB", MIB, Unit::MegaBytes),
    ] {
        let units_per_call = if size > 16 { 2 * size as u64 } else { 1 };
        let p = Bytes::from((0..size).map(|i| (i * 7 + 1) as u8).collect::<Vec<u8>>());
        let pv: Vec<u8> = p.to_vec();
        let f = frame(&p);
        // Check every peer echoes the payload.
        assert_eq!(raw.call(&f)?, size);
        assert!(
            raw.reply()[..] == pv[..],
            "raw echo returned something else"
        );
        let r: Bytes = conn.root().call("echo", (&p,))?;
        assert!(r == p, "rpyc echo returned something else");
        let r = rt.block_on(tarpc.echo(context::current(), pv.clone()))?;
        assert!(r == pv, "tarpc echo returned something else");

        let mut py = match (&python, &py_server) {
            (Ok((path, _)), Some((_, port))) => {
                Some(PyChild::client(path, &repo_dir(), *port, size)?)
            }
            _ => None,
        };
        // Calls per request to bench_client.py: about a quarter of a batch, so the pipe round
        // trip stays small next to what it times.
        let py_n = match py.as_mut() {
            Some(c) => {
                let start = Instant::now();
                c.calls(20)?;
                let per_call = start.elapsed().as_secs_f64() / 20.0;
                ((plan.batch.as_secs_f64() / 4.0 / per_call) as u64).max(1)
            }
            None => 0,
        };

        let mut ops: Vec<Op> = vec![
            Box::new(|| Ok(black_box(raw.call(&f)?) as u64 * units_per_call / size as u64)),
            Box::new(|| Ok(rpyc_echo(&conn, &p)? as u64 * units_per_call / size as u64)),
            Box::new(|| {
                let r = rt.block_on(tarpc.echo(context::current(), pv.clone()))?;
                Ok(black_box(r).len() as u64 * units_per_call / size as u64)
            }),
        ];
        if let Some(c) = py.as_mut() {
            ops.push(Box::new(move || {
                c.calls(py_n)?;
                Ok(py_n * units_per_call)
            }));
        }
        let m = measure(plan, &mut ops)?;
        drop(ops);
        rows.push(Row {
            name,
            unit,
            raw: m[0],
            rpyc: Ok(m[1]),
            tarpc: Ok(m[2]),
            python: m.get(3).copied().ok_or_else(|| py_skip("no Python client")),
        });
        println!("{name} done ({:.1} s)", started.elapsed().as_secs_f64());
    }

    // async.16B: windows of WINDOW outstanding calls, then all their replies.
    {
        let p = Bytes::from(vec![0xcd; 16]);
        let pv: Vec<u8> = p.to_vec();
        let f = frame(&p);
        let mut pipe = RawPipe::connect(raw_port, WINDOW)?;
        let root = conn.root();
        let mut ops: Vec<Op> = vec![
            Box::new(|| {
                pipe.window(&f, WINDOW)?;
                Ok(WINDOW as u64)
            }),
            Box::new(|| {
                let pending = (0..WINDOW)
                    .map(|_| root.call_async::<Bytes, _>("echo", (&p,)))
                    .collect::<Result<Vec<_>, _>>()?;
                for a in pending {
                    black_box(a.value()?);
                }
                Ok(WINDOW as u64)
            }),
            Box::new(|| {
                // WINDOW concurrent requests on the one client (its dispatch task pipelines
                // them on the connection), awaited together.
                let replies = rt.block_on(future::join_all(
                    (0..WINDOW).map(|_| tarpc.echo(context::current(), pv.clone())),
                ));
                for r in replies {
                    black_box(r?);
                }
                Ok(WINDOW as u64)
            }),
        ];
        let m = measure(plan, &mut ops)?;
        drop(ops);
        rows.push(Row {
            name: "async.16B",
            unit: Unit::Rate,
            raw: m[0],
            rpyc: Ok(m[1]),
            tarpc: Ok(m[2]),
            python: Err(py_skip(
                "bench_client.py makes sequential calls only; rpyc::python has no call_async",
            )),
        });
        println!("async.16B done ({:.1} s)", started.elapsed().as_secs_f64());
    }

    conn.close();
    drop(raw);
    drop(tarpc);
    rpyc_handle.close();
    drop(py_server);

    // Rows in the order of the issue.
    rows.sort_by_key(|r| match r.name {
        "call.16B" => 0,
        "async.16B" => 1,
        _ => 2,
    });
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let nproc = sh("nproc", &[]);
    let kernel = sh("uname", &["-r"]);
    println!();
    println!(
        "Peers on 127.0.0.1, {date}, {nproc} CPUs (nproc), Linux {kernel}, `{COMMAND}`; \
         medians of {} alternating batches of {} ms; (ratio) = peer / raw floor of this run: \
         µs/call lower is better, calls/s and MB/s higher is better; async window {WINDOW}.",
        plan.batches,
        plan.batch.as_millis()
    );
    println!();
    println!("| case | raw TCP floor | rpyc | tarpc 0.38 (bincode) | {py_label} |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.name,
            r.unit.show(r.raw),
            r.cell(&r.rpyc),
            r.cell(&r.tarpc),
            r.cell(&r.python)
        );
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
