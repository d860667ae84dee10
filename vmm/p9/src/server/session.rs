//! A session's state and the helpers every operation shares: the [`Share`] (root, config,
//! statistics) all sessions of one export hold, the [`Server`] value (one session: fid table,
//! caps, negotiated msize), its constructors and accessors, the checks requests start with
//! (read-only, fid caps, directory fids still in the share), finding a fid's directory entry,
//! and encoding a reply into the reply area ([`send`]).

use super::config::{Config, Error, MIN_MSIZE};
use super::dircache::{self, DirCache};
use super::dirfds::DirFds;
use super::fids::{Count, Fid, FidTable, Limits};
use super::stamp;
use super::stats::{Stats, StatsSnapshot};
use super::sys::{
    dup, fstat, fstat_raw, fstatat, host_mode, kind_of, open_cloexec, openat, Errno, Kind, Name,
};
use super::viewcache::ViewCache;
use crate::confine::{Root, PATH_BUF};
use crate::ownership::{self, GuestAttr, Ownership};
use crate::reply::ReplyBuf;
use crate::wire::{self, Qid, Rmessage};
use std::cell::RefCell;
use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

/// A Tread or Treaddir: data requests, answered straight into the reply area.
pub(super) struct DataRequest {
    pub(super) tag: u16,
    pub(super) fid: u32,
    pub(super) offset: u64,
    pub(super) count: u32,
}

/// What every session of one export shares.
pub(super) struct Share {
    pub(super) root: Root,
    pub(super) config: Config,
    pub(super) stats: Stats,
    /// Listings of unchanged directories, for Treaddir.
    pub(super) dirs: DirCache,
    /// Descriptors of directories walks pass through, for Twalk.
    pub(super) dirfds: DirFds,
    /// The guest's view of unchanged files (mapped mode), for Tgetattr.
    pub(super) views: ViewCache,
    /// The owners the guest gave symlinks (mapped mode). A symlink cannot carry the extended
    /// attribute that holds the guest's view elsewhere, so these live as long as the share is
    /// served: a job sees its own lchown, the host's symlink is never changed.
    pub(super) symlink_owners: SymlinkOwners,
}

/// The guest's owner and group of symlinks, by (device, inode), bounded.
#[derive(Default)]
pub(super) struct SymlinkOwners(
    std::sync::Mutex<std::collections::HashMap<(u64, u64), (u32, u32)>>,
);

impl SymlinkOwners {
    /// Symlinks whose owner is remembered; beyond this the guest sees the host's owner.
    const MAX: usize = 65536;

    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<(u64, u64), (u32, u32)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The owner the guest gave the symlink `st` describes, if any.
    pub(super) fn get(&self, st: &libc::stat64) -> Option<(u32, u32)> {
        self.map().get(&(st.st_dev, st.st_ino)).copied()
    }

    /// Remembers the guest's owner of the symlink `st` describes; false when full.
    pub(super) fn set(&self, st: &libc::stat64, owner: (u32, u32)) -> bool {
        let mut map = self.map();
        let key = (st.st_dev, st.st_ino);
        if map.len() >= Self::MAX && !map.contains_key(&key) {
            return false;
        }
        map.insert(key, owner);
        true
    }
}

/// A 9P2000.L server for one exported directory. `Send + Sync`; call [`Server::handle`] from
/// as many threads as you like. Each `Server` value is one session (one fid space); use
/// [`Server::new_session`] for another connection to the same share.
pub struct Server {
    pub(super) share: Arc<Share>,
    pub(super) fids: FidTable,
    pub(super) limits: Arc<Limits>,
    pub(super) msize: AtomicU32,
}

