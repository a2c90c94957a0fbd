use clap::Parser;
use serde_json::json;

use super::*;
use crate::cli::run::RunArgs;

#[derive(Parser)]
#[command(name = "vmm run")]
struct Line {
    #[command(flatten)]
    run: RunArgs,
}

fn run_args(args: &[String]) -> RunArgs {
    let line = std::iter::once("vmm run".to_string()).chain(args.iter().cloned());
    Line::try_parse_from(line)
        .expect("vmm run parses its own arguments")
        .run
}

fn config(value: serde_json::Value) -> VmConfigJson {
    parse(value.to_string().as_bytes()).expect("a config vmm supports")
}

fn refusal(value: serde_json::Value) -> String {
    parse(value.to_string().as_bytes())
        .expect_err("a config vmm refuses")
        .to_string()
}

/// Every field vmm reads, each with a value other than its default.
fn full() -> serde_json::Value {
    json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 2u64 << 30, "shared": true, "hugepages": false, "thp": false,
                   "zones": [{"id": "a", "size": 1u64 << 30, "host_numa_node": 0,
                              "shared": true, "hugepages": true},
                             {"id": "b", "size": 1u64 << 30}]},
        "numa": [{"guest_numa_id": 0, "cpus": [0], "memory_zones": ["a"],
                  "distances": [{"destination": 1, "distance": 20}]},
                 {"guest_numa_id": 1, "cpus": [1], "memory_zones": ["b"],
                  "distances": [{"destination": 0, "distance": 20}]}],
        "payload": {"kernel": "/boot/vmlinuz", "initramfs": "/boot/initrd.img",
                    "cmdline": "console=ttyS0 -x"},
        "devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0"}],
        "user_devices": [{"socket": "/run/epf.sock"}],
        "serial": {"mode": "File", "file": "/var/log/serial.txt"},
        "console": {"mode": "Off"},
        "vmm": {"pin_threads": 4, "pin": "iommufd", "memory_shard": 1u64 << 29,
                "seccomp": "log", "timeout": 2.5, "boot_protocol": "pvh",
                "serial_log_max": 1u64 << 20, "iommu": "iommufd", "epf": true}
    })
}

#[test]
fn every_supported_field_maps_to_its_flag() {
    let args = config(full()).to_run_args();
    let expected = [
        "--cpus=2",
        "--memory=2G",
        "--memory-zone=id=a,size=1G,host_numa_node=0,shared=on,hugepages=on",
        "--memory-zone=id=b,size=1G",
        "--numa=guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@20]",
        "--numa=guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@20]",
        "--kernel=/boot/vmlinuz",
        "--initrd=/boot/initrd.img",
        "--cmdline=console=ttyS0 -x",
        "--device=/sys/bus/pci/devices/0000:01:00.0",
        "--user-device=epf",
        "--user-device=/run/epf.sock",
        "--serial-log=/var/log/serial.txt",
        "--backing=memfd",
        "--pin=iommufd",
        "--seccomp=log",
        "--boot-protocol=pvh",
        "--iommu=iommufd",
        "--pin-threads=4",
        "--memory-shard=512M",
        "--serial-log-max=1M",
        "--timeout=2.5",
    ];
    assert_eq!(args, expected);
    // ... and `vmm run` reads each back as the config meant it.
    let run = run_args(&args);
    assert_eq!(
        (run.cpus, run.memory, run.memory_zones.len()),
        (2, Some(2 << 30), 2)
    );
    assert_eq!(run.cmdline.as_deref(), Some("console=ttyS0 -x"));
    assert_eq!(run.memory_shard, Some(1 << 29));
    assert_eq!(run.serial_log_max, 1 << 20);
}

#[test]
fn an_empty_config_is_vmm_runs_defaults_without_a_device() {
    assert_eq!(config(json!({})).to_run_args(), ["--user-device=none"]);
    let nulls = json!({"cpus": null, "memory": null, "devices": null, "vmm": null});
    assert_eq!(config(nulls), VmConfigJson::default());
}

#[test]
fn serial_modes_map_to_the_serial_log() {
    for (mode, flag) in [
        ("Off", Some("--serial-log=/dev/null")),
        ("Null", Some("--serial-log=/dev/null")),
        ("Tty", None),
    ] {
        let args = config(json!({"serial": {"mode": mode}})).to_run_args();
        let serial: Vec<_> = args
            .iter()
            .filter(|a| a.starts_with("--serial-log"))
            .collect();
        assert_eq!(serial.first().map(|s| s.as_str()), flag, "{mode}");
    }
}

