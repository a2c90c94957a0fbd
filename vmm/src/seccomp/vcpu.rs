//! What a vCPU thread may do once it is set up: run the guest (KVM_RUN), read the registers
//! and MP state it reports faults and halts with, and emulate the exits it handles. Port and
//! MMIO exits go to the device models on the buses, which write serial output and eventfds
//! (interrupts, the exit notifier), reach a kernel VFIO function's config space and BARs
//! with pread/pwrite, and send vfio-user requests (the replies come in on the connection's
//! reader thread). A guest that enables, moves or masks what a passthrough function offers
//! makes the PCI layer update KVM's GSI routes, irqfds and BAR memory slots and the
//! device's interrupt eventfds (VFIO_DEVICE_SET_IRQS, or a vfio-user message), and reads
//! the eventfds of masked vectors into their pending bits.

use super::rules::{base, ioctl, AllowList};

pub(super) fn allow_list() -> AllowList {
    use libc::*;
    let mut l = base();
    l.ioctls(&[
        ioctl::KVM_RUN,
        ioctl::KVM_GET_REGS,
        ioctl::KVM_GET_MP_STATE,
        ioctl::KVM_SET_GSI_ROUTING,
        ioctl::KVM_IRQFD,
        ioctl::KVM_SET_USER_MEMORY_REGION,
        ioctl::VFIO_DEVICE_SET_IRQS,
    ]);
    l.allow(&[
        // A masked vector's interrupt eventfd, whose count becomes its pending bit.
        SYS_read,
        // A kernel VFIO function's config space and trapped BAR parts.
        SYS_pread64,
        SYS_pwrite64,
        // vfio-user requests; a partial send is finished with send(), a broken connection
        // shut down.
        SYS_sendmsg,
        SYS_sendto,
        SYS_shutdown,
    ]);
    l
}
