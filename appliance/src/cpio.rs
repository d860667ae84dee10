//! A deterministic writer for uncompressed "newc" (`070701`) cpio archives, the format the
//! Linux kernel unpacks as an initramfs.
//!
//! The writer owns the byte layout only: headers, name and data padding to 4 bytes, and the
//! `TRAILER!!!` record. Callers decide the order of entries (the appliance builder sorts them).
//! Every header uses fixed owner (0:0), mtime 0, device 0 and sequential inode numbers starting
//! at 1, so the same entries always give byte-identical archives. Regular files can be streamed
//! from disk without reading them into memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// File type bits as used in the cpio `mode` field.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file type bits.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link type bits.
pub const S_IFLNK: u32 = 0o120000;
/// Character device type bits.
pub const S_IFCHR: u32 = 0o020000;

/// Largest file a newc header can describe (the size field is 8 hex digits).
pub const MAX_FILE_SIZE: u64 = u32::MAX as u64;

/// Errors while writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing to the output or reading a source file failed.
    #[error("cpio: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The entry name is unusable (empty, contains NUL, or is absolute).
    #[error("cpio: bad entry name {0:?}: names must be relative, non-empty and without NUL bytes")]
    BadName(String),
    /// The file is larger than newc can describe.
    #[error("cpio: {path} is {size} bytes, newc archives cannot hold files over 4 GiB")]
    TooLarge {
        /// Source path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// A source file changed size while it was being copied.
    #[error("cpio: {path} changed size while being archived (expected {expected} bytes, got {got}); retry")]
    SizeChanged {
        /// Source path.
        path: String,
        /// Size from the header.
        expected: u64,
        /// Bytes actually read.
        got: u64,
    },
}

/// Streams newc entries to `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

const ZEROS: [u8; 4] = [0; 4];

fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    fn io<T>(r: io::Result<T>, context: impl FnOnce() -> String) -> Result<T, CpioError> {
        r.map_err(|source| CpioError::Io {
            context: context(),
            source,
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), CpioError> {
        Self::io(self.out.write_all(bytes), || "writing archive".into())?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u64,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        if name.is_empty() || name.as_bytes().contains(&0) || name.starts_with('/') {
            return Err(CpioError::BadName(name.to_string()));
        }
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            let i = self.next_ino;
            self.next_ino = self.next_ino.wrapping_add(1);
            i
        };
        let namesize = name.len() as u64 + 1;
        let hdr = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        debug_assert_eq!(hdr.len(), 110);
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        let pad = pad4(110 + namesize);
        self.put(&ZEROS[..pad])
    }

    fn data_pad(&mut self, size: u64) -> Result<(), CpioError> {
        let pad = pad4(size);
        self.put(&ZEROS[..pad])
    }

    /// Adds a directory with permission bits `perm`.
    pub fn add_dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.header(name, S_IFDIR | (perm & 0o7777), 2, 0, (0, 0))
    }

    /// Adds a regular file whose contents are `data`.
    pub fn add_bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let size = data.len() as u64;
        if size > MAX_FILE_SIZE {
            return Err(CpioError::TooLarge {
                path: name.into(),
                size,
            });
        }
        self.header(name, S_IFREG | (perm & 0o7777), 1, size, (0, 0))?;
        self.put(data)?;
        self.data_pad(size)
    }

    /// Adds a regular file streamed from `src` on disk.
    pub fn add_file(&mut self, name: &str, perm: u32, src: &Path) -> Result<(), CpioError> {
        let mut f = Self::io(File::open(src), || format!("opening {}", src.display()))?;
        let size = Self::io(f.metadata(), || format!("stat {}", src.display()))?.len();
        if size > MAX_FILE_SIZE {
            return Err(CpioError::TooLarge {
                path: src.display().to_string(),
                size,
            });
        }
        self.header(name, S_IFREG | (perm & 0o7777), 1, size, (0, 0))?;
        let mut limited = (&mut f).take(size);
        let copied = Self::io(io::copy(&mut limited, &mut self.out), || {
            format!("copying {}", src.display())
        })?;
        self.written += copied;
        if copied != size {
            return Err(CpioError::SizeChanged {
                path: src.display().to_string(),
                expected: size,
                got: copied,
            });
        }
        self.data_pad(size)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    pub fn add_symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let size = target.len() as u64;
        self.header(name, S_IFLNK | 0o777, 1, size, (0, 0))?;
        self.put(target.as_bytes())?;
        self.data_pad(size)
    }

    /// Adds a character device node (the kernel creates it while unpacking).
    pub fn add_char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.header(name, S_IFCHR | (perm & 0o7777), 1, 0, (major, minor))
    }

    /// Writes the trailer, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.header("TRAILER!!!", 0, 1, 0, (0, 0))?;
        Self::io(self.out.flush(), || "flushing archive".into())?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("bootbox", 0o755).unwrap();
        w.add_bytes("bootbox/job", 0o644, b"abcde").unwrap();
        w.add_symlink("x", "bootbox/job").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        // header(110) + "bootbox\0"(8) = 118 -> padded to 120.
        assert_eq!(&out[120..126], b"070701");
        let trailer = out.windows(10).position(|w| w == b"TRAILER!!!").unwrap();
        assert!(trailer > 0);
        // Second header: size field holds 5.
        assert_eq!(&out[120 + 54..120 + 62], b"00000005");
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(matches!(
            w.add_dir("/abs", 0o755),
            Err(CpioError::BadName(_))
        ));
        assert!(matches!(w.add_dir("", 0o755), Err(CpioError::BadName(_))));
        assert!(matches!(
            w.add_dir("a\0b", 0o755),
            Err(CpioError::BadName(_))
        ));
    }

    #[test]
    fn identical_input_gives_identical_bytes() {
        let build = || {
            let mut w = CpioWriter::new(Vec::new());
            w.add_dir("a", 0o755).unwrap();
            w.add_bytes("a/b", 0o600, b"xyz").unwrap();
            w.add_char_device("console", 0o600, 5, 1).unwrap();
            w.finish().unwrap()
        };
        assert_eq!(build(), build());
    }
}
