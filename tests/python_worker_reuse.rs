//! A worker that answers a request counts as free before its reply goes out: a client that
//! sends its next request as soon as it reads a reply finds that worker free. Before, it often
//! did not (the worker counted itself free only after queueing the reply): a strictly
//! sequential Python client of a server with `max_workers(1)` had calls refused with a
//! "max_workers" `RuntimeError` (43% of 20,000 in a release build), and with the default limit
//! each such call started a thread.

mod common;

use common::pyservice::{serve_with, InlineScript};
use rpyc::python::{Service, Value};
use std::time::Duration;

#[test]
fn a_sequential_python_client_is_never_refused_by_a_one_worker_server() {
    let service = Service::new("Echo")
        .method_with_call("echo", |call| Ok(Value::Tuple(call.args().to_vec())));
    let server = serve_with(service, |b| b.max_workers(1));
    let client = InlineScript::new(
        "sequential",
        "import sys, rpyc\n\
         from rpyc.core import consts, netref\n\
         c = rpyc.connect('127.0.0.1', int(sys.argv[1]), config={'sync_request_timeout': 10})\n\
         root = c.root\n\
         refused = 0\n\
         for i in range(3000):\n\
         \x20   try:\n\
         \x20       r = netref.syncreq(root, consts.HANDLE_CALLATTR, 'echo', (i,), ())\n\
         \x20       assert r == (i,), r\n\
         \x20   except RuntimeError:\n\
         \x20       refused += 1\n\
         print('refused', refused)\n",
    );
    let out = client.run(&[&server.port.to_string()], Duration::from_secs(120));
    out.assert_success();
    assert_eq!(out.lines(), ["refused 0"], "{out}");
}
