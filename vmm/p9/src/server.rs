//! The 9P2000.L server: one [`Server`] per exported directory (a "share"), handling complete
//! requests from any number of threads at once and writing replies through [`ReplyBuf`].
//!
//! Confinement: every fid owns one `O_PATH` descriptor; names are resolved one component at a
//! time with `openat(O_PATH|O_NOFOLLOW)` so symlinks are never followed on the host, `..` is
//! clamped at the share root, and a directory that has left the share (moved away on the host
//! while the guest held a fid in it) answers ENOENT to everything named through it (see
//! [`crate::confine`]). Names with `/` or NUL are refused, device nodes, FIFOs and sockets are
//! never opened (the type of the inode an `O_PATH` fd refers to cannot change, so checking it and
//! then reopening through `/proc/self/fd/N` is race-free), read-only shares answer EROFS to every
//! mutating request, the numbers of fids and open files are capped per session, and a refused
//! request leaves the host tree as it was (limits are taken before anything is created, and a
//! create whose later steps fail is undone).
//!
//! Speed: fids live in a sharded hash table (no global lock on the hot path), reads go straight
//! from the file into the reply area (`ReplyBuf::read_from`), readdir builds qids from
//! `d_ino`/`d_type` without a stat per entry, and msize goes up to [`Config::msize`].

use crate::confine::{Root, PATH_BUF};
use crate::ownership::{self, GuestAttr, Ownership};
use crate::reply::ReplyBuf;
use crate::wire::{self, msg, Attr, Qid, SetAttr, StatFs, Tmessage, Writer};
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use thiserror::Error;

/// Server limits and policy.
#[derive(Debug, Clone)]
pub struct Config {
    /// Refuse every mutating request with EROFS.
    pub read_only: bool,
    /// Largest msize accepted in Tversion.
    pub msize: u32,
    /// Largest number of fids alive at once in one session.
    pub max_fids: usize,
    /// Largest number of opened (lopen/lcreate) fids at once in one session.
    pub max_open_files: usize,
    /// Test-only: `false` removes the checks that keep walks and requests beneath the share root
    /// (see [`crate::confine`]), so escape tests can show that the process sandbox alone stops
    /// them. Never turn it off otherwise.
    pub resolution_checks: bool,
    /// How a writable share treats the guest's owners, set-id bits and device nodes.
    pub ownership: Ownership,
}

impl Default for Config {
    /// Writable, msize 512000, and fid/open-file limits of 65536/4096 or half/a quarter of the
    /// process's open-file limit, whichever is smaller (every fid holds a descriptor).
    fn default() -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur as usize
        } else {
            1024
        };
        Config {
            read_only: false,
            msize: 512_000,
            max_fids: 65_536.min(nofile / 2).max(64),
            max_open_files: 4096.min(nofile / 4).max(16),
            resolution_checks: true,
            ownership: Ownership::Mapped,
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit and returns the new soft
/// limit. Every fid holds a descriptor, so call this before [`Config::default`] when guests may
/// keep many files cached (e.g. a Linux client mounted with `cache=loose`).
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Errors creating a server.
#[derive(Debug, Error)]
pub enum Error {
    #[error("share root {path:?} cannot be opened: {source}; pass an existing directory")]
    RootOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("share root {0:?} is not a directory; pass a directory to export")]
    RootNotDir(PathBuf),
    #[error(
        "cannot open /proc/self/fd ({0}); the 9P server needs /proc mounted to reopen files safely"
    )]
    Proc(std::io::Error),
}

/// Smallest msize we negotiate (room for a header plus a useful payload).
const MIN_MSIZE: u32 = 4096;
const SHARDS: usize = 64;
const HIST_BUCKETS: usize = 40;

// 9P2000.L open flags (x86 Linux values, independent of the host architecture).
const DOTL_ACCMODE: u32 = 0o3;
const DOTL_CREATE: u32 = 0o100;
const DOTL_TRUNC: u32 = 0o1000;
const DOTL_APPEND: u32 = 0o2000;
const DOTL_DSYNC: u32 = 0o10000;
const DOTL_SYNC: u32 = 0o4000000;

type Errno = i32;

fn errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Retries a libc call on EINTR; maps -1 to the errno.
fn cvt<T: Copy + PartialOrd + Default>(mut f: impl FnMut() -> T) -> Result<T, Errno> {
    loop {
        let r = f();
        if r >= T::default() {
            return Ok(r);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// A NUL-terminated name on the stack: a single path component, validated.
struct Name {
    buf: [u8; 256],
}

impl Name {
    /// Accepts a single component: non-empty, no `/`, no NUL, not `.`/`..` (unless `dots`), at
    /// most 255 bytes.
    fn new(name: &[u8], dots: bool) -> Result<Name, Errno> {
        if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
            return Err(libc::EINVAL);
        }
        if !dots && (name == b"." || name == b"..") {
            return Err(libc::EINVAL);
        }
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        let mut buf = [0u8; 256];
        buf[..name.len()].copy_from_slice(name);
        Ok(Name { buf })
    }
    fn from_fd(fd: RawFd) -> Name {
        let mut buf = [0u8; 256];
        let s = fd.to_string();
        buf[..s.len()].copy_from_slice(s.as_bytes());
        Name { buf }
    }
    fn ptr(&self) -> *const libc::c_char {
        self.buf.as_ptr().cast()
    }
    fn bytes(&self) -> &[u8] {
        let n = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.buf.len());
        &self.buf[..n]
    }
}

const EMPTY: &CStr = c"";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    /// Device nodes, FIFOs, sockets: never opened.
    Special,
}

fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Special,
    }
}

fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat64, Errno> {
    // SAFETY: stat64 is plain data; zeroed is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open, EMPTY is a valid C string, `st` is a valid out pointer.
    cvt(|| unsafe {
        libc::fstatat64(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn fstat_raw(fd: RawFd) -> Result<libc::stat64, Errno> {
    // SAFETY: the caller passes a descriptor it holds open for the duration of the call.
    fstat(unsafe { BorrowedFd::borrow_raw(fd) })
}

fn fstatat(dir: BorrowedFd<'_>, name: &Name) -> Result<libc::stat64, Errno> {
    // SAFETY: stat64 is plain data; zeroed is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is open, `name` is NUL-terminated, `st` is a valid out pointer.
    cvt(|| unsafe {
        libc::fstatat64(
            dir.as_raw_fd(),
            name.ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn openat(dir: BorrowedFd<'_>, name: &Name, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: `dir` is open and `name` is NUL-terminated; the result is checked.
    let fd = cvt(|| unsafe {
        libc::openat(dir.as_raw_fd(), name.ptr(), flags | libc::O_CLOEXEC, mode)
    })?;
    // SAFETY: openat returned a new descriptor we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    fd.try_clone_to_owned()
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

/// One session's live fids and open files, counted against its own caps so that one session
/// cannot lock the others out.
#[derive(Default)]
struct Limits {
    fids: AtomicUsize,
    open_files: AtomicUsize,
}

/// Counts a resource for as long as the guard lives.
struct Count {
    limits: Arc<Limits>,
    which: fn(&Limits) -> &AtomicUsize,
}

impl Count {
    fn take(
        limits: &Arc<Limits>,
        which: fn(&Limits) -> &AtomicUsize,
        max: usize,
        err: Errno,
    ) -> Result<Count, Errno> {
        let c = which(limits);
        if c.fetch_add(1, Ordering::Relaxed) >= max {
            c.fetch_sub(1, Ordering::Relaxed);
            return Err(err);
        }
        Ok(Count {
            limits: limits.clone(),
            which,
        })
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        (self.which)(&self.limits).fetch_sub(1, Ordering::Relaxed);
    }
}

struct OpenFile {
    fd: OwnedFd,
    /// Serialises lseek+getdents on directories.
    dir_lock: Mutex<()>,
    _count: Count,
}

struct Fid {
    /// O_PATH descriptor of the file this fid names.
    fd: Arc<OwnedFd>,
    kind: Kind,
    dev: u64,
    ino: u64,
    /// The directory this fid was walked or created in and its name there, when known: how
    /// Tremove and Trename find the entry without rebuilding a path (checked against `dev`/`ino`
    /// before use, since either may have been renamed since).
    entry: Option<(Arc<OwnedFd>, Box<[u8]>)>,
    /// The guest user this fid was attached as (owner of what is created through it).
    uid: u32,
    open: OnceLock<OpenFile>,
    _count: Count,
}

#[derive(Default)]
struct FidHasher(u64);

impl Hasher for FidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Shard = Mutex<HashMap<u32, Arc<Fid>, BuildHasherDefault<FidHasher>>>;

/// Fid table sharded by fid number: lookups take one short per-shard lock.
struct FidTable {
    shards: Box<[Shard]>,
}

impl FidTable {
    fn new() -> Self {
        FidTable {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }
    fn shard(
        &self,
        fid: u32,
    ) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Fid>, BuildHasherDefault<FidHasher>>> {
        self.shards[fid as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
    fn get(&self, fid: u32) -> Result<Arc<Fid>, Errno> {
        self.shard(fid).get(&fid).cloned().ok_or(libc::EBADF)
    }
    fn insert_new(&self, fid: u32, f: Arc<Fid>) -> Result<(), Errno> {
        if fid == wire::NOFID {
            return Err(libc::EBADF);
        }
        let mut s = self.shard(fid);
        if s.contains_key(&fid) {
            return Err(libc::EBADF);
        }
        s.insert(fid, f);
        Ok(())
    }
    fn replace(&self, fid: u32, f: Arc<Fid>) -> Option<Arc<Fid>> {
        self.shard(fid).insert(fid, f)
    }
    fn remove(&self, fid: u32) -> Option<Arc<Fid>> {
        self.shard(fid).remove(&fid)
    }
    fn clear(&self) {
        for s in self.shards.iter() {
            // Drop the fids outside the lock.
            let old = std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner()));
            drop(old);
        }
    }
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// Per-message-type counters and latency histograms (power-of-two nanosecond buckets),
/// overall and per type.
struct Stats {
    enabled: AtomicBool,
    count: Box<[AtomicU64]>,
    nanos: Box<[AtomicU64]>,
    errors: AtomicU64,
    hist: Box<[AtomicU64]>,
    /// `type_hist[ty * HIST_BUCKETS + b]`.
    type_hist: Box<[AtomicU64]>,
}

/// A snapshot of the request statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// (message name, requests, total nanoseconds) for every type seen.
    pub by_type: Vec<(&'static str, u64, u64)>,
    /// Requests answered with Rlerror.
    pub errors: u64,
    /// `histogram[i]` counts requests whose latency in nanoseconds is `i` bits long, i.e. in
    /// `[2^(i-1), 2^i)`.
    pub histogram: Vec<u64>,
    /// The same histogram per message type, for the types in `by_type`.
    pub type_histograms: Vec<(&'static str, Vec<u64>)>,
}

/// An upper bound of the `q` quantile (0..=1) of a latency histogram, in nanoseconds: the
/// upper edge of the bucket holding it. None for an empty histogram.
pub fn histogram_quantile(histogram: &[u64], q: f64) -> Option<u64> {
    let total: u64 = histogram.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (bits, n) in histogram.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(1u64 << bits.min(63));
        }
    }
    None
}

impl std::fmt::Display for StatsSnapshot {
    /// One line per message type: requests, mean, and p50/p95/p99 upper bounds.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "request", "count", "mean ns", "p50 <=", "p95 <=", "p99 <="
        )?;
        for (name, n, ns) in &self.by_type {
            let hist = self
                .type_histograms
                .iter()
                .find(|(t, _)| t == name)
                .map(|(_, h)| h.as_slice())
                .unwrap_or(&[]);
            let q = |q| histogram_quantile(hist, q).map_or("-".to_string(), |v| v.to_string());
            writeln!(
                f,
                "{name:>12} {n:>10} {:>10} {:>10} {:>10} {:>10}",
                ns / (*n).max(1),
                q(0.5),
                q(0.95),
                q(0.99)
            )?;
        }
        writeln!(f, "{:>12} {:>10}", "errors", self.errors)
    }
}

struct Share {
    root: Root,
    config: Config,
    stats: Stats,
}

/// A 9P2000.L server for one exported directory. `Send + Sync`; call [`Server::handle`] from
/// as many threads as you like. Each `Server` value is one session (one fid space); use
/// [`Server::new_session`] for another connection to the same share.
pub struct Server {
    share: Arc<Share>,
    fids: FidTable,
    limits: Arc<Limits>,
    msize: AtomicU32,
}

fn dotl_to_open_flags(flags: u32) -> i32 {
    let mut f = match flags & DOTL_ACCMODE {
        1 => libc::O_WRONLY,
        2 => libc::O_RDWR,
        _ => libc::O_RDONLY,
    };
    if flags & DOTL_TRUNC != 0 {
        f |= libc::O_TRUNC;
    }
    if flags & DOTL_APPEND != 0 {
        f |= libc::O_APPEND;
    }
    if flags & DOTL_DSYNC != 0 {
        f |= libc::O_DSYNC;
    }
    if flags & DOTL_SYNC != 0 {
        f |= libc::O_SYNC;
    }
    f
}

fn dotl_writes(flags: u32) -> bool {
    matches!(flags & DOTL_ACCMODE, 1 | 2) || flags & (DOTL_TRUNC | DOTL_APPEND | DOTL_CREATE) != 0
}

fn dtype_to_qtype(t: u8) -> u8 {
    match t {
        libc::DT_DIR => wire::QTDIR,
        libc::DT_LNK => wire::QTSYMLINK,
        _ => wire::QTFILE,
    }
}

impl Share {
    fn qid_path(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root.dev {
            ino
        } else {
            ino ^ (dev.wrapping_mul(0x9E37_79B9_7F4A_7C15) & 0xffff_0000_0000_0000)
        }
    }
    fn qid(&self, st: &libc::stat64) -> Qid {
        let ty = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => wire::QTDIR,
            libc::S_IFLNK => wire::QTSYMLINK,
            _ => wire::QTFILE,
        };
        let v =
            (st.st_mtime as u32) ^ (st.st_mtime_nsec as u32).rotate_left(16) ^ (st.st_size as u32);
        Qid {
            ty,
            version: if v == 0 { 1 } else { v },
            path: self.qid_path(st.st_dev, st.st_ino),
        }
    }
}

/// `open(2)` with `O_CLOEXEC` added, as an owned descriptor.
fn open_cloexec(path: &CStr, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: `path` is a valid C string; the result is checked before use.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Server {
    /// Exports `root` (must be an existing directory).
    pub fn new(root: &Path, config: Config) -> Result<Arc<Server>, Error> {
        let c = CString::new(root.as_os_str().as_bytes()).map_err(|_| Error::RootOpen {
            path: root.into(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let rootfd = open_cloexec(&c, libc::O_PATH).map_err(|source| Error::RootOpen {
            path: root.into(),
            source,
        })?;
        Server::with_root(rootfd, root, config)
    }

    /// Exports the directory `root` refers to: an fd the caller opened once (an `O_PATH` fd
    /// is enough), so the directory checked by the caller is the one served, whatever is
    /// renamed onto its path later. `path` only names it in errors.
    pub fn with_root(root: OwnedFd, path: &Path, config: Config) -> Result<Arc<Server>, Error> {
        let st = fstat(root.as_fd()).map_err(|e| Error::RootOpen {
            path: path.into(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        if kind_of(st.st_mode) != Kind::Dir {
            return Err(Error::RootNotDir(path.into()));
        }
        let proc_fd = open_cloexec(c"/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY)
            .map_err(Error::Proc)?;
        let share = Share {
            root: Root {
                fd: root,
                dev: st.st_dev,
                ino: st.st_ino,
                proc_fd,
                checks: config.resolution_checks,
            },
            config: config.clone(),
            stats: Stats {
                enabled: AtomicBool::new(false),
                count: (0..256).map(|_| AtomicU64::new(0)).collect(),
                nanos: (0..256).map(|_| AtomicU64::new(0)).collect(),
                errors: AtomicU64::new(0),
                hist: (0..HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
                type_hist: (0..256 * HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            },
        };
        Ok(Arc::new(Server::with_share(Arc::new(share))))
    }

    fn with_share(share: Arc<Share>) -> Server {
        let m = share.config.msize.max(MIN_MSIZE);
        Server {
            share,
            fids: FidTable::new(),
            limits: Arc::default(),
            msize: AtomicU32::new(m),
        }
    }

    /// A new session on the same share: its own fid space and its own fid and open-file caps,
    /// sharing the share's statistics.
    pub fn new_session(&self) -> Arc<Server> {
        Arc::new(Server::with_share(self.share.clone()))
    }

    /// The share's configuration.
    pub fn config(&self) -> &Config {
        &self.share.config
    }

    /// The msize negotiated by the last Tversion (or the configured maximum before it).
    pub fn msize(&self) -> u32 {
        self.msize.load(Ordering::Relaxed)
    }

    /// Number of fids alive in this session.
    pub fn fid_count(&self) -> usize {
        self.fids.len()
    }

    /// Number of fids alive in this session, and of files it has open.
    pub fn session_usage(&self) -> (usize, usize) {
        (
            self.limits.fids.load(Ordering::Relaxed),
            self.limits.open_files.load(Ordering::Relaxed),
        )
    }

    /// Turns request statistics on or off (off by default; costs two clock reads per request).
    pub fn set_stats_enabled(&self, on: bool) {
        self.share.stats.enabled.store(on, Ordering::Relaxed);
    }

    /// Requests by type and a latency histogram, collected while statistics are enabled.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.share.stats;
        let by_type = (0..256usize)
            .filter_map(|t| {
                let n = s.count[t].load(Ordering::Relaxed);
                (n > 0).then(|| {
                    (
                        wire::type_name(t as u8),
                        n,
                        s.nanos[t].load(Ordering::Relaxed),
                    )
                })
            })
            .collect();
        let type_histograms = (0..256usize)
            .filter(|&t| s.count[t].load(Ordering::Relaxed) > 0)
            .map(|t| {
                let buckets = &s.type_hist[t * HIST_BUCKETS..(t + 1) * HIST_BUCKETS];
                (
                    wire::type_name(t as u8),
                    buckets.iter().map(|h| h.load(Ordering::Relaxed)).collect(),
                )
            })
            .collect();
        StatsSnapshot {
            by_type,
            errors: s.errors.load(Ordering::Relaxed),
            histogram: s.hist.iter().map(|h| h.load(Ordering::Relaxed)).collect(),
            type_histograms,
        }
    }

    /// Handles one complete request (starting with size[4]) and writes the whole reply into
    /// `reply`, returning the reply's length (0 only if not even an Rlerror fits). Never panics:
    /// a malformed, unknown or oversized message gets Rlerror with the request's tag.
    ///
    /// Tflush is answered at once; a transport that runs requests concurrently must send the
    /// Rflush only after the flushed request's reply (see `socket`).
    pub fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        let stats = self.share.stats.enabled.load(Ordering::Relaxed);
        let t0 = stats.then(Instant::now);
        let tag = wire::peek_tag(request);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match Tmessage::decode(request) {
                    Ok((tag, m)) => self.dispatch(tag, m, reply),
                    Err(wire::Error::UnknownType(_)) => Err(libc::EOPNOTSUPP),
                    Err(_) => Err(libc::EINVAL),
                }
            }));
        let (len, failed) = match result {
            Ok(Ok(n)) => (n, false),
            Ok(Err(e)) => (lerror(tag, e, reply), true),
            Err(_) => (lerror(tag, libc::EIO, reply), true),
        };
        if let Some(t0) = t0 {
            let ns = t0.elapsed().as_nanos() as u64;
            let s = &self.share.stats;
            let ty = request.get(4).copied().unwrap_or(0) as usize;
            s.count[ty].fetch_add(1, Ordering::Relaxed);
            s.nanos[ty].fetch_add(ns, Ordering::Relaxed);
            if failed {
                s.errors.fetch_add(1, Ordering::Relaxed);
            }
            let b = (64 - ns.leading_zeros() as usize).min(HIST_BUCKETS - 1);
            s.hist[b].fetch_add(1, Ordering::Relaxed);
            s.type_hist[ty * HIST_BUCKETS + b].fetch_add(1, Ordering::Relaxed);
        }
        len
    }

    fn ro(&self) -> Result<(), Errno> {
        if self.share.config.read_only {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    /// Takes one fid from this session's cap; `replacing` allows one over the cap for a request
    /// that replaces an existing fid (the net count does not grow).
    fn fid_slot(&self, replacing: bool) -> Result<Count, Errno> {
        let max = self.share.config.max_fids + usize::from(replacing);
        Count::take(&self.limits, |l| &l.fids, max, libc::ENFILE)
    }

    fn open_slot(&self) -> Result<Count, Errno> {
        let max = self.share.config.max_open_files;
        Count::take(&self.limits, |l| &l.open_files, max, libc::EMFILE)
    }

    fn new_fid(
        slot: Count,
        fd: Arc<OwnedFd>,
        st: &libc::stat64,
        entry: Option<(Arc<OwnedFd>, Box<[u8]>)>,
        uid: u32,
    ) -> Fid {
        Fid {
            fd,
            kind: kind_of(st.st_mode),
            dev: st.st_dev,
            ino: st.st_ino,
            entry,
            uid,
            open: OnceLock::new(),
            _count: slot,
        }
    }

    /// Whether the guest's ownership view is kept apart from the host's (writable share in
    /// mapped mode).
    fn mapped(&self) -> bool {
        !self.share.config.read_only && self.share.config.ownership == Ownership::Mapped
    }

    /// The host mode of something the guest creates or chmods: no set-id bits ever, and in
    /// mapped mode always readable and writable by the server's own user, whose access the
    /// guest's view no longer governs.
    fn host_mode(&self, mode: u32, dir: bool) -> u32 {
        let owner = match (self.mapped(), dir) {
            (false, _) => 0,
            (true, false) => 0o600,
            (true, true) => 0o700,
        };
        host_mode(mode) | owner
    }

    /// Records the guest's view of what it just created or changed (mapped mode). Best effort
    /// on creates: without user xattrs on the host the guest sees the host's values.
    fn record(&self, fd: RawFd, want: &GuestAttr) -> Result<(), Errno> {
        if !self.mapped() {
            return Ok(());
        }
        let st = fstat_raw(fd)?;
        ownership::record(fd, &st, want)
    }

    fn is_root(&self, f: &Fid) -> bool {
        self.share.root.is(f.dev, f.ino)
    }

    /// ENOENT unless the directory fid `f` still lies beneath the share root.
    fn check_dir(&self, f: &Fid) -> Result<(), Errno> {
        self.share.root.check_dir(f.fd.as_fd(), f.dev, f.ino)
    }

    /// A directory fid that is still beneath the share root, for requests that name something
    /// in it.
    fn dir_fid(&self, fid: u32) -> Result<Arc<Fid>, Errno> {
        let f = self.fids.get(fid)?;
        if f.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        self.check_dir(&f)?;
        Ok(f)
    }

    fn dispatch(
        &self,
        tag: u16,
        m: Tmessage<'_>,
        reply: &mut dyn ReplyBuf,
    ) -> Result<usize, Errno> {
        let share = &*self.share;
        match m {
            Tmessage::Version { msize, version } => {
                // Never answer more than the client offered; below 4 KiB nothing useful fits.
                // A refused Tversion leaves the session as it was.
                if msize < MIN_MSIZE {
                    return Err(libc::EINVAL);
                }
                self.fids.clear();
                let m = msize.min(share.config.msize.max(MIN_MSIZE));
                self.msize.store(m, Ordering::Relaxed);
                let v: &[u8] = if version == b"9P2000.L" {
                    b"9P2000.L"
                } else {
                    b"unknown"
                };
                send(reply, msg::RVERSION, tag, |w| {
                    w.u32(m).str(v);
                })
            }
            Tmessage::Auth { .. } => Err(libc::EOPNOTSUPP),
            Tmessage::Attach { fid, n_uname, .. } => {
                let slot = self.fid_slot(false)?;
                let fd = dup(share.root.fd.as_fd())?;
                let st = fstat(fd.as_fd())?;
                // n_uname ~0 means "no user given": treat it as root, as the Linux client does.
                let uid = if n_uname == u32::MAX { 0 } else { n_uname };
                let f = Self::new_fid(slot, Arc::new(fd), &st, None, uid);
                self.fids.insert_new(fid, Arc::new(f))?;
                send(reply, msg::RATTACH, tag, |w| {
                    w.qid(&share.qid(&st));
                })
            }
            Tmessage::Flush { .. } => send(reply, msg::RFLUSH, tag, |_| {}),
            Tmessage::Walk { fid, newfid, names } => {
                self.walk(tag, fid, newfid, names.as_slice(), reply)
            }
            Tmessage::Read { fid, offset, count } => {
                let f = self.fids.get(fid)?;
                let of = f.open.get().ok_or(libc::EBADF)?;
                if f.kind == Kind::Dir {
                    return Err(libc::EISDIR);
                }
                let max = (self.msize() as usize)
                    .min(reply.capacity())
                    .saturating_sub(wire::RREAD_HEADER_LEN);
                let count = (count as usize).min(max);
                let n = if count == 0 {
                    0
                } else {
                    loop {
                        match reply.read_from(wire::RREAD_HEADER_LEN, count, of.fd.as_fd(), offset)
                        {
                            Ok(n) => break n.min(count),
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
                        }
                    }
                };
                let mut h = [0u8; wire::RREAD_HEADER_LEN];
                let size = (wire::RREAD_HEADER_LEN + n) as u32;
                h[..4].copy_from_slice(&size.to_le_bytes());
                h[4] = msg::RREAD;
                h[5..7].copy_from_slice(&tag.to_le_bytes());
                h[7..11].copy_from_slice(&(n as u32).to_le_bytes());
                reply.write_at(0, &h).map_err(|_| libc::ENOBUFS)?;
                Ok(size as usize)
            }
            Tmessage::Write { fid, offset, data } => {
                self.ro()?;
                let f = self.fids.get(fid)?;
                let of = f.open.get().ok_or(libc::EBADF)?;
                // SAFETY: `data` is a valid readable slice; the fd is open.
                let n = cvt(|| unsafe {
                    libc::pwrite64(
                        of.fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        offset as libc::off64_t,
                    )
                })?;
                send(reply, msg::RWRITE, tag, |w| {
                    w.u32(n as u32);
                })
            }
            Tmessage::Clunk { fid } => {
                self.fids.remove(fid).ok_or(libc::EBADF)?;
                send(reply, msg::RCLUNK, tag, |_| {})
            }
            Tmessage::Remove { fid } => {
                // Tremove clunks the fid whether or not the removal succeeds.
                let f = self.fids.remove(fid).ok_or(libc::EBADF)?;
                self.ro()?;
                self.remove(&f)?;
                send(reply, msg::RREMOVE, tag, |_| {})
            }
            Tmessage::Statfs { fid } => {
                let f = self.fids.get(fid)?;
                // SAFETY: statfs64 is plain data; zeroed is a valid value.
                let mut s: libc::statfs64 = unsafe { std::mem::zeroed() };
                // SAFETY: the fd is open and `s` is a valid out pointer.
                cvt(|| unsafe { libc::fstatfs64(f.fd.as_raw_fd(), &mut s) })?;
                // SAFETY: fsid_t is two i32s; reading it as bytes is sound.
                let fsid: [i32; 2] = unsafe { std::mem::transmute(s.f_fsid) };
                let st = StatFs {
                    ty: s.f_type as u32,
                    bsize: s.f_bsize as u32,
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    fsid: (fsid[0] as u32 as u64) | ((fsid[1] as u32 as u64) << 32),
                    namelen: s.f_namelen as u32,
                };
                send(reply, msg::RSTATFS, tag, |w| {
                    w.u32(st.ty)
                        .u32(st.bsize)
                        .u64(st.blocks)
                        .u64(st.bfree)
                        .u64(st.bavail);
                    w.u64(st.files).u64(st.ffree).u64(st.fsid).u32(st.namelen);
                })
            }
            Tmessage::Lopen { fid, flags } => {
                if dotl_writes(flags) {
                    self.ro()?;
                }
                let f = self.fids.get(fid)?;
                let mut oflags = dotl_to_open_flags(flags);
                match f.kind {
                    Kind::File => {}
                    Kind::Dir => {
                        if oflags & libc::O_ACCMODE != libc::O_RDONLY || oflags & libc::O_TRUNC != 0
                        {
                            return Err(libc::EISDIR);
                        }
                        oflags |= libc::O_DIRECTORY;
                        self.check_dir(&f)?;
                    }
                    Kind::Symlink => return Err(libc::ELOOP),
                    Kind::Special => return Err(libc::EPERM),
                }
                if f.open.get().is_some() {
                    return Err(libc::EBADF);
                }
                let count = self.open_slot()?;
                // Reopen the very inode the O_PATH fd refers to (already checked to be a
                // regular file or directory) through its /proc magic link.
                let fd = openat(
                    share.root.proc_fd.as_fd(),
                    &Name::from_fd(f.fd.as_raw_fd()),
                    oflags,
                    0,
                )?;
                let st = fstat(fd.as_fd())?;
                f.open
                    .set(OpenFile {
                        fd,
                        dir_lock: Mutex::new(()),
                        _count: count,
                    })
                    .map_err(|_| libc::EBADF)?;
                send(reply, msg::RLOPEN, tag, |w| {
                    w.qid(&share.qid(&st)).u32(0);
                })
            }
            Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid,
            } => {
                self.ro()?;
                let f = self.dir_fid(fid)?;
                let name = Name::new(name, false)?;
                // Every limit is taken before the file exists, so a refusal creates nothing.
                let open_slot = self.open_slot()?;
                let fid_slot = self.fid_slot(true)?;
                // O_EXCL always: never open an existing FIFO or device through a create.
                let oflags =
                    dotl_to_open_flags(flags) | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
                let fd = openat(f.fd.as_fd(), &name, oflags, self.host_mode(mode, false))?;
                let created = (|| {
                    let path = openat(
                        share.root.proc_fd.as_fd(),
                        &Name::from_fd(fd.as_raw_fd()),
                        libc::O_PATH,
                        0,
                    )?;
                    let st = fstat(fd.as_fd())?;
                    Ok::<_, Errno>((path, st))
                })();
                let (path, st) = match created {
                    Ok(c) => c,
                    Err(e) => {
                        undo_create(f.fd.as_fd(), &name, false);
                        return Err(e);
                    }
                };
                let _ = self.record(
                    path.as_raw_fd(),
                    &GuestAttr {
                        uid: f.uid,
                        gid,
                        mode: libc::S_IFREG | (mode & 0o7777),
                        rdev: 0,
                    },
                );
                let entry = Some((f.fd.clone(), Box::from(name.bytes())));
                let nf = Self::new_fid(fid_slot, Arc::new(path), &st, entry, f.uid);
                let _ = nf.open.set(OpenFile {
                    fd,
                    dir_lock: Mutex::new(()),
                    _count: open_slot,
                });
                self.fids.replace(fid, Arc::new(nf));
                send(reply, msg::RLCREATE, tag, |w| {
                    w.qid(&share.qid(&st)).u32(0);
                })
            }
            Tmessage::Symlink {
                fid, name, target, ..
            } => {
                self.ro()?;
                let f = self.dir_fid(fid)?;
                let name = Name::new(name, false)?;
                let target = CString::new(target).map_err(|_| libc::EINVAL)?;
                // SAFETY: both strings are NUL-terminated; the dir fd is open.
                cvt(|| unsafe { libc::symlinkat(target.as_ptr(), f.fd.as_raw_fd(), name.ptr()) })?;
                let st = fstatat(f.fd.as_fd(), &name)
                    .inspect_err(|_| undo_create(f.fd.as_fd(), &name, false))?;
                send(reply, msg::RSYMLINK, tag, |w| {
                    w.qid(&share.qid(&st));
                })
            }
            Tmessage::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                gid,
            } => {
                self.ro()?;
                let f = self.dir_fid(dfid)?;
                let name = Name::new(name, false)?;
                let guest_type = match mode & libc::S_IFMT {
                    0 => libc::S_IFREG,
                    t => t,
                };
                // The host only ever gets regular files in mapped mode (device nodes, FIFOs
                // and sockets become stand-ins carrying the guest's view), and never a device
                // node in passthrough mode.
                let host_type = match guest_type {
                    libc::S_IFREG => libc::S_IFREG,
                    t if self.mapped() && ownership::is_special(t) => libc::S_IFREG,
                    libc::S_IFIFO | libc::S_IFSOCK => guest_type,
                    _ => return Err(libc::EPERM),
                };
                let hmode = self.host_mode(mode, false);
                // SAFETY: the name is NUL-terminated; the dir fd is open.
                cvt(|| unsafe {
                    libc::mknodat(f.fd.as_raw_fd(), name.ptr(), host_type | hmode, 0)
                })?;
                let st = (|| {
                    let want = GuestAttr {
                        uid: f.uid,
                        gid,
                        mode: guest_type | (mode & 0o7777),
                        rdev: libc::makedev(major, minor),
                    };
                    if self.mapped() {
                        let fd = openat(f.fd.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                        match self.record(fd.as_raw_fd(), &want) {
                            Ok(()) => {}
                            // A stand-in the host cannot label would be a lie: refuse.
                            Err(_) if host_type != guest_type => return Err(libc::EPERM),
                            Err(_) => {}
                        }
                    }
                    fstatat(f.fd.as_fd(), &name)
                })()
                .inspect_err(|_| undo_create(f.fd.as_fd(), &name, false))?;
                send(reply, msg::RMKNOD, tag, |w| {
                    w.qid(&share.qid(&st));
                })
            }
            Tmessage::Rename { fid, dfid, name } => {
                self.ro()?;
                let f = self.fids.get(fid)?;
                let d = self.dir_fid(dfid)?;
                let new = Name::new(name, false)?;
                let (parent, old) = self.entry_of(&f)?;
                // SAFETY: names are NUL-terminated; the fds are open.
                cvt(|| unsafe {
                    libc::renameat(parent.as_raw_fd(), old.ptr(), d.fd.as_raw_fd(), new.ptr())
                })?;
                send(reply, msg::RRENAME, tag, |_| {})
            }
            Tmessage::Readlink { fid } => {
                let f = self.fids.get(fid)?;
                if f.kind != Kind::Symlink {
                    return Err(libc::EINVAL);
                }
                let mut buf = vec![0u8; libc::PATH_MAX as usize];
                // SAFETY: `buf` is writable for its length; the fd is open.
                let n = cvt(|| unsafe {
                    libc::readlinkat(
                        f.fd.as_raw_fd(),
                        EMPTY.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                })?;
                send(reply, msg::RREADLINK, tag, |w| {
                    w.str(&buf[..n as usize]);
                })
            }
            Tmessage::Getattr { fid, .. } => {
                let f = self.fids.get(fid)?;
                let st = fstat(f.fd.as_fd())?;
                let (uid, gid, mode, rdev) = match f.kind {
                    Kind::File | Kind::Dir if self.mapped() => ownership::load(f.fd.as_raw_fd())
                        .map_or((st.st_uid, st.st_gid, st.st_mode, st.st_rdev), |g| {
                            g.apply(&st)
                        }),
                    _ => (st.st_uid, st.st_gid, st.st_mode, st.st_rdev),
                };
                let a = Attr {
                    valid: wire::GETATTR_BASIC,
                    qid: share.qid(&st),
                    mode,
                    uid,
                    gid,
                    nlink: st.st_nlink,
                    rdev,
                    size: st.st_size as u64,
                    blksize: st.st_blksize as u64,
                    blocks: st.st_blocks as u64,
                    atime_sec: st.st_atime as u64,
                    atime_nsec: st.st_atime_nsec as u64,
                    mtime_sec: st.st_mtime as u64,
                    mtime_nsec: st.st_mtime_nsec as u64,
                    ctime_sec: st.st_ctime as u64,
                    ctime_nsec: st.st_ctime_nsec as u64,
                    ..Default::default()
                };
                send(reply, msg::RGETATTR, tag, |w| wire::write_attr(w, &a))
            }
            Tmessage::Setattr { fid, attr } => {
                self.ro()?;
                let f = self.fids.get(fid)?;
                self.setattr(&f, &attr)?;
                send(reply, msg::RSETATTR, tag, |_| {})
            }
            Tmessage::Xattrwalk { fid, name, .. } => {
                self.fids.get(fid)?;
                // Extended attributes are not exported: no attribute exists, listing is
                // unsupported.
                Err(if name.is_empty() {
                    libc::EOPNOTSUPP
                } else {
                    libc::ENODATA
                })
            }
            Tmessage::Xattrcreate { fid, .. } => {
                self.ro()?;
                self.fids.get(fid)?;
                Err(libc::EOPNOTSUPP)
            }
            Tmessage::Readdir { fid, offset, count } => {
                self.readdir(tag, fid, offset, count, reply)
            }
            Tmessage::Fsync { fid, datasync } => {
                let f = self.fids.get(fid)?;
                if let Some(of) = f.open.get() {
                    // SAFETY: the fd is open.
                    cvt(|| unsafe {
                        if datasync != 0 {
                            libc::fdatasync(of.fd.as_raw_fd())
                        } else {
                            libc::fsync(of.fd.as_raw_fd())
                        }
                    })?;
                }
                send(reply, msg::RFSYNC, tag, |_| {})
            }
            Tmessage::Lock { fid, .. } => {
                // Guest locks are advisory among the guest's own processes, which its kernel
                // already arbitrates; grant them.
                self.fids.get(fid)?;
                send(reply, msg::RLOCK, tag, |w| {
                    w.u8(0);
                })
            }
            Tmessage::Getlock { fid, lock } => {
                self.fids.get(fid)?;
                send(reply, msg::RGETLOCK, tag, |w| {
                    w.u8(libc::F_UNLCK as u8)
                        .u64(lock.start)
                        .u64(lock.length)
                        .u32(lock.proc_id)
                        .str(lock.client_id);
                })
            }
            Tmessage::Link { dfid, fid, name } => {
                self.ro()?;
                let d = self.dir_fid(dfid)?;
                let f = self.fids.get(fid)?;
                let name = Name::new(name, false)?;
                if f.kind == Kind::Dir {
                    return Err(libc::EPERM);
                }
                // SAFETY: the fds are open and the names NUL-terminated.
                let r = cvt(|| unsafe {
                    libc::linkat(
                        f.fd.as_raw_fd(),
                        EMPTY.as_ptr(),
                        d.fd.as_raw_fd(),
                        name.ptr(),
                        libc::AT_EMPTY_PATH,
                    )
                });
                match r {
                    Ok(_) => {}
                    // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; regular files can go through
                    // their /proc link instead (never symlinks: that would follow them).
                    Err(libc::ENOENT) if f.kind != Kind::Symlink => {
                        let p = Name::from_fd(f.fd.as_raw_fd());
                        // SAFETY: as above.
                        cvt(|| unsafe {
                            libc::linkat(
                                share.root.proc_fd.as_raw_fd(),
                                p.ptr(),
                                d.fd.as_raw_fd(),
                                name.ptr(),
                                libc::AT_SYMLINK_FOLLOW,
                            )
                        })?;
                    }
                    Err(e) => return Err(e),
                }
                send(reply, msg::RLINK, tag, |_| {})
            }
            Tmessage::Mkdir {
                dfid,
                name,
                mode,
                gid,
            } => {
                self.ro()?;
                let f = self.dir_fid(dfid)?;
                let name = Name::new(name, false)?;
                // SAFETY: the name is NUL-terminated; the dir fd is open.
                cvt(|| unsafe {
                    libc::mkdirat(f.fd.as_raw_fd(), name.ptr(), self.host_mode(mode, true))
                })?;
                let st = fstatat(f.fd.as_fd(), &name)
                    .inspect_err(|_| undo_create(f.fd.as_fd(), &name, true))?;
                if self.mapped() {
                    if let Ok(fd) = openat(f.fd.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)
                    {
                        let _ = self.record(
                            fd.as_raw_fd(),
                            &GuestAttr {
                                uid: f.uid,
                                gid,
                                mode: libc::S_IFDIR | (mode & 0o7777),
                                rdev: 0,
                            },
                        );
                    }
                }
                send(reply, msg::RMKDIR, tag, |w| {
                    w.qid(&share.qid(&st));
                })
            }
            Tmessage::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => {
                self.ro()?;
                let od = self.dir_fid(olddirfid)?;
                let nd = self.dir_fid(newdirfid)?;
                let on = Name::new(oldname, false)?;
                let nn = Name::new(newname, false)?;
                // SAFETY: names are NUL-terminated; the fds are open.
                cvt(|| unsafe {
                    libc::renameat(od.fd.as_raw_fd(), on.ptr(), nd.fd.as_raw_fd(), nn.ptr())
                })?;
                send(reply, msg::RRENAMEAT, tag, |_| {})
            }
            Tmessage::Unlinkat {
                dirfid,
                name,
                flags,
            } => {
                self.ro()?;
                let d = self.dir_fid(dirfid)?;
                let name = Name::new(name, false)?;
                let fl = (flags as i32) & libc::AT_REMOVEDIR;
                // SAFETY: the name is NUL-terminated; the dir fd is open.
                cvt(|| unsafe { libc::unlinkat(d.fd.as_raw_fd(), name.ptr(), fl) })?;
                send(reply, msg::RUNLINKAT, tag, |_| {})
            }
        }
    }

    fn walk(
        &self,
        tag: u16,
        fid: u32,
        newfid: u32,
        names: &[&[u8]],
        reply: &mut dyn ReplyBuf,
    ) -> Result<usize, Errno> {
        let share = &*self.share;
        let root = &share.root;
        let f = self.fids.get(fid)?;
        if newfid != fid && self.fids.get(newfid).is_ok() {
            return Err(libc::EBADF);
        }
        if names.is_empty() && newfid == fid {
            // Walking a fid onto itself with no names changes nothing.
            return send(reply, msg::RWALK, tag, |w| {
                w.u16(0);
            });
        }
        // Take the new fid's slot first: a walk refused at the cap opens nothing.
        let slot = self.fid_slot(newfid == fid)?;
        if !names.is_empty() && f.kind == Kind::Dir {
            // Names are looked up in this directory: it must still be in the share.
            self.check_dir(&f)?;
        }
        let mut qids = [Qid::default(); wire::MAX_WALK_NAMES];
        // The current position: its descriptor and identity, and the directory it was found in
        // with its name there (None after `.`/`..`, whose entry name is not known).
        let mut cur: Arc<OwnedFd> = f.fd.clone();
        let mut cur_st: Option<libc::stat64> = None;
        let mut entry = f.entry.clone();
        let mut walked = 0;
        for (i, raw) in names.iter().enumerate() {
            let step = (|| {
                let (dev, ino) = match &cur_st {
                    Some(st) => (st.st_dev, st.st_ino),
                    None => (f.dev, f.ino),
                };
                let name = Name::new(raw, true)?;
                let dots = name.bytes() == b"." || name.bytes() == b"..";
                let fd = if name.bytes() == b"." || (name.bytes() == b".." && root.is(dev, ino)) {
                    dup(cur.as_fd())?
                } else {
                    openat(cur.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?
                };
                let st = fstat(fd.as_fd())?;
                if name.bytes() == b".." {
                    // Never stand outside the share, not even for the next step.
                    root.check_dir(fd.as_fd(), st.st_dev, st.st_ino)?;
                }
                Ok::<_, Errno>((fd, st, (!dots).then(|| Box::<[u8]>::from(name.bytes()))))
            })();
            match step {
                Ok((fd, st, name)) => {
                    qids[i] = share.qid(&st);
                    let fd = Arc::new(fd);
                    entry = name.map(|n| (cur.clone(), n));
                    cur = fd;
                    cur_st = Some(st);
                    walked += 1;
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if walked == names.len() {
            let st = match cur_st {
                Some(st) => st,
                None => fstat(cur.as_fd())?,
            };
            // A clone shares the original's O_PATH descriptor: it has no state of its own.
            let nf = Arc::new(Self::new_fid(slot, cur, &st, entry, f.uid));
            if newfid == fid {
                self.fids.replace(fid, nf);
            } else {
                self.fids.insert_new(newfid, nf)?;
            }
        }
        send(reply, msg::RWALK, tag, |w| {
            w.u16(walked as u16);
            for q in &qids[..walked] {
                w.qid(q);
            }
        })
    }

    /// The directory holding `f` and its name there, both checked: the directory is beneath the
    /// share root and the name still refers to this very file.
    fn entry_of(&self, f: &Fid) -> Result<(Arc<OwnedFd>, Name), Errno> {
        if self.is_root(f) {
            return Err(libc::EBUSY);
        }
        if let Some((dir, name)) = &f.entry {
            let name = Name::new(name, false)?;
            let dst = fstat(dir.as_fd())?;
            self.share
                .root
                .check_dir(dir.as_fd(), dst.st_dev, dst.st_ino)?;
            match fstatat(dir.as_fd(), &name) {
                Ok(st) if (st.st_dev, st.st_ino) == (f.dev, f.ino) => {
                    return Ok((dir.clone(), name))
                }
                // Renamed since: find where it is now.
                _ => {}
            }
        }
        self.parent_of(f).map(|(dir, name)| (Arc::new(dir), name))
    }

    /// The parent directory (an O_PATH fd resolved from the share root) and name of `f`, found
    /// through the kernel's current path of its descriptor. Used when the fid's entry is
    /// unknown or stale; paths longer than PATH_MAX answer ENAMETOOLONG.
    fn parent_of(&self, f: &Fid) -> Result<(OwnedFd, Name), Errno> {
        let root = &self.share.root;
        let (mut me_buf, mut root_buf) = ([0u8; PATH_BUF], [0u8; PATH_BUF]);
        let rootpath = root.path_of(root.fd.as_fd(), &mut root_buf)?;
        let me = root.path_of(f.fd.as_fd(), &mut me_buf)?;
        let rel = if rootpath == b"/" {
            me.strip_prefix(b"/")
        } else {
            me.strip_prefix(rootpath).and_then(|r| r.strip_prefix(b"/"))
        }
        .ok_or(libc::ENOENT)?;
        let mut comps: Vec<&[u8]> = rel
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let last = comps.pop().ok_or(libc::EBUSY)?;
        let mut dir = dup(root.fd.as_fd())?;
        for c in comps {
            let n = Name::new(c, false)?;
            dir = openat(
                dir.as_fd(),
                &n,
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY,
                0,
            )?;
        }
        let name = Name::new(last, false)?;
        // The name must still refer to this very file.
        let st = fstatat(dir.as_fd(), &name)?;
        if (st.st_dev, st.st_ino) != (f.dev, f.ino) {
            return Err(libc::ENOENT);
        }
        Ok((dir, name))
    }

    fn remove(&self, f: &Fid) -> Result<(), Errno> {
        let (dir, name) = self.entry_of(f)?;
        let fl = if f.kind == Kind::Dir {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: the name is NUL-terminated; the dir fd is open.
        cvt(|| unsafe { libc::unlinkat(dir.as_raw_fd(), name.ptr(), fl) })?;
        Ok(())
    }

    fn setattr(&self, f: &Fid, a: &SetAttr) -> Result<(), Errno> {
        use wire::setattr as sa;
        let proc_fd = self.share.root.proc_fd.as_raw_fd();
        let me = Name::from_fd(f.fd.as_raw_fd());
        let symlink = f.kind == Kind::Symlink;
        if f.kind == Kind::Dir {
            self.check_dir(f)?;
        }
        if self.mapped() && !symlink && a.valid & (sa::MODE | sa::UID | sa::GID) != 0 {
            return self.setattr_mapped(f, a);
        }
        if a.valid & sa::MODE != 0 {
            if symlink {
                return Err(libc::EOPNOTSUPP);
            }
            let mode = self.host_mode(a.mode, f.kind == Kind::Dir);
            // SAFETY: `me` is NUL-terminated; the magic link names this fid's inode.
            cvt(|| unsafe { libc::fchmodat(proc_fd, me.ptr(), mode, 0) })?;
        }
        if a.valid & (sa::UID | sa::GID) != 0 && self.mapped() {
            // A symlink cannot carry the guest's view and its owner means nothing to the host:
            // accept the guest's lchown (as `tar -x` does it) without changing the host.
        } else if a.valid & (sa::UID | sa::GID) != 0 {
            let uid = if a.valid & sa::UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & sa::GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            // SAFETY: the fd is open; EMPTY is NUL-terminated.
            cvt(|| unsafe {
                libc::fchownat(
                    f.fd.as_raw_fd(),
                    EMPTY.as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if a.valid & sa::SIZE != 0 {
            match f.kind {
                Kind::File => {}
                Kind::Dir => return Err(libc::EISDIR),
                _ => return Err(libc::EINVAL),
            }
            let tmp;
            let fd = match f.open.get() {
                Some(of) if of_writable(&of.fd) => of.fd.as_raw_fd(),
                _ => {
                    tmp = openat(self.share.root.proc_fd.as_fd(), &me, libc::O_WRONLY, 0)?;
                    tmp.as_raw_fd()
                }
            };
            // SAFETY: the fd is open.
            cvt(|| unsafe { libc::ftruncate64(fd, a.size as libc::off64_t) })?;
        }
        if a.valid & (sa::ATIME | sa::MTIME) != 0 {
            let t = |set: u32, upd: u32, s: u64, ns: u64| -> libc::timespec {
                if a.valid & set != 0 {
                    libc::timespec {
                        tv_sec: s as libc::time_t,
                        tv_nsec: ns as _,
                    }
                } else if a.valid & upd != 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                }
            };
            let times = [
                t(sa::ATIME_SET, sa::ATIME, a.atime_sec, a.atime_nsec),
                t(sa::MTIME_SET, sa::MTIME, a.mtime_sec, a.mtime_nsec),
            ];
            if symlink {
                // A symlink's own times: through its entry, never following it (the magic link
                // would be followed to the target).
                let (dir, name) = self.entry_of(f)?;
                // SAFETY: `times` holds two timespecs; the name is NUL-terminated.
                cvt(|| unsafe {
                    libc::utimensat(
                        dir.as_raw_fd(),
                        name.ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            } else {
                // SAFETY: `times` holds two timespecs; `me` is NUL-terminated.
                cvt(|| unsafe { libc::utimensat(proc_fd, me.ptr(), times.as_ptr(), 0) })?;
            }
        }
        Ok(())
    }

    /// setattr in mapped mode: owner, group and mode go to the guest's view; the host file
    /// only gets the permission bits (without set-id bits); then size and times as usual.
    fn setattr_mapped(&self, f: &Fid, a: &SetAttr) -> Result<(), Errno> {
        use wire::setattr as sa;
        let fd = f.fd.as_raw_fd();
        let st = fstat(f.fd.as_fd())?;
        let mut want = ownership::load(fd).unwrap_or_else(|| GuestAttr::of_host(&st));
        if a.valid & sa::UID != 0 {
            want.uid = a.uid;
        }
        if a.valid & sa::GID != 0 {
            want.gid = a.gid;
        }
        if a.valid & sa::MODE != 0 {
            want.mode = (want.mode & libc::S_IFMT) | (a.mode & 0o7777);
            let hmode = self.host_mode(a.mode, f.kind == Kind::Dir);
            let me = Name::from_fd(fd);
            // SAFETY: `me` is NUL-terminated; the magic link names this fid's inode.
            cvt(|| unsafe {
                libc::fchmodat(self.share.root.proc_fd.as_raw_fd(), me.ptr(), hmode, 0)
            })?;
        }
        let st = fstat(f.fd.as_fd())?;
        if let Err(e) = ownership::record(fd, &st, &want) {
            // No user xattrs here: only what the host already shows can be "set".
            let host = GuestAttr::of_host(&st);
            let owner_unchanged = want.uid == host.uid && want.gid == host.gid;
            if !owner_unchanged {
                return Err(if e == libc::EOPNOTSUPP {
                    libc::EPERM
                } else {
                    e
                });
            }
        }
        let rest = SetAttr {
            valid: a.valid & !(sa::MODE | sa::UID | sa::GID),
            ..*a
        };
        if rest.valid != 0 {
            return self.setattr(f, &rest);
        }
        Ok(())
    }

    fn readdir(
        &self,
        tag: u16,
        fid: u32,
        offset: u64,
        count: u32,
        reply: &mut dyn ReplyBuf,
    ) -> Result<usize, Errno> {
        let share = &*self.share;
        let f = self.fids.get(fid)?;
        if f.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let of = f.open.get().ok_or(libc::EBADF)?;
        let hdr = wire::RREAD_HEADER_LEN;
        let max = (self.msize() as usize)
            .min(reply.capacity())
            .saturating_sub(hdr);
        let count = (count as usize).min(max);
        let is_root = self.is_root(&f);
        self.check_dir(&f)?;
        let mut out = Vec::with_capacity(hdr + count.min(65536));
        out.resize(hdr, 0);
        let _g = of.dir_lock.lock().unwrap_or_else(|e| e.into_inner());
        let fd = of.fd.as_raw_fd();
        // SAFETY: the fd is open; seeking a directory to a cookie getdents gave us is fine.
        cvt(|| unsafe { libc::lseek64(fd, offset as libc::off64_t, libc::SEEK_SET) })?;
        let mut buf = vec![0u8; 32768.min(count.max(512) * 2)];
        'outer: loop {
            // SAFETY: `buf` is writable for its length; the fd is an open directory.
            let n = cvt(|| unsafe {
                libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())
            })? as usize;
            if n == 0 {
                break;
            }
            let mut p = 0;
            while p + 19 <= n {
                let ino = u64::from_ne_bytes(buf[p..p + 8].try_into().unwrap_or_default());
                let off = u64::from_ne_bytes(buf[p + 8..p + 16].try_into().unwrap_or_default());
                let reclen = u16::from_ne_bytes([buf[p + 16], buf[p + 17]]) as usize;
                let dtype = buf[p + 18];
                if reclen < 19 || p + reclen > n {
                    break 'outer;
                }
                let raw = &buf[p + 19..p + reclen];
                let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                if out.len() - hdr + wire::dirent_len(name.len()) > count {
                    break 'outer;
                }
                let ino = if is_root && name == b".." {
                    share.root.ino
                } else {
                    ino
                };
                let qid = Qid {
                    ty: dtype_to_qtype(dtype),
                    version: 0,
                    path: share.qid_path(f.dev, ino),
                };
                wire::write_dirent(&mut out, &qid, off, dtype, name);
                p += reclen;
            }
        }
        drop(_g);
        let size = out.len() as u32;
        out[..4].copy_from_slice(&size.to_le_bytes());
        out[4] = msg::RREADDIR;
        out[5..7].copy_from_slice(&tag.to_le_bytes());
        out[7..11].copy_from_slice(&(size - hdr as u32).to_le_bytes());
        reply.write_at(0, &out).map_err(|_| libc::ENOBUFS)?;
        Ok(out.len())
    }
}

/// The mode a guest-created file gets on the host: never set-user-ID or set-group-ID, so no
/// guest can leave a set-id trap on the host for the next user or tool that runs it.
fn host_mode(mode: u32) -> u32 {
    mode & 0o1777
}

/// Removes what a create just made, when a later step of the same request failed: a refused
/// request leaves the host tree as it was.
fn undo_create(dir: BorrowedFd<'_>, name: &Name, is_dir: bool) {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `dir` is open and the name NUL-terminated.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.ptr(), flags) };
}

fn of_writable(fd: &OwnedFd) -> bool {
    // SAFETY: F_GETFL on an open fd has no memory effects.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_ACCMODE != libc::O_RDONLY
}

/// Encodes a reply with body written by `body` and copies it into the reply area.
fn send(
    reply: &mut dyn ReplyBuf,
    ty: u8,
    tag: u16,
    body: impl FnOnce(&mut Writer<'_>),
) -> Result<usize, Errno> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&[0, 0, 0, 0, ty]);
    out.extend_from_slice(&tag.to_le_bytes());
    body(&mut Writer { buf: &mut out });
    let size = out.len() as u32;
    out[..4].copy_from_slice(&size.to_le_bytes());
    reply.write_at(0, &out).map_err(|_| libc::ENOBUFS)?;
    Ok(out.len())
}

fn lerror(tag: u16, ecode: Errno, reply: &mut dyn ReplyBuf) -> usize {
    let mut b = [0u8; 11];
    b[..4].copy_from_slice(&11u32.to_le_bytes());
    b[4] = msg::RLERROR;
    b[5..7].copy_from_slice(&tag.to_le_bytes());
    b[7..11].copy_from_slice(&(ecode as u32).to_le_bytes());
    match reply.write_at(0, &b) {
        Ok(()) => 11,
        Err(_) => 0,
    }
}
