//! A peer cannot wedge the other side, nor reach memory it gave back: the client's connect
//! has a deadline, the server's replies a send deadline, and a DMA_UNMAP's window is gone
//! once its reply is read.

use std::sync::mpsc;

use super::*;
use crate::vfio_user::wire::DmaAccess;

/// Rounds of the unmap race: without the window dropped by the reader, the DMA_READ that
/// follows the reply in the same write is served in most of them.
const UNMAP_ROUNDS: usize = 200;

#[test]
fn dma_read_right_after_the_unmap_reply_is_refused() {
    const IOVA: u64 = 0x10000;
    let (tx, rx) = mpsc::channel();
    let (client, fake) = fake_server(LONG, move |p| {
        for round in 0..UNMAP_ROUNDS {
            let m = p.recv();
            assert_eq!(m.header.command, cmd::DMA_MAP);
            p.send(Header::reply(&m.header, 0), &[]);
            let m = p.recv();
            assert_eq!(m.header.command, cmd::DMA_UNMAP);
            // The reply and a DMA_READ of the window in one write: the client reads both
            // back to back.
            let read = DmaAccess {
                address: IOVA,
                count: 8,
            }
            .encode(&[]);
            let id = round as u16;
            let mut bytes = Header::reply(&m.header, m.payload.len()).encode().to_vec();
            bytes.extend_from_slice(&m.payload);
            bytes.extend_from_slice(&Header::command(id, cmd::DMA_READ, read.len()).encode());
            bytes.extend_from_slice(&read);
            p.send_raw(&bytes);
            let r = p.recv();
            assert_eq!((r.header.msg_id, r.header.command), (id, cmd::DMA_READ));
            tx.send(r.header.is_error().then_some(r.header.error as i32))
                .unwrap();
        }
        p.wait_for_close();
    });
    let f = Arc::new(memfd(0x1000));
    let mut served = Vec::new();
    for _ in 0..UNMAP_ROUNDS {
        client.dma_map(IOVA, 0x1000, &f, 0, true, true).unwrap();
        client.dma_unmap(IOVA, 0x1000).unwrap();
        // The next DMA_MAP only once the DMA_READ was answered (the fake expects them in turn).
        served.push(rx.recv_timeout(LONG).unwrap());
    }
    let from_gone_window = served.iter().filter(|e| **e != Some(libc::EFAULT)).count();
    assert_eq!(
        from_gone_window, 0,
        "{from_gone_window} of {UNMAP_ROUNDS} DMA_READs after the UNMAP reply were served"
    );
    drop(client);
    fake.join().unwrap();
}
