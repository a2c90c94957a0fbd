//! KVM state: the VM ([`vm`], stage `kvm`) and its vCPUs ([`vcpu`], stage `vcpus`). The loop
//! that runs them is [`crate::run`], above the platform built on this VM.

pub mod pause;
pub mod vcpu;
pub mod vm;
