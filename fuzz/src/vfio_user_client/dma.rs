//! The scripted server's model of the client's DMA windows and of the guest RAM behind them
//! (the one memfd the client maps, zero-filled, 64 KiB to start), for the DMA_READ/DMA_WRITE
//! invariants: a server's access is served only inside a window the client registered for a
//! DMA_MAP it sent and has not withdrawn by the time the access arrives (a window is gone
//! once the server sent its DMA_UNMAP's successful reply), with the access the window allows,
//! and a DMA_READ returns exactly the bytes the earlier DMA_WRITEs left.
//!
//! The model errs on the side of "may be mapped": a DMA_MAP the client gave up on (refused,
//! malformed reply) stays a candidate, so only accesses no candidate allows are findings.

use std::collections::{BTreeMap, HashMap};

use devices::vfio_user::wire::{
    cmd, dma_flags, flags, DmaAccess, DmaMap, DmaUnmap, Header, Message, HEADER_SIZE,
};

use crate::Input;

/// Bytes of the memfd the client maps (`exercise`'s).
pub const RAM_LEN: u64 = 1 << 16;

#[derive(Clone, Copy, Debug)]
struct Window {
    iova: u64,
    size: u64,
    readable: bool,
    writable: bool,
    /// Where the window starts in the memfd.
    offset: u64,
}

impl Window {
    fn holds(&self, address: u64, count: u64, write: bool) -> bool {
        let allowed = if write { self.writable } else { self.readable };
        let (Some(end), Some(wend)) =
            (address.checked_add(count), self.iova.checked_add(self.size))
        else {
            return false;
        };
        allowed && address >= self.iova && end <= wend
    }
}

/// A DMA_READ/DMA_WRITE the server sent and the windows that may serve it.
#[derive(Debug)]
struct Access {
    write: bool,
    req: DmaAccess,
    data: Vec<u8>,
    allowed: Vec<Window>,
}

#[derive(Debug)]
pub struct DmaModel {
    windows: Vec<Window>,
    /// DMA_UNMAP requests without a reply yet, by message id.
    unmaps: HashMap<u16, (u64, u64)>,
    sent: HashMap<u16, Access>,
    /// Bytes DMA_WRITEs left, by memfd offset; the rest reads 0 below `len`.
    written: BTreeMap<u64, u8>,
    len: u64,
    /// False once a write may have landed where the model cannot tell (several windows could
    /// have served it, or it failed part way): bytes are no longer compared.
    exact: bool,
}

impl Default for DmaModel {
    fn default() -> Self {
        DmaModel {
            windows: Vec::new(),
            unmaps: HashMap::new(),
            sent: HashMap::new(),
            written: BTreeMap::new(),
            len: RAM_LEN,
            exact: true,
        }
    }
}

impl DmaModel {
    /// A request from the client: DMA_MAP adds a candidate window (the client registers it
    /// before it sends), DMA_UNMAP is remembered until its reply.
    pub fn request(&mut self, msg: &Message) {
        match msg.header.command {
            cmd::DMA_MAP => {
                if let Ok(m) = DmaMap::decode(&msg.payload) {
                    self.windows.push(Window {
                        iova: m.address,
                        size: m.size,
                        readable: m.flags & dma_flags::READ != 0,
                        writable: m.flags & dma_flags::WRITE != 0,
                        offset: m.offset,
                    });
                }
            }
            cmd::DMA_UNMAP => {
                if let Ok(u) = DmaUnmap::decode(&msg.payload) {
                    self.unmaps.insert(msg.header.msg_id, (u.address, u.size));
                }
            }
            _ => {}
        }
    }

    /// A message the server sends while `req` waits: the first plain successful reply to a
    /// DMA_UNMAP withdraws one window mapped at exactly its range.
    pub fn sending(&mut self, header: &Header, req: &Header) {
        let reply = header.flags == flags::TYPE_REPLY
            && header.msg_id == req.msg_id
            && header.command == req.command
            && req.command == cmd::DMA_UNMAP;
        if !reply {
            return;
        }
        if let Some((iova, size)) = self.unmaps.remove(&header.msg_id) {
            if let Some(i) = self
                .windows
                .iter()
                .position(|w| w.iova == iova && w.size == size)
            {
                self.windows.remove(i);
            }
        }
    }

