//! Session operations: Tversion (negotiates msize, resets the fid space), Tattach (a fid for
//! the share root), Twalk (name by name, confined to the share) and Tclunk.

use super::config::MIN_MSIZE;
use super::session::{send, Server};
use super::sys::{dup, fstat, fstatat, kind_of, openat, Errno, Kind, Name};
use crate::reply::ReplyBuf;
use crate::wire::{self, Qid, Rmessage};
use std::borrow::Cow;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Server {
    pub(super) fn version<'m>(&self, msize: u32, version: &[u8]) -> Result<Rmessage<'m>, Errno> {
        // Never answer more than the client offered; below 4 KiB nothing useful fits.
        // A refused Tversion leaves the session as it was.
        if msize < MIN_MSIZE {
            return Err(libc::EINVAL);
        }
        self.fids.clear();
        let m = msize.min(self.share.config.msize.max(MIN_MSIZE));
        self.msize.store(m, Ordering::Relaxed);
        let v: &'static [u8] = if version == b"9P2000.L" {
            b"9P2000.L"
        } else {
            b"unknown"
        };
        Ok(Rmessage::Version {
            msize: m,
            version: Cow::Borrowed(v),
        })
    }

    pub(super) fn attach<'m>(&self, fid: u32, n_uname: u32) -> Result<Rmessage<'m>, Errno> {
        let slot = self.fid_slot(false)?;
        let fd = dup(self.share.root.fd.as_fd())?;
        let st = fstat(fd.as_fd())?;
        // n_uname ~0 means "no user given": treat it as root, as the Linux client does.
        let uid = if n_uname == u32::MAX { 0 } else { n_uname };
        let f = Server::new_fid(slot, Arc::new(fd), &st, None, uid, 0);
        self.fids.insert_new(fid, Arc::new(f))?;
        Ok(Rmessage::Attach {
            qid: self.share.qid(&st),
        })
    }

    pub(super) fn clunk<'m>(&self, fid: u32) -> Result<Rmessage<'m>, Errno> {
        self.fids.remove(fid).ok_or(libc::EBADF)?;
        Ok(Rmessage::Clunk)
    }

    pub(super) fn walk(
        &self,
        tag: u16,
        fid: u32,
        newfid: u32,
        names: &[&[u8]],
        reply: &mut dyn ReplyBuf,
    ) -> Result<usize, Errno> {
        let share = &*self.share;
        let root = &share.root;
        let f = self.fids.get(fid)?;
        if newfid != fid && self.fids.get(newfid).is_ok() {
            return Err(libc::EBADF);
        }
        if names.is_empty() && newfid == fid {
            // Walking a fid onto itself with no names changes nothing.
            let none = Rmessage::Walk {
                qids: Cow::Borrowed(&[]),
            };
            return send(reply, tag, &none);
        }
        // Take the new fid's slot first: a walk refused at the cap opens nothing.
        let slot = self.fid_slot(newfid == fid)?;
        if !names.is_empty() && f.kind == Kind::Dir {
            // Names are looked up in this directory: it must still be in the share.
            self.check_dir(&f)?;
        }
        let mut qids = [Qid::default(); wire::MAX_WALK_NAMES];
        // The current position: its descriptor and identity, and the directory it was found in
        // with its name there (None after `.`/`..`, whose entry name is not known).
        let mut cur: Arc<OwnedFd> = f.fd.clone();
        let mut cur_st: Option<libc::stat64> = None;
        let mut entry: Option<(Arc<OwnedFd>, &[u8])> = None;
        // How far below the root the current position is (a hint for the checks).
        let mut depth = f.depth.load(Ordering::Relaxed);
        let mut walked = 0;
        for (i, raw) in names.iter().enumerate() {
            let (dev, ino) = match &cur_st {
                Some(st) => (st.st_dev, st.st_ino),
                None => (f.dev, f.ino),
            };
            let step = (|| {
                let name = Name::new(raw, true)?;
                let (fd, st, depth) =
                    if name.bytes() == b"." || (name.bytes() == b".." && root.is(dev, ino)) {
                        let fd = dup(cur.as_fd())?;
                        let st = fstat(fd.as_fd())?;
                        let depth = if root.is(dev, ino) { 0 } else { depth };
                        (Arc::new(fd), st, depth)
                    } else if name.bytes() == b".." {
                        let fd = openat(cur.as_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                        let st = fstat(fd.as_fd())?;
                        // Never stand outside the share, not even for the next step.
                        let up = depth.saturating_sub(1);
                        let depth = root.check_dir_near(fd.as_fd(), st.st_dev, st.st_ino, up)?;
                        (Arc::new(fd), st, depth)
                    } else {
                        let (fd, st) = self.step_into(&cur, (dev, ino), &name)?;
                        (fd, st, depth.saturating_add(1))
                    };
                Ok::<_, Errno>((fd, st, depth))
            })();
            match step {
                Ok((fd, st, d)) => {
                    depth = d;
                    qids[i] = share.qid(&st);
                    let dots = *raw == b"." || *raw == b"..";
                    entry = (!dots).then(|| (cur.clone(), *raw));
                    cur = fd;
                    cur_st = Some(st);
                    walked += 1;
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        let entry = match entry {
            Some((dir, name)) => Some((dir, Box::<[u8]>::from(name))),
            // No name walked: the fid keeps the entry it had.
            None if walked == 0 => f.entry.clone(),
            None => None,
        };
        if walked == names.len() {
            let st = match cur_st {
                Some(st) => st,
                None => fstat(cur.as_fd())?,
            };
            // A clone shares the original's O_PATH descriptor: it has no state of its own.
            let nf = Arc::new(Server::new_fid(slot, cur, &st, entry, f.uid, depth));
            if newfid == fid {
                self.fids.replace(fid, nf);
            } else {
                self.fids.insert_new(newfid, nf)?;
            }
        }
        let qids = Cow::Borrowed(&qids[..walked]);
        send(reply, tag, &Rmessage::Walk { qids })
    }

    /// One walk step to `name` (not `.` or `..`) in the directory `cur`, whose identity is
    /// `parent`: a kept descriptor of that directory entry if a fresh `fstatat` shows it still
    /// names the same directory (see [`super::dirfds`]), otherwise a fresh `openat`. Symlinks
    /// are never followed.
    fn step_into(
        &self,
        cur: &Arc<OwnedFd>,
        parent: (u64, u64),
        name: &Name,
    ) -> Result<(Arc<OwnedFd>, libc::stat64), Errno> {
        let dirfds = &self.share.dirfds;
        if let Some((fd, dev, ino)) = dirfds.get(parent, name.bytes()) {
            let st = fstatat(cur.as_fd(), name)?;
            if (st.st_dev, st.st_ino) == (dev, ino) && kind_of(st.st_mode) == Kind::Dir {
                return Ok((fd, st));
            }
        }
        let fd = openat(cur.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = fstat(fd.as_fd())?;
        let fd = Arc::new(fd);
        if kind_of(st.st_mode) == Kind::Dir {
            dirfds.put(parent, name.bytes(), fd.clone(), &st);
        }
        Ok((fd, st))
    }
}
