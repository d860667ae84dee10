//! 9P2000.L wire format: the message type numbers, the request (`T`) and reply (`R`) messages a
//! Linux client and this server exchange, and their little-endian encoding and decoding.
//!
//! Decoding never panics: truncated messages, bad sizes, oversized counts and strings that run
//! past the end of the message all come back as [`Error`]. Requests borrow their strings and
//! write payloads from the input buffer so the server's hot path does not allocate; replies are
//! owned because only clients (tests, the benchmark) decode them.

use thiserror::Error;

/// Size of the common header: size[4] type[1] tag[2].
pub const HEADER_LEN: usize = 7;
/// Largest number of names in one Twalk (P9_MAXWELEM).
pub const MAX_WALK_NAMES: usize = 16;
/// The tag used for Tversion.
pub const NOTAG: u16 = 0xffff;
/// The fid value meaning "no fid" (e.g. afid in Tattach).
pub const NOFID: u32 = 0xffff_ffff;
/// Size of an encoded qid.
pub const QID_LEN: usize = 13;
/// Header of Rread/Rreaddir: size[4] type[1] tag[2] count[4].
pub const RREAD_HEADER_LEN: usize = HEADER_LEN + 4;

/// Errors produced while decoding a message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("message truncated: needed {needed} bytes at offset {offset}, message has {len}; send complete messages")]
    Truncated {
        offset: usize,
        needed: usize,
        len: usize,
    },
    #[error("message size field {size} does not match the {len} bytes supplied; the size field must cover the whole message")]
    BadSize { size: u32, len: usize },
    #[error("unknown message type {0}; only 9P2000.L messages are understood")]
    UnknownType(u8),
    #[error("Twalk with {0} names; at most 16 names may be walked at once")]
    TooManyWalkNames(u16),
    #[error("count {count} exceeds the {available} bytes present in the message")]
    BadCount { count: u32, available: usize },
    #[error("string is not valid UTF-8; 9P strings must be UTF-8")]
    BadString,
}

/// Message type numbers (9P2000 and the 9P2000.L extensions).
pub mod msg {
    pub const TLERROR: u8 = 6;
    pub const RLERROR: u8 = 7;
    pub const TSTATFS: u8 = 8;
    pub const RSTATFS: u8 = 9;
    pub const TLOPEN: u8 = 12;
    pub const RLOPEN: u8 = 13;
    pub const TLCREATE: u8 = 14;
    pub const RLCREATE: u8 = 15;
    pub const TSYMLINK: u8 = 16;
    pub const RSYMLINK: u8 = 17;
    pub const TMKNOD: u8 = 18;
    pub const RMKNOD: u8 = 19;
    pub const TRENAME: u8 = 20;
    pub const RRENAME: u8 = 21;
    pub const TREADLINK: u8 = 22;
    pub const RREADLINK: u8 = 23;
    pub const TGETATTR: u8 = 24;
    pub const RGETATTR: u8 = 25;
    pub const TSETATTR: u8 = 26;
    pub const RSETATTR: u8 = 27;
    pub const TXATTRWALK: u8 = 30;
    pub const RXATTRWALK: u8 = 31;
    pub const TXATTRCREATE: u8 = 32;
    pub const RXATTRCREATE: u8 = 33;
    pub const TREADDIR: u8 = 40;
    pub const RREADDIR: u8 = 41;
    pub const TFSYNC: u8 = 50;
    pub const RFSYNC: u8 = 51;
    pub const TLOCK: u8 = 52;
    pub const RLOCK: u8 = 53;
    pub const TGETLOCK: u8 = 54;
    pub const RGETLOCK: u8 = 55;
    pub const TLINK: u8 = 70;
    pub const RLINK: u8 = 71;
    pub const TMKDIR: u8 = 72;
    pub const RMKDIR: u8 = 73;
    pub const TRENAMEAT: u8 = 74;
    pub const RRENAMEAT: u8 = 75;
    pub const TUNLINKAT: u8 = 76;
    pub const RUNLINKAT: u8 = 77;
    pub const TVERSION: u8 = 100;
    pub const RVERSION: u8 = 101;
    pub const TAUTH: u8 = 102;
    pub const RAUTH: u8 = 103;
    pub const TATTACH: u8 = 104;
    pub const RATTACH: u8 = 105;
    pub const TFLUSH: u8 = 108;
    pub const RFLUSH: u8 = 109;
    pub const TWALK: u8 = 110;
    pub const RWALK: u8 = 111;
    pub const TREAD: u8 = 116;
    pub const RREAD: u8 = 117;
    pub const TWRITE: u8 = 118;
    pub const RWRITE: u8 = 119;
    pub const TCLUNK: u8 = 120;
    pub const RCLUNK: u8 = 121;
    pub const TREMOVE: u8 = 122;
    pub const RREMOVE: u8 = 123;
}

/// Human-readable name of a message type, for statistics.
pub fn type_name(t: u8) -> &'static str {
    use msg::*;
    match t {
        TSTATFS => "statfs",
        TLOPEN => "lopen",
        TLCREATE => "lcreate",
        TSYMLINK => "symlink",
        TMKNOD => "mknod",
        TRENAME => "rename",
        TREADLINK => "readlink",
        TGETATTR => "getattr",
        TSETATTR => "setattr",
        TXATTRWALK => "xattrwalk",
        TXATTRCREATE => "xattrcreate",
        TREADDIR => "readdir",
        TFSYNC => "fsync",
        TLOCK => "lock",
        TGETLOCK => "getlock",
        TLINK => "link",
        TMKDIR => "mkdir",
        TRENAMEAT => "renameat",
        TUNLINKAT => "unlinkat",
        TVERSION => "version",
        TAUTH => "auth",
        TATTACH => "attach",
        TFLUSH => "flush",
        TWALK => "walk",
        TREAD => "read",
        TWRITE => "write",
        TCLUNK => "clunk",
        TREMOVE => "remove",
        _ => "other",
    }
}

