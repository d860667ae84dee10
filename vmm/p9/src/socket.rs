//! Stream transport: serves 9P over unix-domain (or TCP) sockets, one session (fid space) per
//! connection, and keeps serving whatever a single client does.
//!
//! * Accepting: [`serve`]/[`serve_tcp`] (or the `_with` forms taking [`SocketOptions`]) accept
//!   forever. Errors that concern one connection or a passing shortage (descriptor or memory
//!   exhaustion, aborted connections, signals) are survived, resource shortages after a back-off
//!   of 10 ms doubling to 1 s that resets on the next success; only errors meaning the listener
//!   itself is unusable end the loop.
//! * Connection cap: at most [`SocketOptions::max_connections`] connections are served at once.
//!   A connection accepted beyond the cap is closed at once, so its client sees the stream end
//!   instead of waiting on a server that will not answer. A slot frees when its connection has
//!   ended: once a client's end of stream is read and every reply owed to it written, the server
//!   gives the slot back and only then closes its own end, so a client that half-closes and
//!   reads to the end can count on its slot being free.
//! * Framing: the reader refuses a frame shorter than the 7-byte header or longer than the
//!   session's msize (negotiated by Tversion; before it, the configured maximum) by closing the
//!   connection. Nothing is answered: the tag is not trusted, and skipping an oversized body
//!   would mean reading the peer's bytes to find the next frame.
//! * Requests: per connection, a reader thread reads requests and runs them concurrently on a
//!   shared [`WorkerPool`]; replies go out as they complete, out of order, matched by tag. A
//!   synchronous client (nothing in flight, nothing more to read) is served inline by its reader.
//! * Polling: with nothing left to read, a reader polls its socket for a short, adaptive window
//!   (`busy_poll.rs`, at most [`SocketOptions::busy_poll`]) before sleeping in `read`, so
//!   a synchronous client's next request does not wait for the reader to be woken. A reader
//!   polls only while its connection has nothing being served elsewhere and few readers of the
//!   listener are awake (one per two CPUs), so polling never takes CPU that clients or workers
//!   need.
//! * Replies: a pool worker never blocks on a socket. It writes its reply with a non-blocking
//!   send when nothing is queued before it, and otherwise (or for what did not fit) appends it to
//!   the connection's ordered reply queue, which a per-connection writer thread (started with the
//!   connection's first pooled request) drains with blocking writes. A reader serving inline
//!   writes with a blocking send too: waiting on its own client only stops that client's reads.
//!   A reader serving inline splices an Rread's file data to the socket without copying it when
//!   nothing else is being written ([`crate::splice`]).
//!   No lock is held while writing: a "writing" token in the connection state keeps the byte
//!   stream in order.
//! * Back-pressure: a connection owes at most [`SocketOptions::max_queued_replies`] replies
//!   (requests running, Rflushes waiting, replies queued but unwritten). At the limit its reader
//!   stops reading, so a client that does not read its replies stalls only itself, and holds at
//!   most that many replies (each at most msize bytes) in memory. There are no timeouts: such a
//!   client keeps its connection slot until it reads or goes away.
//! * Tflush: the Rflush goes out only after the flushed request's reply, as the protocol
//!   requires: a finishing request takes its tag out of the [`FlushTracker`] and puts its reply
//!   into the ordered stream in one step, and Rflushes waiting on it follow it.

use crate::busy_poll::{AwakeReaders, BusyPoll, Readiness};
use crate::flush::{flushed_tag, FlushTracker};
use crate::pool::WorkerPool;
use crate::server::Server;
use crate::splice::{push_all, SpliceReply};
use crate::wire;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The default [`SocketOptions::busy_poll`]: about the time a synchronous client takes to
/// read a reply and send its next request, plus slack.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// Receives the accept errors the accept loop survives.
pub type AcceptErrorHook = Arc<dyn Fn(&io::Error) + Send + Sync>;

/// Limits of a listening transport.
#[derive(Clone)]
pub struct SocketOptions {
    /// Connections served at once (at least 1); one accepted beyond it is closed at once.
    /// Each connection costs up to two threads and an msize-sized reply area.
    pub max_connections: usize,
    /// Replies one connection may owe at once (at least 1): requests running, Rflushes waiting
    /// and replies not yet written. At the limit the connection's reader stops reading.
    pub max_queued_replies: usize,
    /// The longest a connection's reader polls for the next request before sleeping (the
    /// window adapts below it; zero never polls); see `busy_poll.rs`.
    pub busy_poll: Duration,
    /// Called with each accept (or connection start) error the accept loop survives, e.g. to
    /// log it; the loop then carries on.
    pub on_accept_error: Option<AcceptErrorHook>,
}

