//! The appliance's file tree: what goes into the initramfs, under which guest path.
//!
//! Host files are added by their host path; every symlink met while resolving that path is
//! recorded as a symlink (so `/lib64/ld-linux-x86-64.so.2 -> /lib/...` and merged-/usr links
//! like `/bin -> usr/bin` survive), and the real file is added at its real path. Entries are
//! kept sorted, so writing the tree gives a deterministic cpio with parents before children.
//! The tree also feeds a stable fingerprint (paths, kinds, link targets, and each host file's
//! size, mtime, ctime, device and inode) into the cache key.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::cpio::{CpioError, CpioWriter};
use crate::sha256::Sha256;

/// Errors while assembling the tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// A host path could not be examined.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// Two different things were put at the same guest path.
    #[error("appliance path /{0} is claimed by two different entries (e.g. a file and a symlink); remove the conflicting --with program")]
    Conflict(String),
    /// Resolving symlinks did not terminate.
    #[error("{0}: too many levels of symbolic links")]
    SymlinkLoop(PathBuf),
    /// A path is not valid UTF-8 or not usable inside the appliance.
    #[error(
        "{0}: path is not valid UTF-8 or is not a plain absolute path; rename it or leave it out"
    )]
    BadPath(PathBuf),
    /// A path component that must be a directory is a file.
    #[error("{0}: a path component is not a directory")]
    NotADirectory(PathBuf),
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir,
    /// A regular file copied from the host.
    HostFile {
        /// Where to read it.
        host: PathBuf,
        /// Permission bits.
        perm: u32,
        /// What the file was when added (for the cache key).
        stamp: HostStamp,
    },
    /// A regular file with given contents.
    Bytes {
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        perm: u32,
    },
    /// A symbolic link.
    Symlink(String),
    /// A character device node.
    CharDev {
        /// Permission bits.
        perm: u32,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// What a host file was when it was added: everything a change to it changes. No user can
/// set the ctime, so every rewrite of the file changes it; a file replaced by another one
/// (rename over it) has a new inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStamp {
    pub size: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time in nanoseconds since the epoch.
    pub ctime_ns: i128,
    pub dev: u64,
    pub ino: u64,
}

impl HostStamp {
    /// The stamp of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> HostStamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        HostStamp {
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    fn fingerprint(&self, h: &mut Sha256) {
        h.field(&self.size.to_le_bytes());
        h.field(&self.mtime_ns.to_le_bytes());
        h.field(&self.ctime_ns.to_le_bytes());
        h.field(&self.dev.to_le_bytes());
        h.field(&self.ino.to_le_bytes());
    }
}

/// A sorted set of guest paths (stored relative, without the leading `/`).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn rel(path: &str) -> Result<String, TreeError> {
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => parts.push(
                n.to_str()
                    .ok_or_else(|| TreeError::BadPath(PathBuf::from(path)))?,
            ),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(TreeError::BadPath(PathBuf::from(path)))
            }
        }
    }
    if parts.is_empty() {
        return Err(TreeError::BadPath(PathBuf::from(path)));
    }
    Ok(parts.join("/"))
}