    /// A live window to aim an access at, `pick` choosing which.
    fn window(&self, pick: u8) -> Option<(u64, u64)> {
        let w = self
            .windows
            .get(usize::from(pick) % self.windows.len().max(1))?;
        Some((w.iova, w.size))
    }

    /// The script's DMA_READ (`write` false) or DMA_WRITE, mostly at a window the client
    /// mapped: its header and payload, remembered for [`DmaModel::answered`].
    pub fn command(&mut self, s: &mut Input<'_>, write: bool) -> (Header, Vec<u8>) {
        let id = s.u16();
        let sel = s.u8();
        let address = match self.window(s.u8()).filter(|_| sel & 1 != 0) {
            Some((iova, size)) => {
                let at = iova.wrapping_add(u64::from(s.u16()) % (size | 1));
                at.wrapping_sub(u64::from(sel >> 4))
            }
            None => s.u64(),
        };
        let count = match sel & 2 {
            0 => u64::from(s.u16() % 512),
            _ => s.u64(),
        };
        let data = if write {
            s.bytes(count.min(4096) as usize).to_vec()
        } else {
            Vec::new()
        };
        let req = DmaAccess { address, count };
        let payload = req.encode(&data);
        self.access(id, write, req, &data);
        let header = Header {
            msg_id: id,
            command: if write { cmd::DMA_WRITE } else { cmd::DMA_READ },
            size: (HEADER_SIZE + payload.len()) as u32,
            flags: flags::TYPE_COMMAND,
            error: 0,
        };
        (header, payload)
    }

    /// The server sends DMA_READ (`write` false) or DMA_WRITE `req` as message `id`.
    fn access(&mut self, id: u16, write: bool, req: DmaAccess, data: &[u8]) {
        let allowed = self
            .windows
            .iter()
            .filter(|w| w.holds(req.address, req.count, write))
            .copied()
            .collect();
        let access = Access {
            write,
            req,
            data: data.to_vec(),
            allowed,
        };
        self.sent.insert(id, access);
    }

    fn byte(&self, at: u64) -> u8 {
        self.written.get(&at).copied().unwrap_or(0)
    }

    /// The client's reply `msg` to a DMA_READ/DMA_WRITE the server sent, if it is one.
    pub fn answered(&mut self, msg: &Message) {
        let h = msg.header;
        if h.kind() != flags::TYPE_REPLY {
            return;
        }
        let Some(a) = self.sent.remove(&h.msg_id) else {
            return;
        };
        let what = if a.write { "DMA_WRITE" } else { "DMA_READ" };
        let (address, count) = (a.req.address, a.req.count);
        if h.is_error() {
            if a.write && !a.allowed.is_empty() {
                self.exact = false;
            }
            return;
        }
        if count == 0 {
            return;
        }
        assert!(
            !a.allowed.is_empty(),
            "{what} [{address:#x}, +{count:#x}) was served outside every mapped window \
             (or after its DMA_UNMAP reply)"
        );
        // The memfd offsets the access may have reached (one per window that holds it).
        let mut starts: Vec<u64> = a
            .allowed
            .iter()
            .filter_map(|w| w.offset.checked_add(address - w.iova))
            .collect();
        starts.sort_unstable();
        starts.dedup();
        if a.write {
            match (starts.as_slice(), self.exact) {
                ([at], true) => {
                    for (i, &b) in a.data.iter().enumerate() {
                        self.written.insert(at + i as u64, b);
                    }
                    self.len = self.len.max(at.saturating_add(count));
                }
                _ => self.exact = false,
            }
            return;
        }
        let Ok((echo, data)) = DmaAccess::decode(&msg.payload, "DMA_READ reply") else {
            panic!("the client's DMA_READ reply does not decode");
        };
        assert_eq!(echo, a.req, "the DMA_READ reply echoes another request");
        assert_eq!(data.len() as u64, count, "DMA_READ reply length");
        if !self.exact {
            return;
        }
        let matches = |at: u64| {
            at.checked_add(count).is_some_and(|end| end <= self.len)
                && data
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == self.byte(at + i as u64))
        };
        assert!(
            starts.iter().any(|&at| matches(at)),
            "DMA_READ [{address:#x}, +{count:#x}) returned bytes that are not guest RAM's"
        );
    }
}