/// Qid type bits.
pub const QTDIR: u8 = 0x80;
pub const QTSYMLINK: u8 = 0x02;
pub const QTFILE: u8 = 0x00;

/// A server's unique identification of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Qid {
    pub ty: u8,
    pub version: u32,
    pub path: u64,
}

/// Fields of Tsetattr after the fid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub valid: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime_sec: u64,
    pub atime_nsec: u64,
    pub mtime_sec: u64,
    pub mtime_nsec: u64,
}

/// Tsetattr valid bits.
pub mod setattr {
    pub const MODE: u32 = 0x1;
    pub const UID: u32 = 0x2;
    pub const GID: u32 = 0x4;
    pub const SIZE: u32 = 0x8;
    pub const ATIME: u32 = 0x10;
    pub const MTIME: u32 = 0x20;
    pub const CTIME: u32 = 0x40;
    pub const ATIME_SET: u32 = 0x80;
    pub const MTIME_SET: u32 = 0x100;
}

/// Rgetattr body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub valid: u64,
    pub qid: Qid,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime_sec: u64,
    pub atime_nsec: u64,
    pub mtime_sec: u64,
    pub mtime_nsec: u64,
    pub ctime_sec: u64,
    pub ctime_nsec: u64,
    pub btime_sec: u64,
    pub btime_nsec: u64,
    pub gen: u64,
    pub data_version: u64,
}

/// The basic Tgetattr mask (everything but btime, gen, data_version).
pub const GETATTR_BASIC: u64 = 0x0000_07ff;
/// Every Tgetattr field.
pub const GETATTR_ALL: u64 = 0x0000_3fff;

/// Rstatfs body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub ty: u32,
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub fsid: u64,
    pub namelen: u32,
}

/// Tlock / Rgetlock / Tgetlock body (proc_id and client id identify the lock owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lock<'a> {
    pub ty: u8,
    pub flags: u32,
    pub start: u64,
    pub length: u64,
    pub proc_id: u32,
    pub client_id: &'a [u8],
}

/// A fixed array of walk names (no allocation while decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalkNames<'a> {
    names: [&'a [u8]; MAX_WALK_NAMES],
    len: usize,
}

impl<'a> WalkNames<'a> {
    /// Builds a name list; returns None for more than 16 names.
    pub fn new(names: &[&'a [u8]]) -> Option<Self> {
        if names.len() > MAX_WALK_NAMES {
            return None;
        }
        let mut w = WalkNames::default();
        w.names[..names.len()].copy_from_slice(names);
        w.len = names.len();
        Some(w)
    }
    pub fn as_slice(&self) -> &[&'a [u8]] {
        &self.names[..self.len]
    }
}

/// A request message.
// Twalk's inline name array makes it the largest variant; keeping it inline (rather than boxed)
// is what lets decoding stay allocation-free, and requests live on the stack only briefly.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tmessage<'a> {
    Version {
        msize: u32,
        version: &'a [u8],
    },
    Auth {
        afid: u32,
        uname: &'a [u8],
        aname: &'a [u8],
        n_uname: u32,
    },
    Attach {
        fid: u32,
        afid: u32,
        uname: &'a [u8],
        aname: &'a [u8],
        n_uname: u32,
    },
    Flush {
        oldtag: u16,
    },
    Walk {
        fid: u32,
        newfid: u32,
        names: WalkNames<'a>,
    },
    Read {
        fid: u32,
        offset: u64,
        count: u32,
    },
    Write {
        fid: u32,
        offset: u64,
        data: &'a [u8],
    },
    Clunk {
        fid: u32,
    },
    Remove {
        fid: u32,
    },
    Statfs {
        fid: u32,
    },
    Lopen {
        fid: u32,
        flags: u32,
    },
    Lcreate {
        fid: u32,
        name: &'a [u8],
        flags: u32,
        mode: u32,
        gid: u32,
    },
    Symlink {
        fid: u32,
        name: &'a [u8],
        target: &'a [u8],
        gid: u32,
    },
    Mknod {
        dfid: u32,
        name: &'a [u8],
        mode: u32,
        major: u32,
        minor: u32,
        gid: u32,
    },
    Rename {
        fid: u32,
        dfid: u32,
        name: &'a [u8],
    },
    Readlink {
        fid: u32,
    },
    Getattr {
        fid: u32,
        mask: u64,
    },
    Setattr {
        fid: u32,
        attr: SetAttr,
    },
    Xattrwalk {
        fid: u32,
        newfid: u32,
        name: &'a [u8],
    },
    Xattrcreate {
        fid: u32,
        name: &'a [u8],
        size: u64,
        flags: u32,
    },
    Readdir {
        fid: u32,
        offset: u64,
        count: u32,
    },
    Fsync {
        fid: u32,
        datasync: u32,
    },
    Lock {
        fid: u32,
        lock: Lock<'a>,
    },
    Getlock {
        fid: u32,
        lock: Lock<'a>,
    },
    Link {
        dfid: u32,
        fid: u32,
        name: &'a [u8],
    },
    Mkdir {
        dfid: u32,
        name: &'a [u8],
        mode: u32,
        gid: u32,
    },
    Renameat {
        olddirfid: u32,
        oldname: &'a [u8],
        newdirfid: u32,
        newname: &'a [u8],
    },
    Unlinkat {
        dirfid: u32,
        name: &'a [u8],
        flags: u32,
    },
}

/// One Rreaddir entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub qid: Qid,
    pub offset: u64,
    pub ty: u8,
    pub name: Vec<u8>,
}

