//! `resources/bench/manycore.sh`'s NUMA sweep, planned (`DRY_RUN=1`) against fixture node trees
//! (`NODE_DIR`): on a host with two nodes with CPUs it plans each node's local run, the zones at
//! once and a `vmm run` with a zone per node; on a one-node host it says why it skips them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/bench/manycore.sh")
}

/// A `vmm` and a `vmm-bench` that must never run: a dry run only checks they are there.
fn fake_vmm(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    for name in ["vmm", "vmm-bench"] {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\necho must not run >&2\nexit 99\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.join("vmm")
}

/// Nodes as `(id, cpulist, MemTotal kB)` under a fixture `NODE_DIR`.
fn nodes(dir: &Path, nodes: &[(u32, &str, u64)]) -> PathBuf {
    let root = dir.join("node");
    let ids: Vec<String> = nodes.iter().map(|n| n.0.to_string()).collect();
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("online"), ids.join(",") + "\n").unwrap();
    for &(id, cpus, kb) in nodes {
        let d = root.join(format!("node{id}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpulist"), format!("{cpus}\n")).unwrap();
        std::fs::write(
            d.join("meminfo"),
            format!("Node {id} MemTotal:       {kb} kB\nNode {id} MemFree:  1 kB\n"),
        )
        .unwrap();
    }
    root
}

fn dry_run(node_dir: &Path, out: &Path, env: &[(&str, &str)]) -> Output {
    let dir = out.parent().unwrap();
    Command::new("bash")
        .arg(script())
        .arg(fake_vmm(dir))
        .arg(out)
        .env("DRY_RUN", "1")
        .env("NODE_DIR", node_dir)
        .env_remove("NUMA_NODES")
        .env_remove("NUMA_SIZE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn numa_rows(out: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(out.join("plan.tsv"))
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("numa-"))
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

fn host_json(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("host.json")).unwrap()).unwrap()
}

#[test]
fn two_nodes_with_cpus_get_a_local_run_each_then_zones_on_both_and_a_vmm_run() {
    let tmp = tempfile::tempdir().unwrap();
    // Node 2: memory only (CXL), no CPUs to fill it locally: not swept.
    let root = nodes(
        tmp.path(),
        &[
            (0, "0-3", 64 << 20),
            (1, "4-7", 64 << 20),
            (2, "", 16 << 20),
        ],
    );
    let out = tmp.path().join("out");
    let o = dry_run(&root, &out, &[("SIZES", "16G,32G")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("must not run"), "{err}");
    let rows: Vec<(String, String, String)> = numa_rows(&out)
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[3].clone()))
        .collect();
    let row = |k: &str, mib: &str, t: &str| (k.to_string(), mib.to_string(), t.to_string());
    // The largest size, split in two: each node alone with its share on its 4 CPUs, then
    // both zones at once on all 8.
    assert_eq!(
        rows,
        vec![
            row("numa-node0", "16384", "4"),
            row("numa-node1", "16384", "4"),
            row("numa-zones", "32768", "8"),
            row("numa-run", "32768", "8"),
        ]
    );
    let host = host_json(&out);
    assert_eq!(host["host_numa_nodes"], "0,1");
    assert_eq!(host["numa_nodes"], "0,1");
    assert_eq!(host["notes"], serde_json::json!([]));
    // Within the one budget: the estimate still fits.
    let note = std::fs::read_to_string(out.join("plan.note")).unwrap();
    assert!(note.contains("in all, of 420 s"), "{note}");
}

#[test]
fn one_node_skips_the_sweep_and_says_why_unless_numa_nodes_asks_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = nodes(tmp.path(), &[(0, "0-1", 24 << 20)]);
    let out = tmp.path().join("out");
    let o = dry_run(&root, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(numa_rows(&out).is_empty());
    let note = "NUMA sweep skipped: this host has 1 NUMA node(s) with CPUs and memory (0, under";
    assert!(err.contains(note), "{err}");
    let host = host_json(&out);
    assert_eq!(host["numa_nodes"], "");
    assert!(
        host["notes"][0].as_str().unwrap().starts_with(note),
        "{host}"
    );
    // Asked for, it runs on one node: two zones on node 0, one local run of node 0.
    let out = tmp.path().join("out2");
    let o = dry_run(&root, &out, &[("NUMA_NODES", "0,0"), ("NUMA_SIZE", "1G")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let kinds: Vec<(String, String)> = numa_rows(&out)
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let k = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        kinds,
        vec![
            k("numa-node0", "512"),
            k("numa-zones", "1024"),
            k("numa-run", "1024")
        ]
    );
    // A node without CPUs there is refused, naming it.
    let o = dry_run(&root, &tmp.path().join("out3"), &[("NUMA_NODES", "0,5")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("NUMA_NODES: `5` is not a node with CPUs"),
        "{err}"
    );
}
