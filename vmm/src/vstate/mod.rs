//! KVM state: the VM ([`vm`], stage `kvm`), its vCPUs ([`vcpu`], stage `vcpus`) and the loop
//! that runs them ([`run`], stage `run`).

pub mod run;
pub mod vcpu;
pub mod vm;
