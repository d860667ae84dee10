//! Keeping every request beneath the share root, whatever the host does meanwhile.
//!
//! A fid holds an `O_PATH` descriptor, and a descriptor follows its inode wherever the inode
//! moves. If something on the host moves a directory out of the share while the guest holds a
//! fid in it (or, with two shares, the guest moves it through the other share), that fid names
//! something outside, and `openat(fd, "..")` from it climbs the host's real tree. This module
//! owns one question, *is this directory still beneath the root?*, and the server asks it:
//!
//! * before any request that names something through a directory fid: walks from a fid other
//!   than the root, creates, links, renames, removes, directory opens and listings;
//! * after every `..` step of a walk, so the next step never starts outside.
//!
//! A directory moved out therefore answers ENOENT: from the share's point of view it is gone.
//! Requests on a fid's own inode (getattr, read and write through an open file) keep working, as
//! an open file keeps working on a local filesystem after a rename.
//!
//! How: the directory's ancestor `depth` levels up must be the root itself, where `depth` is how
//! far below the root the server last saw the directory: one `fstatat(fd, "../..", ...)`
//! (`depth` times `..`, resolved by the kernel from the directory's current place in the tree)
//! whose `(dev, ino)` must be the root's. A directory has exactly one parent, so an ancestor
//! that is the root means the directory lies beneath it, whatever `depth` was; a stale `depth`
//! (the directory moved within the share) only makes this fail, never pass wrongly. When it
//! fails, the full check decides and tells the depth to remember: the kernel's current path of
//! the descriptor (`/proc/self/fd/N`) must lie strictly under the root's current path, both
//! read at the time of the check, so a renamed share root is followed. When a path is too long
//! for the kernel to print (deeper than `PATH_MAX`), the directory's ancestry is walked with
//! `..` up to the root instead: correct at any depth, only slower.
//!
//! A check and the request that follows are two system calls; a move between them lands the
//! request on a directory that was inside a moment before. The ancestor check has a window of
//! the same kind inside it: the kernel resolves each `..` in turn, and unlike the path read
//! (taken under the kernel's rename lock) the chain is not one snapshot, so two host renames
//! timed between its steps could pass a directory that was never inside at one instant. Both
//! windows need the host itself to move directories at the right microsecond; the guest's own
//! renames stay inside the share. The sandbox (Landlock rules, which the kernel evaluates on the
//! real tree at access time) closes them; see the README.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

type Errno = i32;

/// Longest path `readlink` reports before we fall back to walking the ancestry.
pub(crate) const PATH_BUF: usize = 4096 + 1;
/// Deepest ancestry walked before giving up (directories nest at most this deep in practice;
/// the kernel's own path walk gives up far earlier on anything deeper than PATH_MAX).
const MAX_DEPTH: usize = 1 << 16;

/// The exported directory and what the checks need to know about it.
pub(crate) struct Root {
    pub(crate) fd: OwnedFd,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    /// `/proc/self/fd`, opened once.
    pub(crate) proc_fd: OwnedFd,
    /// Off only for tests that show the sandbox alone stops an escape.
    pub(crate) checks: bool,
}

impl Root {
    /// Whether `(dev, ino)` is the share root itself.
    pub(crate) fn is(&self, dev: u64, ino: u64) -> bool {
        dev == self.dev && ino == self.ino
    }

