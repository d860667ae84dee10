//! ELF dependency closure: which files a set of host programs needs in order to run.
//!
//! This module reads ELF64 little-endian x86_64 headers itself (program headers, `PT_INTERP`,
//! the dynamic section with `DT_NEEDED`, `DT_RPATH`, `DT_RUNPATH`) with bounds checks on every
//! access, and searches libraries the way the dynamic loader does: RPATH (when there is no
//! RUNPATH) of the object and of the objects that loaded it, RUNPATH of the object, the
//! directories of `/etc/ld.so.conf` (following `include`), then the default directories.
//! `$ORIGIN`, `$LIB` and `$PLATFORM` are expanded. Shell scripts are followed to their `#!`
//! interpreter. It never runs `ldd` or the loader.
//!
//! The result is a set of *host paths as they should appear in the appliance*: symlinks along
//! the way are reported as symlinks (see [`crate::tree`]), so `/lib64/ld-linux-x86-64.so.2`
//! stays a link to the real loader.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Errors while parsing ELF files or resolving programs.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// A program named with `--with` (or a default tool) is not on PATH.
    #[error("--with {0}: not found in PATH; install it on the host or give its full path")]
    NotInPath(String),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The file is an ELF file this tool cannot handle.
    #[error("{path}: {why}; only x86_64 ELF64 little-endian programs can run in the appliance")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why it is unsupported.
        why: String,
    },
    /// The ELF file is damaged.
    #[error("{path}: malformed ELF file: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A needed shared library was not found in any search directory.
    #[error("{needed}: needed by {by}, not found in its RPATH/RUNPATH, /etc/ld.so.conf or the default library directories")]
    LibraryNotFound {
        /// DT_NEEDED name.
        needed: String,
        /// The object that needs it.
        by: PathBuf,
    },
    /// A script's `#!` interpreter does not exist on the host.
    #[error("{script}: its #! interpreter {interp} does not exist on the host; install it")]
    MissingInterpreter {
        /// The interpreter named on the `#!` line.
        interp: String,
        /// The script.
        script: PathBuf,
    },
    /// A file is neither ELF nor a `#!` script.
    #[error("{0}: not an ELF executable or a #! script, so it cannot be run in the appliance")]
    NotExecutable(PathBuf),
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
const EM_X86_64: u16 = 62;
/// Upper bounds that keep a hostile file from making us allocate a lot.
const MAX_PHDRS: usize = 4096;
const MAX_DYN_BYTES: u64 = 1 << 20;
const MAX_STRTAB: u64 = 16 << 20;

/// What the dynamic loader needs to know about one ELF object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfInfo {
    /// `PT_INTERP` (the program interpreter), for executables.
    pub interp: Option<String>,
    /// `DT_NEEDED` entries, in order.
    pub needed: Vec<String>,
    /// `DT_RPATH` (colon-separated), if any.
    pub rpath: Option<String>,
    /// `DT_RUNPATH` (colon-separated), if any.
    pub runpath: Option<String>,
    /// True if the object has no `PT_DYNAMIC` (a static binary).
    pub is_static: bool,
}

/// What kind of file a program is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// An x86_64 ELF object.
    Elf(ElfInfo),
    /// A `#!` script with the interpreter and its optional argument.
    Script {
        /// Interpreter path.
        interp: String,
        /// Optional single argument (`#!/usr/bin/env python3` gives `python3`).
        arg: Option<String>,
    },
    /// Anything else.
    Other,
}

fn rd<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    rd::<2>(b, o).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    rd::<4>(b, o).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    rd::<8>(b, o).map(u64::from_le_bytes)
}

struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn read_at(f: &mut File, path: &Path, off: u64, len: u64) -> Result<Vec<u8>, ElfError> {
    let io = |source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    };
    f.seek(SeekFrom::Start(off)).map_err(io)?;
    let mut buf = Vec::new();
    f.take(len).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 != len {
        return Err(ElfError::Malformed {
            path: path.to_path_buf(),
            why: format!("{len} bytes at offset {off} lie beyond the end of the file"),
        });
    }
    Ok(buf)
}

