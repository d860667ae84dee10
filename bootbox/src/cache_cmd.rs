//! `bootbox cache list|clear`: the cached appliances (`<cache>/appliance/<key>.cpio`) and
//! warm-start snapshots (`<cache>/snapshot/<key>.snap`), with their keys and sizes (a
//! snapshot's apparent size and the disk space it takes: its memory is sparse).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::args::CacheAction;
use crate::warm::snapshot_dir;
use crate::EXIT_LAUNCHER;

/// One cached file: kind, key (its name without extension), apparent and allocated bytes.
struct Entry {
    kind: &'static str,
    key: String,
    path: std::path::PathBuf,
    bytes: u64,
    allocated: u64,
}

fn entries_in(dir: &Path, ext: &str, kind: &'static str) -> Vec<Entry> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Entry> = read
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_str()?.to_string();
            let key = name.strip_suffix(ext)?.to_string();
            if key.starts_with('.') {
                return None;
            }
            let m = e.metadata().ok()?;
            Some(Entry {
                kind,
                key,
                path,
                bytes: m.len(),
                allocated: m.blocks() * 512,
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// `bootbox cache list` or `bootbox cache clear`.
pub fn cache(action: CacheAction) -> u8 {
    let root = match appliance::default_cache_dir() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bootbox: {e}");
            return EXIT_LAUNCHER;
        }
    };
    let mut entries = entries_in(&root.join("appliance"), ".cpio", "appliance");
    entries.extend(entries_in(&snapshot_dir(&root), ".snap", "snapshot"));
    match action {
        CacheAction::List => {
            println!("cache {}", root.display());
            for e in &entries {
                println!(
                    "{:<9} {}  {} ({} on disk)",
                    e.kind,
                    e.key,
                    mib(e.bytes),
                    mib(e.allocated)
                );
            }
            let total: u64 = entries.iter().map(|e| e.allocated).sum();
            println!("{} entries, {} on disk", entries.len(), mib(total));
            0
        }
        CacheAction::Clear => {
            let mut code = 0;
            for e in &entries {
                if let Err(err) = std::fs::remove_file(&e.path) {
                    eprintln!("bootbox: cannot remove {}: {err}", e.path.display());
                    code = EXIT_LAUNCHER;
                }
            }
            println!("removed {} cached appliances and snapshots", entries.len());
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_the_keyed_files_of_one_kind_without_temps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bb.snap"), vec![1u8; 5000]).unwrap();
        std::fs::write(dir.path().join("aa.snap"), b"x").unwrap();
        std::fs::write(dir.path().join(".aa.snap.1.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join(".lock"), b"").unwrap();
        std::fs::write(dir.path().join("cc.cpio"), b"x").unwrap();
        let e = entries_in(dir.path(), ".snap", "snapshot");
        let keys: Vec<_> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["aa", "bb"]);
        assert_eq!(e[1].bytes, 5000);
        assert!(e[1].allocated >= 4096);
    }
}
