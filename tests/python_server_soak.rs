//! A soak of a Rust `python::serve` server: four real Python RPyC clients at once make 10,000
//! calls with callbacks, and the memory of the server (a child process: its heap in use, counted
//! by this binary's allocator, and its resident memory) and of each Python client stays flat
//! between the first 2,000 calls and the end.

mod common;

use common::child::{self, Child};
use common::pyservice::{self, InlineScript};
use common::python::PyProcess;
use rpyc::python;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heap bytes in use by this process (the child server's, in the child): every allocation
/// counted, so a leak of a few bytes per call shows, which resident memory blurs.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The server, in a child process: the checks service; it says `port N`, then `calls N` (the
/// calls of add and apply it served so far) for each line the parent sends.
#[test]
#[ignore = "the child process of the test in this file; it starts it itself"]
fn child_server() {
    child::role().expect("run only as a child process by the test of this file");
    let calls = Arc::new(AtomicU64::new(0));
    let server = python::serve(pyservice::service_counting(calls.clone()))
        .hostname("127.0.0.1")
        .port(0)
        .call_timeout(common::CALL_TIMEOUT)
        .build()
        .unwrap();
    child::say(format!("port {}", server.port()));
    let _handle = server.spawn().unwrap();
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
        child::say(format!(
            "calls {} heap {}",
            calls.load(Ordering::Relaxed),
            LIVE.load(Ordering::Relaxed)
        ));
        line.clear();
    }
    std::process::exit(0);
}

/// One soak client: `first` calls of add (with a callback through apply every 10th), then its
/// own resident memory (`RSS1 <KiB>`); once the file `go` exists, `second` more calls, then
/// `RSS2 <KiB>`; once `end` exists, it closes. Every wait is bounded.
const CLIENT: &str = r#"
import gc, os, sys, time
import rpyc

port, first, second, go, end = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
conn = rpyc.connect("127.0.0.1", port, config={"sync_request_timeout": 10})
root = conn.root

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def calls(start, n):
    for i in range(start, start + n):
        assert root.add(i, 1) == i + 1
        if i % 10 == 9:
            assert root.apply(lambda v: v + i, 1) == i + 2

def wait_for(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no {path} within 120 s"
        time.sleep(0.01)

calls(0, first)
gc.collect()
print("RSS1", rss_kib(), flush=True)
wait_for(go)
started = time.monotonic()
calls(first, second)
gc.collect()
print("RSS2", rss_kib(), round(time.monotonic() - started, 2), flush=True)
wait_for(end)
conn.close()
print("DONE", flush=True)
"#;

const CLIENTS: u64 = 4;
const FIRST: u64 = 500;
const SECOND: u64 = 2_000;
/// How long a phase may take (each call is a few round trips; 2 cores shared).
const PHASE: Duration = Duration::from_secs(180);

/// The number after `prefix` in `line`.
fn field(line: &str, prefix: &str) -> u64 {
    line.strip_prefix(prefix)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("expected `{prefix}N ...`, got {line:?}"))
}

/// Asks the child how many calls of add and apply it served, and how many heap bytes it uses.
fn served(c: &mut Child) -> (u64, u64) {
    c.tell("calls?");
    let line = c.heard(Duration::from_secs(10));
    let heap = line
        .split_once(" heap ")
        .and_then(|(_, h)| h.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected `calls N heap M`, got {line:?}"));
    (field(&line, "calls "), heap)
}

#[test]
fn ten_thousand_calls_with_callbacks_on_four_connections_keep_both_sides_memory_flat() {
    let mut c = Child::start("child_server", "server");
    let port = c.port().to_string();
    let dir = std::env::temp_dir().join(format!("rpyc-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (go, end) = (dir.join("go"), dir.join("end"));
    let script = InlineScript::new("soak_client", CLIENT);
    let (first, second) = (FIRST.to_string(), SECOND.to_string());
    let args = [
        port.as_str(),
        &first,
        &second,
        go.to_str().unwrap(),
        end.to_str().unwrap(),
    ];
    let started = Instant::now();
    let clients: Vec<PyProcess> = (0..CLIENTS)
        .map(|_| PyProcess::start(script.name(), &args))
        .collect();

    // After the first 2,000 calls (and their 200 callbacks).
    let py1: Vec<u64> = clients
        .iter()
        .map(|p| field(&p.wait_line("RSS1 ", PHASE), "RSS1 "))
        .collect();
    let (calls1, heap1) = served(&mut c);
    let server1 = c.rss();
    let took1 = started.elapsed();

    // 8,000 more, to 10,000.
    std::fs::write(&go, "").unwrap();
    let py2: Vec<u64> = clients
        .iter()
        .map(|p| field(&p.wait_line("RSS2 ", PHASE), "RSS2 "))
        .collect();
    let (calls2, heap2) = served(&mut c);
    let server2 = c.rss();
    let took2 = started.elapsed() - took1;
    std::fs::write(&end, "").unwrap();
    for p in &clients {
        p.wait_line("DONE", Duration::from_secs(30));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let adds = CLIENTS * (FIRST + SECOND);
    assert_eq!(
        calls1,
        CLIENTS * FIRST * 11 / 10,
        "add + apply calls served"
    );
    assert_eq!(calls2, adds * 11 / 10, "add + apply calls served");
    let ratio = server2 as f64 / server1 as f64;
    eprintln!(
        "soak: {adds} calls + {} callbacks on {CLIENTS} connections ({took1:.1?} + {took2:.1?}); \
         server RSS {} KiB after {}, {} KiB after {adds}: x{ratio:.3}; heap {heap1} -> {heap2} \
         bytes; Python RSS (KiB) {py1:?} -> {py2:?}",
        adds / 10,
        server1 >> 10,
        CLIENTS * FIRST,
        server2 >> 10
    );
    // Flat. The heap in use, counted by the allocator, is exact: a leak of a single byte per
    // call would show as 8,000 bytes. Resident memory is coarser (the allocator's arenas and
    // the stacks of worker threads come and go): a ratio with room for that.
    assert!(
        heap2 <= heap1 + (8 << 10),
        "the server's heap grew from {heap1} to {heap2} bytes between {} and {adds} calls",
        CLIENTS * FIRST
    );
    assert!(
        ratio < 1.25,
        "the server's RSS grew from {server1} to {server2} bytes between {} and {adds} calls",
        CLIENTS * FIRST
    );
    for (a, b) in py1.iter().zip(&py2) {
        let r = *b as f64 / *a as f64;
        assert!(
            r < 1.05,
            "a Python client grew from {a} to {b} KiB between its call {FIRST} and {}",
            FIRST + SECOND
        );
    }
}
