//! Attribute operations: Tgetattr and Tsetattr (with the guest's own view of owners and modes
//! in mapped mode), Tstatfs, Treadlink, the extended-attribute requests (not exported) and the
//! lock requests (granted: the guest's kernel arbitrates its own processes).

use super::fids::Fid;
use super::session::Server;
use super::sys::{cvt, fstat, of_writable, openat, Errno, Kind, Name, EMPTY};
use crate::ownership::{self, GuestAttr};
use crate::wire::{self, Attr, Lock, Rmessage, SetAttr, StatFs};
use std::borrow::Cow;
use std::os::fd::{AsFd, AsRawFd};

impl Server {
    pub(super) fn getattr<'m>(&self, fid: u32) -> Result<Rmessage<'m>, Errno> {
        let f = self.fids.get(fid)?;
        let st = fstat(f.fd.as_fd())?;
        let (uid, gid, mode, rdev) = match f.kind {
            Kind::File | Kind::Dir if self.mapped() => self
                .share
                .views
                .view(&st, || ownership::load(f.fd.as_raw_fd()))
                .map_or((st.st_uid, st.st_gid, st.st_mode, st.st_rdev), |g| {
                    g.apply(&st)
                }),
            Kind::Symlink if self.mapped() => {
                let (uid, gid) = self
                    .share
                    .symlink_owners
                    .get(&st)
                    .unwrap_or((st.st_uid, st.st_gid));
                (uid, gid, st.st_mode, st.st_rdev)
            }
            _ => (st.st_uid, st.st_gid, st.st_mode, st.st_rdev),
        };
        Ok(Rmessage::Getattr(Attr {
            valid: wire::GETATTR_BASIC,
            qid: self.share.qid(&st),
            mode,
            uid,
            gid,
            nlink: st.st_nlink,
            rdev,
            size: st.st_size as u64,
            blksize: st.st_blksize as u64,
            blocks: st.st_blocks as u64,
            atime_sec: st.st_atime as u64,
            atime_nsec: st.st_atime_nsec as u64,
            mtime_sec: st.st_mtime as u64,
            mtime_nsec: st.st_mtime_nsec as u64,
            ctime_sec: st.st_ctime as u64,
            ctime_nsec: st.st_ctime_nsec as u64,
            ..Default::default()
        }))
    }

