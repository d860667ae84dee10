//! The readers against QEMU's own: images built by `qemu-img`/`qemu-io` from known data, read
//! through [`disk::open`] and compared byte for byte with `qemu-img convert -O raw`; and
//! damaged images (lying headers, tables past the end, loops, unsupported features, corrupt
//! compressed clusters) that must be refused with the right error. Compressed images are made
//! with both compression types, zlib and zstd. Skipped, with a printed reason, when qemu-img is missing
//! (`scripts/setup.sh` installs it).

use disk::{DiskError, Format, Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// A scratch directory removed on drop.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("disk-test-{name}-"))
            .tempdir()
            .unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A scratch directory for a test that needs qemu-img, or `None` (the test is skipped, with
/// the reason printed) when qemu-img is not installed.
fn qemu_scratch(name: &str) -> Option<Scratch> {
    if Command::new("qemu-img").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-img is not installed (scripts/setup.sh installs qemu-utils)");
        return None;
    }
    Some(Scratch::new(name))
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Known disk content: pseudo-random stretches, text (compressible), and zero holes.
fn test_data(len: u64, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut data = vec![0u8; len as usize];
    for (i, chunk) in data.chunks_mut(48 * 1024).enumerate() {
        match i % 4 {
            0 => chunk.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }),
            1 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog\n"[j % 44];
                }
            }
            2 => {} // a hole
            _ => chunk
                .iter_mut()
                .for_each(|b| *b = (i as u8).wrapping_mul(31)),
        }
    }
    data
}

/// What QEMU says the image holds.
fn qemu_flat(image: &Path, dir: &Scratch) -> Vec<u8> {
    let out = dir.path("flat.raw");
    run("qemu-img", &["convert", "-O", "raw", s(image), s(&out)]);
    std::fs::read(out).unwrap()
}

fn open(path: &Path) -> Box<dyn Image> {
    disk::open(path, OpenOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_all(image: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; image.len() as usize];
    image.read_at(&mut buf, 0).unwrap();
    buf
}

/// Whole-image and many unaligned-range reads agree with `expected`.
fn assert_reads_match(image: &dyn Image, expected: &[u8]) {
    assert_eq!(image.len(), expected.len() as u64, "virtual size");
    let all = read_all(image);
    if let Some(at) = all.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("first difference at byte {at}");
    }
    let mut x = 12345u64;
    for _ in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (x >> 20) % expected.len() as u64;
        let len = ((x >> 5) % 200_000).min(expected.len() as u64 - offset);
        let mut buf = vec![0u8; len as usize];
        image.read_at(&mut buf, offset).unwrap();
        assert!(
            buf == expected[offset as usize..(offset + len) as usize],
            "range {offset}+{len}"
        );
    }
    let mut past = [0u8; 2];
    assert!(matches!(
        image.read_at(&mut past, image.len() - 1),
        Err(DiskError::OutOfRange { .. })
    ));
}

fn raw_file(dir: &Scratch, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn convert(dir: &Scratch, src: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.path(name);
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.push(s(src));
    args.push(s(&out));
    run("qemu-img", &args);
    out
}

/// Creates the qcow2 overlay `name` over `backing` (named relative to the overlay's directory)
/// of format `fmt`, with the backing's size unless `size` is given.
fn create_overlay(
    dir: &Scratch,
    name: &str,
    backing: &str,
    fmt: &str,
    size: Option<&str>,
) -> PathBuf {
    let p = dir.path(name);
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        fmt,
        s(&p),
    ];
    args.extend(size);
    run("qemu-img", &args);
    p
}

/// Points `image`'s header at another backing file without touching its data.
fn set_backing(image: &Path, backing: &str) {
    run(
        "qemu-img",
        &["rebase", "-u", "-b", backing, "-F", "qcow2", s(image)],
    );
}

