//! The CPUID each vCPU sees: what KVM supports, with this vCPU's APIC id and a topology of
//! `cpus` single-threaded cores in one package, and the hypervisor bit set.
//!
//! DESIGN.md section 4: the nested KVM here honours `KVM_SET_CPUID2` only in part (leaf 1 EDX
//! and leaf 7 show host values), so guests must not rely on features being hidden.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

// Topology level types (leaf 0xb/0x1f ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// CPU vendor, from leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD or HygonGenuine.
    Amd,
    /// Anything else.
    Other,
}

/// The vendor the entries describe.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(e) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&e.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&e.edx.to_le_bytes());
    id[8..12].copy_from_slice(&e.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `n` items (ceil(log2 n)).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_leaf(function: u32, cpu: u32, cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: index | (level_type << 8),
        edx: cpu,
        ..Default::default()
    };
    [
        // One thread per core: no SMT bits in the APIC id.
        entry(0, 0, 1, LEVEL_SMT),
        entry(1, bits_for(cpus), cpus, LEVEL_CORE),
        // Terminating, invalid level.
        entry(2, 0, 0, 0),
    ]
}

/// Filters KVM's supported CPUID for vCPU `cpu` of `cpus`.
pub fn filter(supported: &[kvm_cpuid_entry2], cpu: u32, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    let cpus = cpus.clamp(1, 255);
    let vendor = vendor(supported);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 6);
    let mut topology_done = [false; 2];
    for e in supported {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | ((cpus & 0xff) << 16) | ((cpu & 0xff) << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                // [31:26] cores per package - 1; [25:14] threads sharing this cache - 1
                // (only the last level, L3, is shared by all cores).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let slot = usize::from(e.function == LEAF_TOPOLOGY_V2);
                if !topology_done[slot] {
                    topology_done[slot] = true;
                    out.extend(topology_leaf(e.function, cpu, cpus));
                }
                continue;
            }
            LEAF_HYPERVISOR => {
                [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
            }
            LEAF_EXT_FEATURES if vendor == Vendor::Amd && cpus > 1 => {
                e.ecx |= EXT1_ECX_CMP_LEGACY;
            }
            LEAF_EXT_ADDR_SIZES if vendor == Vendor::Amd => {
                // ECX [7:0] cores - 1, [15:12] APIC id bits for the cores.
                e.ecx = (e.ecx & !0xf0ff) | (cpus - 1) | (bits_for(cpus) << 12);
            }
            LEAF_AMD_TOPOLOGY if vendor == Vendor::Amd => {
                // Extended APIC id; compute unit (core) id with one thread each; one node.
                e.eax = cpu;
                e.ebx = cpu & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn amd_supported() -> Vec<kvm_cpuid_entry2> {
        let mut v = leaf(0, 0);
        // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
        v.ebx = u32::from_le_bytes(*b"Auth");
        v.edx = u32::from_le_bytes(*b"enti");
        v.ecx = u32::from_le_bytes(*b"cAMD");
        let mut l1 = leaf(1, 0);
        l1.ebx = 0x0000_0800; // CLFLUSH line size 8 * 8
        vec![
            v,
            l1,
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0x4000_0000, 0),
            leaf(0x8000_0001, 0),
            leaf(0x8000_0008, 0),
            leaf(0x8000_001e, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_id_count_and_hypervisor_bit() {
        let out = filter(&amd_supported(), 2, 4);
        assert_eq!(vendor(&out), Vendor::Amd);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let one = filter(&amd_supported(), 0, 1);
        assert_eq!(find(&one, 1, 0).edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_n_cores() {
        let out = filter(&amd_supported(), 3, 6);
        let smt = find(&out, 0xb, 0);
        let core = find(&out, 0xb, 1);
        let end = find(&out, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 3));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
        assert_eq!(out.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(out
            .iter()
            .filter(|e| e.function == 0xb)
            .all(|e| e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX));
        let amd = find(&out, 0x8000_0008, 0);
        assert_eq!((amd.ecx & 0xff, (amd.ecx >> 12) & 0xf), (5, 3));
        assert_eq!(find(&out, 0x8000_001e, 0).eax, 3);
        assert_ne!(find(&out, 0x8000_0001, 0).ecx & EXT1_ECX_CMP_LEGACY, 0);
    }

    #[test]
    fn kvm_signature_and_intel_cache_leaf() {
        let out = filter(&amd_supported(), 0, 1);
        let sig = find(&out, 0x4000_0000, 0);
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"KVMKVMKVM\0\0\0");

        // Intel-style leaf 4: L1 data (type 1, level 1) and L3 (type 3, level 3).
        let mut l1d = leaf(4, 0);
        l1d.eax = 1 | (1 << 5);
        let mut l3 = leaf(4, 3);
        l3.eax = 3 | (3 << 5);
        let out = filter(&[l1d, l3, leaf(4, 4)], 0, 4);
        let l1d = find(&out, 4, 0);
        assert_eq!((l1d.eax >> 26, (l1d.eax >> 14) & 0xfff), (3, 0));
        let l3 = find(&out, 4, 3);
        assert_eq!((l3.eax >> 26, (l3.eax >> 14) & 0xfff), (3, 3));
        assert_eq!(find(&out, 4, 4).eax, 0, "the null terminator stays null");
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