fn to_str(p: &Path) -> Result<&str, TreeError> {
    p.to_str()
        .ok_or_else(|| TreeError::BadPath(p.to_path_buf()))
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Tree::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True if the tree has no entries.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Looks up a guest path like `/usr/bin/ls`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        rel(path).ok().and_then(|r| self.nodes.get(&r))
    }

    /// Iterates `(relative path, node)` in archive order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.nodes.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), TreeError> {
        let r = rel(path)?;
        // Parents must be directories.
        let mut idx = 0;
        while let Some(pos) = r[idx..].find('/') {
            let parent = &r[..idx + pos];
            match self.nodes.get(parent) {
                None => {
                    self.nodes.insert(parent.to_string(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => return Err(TreeError::Conflict(parent.to_string())),
            }
            idx += pos + 1;
        }
        match self.nodes.get(&r) {
            None => {
                self.nodes.insert(r, node);
                Ok(())
            }
            Some(old) if *old == node => Ok(()),
            Some(_) => Err(TreeError::Conflict(r)),
        }
    }

    /// Adds a directory (and its parents).
    pub fn add_dir(&mut self, path: &str) -> Result<(), TreeError> {
        self.insert(path, Node::Dir)
    }

    /// Adds a file with the given contents.
    pub fn add_bytes(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), TreeError> {
        self.insert(path, Node::Bytes { data, perm })
    }

    /// Adds a symlink.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.insert(path, Node::Symlink(target.to_string()))
    }

    /// Adds a character device node.
    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), TreeError> {
        self.insert(path, Node::CharDev { perm, major, minor })
    }

    /// Adds the host regular file `host` at guest path `path` (following symlinks on the host).
    pub fn add_host_file_as(
        &mut self,
        path: &str,
        host: &Path,
        perm: Option<u32>,
    ) -> Result<(), TreeError> {
        let meta = std::fs::metadata(host).map_err(|source| TreeError::Io {
            path: host.to_path_buf(),
            source,
        })?;
        let node = Node::HostFile {
            host: host.to_path_buf(),
            perm: perm.unwrap_or(meta.mode() & 0o7777),
            stamp: HostStamp::of(&meta),
        };
        self.insert(path, node)
    }

    /// Adds host path `host` at the same guest path, keeping every symlink on the way as a
    /// symlink and adding what it points to. Directories are added empty. Returns the real
    /// (symlink-free) host path reached.
    pub fn add_host_path(&mut self, host: &Path) -> Result<PathBuf, TreeError> {
        if !host.is_absolute() {
            return Err(TreeError::BadPath(host.to_path_buf()));
        }
        let mut pending: VecDeque<OsString> = VecDeque::new();
        for c in host.components() {
            match c {
                Component::Normal(n) => pending.push_back(n.to_os_string()),
                Component::ParentDir => pending.push_back(OsString::from("..")),
                _ => {}
            }
        }
        let mut real = PathBuf::from("/");
        let mut hops = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                real.pop();
                continue;
            }
            if c == "." {
                continue;
            }
            let next = real.join(&c);
            let meta = std::fs::symlink_metadata(&next).map_err(|source| TreeError::Io {
                path: next.clone(),
                source,
            })?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                hops += 1;
                if hops > 40 {
                    return Err(TreeError::SymlinkLoop(host.to_path_buf()));
                }
                let target = std::fs::read_link(&next).map_err(|source| TreeError::Io {
                    path: next.clone(),
                    source,
                })?;
                self.add_symlink(to_str(&next)?, to_str(&target)?)?;
                if target.is_absolute() {
                    real = PathBuf::from("/");
                }
                let comps: Vec<OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                for c in comps.into_iter().rev() {
                    pending.push_front(c);
                }
            } else if ft.is_dir() {
                self.add_dir(to_str(&next)?)?;
                real = next;
            } else {
                if !pending.is_empty() {
                    return Err(TreeError::NotADirectory(next));
                }
                self.add_host_file_as(to_str(&next)?, &next, None)?;
                real = next;
            }
        }
        Ok(real)
    }

    /// Feeds every entry into `h` (paths, kinds, sizes, mtimes, targets; not file contents).
    pub fn fingerprint(&self, h: &mut Sha256) {
        for (path, node) in &self.nodes {
            h.field(path.as_bytes());
            match node {
                Node::Dir => h.field(b"d"),
                Node::HostFile { host, perm, stamp } => {
                    h.field(b"f");
                    h.field(host.as_os_str().as_bytes());
                    h.field(&perm.to_le_bytes());
                    stamp.fingerprint(h);
                }
                Node::Bytes { data, perm } => {
                    h.field(b"b");
                    h.field(&perm.to_le_bytes());
                    h.field(data);
                }
                Node::Symlink(t) => {
                    h.field(b"l");
                    h.field(t.as_bytes());
                }
                Node::CharDev { perm, major, minor } => {
                    h.field(b"c");
                    h.field(&perm.to_le_bytes());
                    h.field(&major.to_le_bytes());
                    h.field(&minor.to_le_bytes());
                }
            }
        }
    }

    /// Writes the whole tree as a newc archive (with trailer) and returns the output.
    pub fn write_cpio<W: Write>(&self, out: W) -> Result<W, CpioError> {
        let mut w = CpioWriter::new(out);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => w.add_dir(path, 0o755)?,
                Node::HostFile { host, perm, .. } => w.add_file(path, *perm, host)?,
                Node::Bytes { data, perm } => w.add_bytes(path, *perm, data)?,
                Node::Symlink(t) => w.add_symlink(path, t)?,
                Node::CharDev { perm, major, minor } => {
                    w.add_char_device(path, *perm, *major, *minor)?
                }
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_sorted_first() {
        let mut t = Tree::new();
        t.add_bytes("/a/b/c", 0o644, b"x".to_vec()).unwrap();
        t.add_dir("/a-b").unwrap();
        let paths: Vec<&str> = t.iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["a", "a-b", "a/b", "a/b/c"]);
    }

    #[test]
    fn conflicts_are_reported() {
        let mut t = Tree::new();
        t.add_symlink("/bin", "usr/bin").unwrap();
        t.add_symlink("/bin", "usr/bin").unwrap();
        assert!(matches!(t.add_dir("/bin"), Err(TreeError::Conflict(_))));
        assert!(matches!(
            t.add_bytes("/bin/x", 0o644, Vec::new()),
            Err(TreeError::Conflict(_))
        ));
        assert!(matches!(t.add_dir("/../x"), Err(TreeError::BadPath(_))));
    }

    #[test]
    fn host_symlinks_are_kept() {
        let base = std::env::temp_dir().join(format!("bootbox-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("real/lib")).unwrap();
        std::fs::write(base.join("real/lib/libx.so.1.2"), b"elf").unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", base.join("real/lib/libx.so.1")).unwrap();
        std::os::unix::fs::symlink("real/lib", base.join("lib")).unwrap();
        let mut t = Tree::new();
        let real = t.add_host_path(&base.join("lib/libx.so.1")).unwrap();
        assert_eq!(
            real,
            std::fs::canonicalize(base.join("real/lib/libx.so.1.2")).unwrap()
        );
        let b = base.to_str().unwrap();
        assert_eq!(
            t.get(&format!("{b}/lib")),
            Some(&Node::Symlink("real/lib".into()))
        );
        assert_eq!(
            t.get(&format!("{b}/real/lib/libx.so.1")),
            Some(&Node::Symlink("libx.so.1.2".into()))
        );
        assert!(matches!(
            t.get(&format!("{b}/real/lib/libx.so.1.2")),
            Some(Node::HostFile {
                stamp: HostStamp { size: 3, .. },
                ..
            })
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
