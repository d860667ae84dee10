//! The stream transport's reply area ([`SpliceReply`]): replies are built in a buffer, except
//! the file data of an Rread, which `splice` moves from the page cache into a pipe and from the
//! pipe into the socket as page references, so the server copies none of it (a buffered Rread
//! copies every byte twice: file to buffer, buffer to socket).
//!
//! What is spliced is what a read at that moment returns, taken as references to page-cache
//! pages: a write to the file before the client has received them may show through, as with
//! any concurrent write. Where splicing cannot be used (no pipe with room for a whole reply,
//! a file system without `splice`), the data is read into the buffer with `pread` as before.
//! A reply whose data cannot go straight to the socket (another reply is being written first)
//! is drained from the pipe into the buffer and sent from there.

use crate::reply::{range_check, ReplyBuf, VecReply};
use crate::wire;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A pipe with room for `cap` bytes of file data at any file offset.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// A pipe that holds at least `cap` bytes from any file offset (one page more than `cap`
    /// spans), or None when the system does not allow one that large.
    fn new(cap: usize) -> Option<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return None;
        }
        // SAFETY: pipe2 returned two new descriptors that nothing else owns.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = cap.checked_add(2 * PAGE)?;
        // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        (got >= 0 && got as usize >= want).then_some(Pipe { r, w, cap })
    }

    /// Splices up to `len` bytes of `fd` from `offset` into the (empty) pipe; the count, short
    /// at the end of the file.
    fn fill(&self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let mut done = 0;
        let mut off = offset as libc::loff_t;
        while done < len {
            // SAFETY: `off` is a valid in/out offset; both descriptors are open.
            let n = unsafe {
                libc::splice(
                    fd.as_raw_fd(),
                    &mut off,
                    self.w.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - done,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match n {
                0 => break,
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => {}
                        // The pipe is full: a short read.
                        io::ErrorKind::WouldBlock if done > 0 => break,
                        _ if done > 0 => break,
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(done)
    }

    /// Reads exactly `dst.len()` bytes out of the pipe.
    fn drain(&self, dst: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            let rest = &mut dst[done..];
            // SAFETY: `rest` is writable for its length; the read end is open.
            let n = unsafe { libc::read(self.r.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if n == 0 || e.kind() != io::ErrorKind::Interrupted {
                return Err(if n == 0 {
                    io::ErrorKind::UnexpectedEof.into()
                } else {
                    e
                });
            }
        }
        Ok(())
    }

    /// Moves `len` bytes from the pipe into the socket `sock`, waiting while it is full.
    fn to_socket(&self, sock: RawFd, len: usize) -> io::Result<()> {
        push_all(sock, len, true, |done| {
            // SAFETY: both descriptors are open; no offsets are passed.
            unsafe {
                libc::splice(
                    self.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock,
                    std::ptr::null_mut(),
                    len - done,
                    libc::SPLICE_F_MOVE,
                )
            }
        })
        .map(|_| ())
    }
}

/// Pushes `len` bytes into the socket `sock` with `put(done)`, a send-like call that returns
/// how many of the remaining bytes it took (or -1 with errno), until all are in. On a full
/// socket buffer it waits if `block`, and otherwise returns early with the count so far.
pub(crate) fn push_all(
    sock: RawFd,
    len: usize,
    block: bool,
    mut put: impl FnMut(usize) -> isize,
) -> io::Result<usize> {
    let mut done = 0;
    while done < len {
        let n = put(done);
        if n > 0 {
            done += n as usize;
            continue;
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if !block => return Ok(done),
            // A socket in non-blocking mode: wait until it takes more.
            io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: sock,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll reads and writes the one pollfd passed to it.
                unsafe { libc::poll(&mut p, 1, -1) };
            }
            _ => return Err(e),
        }
    }
    Ok(done)
}

const PAGE: usize = 4096;
/// Reads asking for less than this are copied: for a few pages, one more system call costs
/// more than the copy saves.
const SPLICE_MIN: usize = 64 << 10;

/// A reply area whose Rread data may sit in a pipe instead of the buffer (see the module
/// documentation). One per thread, reused across requests.
pub(crate) struct SpliceReply {
    buf: VecReply,
    /// None: splicing is not used (no pipe could be made, or it failed).
    pipe: Option<Pipe>,
    /// Bytes `[offset, offset + len)` of the current reply are in the pipe.
    spliced: Option<(usize, usize)>,
}

impl SpliceReply {
    /// A reply area of `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> SpliceReply {
        SpliceReply {
            buf: VecReply::new(capacity),
            pipe: Pipe::new(capacity),
            spliced: None,
        }
    }

    /// A reply area of `capacity` bytes that never splices: for threads whose replies do not
    /// go to the socket directly, where splicing would only add system calls.
    pub(crate) fn plain(capacity: usize) -> SpliceReply {
        SpliceReply {
            buf: VecReply::new(capacity),
            pipe: None,
            spliced: None,
        }
    }

    /// The size of the area.
    pub(crate) fn len(&self) -> usize {
        self.buf.as_slice().len()
    }

    /// Sends the `len`-byte reply just built. When its data is in the pipe and `direct` says
    /// the caller may write to the socket now, `write_head` writes the bytes before the data
    /// (returning false if it did not write them all) and the data is spliced to `sock` after
    /// them; otherwise (or when `direct` answers None) the data is brought back into the
    /// buffer and `send` gets the whole reply. `direct` must leave the socket to this call
    /// when it answers Some, and gets the outcome through `done`.
    pub(crate) fn send(
        &mut self,
        len: usize,
        direct: impl FnOnce() -> Option<RawFd>,
        write_head: impl FnOnce(&[u8]) -> bool,
        done: impl FnOnce(io::Result<()>),
        send: impl FnOnce(&[u8]),
    ) {
        if let Some((off, n)) = self.spliced.take() {
            if off + n != len || len > self.len() {
                // The reply is not the Rread the data was read for (the request failed after
                // its read): the data goes with the pipe, and the reply is sent as built.
                self.pipe = Pipe::new(self.len());
            } else if let Some(sock) = direct() {
                let r = if write_head(&self.buf.as_slice()[..off]) {
                    self.pipe_ref().and_then(|p| p.to_socket(sock, n))
                } else {
                    Err(io::ErrorKind::WriteZero.into())
                };
                if r.is_err() {
                    // What is left in the pipe must never reach another reply.
                    self.pipe = None;
                }
                done(r);
                return;
            } else {
                let dst = &mut self.buf.as_mut_slice()[off..off + n];
                let drained = match &self.pipe {
                    Some(p) => p.drain(dst),
                    None => Err(io::ErrorKind::BrokenPipe.into()),
                };
                if drained.is_err() {
                    // The data is lost: the client gets an I/O error for its read, and the
                    // pipe is not reused.
                    self.pipe = None;
                    let tag = wire::peek_tag(self.buf.as_slice());
                    let mut b = Vec::with_capacity(wire::HEADER_LEN + 4);
                    wire::Rmessage::Lerror {
                        ecode: libc::EIO as u32,
                    }
                    .encode(tag, &mut b);
                    send(&b);
                    return;
                }
            }
        }
        send(&self.buf.as_slice()[..len]);
    }

    fn pipe_ref(&self) -> io::Result<&Pipe> {
        self.pipe
            .as_ref()
            .ok_or_else(|| io::ErrorKind::BrokenPipe.into())
    }
}

impl ReplyBuf for SpliceReply {
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn write_at(&mut self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.buf.write_at(offset, data)
    }

    fn read_from(
        &mut self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
    ) -> io::Result<usize> {
        let in_range = range_check(self.buf.capacity(), offset, len).is_ok();
        if let (Some(p), None, true) = (&self.pipe, self.spliced, in_range) {
            if (SPLICE_MIN..=p.cap).contains(&len) {
                match p.fill(fd, file_offset, len) {
                    Ok(n) => {
                        self.spliced = Some((offset, n));
                        return Ok(n);
                    }
                    // Not spliceable (EINVAL and the like): read it the plain way.
                    Err(e) if e.kind() != io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.buf.read_from(offset, len, fd, file_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    /// Sends the `len`-byte reply in `r` the buffered way; returns the bytes sent.
    fn buffered(r: &mut SpliceReply, len: usize) -> Vec<u8> {
        let mut sent = Vec::new();
        r.send(
            len,
            || None,
            |_| unreachable!(),
            |_| unreachable!(),
            |bytes| sent = bytes.to_vec(),
        );
        sent
    }

    fn file(tag: &str, data: &[u8]) -> (std::path::PathBuf, std::fs::File) {
        let p = std::env::temp_dir().join(format!("p9-splice-{tag}-{}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn data_goes_through_the_pipe_to_the_socket_or_back_into_the_buffer() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (p, f) = file("both", &data);
        let mut r = SpliceReply::new(1 << 17);
        assert!(
            r.pipe.is_some(),
            "a pipe of 128 KiB and some is allowed by default"
        );
        // Spliced straight to a socket, after the head.
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        r.write_at(0, b"HEAD").unwrap();
        assert_eq!(r.read_from(4, 70_000, f.as_fd(), 1000).unwrap(), 70_000);
        assert!(r.spliced.is_some());
        let mut outcome = None;
        r.send(
            70_004,
            || Some(a.as_raw_fd()),
            |head| (&a).write_all(head).is_ok(),
            |res| outcome = Some(res.is_ok()),
            |_| panic!("the data was to be spliced"),
        );
        assert_eq!(outcome, Some(true));
        let mut got = vec![0; 70_004];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert_eq!(&got[4..], &data[1000..71_000]);
        // Short at the end of the file, and brought back into the buffer when it cannot go
        // out directly.
        assert_eq!(
            r.read_from(7, SPLICE_MIN, f.as_fd(), 90_000).unwrap(),
            10_000
        );
        assert!(r.spliced.is_some());
        assert_eq!(&buffered(&mut r, 10_007)[7..], &data[90_000..]);
        // The pipe is empty again: the next reply holds only its own data.
        assert_eq!(
            r.read_from(7, SPLICE_MIN, f.as_fd(), 5).unwrap(),
            SPLICE_MIN
        );
        assert!(r.spliced.is_some());
        let sent = buffered(&mut r, 7 + SPLICE_MIN);
        assert_eq!(&sent[7..], &data[5..5 + SPLICE_MIN]);
        // A small read is copied, not spliced.
        assert_eq!(r.read_from(7, 5, f.as_fd(), 0).unwrap(), 5);
        assert!(r.spliced.is_none());
        assert_eq!(&buffered(&mut r, 12)[7..], &data[..5]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn without_a_pipe_data_is_read_into_the_buffer() {
        let (p, f) = file("plain", b"0123456789");
        let mut r = SpliceReply::plain(0);
        assert!(r.read_from(0, 4, f.as_fd(), 0).is_err(), "no room at all");
        r = SpliceReply::plain(16);
        assert_eq!(r.read_from(2, 8, f.as_fd(), 6).unwrap(), 4);
        let sent = buffered(&mut r, 6);
        assert_eq!(&sent[2..], b"6789");
        std::fs::remove_file(&p).unwrap();
    }
}
