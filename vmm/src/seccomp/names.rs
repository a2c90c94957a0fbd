//! x86_64 system call names by number, for the line that reports a forbidden call, from the
//! `syscalls` crate (its table is generated from the kernel's syscall tables and kept up to
//! date there); a number it does not know is reported as `unknown`.

use syscalls::Sysno;

/// The name of x86_64 system call `nr`.
///
/// The SIGSYS handler calls this, so it must be async-signal-safe, and it is: `Sysno::new` and
/// `Sysno::name` are `const fn`s, each one `match` over constants (a number to a variant, a
/// variant to a `&'static str` literal), compiled to plain code and read-only data. Nothing
/// here allocates, takes a lock, touches thread-local state or makes a system call.
pub fn name(nr: i64) -> &'static str {
    usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map_or("unknown", |s| s.name())
}
