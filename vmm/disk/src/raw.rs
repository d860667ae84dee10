//! Raw images: the file's bytes are the disk's bytes. Reads are `pread`/`preadv` on the file;
//! writes are allowed only when the image was opened writable, and never grow the file.

use crate::{check_range, io_error, DiskError, Format, Image, Result};
use std::fs::File;
use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A raw image file.
#[derive(Debug)]
pub struct Raw {
    file: File,
    path: PathBuf,
    len: u64,
    writable: bool,
}

/// The kernel's limit on iovecs per call (UIO_MAXIOV).
const IOV_MAX: usize = 1024;

impl Raw {
    /// Wraps `file` (opened for writing too when `writable`); its current size is the disk size.
    pub fn new(file: File, path: &Path, writable: bool) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|e| io_error("stat", path, e))?
            .len();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
            writable,
        })
    }

    fn unexpected_eof(&self) -> DiskError {
        io_error(
            "read",
            &self.path,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file became shorter while in use",
            ),
        )
    }
}

impl Image for Raw {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len() as u64, self.len)?;
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.unexpected_eof()
            } else {
                io_error("read", &self.path, e)
            }
        })
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(offset, total, self.len)?;
        let mut done = 0u64;
        while done < total {
            // The iovecs still to fill: skip whole buffers already read, trim the first one.
            let mut skip = done;
            let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOV_MAX));
            for buf in bufs.iter_mut() {
                let len = buf.len() as u64;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                if iovecs.len() == IOV_MAX {
                    break;
                }
                let rest = &mut buf[skip as usize..];
                skip = 0;
                iovecs.push(libc::iovec {
                    iov_base: rest.as_mut_ptr().cast(),
                    iov_len: rest.len(),
                });
            }
            let file_offset =
                libc::off64_t::try_from(offset + done).map_err(|_| DiskError::OutOfRange {
                    offset,
                    len: total,
                    size: self.len,
                })?;
            // SAFETY: every iovec points into a distinct `&mut [u8]` borrowed from `bufs` for
            // the duration of this call, with its exact length; the kernel writes at most
            // `iov_len` bytes into each. `iovecs.len()` <= IOV_MAX fits a c_int.
            let n = unsafe {
                libc::preadv64(
                    self.file.as_raw_fd(),
                    iovecs.as_ptr(),
                    iovecs.len() as libc::c_int,
                    file_offset,
                )
            };
            match n {
                0 => return Err(self.unexpected_eof()),
                n if n > 0 => done += n as u64,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io_error("read", &self.path, e));
                    }
                }
            }
        }
        Ok(())
    }

    fn direct_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.len)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_error("write", &self.path, e))
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| io_error("flush", &self.path, e))
    }
}
