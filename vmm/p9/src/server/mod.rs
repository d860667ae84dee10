//! The 9P2000.L server: one [`Server`] per exported directory (a "share"), handling complete
//! requests from any number of threads at once and writing replies through [`ReplyBuf`].
//!
//! Confinement: every fid owns one `O_PATH` descriptor; names are resolved one component at a
//! time with `openat(O_PATH|O_NOFOLLOW)` so symlinks are never followed on the host, `..` is
//! clamped at the share root, and a directory that has left the share (moved away on the host
//! while the guest held a fid in it) answers ENOENT to everything named through it (see
//! [`crate::confine`]). Names with `/` or NUL are refused, device nodes, FIFOs and sockets are
//! never opened (the type of the inode an `O_PATH` fd refers to cannot change, so checking it and
//! then reopening through `/proc/self/fd/N` is race-free; a directory is reopened by name with
//! `O_DIRECTORY`, which opens nothing but a directory, and kept only if it is the fid's inode), read-only shares answer EROFS to every
//! mutating request, the numbers of fids and open files are capped per session, and a refused
//! request leaves the host tree as it was (limits are taken before anything is created, and a
//! create whose later steps fail is undone).
//!
//! Speed: fids live in a sharded hash table (no global lock on the hot path), reads go straight
//! from the file into the reply area (`ReplyBuf::read_from`), readdir builds qids from
//! `d_ino`/`d_type` without a stat per entry, listings and (mapped mode) the guest's ownership
//! view of unchanged files are kept while their change stamp holds ([`dircache`], [`viewcache`]),
//! and msize goes up to [`Config::msize`].
//!
//! This module only decodes a request and routes it ([`Server::handle`]); the pieces live in:
//! * [`config`]: [`Config`], creation errors; [`session`]: the [`Server`] value and the checks
//!   every operation shares; [`fids`]: the fid table and caps; [`stats`]: request statistics;
//!   [`dircache`]: listings of unchanged directories; [`dirfds`]: descriptors of the
//!   directories walks pass through; [`viewcache`]: the guest's view of
//!   unchanged files; [`stamp`]: when a file counts as unchanged;
//!   [`sys`]: the system-call wrappers;
//! * the operations by group: [`ops_session`] (version, attach, walk, clunk),
//!   [`ops_file`] (lopen, read, write, fsync), [`ops_dir`] (readdir), [`ops_namespace`]
//!   (create, mkdir, mknod, symlink, link, rename, remove), [`ops_attr`] (getattr, setattr,
//!   statfs, readlink, xattrs, locks).

mod config;
mod dircache;
mod dirfds;
mod fids;
mod ops_attr;
mod ops_dir;
mod ops_file;
mod ops_namespace;
mod ops_session;
mod session;
mod stamp;
mod stats;
mod sys;
mod viewcache;

pub use config::{raise_nofile_limit, Config, Error};
pub use session::Server;
pub use stats::{histogram_quantile, StatsSnapshot};

use crate::reply::ReplyBuf;
use crate::wire::{self, Rmessage, Tmessage};
use session::{lerror, send, DataRequest};
use sys::Errno;

impl Server {
    /// Handles one complete request (starting with size[4]) and writes the whole reply into
    /// `reply`, returning the reply's length (0 only if not even an Rlerror fits). Never panics:
    /// a malformed, unknown or oversized message gets Rlerror with the request's tag.
    ///
    /// Tflush is answered at once; a transport that runs requests concurrently must send the
    /// Rflush only after the flushed request's reply (see [`crate::flush::FlushTracker`]).
    pub fn handle(&self, request: &[u8], reply: &mut dyn ReplyBuf) -> usize {
        let t0 = self.share.stats.start();
        let tag = wire::peek_tag(request);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match Tmessage::decode(request) {
                    Ok((tag, m)) => self.dispatch(tag, m, reply),
                    Err(wire::Error::UnknownType(_)) => Err(libc::EOPNOTSUPP),
                    Err(_) => Err(libc::EINVAL),
                }
            }));
        let (len, failed) = match result {
            Ok(Ok(n)) => (n, false),
            Ok(Err(e)) => (lerror(tag, e, reply), true),
            Err(_) => (lerror(tag, libc::EIO, reply), true),
        };
        let ty = request.get(4).copied().unwrap_or(0);
        self.share.stats.finish(t0, ty, failed);
        len
    }

    /// Runs one decoded request. Walk, read and readdir write their replies into the reply
    /// area themselves (read and readdir without copying the data twice); every other
    /// operation returns its reply for [`send`] to encode.
    fn dispatch(
        &self,
        tag: u16,
        m: Tmessage<'_>,
        reply: &mut dyn ReplyBuf,
    ) -> Result<usize, Errno> {
        let r = match m {
            Tmessage::Version { msize, version } => self.version(msize, version)?,
            Tmessage::Auth { .. } => return Err(libc::EOPNOTSUPP),
            Tmessage::Attach { fid, n_uname, .. } => self.attach(fid, n_uname)?,
            Tmessage::Flush { .. } => Rmessage::Flush,
            Tmessage::Walk { fid, newfid, names } => {
                return self.walk(tag, fid, newfid, names.as_slice(), reply)
            }
            Tmessage::Clunk { fid } => self.clunk(fid)?,
            Tmessage::Lopen { fid, flags } => self.lopen(fid, flags)?,
            Tmessage::Read { fid, offset, count } | Tmessage::Readdir { fid, offset, count } => {
                let req = DataRequest {
                    tag,
                    fid,
                    offset,
                    count,
                };
                return match m {
                    Tmessage::Read { .. } => self.read(req, reply),
                    _ => self.readdir(req, reply),
                };
            }
            Tmessage::Write { fid, offset, data } => self.write(fid, offset, data)?,
            Tmessage::Fsync { fid, datasync } => self.fsync(fid, datasync)?,
            Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid,
            } => self.lcreate(fid, name, flags, mode, gid)?,
            Tmessage::Mkdir {
                dfid,
                name,
                mode,
                gid,
            } => self.mkdir(dfid, name, mode, gid)?,
            Tmessage::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                gid,
            } => self.mknod(dfid, name, mode, libc::makedev(major, minor), gid)?,
            Tmessage::Symlink {
                fid,
                name,
                target,
                gid,
            } => self.symlink(fid, name, target, gid)?,
            Tmessage::Link { dfid, fid, name } => self.link(dfid, fid, name)?,
            Tmessage::Rename { fid, dfid, name } => self.rename(fid, dfid, name)?,
            Tmessage::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => self.renameat(olddirfid, oldname, newdirfid, newname)?,
            Tmessage::Unlinkat {
                dirfid,
                name,
                flags,
            } => self.unlinkat(dirfid, name, flags)?,
            Tmessage::Remove { fid } => self.remove(fid)?,
            Tmessage::Getattr { fid, .. } => self.getattr(fid)?,
            Tmessage::Setattr { fid, attr } => self.setattr(fid, &attr)?,
            Tmessage::Statfs { fid } => self.statfs(fid)?,
            Tmessage::Readlink { fid } => self.readlink(fid)?,
            Tmessage::Xattrwalk { fid, name, .. } => return Err(self.xattrwalk(fid, name)),
            Tmessage::Xattrcreate { fid, .. } => return Err(self.xattrcreate(fid)),
            Tmessage::Lock { fid, .. } => self.lock(fid)?,
            Tmessage::Getlock { fid, lock } => self.getlock(fid, &lock)?,
        };
        send(reply, tag, &r)
    }
}
