//! Shared helpers for the p9 integration tests: temporary trees and direct calls to
//! `Server::handle`.

#![allow(dead_code)]

use p9::wire::{self, Rmessage, Tmessage, WalkNames};
use p9::{Config, Server, VecReply};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A temporary directory (removed on drop) with helpers to fill it.
pub struct TempTree {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TempTree {
    pub fn new(tag: &str) -> TempTree {
        let dir = tempfile::Builder::new()
            .prefix(&format!("p9-test-{tag}-"))
            .tempdir()
            .unwrap();
        TempTree {
            path: dir.path().to_path_buf(),
            _dir: dir,
        }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
    pub fn file(&self, p: &str, data: &[u8]) -> PathBuf {
        let f = self.join(p);
        if let Some(d) = f.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&f, data).unwrap();
        f
    }
}

/// A server plus helpers that encode requests and decode replies.
pub struct Harness {
    pub srv: Arc<Server>,
    tag: u16,
}

pub const ROOT: u32 = 1;

impl Harness {
    pub fn new(root: &Path, config: Config) -> Harness {
        Harness::attached(Server::new(root, config).unwrap())
    }

    /// Negotiates the version and attaches fid [`ROOT`] on `srv`.
    pub fn attached(srv: Arc<Server>) -> Harness {
        let mut h = Harness { srv, tag: 0 };
        match h.call(&Tmessage::Version {
            msize: 65536,
            version: b"9P2000.L",
        }) {
            Ok(Rmessage::Version { msize: 65536, .. }) => {}
            other => panic!("version failed: {other:?}"),
        }
        match h.call(&Tmessage::Attach {
            fid: ROOT,
            afid: wire::NOFID,
            uname: b"root",
            aname: b"",
            n_uname: 0,
        }) {
            Ok(Rmessage::Attach { .. }) => {}
            other => panic!("attach failed: {other:?}"),
        }
        h
    }

    /// Sends raw bytes; returns the raw reply.
    pub fn raw(&self, req: &[u8]) -> Vec<u8> {
        let mut r = VecReply::new(self.srv.msize() as usize);
        let n = self.srv.handle(req, &mut r);
        r.as_slice()[..n].to_vec()
    }

    /// Calls with a fresh tag, checks the tag of the reply, and maps Rlerror to Err(errno).
    pub fn call(&mut self, m: &Tmessage<'_>) -> Result<Rmessage<'static>, i32> {
        self.tag = self.tag.wrapping_add(1) % 0xff00;
        let mut b = Vec::new();
        m.encode(self.tag, &mut b);
        let rep = self.raw(&b);
        let (tag, r) = Rmessage::decode(&rep).expect("server reply must decode");
        assert_eq!(tag, self.tag, "reply tag must match request tag");
        match r {
            Rmessage::Lerror { ecode } => Err(ecode as i32),
            r => Ok(r.into_owned()),
        }
    }

    pub fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> Result<Vec<wire::Qid>, i32> {
        let b: Vec<&[u8]> = names.iter().map(|s| s.as_bytes()).collect();
        match self.call(&Tmessage::Walk {
            fid,
            newfid,
            names: WalkNames::new(&b).unwrap(),
        })? {
            Rmessage::Walk { qids } => Ok(qids.into_owned()),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Walks from the root to a fresh fid and returns it.
    pub fn walk_to(&mut self, newfid: u32, path: &str) -> Result<u32, i32> {
        let names: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let q = self.walk(ROOT, newfid, &names)?;
        if q.len() != names.len() {
            return Err(libc::ENOENT);
        }
        Ok(newfid)
    }

    pub fn getattr(&mut self, fid: u32) -> Result<wire::Attr, i32> {
        match self.call(&Tmessage::Getattr {
            fid,
            mask: wire::GETATTR_BASIC,
        })? {
            Rmessage::Getattr(a) => Ok(a),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn lopen(&mut self, fid: u32, flags: u32) -> Result<wire::Qid, i32> {
        match self.call(&Tmessage::Lopen { fid, flags })? {
            Rmessage::Lopen { qid, .. } => Ok(qid),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn read(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<u8>, i32> {
        match self.call(&Tmessage::Read { fid, offset, count })? {
            Rmessage::Read { data } => Ok(data.into_owned()),
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn readdir_all(&mut self, fid: u32, count: u32) -> Result<Vec<wire::DirEntry>, i32> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let data = match self.call(&Tmessage::Readdir { fid, offset, count })? {
                Rmessage::Readdir { data } => data,
                other => panic!("unexpected {other:?}"),
            };
            let e = wire::parse_dirents(&data).unwrap();
            match e.last() {
                None => return Ok(all),
                Some(l) => offset = l.offset,
            }
            all.extend(e);
        }
    }

    pub fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Result<Rmessage<'static>, i32> {
        self.call(&Tmessage::Write { fid, offset, data })
    }

    /// Tlcreate: `fid` (a directory) becomes the new file, opened with `flags`.
    pub fn lcreate(
        &mut self,
        fid: u32,
        name: &[u8],
        flags: u32,
        mode: u32,
        gid: u32,
    ) -> Result<Rmessage<'static>, i32> {
        self.call(&Tmessage::Lcreate {
            fid,
            name,
            flags,
            mode,
            gid,
        })
    }

    pub fn mkdir(
        &mut self,
        dfid: u32,
        name: &[u8],
        mode: u32,
        gid: u32,
    ) -> Result<Rmessage<'static>, i32> {
        self.call(&Tmessage::Mkdir {
            dfid,
            name,
            mode,
            gid,
        })
    }

    pub fn setattr(&mut self, fid: u32, attr: wire::SetAttr) -> Result<Rmessage<'static>, i32> {
        self.call(&Tmessage::Setattr { fid, attr })
    }

    /// Tlink: a hard link to `fid` named `name` in directory `dfid`.
    pub fn link(&mut self, dfid: u32, fid: u32, name: &[u8]) -> Result<Rmessage<'static>, i32> {
        self.call(&Tmessage::Link { dfid, fid, name })
    }

    pub fn clunk(&mut self, fid: u32) -> Result<(), i32> {
        self.call(&Tmessage::Clunk { fid }).map(|_| ())
    }
}

/// Tattach of `fid` to the share root with no user name and no authentication fid.
pub fn anonymous_attach(fid: u32) -> Tmessage<'static> {
    Tmessage::Attach {
        fid,
        afid: wire::NOFID,
        uname: b"",
        aname: b"",
        n_uname: 0,
    }
}

pub fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).unwrap().ino()
}
