//! Tests of the virtio-blk device through the fake driver of the virtio tests: config space and
//! features, reads straight from a raw file and through a bounce buffer, many requests in
//! flight, read-only and writable disks, GET_ID, and hostile requests that must get an error
//! status (or, for malformed chains, the device error state) without hurting the monitor.

use super::super::block::*;
use super::*;
use std::io::Write;

/// Each request's header, status and data live in their own 1 MiB slot above `DATA`.
const SLOT: u64 = 0x10_0000;
const F_RO: u64 = 1 << VIRTIO_BLK_F_RO;

/// A disk image in memory that is not a host file: reads take the bounce-buffer path.
#[derive(Debug)]
struct MemImage(Vec<u8>);

impl disk::Image for MemImage {
    fn format(&self) -> disk::Format {
        disk::Format::Qcow2
    }

    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> disk::Result<()> {
        disk::check_range(offset, buf.len() as u64, self.len())?;
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

/// A raw image file removed on drop.
struct TempImage(tempfile::NamedTempFile);

impl TempImage {
    fn new(name: &str, data: &[u8]) -> Self {
        let mut file = tempfile::Builder::new()
            .prefix(&format!("blk-{name}-"))
            .suffix(".img")
            .tempfile()
            .unwrap();
        file.write_all(data).unwrap();
        file.flush().unwrap();
        TempImage(file)
    }

    fn open(&self, writable: bool) -> Arc<dyn disk::Image> {
        let options = disk::OpenOptions {
            format: None,
            writable,
        };
        Arc::from(disk::open(self.0.path(), options).unwrap())
    }
}

fn block(image: Arc<dyn disk::Image>, read_only: bool) -> Driver {
    let pool = Arc::new(WorkerPool::new(3, "tblk"));
    let device = Block::new(image, read_only, "bootbox-disk-1", pool).unwrap();
    let mut d = Driver::new(Box::new(device));
    d.start(F_VERSION_1 | F_INDIRECT | F_EVENT_IDX, 1, 128);
    d
}

/// One request's parts: its slot, and where its status byte and data are.
struct Request {
    head: u16,
    status: u64,
    data: u64,
}

/// Writes a request of `kind` at `sector` into `slot`: header, then data buffers of `lens`
/// (device-writable when `data_writable`), then the status byte. Not yet published.
fn request(
    d: &mut Driver,
    slot: u64,
    kind: u32,
    sector: u64,
    lens: &[u32],
    data_writable: bool,
) -> Request {
    let base = DATA + slot * SLOT;
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    d.fill(base, &header);
    let status = base + 16;
    d.fill(status, &[0xee]);
    let data = base + 4096;
    let mut bufs = vec![(base, 16, false)];
    let mut at = data;
    for &len in lens {
        bufs.push((at, len, data_writable));
        at += u64::from(len);
    }
    bufs.push((status, 1, true));
    let head = d.chain(0, &bufs);
    Request { head, status, data }
}

/// Publishes `r`, kicks, waits for it; returns (status byte, used length).
fn submit(d: &mut Driver, r: &Request) -> (u8, u32) {
    d.publish(0, r.head);
    d.kick(0);
    let idx = d.rings[0].next_avail;
    d.wait_used(0, idx);
    let (head, len) = d.used_elem(0, idx.wrapping_sub(1));
    assert_eq!(head, u32::from(r.head));
    (d.read(r.status, 1)[0], len)
}

#[test]
fn block_config_space_and_features() {
    let data = pattern(1 << 20 | 100, 1);
    let file = TempImage::new("config", &data);
    let d = block(file.open(false), true);
    assert_eq!(d.r32(0x8), TYPE_BLOCK);
    let features = d.device_features();
    for bit in [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_RO,
        VIRTIO_F_VERSION_1,
    ] {
        assert_ne!(features & 1 << bit, 0, "feature {bit}");
    }
    // Capacity in sectors, rounded up: the last partial sector is visible.
    let capacity = u64::from(d.r32(0x100)) | u64::from(d.r32(0x104)) << 32;
    assert_eq!(capacity, (1 << 20) / 512 + 1);
    assert_eq!(d.r32(0x108), SIZE_MAX);
    assert_eq!(d.r32(0x10c), SEG_MAX);
    assert_eq!(d.r32(0x114), 512);
    assert_eq!(d.r32(0x118), 0, "beyond the config space");
    // A writable disk does not offer RO.
    let rw = block(file.open(true), false);
    assert_eq!(rw.device_features() & F_RO, 0);
    // ...and needs an image opened writable.
    let pool = Arc::new(WorkerPool::new(1, "tblk"));
    assert!(matches!(
        Block::new(file.open(false), false, "x", pool.clone()),
        Err(BlockError::ImageNotWritable)
    ));
    assert!(matches!(
        Block::new(file.open(false), true, &"s".repeat(21), pool),
        Err(BlockError::SerialTooLong(_))
    ));
    d.w32(0x70, 0);
}

/// Reads through scattered buffers, the last partial sector, and the whole disk.
fn check_reads(image: Arc<dyn disk::Image>, data: &[u8]) {
    let mut d = block(image, true);
    let r = request(&mut d, 0, VIRTIO_BLK_T_IN, 3, &[512, 4096, 1536], true);
    assert_eq!(submit(&mut d, &r), (VIRTIO_BLK_S_OK, 6144 + 1));
    assert_eq!(d.read(r.data, 6144), data[3 * 512..3 * 512 + 6144]);
    // The last sector: 100 bytes of image, then zeros.
    let last = data.len() as u64 / 512;
    let r = request(&mut d, 1, VIRTIO_BLK_T_IN, last, &[512], true);
    d.fill(r.data, &[0xff; 512]);
    assert_eq!(submit(&mut d, &r).0, VIRTIO_BLK_S_OK);
    let got = d.read(r.data, 512);
    assert_eq!(got[..100], data[last as usize * 512..]);
    assert!(got[100..].iter().all(|&b| b == 0));
    // Large requests: 126 segments of 4 KiB (a scattered 504 KiB read).
    let r = request(&mut d, 2, VIRTIO_BLK_T_IN, 8, &[4096; 126], true);
    assert_eq!(submit(&mut d, &r).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(r.data, 126 * 4096), data[4096..4096 + 126 * 4096]);
}

#[test]
fn block_reads_a_raw_file_straight_into_guest_buffers() {
    let data = pattern(1 << 20 | 100, 2);
    let file = TempImage::new("raw", &data);
    let image = file.open(false);
    assert!(image.direct_file().is_some());
    check_reads(image, &data);
}

#[test]
fn block_reads_other_formats_through_a_bounce_buffer() {
    let data = pattern(1 << 20 | 100, 3);
    check_reads(Arc::new(MemImage(data.clone())), &data);
}

#[test]
fn block_serves_many_requests_in_flight() {
    let data = pattern(4 << 20, 4);
    let mut d = block(Arc::new(MemImage(data.clone())), true);
    let requests: Vec<Request> = (0..20)
        .map(|k| request(&mut d, k, VIRTIO_BLK_T_IN, k * 97, &[8192, 512], true))
        .collect();
    for r in &requests {
        d.publish(0, r.head);
    }
    d.kick(0);
    d.wait_used(0, 20);
    let mut heads: Vec<u32> = (0..20).map(|i| d.used_elem(0, i).0).collect();
    heads.sort_unstable();
    let mut want: Vec<u32> = requests.iter().map(|r| u32::from(r.head)).collect();
    want.sort_unstable();
    assert_eq!(heads, want, "every request completed once");
    for (k, r) in requests.iter().enumerate() {
        assert_eq!(d.read(r.status, 1)[0], VIRTIO_BLK_S_OK);
        let at = k * 97 * 512;
        assert_eq!(d.read(r.data, 8704), data[at..at + 8704], "request {k}");
    }
}

#[test]
fn block_writes_only_when_writable_and_answers_flush_and_get_id() {
    let data = pattern(256 * 1024, 5);
    let file = TempImage::new("rw", &data);
    let mut ro = block(file.open(false), true);
    let w = request(&mut ro, 0, VIRTIO_BLK_T_OUT, 2, &[1024], false);
    ro.fill(w.data, &[0x42; 1024]);
    assert_eq!(submit(&mut ro, &w), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(
        std::fs::read(file.0.path()).unwrap(),
        data,
        "read-only disk unchanged"
    );

    let mut rw = block(file.open(true), false);
    let w = request(&mut rw, 0, VIRTIO_BLK_T_OUT, 2, &[512, 512], false);
    rw.fill(w.data, &[0x42; 1024]);
    assert_eq!(submit(&mut rw, &w), (VIRTIO_BLK_S_OK, 1));
    let f = request(&mut rw, 1, VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!(submit(&mut rw, &f), (VIRTIO_BLK_S_OK, 1));
    let on_disk = std::fs::read(file.0.path()).unwrap();
    assert!(on_disk[1024..2048].iter().all(|&b| b == 0x42));
    assert_eq!(on_disk[..1024], data[..1024]);
    assert_eq!(on_disk[2048..], data[2048..]);

    let id = request(&mut rw, 2, VIRTIO_BLK_T_GET_ID, 0, &[ID_LEN as u32], true);
    assert_eq!(submit(&mut rw, &id), (VIRTIO_BLK_S_OK, ID_LEN as u32 + 1));
    let mut want = b"bootbox-disk-1".to_vec();
    want.resize(ID_LEN, 0);
    assert_eq!(rw.read(id.data, ID_LEN), want);
    // Discard (11) and write-zeroes (13) are not offered.
    for kind in [11, 13, 0xdead] {
        let r = request(&mut rw, 3, kind, 0, &[512], false);
        assert_eq!(submit(&mut rw, &r).0, VIRTIO_BLK_S_UNSUPP, "type {kind}");
    }
}

#[test]
fn block_hostile_requests_get_an_error_status() {
    let data = pattern(64 * 1024, 6);
    let mut d = block(Arc::new(MemImage(data.clone())), true);
    let sectors = 64 * 1024 / 512;
    let cases: Vec<(&str, Request)> = vec![
        (
            "past the end",
            request(&mut d, 0, VIRTIO_BLK_T_IN, sectors, &[512], true),
        ),
        (
            "straddling the end",
            request(&mut d, 1, VIRTIO_BLK_T_IN, sectors - 1, &[1024], true),
        ),
        (
            "sector overflow",
            request(&mut d, 2, VIRTIO_BLK_T_IN, u64::MAX, &[512], true),
        ),
        (
            "sector * 512 wraps",
            request(&mut d, 3, VIRTIO_BLK_T_IN, 1 << 55, &[512], true),
        ),
        (
            "partial sector",
            request(&mut d, 4, VIRTIO_BLK_T_IN, 0, &[100], true),
        ),
        (
            "read with readable data",
            request(&mut d, 5, VIRTIO_BLK_T_IN, 0, &[512], false),
        ),
        (
            "segment above size_max",
            request(&mut d, 6, VIRTIO_BLK_T_IN, 0, &[SIZE_MAX + 512], true),
        ),
        (
            "no data",
            request(&mut d, 7, VIRTIO_BLK_T_GET_ID, 0, &[], true),
        ),
    ];
    for (what, r) in &cases {
        let (status, len) = submit(&mut d, r);
        assert_eq!((status, len), (VIRTIO_BLK_S_IOERR, 1), "{what}");
    }
    // A write with device-writable data (wrong direction) on a read-only disk.
    let r = request(&mut d, 8, VIRTIO_BLK_T_OUT, 0, &[512], true);
    assert_eq!(submit(&mut d, &r).0, VIRTIO_BLK_S_IOERR);

    // A header of 8 bytes, then the status.
    d.fill(DATA, &[0; 8]);
    let h = d.chain(0, &[(DATA, 8, false), (DATA + 16, 1, true)]);
    let r = Request {
        head: h,
        status: DATA + 16,
        data: 0,
    };
    assert_eq!(submit(&mut d, &r), (VIRTIO_BLK_S_IOERR, 1), "short header");

    // No writable byte at all: completed with nothing written, the device carries on.
    let h = d.chain(0, &[(DATA, 16, false)]);
    d.publish(0, h);
    d.kick(0);
    let idx = d.rings[0].next_avail;
    d.wait_used(0, idx);
    assert_eq!(d.used_elem(0, idx - 1), (u32::from(h), 0));

    // 127 data segments (more than seg_max) through an indirect table.
    let table = DATA + 20 * SLOT;
    let n = 127u16 + 2;
    d.fill(DATA, &[0; 16]);
    d.write_desc(table, 0, DATA, 16, VRING_DESC_F_NEXT, 1);
    for i in 1..=127 {
        let addr = DATA + 4096 + 512 * u64::from(i);
        d.write_desc(
            table,
            i,
            addr,
            512,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            i + 1,
        );
    }
    d.write_desc(table, n - 1, DATA + 16, 1, VRING_DESC_F_WRITE, 0);
    let ring = d.rings[0];
    let head = ring.next_desc;
    d.write_desc(
        ring.desc,
        head,
        table,
        u32::from(n) * 16,
        VRING_DESC_F_INDIRECT,
        0,
    );
    d.rings[0].next_desc = (head + 1) % ring.size;
    let r = Request {
        head,
        status: DATA + 16,
        data: 0,
    };
    assert_eq!(submit(&mut d, &r), (VIRTIO_BLK_S_IOERR, 1), "seg_max");

    // After all that, the device still serves a good request.
    assert_eq!(d.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    let r = request(&mut d, 9, VIRTIO_BLK_T_IN, 1, &[512], true);
    assert_eq!(submit(&mut d, &r).0, VIRTIO_BLK_S_OK);
    assert_eq!(d.read(r.data, 512), data[512..1024]);
}

#[test]
fn block_malformed_chain_puts_the_device_in_its_error_state() {
    let mut d = block(Arc::new(MemImage(vec![0; 4096])), true);
    let desc = d.rings[0].desc;
    d.write_desc(desc, 0, DATA, 16, VRING_DESC_F_NEXT, 1);
    d.write_desc(
        desc,
        1,
        DATA + 16,
        1,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        0,
    );
    d.publish(0, 0);
    d.kick(0);
    d.wait_broken();
    // Reset and recover.
    d.w32(0x70, 0);
    d.start(F_VERSION_1, 1, 128);
    let r = request(&mut d, 0, VIRTIO_BLK_T_IN, 0, &[512], true);
    assert_eq!(submit(&mut d, &r).0, VIRTIO_BLK_S_OK);
}

/// A seeded random walk over request shapes: a fuzz loop for the request parser, run as a
/// test (`BLOCK_FUZZ_SEED` and `BLOCK_FUZZ_ROUNDS` change it). Types known and unknown,
/// sectors in range, at the end and wild, 0 to 4 data buffers of any length, either direction,
/// on a read-only disk. Every request must get a status the spec allows and a used length no
/// longer than its device-writable bytes; a successful read returns the image's bytes (zeros
/// past its end); nothing is ever written.
#[test]
fn random_requests_get_allowed_statuses_and_the_right_bytes() {
    let data = pattern(256 * 1024 + 100, 9);
    let mut d = block(Arc::new(MemImage(data.clone())), true);
    let sectors = (data.len() as u64).div_ceil(512);
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let seed = env("BLOCK_FUZZ_SEED", 0x5eed_b10c);
    let rounds = env("BLOCK_FUZZ_ROUNDS", 3000);
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let kinds = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        3,
        11,
        u32::MAX,
    ];
    for round in 0..rounds {
        let kind = kinds[(next() % kinds.len() as u64) as usize];
        let sector = match next() % 4 {
            0 => next() % sectors,
            1 => sectors.saturating_sub(next() % 4),
            2 => next(),
            _ => 0,
        };
        let lens: Vec<u32> = (0..next() % 5)
            .map(|_| match next() % 4 {
                0 => 512 * (1 + (next() % 8) as u32),
                1 => (next() % 2000) as u32,
                2 => 0,
                _ => 4096,
            })
            .collect();
        let writable = next() % 4 != 0;
        let what = format!(
            "round {round} (seed {seed}): type {kind}, sector {sector}, {lens:?}, writable {writable}"
        );
        let r = request(&mut d, round % 4, kind, sector, &lens, writable);
        let (status, len) = submit(&mut d, &r);
        let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        assert!(
            [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&status),
            "status {status}: {what}"
        );
        let writable_bytes = if writable { total } else { 0 };
        assert!(
            u64::from(len) >= 1 && u64::from(len) <= writable_bytes + 1,
            "used length {len}: {what}"
        );
        assert!(
            kind != VIRTIO_BLK_T_OUT || status != VIRTIO_BLK_S_OK,
            "a write succeeded on a read-only disk: {what}"
        );
        if kind == VIRTIO_BLK_T_IN && status == VIRTIO_BLK_S_OK {
            // An empty read (no data buffers) is a no-op the device may answer OK.
            assert!(writable || total == 0, "{what}");
            let start = (sector * 512) as usize;
            let mut expected =
                data[start.min(data.len())..(start + total as usize).min(data.len())].to_vec();
            expected.resize(total as usize, 0);
            assert_eq!(d.read(r.data, total as usize), expected, "{what}");
            assert_eq!(u64::from(len), total + 1, "{what}");
        }
    }
}
