//! The assembly memo: what a warm [`crate::prepare`] checks instead of assembling the tree.
//!
//! Assembling the appliance tree walks every default tool's ELF closure (hundreds of opens,
//! reads, `readlink`s and `stat`s) only to find that the cache key is the one of the last run.
//! After a walk, the memo records the key together with everything the walk's answer depends
//! on, each as a *witness*: a path and what `lstat` said about it then:
//!
//! * every host file packed (kind, device, inode, mode, size, mtime, ctime) and every host
//!   symlink on the way to one (a changed link is a new inode with a new ctime);
//! * every directory in the tree (kind, device, inode: its listing is not packed);
//! * every path looked at and passed over: programs absent from earlier `PATH` entries,
//!   library candidates absent or not x86-64 ELF, the optional files (`/bin/sh`, magic
//!   databases, `ld.so.cache`). Such a path appearing, or changing, may change the closure.
//!   One that exists is witnessed itself (a `chmod +x` changes its ctime); an absent one by
//!   its directory, looked up through symlinks (device, inode, mtime, ctime: creating,
//!   removing or renaming an entry changes the directory's mtime and ctime; a missing
//!   directory is witnessed as missing), so the hundreds of tools absent from each `PATH`
//!   entry cost one `stat` per directory.
//!
//! The memo file is named by a hash of the walk's other inputs (format version, tool lists,
//! `--with` programs, `PATH`, the working directory when a `--with` path is relative, the
//! library search directories from `ld.so.conf`, the init's path and content hash). A warm run
//! recomputes that hash, reads the memo and `lstat`s each witness; any difference, an
//! unreadable memo or a path it cannot write (a newline in it) means a full walk, which writes
//! a new memo. Since any write to a file changes its ctime (which no user can set) and any
//! replacement changes its inode, a content change of a packed program or library always
//! reaches the key. A walk whose witnesses changed within the last [`RACY_SECS`] seconds
//! writes no memo (a file rewritten within one timestamp tick of the walk could otherwise keep
//! its stamp), nor does one where a packed file changed between being added and being
//! witnessed.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::tree::{HostStamp, Node, Tree};

/// Bumped whenever the memo's format or the set of witnesses changes.
const MEMO_VERSION: u32 = 2;

/// Witnesses changed less than this many seconds before the walk make it write no memo.
pub const RACY_SECS: i64 = 2;

/// How many memos to keep (one per set of inputs, e.g. per `--with` list).
const KEEP_MEMOS: usize = 16;

/// How a witness looks at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// `lstat`, every field a change to the object changes (files, symlinks, paths passed
    /// over that exist).
    Full,
    /// `lstat`, only which object it is (the tree's directories: their listing is not packed).
    Identity,
    /// `stat` through symlinks, the directory and its every change (the directories holding
    /// absent paths passed over: creating, removing or renaming an entry changes the
    /// directory's mtime and ctime).
    Listing,
}

impl Look {
    const ALL: [(Look, &'static str); 3] = [
        (Look::Full, "f"),
        (Look::Identity, "i"),
        (Look::Listing, "d"),
    ];

    fn code(self) -> &'static str {
        Look::ALL
            .iter()
            .find(|(l, _)| *l == self)
            .map_or("?", |(_, c)| c)
    }

    fn from_code(code: &str) -> Option<Look> {
        Look::ALL.iter().find(|(_, c)| *c == code).map(|(l, _)| *l)
    }

    fn see(self, path: &Path) -> Seen {
        let m = match self {
            Look::Full | Look::Identity => fs::symlink_metadata(path),
            Look::Listing => fs::metadata(path),
        };
        let Ok(m) = m else {
            return Seen::Absent;
        };
        let full = self != Look::Identity;
        Seen::Present {
            mode: m.mode(),
            dev: m.dev(),
            ino: m.ino(),
            size: if full { m.size() } else { 0 },
            mtime: if full {
                (m.mtime(), m.mtime_nsec())
            } else {
                (0, 0)
            },
            ctime: if full {
                (m.ctime(), m.ctime_nsec())
            } else {
                (0, 0)
            },
        }
    }
}