#[test]
fn memory_flags_choose_the_backing_as_cloud_hypervisor_means_them() {
    let cases = [
        (json!({"size": 1u64 << 30}), None),
        (json!({"thp": true}), Some("thp")),
        (json!({"thp": false}), Some("anon")),
        (json!({"shared": false}), Some("thp")),
        (json!({"shared": true}), Some("memfd-thp")),
        (json!({"shared": true, "thp": false}), Some("memfd")),
        (json!({"hugepages": true}), Some("hugetlb")),
        (
            json!({"hugepages": true, "shared": false, "thp": false}),
            Some("hugetlb"),
        ),
    ];
    for (memory, backing) in cases {
        let args = config(json!({ "memory": memory })).to_run_args();
        let got = args.iter().find_map(|a| a.strip_prefix("--backing="));
        assert_eq!(got, backing, "{memory}");
    }
    let named = config(json!({"vmm": {"backing": "hugetlb-1g"}})).to_run_args();
    assert!(
        named.contains(&"--backing=hugetlb-1g".to_string()),
        "{named:?}"
    );
}

#[test]
fn sizes_are_written_so_that_vmm_run_reads_the_same_bytes() {
    for bytes in [4096u64, 3 << 20, (1 << 30) + 4096, 5 << 40, 1536, 1] {
        let args = config(json!({"memory": {"size": bytes}})).to_run_args();
        let run = Line::try_parse_from(["vmm run", &args[0]]).map(|l| l.run.memory);
        assert_eq!(run.expect("parses"), Some(bytes), "{args:?}");
    }
}

#[test]
fn the_config_round_trips_through_the_command_line() {
    let x = config(full());
    let back = VmConfigJson::from_run_args(&run_args(&x.to_run_args()));
    // Memory's backing is normalised to the three flags of the backing chosen; the rest as given.
    let mut expected = x.clone();
    if let Some(m) = expected.memory.as_mut() {
        m.hugepages = Some(false);
        m.thp = Some(false);
    }
    assert_eq!(back, expected);
    // A config of defaults comes back with them filled in, and is then a fixed point.
    for x in [
        json!({}),
        json!({"vmm": {"backing": "hugetlb-1g"}, "serial": {"mode": "Off"}}),
        json!({"memory": {"hugepages": true}}),
    ] {
        let once = VmConfigJson::from_run_args(&run_args(&config(x.clone()).to_run_args()));
        let twice = VmConfigJson::from_run_args(&run_args(&once.to_run_args()));
        assert_eq!(once, twice, "{x}");
    }
    let defaults = VmConfigJson::from_run_args(&run_args(&[]));
    let memory = defaults.memory.as_ref().and_then(|m| m.size);
    assert_eq!(memory, Some(crate::cli::run::DEFAULT_MEMORY));
    let ext = defaults.vmm.expect("the extension is filled");
    // `vmm run` with no arguments gets the built-in device: the config says so.
    assert_eq!(
        (ext.epf, ext.pin.as_deref(), ext.seccomp.as_deref()),
        (Some(true), Some("auto"), Some("on"))
    );
    assert!(defaults.user_devices.is_empty());
}

