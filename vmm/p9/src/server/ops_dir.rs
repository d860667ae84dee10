//! Directory listing: Treaddir, built from `getdents64` records (qids from `d_ino`/`d_type`,
//! no stat per entry) with the entries encoded after an Rreaddir header reserved up front.
//! Listings of directories that have not changed come from the share's [`DirCache`]
//! (see [`super::dircache`]).

use super::dircache::{records, Record};
use super::session::{DataRequest, Server};
use super::sys::{cvt, fstat, Errno, Kind};
use crate::reply::ReplyBuf;
use crate::wire::{self, Codec, DirEntry, Qid};
use std::cell::RefCell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

fn dtype_to_qtype(t: u8) -> u8 {
    match t {
        libc::DT_DIR => wire::QTDIR,
        libc::DT_LNK => wire::QTSYMLINK,
        _ => wire::QTFILE,
    }
}

thread_local! {
    /// Each thread's Rreaddir under construction and getdents64 buffer, reused across requests.
    static BUFS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Reads the directory `fd` from the cookie `offset` with `getdents64` into `buf`, passing each
/// record to `put` until it returns false or the directory ends.
fn read_records(
    fd: BorrowedFd<'_>,
    offset: u64,
    buf: &mut Vec<u8>,
    want: usize,
    mut put: impl FnMut(&Record<'_>) -> bool,
) -> Result<(), Errno> {
    let fd = fd.as_raw_fd();
    // SAFETY: the fd is open; seeking a directory to a cookie getdents gave us is fine.
    cvt(|| unsafe { libc::lseek64(fd, offset as libc::off64_t, libc::SEEK_SET) })?;
    buf.resize(32768.min(want.max(512) * 2), 0);
    loop {
        // SAFETY: `buf` is writable for its length; the fd is an open directory.
        let n = cvt(|| unsafe {
            libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())
        })? as usize;
        if n == 0 || !records(&buf[..n.min(buf.len())], &mut put) {
            return Ok(());
        }
    }
}

impl Server {
    /// Lists the opened directory `fid` from the getdents cookie `offset`, at most `count`
    /// bytes of entries, into the reply area.
    pub(super) fn readdir(
        &self,
        req: DataRequest,
        reply: &mut dyn ReplyBuf,
    ) -> Result<usize, Errno> {
        let DataRequest { fid, offset, .. } = req;
        let share = &*self.share;
        let f = self.fids.get(fid)?;
        if f.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let of = f.open.get().ok_or(libc::EBADF)?;
        let hdr = wire::RREAD_HEADER_LEN;
        let count = self.data_room(req.count, reply);
        let is_root = self.is_root(&f);
        self.check_dir(&f)?;
        let mut list = |out: &mut Vec<u8>, dents: &mut Vec<u8>| {
            out.clear();
            out.resize(hdr, 0);
            // Encodes one record; false once the reply is full.
            let mut put = |r: &Record<'_>| {
                let ino = if is_root && r.name == b".." {
                    share.root.ino
                } else {
                    r.ino
                };
                let entry = DirEntry {
                    qid: Qid {
                        ty: dtype_to_qtype(r.dtype),
                        version: 0,
                        path: share.qid_path(f.dev, ino),
                    },
                    offset: r.off,
                    ty: r.dtype,
                    name: r.name,
                };
                if out.len() - hdr + DirEntry::len(&entry) > count {
                    return false;
                }
                wire::write_dirent(out, &entry);
                true
            };
            let _g = of.dir_lock.lock().unwrap_or_else(|e| e.into_inner());
            let st = fstat(of.fd.as_fd())?;
            let listing = match share.dirs.get(&st) {
                Some(l) => Some(l),
                // A listing is only worth making for a client starting from the top.
                None if offset == 0 => share.dirs.fill(of.fd.as_fd(), &st)?,
                None => None,
            };
            let served = listing.and_then(|l| l.after(offset, &mut put));
            if served.is_none() {
                read_records(of.fd.as_fd(), offset, dents, count, &mut put)?;
            }
            drop(_g);
            let data_len = (out.len() - hdr) as u32;
            out[..hdr].copy_from_slice(&wire::data_reply_header(
                wire::msg::RREADDIR,
                req.tag,
                data_len,
            ));
            reply.write_at(0, out).map_err(|_| libc::ENOBUFS)?;
            Ok(out.len())
        };
        BUFS.with(|bufs| match bufs.try_borrow_mut() {
            Ok(mut b) => {
                let (out, dents) = &mut *b;
                list(out, dents)
            }
            Err(_) => list(&mut Vec::new(), &mut Vec::new()),
        })
    }
}