/// What a witness saw (the fields its [`Look`] does not take are zero).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Nothing there (or not reachable).
    Absent,
    Present {
        mode: u32,
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
}

impl Seen {
    /// The latest of mtime and ctime, in seconds (for the racy check).
    fn latest_change(&self) -> Option<i64> {
        match self {
            Seen::Present { mtime, ctime, .. } => Some(mtime.0.max(ctime.0)),
            Seen::Absent => None,
        }
    }

    fn encode(&self) -> String {
        match self {
            Seen::Absent => "a".into(),
            Seen::Present {
                mode,
                dev,
                ino,
                size,
                mtime,
                ctime,
            } => format!(
                "{mode} {dev} {ino} {size} {} {} {} {}",
                mtime.0, mtime.1, ctime.0, ctime.1
            ),
        }
    }

    fn decode(fields: &[&str]) -> Option<Seen> {
        let n = |i: usize| fields.get(i)?.parse::<i64>().ok();
        let u = |i: usize| fields.get(i)?.parse::<u64>().ok();
        match fields.len() {
            1 if fields[0] == "a" => Some(Seen::Absent),
            8 => Some(Seen::Present {
                mode: fields[0].parse().ok()?,
                dev: u(1)?,
                ino: u(2)?,
                size: u(3)?,
                mtime: (n(4)?, n(5)?),
                ctime: (n(6)?, n(7)?),
            }),
            _ => None,
        }
    }
}

/// One path the walk's answer depends on, how it was looked at and what was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Witness {
    path: PathBuf,
    look: Look,
    seen: Seen,
}

impl Witness {
    fn new(path: PathBuf, look: Look) -> Witness {
        let seen = look.see(&path);
        Witness { path, look, seen }
    }

    /// `<look> <seen fields>\t<path>` (the path last: it may hold any byte but a newline).
    fn encode(&self) -> Option<Vec<u8>> {
        let path = self.path.as_os_str().as_bytes();
        if path.contains(&b'\n') {
            return None;
        }
        let mut line = format!("{} {}\t", self.look.code(), self.seen.encode()).into_bytes();
        line.extend_from_slice(path);
        line.push(b'\n');
        Some(line)
    }

    fn decode(line: &[u8]) -> Option<Witness> {
        let tab = line.iter().position(|b| *b == b'\t')?;
        let fields: Vec<&str> = std::str::from_utf8(&line[..tab]).ok()?.split(' ').collect();
        let (look, seen) = fields.split_first()?;
        Some(Witness {
            look: Look::from_code(look)?,
            seen: Seen::decode(seen)?,
            path: PathBuf::from(std::ffi::OsStr::from_bytes(&line[tab + 1..])),
        })
    }

    /// Whether the path still looks as it did.
    fn holds(&self) -> bool {
        self.look.see(&self.path) == self.seen
    }
}

/// The paths a finished walk depends on: the tree's host files, symlinks and directories, and
/// the paths it passed over. `None` when a packed file changed since it was added (the key may
/// then be stale: write no memo).
fn witnesses(tree: &Tree, passed_over: &[PathBuf]) -> Option<Vec<Witness>> {
    let mut out = Vec::with_capacity(tree.len() + passed_over.len());
    for (path, node) in tree.iter() {
        let guest = Path::new("/").join(path);
        match node {
            Node::HostFile { host, stamp, .. } => {
                let now = fs::symlink_metadata(host).ok()?;
                if HostStamp::of(&now) != *stamp || !now.is_file() {
                    return None;
                }
                out.push(Witness::new(host.clone(), Look::Full));
            }
            // Host symlinks keep the guest path; the ones made for the guest PATH are witnessed
            // at that path too (normally absent on the host), which costs nothing.
            Node::Symlink(_) => out.push(Witness::new(guest, Look::Full)),
            Node::Dir => out.push(Witness::new(guest, Look::Identity)),
            Node::Bytes { .. } | Node::CharDev { .. } => {}
        }
    }
    // An absent path is witnessed by its directory's listing (one witness for the many tools
    // absent from each PATH entry); a path that exists, by itself.
    let mut listings = std::collections::BTreeSet::new();
    for p in passed_over {
        let w = Witness::new(p.clone(), Look::Full);
        match (&w.seen, p.parent()) {
            (Seen::Absent, Some(dir)) => {
                listings.insert(dir.to_path_buf());
            }
            _ => out.push(w),
        }
    }
    out.extend(listings.into_iter().map(|d| Witness::new(d, Look::Listing)));
    Some(out)
}

