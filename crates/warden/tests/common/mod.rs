//! Helpers shared by the integration test binaries.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;

/// A test's result.
pub type TestResult = Result<(), Failed>;

/// `Ok` if `cond` holds, else a failure saying `msg`.
pub fn check(cond: bool, msg: impl Into<String>) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` runs out; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes `text` to `dir/name` whole: to a file of another name first, then
/// renamed, so that a test reading `name` never finds it empty or half written
/// (a hook writing in a worker while the test polls).
pub fn write_whole(dir: &std::path::Path, name: &str, text: &str) {
    let part = dir.join(format!("part-{name}"));
    if std::fs::write(&part, text).is_ok() {
        let _ = std::fs::rename(part, dir.join(name));
    }
}
