//! The reply area abstraction: [`ReplyBuf`] lets the server write a reply without knowing where
//! it lives (scattered guest buffers for virtio, a Vec for sockets and tests), and lets reads go
//! straight from a file into that area with `preadv` (zero copy). [`VecReply`] is the Vec-backed
//! implementation.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Where a reply is written.
pub trait ReplyBuf {
    /// Total bytes the reply may occupy.
    fn capacity(&self) -> usize;
    /// Writes `data` at `offset` in the reply area.
    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()>;
    /// Zero-copy read: reads up to `len` bytes of `fd` at `file_offset` straight into the reply
    /// area at `offset`. Returns the number of bytes read.
    fn read_from(
        &mut self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> io::Result<usize>;
}

/// A reply area backed by a `Vec<u8>` of fixed capacity.
#[derive(Debug, Clone)]
pub struct VecReply {
    buf: Vec<u8>,
}

impl VecReply {
    /// A reply area of `capacity` bytes (use the negotiated msize).
    pub fn new(capacity: usize) -> Self {
        VecReply {
            buf: vec![0; capacity],
        }
    }
    /// The whole area (the reply is the first `len` bytes returned by `Server::handle`).
    pub fn as_slice(&self) -> &[u8] {
        &self.buf
    }
    /// Mutable access to the area.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// Whether `len` bytes at `offset` fit a reply area of `cap` bytes (an error says why not).
pub(crate) fn range_check(cap: usize, offset: usize, len: usize) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= cap => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("reply write of {len} bytes at {offset} exceeds the {cap}-byte reply area"),
        )),
    }
}

impl ReplyBuf for VecReply {
    fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        range_check(self.buf.len(), offset, data.len())?;
        self.buf[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read_from(
        &mut self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> io::Result<usize> {
        range_check(self.buf.len(), offset, len)?;
        let dst = &mut self.buf[offset..offset + len];
        loop {
            // SAFETY: `dst` is a valid writable slice of exactly `dst.len()` bytes owned by self,
            // and `fd` is a borrowed, open descriptor.
            let n = unsafe {
                libc::pread64(
                    fd.as_raw_fd(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    file_offset as libc::off64_t,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn vec_reply_bounds_and_reads() {
        let mut r = VecReply::new(16);
        assert_eq!(r.capacity(), 16);
        r.write_at(2, b"abc").unwrap();
        assert_eq!(&r.as_slice()[2..5], b"abc");
        assert!(r.write_at(14, b"abc").is_err());
        assert!(r.write_at(usize::MAX, b"a").is_err());
        let p = std::env::temp_dir().join(format!("p9-vecreply-{}", std::process::id()));
        std::fs::File::create(&p)
            .unwrap()
            .write_all(b"0123456789")
            .unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(r.read_from(4, 8, f.as_fd(), 6).unwrap(), 4);
        assert_eq!(&r.as_slice()[4..8], b"6789");
        assert!(r.read_from(10, 8, f.as_fd(), 0).is_err());
        std::fs::remove_file(&p).unwrap();
    }
}
