//! `p9-bench`: measures the p9 server through its unix-socket transport, side by side with
//! diod (when installed), on generated trees.
//!
//! Workloads (each with one synchronous client, so latency is per round trip):
//! * `getattr (root)`: getattr of the attached root, the round-trip floor: one request whose
//!   server side is one `fstat`, so what is left is transport, client and scheduler;
//! * `walk+getattr`: walk root -> dir/file, getattr, clunk;
//! * `walk+getattr (dir fid)`: walk dir -> file from a fid held on each directory, getattr,
//!   clunk: how a Linux guest looks names up (from the parent's fid), so every walk starts in a
//!   directory that must be checked to still lie in the share;
//! * `open+read`: walk, lopen, read the whole file, clunk;
//! * `seq-read`: read a 64 MiB file (16 MiB in quick mode) front to back with msize-sized
//!   requests (rate in MB/s, latency per request);
//! * `readdir-tree`: walk to every directory, lopen, read all entries, clunk;
//! * `walk+getattr xN`: N clients at once, aggregate throughput;
//! * fid scaling: walk+getattr latency with 1k and 100k extra fids held open.
//!
//! Usage: `p9-bench [--quick] [--files 10000,100000] [--size BYTES] [--ops N] [--clients N]
//!                  [--fids 1000,100000] [--workers N] [--dir DIR] [--no-diod] [--rounds N]
//!                  [--only rtt,walk,dirwalk,open,seq,readdir,parallel,fids] [--stats]
//!                  [--msize N]
//!                  [--baseline OLD-P9-BENCH]`
//! With `--rounds N` every workload runs N times, interleaved between the servers (the machine
//! may be shared and noisy): latencies are pooled over the rounds, the rate is the median
//! round's. `--stats` adds the time each request type spends inside the bootbox server and the
//! worker pool's queue depth and lock waits. `--baseline` also measures the server built into
//! another `p9-bench` binary (an older build, started with `--serve`), interleaved with the
//! others, so a change is compared with what it replaces in one run.
//! Trees are cached under `--dir` (default: $TMPDIR/p9-bench) and reused between runs.

use clap::Parser;
use p9::client::Client;
use p9::{Config, Server, WorkerPool};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}
type Conn = Client<Box<dyn Stream>>;

const FILES_PER_DIR: usize = 1000;

/// Measures the p9 server through its unix-socket transport, side by side with diod (when
/// installed), on generated trees.
#[derive(Parser, Debug)]
#[command(name = "p9-bench")]
struct Args {
    /// Fewer files, operations and fids (defaults 10000 files, 3000 ops, 1000,20000 fids).
    #[arg(long)]
    quick: bool,
    /// Tree sizes to measure, comma-separated [default: 10000,100000].
    #[arg(long, value_delimiter = ',')]
    files: Option<Vec<usize>>,
    /// Size of each file in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Operations per workload [default: 20000].
    #[arg(long)]
    ops: Option<usize>,
    /// Clients of the concurrent workload.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Extra fids to hold for the fid-scaling runs, comma-separated [default: 1000,100000].
    #[arg(long, value_delimiter = ',')]
    fids: Option<Vec<usize>>,
    /// Server worker threads.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Where trees are cached and reused [default: $TMPDIR/p9-bench].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Do not compare with diod.
    #[arg(long)]
    no_diod: bool,
    /// Rounds of every workload, interleaved between the servers (alternating which goes
    /// first); latencies are pooled over the rounds and the rate is the median round's.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Only these workloads, comma-separated: rtt, walk, dirwalk, open, seq, readdir, parallel,
    /// fids.
    #[arg(long, value_delimiter = ',', value_parser = ["rtt", "walk", "dirwalk", "open", "seq", "readdir", "parallel", "fids"])]
    only: Vec<String>,
    /// Print the bootbox server's own per-request statistics after each tree.
    #[arg(long)]
    stats: bool,
    /// The msize clients ask for (each server may answer less; seq-read requests are this
    /// large).
    #[arg(long, default_value_t = 512_000)]
    msize: u32,
    /// Also measure the server of this other p9-bench binary (e.g. a build of the previous
    /// commit), run as `BIN --serve SOCKET --serve-tree TREE --workers N`.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Serve `--serve-tree` on this unix socket until killed, measuring nothing (what
    /// `--baseline` starts).
    #[arg(long, requires = "serve_tree")]
    serve: Option<PathBuf>,
    /// The tree `--serve` exports.
    #[arg(long)]
    serve_tree: Option<PathBuf>,
}

