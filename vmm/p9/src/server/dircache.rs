//! Directory listings kept between Treaddirs, so listing an unchanged directory again costs one
//! `fstat` instead of a fresh `getdents64` pass (on ext4 every pass from a new open rebuilds the
//! directory's hash tree: most of a readdir's time).
//!
//! Validity: a listing is kept with the directory's [`Stamp`] and served only while a fresh
//! `fstat` of the directory shows the very same stamp. Any change to the directory's entries
//! (create, unlink, rename in or out, mkdir, rmdir) updates its ctime. A listing is only kept
//! for a directory that had settled when the pass started (see [`super::stamp`]); the stamp is
//! read again after the pass, and a directory that changed meanwhile is not kept either.
//!
//! Listings are raw `getdents64` records, so their cookies are the file system's own and a
//! client can go on from any of them through the real directory if its listing is dropped.
//! Memory is bounded: listings larger than [`MAX_LISTING`] are not kept, and the oldest go
//! first beyond [`BUDGET`] bytes per share.

use super::stamp::Stamp;
use super::sys::{cvt, fstat, Errno};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

/// Largest listing kept (raw getdents64 bytes; about 32 bytes per entry).
pub(super) const MAX_LISTING: usize = 4 << 20;
/// Bytes of listings kept per share.
pub(super) const BUDGET: usize = 32 << 20;

/// One `getdents64` record.
pub(super) struct Record<'a> {
    pub(super) ino: u64,
    /// The cookie of the next record.
    pub(super) off: u64,
    pub(super) dtype: u8,
    pub(super) name: &'a [u8],
}

/// Calls `f` on each whole record in `buf` (as filled by `getdents64`) until it returns false;
/// returns whether every record was taken. A malformed record ends the walk.
pub(super) fn records(buf: &[u8], mut f: impl FnMut(&Record<'_>) -> bool) -> bool {
    let mut p = 0;
    while p + 19 <= buf.len() {
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        let reclen = u16::from_ne_bytes([buf[p + 16], buf[p + 17]]) as usize;
        if reclen < 19 || p + reclen > buf.len() {
            return false;
        }
        let raw = &buf[p + 19..p + reclen];
        let rec = Record {
            ino: u64_at(p),
            off: u64_at(p + 8),
            dtype: buf[p + 18],
            name: &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())],
        };
        if !f(&rec) {
            return false;
        }
        p += reclen;
    }
    true
}

/// A whole directory's records, valid while the directory shows `stamp`; or, for a directory
/// too large to keep, only the note that it is (so it is not read twice per listing).
pub(super) struct Listing {
    stamp: Stamp,
    raw: Box<[u8]>,
    whole: bool,
}

