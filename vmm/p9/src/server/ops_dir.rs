//! Directory listing: Treaddir, built from `getdents64` records (qids from `d_ino`/`d_type`,
//! no stat per entry) with the entries encoded after an Rreaddir header reserved up front.

use super::session::{DataRequest, Server};
use super::sys::{cvt, Errno, Kind};
use crate::reply::ReplyBuf;
use crate::wire::{self, Codec, DirEntry, Qid};
use std::os::fd::AsRawFd;

fn dtype_to_qtype(t: u8) -> u8 {
    match t {
        libc::DT_DIR => wire::QTDIR,
        libc::DT_LNK => wire::QTSYMLINK,
        _ => wire::QTFILE,
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
        let mut out = Vec::with_capacity(hdr + count.min(65536));
        out.resize(hdr, 0);
        let _g = of.dir_lock.lock().unwrap_or_else(|e| e.into_inner());
        let fd = of.fd.as_raw_fd();
        // SAFETY: the fd is open; seeking a directory to a cookie getdents gave us is fine.
        cvt(|| unsafe { libc::lseek64(fd, offset as libc::off64_t, libc::SEEK_SET) })?;
        let mut buf = vec![0u8; 32768.min(count.max(512) * 2)];
        'outer: loop {
            // SAFETY: `buf` is writable for its length; the fd is an open directory.
            let n = cvt(|| unsafe {
                libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len())
            })? as usize;
            if n == 0 {
                break;
            }
            let mut p = 0;
            while p + 19 <= n {
                let ino = u64::from_ne_bytes(buf[p..p + 8].try_into().unwrap_or_default());
                let off = u64::from_ne_bytes(buf[p + 8..p + 16].try_into().unwrap_or_default());
                let reclen = u16::from_ne_bytes([buf[p + 16], buf[p + 17]]) as usize;
                let dtype = buf[p + 18];
                if reclen < 19 || p + reclen > n {
                    break 'outer;
                }
                let raw = &buf[p + 19..p + reclen];
                let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                let ino = if is_root && name == b".." {
                    share.root.ino
                } else {
                    ino
                };
                let entry = DirEntry {
                    qid: Qid {
                        ty: dtype_to_qtype(dtype),
                        version: 0,
                        path: share.qid_path(f.dev, ino),
                    },
                    offset: off,
                    ty: dtype,
                    name,
                };
                if out.len() - hdr + DirEntry::len(&entry) > count {
                    break 'outer;
                }
                wire::write_dirent(&mut out, &entry);
                p += reclen;
            }
        }
        drop(_g);
        let data_len = (out.len() - hdr) as u32;
        out[..hdr].copy_from_slice(&wire::data_reply_header(
            wire::msg::RREADDIR,
            req.tag,
            data_len,
        ));
        reply.write_at(0, &out).map_err(|_| libc::ENOBUFS)?;
        Ok(out.len())
    }
}
