use std::thread;

use devices::serial::SharedBuffer;

use super::*;
use crate::builder;
use crate::loader::tests::tiny_elf;
use crate::loader::BootProtocol;
use crate::run::tests::{config, LOAD_ADDR};
use crate::run::VmExit;

/// 64-bit: prints 'x' on COM1 forever.
const FLOOD: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'x', // mov al, 'x'
    0xee, // out dx, al
    0xeb, 0xfd, // jmp back to the out
];

#[test]
fn pause_before_the_vcpus_run_and_after_the_end_is_refused() {
    let c = VmControl::new();
    c.set_phase("pin");
    assert_eq!(
        c.pause(),
        Err(ControlError::NotYetRunning {
            stage: "pin",
            what: "pause"
        })
    );
    assert_eq!(c.state(), VmState::Running);
    c.finish(Finished {
        exit_status: 0,
        ..Finished::default()
    });
    assert_eq!(c.state(), VmState::Shutdown);
    assert_eq!(c.resume(), Err(ControlError::Ended("resume")));
    assert_eq!(c.stop(), Err(ControlError::Ended("shut down")));
    assert!(c.wait_ended(Duration::ZERO));
    assert_eq!(c.info().exit_status, Some(0));
}

#[test]
fn a_stop_before_the_vm_exists_stops_it_once_it_does() {
    let c = VmControl::new();
    c.stop().unwrap();
    let notifier = Arc::new(devices::ExitNotifier::new().unwrap());
    let cancel = CancelToken::new();
    c.set_stop(StopHandle::new(notifier.clone()), cancel.clone());
    assert!(cancel.is_cancelled());
    assert_eq!(notifier.reason(), Some(ExitReason::ShutdownRequested));
}

#[test]
fn progress_shows_only_while_pinning() {
    let c = VmControl::new();
    assert!(c.info().progress.is_none());
    c.set_phase("pin");
    // No job has begun: nothing to show yet.
    assert!(c.info().progress.is_none());
    assert!(!c.wait_ended(Duration::from_millis(1)));
}

/// Waits (bounded) until the guest has printed more than `than` bytes.
fn wait_for_output(out: &SharedBuffer, than: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = out.contents().len();
        if n > than {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no guest output past {than} bytes"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The whole builder under a control, on two vCPUs (both parked by a pause): the guest prints
/// without end; paused, its output stops; resumed, it goes on where it was; stopped while
/// paused, the run ends as stopped and the control says Shutdown.
#[test]
fn a_paused_guest_prints_nothing_until_resumed_and_a_stop_while_paused_ends_it() {
    let out = SharedBuffer::new();
    let mut cfg = config(
        tiny_elf(FLOOD, LOAD_ADDR, None),
        BootProtocol::Linux64,
        2,
        &out,
    );
    // Filters would reach every thread of this process, the other tests' too.
    cfg.seccomp.seccomp = crate::seccomp::SeccompLevel::Off;
    let control = VmControl::new();
    let runner = {
        let control = control.clone();
        thread::spawn(move || builder::run(&cfg, Instant::now(), Some(&control)).map(|o| o.exit))
    };
    let printed = wait_for_output(&out, 0);
    assert_eq!(control.state(), VmState::Running);
    assert_eq!(control.info().phase, Some("run"));

    control.pause().unwrap();
    assert_eq!(control.state(), VmState::Paused);
    assert_eq!(control.pause(), Err(PauseError::AlreadyPaused.into()));
    // The serial writer may still be draining what was printed before the pause.
    thread::sleep(Duration::from_millis(100));
    let paused_at = out.contents().len();
    assert!(paused_at >= printed);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        out.contents().len(),
        paused_at,
        "the guest printed while paused"
    );

    control.resume().unwrap();
    assert_eq!(control.resume(), Err(PauseError::NotPaused.into()));
    assert_eq!(control.state(), VmState::Running);
    wait_for_output(&out, paused_at);

    control.pause().unwrap();
    control.stop().unwrap();
    let exit = runner.join().unwrap().unwrap();
    assert!(matches!(exit, VmExit::ShutdownRequested), "{exit}");
    assert_eq!(control.info().phase, Some("exit"));
    assert_eq!(control.pause(), Err(PauseError::NotRunning.into()));
    // The builder does not say how the run ended: its caller does.
    assert_eq!(control.state(), VmState::Running);
    control.finish(Finished::default());
    assert_eq!(control.state(), VmState::Shutdown);
}
