//! Target `loader`: the kernel loader ([`vmm::loader::load`]) on arbitrary kernel files
//! (ELF, bzImage or neither), with an optional initrd and command line, into a 64 MiB guest.
//!
//! Invariants, on success:
//! - the kernel ends below the end of low RAM, the command line in guest memory is what
//!   was asked for (trimmed) and NUL-terminated;
//! - the initrd is page aligned, above the kernel, below the end of low RAM, and holds the
//!   initrd's bytes;
//! - above 1 MiB nothing but the kernel (below its reported end) and the initrd was written:
//!   a segment that spills past what the loader accounts for would be overwritten by the
//!   initrd or hidden from the guest's memory map;
//! - on any input, nothing panics and every write stays inside guest memory (vm-memory
//!   checks each one; ASan checks the rest).

use std::borrow::Cow;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::loader::{load, BootProtocol, ImageSource, LoadRequest};
use vmm::memory::layout::{CMDLINE_ADDR, HIMEM_START, MIB, PAGE_SIZE};
use vmm::memory::MemoryLayout;

use crate::{Input, Seed};

const MEM: u64 = 64 * MIB;

/// Resident pages of `len` bytes at `host`, by index.
fn resident(host: *mut u8, len: usize) -> Vec<bool> {
    let pages = len.div_ceil(PAGE_SIZE as usize);
    let mut vec = vec![0u8; pages];
    // SAFETY: `host..host + len` is one mapping (the guest memory region) and `vec` has one
    // byte per page of it.
    let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore");
    vec.iter().map(|b| b & 1 != 0).collect()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let protocol = match input.u8() % 3 {
        0 => BootProtocol::Auto,
        1 => BootProtocol::Linux64,
        _ => BootProtocol::Pvh,
    };
    let what = input.u8();
    let cmdline = if what & 1 != 0 {
        String::from_utf8_lossy(input.short_bytes(255)).into_owned()
    } else {
        "console=ttyS0".to_string()
    };
    let initrd = (what & 2 != 0).then(|| input.long_bytes(16 << 10).to_vec());
    let kernel = ImageSource::Bytes {
        name: "fuzz-kernel".into(),
        data: Cow::Owned(input.rest().to_vec()),
    };
    let initrd_src = initrd.as_ref().map(|d| ImageSource::Bytes {
        name: "fuzz-initrd".into(),
        data: Cow::Owned(d.clone()),
    });

    let layout = MemoryLayout::new(MEM).expect("a 64 MiB layout");
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram()
        .iter()
        .map(|r| (r.start, r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let req = LoadRequest {
        kernel: &kernel,
        initrd: initrd_src.as_ref(),
        cmdline: &cmdline,
        protocol,
        cpus: 1 + what % 4,
        pci_intx: &[],
        // The guest NUMA tables are built from checked configuration, not from a kernel image.
        numa: None,
    };
    let Ok(boot) = load(&mem, &layout, &req) else {
        return;
    };
    let low_end = layout.low_ram_end();
    assert!(
        boot.kernel_end <= low_end,
        "kernel ends at {:#x}",
        boot.kernel_end
    );
    // The command line is in guest memory, NUL-terminated; linux-loader trims surrounding
    // whitespace (and normalizes the spaces around a `--`).
    let mut written = vec![0u8; boot.cmdline_len + 1];
    mem.read_slice(&mut written, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    assert_eq!(written.pop(), Some(0), "command line NUL");
    if !cmdline.contains("--") {
        assert_eq!(written, cmdline.trim().as_bytes(), "command line");
    }
    let mut allowed = vec![(HIMEM_START, boot.kernel_end.max(HIMEM_START))];
    match (&boot.initrd, &initrd) {
        (Some(p), Some(bytes)) => {
            assert_eq!(p.size, bytes.len() as u64);
            assert_eq!(p.addr % PAGE_SIZE, 0);
            assert!(
                p.addr >= boot.kernel_end,
                "initrd at {:#x} under the kernel",
                p.addr
            );
            assert!(p.addr + p.size <= low_end);
            let mut got = vec![0u8; bytes.len()];
            mem.read_slice(&mut got, GuestAddress(p.addr)).unwrap();
            assert!(got == *bytes, "initrd contents");
            allowed.push((p.addr, p.addr + p.size));
        }
        (None, None) => {}
        (p, _) => panic!(
            "initrd placement {p:?} for an initrd given: {}",
            initrd.is_some()
        ),
    }

    // Nothing above 1 MiB outside the kernel and the initrd.
    for region in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        let start = region.start_addr().0;
        let len = region.len() as usize;
        let host = mem.get_host_address(region.start_addr()).unwrap();
        for (page, present) in resident(host, len).into_iter().enumerate() {
            let base = start + page as u64 * PAGE_SIZE;
            if !present || base + PAGE_SIZE <= HIMEM_START {
                continue;
            }
            // SAFETY: the page lies inside the region's mapping.
            let bytes = unsafe {
                std::slice::from_raw_parts(host.add(page * PAGE_SIZE as usize), PAGE_SIZE as usize)
            };
            for (i, &b) in bytes.iter().enumerate() {
                let at = base + i as u64;
                if b != 0 && at >= HIMEM_START {
                    assert!(
                        allowed.iter().any(|&(s, e)| at >= s && at < e),
                        "byte {at:#x} written outside the kernel ..{:#x} and initrd {:?}",
                        boot.kernel_end,
                        boot.initrd
                    );
                }
            }
        }
    }
}

/// A minimal x86_64 ELF: PT_LOADs given as (paddr, file bytes, memsz), entry at the first,
/// and with `pvh` a PT_NOTE carrying XEN_ELFNOTE_PHYS32_ENTRY.
pub fn elf(segments: &[(u64, &[u8], u64)], pvh: Option<u32>) -> Vec<u8> {
    let phnum = segments.len() + usize::from(pvh.is_some());
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1;
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    let entry = segments.first().map_or(0, |s| s.0);
    f[0x18..0x20].copy_from_slice(&entry.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&(phnum as u16).to_le_bytes());
    let mut data_off = 64 + 56 * phnum as u64;
    let mut tail = Vec::new();
    let phdr = |t: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p
    };
    for &(paddr, bytes, memsz) in segments {
        f.extend(phdr(1, data_off, paddr, bytes.len() as u64, memsz));
        tail.extend_from_slice(bytes);
        data_off += bytes.len() as u64;
    }
    if let Some(e) = pvh {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&e.to_le_bytes());
        f.extend(phdr(4, data_off, 0, note.len() as u64, note.len() as u64));
        tail.extend_from_slice(&note);
    }
    f.extend_from_slice(&tail);
    f
}

