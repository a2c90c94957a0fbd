//! vCPUs: creation and boot state (CPUID, MSRs, LAPIC, FPU, registers), and the thread that
//! runs each one.
//!
//! Stopping: the VMM sets the vCPU's stop flag and sends it SIGRTMIN. The signal handler sets
//! `immediate_exit` in that thread's `kvm_run`, so even a signal that lands between the flag
//! check and the `KVM_RUN` ioctl makes the next `KVM_RUN` return at once with EINTR. That is
//! also how a vCPU blocked in a guest HLT (in-kernel LAPIC) is brought back.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use devices::{Bus, ExitNotifier, ExitReason};
use kvm_bindings::{
    kvm_run, CpuId, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MP_STATE_HALTED,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, Killable, SIGRTMIN};

use super::pause::PauseGate;
use super::vm::Vm;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::loader::BootSetup;

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// LAPIC LVT LINT0 and LINT1 register offsets.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_EXTINT: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;
const APIC_LVT_MASKED: u32 = 1 << 16;

/// Errors creating and configuring vCPUs (the `vcpus` stage).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {index}: {source}")]
    Create {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {what} failed: {source}")]
    Configure {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: building the {what} list failed: {reason}")]
    Build {
        index: u32,
        what: &'static str,
        reason: String,
    },
    #[error("vCPU {index}: KVM refused MSR {msr:#x} ({written} of {total} boot MSRs written)")]
    MsrRefused {
        index: u32,
        msr: u32,
        written: usize,
        total: usize,
    },
    #[error("installing the SIGRTMIN vCPU kick handler failed: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
}

impl pinning::Classify for VcpuError {
    fn class(&self) -> pinning::ErrorClass {
        pinning::ErrorClass::Internal
    }
}

/// Why a vCPU stopped running the guest on its own (the guest crashed or KVM gave up).
#[derive(Debug, thiserror::Error)]
pub enum VcpuFault {
    #[error("vCPU {cpu}: shutdown (triple fault) at RIP {rip}")]
    Shutdown { cpu: u32, rip: Rip },
    #[error("vCPU {cpu}: VM entry failed, hardware reason {reason:#x}, at RIP {rip}")]
    FailEntry { cpu: u32, reason: u64, rip: Rip },
    #[error(
        "vCPU {cpu}: KVM internal error, suberror {suberror}, at RIP {rip}; instruction bytes: {}",
        hex(insn)
    )]
    InternalError {
        cpu: u32,
        suberror: u32,
        rip: Rip,
        insn: Vec<u8>,
    },
    #[error("vCPU {cpu}: unexpected exit {exit} at RIP {rip}")]
    Unexpected { cpu: u32, exit: String, rip: Rip },
    #[error("vCPU {cpu}: KVM_RUN failed: {source}")]
    Run { cpu: u32, source: kvm_ioctls::Error },
}

/// An instruction pointer that may not have been readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rip(pub Option<u64>);

impl fmt::Display for Rip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(rip) => write!(f, "{rip:#x}"),
            None => f.write_str("(unreadable)"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(not reported)".into();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One vCPU, created and configured, not yet running.
#[derive(Debug)]
pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        regs[off + i] = b as std::os::raw::c_char;
    }
}

