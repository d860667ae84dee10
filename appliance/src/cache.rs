//! The base appliance and its on-disk cache.
//!
//! The base appliance is the static guest init at `/init`, a default tool set (each tool only
//! if the host has it), the `--with` programs, their ELF closures, a few config files and the
//! empty mount point directories. Its cache key is a SHA-256 over the format version, the tool
//! lists, the init's content hash and the fingerprint of the assembled tree (every host file's
//! path, size, mtime, ctime, device and inode, every symlink target). A warm [`prepare`] finds
//! `<key>.cpio` and builds nothing; a changed host program changes its ctime (and maybe its
//! inode, size and mtime) and so the key. A warm [`prepare`] does not even walk the tree when
//! the assembly memo ([`crate::memo`]) shows that nothing the walk looked at has changed.
//!
//! Concurrency: builds take an exclusive `flock` on `appliance/.lock`, re-check for the entry,
//! write a temp file, fsync it, rename it into place and fsync the directory, so concurrent
//! runs share one build and readers never see a partial archive. Old entries beyond
//! [`KEEP_ENTRIES`] (least recently used first) are pruned after a build.

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::cpio::CpioError;
use crate::elf::{self, ElfError};
use crate::memo;
use crate::sha256::{self, Sha256};
use crate::tree::{Tree, TreeError};

/// Bumped whenever the appliance layout or the init/job ABI changes.
pub const FORMAT_VERSION: u32 = 1;

/// How many cached appliances to keep.
pub const KEEP_ENTRIES: usize = 4;

/// Programs included when the host has them.
pub const DEFAULT_TOOLS: &[&str] = &[
    "sh",
    "bash",
    "find",
    "ls",
    "stat",
    "cat",
    "sha256sum",
    "md5sum",
    "du",
    "grep",
    "file",
    "tar",
    "head",
    "tail",
    "wc",
    "sort",
    "xargs",
    "env",
    "sleep",
    "dd",
    "mkdir",
    "touch",
    "rm",
    "cp",
    "mv",
    "ln",
    "readlink",
    "true",
    "false",
    "echo",
    "printf",
    // What common job scripts reach for beyond the inspection tools.
    "sync",
    "id",
    "uname",
    "df",
    "awk",
    "sed",
    "chmod",
    "chown",
    "basename",
    "dirname",
    "cut",
    "tr",
    "uniq",
    "tee",
    // Disk inspection (`--disk`): what is on a disk, and its partitions.
    "blkid",
    "lsblk",
];

/// Tools only an appliance for disks takes (when the host has them): the LVM tool that
/// activates volume groups (about 7 MB with its libraries, which no other job should carry).
pub const DISK_ONLY_TOOLS: &[&str] = &["lvm"];

/// The disk inspection tools a `--disk` job expects; `bootbox doctor` says when the host lacks
/// one (the appliance is built without it, like any default tool the host lacks).
pub const DISK_TOOLS: &[&str] = &["blkid", "lsblk"];

/// Magic databases for `file`, added if present.
const MAGIC_DBS: &[&str] = &["/usr/share/misc/magic.mgc", "/usr/lib/file/magic.mgc"];

/// Directories the guest `PATH` covers; programs found elsewhere get a link in
/// `/usr/local/bin`.
pub const GUEST_PATH_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Empty directories the init mounts on or uses.
const BASE_DIRS: &[&str] = &[
    "/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/share", "/etc", "/bootbox", "/mnt",
];

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplianceSpec {
    /// The static guest init binary (see [`find_init`]).
    pub init: PathBuf,
    /// Extra programs (`--with`): names looked up in PATH, or paths.
    pub extra_programs: Vec<String>,
    /// Whether the job has disks: then [`DISK_ONLY_TOOLS`] the host has go in too.
    pub disk_tools: bool,
    /// The bootbox cache root; appliances live in `<cache_dir>/appliance/` (see
    /// [`default_cache_dir`]).
    pub cache_dir: PathBuf,
}

/// A ready base appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The uncompressed newc archive.
    pub path: PathBuf,
    /// The cache key (64 hex digits).
    pub key: String,
    /// True if this call built the archive, false if it was already cached.
    pub built: bool,
    /// Time spent in `prepare` (closure + key, plus the build if any).
    pub build_time: Duration,
    /// Size of the archive in bytes.
    pub size: u64,
}

