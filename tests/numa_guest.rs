//! The guest's view of NUMA, end to end through the binary: two memory zones and two guest
//! NUMA nodes (issue 18's CLI, Cloud Hypervisor's syntax) give the guest an ACPI SRAT and
//! SLIT; the probe guest prints one `numa node` line per node and checks them against the
//! `probe.expect_numa` words `vmm run` puts on its default command line. With both zones
//! bound to host node 0 the whole chain runs: mbind, helpers on the node's CPUs, the guest's
//! tables, the placement check.

mod common;

use common::{run_with_report, stderr, stdout, vmm};
use guest_abi::exit;
use guest_abi::probe::{NUMA_NODE_PREFIX, OPT_EXPECT_NUMA, RESULT_FAIL_PREFIX, RESULT_OK_LINE};

/// Two 1 GiB zones, one per guest node, one vCPU each; node 1 says it is 20 from node 0.
const TWO_NODES: &[&str] = &[
    "run",
    "--quiet",
    "--cpus",
    "2",
    "--memory-zone",
    "id=a,size=1G",
    "--memory-zone",
    "id=b,size=1G",
    "--numa",
    "guest_numa_id=0,cpus=[0],memory_zones=[a]",
    "--numa",
    "guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@20]",
];

/// The two nodes as the SRAT and SLIT must give them: zone a is the first GiB of RAM, zone
/// b the second (both below the 32-bit hole).
const NODE_LINES: [&str; 2] = [
    "0 cpus 0 mem 0x0-0x40000000 distances 10,20",
    "1 cpus 1 mem 0x40000000-0x80000000 distances 20,10",
];

fn run(extra: &[&str]) -> (Option<i32>, String) {
    let out = vmm().args(TWO_NODES).args(extra).output().unwrap();
    let text = stdout(&out);
    let stderr = common::stderr(&out);
    (out.status.code(), format!("{text}\nstderr:\n{stderr}"))
}

fn node_lines(output: &str) -> Vec<&str> {
    output
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix(NUMA_NODE_PREFIX))
        .collect()
}

#[test]
fn two_guest_nodes_reach_the_guest_and_match_the_configuration() {
    let (code, output) = run(&[]);
    assert_eq!(code, Some(exit::OK.into()), "{output}");
    assert_eq!(node_lines(&output), NODE_LINES, "{output}");
    // The default command line asked the probe to check them, one word per node.
    assert_eq!(
        output.matches(&format!("{OPT_EXPECT_NUMA}=")).count(),
        2,
        "{output}"
    );
    assert!(output.contains(RESULT_OK_LINE), "{output}");
}

#[test]
fn a_topology_that_differs_fails_the_probe_naming_what_differs() {
    let e = OPT_EXPECT_NUMA;
    for (cmdline, reason) in [
        (
            format!("{e}=0/0/0x0-0x40000000"),
            "expected 1 numa nodes, srat has 2",
        ),
        (
            format!("{e}=0/1/0x0-0x40000000 {e}=1/0/0x40000000-0x80000000"),
            "numa node 0 expected cpus 1, srat has 0",
        ),
        (
            format!("{e}=0/0/0x0-0x40000000 {e}=1/1/0x40000000-0x70000000"),
            "numa node 1 expected mem 0x40000000-0x70000000, srat has 0x40000000-0x80000000",
        ),
        (
            format!("{e}=0/0/0x0-0x40000000,0x100000000-0x140000000 {e}=1/1/0x40000000-0x80000000"),
            "numa node 0 expected mem 0x100000000-0x140000000, srat has none",
        ),
        (
            format!("{e}=0/0/0x0-0x40000000 {e}=0/1/0x40000000-0x80000000"),
            "bad value for probe.expect_numa",
        ),
    ] {
        let (code, output) = run(&["--cmdline", &cmdline]);
        assert_eq!(
            code,
            Some(exit::CHECK_FAILED.into()),
            "{cmdline}:\n{output}"
        );
        let want = format!("{RESULT_FAIL_PREFIX}{reason}");
        assert!(
            output.contains(&want),
            "want `{want}` for {cmdline}:\n{output}"
        );
    }
}

/// Issue 18's "done": two zones on host node 0, two guest nodes. The probe sees both nodes as
/// configured, each zone was filled by helpers restricted to node 0's CPUs, and every sampled
/// page of each zone is on node 0.
#[test]
fn two_zones_on_host_node_0_and_two_guest_nodes_boot_with_every_page_placed() {
    let args: Vec<&str> = TWO_NODES[1..]
        .iter()
        .map(|a| match *a {
            "id=a,size=1G" => "id=a,size=1G,host_numa_node=0",
            "id=b,size=1G" => "id=b,size=1G,host_numa_node=0",
            a => a,
        })
        .collect();
    let (out, report) = run_with_report(&args);
    let output = format!("{}\nstderr:\n{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(exit::OK.into()), "{output}");
    assert_eq!(node_lines(&output), NODE_LINES, "{output}");
    let r = report.expect("a report");
    let node0_cpus: Vec<u64> = std::fs::read_to_string("/sys/devices/system/node/node0/cpulist")
        .map(|l| cpu_list(l.trim()))
        .unwrap_or_default();
    let zones = r["vm"]["zones"].as_array().expect("vm.zones");
    assert_eq!(zones.len(), 2, "{r}");
    for (i, (z, id)) in zones.iter().zip(["a", "b"]).enumerate() {
        assert_eq!(z["id"], id, "{r}");
        assert_eq!(z["bytes"].as_u64(), Some(1 << 30), "{r}");
        assert_eq!(z["host_numa_node"].as_u64(), Some(0), "{r}");
        assert_eq!(z["guest_numa_id"].as_u64(), Some(i as u64), "{r}");
        let sampled = z["placement_sampled"].as_u64().unwrap();
        assert!(sampled >= 512, "one sample per 2 MiB of 1 GiB: {r}");
        assert_eq!(z["placement_on_node"].as_u64(), Some(sampled), "{r}");
    }
    let pinned = r["pin"]["zones"].as_array().expect("pin.zones");
    assert_eq!(pinned.len(), 2, "{r}");
    for z in pinned {
        assert_eq!(z["bytes"].as_u64(), Some(1 << 30), "{r}");
        assert!(z["threads"].as_u64().unwrap() >= 1, "{r}");
        let cpus: Vec<u64> = z["cpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert!(
            !cpus.is_empty(),
            "node 0 has CPUs, so its helpers are pinned: {r}"
        );
        assert!(
            cpus.iter().all(|c| node0_cpus.contains(c)),
            "{cpus:?} not within node 0's {node0_cpus:?}: {r}"
        );
    }
}

/// `0-2,5` -> [0, 1, 2, 5].
fn cpu_list(text: &str) -> Vec<u64> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .flat_map(|p| match p.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<u64>>(),
            None => vec![p.parse().unwrap()],
        })
        .collect()
}