#[test]
fn malformed_bodies_are_refused_with_where() {
    let e = parse(b"{\"cpus\": {\"boot_vcpus\": 1,}}").unwrap_err();
    assert!(
        matches!(e, ConfigJsonError::Malformed { line: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("line 1, column"), "{e}");
    let e = parse(b"{\n\"cpus\":\n").unwrap_err().to_string();
    assert!(e.contains("line 3"), "{e}");
    for (body, kind) in [
        ("[]", "an array"),
        ("3", "a number"),
        ("null", "null"),
        ("\"x\"", "a string"),
    ] {
        let e = parse(body.as_bytes()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("the body is {kind}, not a JSON object")),
            "{e}"
        );
    }
    assert!(parse(b"")
        .unwrap_err()
        .to_string()
        .contains("not valid JSON"));
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let cases = [
        (
            json!({"memroy": {}}),
            "`memroy`: vmm does not know this field",
        ),
        (
            json!({"memory": {"sizee": 1}}),
            "`memory.sizee`: vmm does not know",
        ),
        (
            json!({"memory": {"hotplug_size": 1}}),
            "`memory.hotplug_size`",
        ),
        (
            json!({"memory": {"zones": [{"id": "a", "size": 4096}, {"id": "b", "size": 4096, "file": "/x"}]}}),
            "`memory.zones[1].file`",
        ),
        (
            json!({"cpus": {"boot_vcpus": 1, "topology": {}}}),
            "`cpus.topology`",
        ),
        (json!({"payload": {"firmware": "/x"}}), "`payload.firmware`"),
        (
            json!({"devices": [{"path": "/x", "iommu": true}]}),
            "`devices[0].iommu`",
        ),
        (
            json!({"user_devices": [{"socket": "/x", "id": "d"}]}),
            "`user_devices[0].id`",
        ),
        (
            json!({"numa": [{"guest_numa_id": 0, "pci_segments": [0]}]}),
            "`numa[0].pci_segments`",
        ),
        (
            json!({"serial": {"mode": "Tty", "socket": "/x"}}),
            "`serial.socket`",
        ),
        (json!({"vmm": {"pin_thread": 4}}), "`vmm.pin_thread`"),
    ];
    for (body, named) in cases {
        let e = refusal(body.clone());
        assert!(e.contains(named), "{body}: {e}");
    }
    // The message lists what the object does take.
    assert!(refusal(json!({"memory": {"sizee": 1}})).contains("`size`"));
}

#[test]
fn each_unsupported_section_is_named_with_why() {
    for (section, why) in parse::UNSUPPORTED_FOR_TESTS {
        let e = refusal(json!({ section: [] }));
        assert_eq!(e, format!("`{section}`: {why}; remove the section"));
    }
    assert_eq!(
        refusal(json!({"cpus": {"boot_vcpus": 1}, "disks": [{"path": "/d.img"}]})),
        "`disks`: vmm has no block devices; remove the section"
    );
}

#[test]
fn wrong_types_and_negative_sizes_name_the_field() {
    let cases = [
        (
            json!({"cpus": {"boot_vcpus": "two"}}),
            "`cpus.boot_vcpus`: invalid type: string \"two\", expected u64",
        ),
        (json!({"cpus": {}}), "`cpus`: missing field `boot_vcpus`"),
        (
            json!({"cpus": {"max_vcpus": 1}}),
            "`cpus`: missing field `boot_vcpus`",
        ),
        (
            json!({"cpus": 2}),
            "`cpus`: invalid type: integer `2`, expected struct CpusConfig",
        ),
        (
            json!({"memory": {"size": -1}}),
            "`memory.size`: invalid value: integer `-1`",
        ),
        (
            json!({"memory": {"thp": true, "size": 1e300}}),
            "`memory.size`: invalid type: floating point",
        ),
        (
            json!({"memory": {"shared": "yes", "size": 1}}),
            "`memory.shared`: invalid type: string",
        ),
        (
            json!({"memory": {"zones": {"id": "a"}}}),
            "`memory.zones`: expected an array, got an object",
        ),
        (
            json!({"memory": {"zones": [{"id": "a", "size": -4096}]}}),
            "`memory.zones[0].size`: invalid value",
        ),
        (
            json!({"devices": "/x"}),
            "`devices`: expected an array, got a string",
        ),
        (
            json!({"numa": [{"guest_numa_id": 0, "cpus": [0, 300]}]}),
            "`numa[0].cpus`: invalid value: integer `300`",
        ),
        (
            json!({"numa": [{"guest_numa_id": 0, "distances": [{"destination": 1}]}]}),
            "`numa[0].distances`: missing field `distance`",
        ),
        (
            json!({"serial": {"mode": "Speaker"}}),
            "`serial.mode`: unknown variant `Speaker`",
        ),
        (
            json!({"vmm": {"epf": true, "timeout": "soon"}}),
            "`vmm.timeout`: invalid type: string \"soon\"",
        ),
        (
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 2}}),
            "`cpus.max_vcpus` 2 differs from `cpus.boot_vcpus` 1",
        ),
        (
            json!({"payload": {"cmdline": "a\u{0}b"}}),
            "`payload.cmdline` has a NUL character",
        ),
        (
            json!({"memory": {"zones": [{"id": "a,b", "size": 4096}]}}),
            "`memory.zones[0].id` \"a,b\"",
        ),
        (
            json!({"numa": [{"guest_numa_id": 0, "memory_zones": ["x]"]}]}),
            "`numa[0].memory_zones` names \"x]\"",
        ),
        (
            json!({"memory": {"shared": true}, "vmm": {"backing": "memfd"}}),
            "`vmm.backing` and `memory.shared`",
        ),
    ];
    for (body, named) in cases {
        let e = refusal(body.clone());
        assert!(e.starts_with(named), "{body}: {e}");
    }
}

#[test]
fn relative_paths_are_refused() {
    let cases = [
        (json!({"payload": {"kernel": "vmlinuz"}}), "payload.kernel"),
        (
            json!({"payload": {"kernel": "/k", "initramfs": "initrd"}}),
            "payload.initramfs",
        ),
        (
            json!({"devices": [{"path": "/a"}, {"path": "0000:01:00.0"}]}),
            "devices[1].path",
        ),
        // `epf` is a path like any other here (the built-in device is `vmm.epf`).
        (
            json!({"user_devices": [{"socket": "epf"}]}),
            "user_devices[0].socket",
        ),
        (
            json!({"serial": {"mode": "File", "file": "serial.log"}}),
            "serial.file",
        ),
    ];
    for (body, path) in cases {
        let e = refusal(body.clone());
        assert!(e.starts_with(&format!("`{path}` ")), "{body}: {e}");
        assert!(e.contains("give an absolute one"), "{e}");
    }
}