struct Opts {
    quick: bool,
    files: Vec<usize>,
    size: usize,
    ops: usize,
    clients: usize,
    fids: Vec<usize>,
    workers: usize,
    dir: PathBuf,
    diod: bool,
    rounds: usize,
    only: Vec<String>,
    stats: bool,
    msize: u32,
    baseline: Option<PathBuf>,
}

impl From<Args> for Opts {
    /// Fills in the defaults that depend on `--quick`.
    fn from(a: Args) -> Opts {
        let quick = a.quick;
        let by_mode =
            |quick_value: Vec<usize>, full: Vec<usize>| if quick { quick_value } else { full };
        Opts {
            quick,
            files: a
                .files
                .unwrap_or_else(|| by_mode(vec![10_000], vec![10_000, 100_000])),
            size: a.size,
            ops: a.ops.unwrap_or(if quick { 3000 } else { 20_000 }).max(1),
            clients: a.clients.max(1),
            fids: a
                .fids
                .unwrap_or_else(|| by_mode(vec![1000, 20_000], vec![1000, 100_000])),
            workers: a.workers.max(1),
            dir: a
                .dir
                .unwrap_or_else(|| std::env::temp_dir().join("p9-bench")),
            diod: !a.no_diod,
            rounds: a.rounds.max(1),
            only: a.only,
            stats: a.stats,
            msize: a.msize.max(4096),
            baseline: a.baseline,
        }
    }
}

/// Creates (or reuses) a tree of `n` files of `size` bytes in directories of 1000.
fn make_tree(base: &Path, n: usize, size: usize) -> std::io::Result<PathBuf> {
    let root = base.join(format!("tree-{n}-{size}"));
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    let t = Instant::now();
    let data = vec![b'x'; size];
    for i in 0..n {
        let d = root.join(format!("d{:04}", i / FILES_PER_DIR));
        if i % FILES_PER_DIR == 0 {
            std::fs::create_dir_all(&d)?;
        }
        std::fs::write(d.join(format!("f{:05}", i)), &data)?;
    }
    std::fs::write(root.join("big"), vec![b'y'; 64 << 20])?;
    std::fs::write(root.join(".complete"), b"")?;
    eprintln!(
        "generated {n} files in {:.1}s at {}",
        t.elapsed().as_secs_f64(),
        root.display()
    );
    Ok(root)
}

struct Target {
    name: &'static str,
    sock: PathBuf,
    aname: String,
    child: Option<Child>,
    /// The in-process server (bootbox only), for its statistics.
    server: Option<Arc<Server>>,
    /// The in-process server's worker pool, for its statistics.
    pool: Option<Arc<WorkerPool>>,
    /// The msize clients ask for.
    msize: u32,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

impl Target {
    fn stats(&self) -> p9::StatsSnapshot {
        self.server.as_ref().map(|s| s.stats()).unwrap_or_default()
    }

    fn pool_stats(&self) -> p9::PoolStats {
        self.pool.as_ref().map(|p| p.stats()).unwrap_or_default()
    }

