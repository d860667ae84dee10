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
//! How: the kernel's current path of the descriptor (`/proc/self/fd/N`) must lie strictly under
//! the root's current path, both read at the time of the check, so a renamed share root is
//! followed. When a path is too long for the kernel to print (deeper than `PATH_MAX`), the
//! directory's ancestry is walked with `..` up to the root instead: correct at any depth, only
//! slower.
//!
//! A check and the request that follows are two system calls; a move between them lands the
//! request on a directory that was inside a moment before. The sandbox (Landlock rules, which the
//! kernel evaluates on the real tree at access time) closes that window; see the README.

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
    /// it now; ENOENT if it has left the share.
    pub(crate) fn check_dir(&self, fd: BorrowedFd<'_>, dev: u64, ino: u64) -> Result<(), Errno> {
        if self.is(dev, ino) || !self.checks {
            return Ok(());
        }
        let mut me = [0u8; PATH_BUF];
        let mut root = [0u8; PATH_BUF];
        match (
            self.path_of(fd, &mut me),
            self.path_of(self.fd.as_fd(), &mut root),
        ) {
            (Ok(me), Ok(root)) => {
                if strictly_under(me, root) {
                    Ok(())
                } else {
                    Err(libc::ENOENT)
                }
            }
            (Err(libc::ENAMETOOLONG), _) | (_, Err(libc::ENAMETOOLONG)) => self.walk_up(fd),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
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

    /// Climbs from the directory `fd` with `..` until the root (Ok) or the top of the host's
    /// tree (ENOENT).
    fn walk_up(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        const DOTDOT: &CStr = c"..";
        let mut cur = fd.try_clone_to_owned().map_err(io_errno)?;
        let mut here = stat_id(cur.as_fd())?;
        for _ in 0..MAX_DEPTH {
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
                return Ok(());
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
        let d = scratch("moved");
        std::fs::create_dir_all(d.join("share/a/b")).unwrap();
        let root = root_at(&d.join("share"));
        let b = open_path(&d.join("share/a/b"));
        let (dev, ino) = stat_id(b.as_fd()).unwrap();
        assert_eq!(root.check_dir(b.as_fd(), dev, ino), Ok(()));
        std::fs::rename(d.join("share/a"), d.join("elsewhere")).unwrap();
        assert_eq!(root.check_dir(b.as_fd(), dev, ino), Err(libc::ENOENT));
        assert_eq!(root.walk_up(b.as_fd()), Err(libc::ENOENT));
        // Moved back, it is inside again; a renamed root is followed.
        std::fs::rename(d.join("elsewhere"), d.join("share/a")).unwrap();
        std::fs::rename(d.join("share"), d.join("share-renamed")).unwrap();
        assert_eq!(root.check_dir(b.as_fd(), dev, ino), Ok(()));
        assert_eq!(root.walk_up(b.as_fd()), Ok(()));
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
        assert_eq!(root.check_dir(cur.as_fd(), dev, ino), Ok(()));
        // Move the top of the chain out: the deep directory is outside now.
        p.push(&comp);
        std::fs::rename(&p, d.join("out")).unwrap();
        assert_eq!(root.check_dir(cur.as_fd(), dev, ino), Err(libc::ENOENT));
        let _ = std::process::Command::new("rm").arg("-rf").arg(&d).status();
    }
}