/// A reply message (owned; decoded by clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rmessage {
    Lerror {
        ecode: u32,
    },
    Version {
        msize: u32,
        version: Vec<u8>,
    },
    Attach {
        qid: Qid,
    },
    Flush,
    Walk {
        qids: Vec<Qid>,
    },
    Read {
        data: Vec<u8>,
    },
    Write {
        count: u32,
    },
    Clunk,
    Remove,
    Statfs(StatFs),
    Lopen {
        qid: Qid,
        iounit: u32,
    },
    Lcreate {
        qid: Qid,
        iounit: u32,
    },
    Symlink {
        qid: Qid,
    },
    Mknod {
        qid: Qid,
    },
    Rename,
    Readlink {
        target: Vec<u8>,
    },
    Getattr(Attr),
    Setattr,
    Xattrwalk {
        size: u64,
    },
    Xattrcreate,
    Readdir {
        data: Vec<u8>,
    },
    Fsync,
    Lock {
        status: u8,
    },
    Getlock {
        ty: u8,
        start: u64,
        length: u64,
        proc_id: u32,
        client_id: Vec<u8>,
    },
    Link,
    Mkdir {
        qid: Qid,
    },
    Renameat,
    Unlinkat,
}

/// Little-endian reader over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.remaining() < n {
            return Err(Error::Truncated {
                offset: self.pos,
                needed: n,
                len: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A 9P string: len[2] followed by that many bytes.
    pub fn str(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }
    pub fn qid(&mut self) -> Result<Qid, Error> {
        Ok(Qid {
            ty: self.u8()?,
            version: self.u32()?,
            path: self.u64()?,
        })
    }
    fn lock(&mut self, with_flags: bool) -> Result<Lock<'a>, Error> {
        let ty = self.u8()?;
        let flags = if with_flags { self.u32()? } else { 0 };
        Ok(Lock {
            ty,
            flags,
            start: self.u64()?,
            length: self.u64()?,
            proc_id: self.u32()?,
            client_id: self.str()?,
        })
    }
}

/// Little-endian writer appending to a Vec.
pub struct Writer<'a> {
    pub buf: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Writes a 9P string, truncating at 65535 bytes.
    pub fn str(&mut self, s: &[u8]) -> &mut Self {
        let n = s.len().min(u16::MAX as usize);
        self.u16(n as u16);
        self.buf.extend_from_slice(&s[..n]);
        self
    }
    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(s);
        self
    }
    pub fn qid(&mut self, q: &Qid) -> &mut Self {
        self.u8(q.ty).u32(q.version).u64(q.path)
    }
    fn lock(&mut self, l: &Lock<'_>, with_flags: bool) -> &mut Self {
        self.u8(l.ty);
        if with_flags {
            self.u32(l.flags);
        }
        self.u64(l.start)
            .u64(l.length)
            .u32(l.proc_id)
            .str(l.client_id)
    }
}

/// Appends a header with a placeholder size; returns the start offset for [`finish`].
fn start(out: &mut Vec<u8>, ty: u8, tag: u16) -> usize {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, ty]);
    out.extend_from_slice(&tag.to_le_bytes());
    at
}

/// Patches the size field of the message that starts at `at`.
fn finish(out: &mut [u8], at: usize) {
    let size = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&size.to_le_bytes());
}

/// Splits a complete message into (type, tag, body), checking the size field.
/// Bytes after `size` are ignored (transports may hand over larger buffers).
pub fn split_header(buf: &[u8]) -> Result<(u8, u16, &[u8]), Error> {
    if buf.len() < HEADER_LEN {
        return Err(Error::Truncated {
            offset: 0,
            needed: HEADER_LEN,
            len: buf.len(),
        });
    }
    let size = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if (size as usize) < HEADER_LEN || size as usize > buf.len() {
        return Err(Error::BadSize {
            size,
            len: buf.len(),
        });
    }
    let tag = u16::from_le_bytes([buf[5], buf[6]]);
    Ok((buf[4], tag, &buf[HEADER_LEN..size as usize]))
}

/// Reads the tag of a message if its header is present (used to answer malformed requests).
pub fn peek_tag(buf: &[u8]) -> u16 {
    if buf.len() >= HEADER_LEN {
        u16::from_le_bytes([buf[5], buf[6]])
    } else {
        NOTAG
    }
}

impl<'a> Tmessage<'a> {
    /// The T message type number.
    pub fn msg_type(&self) -> u8 {
        use msg::*;
        match self {
            Tmessage::Version { .. } => TVERSION,
            Tmessage::Auth { .. } => TAUTH,
            Tmessage::Attach { .. } => TATTACH,
            Tmessage::Flush { .. } => TFLUSH,
            Tmessage::Walk { .. } => TWALK,
            Tmessage::Read { .. } => TREAD,
            Tmessage::Write { .. } => TWRITE,
            Tmessage::Clunk { .. } => TCLUNK,
            Tmessage::Remove { .. } => TREMOVE,
            Tmessage::Statfs { .. } => TSTATFS,
            Tmessage::Lopen { .. } => TLOPEN,
            Tmessage::Lcreate { .. } => TLCREATE,
            Tmessage::Symlink { .. } => TSYMLINK,
            Tmessage::Mknod { .. } => TMKNOD,
            Tmessage::Rename { .. } => TRENAME,
            Tmessage::Readlink { .. } => TREADLINK,
            Tmessage::Getattr { .. } => TGETATTR,
            Tmessage::Setattr { .. } => TSETATTR,
            Tmessage::Xattrwalk { .. } => TXATTRWALK,
            Tmessage::Xattrcreate { .. } => TXATTRCREATE,
            Tmessage::Readdir { .. } => TREADDIR,
            Tmessage::Fsync { .. } => TFSYNC,
            Tmessage::Lock { .. } => TLOCK,
            Tmessage::Getlock { .. } => TGETLOCK,
            Tmessage::Link { .. } => TLINK,
            Tmessage::Mkdir { .. } => TMKDIR,
            Tmessage::Renameat { .. } => TRENAMEAT,
            Tmessage::Unlinkat { .. } => TUNLINKAT,
        }
    }