#[test]
fn qcow2_conversions_read_back_identically() {
    let Some(dir) = qemu_scratch("convert") else {
        return;
    };
    // Not a multiple of the cluster size: the last cluster is partial.
    let data = test_data(3 * MIB + 5 * 4096 + 512, 1);
    let raw = raw_file(&dir, "data.raw", &data);
    let cases: &[(&str, &[&str])] = &[
        ("v3-64k.qcow2", &[]),
        ("v2-64k.qcow2", &["-o", "compat=0.10"]),
        ("v3-512.qcow2", &["-o", "cluster_size=512"]),
        ("v2-4k.qcow2", &["-o", "compat=0.10,cluster_size=4096"]),
        ("v3-2m.qcow2", &["-o", "cluster_size=2M"]),
        ("v3-64k-c.qcow2", &["-c"]),
        ("v3-4k-c.qcow2", &["-c", "-o", "cluster_size=4096"]),
        (
            "v2-512-c.qcow2",
            &["-c", "-o", "compat=0.10,cluster_size=512"],
        ),
    ];
    for (name, extra) in cases {
        let image = convert(&dir, &raw, name, extra);
        let opened = open(&image);
        assert_eq!(opened.format(), Format::Qcow2, "{name}");
        assert_eq!(qemu_flat(&image, &dir), data, "{name}: qemu's own reading");
        assert_reads_match(&*opened, &data);
    }
}

#[test]
fn raw_images_read_and_write_only_when_asked() {
    let dir = Scratch::new("raw");
    let data = test_data(MIB + 3, 2);
    let path = raw_file(&dir, "disk.img", &data);
    let image = open(&path);
    assert_eq!(image.format(), Format::Raw);
    assert!(image.direct_file().is_some());
    assert_reads_match(&*image, &data);
    // Vectored: three buffers across the middle.
    let (mut a, mut b, mut c) = (vec![0u8; 10], vec![0u8; 70_000], vec![0u8; 1]);
    let mut bufs = [
        std::io::IoSliceMut::new(&mut a),
        std::io::IoSliceMut::new(&mut b),
        std::io::IoSliceMut::new(&mut c),
    ];
    image.read_vectored_at(&mut bufs, 4000).unwrap();
    assert_eq!([a, b, c].concat(), data[4000..4000 + 70_011]);
    assert!(!image.is_writable());
    assert!(matches!(image.write_at(b"x", 0), Err(DiskError::ReadOnly)));

    let writable = disk::open(
        &path,
        OpenOptions {
            format: Some(Format::Raw),
            writable: true,
        },
    )
    .unwrap();
    writable.write_at(b"hello", 100).unwrap();
    writable.flush().unwrap();
    assert!(matches!(
        writable.write_at(b"xy", writable.len() - 1),
        Err(DiskError::OutOfRange { .. })
    ));
    assert_eq!(&std::fs::read(&path).unwrap()[100..105], b"hello");
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        MIB + 3,
        "never grows"
    );
}

#[test]
fn format_is_detected_by_content_and_a_named_format_wins() {
    let Some(dir) = qemu_scratch("detect") else {
        return;
    };
    let data = test_data(MIB, 3);
    let raw = raw_file(&dir, "looks-like.qcow2", &data);
    let qcow = convert(&dir, &raw, "looks-like.raw", &[]);
    assert_eq!(disk::detect(&raw).unwrap(), Format::Raw);
    assert_eq!(disk::detect(&qcow).unwrap(), Format::Qcow2);
    assert_eq!(open(&qcow).len(), MIB);
    // Naming raw for a qcow2 file shows the file itself.
    let as_raw = disk::open(
        &qcow,
        OpenOptions {
            format: Some(Format::Raw),
            writable: false,
        },
    )
    .unwrap();
    assert_eq!(as_raw.len(), std::fs::metadata(&qcow).unwrap().len());
    // Naming qcow2 for a raw file is an error.
    let err = disk::open(
        &raw,
        OpenOptions {
            format: Some(Format::Qcow2),
            writable: false,
        },
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::NotQcow2 { .. }), "{err}");
    // qcow2 is read-only.
    let err = disk::open(
        &qcow,
        OpenOptions {
            format: None,
            writable: true,
        },
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::Qcow2Writable { .. }), "{err}");
    assert!("vmdk".parse::<Format>().is_err());
    assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
}