impl Share {
    pub(super) fn qid_path(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root.dev {
            ino
        } else {
            ino ^ (dev.wrapping_mul(0x9E37_79B9_7F4A_7C15) & 0xffff_0000_0000_0000)
        }
    }
    pub(super) fn qid(&self, st: &libc::stat64) -> Qid {
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
            stats: Stats::new(config.stats),
            dirs: DirCache::new(stamp::SETTLED_NS, dircache::BUDGET, dircache::MAX_LISTING),
            dirfds: DirFds::new(config.max_fids),
            views: ViewCache::new(stamp::SETTLED_NS),
            symlink_owners: SymlinkOwners::default(),
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

    /// Requests by type and a latency histogram, collected when the server was created with
    /// [`Config::stats`] (empty otherwise).
    pub fn stats(&self) -> StatsSnapshot {
        self.share.stats.snapshot()
    }

    pub(super) fn ro(&self) -> Result<(), Errno> {
        if self.share.config.read_only {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    /// Takes one fid from this session's cap; `replacing` allows one over the cap for a request
    /// that replaces an existing fid (the net count does not grow).
    pub(super) fn fid_slot(&self, replacing: bool) -> Result<Count, Errno> {
        let max = self.share.config.max_fids + usize::from(replacing);
        Count::take(&self.limits, |l| &l.fids, max, libc::ENFILE)
    }

    pub(super) fn open_slot(&self) -> Result<Count, Errno> {
        let max = self.share.config.max_open_files;
        Count::take(&self.limits, |l| &l.open_files, max, libc::EMFILE)
    }

    pub(super) fn new_fid(
        slot: Count,
        fd: Arc<OwnedFd>,
        st: &libc::stat64,
        entry: Option<(Arc<OwnedFd>, Box<[u8]>)>,
        uid: u32,
        depth: u32,
    ) -> Fid {
        Fid {
            fd,
            kind: kind_of(st.st_mode),
            dev: st.st_dev,
            ino: st.st_ino,
            entry,
            depth: AtomicU32::new(depth),
            uid,
            open: OnceLock::new(),
            _count: slot,
        }
    }

    /// Whether the guest's ownership view is kept apart from the host's (writable share in
    /// mapped mode).
    pub(super) fn mapped(&self) -> bool {
        !self.share.config.read_only && self.share.config.ownership == Ownership::Mapped
    }

    /// The host mode of something the guest creates or chmods: no set-id bits ever, and in
    /// mapped mode always readable and writable by the server's own user, whose access the
    /// guest's view no longer governs.
    pub(super) fn host_mode(&self, mode: u32, dir: bool) -> u32 {
        let owner = match (self.mapped(), dir) {
            (false, _) => 0,
            (true, false) => 0o600,
            (true, true) => 0o700,
        };
        host_mode(mode) | owner
    }

    /// Records the guest's view of what it just created or changed (mapped mode). Best effort
    /// on creates: without user xattrs on the host the guest sees the host's values.
    pub(super) fn record(&self, fd: RawFd, want: &GuestAttr) -> Result<(), Errno> {
        if !self.mapped() {
            return Ok(());
        }
        let st = fstat_raw(fd)?;
        ownership::record(fd, &st, want)
    }

    pub(super) fn is_root(&self, f: &Fid) -> bool {
        self.share.root.is(f.dev, f.ino)
    }

    /// How many of the `count` data bytes a client asked for fit in an Rread/Rreaddir: the
    /// negotiated msize and the reply area both bound the whole reply.
    pub(super) fn data_room(&self, count: u32, reply: &dyn ReplyBuf) -> usize {
        let max = (self.msize() as usize)
            .min(reply.capacity())
            .saturating_sub(wire::RREAD_HEADER_LEN);
        (count as usize).min(max)
    }

    /// ENOENT unless the directory fid `f` still lies beneath the share root (remembering how
    /// deep it lies now, for the next check).
    pub(super) fn check_dir(&self, f: &Fid) -> Result<(), Errno> {
        let hint = f.depth.load(Ordering::Relaxed);
        let depth = self
            .share
            .root
            .check_dir_near(f.fd.as_fd(), f.dev, f.ino, hint)?;
        if depth != hint {
            f.depth.store(depth, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A directory fid that is still beneath the share root, for requests that name something
    /// in it.
    pub(super) fn dir_fid(&self, fid: u32) -> Result<Arc<Fid>, Errno> {
        let f = self.fids.get(fid)?;
        if f.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        self.check_dir(&f)?;
        Ok(f)
    }

    /// The directory holding `f` and its name there, both checked: the directory is beneath the
    /// share root and the name still refers to this very file.
    pub(super) fn entry_of(&self, f: &Fid) -> Result<(Arc<OwnedFd>, Name), Errno> {
        if self.is_root(f) {
            return Err(libc::EBUSY);
        }
        if let Some((dir, name)) = &f.entry {
            let name = Name::new(name, false)?;
            let dst = fstat(dir.as_fd())?;
            let hint = f.depth.load(Ordering::Relaxed).saturating_sub(1);
            self.share
                .root
                .check_dir_near(dir.as_fd(), dst.st_dev, dst.st_ino, hint)?;
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
    pub(super) fn parent_of(&self, f: &Fid) -> Result<(OwnedFd, Name), Errno> {
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
}

thread_local! {
    /// Each thread's encoding buffer for replies, reused across requests.
    static ENCODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes `m` with `tag` and writes it at the start of the reply area; returns its length.
pub(super) fn send(reply: &mut dyn ReplyBuf, tag: u16, m: &Rmessage<'_>) -> Result<usize, Errno> {
    let mut put = |out: &mut Vec<u8>| {
        out.clear();
        m.encode(tag, out);
        reply.write_at(0, out).map_err(|_| libc::ENOBUFS)?;
        Ok(out.len())
    };
    ENCODED.with(|b| match b.try_borrow_mut() {
        Ok(mut out) => put(&mut out),
        Err(_) => put(&mut Vec::new()),
    })
}

/// Answers Rlerror with `ecode`; returns its length, or 0 if not even that fits.
pub(super) fn lerror(tag: u16, ecode: Errno, reply: &mut dyn ReplyBuf) -> usize {
    let m = Rmessage::Lerror {
        ecode: ecode as u32,
    };
    send(reply, tag, &m).unwrap_or(0)
}