    /// Decodes a complete request; returns its tag and the message.
    pub fn decode(buf: &'a [u8]) -> Result<(u16, Tmessage<'a>), Error> {
        use msg::*;
        let (ty, tag, body) = split_header(buf)?;
        let mut r = Reader::new(body);
        let m = match ty {
            TVERSION => Tmessage::Version {
                msize: r.u32()?,
                version: r.str()?,
            },
            TAUTH => Tmessage::Auth {
                afid: r.u32()?,
                uname: r.str()?,
                aname: r.str()?,
                n_uname: r.u32()?,
            },
            TATTACH => Tmessage::Attach {
                fid: r.u32()?,
                afid: r.u32()?,
                uname: r.str()?,
                aname: r.str()?,
                n_uname: r.u32()?,
            },
            TFLUSH => Tmessage::Flush { oldtag: r.u16()? },
            TWALK => {
                let fid = r.u32()?;
                let newfid = r.u32()?;
                let n = r.u16()?;
                if n as usize > MAX_WALK_NAMES {
                    return Err(Error::TooManyWalkNames(n));
                }
                let mut names = WalkNames {
                    len: n as usize,
                    ..Default::default()
                };
                for slot in names.names.iter_mut().take(n as usize) {
                    *slot = r.str()?;
                }
                Tmessage::Walk { fid, newfid, names }
            }
            TREAD => Tmessage::Read {
                fid: r.u32()?,
                offset: r.u64()?,
                count: r.u32()?,
            },
            TWRITE => {
                let fid = r.u32()?;
                let offset = r.u64()?;
                let count = r.u32()?;
                if count as usize > r.remaining() {
                    return Err(Error::BadCount {
                        count,
                        available: r.remaining(),
                    });
                }
                Tmessage::Write {
                    fid,
                    offset,
                    data: r.bytes(count as usize)?,
                }
            }
            TCLUNK => Tmessage::Clunk { fid: r.u32()? },
            TREMOVE => Tmessage::Remove { fid: r.u32()? },
            TSTATFS => Tmessage::Statfs { fid: r.u32()? },
            TLOPEN => Tmessage::Lopen {
                fid: r.u32()?,
                flags: r.u32()?,
            },
            TLCREATE => Tmessage::Lcreate {
                fid: r.u32()?,
                name: r.str()?,
                flags: r.u32()?,
                mode: r.u32()?,
                gid: r.u32()?,
            },
            TSYMLINK => Tmessage::Symlink {
                fid: r.u32()?,
                name: r.str()?,
                target: r.str()?,
                gid: r.u32()?,
            },
            TMKNOD => Tmessage::Mknod {
                dfid: r.u32()?,
                name: r.str()?,
                mode: r.u32()?,
                major: r.u32()?,
                minor: r.u32()?,
                gid: r.u32()?,
            },
            TRENAME => Tmessage::Rename {
                fid: r.u32()?,
                dfid: r.u32()?,
                name: r.str()?,
            },
            TREADLINK => Tmessage::Readlink { fid: r.u32()? },
            TGETATTR => Tmessage::Getattr {
                fid: r.u32()?,
                mask: r.u64()?,
            },
            TSETATTR => Tmessage::Setattr {
                fid: r.u32()?,
                attr: SetAttr {
                    valid: r.u32()?,
                    mode: r.u32()?,
                    uid: r.u32()?,
                    gid: r.u32()?,
                    size: r.u64()?,
                    atime_sec: r.u64()?,
                    atime_nsec: r.u64()?,
                    mtime_sec: r.u64()?,
                    mtime_nsec: r.u64()?,
                },
            },
            TXATTRWALK => Tmessage::Xattrwalk {
                fid: r.u32()?,
                newfid: r.u32()?,
                name: r.str()?,
            },
            TXATTRCREATE => Tmessage::Xattrcreate {
                fid: r.u32()?,
                name: r.str()?,
                size: r.u64()?,
                flags: r.u32()?,
            },
            TREADDIR => Tmessage::Readdir {
                fid: r.u32()?,
                offset: r.u64()?,
                count: r.u32()?,
            },
            TFSYNC => Tmessage::Fsync {
                fid: r.u32()?,
                datasync: r.u32()?,
            },
            TLOCK => Tmessage::Lock {
                fid: r.u32()?,
                lock: r.lock(true)?,
            },
            TGETLOCK => Tmessage::Getlock {
                fid: r.u32()?,
                lock: r.lock(false)?,
            },
            TLINK => Tmessage::Link {
                dfid: r.u32()?,
                fid: r.u32()?,
                name: r.str()?,
            },
            TMKDIR => Tmessage::Mkdir {
                dfid: r.u32()?,
                name: r.str()?,
                mode: r.u32()?,
                gid: r.u32()?,
            },
            TRENAMEAT => Tmessage::Renameat {
                olddirfid: r.u32()?,
                oldname: r.str()?,
                newdirfid: r.u32()?,
                newname: r.str()?,
            },
            TUNLINKAT => Tmessage::Unlinkat {
                dirfid: r.u32()?,
                name: r.str()?,
                flags: r.u32()?,
            },
            other => return Err(Error::UnknownType(other)),
        };
        Ok((tag, m))
    }