impl Default for SocketOptions {
    /// 64 connections owing at most 64 replies each, polling up to 50 µs, errors not reported.
    fn default() -> Self {
        SocketOptions {
            max_connections: 64,
            max_queued_replies: 64,
            busy_poll: DEFAULT_BUSY_POLL,
            on_accept_error: None,
        }
    }
}

impl fmt::Debug for SocketOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketOptions")
            .field("max_connections", &self.max_connections)
            .field("max_queued_replies", &self.max_queued_replies)
            .field("busy_poll", &self.busy_poll)
            .field("on_accept_error", &self.on_accept_error.is_some())
            .finish()
    }
}

/// A connected stream socket that can be split into a reading and a writing half.
pub trait Conn: Read + Write + AsRawFd + Send + Sync + Sized + 'static {
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

/// Accepts connections on a unix socket forever with [`SocketOptions::default`], serving each
/// on its own session of `server`. Returns only if the listener itself fails.
pub fn serve(listener: UnixListener, server: Arc<Server>, pool: Arc<WorkerPool>) -> io::Result<()> {
    serve_with(listener, server, pool, SocketOptions::default())
}

/// Like [`serve`] with explicit limits.
pub fn serve_with(
    listener: UnixListener,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
    opts: SocketOptions,
) -> io::Result<()> {
    accept_loop(|| listener.accept().map(|(s, _)| s), server, pool, opts)
}

/// Like [`serve`] for a TCP listener (use loopback addresses only).
pub fn serve_tcp(
    listener: TcpListener,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
) -> io::Result<()> {
    serve_tcp_with(listener, server, pool, SocketOptions::default())
}

/// Like [`serve_tcp`] with explicit limits.
pub fn serve_tcp_with(
    listener: TcpListener,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
    opts: SocketOptions,
) -> io::Result<()> {
    accept_loop(|| listener.accept().map(|(s, _)| s), server, pool, opts)
}

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What an accept error means for the accept loop.
#[derive(Debug, PartialEq, Eq)]
enum AcceptFailure {
    /// The listener is unusable: give up.
    Fatal,
    /// Only the connection being accepted failed (or a signal came in): accept again at once.
    Connection,
    /// A shortage (descriptors, memory) or something unknown: accept again after a pause.
    Resources,
}

fn classify_accept_error(e: &io::Error) -> AcceptFailure {
    match e.raw_os_error() {
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptFailure::Fatal,
        // Linux reports errors pending on the new connection (and firewall verdicts) from
        // accept; each of them used up that connection, so retrying cannot spin.
        Some(
            libc::EINTR
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT
            | libc::ECONNRESET,
        ) => AcceptFailure::Connection,
        // EMFILE, ENFILE, ENOBUFS, ENOMEM, EAGAIN and anything unforeseen.
        _ => AcceptFailure::Resources,
    }
}