    fn connect(&self) -> Result<(Conn, u32), String> {
        let s = UnixStream::connect(&self.sock)
            .map_err(|e| format!("{}: connect {}: {e}", self.name, self.sock.display()))?;
        let mut c = Client::new(Box::new(s) as Box<dyn Stream>, self.msize)
            .map_err(|e| format!("{}: version: {e}", self.name))?;
        let root = c.alloc_fid();
        c.attach(root, "root", &self.aname, 0)
            .map_err(|e| format!("{}: attach: {e}", self.name))?;
        Ok((c, root))
    }
}

fn start_bootbox(
    tree: &Path,
    dir: &Path,
    workers: usize,
    stats: bool,
    msize: u32,
) -> Result<Target, String> {
    let sock = dir.join(format!("bootbox-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(|e| format!("bind {}: {e}", sock.display()))?;
    let config = Config {
        max_fids: 1 << 20,
        max_open_files: 1 << 16,
        stats,
        ..Config::default()
    };
    let srv = Server::new(tree, config).map_err(|e| e.to_string())?;
    let pool = Arc::new(WorkerPool::with_thread_start(
        workers,
        "p9-bench",
        Arc::new(|| {}),
        stats,
    ));
    let (served, pooled) = (srv.clone(), pool.clone());
    std::thread::spawn(move || p9::socket::serve(listener, served, pooled));
    Ok(Target {
        name: "bootbox",
        sock,
        aname: String::new(),
        child: None,
        server: Some(srv),
        pool: Some(pool),
        msize,
    })
}

/// `--serve`: exports `tree` on the unix socket `sock` until the process is killed.
fn serve(sock: &Path, tree: &Path, workers: usize) -> R<()> {
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| format!("bind {}: {e}", sock.display()))?;
    let config = Config {
        max_fids: 1 << 20,
        max_open_files: 1 << 16,
        ..Config::default()
    };
    let srv = Server::new(tree, config).map_err(|e| e.to_string())?;
    let pool = Arc::new(WorkerPool::new(workers, "p9-serve"));
    p9::socket::serve(listener, srv, pool).map_err(|e| format!("serve: {e}"))
}

/// Waits up to 5 s for a server process to listen on `t.sock`.
fn await_listening(t: Target, what: &str) -> Result<Target, String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if UnixStream::connect(&t.sock).is_ok() {
            return Ok(t);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{what} did not start listening within 5 s"))
}

/// The server of another p9-bench binary (`--baseline`), as a child process.
fn start_baseline(
    bin: &Path,
    tree: &Path,
    dir: &Path,
    workers: usize,
    msize: u32,
) -> Result<Target, String> {
    let sock = dir.join(format!("base-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(bin)
        .arg("--serve")
        .arg(&sock)
        .arg("--serve-tree")
        .arg(tree)
        .args(["--workers", &workers.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let t = Target {
        name: "base",
        sock,
        aname: String::new(),
        child: Some(child),
        server: None,
        pool: None,
        msize,
    };
    await_listening(t, &bin.display().to_string())
}

fn start_diod(tree: &Path, dir: &Path, workers: usize, msize: u32) -> Result<Target, String> {
    let sock = dir.join(format!("diod-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let child = Command::new("diod")
        .args([
            "-f",
            "-n",
            "-N",
            "-L",
            "/dev/null",
            "-t",
            &workers.to_string(),
            "-e",
        ])
        .arg(tree)
        .arg("-l")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start diod: {e}"))?;
    let t = Target {
        name: "diod",
        sock,
        aname: tree.to_string_lossy().into_owned(),
        child: Some(child),
        server: None,
        pool: None,
        msize,
    };
    await_listening(t, "diod")
}

#[derive(Clone, Copy, Default)]
struct Summary {
    ops_per_s: f64,
    min: f64,
    p50: f64,
    p95: f64,
    p99: f64,
}

fn summarize(mut lat_ns: Vec<u64>, wall: Duration, ops: usize) -> Summary {
    lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_ns.is_empty() {
            return 0.0;
        }
        let i = ((lat_ns.len() as f64 - 1.0) * p).round() as usize;
        lat_ns[i] as f64 / 1000.0
    };
    Summary {
        ops_per_s: ops as f64 / wall.as_secs_f64(),
        min: pct(0.0),
        p50: pct(0.5),
        p95: pct(0.95),
        p99: pct(0.99),
    }
}

fn file_path(i: usize) -> (String, String) {
    (format!("d{:04}", i / FILES_PER_DIR), format!("f{:05}", i))
}

/// A cheap deterministic sequence of file indices.
fn pick(i: usize, n: usize) -> usize {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) as usize % n
}

type R<T> = Result<T, String>;

fn walk_getattr(
    c: &mut Conn,
    root: u32,
    n_files: usize,
    ops: usize,
    salt: usize,
) -> R<(Vec<u64>, Duration)> {
    walks_with_getattr(c, n_files, ops, salt, |k| {
        let (d, f) = file_path(k);
        (root, vec![d, f])
    })
}

/// Like [`walk_getattr`], but each walk starts from a fid held on the file's directory (one
/// per directory, walked before the clock starts and clunked after it stops), as a Linux
/// guest's lookups do.
fn dir_walk_getattr(
    c: &mut Conn,
    root: u32,
    n_files: usize,
    ops: usize,
) -> R<(Vec<u64>, Duration)> {
    // Nearly the files `walk_getattr` visits, shifted: the host's caches are as warm.
    const SALT: usize = 3;
    let mut dirs = Vec::with_capacity(n_files.div_ceil(FILES_PER_DIR));
    for i in 0..n_files.div_ceil(FILES_PER_DIR) {
        let d = c.alloc_fid();
        c.walk(root, d, &[&format!("d{i:04}")])
            .map_err(|e| format!("walk d{i:04}: {e}"))?;
        dirs.push(d);
    }
    let timed = walks_with_getattr(c, n_files, ops, SALT, |k| {
        (dirs[k / FILES_PER_DIR], vec![file_path(k).1])
    });
    for d in dirs {
        c.clunk(d).map_err(|e| format!("clunk: {e}"))?;
    }
    timed
}

/// `ops` times: walk to the file `walk_of` names for a picked index (a starting fid and the
/// names from there), getattr, clunk; latency per file.
fn walks_with_getattr(
    c: &mut Conn,
    n_files: usize,
    ops: usize,
    salt: usize,
    walk_of: impl Fn(usize) -> (u32, Vec<String>),
) -> R<(Vec<u64>, Duration)> {
    let mut lat = Vec::with_capacity(ops);
    let t = Instant::now();
    let fid = c.alloc_fid();
    for i in 0..ops {
        let (from, names) = walk_of(pick(i + salt, n_files));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let s = Instant::now();
        c.walk(from, fid, &names)
            .map_err(|e| format!("walk {}: {e}", names.join("/")))?;
        c.getattr(fid).map_err(|e| format!("getattr: {e}"))?;
        c.clunk(fid).map_err(|e| format!("clunk: {e}"))?;
        lat.push(s.elapsed().as_nanos() as u64);
    }
    Ok((lat, t.elapsed()))
}

/// Getattr of the root fid, `ops` times: one round trip with next to no server work each.
fn root_getattr(c: &mut Conn, root: u32, ops: usize) -> R<(Vec<u64>, Duration)> {
    let mut lat = Vec::with_capacity(ops);
    let t = Instant::now();
    for _ in 0..ops {
        let s = Instant::now();
        c.getattr(root).map_err(|e| format!("getattr: {e}"))?;
        lat.push(s.elapsed().as_nanos() as u64);
    }
    Ok((lat, t.elapsed()))
}

fn open_read(
    c: &mut Conn,
    root: u32,
    n_files: usize,
    ops: usize,
    size: usize,
) -> R<(Vec<u64>, Duration)> {
    let mut lat = Vec::with_capacity(ops);
    let t = Instant::now();
    let fid = c.alloc_fid();
    for i in 0..ops {
        let (d, f) = file_path(pick(i + 7, n_files));
        let s = Instant::now();
        c.walk(root, fid, &[&d, &f])
            .map_err(|e| format!("walk: {e}"))?;
        c.lopen(fid, 0).map_err(|e| format!("lopen: {e}"))?;
        let data = c
            .read(fid, 0, size.max(1) as u32)
            .map_err(|e| format!("read: {e}"))?;
        if data.len() != size {
            return Err(format!(
                "read {} bytes of {d}/{f}, expected {size}",
                data.len()
            ));
        }
        c.clunk(fid).map_err(|e| format!("clunk: {e}"))?;
        lat.push(s.elapsed().as_nanos() as u64);
    }
    Ok((lat, t.elapsed()))
}

/// Reads the first `total` bytes of the tree's big file with requests as large as msize allows.
fn seq_read(c: &mut Conn, root: u32, total: usize) -> R<(Vec<u64>, Duration)> {
    let fid = c.alloc_fid();
    c.walk(root, fid, &["big"])
        .map_err(|e| format!("walk big: {e}"))?;
    c.lopen(fid, 0).map_err(|e| format!("lopen big: {e}"))?;
    let count = c.msize().saturating_sub(24);
    let mut lat = Vec::new();
    let mut off = 0usize;
    // One untimed pass pulls the file into the page cache.
    for timed in [false, true] {
        off = 0;
        lat.clear();
        let t = Instant::now();
        while off < total {
            let s = Instant::now();
            let d = c
                .read(fid, off as u64, count)
                .map_err(|e| format!("read big: {e}"))?;
            if d.is_empty() {
                return Err(format!("big file ended at {off}"));
            }
            off += d.len();
            lat.push(s.elapsed().as_nanos() as u64);
        }
        if timed {
            c.clunk(fid).map_err(|e| format!("clunk: {e}"))?;
            return Ok((lat, t.elapsed()));
        }
    }
    Err(format!("unreachable after {off} bytes"))
}

/// Reads every directory of the tree; latency is per directory, throughput in entries/s.
fn readdir_tree(c: &mut Conn, root: u32, n_files: usize) -> R<(Vec<u64>, Duration, usize)> {
    let dirs = n_files.div_ceil(FILES_PER_DIR);
    let mut lat = Vec::with_capacity(dirs);
    let mut entries = 0;
    let t = Instant::now();
    let fid = c.alloc_fid();
    for i in 0..dirs {
        let d = format!("d{i:04}");
        let s = Instant::now();
        c.walk(root, fid, &[&d]).map_err(|e| format!("walk: {e}"))?;
        c.lopen(fid, 0).map_err(|e| format!("lopen dir: {e}"))?;
        entries += c
            .readdir_all(fid)
            .map_err(|e| format!("readdir: {e}"))?
            .len();
        c.clunk(fid).map_err(|e| format!("clunk: {e}"))?;
        lat.push(s.elapsed().as_nanos() as u64);
    }
    let expect = n_files + 2 * dirs;
    if entries != expect {
        return Err(format!("readdir saw {entries} entries, expected {expect}"));
    }
    Ok((lat, t.elapsed(), entries))
}

fn parallel_walk(
    t: &Target,
    clients: usize,
    n_files: usize,
    ops: usize,
) -> R<(Vec<u64>, Duration)> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(t.connect()?);
    }
    let start = Instant::now();
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(k, (mut c, root))| {
            std::thread::spawn(move || walk_getattr(&mut c, root, n_files, ops, k * 7919))
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        let (lat, _) = h
            .join()
            .map_err(|_| "client thread panicked".to_string())??;
        all.extend(lat);
    }
    Ok((all, start.elapsed()))
}

fn fid_scaling(t: &Target, held: usize, n_files: usize, ops: usize) -> R<(Vec<u64>, Duration)> {
    let (mut c, root) = t.connect()?;
    for _ in 0..held {
        let f = c.alloc_fid();
        c.walk(root, f, &[])
            .map_err(|e| format!("{}: holding fid {f}: {e}", t.name))?;
    }
    walk_getattr(&mut c, root, n_files, ops, 13)
}

fn row(work: &str, server: &str, s: &Summary, unit: &str) {
    println!(
        "{work:<22} {server:<8} {:>11.0} {unit:<8} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
        s.ops_per_s, s.min, s.p50, s.p95, s.p99
    );
}

fn ratio(work: &str, which: &str, a: &Summary, b: &Summary) {
    println!(
        "{work:<22} {:<8} {:>10.2}x {:<8} {:>7.2}x {:>7.2}x {:>7.2}x {:>7.2}x",
        which,
        a.ops_per_s / b.ops_per_s.max(1e-9),
        "",
        a.min / b.min.max(1e-9),
        a.p50 / b.p50.max(1e-9),
        a.p95 / b.p95.max(1e-9),
        a.p99 / b.p99.max(1e-9)
    );
}

/// The current soft limit on open files.
fn nofile() -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a valid rlimit struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
    cur.rlim_cur
}

fn raise_nofile(want: u64) {
    let lim = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: want as libc::rlim_t,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes a valid rlimit struct.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) };
        let soft = libc::rlimit {
            rlim_cur: cur.rlim_max,
            rlim_max: cur.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
        eprintln!(
            "note: could not raise the open-file limit to {want}; it is {}",
            cur.rlim_max
        );
    }
}

/// One workload of the run, as selected with `--only`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    Rtt,
    Walk,
    DirWalk,
    Open,
    Seq,
    Readdir,
    Parallel,
    /// Walk latency with this many extra fids held.
    Fids(usize),
}