/// Classifies `path`: ELF (with its dynamic info), `#!` script, or other.
pub fn inspect(path: &Path) -> Result<FileKind, ElfError> {
    let io = |source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let mut head = Vec::new();
    (&mut f).take(256).read_to_end(&mut head).map_err(io)?;
    if head.starts_with(b"#!") {
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split([' ', '\t']).filter(|s| !s.is_empty());
        let interp = match parts.next() {
            Some(i) => i.to_string(),
            None => return Ok(FileKind::Other),
        };
        let rest: Vec<&str> = parts.collect();
        let arg = if rest.is_empty() {
            None
        } else {
            Some(rest.join(" "))
        };
        return Ok(FileKind::Script { interp, arg });
    }
    if !head.starts_with(b"\x7fELF") {
        return Ok(FileKind::Other);
    }
    parse_elf(&mut f, path, &head).map(FileKind::Elf)
}

fn parse_elf(f: &mut File, path: &Path, head: &[u8]) -> Result<ElfInfo, ElfError> {
    let bad = |why: &str| ElfError::Malformed {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let unsupported = |why: String| ElfError::Unsupported {
        path: path.to_path_buf(),
        why,
    };
    if head.len() < 64 {
        return Err(bad("header is truncated"));
    }
    if head[4] != 2 {
        return Err(unsupported("it is a 32-bit ELF file".into()));
    }
    if head[5] != 1 {
        return Err(unsupported("it is a big-endian ELF file".into()));
    }
    let machine = u16_at(head, 18).ok_or_else(|| bad("no e_machine"))?;
    if machine != EM_X86_64 {
        return Err(unsupported(format!("e_machine is {machine}, not x86_64")));
    }
    let phoff = u64_at(head, 32).ok_or_else(|| bad("no e_phoff"))?;
    let phentsize = u16_at(head, 54).ok_or_else(|| bad("no e_phentsize"))? as usize;
    let phnum = u16_at(head, 56).ok_or_else(|| bad("no e_phnum"))? as usize;
    if phnum == 0 {
        return Ok(ElfInfo {
            is_static: true,
            ..ElfInfo::default()
        });
    }
    if phentsize < 56 || phnum > MAX_PHDRS {
        return Err(bad("implausible program header table"));
    }
    let table = read_at(f, path, phoff, (phentsize * phnum) as u64)?;
    let mut phdrs = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let b = i * phentsize;
        let field = |o: usize| u64_at(&table, b + o).ok_or_else(|| bad("program header"));
        phdrs.push(Phdr {
            p_type: u32_at(&table, b).ok_or_else(|| bad("program header"))?,
            offset: field(8)?,
            vaddr: field(16)?,
            filesz: field(32)?,
        });
    }
    let mut info = ElfInfo::default();
    if let Some(p) = phdrs.iter().find(|p| p.p_type == PT_INTERP) {
        if p.filesz == 0 || p.filesz > 4096 {
            return Err(bad("PT_INTERP has an implausible size"));
        }
        let raw = read_at(f, path, p.offset, p.filesz)?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let s = std::str::from_utf8(&raw[..end]).map_err(|_| bad("PT_INTERP is not UTF-8"))?;
        info.interp = Some(s.to_string());
    }
    let dynamic = match phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) {
        Some(d) => d,
        None => {
            info.is_static = true;
            return Ok(info);
        }
    };
    if dynamic.filesz > MAX_DYN_BYTES {
        return Err(bad("dynamic section is implausibly large"));
    }
    let dynbuf = read_at(f, path, dynamic.offset, dynamic.filesz)?;
    let mut strtab_addr = None;
    let mut strsz = None;
    let mut needed_off = Vec::new();
    let mut rpath_off = None;
    let mut runpath_off = None;
    for ent in dynbuf.chunks_exact(16) {
        let tag = u64_at(ent, 0).ok_or_else(|| bad("dynamic entry"))?;
        let val = u64_at(ent, 8).ok_or_else(|| bad("dynamic entry"))?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed_off.push(val),
            DT_STRTAB => strtab_addr = Some(val),
            DT_STRSZ => strsz = Some(val),
            DT_RPATH => rpath_off = Some(val),
            DT_RUNPATH => runpath_off = Some(val),
            _ => {}
        }
    }
    if needed_off.is_empty() && rpath_off.is_none() && runpath_off.is_none() {
        return Ok(info);
    }
    let strtab_addr = strtab_addr.ok_or_else(|| bad("DT_STRTAB missing"))?;
    let strsz = strsz.ok_or_else(|| bad("DT_STRSZ missing"))?;
    if strsz > MAX_STRTAB {
        return Err(bad("string table is implausibly large"));
    }
    // Map the string table's virtual address to a file offset through the PT_LOAD segments.
    let load = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .find(|p| strtab_addr >= p.vaddr && strtab_addr - p.vaddr < p.filesz)
        .ok_or_else(|| bad("DT_STRTAB is not inside any loaded segment"))?;
    let str_off = load
        .offset
        .checked_add(strtab_addr - load.vaddr)
        .ok_or_else(|| bad("DT_STRTAB offset overflows"))?;
    let avail = load.filesz - (strtab_addr - load.vaddr);
    let strtab = read_at(f, path, str_off, strsz.min(avail))?;
    let get = |off: u64| -> Result<String, ElfError> {
        let start = usize::try_from(off).map_err(|_| bad("string offset"))?;
        let rest = strtab
            .get(start..)
            .ok_or_else(|| bad("string offset beyond DT_STRSZ"))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("unterminated string"))?;
        String::from_utf8(rest[..end].to_vec()).map_err(|_| bad("string is not UTF-8"))
    };
    for off in needed_off {
        info.needed.push(get(off)?);
    }
    info.rpath = rpath_off.map(get).transpose()?;
    info.runpath = runpath_off.map(get).transpose()?;
    Ok(info)
}