fn accept_loop<C: Conn>(
    mut accept: impl FnMut() -> io::Result<C>,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
    opts: SocketOptions,
) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let max = opts.max_connections.max(1);
    let limits = ConnLimits::new(&opts);
    let mut delay = BACKOFF_MIN;
    loop {
        let (e, failure) = match accept() {
            Ok(s) => match Slot::take(&active, max) {
                // Over the cap: dropping the stream closes the connection at once.
                None => continue,
                Some(slot) => match spawn_connection(s, &server, &pool, limits.clone(), slot) {
                    Ok(()) => {
                        delay = BACKOFF_MIN;
                        continue;
                    }
                    // No thread for it: the connection is closed; wait for resources.
                    Err(e) => (e, AcceptFailure::Resources),
                },
            },
            Err(e) => {
                let f = classify_accept_error(&e);
                (e, f)
            }
        };
        if failure == AcceptFailure::Fatal {
            return Err(e);
        }
        if let Some(report) = &opts.on_accept_error {
            report(&e);
        }
        if failure == AcceptFailure::Resources {
            std::thread::sleep(delay);
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
}

/// One of the accept loop's connection slots, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's limits, from [`SocketOptions`].
#[derive(Clone)]
struct ConnLimits {
    max_queued: usize,
    busy_poll: Duration,
    /// Shared by every connection of one listener.
    awake_readers: Arc<AwakeReaders>,
}

impl ConnLimits {
    /// The limits `opts` sets, with a fresh count of awake readers.
    fn new(opts: &SocketOptions) -> Self {
        ConnLimits {
            max_queued: opts.max_queued_replies.max(1),
            busy_poll: opts.busy_poll,
            awake_readers: AwakeReaders::for_this_host(),
        }
    }
}

fn spawn_connection<C: Conn>(
    s: C,
    server: &Arc<Server>,
    pool: &Arc<WorkerPool>,
    limits: ConnLimits,
    slot: Slot,
) -> io::Result<()> {
    let session = server.new_session();
    let pool = pool.clone();
    std::thread::Builder::new()
        .name("p9-conn".into())
        .spawn(move || {
            let _ = run_connection(s, session, pool, limits, Some(slot));
        })?;
    Ok(())
}

/// How the calling thread may write a reply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SendMode {
    /// The connection's own reader: may block on its own socket.
    Block,
    /// A shared pool worker: must not block; what does not fit is queued for the writer.
    NoBlock,
}

/// What a connection's threads share, under one lock.
#[derive(Default)]
struct Inner {
    /// In-flight tags with the Tflush tags waiting for each of them.
    flushes: FlushTracker<u16>,
    /// Replies not produced yet: requests running plus Rflushes waiting on them.
    owed: usize,
    /// Reply bytes to write, in order; only the token holder writes, so nothing here goes out
    /// before what the token holder is writing.
    queue: VecDeque<Vec<u8>>,
    /// The writing token: some thread is writing to the socket.
    writing: bool,
    /// The reader has stopped; the writer ends once everything owed is written.
    reading_done: bool,
    /// A write failed or the reader gave up on the peer: nothing more is written.
    broken: bool,
    writer_waiting: bool,
    reader_waiting: bool,
}

struct ConnState<C> {
    /// The writing half; owns `fd`.
    _sock: C,
    fd: RawFd,
    max_queued: usize,
    inner: Mutex<Inner>,
    wake_writer: Condvar,
    wake_reader: Condvar,
}

impl<C> ConnState<C> {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the connection's writer or reader if it waits for something `i` now satisfies.
    fn wake(&self, i: &mut Inner) {
        let writer_can_go =
            i.broken || (!i.writing && (!i.queue.is_empty() || (i.reading_done && i.owed == 0)));
        if i.writer_waiting && writer_can_go {
            i.writer_waiting = false;
            self.wake_writer.notify_one();
        }
        if i.reader_waiting && (i.broken || i.owed + i.queue.len() < self.max_queued) {
            i.reader_waiting = false;
            self.wake_reader.notify_one();
        }
    }

