//! Global descriptor table entries for entering the kernel, and their translation into the
//! `kvm_segment`s KVM wants in the segment registers.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor from access/flags (`0xF0FF` mask: flags nibble and access byte),
/// base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// GDT for the 64-bit entry: null, 64-bit code, data, TSS.
pub const GDT_64: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for the PVH entry: null, 32-bit flat code, flat data, TSS.
pub const GDT_32: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The byte-granular limit (scaled by 4 KiB when the G flag is set).
fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    if bit(entry, 55) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The `kvm_segment` for GDT slot `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_like_the_architecture_manual() {
        assert_eq!(GDT_64[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_64[2], 0x00cf_9300_0000_ffff);
        assert_eq!(GDT_32[1], 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x8b, 0x1234_5678, 0x67), 0x1200_8b34_5678_0067);
    }

    #[test]
    fn segments_decode_back() {
        let cs = segment_from_gdt(GDT_64[1], 1);
        assert_eq!(
            (cs.selector, cs.type_, cs.l, cs.db, cs.g),
            (8, 0xb, 1, 0, 1)
        );
        assert_eq!((cs.present, cs.s, cs.dpl, cs.unusable), (1, 1, 0, 0));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment_from_gdt(GDT_32[1], 1);
        assert_eq!((cs32.l, cs32.db, cs32.limit), (0, 1, 0xffff_ffff));
        let ds = segment_from_gdt(GDT_64[2], 2);
        assert_eq!((ds.selector, ds.type_, ds.db), (16, 3, 1));
        let tss = segment_from_gdt(gdt_entry(0x8b, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (tss.base, tss.limit, tss.s, tss.type_),
            (0x1234_5678, 0x67, 0, 0xb)
        );
        let null = segment_from_gdt(GDT_64[0], 0);
        assert_eq!(null.unusable, 1);
    }
}
