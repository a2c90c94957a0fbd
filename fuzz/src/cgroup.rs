//! Target `cgroup`: the parsers of the files pinning reads to learn its limits
//! (`/proc/self/cgroup` with `/proc/self/mountinfo`, `/proc/self/status`, CPU lists,
//! `cpu.max`, `cpu.cfs_quota_us`/`cpu.cfs_period_us`, `memory.max`/`memory.current`, and
//! the NUMA topology's node lists, `Mems_allowed_list`, node MemTotal, distances and huge
//! page directory names), on arbitrary text.
//!
//! Invariants:
//! - nothing panics, overflows or allocates without bound, whatever the text;
//! - every cgroup directory found lies inside its hierarchy's mount, which lies under the
//!   root the files were read from, so the limit files read are the cgroup's and its
//!   ancestors' and never anything outside the mount; its lineage starts at the cgroup and
//!   ends at the mount;
//! - a CPU list parses to what it says: the members, each range expanded, and printing
//!   them back as a list parses to the same members;
//! - a `kB` field is 1024 times the number written; CPU quotas are positive and finite with
//!   at least one whole CPU; memory limits are below "no limit" and their room is at most
//!   the limit.

use std::path::{Component, Path};

use pinning::fuzzing;

use crate::{Input, Seed};

/// Splits the input into up to `N` texts at 0xff bytes (never valid UTF-8, so never part of
/// a file's text).
fn texts<const N: usize>(data: &[u8]) -> [String; N] {
    let mut parts = data.split(|&b| b == 0xff);
    std::array::from_fn(|_| String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned())
}

fn no_dotdot(p: &Path) -> bool {
    !p.components().any(|c| c == Component::ParentDir)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8();
    let [a, b, c] = texts::<3>(input.rest());
    match which % 7 {
        0 => {
            let root = Path::new("/fuzz-root");
            for h in fuzzing::cgroups(root, &a, &b) {
                assert!(h.mount.starts_with(root), "{}: mount {:?}", h.name, h.mount);
                assert!(
                    h.dir.starts_with(&h.mount),
                    "{}: {:?} outside {:?}",
                    h.name,
                    h.dir,
                    h.mount
                );
                assert!(
                    no_dotdot(&h.dir) && no_dotdot(&h.mount),
                    "{}: cgroup directory {:?} (mount {:?}) leaves its mount",
                    h.name,
                    h.dir,
                    h.mount
                );
                assert_eq!(
                    h.lineage.first(),
                    Some(&h.dir),
                    "{}: lineage starts at the cgroup",
                    h.name
                );
                assert_eq!(
                    h.lineage.last(),
                    Some(&h.mount),
                    "{}: lineage ends at the mount",
                    h.name
                );
                assert!(h.lineage.iter().all(|p| p.starts_with(&h.mount)));
            }
        }
        1 => {
            let s = fuzzing::proc_status(&a);
            let _ = fuzzing::status_caps(&s);
            for key in ["VmLck", "VmRSS", "MemTotal"] {
                if let Some(bytes) = fuzzing::kb_field(&a, key) {
                    assert_eq!(bytes % 1024, 0);
                }
            }
        }
        2 => {
            if let Some(cpus) = fuzzing::cpu_list(&a) {
                let printed: Vec<String> = cpus.iter().map(usize::to_string).collect();
                assert_eq!(fuzzing::cpu_list(&printed.join(",")), Some(cpus.clone()));
                // Every member is a number the text contains.
                for c in cpus.iter().take(64) {
                    assert!(
                        a.contains(&c.to_string()) || cpus.len() > 1,
                        "cpu {c} from {a:?}"
                    );
                }
            }
        }
        3 => {
            for q in [fuzzing::v2_quota(&a), fuzzing::v1_quota(&a, &b)]
                .into_iter()
                .flatten()
            {
                assert!(q.cpus.is_finite() && q.cpus > 0.0, "quota {q:?}");
                assert!(q.whole() >= 1);
            }
        }
        4 => {
            let usage = (!b.is_empty()).then_some(b.as_str());
            if let Some(m) = fuzzing::memory(&a, usage) {
                assert!(m.limit < 1 << 60);
                assert!(m.room() <= m.limit);
            }
        }
        6 => topology(&a),
        _ => {
            // All of them on the same text, as a file that is not what it should be.
            let _ = fuzzing::cgroups(Path::new("/"), &a, &a);
            let _ = fuzzing::proc_status(&c);
            let _ = fuzzing::cpu_list(&c);
            let _ = fuzzing::v2_quota(&c);
            let _ = fuzzing::memory(&c, Some(&c));
        }
    }
}

/// The NUMA topology's parsers (`pinning::topology`) on one text: node lists stay below the
/// kernel's node limit and print back to themselves, sizes are whole KiB, a distance line has
/// at most one entry per possible node.
fn topology(text: &str) {
    let t = fuzzing::topology(text);
    for nodes in [&t.nodes, &t.mems_allowed].into_iter().flatten() {
        assert!(nodes.iter().all(|&n| n < 1024), "{nodes:?} from {text:?}");
        let printed: Vec<String> = nodes.iter().map(u32::to_string).collect();
        assert_eq!(
            fuzzing::topology(&printed.join(",")).nodes.as_ref(),
            Some(nodes)
        );
    }
    assert!(t.mem_total.is_none_or(|b| b % 1024 == 0));
    assert!(t.huge_page_size.is_none_or(|b| b > 0 && b % 1024 == 0));
    assert!(t.distances.is_none_or(|d| d.len() <= 1024));
}

/// Seeds: the files of this host (cgroup v1 controllers plus a cgroup2 mount), a pure v2
/// host and a container with a sub-tree mount root.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let join = |which: u8, parts: &[&str]| {
        let mut s = Seed::new();
        s.u8(which);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                s.u8(0xff);
            }
            s.bytes(p.as_bytes());
        }
        s.0
    };
    let hybrid_mounts = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    vec![
        (
            "hybrid",
            join(0, &["4:memory:/\n3:cpuset:/\n1:cpu:/tenant/vmm\n0::/\n", hybrid_mounts]),
        ),
        (
            "container",
            join(
                0,
                &[
                    "0::/pod/ctr\n",
                    "100 90 0:40 /pod /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n\
                     101 90 0:41 / /with\\040space rw - tmpfs tmpfs rw\n",
                ],
            ),
        ),
        (
            "status",
            join(
                1,
                &["Name:\tvmm\nVmLck:\t    2048 kB\nVmRSS:\t  123456 kB\nCapEff:\t0000000000004000\n"],
            ),
        ),
        ("cpus", join(2, &["0-3,8,10-11\n"])),
        ("quota", join(3, &["150000 100000\n", "-1\n"])),
        ("memory", join(4, &["1073741824\n", "524288\n"])),
        ("topology", join(6, &["Node 0 MemTotal:       24683772 kB\n"])),
    ]
}