    pub(super) fn setattr<'m>(&self, fid: u32, attr: &SetAttr) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.fids.get(fid)?;
        self.set_attr(&f, attr)?;
        Ok(Rmessage::Setattr)
    }

    pub(super) fn statfs<'m>(&self, fid: u32) -> Result<Rmessage<'m>, Errno> {
        let f = self.fids.get(fid)?;
        // SAFETY: statfs64 is plain data; zeroed is a valid value.
        let mut s: libc::statfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open and `s` is a valid out pointer.
        cvt(|| unsafe { libc::fstatfs64(f.fd.as_raw_fd(), &mut s) })?;
        // SAFETY: fsid_t is two i32s; reading it as bytes is sound.
        let fsid: [i32; 2] = unsafe { std::mem::transmute(s.f_fsid) };
        Ok(Rmessage::Statfs(StatFs {
            ty: s.f_type as u32,
            bsize: s.f_bsize as u32,
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            fsid: (fsid[0] as u32 as u64) | ((fsid[1] as u32 as u64) << 32),
            namelen: s.f_namelen as u32,
        }))
    }

    pub(super) fn readlink<'m>(&self, fid: u32) -> Result<Rmessage<'m>, Errno> {
        let f = self.fids.get(fid)?;
        if f.kind != Kind::Symlink {
            return Err(libc::EINVAL);
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `buf` is writable for its length; the fd is open.
        let n = cvt(|| unsafe {
            libc::readlinkat(
                f.fd.as_raw_fd(),
                EMPTY.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        })?;
        buf.truncate(n as usize);
        Ok(Rmessage::Readlink {
            target: Cow::Owned(buf),
        })
    }

    /// Extended attributes are not exported: no attribute exists, listing is unsupported.
    pub(super) fn xattrwalk(&self, fid: u32, name: &[u8]) -> Errno {
        if let Err(e) = self.fids.get(fid) {
            return e;
        }
        if name.is_empty() {
            libc::EOPNOTSUPP
        } else {
            libc::ENODATA
        }
    }

    pub(super) fn xattrcreate(&self, fid: u32) -> Errno {
        if let Err(e) = self.ro() {
            return e;
        }
        match self.fids.get(fid) {
            Ok(_) => libc::EOPNOTSUPP,
            Err(e) => e,
        }
    }

    /// Guest locks are advisory among the guest's own processes, which its kernel already
    /// arbitrates; grant them.
    pub(super) fn lock<'m>(&self, fid: u32) -> Result<Rmessage<'m>, Errno> {
        self.fids.get(fid)?;
        Ok(Rmessage::Lock { status: 0 })
    }

    /// Nothing else holds a lock: answer "unlocked" with the range asked about.
    pub(super) fn getlock<'m>(&self, fid: u32, lock: &Lock<'m>) -> Result<Rmessage<'m>, Errno> {
        self.fids.get(fid)?;
        Ok(Rmessage::Getlock {
            ty: libc::F_UNLCK as u8,
            start: lock.start,
            length: lock.length,
            proc_id: lock.proc_id,
            client_id: Cow::Borrowed(lock.client_id),
        })
    }

    fn set_attr(&self, f: &Fid, a: &SetAttr) -> Result<(), Errno> {
        use wire::setattr as sa;
        let proc_fd = self.share.root.proc_fd.as_raw_fd();
        let me = Name::from_fd(f.fd.as_raw_fd());
        let symlink = f.kind == Kind::Symlink;
        if f.kind == Kind::Dir {
            self.check_dir(f)?;
        }
        if self.mapped() && !symlink && a.valid & (sa::MODE | sa::UID | sa::GID) != 0 {
            return self.set_attr_mapped(f, a);
        }
        if a.valid & sa::MODE != 0 {
            if symlink {
                return Err(libc::EOPNOTSUPP);
            }
            let mode = self.host_mode(a.mode, f.kind == Kind::Dir);
            // SAFETY: `me` is NUL-terminated; the magic link names this fid's inode.
            cvt(|| unsafe { libc::fchmodat(proc_fd, me.ptr(), mode, 0) })?;
        }
        if a.valid & (sa::UID | sa::GID) != 0 && self.mapped() {
            // A symlink cannot carry the guest's view in an extended attribute and its owner
            // means nothing to the host: the guest's lchown is remembered for the share's
            // lifetime and the host's symlink is left as it is.
            let st = fstat(f.fd.as_fd())?;
            let (old_uid, old_gid) = self
                .share
                .symlink_owners
                .get(&st)
                .unwrap_or((st.st_uid, st.st_gid));
            let uid = if a.valid & sa::UID != 0 {
                a.uid
            } else {
                old_uid
            };
            let gid = if a.valid & sa::GID != 0 {
                a.gid
            } else {
                old_gid
            };
            if !self.share.symlink_owners.set(&st, (uid, gid)) && (uid, gid) != (old_uid, old_gid) {
                return Err(libc::EPERM);
            }
            // A chown changes the inode's ctime, as the guest expects: setting the link's own
            // times to the values they have does that on the host, and changes nothing else.
            let same = [
                libc::timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec,
                },
                libc::timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec,
                },
            ];
            let (dir, name) = self.entry_of(f)?;
            // SAFETY: `same` holds two timespecs; the name is NUL-terminated.
            cvt(|| unsafe {
                libc::utimensat(
                    dir.as_raw_fd(),
                    name.ptr(),
                    same.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        } else if a.valid & (sa::UID | sa::GID) != 0 {
            let uid = if a.valid & sa::UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & sa::GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            // SAFETY: the fd is open; EMPTY is NUL-terminated.
            cvt(|| unsafe {
                libc::fchownat(
                    f.fd.as_raw_fd(),
                    EMPTY.as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if a.valid & sa::SIZE != 0 {
            match f.kind {
                Kind::File => {}
                Kind::Dir => return Err(libc::EISDIR),
                _ => return Err(libc::EINVAL),
            }
            let tmp;
            let fd = match f.open.get() {
                Some(of) if of_writable(&of.fd) => of.fd.as_raw_fd(),
                _ => {
                    tmp = openat(self.share.root.proc_fd.as_fd(), &me, libc::O_WRONLY, 0)?;
                    tmp.as_raw_fd()
                }
            };
            // SAFETY: the fd is open.
            cvt(|| unsafe { libc::ftruncate64(fd, a.size as libc::off64_t) })?;
        }
        if a.valid & (sa::ATIME | sa::MTIME) != 0 {
            let t = |set: u32, upd: u32, s: u64, ns: u64| -> libc::timespec {
                if a.valid & set != 0 {
                    libc::timespec {
                        tv_sec: s as libc::time_t,
                        tv_nsec: ns as _,
                    }
                } else if a.valid & upd != 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                }
            };
            let times = [
                t(sa::ATIME_SET, sa::ATIME, a.atime_sec, a.atime_nsec),
                t(sa::MTIME_SET, sa::MTIME, a.mtime_sec, a.mtime_nsec),
            ];
            if symlink {
                // A symlink's own times: through its entry, never following it (the magic link
                // would be followed to the target).
                let (dir, name) = self.entry_of(f)?;
                // SAFETY: `times` holds two timespecs; the name is NUL-terminated.
                cvt(|| unsafe {
                    libc::utimensat(
                        dir.as_raw_fd(),
                        name.ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            } else {
                // SAFETY: `times` holds two timespecs; `me` is NUL-terminated.
                cvt(|| unsafe { libc::utimensat(proc_fd, me.ptr(), times.as_ptr(), 0) })?;
            }
        }
        Ok(())
    }

    /// setattr in mapped mode: owner, group and mode go to the guest's view; the host file
    /// only gets the permission bits (without set-id bits); then size and times as usual.
    fn set_attr_mapped(&self, f: &Fid, a: &SetAttr) -> Result<(), Errno> {
        use wire::setattr as sa;
        let fd = f.fd.as_raw_fd();
        let st = fstat(f.fd.as_fd())?;
        let mut want = ownership::load(fd).unwrap_or_else(|| GuestAttr::of_host(&st));
        if a.valid & sa::UID != 0 {
            want.uid = a.uid;
        }
        if a.valid & sa::GID != 0 {
            want.gid = a.gid;
        }
        if a.valid & sa::MODE != 0 {
            want.mode = (want.mode & libc::S_IFMT) | (a.mode & 0o7777);
            let hmode = self.host_mode(a.mode, f.kind == Kind::Dir);
            let me = Name::from_fd(fd);
            // SAFETY: `me` is NUL-terminated; the magic link names this fid's inode.
            cvt(|| unsafe {
                libc::fchmodat(self.share.root.proc_fd.as_raw_fd(), me.ptr(), hmode, 0)
            })?;
        }
        let st = fstat(f.fd.as_fd())?;
        if let Err(e) = ownership::record(fd, &st, &want) {
            // No user xattrs here: only what the host already shows can be "set".
            let host = GuestAttr::of_host(&st);
            let owner_unchanged = want.uid == host.uid && want.gid == host.gid;
            if !owner_unchanged {
                return Err(if e == libc::EOPNOTSUPP {
                    libc::EPERM
                } else {
                    e
                });
            }
        }
        let rest = SetAttr {
            valid: a.valid & !(sa::MODE | sa::UID | sa::GID),
            ..*a
        };
        if rest.valid != 0 {
            return self.set_attr(f, &rest);
        }
        Ok(())
    }
}