    /// Appends the encoded request to `out`.
    pub fn encode(&self, tag: u16, out: &mut Vec<u8>) {
        let at = start(out, self.msg_type(), tag);
        let mut w = Writer { buf: out };
        match self {
            Tmessage::Version { msize, version } => {
                w.u32(*msize).str(version);
            }
            Tmessage::Auth {
                afid,
                uname,
                aname,
                n_uname,
            } => {
                w.u32(*afid).str(uname).str(aname).u32(*n_uname);
            }
            Tmessage::Attach {
                fid,
                afid,
                uname,
                aname,
                n_uname,
            } => {
                w.u32(*fid).u32(*afid).str(uname).str(aname).u32(*n_uname);
            }
            Tmessage::Flush { oldtag } => {
                w.u16(*oldtag);
            }
            Tmessage::Walk { fid, newfid, names } => {
                w.u32(*fid).u32(*newfid).u16(names.len as u16);
                for n in names.as_slice() {
                    w.str(n);
                }
            }
            Tmessage::Read { fid, offset, count } | Tmessage::Readdir { fid, offset, count } => {
                w.u32(*fid).u64(*offset).u32(*count);
            }
            Tmessage::Write { fid, offset, data } => {
                w.u32(*fid).u64(*offset).u32(data.len() as u32).bytes(data);
            }
            Tmessage::Clunk { fid }
            | Tmessage::Remove { fid }
            | Tmessage::Statfs { fid }
            | Tmessage::Readlink { fid } => {
                w.u32(*fid);
            }
            Tmessage::Lopen { fid, flags } => {
                w.u32(*fid).u32(*flags);
            }
            Tmessage::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid,
            } => {
                w.u32(*fid).str(name).u32(*flags).u32(*mode).u32(*gid);
            }
            Tmessage::Symlink {
                fid,
                name,
                target,
                gid,
            } => {
                w.u32(*fid).str(name).str(target).u32(*gid);
            }
            Tmessage::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                gid,
            } => {
                w.u32(*dfid)
                    .str(name)
                    .u32(*mode)
                    .u32(*major)
                    .u32(*minor)
                    .u32(*gid);
            }
            Tmessage::Rename { fid, dfid, name } => {
                w.u32(*fid).u32(*dfid).str(name);
            }
            Tmessage::Getattr { fid, mask } => {
                w.u32(*fid).u64(*mask);
            }
            Tmessage::Setattr { fid, attr: a } => {
                w.u32(*fid)
                    .u32(a.valid)
                    .u32(a.mode)
                    .u32(a.uid)
                    .u32(a.gid)
                    .u64(a.size);
                w.u64(a.atime_sec)
                    .u64(a.atime_nsec)
                    .u64(a.mtime_sec)
                    .u64(a.mtime_nsec);
            }
            Tmessage::Xattrwalk { fid, newfid, name } => {
                w.u32(*fid).u32(*newfid).str(name);
            }
            Tmessage::Xattrcreate {
                fid,
                name,
                size,
                flags,
            } => {
                w.u32(*fid).str(name).u64(*size).u32(*flags);
            }
            Tmessage::Fsync { fid, datasync } => {
                w.u32(*fid).u32(*datasync);
            }
            Tmessage::Lock { fid, lock } => {
                w.u32(*fid).lock(lock, true);
            }
            Tmessage::Getlock { fid, lock } => {
                w.u32(*fid).lock(lock, false);
            }
            Tmessage::Link { dfid, fid, name } => {
                w.u32(*dfid).u32(*fid).str(name);
            }
            Tmessage::Mkdir {
                dfid,
                name,
                mode,
                gid,
            } => {
                w.u32(*dfid).str(name).u32(*mode).u32(*gid);
            }
            Tmessage::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => {
                w.u32(*olddirfid).str(oldname).u32(*newdirfid).str(newname);
            }
            Tmessage::Unlinkat {
                dirfid,
                name,
                flags,
            } => {
                w.u32(*dirfid).str(name).u32(*flags);
            }
        }
        finish(out, at);
    }
}

/// Encodes the Rgetattr body.
pub fn write_attr(w: &mut Writer<'_>, a: &Attr) {
    w.u64(a.valid).qid(&a.qid).u32(a.mode).u32(a.uid).u32(a.gid);
    w.u64(a.nlink)
        .u64(a.rdev)
        .u64(a.size)
        .u64(a.blksize)
        .u64(a.blocks);
    w.u64(a.atime_sec)
        .u64(a.atime_nsec)
        .u64(a.mtime_sec)
        .u64(a.mtime_nsec);
    w.u64(a.ctime_sec)
        .u64(a.ctime_nsec)
        .u64(a.btime_sec)
        .u64(a.btime_nsec);
    w.u64(a.gen).u64(a.data_version);
}

/// Appends one Rreaddir entry.
pub fn write_dirent(out: &mut Vec<u8>, qid: &Qid, offset: u64, ty: u8, name: &[u8]) {
    Writer { buf: out }.qid(qid).u64(offset).u8(ty).str(name);
}

/// Encoded size of one Rreaddir entry with a name of `name_len` bytes.
pub const fn dirent_len(name_len: usize) -> usize {
    QID_LEN + 8 + 1 + 2 + name_len
}

/// Parses the data of an Rreaddir into entries.
pub fn parse_dirents(data: &[u8]) -> Result<Vec<DirEntry>, Error> {
    let mut r = Reader::new(data);
    let mut v = Vec::new();
    while r.remaining() > 0 {
        v.push(DirEntry {
            qid: r.qid()?,
            offset: r.u64()?,
            ty: r.u8()?,
            name: r.str()?.to_vec(),
        });
    }
    Ok(v)
}

