//! The unix-socket transport with the bundled client: sessions, pipelining, out-of-order
//! replies, flush ordering and framing errors, and hostile clients: one that never reads its
//! replies, too many connections, frames beyond the negotiated msize.

mod common;

use common::{anonymous_attach, TempTree};
use p9::client::{Client, ClientError};
use p9::socket::SocketOptions;
use p9::wire::{self, Rmessage, Tmessage};
use p9::{Config, Server, WorkerPool};
use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long any single read or write in these tests may take before the test fails.
const HANG_GUARD: Duration = Duration::from_secs(20);

fn start(t: &TempTree) -> PathBuf {
    start_with(t, 4, None)
}

/// Serves `share` on `p9.sock` with `workers` pool threads; `opts` None uses [`p9::socket::serve`].
fn start_with(t: &TempTree, workers: usize, opts: Option<SocketOptions>) -> PathBuf {
    let sock = t.join("p9.sock");
    let share = t.join("share");
    let listener = UnixListener::bind(&sock).unwrap();
    let srv = Server::new(&share, Config::default()).unwrap();
    let pool = Arc::new(WorkerPool::new(workers, "p9-test"));
    std::thread::spawn(move || match opts {
        None => p9::socket::serve(listener, srv, pool),
        Some(o) => p9::socket::serve_with(listener, srv, pool, o),
    });
    sock
}

/// A connection whose reads and writes fail rather than hang.
fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(HANG_GUARD)).unwrap();
    s.set_write_timeout(Some(HANG_GUARD)).unwrap();
    s
}

/// Decodes a reply and keeps it past its buffer.
fn decode_owned(b: &[u8]) -> (u16, Rmessage<'static>) {
    let (tag, m) = Rmessage::decode(b).unwrap();
    (tag, m.into_owned())
}

