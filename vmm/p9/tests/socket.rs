//! The unix-socket transport with the bundled client: sessions, pipelining, out-of-order
//! replies, flush ordering and framing errors.

mod common;

use common::TempTree;
use p9::client::Client;
use p9::wire::{self, Rmessage, Tmessage};
use p9::{Config, Server, WorkerPool};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

fn start(t: &TempTree) -> PathBuf {
    let sock = t.join("p9.sock");
    let share = t.join("share");
    let listener = UnixListener::bind(&sock).unwrap();
    let srv = Server::new(&share, Config::default()).unwrap();
    let pool = Arc::new(WorkerPool::new(4, "p9-test"));
    std::thread::spawn(move || p9::socket::serve(listener, srv, pool));
    sock
}

fn read_msg(s: &mut UnixStream) -> Vec<u8> {
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut m = size.to_vec();
    m.resize(u32::from_le_bytes(size) as usize, 0);
    s.read_exact(&mut m[4..]).unwrap();
    m
}

#[test]
fn client_over_socket_with_independent_sessions() {
    let t = TempTree::new("sock");
    t.file("share/dir/a", b"alpha");
    t.file("share/dir/b", &vec![7u8; 600_000]);
    let sock = start(&t);
    let mut c1 = Client::new(UnixStream::connect(&sock).unwrap(), 512_000).unwrap();
    let mut c2 = Client::new(UnixStream::connect(&sock).unwrap(), 8192).unwrap();
    assert_eq!(c1.msize(), 512_000);
    assert_eq!(c2.msize(), 8192);
    // The same fid numbers in both sessions name different files.
    c1.attach(1, "root", "", 0).unwrap();
    c2.attach(1, "root", "", 0).unwrap();
    c1.walk(1, 2, &["dir", "a"]).unwrap();
    c2.walk(1, 2, &["dir", "b"]).unwrap();
    c1.lopen(2, 0).unwrap();
    c2.lopen(2, 0).unwrap();
    assert_eq!(c1.read(2, 0, 100).unwrap(), b"alpha");
    assert_eq!(c2.read(2, 0, 100).unwrap(), vec![7u8; 100]);
    // Large reads use the big msize.
    c1.walk(1, 3, &["dir", "b"]).unwrap();
    c1.lopen(3, 0).unwrap();
    assert_eq!(c1.read(3, 0, 600_000).unwrap().len(), 512_000 - 11);
    assert_eq!(c2.read(2, 0, 400_000).unwrap().len(), 8192 - 11);
    c1.walk(1, 4, &["dir"]).unwrap();
    c1.lopen(4, 0).unwrap();
    let mut names: Vec<Vec<u8>> = c1
        .readdir_all(4)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![b".".to_vec(), b"..".to_vec(), b"a".to_vec(), b"b".to_vec()]
    );
    assert_eq!(c1.getattr(3).unwrap().size, 600_000);
    assert_eq!(
        c1.walk(1, 5, &["missing"]).unwrap_err().errno(),
        Some(libc::ENOENT)
    );
    c1.clunk(2).unwrap();
    assert_eq!(c1.clunk(2).unwrap_err().errno(), Some(libc::EBADF));
    // Session 2 still has its fid 2.
    assert_eq!(c2.read(2, 0, 3).unwrap(), vec![7u8; 3]);
}

#[test]
fn pipelined_requests_and_flush_ordering() {
    let t = TempTree::new("pipe");
    t.file("share/f", b"data");
    let sock = start(&t);
    let mut s = UnixStream::connect(&sock).unwrap();
    let mut b = Vec::new();
    Tmessage::Version {
        msize: 65536,
        version: b"9P2000.L",
    }
    .encode(wire::NOTAG, &mut b);
    Tmessage::Attach {
        fid: 1,
        afid: wire::NOFID,
        uname: b"",
        aname: b"",
        n_uname: 0,
    }
    .encode(1, &mut b);
    s.write_all(&b).unwrap();
    read_msg(&mut s);
    read_msg(&mut s);
    // 200 pipelined getattrs: each tag answered exactly once.
    b.clear();
    for tag in 100..300u16 {
        Tmessage::Getattr {
            fid: 1,
            mask: wire::GETATTR_BASIC,
        }
        .encode(tag, &mut b);
    }
    s.write_all(&b).unwrap();
    let mut seen = HashSet::new();
    for _ in 100..300 {
        let (tag, r) = Rmessage::decode(&read_msg(&mut s)).unwrap();
        assert!(matches!(r, Rmessage::Getattr(_)));
        assert!(seen.insert(tag), "tag {tag} answered twice");
    }
    assert_eq!(seen.len(), 200);
    // A flush is answered after the flushed request's reply; flushing an unknown tag is
    // answered at once.
    for _ in 0..50 {
        b.clear();
        Tmessage::Walk {
            fid: 1,
            newfid: 2,
            names: wire::WalkNames::new(&[b"f"]).unwrap(),
        }
        .encode(5, &mut b);
        Tmessage::Flush { oldtag: 5 }.encode(6, &mut b);
        Tmessage::Clunk { fid: 2 }.encode(7, &mut b);
        s.write_all(&b).unwrap();
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(Rmessage::decode(&read_msg(&mut s)).unwrap().0);
        }
        let p5 = order.iter().position(|&t| t == 5).unwrap();
        let p6 = order.iter().position(|&t| t == 6).unwrap();
        assert!(p5 < p6, "Rflush before the flushed reply: {order:?}");
        // The clunk may race with the walk; make sure fid 2 is gone either way.
        b.clear();
        Tmessage::Clunk { fid: 2 }.encode(8, &mut b);
        s.write_all(&b).unwrap();
        read_msg(&mut s);
    }
    b.clear();
    Tmessage::Flush { oldtag: 999 }.encode(9, &mut b);
    s.write_all(&b).unwrap();
    assert_eq!(
        Rmessage::decode(&read_msg(&mut s)).unwrap(),
        (9, Rmessage::Flush)
    );
    // A frame larger than msize ends the connection.
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0);
}

#[test]
fn tcp_loopback_transport() {
    let t = TempTree::new("tcp");
    t.file("share/hello", b"over tcp");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let srv = Server::new(&t.join("share"), Config::default()).unwrap();
    let pool = Arc::new(WorkerPool::new(2, "p9-tcp"));
    std::thread::spawn(move || p9::socket::serve_tcp(listener, srv, pool));
    let mut c = Client::new(std::net::TcpStream::connect(addr).unwrap(), 65536).unwrap();
    c.attach(1, "", "", 0).unwrap();
    c.walk(1, 2, &["hello"]).unwrap();
    c.lopen(2, 0).unwrap();
    assert_eq!(c.read(2, 0, 100).unwrap(), b"over tcp");
    assert_eq!(c.statfs(1).unwrap().namelen, 255);
}
