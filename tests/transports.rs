//! Transports: TCP, Unix domain sockets (file removed on close, stale file replaced), any
//! byte stream with `connect_stream`, and a child process with `connect_subprocess`.

mod common;

use common::{expect_within, works};

use rpyc::{Connection, Error, HandshakeErrorKind, Options, Service, ThreadedServer};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn service() -> Service {
    Service::new("calc")
        .method("add", |a: i64, b: i64| a + b)
        .method_with_context("peer", |cx: &rpyc::Context| cx.peer().to_string())
        .method_with_context("ask_back", |cx: &rpyc::Context| -> Result<String, Error> {
            cx.peer_root().call("name", ())
        })
}

/// A socket path unique to this process and call, under the system temp dir.
fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::env::temp_dir().join(format!(
        "rpyc-test-{tag}-{}-{nanos}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

#[test]
fn tcp_transport_carries_calls_both_ways() {
    let server = ThreadedServer::new(service()).build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();
    let me = Service::new("client").method("name", || "tcp client".to_string());
    let conn = Options::new()
        .service(me)
        .connect("127.0.0.1", port)
        .unwrap();
    works(&conn);
    assert_eq!(
        conn.root().call::<String, _>("ask_back", ()).unwrap(),
        "tcp client"
    );
    conn.close();
    handle.close();
}

#[test]
fn unix_socket_server_serves_calls_and_removes_its_file_on_close() {
    let path = socket_path("serve");
    let server = ThreadedServer::new(service())
        .unix_path(&path)
        .build()
        .unwrap();
    assert_eq!(server.port(), 0);
    let handle = server.spawn().unwrap();
    assert!(path.exists());

    let me = Service::new("client").method("name", || "unix client".to_string());
    let conn = Options::new().service(me).unix_connect(&path).unwrap();
    works(&conn);
    assert_eq!(
        conn.root().call::<String, _>("ask_back", ()).unwrap(),
        "unix client"
    );
    let other = rpyc::unix_connect(&path).unwrap();
    works(&other);
    assert_eq!(handle.connections(), 2);

    handle.close();
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
    assert!(other.wait_closed_timeout(Duration::from_secs(5)));
    assert!(!path.exists(), "{} was left behind", path.display());
    match rpyc::unix_connect(&path) {
        Err(Error::Connect { addr, .. }) => assert!(addr.contains(&*path.to_string_lossy())),
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn stale_unix_socket_file_is_replaced() {
    let path = socket_path("stale");
    // A server that died without cleaning up leaves its socket file behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    // Another test forking a child at this moment briefly holds a copy of the listener (until
    // the child's exec closes it), so wait for nobody to answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(&path).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped listener still answers"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let handle = ThreadedServer::new(service())
        .unix_path(&path)
        .build()
        .unwrap()
        .spawn()
        .unwrap();
    let conn = rpyc::unix_connect(&path).unwrap();
    works(&conn);
    conn.close();
    handle.close();
    assert!(!path.exists());
}

#[test]
fn unix_socket_of_a_live_server_is_not_taken_over() {
    let path = socket_path("live");
    let handle = ThreadedServer::new(service())
        .unix_path(&path)
        .build()
        .unwrap()
        .spawn()
        .unwrap();
    match ThreadedServer::new(service()).unix_path(&path).build() {
        Err(Error::Connect { .. }) => {}
        other => panic!("a second server took over a live socket: {other:?}"),
    }
    // The first server is undisturbed.
    let conn = rpyc::unix_connect(&path).unwrap();
    works(&conn);
    conn.close();
    handle.close();
    assert!(!path.exists());
}

#[test]
fn an_authenticator_on_a_unix_socket_is_misuse() {
    let pki = rpyc::testing::TestPki::temp().unwrap();
    let files = pki.issue("localhost", &["localhost"]).unwrap();
    let path = socket_path("auth");
    match ThreadedServer::new(service())
        .unix_path(&path)
        .authenticator(rpyc::SslAuthenticator::new(&files.key, &files.cert))
        .build()
    {
        Err(Error::Misuse(why)) => assert!(why.contains("remove unix_path"), "{why}"),
        other => panic!("expected Error::Misuse, got {other:?}"),
    }
    assert!(!path.exists());
}

#[test]
fn tls_or_ssh_options_for_a_unix_socket_a_stream_or_a_child_process_are_misuse() {
    let path = socket_path("misuse");
    let handle = ThreadedServer::new(service())
        .unix_path(&path)
        .build()
        .unwrap()
        .spawn()
        .unwrap();
    let marker = std::env::temp_dir().join(format!("rpyc-misuse-{}", std::process::id()));
    // Were a setting ignored instead, each would connect, or fail otherwise, at once: the
    // server answers, the stream's peer is gone, `touch` exits.
    let options = Options::new().handshake_timeout(Duration::from_secs(2));
    for (setting, options) in [
        (
            "Options::tls/authenticator",
            options.clone().tls(rpyc::tls::SslClient::new()),
        ),
        (
            "Options::ssh",
            options.ssh(rpyc::SshContext::new("localhost")),
        ),
    ] {
        let (peer, (read, write)) = pipes();
        drop(peer);
        let mut touch = Command::new("touch");
        touch.arg(&marker);
        for (what, r) in [
            ("Unix sockets", options.unix_connect(&path)),
            ("streams", options.connect_stream(read, write)),
            ("child processes", options.connect_subprocess(touch)),
        ] {
            match r {
                Err(Error::Misuse(why)) => assert!(
                    why.contains(setting) && why.contains(what) && why.contains("Options::connect"),
                    "{setting} for {what}: {why}"
                ),
                other => panic!("{setting} for {what}: expected Error::Misuse, got {other:?}"),
            }
        }
    }
    // Refused before anything was started.
    assert!(!marker.exists(), "the child process ran");
    handle.close();
}

/// Two socket pairs, each carrying one direction, like a pair of pipes: dropping a writer
/// ends the peer's reader.
fn pipes() -> ((UnixStream, UnixStream), (UnixStream, UnixStream)) {
    let (a_to_b_w, a_to_b_r) = UnixStream::pair().unwrap();
    let (b_to_a_w, b_to_a_r) = UnixStream::pair().unwrap();
    ((b_to_a_r, a_to_b_w), (a_to_b_r, b_to_a_w))
}

/// Two connections joined by [`pipes`]: `a` serves [`service`], `b` is made by `connect_b`
/// from its reading and writing ends. The handshake is symmetric, so both sides start at once.
fn stream_pair(
    connect_b: impl FnOnce(UnixStream, UnixStream) -> Result<Connection, Error>,
) -> (Connection, Connection) {
    let ((a_read, a_write), (b_read, b_write)) = pipes();
    let a = thread::spawn(move || {
        Options::new()
            .service(service())
            .connect_stream(a_read, a_write)
    });
    let b = connect_b(b_read, b_write).unwrap();
    (a.join().unwrap().unwrap(), b)
}

#[test]
fn connect_stream_runs_the_protocol_over_any_byte_stream() {
    let me = Service::new("b").method("name", || "side b".to_string());
    let (a, b) = stream_pair(|r, w| Options::new().service(me).connect_stream(r, w));

    works(&b);
    assert_eq!(
        b.root().call::<String, _>("ask_back", ()).unwrap(),
        "side b"
    );
    assert_eq!(a.root().call::<String, _>("name", ()).unwrap(), "side b");
    assert_eq!(a.peer(), "stream");

    // Closing one side ends the other.
    b.close();
    assert!(a.wait_closed_timeout(Duration::from_secs(5)));
    assert!(matches!(
        a.root().call::<String, _>("name", ()),
        Err(Error::Closed { .. })
    ));
}

#[test]
fn connect_stream_with_default_options_serves_nothing_but_calls_out() {
    let (a, b) = stream_pair(rpyc::connect_stream);
    works(&b);
    match a.root().call::<String, _>("name", ()) {
        Err(Error::Remote(e)) => assert_eq!(e.kind(), rpyc::RemoteErrorKind::NoSuchMethod),
        other => panic!("expected no such method, got {other:?}"),
    }
    a.close();
    assert!(b.wait_closed_timeout(Duration::from_secs(5)));
}

fn stdio_server_binary() -> PathBuf {
    // target/debug/deps/transports-HASH -> target/debug/examples/stdio_server
    let exe = std::env::current_exe().unwrap();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir
        .join("examples")
        .join(format!("stdio_server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --examples` (a plain `cargo test` builds it, \
         `cargo test --test transports` does not)",
        bin.display()
    );
    bin
}

#[test]
fn subprocess_serves_calls_and_exits_when_the_connection_closes() {
    let log = std::env::temp_dir().join(format!(
        "rpyc-test-child-{}-{}.log",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    ));
    let mut cmd = Command::new(stdio_server_binary());
    cmd.stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
    let conn = rpyc::connect_subprocess(cmd).unwrap();
    assert!(conn.peer().contains("stdio_server"), "{}", conn.peer());

    assert_eq!(conn.root().call::<i64, _>("add", (2, 3)).unwrap(), 5);
    assert_eq!(
        conn.root().call::<String, _>("upper", ("child",)).unwrap(),
        "CHILD"
    );
    let pid: u32 = conn.root().call("pid", ()).unwrap();
    assert_ne!(pid, std::process::id());
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(proc_dir.exists());

    conn.close();
    expect_within("the child exited", Duration::from_secs(5), || {
        !proc_dir.exists()
    });
    // It ended because its stdin closed, not because it was killed.
    let said = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(said.contains("connection closed"), "child's stderr: {said}");
}

#[test]
fn subprocess_that_cannot_start_is_a_connect_error() {
    let missing = std::env::temp_dir().join("rpyc-test-no-such-program");
    match rpyc::connect_subprocess(Command::new(&missing)) {
        Err(Error::Connect { addr, .. }) => assert!(addr.contains("rpyc-test-no-such-program")),
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn subprocess_that_is_not_an_rpyc_peer_is_a_handshake_error() {
    // `cat` echoes our hello back (a valid hello), so use a program that prints something else.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo 'SSH-2.0-OpenSSH_9.2 pretending'; exec sleep 5"]);
    let start = Instant::now();
    match rpyc::connect_subprocess(cmd) {
        Err(Error::Handshake(e)) => assert_eq!(e.kind(), HandshakeErrorKind::NotRpyc, "{e}"),
        other => panic!("expected a handshake error, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn subprocess_that_exits_at_once_is_a_handshake_error() {
    // Depending on who is faster, our hello meets a closed pipe or theirs never comes.
    match rpyc::connect_subprocess(Command::new("true")) {
        Err(Error::Handshake(e)) => assert!(
            matches!(
                e.kind(),
                HandshakeErrorKind::Closed | HandshakeErrorKind::Io
            ),
            "{e}"
        ),
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[test]
fn killed_subprocess_fails_the_connection() {
    let mut cmd = Command::new(stdio_server_binary());
    cmd.stderr(Stdio::null());
    let conn = rpyc::connect_subprocess(cmd).unwrap();
    let pid: u32 = conn.root().call("pid", ()).unwrap();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
    assert!(matches!(
        conn.root().call::<i64, _>("add", (1, 2)),
        Err(Error::Closed { .. })
    ));
    // The dead child was reaped, not left a zombie.
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    expect_within("the child was reaped", Duration::from_secs(5), || {
        !proc_dir.exists()
    });
}

#[test]
fn closing_a_stream_always_ends_the_peer() {
    // Closing races with the last reply's write and flush; repeat to catch a lost shutdown.
    for round in 0..100 {
        let me = Service::new("b").method("name", || "side b".to_string());
        let (a, b) = stream_pair(|r, w| Options::new().service(me).connect_stream(r, w));
        works(&b);
        // b's worker writes this reply; close b while it may still hold its writer.
        assert_eq!(a.root().call::<String, _>("name", ()).unwrap(), "side b");
        b.close();
        assert!(
            a.wait_closed_timeout(Duration::from_secs(5)),
            "round {round}: the peer never saw the stream end"
        );
    }
}

#[test]
fn a_child_process_that_stops_reading_its_stdin_is_noticed_at_the_stall_timeout() {
    // A child that says a valid hello (64 MiB frames, 65,536 queued), then reads nothing.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r"printf 'RPYC\000\001\000\000\004\000\000\000\000\001\000\000'; exec sleep 30");
    let stall = Duration::from_secs(1);
    let conn = rpyc::Options::new()
        .call_timeout(stall)
        .connect_subprocess(cmd)
        .unwrap();
    let start = Instant::now();
    let r = conn.root().call_timeout::<(), _>(
        "store",
        (rpyc::Bytes::from(vec![0u8; 16 << 20]),),
        stall * 10,
    );
    let took = start.elapsed();
    match r {
        Err(rpyc::Error::Closed { reason }) => {
            assert!(reason.contains("read nothing for 1s"), "{reason}")
        }
        other => panic!("expected the connection to close, got {other:?}"),
    }
    assert!(
        took >= stall.mul_f64(0.9) && took <= stall.mul_f64(1.6),
        "noticed after {took:?}, the stall timeout being {stall:?}"
    );
}
