//! Host NUMA placement of guest RAM: binding a mapping to one host node before any page of it
//! is touched ([`bind`], `mbind(2)`), the process's own memory policy ([`Policy`],
//! `get_mempolicy(2)`), and where pages actually landed ([`sample_placement`], `move_pages(2)`
//! in query mode).
//!
//! How the kernel applies a binding depends on the mapping (mm/mempolicy.c):
//! - private anonymous memory (anon, thp): the policy is the VMA's own;
//! - a memfd (memfd, memfd-thp): mbind on a shared mapping sets the *file's* shared policy for
//!   the range mapped (shmem's `set_policy`), so every mapping of that file, a vfio-user
//!   server's included, allocates on the node whoever faults a page in;
//! - hugetlb: the VMA's policy (hugetlbfs keeps no shared policy), so the VMM's own mapping,
//!   which the pin stage populates, decides the node.
//!
//! MPOL_MF_STRICT without MPOL_MF_MOVE makes mbind fail with EIO when a page already present
//! in the range is not on the node: bound right after mmap, nothing is present, so it only
//! fails if something touched the range first, which is the bug it is there to catch.
//!
//! Without a node the process's policy rules (`numactl --membind=N vmm run`): helper threads
//! inherit it from the thread that creates them, so their first touches follow it.

use std::io;

use serde::Serialize;

/// `MPOL_MF_STRICT` (linux/mempolicy.h; the libc crate does not carry the mbind flags).
const MPOL_MF_STRICT: libc::c_uint = 1;

/// `MPOL_F_ADDR`: get_mempolicy reports the policy at an address, not the thread's.
const MPOL_F_ADDR: libc::c_ulong = 2;

/// `MPOL_F_MEMS_ALLOWED`: get_mempolicy reports the nodes the cpuset allows, as a mask.
const MPOL_F_MEMS_ALLOWED: libc::c_ulong = 4;

/// The largest node mask the kernel reads: a page of bits (`get_nodes` in mm/mempolicy.c).
const MAX_MASK_BITS: u64 = 4096 * 8;

/// Bits in the mask `get_mempolicy` fills: more nodes than any kernel configures
/// (`CONFIG_NODES_SHIFT` is at most 10), so it never refuses a mask as too small.
const POLICY_MASK_BITS: usize = 4096;

const WORD_BITS: u64 = u64::BITS as u64;

/// Binds `[addr, addr + len)` to host node `node` (MPOL_BIND, MPOL_MF_STRICT). Call it after
/// mmap and before anything touches the range. A node that does not exist, has no memory, or
/// lies outside this process's cpuset fails with EINVAL.
pub fn bind(addr: u64, len: u64, node: u32) -> io::Result<()> {
    if u64::from(node) >= MAX_MASK_BITS - 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut mask = vec![0u64; (u64::from(node) / WORD_BITS + 1) as usize];
    mask[(u64::from(node) / WORD_BITS) as usize] |= 1 << (u64::from(node) % WORD_BITS);
    // The kernel reads one bit fewer than `maxnode` says (get_nodes' `--maxnode`).
    let maxnode = mask.len() as u64 * WORD_BITS + 1;
    // SAFETY: mbind reads `mask` (maxnode - 1 bits, within the vector) and changes the policy
    // of the caller's range only; no memory of ours is written.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as usize,
            len as usize,
            libc::MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            MPOL_MF_STRICT,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A memory policy: the calling thread's (threads inherit it from their creator, so read on
/// the main thread it is the process's: what `numactl --membind` and the like set), or the one
/// at an address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// `default`, `preferred`, `bind`, `interleave`, `local`, `preferred-many`,
    /// `weighted-interleave`.
    pub mode: &'static str,
    /// The nodes the policy names; `None` where it names none (default, local): any node
    /// the cpuset allows.
    pub nodes: Option<Vec<u32>>,
    /// The mask as the kernel gave it.
    #[serde(skip)]
    mask: Vec<u64>,
}

impl Policy {
    /// A policy of `mode` naming `nodes` (tests, and callers that know it).
    pub fn new(mode: &'static str, nodes: Option<Vec<u32>>) -> Self {
        Policy {
            mode,
            nodes,
            mask: Vec::new(),
        }
    }

    /// This thread's policy; an error from get_mempolicy reads as the default (no nodes).
    pub fn current() -> Self {
        Self::get(0, 0).unwrap_or_else(|e| {
            tracing::debug!("get_mempolicy: {e}");
            Self::from_raw(libc::MPOL_DEFAULT, &[])
        })
    }

    /// The policy that applies at `addr`: its mapping's own, or a file's shared policy for a
    /// shared mapping, or the default when neither has one.
    pub fn at(addr: u64) -> io::Result<Self> {
        Self::get(addr, MPOL_F_ADDR)
    }