impl Rmessage {
    /// The R message type number.
    pub fn msg_type(&self) -> u8 {
        use msg::*;
        match self {
            Rmessage::Lerror { .. } => RLERROR,
            Rmessage::Version { .. } => RVERSION,
            Rmessage::Attach { .. } => RATTACH,
            Rmessage::Flush => RFLUSH,
            Rmessage::Walk { .. } => RWALK,
            Rmessage::Read { .. } => RREAD,
            Rmessage::Write { .. } => RWRITE,
            Rmessage::Clunk => RCLUNK,
            Rmessage::Remove => RREMOVE,
            Rmessage::Statfs(_) => RSTATFS,
            Rmessage::Lopen { .. } => RLOPEN,
            Rmessage::Lcreate { .. } => RLCREATE,
            Rmessage::Symlink { .. } => RSYMLINK,
            Rmessage::Mknod { .. } => RMKNOD,
            Rmessage::Rename => RRENAME,
            Rmessage::Readlink { .. } => RREADLINK,
            Rmessage::Getattr(_) => RGETATTR,
            Rmessage::Setattr => RSETATTR,
            Rmessage::Xattrwalk { .. } => RXATTRWALK,
            Rmessage::Xattrcreate => RXATTRCREATE,
            Rmessage::Readdir { .. } => RREADDIR,
            Rmessage::Fsync => RFSYNC,
            Rmessage::Lock { .. } => RLOCK,
            Rmessage::Getlock { .. } => RGETLOCK,
            Rmessage::Link => RLINK,
            Rmessage::Mkdir { .. } => RMKDIR,
            Rmessage::Renameat => RRENAMEAT,
            Rmessage::Unlinkat => RUNLINKAT,
        }
    }

    /// Appends the encoded reply to `out`.
    pub fn encode(&self, tag: u16, out: &mut Vec<u8>) {
        let at = start(out, self.msg_type(), tag);
        let mut w = Writer { buf: out };
        match self {
            Rmessage::Lerror { ecode } => {
                w.u32(*ecode);
            }
            Rmessage::Version { msize, version } => {
                w.u32(*msize).str(version);
            }
            Rmessage::Attach { qid }
            | Rmessage::Symlink { qid }
            | Rmessage::Mknod { qid }
            | Rmessage::Mkdir { qid } => {
                w.qid(qid);
            }
            Rmessage::Walk { qids } => {
                w.u16(qids.len() as u16);
                for q in qids {
                    w.qid(q);
                }
            }
            Rmessage::Read { data } | Rmessage::Readdir { data } => {
                w.u32(data.len() as u32).bytes(data);
            }
            Rmessage::Write { count } => {
                w.u32(*count);
            }
            Rmessage::Statfs(s) => {
                w.u32(s.ty)
                    .u32(s.bsize)
                    .u64(s.blocks)
                    .u64(s.bfree)
                    .u64(s.bavail);
                w.u64(s.files).u64(s.ffree).u64(s.fsid).u32(s.namelen);
            }
            Rmessage::Lopen { qid, iounit } | Rmessage::Lcreate { qid, iounit } => {
                w.qid(qid).u32(*iounit);
            }
            Rmessage::Readlink { target } => {
                w.str(target);
            }
            Rmessage::Getattr(a) => write_attr(&mut w, a),
            Rmessage::Xattrwalk { size } => {
                w.u64(*size);
            }
            Rmessage::Lock { status } => {
                w.u8(*status);
            }
            Rmessage::Getlock {
                ty,
                start,
                length,
                proc_id,
                client_id,
            } => {
                w.u8(*ty)
                    .u64(*start)
                    .u64(*length)
                    .u32(*proc_id)
                    .str(client_id);
            }
            Rmessage::Flush
            | Rmessage::Clunk
            | Rmessage::Remove
            | Rmessage::Rename
            | Rmessage::Setattr
            | Rmessage::Xattrcreate
            | Rmessage::Fsync
            | Rmessage::Link
            | Rmessage::Renameat
            | Rmessage::Unlinkat => {}
        }
        finish(out, at);
    }

