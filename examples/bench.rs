//! Measures rpyc on loopback TCP against a raw blocking std TCP floor with the same payloads.
//!
//! Cases: call latency, echo throughput (1 MiB, 64 MiB), pipelined async calls, 8 threads
//! sharing one connection, and connect + first call + close. The `tls.*` cases run over mutual
//! TLS against a raw-TLS floor: the same frames over a blocking OpenSSL `SslStream` with the
//! same settings, keys (RSA 2048, testdata/tls) and client-certificate verification. The
//! `ssh.*` cases run the same server through an SSH tunnel to a throwaway sshd started by the
//! bench, against OpenSSH's own `ssh -L` forward to the same server as the floor (skipped,
//! saying why, without sshd); `ssh.openssh.*` through this crate's OpenSSH transport
//! (`ssh -W`), and `ssh.jump.*` through a second sshd as a jump host against `ssh -J -L`.
//!
//! `tcp.idle10k` opens 10,000 idle connections to a server in a child process and reports its
//! resident memory per connection, and the latency of calls on one more connection beside them
//! against the same calls to a twin server child without them.
//!
//! Run with `cargo run --release --example bench` (about 30 s), or with `BENCH_QUICK=1` for a
//! smoke run of a few seconds; `BENCH_FILTER=echo` runs only the cases whose name contains
//! `echo`. Everything runs in this process on 127.0.0.1.
//!
//! The floor is what a hand-written blocking TCP program with the same shape achieves: frames
//! are a 4-byte big-endian length and the payload, `TCP_NODELAY` is set on both ends, the
//! server has one thread per connection that reads a whole frame (through a 64 KiB
//! `BufReader`, like rpyc, in reads of at most 64 KiB) into a reused buffer and writes it back
//! with one `write_all`; the client writes a whole prebuilt frame, then reads the whole reply.
//! The rpyc side calls `echo(Bytes) -> Bytes` on a `ThreadedServer`.
//!
//! The `py.*` cases compare this crate's RPyC 6 implementation (`rpyc::python`) with Python
//! RPyC 6 itself (the interpreter of `RPYC_TEST_PYTHON`, else `target/pyenv/bin/python`, which
//! `scripts/test.sh` makes; skipped, saying why, without it): `py.call.16B` is the Rust client
//! against Python's own client, both calling `echo` of a Python `ThreadedServer`
//! (testdata/python/demo_server.py); `py.serve.16B` is Python's client calling `echo` of a Rust
//! `python::serve` server against the same client calling the Python server. The Python client
//! is testdata/python/bench_client.py, running batches of calls the bench asks for on its stdin.
//!
//! Each case alternates batches of the floor and of rpyc (so background load hits both alike)
//! and reports the median batch of each; `±` is half the min-max range of the batches, relative
//! to the median.

#[path = "common/py_child.rs"]
mod py_child;
#[path = "common/raw_floor.rs"]
mod raw_floor;
#[path = "../tests/common/sshd.rs"]
mod sshd;

use py_child::{find_python, PyChild};
use raw_floor::{frame, raw_server, rpyc_echo as echo, rpyc_server, RawConn, RawPipe};

use rpyc::{Bytes, Connection, Service, ThreadedServer};
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const HOST: &str = "127.0.0.1";
const MIB: usize = 1 << 20;
/// Outstanding calls per window in the pipelined cases.
const WINDOW: usize = 256;
const THREADS: usize = 8;

// ---------------------------------------------------------------------------------------------
// The raw floor: examples/common/raw_floor.rs.

/// A 64 MiB payload is just over the default frame limit (64 MiB for the whole frame), so
/// both sides of the echo cases raise it.
const MAX_FRAME: usize = 80 * MIB;

/// Client settings of the echo cases.
fn options() -> rpyc::Options {
    rpyc::Options::new().max_frame_size(MAX_FRAME)
}

// ---------------------------------------------------------------------------------------------
// Measurement.

/// How long to measure one case.
#[derive(Clone, Copy)]
struct Plan {
    batches: usize,
    /// A batch runs iterations until this much time has passed...
    batch: Duration,
    /// ...and at least this many (at most `max_iters`).
    min_iters: u64,
    max_iters: u64,
    warmup: Duration,
    min_warmup: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                batches: 3,
                batch: Duration::from_millis(40),
                min_iters: 1,
                max_iters: u64::MAX,
                warmup: Duration::from_millis(20),
                min_warmup: 1,
            }
        } else {
            Plan {
                batches: 11,
                batch: Duration::from_millis(200),
                min_iters: 1,
                max_iters: u64::MAX,
                warmup: Duration::from_millis(150),
                min_warmup: 1,
            }
        }
    }
}

