//! Who must act on an error: the one classification every crate of the workspace gives its
//! errors, from which `vmm`'s `main` alone decides the process exit status.
//!
//! It lives in this crate because every other crate of the workspace depends on it.

/// Who must act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The input or a limit the user must change (a path, a size, an option, RLIMIT_MEMLOCK).
    User,
    /// A device (or its server) that could not be set up or mapped before the guest ran.
    Device,
    /// Anything else: the host refused something that should have worked, or a bug.
    Internal,
    /// The work stopped because this signal arrived (SIGINT, SIGTERM).
    Interrupted(i32),
}

impl ErrorClass {
    /// The shell convention: 2 for the user's or a device's input to fix, 128+N after signal
    /// N, else 1.
    pub fn exit_status(self) -> u8 {
        match self {
            ErrorClass::User | ErrorClass::Device => 2,
            ErrorClass::Internal => 1,
            ErrorClass::Interrupted(sig) => u8::try_from(128 + sig).unwrap_or(1),
        }
    }
}

/// An error that knows its [`ErrorClass`].
pub trait Classify {
    /// Who must act on this error.
    fn class(&self) -> ErrorClass;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_the_shell_convention() {
        assert_eq!(ErrorClass::User.exit_status(), 2);
        assert_eq!(ErrorClass::Device.exit_status(), 2);
        assert_eq!(ErrorClass::Internal.exit_status(), 1);
        assert_eq!(ErrorClass::Interrupted(libc::SIGINT).exit_status(), 130);
        assert_eq!(ErrorClass::Interrupted(libc::SIGTERM).exit_status(), 143);
    }
}
