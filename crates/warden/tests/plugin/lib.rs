//! Functions in a Rust `dylib`, loaded at its own randomised address: a
//! task function here is outside the image of the executable warden is in.

/// Three times `x`: a task function.
pub fn triple(x: u64) -> u64 {
    x * 3
}

/// The pid of the process it runs in: a task function.
pub fn pid(_: ()) -> u32 {
    std::process::id()
}