#[test]
fn overlays_read_through_their_backing_chain() {
    let Some(dir) = qemu_scratch("backing") else {
        return;
    };
    let data = test_data(2 * MIB, 4);
    let base_raw = raw_file(&dir, "base.raw", &data);
    let base_qcow = convert(&dir, &base_raw, "base.qcow2", &["-c"]);
    // Overlays name their backing file relative to their own directory.
    let over_raw = create_overlay(&dir, "over-raw.qcow2", "base.raw", "raw", None);
    let over_qcow = create_overlay(&dir, "over-qcow.qcow2", "base.qcow2", "qcow2", Some("3M"));
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 65536 100000",
            "-c",
            "write -z 1048576 131072",
            "-c",
            "write -P 0x5a 2500000 70000",
            s(&over_qcow),
        ],
    );
    let top = create_overlay(&dir, "top.qcow2", "over-qcow.qcow2", "qcow2", None);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 4096", s(&top)],
    );
    for image in [&over_raw, &over_qcow, &top] {
        let expected = qemu_flat(image, &dir);
        assert_reads_match(&*open(image), &expected);
    }
    // The overlay is larger than its base: the tail beyond the base reads as zeros.
    let flat = qemu_flat(&over_qcow, &dir);
    assert_eq!(flat.len() as u64, 3 * MIB);
    assert!(flat[2 * MIB as usize..2_500_000].iter().all(|&b| b == 0));
    assert_eq!(flat[65536], 0xab);
    // A missing backing file is a clear error.
    std::fs::remove_file(&base_qcow).unwrap();
    let err = disk::open(&top, OpenOptions::default()).unwrap_err();
    assert!(
        matches!(err, DiskError::Backing { .. }) && err.to_string().contains("base.qcow2"),
        "{err}"
    );
}

#[test]
fn backing_loops_and_deep_chains_are_refused() {
    let Some(dir) = qemu_scratch("loops") else {
        return;
    };
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&a), "1M"]);
    create_overlay(&dir, "b.qcow2", "a.qcow2", "qcow2", None);
    set_backing(&a, "b.qcow2");
    let err = disk::open(&b, OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DiskError::BackingLoop { .. }), "{err}");
    // An image that is its own backing file.
    set_backing(&a, "a.qcow2");
    let err = disk::open(&a, OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DiskError::BackingLoop { .. }), "{err}");

    let mut previous = dir.path("level0.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&previous), "1M"],
    );
    for level in 1..=disk::qcow2::MAX_BACKING_DEPTH + 1 {
        let backing = previous.file_name().unwrap().to_str().unwrap();
        let next = create_overlay(&dir, &format!("level{level}.qcow2"), backing, "qcow2", None);
        if level == disk::qcow2::MAX_BACKING_DEPTH {
            // Exactly the limit is fine.
            assert_eq!(open(&next).len(), MIB);
        }
        previous = next;
    }
    let err = disk::open(&previous, OpenOptions::default()).unwrap_err();
    assert!(matches!(err, DiskError::BackingTooDeep { .. }), "{err}");
}

