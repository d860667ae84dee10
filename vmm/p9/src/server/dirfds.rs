//! Directory descriptors kept between walks, so the directories a walk passes through (the
//! `d` of `d/f`) cost one `fstatat` instead of an `openat`, an `fstat` and, when the fid goes,
//! a `close`.
//!
//! Validity: an entry is the `O_PATH` descriptor of the directory found under `name` in the
//! directory `(dev, ino)`, and is used only when a fresh `fstatat(parent, name)` (without
//! following symlinks) shows a directory with the very inode the kept descriptor holds. The
//! walk then stands exactly where `openat(parent, name)` would have put it at that moment:
//! the same inode, reached through the same checked parent. A kept descriptor holds its inode,
//! so the inode number cannot be reused by another directory while it is kept. Nothing here
//! decides confinement: the walk's own checks (the starting directory is in the share, `..` is
//! clamped) apply to a kept descriptor as to a fresh one.
//!
//! Memory and descriptors are bounded: at most [`MAX_KEPT`] descriptors, and no more than a
//! sixteenth of the share's fid cap (whose descriptors are already held within half the
//! process's limit), spread over shards; a full shard lets one entry go for each new one (a
//! tree with more directories than that keeps most of what it kept, rather than closing a
//! whole shard's descriptors at once under its lock and starting over).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;
/// Most directory descriptors kept per share.
pub(super) const MAX_KEPT: usize = 1024;

/// (parent dev, parent ino, hash of the name) -> (name, descriptor, dev, ino).
type Map = HashMap<(u64, u64, u64), (Box<[u8]>, Arc<OwnedFd>, u64, u64)>;

/// The kept directory descriptors of one share.
pub(super) struct DirFds {
    shards: Box<[Mutex<Map>]>,
    per_shard: usize,
}

/// FNV-1a of a name.
fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl DirFds {
    /// Keeps at most [`MAX_KEPT`] descriptors and at most `max_fids / 16`.
    pub(super) fn new(max_fids: usize) -> DirFds {
        let total = (max_fids / 16).min(MAX_KEPT);
        DirFds {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: total / SHARDS,
        }
    }

    fn shard(&self, key: &(u64, u64, u64)) -> std::sync::MutexGuard<'_, Map> {
        let i = (key.1 ^ key.2) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kept descriptor of the directory `name` in `parent` and its identity, if any. The
    /// caller must check it against a fresh `fstatat(parent, name)` before standing on it.
    pub(super) fn get(&self, parent: (u64, u64), name: &[u8]) -> Option<(Arc<OwnedFd>, u64, u64)> {
        let key = (parent.0, parent.1, name_hash(name));
        match self.shard(&key).get(&key) {
            Some((n, fd, dev, ino)) if **n == *name => Some((fd.clone(), *dev, *ino)),
            _ => None,
        }
    }

    /// Keeps `fd`, the directory `st` describes, as `name` in `parent`.
    pub(super) fn put(&self, parent: (u64, u64), name: &[u8], fd: Arc<OwnedFd>, st: &libc::stat64) {
        if self.per_shard == 0 {
            return;
        }
        let key = (parent.0, parent.1, name_hash(name));
        let mut s = self.shard(&key);
        let evicted = match s.keys().next() {
            Some(&other) if s.len() >= self.per_shard && !s.contains_key(&key) => s.remove(&other),
            _ => None,
        };
        let replaced = s.insert(key, (Box::from(name), fd, st.st_dev, st.st_ino));
        drop(s);
        // Descriptors are closed (when no fid holds them) outside the lock.
        drop((evicted, replaced));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::sys::fstat;
    use std::os::fd::AsFd;

    #[test]
    fn a_full_shard_lets_one_entry_go_per_new_one() {
        let dir: OwnedFd = std::fs::File::open(std::env::temp_dir()).unwrap().into();
        let st = fstat(dir.as_fd()).unwrap();
        let fd = Arc::new(dir);
        // 256 kept in all, 16 per shard.
        let kept = DirFds::new(256 * 16);
        assert_eq!(kept.per_shard, 16);
        for i in 0..1000u64 {
            let name = format!("d{i}");
            kept.put((1, i), name.as_bytes(), fd.clone(), &st);
            // What was just kept is there, and the bound holds.
            assert!(kept.get((1, i), name.as_bytes()).is_some());
            assert!(kept.len() <= 256);
        }
        // Full shards stay full rather than starting over.
        assert!(kept.len() > 256 - SHARDS, "{} kept", kept.len());
        // Putting the same entry again replaces it without evicting another.
        let before = kept.len();
        kept.put((1, 999), b"d999", fd.clone(), &st);
        assert_eq!(kept.len(), before);
        assert_eq!(Arc::strong_count(&fd), before + 1);
    }
}
