//! Unit tests of `vmm run`'s configuration.

use clap::Parser;
use vm_memory::GuestAddress;

use super::*;
use crate::arch::x86_64::acpi::GuestNumaDesc;
use crate::cli::{Cli, Command};
use crate::memory::layout::{RamRange, GIB};

/// docs/reliability.md's console bounds, as `vmm run` sets them when not told otherwise:
/// a 1 MiB ring between the UART and stdout, a 64 MiB cap on `--serial-log`.
#[test]
fn the_console_is_bounded_by_default() {
    let cli = Cli::try_parse_from([
        "vmm",
        "run",
        "--user-device",
        "none",
        "--serial-log",
        "serial.log",
    ])
    .unwrap();
    let Command::Run(args) = cli.command else {
        panic!("not `vmm run`");
    };
    let cfg = config(&args).unwrap();
    assert_eq!(cfg.serial_buffer, 1 << 20);
    assert!(
        matches!(cfg.serial_out, SerialOut::File { max, .. } if max == 64 << 20),
        "{:?}",
        cfg.serial_out
    );
}

#[test]
fn the_probe_gets_one_expect_numa_word_per_node() {
    let layout = MemoryLayout::new(6 * GIB).unwrap();
    let range = |start: u64, end: u64| RamRange {
        start: GuestAddress(start),
        size: end - start,
    };
    let numa = GuestNuma {
        nodes: vec![
            GuestNumaDesc {
                proximity_domain: 0,
                apic_ids: vec![3, 0, 1, 5, 4],
                memory: vec![range(0, 3 * GIB)],
            },
            GuestNumaDesc {
                proximity_domain: 1,
                apic_ids: vec![],
                memory: vec![range(4 * GIB, 7 * GIB)],
            },
        ],
        distances: vec![vec![10, 20], vec![20, 10]],
    };
    assert_eq!(
        probe_cmdline(&layout, 6, false, Some(&numa)),
        "probe.expect_mem=6143 probe.expect_cpus=6 \
         probe.expect_numa=0/0-1,3-5/0x0-0xc0000000 probe.expect_numa=1//0x100000000-0x1c0000000"
    );
    assert_eq!(
        probe_cmdline(&layout, 2, false, None),
        "probe.expect_mem=6143 probe.expect_cpus=2"
    );
    assert_eq!(cpu_runs(&[7, 2, 0]), ["0", "2", "7"]);
}