/// The library directories from `/etc/ld.so.conf` (following `include` globs), then the
/// loader's default directories, without duplicates.
pub fn system_library_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut seen = BTreeSet::new();
    read_ld_so_conf(Path::new("/etc/ld.so.conf"), &mut dirs, &mut seen, 0);
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
    ] {
        let d = PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

fn read_ld_so_conf(file: &Path, dirs: &mut Vec<PathBuf>, seen: &mut BTreeSet<PathBuf>, depth: u32) {
    if depth > 8 || !seen.insert(file.to_path_buf()) {
        return;
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(_) => return,
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(pat) = line.strip_prefix("include") {
            if !pat.starts_with([' ', '\t']) {
                continue;
            }
            for pat in pat.split_whitespace() {
                let pat = if pat.starts_with('/') {
                    PathBuf::from(pat)
                } else {
                    Path::new("/etc").join(pat)
                };
                for f in glob_last_component(&pat) {
                    read_ld_so_conf(&f, dirs, seen, depth + 1);
                }
            }
        } else if line.starts_with("hwcap") {
            continue;
        } else {
            let d = PathBuf::from(line);
            if d.is_absolute() && !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
}

/// Expands `*` and `?` in the last path component only (enough for ld.so.conf includes).
fn glob_last_component(pat: &Path) -> Vec<PathBuf> {
    let name = match pat.file_name().and_then(|n| n.to_str()) {
        Some(n) => n,
        None => return Vec::new(),
    };
    if !name.contains(['*', '?']) {
        return vec![pat.to_path_buf()];
    }
    let dir = pat.parent().unwrap_or(Path::new("/"));
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_str().is_some_and(|n| wildmatch(name, n)))
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

fn wildmatch(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Finds `name` on the host: a path if it contains `/`, else the first executable regular
/// file in `$PATH` followed by the standard system directories.
pub fn find_program(name: &str) -> Result<PathBuf, ElfError> {
    find_program_probing(name, &mut Vec::new())
}

/// [`find_program`], also listing in `probed` every path it looked at and passed over (absent,
/// not a file or not executable): what would change its answer besides the answer itself.
pub fn find_program_probing(name: &str, probed: &mut Vec<PathBuf>) -> Result<PathBuf, ElfError> {
    if name.is_empty() {
        return Err(ElfError::NotInPath(name.to_string()));
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if p.is_file() {
            Ok(std::path::absolute(&p).unwrap_or(p))
        } else {
            Err(ElfError::NotInPath(name.to_string()))
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let std_dirs = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ];
    let dirs = std::env::split_paths(&path_var)
        .filter(|d| d.is_absolute())
        .chain(std_dirs.iter().map(PathBuf::from));
    for d in dirs {
        let cand = d.join(name);
        if is_executable_file(&cand) {
            return Ok(cand);
        }
        probed.push(cand);
    }
    Err(ElfError::NotInPath(name.to_string()))
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_x86_64_elf(p: &Path) -> bool {
    let mut head = [0u8; 20];
    match File::open(p).and_then(|mut f| f.read_exact(&mut head)) {
        Ok(()) => {
            head.starts_with(b"\x7fELF")
                && head[4] == 2
                && head[5] == 1
                && u16::from_le_bytes([head[18], head[19]]) == EM_X86_64
        }
        Err(_) => false,
    }
}

fn expand_tokens(dir: &str, origin: &Path) -> PathBuf {
    let origin = origin.to_string_lossy();
    let s = dir
        .replace("${ORIGIN}", &origin)
        .replace("$ORIGIN", &origin)
        .replace("${LIB}", "lib64")
        .replace("$LIB", "lib64")
        .replace("${PLATFORM}", "x86_64")
        .replace("$PLATFORM", "x86_64");
    PathBuf::from(s)
}

/// One object in the closure queue, with the RPATHs inherited from the objects that loaded it.
struct Pending {
    path: PathBuf,
    inherited_rpath: Vec<PathBuf>,
}

/// The files a set of programs needs, found by walking ELF headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// Every file (programs, interpreters, libraries), as host paths in the order discovered;
    /// symlinked paths are kept as given (the appliance tree records the links).
    pub files: Vec<PathBuf>,
    /// Library candidates looked at and passed over (absent or not x86-64 ELF) before the one
    /// taken, and programs looked up for `#!/usr/bin/env` scripts likewise: a change to any
    /// of them may change the closure.
    pub probed: Vec<PathBuf>,
}

/// Computes the closure of `programs` (host paths of existing files).
pub fn closure(programs: &[PathBuf]) -> Result<Closure, ElfError> {
    let sys_dirs = system_library_dirs();
    let mut out = Closure::default();
    let mut seen_files = BTreeSet::new();
    // Libraries are identified by their canonical path so one file reached through two names
    // is parsed once; every name used is still listed.
    let mut seen_real = BTreeSet::new();
    let mut queue: VecDeque<Pending> = programs
        .iter()
        .map(|p| Pending {
            path: p.clone(),
            inherited_rpath: Vec::new(),
        })
        .collect();
    while let Some(item) = queue.pop_front() {
        if seen_files.insert(item.path.clone()) {
            out.files.push(item.path.clone());
        }
        let real = std::fs::canonicalize(&item.path).map_err(|source| ElfError::Io {
            path: item.path.clone(),
            source,
        })?;
        if !seen_real.insert(real.clone()) {
            continue;
        }
        match inspect(&real)? {
            FileKind::Other => return Err(ElfError::NotExecutable(item.path)),
            FileKind::Script { interp, arg } => {
                let ip = PathBuf::from(&interp);
                if !ip.is_absolute() || !ip.exists() {
                    return Err(ElfError::MissingInterpreter {
                        interp,
                        script: item.path,
                    });
                }
                queue.push_back(Pending {
                    path: ip.clone(),
                    inherited_rpath: Vec::new(),
                });
                // `#!/usr/bin/env prog` runs prog from PATH: include it too.
                if ip.file_name().is_some_and(|n| n == "env") {
                    if let Some(a) = arg {
                        let prog = a
                            .split_whitespace()
                            .find(|w| !w.starts_with('-') && !w.contains('='));
                        if let Some(prog) = prog {
                            queue.push_back(Pending {
                                path: find_program_probing(prog, &mut out.probed)?,
                                inherited_rpath: Vec::new(),
                            });
                        }
                    }
                }
            }
            FileKind::Elf(info) => {
                let origin = real.parent().unwrap_or(Path::new("/")).to_path_buf();
                if let Some(interp) = &info.interp {
                    queue.push_back(Pending {
                        path: PathBuf::from(interp),
                        inherited_rpath: Vec::new(),
                    });
                }
                let split = |s: &Option<String>| -> Vec<PathBuf> {
                    s.as_deref()
                        .unwrap_or("")
                        .split(':')
                        .filter(|d| !d.is_empty())
                        .map(|d| expand_tokens(d, &origin))
                        .collect()
                };
                let own_rpath = split(&info.rpath);
                let runpath = split(&info.runpath);
                // DT_RPATH applies to this object and everything it loads, unless the object
                // has DT_RUNPATH, which disables RPATH for its own lookups.
                let mut rpath_chain = Vec::new();
                if runpath.is_empty() {
                    rpath_chain.extend(own_rpath.iter().cloned());
                    rpath_chain.extend(item.inherited_rpath.iter().cloned());
                }
                for needed in &info.needed {
                    let found = if needed.contains('/') {
                        let p = PathBuf::from(needed);
                        let p = if p.is_absolute() { p } else { origin.join(p) };
                        p.exists().then_some(p)
                    } else {
                        let probed = &mut out.probed;
                        rpath_chain
                            .iter()
                            .chain(runpath.iter())
                            .chain(sys_dirs.iter())
                            .map(|d| d.join(needed))
                            .find(|c| {
                                let ok = is_x86_64_elf(c);
                                if !ok {
                                    probed.push(c.clone());
                                }
                                ok
                            })
                    };
                    let lib = found.ok_or_else(|| ElfError::LibraryNotFound {
                        needed: needed.clone(),
                        by: item.path.clone(),
                    })?;
                    queue.push_back(Pending {
                        path: lib,
                        inherited_rpath: if runpath.is_empty() {
                            rpath_chain.clone()
                        } else {
                            item.inherited_rpath.clone()
                        },
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildmatch_works() {
        assert!(wildmatch("*.conf", "libc.conf"));
        assert!(!wildmatch("*.conf", "libc.conf.bak"));
        assert!(wildmatch("a?c", "abc"));
        assert!(wildmatch("*", ""));
    }

    #[test]
    fn ls_is_dynamic_with_libc() {
        let ls = find_program("ls").unwrap();
        match inspect(&ls).unwrap() {
            FileKind::Elf(info) => {
                assert!(info.interp.unwrap().contains("ld-linux"));
                assert!(info.needed.iter().any(|n| n.starts_with("libc.so")));
                assert!(!info.is_static);
            }
            other => panic!("ls is not ELF: {other:?}"),
        }
    }

    #[test]
    fn token_expansion() {
        assert_eq!(
            expand_tokens("$ORIGIN/../lib:${ORIGIN}", Path::new("/opt/x/bin")),
            PathBuf::from("/opt/x/bin/../lib:/opt/x/bin")
        );
    }

    #[test]
    fn missing_program_error_names_it() {
        let e = find_program("no-such-program-bootbox-xyz").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--with no-such-program-bootbox-xyz: not found in PATH; install it on the host or give its full path"
        );
    }

    #[test]
    fn non_elf_non_script_is_refused() {
        let dir = std::env::temp_dir().join(format!("bootbox-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("data.txt");
        std::fs::write(&f, b"just text").unwrap();
        assert!(matches!(
            closure(std::slice::from_ref(&f)),
            Err(ElfError::NotExecutable(_))
        ));
        let junk = dir.join("junk");
        std::fs::write(&junk, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(matches!(inspect(&junk), Err(ElfError::Malformed { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
