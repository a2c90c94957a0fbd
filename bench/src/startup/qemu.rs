//! QEMU side by side: the same probe ELF through its PVH entry (`-kernel`), KVM, the same RAM
//! size as a preallocated memfd backend with a given number of prealloc threads, memory
//! locked, serial on a pipe. Timed from spawn to the guest's first serial line and to its
//! result line, exactly as `vmm run` is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pinning::cancel::CancelReason;
use pinning::CancelToken;
use serde::Serialize;

use super::args::short_size;
use super::run::{run_timed, tail, Ended, RunFailure};

pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// Which QEMU to run, or why none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuChoice {
    Use(PathBuf),
    Skip(String),
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Whether `p` is a file someone may execute.
pub(super) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `--qemu`: absent = search PATH (skip if not found), `none` = skip, else a path that must
/// be an executable (an error otherwise: the user asked for it).
pub fn choose(arg: Option<&str>) -> Result<QemuChoice, String> {
    let choice = match arg {
        Some("none") => QemuChoice::Skip("--qemu none".into()),
        Some(p) => {
            let path = if p.contains('/') {
                Some(PathBuf::from(p))
            } else {
                on_path(p)
            };
            match path {
                Some(path) if is_executable(&path) => QemuChoice::Use(path),
                _ => return Err(format!(
                    "--qemu `{p}`: not an executable file; give the path of qemu-system-x86_64 or `none`"
                ))
            }
        }
        None => match on_path(DEFAULT_QEMU) {
            Some(p) => QemuChoice::Use(p),
            None => QemuChoice::Skip(format!(
                "{DEFAULT_QEMU} is not on PATH (Debian: apt-get install qemu-system-x86; or --qemu PATH)"
            )),
        },
    };
    if let QemuChoice::Use(_) = choice {
        if !Path::new("/dev/kvm").exists() {
            return Ok(QemuChoice::Skip("/dev/kvm is missing".into()));
        }
    }
    Ok(choice)
}

/// The probe guest written to a temporary file for QEMU's `-kernel`; removed on drop.
pub struct ProbeElf(PathBuf);

impl ProbeElf {
    pub fn write() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("vmm-bench-{}-probe.elf", std::process::id()));
        std::fs::write(&path, vmm_resources::PROBE_GUEST)?;
        Ok(ProbeElf(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ProbeElf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One QEMU configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    pub memory: u64,
    pub prealloc_threads: usize,
}

impl QemuConfig {
    pub fn id(&self) -> String {
        format!(
            "{}-qemu-p{}",
            short_size(self.memory),
            self.prealloc_threads
        )
    }

    pub fn args(&self, elf: &Path) -> Vec<String> {
        let m = short_size(self.memory);
        let mut a: Vec<String> = [
            "-accel",
            "kvm",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-smp",
            "1",
            "-m",
            &m,
            "-object",
            &format!(
                "memory-backend-memfd,id=ram,size={m},prealloc=on,prealloc-threads={}",
                self.prealloc_threads
            ),
            "-machine",
            "memory-backend=ram",
            "-overcommit",
            "mem-lock=on",
            "-device",
            &format!(
                "isa-debug-exit,iobase={:#x},iosize=0x01",
                guest_abi::ports::DEBUG_EXIT
            ),
            "-kernel",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(elf.display().to_string());
        a
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct QemuSample {
    pub run: u32,
    /// From spawn to QEMU reaped.
    pub wall_ms: f64,
    /// From spawn to the guest's first serial line.
    pub first_output_ms: f64,
    /// From spawn to the probe's result line (right after its ready mark).
    pub ready_ms: f64,
    pub exit_code: Option<i32>,
}

/// Boots `config` once. QEMU's isa-debug-exit turns the probe's status 0 into exit code 1.
pub fn boot(
    qemu: &Path,
    elf: &Path,
    config: &QemuConfig,
    run: u32,
    label: &str,
    timeout: Duration,
    cancel: &CancelToken,
) -> Result<Result<QemuSample, RunFailure>, CancelReason> {
    let mut cmd = Command::new(qemu);
    cmd.args(config.args(elf));
    let fail = |reason: String, stderr: &str| RunFailure {
        config: config.id(),
        run: label.to_string(),
        reason,
        stderr_tail: tail(stderr, 15),
    };
    // QEMU holds nothing that outlives it: no grace period needed.
    let t = match run_timed(cmd, timeout, Duration::ZERO, cancel) {
        Ok(t) => t,
        Err(e) => {
            return Ok(Err(fail(
                format!("cannot start {}: {e}", qemu.display()),
                "",
            )))
        }
    };
    let code = match &t.ended {
        Ended::Cancelled(r) => return Err(*r),
        Ended::TimedOut => return Ok(Err(fail("timed out".into(), &t.stderr))),
        Ended::Exited(s) => s.code(),
    };
    let ok = t.stdout.contains(guest_abi::probe::RESULT_OK_LINE);
    match (code, ok, t.first_output_ms, t.ready_line_ms) {
        (Some(1), true, Some(first), Some(ready)) => Ok(Ok(QemuSample {
            run,
            wall_ms: t.wall_ms,
            first_output_ms: first,
            ready_ms: ready,
            exit_code: code,
        })),
        _ => Ok(Err(fail(
            format!(
                "QEMU exited with {code:?} (1 = probe status 0); serial ends:\n{}",
                tail(&t.stdout, 5)
            ),
            &t.stderr,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_arguments_name_the_memfd_backend_and_its_threads() {
        let c = QemuConfig {
            memory: 4 << 30,
            prealloc_threads: 2,
        };
        let a = c.args(Path::new("/tmp/p.elf")).join(" ");
        assert!(a.contains(
            "-object memory-backend-memfd,id=ram,size=4G,prealloc=on,prealloc-threads=2"
        ));
        assert!(a.contains("-machine memory-backend=ram -overcommit mem-lock=on"));
        assert!(a.ends_with("-kernel /tmp/p.elf"));
        assert_eq!(c.id(), "4G-qemu-p2");
    }

    #[test]
    fn none_skips_and_a_bad_path_is_an_error() {
        assert!(matches!(choose(Some("none")), Ok(QemuChoice::Skip(_))));
        let e = choose(Some("/nonexistent/qemu")).unwrap_err();
        assert!(e.contains("/nonexistent/qemu"), "{e}");
    }

    #[test]
    fn the_probe_elf_file_is_removed_on_drop() {
        let elf = ProbeElf::write().unwrap();
        let p = elf.path().to_path_buf();
        assert!(p.exists());
        drop(elf);
        assert!(!p.exists());
    }
}