    /// The nodes this thread may allocate on at all (its cpuset's `mems_allowed`).
    pub fn mems_allowed() -> io::Result<Vec<u32>> {
        let p = Self::get(0, MPOL_F_MEMS_ALLOWED)?;
        Ok(Self::from_raw(libc::MPOL_BIND, &p.mask)
            .nodes
            .unwrap_or_default())
    }

    fn get(addr: u64, flags: libc::c_ulong) -> io::Result<Self> {
        let mut mode: libc::c_int = 0;
        let mut mask = vec![0u64; POLICY_MASK_BITS / WORD_BITS as usize];
        // SAFETY: get_mempolicy writes one int into `mode` and at most maxnode - 1 bits (the
        // whole vector) into `mask`; it only reads the policy at `addr`, never the memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &mut mode as *mut libc::c_int,
                mask.as_mut_ptr(),
                POLICY_MASK_BITS + 1,
                addr as usize,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut p = Self::from_raw(mode, &mask);
        p.mask = mask;
        Ok(p)
    }

    fn from_raw(mode: libc::c_int, mask: &[u64]) -> Self {
        // The mode flags (static, relative nodes, NUMA balancing) share the int.
        let mode = mode
            & !(libc::MPOL_F_STATIC_NODES
                | libc::MPOL_F_RELATIVE_NODES
                | libc::MPOL_F_NUMA_BALANCING);
        let (name, has_nodes) = match mode {
            libc::MPOL_PREFERRED => ("preferred", true),
            libc::MPOL_BIND => ("bind", true),
            libc::MPOL_INTERLEAVE => ("interleave", true),
            libc::MPOL_LOCAL => ("local", false),
            5 => ("preferred-many", true),
            6 => ("weighted-interleave", true),
            _ => ("default", false),
        };
        let nodes = has_nodes.then(|| {
            (0..mask.len() as u64 * WORD_BITS)
                .filter(|&b| mask[(b / WORD_BITS) as usize] & (1 << (b % WORD_BITS)) != 0)
                .map(|b| b as u32)
                .collect()
        });
        Policy {
            mode: name,
            nodes,
            mask: Vec::new(),
        }
    }

    /// As `numactl --show` words it: `bind 0,1`, `default`.
    pub fn describe(&self) -> String {
        match &self.nodes {
            Some(n) => format!("{} {}", self.mode, node_list(n)),
            None => self.mode.to_string(),
        }
    }
}

/// `0,2,3`: nodes as a comma-separated list.
pub fn node_list(nodes: &[u32]) -> String {
    nodes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Where sampled pages of a range are: pages per host node, and samples that found no page
/// (never touched, or the shared zero page), which are neither here nor elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// Samples that found a page.
    pub sampled: u64,
    /// Those pages, per node, in node order.
    pub per_node: Vec<(u32, u64)>,
    /// Samples that found no page.
    pub not_present: u64,
}

impl Placement {
    /// Pages on any of `nodes`.
    pub fn on(&self, nodes: &[u32]) -> u64 {
        self.per_node
            .iter()
            .filter(|(n, _)| nodes.contains(n))
            .map(|(_, c)| c)
            .sum()
    }

