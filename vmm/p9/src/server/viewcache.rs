//! The guest's view of files (mapped mode: the `user.bootbox.attr` extended attribute, or its
//! absence), kept between getattrs. Reading the attribute goes through the descriptor's
//! `/proc` magic link, a path walk that cost most of a getattr.
//!
//! A view is kept with the file's [`Stamp`] and used only while a fresh `fstat` shows the very
//! same stamp: setting or removing the attribute updates the ctime, whoever does it. Only
//! settled files are kept (see [`super::stamp`]), so a change in the same clock tick cannot
//! hide behind an equal ctime. A view read after the `fstat` it is kept under is safe too: a
//! change in between moved the ctime past that stamp, so the stamp is never seen again.
//! Memory is bounded per shard; a full shard lets its oldest view go for each new one (a tree
//! with more files than the cache holds keeps most of what it read, rather than dropping a
//! whole shard at once and starting over).

use super::stamp::Stamp;
use crate::ownership::GuestAttr;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

const SHARDS: usize = 16;
/// Views kept per shard (each about 80 bytes with its place in the eviction order).
const PER_SHARD: usize = 8192;

/// Views by (dev, ino), with the stamp each was read under, and the order the files were
/// first kept in (each kept file once).
#[derive(Default)]
struct Views {
    by_file: HashMap<(u64, u64), (Stamp, Option<GuestAttr>)>,
    order: VecDeque<(u64, u64)>,
}
type Shard = Mutex<Views>;

/// The views of one share, sharded by inode so concurrent getattrs rarely meet.
pub(super) struct ViewCache {
    shards: Box<[Shard]>,
    settled_ns: i128,
}

impl ViewCache {
    /// A cache keeping the views of files unchanged for `settled_ns`.
    pub(super) fn new(settled_ns: i128) -> ViewCache {
        ViewCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            settled_ns,
        }
    }

    fn shard(&self, s: &Stamp) -> std::sync::MutexGuard<'_, Views> {
        self.shards[(s.ino as usize ^ s.dev as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The view of the file whose fresh `fstat` is `st`: the kept one if its stamp still
    /// holds, otherwise `load()`, kept if the file has settled.
    pub(super) fn view(
        &self,
        st: &libc::stat64,
        load: impl FnOnce() -> Option<GuestAttr>,
    ) -> Option<GuestAttr> {
        let stamp = Stamp::of(st);
        let file = (stamp.dev, stamp.ino);
        if let Some((kept, view)) = self.shard(&stamp).by_file.get(&file) {
            if *kept == stamp {
                return *view;
            }
        }
        let view = load();
        if stamp.settled(self.settled_ns) {
            let mut s = self.shard(&stamp);
            if !s.by_file.contains_key(&file) {
                if s.by_file.len() >= PER_SHARD {
                    if let Some(oldest) = s.order.pop_front() {
                        s.by_file.remove(&oldest);
                    }
                }
                s.order.push_back(file);
            }
            s.by_file.insert(file, (stamp, view));
        }
        view
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::sys::fstat;
    use std::cell::Cell;

    fn view_of(
        cache: &ViewCache,
        f: &std::fs::File,
        v: Option<GuestAttr>,
    ) -> (Option<GuestAttr>, bool) {
        use std::os::fd::AsFd;
        let loaded = Cell::new(false);
        let got = cache.view(&fstat(f.as_fd()).unwrap(), || {
            loaded.set(true);
            v
        });
        (got, loaded.get())
    }

    #[test]
    fn a_full_shard_lets_its_oldest_view_go() {
        let p = std::env::temp_dir().join(format!("p9-viewcache-full-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        use std::os::fd::AsFd;
        let mut st = fstat(f.as_fd()).unwrap();
        let cache = ViewCache::new(0);
        // Files of one shard (inode numbers SHARDS apart), one more than it holds.
        let n = PER_SHARD + 1;
        for i in 0..n {
            st.st_ino = (i * SHARDS) as u64;
            cache.view(&st, || None);
        }
        let loads = |from: usize, to: usize| {
            (from..to)
                .filter(|&i| {
                    let mut s = st;
                    s.st_ino = (i * SHARDS) as u64;
                    let loaded = Cell::new(false);
                    cache.view(&s, || {
                        loaded.set(true);
                        None
                    });
                    loaded.get()
                })
                .count()
        };
        // All but the first are still kept: nothing is loaded again for them.
        assert_eq!(loads(1, n), 0);
        assert_eq!(loads(0, 1), 1);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_kept_view_is_used_until_the_file_changes() {
        let p = std::env::temp_dir().join(format!("p9-viewcache-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let a = GuestAttr {
            uid: 7,
            gid: 8,
            mode: libc::S_IFREG | 0o640,
            rdev: 0,
        };
        let cache = ViewCache::new(0);
        assert_eq!(view_of(&cache, &f, Some(a)), (Some(a), true));
        // Kept: not loaded again (the loader's answer is ignored).
        assert_eq!(view_of(&cache, &f, None), (Some(a), false));
        // Any change to the inode (here its mode) moves the ctime: loaded again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(view_of(&cache, &f, None), (None, true));
        // A file changed a moment ago is not kept at all.
        let strict = ViewCache::new(super::super::stamp::SETTLED_NS);
        assert_eq!(view_of(&strict, &f, Some(a)), (Some(a), true));
        assert_eq!(view_of(&strict, &f, None), (None, true));
        let _ = std::fs::remove_file(&p);
    }
}