    /// Marks the connection failed and shuts the socket down, which also ends the reader.
    fn break_conn(&self, i: &mut Inner) {
        i.broken = true;
        i.queue.clear();
        // SAFETY: `fd` is owned by `_sock`, alive as long as `self`; shutdown touches no memory.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }

    /// Puts `reply` into the connection's byte stream after everything already in it. With
    /// `done`, this is that in-flight request's reply: the Rflushes waiting for it follow it.
    fn send(&self, done: Option<u16>, reply: &[u8], how: SendMode) {
        let mut i = self.lock();
        let mut with_flushes = None;
        if let Some(tag) = done {
            let waiting = i.flushes.finish(tag);
            i.owed = i.owed.saturating_sub(1 + waiting.len());
            if !waiting.is_empty() {
                let mut b = reply.to_vec();
                for t in waiting {
                    wire::Rmessage::Flush.encode(t, &mut b);
                }
                with_flushes = Some(b);
            }
        }
        let bytes = with_flushes.as_deref().unwrap_or(reply);
        if i.broken || bytes.is_empty() {
            self.wake(&mut i);
            return;
        }
        if i.writing || !i.queue.is_empty() {
            i.queue.push_back(bytes.to_vec());
            self.wake(&mut i);
            return;
        }
        i.writing = true;
        drop(i);
        let r = write_fd(self.fd, bytes, how == SendMode::Block);
        let mut i = self.lock();
        i.writing = false;
        match r {
            Ok(n) if n < bytes.len() && !i.broken => i.queue.push_front(bytes[n..].to_vec()),
            Ok(_) => {}
            Err(_) => self.break_conn(&mut i),
        }
        self.wake(&mut i);
    }

    /// Takes the writing token when nothing is being written or waits to be: the caller then
    /// writes to the socket `fd` itself and gives the token back with [`Self::release_token`].
    fn take_token(&self) -> Option<RawFd> {
        let mut i = self.lock();
        if i.broken || i.writing || !i.queue.is_empty() {
            return None;
        }
        i.writing = true;
        Some(self.fd)
    }

    /// Gives back the writing token after writing `r`.
    fn release_token(&self, r: io::Result<()>) {
        let mut i = self.lock();
        i.writing = false;
        if r.is_err() {
            self.break_conn(&mut i);
        }
        self.wake(&mut i);
    }

    /// The writer thread: writes queued replies until the reader is done and nothing is owed.
    fn write_loop(&self) {
        let mut i = self.lock();
        loop {
            if i.broken {
                return;
            }
            if !i.writing {
                if let Some(b) = i.queue.pop_front() {
                    i.writing = true;
                    drop(i);
                    let r = write_fd(self.fd, &b, true);
                    i = self.lock();
                    i.writing = false;
                    if r.is_err() {
                        self.break_conn(&mut i);
                    }
                    self.wake(&mut i);
                    continue;
                }
                if i.reading_done && i.owed == 0 {
                    return;
                }
            }
            i.writer_waiting = true;
            i = self.wake_writer.wait(i).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The reader has stopped; `abort` drops whatever is still owed and closes the socket.
    fn reading_done(&self, abort: bool) {
        let mut i = self.lock();
        i.reading_done = true;
        if abort && !i.broken {
            self.break_conn(&mut i);
        }
        self.wake(&mut i);
    }
}

/// Writes `b` to the socket `fd` from the start; returns how much was written. Without `block`,
/// stops early (rather than waiting) when the socket buffer is full.
fn write_fd(fd: RawFd, b: &[u8], block: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | if block { 0 } else { libc::MSG_DONTWAIT };
    push_all(fd, b.len(), block, |done| {
        let rest = &b[done..];
        // SAFETY: the pointer and length describe the live slice `rest`, which send only reads.
        unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), flags) }
    })
}

thread_local! {
    /// One reply area per thread, reused across requests (msize-sized areas are large).
    static REPLY: RefCell<SpliceReply> = RefCell::new(SpliceReply::plain(0));
}

/// Handles `req` into this thread's reply area and passes the area and the reply's length to
/// `f`. With `splice` (a connection's own reader, which may write to its socket directly), an
/// Rread's data is spliced rather than copied (see [`crate::splice`]); a thread is either a
/// reader or a pool worker, so its area is made one way once.
fn with_reply(
    server: &Server,
    req: &[u8],
    cap: usize,
    splice: bool,
    f: impl FnOnce(&mut SpliceReply, usize),
) {
    REPLY.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() != cap {
            *r = if splice {
                SpliceReply::new(cap)
            } else {
                SpliceReply::plain(cap)
            };
        }
        let len = server.handle(req, &mut *r);
        f(&mut r, len);
    })
}

/// Serves one connection until the peer closes it; `server` is the session to use. The
/// connection may owe [`SocketOptions::default`]'s number of replies at once, and its reader
/// polls as [`SocketOptions::default`] says, counting only itself as an awake reader (it is
/// not part of a listener).
pub fn serve_connection<C: Conn>(
    stream: C,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
) -> io::Result<()> {
    let limits = ConnLimits::new(&SocketOptions::default());
    run_connection(stream, server, pool, limits, None)
}

fn run_connection<C: Conn>(
    mut stream: C,
    server: Arc<Server>,
    pool: Arc<WorkerPool>,
    limits: ConnLimits,
    slot: Option<Slot>,
) -> io::Result<()> {
    let sock = stream.try_clone_conn()?;
    let state = Arc::new(ConnState {
        fd: sock.as_raw_fd(),
        _sock: sock,
        max_queued: limits.max_queued,
        inner: Mutex::new(Inner::default()),
        wake_writer: Condvar::new(),
        wake_reader: Condvar::new(),
    });
    let mut writer = None;
    let mut poll = BusyPoll::new(limits.busy_poll, limits.awake_readers);
    let result = read_loop(&mut stream, &state, &server, &pool, &mut writer, &mut poll);
    state.reading_done(result.is_err());
    if let Some(w) = writer {
        let _ = w.join();
    }
    // Give the slot back before the peer can see the stream end, so that a client which has
    // seen its connection end can count on the slot being free.
    drop(slot);
    // SAFETY: `stream` owns this descriptor and is alive; shutdown touches no memory.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR) };
    result
}

