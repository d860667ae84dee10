//! 9P2000.L wire format: the message type numbers, the request (`T`) and reply (`R`) messages a
//! Linux client and this server exchange, and their little-endian encoding and decoding.
//!
//! Every message is declared once, in the two tables at [`Tmessage`] and [`Rmessage`] (the
//! `messages!` invocations below): its variant, its type number, its name and its fields in
//! wire order. Decoding, encoding, [`Tmessage::msg_type`], [`Tmessage::name_of`] and the `msg`
//! constants are all generated from those tables; each field's layout comes from its type's
//! [`Codec`] (or the codec named with `as`, e.g. `data: &'a [u8] as Data` for count[4]-prefixed
//! bytes instead of a len[2] string). The bodies shared by several messages ([`Qid`],
//! [`SetAttr`], [`Attr`], [`StatFs`], [`Lock`], [`DirEntry`]) are declared once the same way.
//!
//! Decoding never panics: truncated messages, bad sizes, oversized counts and strings that run
//! past the end of the message all come back as [`Error`]. Requests borrow their strings and
//! write payloads from the input buffer so the server's hot path does not allocate; replies
//! borrow where they can too (`Cow`), so the server encodes them without copying and clients
//! keep them with [`Rmessage::into_owned`].

use std::borrow::Cow;
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

/// Message type numbers (9P2000 and the 9P2000.L extensions), generated from the message
/// tables, plus Tlerror, which no peer ever sends.
pub mod msg {
    pub use super::rtypes::*;
    pub use super::ttypes::*;
    pub const TLERROR: u8 = 6;
}

/// Qid type bits.
pub const QTDIR: u8 = 0x80;
pub const QTSYMLINK: u8 = 0x02;
pub const QTFILE: u8 = 0x00;

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

/// The basic Tgetattr mask (everything but btime, gen, data_version).
pub const GETATTR_BASIC: u64 = 0x0000_07ff;
/// Every Tgetattr field.
pub const GETATTR_ALL: u64 = 0x0000_3fff;

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
}

/// Little-endian writer appending to a Vec.
pub struct Writer<'a> {
    pub buf: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(s);
        self
    }
}

/// How a value of type `T` is laid out on the wire. A field type is usually its own codec;
/// marker codecs ([`Data`], [`NoFlags`]) give a type a second layout.
pub trait Codec<'a, T> {
    /// Reads one value.
    fn get(r: &mut Reader<'a>) -> Result<T, Error>;
    /// Appends one value.
    fn put(v: &T, w: &mut Writer<'_>);
    /// Encoded size of `v` in bytes.
    fn len(v: &T) -> usize;
}

macro_rules! int_codecs {
    ($($t:ty),*) => {$(
        impl<'a> Codec<'a, $t> for $t {
            fn get(r: &mut Reader<'a>) -> Result<$t, Error> {
                Ok(<$t>::from_le_bytes(r.arr()?))
            }
            fn put(v: &$t, w: &mut Writer<'_>) {
                w.bytes(&v.to_le_bytes());
            }
            fn len(_: &$t) -> usize {
                std::mem::size_of::<$t>()
            }
        }
    )*};
}
int_codecs!(u8, u16, u32, u64);

/// A 9P string: len[2] followed by that many bytes. Encoding truncates at 65535 bytes.
fn get_str<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], Error> {
    let n = u16::get(r)? as usize;
    r.bytes(n)
}

fn put_str(s: &[u8], w: &mut Writer<'_>) {
    let n = s.len().min(u16::MAX as usize);
    u16::put(&(n as u16), w);
    w.bytes(&s[..n]);
}

fn str_len(s: &[u8]) -> usize {
    2 + s.len().min(u16::MAX as usize)
}

/// Counted bytes: count[4] followed by that many bytes (Twrite, Rread, Rreaddir payloads).
pub struct Data;

fn get_data<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], Error> {
    let count = u32::get(r)?;
    if count as usize > r.remaining() {
        return Err(Error::BadCount {
            count,
            available: r.remaining(),
        });
    }
    r.bytes(count as usize)
}

