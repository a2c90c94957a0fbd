use super::*;
use crate::memory::layout::MIB;
use std::borrow::Cow;
use vm_memory::Bytes;

/// A minimal x86_64 ELF: one PT_LOAD of `code` at `paddr`, entry at `paddr`, and with
/// `pvh` a PT_NOTE carrying XEN_ELFNOTE_PHYS32_ENTRY.
pub(crate) fn tiny_elf(code: &[u8], paddr: u64, pvh: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh.is_some() { 2 } else { 1 };
    let note_off = 64 + 56 * u64::from(phnum);
    let note: Vec<u8> = match pvh {
        Some(entry) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&entry.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let code_off = note_off + note.len() as u64;
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(ELF_MAGIC);
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&paddr.to_le_bytes()); // entry
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    f[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    let phdr = |p_type: u32, off: u64, addr: u64, size: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&p_type.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&size.to_le_bytes());
        p
    };
    f.extend(phdr(1, code_off, paddr, code.len() as u64));
    if pvh.is_some() {
        f.extend(phdr(4, note_off, 0, note.len() as u64));
    }
    f.extend(&note);
    f.extend_from_slice(code);
    f
}

/// A minimal bzImage: one setup sector, protocol 2.15, 64-bit capable, `code` at the 64-bit
/// entry (payload offset 0x200).
pub(crate) fn tiny_bzimage(code: &[u8], cmdline_size: u32) -> Vec<u8> {
    let setup_len = 2 * 512;
    let mut f = vec![0u8; setup_len + 0x200];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(BZIMAGE_MAGIC);
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    f[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    f[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
    f.extend_from_slice(code);
    f
}

pub(crate) fn guest_mem(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = MemoryLayout::new(size)
        .unwrap()
        .ram()
        .iter()
        .map(|r| (r.start, r.size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// The layout `mem` (made by [`guest_mem`]) follows.
pub(crate) fn layout_of(mem: &GuestMemoryMmap) -> MemoryLayout {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    MemoryLayout::new(mem.iter().map(|r| r.len()).sum()).unwrap()
}

fn bytes(name: &str, data: Vec<u8>) -> ImageSource {
    ImageSource::Bytes {
        name: name.into(),
        data: Cow::Owned(data),
    }
}

fn req<'a>(kernel: &'a ImageSource, cmdline: &'a str, protocol: BootProtocol) -> LoadRequest<'a> {
    LoadRequest {
        kernel,
        initrd: None,
        cmdline,
        protocol,
        cpus: 1,
        pci_intx: &[],
        numa: None,
    }
}

#[test]
fn elf_entry_choice_follows_the_protocol() {
    let mem = guest_mem(64 * MIB);
    let k = bytes("tiny", tiny_elf(&[0xf4; 0x200], 0x10_0000, Some(0x10_0100)));
    let auto = load(
        &mem,
        &layout_of(&mem),
        &req(&k, "console=ttyS0", BootProtocol::Auto),
    )
    .unwrap();
    assert_eq!(
        (auto.mode, auto.entry),
        (EntryMode::Pvh, GuestAddress(0x10_0100))
    );
    let l64 = load(&mem, &layout_of(&mem), &req(&k, "", BootProtocol::Linux64)).unwrap();
    assert_eq!(
        (l64.mode, l64.entry),
        (EntryMode::Linux64, GuestAddress(0x10_0000))
    );
    assert_eq!(l64.kernel_end, 0x10_0200);

    let no_note = bytes("plain", tiny_elf(&[0xf4], 0x10_0000, None));
    let auto = load(
        &mem,
        &layout_of(&mem),
        &req(&no_note, "", BootProtocol::Auto),
    )
    .unwrap();
    assert_eq!(auto.mode, EntryMode::Linux64);
    let err = load(
        &mem,
        &layout_of(&mem),
        &req(&no_note, "", BootProtocol::Pvh),
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::PvhUnavailable { .. }), "{err}");
    assert!(
        err.to_string().starts_with("plain: PVH boot requested"),
        "{err}"
    );

    // The command line and the zero page landed where the layout says.
    let mut cl = [0u8; 14];
    mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
    assert_eq!(&cl[..1], b"\0", "the last load wrote an empty command line");
    let loader_type: u8 = mem
        .read_obj(GuestAddress(crate::memory::layout::ZERO_PAGE_ADDR + 0x210))
        .unwrap();
    assert_eq!(loader_type, 0xff);
    let mp: [u8; 4] = mem.read_obj(GuestAddress(mptable::MPTABLE_START)).unwrap();
    assert_eq!(&mp, b"_MP_");
    let rsdp: [u8; 8] = mem
        .read_obj(GuestAddress(crate::memory::layout::ACPI_RSDP_ADDR))
        .unwrap();
    assert_eq!(&rsdp, b"RSD PTR ");
}

#[test]
fn bzimage_uses_header_and_64bit_entry() {
    let mem = guest_mem(64 * MIB);
    let k = bytes("bz", tiny_bzimage(&[0xf4], 2047));
    let s = load(
        &mem,
        &layout_of(&mem),
        &req(&k, "quiet", BootProtocol::Auto),
    )
    .unwrap();
    assert_eq!(s.format, KernelFormat::BzImage);
    assert_eq!(
        (s.mode, s.entry),
        (EntryMode::Linux64, GuestAddress(0x10_0200))
    );
    let version: u16 = mem
        .read_obj(GuestAddress(crate::memory::layout::ZERO_PAGE_ADDR + 0x206))
        .unwrap();
    assert_eq!(version, 0x020f);
    let err = load(&mem, &layout_of(&mem), &req(&k, "", BootProtocol::Pvh)).unwrap_err();
    assert!(matches!(err, LoadError::PvhUnavailable { .. }));
}

#[test]
fn cmdline_too_long_names_length_and_limit() {
    let mem = guest_mem(64 * MIB);
    let k = bytes("bz", tiny_bzimage(&[0xf4], 255));
    let long = "x".repeat(300);
    let err = load(&mem, &layout_of(&mem), &req(&k, &long, BootProtocol::Auto)).unwrap_err();
    assert!(
        matches!(
            err,
            LoadError::CmdlineTooLong {
                len: 301,
                limit: 256
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the kernel command line is 301 bytes with its NUL, the kernel accepts at most 256: shorten --cmdline"
    );
    // A vmlinux gets the x86 COMMAND_LINE_SIZE of 2048 with the NUL.
    let elf = bytes("elf", tiny_elf(&[0xf4], 0x10_0000, None));
    assert!(load(
        &mem,
        &layout_of(&mem),
        &req(&elf, &"y".repeat(2047), BootProtocol::Auto)
    )
    .is_ok());
    let err = load(
        &mem,
        &layout_of(&mem),
        &req(&elf, &"y".repeat(2048), BootProtocol::Auto),
    )
    .unwrap_err();
    assert!(matches!(
        err,
        LoadError::CmdlineTooLong {
            len: 2049,
            limit: 2048
        }
    ));
}

#[test]
fn neither_elf_nor_bzimage_names_the_file() {
    let mem = guest_mem(64 * MIB);
    let path = std::env::temp_dir().join(format!("vmm-not-a-kernel-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let k = ImageSource::Path(path.clone());
    let err = load(&mem, &layout_of(&mem), &req(&k, "", BootProtocol::Auto)).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, LoadError::NotAKernel { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("neither an ELF vmlinux nor a bzImage"));

    let missing = ImageSource::Path("/nonexistent/vmlinux".into());
    let err = load(
        &mem,
        &layout_of(&mem),
        &req(&missing, "", BootProtocol::Auto),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot open /nonexistent/vmlinux:"),
        "{err}"
    );
}

#[test]
fn kernel_past_ram_is_refused_with_addresses() {
    let mem = guest_mem(64 * MIB);
    let k = bytes("big", tiny_elf(&[0xf4], 64 * MIB - 0x100, None));
    // The segment is one byte long but make it end past RAM by faking a large paddr.
    let err = load(&mem, &layout_of(&mem), &req(&k, "", BootProtocol::Auto));
    assert!(err.is_ok(), "a segment ending inside RAM loads");
    let k = bytes("big", tiny_elf(&[0xf4; 0x200], 64 * MIB - 0x100, None));
    let err = load(&mem, &layout_of(&mem), &req(&k, "", BootProtocol::Auto)).unwrap_err();
    assert!(
        matches!(err, LoadError::KernelTooBig { end, limit, .. } if end == 64 * MIB + 0x100 && limit == 64 * MIB)
    );
    assert!(
        err.to_string()
            .starts_with("big does not fit in guest memory"),
        "{err}"
    );
}

/// Found by the `loader` fuzz target: a PT_LOAD whose p_filesz exceeds its p_memsz was
/// copied in full while the kernel end came from p_memsz, so bytes landed past the end the
/// guest is told about (where the initrd goes).
#[test]
fn segment_with_more_file_than_memory_is_refused() {
    let mem = guest_mem(64 * MIB);
    let mut elf = tiny_elf(&[0xf4; 0x40], 0x10_0000, None);
    // p_memsz of the only program header (at 64): smaller than its p_filesz of 0x40.
    elf[64 + 0x28..64 + 0x30].copy_from_slice(&0x10u64.to_le_bytes());
    let k = bytes("spill", elf);
    let err = load(&mem, &layout_of(&mem), &req(&k, "", BootProtocol::Auto)).unwrap_err();
    assert!(
        matches!(&err, LoadError::UnsupportedElf { reason, .. } if reason.contains("exceeds its memory size")),
        "{err}"
    );
    let b: u8 = mem.read_obj(GuestAddress(0x10_0010)).unwrap();
    assert_eq!(b, 0, "nothing was loaded");
}

#[test]
fn initrd_goes_to_top_of_low_ram_page_aligned() {
    let mem = guest_mem(128 * MIB);
    let k = bytes("elf", tiny_elf(&[0xf4], 0x10_0000, None));
    let initrd = bytes("initrd", vec![0xab; 5000]);
    let mut r = req(&k, "", BootProtocol::Linux64);
    r.initrd = Some(&initrd);
    let s = load(&mem, &layout_of(&mem), &r).unwrap();
    let placed = s.initrd.unwrap();
    assert_eq!(placed.size, 5000);
    assert_eq!(placed.addr % PAGE_SIZE, 0);
    assert_eq!(placed.addr, (128 * MIB - 5000) / PAGE_SIZE * PAGE_SIZE);
    let b: u8 = mem.read_obj(GuestAddress(placed.addr + 4999)).unwrap();
    assert_eq!(b, 0xab);
    let image: u32 = mem
        .read_obj(GuestAddress(crate::memory::layout::ZERO_PAGE_ADDR + 0x218))
        .unwrap();
    let size: u32 = mem
        .read_obj(GuestAddress(crate::memory::layout::ZERO_PAGE_ADDR + 0x21c))
        .unwrap();
    assert_eq!((u64::from(image), size), (placed.addr, 5000));

    let huge = bytes("huge", vec![0; 130 * MIB as usize]);
    r.initrd = Some(&huge);
    let err = load(&mem, &layout_of(&mem), &r).unwrap_err();
    assert!(matches!(err, LoadError::InitrdTooBig { .. }), "{err}");
}

#[test]
fn boot_protocol_parses() {
    assert_eq!("pvh".parse::<BootProtocol>(), Ok(BootProtocol::Pvh));
    assert_eq!("linux64".parse::<BootProtocol>(), Ok(BootProtocol::Linux64));
    assert_eq!("auto".parse::<BootProtocol>(), Ok(BootProtocol::Auto));
    assert!("efi".parse::<BootProtocol>().is_err());
}

/// `check` refuses, from headers alone, exactly what `load` refuses about the images and the
/// command line, and accepts what it loads.
#[test]
fn check_refuses_what_load_refuses_without_guest_memory() {
    let mem = guest_mem(64 * MIB);
    let layout = layout_of(&mem);
    let dir = std::env::temp_dir().join(format!("vmm-loader-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sparse = dir.join("sparse-initrd");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(70 * MIB)
        .unwrap();
    let mut no_64bit = tiny_bzimage(&[0xf4], 255);
    no_64bit[0x236..0x238].copy_from_slice(&0u16.to_le_bytes());
    let elf = bytes("elf", tiny_elf(&[0xf4], 0x10_0000, None));
    let bz = bytes("bz", tiny_bzimage(&[0xf4], 255));
    let cases: Vec<(ImageSource, Option<ImageSource>, String, BootProtocol)> = vec![
        (
            elf.clone(),
            None,
            "console=ttyS0".into(),
            BootProtocol::Auto,
        ),
        (bz.clone(), None, "quiet".into(), BootProtocol::Auto),
        (
            elf.clone(),
            Some(bytes("initrd", vec![1; 5000])),
            String::new(),
            BootProtocol::Auto,
        ),
        (
            ImageSource::Path("/nonexistent/vmlinux".into()),
            None,
            String::new(),
            BootProtocol::Auto,
        ),
        (
            bytes("junk", b"not a kernel".to_vec()),
            None,
            String::new(),
            BootProtocol::Auto,
        ),
        (
            bytes("big", tiny_elf(&[0xf4; 0x200], 64 * MIB - 0x100, None)),
            None,
            String::new(),
            BootProtocol::Auto,
        ),
        (bz.clone(), None, String::new(), BootProtocol::Pvh),
        (
            bytes("old", no_64bit),
            None,
            String::new(),
            BootProtocol::Auto,
        ),
        (bz.clone(), None, "x".repeat(300), BootProtocol::Auto),
        (elf.clone(), None, "a\0b".into(), BootProtocol::Auto),
        (
            elf.clone(),
            Some(ImageSource::Path(sparse.clone())),
            String::new(),
            BootProtocol::Auto,
        ),
        (
            elf.clone(),
            Some(ImageSource::Path("/nonexistent/initrd".into())),
            String::new(),
            BootProtocol::Auto,
        ),
    ];
    for (kernel, initrd, cmdline, protocol) in &cases {
        let mut r = req(kernel, cmdline, *protocol);
        r.initrd = initrd.as_ref();
        let checked = check(&layout, &r).map_err(|e| e.to_string());
        let loaded = load(&mem, &layout, &r)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(checked, loaded, "{} {cmdline:?} {protocol}", kernel.name());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_numa_the_tables_cannot_carry_is_refused_by_check_as_by_load() {
    use crate::arch::x86_64::acpi::GuestNumaDesc;
    let mem = guest_mem(64 * MIB);
    let layout = layout_of(&mem);
    let k = bytes("tiny", tiny_elf(&[0xf4; 0x200], 0x10_0000, Some(0x10_0100)));
    // CPU 1 of a one-vCPU guest.
    let numa = GuestNuma {
        nodes: vec![GuestNumaDesc {
            proximity_domain: 0,
            apic_ids: vec![0, 1],
            memory: layout.ram().to_vec(),
        }],
        distances: vec![vec![10]],
    };
    let mut r = req(&k, "", BootProtocol::Auto);
    r.numa = Some(&numa);
    let checked = check(&layout, &r).unwrap_err().to_string();
    assert!(checked.contains("CPU 1 does not exist"), "{checked}");
    assert_eq!(checked, load(&mem, &layout, &r).unwrap_err().to_string());
    r.numa = None;
    check(&layout, &r).unwrap();
}
