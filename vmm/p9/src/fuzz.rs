//! Fuzzing support shared by the in-tree bounded fuzz loop (`p9-fuzz` binary) and the
//! cargo-fuzz target under `fuzz/`: a disposable share with every kind of file (and a secret
//! next to it that must never change), valid seed messages, a mutator, and the invariants every
//! reply must satisfy.

use crate::reply::VecReply;
use crate::server::{Config, Server};
use crate::wire::{self, Lock, Rmessage, SetAttr, Tmessage, WalkNames};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A small deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// A violated invariant found while fuzzing.
#[derive(Debug, thiserror::Error)]
pub enum FuzzFailure {
    #[error("reply to {request:02x?} is malformed ({why}): {reply:02x?}")]
    BadReply {
        request: Vec<u8>,
        reply: Vec<u8>,
        why: String,
    },
    #[error("the secret outside the share changed or something was created next to the share")]
    Escaped,
    #[error("cannot set up the fuzz share: {0}")]
    Setup(String),
}

/// A disposable share and a server on it.
pub struct Target {
    base: PathBuf,
    share: PathBuf,
    pub server: Arc<Server>,
    reply: VecReply,
}

const SECRET: &[u8] = b"do not touch";

fn build_tree(base: &std::path::Path) -> std::io::Result<PathBuf> {
    let share = base.join("share");
    let _ = std::fs::remove_dir_all(&share);
    std::fs::create_dir_all(share.join("dir/sub"))?;
    std::fs::write(base.join("secret"), SECRET)?;
    std::fs::write(share.join("file"), b"hello, fuzz")?;
    std::fs::write(share.join("dir/f2"), vec![1u8; 5000])?;
    std::os::unix::fs::symlink("/", share.join("root_link"))?;
    std::os::unix::fs::symlink("../secret", share.join("secret_link"))?;
    std::os::unix::fs::symlink("dir", share.join("dir_link"))?;
    let fifo = std::ffi::CString::new(share.join("fifo").as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fifo` is a valid NUL-terminated path.
    unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) };
    Ok(share)
}

/// Fid numbers prepared by [`Target::reset_session`]: 1 root, 2 opened file, 3 opened dir,
/// 4 the FIFO (walked, not opened), 5 the symlink to `/`.
pub const FIDS: [u32; 5] = [1, 2, 3, 4, 5];

impl Target {
    /// Creates a share under the temp directory (removed on drop).
    pub fn new(read_only: bool) -> Result<Target, FuzzFailure> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir().join(format!(
            "p9-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&base).map_err(|e| FuzzFailure::Setup(e.to_string()))?;
        let share = build_tree(&base).map_err(|e| FuzzFailure::Setup(e.to_string()))?;
        let config = Config {
            read_only,
            msize: 65536,
            max_fids: 256,
            max_open_files: 64,
            resolution_checks: true,
            ownership: crate::Ownership::Mapped,
            // Counting requests is part of what every request goes through: fuzz it too.
            stats: true,
        };
        let server = Server::new(&share, config).map_err(|e| FuzzFailure::Setup(e.to_string()))?;
        let mut t = Target {
            base,
            share,
            server,
            reply: VecReply::new(65536),
        };
        t.reset_session();
        Ok(t)
    }

    /// Rebuilds the tree and the session's fids (after a Tversion or destructive inputs).
    pub fn reset(&mut self) -> Result<(), FuzzFailure> {
        build_tree(&self.base).map_err(|e| FuzzFailure::Setup(e.to_string()))?;
        let config = self.server.config().clone();
        self.server =
            Server::new(&self.share, config).map_err(|e| FuzzFailure::Setup(e.to_string()))?;
        self.reset_session();
        Ok(())
    }

    fn reset_session(&mut self) {
        let mut b = Vec::new();
        let w = |names: &[&'static [u8]]| WalkNames::new(names).unwrap_or_default();
        let setup = [
            Tmessage::Version {
                msize: 65536,
                version: b"9P2000.L",
            },
            Tmessage::Attach {
                fid: 1,
                afid: wire::NOFID,
                uname: b"",
                aname: b"",
                n_uname: 0,
            },
            Tmessage::Walk {
                fid: 1,
                newfid: 2,
                names: w(&[b"file"]),
            },
            Tmessage::Lopen { fid: 2, flags: 2 },
            Tmessage::Walk {
                fid: 1,
                newfid: 3,
                names: w(&[b"dir"]),
            },
            Tmessage::Lopen { fid: 3, flags: 0 },
            Tmessage::Walk {
                fid: 1,
                newfid: 4,
                names: w(&[b"fifo"]),
            },
            Tmessage::Walk {
                fid: 1,
                newfid: 5,
                names: w(&[b"root_link"]),
            },
        ];
        for m in setup {
            b.clear();
            m.encode(1, &mut b);
            self.server.handle(&b, &mut self.reply);
        }
    }

    /// Feeds one request and checks the reply's invariants.
    pub fn run_one(&mut self, req: &[u8]) -> Result<(), FuzzFailure> {
        let n = self.server.handle(req, &mut self.reply);
        let rep = &self.reply.as_slice()[..n];
        let bad = |why: &str| FuzzFailure::BadReply {
            request: req.to_vec(),
            reply: rep.to_vec(),
            why: why.into(),
        };
        if n < wire::HEADER_LEN {
            return Err(bad("shorter than a header"));
        }
        match Rmessage::decode(rep) {
            Ok((tag, r)) => {
                if tag != wire::peek_tag(req) {
                    return Err(bad("tag differs from the request's"));
                }
                if u32::from_le_bytes([rep[0], rep[1], rep[2], rep[3]]) as usize != n {
                    return Err(bad("size field differs from the length"));
                }
                if let Rmessage::Lerror { ecode } = r {
                    if ecode == 0 || ecode > 4095 {
                        return Err(bad("Rlerror with an impossible errno"));
                    }
                } else if req.len() > 4 && r.msg_type() != req[4] + 1 {
                    return Err(bad("reply type does not answer the request type"));
                }
            }
            Err(e) => return Err(bad(&format!("undecodable: {e}"))),
        }
        if req.get(4) == Some(&wire::msg::TVERSION) {
            self.reset_session();
        }
        Ok(())
    }

    /// Checks that nothing outside the share changed.
    pub fn check_confined(&self) -> Result<(), FuzzFailure> {
        let secret = std::fs::read(self.base.join("secret")).map_err(|_| FuzzFailure::Escaped)?;
        if secret != SECRET {
            return Err(FuzzFailure::Escaped);
        }
        let entries = std::fs::read_dir(&self.base)
            .map_err(|_| FuzzFailure::Escaped)?
            .count();
        if entries != 2 {
            return Err(FuzzFailure::Escaped);
        }
        Ok(())
    }

    /// Splits arbitrary bytes into requests (using their size fields, forcing a size where it
    /// would overrun) and runs them all; used by the cargo-fuzz target.
    pub fn run_bytes(&mut self, mut data: &[u8]) -> Result<(), FuzzFailure> {
        let mut count = 0;
        while data.len() >= 4 && count < 64 {
            let size = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize)
                .clamp(4, data.len());
            self.run_one(&data[..size])?;
            data = &data[size..];
            count += 1;
        }
        if !data.is_empty() {
            self.run_one(data)?;
        }
        self.check_confined()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Valid requests touching every message type, aimed at the fids of [`FIDS`].
pub fn seeds() -> Vec<Vec<u8>> {
    let w = |names: &[&'static [u8]]| WalkNames::new(names).unwrap_or_default();
    let lock = Lock {
        ty: 1,
        flags: 0,
        start: 0,
        length: 1,
        proc_id: 1,
        client_id: b"c",
    };
    let sa = SetAttr {
        valid: 0x1ff,
        mode: 0o644,
        size: 3,
        ..Default::default()
    };
    let msgs = [
        Tmessage::Version {
            msize: 8192,
            version: b"9P2000.L",
        },
        Tmessage::Auth {
            afid: 9,
            uname: b"u",
            aname: b"",
            n_uname: 0,
        },
        Tmessage::Attach {
            fid: 9,
            afid: wire::NOFID,
            uname: b"u",
            aname: b"",
            n_uname: 0,
        },
        Tmessage::Flush { oldtag: 1 },
        Tmessage::Walk {
            fid: 1,
            newfid: 9,
            names: w(&[b"dir", b"..", b"..", b"dir_link", b"sub"]),
        },
        Tmessage::Walk {
            fid: 5,
            newfid: 9,
            names: w(&[b"etc", b"passwd"]),
        },
        Tmessage::Walk {
            fid: 1,
            newfid: 1,
            names: w(&[b"dir"]),
        },
        Tmessage::Read {
            fid: 2,
            offset: 0,
            count: 100,
        },
        Tmessage::Write {
            fid: 2,
            offset: 3,
            data: b"xyz",
        },
        Tmessage::Clunk { fid: 2 },
        Tmessage::Remove { fid: 4 },
        Tmessage::Statfs { fid: 1 },
        Tmessage::Lopen { fid: 4, flags: 0 },
        Tmessage::Lopen { fid: 5, flags: 2 },
        Tmessage::Lcreate {
            fid: 1,
            name: b"new",
            flags: 0o102,
            mode: 0o644,
            gid: 0,
        },
        Tmessage::Symlink {
            fid: 1,
            name: b"sl",
            target: b"/etc/shadow",
            gid: 0,
        },
        Tmessage::Mknod {
            dfid: 1,
            name: b"nod",
            mode: 0o20644,
            major: 1,
            minor: 3,
            gid: 0,
        },
        Tmessage::Rename {
            fid: 2,
            dfid: 3,
            name: b"moved",
        },
        Tmessage::Readlink { fid: 5 },
        Tmessage::Getattr {
            fid: 4,
            mask: wire::GETATTR_ALL,
        },
        Tmessage::Setattr { fid: 2, attr: sa },
        Tmessage::Xattrwalk {
            fid: 1,
            newfid: 9,
            name: b"user.a",
        },
        Tmessage::Xattrcreate {
            fid: 1,
            name: b"user.a",
            size: 4,
            flags: 0,
        },
        Tmessage::Readdir {
            fid: 3,
            offset: 0,
            count: 500,
        },
        Tmessage::Fsync {
            fid: 2,
            datasync: 0,
        },
        Tmessage::Lock { fid: 2, lock },
        Tmessage::Getlock { fid: 2, lock },
        Tmessage::Link {
            dfid: 3,
            fid: 5,
            name: b"hl",
        },
        Tmessage::Mkdir {
            dfid: 1,
            name: b"nd",
            mode: 0o755,
            gid: 0,
        },
        Tmessage::Renameat {
            olddirfid: 1,
            oldname: b"file",
            newdirfid: 3,
            newname: b"f3",
        },
        Tmessage::Unlinkat {
            dirfid: 1,
            name: b"dir",
            flags: 0x200,
        },
    ];
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let mut b = Vec::new();
            m.encode(i as u16, &mut b);
            b
        })
        .collect()
}

/// Interesting values to splice into fields.
const MAGIC: [u64; 10] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// Mutates a seed: bit flips, byte sets, interesting integers, truncation, insertion, splicing
/// with another seed; the size field is usually fixed up so the body is what gets exercised.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut m = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !m.is_empty() => {
                let i = rng.below(m.len());
                m[i] ^= 1 << rng.below(8);
            }
            1 if !m.is_empty() => {
                let i = rng.below(m.len());
                m[i] = rng.next_u64() as u8;
            }
            2 if m.len() > 8 => {
                let v = MAGIC[rng.below(MAGIC.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                let i = rng.below(m.len());
                let n = w.min(m.len() - i);
                m[i..i + n].copy_from_slice(&v[..n]);
            }
            3 => {
                let n = rng.below(m.len() + 1);
                m.truncate(n);
            }
            4 => {
                let i = rng.below(m.len() + 1);
                let extra: Vec<u8> = (0..rng.below(40)).map(|_| rng.next_u64() as u8).collect();
                m.splice(i..i, extra);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                if other.len() > 7 && m.len() > 7 {
                    let from = 7 + rng.below(other.len() - 7);
                    let to = 7 + rng.below(m.len() - 7);
                    m.truncate(to);
                    m.extend_from_slice(&other[from..]);
                }
            }
            6 if m.len() > 4 => {
                // Change the type to any type, known or not.
                m[4] = rng.next_u64() as u8;
            }
            _ if m.len() > 7 => {
                // Point at another fid.
                let f = [0u32, 1, 2, 3, 4, 5, 9, wire::NOFID][rng.below(8)];
                let n = 4.min(m.len() - 7);
                m[7..7 + n].copy_from_slice(&f.to_le_bytes()[..n]);
            }
            _ => {}
        }
    }
    if m.len() >= 4 && rng.below(8) != 0 {
        let n = m.len() as u32;
        m[..4].copy_from_slice(&n.to_le_bytes());
    }
    m
}

/// Runs the mutation loop for up to `iters` inputs or `secs` seconds, whichever comes first.
/// Returns the number of inputs run.
pub fn run(seed: u64, iters: u64, secs: f64, read_only: bool) -> Result<u64, FuzzFailure> {
    let seeds = seeds();
    let mut rng = Rng::new(seed);
    let mut t = Target::new(read_only)?;
    let start = std::time::Instant::now();
    let mut done = 0;
    while done < iters && start.elapsed().as_secs_f64() < secs {
        let m = mutate(&mut rng, &seeds);
        t.run_one(&m)?;
        done += 1;
        if done % 512 == 0 {
            t.check_confined()?;
            t.reset()?;
        }
    }
    t.check_confined()?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_and_answered() {
        let mut t = Target::new(false).unwrap();
        for s in seeds() {
            assert!(wire::Tmessage::decode(&s).is_ok());
            t.run_one(&s).unwrap();
        }
        t.check_confined().unwrap();
    }

    #[test]
    fn short_fuzz_run_finds_nothing() {
        assert_eq!(run(42, 3000, 60.0, false).unwrap(), 3000);
        assert_eq!(run(7, 1000, 60.0, true).unwrap(), 1000);
    }

    #[test]
    fn run_bytes_splits_concatenated_messages() {
        let mut t = Target::new(false).unwrap();
        let all: Vec<u8> = seeds().concat();
        t.run_bytes(&all).unwrap();
        t.run_bytes(&[1, 2, 3]).unwrap();
        t.run_bytes(&[0xff; 100]).unwrap();
    }
}