    /// Ok if the directory `fd` (whose identity is `(dev, ino)`) is the root or lies beneath
    /// it now, with how far below the root it lies (0 for the root; `depth` itself when the
    /// checks are off); ENOENT if it has left the share. `depth` is a hint, where the directory
    /// was last seen: its ancestor that many levels up is tried first (see the module docs).
    pub(crate) fn check_dir_near(
        &self,
        fd: BorrowedFd<'_>,
        dev: u64,
        ino: u64,
        depth: u32,
    ) -> Result<u32, Errno> {
        if self.is(dev, ino) {
            return Ok(0);
        }
        if !self.checks {
            return Ok(depth);
        }
        if self.ancestor_is_root(fd, depth) {
            return Ok(depth);
        }
        let mut me = [0u8; PATH_BUF];
        let mut root = [0u8; PATH_BUF];
        match (
            self.path_of(fd, &mut me),
            self.path_of(self.fd.as_fd(), &mut root),
        ) {
            (Ok(me), Ok(root)) => depth_under(me, root).ok_or(libc::ENOENT),
            (Err(libc::ENAMETOOLONG), _) | (_, Err(libc::ENAMETOOLONG)) => self.walk_up(fd),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Whether the directory `depth` levels above the directory `fd` (at least one) is the root:
    /// one `fstatat(fd, "../..", ...)`. Any failure (a path longer than `PATH_MAX`, a directory
    /// without search permission, a vanished parent) answers false, leaving the decision to the
    /// full check.
    fn ancestor_is_root(&self, fd: BorrowedFd<'_>, depth: u32) -> bool {
        let n = depth as usize;
        // "..", then "/.." for each further level, then the NUL.
        if n == 0 || 3 * n > PATH_BUF - 1 {
            return false;
        }
        let mut path = [0u8; PATH_BUF];
        for (i, b) in path[..3 * n - 1].iter_mut().enumerate() {
            *b = if i % 3 == 2 { b'/' } else { b'.' };
        }
        // SAFETY: stat64 is plain data; zeroed is a valid value.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open, `path` is NUL-terminated (zero-filled past the dots) and `st`
        // is a valid out pointer.
        let r = unsafe {
            libc::fstatat64(
                fd.as_raw_fd(),
                path.as_ptr().cast(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        r == 0 && self.is(st.st_dev, st.st_ino)
    }

    /// The kernel's current path of `fd`, or ENAMETOOLONG when it does not fit `buf`.
    pub(crate) fn path_of<'b>(
        &self,
        fd: BorrowedFd<'_>,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], Errno> {
        let mut name = [0u8; 24];
        let digits = fd.as_raw_fd().to_string();
        name[..digits.len()].copy_from_slice(digits.as_bytes());
        // SAFETY: `name` is NUL-terminated (zero-filled past the digits), `buf` is writable for
        // its length, and `proc_fd` is an open directory.
        let n = unsafe {
            libc::readlinkat(
                self.proc_fd.as_raw_fd(),
                name.as_ptr().cast(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        let n = n as usize;
        if n >= buf.len() {
            return Err(libc::ENAMETOOLONG);
        }
        Ok(&buf[..n])
    }

    /// Climbs from the directory `fd` with `..` until the root (Ok, with the number of levels
    /// climbed) or the top of the host's tree (ENOENT).
    fn walk_up(&self, fd: BorrowedFd<'_>) -> Result<u32, Errno> {
        const DOTDOT: &CStr = c"..";
        let mut cur = fd.try_clone_to_owned().map_err(io_errno)?;
        let mut here = stat_id(cur.as_fd())?;
        for level in 1..=MAX_DEPTH as u32 {
            // SAFETY: `cur` is an open directory descriptor and DOTDOT is NUL-terminated; the
            // result is checked before use.
            let raw = unsafe {
                libc::openat(
                    cur.as_raw_fd(),
                    DOTDOT.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(io_errno(std::io::Error::last_os_error()));
            }
            // SAFETY: openat returned a new descriptor that nothing else owns.
            let parent = unsafe { OwnedFd::from_raw_fd(raw) };
            let up = stat_id(parent.as_fd())?;
            if self.is(up.0, up.1) {
                return Ok(level);
            }
            if up == here {
                return Err(libc::ENOENT);
            }
            cur = parent;
            here = up;
        }
        Err(libc::ENOENT)
    }
}

/// Whether the path `me` names something strictly below the directory path `root`.
fn strictly_under(me: &[u8], root: &[u8]) -> bool {
    if root == b"/" {
        return me.len() > 1 && me[0] == b'/';
    }
    me.len() > root.len() + 1 && me.starts_with(root) && me[root.len()] == b'/'
}

/// How many levels below the directory path `root` the path `me` lies, if strictly below it.
fn depth_under(me: &[u8], root: &[u8]) -> Option<u32> {
    if !strictly_under(me, root) {
        return None;
    }
    let rel = if root == b"/" { me } else { &me[root.len()..] };
    Some(rel.iter().filter(|&&b| b == b'/').count() as u32)
}

fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn stat_id(fd: BorrowedFd<'_>) -> Result<(u64, u64), Errno> {
    // SAFETY: stat64 is plain data; zeroed is a valid value.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open, the empty path is NUL-terminated and `st` is a valid out pointer.
    let r = unsafe {
        libc::fstatat64(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(io_errno(std::io::Error::last_os_error()));
    }
    Ok((st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn open_path(p: &Path) -> OwnedFd {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is NUL-terminated; the result is checked.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        assert!(fd >= 0, "open {p:?}");
        // SAFETY: a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// The check without a depth hint: always the full one.
    fn full_check(root: &Root, fd: BorrowedFd<'_>, dev: u64, ino: u64) -> Result<(), Errno> {
        root.check_dir_near(fd, dev, ino, 0).map(|_| ())
    }

    fn root_at(p: &Path) -> Root {
        let fd = open_path(p);
        let (dev, ino) = stat_id(fd.as_fd()).unwrap();
        Root {
            fd,
            dev,
            ino,
            proc_fd: open_path(Path::new("/proc/self/fd")),
            checks: true,
        }
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("p9-confine-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A scratch directory with `share/<dir>` in it: the scratch path, the share's root and
    /// an `O_PATH` descriptor of the directory with its identity.
    fn share_holding(tag: &str, dir: &str) -> (std::path::PathBuf, Root, OwnedFd, (u64, u64)) {
        let d = scratch(tag);
        std::fs::create_dir_all(d.join("share").join(dir)).unwrap();
        let root = root_at(&d.join("share"));
        let fd = open_path(&d.join("share").join(dir));
        let id = stat_id(fd.as_fd()).unwrap();
        (d, root, fd, id)
    }

    #[test]
    fn prefix_rule_needs_a_separator() {
        assert!(strictly_under(b"/srv/share/a", b"/srv/share"));
        assert!(!strictly_under(b"/srv/share2/a", b"/srv/share"));
        assert!(!strictly_under(b"/srv/share", b"/srv/share"));
        assert!(!strictly_under(b"/srv", b"/srv/share"));
        assert!(strictly_under(b"/etc", b"/"));
        assert!(!strictly_under(b"/", b"/"));
    }

    #[test]
    fn a_directory_moved_out_is_no_longer_beneath() {
        let (d, root, b, (dev, ino)) = share_holding("moved", "a/b");
        assert_eq!(full_check(&root, b.as_fd(), dev, ino), Ok(()));
        std::fs::rename(d.join("share/a"), d.join("elsewhere")).unwrap();
        assert_eq!(full_check(&root, b.as_fd(), dev, ino), Err(libc::ENOENT));
        assert_eq!(root.walk_up(b.as_fd()), Err(libc::ENOENT));
        // Moved back, it is inside again; a renamed root is followed.
        std::fs::rename(d.join("elsewhere"), d.join("share/a")).unwrap();
        std::fs::rename(d.join("share"), d.join("share-renamed")).unwrap();
        assert_eq!(full_check(&root, b.as_fd(), dev, ino), Ok(()));
        assert_eq!(root.walk_up(b.as_fd()), Ok(2));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn depth_counts_the_levels_below_the_root() {
        assert_eq!(depth_under(b"/srv/share/a", b"/srv/share"), Some(1));
        assert_eq!(depth_under(b"/srv/share/a/b/c", b"/srv/share"), Some(3));
        assert_eq!(depth_under(b"/srv/share2/a", b"/srv/share"), None);
        assert_eq!(depth_under(b"/srv/share", b"/srv/share"), None);
        assert_eq!(depth_under(b"/etc/x", b"/"), Some(2));
    }

    #[test]
    fn a_depth_hint_never_lets_a_directory_outside_pass() {
        let (d, root, b, (dev, ino)) = share_holding("near", "a/b");
        // The right hint is confirmed by the ancestor alone; a wrong one is corrected.
        assert!(root.ancestor_is_root(b.as_fd(), 2));
        assert!(!root.ancestor_is_root(b.as_fd(), 1));
        assert!(!root.ancestor_is_root(b.as_fd(), 3));
        for hint in [0, 1, 2, 3, 40, u32::MAX] {
            assert_eq!(root.check_dir_near(b.as_fd(), dev, ino, hint), Ok(2));
        }
        // Moved deeper within the share: still inside, at its new depth.
        std::fs::rename(d.join("share/a"), d.join("share/a2")).unwrap();
        std::fs::create_dir(d.join("share/a")).unwrap();
        std::fs::rename(d.join("share/a2"), d.join("share/a/a2")).unwrap();
        assert_eq!(root.check_dir_near(b.as_fd(), dev, ino, 2), Ok(3));
        // Moved out, with every hint: the share's parent is an ancestor of it now, the root is
        // not, at any distance.
        std::fs::rename(d.join("share/a/a2"), d.join("out")).unwrap();
        for hint in [0, 1, 2, 3, 4, 40] {
            assert!(!root.ancestor_is_root(b.as_fd(), hint));
            assert_eq!(
                root.check_dir_near(b.as_fd(), dev, ino, hint),
                Err(libc::ENOENT)
            );
        }
        // The root itself is depth 0, and with the checks off the hint is taken as it is.
        let (rdev, rino) = stat_id(root.fd.as_fd()).unwrap();
        assert_eq!(root.check_dir_near(root.fd.as_fd(), rdev, rino, 7), Ok(0));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn deep_directories_are_checked_by_their_ancestry() {
        let d = scratch("deep");
        let mut p = d.join("share");
        std::fs::create_dir_all(&p).unwrap();
        let root = root_at(&p);
        // Build a chain longer than PATH_MAX one level at a time (relative to the last).
        let comp = "d".repeat(200);
        let mut cur = open_path(&p);
        for _ in 0..30 {
            let c = CString::new(comp.as_str()).unwrap();
            // SAFETY: `cur` is an open directory and `c` NUL-terminated.
            assert_eq!(
                unsafe { libc::mkdirat(cur.as_raw_fd(), c.as_ptr(), 0o755) },
                0
            );
            // SAFETY: as above; the result is checked.
            let fd = unsafe {
                libc::openat(
                    cur.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            assert!(fd >= 0);
            // SAFETY: a fresh descriptor we own.
            cur = unsafe { OwnedFd::from_raw_fd(fd) };
        }
        let mut buf = [0u8; PATH_BUF];
        assert_eq!(root.path_of(cur.as_fd(), &mut buf), Err(libc::ENAMETOOLONG));
        let (dev, ino) = stat_id(cur.as_fd()).unwrap();
        assert_eq!(full_check(&root, cur.as_fd(), dev, ino), Ok(()));
        // Move the top of the chain out: the deep directory is outside now.
        p.push(&comp);
        std::fs::rename(&p, d.join("out")).unwrap();
        assert_eq!(full_check(&root, cur.as_fd(), dev, ino), Err(libc::ENOENT));
        let _ = std::process::Command::new("rm").arg("-rf").arg(&d).status();
    }
}
