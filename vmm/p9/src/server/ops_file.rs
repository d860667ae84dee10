//! File I/O operations: Tlopen (reopens the fid's own inode: a directory by name, checked,
//! anything else through its `/proc` link, never a special file), Tread (straight from the
//! file into the reply area), Twrite and Tfsync, and the translation of 9P2000.L open flags.

use super::fids::{Fid, OpenFile};
use super::session::{DataRequest, Server};
use super::sys::{cvt, fstat, openat, Errno, Kind, Name};
use crate::reply::ReplyBuf;
use crate::wire::{self, Rmessage};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

// 9P2000.L open flags (x86 Linux values, independent of the host architecture).
const DOTL_ACCMODE: u32 = 0o3;
const DOTL_CREATE: u32 = 0o100;
const DOTL_TRUNC: u32 = 0o1000;
const DOTL_APPEND: u32 = 0o2000;
const DOTL_DSYNC: u32 = 0o10000;
const DOTL_SYNC: u32 = 0o4000000;

pub(super) fn dotl_to_open_flags(flags: u32) -> i32 {
    let mut f = match flags & DOTL_ACCMODE {
        1 => libc::O_WRONLY,
        2 => libc::O_RDWR,
        _ => libc::O_RDONLY,
    };
    if flags & DOTL_TRUNC != 0 {
        f |= libc::O_TRUNC;
    }
    if flags & DOTL_APPEND != 0 {
        f |= libc::O_APPEND;
    }
    if flags & DOTL_DSYNC != 0 {
        f |= libc::O_DSYNC;
    }
    if flags & DOTL_SYNC != 0 {
        f |= libc::O_SYNC;
    }
    f
}

pub(super) fn dotl_writes(flags: u32) -> bool {
    matches!(flags & DOTL_ACCMODE, 1 | 2) || flags & (DOTL_TRUNC | DOTL_APPEND | DOTL_CREATE) != 0
}

impl Server {
    pub(super) fn lopen<'m>(&self, fid: u32, flags: u32) -> Result<Rmessage<'m>, Errno> {
        if dotl_writes(flags) {
            self.ro()?;
        }
        let f = self.fids.get(fid)?;
        let mut oflags = dotl_to_open_flags(flags);
        match f.kind {
            Kind::File => {}
            Kind::Dir => {
                if oflags & libc::O_ACCMODE != libc::O_RDONLY || oflags & libc::O_TRUNC != 0 {
                    return Err(libc::EISDIR);
                }
                oflags |= libc::O_DIRECTORY;
                self.check_dir(&f)?;
            }
            Kind::Symlink => return Err(libc::ELOOP),
            Kind::Special => return Err(libc::EPERM),
        }
        if f.open.get().is_some() {
            return Err(libc::EBADF);
        }
        let count = self.open_slot()?;
        let (fd, st) = self.reopen(&f, oflags)?;
        f.open
            .set(OpenFile::new(fd, count))
            .map_err(|_| libc::EBADF)?;
        Ok(Rmessage::Lopen {
            qid: self.share.qid(&st),
            iounit: 0,
        })
    }

    /// Opens the very inode the fid's `O_PATH` descriptor refers to (already checked to be a
    /// regular file or a directory) with `oflags`, and its fresh `fstat`.
    ///
    /// A directory is opened by name in the directory it was walked in, with `O_DIRECTORY` and
    /// `O_NOFOLLOW`, and kept only if `fstat` shows the fid's own inode: whatever is at that
    /// name by then, nothing but a directory can be opened this way, and the open file is the
    /// one the fid names or is closed at once. Everything else (a regular file, whose name
    /// could meanwhile name a FIFO or a device node that must never be opened, or a directory
    /// whose name no longer leads to it) is reopened through the descriptor's `/proc` magic
    /// link, which can only reach the fid's inode.
    fn reopen(&self, f: &Fid, oflags: i32) -> Result<(OwnedFd, libc::stat64), Errno> {
        if let (Kind::Dir, Some((dir, name))) = (f.kind, &f.entry) {
            let by_name = Name::new(name, false).and_then(|name| {
                let flags = oflags | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                let fd = openat(dir.as_fd(), &name, flags, 0)?;
                let st = fstat(fd.as_fd())?;
                Ok((fd, st))
            });
            if let Ok((fd, st)) = by_name {
                if (st.st_dev, st.st_ino) == (f.dev, f.ino) {
                    return Ok((fd, st));
                }
            }
        }
        let fd = openat(
            self.share.root.proc_fd.as_fd(),
            &Name::from_fd(f.fd.as_raw_fd()),
            oflags,
            0,
        )?;
        let st = fstat(fd.as_fd())?;
        Ok((fd, st))
    }

    /// Reads `count` bytes at `offset` straight into the reply area after the Rread header
    /// (zero copy), then writes the header.
    pub(super) fn read(&self, req: DataRequest, reply: &mut dyn ReplyBuf) -> Result<usize, Errno> {
        let DataRequest { fid, offset, .. } = req;
        let f = self.fids.get(fid)?;
        let of = f.open.get().ok_or(libc::EBADF)?;
        if f.kind == Kind::Dir {
            return Err(libc::EISDIR);
        }
        let count = self.data_room(req.count, reply);
        let n = if count == 0 {
            0
        } else {
            loop {
                match reply.read_from(wire::RREAD_HEADER_LEN, count, of.fd.as_fd(), offset) {
                    Ok(n) => break n.min(count),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
                }
            }
        };
        let h = wire::data_reply_header(wire::msg::RREAD, req.tag, n as u32);
        reply.write_at(0, &h).map_err(|_| libc::ENOBUFS)?;
        Ok(wire::RREAD_HEADER_LEN + n)
    }

    pub(super) fn write<'m>(
        &self,
        fid: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<Rmessage<'m>, Errno> {
        self.ro()?;
        let f = self.fids.get(fid)?;
        let of = f.open.get().ok_or(libc::EBADF)?;
        // SAFETY: `data` is a valid readable slice; the fd is open.
        let n = cvt(|| unsafe {
            libc::pwrite64(
                of.fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                offset as libc::off64_t,
            )
        })?;
        Ok(Rmessage::Write { count: n as u32 })
    }

    pub(super) fn fsync<'m>(&self, fid: u32, datasync: u32) -> Result<Rmessage<'m>, Errno> {
        let f = self.fids.get(fid)?;
        if let Some(of) = f.open.get() {
            // SAFETY: the fd is open.
            cvt(|| unsafe {
                if datasync != 0 {
                    libc::fdatasync(of.fd.as_raw_fd())
                } else {
                    libc::fsync(of.fd.as_raw_fd())
                }
            })?;
        }
        Ok(Rmessage::Fsync)
    }
}