impl Workload {
    fn key(self) -> &'static str {
        match self {
            Workload::Rtt => "rtt",
            Workload::Walk => "walk",
            Workload::DirWalk => "dirwalk",
            Workload::Open => "open",
            Workload::Seq => "seq",
            Workload::Readdir => "readdir",
            Workload::Parallel => "parallel",
            Workload::Fids(_) => "fids",
        }
    }

    fn label(self, clients: usize) -> String {
        match self {
            Workload::Rtt => "getattr (root)".into(),
            Workload::Walk => "walk+getattr".into(),
            Workload::DirWalk => "walk+getattr (dir fid)".into(),
            Workload::Open => "open+read".into(),
            Workload::Seq => "seq-read".into(),
            Workload::Readdir => "readdir-tree (per dir)".into(),
            Workload::Parallel => format!("walk+getattr x{clients}"),
            Workload::Fids(k) => format!("walk, {k} fids held"),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::Seq => "MB/s",
            Workload::Readdir => "ents/s",
            _ => "ops/s",
        }
    }
}

/// What one workload measured over all rounds on one server: every latency, and each round's
/// rate (the reported rate is their median).
#[derive(Default)]
struct Acc {
    lat: Vec<u64>,
    rates: Vec<f64>,
}

impl Acc {
    fn summary(&self) -> Summary {
        let mut s = summarize(self.lat.clone(), Duration::from_secs(1), 0);
        let mut r = self.rates.clone();
        r.sort_by(f64::total_cmp);
        s.ops_per_s = r.get(r.len() / 2).copied().unwrap_or(0.0);
        s
    }
}

