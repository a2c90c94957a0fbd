//! What the guest runs: the **probe guest**, a freestanding x86_64 kernel built from
//! `resources/probe-guest` by this crate's build script (no binary is committed).
//!
//! The numbers and strings the VMM and the probe share (ports, boot marks, exit statuses, the
//! pci-epf-test registers, command-line options, output prefixes) live in the [`guest_abi`]
//! crate, which the probe is built with too; this crate only builds and embeds the image.
//!
//! # The probe guest's contract
//!
//! [`PROBE_GUEST`] is a static, non-relocatable ELF64 executable loaded at guest-physical
//! 1 MiB (`0x100000`, identity mapped; it reserves about 350 KiB there, its stacks and page
//! tables included, and needs RAM at 0 and from 1 MiB to past 2 MiB). It has two entry points:
//!
//! * **64-bit Linux boot protocol**: the ELF entry (`e_entry`, symbol `_start`). The probe
//!   relies on exactly this at `_start`:
//!   - long mode, CPL 0, paging on with an identity map of (at least) the first 1 GiB (the VMM
//!     uses 2 MiB pages), interrupts off;
//!   - `RSI` = guest-physical address of the Linux `boot_params` ("zero page"), inside the low
//!     1 GiB; the probe reads `e820_entries` (0x1e8), `e820_table` (0x2d0, 20-byte entries),
//!     `hdr.cmd_line_ptr` (0x228) with `ext_cmd_line_ptr` (0x0c8), and `hdr.ramdisk_image` /
//!     `ramdisk_size` (0x218 / 0x21c) with `ext_ramdisk_image` / `ext_ramdisk_size`
//!     (0x0c0 / 0x0c4).
//!
//!   What the VMM provides beyond that (CS = 0x10 64-bit code, DS/ES/SS = 0x18 flat data, GDT
//!   at 0x500, RSP = 0x8ff0, boot_params at 0x7000) is fine but not needed: the probe at once
//!   switches to its own stack, GDT (code 0x08, data 0x10, TSS 0x18) and IDT.
//! * **PVH**: a `PT_NOTE` segment holds the Xen note `XEN_ELFNOTE_PHYS32_ENTRY` (type 18, name
//!   `"Xen"`, 4-byte descriptor = 32-bit physical entry address). Entered in 32-bit protected
//!   mode with paging off and `EBX` = `struct hvm_start_info` (magic 0x336ec578; the memory
//!   map needs version >= 1; module 0 is the initrd). The stub maps 0-4 GiB, enters long mode
//!   and joins the common code.
//!
//! Either way the probe then builds its own identity map (2 MiB pages) of
//! `[0, max(4 GiB, top of RAM))`, at most 64 GiB, before touching anything above 1 GiB.
//!
//! # What it does and prints
//!
//! Lines on the serial port ([`ports::SERIAL_COM1`], polled 16550: it waits for LSR bit 5),
//! each starting with [`probe::LINE_PREFIX`] and ending in CR LF, in this order:
//!
//! ```text
//! probe: hello (entry=linux64)                       or (entry=pvh); then marks::ENTRY
//! probe: cmdline "<text>"                            non-printable bytes shown as '?'
//! probe: e820 0x<start:016x>-0x<end inclusive:016x> <ram|reserved|acpi|nvs|unusable|type N>
//! probe: ram <N> MiB in <K> ranges, top 0x<end of the highest RAM range>
//! probe: cpus <N> (mp table)                         or: probe: cpus unknown (no mp table)
//! probe: initrd 0x<addr> <size> bytes, sum 0x<32-bit sum of the bytes>   or: initrd none
//! probe: pci <00:dd.f> <vvvv:dddd> class <cccccc>[ bar<i> <io|mem32|mem64>[ pref] 0x<addr> size 0x<size>]...
//!                                                    per function on bus 0, or: pci none
//! probe: bar read <00:dd.f> bar<i> <kind> 0x<addr>: 0x<first dword>
//!                                                    per BAR of a function that is not a
//!                                                    pci-epf-test; instead of the value:
//!                                                    not placed | decoding off | not mapped
//! probe: ecam 0x<base> buses <a>-<b> (mcfg)          or: ecam none (no mcfg) | (no rsdp)
//! probe: numa node <N> cpus <0-3,6|none> mem 0x<base>-0x<end>[,...]|none distances <d>,..|none
//!                                                    per SRAT proximity domain (with an SRAT)
//! probe: memtest ok: <N> pages
//! probe: epf <00:dd.f> bar0 0x<addr> <msix|msi> vector 0x30 apic <id>   with a pci-epf-test
//! probe: dma pages 0x<page> 0x<page> ...             (the pages DMA is tested on)
//! probe: dma ok: <N> regions, <M> bytes, irq ok      or: probe: dma FAIL: <reason>
//!                                                    or: probe: dma skipped: no pci-epf-test device
//! probe: msix pba ok                                 or: probe: msix pba FAIL: <reason>
//!                                                    (after dma ok, with the device on MSI-X)
//! probe: result ok                                   or: probe: result FAIL: <reason>
//! ```
//!
//! A failed check also prints `probe: check failed: <reason>` when found; an exception prints
//! `probe: exception <vector> <name> error 0x.. rip 0x.. rsp 0x..` (and `cr2` for #PF).
//! `N MiB` is the sum of the RAM entries, rounded down to whole MiB. The MP table (Intel MP
//! spec floating pointer in the EBDA's first KiB, the last KiB below 640 KiB, or
//! 0xF0000-0xFFFFF) counts enabled processor entries.
//!
//! The `ecam` line: the probe takes the ACPI RSDP address from the protocol it was entered
//! with (`boot_params.acpi_rsdp_addr`, offset 0x070, or `hvm_start_info.rsdp_paddr`; no scan
//! of the BIOS area), follows it (checksummed) to the XSDT (the RSDT for revision 0) and the
//! first checksummed MCFG there with a segment 0 allocation, and prints its base and bus
//! range. It then reads the vendor/device dword of every function a `pci` line listed (the
//! first 32) at `base + (dev << 15 | fn << 12)`, and dword 0x100 (extended configuration
//! space) of the last one, whatever it holds. No RSDP or no MCFG only prints `ecam none`.
//!
//! The memory test writes a distinct 64-bit pattern to the first and last 8 bytes of: the page
//! at 2 MiB, the first RAM page of every GiB above the first, and the last page of the highest
//! RAM range; then reads all back and restores the old contents.
//!
//! Checks that fail the run: the memory map is empty, unsorted, overlapping or has an empty
//! entry; no RAM at 0 or at 1 MiB (or 2 MiB, for the memory test); a memory test mismatch; the
//! initrd is not inside one RAM range; an ECAM window (below) that does not start at bus 0 in
//! mapped memory, or a function whose vendor/device dword read through it differs from the
//! 0xcf8 value; and, when given on the command line,
//! `probe.expect_mem=<MiB>` (must equal `N MiB`) and `probe.expect_cpus=<N>` (must equal the MP
//! table's count), `probe.expect_pci=<vvvv:dddd>` (a function with these IDs must be on bus
//! 0; may be repeated), and `probe.expect_dma=1` (a pci-epf-test device must be on bus 0;
//! without it, or with `probe.expect_dma=0`, a missing device is `dma skipped`; `vmm run`
//! passes it only with its own `--user-device epf`), and `probe.expect_numa=N/CPUS/RANGES`
//! once per node (the SRAT must have exactly these nodes, each with these CPUs and memory
//! ranges; see [`probe::OPT_EXPECT_NUMA`]). Any `dma FAIL` fails
//! the run. `probe.fault` makes the probe read an unmapped address after the memory test,
//! to exercise the exception report and exit status [`exit::EXCEPTION`]. The option names are
//! in [`probe`].
//!
//! Then it writes [`marks::READY`] to [`ports::BOOT_MARKS`], prints the result line and writes
//! the exit status to [`ports::DEBUG_EXIT`] ([`exit::OK`], [`exit::CHECK_FAILED`] or
//! [`exit::EXCEPTION`]; QEMU's `isa-debug-exit,iobase=0xf4,iosize=0x01` turns status `s` into
//! process exit code `(s << 1) | 1`). If that write returns, it writes [`exit::I8042_RESET`]
//! to [`ports::I8042_COMMAND`] and halts with interrupts off for good.
//!
//! BARs are sized the standard way (all ones written with decoding off, then restored). A
//! pci-epf-test function ([`guest_abi::epf`]: 104c:b500, registers in BAR0; BAR0 is placed at
//! 0xe0000000 or the next free spot if firmware left it at 0) gets memory decoding and bus
//! mastering, its MSI-X entry 0 (MSI with `probe.dma_irq=msi` or without MSI-X) aimed at
//! vector 0x30 of the BSP's LAPIC (xAPIC, software-enabled; both 8259s and LINT0 masked),
//! IRQ_TYPE and IRQ_NUMBER 1. With interrupts on, the device then WRITEs 4 KiB of its pattern
//! ([`guest_abi::epf::pattern`]) to each DMA page: the first free RAM page (not page 0, the
//! probe image, the boot structures, the command line or the initrd), the first free page of
//! every further GiB with RAM, and the last page of the highest RAM range. Each page is saved
//! first and restored after; STATUS must say WRITE_SUCCESS, the contents must match the
//! device's pattern and CHECKSUM their CRC. On the last page the probe also fills the page and
//! has the device READ it, with the right CHECKSUM (must succeed) and a wrong one (must fail).
//! Each command must raise exactly one interrupt, waited for with a bounded spin. `<M> bytes`
//! counts every byte the device moved (WRITEs and READs). On MSI-X the probe then masks entry
//! 0, and next sets the function mask, each time has the device raise vector 0: no interrupt
//! may arrive and PBA bit 0 must be set; once unmasked, exactly one interrupt must arrive and
//! the bit must be clear (`msix pba FAIL` fails the run).
//!
//! It executes about 55 000 instructions for a small guest, plus about 2 000 per GiB of RAM
//! mapped above 4 GiB and 1.1 per initrd byte (QEMU TCG single-step counts); with a
//! pci-epf-test device, each DMA page adds about 15 ms on the build machine's emulated KVM
//! (rdtsc; most of it the pattern and CRC check of 4 KiB, tens of thousands of instructions),
//! the last page twice that; and it avoids
//! instructions this project's emulated KVM cannot run (x87 and every SSE instruction other
//! than plain moves, `cmpxchg16b`, `xsave`, `int3`, `popcnt`, `clac`/`stac`).
//!
//! [`ports::SERIAL_COM1`]: guest_abi::ports::SERIAL_COM1
//! [`ports::BOOT_MARKS`]: guest_abi::ports::BOOT_MARKS
//! [`ports::DEBUG_EXIT`]: guest_abi::ports::DEBUG_EXIT
//! [`ports::I8042_COMMAND`]: guest_abi::ports::I8042_COMMAND
//! [`marks::READY`]: guest_abi::marks::READY
//! [`exit::OK`]: guest_abi::exit::OK
//! [`exit::CHECK_FAILED`]: guest_abi::exit::CHECK_FAILED
//! [`exit::EXCEPTION`]: guest_abi::exit::EXCEPTION
//! [`exit::I8042_RESET`]: guest_abi::exit::I8042_RESET
//! [`probe`]: guest_abi::probe
//! [`probe::LINE_PREFIX`]: guest_abi::probe::LINE_PREFIX
//! [`probe::OPT_EXPECT_NUMA`]: guest_abi::probe::OPT_EXPECT_NUMA