/// Where the memo for `inputs` lives.
fn memo_path(dir: &Path, inputs: &str) -> PathBuf {
    dir.join("memo").join(inputs)
}

/// The key the memo for `inputs` records, if every witness is still as it was.
pub fn recall(dir: &Path, inputs: &str) -> Option<String> {
    let text = fs::read(memo_path(dir, inputs)).ok()?;
    let mut lines = text.split(|b| *b == b'\n');
    let header = std::str::from_utf8(lines.next()?).ok()?;
    let mut h = header.split(' ');
    if h.next()? != "bootbox-assembly-memo"
        || h.next()? != MEMO_VERSION.to_string()
        || h.next()? != inputs
    {
        return None;
    }
    let key = h.next()?;
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) || h.next().is_some() {
        return None;
    }
    let mut complete = false;
    for line in lines {
        if line == b"end" {
            complete = true;
            continue;
        }
        if line.is_empty() && complete {
            continue;
        }
        if complete {
            return None;
        }
        if !Witness::decode(line)?.holds() {
            return None;
        }
    }
    complete.then(|| key.to_string())
}

/// Records that the walk of `tree` (which passed over `passed_over`) gave `key`. Best effort:
/// a memo that cannot be written only costs a walk next time.
pub fn remember(dir: &Path, inputs: &str, key: &str, tree: &Tree, passed_over: &[PathBuf]) {
    let Some(ws) = witnesses(tree, passed_over) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(i64::MAX);
    if ws
        .iter()
        .filter_map(|w| w.seen.latest_change())
        .any(|t| t > now - RACY_SECS)
    {
        return;
    }
    let mut text = format!("bootbox-assembly-memo {MEMO_VERSION} {inputs} {key}\n").into_bytes();
    for w in &ws {
        let Some(line) = w.encode() else {
            return;
        };
        text.extend_from_slice(&line);
    }
    text.extend_from_slice(b"end\n");
    let memo_dir = dir.join("memo");
    if fs::create_dir_all(&memo_dir).is_err() {
        return;
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tmp = memo_dir.join(format!(
        ".{inputs}.tmp.{}.{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    if fs::write(&tmp, &text).is_err() || fs::rename(&tmp, memo_path(dir, inputs)).is_err() {
        let _ = fs::remove_file(&tmp);
        return;
    }
    prune(&memo_dir);
}

/// Keeps the [`KEEP_MEMOS`] most recently written memos.
fn prune(memo_dir: &Path) {
    let Ok(rd) = fs::read_dir(memo_dir) else {
        return;
    };
    let mut memos: Vec<(SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| !e.file_name().as_bytes().starts_with(b"."))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    memos.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (_, p) in memos.into_iter().skip(KEEP_MEMOS) {
        let _ = fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    /// A tree with one host file.
    fn setup() -> (tempfile::TempDir, PathBuf, Tree) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("prog");
        fs::write(&f, b"one").unwrap();
        let mut t = Tree::new();
        t.add_host_file_as("/bin/prog", &f, None).unwrap();
        (d, f, t)
    }

    #[test]
    fn witnesses_round_trip_through_their_encoding() {
        let d = tempfile::tempdir().unwrap();
        for (p, look) in [
            (d.path().to_path_buf(), Look::Identity),
            (d.path().to_path_buf(), Look::Listing),
            (d.path().to_path_buf(), Look::Full),
            (d.path().join("nothing"), Look::Full),
            (d.path().join("nothing"), Look::Listing),
        ] {
            let w = Witness::new(p, look);
            let line = w.encode().unwrap();
            assert_eq!(Witness::decode(&line[..line.len() - 1]), Some(w.clone()));
            assert!(w.holds());
        }
        assert_eq!(Witness::decode(b"f 1 2\t/x"), None);
        assert_eq!(Witness::decode(b"x a\t/x"), None);
        assert_eq!(Witness::decode(b"f a /x"), None);
        assert_eq!(
            Witness::new(PathBuf::from("/a\nb"), Look::Full).encode(),
            None
        );
    }

    #[test]
    fn a_fresh_walk_writes_no_memo() {
        // The file's ctime is now: a rewrite within the same tick could keep its stamp.
        let (d, _f, t) = setup();
        remember(d.path(), "inputs", KEY, &t, &[]);
        assert!(!memo_path(d.path(), "inputs").exists());
    }

    /// Writes a memo as `remember` would, without the racy check (tests cannot wait for
    /// ctime to age).
    fn write_unchecked(dir: &Path, inputs: &str, t: &Tree, passed_over: &[PathBuf]) {
        fs::create_dir_all(dir.join("memo")).unwrap();
        let ws = witnesses(t, passed_over).unwrap();
        let mut text =
            format!("bootbox-assembly-memo {MEMO_VERSION} {inputs} {KEY}\n").into_bytes();
        for w in &ws {
            text.extend_from_slice(&w.encode().unwrap());
        }
        text.extend_from_slice(b"end\n");
        fs::write(memo_path(dir, inputs), text).unwrap();
    }

    #[test]
    fn the_memo_holds_until_a_packed_file_changes() {
        let (d, f, t) = setup();
        write_unchecked(d.path(), "inputs", &t, &[]);
        assert_eq!(recall(d.path(), "inputs").as_deref(), Some(KEY));
        assert_eq!(recall(d.path(), "other-inputs"), None);
        // Same size, mtime put back: the ctime (and nothing else) tells.
        let before = fs::metadata(&f).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, b"two").unwrap();
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(before)
            .unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
    }

    #[test]
    fn a_replaced_file_breaks_the_memo() {
        let (d, f, t) = setup();
        write_unchecked(d.path(), "inputs", &t, &[]);
        let other = d.path().join("other");
        fs::write(&other, b"one").unwrap();
        fs::rename(&other, &f).unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
    }

    #[test]
    fn a_passed_over_path_appearing_breaks_the_memo() {
        let (d, _f, t) = setup();
        let shadow = d.path().join("earlier-in-path");
        write_unchecked(d.path(), "inputs", &t, std::slice::from_ref(&shadow));
        assert_eq!(recall(d.path(), "inputs").as_deref(), Some(KEY));
        // Past the timestamp granularity, as the racy check ensures for real memos.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&shadow, b"#!/bin/sh\n").unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
    }

    #[test]
    fn a_passed_over_path_that_exists_is_witnessed_itself() {
        // A program passed over because it was not executable: chmod changes only its ctime.
        let (d, _f, t) = setup();
        let shadow = d.path().join("not-executable");
        fs::write(&shadow, b"#!/bin/sh\n").unwrap();
        write_unchecked(d.path(), "inputs", &t, std::slice::from_ref(&shadow));
        assert_eq!(recall(d.path(), "inputs").as_deref(), Some(KEY));
        std::thread::sleep(std::time::Duration::from_millis(20));
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&shadow, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
    }

    #[test]
    fn a_damaged_memo_is_not_trusted() {
        let (d, _f, t) = setup();
        write_unchecked(d.path(), "inputs", &t, &[]);
        let p = memo_path(d.path(), "inputs");
        let text = fs::read_to_string(&p).unwrap();
        // Cut before the end marker.
        fs::write(&p, text.replace("end\n", "")).unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
        fs::write(&p, text.replacen(KEY, "nothex", 1)).unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
        fs::write(
            &p,
            text.replacen("\tf ", "\tz ", 1).replacen("\nf ", "\nz ", 1),
        )
        .unwrap();
        assert_eq!(recall(d.path(), "inputs"), None);
        fs::write(&p, &text).unwrap();
        assert_eq!(recall(d.path(), "inputs").as_deref(), Some(KEY));
    }

    #[test]
    fn a_file_changed_during_the_walk_gives_no_witnesses() {
        let (_d, f, t) = setup();
        fs::write(&f, b"longer now").unwrap();
        assert_eq!(witnesses(&t, &[]), None);
    }
}
