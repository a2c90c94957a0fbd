//! Fixture hosts: two sockets, four nodes, a memory-only (CXL) node, asymmetric CPU counts,
//! an offline node, and the restrictions a cpuset or Mems_allowed puts on them.

use std::fs;

use super::*;

fn write(root: &Path, path: &str, text: &str) {
    let p = under(root, path);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// One node of a fixture: its CPU list, MemTotal in kB and distance line.
struct Node<'a> {
    cpus: &'a str,
    kb: u64,
    distance: &'a str,
    free_2m: u64,
}

/// A host whose `possible` nodes are `nodes` (index = id), `online` as given; the process
/// sees `mems_allowed` in its status.
fn host(nodes: &[Node], online: &str, mems_allowed: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    write(
        r,
        "/sys/devices/system/node/possible",
        &format!("0-{}\n", nodes.len() - 1),
    );
    write(r, "/sys/devices/system/node/online", &format!("{online}\n"));
    for (id, n) in nodes.iter().enumerate() {
        let d = format!("/sys/devices/system/node/node{id}");
        write(r, &format!("{d}/cpulist"), &format!("{}\n", n.cpus));
        write(
            r,
            &format!("{d}/meminfo"),
            &format!(
                "Node {id} MemTotal:       {} kB\nNode {id} MemFree:        1024 kB\n",
                n.kb
            ),
        );
        write(r, &format!("{d}/distance"), &format!("{}\n", n.distance));
        let h = format!("{d}/hugepages/hugepages-2048kB");
        write(
            r,
            &format!("{h}/free_hugepages"),
            &format!("{}\n", n.free_2m),
        );
        write(r, &format!("{h}/nr_hugepages"), &format!("{}\n", n.free_2m));
        write(
            r,
            &format!("{d}/hugepages/hugepages-1048576kB/free_hugepages"),
            "0\n",
        );
    }
    write(
        r,
        "/proc/self/status",
        &format!("Name:\tvmm\nMems_allowed:\t00000003\nMems_allowed_list:\t{mems_allowed}\n"),
    );
    t
}

const GIB_KB: u64 = 1 << 20;

fn two_sockets() -> tempfile::TempDir {
    host(
        &[
            Node {
                cpus: "0-7,16-23",
                kb: 64 * GIB_KB,
                distance: "10 21",
                free_2m: 512,
            },
            Node {
                cpus: "8-15,24-31",
                kb: 64 * GIB_KB,
                distance: "21 10",
                free_2m: 0,
            },
        ],
        "0-1",
        "0-1",
    )
}

#[test]
fn two_sockets_read_whole() {
    let t = two_sockets();
    let topo = HostTopology::read(t.path());
    assert_eq!(topo.nodes.len(), 2);
    let n1 = topo.node(1).unwrap();
    assert_eq!(
        n1.cpus,
        [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31]
    );
    assert_eq!(n1.mem_total, 64 << 30);
    assert_eq!(n1.distances, [21, 10]);
    assert!(n1.online);
    assert_eq!(topo.node(0).unwrap().free_huge_pages(2 << 20), 512);
    assert_eq!(n1.free_huge_pages(2 << 20), 0);
    assert_eq!(n1.free_huge_pages(1 << 30), 0);
    assert_eq!(n1.free_huge_pages, [(2 << 20, 0), (1 << 30, 0)]);
    assert_eq!(topo.mems_allowed, Some(vec![0, 1]));
    assert_eq!(topo.cpuset_mems, None);
    assert_eq!(topo.allowed(), [0, 1]);
    assert!(topo.check_node(1).is_ok());
    let e = topo.check_node(7).unwrap_err();
    assert_eq!(
        e.to_string(),
        "host NUMA node 7 does not exist on this host (its nodes: 0-1); give one of those"
    );
}