/// Copies `src` to `name` with `patch` applied to its bytes.
fn patched(dir: &Scratch, src: &Path, name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    patch(&mut bytes);
    raw_file(dir, name, &bytes)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn damaged_headers_and_tables_are_refused() {
    let Some(dir) = qemu_scratch("damaged") else {
        return;
    };
    let data = test_data(2 * MIB, 5);
    let raw = raw_file(&dir, "data.raw", &data);
    let good = convert(&dir, &raw, "good.qcow2", &[]);
    let len = std::fs::metadata(&good).unwrap().len();
    let open_err = |p: &Path| disk::open(p, OpenOptions::default()).unwrap_err();

    let header = |name: &str, patch: &dyn Fn(&mut Vec<u8>)| {
        open_err(&patched(&dir, &good, name, |b| patch(b)))
    };
    let cases: Vec<(&str, DiskError)> = vec![
        // The size lies: far more than the L1 table covers.
        ("size", header("size.qcow2", &|b| put64(b, 24, 1 << 50))),
        // L1 table past the end of the file.
        ("l1", header("l1.qcow2", &|b| put64(b, 40, len + (1 << 16)))),
        (
            "l1-size",
            header("l1-size.qcow2", &|b| put32(b, 36, u32::MAX)),
        ),
        ("cluster", header("cluster.qcow2", &|b| put32(b, 20, 30))),
        (
            "refcount",
            header("refcount.qcow2", &|b| put64(b, 48, 1 << 40)),
        ),
        (
            "backing",
            header("backing.qcow2", &|b| {
                put64(b, 8, 70_000);
                put32(b, 16, 10);
            }),
        ),
        (
            "backing-newline",
            header("backing-nl.qcow2", &|b| {
                put64(b, 8, 512);
                put32(b, 16, 5);
                b[512..517].copy_from_slice(b"a\nb.x");
            }),
        ),
        ("version", header("version.qcow2", &|b| put32(b, 4, 1))),
        ("header_length", header("hlen.qcow2", &|b| put32(b, 100, 3))),
    ];
    for (what, err) in &cases {
        assert!(
            matches!(
                err,
                DiskError::BadHeader { .. } | DiskError::UnsupportedVersion { .. }
            ),
            "{what}: {err}"
        );
        assert!(!err.to_string().contains('\n'), "{what}: one line");
    }
    let encrypted = header("crypt.qcow2", &|b| put32(b, 32, 1));
    assert!(
        matches!(encrypted, DiskError::Encrypted { .. }),
        "{encrypted}"
    );
    let features = |bits: u64| header("feat.qcow2", &|b| put64(b, 72, bits));
    assert!(matches!(
        features(1 << 2),
        DiskError::ExternalDataFile { .. }
    ));
    assert!(matches!(features(1 << 4), DiskError::ExtendedL2 { .. }));
    assert!(matches!(
        features(1 << 9),
        DiskError::UnknownFeatures { .. }
    ));
    // The compression type (byte 104 of a 112-byte header) and its feature bit must agree,
    // and only zlib (0) and zstd (1) are known.
    let compression = |name: &str, bit: bool, kind: u8| {
        patched(&dir, &good, name, |b| {
            put64(b, 72, if bit { 1 << 3 } else { 0 });
            put32(b, 100, 112);
            b[104] = kind;
        })
    };
    let unknown = open_err(&compression("type2.qcow2", true, 2));
    assert!(
        matches!(unknown, DiskError::UnknownCompression { kind: 2, .. }),
        "{unknown}"
    );
    for (name, bit, kind) in [("nobit.qcow2", false, 1), ("bit-zlib.qcow2", true, 0)] {
        let err = open_err(&compression(name, bit, kind));
        assert!(
            matches!(err, DiskError::BadHeader { .. }) && err.to_string().contains("feature bit"),
            "{name}: {err}"
        );
    }
    // Declared zstd without compressed clusters: reads as before.
    let zstd = compression("zstd.qcow2", true, 1);
    assert_reads_match(&*open(&zstd), &data);
    // Dirty and corrupt flags do not stop a read-only reader.
    let dirty = patched(&dir, &good, "dirty.qcow2", |b| put64(b, 72, 3));
    assert_reads_match(&*open(&dirty), &data);
    // A truncated file: tables are checked against its size.
    let short = patched(&dir, &good, "short.qcow2", |b| b.truncate(100));
    assert!(matches!(open_err(&short), DiskError::BadHeader { .. }));

    // An L1 entry pointing past the end, and an L2 entry pointing past the end: opening works
    // (the tables are only read on use), reading that cluster is an error, never a panic.
    let l1_offset = get64(&std::fs::read(&good).unwrap(), 40) as usize;
    let bad_l1 = patched(&dir, &good, "bad-l1.qcow2", |b| {
        put64(b, l1_offset, (len + (1 << 20)) & !0xffff | 1 << 63)
    });
    let image = open(&bad_l1);
    let mut buf = vec![0u8; 4096];
    let err = image.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
    let bad_l2 = patched(&dir, &good, "bad-l2.qcow2", |b| {
        let l2 = (get64(b, l1_offset) & 0x00ff_ffff_ffff_fe00) as usize;
        put64(b, l2, (len + (1 << 20)) & !0xffff | 1 << 63);
        put64(b, l2 + 8, 0x0300); // reserved bits in entry 1
    });
    let image = open(&bad_l2);
    assert!(matches!(
        image.read_at(&mut buf, 0),
        Err(DiskError::Corrupt { .. })
    ));
    assert!(matches!(
        image.read_at(&mut buf, 65536),
        Err(DiskError::Corrupt { .. })
    ));
    // Other clusters still read correctly.
    image.read_at(&mut buf, 3 * 65536).unwrap();
    assert_eq!(buf, data[3 * 65536..3 * 65536 + 4096]);
}

/// The L2 entries of every guest cluster of the qcow2 image in `bytes`, in order.
fn l2_entries(bytes: &[u8]) -> Vec<u64> {
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let cluster = 1usize << cluster_bits;
    let size = get64(bytes, 24) as usize;
    let l1_offset = get64(bytes, 40) as usize;
    let mut entries = Vec::new();
    for index in 0..size.div_ceil(cluster) {
        let l1 = get64(bytes, l1_offset + 8 * (index / (cluster / 8))) & 0x00ff_ffff_ffff_fe00;
        entries.push(if l1 == 0 {
            0
        } else {
            get64(bytes, l1 as usize + 8 * (index % (cluster / 8)))
        });
    }
    entries
}

/// Where a compressed L2 entry's data lies: (guest cluster index, file offset, sectors).
fn compressed_clusters(bytes: &[u8]) -> Vec<(usize, usize, u64)> {
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let offset_bits = 62 - (cluster_bits - 8);
    l2_entries(bytes)
        .into_iter()
        .enumerate()
        .filter(|(_, e)| e & (1 << 62) != 0)
        .map(|(index, e)| {
            let descriptor = e & ((1 << 62) - 1);
            let offset = descriptor & ((1 << offset_bits) - 1);
            (index, offset as usize, (descriptor >> offset_bits) + 1)
        })
        .collect()
}

fn header_of(path: &Path) -> disk::qcow2::header::Header {
    disk::Qcow2::open(path).unwrap().header().clone()
}

/// `qemu-img convert` options for a zstd-compressed image.
const ZSTD: &[&str] = &["-c", "-o", "compression_type=zstd"];

/// The zstd image `image` has zstd-compressed clusters, and QEMU and we both read it as
/// `expected`.
fn assert_zstd_reads_match(image: &Path, dir: &Scratch, expected: &[u8]) {
    let name = image.display();
    assert_eq!(
        header_of(image).compression,
        disk::qcow2::header::Compression::Zstd,
        "{name}"
    );
    let bytes = std::fs::read(image).unwrap();
    assert!(
        !compressed_clusters(&bytes).is_empty(),
        "{name}: no compressed cluster to test"
    );
    assert_eq!(
        qemu_flat(image, dir),
        expected,
        "{name}: qemu's own reading"
    );
    assert_reads_match(&*open(image), expected);
}

#[test]
fn zstd_images_read_back_identically() {
    let Some(dir) = qemu_scratch("zstd") else {
        return;
    };
    // Not a multiple of the cluster size: the last cluster is partial.
    let data = test_data(3 * MIB + 5 * 4096 + 512, 6);
    let raw = raw_file(&dir, "data.raw", &data);
    for cluster_size in ["65536", "4096", "512", "2M"] {
        let name = format!("zstd-{cluster_size}.qcow2");
        let options = format!("compression_type=zstd,cluster_size={cluster_size}");
        let image = convert(&dir, &raw, &name, &["-c", "-o", &options]);
        assert_zstd_reads_match(&image, &dir, &data);
    }
}

#[test]
fn zstd_overlays_read_through_their_backing_chain() {
    let Some(dir) = qemu_scratch("zstd-overlay") else {
        return;
    };
    let base_data = test_data(2 * MIB, 7);
    let base_raw = raw_file(&dir, "base.raw", &base_data);
    // Both bases are compressed; the overlays are zstd over either.
    let zstd_base = convert(&dir, &base_raw, "base-zstd.qcow2", ZSTD);
    let zlib_base = convert(&dir, &base_raw, "base-zlib.qcow2", &["-c"]);
    // New content for a few clusters (text and random stretches from other data, a cleared
    // cluster), written compressed into each overlay; the rest comes from the base.
    let cluster = 65536usize;
    let other = test_data(8 * cluster as u64, 8);
    let mut data = base_data.clone();
    let rewritten = [(1, 1), (2, 5), (16, 0), (17, 6)];
    for &(index, from) in &rewritten {
        data[index * cluster..(index + 1) * cluster]
            .copy_from_slice(&other[from * cluster..(from + 1) * cluster]);
    }
    data[25 * cluster..26 * cluster].fill(0);
    let mut commands = Vec::new();
    for &(index, from) in &rewritten {
        let chunk = raw_file(
            &dir,
            &format!("chunk{index}.raw"),
            &other[from * cluster..(from + 1) * cluster],
        );
        commands.push(format!(
            "write -c -s {} {} {cluster}",
            s(&chunk),
            index * cluster
        ));
    }
    commands.push(format!("write -z {} {cluster}", 25 * cluster));
    for base in [&zstd_base, &zlib_base] {
        let base_name = base.file_name().unwrap().to_str().unwrap();
        let overlay = dir.path(&format!("over-{base_name}"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "-b",
                base_name,
                "-F",
                "qcow2",
                s(&overlay),
            ],
        );
        let mut args = vec!["-f", "qcow2"];
        for command in &commands {
            args.extend(["-c", command]);
        }
        args.push(s(&overlay));
        run("qemu-io", &args);
        assert_eq!(header_of(&overlay).backing_name.as_deref(), Some(base_name));
        assert!(
            l2_entries(&std::fs::read(&overlay).unwrap()).contains(&0),
            "{base_name}: the overlay should leave clusters to its backing file"
        );
        assert_zstd_reads_match(&overlay, &dir, &data);
    }
}

#[test]
fn damaged_zstd_clusters_are_read_errors() {
    let Some(dir) = qemu_scratch("zstd-damaged") else {
        return;
    };
    let data = test_data(2 * MIB, 9);
    let raw = raw_file(&dir, "data.raw", &data);
    let good = convert(&dir, &raw, "good.qcow2", ZSTD);
    let bytes = std::fs::read(&good).unwrap();
    let compressed = compressed_clusters(&bytes);
    assert!(compressed.len() >= 2, "too few compressed clusters");
    let (index, offset, sectors) = compressed[0];
    let (other, ..) = compressed[1];
    let cluster = 65536usize;
    let read_cluster = |path: &Path, index: usize| {
        let mut buf = vec![0u8; cluster];
        open(path)
            .read_at(&mut buf, (index * cluster) as u64)
            .map(|()| buf)
    };
    let expect_corrupt = |path: &Path| {
        let err = read_cluster(path, index).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, DiskError::Corrupt { .. }) && message.contains("compressed cluster"),
            "{message}"
        );
        assert!(!message.contains('\n'), "one line: {message}");
        // The other clusters still read correctly.
        let other_data = read_cluster(path, other).unwrap();
        assert!(other_data == data[other * cluster..(other + 1) * cluster]);
    };
    // Garbage instead of the frame.
    let garbage = patched(&dir, &good, "garbage.qcow2", |b| {
        let mut x = 0x9e37_79b9u32;
        for byte in &mut b[offset..offset + 512] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
    });
    expect_corrupt(&garbage);
    // The frame cut short: its descriptor counts one sector (the cluster is several).
    assert!(sectors > 1);
    let cut = patched(&dir, &good, "cut.qcow2", |b| {
        let l1 = get64(b, get64(b, 40) as usize) & 0x00ff_ffff_ffff_fe00;
        let at = l1 as usize + 8 * index;
        let offset_bits = 62 - (16 - 8);
        let entry = get64(b, at) & !(((1u64 << 62) - 1) & !((1 << offset_bits) - 1));
        put64(b, at, entry);
    });
    assert_eq!(compressed_clusters(&std::fs::read(&cut).unwrap())[0].2, 1);
    expect_corrupt(&cut);
    // The frame's header byte and block headers flipped, one at a time: an error or other
    // bytes (zstd frames from QEMU carry no checksum), never a panic.
    for at in 4..64 {
        let flipped = patched(&dir, &good, "flipped.qcow2", |b| b[offset + at] ^= 0xa5);
        let _ = read_cluster(&flipped, index);
    }
}
