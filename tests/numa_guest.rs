//! The guest's view of NUMA, end to end through the binary: two memory zones and two guest
//! NUMA nodes (issue 18's CLI, Cloud Hypervisor's syntax) give the guest an ACPI SRAT and
//! SLIT; the probe guest prints one `numa node` line per node and checks them against the
//! `probe.expect_numa` words `vmm run` puts on its default command line.
//!
//! Ignored until `--memory-zone`/`--numa` and the wiring from them to the `GuestNuma` of the
//! ACPI tables land; then run it with `cargo test --release -p vmm --test numa_guest`.

mod common;

use common::{stdout, vmm};
use guest_abi::exit;
use guest_abi::probe::{NUMA_NODE_PREFIX, OPT_EXPECT_NUMA, RESULT_FAIL_PREFIX, RESULT_OK_LINE};

const WAITS_FOR: &str = "needs --memory-zone/--numa and their GuestNuma wiring (issue 18)";

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
    assert_eq!(code, Some(exit::OK.into()), "{WAITS_FOR}:\n{output}");
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
