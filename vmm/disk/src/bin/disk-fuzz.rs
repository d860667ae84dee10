//! Bounded, stable-toolchain fuzz loop for the image readers: builds small valid qcow2 images
//! (v2/v3, 512 B to 64 KiB clusters, data, zero, compressed and unallocated clusters; v3 ones
//! compressed with zlib or zstd, some zstd clusters as two frames or with a skippable frame;
//! some over a raw backing file, some naming themselves as backing), mutates their headers,
//! tables and compressed data, opens them and reads random ranges.
//!
//! Invariants: nothing panics (the panic hook aborts), every read inside the image either
//! fills the buffer or returns an error, every read outside it is `OutOfRange`, every error
//! message is one line, and an unmutated image reads back exactly the data it was built from.
//!
//! Usage: `disk-fuzz [--secs N] [--iters N] [--seed N] [--dir DIR]` (defaults: 30 s,
//! unlimited iterations, seed from the clock, a directory under $TMPDIR). Exits non-zero on
//! the first violated invariant.

use disk::{DiskError, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const BACKING_NAME: &str = "fuzz-backing.raw";
const IMAGE_NAME: &str = "fuzz.qcow2";

/// A generated image: its file bytes and the disk content it must read back as.
struct Generated {
    file: Vec<u8>,
    expected: Vec<u8>,
    /// Offsets of the fields and tables worth mutating.
    tables: Vec<(usize, usize)>,
    /// Where the compressed clusters' data lies.
    payloads: Vec<(usize, usize)>,
    /// Whether they are zstd (else deflate).
    zstd: bool,
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Builds a valid qcow2 image; `backing` is the raw backing file's content when it has one.
fn generate(rng: &mut Rng, backing: Option<&[u8]>, self_backed: bool) -> Generated {
    let cluster_bits = [9u32, 10, 12, 16][rng.below(4) as usize];
    let cs = 1usize << cluster_bits;
    let version = if rng.chance(50) { 3 } else { 2 };
    let zstd = version == 3 && rng.chance(70);
    let clusters = 1 + rng.below(40) as usize;
    let size = clusters * cs - 512 * rng.below((cs / 512) as u64) as usize;
    let l2_entries = cs / 8;
    let l1_entries = clusters.div_ceil(l2_entries);
    // Clusters: 0 header, 1 L1, 2 refcount table, then the L2 tables, then data.
    let l2_start = 3 * cs;
    let mut file = vec![0u8; (3 + l1_entries) * cs];
    // A compression type needs the 112-byte header that holds it.
    let header_len = match (version, zstd) {
        (3, true) => 112,
        (3, false) => 104,
        _ => 72,
    };
    file[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut file, 4, version);
    put32(&mut file, 20, cluster_bits);
    put64(&mut file, 24, size as u64);
    put32(&mut file, 36, l1_entries as u32);
    put64(&mut file, 40, cs as u64);
    put64(&mut file, 48, 2 * cs as u64);
    put32(&mut file, 56, 1);
    if version == 3 {
        put32(&mut file, 96, 4);
        put32(&mut file, 100, header_len as u32);
    }
    if zstd {
        put64(&mut file, 72, 1 << 3); // the compression type feature bit
        file[104] = 1;
    }
    let backing_name = match (backing, self_backed) {
        (_, true) => Some(IMAGE_NAME),
        (Some(_), false) => Some(BACKING_NAME),
        (None, false) => None,
    };
    if let Some(name) = backing_name {
        // After the 8-byte end-of-extensions marker.
        let at = header_len + 8;
        put64(&mut file, 8, at as u64);
        put32(&mut file, 16, name.len() as u32);
        file[at..at + name.len()].copy_from_slice(name.as_bytes());
    }
    for k in 0..l1_entries {
        put64(&mut file, cs + 8 * k, (l2_start + k * cs) as u64 | 1 << 63);
    }

    let mut expected = vec![0u8; clusters * cs];
    let mut payloads = Vec::new();
    for c in 0..clusters {
        let content = &mut expected[c * cs..(c + 1) * cs];
        let entry_at = l2_start + (c / l2_entries) * cs + 8 * (c % l2_entries);
        let kind = rng.below(5);
        if kind != 0 && kind != 1 {
            // Pseudo-random but compressible: a few distinct bytes.
            let fill = rng.next();
            for (i, b) in content.iter_mut().enumerate() {
                *b = (fill >> ((i % 7) * 8)) as u8 ^ (i / 64) as u8;
            }
        }
        match kind {
            0 => {
                // Unallocated: the backing file's bytes, zeros past its end or without one.
                if let (Some(backing), false) = (backing, self_backed) {
                    let start = (c * cs).min(backing.len());
                    let end = ((c + 1) * cs).min(backing.len());
                    content[..end - start].copy_from_slice(&backing[start..end]);
                }
            }
            1 => put64(&mut file, entry_at, 1), // zero flag
            2 | 3 => put_data(&mut file, entry_at, content, cs),
            _ => {
                let packed = if zstd {
                    zstd_frames(rng, content)
                } else {
                    miniz_oxide::deflate::compress_to_vec(content, 6)
                };
                // Like QEMU, keep a cluster compressed only if that makes it smaller (so its
                // sector count fits the descriptor).
                if packed.len() >= cs {
                    put_data(&mut file, entry_at, content, cs);
                    continue;
                }
                let at = file.len() + rng.below(512) as usize;
                file.resize(at, 0xa5);
                file.extend_from_slice(&packed);
                payloads.push((at, packed.len()));
                let sectors = ((at % 512 + packed.len()).div_ceil(512) - 1) as u64;
                let shift = 62 - (cluster_bits - 8);
                put64(&mut file, entry_at, 1 << 62 | sectors << shift | at as u64);
            }
        }
    }
    file.resize(file.len().div_ceil(cs) * cs, 0);
    expected.truncate(size);
    let tables = vec![
        (0, header_len + 48),
        (cs, l1_entries * 8),
        (l2_start, l1_entries * cs),
    ];
    Generated {
        file,
        expected,
        tables,
        payloads,
        zstd,
    }
}

/// Appends `content` as a data cluster (cluster-aligned, unlike compressed ones) and points
/// the L2 entry at `entry_at` to it.
fn put_data(file: &mut Vec<u8>, entry_at: usize, content: &[u8], cs: usize) {
    let at = file.len().div_ceil(cs) * cs;
    file.resize(at, 0);
    file.extend_from_slice(content);
    put64(file, entry_at, at as u64 | 1 << 63);
}

/// `content` as zstd data the way QEMU reads it: usually one frame, sometimes two, sometimes
/// after a skippable frame.
fn zstd_frames(rng: &mut Rng, content: &[u8]) -> Vec<u8> {
    use ruzstd::encoding::{compress_to_vec, CompressionLevel};
    let mut packed = Vec::new();
    match rng.below(10) {
        0 => {
            packed.extend_from_slice(&0x184d_2a5du32.to_le_bytes());
            packed.extend_from_slice(&3u32.to_le_bytes());
            packed.extend_from_slice(b"pad");
            packed.extend(compress_to_vec(content, CompressionLevel::Fastest));
        }
        1 => {
            let split = rng.below(content.len() as u64 + 1) as usize;
            packed.extend(compress_to_vec(
                &content[..split],
                CompressionLevel::Fastest,
            ));
            packed.extend(compress_to_vec(
                &content[split..],
                CompressionLevel::Fastest,
            ));
        }
        _ => packed.extend(compress_to_vec(content, CompressionLevel::Fastest)),
    }
    packed
}

/// Values that tend to break offset arithmetic.
fn interesting(rng: &mut Rng, file_len: u64) -> u64 {
    let cs_ish = 1u64 << (9 + rng.below(13));
    match rng.below(9) {
        0 => 0,
        1 => u64::MAX,
        2 => file_len,
        3 => file_len.wrapping_sub(cs_ish),
        4 => file_len + cs_ish,
        5 => 1 << 62 | rng.below(file_len),
        6 => 1 << 63 | (rng.below(file_len) & !(cs_ish - 1)),
        7 => 1 << (rng.below(64)),
        _ => rng.next(),
    }
}

/// Damages `g.file` in one to four places.
fn mutate(rng: &mut Rng, g: &mut Generated) {
    let len = g.file.len() as u64;
    for _ in 0..1 + rng.below(4) {
        let (start, span) = if !g.payloads.is_empty() && rng.chance(30) {
            g.payloads[rng.below(g.payloads.len() as u64) as usize]
        } else {
            g.tables[rng.below(g.tables.len() as u64) as usize]
        };
        let at = start + rng.below(span.max(1) as u64) as usize;
        match rng.below(5) {
            0 | 1 if at + 8 <= g.file.len() => {
                let at = at & !7;
                let v = interesting(rng, len);
                put64(&mut g.file, at, v);
            }
            2 if at + 4 <= g.file.len() => {
                let v = interesting(rng, len) as u32;
                put32(&mut g.file, at & !3, v);
            }
            3 => {
                let keep = rng.below(len) as usize;
                g.file.truncate(keep);
            }
            _ => {
                if let Some(b) = g.file.get_mut(at) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
    }
}

/// Error messages are one line, not empty.
fn one_line(e: &DiskError) -> Result<(), String> {
    let message = e.to_string();
    if message.is_empty() || message.contains('\n') {
        return Err(format!("error message is not one line: {message:?}"));
    }
    Ok(())
}

/// One image: open it, read random ranges, check the invariants.
fn check(rng: &mut Rng, dir: &Path, g: &Generated, mutated: bool) -> Result<(), String> {
    let path = dir.join(IMAGE_NAME);
    std::fs::write(&path, &g.file).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let image = match disk::open(&path, OpenOptions::default()) {
        Ok(image) => image,
        Err(e) if mutated => return one_line(&e),
        Err(DiskError::BackingLoop { .. }) => return Ok(()),
        Err(e) => return Err(format!("a valid image was refused: {e}")),
    };
    let len = image.len();
    if !mutated && len != g.expected.len() as u64 {
        return Err(format!("size {len}, built as {}", g.expected.len()));
    }
    for _ in 0..8 {
        let offset = rng.below(len + 1);
        let want = rng.below((len - offset).min(300_000) + 1) as usize;
        let mut buf = vec![0u8; want];
        match image.read_at(&mut buf, offset) {
            Ok(()) if !mutated => {
                let exp = &g.expected[offset as usize..offset as usize + want];
                if buf != exp {
                    return Err(format!(
                        "read of {want} at {offset} differs from the built data"
                    ));
                }
            }
            Ok(()) => {}
            Err(DiskError::OutOfRange { .. }) => {
                return Err(format!(
                    "in-range read of {want} at {offset} called out of range"
                ))
            }
            Err(e) if !mutated => return Err(format!("read of a valid image failed: {e}")),
            Err(e) => one_line(&e)?,
        }
    }
    let mut past = [0u8; 1];
    match image.read_at(&mut past, len) {
        Err(DiskError::OutOfRange { .. }) => Ok(()),
        other => Err(format!("read past the end gave {other:?}")),
    }
}

/// What a run did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    images: u64,
    /// Images with compressed clusters, by compression.
    zlib: u64,
    zstd: u64,
}

/// Runs the loop.
fn run(seed: u64, iters: u64, secs: f64, dir: &Path) -> Result<Counts, String> {
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let backing: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 253) as u8).collect();
    std::fs::write(dir.join(BACKING_NAME), &backing).map_err(|e| e.to_string())?;
    let mut counts = Counts::default();
    while counts.images < iters && Instant::now() < deadline {
        let n = counts.images;
        let with_backing = rng.chance(40);
        let self_backed = rng.chance(5);
        let mut g = generate(&mut rng, with_backing.then_some(&backing[..]), self_backed);
        let mutated = rng.chance(85);
        if mutated {
            mutate(&mut rng, &mut g);
        }
        check(&mut rng, dir, &g, mutated).map_err(|e| format!("iteration {n}: {e}"))?;
        counts.images += 1;
        if !g.payloads.is_empty() {
            *if g.zstd {
                &mut counts.zstd
            } else {
                &mut counts.zlib
            } += 1;
        }
    }
    Ok(counts)
}

/// `--name value` pairs from the command line.
fn options() -> Result<(f64, u64, u64, Option<PathBuf>), String> {
    let mut secs = 30.0;
    let mut iters = u64::MAX;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(name) = args.next() {
        let value = args.next().ok_or(format!("{name} wants a value"))?;
        let number = || {
            value
                .parse::<f64>()
                .map_err(|_| format!("{name}: not a number: {value:?}"))
        };
        match name.as_str() {
            "--secs" => secs = number()?,
            "--iters" => iters = number()? as u64,
            "--seed" => seed = value.parse().map_err(|_| format!("--seed: not a number: {value:?}"))?,
            "--dir" => dir = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option {name} (usage: disk-fuzz [--secs N] [--iters N] [--seed N] [--dir DIR])")),
        }
    }
    Ok((secs, iters, seed, dir))
}

fn main() -> ExitCode {
    let (secs, iters, seed, dir) = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("disk-fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    std::panic::set_hook(Box::new(|info| {
        eprintln!("disk-fuzz: PANIC: {info}");
        std::process::abort();
    }));
    let dir = dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("disk-fuzz-{}", std::process::id())));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("disk-fuzz: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    println!(
        "disk-fuzz: seed {seed}, up to {secs} s, in {}",
        dir.display()
    );
    let result = run(seed, iters, secs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(counts) => {
            println!(
                "disk-fuzz: {} images ({} with zlib and {} with zstd clusters), no violation",
                counts.images, counts.zlib, counts.zstd
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("disk-fuzz: seed {seed}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_generated_images_read_back_and_mutants_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let counts = run(0x5eed, 400, 120.0, dir.path()).unwrap();
        assert_eq!(counts.images, 400);
        // Both compressions were exercised.
        assert!(counts.zlib > 20 && counts.zstd > 20, "{counts:?}");
    }
}
