//! The Rust service that testdata/python/client_checks.py expects of a server (its `--help`
//! lists it; reference_server.py is the same service in Python), Rust servers of it for real
//! Python RPyC clients, and Python code written inline in a test.

use super::python::PyOutput;
use rpyc::python::{self, PyObject, Service, Value};
use rpyc::{PythonError, ServerBuilder};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Python's `str(v)` for the values the checks pass (`f"bad value: {x}"`).
fn py_str(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// A counter object by reference: `incr(by=1)` and `value()`.
fn counter(start: i64) -> Service {
    let value = Arc::new(AtomicI64::new(start));
    let v = value.clone();
    Service::new("Counter")
        .method_with_params("incr", &["by"], move |by: Option<i64>| {
            v.fetch_add(by.unwrap_or(1), Ordering::SeqCst) + by.unwrap_or(1)
        })
        .method("value", move || value.load(Ordering::SeqCst))
}

/// The sum of a sequence: a Python list arrives by reference (read with `to_vec`), a tuple by
/// value.
fn total(call: &python::Call) -> Result<Value, PythonError> {
    let items: Vec<i64> = match call.args().first() {
        Some(Value::Remote(seq)) => seq.to_vec()?,
        Some(Value::Tuple(items)) => items
            .iter()
            .map(|i| i.clone().get::<i64>())
            .collect::<Result<_, _>>()?,
        other => {
            return Err(PythonError::new(
                "TypeError",
                (format!("total() wants a list or tuple, not {other:?}"),),
            ))
        }
    };
    Ok(Value::from(items.iter().sum::<i64>()))
}

/// The service of client_checks.py: echo, add, version, fail, apply, make_counter, total,
/// keys_of, object_count, peer_cn, sleep. `calls` counts the calls of `add` and `apply`.
pub fn service_counting(calls: Arc<AtomicU64>) -> Service {
    let adds = calls.clone();
    Service::new("ChecksService")
        .method_with_call("echo", |call| Ok(Value::Tuple(call.args().to_vec())))
        .method("add", move |a: i64, b: i64| {
            adds.fetch_add(1, Ordering::Relaxed);
            a + b
        })
        .attribute("version", "1.0")
        .method("fail", |x: Value| -> Result<(), PythonError> {
            Err(PythonError::new(
                "ValueError",
                (format!("bad value: {}", py_str(&x)),),
            ))
        })
        .method(
            "apply",
            move |func: PyObject, x: Value| -> Result<i64, PythonError> {
                calls.fetch_add(1, Ordering::Relaxed);
                let y: i64 = func.call((x,))?;
                Ok(y + 1)
            },
        )
        .method("make_counter", counter)
        .method_with_call("total", total)
        .method(
            "keys_of",
            |d: PyObject| -> Result<Vec<String>, PythonError> {
                // Python clients refuse d.keys(); iterating a dict gives its keys.
                let mut keys: Vec<String> = d.to_vec()?;
                keys.sort();
                Ok(keys)
            },
        )
        .method_with_call("object_count", |call| {
            Ok(Value::from(call.connection().exported_count() as i64))
        })
        .method_with_call("peer_cn", |call| {
            Ok(
                match call.peer_certificate().and_then(|c| c.common_name()) {
                    Some(cn) => Value::from(cn),
                    None => Value::None,
                },
            )
        })
        .method("sleep", |seconds: f64| {
            std::thread::sleep(Duration::from_secs_f64(seconds));
            seconds
        })
}

/// The service of client_checks.py (see [`service_counting`]).
pub fn service() -> Service {
    service_counting(Arc::new(AtomicU64::new(0)))
}

/// A Rust server for Python clients on 127.0.0.1 (calls time out after [`super::CALL_TIMEOUT`]),
/// closed when dropped.
pub type PyServer = super::TestServer;

/// Serves `service` to Python clients on a free port of 127.0.0.1; `setup` adds settings.
pub fn serve_with(
    service: Service,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> PyServer {
    super::serve_builder(python::serve(service), setup)
}

/// Serves the checks' [`service`] on a free port of 127.0.0.1.
pub fn serve() -> PyServer {
    serve_with(service(), |b| b)
}

/// Writes Python `code` to a file of its own (in a directory removed with the returned guard)
/// and returns its absolute path, which the helpers of `python.rs` accept in place of a script
/// name of testdata/python.
pub struct InlineScript {
    dir: PathBuf,
    pub path: PathBuf,
}

impl InlineScript {
    pub fn new(name: &str, code: &str) -> InlineScript {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rpyc-test-inline-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.py"));
        std::fs::write(&path, code).unwrap();
        InlineScript { dir, path }
    }

    /// The path as the helpers take it.
    pub fn name(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temporary path")
    }

    /// Runs it to completion (see [`super::python::run_python`]).
    pub fn run(&self, args: &[&str], timeout: Duration) -> PyOutput {
        super::python::run_python(self.name(), args, timeout)
    }
}

impl Drop for InlineScript {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
