//! One-off child processes with the pool's lifecycle: `warden::spawn`.
//!
//! `cargo run --example one_off`

use std::time::Duration;

use warden::ChildOptions;

fn checksum(data: Vec<u8>) -> u64 {
    data.iter().map(|&b| u64::from(b)).sum()
}

fn forever(_: ()) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn goodbye(reason: warden::ExitReason) {
    eprintln!("child {}: cleaning up ({reason:?})", std::process::id());
}

fn main() -> Result<(), warden::Error> {
    warden::init();

    let child = warden::spawn(checksum, vec![1, 2, 3, 250])?;
    println!("child {:?} computed {}", child.pid(), child.join()?);

    // A child that never finishes: terminate runs its exit hook, then it dies by SIGTERM.
    let options = ChildOptions { on_exit: Some(goodbye), grace: Duration::from_secs(1), ..Default::default() };
    let child = warden::spawn_with(forever, (), options)?;
    std::thread::sleep(Duration::from_millis(200));
    child.terminate();
    child.wait(Some(Duration::from_secs(5)));
    if let Some(exit) = child.exit() {
        println!("child {} ended: {} (exit hook ran: {})", exit.pid, exit.status, exit.hook_ran());
    }
    Ok(())
}
