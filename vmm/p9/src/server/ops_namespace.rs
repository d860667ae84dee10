//! Namespace operations: the creates (Tlcreate, Tmkdir, Tmknod, Tsymlink, Tlink), the renames
//! (Trename, Trenameat) and the removals (Tunlinkat, Tremove). Each takes its limits before
//! touching the host, and a create whose later steps fail is undone.

use super::fids::{Fid, OpenFile};
use super::ops_file::dotl_to_open_flags;
use super::session::Server;
use super::sys::{cvt, fstat, fstatat, openat, undo_create, Errno, Kind, Name, EMPTY};
use crate::ownership::{self, GuestAttr};
use crate::wire::{Qid, Rmessage};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Server {
    pub(super) fn lcreate<'m>(
        &self,
        fid: u32,
        name: &[u8],
        flags: u32,
        mode: u32,
        gid: u32,
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.dir_fid(fid)?;
        let name = Name::new(name, false)?;
        // Every limit is taken before the file exists, so a refusal creates nothing.
        let open_slot = self.open_slot()?;
        let fid_slot = self.fid_slot(true)?;
        // O_EXCL always: never open an existing FIFO or device through a create.
        let oflags = dotl_to_open_flags(flags) | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = openat(f.fd.as_fd(), &name, oflags, self.host_mode(mode, false))?;
        let created = (|| {
            let path = openat(
                self.share.root.proc_fd.as_fd(),
                &Name::from_fd(fd.as_raw_fd()),
                libc::O_PATH,
                0,
            )?;
            let st = fstat(fd.as_fd())?;
            Ok::<_, Errno>((path, st))
        })();
        let (path, st) = created.inspect_err(|_| undo_create(f.fd.as_fd(), &name, false))?;
        let _ = self.record(
            path.as_raw_fd(),
            &GuestAttr {
                uid: f.uid,
                gid,
                mode: libc::S_IFREG | (mode & 0o7777),
                rdev: 0,
            },
        );
        let entry = Some((f.fd.clone(), Box::from(name.bytes())));
        let depth = f.depth.load(Ordering::Relaxed).saturating_add(1);
        let nf = Server::new_fid(fid_slot, Arc::new(path), &st, entry, f.uid, depth);
        let _ = nf.open.set(OpenFile::new(fd, open_slot));
        self.fids.replace(fid, Arc::new(nf));
        Ok(Rmessage::Lcreate {
            qid: self.share.qid(&st),
            iounit: 0,
        })
    }

    pub(super) fn mkdir<'m>(
        &self,
        dfid: u32,
        name: &[u8],
        mode: u32,
        gid: u32,
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.dir_fid(dfid)?;
        let name = Name::new(name, false)?;
        // SAFETY: the name is NUL-terminated; the dir fd is open.
        cvt(|| unsafe { libc::mkdirat(f.fd.as_raw_fd(), name.ptr(), self.host_mode(mode, true)) })?;
        let want = GuestAttr {
            uid: f.uid,
            gid,
            mode: libc::S_IFDIR | (mode & 0o7777),
            rdev: 0,
        };
        let qid = self.finish_create(&f, &name, Some((want, false)))?;
        Ok(Rmessage::Mkdir { qid })
    }

    pub(super) fn mknod<'m>(
        &self,
        dfid: u32,
        name: &[u8],
        mode: u32,
        rdev: u64,
        gid: u32,
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.dir_fid(dfid)?;
        let name = Name::new(name, false)?;
        let guest_type = match mode & libc::S_IFMT {
            0 => libc::S_IFREG,
            t => t,
        };
        // The host only ever gets regular files in mapped mode (device nodes, FIFOs and sockets
        // become stand-ins carrying the guest's view), and never a device node in passthrough
        // mode.
        let host_type = match guest_type {
            libc::S_IFREG => libc::S_IFREG,
            t if self.mapped() && ownership::is_special(t) => libc::S_IFREG,
            libc::S_IFIFO | libc::S_IFSOCK => guest_type,
            _ => return Err(libc::EPERM),
        };
        let hmode = self.host_mode(mode, false);
        // SAFETY: the name is NUL-terminated; the dir fd is open.
        cvt(|| unsafe { libc::mknodat(f.fd.as_raw_fd(), name.ptr(), host_type | hmode, 0) })?;
        let want = GuestAttr {
            uid: f.uid,
            gid,
            mode: guest_type | (mode & 0o7777),
            rdev,
        };
        // A stand-in the host cannot label would be a lie: refuse it.
        let qid = self.finish_create(&f, &name, Some((want, host_type != guest_type)))?;
        Ok(Rmessage::Mknod { qid })
    }

    pub(super) fn symlink<'m>(
        &self,
        fid: u32,
        name: &[u8],
        target: &[u8],
        gid: u32,
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.dir_fid(fid)?;
        let name = Name::new(name, false)?;
        let target = CString::new(target).map_err(|_| libc::EINVAL)?;
        // SAFETY: both strings are NUL-terminated; the dir fd is open.
        cvt(|| unsafe { libc::symlinkat(target.as_ptr(), f.fd.as_raw_fd(), name.ptr()) })?;
        // A symlink carries no extended attribute: its guest owner is remembered by the share
        // (a new inode may reuse a forgotten one's number, so it is always set here).
        let qid = self.finish_create(&f, &name, None)?;
        if self.mapped() {
            if let Ok(st) = fstatat(f.fd.as_fd(), &name) {
                self.share.symlink_owners.set(&st, (f.uid, gid));
            }
        }
        Ok(Rmessage::Symlink { qid })
    }

    /// Finishes creating `name` in `dir`: records the guest's view of it (mapped mode; with
    /// `strict`, a view that cannot be recorded refuses the create, otherwise the guest sees the
    /// host's values) and returns its qid. If a step fails, the new node is removed again.
    fn finish_create(
        &self,
        dir: &Fid,
        name: &Name,
        want: Option<(GuestAttr, bool)>,
    ) -> Result<Qid, Errno> {
        let done = (|| {
            if let Some((want, strict)) = want.filter(|_| self.mapped()) {
                let recorded = openat(dir.fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
                    .and_then(|fd| self.record(fd.as_raw_fd(), &want));
                if recorded.is_err() && strict {
                    return Err(libc::EPERM);
                }
            }
            fstatat(dir.fd.as_fd(), name)
        })();
        let st = done.inspect_err(|_| {
            let is_dir = want.is_some_and(|(w, _)| w.mode & libc::S_IFMT == libc::S_IFDIR);
            undo_create(dir.fd.as_fd(), name, is_dir)
        })?;
        Ok(self.share.qid(&st))
    }

    pub(super) fn link<'m>(&self, dfid: u32, fid: u32, name: &[u8]) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let d = self.dir_fid(dfid)?;
        let f = self.fids.get(fid)?;
        let name = Name::new(name, false)?;
        if f.kind == Kind::Dir {
            return Err(libc::EPERM);
        }
        // SAFETY: the fds are open and the names NUL-terminated.
        let r = cvt(|| unsafe {
            libc::linkat(
                f.fd.as_raw_fd(),
                EMPTY.as_ptr(),
                d.fd.as_raw_fd(),
                name.ptr(),
                libc::AT_EMPTY_PATH,
            )
        });
        match r {
            Ok(_) => {}
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; regular files can go through their /proc
            // link instead (never symlinks: that would follow them).
            Err(libc::ENOENT) if f.kind != Kind::Symlink => {
                let p = Name::from_fd(f.fd.as_raw_fd());
                // SAFETY: as above.
                cvt(|| unsafe {
                    libc::linkat(
                        self.share.root.proc_fd.as_raw_fd(),
                        p.ptr(),
                        d.fd.as_raw_fd(),
                        name.ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
            }
            Err(e) => return Err(e),
        }
        Ok(Rmessage::Link)
    }

    pub(super) fn rename<'m>(
        &self,
        fid: u32,
        dfid: u32,
        name: &[u8],
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.fids.get(fid)?;
        let d = self.dir_fid(dfid)?;
        let new = Name::new(name, false)?;
        let (parent, old) = self.entry_of(&f)?;
        // SAFETY: names are NUL-terminated; the fds are open.
        cvt(|| unsafe {
            libc::renameat(parent.as_raw_fd(), old.ptr(), d.fd.as_raw_fd(), new.ptr())
        })?;
        Ok(Rmessage::Rename)
    }

    pub(super) fn renameat<'m>(
        &self,
        olddirfid: u32,
        oldname: &[u8],
        newdirfid: u32,
        newname: &[u8],
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let od = self.dir_fid(olddirfid)?;
        let nd = self.dir_fid(newdirfid)?;
        let on = Name::new(oldname, false)?;
        let nn = Name::new(newname, false)?;
        // SAFETY: names are NUL-terminated; the fds are open.
        cvt(|| unsafe {
            libc::renameat(od.fd.as_raw_fd(), on.ptr(), nd.fd.as_raw_fd(), nn.ptr())
        })?;
        Ok(Rmessage::Renameat)
    }

    pub(super) fn unlinkat<'m>(
        &self,
        dirfid: u32,
        name: &[u8],
        flags: u32,
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let d = self.dir_fid(dirfid)?;
        let name = Name::new(name, false)?;
        let fl = (flags as i32) & libc::AT_REMOVEDIR;
        // SAFETY: the name is NUL-terminated; the dir fd is open.
        cvt(|| unsafe { libc::unlinkat(d.fd.as_raw_fd(), name.ptr(), fl) })?;
        Ok(Rmessage::Unlinkat)
    }

    pub(super) fn remove<'m>(&self, fid: u32) -> Result<Rmessage<'m>, Errno> {
        // Tremove clunks the fid whether or not the removal succeeds.
        let f = self.fids.remove(fid).ok_or(libc::EBADF)?;
        self.ro()?;
        let (dir, name) = self.entry_of(&f)?;
        let fl = if f.kind == Kind::Dir {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        // SAFETY: the name is NUL-terminated; the dir fd is open.
        cvt(|| unsafe { libc::unlinkat(dir.as_raw_fd(), name.ptr(), fl) })?;
        Ok(Rmessage::Remove)
    }
}
