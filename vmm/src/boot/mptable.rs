//! The Intel MultiProcessor Specification 1.4 table at the EBDA: one entry per vCPU, an ISA bus,
//! one IOAPIC with the 24 ISA/GSI interrupt sources, and the LINT0 (ExtINT) / LINT1 (NMI)
//! local interrupt sources. Linux uses it to find the CPUs and the IOAPIC when there is no ACPI.

use super::layout::{APIC_START, IOAPIC_START, MAX_VCPUS, MPTABLE_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const MPC_APIC_USABLE: u8 = 1;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const IOAPIC_PINS: u8 = 24;
/// Room reserved for the table (EBDA start to 0xa0000).
const MPTABLE_MAX: usize = 0x400;

/// Why the table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MptableError {
    #[error("{0} vCPUs requested; bootbox supports 1 to {MAX_VCPUS}")]
    BadCpuCount(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(String),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// The IOAPIC's id: one past the last CPU.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Builds the MP floating pointer and configuration table as bytes, ready to be placed at
/// [`MPTABLE_START`].
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::BadCpuCount(num_cpus));
    }
    let table_start = MPTABLE_START + 16;
    // Entries of the configuration table.
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    let ioapic = ioapic_id(num_cpus);
    entries.extend_from_slice(&[MP_IOAPIC, ioapic, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // type, irqtype, irqflag (u16, conforming polarity/trigger), src bus, src irq, dst apic, dst pin
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, pin, ioapic, pin]);
    }
    // ExtINT on every LAPIC's LINT0 comes from the PIC; NMI goes to LINT1 of all LAPICs.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);

    let entry_count = (num_cpus as u16) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"BOOTBOX ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table).wrapping_neg();

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_start as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(MPC_SPEC);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // features: no default configuration, no IMCR
    out[10] = checksum(&out).wrapping_neg();
    out.extend_from_slice(&table);
    debug_assert!(out.len() <= MPTABLE_MAX);
    Ok(out)
}

/// Builds the table and writes it at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| MptableError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_pointer_is_right() {
        for cpus in [1, 2, 4, MAX_VCPUS] {
            let t = build(cpus).unwrap();
            assert!(t.len() <= MPTABLE_MAX);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(checksum(&t[0..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(table), 0);
        }
    }

    #[test]
    fn contents_list_cpus_ioapic_and_interrupts() {
        let t = build(2).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        let mut at = 44;
        let mut kinds = [0usize; 5];
        let mut cpus = Vec::new();
        for _ in 0..count {
            let kind = table[at];
            kinds[kind as usize] += 1;
            if kind == MP_PROCESSOR {
                cpus.push((table[at + 1], table[at + 3]));
                at += 20;
            } else {
                if kind == MP_IOAPIC {
                    assert_eq!(table[at + 1], 3);
                    assert_eq!(&table[at + 4..at + 8], &0xfec0_0000u32.to_le_bytes());
                }
                at += 8;
            }
        }
        assert_eq!(at, table.len());
        assert_eq!(kinds, [2, 1, 1, 24, 2]);
        assert_eq!(
            cpus,
            vec![(0, CPU_ENABLED | CPU_BOOTPROCESSOR), (1, CPU_ENABLED)]
        );
    }

    #[test]
    fn refuses_bad_cpu_counts() {
        assert_eq!(build(0), Err(MptableError::BadCpuCount(0)));
        assert_eq!(
            build(MAX_VCPUS + 1),
            Err(MptableError::BadCpuCount(MAX_VCPUS + 1))
        );
    }
}
