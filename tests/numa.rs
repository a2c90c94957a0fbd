//! Memory zones and guest NUMA nodes through the real binary: zones boot the probe guest,
//! which checks its RAM from the E820 map (the zones' sum, one address map), each zone with
//! the backing its flags choose, and a zone on a host node this host lacks is refused in
//! milliseconds, before any memory is touched.

use std::time::{Duration, Instant};

mod common;
use common::{run_with_report, stderr, stdout, vmm};

#[test]
fn two_zones_boot_the_probe_and_their_sum_is_guest_ram() {
    let (out, r) = run_with_report(&[
        "--memory-zone",
        "id=a,size=1G",
        "--memory-zone",
        "id=b,size=1G",
    ]);
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{serial}\n{}", stderr(&out));
    assert!(serial.contains("probe: result ok"), "{serial}");
    let r = r.unwrap();
    assert_eq!(r["vm"]["memory_bytes"].as_u64(), Some(2 << 30), "{r}");
    // The probe's DMA checks ran over both zones (every GiB) through the epf server.
    assert_eq!(r["pin"]["bytes"].as_u64(), Some(2 << 30), "{r}");
}

#[test]
fn a_zone_across_the_32_bit_hole_boots_and_the_device_reaches_every_gib() {
    // Zone b runs from 2 GiB to the hole and on from 4 GiB.
    let (out, r) = run_with_report(&[
        "--memory-zone",
        "id=a,size=2G",
        "--memory-zone",
        "id=b,size=2G",
    ]);
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{serial}\n{}", stderr(&out));
    assert!(serial.contains("probe: result ok"), "{serial}");
    let r = r.unwrap();
    assert_eq!(r["vm"]["memory_bytes"].as_u64(), Some(4 << 30), "{r}");
    assert_eq!(r["pin"]["bytes"].as_u64(), Some(4 << 30), "{r}");
    let e820 = r["vm"]["e820"].as_array().unwrap();
    assert!(
        e820.iter()
            .any(|e| e["addr"].as_u64() == Some(4 << 30) && e["size"].as_u64() == Some(1 << 30)),
        "{r}"
    );
}

#[test]
fn two_guest_nodes_with_zones_of_their_own_backings_boot() {
    // Zone a takes --backing anon, zone b is shared=on (memfd): one file, for b alone.
    let (out, r) = run_with_report(&[
        "--cpus",
        "2",
        "--backing",
        "anon",
        "--user-device",
        "none",
        "--memory-zone",
        "id=a,size=128M",
        "--memory-zone",
        "id=b,size=128M,shared=on",
        "--numa",
        "guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@20]",
        "--numa",
        "guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@20]",
    ]);
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{serial}\n{}", stderr(&out));
    let r = r.unwrap();
    assert_eq!(r["vm"]["memory_bytes"].as_u64(), Some(256 << 20), "{r}");
    assert_eq!(r["vm"]["memory_shards"].as_u64(), Some(1), "{r}");
}

#[test]
fn a_zone_on_a_host_node_this_host_lacks_is_refused_in_milliseconds() {
    let started = Instant::now();
    let out = vmm()
        .args(["run", "--memory-zone", "id=far,size=1G,host_numa_node=7"])
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.starts_with(
            "vmm: --memory-zone id=far,host_numa_node=7: host NUMA node 7 does not exist"
        ),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(stdout(&out).is_empty());
    assert!(took < Duration::from_millis(500), "took {took:?}");
}