/// A minimal bzImage: `setup_sects` setup sectors, protocol `version`, 64-bit capable,
/// `code` as the protected-mode payload.
pub fn bzimage(code: &[u8], version: u16, cmdline_size: u32) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut f = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    f[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
    f[0x260..0x264].copy_from_slice(&0x1000u32.to_le_bytes()); // init_size
    f.extend_from_slice(code);
    f
}

/// Seeds: ELF kernels (with and without a PVH note, several segments), bzImages of two
/// protocol versions, with an initrd and a command line.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hlt = [0xf4u8; 64];
    let kernel = |s: &mut Seed, protocol: u8, initrd: Option<&[u8]>, cmdline: Option<&str>| {
        s.u8(protocol)
            .u8(u8::from(cmdline.is_some()) | u8::from(initrd.is_some()) << 1);
        if let Some(c) = cmdline {
            s.short_bytes(c.as_bytes());
        }
        if let Some(i) = initrd {
            s.long_bytes(i);
        }
    };
    let mut out = Vec::new();
    let mut s = Seed::new();
    kernel(&mut s, 0, Some(b"initrd!!"), Some("console=ttyS0 quiet"));
    s.bytes(&elf(&[(0x10_0000, &hlt, 0x1000)], Some(0x10_0000)));
    out.push(("elf-pvh-initrd", s.0));

    let mut s = Seed::new();
    kernel(&mut s, 1, None, None);
    s.bytes(&elf(
        &[
            (0x20_0000, &hlt, 0x40),
            (0x10_0000, &hlt[..16], 0x2000),
            (0x30_0000, &[], 0x100),
        ],
        None,
    ));
    out.push(("elf-segments", s.0));

    let mut s = Seed::new();
    kernel(&mut s, 0, Some(&[7; 100]), Some("root=/dev/ram0"));
    s.bytes(&bzimage(&hlt, 0x020f, 2047));
    out.push(("bzimage-2.15", s.0));

    let mut s = Seed::new();
    kernel(&mut s, 1, None, None);
    s.bytes(&bzimage(&hlt, 0x0202, 0));
    out.push(("bzimage-2.02", s.0));
    out
}