impl Listing {
    /// Calls `f` on the records after the cookie `offset` (0: from the start) until it returns
    /// false. None if no record carries that cookie or the directory was too large to keep
    /// (the caller reads the directory instead).
    pub(super) fn after(&self, offset: u64, mut f: impl FnMut(&Record<'_>) -> bool) -> Option<()> {
        if !self.whole {
            return None;
        }
        let mut started = offset == 0;
        records(&self.raw, |r| {
            if started {
                return f(r);
            }
            started = r.off == offset;
            true
        });
        started.then_some(())
    }
}

#[derive(Default)]
struct Kept {
    map: HashMap<(u64, u64), Arc<Listing>>,
    /// Insertion order, oldest first (may name listings already replaced or dropped).
    order: VecDeque<(u64, u64)>,
    bytes: usize,
}

/// The listings of one share.
pub(super) struct DirCache {
    kept: Mutex<Kept>,
    settled_ns: i128,
    budget: usize,
    max_listing: usize,
}

/// Directories remembered at once (listings and too-large notes); beyond it all are dropped.
const MAX_KEPT: usize = 1 << 16;

impl DirCache {
    /// A cache keeping listings of at most `max_listing` bytes of directories unchanged for
    /// `settled_ns`, up to `budget` bytes in all.
    pub(super) fn new(settled_ns: i128, budget: usize, max_listing: usize) -> DirCache {
        DirCache {
            kept: Mutex::new(Kept::default()),
            settled_ns,
            budget,
            max_listing: max_listing.min(budget),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kept listing of the directory whose fresh `fstat` is `st`, if it is still valid.
    pub(super) fn get(&self, st: &libc::stat64) -> Option<Arc<Listing>> {
        let stamp = Stamp::of(st);
        let l = self.lock().map.get(&(stamp.dev, stamp.ino)).cloned()?;
        (l.stamp == stamp).then_some(l)
    }

    /// Reads the whole open directory `dir` (whose `fstat` before the pass is `st`) and keeps
    /// its listing if the directory had settled and did not change during the pass. Moves the
    /// directory's offset. None when nothing was kept; a listing that is not [`Listing::whole`]
    /// when the directory is too large to keep (noted, so that it is read once per listing).
    pub(super) fn fill(
        &self,
        dir: BorrowedFd<'_>,
        st: &libc::stat64,
    ) -> Result<Option<Arc<Listing>>, Errno> {
        let stamp = Stamp::of(st);
        if !stamp.settled(self.settled_ns) {
            return Ok(None);
        }
        let fd = dir.as_raw_fd();
        // SAFETY: the fd is an open directory; rewinding it touches no memory.
        cvt(|| unsafe { libc::lseek64(fd, 0, libc::SEEK_SET) })?;
        let mut raw = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        let mut whole = true;
        loop {
            // SAFETY: `chunk` is writable for its length; the fd is an open directory.
            let n = cvt(|| unsafe {
                libc::syscall(libc::SYS_getdents64, fd, chunk.as_mut_ptr(), chunk.len())
            })? as usize;
            if n == 0 {
                break;
            }
            if raw.len() + n > self.max_listing {
                whole = false;
                raw = Vec::new();
                break;
            }
            raw.extend_from_slice(&chunk[..n.min(chunk.len())]);
        }
        if Stamp::of(&fstat(dir)?) != stamp {
            return Ok(None);
        }
        let l = Arc::new(Listing {
            stamp,
            raw: raw.into_boxed_slice(),
            whole,
        });
        let key = (stamp.dev, stamp.ino);
        let mut k = self.lock();
        if k.map.len() >= MAX_KEPT {
            *k = Kept::default();
        }
        if let Some(old) = k.map.insert(key, l.clone()) {
            k.bytes -= old.raw.len();
        }
        k.bytes += l.raw.len();
        k.order.push_back(key);
        while k.bytes > self.budget {
            let Some(oldest) = k.order.pop_front() else {
                break;
            };
            if let Some(gone) = k.map.remove(&oldest) {
                k.bytes -= gone.raw.len();
            }
        }
        Ok(Some(l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::os::fd::AsFd;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("p9-dircache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The names of a listing from `offset`; panics on a name listed twice.
    fn names(l: &Listing, offset: u64) -> Option<BTreeSet<Vec<u8>>> {
        let mut out = BTreeSet::new();
        l.after(offset, |r| {
            assert!(out.insert(r.name.to_vec()), "{:?} listed twice", r.name);
            true
        })?;
        Some(out)
    }

    fn host_names(d: &std::path::Path) -> BTreeSet<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let mut s: BTreeSet<Vec<u8>> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        s.insert(b".".to_vec());
        s.insert(b"..".to_vec());
        s
    }

    #[test]
    fn a_kept_listing_matches_the_directory_and_dies_with_any_change() {
        let d = scratch("change");
        for i in 0..50 {
            std::fs::write(d.join(format!("f{i}")), b"").unwrap();
        }
        // Settled at once: this test checks the stamp, not the settling rule.
        let cache = DirCache::new(0, BUDGET, MAX_LISTING);
        let dir = std::fs::File::open(&d).unwrap();
        let st = fstat(dir.as_fd()).unwrap();
        let l = cache.fill(dir.as_fd(), &st).unwrap().expect("kept");
        assert_eq!(names(&l, 0).unwrap(), host_names(&d));
        assert!(cache.get(&fstat(dir.as_fd()).unwrap()).is_some());
        // Each kind of change to the entries invalidates it.
        let changes: [&dyn Fn(); 3] = [
            &|| std::fs::write(d.join("new"), b"").unwrap(),
            &|| std::fs::rename(d.join("new"), d.join("renamed")).unwrap(),
            &|| std::fs::remove_file(d.join("renamed")).unwrap(),
        ];
        for change in changes {
            let st = fstat(dir.as_fd()).unwrap();
            assert!(cache.fill(dir.as_fd(), &st).unwrap().is_some());
            // A coarse clock tick later, so the test does not lean on fine-grained ctimes.
            std::thread::sleep(std::time::Duration::from_millis(20));
            change();
            assert!(
                cache.get(&fstat(dir.as_fd()).unwrap()).is_none(),
                "a changed directory must not be served from its old listing"
            );
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn cookies_resume_and_unknown_cookies_are_refused() {
        let d = scratch("cookies");
        for i in 0..20 {
            std::fs::write(d.join(format!("f{i}")), b"").unwrap();
        }
        let cache = DirCache::new(0, BUDGET, MAX_LISTING);
        let dir = std::fs::File::open(&d).unwrap();
        let l = cache
            .fill(dir.as_fd(), &fstat(dir.as_fd()).unwrap())
            .unwrap()
            .unwrap();
        // Resuming after each record's cookie yields exactly the records that follow it.
        let mut all = Vec::new();
        l.after(0, |r| {
            all.push((r.off, r.name.to_vec()));
            true
        });
        assert_eq!(all.len(), 22);
        for (i, (off, _)) in all.iter().enumerate() {
            let mut rest = Vec::new();
            l.after(*off, |r| {
                rest.push(r.name.to_vec());
                true
            })
            .unwrap();
            let want: Vec<_> = all[i + 1..].iter().map(|(_, n)| n.clone()).collect();
            assert_eq!(rest, want);
        }
        assert!(l.after(0x1234_5678_9abc, |_| true).is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_recently_changed_directory_is_not_kept() {
        let d = scratch("recent");
        std::fs::write(d.join("a"), b"").unwrap();
        let cache = DirCache::new(super::super::stamp::SETTLED_NS, BUDGET, MAX_LISTING);
        let dir = std::fs::File::open(&d).unwrap();
        let st = fstat(dir.as_fd()).unwrap();
        assert!(cache.fill(dir.as_fd(), &st).unwrap().is_none());
        assert!(cache.get(&st).is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_too_large_is_noted_and_not_served() {
        let d = scratch("large");
        for j in 0..100 {
            std::fs::write(d.join(format!("file-{j}")), b"").unwrap();
        }
        let cache = DirCache::new(0, BUDGET, 1000);
        let dir = std::fs::File::open(&d).unwrap();
        let st = fstat(dir.as_fd()).unwrap();
        let l = cache.fill(dir.as_fd(), &st).unwrap().expect("noted");
        assert!(!l.whole);
        assert!(
            l.after(0, |_| true).is_none(),
            "a partial listing is never served"
        );
        let again = cache
            .get(&fstat(dir.as_fd()).unwrap())
            .expect("the note is kept");
        assert!(again.after(0, |_| true).is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_budget_drops_the_oldest_listings() {
        let d = scratch("budget");
        let mut dirs = Vec::new();
        for i in 0..3 {
            let p = d.join(format!("d{i}"));
            std::fs::create_dir(&p).unwrap();
            for j in 0..40 {
                std::fs::write(p.join(format!("file-with-a-longer-name-{j}")), b"").unwrap();
            }
            dirs.push(std::fs::File::open(&p).unwrap());
        }
        // 40 entries of about 48 bytes: room for two listings, not three.
        let cache = DirCache::new(0, 5000, 5000);
        for dir in &dirs {
            let st = fstat(dir.as_fd()).unwrap();
            assert!(cache.fill(dir.as_fd(), &st).unwrap().is_some());
        }
        let kept: Vec<bool> = dirs
            .iter()
            .map(|dir| cache.get(&fstat(dir.as_fd()).unwrap()).is_some())
            .collect();
        assert_eq!(kept, [false, true, true]);
        assert!(cache.lock().bytes <= 5000);
        let _ = std::fs::remove_dir_all(&d);
    }
}