#[test]
fn four_nodes_with_asymmetric_cpus_and_a_memory_only_cxl_node() {
    let t = host(
        &[
            Node {
                cpus: "0-11",
                kb: 32 * GIB_KB,
                distance: "10 12 20 22",
                free_2m: 0,
            },
            Node {
                cpus: "12-15",
                kb: 16 * GIB_KB,
                distance: "12 10 22 20",
                free_2m: 0,
            },
            Node {
                cpus: "16-31",
                kb: 32 * GIB_KB,
                distance: "20 22 10 12",
                free_2m: 0,
            },
            // CXL memory: a node with RAM and no CPUs.
            Node {
                cpus: "",
                kb: 128 * GIB_KB,
                distance: "22 20 12 10",
                free_2m: 0,
            },
        ],
        "0-3",
        "0-3",
    );
    let topo = HostTopology::read(t.path());
    let cpus: Vec<usize> = topo.nodes.iter().map(|n| n.cpus.len()).collect();
    assert_eq!(cpus, [12, 4, 16, 0]);
    let cxl = topo.check_node(3).unwrap();
    assert!(cxl.cpus.is_empty());
    assert_eq!(cxl.mem_total, 128 << 30);
    assert_eq!(cxl.distances, [22, 20, 12, 10]);
    assert_eq!(topo.allowed(), [0, 1, 2, 3]);
}

#[test]
fn an_offline_node_is_listed_and_refused() {
    let t = host(
        &[
            Node {
                cpus: "0-3",
                kb: 8 * GIB_KB,
                distance: "10 20",
                free_2m: 0,
            },
            Node {
                cpus: "",
                kb: 0,
                distance: "",
                free_2m: 0,
            },
        ],
        "0",
        "0",
    );
    let topo = HostTopology::read(t.path());
    assert_eq!(topo.nodes.len(), 2);
    assert!(!topo.node(1).unwrap().online);
    let e = topo.check_node(1).unwrap_err();
    assert!(matches!(e, NodeError::Offline { node: 1, .. }), "{e}");
    assert!(e.to_string().contains("give an online node (0)"), "{e}");
    assert_eq!(topo.allowed(), [0]);
}

#[test]
fn a_cpu_only_node_cannot_hold_memory() {
    let t = host(
        &[
            Node {
                cpus: "0-3",
                kb: 8 * GIB_KB,
                distance: "10 20",
                free_2m: 0,
            },
            Node {
                cpus: "4-7",
                kb: 0,
                distance: "20 10",
                free_2m: 0,
            },
        ],
        "0-1",
        "0-1",
    );
    let e = HostTopology::read(t.path()).check_node(1).unwrap_err();
    assert!(matches!(e, NodeError::NoMemory { node: 1, .. }), "{e}");
}