impl Vcpu {
    /// Creates vCPU `index` (its APIC id is the same number).
    pub fn new(vm: &VmFd, index: u32) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Vcpu { index, fd })
    }

    /// The vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn cfg_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let index = self.index;
        move |source| VcpuError::Configure {
            index,
            what,
            source,
        }
    }

    /// Sets CPUID, MSRs, LAPIC and FPU state; with `boot` (the BSP only) also the entry
    /// registers. APs keep KVM's reset state and wait for INIT/SIPI.
    pub fn configure(
        &self,
        supported: &CpuId,
        cpus: u8,
        boot: Option<&BootSetup>,
    ) -> Result<(), VcpuError> {
        let entries = cpuid::filter(supported.as_slice(), self.index, u32::from(cpus));
        let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuError::Build {
            index: self.index,
            what: "CPUID",
            reason: format!("{e:?}"),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.cfg_err("KVM_SET_CPUID2"))?;

        let msrs = msr::boot_msrs().map_err(|e| VcpuError::Build {
            index: self.index,
            what: "MSR",
            reason: format!("{e:?}"),
        })?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.cfg_err("KVM_SET_MSRS"))?;
        if written != msr::BOOT_MSRS.len() {
            return Err(VcpuError::MsrRefused {
                index: self.index,
                msr: msr::BOOT_MSRS.get(written).map_or(0, |m| m.0),
                written,
                total: msr::BOOT_MSRS.len(),
            });
        }

        // Virtual wire mode: the PIC's INTR on LINT0, NMI on LINT1, as the MP table says.
        let mut lapic = self.fd.get_lapic().map_err(self.cfg_err("KVM_GET_LAPIC"))?;
        for (off, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let v = lapic_reg(&lapic.regs, off);
            set_lapic_reg(
                &mut lapic.regs,
                off,
                (v & !(APIC_DELIVERY_MODE_MASK | APIC_LVT_MASKED)) | mode,
            );
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.cfg_err("KVM_SET_LAPIC"))?;

        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.cfg_err("KVM_SET_FPU"))?;

        if let Some(boot) = boot {
            let base = self.fd.get_sregs().map_err(self.cfg_err("KVM_GET_SREGS"))?;
            let sregs = regs::boot_sregs(boot.mode, base);
            self.fd
                .set_sregs(&sregs)
                .map_err(self.cfg_err("KVM_SET_SREGS"))?;
            let r = regs::boot_regs(boot.mode, boot.entry.0);
            self.fd.set_regs(&r).map_err(self.cfg_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }
}

/// Stage `vcpus`: creates `cpus` vCPUs and configures each; the boot CPU gets the entry
/// registers from `boot`.
pub fn create_all(vm: &Vm, cpus: u8, boot: &BootSetup) -> Result<Vec<Vcpu>, VcpuError> {
    install_kick_handler()?;
    (0..u32::from(cpus))
        .map(|index| {
            let v = Vcpu::new(vm.fd(), index)?;
            v.configure(vm.supported_cpuid(), cpus, (index == 0).then_some(boot))?;
            Ok(v)
        })
        .collect()
}

// The running vCPU's kvm_run, for the kick signal handler. Const-initialised and without a
// destructor, so touching it from a signal handler allocates nothing.
thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run, published by the vCPU loop
        // and cleared before the mapping goes away; a volatile byte store is all we do.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

/// Installs the SIGRTMIN handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN(), handle_kick).map_err(|e| e.errno()))
        .map_err(|e| VcpuError::SignalHandler(vmm_sys_util::errno::Error::new(e)))
}

/// Flags the VMM uses to steer a running vCPU thread.
#[derive(Debug, Default)]
pub struct VcpuControl {
    stop: AtomicBool,
    probe_halt: AtomicBool,
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where to report that the VM must stop.
    pub exit: Arc<ExitNotifier>,
    /// With seccomp filters: where the thread installs its own and waits for the others.
    pub seccomp: Option<Arc<crate::seccomp::VcpuGate>>,
    /// Where the thread parks while the guest is paused.
    pub pause: Arc<PauseGate>,
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    control: Arc<VcpuControl>,
    pause: Arc<PauseGate>,
    thread: Option<JoinHandle<Result<(), VcpuFault>>>,
}

impl VcpuHandle {
    /// vCPU index.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // ESRCH after the thread ended is fine: there is nothing left to kick.
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Asks the thread to stop and interrupts KVM_RUN (or its parking, while paused).
    pub fn request_stop(&self) {
        self.control.stop.store(true, Ordering::Release);
        self.pause.wake();
        self.kick();
    }