/// Seconds per unit (unit: a call, a byte, a connect), over batches.
struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(mut v: Vec<f64>) -> Stats {
        v.sort_by(|a, b| a.total_cmp(b));
        Stats {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// Half the min-max range, in percent of the median.
    fn spread(&self) -> f64 {
        50.0 * (self.max - self.min) / self.median
    }
}

/// Runs `op` (one iteration, returning how many units it processed) for one batch; returns
/// seconds per unit.
fn batch(plan: &Plan, op: &mut dyn FnMut() -> Res<u64>) -> Res<f64> {
    let start = Instant::now();
    let (mut iters, mut units) = (0u64, 0u64);
    while iters < plan.max_iters && (iters < plan.min_iters || start.elapsed() < plan.batch) {
        units += op()?;
        iters += 1;
    }
    Ok(start.elapsed().as_secs_f64() / units as f64)
}

fn warm_up(plan: &Plan, op: &mut dyn FnMut() -> Res<u64>) -> Res<()> {
    let start = Instant::now();
    let mut iters = 0;
    while iters < plan.min_warmup || start.elapsed() < plan.warmup {
        op()?;
        iters += 1;
    }
    Ok(())
}

/// Warms both sides up, then alternates their batches. Returns (floor, rpyc).
fn measure(
    plan: Plan,
    floor: &mut dyn FnMut() -> Res<u64>,
    rpyc: &mut dyn FnMut() -> Res<u64>,
) -> Res<(Stats, Stats)> {
    warm_up(&plan, floor)?;
    warm_up(&plan, rpyc)?;
    let (mut f, mut r) = (Vec::new(), Vec::new());
    for i in 0..plan.batches {
        // Alternate which side goes first, so neither always runs right after the other.
        if i % 2 == 0 {
            f.push(batch(&plan, floor)?);
            r.push(batch(&plan, rpyc)?);
        } else {
            r.push(batch(&plan, rpyc)?);
            f.push(batch(&plan, floor)?);
        }
    }
    Ok((Stats::of(f), Stats::of(r)))
}

// ---------------------------------------------------------------------------------------------
// Reporting.

#[derive(Clone, Copy)]
enum Unit {
    /// Shown as µs per `what`; lower is better.
    Micros(&'static str),
    /// Shown as `what`/s; higher is better.
    Rate(&'static str),
    /// Bytes, shown as MB/s (10^6); higher is better.
    MegaBytes,
}

struct Row {
    name: &'static str,
    unit: Unit,
    floor: Stats,
    rpyc: Stats,
    /// Extra `key=value` fields shown before the ratio.
    extra: String,
}

impl Row {
    /// The shown value for seconds-per-unit `s`.
    fn value(&self, s: f64) -> f64 {
        match self.unit {
            Unit::Micros(_) => s * 1e6,
            Unit::Rate(_) => 1.0 / s,
            Unit::MegaBytes => 1.0 / s / 1e6,
        }
    }

    /// rpyc / floor of the shown values: time ratio for time rows, rate ratio for rate rows.
    fn ratio(&self) -> f64 {
        self.value(self.rpyc.median) / self.value(self.floor.median)
    }

    fn show(&self, s: f64) -> String {
        let v = self.value(s);
        match self.unit {
            Unit::Micros(what) => format!("{v:.2} µs/{what}"),
            Unit::Rate(what) if v >= 1e4 => format!("{:.1}k {what}/s", v / 1e3),
            Unit::Rate(what) => format!("{v:.0} {what}/s"),
            Unit::MegaBytes => format!("{v:.0} MB/s"),
        }
    }

    fn line(&self) -> String {
        format!(
            "{:<17} rpyc={:>17} (±{:>4.1}%)  floor={:>17} (±{:>4.1}%)  {}ratio={:.2}",
            self.name,
            self.show(self.rpyc.median),
            self.rpyc.spread(),
            self.show(self.floor.median),
            self.floor.spread(),
            self.extra,
            self.ratio()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Cases.

fn main() -> Res<()> {
    env_logger::init();
    if let Ok(n) = std::env::var(IDLE_SERVER) {
        return idle_server(n.parse()?);
    }
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let plan = Plan::new(quick);
    // BENCH_FILTER=substring runs only the cases whose name contains it.
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let wanted = |name: &str| name.contains(filter.as_str());
    let started = Instant::now();

    let raw_port = raw_server()?;
    let (rpyc_port, server) = rpyc_server(MAX_FRAME)?;

    println!(
        "rpyc bench on {HOST} ({} mode, {} batches per side, {} CPUs). ratio = rpyc/floor: \
         time rows (µs) lower is better, rate rows (MB/s, calls/s) higher is better; \
         targets: tcp.call.16B <= 1.25, tcp.echo.* and tls.echo.* >= 0.85, tcp.async.16B \
         >= 0.85, tcp.threads8.16B >= 0.75, tcp.connect <= 1.5; tcp.idle10k: floor = a twin \
         server without the idle connections, targets 10k_rss within 1 GiB, ratio near 1.0; \
         ssh.* rows: floor = OpenSSH's \
         `ssh -L` to the same server, targets ssh.call.16B <= 1.2, ssh.echo.64MiB >= 0.8, \
         ssh.openssh.echo.64MiB near 1.0; ssh.jump.call.16B: floor = `ssh -J` with `-L`; \
         py.* rows: floor = Python RPyC 6 (py.call: its client, py.serve: its server).",
        if quick { "quick" } else { "full" },
        plan.batches,
        thread::available_parallelism().map_or(0, |n| n.get()),
    );

    let mut rows = Vec::new();
    let mut emit = |row: Row| {
        println!("{}", row.line());
        rows.push(row);
    };

    let conn = options().connect(HOST, rpyc_port)?;
    let mut raw = RawConn::connect(raw_port)?;

    // tcp.call.16B: sequential round trips.
    if wanted("tcp.call.16B") {
        let p = Bytes::from(vec![0xab; 16]);
        let f = frame(&p);
        assert_eq!(raw.call(&f)?, 16);
        let r: Bytes = conn.root().call("echo", (&p,))?;
        assert_eq!(r, p, "echo returned something else");
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                black_box(raw.call(&f)?);
                Ok(1)
            },
            &mut || {
                echo(&conn, &p)?;
                Ok(1)
            },
        )?;
        emit(Row {
            name: "tcp.call.16B",
            unit: Unit::Micros("call"),
            floor,
            rpyc,
            extra: String::new(),
        });
    }

    // tcp.echo.1MiB and tcp.echo.64MiB: one whole payload out, the whole payload back.
    // Throughput counts the bytes sent plus the bytes received.
    let mut one_mib = None;
    for (name, size) in [("tcp.echo.1MiB", MIB), ("tcp.echo.64MiB", 64 * MIB)] {
        if !wanted(name) {
            continue;
        }
        let p = Bytes::from((0..size).map(|i| (i * 7 + 1) as u8).collect::<Vec<u8>>());
        let f = frame(&p);
        assert_eq!(raw.call(&f)?, size);
        assert_eq!(raw.reply()[..], p[..], "raw echo returned something else");
        let r: Bytes = conn.root().call("echo", (&p,))?;
        assert!(r == p, "echo returned something else");
        drop(r);
        let mut plan = plan;
        if size > MIB {
            plan.warmup = Duration::ZERO;
        }
        let (floor, rpyc) = measure(
            plan,
            &mut || Ok(black_box(raw.call(&f)?) as u64 * 2),
            &mut || Ok(echo(&conn, &p)? as u64 * 2),
        )?;
        let mut extra = String::new();
        match one_mib {
            None => one_mib = Some((floor.median, rpyc.median)),
            Some((floor1, rpyc1)) => {
                // Seconds per byte are already normalized by size, so this is
                // time(64 MiB) / (64 * time(1 MiB)).
                extra = format!(
                    "floor_scale={:.2} scale={:.2}  ",
                    floor.median / floor1,
                    rpyc.median / rpyc1
                );
            }
        }
        emit(Row {
            name,
            unit: Unit::MegaBytes,
            floor,
            rpyc,
            extra,
        });
    }

    // tcp.async.16B: windows of WINDOW outstanding calls, then collect them.
    if wanted("tcp.async.16B") {
        let p = Bytes::from(vec![0xcd; 16]);
        let f = frame(&p);
        let mut pipe = RawPipe::connect(raw_port, WINDOW)?;
        let root = conn.root();
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                pipe.window(&f, WINDOW)?;
                Ok(WINDOW as u64)
            },
            &mut || {
                let pending = (0..WINDOW)
                    .map(|_| root.call_async::<Bytes, _>("echo", (&p,)))
                    .collect::<Result<Vec<_>, _>>()?;
                for a in pending {
                    black_box(a.value()?);
                }
                Ok(WINDOW as u64)
            },
        )?;
        emit(Row {
            name: "tcp.async.16B",
            unit: Unit::Rate("calls"),
            floor,
            rpyc,
            extra: String::new(),
        });
    }

    // tcp.threads8.16B: 8 threads doing sequential calls, on one shared rpyc connection vs
    // 8 raw connections.
    if wanted("tcp.threads8.16B") {
        let p = Bytes::from(vec![0xef; 16]);
        let f = frame(&p);
        let mut raws = (0..THREADS)
            .map(|_| RawConn::connect(raw_port))
            .collect::<io::Result<Vec<_>>>()?;
        let per_thread: u64 = if quick { 50 } else { 250 };
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                thread::scope(|s| {
                    let workers: Vec<_> = raws
                        .iter_mut()
                        .map(|c| {
                            let f = &f;
                            s.spawn(move || -> io::Result<()> {
                                for _ in 0..per_thread {
                                    black_box(c.call(f)?);
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    for w in workers {
                        w.join().expect("raw thread panicked")?;
                    }
                    Ok::<_, io::Error>(())
                })?;
                Ok(per_thread * THREADS as u64)
            },
            &mut || {
                thread::scope(|s| {
                    let workers: Vec<_> = (0..THREADS)
                        .map(|_| {
                            let (conn, p) = (&conn, &p);
                            s.spawn(move || -> Res<()> {
                                let root = conn.root();
                                for _ in 0..per_thread {
                                    let r: Bytes = root.call("echo", (p,))?;
                                    black_box(r);
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    for w in workers {
                        w.join().expect("rpyc thread panicked")?;
                    }
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                })?;
                Ok(per_thread * THREADS as u64)
            },
        )?;
        emit(Row {
            name: "tcp.threads8.16B",
            unit: Unit::Rate("calls"),
            floor,
            rpyc,
            extra: String::new(),
        });
    }

    // tcp.connect: connect, one 16-byte call, close. Bounded in count so that sockets in
    // TIME_WAIT do not pile up.
    if wanted("tcp.connect") {
        let p = Bytes::from(vec![0x42; 16]);
        let f = frame(&p);
        let mut plan = plan;
        plan.max_iters = if quick { 100 } else { 300 };
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                let mut c = RawConn::connect(raw_port)?;
                black_box(c.call(&f)?);
                drop(c);
                Ok(1)
            },
            &mut || {
                let c = rpyc::connect(HOST, rpyc_port)?;
                echo(&c, &p)?;
                c.close();
                Ok(1)
            },
        )?;
        emit(Row {
            name: "tcp.connect",
            unit: Unit::Micros("connect"),
            floor,
            rpyc,
            extra: String::new(),
        });
    }

    // tcp.idle10k: what 10,000 idle connections cost a server, and a call beside them.
    if wanted("tcp.idle10k") {
        match idle_row(plan, quick)? {
            Ok(row) => emit(row),
            Err(why) => println!("{:<17} skipped: {why}", "tcp.idle10k"),
        }
    }

    tls_cases(plan, quick, &wanted, &mut emit)?;

    for row in ssh_rows(plan, quick, &wanted, rpyc_port)? {
        emit(row);
    }

    for row in py_rows(plan, &wanted)? {
        emit(row);
    }

    conn.close();
    drop(raw);
    server.close();

    println!();
    println!("| case | rpyc | floor | ratio |");
    println!("|---|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} |",
            r.name,
            r.show(r.rpyc.median),
            r.show(r.floor.median),
            r.ratio()
        );
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// tcp.idle10k: a server in a child process (this binary, run again with IDLE_SERVER set), so
// that its resident memory can be read from /proc; the idle clients are raw sockets that
// complete the native handshake by hand (no client threads), held by this process.

/// Set in the child's environment to the number of connections it must accept.
const IDLE_SERVER: &str = "RPYC_BENCH_IDLE_SERVER";

/// The child: an rpyc `ThreadedServer` serving `echo`, admitting `n` connections plus a few,
/// never evicting idle ones; says `port N` on stdout, then serves until its stdin closes.
fn idle_server(n: usize) -> Res<()> {
    let service = Service::new("bench").method("echo", |b: Bytes| b);
    let server = ThreadedServer::new(service)
        .hostname(HOST)
        .port(0)
        .max_connections(n + 16)
        // A handshake counts until the connection is set up, a little after the client has
        // the server's hello: room for the batches of `idle_connections` to overlap.
        .max_handshakes(256)
        .evict_idle_after(Duration::MAX)
        .build()?;
    println!("port {}", server.port());
    io::stdout().flush()?;
    let handle = server.spawn()?;
    let mut rest = Vec::new();
    let _ = io::stdin().read_to_end(&mut rest);
    handle.close();
    Ok(())
}

/// The child server of `tcp.idle10k`; killed when dropped.
struct IdleServer {
    child: std::process::Child,
    port: u16,
}

impl IdleServer {
    fn start(n: usize) -> Res<IdleServer> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .env(IDLE_SERVER, n.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut out = io::BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        io::BufRead::read_line(&mut out, &mut line)?;
        let port = match line.trim().strip_prefix("port ").map(str::parse) {
            Some(Ok(p)) => p,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the idle server child said {line:?}").into());
            }
        };
        Ok(IdleServer { child, port })
    }

    /// Resident memory of the child, in bytes.
    fn rss(&self) -> Res<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or("no VmRSS in /proc/PID/status")?;
        Ok(kib * 1024)
    }

    /// The child's thread count.
    fn threads(&self) -> Res<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "no Threads in /proc/PID/status".into())
    }
}

impl Drop for IdleServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's soft limit on open files to `want` (at most the hard limit); returns
/// the hard limit.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
fn raise_nofile(want: u64) -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let hard = r.rlim_max as u64;
    if (r.rlim_cur as u64) < want.min(hard) {
        r.rlim_cur = want.min(hard) as libc::rlim_t;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(hard)
}

/// Opens `n` connections to `port` that complete rpyc's native handshake (both sides send their
/// 16-byte hello first) and then stay silent, in batches that stay under the listen
/// backlog.
fn idle_connections(port: u16, n: usize) -> Res<Vec<TcpStream>> {
    // Magic, version 1, no flags, 64 MiB frames, 65,536 queued requests.
    let mut hello = [0u8; 16];
    hello[..4].copy_from_slice(b"RPYC");
    hello[4..6].copy_from_slice(&1u16.to_be_bytes());
    hello[8..12].copy_from_slice(&(64u32 << 20).to_be_bytes());
    hello[12..16].copy_from_slice(&65_536u32.to_be_bytes());
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch = (n - all.len()).min(48);
        let mut fresh = Vec::with_capacity(batch);
        for _ in 0..batch {
            let mut s = TcpStream::connect((HOST, port))?;
            s.write_all(&hello)?;
            fresh.push(s);
        }
        for mut s in fresh {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut theirs = [0u8; 16];
            s.read_exact(&mut theirs)?;
            if theirs[..4] != *b"RPYC" || theirs[6..8] != [0, 0] {
                return Err(format!("the server refused connection {}", all.len()).into());
            }
            all.push(s);
        }
    }
    Ok(all)
}

/// `tcp.idle10k`: resident memory per idle connection of a server holding 10,000 of them
/// (1,000 with `BENCH_QUICK`), and the latency of 16-byte `echo` calls on one more connection
/// beside them. The floor of this row is not a raw socket but the same calls to a second,
/// identical server child without idle connections, batches alternating with the first: the
/// question is whether idle connections slow a busy one down, and only a twin measured in the
/// same moments answers it on a noisy machine. `Err` (outer) is a failure; `Ok(Err)` says why
/// the row is skipped.
fn idle_row(plan: Plan, quick: bool) -> Res<Result<Row, String>> {
    let n: usize = if quick { 1_000 } else { 10_000 };
    // This process holds n client sockets, the child n server sockets, plus a few of each.
    let need = n as u64 + 256;
    let hard = match raise_nofile(need) {
        Ok(h) => h,
        Err(e) => return Ok(Err(format!("cannot raise the limit on open files: {e}"))),
    };
    if hard < need {
        return Ok(Err(format!(
            "needs {need} open files in this process and in the server, the hard limit is \
             {hard} (raise `ulimit -Hn`)"
        )));
    }
    let (server, twin) = (IdleServer::start(n)?, IdleServer::start(n)?);
    let (conn, twin_conn) = (
        rpyc::connect(HOST, server.port)?,
        rpyc::connect(HOST, twin.port)?,
    );
    let p = Bytes::from(vec![0x11; 16]);
    echo(&conn, &p)?;
    echo(&twin_conn, &p)?;
    let threads_before = server.threads()?;
    let rss_before = server.rss()?;
    let opened = Instant::now();
    let idle = idle_connections(server.port, n)?;
    let open_time = opened.elapsed();
    // Each connection's reading thread starts once its handshake is done: wait until all run.
    let settle = Instant::now() + Duration::from_secs(10);
    while server.threads()? < threads_before + n as u64 && Instant::now() < settle {
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(200));
    let rss_idle = server.rss()?;
    let threads_idle = server.threads()?;
    let (floor, rpyc) = measure(
        plan,
        &mut || Ok(echo(&twin_conn, &p)? as u64 / 16),
        &mut || Ok(echo(&conn, &p)? as u64 / 16),
    )?;
    drop(idle);
    conn.close();
    twin_conn.close();

    let grew = rss_idle.saturating_sub(rss_before);
    let per_conn = grew as f64 / n as f64;
    let for_10k = per_conn * 10_000.0 + rss_before as f64;
    Ok(Ok(Row {
        name: "tcp.idle10k",
        unit: Unit::Micros("call"),
        floor,
        rpyc,
        extra: format!(
            "idle={n} rss=+{:.1}MiB ({:.1} KiB/conn, {:.2} threads/conn, opened in {:.1}s) \
             10k_rss={:.0}MiB ({} 1 GiB)  ",
            grew as f64 / MIB as f64,
            per_conn / 1024.0,
            threads_idle.saturating_sub(threads_before) as f64 / n as f64,
            open_time.as_secs_f64(),
            for_10k / MIB as f64,
            if for_10k <= (1u64 << 30) as f64 {
                "within"
            } else {
                "over"
            },
        ),
    }))
}

// ---------------------------------------------------------------------------------------------
// SSH: rpyc through this crate's libssh2 tunnel vs rpyc through OpenSSH's `ssh -L`.

/// `ssh -L` running in the background; killed when dropped.
struct SshForward(std::process::Child);

impl Drop for SshForward {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ssh -N -L` from a free local port to `127.0.0.1:target` through `d`; returns the
/// process and the local port once it accepts connections.
fn ssh_dash_l(d: &sshd::Sshd, target: u16) -> Res<(SshForward, u16)> {
    let local = TcpListener::bind((HOST, 0))?.local_addr()?.port();
    let child = std::process::Command::new("ssh")
        .args([
            "-N",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", d.known_hosts.display()))
        .arg("-i")
        .arg(&d.client_key)
        .args(["-p", &d.port.to_string(), "-l", &d.user])
        .arg("-L")
        .arg(format!("{local}:127.0.0.1:{target}"))
        .arg(HOST)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let fwd = wait_forward(SshForward(child), local)?;
    Ok((fwd, local))
}

/// Waits (10 s at most) until the `ssh -L` in `fwd` accepts connections on `local`.
fn wait_forward(mut fwd: SshForward, local: u16) -> Res<SshForward> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect((HOST, local)).is_ok() {
            return Ok(fwd);
        }
        if let Some(status) = fwd.0.try_wait()? {
            return Err(format!("ssh -L exited: {status}").into());
        }
        if Instant::now() > deadline {
            return Err("ssh -L did not open its port in 10 s".into());
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Median seconds per unit of `op` alone (for the `direct=` column).
fn measure_one(plan: Plan, op: &mut dyn FnMut() -> Res<u64>) -> Res<Stats> {
    warm_up(&plan, op)?;
    let v = (0..plan.batches)
        .map(|_| batch(&plan, op))
        .collect::<Res<Vec<f64>>>()?;
    Ok(Stats::of(v))
}

fn ssh_rows(plan: Plan, quick: bool, wanted: &dyn Fn(&str) -> bool, port: u16) -> Res<Vec<Row>> {
    let names = [
        "ssh.call.16B",
        "ssh.echo.64MiB",
        "ssh.connect",
        "ssh.jump.call.16B",
        "ssh.openssh.echo.64MiB",
    ];
    if !names.iter().any(|n| wanted(n)) {
        return Ok(Vec::new());
    }
    let missing: Vec<&str> = [sshd::SSHD, "/usr/bin/ssh", "/usr/bin/ssh-keygen"]
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        println!(
            "ssh.* rows skipped: {} missing (apt-get install -y openssh-server)",
            missing.join(", ")
        );
        return Ok(Vec::new());
    }
    let d = sshd::Sshd::start(sshd::SshdConfig::default());
    let (_fwd, fwd_port) = ssh_dash_l(&d, port)?;
    let via_ssh_l = options().connect(HOST, fwd_port)?;
    let via_tunnel = options()
        .clone()
        .ssh(d.context().clone())
        .connect("127.0.0.1", port)?;
    let direct = options().connect(HOST, port)?;
    let mut rows = Vec::new();
    let show_direct = |unit: Unit, s: &Stats| {
        let r = Row {
            name: "",
            unit,
            floor: Stats::of(vec![s.median]),
            rpyc: Stats::of(vec![s.median]),
            extra: String::new(),
        };
        format!("direct={}  ", r.show(s.median))
    };

    if wanted("ssh.call.16B") {
        let p = Bytes::from(vec![0xab; 16]);
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                echo(&via_ssh_l, &p)?;
                Ok(1)
            },
            &mut || {
                echo(&via_tunnel, &p)?;
                Ok(1)
            },
        )?;
        let dir = measure_one(plan, &mut || {
            echo(&direct, &p)?;
            Ok(1)
        })?;
        rows.push(Row {
            name: "ssh.call.16B",
            unit: Unit::Micros("call"),
            floor,
            rpyc,
            extra: show_direct(Unit::Micros("call"), &dir),
        });
    }

    // Both 64 MiB echo rows: through `conn` against `ssh -L`, after one checked echo.
    let echo_64mib = |conn: &Connection, seed: usize| -> Res<(Stats, Stats, Bytes, Plan)> {
        let p = Bytes::from(
            (0..64 * MIB)
                .map(|i| (i * seed + 1) as u8)
                .collect::<Vec<u8>>(),
        );
        let r: Bytes = conn.root().call("echo", (&p,))?;
        assert!(r == p, "echo through SSH returned something else");
        drop(r);
        let mut plan = plan;
        plan.warmup = Duration::ZERO;
        if !quick {
            plan.batches = 7;
        }
        let (floor, rpyc) = measure(
            plan,
            &mut || Ok(echo(&via_ssh_l, &p)? as u64 * 2),
            &mut || Ok(echo(conn, &p)? as u64 * 2),
        )?;
        Ok((floor, rpyc, p, plan))
    };

    if wanted("ssh.echo.64MiB") {
        let (floor, rpyc, p, plan) = echo_64mib(&via_tunnel, 7)?;
        let dir = measure_one(plan, &mut || Ok(echo(&direct, &p)? as u64 * 2))?;
        rows.push(Row {
            name: "ssh.echo.64MiB",
            unit: Unit::MegaBytes,
            floor,
            rpyc,
            extra: show_direct(Unit::MegaBytes, &dir),
        });
    }

    // ssh.connect: SSH session + tunnel + first call + close, against `ssh -L` started, first
    // call through it, stopped.
    if wanted("ssh.connect") {
        let p = Bytes::from(vec![0x42; 16]);
        let ctx = d.context();
        let mut plan = plan;
        plan.max_iters = if quick { 3 } else { 10 };
        plan.warmup = Duration::ZERO;
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                let (fwd, lp) = ssh_dash_l(&d, port)?;
                let c = rpyc::connect(HOST, lp)?;
                echo(&c, &p)?;
                c.close();
                drop(fwd);
                Ok(1)
            },
            &mut || {
                let c = rpyc::ssh_connect(&ctx, port)?;
                echo(&c, &p)?;
                c.close();
                Ok(1)
            },
        )?;
        let dir = measure_one(plan, &mut || {
            let c = rpyc::connect(HOST, port)?;
            echo(&c, &p)?;
            c.close();
            Ok(1)
        })?;
        rows.push(Row {
            name: "ssh.connect",
            unit: Unit::Micros("connect"),
            floor,
            rpyc,
            extra: show_direct(Unit::Micros("connect"), &dir),
        });
    }
    // ssh.openssh.echo.64MiB: this crate's OpenSSH transport (`ssh -W`), against `ssh -L`.
    if wanted("ssh.openssh.echo.64MiB") {
        let via_openssh = options()
            .clone()
            .ssh(d.context().use_openssh(true))
            .connect("127.0.0.1", port)?;
        let (floor, rpyc, _, _) = echo_64mib(&via_openssh, 5)?;
        rows.push(Row {
            name: "ssh.openssh.echo.64MiB",
            unit: Unit::MegaBytes,
            floor,
            rpyc,
            extra: String::new(),
        });
        via_openssh.close();
    }

    // ssh.jump.call.16B: through one jump host (a second sshd), against `ssh -J` with `-L`.
    if wanted("ssh.jump.call.16B") {
        let jump = sshd::Sshd::start(sshd::SshdConfig::default());
        // The target's key logs in to the jump host too; one known_hosts trusts both.
        let mut keys = std::fs::OpenOptions::new()
            .append(true)
            .open(jump.path("authorized_keys"))?;
        use std::io::Write as _;
        writeln!(keys, "{}", sshd::read_pub(&d.client_key))?;
        let known = jump.path("known_hosts_both");
        std::fs::write(
            &known,
            format!(
                "[127.0.0.1]:{} {}\n[127.0.0.1]:{} {}\n",
                jump.port, jump.host_key_ed25519, d.port, d.host_key_ed25519
            ),
        )?;
        let hop = format!("{}@127.0.0.1:{}", jump.user, jump.port);
        let via_jump = options()
            .clone()
            .ssh(d.context().known_hosts(&known).proxy_jump(hop.clone()))
            .connect("127.0.0.1", port)?;
        // `ssh -J` starts a second ssh for the hop, which reads only the configuration file:
        // the settings go there.
        let config = jump.path("ssh_config_bench");
        std::fs::write(
            &config,
            format!(
                "Host *\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {}\n  \
                 UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n",
                d.client_key.display(),
                known.display()
            ),
        )?;
        let local = TcpListener::bind((HOST, 0))?.local_addr()?.port();
        let child = std::process::Command::new("ssh")
            .arg("-N")
            .arg("-F")
            .arg(&config)
            .args(["-o", "ExitOnForwardFailure=yes", "-J", &hop])
            .args(["-p", &d.port.to_string(), "-l", &d.user])
            .arg("-L")
            .arg(format!("{local}:127.0.0.1:{port}"))
            .arg(HOST)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let fwd = wait_forward(SshForward(child), local)?;
        let via_ssh_j = options().connect(HOST, local)?;
        let p = Bytes::from(vec![0xcd; 16]);
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                echo(&via_ssh_j, &p)?;
                Ok(1)
            },
            &mut || {
                echo(&via_jump, &p)?;
                Ok(1)
            },
        )?;
        rows.push(Row {
            name: "ssh.jump.call.16B",
            unit: Unit::Micros("call"),
            floor,
            rpyc,
            extra: String::new(),
        });
        via_jump.close();
        via_ssh_j.close();
        drop(fwd);
    }
    via_tunnel.close();
    via_ssh_l.close();
    direct.close();
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// TLS: rpyc over SslAuthenticator / SslClient against raw blocking OpenSSL streams.

fn tls_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/tls")
        .join(name)
}

/// The raw floor's acceptor: the same settings SslAuthenticator uses (Mozilla intermediate,
/// TLS 1.2+, client certificates required and verified against the CA, no session tickets).
fn raw_tls_acceptor() -> Res<openssl::ssl::SslAcceptor> {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    b.set_private_key_file(tls_file("server-rsa2048.key"), SslFiletype::PEM)?;
    b.set_certificate_chain_file(tls_file("server-rsa2048.pem"))?;
    b.set_ca_file(tls_file("ca.pem"))?;
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    b.set_session_id_context(b"bench")?;
    // Like SslAuthenticator: no TLS 1.3 session tickets (nobody resumes sessions here).
    b.set_num_tickets(0)?;
    Ok(b.build())
}

fn raw_tls_connector() -> Res<openssl::ssl::SslConnector> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod};
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.set_ca_file(tls_file("ca.pem"))?;
    b.set_private_key_file(tls_file("client-rsa.key"), SslFiletype::PEM)?;
    b.set_certificate_chain_file(tls_file("client-rsa.pem"))?;
    Ok(b.build())
}

/// A raw TLS echo server: a thread per connection, whole frame in, whole frame out.
fn raw_tls_server() -> Res<u16> {
    let acceptor = raw_tls_acceptor()?;
    let listener = TcpListener::bind((HOST, 0))?;
    let port = listener.local_addr()?.port();
    thread::Builder::new()
        .name("raw-tls-accept".into())
        .spawn(move || {
            for s in listener.incoming().flatten() {
                let acceptor = acceptor.clone();
                let _ =
                    thread::Builder::new()
                        .name("raw-tls-conn".into())
                        .spawn(move || -> Res<()> {
                            s.set_nodelay(true)?;
                            let mut s = acceptor.accept(s).map_err(|e| e.to_string())?;
                            let mut buf = Vec::new();
                            loop {
                                let mut len = [0u8; 4];
                                if s.read_exact(&mut len).is_err() {
                                    return Ok(());
                                }
                                let n = u32::from_be_bytes(len) as usize;
                                buf.resize(4 + n, 0);
                                buf[..4].copy_from_slice(&len);
                                s.read_exact(&mut buf[4..])?;
                                s.write_all(&buf)?;
                            }
                        });
            }
        })?;
    Ok(port)
}

/// A raw TLS client connection.
struct RawTls {
    s: openssl::ssl::SslStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawTls {
    fn connect(c: &openssl::ssl::SslConnector, port: u16) -> Res<RawTls> {
        let tcp = TcpStream::connect((HOST, port))?;
        tcp.set_nodelay(true)?;
        let s = c.connect("localhost", tcp).map_err(|e| e.to_string())?;
        Ok(RawTls { s, buf: Vec::new() })
    }

    fn call(&mut self, frame: &[u8]) -> Res<usize> {
        self.s.write_all(frame)?;
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        self.buf.resize(n, 0);
        self.s.read_exact(&mut self.buf)?;
        Ok(n)
    }
}

fn tls_cases(
    plan: Plan,
    quick: bool,
    wanted: &dyn Fn(&str) -> bool,
    emit: &mut dyn FnMut(Row),
) -> Res<()> {
    if ![
        "tls.call.16B",
        "tls.echo.1MiB",
        "tls.echo.64MiB",
        "tls.connect",
    ]
    .iter()
    .any(|n| wanted(n))
    {
        return Ok(());
    }
    let raw_port = raw_tls_server()?;
    let connector = raw_tls_connector()?;
    let auth = rpyc::SslAuthenticator::new(
        tls_file("server-rsa2048.key"),
        tls_file("server-rsa2048.pem"),
    )
    .ca_certs(tls_file("ca.pem"));
    let server = ThreadedServer::new(Service::new("bench").method("echo", |b: Bytes| b))
        .hostname(HOST)
        .port(0)
        .max_frame_size(MAX_FRAME)
        .authenticator(auth)
        .build()?
        .spawn()?;
    let client = options().tls(
        rpyc::tls::SslClient::new()
            .ca_certs(tls_file("ca.pem"))
            .keyfile(tls_file("client-rsa.key"))
            .certfile(tls_file("client-rsa.pem")),
    );
    let conn = client.connect("localhost", server.port())?;
    let mut raw = RawTls::connect(&connector, raw_port)?;

    for (name, size) in [
        ("tls.call.16B", 16),
        ("tls.echo.1MiB", MIB),
        ("tls.echo.64MiB", 64 * MIB),
    ] {
        if !wanted(name) {
            continue;
        }
        let p = Bytes::from((0..size).map(|i| (i * 5 + 3) as u8).collect::<Vec<u8>>());
        let f = frame(&p);
        assert_eq!(raw.call(&f)?, size);
        assert!(raw.buf[..] == p[..], "raw TLS echo returned something else");
        let r: Bytes = conn.root().call("echo", (&p,))?;
        assert!(r == p, "echo returned something else");
        let per = if size == 16 { 1 } else { 2 * size as u64 };
        let mut plan = plan;
        if size > MIB {
            plan.warmup = Duration::ZERO;
        }
        let (floor, rpyc) = measure(
            plan,
            &mut || Ok(black_box(raw.call(&f)?) as u64 / size as u64 * per),
            &mut || Ok(echo(&conn, &p)? as u64 / size as u64 * per),
        )?;
        emit(Row {
            name,
            unit: if size == 16 {
                Unit::Micros("call")
            } else {
                Unit::MegaBytes
            },
            floor,
            rpyc,
            extra: String::new(),
        });
    }

    // tls.connect: TCP connect + mutual TLS handshake + one 16-byte round trip + close.
    if wanted("tls.connect") {
        let p = Bytes::from(vec![0x42; 16]);
        let f = frame(&p);
        let mut plan = plan;
        plan.max_iters = if quick { 20 } else { 60 };
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                let mut c = RawTls::connect(&connector, raw_port)?;
                black_box(c.call(&f)?);
                Ok(1)
            },
            &mut || {
                let c = client.connect("localhost", server.port())?;
                echo(&c, &p)?;
                c.close();
                Ok(1)
            },
        )?;
        emit(Row {
            name: "tls.connect",
            unit: Unit::Micros("connect"),
            floor,
            rpyc,
            extra: String::new(),
        });
    }
    conn.close();
    server.close();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Python RPyC 6: rpyc::python against Python's own client and server.

/// The repository: where `testdata/python` and `target/pyenv` are.
fn repo() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Calls per Python batch request: about a quarter of a measured batch, so that the pipe round
/// trip to bench_client.py (tens of µs) stays under a percent of what it times.
fn py_calls_per_op(plan: &Plan, per_call: f64) -> u64 {
    ((plan.batch.as_secs_f64() / 4.0 / per_call) as u64).max(20)
}

fn py_rows(plan: Plan, wanted: &dyn Fn(&str) -> bool) -> Res<Vec<Row>> {
    use rpyc::python::{self, Value};
    let names = ["py.call.16B", "py.serve.16B"];
    if !names.iter().any(|n| wanted(n)) {
        return Ok(Vec::new());
    }
    let python = match find_python(repo()) {
        Ok((p, _)) => p,
        Err(why) => {
            println!(
                "py.* rows skipped: Python with rpyc 6 not found: {why} \
                 (run scripts/test.sh first; it creates target/pyenv)"
            );
            return Ok(Vec::new());
        }
    };
    let (_py_server, py_port) =
        PyChild::server(&python, repo(), &["testdata/python/demo_server.py"])?;
    let payload = Value::Bytes((0..16).map(|i| (i * 7 + 1) as u8).collect());
    let want = Value::Tuple(vec![payload.clone()]);
    let mut rows = Vec::new();

    // Seconds per call of one Python batch, to size the batch requests.
    let per_call = |c: &mut PyChild| -> Res<f64> {
        let start = Instant::now();
        c.calls(200)?;
        Ok(start.elapsed().as_secs_f64() / 200.0)
    };

    // py.call.16B: the Rust client and Python's client, the same CALLATTR `echo(payload)` to
    // the same Python server.
    if wanted("py.call.16B") {
        let conn = python::connect(HOST, py_port)?;
        let root = conn.root()?;
        let got: Value = root.call_method("echo", (&payload,))?;
        assert_eq!(got, want, "echo returned something else");
        let mut py = PyChild::client(&python, repo(), py_port, 16)?;
        let n = py_calls_per_op(&plan, per_call(&mut py)?);
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                py.calls(n)?;
                Ok(n)
            },
            &mut || {
                for _ in 0..n {
                    let r: Value = root.call_method("echo", (&payload,))?;
                    black_box(r);
                }
                Ok(n)
            },
        )?;
        rows.push(Row {
            name: "py.call.16B",
            unit: Unit::Micros("call"),
            floor,
            rpyc,
            extra: String::new(),
        });
        conn.close();
    }

    // py.serve.16B: Python's client making the same CALLATTR `echo(payload)` to a Rust server
    // and to the Python server.
    if wanted("py.serve.16B") {
        let service = python::Service::new("Bench")
            .method_with_call("echo", |call| Ok(Value::Tuple(call.args().to_vec())));
        let server = python::serve(service).hostname(HOST).port(0).build()?;
        let rust_port = server.port();
        let server = server.spawn()?;
        let mut to_rust = PyChild::client(&python, repo(), rust_port, 16)?;
        let mut to_py = PyChild::client(&python, repo(), py_port, 16)?;
        let n = py_calls_per_op(&plan, per_call(&mut to_py)?);
        let (floor, rpyc) = measure(
            plan,
            &mut || {
                to_py.calls(n)?;
                Ok(n)
            },
            &mut || {
                to_rust.calls(n)?;
                Ok(n)
            },
        )?;
        rows.push(Row {
            name: "py.serve.16B",
            unit: Unit::Micros("call"),
            floor,
            rpyc,
            extra: String::new(),
        });
        drop(to_rust);
        server.close();
    }
    Ok(rows)
}
