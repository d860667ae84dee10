//! A small synchronous 9P2000.L client over any byte stream (unix or TCP socket), used by the
//! tests and the `p9-bench` benchmark. One request is outstanding at a time per client; run
//! several clients for concurrency.

use crate::wire::{self, Attr, DirEntry, Qid, Rmessage, StatFs, Tmessage, WalkNames};
use std::io::{self, Read, Write};
use thiserror::Error;

/// Client-side failures.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("9P connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("server sent an undecodable reply: {0}")]
    Decode(#[from] wire::Error),
    #[error("server answered with error {errno} ({})", io::Error::from_raw_os_error(*.errno as i32))]
    Remote { errno: u32 },
    #[error("server answered tag {got} to request tag {want}; the connection is out of sync")]
    TagMismatch { want: u16, got: u16 },
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<Rmessage<'static>>),
    #[error("server does not speak 9P2000.L (answered {0:?})")]
    Version(String),
}

impl ClientError {
    /// The errno of a remote error, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Remote { errno } => Some(*errno as i32),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A 9P2000.L client.
pub struct Client<S> {
    stream: S,
    msize: u32,
    tag: u16,
    next_fid: u32,
    out: Vec<u8>,
    inb: Vec<u8>,
    /// Read-ahead buffer: `rbuf[rpos..rend]` holds bytes received but not yet consumed.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
}

macro_rules! expect {
    ($r:expr, $p:pat => $v:expr) => {
        match $r {
            $p => Ok($v),
            other => Err(ClientError::Unexpected(Box::new(other))),
        }
    };
}

impl<S: Read + Write> Client<S> {
    /// Negotiates 9P2000.L with at most `msize`.
    pub fn new(stream: S, msize: u32) -> Result<Self> {
        let mut c = Client {
            stream,
            msize,
            tag: 0,
            next_fid: 1,
            out: Vec::new(),
            inb: Vec::new(),
            rbuf: vec![0; 1 << 16].into_boxed_slice(),
            rpos: 0,
            rend: 0,
        };
        let r = c.call_tag(
            wire::NOTAG,
            &Tmessage::Version {
                msize,
                version: b"9P2000.L",
            },
        )?;
        let (m, v) = expect!(r, Rmessage::Version { msize, version } => (msize, version))?;
        if *v != *b"9P2000.L" {
            return Err(ClientError::Version(String::from_utf8_lossy(&v).into()));
        }
        c.msize = m;
        Ok(c)
    }

    /// The negotiated msize.
    pub fn msize(&self) -> u32 {
        self.msize
    }

    /// A fresh fid number.
    pub fn alloc_fid(&mut self) -> u32 {
        let f = self.next_fid;
        self.next_fid = self.next_fid.wrapping_add(1);
        f
    }

    /// Sends raw request bytes and returns the raw reply bytes (for tests of malformed input).
    pub fn raw(&mut self, req: &[u8]) -> Result<Vec<u8>> {
        self.stream.write_all(req)?;
        self.read_reply()?;
        Ok(self.inb.clone())
    }

    /// Fills `dst` from the read-ahead buffer, refilling it (or reading large tails directly).
    fn fill(
        stream: &mut S,
        rb: &mut [u8],
        rpos: &mut usize,
        rend: &mut usize,
        dst: &mut [u8],
    ) -> io::Result<()> {
        let mut done = 0;
        while done < dst.len() {
            if *rpos == *rend {
                if dst.len() - done >= rb.len() {
                    stream.read_exact(&mut dst[done..])?;
                    return Ok(());
                }
                let n = stream.read(rb)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                *rpos = 0;
                *rend = n;
            }
            let n = (*rend - *rpos).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&rb[*rpos..*rpos + n]);
            *rpos += n;
            done += n;
        }
        Ok(())
    }

    fn read_reply(&mut self) -> Result<()> {
        let mut size = [0u8; 4];
        Self::fill(
            &mut self.stream,
            &mut self.rbuf,
            &mut self.rpos,
            &mut self.rend,
            &mut size,
        )?;
        let n = u32::from_le_bytes(size) as usize;
        if n < wire::HEADER_LEN {
            return Err(wire::Error::BadSize {
                size: n as u32,
                len: 4,
            }
            .into());
        }
        self.inb.clear();
        self.inb.extend_from_slice(&size);
        self.inb.resize(n, 0);
        Self::fill(
            &mut self.stream,
            &mut self.rbuf,
            &mut self.rpos,
            &mut self.rend,
            &mut self.inb[4..],
        )?;
        Ok(())
    }

