//! Host NUMA placement through the real binary: without zones the process's own policy places
//! guest RAM (`numactl --membind=0 vmm run` puts every page on node 0), and the placement check
//! after pinning reports it in `vm.zones[]`, the summary and the timeline.

use std::process::Command;

mod common;
use common::{stderr, stdout};

/// `numactl`, or `None` where `VMM_TEST_ALLOW_SKIP` allows `numactl` (Debian's `numactl`
/// package provides it; .ci/run installs it).
fn numactl() -> Option<Command> {
    let found = Command::new("numactl")
        .arg("--show")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some(Command::new("numactl"));
    }
    common::skip(
        "numactl",
        "numactl is not installed (Debian's numactl package)",
    );
    None
}

/// `vmm run ARGS --report FILE` under `wrapper` (a command the `vmm` binary is appended to);
/// the output and the report.
fn run_under(mut wrapper: Command, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = wrapper
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .arg("run")
        .args(args)
        .arg("--report")
        .arg(&report)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let r = std::fs::read_to_string(&report).unwrap();
    (out, serde_json::from_str(&r).unwrap())
}

const POPULATED_256M: [&str; 4] = ["--memory", "256M", "--pin", "populate"];

/// The one zone of a VM without zones, checked for every page populated on node 0.
fn the_ram_zone_is_all_on_node_0(r: &serde_json::Value) -> &serde_json::Value {
    let zones = r["vm"]["zones"].as_array().unwrap();
    assert_eq!(zones.len(), 1, "{r}");
    let z = &zones[0];
    assert_eq!(z["id"], "ram", "{z}");
    assert_eq!(z["bytes"], 256u64 << 20, "{z}");
    assert!(
        z["host_numa_node"].is_null() && z["guest_numa_id"].is_null(),
        "{z}"
    );
    // One sample per 2 MiB; the pin stage populated every page before the check.
    assert_eq!(z["placement_sampled"], 128, "{z}");
    assert_eq!(z["placement_not_present"], 0, "{z}");
    assert_eq!(z["placement_on_node"], 128, "{z}");
    assert_eq!(
        z["placement_per_node"],
        serde_json::json!([[0, 128]]),
        "{z}"
    );
    z
}

#[test]
fn numactl_membind_0_places_all_guest_ram_on_node_0_and_the_report_says_so() {
    let Some(mut numactl) = numactl() else {
        return;
    };
    numactl.arg("--membind=0");
    let (out, r) = run_under(numactl, &POPULATED_256M);
    let z = the_ram_zone_is_all_on_node_0(&r);
    assert_eq!(z["placement_rule"], "process policy bind 0", "{z}");
    assert_eq!(z["placement_nodes"], serde_json::json!([0]), "{z}");
    let err = stderr(&out);
    assert!(
        err.contains(
            "  placement     ram 100.0% of 128 sampled pages on node 0 (process policy bind 0)\n"
        ),
        "{err}"
    );
    assert!(!err.contains("WARN"), "{err}");
    // The check is a phase of its own, between pinning and loading.
    let names: Vec<&str> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let at = names
        .iter()
        .position(|&n| n == "placement")
        .expect("a placement phase");
    assert_eq!((names[at - 1], names[at + 1]), ("pin", "load"), "{names:?}");
}

#[test]
fn without_a_policy_the_cpusets_nodes_are_where_pages_belong() {
    let (out, r) = run_under(Command::new("env"), &POPULATED_256M);
    let z = the_ram_zone_is_all_on_node_0(&r);
    let rule = z["placement_rule"].as_str().unwrap();
    assert!(
        rule.starts_with("process policy default, cpuset nodes "),
        "{z}"
    );
    assert!(stderr(&out).contains("  placement     ram 100.0% of 128 sampled pages"));
}

#[test]
fn without_pinning_untouched_pages_are_counted_apart_not_elsewhere() {
    let (out, r) = run_under(Command::new("env"), &["--memory", "256M", "--pin", "none"]);
    let z = &r["vm"]["zones"][0];
    let (sampled, absent) = (
        z["placement_sampled"].as_u64().unwrap(),
        z["placement_not_present"].as_u64().unwrap(),
    );
    assert_eq!(sampled + absent, 128, "{z}");
    // Nothing was populated before the check: the loader has not run yet either.
    assert_eq!(sampled, 0, "{z}");
    assert!(
        stderr(&out).contains("ram no page present to sample"),
        "{}",
        stderr(&out)
    );
}
