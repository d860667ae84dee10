//! Ownership on writable shares: the guest's view and the host's, kept apart.
//!
//! In the default, *mapped* mode, a guest's chown, its set-id bits and its device nodes and
//! FIFOs never reach the host as such. Every file the guest creates belongs to the user running
//! the server, with no set-id bits, and device nodes, FIFOs and sockets are stored as empty
//! regular files. What the guest set (owner, group, full mode, device number) is kept in the
//! `user.bootbox.attr` extended attribute of the file and reported back by getattr, so inside
//! the guest the share behaves like a local filesystem. Files the guest never touched carry no
//! attribute and report the host's own values. A file whose guest view equals what the host
//! reports anyway gets no attribute either, so the common case costs nothing.
//!
//! On a host filesystem without user extended attributes the guest sees the host's values:
//! a chown to anything else answers EPERM, set-id bits are dropped, and device nodes are
//! refused.
//!
//! *Passthrough* mode (an explicit choice, for a root user who wants real ownership) applies
//! chown to the host file; set-id bits and device nodes are refused there as well.

use std::os::fd::RawFd;

type Errno = i32;

/// How a writable share treats ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ownership {
    /// The guest's owner, mode and device numbers live in an extended attribute (default).
    #[default]
    Mapped,
    /// chown reaches the host file (for root users who ask for it).
    Passthrough,
}

/// The attribute holding the guest's view.
const XATTR: &[u8] = b"user.bootbox.attr\0";
const VERSION: u8 = 1;
const ENCODED_LEN: usize = 1 + 4 + 4 + 4 + 8;

/// What the guest set: owner, group, full mode (type and permission bits) and device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GuestAttr {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u64,
}

impl GuestAttr {
    /// The guest's view of a host file that has no attribute: the host's own values.
    pub(crate) fn of_host(st: &libc::stat64) -> GuestAttr {
        GuestAttr {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode,
            rdev: st.st_rdev,
        }
    }

    fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut b = [0u8; ENCODED_LEN];
        b[0] = VERSION;
        b[1..5].copy_from_slice(&self.uid.to_le_bytes());
        b[5..9].copy_from_slice(&self.gid.to_le_bytes());
        b[9..13].copy_from_slice(&self.mode.to_le_bytes());
        b[13..21].copy_from_slice(&self.rdev.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<GuestAttr> {
        if b.len() != ENCODED_LEN || b[0] != VERSION {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut rdev = [0u8; 8];
        rdev.copy_from_slice(&b[13..21]);
        Some(GuestAttr {
            uid: u32_at(1),
            gid: u32_at(5),
            mode: u32_at(9),
            rdev: u64::from_le_bytes(rdev),
        })
    }

    /// What getattr reports for a host file `st` carrying this attribute: the guest's owner,
    /// group, permission bits and device number; the guest's file type where the host file is
    /// the regular-file stand-in for a device node, FIFO or socket.
    pub(crate) fn apply(&self, st: &libc::stat64) -> (u32, u32, u32, u64) {
        let host_type = st.st_mode & libc::S_IFMT;
        let guest_type = self.mode & libc::S_IFMT;
        let ty = if host_type == libc::S_IFREG && is_special(guest_type) {
            guest_type
        } else {
            host_type
        };
        let rdev = if is_special(ty) {
            self.rdev
        } else {
            st.st_rdev
        };
        (self.uid, self.gid, ty | (self.mode & 0o7777), rdev)
    }
}

/// Device nodes, FIFOs and sockets: stored as regular files in mapped mode.
pub(crate) fn is_special(file_type: u32) -> bool {
    matches!(
        file_type,
        libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK
    )
}

/// `/proc/self/fd/N` as a NUL-terminated path: extended attributes cannot be read through an
/// `O_PATH` descriptor, but can through its magic link, which names the very inode.
fn magic_path(fd: RawFd) -> [u8; 32] {
    let mut p = [0u8; 32];
    let prefix = b"/proc/self/fd/";
    p[..prefix.len()].copy_from_slice(prefix);
    let digits = fd.to_string();
    p[prefix.len()..prefix.len() + digits.len()].copy_from_slice(digits.as_bytes());
    p
}

/// The guest's view stored on the regular file or directory `fd`, if any.
pub(crate) fn load(fd: RawFd) -> Option<GuestAttr> {
    let path = magic_path(fd);
    let mut buf = [0u8; 64];
    // SAFETY: both names are NUL-terminated and `buf` is writable for its length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr().cast(),
            XATTR.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    GuestAttr::decode(&buf[..n as usize])
}

/// Stores the guest's view on the regular file or directory `fd`.
pub(crate) fn store(fd: RawFd, attr: &GuestAttr) -> Result<(), Errno> {
    let path = magic_path(fd);
    let value = attr.encode();
    // SAFETY: both names are NUL-terminated and `value` is readable for its length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr().cast(),
            XATTR.as_ptr().cast(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

/// Records `want` as the guest's view of `fd` (host values `st`): stored when it differs from
/// what the host reports anyway, or when an earlier view is stored and must be replaced.
pub(crate) fn record(fd: RawFd, st: &libc::stat64, want: &GuestAttr) -> Result<(), Errno> {
    let host = GuestAttr::of_host(st);
    let same_as_host = want.uid == host.uid
        && want.gid == host.gid
        && want.mode == host.mode
        && (!is_special(want.mode & libc::S_IFMT) || want.rdev == host.rdev);
    if same_as_host && load(fd).is_none() {
        return Ok(());
    }
    store(fd, want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_rejects_other_versions() {
        let a = GuestAttr {
            uid: 1000,
            gid: 100,
            mode: libc::S_IFCHR | 0o4755,
            rdev: 0x0501,
        };
        assert_eq!(GuestAttr::decode(&a.encode()), Some(a));
        let mut b = a.encode();
        b[0] = 2;
        assert_eq!(GuestAttr::decode(&b), None);
        assert_eq!(GuestAttr::decode(&b[..10]), None);
    }

    #[test]
    fn a_stand_in_file_reports_the_guest_type() {
        // SAFETY: stat64 is plain data; zeroed is a valid value.
        let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o600;
        let a = GuestAttr {
            uid: 5,
            gid: 6,
            mode: libc::S_IFCHR | 0o620,
            rdev: 0x0401,
        };
        assert_eq!(a.apply(&st), (5, 6, libc::S_IFCHR | 0o620, 0x0401));
        // On a directory the host's type wins; the guest's permission bits are reported.
        st.st_mode = libc::S_IFDIR | 0o755;
        let d = GuestAttr {
            mode: libc::S_IFDIR | 0o1777,
            ..a
        };
        assert_eq!(d.apply(&st).2, libc::S_IFDIR | 0o1777);
    }
}
