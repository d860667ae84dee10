//! A file's change stamp, for keeping what was read from it while it stays unchanged: its
//! identity, ctime, mtime, size and link count. Any change to a file's contents, entries,
//! owner, mode or extended attributes updates its ctime, and nobody can set a ctime.
//!
//! Timestamp granularity: a change in the same clock tick as the last one can leave the ctime
//! as it was. So what is read is only kept for a file whose ctime is at least [`SETTLED_NS`]
//! old (the "racily clean" rule git uses for its index): any later change then sets a ctime
//! that differs from the kept one.

/// How long a file must have stayed unchanged before what is read from it is kept.
pub(super) const SETTLED_NS: i128 = 2_000_000_000;

/// The identity and change stamp of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
    size: i64,
    nlink: u64,
}

impl Stamp {
    pub(super) fn of(st: &libc::stat64) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            ctime: (st.st_ctime, st.st_ctime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            size: st.st_size,
            nlink: st.st_nlink,
        }
    }

    /// Whether the file has been unchanged for at least `settled_ns` (never for a ctime in the
    /// future).
    pub(super) fn settled(&self, settled_ns: i128) -> bool {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec to the pointer given.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut t) };
        let now = t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128;
        let ctime = self.ctime.0 as i128 * 1_000_000_000 + self.ctime.1 as i128;
        now - ctime >= settled_ns
    }
}