/// The probe guest's ELF image (see the crate docs for its contract).
pub const PROBE_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/probe-guest.elf"));

/// Guest-physical address the probe guest is linked and loaded at.
pub const PROBE_LOAD_ADDR: u64 = 0x10_0000;

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const PF_X: u32 = 1;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    struct Phdr {
        kind: u32,
        flags: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64_at(elf, 0x20) as usize;
        let phentsize = u16_at(elf, 0x36) as usize;
        let phnum = u16_at(elf, 0x38) as usize;
        assert_eq!(phentsize, 56, "ELF64 program header size");
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    kind: u32_at(elf, p),
                    flags: u32_at(elf, p + 4),
                    offset: u64_at(elf, p + 8),
                    vaddr: u64_at(elf, p + 0x10),
                    paddr: u64_at(elf, p + 0x18),
                    filesz: u64_at(elf, p + 0x20),
                    memsz: u64_at(elf, p + 0x28),
                }
            })
            .collect()
    }

    fn in_executable_load(phdrs: &[Phdr], addr: u64) -> bool {
        phdrs.iter().any(|p| {
            p.kind == PT_LOAD && p.flags & PF_X != 0 && p.paddr <= addr && addr < p.paddr + p.filesz
        })
    }

    /// The PVH entry address from the Xen note, if there is one.
    fn pvh_entry(elf: &[u8], phdrs: &[Phdr]) -> Option<u32> {
        for p in phdrs.iter().filter(|p| p.kind == PT_NOTE) {
            let notes = &elf[p.offset as usize..(p.offset + p.filesz) as usize];
            let mut at = 0;
            while at + 12 <= notes.len() {
                let namesz = u32_at(notes, at) as usize;
                let descsz = u32_at(notes, at + 4) as usize;
                let kind = u32_at(notes, at + 8);
                let name = &notes[at + 12..at + 12 + namesz];
                let desc_at = at + 12 + namesz.next_multiple_of(4);
                if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                    assert_eq!(descsz, 4, "PHYS32_ENTRY descriptor is a 32-bit address");
                    return Some(u32_at(notes, desc_at));
                }
                at = desc_at + descsz.next_multiple_of(4);
            }
        }
        None
    }

    #[test]
    fn probe_elf_is_static_x86_64_executable_at_1mib() {
        let elf = PROBE_GUEST;
        assert!(elf.len() > 64, "probe guest image is {} bytes", elf.len());
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(elf[5], 1, "little endian");
        assert_eq!(u16_at(elf, 0x10), 2, "ET_EXEC (not relocatable, not PIE)");
        assert_eq!(u16_at(elf, 0x12), 62, "EM_X86_64");

        let phdrs = phdrs(elf);
        let loads: Vec<_> = phdrs.iter().filter(|p| p.kind == PT_LOAD).collect();
        assert!(!loads.is_empty(), "no PT_LOAD");
        for p in &loads {
            assert_eq!(p.vaddr, p.paddr, "identity mapped");
            assert!(p.filesz <= p.memsz);
            assert!(
                p.paddr >= PROBE_LOAD_ADDR,
                "segment at {:#x} below 1 MiB",
                p.paddr
            );
            assert!(
                p.paddr + p.memsz <= 2 << 20,
                "segment at {:#x} reaches 2 MiB",
                p.paddr
            );
            assert!(
                p.offset + p.filesz <= elf.len() as u64,
                "segment beyond the file"
            );
        }
        assert_eq!(loads.iter().map(|p| p.paddr).min(), Some(PROBE_LOAD_ADDR));

        let entry = u64_at(elf, 0x18);
        assert!(
            in_executable_load(&phdrs, entry),
            "e_entry {entry:#x} is not in code"
        );
    }

    #[test]
    fn probe_elf_has_pvh_note_pointing_into_code() {
        let phdrs = phdrs(PROBE_GUEST);
        let entry = pvh_entry(PROBE_GUEST, &phdrs).expect("Xen PHYS32_ENTRY note in a PT_NOTE");
        assert!(
            in_executable_load(&phdrs, entry as u64),
            "PVH entry {entry:#x} is not in code"
        );
        assert_ne!(
            entry as u64,
            u64_at(PROBE_GUEST, 0x18),
            "PVH and 64-bit entries differ"
        );
    }

    /// Instructions this project's emulated KVM cannot execute (DESIGN.md section 4), or that
    /// its instruction emulator does not implement at all (x87 beyond fninit/fnstcw/fnstsw,
    /// fxsave, and every SSE instruction except plain moves).
    fn forbidden(mnemonic: &str, operands: &str) -> bool {
        const EXACT: &[&str] = &[
            "cmpxchg16b",
            "int3",
            "clac",
            "stac",
            "popcnt",
            "fnclex",
            "fclex",
        ];
        const PREFIXES: &[&str] = &["xsave", "xrstor", "fxsave", "fxrstor"];
        const X87_OK: &[&str] = &["fninit", "fnstcw", "fnstsw"];
        const SSE_MOVES: &[&str] = &[
            "movups", "movupd", "movaps", "movapd", "movdqa", "movdqu", "movntps", "movntpd",
            "movntdq",
        ];
        if EXACT.contains(&mnemonic) || PREFIXES.iter().any(|p| mnemonic.starts_with(p)) {
            return true;
        }
        if mnemonic.starts_with('f') && !X87_OK.contains(&mnemonic) {
            return true;
        }
        let vector = ["%xmm", "%ymm", "%zmm", "%mm"]
            .iter()
            .any(|r| operands.contains(r));
        vector && !SSE_MOVES.contains(&mnemonic)
    }

    #[test]
    fn forbidden_instruction_filter() {
        assert!(forbidden("int3", ""));
        assert!(forbidden("cmpxchg16b", "(%rdi)"));
        assert!(forbidden("xsaveopt", "(%rsp)"));
        assert!(forbidden("popcnt", "%rdi,%rax"));
        assert!(forbidden("pxor", "%xmm0,%xmm0"));
        assert!(forbidden("xorps", "%xmm1,%xmm1"));
        assert!(forbidden("movq", "%rax,%xmm0"));
        assert!(forbidden("fld", "%st(1)"));
        assert!(!forbidden("movups", "(%rax),%xmm0"));
        assert!(!forbidden("movaps", "%xmm0,0x10(%rsp)"));
        assert!(!forbidden("mov", "%rsi,%r13"));
        assert!(!forbidden("stos", "%rax,%es:(%rdi)"));
        assert!(!forbidden("ud2", ""));
    }

    #[test]
    fn probe_code_has_no_instruction_the_emulated_kvm_cannot_run() {
        let path = concat!(env!("OUT_DIR"), "/probe-guest.elf");
        let output = Command::new("objdump")
            .args(["-d", "--no-show-raw-insn", "-M", "att", path])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "this test disassembles the probe with objdump, which could not run ({e}); \
                     install binutils"
                )
            });
        assert!(
            output.status.success(),
            "objdump failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("objdump output is UTF-8");

        let mut function = "";
        let mut instructions = 0;
        let mut bad = Vec::new();
        for line in text.lines() {
            if line.ends_with(">:") {
                function = line;
                continue;
            }
            // "  100000:\tcli" / "  100004:\trep stos %rax,%es:(%rdi)"
            let Some((addr, insn)) = line.split_once(":\t") else {
                continue;
            };
            if addr.trim().is_empty() || !addr.trim().chars().all(|c| c.is_ascii_hexdigit()) {
                continue;
            }
            let mut words = insn.split_whitespace();
            let mut mnemonic = words.next().unwrap_or("");
            while matches!(
                mnemonic,
                "rep"
                    | "repz"
                    | "repnz"
                    | "repe"
                    | "repne"
                    | "lock"
                    | "data16"
                    | "notrack"
                    | "bnd"
                    | "cs"
                    | "ds"
            ) {
                mnemonic = words.next().unwrap_or("");
            }
            let operands: String = words.collect();
            instructions += 1;
            if forbidden(mnemonic, &operands) {
                bad.push(format!("{function} {}: {}", addr.trim(), insn.trim()));
            }
        }
        assert!(
            instructions > 100,
            "objdump showed only {instructions} instructions:\n{text}"
        );
        assert!(
            bad.is_empty(),
            "forbidden instructions in the probe guest:\n{}",
            bad.join("\n")
        );
    }
}