/// Errors while preparing an appliance.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// A program or library could not be resolved.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// The file tree could not be assembled.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// Writing the archive failed.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// A cache file operation failed.
    #[error("appliance cache: {context}: {source}; check permissions of the cache directory or set BOOTBOX_CACHE")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The guest init binary is missing.
    #[error("guest init not found ({0}); build it with `cargo build -p bootbox-init` or set BOOTBOX_INIT to its path")]
    InitNotFound(String),
    /// The job cannot be encoded.
    #[error("invalid job: {0}")]
    Job(#[from] crate::jobspec::JobSpecError),
    /// No cache directory could be determined.
    #[error("no cache directory: set BOOTBOX_CACHE, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApplianceError {
    let context = context.into();
    move |source| ApplianceError::Io { context, source }
}

/// `${BOOTBOX_CACHE:-${XDG_CACHE_HOME:-~/.cache}/bootbox}`.
pub fn default_cache_dir() -> Result<PathBuf, ApplianceError> {
    let nonempty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = nonempty("BOOTBOX_CACHE") {
        return Ok(d);
    }
    if let Some(d) = nonempty("XDG_CACHE_HOME") {
        return Ok(d.join("bootbox"));
    }
    nonempty("HOME")
        .map(|h| h.join(".cache").join("bootbox"))
        .ok_or(ApplianceError::NoCacheDir)
}

/// Locates the guest init: `$BOOTBOX_INIT`, else `bootbox-init` next to the current
/// executable, else in its parent directory (where cargo puts it relative to test binaries in
/// `target/<profile>/deps`).
pub fn find_init() -> Result<PathBuf, ApplianceError> {
    if let Some(p) = std::env::var_os("BOOTBOX_INIT").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ApplianceError::InitNotFound(format!(
                "BOOTBOX_INIT={} does not exist",
                p.display()
            )))
        };
    }
    let exe = std::env::current_exe().map_err(|e| {
        ApplianceError::InitNotFound(format!("cannot locate the current executable: {e}"))
    })?;
    let mut tried = Vec::new();
    if let Some(dir) = exe.parent() {
        for cand in [
            dir.join("bootbox-init"),
            dir.join("..").join("bootbox-init"),
        ] {
            if cand.is_file() {
                return Ok(cand);
            }
            tried.push(cand.display().to_string());
        }
    }
    Err(ApplianceError::InitNotFound(format!(
        "looked at {}",
        tried.join(", ")
    )))
}

/// Where a program found at `host` should also be linked so the guest PATH finds it.
fn needs_path_link(host: &Path) -> bool {
    let parent = host.parent().and_then(|p| p.to_str()).unwrap_or("");
    !GUEST_PATH_DIRS.contains(&parent)
}