    /// Asks the (boot) vCPU to check whether it sits in HLT with interrupts off.
    pub fn probe_halt(&self) {
        self.control.probe_halt.store(true, Ordering::Release);
        self.kick();
    }

    /// Whether the thread has returned.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the thread. `None` when already joined; a panicked thread is reported as an
    /// unexpected exit rather than propagated.
    pub fn join(&mut self) -> Option<Result<(), VcpuFault>> {
        let t = self.thread.take()?;
        Some(t.join().unwrap_or_else(|_| {
            Err(VcpuFault::Unexpected {
                cpu: self.index,
                exit: "vCPU thread panicked".into(),
                rip: Rip(None),
            })
        }))
    }
}

/// Starts `vcpu` on its own thread.
pub fn spawn(vcpu: Vcpu, ctx: VcpuContext) -> io::Result<VcpuHandle> {
    let index = vcpu.index;
    let control = Arc::new(VcpuControl::default());
    let thread_control = Arc::clone(&control);
    let pause = ctx.pause.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || run(vcpu, &ctx, &thread_control))?;
    Ok(VcpuHandle {
        index,
        control,
        pause,
        thread: Some(thread),
    })
}

/// What one KVM_RUN produced, detached from the borrowed kvm_run.
enum Step {
    Continue,
    Interrupted,
    Halt,
    Stop,
    Fault(VcpuFault),
    NeedsRip(fn(u32, Rip) -> VcpuFault),
    FailEntry(u64),
    InternalError,
}

fn run(vcpu: Vcpu, ctx: &VcpuContext, control: &VcpuControl) -> Result<(), VcpuFault> {
    let index = vcpu.index;
    let result = run_vcpu(vcpu, ctx, control);
    // Whichever way it ended, a pause must not wait for this thread.
    ctx.pause.exited(index);
    result
}

fn run_vcpu(mut vcpu: Vcpu, ctx: &VcpuContext, control: &VcpuControl) -> Result<(), VcpuFault> {
    // A spawning thread that blocks signals (a signalfd user) would otherwise make us unkickable.
    if let Err(e) = unblock_signal(SIGRTMIN()) {
        tracing::warn!("vCPU {}: cannot unblock SIGRTMIN: {e}", vcpu.index);
    }
    if let Some(gate) = &ctx.seccomp {
        if !gate.enter_vcpu(vcpu.index) {
            // A filter could not be installed; the VMM says which.
            return Ok(());
        }
    }
    KVM_RUN_PTR.with(|p| p.set(vcpu.fd.get_kvm_run()));
    ctx.pause.register(vcpu.index);
    let result = run_loop(&mut vcpu, ctx, control);
    // Before the VcpuFd (and its kvm_run mapping) is dropped.
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    if result.is_err() {
        ctx.exit.request(ExitReason::VcpuFault { cpu: vcpu.index });
    }
    result
}

fn rip_of(fd: &VcpuFd) -> Rip {
    Rip(fd.get_regs().ok().map(|r| r.rip))
}

