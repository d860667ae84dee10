//! The socket transport's accept loop under descriptor exhaustion. This file holds a single
//! test because it lowers the process's open-file limit and fills the descriptor table, which
//! would break any test running beside it in the same process.

mod common;

use common::TempTree;
use p9::client::Client;
use p9::socket::SocketOptions;
use p9::{Config, Server, WorkerPool};
use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long any single wait in this test may take before the test fails.
const HANG_GUARD: Duration = Duration::from_secs(20);

fn nofile() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_nofile(lim: &libc::rlimit) {
    // SAFETY: setrlimit only reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, lim) }, 0);
}

#[test]
fn accepting_survives_descriptor_exhaustion() {
    let t = TempTree::new("emfile");
    t.file("share/f", b"still here");
    let sock = t.join("p9.sock");
    // Everything the server needs before it accepts is set up while descriptors are plentiful.
    let listener = UnixListener::bind(&sock).unwrap();
    let srv = Server::new(&t.join("share"), Config::default()).unwrap();
    let pool = Arc::new(WorkerPool::new(2, "p9-emfile"));
    // A connection waits in the backlog: accepting it needs a descriptor.
    let waiting = UnixStream::connect(&sock).unwrap();
    waiting.set_read_timeout(Some(HANG_GUARD)).unwrap();
    waiting.set_write_timeout(Some(HANG_GUARD)).unwrap();

    // Fill the descriptor table under a low limit.
    let saved = nofile();
    set_nofile(&libc::rlimit {
        rlim_cur: saved.rlim_cur.min(256),
        rlim_max: saved.rlim_max,
    });
    let null = File::open("/dev/null").unwrap();
    let mut fillers = Vec::new();
    let full = loop {
        match null.try_clone() {
            Ok(f) => fillers.push(f),
            Err(e) => break e,
        }
    };
    assert_eq!(full.raw_os_error(), Some(libc::EMFILE), "{full}");

    let (tx, rx) = mpsc::channel();
    let opts = SocketOptions {
        on_accept_error: Some(Arc::new(move |e: &std::io::Error| {
            let _ = tx.send(e.raw_os_error());
        })),
        ..SocketOptions::default()
    };
    let server = std::thread::spawn(move || p9::socket::serve_with(listener, srv, pool, opts));
    let errno = rx
        .recv_timeout(HANG_GUARD)
        .expect("accept never failed although no descriptor was free");
    assert!(
        matches!(errno, Some(libc::EMFILE | libc::ENFILE)),
        "accept failed with {errno:?}"
    );

    // Descriptors come back: the waiting connection and a new one are served.
    drop(fillers);
    set_nofile(&saved);
    let mut c = Client::new(waiting, 8192).expect("the waiting connection was dropped");
    c.attach(1, "", "", 0).unwrap();
    c.walk(1, 2, &["f"]).unwrap();
    c.lopen(2, 0).unwrap();
    assert_eq!(c.read(2, 0, 100).unwrap(), b"still here");
    let fresh = UnixStream::connect(&sock).unwrap();
    fresh.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut c = Client::new(fresh, 8192).unwrap();
    c.attach(1, "", "", 0).unwrap();
    assert!(!server.is_finished(), "the accept loop ended");
}
