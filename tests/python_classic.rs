//! The Rust client in RPyC's classic mode, against real Python RPyC 6.0.2 `SlaveService`
//! servers: demo_server.py --classic over TCP, and `rpyc_classic -m stdio` as a child process
//! speaking over its stdin and stdout (gone once the connection closes).

mod common;

use common::python::{python, PyProcess};
use common::{expect_within, CALL_TIMEOUT, SETTLE};
use rpyc::python::{self, PyObject, Value};
use rpyc::{Error, Options, PythonError};
use std::path::{Path, PathBuf};
use std::process::Command;

fn client() -> python::Client {
    python::Client::new(Options::new().call_timeout(CALL_TIMEOUT))
}

fn classic_server() -> (PyProcess, python::Connection) {
    let server = PyProcess::server("demo_server.py", &["--classic"]);
    let py = client()
        .connect("127.0.0.1", server.port)
        .expect("connect to the classic server");
    (server, py)
}

fn python_error(e: Error) -> PythonError {
    match e {
        Error::Python(p) => p,
        other => panic!("expected Error::Python, got {other:?}"),
    }
}

/// `rpyc_classic`, installed next to the pinned Python.
fn rpyc_classic() -> PathBuf {
    let path = python()
        .parent()
        .expect("python is in a bin directory")
        .join("rpyc_classic");
    assert!(
        path.is_file(),
        "{} is missing (it comes with rpyc)",
        path.display()
    );
    path
}

#[test]
fn a_module_of_the_server_is_the_server_process() {
    let (server, py) = classic_server();
    let os = py.modules("os").unwrap();
    // rpyc names a module by its own name.
    assert_eq!(os.class_name(), "os");
    let pid: u32 = os.call_method("getpid", ()).unwrap();
    assert_eq!(pid, server.pid());
    // GETATTR + CALL, as Python's conn.modules.os.getpid().
    let getpid: PyObject = os.getattr("getpid").unwrap();
    assert_eq!(getpid.call::<u32, _>(()).unwrap(), server.pid());
    let sep: String = os.getattr("sep").unwrap();
    assert_eq!(sep, "/");
}

#[test]
fn eval_and_execute_run_python_on_the_server() {
    let (_server, py) = classic_server();
    assert_eq!(py.eval::<i64>("6*7").unwrap(), 42);
    assert_eq!(py.eval::<String>("'py' + 'thon'").unwrap(), "python");
    py.execute("x = 5").unwrap();
    assert_eq!(py.eval::<i64>("x").unwrap(), 5);
    py.execute("def twice(v):\n    return 2 * v\n").unwrap();
    assert_eq!(py.eval::<i64>("twice(x)").unwrap(), 10);
    // A function of the server, called with keyword arguments.
    let f: PyObject = py.eval("lambda a, b=2: a * b").unwrap();
    assert_eq!(
        f.call_kw::<i64, _>((3,), vec![("b", 5.into())]).unwrap(),
        15
    );
    // A Rust callback called by server code.
    let apply: PyObject = py.eval("lambda f, v: f(v)").unwrap();
    let plus_one = python::callback(|v: i64| v + 1);
    assert_eq!(apply.call::<i64, _>((plus_one, 41)).unwrap(), 42);
}

#[test]
fn python_exceptions_of_eval_and_execute_arrive_typed() {
    let (_server, py) = classic_server();
    let e = python_error(py.eval::<Value>("1/0").unwrap_err());
    assert!(e.is("ZeroDivisionError"), "{e:?}");
    assert_eq!(e.qualified_name(), "builtins.ZeroDivisionError");
    assert!(e.message().contains("division by zero"), "{e:?}");
    let e = python_error(py.execute("raise KeyError('k')").unwrap_err());
    assert!(e.is("KeyError"), "{e:?}");
    let e = python_error(py.eval::<Value>("undefined_name").unwrap_err());
    assert!(e.is("NameError"), "{e:?}");
    let e = python_error(py.modules("no_such_module_here").unwrap_err());
    assert!(e.is("ModuleNotFoundError"), "{e:?}");
    // Still usable.
    assert_eq!(py.eval::<i64>("1+1").unwrap(), 2);
}

#[test]
fn builtins_and_dict_methods_are_allowed_in_classic_mode() {
    let (_server, py) = classic_server();
    let builtins = py.builtins().unwrap();
    assert_eq!(
        builtins.call_method::<i64, _>("len", ((1, 2, 3),)).unwrap(),
        3
    );
    assert_eq!(
        builtins
            .call_method::<i64, _>("sum", (vec![1, 2, 3, 4],))
            .unwrap(),
        10
    );
    // items() is refused by a service's default policy, allowed by the classic one.
    let d: PyObject = py.eval("{'a': 1, 'b': 2}").unwrap();
    let items: PyObject = d.call_method("items", ()).unwrap();
    let mut pairs: Vec<(String, i64)> = items.to_vec().unwrap();
    pairs.sort();
    assert_eq!(pairs, [("a".to_string(), 1), ("b".to_string(), 2)]);
    let keys: PyObject = d.call_method("keys", ()).unwrap();
    assert_eq!(keys.len().unwrap(), 2);
    // Attributes may be set too.
    let sys = py.modules("sys").unwrap();
    sys.setattr("rpyc_rust_test", 7).unwrap();
    assert_eq!(
        py.eval::<i64>("__import__('sys').rpyc_rust_test").unwrap(),
        7
    );
    assert!(sys.dir().unwrap().iter().any(|n| n == "rpyc_rust_test"));
}

/// Whether process `pid` is gone: no /proc entry (not even a zombie, so it was reaped).
fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn rpyc_classic_over_stdio_is_the_child_and_leaves_nothing_behind() {
    let mut cmd = Command::new(rpyc_classic());
    cmd.args(["-m", "stdio", "-q"]);
    let py = client()
        .connect_subprocess(cmd)
        .expect("rpyc_classic -m stdio");
    assert!(py.peer().contains("rpyc_classic"), "{}", py.peer());
    let pid: u32 = py.modules("os").unwrap().call_method("getpid", ()).unwrap();
    let ppid: u32 = py
        .modules("os")
        .unwrap()
        .call_method("getppid", ())
        .unwrap();
    assert_eq!(ppid, std::process::id(), "rpyc_classic is our child");
    assert_eq!(py.eval::<i64>("6*7").unwrap(), 42);
    let e = python_error(py.eval::<Value>("1/0").unwrap_err());
    assert!(e.is("ZeroDivisionError"), "{e:?}");
    // Compressed frames through the pipes.
    let big: Value = py.eval("b'z' * 100000").unwrap();
    assert_eq!(big, Value::Bytes(vec![b'z'; 100_000]));
    py.ping().unwrap();
    assert!(!gone(pid));
    py.close();
    assert!(py.is_closed());
    expect_within("rpyc_classic exited and was reaped", SETTLE, || gone(pid));
    assert!(matches!(py.ping().unwrap_err(), Error::Closed { .. }));
}

#[test]
fn dropping_a_stdio_connection_ends_its_child() {
    let mut cmd = Command::new(rpyc_classic());
    cmd.args(["-m", "stdio", "-q"]);
    let py = client()
        .connect_subprocess(cmd)
        .expect("rpyc_classic -m stdio");
    let pid: u32 = py.modules("os").unwrap().call_method("getpid", ()).unwrap();
    drop(py);
    expect_within("rpyc_classic exited and was reaped", SETTLE, || gone(pid));
}