    /// `node 0 97.5%, node 1 2.5%`: each node's share of the pages found (`none` without any).
    pub fn shares(&self) -> String {
        if self.sampled == 0 {
            return "none".into();
        }
        self.per_node
            .iter()
            .map(|&(n, c)| format!("node {n} {:.1}%", 100.0 * c as f64 / self.sampled as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Adds another range's samples.
    pub fn merge(&mut self, other: &Placement) {
        self.sampled += other.sampled;
        self.not_present += other.not_present;
        for &(node, count) in &other.per_node {
            self.count(node, count);
        }
    }

    fn count(&mut self, node: u32, count: u64) {
        match self.per_node.binary_search_by_key(&node, |&(n, _)| n) {
            Ok(i) => self.per_node[i].1 += count,
            Err(i) => self.per_node.insert(i, (node, count)),
        }
    }
}

/// `step`, or the smallest multiple of it that takes at most `max_samples` samples of `len`
/// bytes.
pub fn sample_step(len: u64, step: u64, max_samples: u64) -> u64 {
    let (step, max) = (step.max(1), max_samples.max(1));
    let wanted = len.div_ceil(step);
    if wanted > max {
        step * wanted.div_ceil(max)
    } else {
        step
    }
}

/// Asks where the pages at `addr`, `addr + step`, ... below `addr + len` are, at most
/// `max_samples` of them (the step widens, in whole multiples of `step`, to stay within it).
/// Query mode: nothing moves and nothing is faulted in.
pub fn sample_placement(addr: u64, len: u64, step: u64, max_samples: u64) -> io::Result<Placement> {
    let step = sample_step(len, step, max_samples);
    let pages: Vec<*mut libc::c_void> = (0..len)
        .step_by(step as usize)
        .map(|off| (addr + off) as *mut libc::c_void)
        .collect();
    let mut status = vec![0 as libc::c_int; pages.len()];
    let mut placement = Placement::default();
    if pages.is_empty() {
        return Ok(placement);
    }
    // SAFETY: move_pages with no target nodes only reads `pages` and writes one int per page
    // into `status`, both `pages.len()` long; pid 0 is this process and nothing is moved.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len(),
            pages.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    for s in status {
        match u32::try_from(s) {
            Ok(node) => {
                placement.sampled += 1;
                placement.count(node, 1);
            }
            // -ENOENT (not present) or -EFAULT (the zero page, or nothing mapped).
            Err(_) => placement.not_present += 1,
        }
    }
    Ok(placement)
}

/// Whether host node `node` exists here (sysfs).
#[cfg(test)]
pub fn node_exists(node: u32) -> bool {
    std::path::Path::new(&format!("/sys/devices/system/node/node{node}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A fresh private anonymous mapping, unmapped on drop.
    struct Map(u64, u64);

    impl Map {
        fn new(len: u64) -> Self {
            // SAFETY: a fresh mapping at a kernel-chosen address aliases nothing.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Map(p as u64, len)
        }

        fn touch(&self) {
            // SAFETY: the mapping is this test's own and `self.1` bytes long.
            unsafe { std::ptr::write_bytes(self.0 as *mut u8, 1, self.1 as usize) };
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmapping the test's own mapping, not used after this.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1 as usize) };
        }
    }

    #[test]
    fn bound_pages_land_on_node_0_and_untouched_ones_count_apart() {
        let m = Map::new(64 * MIB);
        bind(m.0, m.1, 0).unwrap();
        let before = sample_placement(m.0, m.1, 2 * MIB, 1 << 16).unwrap();
        assert_eq!((before.sampled, before.not_present), (0, 32), "{before:?}");
        m.touch();
        let after = sample_placement(m.0, m.1, 2 * MIB, 1 << 16).unwrap();
        assert_eq!(after.sampled, 32, "{after:?}");
        assert_eq!(after.on(&[0]), 32, "{after:?}");
        assert_eq!(after.per_node, vec![(0, 32)]);
    }

    #[test]
    fn a_node_that_does_not_exist_is_refused() {
        let m = Map::new(4 * MIB);
        let absent = (1..64).find(|&n| !node_exists(n)).unwrap();
        let e = bind(m.0, m.1, absent).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        assert!(bind(m.0, m.1, u32::MAX).is_err());
        // The range keeps no policy from the refusals: binding to node 0 still works.
        bind(m.0, m.1, 0).unwrap();
    }

    #[test]
    fn samples_are_bounded_by_widening_the_step() {
        let m = Map::new(64 * MIB);
        m.touch();
        let p = sample_placement(m.0, m.1, 2 * MIB, 10).unwrap();
        // 32 pages at 2 MiB; bounded to 10, the step becomes 8 MiB: 8 samples.
        assert_eq!(p.sampled + p.not_present, 8, "{p:?}");
        let p = sample_placement(m.0, m.1, 4096, 1 << 16).unwrap();
        assert_eq!(p.sampled, 16384, "{p:?}");
    }

    #[test]
    fn policies_read_as_numactl_shows_them() {
        let p = Policy::from_raw(libc::MPOL_BIND | libc::MPOL_F_STATIC_NODES, &[0b101]);
        assert_eq!(p.describe(), "bind 0,2");
        assert_eq!(Policy::from_raw(0, &[0]).describe(), "default");
        let mut mask = vec![0u64; 2];
        mask[1] = 1;
        assert_eq!(Policy::from_raw(3, &mask).nodes, Some(vec![64]));
        // This test process runs under whatever policy it was started with; it reads.
        let here = Policy::current();
        assert!(!here.mode.is_empty());
        let m = Map::new(4 * MIB);
        assert_eq!(Policy::at(m.0).unwrap().mode, "default");
        bind(m.0, m.1, 0).unwrap();
        assert_eq!(Policy::at(m.0).unwrap().describe(), "bind 0");
        assert!(Policy::mems_allowed().unwrap().contains(&0));
    }

    #[test]
    fn placements_merge_per_node() {
        let mut a = Placement {
            sampled: 3,
            per_node: vec![(0, 2), (2, 1)],
            not_present: 1,
        };
        a.merge(&Placement {
            sampled: 2,
            per_node: vec![(1, 1), (2, 1)],
            not_present: 4,
        });
        assert_eq!(a.per_node, vec![(0, 2), (1, 1), (2, 2)]);
        assert_eq!((a.sampled, a.not_present, a.on(&[1, 2])), (5, 5, 3));
        assert_eq!(a.shares(), "node 0 40.0%, node 1 20.0%, node 2 40.0%");
        assert_eq!(Placement::default().shares(), "none");
    }
}
