//! A process-wide hook every helper thread of the engine calls as it starts, before it does
//! any work, with its name (`pin-helper-0`, `unpin-1`, ...): where the VMM installs the
//! helpers' seccomp filter without this crate knowing about seccomp.

use std::sync::{PoisonError, RwLock};

/// A helper start hook: called on the new thread with the thread's name.
pub type HelperStartHook = fn(&str);

static HOOK: RwLock<Option<HelperStartHook>> = RwLock::new(None);

/// Sets (or, with `None`, clears) the hook every engine helper calls as it starts.
pub fn set_helper_start_hook(hook: Option<HelperStartHook>) {
    *HOOK.write().unwrap_or_else(PoisonError::into_inner) = hook;
}

/// Runs the hook, if one is set, on the calling (new helper) thread.
pub(crate) fn helper_started() {
    let hook = *HOOK.read().unwrap_or_else(PoisonError::into_inner);
    if let Some(hook) = hook {
        hook(std::thread::current().name().unwrap_or("pin-helper"));
    }
}