fn run_loop(vcpu: &mut Vcpu, ctx: &VcpuContext, control: &VcpuControl) -> Result<(), VcpuFault> {
    let cpu = vcpu.index;
    loop {
        if control.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        ctx.pause.park_if_paused(cpu, &control.stop);
        if control.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let step = match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                ctx.pio.read(u64::from(port), data);
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                ctx.pio.write(u64::from(port), data);
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                ctx.mmio.read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                ctx.mmio.write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => Step::Halt,
            Ok(VcpuExit::Intr) => Step::Interrupted,
            Ok(VcpuExit::Shutdown) => Step::NeedsRip(|cpu, rip| VcpuFault::Shutdown { cpu, rip }),
            Ok(VcpuExit::FailEntry(reason, _)) => Step::FailEntry(reason),
            Ok(VcpuExit::InternalError) => Step::InternalError,
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => {
                    ctx.exit.request(ExitReason::Shutdown);
                    Step::Stop
                }
                KVM_SYSTEM_EVENT_RESET => {
                    ctx.exit.request(ExitReason::Reset);
                    Step::Stop
                }
                other => Step::Fault(VcpuFault::Unexpected {
                    cpu,
                    exit: format!("SystemEvent({other})"),
                    rip: Rip(None),
                }),
            },
            Ok(other) => Step::Fault(VcpuFault::Unexpected {
                cpu,
                exit: format!("{other:?}"),
                rip: Rip(None),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
            Err(source) => Step::Fault(VcpuFault::Run { cpu, source }),
        };
        match step {
            Step::Continue => {}
            Step::Interrupted => {
                vcpu.fd.set_kvm_immediate_exit(0);
                if control.probe_halt.swap(false, Ordering::AcqRel) && halted_for_good(&vcpu.fd) {
                    ctx.exit.request(ExitReason::Halted { cpu });
                    return Ok(());
                }
            }
            // Only without an in-kernel LAPIC does HLT come out to us.
            Step::Halt => {
                if interrupts_off(&vcpu.fd) {
                    ctx.exit.request(ExitReason::Halted { cpu });
                    return Ok(());
                }
            }
            Step::Stop => return Ok(()),
            Step::Fault(VcpuFault::Unexpected { cpu, exit, .. }) => {
                return Err(VcpuFault::Unexpected {
                    cpu,
                    exit,
                    rip: rip_of(&vcpu.fd),
                })
            }
            Step::Fault(f) => return Err(f),
            Step::NeedsRip(make) => return Err(make(cpu, rip_of(&vcpu.fd))),
            Step::FailEntry(reason) => {
                return Err(VcpuFault::FailEntry {
                    cpu,
                    reason,
                    rip: rip_of(&vcpu.fd),
                })
            }
            Step::InternalError => return Err(internal_error(&mut vcpu.fd, cpu)),
        }
    }
}

fn interrupts_off(fd: &VcpuFd) -> bool {
    fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
}

/// In-kernel HLT: the vCPU is parked in KVM. With interrupts disabled nothing but an NMI or
/// INIT could wake it, and this VMM sends neither: the guest is done.
fn halted_for_good(fd: &VcpuFd) -> bool {
    fd.get_mp_state()
        .is_ok_and(|s| s.mp_state == KVM_MP_STATE_HALTED)
        && interrupts_off(fd)
}

fn internal_error(fd: &mut VcpuFd, cpu: u32) -> VcpuFault {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the `internal` / `emulation_failure`
    // members of the union are the ones KVM filled.
    let (suberror, insn) = unsafe {
        let internal = run.__bindgen_anon_1.internal;
        let mut insn = Vec::new();
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
            let ef = run.__bindgen_anon_1.emulation_failure;
            if ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
                let bytes = ef.__bindgen_anon_1.__bindgen_anon_1;
                let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
                insn.extend_from_slice(&bytes.insn_bytes[..n]);
            }
        }
        (internal.suberror, insn)
    };
    VcpuFault::InternalError {
        cpu,
        suberror,
        rip: rip_of(fd),
        insn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_messages_show_rip_and_instruction_bytes() {
        let f = VcpuFault::InternalError {
            cpu: 0,
            suberror: 1,
            rip: Rip(Some(0x10_0010)),
            insn: vec![0x0f, 0xc7, 0x0e],
        };
        assert_eq!(
            f.to_string(),
            "vCPU 0: KVM internal error, suberror 1, at RIP 0x100010; instruction bytes: 0f c7 0e"
        );
        let f = VcpuFault::Shutdown {
            cpu: 1,
            rip: Rip(None),
        };
        assert_eq!(
            f.to_string(),
            "vCPU 1: shutdown (triple fault) at RIP (unreadable)"
        );
    }

    #[test]
    fn lapic_register_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT_LINT0, 0x0001_0700);
        assert_eq!(lapic_reg(&regs, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&regs, APIC_LVT_LINT1), 0);
    }
}