    /// Decodes a complete reply; returns its tag and the message.
    pub fn decode(buf: &[u8]) -> Result<(u16, Rmessage), Error> {
        use msg::*;
        let (ty, tag, body) = split_header(buf)?;
        let mut r = Reader::new(body);
        let m = match ty {
            RLERROR => Rmessage::Lerror { ecode: r.u32()? },
            RVERSION => Rmessage::Version {
                msize: r.u32()?,
                version: r.str()?.to_vec(),
            },
            RATTACH => Rmessage::Attach { qid: r.qid()? },
            RFLUSH => Rmessage::Flush,
            RWALK => {
                let n = r.u16()?;
                if n as usize > MAX_WALK_NAMES {
                    return Err(Error::TooManyWalkNames(n));
                }
                let mut qids = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    qids.push(r.qid()?);
                }
                Rmessage::Walk { qids }
            }
            RREAD | RREADDIR => {
                let count = r.u32()?;
                if count as usize > r.remaining() {
                    return Err(Error::BadCount {
                        count,
                        available: r.remaining(),
                    });
                }
                let data = r.bytes(count as usize)?.to_vec();
                if ty == RREAD {
                    Rmessage::Read { data }
                } else {
                    Rmessage::Readdir { data }
                }
            }
            RWRITE => Rmessage::Write { count: r.u32()? },
            RCLUNK => Rmessage::Clunk,
            RREMOVE => Rmessage::Remove,
            RSTATFS => Rmessage::Statfs(StatFs {
                ty: r.u32()?,
                bsize: r.u32()?,
                blocks: r.u64()?,
                bfree: r.u64()?,
                bavail: r.u64()?,
                files: r.u64()?,
                ffree: r.u64()?,
                fsid: r.u64()?,
                namelen: r.u32()?,
            }),
            RLOPEN => Rmessage::Lopen {
                qid: r.qid()?,
                iounit: r.u32()?,
            },
            RLCREATE => Rmessage::Lcreate {
                qid: r.qid()?,
                iounit: r.u32()?,
            },
            RSYMLINK => Rmessage::Symlink { qid: r.qid()? },
            RMKNOD => Rmessage::Mknod { qid: r.qid()? },
            RRENAME => Rmessage::Rename,
            RREADLINK => Rmessage::Readlink {
                target: r.str()?.to_vec(),
            },
            RGETATTR => Rmessage::Getattr(Attr {
                valid: r.u64()?,
                qid: r.qid()?,
                mode: r.u32()?,
                uid: r.u32()?,
                gid: r.u32()?,
                nlink: r.u64()?,
                rdev: r.u64()?,
                size: r.u64()?,
                blksize: r.u64()?,
                blocks: r.u64()?,
                atime_sec: r.u64()?,
                atime_nsec: r.u64()?,
                mtime_sec: r.u64()?,
                mtime_nsec: r.u64()?,
                ctime_sec: r.u64()?,
                ctime_nsec: r.u64()?,
                btime_sec: r.u64()?,
                btime_nsec: r.u64()?,
                gen: r.u64()?,
                data_version: r.u64()?,
            }),
            RSETATTR => Rmessage::Setattr,
            RXATTRWALK => Rmessage::Xattrwalk { size: r.u64()? },
            RXATTRCREATE => Rmessage::Xattrcreate,
            RFSYNC => Rmessage::Fsync,
            RLOCK => Rmessage::Lock { status: r.u8()? },
            RGETLOCK => Rmessage::Getlock {
                ty: r.u8()?,
                start: r.u64()?,
                length: r.u64()?,
                proc_id: r.u32()?,
                client_id: r.str()?.to_vec(),
            },
            RLINK => Rmessage::Link,
            RMKDIR => Rmessage::Mkdir { qid: r.qid()? },
            RRENAMEAT => Rmessage::Renameat,
            RUNLINKAT => Rmessage::Unlinkat,
            other => return Err(Error::UnknownType(other)),
        };
        Ok((tag, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(n: u64) -> Qid {
        Qid {
            ty: QTDIR,
            version: 7,
            path: n,
        }
    }

    fn all_requests() -> Vec<Tmessage<'static>> {
        let lock = Lock {
            ty: 1,
            flags: 2,
            start: 3,
            length: 4,
            proc_id: 5,
            client_id: b"host",
        };
        vec![
            Tmessage::Version {
                msize: 512000,
                version: b"9P2000.L",
            },
            Tmessage::Auth {
                afid: 1,
                uname: b"u",
                aname: b"a",
                n_uname: 0,
            },
            Tmessage::Attach {
                fid: 1,
                afid: NOFID,
                uname: b"root",
                aname: b"/x",
                n_uname: 0,
            },
            Tmessage::Flush { oldtag: 9 },
            Tmessage::Walk {
                fid: 1,
                newfid: 2,
                names: WalkNames::new(&[b"a", b"bb", b"ccc"]).unwrap(),
            },
            Tmessage::Walk {
                fid: 1,
                newfid: 2,
                names: WalkNames::new(&[]).unwrap(),
            },
            Tmessage::Read {
                fid: 3,
                offset: 1 << 40,
                count: 4096,
            },
            Tmessage::Write {
                fid: 3,
                offset: 5,
                data: b"hello",
            },
            Tmessage::Clunk { fid: 3 },
            Tmessage::Remove { fid: 3 },
            Tmessage::Statfs { fid: 3 },
            Tmessage::Lopen { fid: 3, flags: 0o2 },
            Tmessage::Lcreate {
                fid: 3,
                name: b"f",
                flags: 0o102,
                mode: 0o644,
                gid: 7,
            },
            Tmessage::Symlink {
                fid: 3,
                name: b"l",
                target: b"/etc",
                gid: 7,
            },
            Tmessage::Mknod {
                dfid: 3,
                name: b"n",
                mode: 0o10644,
                major: 1,
                minor: 2,
                gid: 7,
            },
            Tmessage::Rename {
                fid: 3,
                dfid: 4,
                name: b"r",
            },
            Tmessage::Readlink { fid: 3 },
            Tmessage::Getattr {
                fid: 3,
                mask: GETATTR_ALL,
            },
            Tmessage::Setattr {
                fid: 3,
                attr: SetAttr {
                    valid: 0x1ff,
                    mode: 1,
                    uid: 2,
                    gid: 3,
                    size: 4,
                    atime_sec: 5,
                    atime_nsec: 6,
                    mtime_sec: 7,
                    mtime_nsec: 8,
                },
            },
            Tmessage::Xattrwalk {
                fid: 3,
                newfid: 4,
                name: b"user.x",
            },
            Tmessage::Xattrcreate {
                fid: 3,
                name: b"user.x",
                size: 10,
                flags: 1,
            },
            Tmessage::Readdir {
                fid: 3,
                offset: 77,
                count: 8192,
            },
            Tmessage::Fsync {
                fid: 3,
                datasync: 1,
            },
            Tmessage::Lock { fid: 3, lock },
            Tmessage::Getlock {
                fid: 3,
                lock: Lock { flags: 0, ..lock },
            },
            Tmessage::Link {
                dfid: 3,
                fid: 4,
                name: b"h",
            },
            Tmessage::Mkdir {
                dfid: 3,
                name: b"d",
                mode: 0o755,
                gid: 7,
            },
            Tmessage::Renameat {
                olddirfid: 3,
                oldname: b"a",
                newdirfid: 4,
                newname: b"b",
            },
            Tmessage::Unlinkat {
                dirfid: 3,
                name: b"x",
                flags: 0x200,
            },
        ]
    }

    fn all_replies() -> Vec<Rmessage> {
        vec![
            Rmessage::Lerror { ecode: 2 },
            Rmessage::Version {
                msize: 8192,
                version: b"9P2000.L".to_vec(),
            },
            Rmessage::Attach { qid: q(1) },
            Rmessage::Flush,
            Rmessage::Walk {
                qids: vec![q(1), q(2)],
            },
            Rmessage::Read {
                data: b"abc".to_vec(),
            },
            Rmessage::Write { count: 3 },
            Rmessage::Clunk,
            Rmessage::Remove,
            Rmessage::Statfs(StatFs {
                ty: 1,
                bsize: 2,
                blocks: 3,
                bfree: 4,
                bavail: 5,
                files: 6,
                ffree: 7,
                fsid: 8,
                namelen: 9,
            }),
            Rmessage::Lopen {
                qid: q(3),
                iounit: 0,
            },
            Rmessage::Lcreate {
                qid: q(4),
                iounit: 5,
            },
            Rmessage::Symlink { qid: q(5) },
            Rmessage::Mknod { qid: q(6) },
            Rmessage::Rename,
            Rmessage::Readlink {
                target: b"../t".to_vec(),
            },
            Rmessage::Getattr(Attr {
                valid: GETATTR_BASIC,
                qid: q(9),
                mode: 0o40755,
                size: 99,
                gen: 3,
                ..Default::default()
            }),
            Rmessage::Setattr,
            Rmessage::Xattrwalk { size: 12 },
            Rmessage::Xattrcreate,
            Rmessage::Readdir {
                data: vec![1, 2, 3],
            },
            Rmessage::Fsync,
            Rmessage::Lock { status: 0 },
            Rmessage::Getlock {
                ty: 2,
                start: 1,
                length: 2,
                proc_id: 3,
                client_id: b"c".to_vec(),
            },
            Rmessage::Link,
            Rmessage::Mkdir { qid: q(10) },
            Rmessage::Renameat,
            Rmessage::Unlinkat,
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for m in all_requests() {
            let mut buf = Vec::new();
            m.encode(0x1234, &mut buf);
            assert_eq!(
                u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize,
                buf.len()
            );
            let (tag, d) = Tmessage::decode(&buf).unwrap();
            assert_eq!(tag, 0x1234);
            assert_eq!(d, m, "round trip of {m:?}");
            // Every strict prefix must be rejected as truncated/bad size, never panic.
            for cut in 0..buf.len() {
                let mut p = buf[..cut].to_vec();
                if p.len() >= 4 {
                    p[..4].copy_from_slice(&(cut as u32).to_le_bytes());
                }
                assert!(
                    Tmessage::decode(&p).is_err(),
                    "prefix {cut} of {m:?} accepted"
                );
            }
        }
    }

    #[test]
    fn every_reply_round_trips() {
        for m in all_replies() {
            let mut buf = Vec::new();
            m.encode(7, &mut buf);
            let (tag, d) = Rmessage::decode(&buf).unwrap();
            assert_eq!(tag, 7);
            assert_eq!(d, m);
        }
    }

    #[test]
    fn known_linux_bytes_decode() {
        // Tversion as sent by Linux: size=21 type=100 tag=0xffff msize=512000 "9P2000.L"
        let mut b = vec![21, 0, 0, 0, 100, 0xff, 0xff];
        b.extend_from_slice(&512000u32.to_le_bytes());
        b.extend_from_slice(&[8, 0]);
        b.extend_from_slice(b"9P2000.L");
        assert_eq!(
            Tmessage::decode(&b).unwrap(),
            (
                NOTAG,
                Tmessage::Version {
                    msize: 512000,
                    version: b"9P2000.L"
                }
            )
        );
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert!(matches!(
            Tmessage::decode(&[1, 2, 3]),
            Err(Error::Truncated { .. })
        ));
        // size larger than the buffer
        assert!(matches!(
            Tmessage::decode(&[100, 0, 0, 0, 120, 0, 0, 1, 0, 0, 0]),
            Err(Error::BadSize { .. })
        ));
        // size smaller than a header
        assert!(matches!(
            Tmessage::decode(&[3, 0, 0, 0, 120, 0, 0]),
            Err(Error::BadSize { .. })
        ));
        // unknown type
        assert_eq!(
            Tmessage::decode(&[7, 0, 0, 0, 99, 0, 0]),
            Err(Error::UnknownType(99))
        );
        // Twalk with 17 names
        let mut b = vec![0, 0, 0, 0, msg::TWALK, 1, 0, 1, 0, 0, 0, 2, 0, 0, 0, 17, 0];
        for _ in 0..17 {
            b.extend_from_slice(&[1, 0, b'a']);
        }
        let n = b.len() as u32;
        b[..4].copy_from_slice(&n.to_le_bytes());
        assert_eq!(Tmessage::decode(&b), Err(Error::TooManyWalkNames(17)));
        // Twrite with a count past the end
        let mut b = Vec::new();
        Tmessage::Write {
            fid: 1,
            offset: 0,
            data: b"abcd",
        }
        .encode(1, &mut b);
        b[19..23].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            Tmessage::decode(&b),
            Err(Error::BadCount { count: 1000, .. })
        ));
        // A string whose length runs past the end
        let mut b = Vec::new();
        Tmessage::Mkdir {
            dfid: 1,
            name: b"abc",
            mode: 0,
            gid: 0,
        }
        .encode(1, &mut b);
        b[11..13].copy_from_slice(&60000u16.to_le_bytes());
        assert!(matches!(Tmessage::decode(&b), Err(Error::Truncated { .. })));
    }

    #[test]
    fn dirents_round_trip() {
        let mut data = Vec::new();
        write_dirent(&mut data, &q(5), 10, 4, b"dir");
        write_dirent(&mut data, &q(6), 20, 8, b"file");
        assert_eq!(data.len(), dirent_len(3) + dirent_len(4));
        let e = parse_dirents(&data).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, b"file");
        assert_eq!(e[1].offset, 20);
        assert!(parse_dirents(&data[..data.len() - 1]).is_err());
    }
}