#[test]
fn serial_and_console_modes_vmm_lacks_are_refused() {
    let cases = [
        (
            json!({"serial": {"mode": "Pty"}}),
            "`serial.mode` Pty: vmm's serial takes Tty",
        ),
        (
            json!({"serial": {"mode": "Socket"}}),
            "`serial.mode` Socket",
        ),
        (
            json!({"serial": {"mode": "File"}}),
            "`serial.mode` File needs `serial.file`",
        ),
        (
            json!({"serial": {"mode": "Tty", "file": "/x"}}),
            "`serial.file` is given with `serial.mode` Tty",
        ),
        (
            json!({"console": {"mode": "Tty"}}),
            "`console.mode` Tty: vmm's console takes only Off",
        ),
        (
            json!({"console": {"mode": "File", "file": "/x"}}),
            "`console.mode` File",
        ),
    ];
    for (body, named) in cases {
        let e = refusal(body.clone());
        assert!(e.starts_with(named), "{body}: {e}");
    }
}

#[test]
fn check_refuses_what_vmm_run_refuses_naming_the_field() {
    let cases = [
        (json!({"cpus": {"boot_vcpus": 0}}), "`cpus.boot_vcpus`"),
        (json!({"cpus": {"boot_vcpus": 300}}), "`cpus.boot_vcpus`"),
        (json!({"memory": {"size": 0}}), "`memory.size`"),
        (json!({"memory": {"size": 1000}}), "`memory.size`"),
        (json!({"memory": {"size": 1u64 << 50}}), "guest memory of 1024 TiB"),
        (json!({"memory": {"size": u64::MAX}}), "`memory.size`"),
        (json!({"vmm": {"pin_threads": 0}}), "`vmm.pin_threads`"),
        (json!({"vmm": {"pin": "fast"}}), "`vmm.pin`"),
        (json!({"vmm": {"seccomp": "maybe"}}), "`vmm.seccomp`"),
        (json!({"vmm": {"timeout": -1.0}}), "`vmm.timeout`"),
        (json!({"vmm": {"boot_protocol": "efi"}}), "`vmm.boot_protocol`"),
        (json!({"vmm": {"backing": "swap"}}), "`vmm.backing`"),
        (json!({"memory": {"thp": true}, "vmm": {"epf": true}}), "`memory.shared`/`hugepages`/`thp` choose `vmm.backing` thp, and `vmm.backing` thp: a vfio-user"),
        (json!({"payload": {"kernel": "/nonexistent/vmlinuz"}}), "/nonexistent/vmlinuz"),
        (json!({"memory": {"size": 1u64 << 30, "zones": [{"id": "a", "size": 1u64 << 29}]}}), "`memory.size`"),
    ];
    for (body, named) in cases {
        let e = config(body.clone())
            .check()
            .expect_err("vmm run refuses it");
        eprintln!("{body}: {e}");
        assert!(e.contains(named), "{body}: {e}");
        assert!(
            !e.contains("For more information") && !e.contains("Usage"),
            "{e}"
        );
    }
}

#[test]
fn check_accepts_what_vmm_run_accepts() {
    let run = config(json!({"cpus": {"boot_vcpus": 2}, "memory": {"size": 64u64 << 20}}))
        .check()
        .expect("a small probe guest is accepted");
    assert_eq!((run.cpus, run.memory), (2, Some(64 << 20)));
    assert_eq!(run.user_devices, ["none"]);
}

#[test]
fn the_config_vm_info_shows_can_be_sent_back_to_vm_create() {
    let lines: [&[&str]; 4] = [
        &[],
        &[
            "--backing=anon",
            "--user-device=none",
            "--serial-log=/dev/null",
            "--timeout=5",
        ],
        &[
            "--backing=hugetlb-1g",
            "--pin-threads=3",
            "--cmdline=probe.hang",
        ],
        &[
            "--memory-zone=id=a,size=1G,shared=on",
            "--numa=guest_numa_id=0,cpus=[0],memory_zones=[a]",
        ],
    ];
    for line in lines {
        let line: Vec<String> = line.iter().map(|s| s.to_string()).collect();
        let shown = VmConfigJson::from_run_args(&run_args(&line));
        let body = serde_json::to_vec(&shown).expect("serialises");
        let sent = parse(&body).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(sent, shown, "{line:?}");
    }
}
