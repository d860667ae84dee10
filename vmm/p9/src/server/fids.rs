//! One session's fids: the [`Fid`] record (an `O_PATH` descriptor, its identity and the entry
//! it was found under, plus the file opened through it), the sharded [`FidTable`] they live in,
//! and the per-session caps on fids and open files ([`Limits`], counted by [`Count`] guards).

use super::sys::{Errno, Kind};
use crate::wire;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const SHARDS: usize = 64;
/// One session's live fids and open files, counted against its own caps so that one session
/// cannot lock the others out.
#[derive(Default)]
pub(super) struct Limits {
    pub(super) fids: AtomicUsize,
    pub(super) open_files: AtomicUsize,
}

/// Counts a resource for as long as the guard lives.
pub(super) struct Count {
    limits: Arc<Limits>,
    which: fn(&Limits) -> &AtomicUsize,
}

impl Count {
    pub(super) fn take(
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

pub(super) struct OpenFile {
    pub(super) fd: OwnedFd,
    /// Serialises lseek+getdents on directories.
    pub(super) dir_lock: Mutex<()>,
    pub(super) _count: Count,
}

impl OpenFile {
    /// The file opened through a fid, holding one of the session's open-file counts.
    pub(super) fn new(fd: OwnedFd, count: Count) -> OpenFile {
        OpenFile {
            fd,
            dir_lock: Mutex::new(()),
            _count: count,
        }
    }
}

pub(super) struct Fid {
    /// O_PATH descriptor of the file this fid names.
    pub(super) fd: Arc<OwnedFd>,
    pub(super) kind: Kind,
    pub(super) dev: u64,
    pub(super) ino: u64,
    /// The directory this fid was walked or created in and its name there, when known: how
    /// Tremove and Trename find the entry without rebuilding a path (checked against `dev`/`ino`
    /// before use, since either may have been renamed since).
    pub(super) entry: Option<(Arc<OwnedFd>, Box<[u8]>)>,
    /// How many levels below the share root this was when last seen: a hint for the
    /// confinement check (see [`crate::confine`]), never trusted on its own.
    pub(super) depth: AtomicU32,
    /// The guest user this fid was attached as (owner of what is created through it).
    pub(super) uid: u32,
    pub(super) open: OnceLock<OpenFile>,
    pub(super) _count: Count,
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
pub(super) struct FidTable {
    shards: Box<[Shard]>,
}

impl FidTable {
    pub(super) fn new() -> Self {
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
    pub(super) fn get(&self, fid: u32) -> Result<Arc<Fid>, Errno> {
        self.shard(fid).get(&fid).cloned().ok_or(libc::EBADF)
    }
    pub(super) fn insert_new(&self, fid: u32, f: Arc<Fid>) -> Result<(), Errno> {
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
    pub(super) fn replace(&self, fid: u32, f: Arc<Fid>) -> Option<Arc<Fid>> {
        self.shard(fid).insert(fid, f)
    }
    pub(super) fn remove(&self, fid: u32) -> Option<Arc<Fid>> {
        self.shard(fid).remove(&fid)
    }
    pub(super) fn clear(&self) {
        for s in self.shards.iter() {
            // Drop the fids outside the lock.
            let old = std::mem::take(&mut *s.lock().unwrap_or_else(|e| e.into_inner()));
            drop(old);
        }
    }
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}