/// Runs one round of workload `w` on `t` (using the connection `c` for single-client ones);
/// returns the latencies and the rate.
fn measure(w: Workload, t: &Target, c: &mut (Conn, u32), n: usize, o: &Opts) -> R<(Vec<u64>, f64)> {
    let (c, root) = (&mut c.0, c.1);
    let rate = |ops: usize, wall: Duration| ops as f64 / wall.as_secs_f64();
    Ok(match w {
        Workload::Rtt => {
            let (lat, wall) = root_getattr(c, root, o.ops)?;
            (lat, rate(o.ops, wall))
        }
        Workload::Walk => {
            let (lat, wall) = walk_getattr(c, root, n, o.ops, 0)?;
            (lat, rate(o.ops, wall))
        }
        Workload::DirWalk => {
            let (lat, wall) = dir_walk_getattr(c, root, n, o.ops)?;
            (lat, rate(o.ops, wall))
        }
        Workload::Open => {
            let (lat, wall) = open_read(c, root, n, o.ops, o.size)?;
            (lat, rate(o.ops, wall))
        }
        Workload::Seq => {
            let big = if o.quick { 16 << 20 } else { 64 << 20 };
            let (lat, wall) = seq_read(c, root, big)?;
            (lat, big as f64 / wall.as_secs_f64() / 1e6)
        }
        Workload::Readdir => {
            let passes = if o.quick { 3 } else { 2 };
            let (mut lat, mut wall, mut entries) = (Vec::new(), Duration::ZERO, 0);
            for _ in 0..passes {
                let (l, w, e) = readdir_tree(c, root, n)?;
                lat.extend(l);
                wall += w;
                entries += e;
            }
            (lat, rate(entries, wall))
        }
        Workload::Parallel => {
            let per = o.ops / o.clients.max(1);
            let (lat, wall) = parallel_walk(t, o.clients, n, per)?;
            (lat, rate(o.clients * per, wall))
        }
        Workload::Fids(k) => {
            let ops = o.ops.min(5000);
            let (lat, wall) = fid_scaling(t, k, n, ops)?;
            (lat, rate(ops, wall))
        }
    })
}