#[test]
fn mems_allowed_restricts_and_is_named() {
    let t = two_sockets();
    write(
        t.path(),
        "/proc/self/status",
        "Name:\tvmm\nMems_allowed_list:\t0\n",
    );
    let topo = HostTopology::read(t.path());
    let e = topo.check_node(1).unwrap_err();
    assert!(
        matches!(e, NodeError::OutsideMemsAllowed { node: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("Mems_allowed_list (0"), "{e}");
    assert_eq!(topo.allowed(), [0]);
}

#[test]
fn a_v2_cpuset_restricts_and_its_file_is_named() {
    let t = two_sockets();
    write(t.path(), "/proc/self/cgroup", "0::/machine/vm1\n");
    write(
        t.path(),
        "/proc/self/mountinfo",
        "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n",
    );
    write(
        t.path(),
        "/sys/fs/cgroup/machine/vm1/cpuset.mems.effective",
        "1\n",
    );
    let topo = HostTopology::read(t.path());
    let c = topo.cpuset_mems.as_ref().unwrap();
    assert_eq!(c.nodes, [1]);
    let e = topo.check_node(0).unwrap_err();
    assert!(matches!(e, NodeError::OutsideCpuset { node: 0, .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("machine/vm1/cpuset.mems.effective allows 1"),
        "{msg}"
    );
    assert_eq!(topo.allowed(), [1]);
}

#[test]
fn a_v1_cpuset_restricts_too() {
    let t = two_sockets();
    write(t.path(), "/proc/self/cgroup", "3:cpuset:/vmm\n");
    write(
        t.path(),
        "/proc/self/mountinfo",
        "34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset\n",
    );
    write(t.path(), "/sys/fs/cgroup/cpuset/vmm/cpuset.mems", "0\n");
    let e = HostTopology::read(t.path()).check_node(1).unwrap_err();
    assert!(e.to_string().contains("vmm/cpuset.mems allows 0"), "{e}");
}

#[test]
fn a_host_without_node_files_has_no_nodes_and_refuses_every_one() {
    let t = tempfile::tempdir().unwrap();
    let topo = HostTopology::read(t.path());
    assert!(topo.nodes.is_empty() && topo.mems_allowed.is_none());
    let e = topo.check_node(0).unwrap_err();
    assert!(e.to_string().contains("(its nodes: none)"), "{e}");
}

#[test]
fn without_possible_or_online_the_node_directories_count() {
    let t = two_sockets();
    fs::remove_file(under(t.path(), "/sys/devices/system/node/possible")).unwrap();
    fs::remove_file(under(t.path(), "/sys/devices/system/node/online")).unwrap();
    let topo = HostTopology::read(t.path());
    assert_eq!(topo.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), [0, 1]);
    assert!(topo.nodes.iter().all(|n| n.online));
}

#[test]
fn odd_file_contents_leave_fields_empty_without_panicking() {
    let t = two_sockets();
    let d = "/sys/devices/system/node/node1";
    write(t.path(), &format!("{d}/cpulist"), "7-3\n");
    write(
        t.path(),
        &format!("{d}/meminfo"),
        "Node 1 MemTotal: 99999999999999999999 kB\n",
    );
    write(t.path(), &format!("{d}/distance"), "10 300\n");
    write(
        t.path(),
        &format!("{d}/hugepages/hugepages-2048kB/free_hugepages"),
        "lots\n",
    );
    write(
        t.path(),
        "/sys/devices/system/node/possible",
        "0-99999999\n",
    );
    let topo = HostTopology::read(t.path());
    // The possible list past any real node is refused, so online decides.
    assert_eq!(topo.nodes.len(), 2);
    let n1 = topo.node(1).unwrap();
    assert!(n1.cpus.is_empty() && n1.distances.is_empty());
    assert_eq!(n1.mem_total, 0);
    assert_eq!(n1.free_huge_pages, [(1 << 30, 0)]);
}

#[test]
fn parsers_take_what_the_kernel_writes() {
    assert_eq!(parse_node_list("0-1,3\n"), Some(vec![0, 1, 3]));
    assert_eq!(parse_node_list(""), Some(vec![]));
    assert_eq!(parse_node_list("1024"), None);
    assert_eq!(
        parse_node_mem_total("Node 0 MemTotal:       24683772 kB\n"),
        Some(24683772 * 1024)
    );
    assert_eq!(parse_node_mem_total("Node 0 MemFree: 1 kB\n"), None);
    assert_eq!(parse_distances("10 21 31\n"), Some(vec![10, 21, 31]));
    assert_eq!(parse_distances("10 256"), None);
    assert_eq!(parse_huge_page_dir("hugepages-2048kB"), Some(2 << 20));
    assert_eq!(parse_huge_page_dir("hugepages-0kB"), None);
    assert_eq!(parse_huge_page_dir("hugepages-99999999999999999kB"), None);
    assert_eq!(
        parse_mems_allowed("Mems_allowed:\t1\nMems_allowed_list:\t0-1\n"),
        Some(vec![0, 1])
    );
    assert_eq!(node_list([3, 0, 1, 1, 5, 6]), "0-1,3,5-6");
    assert_eq!(node_list([]), "none");
}

#[test]
fn this_host_reads_without_error() {
    let topo = HostTopology::detect();
    // Every node it allows is one it has.
    for id in topo.allowed() {
        assert!(topo.node(id).is_some());
    }
}