/// Sends the messages in one write and returns the replies in arrival order.
fn batch(s: &mut UnixStream, msgs: &[(u16, Tmessage<'_>)]) -> Vec<(u16, Rmessage<'static>)> {
    let mut b = Vec::new();
    for (tag, m) in msgs {
        m.encode(*tag, &mut b);
    }
    s.write_all(&b).unwrap();
    (0..msgs.len())
        .map(|_| decode_owned(&read_msg(s)))
        .collect()
}

/// Version, then attach of fid 1.
fn open_session(s: &mut UnixStream, msize: u32) {
    let r = batch(
        s,
        &[(
            wire::NOTAG,
            Tmessage::Version {
                msize,
                version: b"9P2000.L",
            },
        )],
    );
    assert!(
        matches!(r[0].1, Rmessage::Version { msize: m, .. } if m == msize),
        "{r:?}"
    );
    let r = batch(s, &[(1, anonymous_attach(1))]);
    assert!(matches!(r[0].1, Rmessage::Attach { .. }), "{r:?}");
}

/// Walks fid 1 (the root) to `name` as fid 2 (tag 2) and opens it with `flags` (tag 3).
fn open_file(s: &mut UnixStream, name: &[u8], flags: u32) {
    let walk = Tmessage::Walk {
        fid: 1,
        newfid: 2,
        names: wire::WalkNames::new(&[name]).unwrap(),
    };
    assert!(matches!(batch(s, &[(2, walk)])[0].1, Rmessage::Walk { .. }));
    let lopen = Tmessage::Lopen { fid: 2, flags };
    assert!(matches!(
        batch(s, &[(3, lopen)])[0].1,
        Rmessage::Lopen { .. }
    ));
}

/// Reads until the server ends the connection; it must send nothing more, and not hang.
fn assert_closed_by_server(s: &mut UnixStream) {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "got {} bytes, expected none", rest.len()),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
}

fn read_msg(s: &mut UnixStream) -> Vec<u8> {
    let mut size = [0u8; 4];
    s.read_exact(&mut size).expect("reply header");
    let mut m = size.to_vec();
    m.resize(u32::from_le_bytes(size) as usize, 0);
    s.read_exact(&mut m[4..]).expect("reply body");
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
    anonymous_attach(1).encode(1, &mut b);
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
        let (tag, r) = decode_owned(&read_msg(&mut s));
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
            order.push(decode_owned(&read_msg(&mut s)).0);
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
    assert_eq!(decode_owned(&read_msg(&mut s)), (9, Rmessage::Flush));
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

#[test]
fn a_client_that_never_reads_its_replies_stalls_only_itself() {
    let t = TempTree::new("noread");
    t.file("share/big", &vec![3u8; 1 << 20]);
    t.file("share/small", b"s");
    // One worker shared by both connections: if it ever waits on A's socket, B starves.
    let sock = start_with(&t, 1, None);
    const MSIZE: u32 = 65536;

    // A opens the big file, then asks for far more msize-sized reads than any socket buffer
    // holds, plus a flush of the last one, and reads nothing.
    let mut a = connect(&sock);
    open_session(&mut a, MSIZE);
    open_file(&mut a, b"big", 0);
    const READS: u16 = 500;
    let mut b = Vec::new();
    for tag in 1..=READS {
        Tmessage::Read {
            fid: 2,
            offset: 0,
            count: MSIZE - 11,
        }
        .encode(tag, &mut b);
    }
    Tmessage::Flush { oldtag: READS }.encode(READS + 1, &mut b);
    a.write_all(&b).unwrap();
    // Wait until A's replies have started to arrive: from here on its socket fills up.
    let mut p = libc::pollfd {
        fd: a.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd passed to it.
    let ready = unsafe { libc::poll(&mut p, 1, HANG_GUARD.as_millis() as i32) };
    assert_eq!(ready, 1, "no reply to A at all");

    // B, on the same server and pool, still gets every reply. Two requests per write keep
    // them off the reader's inline path, so they need the shared workers.
    let mut bc = connect(&sock);
    open_session(&mut bc, 8192);
    for _ in 0..100 {
        let r = batch(
            &mut bc,
            &[
                (
                    10,
                    Tmessage::Walk {
                        fid: 1,
                        newfid: 2,
                        names: wire::WalkNames::new(&[b"small"]).unwrap(),
                    },
                ),
                (
                    11,
                    Tmessage::Getattr {
                        fid: 1,
                        mask: wire::GETATTR_BASIC,
                    },
                ),
            ],
        );
        let mut tags: Vec<u16> = r.iter().map(|(t, _)| *t).collect();
        tags.sort();
        assert_eq!(tags, [10, 11]);
        for (tag, m) in &r {
            match tag {
                10 => assert!(
                    matches!(m, Rmessage::Walk { qids } if qids.len() == 1),
                    "{m:?}"
                ),
                _ => assert!(matches!(m, Rmessage::Getattr(_)), "{m:?}"),
            }
        }
        let r = batch(&mut bc, &[(12, Tmessage::Clunk { fid: 2 })]);
        assert_eq!(r[0], (12, Rmessage::Clunk));
    }

    // A's replies were only held back: each read is answered once, in full, and the Rflush
    // comes after the flushed read's reply.
    let mut seen = HashSet::new();
    let mut flushed_read_at = None;
    for i in 0..=READS as usize {
        match decode_owned(&read_msg(&mut a)) {
            (tag, Rmessage::Read { data }) => {
                assert_eq!(data.len(), (MSIZE - 11) as usize);
                assert!(seen.insert(tag), "tag {tag} answered twice");
                if tag == READS {
                    flushed_read_at = Some(i);
                }
            }
            (tag, Rmessage::Flush) => {
                assert_eq!(tag, READS + 1);
                assert!(
                    flushed_read_at.is_some(),
                    "Rflush before the flushed read's reply"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen.len(), READS as usize);
}

#[test]
fn connections_beyond_the_cap_are_closed_until_one_ends() {
    let t = TempTree::new("cap");
    t.file("share/f", b"f");
    let opts = SocketOptions {
        max_connections: 3,
        ..SocketOptions::default()
    };
    let sock = start_with(&t, 2, Some(opts));
    let streams: Vec<UnixStream> = (0..3).map(|_| connect(&sock)).collect();
    let mut clients: Vec<Client<&UnixStream>> = streams
        .iter()
        .map(|s| Client::new(s, 8192).unwrap())
        .collect();
    for c in &mut clients {
        c.attach(1, "", "", 0).unwrap();
    }
    let refused = |why: &str| {
        let s = connect(&sock);
        match Client::new(&s, 8192) {
            Ok(_) => panic!("{why}: a connection beyond the cap was served"),
            Err(ClientError::Io(e)) => assert!(
                matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                ),
                "{why}: expected the connection to be closed, got {e}"
            ),
            Err(e) => panic!("{why}: {e}"),
        }
    };
    refused("at the cap");
    refused("still at the cap");
    // The server ends its side of a connection only after giving its slot back.
    streams[0].shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    (&streams[0]).read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let s = connect(&sock);
    let mut c = Client::new(&s, 8192).unwrap();
    c.attach(1, "", "", 0).unwrap();
    c.walk(1, 2, &["f"]).unwrap();
    refused("at the cap again");
    // The connections within the cap were never disturbed.
    for c in &mut clients[1..] {
        c.walk(1, 2, &["f"]).unwrap();
        assert_eq!(c.getattr(2).unwrap().size, 1);
    }
}

#[test]
fn frames_beyond_the_negotiated_msize_close_the_connection() {
    let t = TempTree::new("msize");
    t.file("share/f", b"");
    let sock = start(&t);
    // The configured maximum is 512000; this session negotiates 8192.
    let mut s = connect(&sock);
    open_session(&mut s, 8192);
    open_file(&mut s, b"f", 2);
    // A frame of exactly msize is served.
    let data = vec![5u8; 8192 - 23];
    let w = Tmessage::Write {
        fid: 2,
        offset: 0,
        data: &data,
    };
    assert_eq!(
        batch(&mut s, &[(4, w)]),
        [(4, Rmessage::Write { count: 8192 - 23 })]
    );
    // A 100 KiB Twrite is not: the connection ends without an answer.
    let big = vec![6u8; 100 << 10];
    let mut b = Vec::new();
    Tmessage::Write {
        fid: 2,
        offset: 0,
        data: &big,
    }
    .encode(5, &mut b);
    // The server may close before taking all of it.
    let _ = s.write_all(&b);
    assert_closed_by_server(&mut s);
    assert_eq!(std::fs::read(t.join("share/f")).unwrap(), data);

    // So does a frame shorter than a header, before any Tversion.
    let mut s = connect(&sock);
    s.write_all(&[5, 0, 0, 0, wire::msg::TVERSION]).unwrap();
    assert_closed_by_server(&mut s);

    // The server goes on serving other connections.
    let mut c = Client::new(connect(&sock), 8192).unwrap();
    c.attach(1, "", "", 0).unwrap();
    c.walk(1, 2, &["f"]).unwrap();
    assert_eq!(c.getattr(2).unwrap().size, 8192 - 23);
}

#[test]
fn large_reads_arrive_whole_whether_spliced_or_pipelined() {
    // A synchronous client's large Rreads are spliced from the file to the socket; pipelined
    // ones are answered by pool workers through their buffers. Both carry the file's bytes.
    let t = TempTree::new("sock-large-read");
    let data: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    t.file("share/big", &data);
    let sock = start(&t);
    let mut c = Client::new(connect(&sock), 512_000).unwrap();
    let root = c.alloc_fid();
    c.attach(root, "u", "", 0).unwrap();
    let f = c.alloc_fid();
    c.walk(root, f, &["big"]).unwrap();
    c.lopen(f, 0).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let d = c.read(f, got.len() as u64 + 3, 400_000).unwrap();
        if d.is_empty() {
            break;
        }
        got.extend_from_slice(&d);
    }
    assert_eq!(got.len(), data.len() - 3);
    assert!(got == data[3..], "spliced reads differ from the file");
    // Pipelined: several reads in one write, answered concurrently.
    let mut s = connect(&sock);
    open_session(&mut s, 512_000);
    let names: [&[u8]; 1] = [b"big"];
    let r = batch(
        &mut s,
        &[(
            1,
            Tmessage::Walk {
                fid: 1,
                newfid: 2,
                names: wire::WalkNames::new(&names).unwrap(),
            },
        )],
    );
    assert!(matches!(r[0].1, Rmessage::Walk { .. }));
    let r = batch(&mut s, &[(2, Tmessage::Lopen { fid: 2, flags: 0 })]);
    assert!(matches!(r[0].1, Rmessage::Lopen { .. }));
    let reads: Vec<(u16, Tmessage<'_>)> = (0..3u16)
        .map(|k| {
            let m = Tmessage::Read {
                fid: 2,
                offset: k as u64 * 400_000,
                count: 400_000,
            };
            (10 + k, m)
        })
        .collect();
    for (tag, m) in batch(&mut s, &reads) {
        let off = (tag - 10) as usize * 400_000;
        match m {
            Rmessage::Read { data: d } => assert!(*d == data[off..off + 400_000]),
            other => panic!("read answered {other:?}"),
        }
    }
}