/// Prints the bootbox server's own request statistics (`--stats`): per type, the count and
/// the mean and upper bounds of the median and p99 time spent inside the server.
fn print_stats(s: &p9::StatsSnapshot) {
    println!("-- bootbox server-side time per request (inside Server::handle), µs --");
    println!(
        "{:<12} {:>9} {:>8} {:>8} {:>8}",
        "type", "count", "mean", "p50<=", "p99<="
    );
    for (name, count, nanos) in &s.by_type {
        let hist = s
            .type_histograms
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.as_slice())
            .unwrap_or(&[]);
        let q = |q| p9::histogram_quantile(hist, q).unwrap_or(0) as f64 / 1000.0;
        println!(
            "{name:<12} {count:>9} {:>8.2} {:>8.2} {:>8.2}",
            *nanos as f64 / (*count).max(1) as f64 / 1000.0,
            q(0.5),
            q(0.99)
        );
    }
}

fn run(o: &Opts) -> R<()> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("create {}: {e}", o.dir.display()))?;
    let max_fids = o.fids.iter().copied().max().unwrap_or(0) as u64;
    raise_nofile(max_fids * 2 + 10_000);
    let have_diod = o.diod
        && Command::new("diod")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
    if o.diod && !have_diod {
        println!("note: diod not found; measuring bootbox only");
    }
    println!(
        "p9-bench: {} mode, workers {}, clients {}, ops {} per workload, file size {} B, {} round(s) \
         interleaved, latencies in µs (over all rounds), rate: median of the rounds",
        if o.quick { "quick" } else { "full" },
        o.workers,
        o.clients,
        o.ops,
        o.size,
        o.rounds
    );
    let mut workloads = vec![
        Workload::Rtt,
        Workload::Walk,
        Workload::DirWalk,
        Workload::Open,
        Workload::Seq,
        Workload::Readdir,
        Workload::Parallel,
    ];
    for &want in &o.fids {
        // Every bootbox fid holds an O_PATH descriptor: stay under the fd limit.
        let k = want.min(nofile().saturating_sub(4000) as usize);
        if k < want {
            eprintln!(
                "note: holding {k} fids instead of {want} (open-file limit {})",
                nofile()
            );
        }
        workloads.push(Workload::Fids(k));
    }
    workloads.retain(|w| o.only.is_empty() || o.only.iter().any(|k| k == w.key()));
    for &n in &o.files {
        let tree = make_tree(&o.dir, n, o.size).map_err(|e| format!("generating tree: {e}"))?;
        let mut targets = vec![start_bootbox(&tree, &o.dir, o.workers, o.stats, o.msize)?];
        if let Some(bin) = &o.baseline {
            targets.push(start_baseline(bin, &tree, &o.dir, o.workers, o.msize)?);
        }
        if have_diod {
            targets.push(start_diod(&tree, &o.dir, o.workers, o.msize)?);
        }
        println!(
            "\n== tree of {n} files ({} dirs) ==",
            n.div_ceil(FILES_PER_DIR)
        );
        let mut conns = Vec::new();
        for t in &targets {
            let mut c = t.connect()?;
            // Warm up caches so both servers see the same host state: whichever server went
            // first would otherwise pay for reading the files from disk.
            walk_getattr(&mut c.0, c.1, n, o.ops.min(1000), 99)?;
            readdir_tree(&mut c.0, c.1, n)?;
            if workloads.contains(&Workload::Open) {
                open_read(&mut c.0, c.1, n, o.ops, o.size)?;
            }
            conns.push(c);
        }
        let msizes: Vec<String> = targets
            .iter()
            .zip(&conns)
            .map(|(t, c)| format!("{} {}", t.name, c.0.msize()))
            .collect();
        println!("negotiated msize: {}", msizes.join(", "));
        let mut acc: Vec<Vec<Acc>> = targets
            .iter()
            .map(|_| workloads.iter().map(|_| Acc::default()).collect())
            .collect();
        // Interleave: every round runs each workload on every server before the next workload,
        // alternating which server goes first, so a noisy moment hits both alike.
        for round in 0..o.rounds {
            for (wi, &w) in workloads.iter().enumerate() {
                let mut order: Vec<usize> = (0..targets.len()).collect();
                if round % 2 == 1 {
                    order.reverse();
                }
                for ti in order {
                    let (lat, rate) = measure(w, &targets[ti], &mut conns[ti], n, o)?;
                    acc[ti][wi].lat.extend(lat);
                    acc[ti][wi].rates.push(rate);
                }
            }
        }
        println!(
            "{:<22} {:<8} {:>11} {:<8} {:>8} {:>8} {:>8} {:>8}",
            "workload", "server", "rate", "unit", "min", "median", "p95", "p99"
        );
        let sums: Vec<Vec<Summary>> = acc
            .iter()
            .map(|per| per.iter().map(Acc::summary).collect())
            .collect();
        for (ti, t) in targets.iter().enumerate() {
            for (wi, &w) in workloads.iter().enumerate() {
                row(&w.label(o.clients), t.name, &sums[ti][wi], w.unit());
            }
        }
        // Ratios of every pair: bootbox/base (b/o), bootbox/diod (b/d), base/diod (o/d).
        let short = |t: &Target| match t.name {
            "bootbox" => "b",
            "base" => "o",
            _ => "d",
        };
        for i in 0..targets.len() {
            for j in i + 1..targets.len() {
                let which = format!("{}/{}", short(&targets[i]), short(&targets[j]));
                println!(
                    "-- ratios {}/{} (rate: higher is better; latency: lower is better) --",
                    targets[i].name, targets[j].name
                );
                for (wi, &w) in workloads.iter().enumerate() {
                    ratio(&w.label(o.clients), &which, &sums[i][wi], &sums[j][wi]);
                }
            }
        }
        let flat: Vec<f64> = workloads
            .iter()
            .zip(&sums[0])
            .filter(|(w, _)| matches!(w, Workload::Fids(_)))
            .map(|(_, s)| s.p50)
            .collect();
        if flat.len() >= 2 {
            println!(
                "bootbox median walk latency with most vs fewest fids held: {:.2}x",
                flat[flat.len() - 1] / flat[0].max(1e-9)
            );
        }
        if o.stats {
            print_stats(&targets[0].stats());
            println!("{}", targets[0].pool_stats());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let (Some(sock), Some(tree)) = (&args.serve, &args.serve_tree) {
        return match serve(sock, tree, args.workers.max(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("p9-bench --serve: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let o = Opts::from(args);
    let t = Instant::now();
    match run(&o) {
        Ok(()) => {
            println!("\ntotal {:.1}s", t.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("p9-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
