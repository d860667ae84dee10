//! Stream transport: serves 9P over unix-domain (or TCP) sockets. Per connection, a reader
//! thread reads complete requests and runs them concurrently on a [`WorkerPool`]; replies are
//! written as they complete, out of order, matched by tag. Each connection is its own session
//! (fid space) on the share. Tflush is answered only after the flushed request's reply has been
//! written, as the protocol requires.

use crate::pool::WorkerPool;
use crate::reply::VecReply;
use crate::server::Server;
use crate::wire;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

/// A byte stream that can be split into a reading and a writing half.
pub trait Conn: Read + Write + AsRawFd + Send + Sized + 'static {
    fn try_clone_conn(&self) -> io::Result<Self>;
}

impl Conn for UnixStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl Conn for TcpStream {
    fn try_clone_conn(&self) -> io::Result<Self> {
        self.set_nodelay(true)?;
        self.try_clone()
    }
}

/// Accepts connections on a unix socket forever, serving each on its own session of `server`.
/// Returns only if accepting fails.
pub fn serve(listener: UnixListener, server: Arc<Server>, pool: Arc<WorkerPool>) -> io::Result<()> {
    loop {
        let (s, _) = listener.accept()?;
        spawn_connection(s, &server, &pool)?;
    }
}

/// Like [`serve`] for a TCP listener (use loopback addresses only).
pub fn serve_tcp(
    listener: TcpListener,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
) -> io::Result<()> {
    loop {
        let (s, _) = listener.accept()?;
        spawn_connection(s, &server, &pool)?;
    }
}

fn spawn_connection<C: Conn>(s: C, server: &Arc<Server>, pool: &Arc<WorkerPool>) -> io::Result<()> {
    let session = server.new_session();
    let pool = pool.clone();
    std::thread::Builder::new()
        .name("p9-conn".into())
        .spawn(move || {
            let _ = serve_connection(s, session, pool);
        })?;
    Ok(())
}

struct ConnState<C> {
    writer: Mutex<C>,
    /// In-flight tags and the Tflush tags waiting for each of them.
    inflight: Mutex<HashMap<u16, Vec<u16>>>,
}

impl<C: Write> ConnState<C> {
    fn write(&self, b: &[u8]) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // A failed write means the peer is gone; the reader notices and ends the connection.
        let _ = w.write_all(b);
    }
    fn rflush(&self, tag: u16) {
        let mut b = Vec::with_capacity(7);
        wire::Rmessage::Flush.encode(tag, &mut b);
        self.write(&b);
    }
}

thread_local! {
    /// One reply area per thread, reused across requests (msize-sized areas are large).
    static REPLY: RefCell<VecReply> = RefCell::new(VecReply::new(0));
}

/// Handles `req` into this thread's reply area and passes the reply bytes to `f`.
fn with_reply(server: &Server, req: &[u8], cap: usize, f: impl FnOnce(&[u8])) {
    REPLY.with(|r| {
        let mut r = r.borrow_mut();
        if r.as_slice().len() != cap {
            *r = VecReply::new(cap);
        }
        let len = server.handle(req, &mut *r);
        f(&r.as_slice()[..len]);
    })
}

/// Bytes waiting to be read on a socket (0 if unknown).
fn pending(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Serves one connection until the peer closes it; `server` is the session to use.
pub fn serve_connection<C: Conn>(
    stream: C,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
) -> io::Result<()> {
    let state = Arc::new(ConnState {
        writer: Mutex::new(stream.try_clone_conn()?),
        inflight: Mutex::new(HashMap::new()),
    });
    // Buffered reads: one syscall usually brings in a whole request (often several).
    let fd = stream.as_raw_fd();
    let mut stream = std::io::BufReader::with_capacity(1 << 16, stream);
    loop {
        let mut size = [0u8; 4];
        match stream.read_exact(&mut size) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let n = u32::from_le_bytes(size) as usize;
        let limit = server.config().msize.max(server.msize()) as usize;
        if n < wire::HEADER_LEN || n > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("9P message of {n} bytes outside 7..={limit}; closing the connection"),
            ));
        }
        let mut req = vec![0u8; n];
        req[..4].copy_from_slice(&size);
        stream.read_exact(&mut req[4..])?;
        let ty = req[4];
        let tag = wire::peek_tag(&req);
        let reply_cap = server.msize() as usize;
        if ty == wire::msg::TFLUSH {
            let oldtag = u16::from_le_bytes([
                req.get(7).copied().unwrap_or(0),
                req.get(8).copied().unwrap_or(0),
            ]);
            let mut inf = state.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = inf.get_mut(&oldtag) {
                w.push(tag);
            } else {
                drop(inf);
                state.rflush(tag);
            }
            continue;
        }
        // Version resets the session: run it inline, in order. A synchronous client (nothing in
        // flight, nothing more to read) is served inline too, saving two thread hand-offs;
        // fsync may take long, so it always goes to the pool.
        let idle = ty != wire::msg::TFSYNC
            && state
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            && stream.buffer().is_empty()
            && pending(fd) == 0;
        if ty == wire::msg::TVERSION || idle {
            with_reply(&server, &req, reply_cap.max(64), |r| state.write(r));
            continue;
        }
        state
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tag, Vec::new());
        let st = state.clone();
        let srv = server.clone();
        pool.submit(Box::new(move || {
            let mut waiting = Vec::new();
            with_reply(&srv, &req, reply_cap, |r| {
                let mut inf = st.inflight.lock().unwrap_or_else(|e| e.into_inner());
                waiting = inf.remove(&tag).unwrap_or_default();
                // Write while holding the in-flight lock so a Tflush cannot slip in between.
                st.write(r);
            });
            for t in waiting {
                st.rflush(t);
            }
        }));
    }
}