fn read_loop<C: Conn>(
    stream: &mut C,
    state: &Arc<ConnState<C>>,
    server: &Arc<Server>,
    pool: &Arc<WorkerPool>,
    writer: &mut Option<JoinHandle<()>>,
    poll: &mut BusyPoll,
) -> io::Result<()> {
    // Buffered reads: one syscall usually brings in a whole request (often several).
    let mut stream = BufReader::with_capacity(1 << 16, stream);
    // The request being read, reused while requests are served inline.
    let mut req = Vec::new();
    loop {
        let readiness = if stream.buffer().is_empty() {
            poll.before_read(state.fd, || {
                let i = state.lock();
                i.owed == 0 && !i.writing && i.queue.is_empty()
            })
        } else {
            Readiness::Ready
        };
        let mut size = [0u8; 4];
        match stream.read_exact(&mut size) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Readiness::MaySleep(since) = readiness {
            poll.slept(since, Instant::now());
        }
        let n = u32::from_le_bytes(size) as usize;
        // The negotiated msize, or the configured maximum before any Tversion.
        let limit = server.msize() as usize;
        if n < wire::HEADER_LEN || n > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("9P message of {n} bytes outside 7..={limit}; closing the connection"),
            ));
        }
        req.clear();
        req.resize(n, 0);
        req[..4].copy_from_slice(&size);
        stream.read_exact(&mut req[4..])?;
        let ty = req[4];
        let tag = wire::peek_tag(&req);
        let reply_cap = server.msize() as usize;

        let mut i = state.lock();
        // Back-pressure: while the connection owes too many replies, read nothing more.
        while !i.broken && i.owed + i.queue.len() >= state.max_queued {
            i.reader_waiting = true;
            i = state.wake_reader.wait(i).unwrap_or_else(|e| e.into_inner());
        }
        if i.broken {
            return Ok(());
        }
        if let Some(oldtag) = flushed_tag(&req) {
            if i.flushes.flush(oldtag, tag).is_none() {
                // Answered after the flushed request's reply.
                i.owed += 1;
                continue;
            }
            drop(i);
            let mut b = Vec::with_capacity(wire::HEADER_LEN);
            wire::Rmessage::Flush.encode(tag, &mut b);
            state.send(None, &b, SendMode::Block);
            continue;
        }
        // Version resets the session: run it inline, in order. A synchronous client (nothing in
        // flight, nothing more read) is served inline too, saving two thread hand-offs; fsync
        // may take long, so it always goes to the pool. Whether more has arrived on the socket
        // is not asked (a system call per request): the buffered read took all there was a
        // moment ago, and a request arriving during an inline one waits for it only.
        let idle = ty != wire::msg::TFSYNC && i.owed == 0 && stream.buffer().is_empty();
        if ty == wire::msg::TVERSION || idle {
            drop(i);
            with_reply(server, &req, reply_cap.max(64), true, |r, len| {
                r.send(
                    len,
                    || state.take_token(),
                    |head| write_fd(state.fd, head, true).is_ok_and(|n| n == head.len()),
                    |res| state.release_token(res),
                    |bytes| state.send(None, bytes, SendMode::Block),
                )
            });
            continue;
        }
        if writer.is_none() {
            let st = state.clone();
            *writer = Some(
                std::thread::Builder::new()
                    .name("p9-conn-write".into())
                    .spawn(move || st.write_loop())?,
            );
        }
        // A reused tag is counted, so no waiting Rflush is ever lost or sent early.
        i.flushes.start(tag);
        i.owed += 1;
        drop(i);
        let st = state.clone();
        let srv = server.clone();
        let req = req.clone();
        pool.submit(Box::new(move || {
            with_reply(&srv, &req, reply_cap, false, |r, len| {
                r.send(
                    len,
                    || None,
                    |_| false,
                    |_| {},
                    |bytes| st.send(Some(tag), bytes, SendMode::NoBlock),
                )
            });
        }));
    }
}
