//! Rust and Python RPyC 6 over mutual TLS: Rust calling Python servers, Python calling Rust.
//!
//! `cargo run --example python_interop` needs Python with rpyc 6: `RPYC_TEST_PYTHON`, else
//! `target/pyenv/bin/python`, which `scripts/test.sh` creates. In order:
//!
//! 1. a throwaway CA with a server certificate (`localhost`) and a client certificate
//!    (`alice`), made by `rpyc::testing::TestPki`;
//! 2. RPyC's classic `SlaveService` in a Python `ThreadedServer` behind
//!    `SSLAuthenticator(keyfile, certfile, ca_certs=CA)` (testdata/python/demo_server.py
//!    `--classic`), which a Rust client drives: `eval`, `os.getpid()`, a Rust callback that
//!    Python's `map` calls, a Python exception;
//! 3. a Python service (`DemoService`) behind the same authenticator: `root.add`, a callback,
//!    an object by reference;
//! 4. a Rust `python::Service` served over TLS, called by a Python `rpyc.ssl_connect` one-liner,
//!    which hands the Rust side a lambda to call back.
//!
//! Every Python process is killed when this program ends; every wait is bounded.

use rpyc::python::{self, PyObject, Value};
use rpyc::testing::TestPki;
use rpyc::tls::SslClient;
use rpyc::{Options, PythonError, SslAuthenticator};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// How long a Python process may take to start, or to finish the one-liner.
const PY_WAIT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    env_logger::init();
    let python = match find_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!(
                "python_interop: Python with rpyc 6 not found: {why}.\n\
                 Run scripts/test.sh first; it creates target/pyenv (rpyc 6.0.2 and plumbum), \
                 or point RPYC_TEST_PYTHON at a Python that has rpyc 6."
            );
            return ExitCode::from(2);
        }
    };
    match run(&python) {
        Ok(()) => {
            println!("all done");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("python_interop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(python: &Path) -> Res<()> {
    // 1. The certificates: one CA, a server certificate for localhost, a client certificate.
    let pki = TestPki::temp()?;
    let server_cert = pki.issue("localhost", &["localhost", "127.0.0.1"])?;
    let client_cert = pki.issue("alice", &[])?;
    let ca = pki.ca_cert();
    let tls_args = [
        "--tls-key".to_string(),
        server_cert.key.display().to_string(),
        "--tls-cert".to_string(),
        server_cert.cert.display().to_string(),
        "--tls-ca".to_string(),
        ca.display().to_string(),
    ];
    // The Rust client: verifies the server's chain against the CA and its name (localhost),
    // and presents alice's certificate.
    let client = python::Client::new(
        Options::new().tls(
            SslClient::new()
                .ca_certs(&ca)
                .keyfile(&client_cert.key)
                .certfile(&client_cert.cert),
        ),
    );

    // 2. The seed scenario: Python's classic SlaveService behind SSLAuthenticator.
    {
        let mut args = vec![
            "testdata/python/demo_server.py".to_string(),
            "--classic".into(),
        ];
        args.extend(tls_args.iter().cloned());
        let (server, port) = PyServer::start(python, &args)?;
        println!("classic Python server (SSLAuthenticator with ca_certs) on localhost:{port}");
        let py = client.connect("localhost", port)?;

        let six: i64 = py.eval("6 * 7")?;
        println!("  eval('6 * 7') = {six}");
        let pid: u32 = py.modules("os")?.call_method("getpid", ())?;
        println!(
            "  os.getpid() = {pid} (the server process is {})",
            server.pid()
        );
        assert_eq!(pid, server.pid(), "getpid came from another process");
        let version: String = py.modules("sys")?.getattr("version")?;
        println!("  sys.version = {}", version.lines().next().unwrap_or(""));

        // A Rust closure that Python's map() calls, once per item.
        let builtins = py.builtins()?;
        let squares: PyObject =
            builtins.call_method("map", (python::callback(|x: i64| x * x), (1, 2, 3, 4)))?;
        let squares: PyObject = builtins.call_method("list", (squares,))?;
        let squares: Vec<i64> = squares.to_vec()?;
        println!("  list(map(<Rust closure>, (1, 2, 3, 4))) = {squares:?}");
        assert_eq!(squares, [1, 4, 9, 16]);

        // A Python exception arrives with its class, arguments and traceback.
        match py.eval::<Value>("int('forty-two')") {
            Err(rpyc::Error::Python(e)) if e.is("ValueError") => {
                println!(
                    "  int('forty-two') raised {}: {}",
                    e.qualified_name(),
                    e.message()
                )
            }
            other => return Err(format!("expected a ValueError, got {other:?}").into()),
        }
        py.close();
    }

    // 3. A Python service behind the same authenticator.
    {
        let mut args = vec!["testdata/python/demo_server.py".to_string()];
        args.extend(tls_args.iter().cloned());
        let (_server, port) = PyServer::start(python, &args)?;
        println!("DemoService Python server (SSLAuthenticator with ca_certs) on localhost:{port}");
        let py = client.connect("localhost", port)?;
        let root = py.root()?;

        let sum: i64 = root.call_method("add", (1, 2))?;
        println!("  root.add(1, 2) = {sum}");
        let big: Value = root.call_method("add", (Value::BigInt("1".repeat(30)), 1))?;
        println!("  root.add(111...1 (30 digits), 1) = {big:?}");
        // apply(func, x) returns func(x) + 1: Python calls the Rust closure back.
        let applied: f64 = root.call_method("apply", (python::callback(|x: f64| x / 2.0), 5.0))?;
        println!("  root.apply(<Rust closure x / 2>, 5.0) = {applied}");
        // An object by reference: its methods run in Python.
        let counter: PyObject = root.call_method("make_counter", (10,))?;
        let n: i64 = counter.call_method_kw("incr", (), vec![("by", 5.into())])?;
        println!("  make_counter(10).incr(by=5) = {n}  ({})", counter.repr()?);
        py.close();
    }

    // 4. The reverse: a Rust service served over TLS, called by Python's rpyc.ssl_connect.
    {
        let service = python::Service::new("Lab")
            .method("add", |a: i64, b: i64| a + b)
            // A Python callable comes in as a PyObject; calling it runs it in Python.
            .method("apply", |f: PyObject, x: i64| -> Result<i64, PythonError> {
                Ok(f.call::<i64, _>((x,))? + 1)
            })
            .method_with_call("whoami", |call| {
                let cn = call.peer_certificate().and_then(|c| c.common_name());
                Ok(cn.map_or(Value::None, |cn| Value::Str(cn.to_string())))
            })
            .attribute("version", "1.0");
        let auth = SslAuthenticator::new(&server_cert.key, &server_cert.cert).ca_certs(&ca);
        let server = python::serve(service)
            .hostname("127.0.0.1")
            .port(0)
            .authenticator(auth)
            .build()?;
        let port = server.port();
        let server = server.spawn()?;
        println!("Rust python::serve server (SslAuthenticator with a CA) on localhost:{port}");
        let one_liner = "import rpyc, sys; \
            c = rpyc.ssl_connect('localhost', int(sys.argv[1]), keyfile=sys.argv[2], \
            certfile=sys.argv[3], ca_certs=sys.argv[4]); \
            print('add', c.root.add(2, 3)); \
            print('apply', c.root.apply(lambda x: x * 10, 4)); \
            print('whoami', c.root.whoami()); \
            print('version', c.root.version)";
        let out = run_python(
            python,
            &[
                "-c",
                one_liner,
                &port.to_string(),
                &client_cert.key.display().to_string(),
                &client_cert.cert.display().to_string(),
                &ca.display().to_string(),
            ],
        )?;
        for line in out.lines() {
            println!("  Python printed: {line}");
        }
        let want = "add 5\napply 41\nwhoami alice\nversion 1.0\n";
        if out != want {
            return Err(format!("the Python client printed {out:?}, expected {want:?}").into());
        }
        server.close();
    }
    Ok(())
}

/// The Python interpreter with rpyc 6: `RPYC_TEST_PYTHON`, else `target/pyenv/bin/python`.
fn find_python() -> Result<PathBuf, String> {
    let (path, from) = match std::env::var_os("RPYC_TEST_PYTHON") {
        Some(p) => (PathBuf::from(p), "RPYC_TEST_PYTHON"),
        None => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python"),
            "the default",
        ),
    };
    if !path.exists() {
        return Err(format!("{} ({from}) does not exist", path.display()));
    }
    let version = run_python(&path, &["-c", "import rpyc; print(rpyc.__version__)"])
        .map_err(|e| format!("{} cannot import rpyc ({e})", path.display()))?;
    if !version.starts_with("6.") {
        return Err(format!(
            "{} has rpyc {}, not 6.x",
            path.display(),
            version.trim()
        ));
    }
    Ok(path)
}

/// A Python command in this package's directory, with nothing left behind.
fn python_command(python: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(python);
    cmd.arg("-u")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Runs Python to completion (at most `PY_WAIT`); returns its stdout, or an error with its
/// stderr if it fails.
fn run_python(python: &Path, args: &[&str]) -> Res<String> {
    let mut child = python_command(python, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + PY_WAIT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("Python did not finish within {PY_WAIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "Python failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A Python server (testdata/python/demo_server.py), killed when dropped. Its stdin is a pipe
/// from this process: with `RPYC_TEST_WATCH_STDIN=1` it exits when that closes, so it does not
/// outlive this program even if this program is killed.
struct PyServer {
    child: Child,
    _stdin: Option<ChildStdin>,
}

impl PyServer {
    /// Starts it and waits (at most `PY_WAIT`) for its `PORT <n>` line.
    fn start(python: &Path, args: &[String]) -> Res<(PyServer, u16)> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = python_command(python, &args)
            .env("RPYC_TEST_WATCH_STDIN", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let server = PyServer {
            child,
            _stdin: stdin,
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Reads every line (so the server never blocks on a full pipe); sends the port.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("PORT ") {
                    let _ = tx.send(port.trim().parse::<u16>());
                }
            }
        });
        match rx.recv_timeout(PY_WAIT) {
            Ok(Ok(port)) => Ok((server, port)),
            Ok(Err(e)) => Err(format!("the Python server said a bad port: {e}").into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(format!("the Python server did not say its port within {PY_WAIT:?}").into())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err("the Python server ended before saying its port (see its stderr)".into())
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