/// The init's SHA-256, memoized by (path, device, inode, size, mtime, ctime): ctime cannot be
/// set by users, so any rewrite of the file invalidates the memo, and warm runs do not rehash
/// a multi-megabyte binary. One memo per init path (`<dir>/init-hash-<hash of the path>`), so
/// two builds of bootbox used side by side do not evict each other's.
fn init_content_hash(init: &Path, dir: &Path) -> Result<[u8; 32], ApplianceError> {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |e: std::io::Error| {
        ApplianceError::InitNotFound(format!("cannot read {}: {e}", init.display()))
    };
    let m = fs::metadata(init).map_err(unreadable)?;
    let stamp = format!(
        "{}\t{}\t{}\t{}\t{}.{}\t{}.{}",
        init.display(),
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    let mut path_hash = Sha256::new();
    path_hash.field(init.as_os_str().as_encoded_bytes());
    let memo = dir.join(format!("init-hash-{}", &path_hash.finish_hex()[..16]));
    if let Ok(text) = fs::read_to_string(&memo) {
        if let Some((st, hex)) = text.trim_end().rsplit_once('\n') {
            if st == stamp {
                if let Some(h) = parse_hex32(hex) {
                    return Ok(h);
                }
            }
        }
    }
    let h = sha256::hash_file(init).map_err(unreadable)?;
    // Best effort: a failed memo write only costs a rehash next time.
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tmp = dir.join(format!(
        ".init-hash.tmp.{}.{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if fs::create_dir_all(dir).is_ok()
        && fs::write(&tmp, format!("{stamp}\n{hex}\n")).is_ok()
        && fs::rename(&tmp, &memo).is_err()
    {
        let _ = fs::remove_file(&tmp);
    }
    Ok(h)
}

fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// Assembles the appliance tree for `spec` and computes its cache key.
pub fn assemble(spec: &ApplianceSpec) -> Result<(Tree, String), ApplianceError> {
    let init_hash = init_content_hash(&spec.init, &spec.cache_dir.join("appliance"))?;
    let (tree, key, _) = walk(spec, &init_hash)?;
    Ok((tree, key))
}

/// Optional host files the appliance takes when present.
fn optional_files() -> impl Iterator<Item = &'static Path> {
    MAGIC_DBS
        .iter()
        .chain(&["/etc/ld.so.cache", "/bin/sh"])
        .map(Path::new)
}

/// A hasher that has taken `domain`, the format version and the tool lists of `spec`.
fn spec_hasher(domain: &[u8], spec: &ApplianceSpec) -> Sha256 {
    let mut h = Sha256::new();
    h.field(domain);
    h.field(&FORMAT_VERSION.to_le_bytes());
    for t in DEFAULT_TOOLS {
        h.field(t.as_bytes());
    }
    if spec.disk_tools {
        for t in DISK_ONLY_TOOLS {
            h.field(t.as_bytes());
        }
    }
    h.field(b"--with");
    for t in &spec.extra_programs {
        h.field(t.as_bytes());
    }
    h
}

/// The hash of everything [`walk`] depends on besides the host files it looks at (those are
/// the memo's witnesses, see [`crate::memo`]).
fn walk_inputs(spec: &ApplianceSpec, init_hash: &[u8; 32]) -> String {
    let mut h = spec_hasher(b"bootbox-appliance-walk", spec);
    // A relative `--with` path is found from the working directory.
    if spec
        .extra_programs
        .iter()
        .any(|p| p.contains('/') && !p.starts_with('/'))
    {
        let cwd = std::env::current_dir().unwrap_or_default();
        h.field(cwd.as_os_str().as_encoded_bytes());
    }
    h.field(b"PATH");
    h.field(
        std::env::var_os("PATH")
            .unwrap_or_default()
            .as_encoded_bytes(),
    );
    h.field(b"library dirs");
    for d in elf::system_library_dirs() {
        h.field(d.as_os_str().as_encoded_bytes());
    }
    h.field(spec.init.as_os_str().as_encoded_bytes());
    h.field(init_hash);
    h.finish_hex()
}

/// Assembles the tree and its key; also returns every host path looked at and passed over
/// (for the memo).
fn walk(
    spec: &ApplianceSpec,
    init_hash: &[u8; 32],
) -> Result<(Tree, String, Vec<PathBuf>), ApplianceError> {
    let mut passed_over: Vec<PathBuf> = optional_files().map(Path::to_path_buf).collect();
    let mut tree = Tree::new();
    for d in BASE_DIRS {
        tree.add_dir(d)?;
    }
    tree.add_char_device("/dev/console", 0o600, 5, 1)?;
    tree.add_host_file_as("/init", &spec.init, Some(0o755))?;
    tree.add_bytes(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
    )?;
    tree.add_bytes(
        "/etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    )?;

    // Programs: defaults only if present, --with programs must exist.
    let mut programs: Vec<(String, PathBuf)> = Vec::new();
    let disk_only: &[&str] = if spec.disk_tools {
        DISK_ONLY_TOOLS
    } else {
        &[]
    };
    for name in DEFAULT_TOOLS.iter().chain(disk_only) {
        if let Ok(p) = elf::find_program_probing(name, &mut passed_over) {
            programs.push((name.to_string(), p));
        }
    }
    for name in &spec.extra_programs {
        programs.push((
            name.clone(),
            elf::find_program_probing(name, &mut passed_over)?,
        ));
    }
    let mut roots: Vec<PathBuf> = programs.iter().map(|(_, p)| p.clone()).collect();
    // Scripts and `system()` expect /bin/sh by that exact path.
    if Path::new("/bin/sh").exists() {
        roots.push(PathBuf::from("/bin/sh"));
    }
    let mut closure = elf::closure(&roots)?;
    passed_over.append(&mut closure.probed);
    for f in &closure.files {
        tree.add_host_path(f)?;
    }
    for (name, host) in &programs {
        if needs_path_link(host) {
            let base = Path::new(name)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(name);
            let link = format!("/usr/local/bin/{base}");
            if tree.get(&link).is_none() {
                let target = host
                    .to_str()
                    .ok_or_else(|| TreeError::BadPath(host.clone()))?;
                tree.add_symlink(&link, target)?;
            }
        }
    }
    if programs.iter().any(|(n, _)| n == "file") {
        for db in MAGIC_DBS {
            if Path::new(db).exists() {
                tree.add_host_path(Path::new(db))?;
            }
        }
    }
    if Path::new("/etc/ld.so.cache").exists() {
        tree.add_host_path(Path::new("/etc/ld.so.cache"))?;
    }

    let mut h = spec_hasher(b"bootbox-appliance", spec);
    h.field(init_hash);
    tree.fingerprint(&mut h);
    Ok((tree, h.finish_hex(), passed_over))
}

fn flock(file: &File) -> Result<(), ApplianceError> {
    loop {
        // SAFETY: flock on a valid, owned file descriptor; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io_err("locking the appliance cache")(e));
        }
    }
}

fn touch(path: &Path) {
    // Marks the entry as recently used for pruning; failure only affects pruning order.
    if let Ok(f) = File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Builds (or finds in the cache) the base appliance for `spec`.
pub fn prepare(spec: &ApplianceSpec) -> Result<Prepared, ApplianceError> {
    let start = Instant::now();
    let dir = spec.cache_dir.join("appliance");
    let init_hash = init_content_hash(&spec.init, &dir)?;
    let inputs = walk_inputs(spec, &init_hash);
    if let Some(key) = memo::recall(&dir, &inputs) {
        let path = dir.join(format!("{key}.cpio"));
        if let Ok(m) = fs::metadata(&path) {
            if m.is_file() {
                touch(&path);
                return Ok(Prepared {
                    path,
                    key,
                    built: false,
                    build_time: start.elapsed(),
                    size: m.len(),
                });
            }
        }
    }
    let (tree, key, passed_over) = walk(spec, &init_hash)?;
    memo::remember(&dir, &inputs, &key, &tree, &passed_over);
    let path = dir.join(format!("{key}.cpio"));
    let done = |built: bool, path: PathBuf| -> Result<Prepared, ApplianceError> {
        let size = fs::metadata(&path)
            .map_err(io_err(format!("stat {}", path.display())))?
            .len();
        Ok(Prepared {
            path,
            key: key.clone(),
            built,
            build_time: start.elapsed(),
            size,
        })
    };
    if path.is_file() {
        touch(&path);
        return done(false, path);
    }
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("opening {}", lock_path.display())))?;
    flock(&lock)?;
    // Someone else may have built it while we waited.
    if path.is_file() {
        touch(&path);
        return done(false, path);
    }
    remove_stale_temps(&dir);
    let tmp = dir.join(format!(".{key}.tmp.{}", std::process::id()));
    let result = write_archive(&tree, &tmp, &path, &dir);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    prune(&dir, &path);
    drop(lock);
    done(true, path)
}

fn write_archive(tree: &Tree, tmp: &Path, path: &Path, dir: &Path) -> Result<(), ApplianceError> {
    let file = File::create(tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    let w = tree.write_cpio(BufWriter::with_capacity(1 << 20, file))?;
    let file = w
        .into_inner()
        .map_err(|e| io_err(format!("writing {}", tmp.display()))(e.into_error()))?;
    file.sync_all()
        .map_err(io_err(format!("syncing {}", tmp.display())))?;
    drop(file);
    fs::rename(tmp, path).map_err(io_err(format!("renaming into {}", path.display())))?;
    let d = File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
    d.sync_all()
        .map_err(io_err(format!("syncing {}", dir.display())))?;
    Ok(())
}

/// Temp files left by a crashed build (only the lock holder writes temps, so under the lock
/// every temp is stale).
fn remove_stale_temps(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp.") && !name.starts_with(".init-hash") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Keeps the [`KEEP_ENTRIES`] most recently used archives (always including `keep`).
fn prune(dir: &Path, keep: &Path) {
    let mut entries: Vec<(SystemTime, PathBuf)> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "cpio") && p != keep)
            .filter_map(|p| {
                let t = fs::metadata(&p).and_then(|m| m.modified()).ok()?;
                Some((t, p))
            })
            .collect(),
        Err(_) => return,
    };
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, p) in entries.into_iter().skip(KEEP_ENTRIES.saturating_sub(1)) {
        let _ = fs::remove_file(p);
    }
}

/// Reads a prepared archive into memory (the VMM places it in guest RAM as the initrd).
pub fn read_archive(prepared: &Prepared) -> Result<Vec<u8>, ApplianceError> {
    let mut v = Vec::with_capacity(usize::try_from(prepared.size).unwrap_or(0));
    File::open(&prepared.path)
        .and_then(|mut f| std::io::Read::read_to_end(&mut f, &mut v))
        .map_err(io_err(format!("reading {}", prepared.path.display())))?;
    Ok(v)
}

/// The complete initrd for one run: the cached base archive followed by the job archive
/// (the kernel unpacks concatenated newc archives in order).
pub fn initramfs(
    prepared: &Prepared,
    job: &crate::jobspec::Job,
) -> Result<Vec<u8>, ApplianceError> {
    let job_cpio = crate::job::job_cpio(job)?;
    let mut v = read_archive(prepared)?;
    v.extend_from_slice(&job_cpio);
    Ok(v)
}
