//! CPUID for a micro-VM: start from what KVM supports (`KVM_GET_SUPPORTED_CPUID`) and make it
//! describe this VM: per-vCPU APIC ids and topology (leaves 1, 4, 0xb, 0x1f), the hypervisor
//! bit and KVM signature, AMD core counts (0x8000_0008, 0x8000_001e), and no performance
//! monitoring (leaf 0xa) since there is no vPMU.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PERF_MON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;
/// AMD: core multi-processing legacy mode (leaf 0x8000_0001 ecx), "HTT means cores".
const ECX_CMP_LEGACY: u32 = 1 << 1;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_EPB: u32 = 1 << 3;
/// "KVMKVMKVM\0\0\0" in ebx, ecx, edx.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Levels in leaf 0xb/0x1f ecx[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `n` distinct APIC ids.
fn id_bits(n: u8) -> u32 {
    if n <= 1 {
        0
    } else {
        u32::from(n - 1).ilog2() + 1
    }
}

/// Rewrites `entries` (as returned by KVM) for vCPU `cpu` of `num_cpus`. The topology presented
/// is one socket with `num_cpus` single-threaded cores; APIC id = vCPU index.
pub fn normalise(entries: &mut Vec<kvm_cpuid_entry2>, cpu: u8, num_cpus: u8) {
    let apic_id = u32::from(cpu);
    let cpus = u32::from(num_cpus);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if num_cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                if e.eax & 0x1f == 0 {
                    continue; // no more caches
                }
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax &= 0x3fff; // keep type, level, flags
                e.eax |= (sharing & 0xfff) << 14;
                e.eax |= ((cpus - 1) & 0x3f) << 26;
            }
            LEAF_THERMAL_POWER => e.ecx &= !ECX_EPB,
            LEAF_PERF_MON => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = LEVEL_SMT << 8;
                    }
                    1 => {
                        e.eax = id_bits(num_cpus);
                        e.ebx = cpus;
                        e.ecx = (LEVEL_CORE << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            LEAF_EXT_FEATURES => {
                if num_cpus > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES => {
                // ecx[7:0] = cores - 1, ecx[15:12] = APIC id bits for the cores.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(num_cpus) << 12) | ((cpus - 1) & 0xff);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic_id; // extended APIC id
                e.ebx = apic_id & 0xff; // one thread per compute unit, unit id = vCPU
                e.ecx = 0; // one node, node id 0
                e.edx = 0;
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == LEAF_KVM_SIGNATURE) {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_KVM_SIGNATURE,
            eax: LEAF_KVM_SIGNATURE + 1,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(1, 0, 0x906ea, 0xff00_0800, 0x7ffa_3203, 0x178b_fbff),
            leaf(4, 0, 0x1c00_4121, 0x01c0_003f, 0x3f, 0),
            leaf(4, 3, 0x1c03_c163, 0x03c0_003f, 0x2fff, 6),
            leaf(4, 4, 0, 0, 0, 0),
            leaf(0xa, 0, 0x0703_0104, 0xff, 0, 0x603),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0xb, 1, 4, 8, 0x201, 7),
            leaf(0xb, 2, 0, 0, 2, 7),
            leaf(0x8000_0001, 0, 0, 0, 0x35c1_f3ff, 0x2fd3_fbff),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            leaf(0x8000_001e, 0, 9, 0x105, 0x300, 0),
        ]
    }

    #[test]
    fn apic_ids_and_counts_follow_the_vcpu() {
        let mut v = sample();
        normalise(&mut v, 2, 4);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let smt = find(&v, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&v, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let end = find(&v, 0xb, 2);
        assert_eq!((end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 2));
    }

    #[test]
    fn cache_leaves_report_our_core_count() {
        let mut v = sample();
        normalise(&mut v, 0, 4);
        let l1d = find(&v, 4, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax & 0x3fff, 0x0121);
        let l3 = find(&v, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(find(&v, 4, 4).eax, 0);
    }

    #[test]
    fn no_pmu_and_kvm_signature_present() {
        let mut v = sample();
        normalise(&mut v, 0, 1);
        let pm = find(&v, 0xa, 0);
        assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (0, 0, 0, 0));
        assert_eq!(find(&v, 1, 0).edx & EDX_HTT, 0);
        let sig = find(&v, 0x4000_0000, 0);
        assert_eq!(
            (sig.ebx, sig.ecx, sig.edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d)
        );
    }

    #[test]
    fn amd_topology_leaves_describe_single_thread_cores() {
        let mut v = sample();
        normalise(&mut v, 3, 4);
        let sizes = find(&v, 0x8000_0008, 0);
        assert_eq!((sizes.eax, sizes.ecx), (0x3030, 0x2003));
        let topo = find(&v, 0x8000_001e, 0);
        assert_eq!((topo.eax, topo.ebx, topo.ecx), (3, 3, 0));
        assert_ne!(find(&v, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        let mut one = sample();
        normalise(&mut one, 0, 1);
        assert_eq!(find(&one, 0x8000_0008, 0).ecx, 0);
        assert_eq!(find(&one, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