fn data_len(s: &[u8]) -> usize {
    4 + s.len()
}

fn put_data(s: &[u8], w: &mut Writer<'_>) {
    u32::put(&(s.len() as u32), w);
    w.bytes(s);
}

/// Implements a byte-string codec (`$codec`) for the borrowed and owned byte types.
macro_rules! bytes_codecs {
    ($codec:ty, $get:ident, $put:ident, $len:expr) => {
        impl<'a> Codec<'a, &'a [u8]> for $codec {
            fn get(r: &mut Reader<'a>) -> Result<&'a [u8], Error> {
                $get(r)
            }
            fn put(v: &&'a [u8], w: &mut Writer<'_>) {
                $put(v, w)
            }
            fn len(v: &&'a [u8]) -> usize {
                $len(v)
            }
        }
        impl<'a> Codec<'a, Cow<'a, [u8]>> for $codec {
            fn get(r: &mut Reader<'a>) -> Result<Cow<'a, [u8]>, Error> {
                $get(r).map(Cow::Borrowed)
            }
            fn put(v: &Cow<'a, [u8]>, w: &mut Writer<'_>) {
                $put(v, w)
            }
            fn len(v: &Cow<'a, [u8]>) -> usize {
                $len(v)
            }
        }
        impl<'a> Codec<'a, Vec<u8>> for $codec {
            fn get(r: &mut Reader<'a>) -> Result<Vec<u8>, Error> {
                $get(r).map(<[u8]>::to_vec)
            }
            fn put(v: &Vec<u8>, w: &mut Writer<'_>) {
                $put(v, w)
            }
            fn len(v: &Vec<u8>) -> usize {
                $len(v)
            }
        }
    };
}
bytes_codecs!(&'a [u8], get_str, put_str, str_len);
bytes_codecs!(Cow<'a, [u8]>, get_str, put_str, str_len);
bytes_codecs!(Vec<u8>, get_str, put_str, str_len);
bytes_codecs!(Data, get_data, put_data, data_len);

/// Declares a plain struct whose fields are laid out one after the other on the wire, and its
/// [`Codec`].
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident $(<$lt:lifetime>)? $(<$N:ident = $ND:ty>)? {
            $($(#[$fmeta:meta])* pub $f:ident : $fty:ty $(as $codec:ty)?),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name $(<$lt>)? $(<$N = $ND>)? {
            $($(#[$fmeta])* pub $f: $fty),*
        }

        impl<'a, $($N: Codec<'a, $N>)?> Codec<'a, $name $(<$lt>)? $(<$N>)?>
            for $name $(<$lt>)? $(<$N>)?
        {
            fn get(r: &mut Reader<'a>) -> Result<Self, Error> {
                Ok($name {
                    $($f: <codec!($fty $(, $codec)?) as Codec<'a, $fty>>::get(r)?),*
                })
            }
            fn put(v: &Self, w: &mut Writer<'_>) {
                $(<codec!($fty $(, $codec)?) as Codec<'a, $fty>>::put(&v.$f, w);)*
            }
            fn len(v: &Self) -> usize {
                0 $(+ <codec!($fty $(, $codec)?) as Codec<'a, $fty>>::len(&v.$f))*
            }
        }
    };
}

/// The codec of a field: the one named with `as`, else the field's own type.
macro_rules! codec {
    ($t:ty) => {
        $t
    };
    ($t:ty, $c:ty) => {
        $c
    };
}

/// Expands to the given binding name; lets a repetition over a tuple variant's type emit a
/// pattern or expression that names its single field.
macro_rules! tuple_binding {
    ($i:ident, $t:ty) => {
        $i
    };
}

wire_struct! {
    /// A server's unique identification of a file.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Qid {
        pub ty: u8,
        pub version: u32,
        pub path: u64,
    }
}

wire_struct! {
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
}

wire_struct! {
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
}

wire_struct! {
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
}

wire_struct! {
    /// Tlock body (proc_id and client id identify the lock owner). Tgetlock carries the same
    /// fields without `flags` (see [`NoFlags`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Lock<'a> {
        pub ty: u8,
        pub flags: u32,
        pub start: u64,
        pub length: u64,
        pub proc_id: u32,
        pub client_id: &'a [u8],
    }
}

/// The Tgetlock layout of a [`Lock`]: every field but `flags` (decoded as 0).
pub struct NoFlags;

impl<'a> Codec<'a, Lock<'a>> for NoFlags {
    fn get(r: &mut Reader<'a>) -> Result<Lock<'a>, Error> {
        Ok(Lock {
            ty: u8::get(r)?,
            flags: 0,
            start: u64::get(r)?,
            length: u64::get(r)?,
            proc_id: u32::get(r)?,
            client_id: get_str(r)?,
        })
    }
    fn put(v: &Lock<'a>, w: &mut Writer<'_>) {
        u8::put(&v.ty, w);
        u64::put(&v.start, w);
        u64::put(&v.length, w);
        u32::put(&v.proc_id, w);
        put_str(v.client_id, w);
    }
    fn len(v: &Lock<'a>) -> usize {
        Lock::len(v) - 4
    }
}

wire_struct! {
    /// One Rreaddir entry. Clients get owned names ([`parse_dirents`]); the server writes
    /// entries whose names borrow from its getdents buffer (`DirEntry<&[u8]>`).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DirEntry<N = Vec<u8>> {
        pub qid: Qid,
        pub offset: u64,
        pub ty: u8,
        pub name: N,
    }
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

/// Reads a Twalk/Rwalk element count: n[2], at most [`MAX_WALK_NAMES`].
fn get_walk_count(r: &mut Reader<'_>) -> Result<usize, Error> {
    let n = u16::get(r)?;
    if n as usize > MAX_WALK_NAMES {
        return Err(Error::TooManyWalkNames(n));
    }
    Ok(n as usize)
}

impl<'a> Codec<'a, WalkNames<'a>> for WalkNames<'a> {
    fn get(r: &mut Reader<'a>) -> Result<Self, Error> {
        let len = get_walk_count(r)?;
        let mut names = WalkNames {
            len,
            ..Default::default()
        };
        for slot in names.names.iter_mut().take(len) {
            *slot = get_str(r)?;
        }
        Ok(names)
    }
    fn put(v: &Self, w: &mut Writer<'_>) {
        u16::put(&(v.len as u16), w);
        for n in v.as_slice() {
            put_str(n, w);
        }
    }
    fn len(v: &Self) -> usize {
        2 + v.as_slice().iter().map(|n| str_len(n)).sum::<usize>()
    }
}

/// Rwalk's qids: n[2] then n qids (at most 16). The server encodes a borrowed slice.
impl<'a> Codec<'a, Cow<'a, [Qid]>> for Cow<'a, [Qid]> {
    fn get(r: &mut Reader<'a>) -> Result<Self, Error> {
        let n = get_walk_count(r)?;
        (0..n)
            .map(|_| Qid::get(r))
            .collect::<Result<Vec<_>, _>>()
            .map(Cow::Owned)
    }
    fn put(v: &Self, w: &mut Writer<'_>) {
        let n = v.len().min(MAX_WALK_NAMES);
        u16::put(&(n as u16), w);
        for q in &v[..n] {
            Qid::put(q, w);
        }
    }
    fn len(v: &Self) -> usize {
        2 + QID_LEN * v.len().min(MAX_WALK_NAMES)
    }
}

/// A field type that can let go of what it borrows (for [`Rmessage::into_owned`]).
pub trait IntoStatic {
    type Static: 'static;
    fn into_static(self) -> Self::Static;
}

macro_rules! static_as_is {
    ($($t:ty),*) => {$(
        impl IntoStatic for $t {
            type Static = $t;
            fn into_static(self) -> $t {
                self
            }
        }
    )*};
}
static_as_is!(u8, u16, u32, u64, Qid, Attr, StatFs);

impl<T: ToOwned + ?Sized + 'static> IntoStatic for Cow<'_, T>
where
    T::Owned: 'static,
{
    type Static = Cow<'static, T>;
    fn into_static(self) -> Cow<'static, T> {
        Cow::Owned(self.into_owned())
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

/// The header of an Rread or Rreaddir (`ty`) whose `count` data bytes the caller places right
/// after it in the reply area: the zero-copy form of `Rmessage::Read`/`Readdir`'s layout
/// (size[4] type[1] tag[2] count[4] data[count]; a unit test checks it against the table).
pub fn data_reply_header(ty: u8, tag: u16, count: u32) -> [u8; RREAD_HEADER_LEN] {
    let mut h = [0u8; RREAD_HEADER_LEN];
    h[..4].copy_from_slice(&(RREAD_HEADER_LEN as u32).wrapping_add(count).to_le_bytes());
    h[4] = ty;
    h[5..7].copy_from_slice(&tag.to_le_bytes());
    h[7..].copy_from_slice(&count.to_le_bytes());
    h
}

/// Declares a message enum from its table: one line per message with its variant, its fields
/// in wire order (`name: Type` or `name: Type as Codec`), its type-number constant, value and
/// name. Generates the enum, the constants (in module `$consts`), `msg_type`, `name`,
/// `name_of`, `decode`, `encode`, `encoded_len`, and (with `owned: yes`) `into_owned`.
macro_rules! messages {
    (
        $(#[$emeta:meta])*
        pub enum $Enum:ident<'a>, constants $consts:ident, owned: $owned:ident {
            $(
                $(#[$vmeta:meta])*
                $Var:ident
                $({ $($f:ident : $fty:ty $(as $codec:ty)?),* $(,)? })?
                $(( $tty:ty ))?
                = $CONST:ident($num:literal, $name:literal)
            ),* $(,)?
        }
    ) => {
        /// Type numbers of the messages in this table.
        pub mod $consts {
            $(pub const $CONST: u8 = $num;)*
        }

        $(#[$emeta])*
        pub enum $Enum<'a> {
            $(
                $(#[$vmeta])*
                $Var $({ $($f: $fty),* })? $(($tty))?
            ),*
        }

        impl<'a> $Enum<'a> {
            /// The message type number.
            pub fn msg_type(&self) -> u8 {
                match self {
                    $(Self::$Var { .. } => $consts::$CONST,)*
                }
            }

            /// The message's name, for statistics and logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Self::$Var { .. } => $name,)*
                }
            }

            /// The name of message type `ty`, if this table has it.
            pub fn name_of(ty: u8) -> Option<&'static str> {
                match ty {
                    $($consts::$CONST => Some($name),)*
                    _ => None,
                }
            }

            /// Decodes a complete message; returns its tag and the message, which borrows
            /// from `buf`.
            pub fn decode(buf: &'a [u8]) -> Result<(u16, Self), Error> {
                let (ty, tag, body) = split_header(buf)?;
                let r = &mut Reader::new(body);
                let m = match ty {
                    $(
                        $consts::$CONST => Self::$Var
                            $({ $($f: <codec!($fty $(, $codec)?) as Codec<'a, $fty>>::get(r)?),* })?
                            $(( <$tty as Codec<'a, $tty>>::get(r)? ))?,
                    )*
                    other => return Err(Error::UnknownType(other)),
                };
                Ok((tag, m))
            }

            /// Appends the encoded message to `out`.
            pub fn encode(&self, tag: u16, out: &mut Vec<u8>) {
                let at = start(out, self.msg_type(), tag);
                let w = &mut Writer { buf: out };
                match self {
                    $(
                        Self::$Var $({ $($f),* })? $((tuple_binding!(body, $tty)))? => {
                            $($(<codec!($fty $(, $codec)?) as Codec<'a, $fty>>::put($f, w);)*)?
                            $(<$tty as Codec<'a, $tty>>::put(tuple_binding!(body, $tty), w);)?
                        }
                    )*
                }
                finish(out, at);
            }

            /// The size of the encoded message, header included.
            pub fn encoded_len(&self) -> usize {
                HEADER_LEN + match self {
                    $(
                        Self::$Var $({ $($f),* })? $((tuple_binding!(body, $tty)))? => {
                            0 $($(+ <codec!($fty $(, $codec)?) as Codec<'a, $fty>>::len($f))*)?
                            $(+ <$tty as Codec<'a, $tty>>::len(tuple_binding!(body, $tty)))?
                        }
                    )*
                }
            }
        }

        messages!(@owned $owned $Enum [$($Var $({ $($f),* })? $(($tty))?),*]);
    };

    (@owned no $($rest:tt)*) => {};
    (@owned yes $Enum:ident [$($Var:ident $({ $($f:ident),* })? $(($tty:ty))?),*]) => {
        impl $Enum<'_> {
            /// The same message owning everything it borrowed.
            pub fn into_owned(self) -> $Enum<'static> {
                match self {
                    $(
                        Self::$Var $({ $($f),* })? $((tuple_binding!(body, $tty)))? =>
                            $Enum::$Var
                                $({ $($f: IntoStatic::into_static($f)),* })?
                                $((IntoStatic::into_static(tuple_binding!(body, $tty))))?,
                    )*
                }
            }
        }
    };
}

messages! {
    /// A request message. Strings and write data borrow from the request buffer.
    // Twalk's inline name array makes it the largest variant; keeping it inline (rather than
    // boxed) is what lets decoding stay allocation-free, and requests live on the stack only
    // briefly.
    #[allow(clippy::large_enum_variant)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Tmessage<'a>, constants ttypes, owned: no {
        Statfs { fid: u32 } = TSTATFS(8, "statfs"),
        Lopen { fid: u32, flags: u32 } = TLOPEN(12, "lopen"),
        Lcreate { fid: u32, name: &'a [u8], flags: u32, mode: u32, gid: u32 }
            = TLCREATE(14, "lcreate"),
        Symlink { fid: u32, name: &'a [u8], target: &'a [u8], gid: u32 } = TSYMLINK(16, "symlink"),
        Mknod { dfid: u32, name: &'a [u8], mode: u32, major: u32, minor: u32, gid: u32 }
            = TMKNOD(18, "mknod"),
        Rename { fid: u32, dfid: u32, name: &'a [u8] } = TRENAME(20, "rename"),
        Readlink { fid: u32 } = TREADLINK(22, "readlink"),
        Getattr { fid: u32, mask: u64 } = TGETATTR(24, "getattr"),
        Setattr { fid: u32, attr: SetAttr } = TSETATTR(26, "setattr"),
        Xattrwalk { fid: u32, newfid: u32, name: &'a [u8] } = TXATTRWALK(30, "xattrwalk"),
        Xattrcreate { fid: u32, name: &'a [u8], size: u64, flags: u32 }
            = TXATTRCREATE(32, "xattrcreate"),
        Readdir { fid: u32, offset: u64, count: u32 } = TREADDIR(40, "readdir"),
        Fsync { fid: u32, datasync: u32 } = TFSYNC(50, "fsync"),
        Lock { fid: u32, lock: Lock<'a> } = TLOCK(52, "lock"),
        Getlock { fid: u32, lock: Lock<'a> as NoFlags } = TGETLOCK(54, "getlock"),
        Link { dfid: u32, fid: u32, name: &'a [u8] } = TLINK(70, "link"),
        Mkdir { dfid: u32, name: &'a [u8], mode: u32, gid: u32 } = TMKDIR(72, "mkdir"),
        Renameat { olddirfid: u32, oldname: &'a [u8], newdirfid: u32, newname: &'a [u8] }
            = TRENAMEAT(74, "renameat"),
        Unlinkat { dirfid: u32, name: &'a [u8], flags: u32 } = TUNLINKAT(76, "unlinkat"),
        Version { msize: u32, version: &'a [u8] } = TVERSION(100, "version"),
        Auth { afid: u32, uname: &'a [u8], aname: &'a [u8], n_uname: u32 } = TAUTH(102, "auth"),
        Attach { fid: u32, afid: u32, uname: &'a [u8], aname: &'a [u8], n_uname: u32 }
            = TATTACH(104, "attach"),
        Flush { oldtag: u16 } = TFLUSH(108, "flush"),
        Walk { fid: u32, newfid: u32, names: WalkNames<'a> } = TWALK(110, "walk"),
        Read { fid: u32, offset: u64, count: u32 } = TREAD(116, "read"),
        Write { fid: u32, offset: u64, data: &'a [u8] as Data } = TWRITE(118, "write"),
        Clunk { fid: u32 } = TCLUNK(120, "clunk"),
        Remove { fid: u32 } = TREMOVE(122, "remove"),
    }
}

messages! {
    /// A reply message. Decoding borrows strings and data from the reply buffer (the qids of
    /// Rwalk are collected); [`Rmessage::into_owned`] keeps a reply past its buffer. The server
    /// builds replies around borrowed slices, so encoding copies nothing twice.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Rmessage<'a>, constants rtypes, owned: yes {
        Lerror { ecode: u32 } = RLERROR(7, "lerror"),
        Statfs(StatFs) = RSTATFS(9, "statfs"),
        Lopen { qid: Qid, iounit: u32 } = RLOPEN(13, "lopen"),
        Lcreate { qid: Qid, iounit: u32 } = RLCREATE(15, "lcreate"),
        Symlink { qid: Qid } = RSYMLINK(17, "symlink"),
        Mknod { qid: Qid } = RMKNOD(19, "mknod"),
        Rename = RRENAME(21, "rename"),
        Readlink { target: Cow<'a, [u8]> } = RREADLINK(23, "readlink"),
        Getattr(Attr) = RGETATTR(25, "getattr"),
        Setattr = RSETATTR(27, "setattr"),
        Xattrwalk { size: u64 } = RXATTRWALK(31, "xattrwalk"),
        Xattrcreate = RXATTRCREATE(33, "xattrcreate"),
        Readdir { data: Cow<'a, [u8]> as Data } = RREADDIR(41, "readdir"),
        Fsync = RFSYNC(51, "fsync"),
        Lock { status: u8 } = RLOCK(53, "lock"),
        Getlock { ty: u8, start: u64, length: u64, proc_id: u32, client_id: Cow<'a, [u8]> }
            = RGETLOCK(55, "getlock"),
        Link = RLINK(71, "link"),
        Mkdir { qid: Qid } = RMKDIR(73, "mkdir"),
        Renameat = RRENAMEAT(75, "renameat"),
        Unlinkat = RUNLINKAT(77, "unlinkat"),
        Version { msize: u32, version: Cow<'a, [u8]> } = RVERSION(101, "version"),
        Auth { aqid: Qid } = RAUTH(103, "auth"),
        Attach { qid: Qid } = RATTACH(105, "attach"),
        Flush = RFLUSH(109, "flush"),
        Walk { qids: Cow<'a, [Qid]> } = RWALK(111, "walk"),
        Read { data: Cow<'a, [u8]> as Data } = RREAD(117, "read"),
        Write { count: u32 } = RWRITE(119, "write"),
        Clunk = RCLUNK(121, "clunk"),
        Remove = RREMOVE(123, "remove"),
    }
}

/// Human-readable name of a request type, for statistics ("other" for unknown types).
pub fn type_name(t: u8) -> &'static str {
    Tmessage::name_of(t).unwrap_or("other")
}

/// Parses the data of an Rreaddir into entries.
pub fn parse_dirents(data: &[u8]) -> Result<Vec<DirEntry>, Error> {
    let mut r = Reader::new(data);
    let mut v = Vec::new();
    while r.remaining() > 0 {
        v.push(DirEntry::get(&mut r)?);
    }
    Ok(v)
}

/// Appends one Rreaddir entry.
pub fn write_dirent(out: &mut Vec<u8>, entry: &DirEntry<&[u8]>) {
    DirEntry::put(entry, &mut Writer { buf: out });
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

    fn all_replies() -> Vec<Rmessage<'static>> {
        vec![
            Rmessage::Lerror { ecode: 2 },
            Rmessage::Version {
                msize: 8192,
                version: b"9P2000.L"[..].into(),
            },
            Rmessage::Attach { qid: q(1) },
            Rmessage::Flush,
            Rmessage::Walk {
                qids: vec![q(1), q(2)].into(),
            },
            Rmessage::Walk {
                qids: Cow::Borrowed(&[]),
            },
            Rmessage::Auth { aqid: q(11) },
            Rmessage::Read {
                data: b"abc"[..].into(),
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
                target: b"../t"[..].into(),
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
                data: vec![1, 2, 3].into(),
            },
            Rmessage::Fsync,
            Rmessage::Lock { status: 0 },
            Rmessage::Getlock {
                ty: 2,
                start: 1,
                length: 2,
                proc_id: 3,
                client_id: b"c"[..].into(),
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
            assert_eq!(buf.len(), m.encoded_len(), "encoded_len of {m:?}");
            let (tag, d) = Rmessage::decode(&buf).unwrap();
            assert_eq!(tag, 7);
            assert_eq!(d, m);
            assert_eq!(d.into_owned(), m);
            for cut in HEADER_LEN..buf.len() {
                let mut p = buf[..cut].to_vec();
                p[..4].copy_from_slice(&(cut as u32).to_le_bytes());
                assert!(
                    Rmessage::decode(&p).is_err(),
                    "prefix {cut} of {m:?} accepted"
                );
            }
        }
    }

    #[test]
    fn every_message_type_is_named_and_numbered_from_the_tables() {
        let mut seen = std::collections::HashSet::new();
        for m in all_requests() {
            assert_eq!(Tmessage::name_of(m.msg_type()), Some(m.name()));
            // Replies are numbered one above their request.
            assert_eq!(Rmessage::name_of(m.msg_type() + 1), Some(m.name()), "{m:?}");
            seen.insert(m.msg_type());
        }
        for m in all_replies() {
            assert_eq!(Rmessage::name_of(m.msg_type()), Some(m.name()));
            seen.insert(m.msg_type());
        }
        // Every type in either table is covered by the round-trip lists above.
        for ty in 0..=255u8 {
            let known = Tmessage::name_of(ty).is_some() || Rmessage::name_of(ty).is_some();
            assert_eq!(known, seen.contains(&ty), "type {ty}");
        }
        assert_eq!(type_name(msg::TWALK), "walk");
        assert_eq!(type_name(99), "other");
        assert_eq!(msg::RLERROR, 7);
        assert_eq!(msg::TLERROR, 6);
    }

    #[test]
    fn zero_copy_data_header_matches_the_table() {
        for ty in [msg::RREAD, msg::RREADDIR] {
            let data = b"payload";
            let m = match ty {
                msg::RREAD => Rmessage::Read {
                    data: data[..].into(),
                },
                _ => Rmessage::Readdir {
                    data: data[..].into(),
                },
            };
            let mut buf = Vec::new();
            m.encode(0x4321, &mut buf);
            let h = data_reply_header(ty, 0x4321, data.len() as u32);
            assert_eq!(&buf[..RREAD_HEADER_LEN], &h[..]);
            assert_eq!(&buf[RREAD_HEADER_LEN..], data);
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
        let dir = DirEntry {
            qid: q(5),
            offset: 10,
            ty: 4,
            name: &b"dir"[..],
        };
        let file = DirEntry {
            qid: q(6),
            offset: 20,
            ty: 8,
            name: &b"file"[..],
        };
        write_dirent(&mut data, &dir);
        write_dirent(&mut data, &file);
        assert_eq!(data.len(), DirEntry::len(&dir) + DirEntry::len(&file));
        assert_eq!(DirEntry::len(&dir), QID_LEN + 8 + 1 + 2 + 3);
        let e = parse_dirents(&data).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, b"file");
        assert_eq!(e[1].offset, 20);
        assert!(parse_dirents(&data[..data.len() - 1]).is_err());
    }
}
