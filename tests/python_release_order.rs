//! A Python object sent back to Python in a message that also drops our last handle on it:
//! the DEL that the drop queues must reach Python after that message, or Python has already
//! forgotten the object when it reads it (`KeyError` on its id pack). Against the real rpyc
//! 6.0.2, in both roles: a call's argument (Rust client) and a handler's result (Rust server).

mod common;

use common::pyservice::{serve_with, InlineScript};
use common::python::PyProcess;
use common::CALL_TIMEOUT;
use rpyc::python::{self, Client, PyObject, Value};
use rpyc::Options;
use std::time::Duration;

#[test]
fn an_argument_that_is_our_last_handle_reaches_python_before_its_release() {
    let server = PyProcess::server("demo_server.py", &["--classic"]);
    let py = Client::new(Options::new().call_timeout(CALL_TIMEOUT))
        .connect("127.0.0.1", server.port)
        .unwrap();
    let builtins = py.builtins().unwrap();
    for n in 0..5i64 {
        let it: PyObject = builtins.call_method("iter", ((n, n + 1, n + 2),)).unwrap();
        // `it` moves into the call: the call's arguments hold its last handle.
        let items: PyObject = builtins
            .call_method("list", (it,))
            .unwrap_or_else(|e| panic!("list(iterator) #{n}: {e}"));
        assert_eq!(items.to_vec::<i64>().unwrap(), [n, n + 1, n + 2]);
    }
    py.close();
}

#[test]
fn a_result_that_is_our_last_handle_reaches_python_before_its_release() {
    // Hands the argument back: the reply holds the only handle on the Python object.
    let service = python::Service::new("Back")
        .method_with_call("give_back", |call| Ok(call.args()[0].clone()))
        .method_with_call("echo", |call| Ok(Value::Tuple(call.args().to_vec())));
    let server = serve_with(service, |b| b);
    let client = InlineScript::new(
        "give_back",
        "import sys, rpyc\n\
         c = rpyc.connect('127.0.0.1', int(sys.argv[1]), config={'sync_request_timeout': 10})\n\
         for i in range(5):\n\
         \x20   x = [i]\n\
         \x20   assert c.root.give_back(x) is x, i\n\
         \x20   (y,) = c.root.echo(x)\n\
         \x20   assert y is x, i\n\
         print('OK')\n",
    );
    let out = client.run(&[&server.port.to_string()], Duration::from_secs(60));
    out.assert_success();
    assert_eq!(out.lines(), ["OK"], "{out}");
}
