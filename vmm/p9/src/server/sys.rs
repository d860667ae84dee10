//! The server's thin layer over the system calls it makes: errno results with EINTR retried
//! ([`cvt`]), validated single-component names on the stack ([`Name`]), stat/open helpers on
//! borrowed descriptors, file kinds, and the undo of a half-made create.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub(super) type Errno = i32;

pub(super) fn errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Retries a libc call on EINTR; maps -1 to the errno.
pub(super) fn cvt<T: Copy + PartialOrd + Default>(mut f: impl FnMut() -> T) -> Result<T, Errno> {
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
pub(super) struct Name {
    buf: [u8; 256],
}

impl Name {
    /// Accepts a single component: non-empty, no `/`, no NUL, not `.`/`..` (unless `dots`), at
    /// most 255 bytes.
    pub(super) fn new(name: &[u8], dots: bool) -> Result<Name, Errno> {
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
    pub(super) fn from_fd(fd: RawFd) -> Name {
        let mut buf = [0u8; 256];
        let s = fd.to_string();
        buf[..s.len()].copy_from_slice(s.as_bytes());
        Name { buf }
    }
    pub(super) fn ptr(&self) -> *const libc::c_char {
        self.buf.as_ptr().cast()
    }
    pub(super) fn bytes(&self) -> &[u8] {
        let n = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.buf.len());
        &self.buf[..n]
    }
}

pub(super) const EMPTY: &CStr = c"";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    File,
    Symlink,
    /// Device nodes, FIFOs, sockets: never opened.
    Special,
}

pub(super) fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFREG => Kind::File,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Special,
    }
}

pub(super) fn fstat(fd: BorrowedFd<'_>) -> Result<libc::stat64, Errno> {
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

pub(super) fn fstat_raw(fd: RawFd) -> Result<libc::stat64, Errno> {
    // SAFETY: the caller passes a descriptor it holds open for the duration of the call.
    fstat(unsafe { BorrowedFd::borrow_raw(fd) })
}

pub(super) fn fstatat(dir: BorrowedFd<'_>, name: &Name) -> Result<libc::stat64, Errno> {
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

pub(super) fn openat(
    dir: BorrowedFd<'_>,
    name: &Name,
    flags: i32,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    // SAFETY: `dir` is open and `name` is NUL-terminated; the result is checked.
    let fd = cvt(|| unsafe {
        libc::openat(dir.as_raw_fd(), name.ptr(), flags | libc::O_CLOEXEC, mode)
    })?;
    // SAFETY: openat returned a new descriptor we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    fd.try_clone_to_owned()
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}
/// `open(2)` with `O_CLOEXEC` added, as an owned descriptor.
pub(super) fn open_cloexec(path: &CStr, flags: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: `path` is a valid C string; the result is checked before use.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor we exclusively own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
/// The mode a guest-created file gets on the host: never set-user-ID or set-group-ID, so no
/// guest can leave a set-id trap on the host for the next user or tool that runs it.
pub(super) fn host_mode(mode: u32) -> u32 {
    mode & 0o1777
}

/// Removes what a create just made, when a later step of the same request failed: a refused
/// request leaves the host tree as it was.
pub(super) fn undo_create(dir: BorrowedFd<'_>, name: &Name, is_dir: bool) {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `dir` is open and the name NUL-terminated.
    unsafe { libc::unlinkat(dir.as_raw_fd(), name.ptr(), flags) };
}

pub(super) fn of_writable(fd: &OwnedFd) -> bool {
    // SAFETY: F_GETFL on an open fd has no memory effects.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_ACCMODE != libc::O_RDONLY
}
