//! Exit finalizers: what a process runs on its way out.

/// What [`run_exit_finalizers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitReport {
    /// Callbacks that ran.
    pub ran: u32,
    /// Callbacks that panicked.
    pub failed: u32,
    /// Callbacks that could not run before the deadline.
    pub skipped: u32,
}

/// Runs the process's remaining exit finalizers.
pub fn run_exit_finalizers() -> ExitReport {
    ExitReport::default()
}
