//! The memory test: a few words at the ends of one page per GiB of RAM, written, read back
//! and restored (enough to see RAM missing or aliased without touching every page).

use crate::boot::{MemEntry, E820_RAM, GIB, MIB, PAGE};
use crate::checks::{Checks, Failure};
use crate::global::Global;
use crate::io::phys;
use crate::map::is_ram;
use crate::paging;

const MAX_TEST_PAGES: usize = 2 + paging::MAX_GIB as usize;

struct MemtestState {
    pages: [u64; MAX_TEST_PAGES],
    saved: [[u64; 2]; MAX_TEST_PAGES],
}

static MEMTEST: Global<MemtestState> = Global::new(MemtestState {
    pages: [0; MAX_TEST_PAGES],
    saved: [[0; 2]; MAX_TEST_PAGES],
});

fn pattern(addr: u64) -> u64 {
    (addr ^ 0x5a5a_5a5a_5a5a_5a5a).rotate_left(17) ^ 0xc3a5_c85c_97cb_3127
}

/// Writes a distinct pattern to the first and last 8 bytes of each test page, reads all of them
/// back, then restores what was there. Test pages: the one at 2 MiB, the first RAM page of every
/// GiB above the first, and the last page of the highest RAM range.
pub fn memtest(map: &[MemEntry], mapped: u64, checks: &mut Checks) -> u64 {
    // SAFETY: the only reference to MEMTEST.
    let st = unsafe { MEMTEST.get() };
    let mut n = 0;
    let mut last = 0;
    let mut add = |page: u64| {
        if page + PAGE <= mapped && page > last {
            if let Some(slot) = st.pages.get_mut(n) {
                *slot = page;
                n += 1;
                last = page;
            }
        }
    };

    if is_ram(map, 2 * MIB, PAGE) {
        add(2 * MIB);
    } else {
        checks.fail(Failure::NoRamAt(2 * MIB));
    }
    let top_entry = map
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .max_by_key(|e| e.end());
    let top = top_entry.map_or(0, MemEntry::end);
    for g in 1..top.div_ceil(GIB) {
        let (lo, hi) = (g * GIB, (g + 1) * GIB);
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            let first = e.start.max(lo).next_multiple_of(PAGE);
            if first + PAGE <= e.end().min(hi) {
                add(first);
                break;
            }
        }
    }
    if let Some(e) = top_entry {
        let end = e.end() / PAGE * PAGE;
        if end >= e.start + PAGE {
            add(end - PAGE);
        }
    }

    // Write all, then check all (aliasing shows), then restore in reverse order.
    let words = |page: &u64| [*page, *page + PAGE - 8];
    for (page, saved) in st.pages.iter().zip(st.saved.iter_mut()).take(n) {
        for (addr, saved) in words(page).into_iter().zip(saved.iter_mut()) {
            *saved = phys::read64(addr);
            phys::write64(addr, pattern(addr));
        }
    }
    for page in st.pages.iter().take(n) {
        for addr in words(page) {
            let read = phys::read64(addr);
            if read != pattern(addr) {
                checks.fail(Failure::Memtest {
                    addr,
                    wrote: pattern(addr),
                    read,
                });
            }
        }
    }
    for (page, saved) in st.pages.iter().zip(st.saved.iter()).take(n).rev() {
        for (addr, saved) in words(page).into_iter().zip(saved.iter()) {
            phys::write64(addr, *saved);
        }
    }
    n as u64
}