    fn call_tag(&mut self, tag: u16, m: &Tmessage<'_>) -> Result<Rmessage<'static>> {
        self.out.clear();
        m.encode(tag, &mut self.out);
        self.stream.write_all(&self.out)?;
        self.read_reply()?;
        let (got, r) = Rmessage::decode(&self.inb)?;
        let r = r.into_owned();
        if got != tag {
            return Err(ClientError::TagMismatch { want: tag, got });
        }
        if let Rmessage::Lerror { ecode } = r {
            return Err(ClientError::Remote { errno: ecode });
        }
        Ok(r)
    }

    /// Sends one request and waits for its reply; Rlerror becomes [`ClientError::Remote`].
    pub fn call(&mut self, m: &Tmessage<'_>) -> Result<Rmessage<'static>> {
        self.tag = (self.tag + 1) % 0xfff0;
        self.call_tag(self.tag, m)
    }

    pub fn attach(&mut self, fid: u32, uname: &str, aname: &str, n_uname: u32) -> Result<Qid> {
        let r = self.call(&Tmessage::Attach {
            fid,
            afid: wire::NOFID,
            uname: uname.as_bytes(),
            aname: aname.as_bytes(),
            n_uname,
        })?;
        expect!(r, Rmessage::Attach { qid } => qid)
    }

    /// Walks `names` (at most 16) from `fid` to `newfid`; returns the qids walked.
    pub fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> Result<Vec<Qid>> {
        let b: Vec<&[u8]> = names.iter().map(|s| s.as_bytes()).collect();
        let names = WalkNames::new(&b).ok_or(ClientError::Decode(
            wire::Error::TooManyWalkNames(b.len() as u16),
        ))?;
        let r = self.call(&Tmessage::Walk { fid, newfid, names })?;
        expect!(r, Rmessage::Walk { qids } => qids.into_owned())
    }

    pub fn getattr(&mut self, fid: u32) -> Result<Attr> {
        let r = self.call(&Tmessage::Getattr {
            fid,
            mask: wire::GETATTR_BASIC,
        })?;
        expect!(r, Rmessage::Getattr(a) => a)
    }

    pub fn lopen(&mut self, fid: u32, flags: u32) -> Result<Qid> {
        let r = self.call(&Tmessage::Lopen { fid, flags })?;
        expect!(r, Rmessage::Lopen { qid, .. } => qid)
    }

    pub fn lcreate(&mut self, fid: u32, name: &str, flags: u32, mode: u32) -> Result<Qid> {
        let r = self.call(&Tmessage::Lcreate {
            fid,
            name: name.as_bytes(),
            flags,
            mode,
            gid: 0,
        })?;
        expect!(r, Rmessage::Lcreate { qid, .. } => qid)
    }

    pub fn read(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<u8>> {
        let r = self.call(&Tmessage::Read { fid, offset, count })?;
        expect!(r, Rmessage::Read { data } => data.into_owned())
    }

    pub fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Result<u32> {
        let r = self.call(&Tmessage::Write { fid, offset, data })?;
        expect!(r, Rmessage::Write { count } => count)
    }

    pub fn readdir(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<DirEntry>> {
        let r = self.call(&Tmessage::Readdir { fid, offset, count })?;
        let data = expect!(r, Rmessage::Readdir { data } => data)?;
        Ok(wire::parse_dirents(&data)?)
    }

    /// Reads a whole opened directory with msize-sized Treaddir requests.
    pub fn readdir_all(&mut self, fid: u32) -> Result<Vec<DirEntry>> {
        let mut all = Vec::new();
        let mut off = 0;
        // Linux asks for msize - P9_READDIRHDRSZ (24); some servers insist on it.
        let count = self.msize.saturating_sub(24);
        loop {
            let e = self.readdir(fid, off, count)?;
            match e.last() {
                None => return Ok(all),
                Some(l) => off = l.offset,
            }
            all.extend(e);
        }
    }

    pub fn readlink(&mut self, fid: u32) -> Result<Vec<u8>> {
        let r = self.call(&Tmessage::Readlink { fid })?;
        expect!(r, Rmessage::Readlink { target } => target.into_owned())
    }

    pub fn statfs(&mut self, fid: u32) -> Result<StatFs> {
        let r = self.call(&Tmessage::Statfs { fid })?;
        expect!(r, Rmessage::Statfs(s) => s)
    }

    pub fn mkdir(&mut self, dfid: u32, name: &str, mode: u32) -> Result<Qid> {
        let r = self.call(&Tmessage::Mkdir {
            dfid,
            name: name.as_bytes(),
            mode,
            gid: 0,
        })?;
        expect!(r, Rmessage::Mkdir { qid } => qid)
    }

    pub fn unlinkat(&mut self, dirfid: u32, name: &str, flags: u32) -> Result<()> {
        let r = self.call(&Tmessage::Unlinkat {
            dirfid,
            name: name.as_bytes(),
            flags,
        })?;
        expect!(r, Rmessage::Unlinkat => ())
    }

    pub fn clunk(&mut self, fid: u32) -> Result<()> {
        let r = self.call(&Tmessage::Clunk { fid })?;
        expect!(r, Rmessage::Clunk => ())
    }
}
