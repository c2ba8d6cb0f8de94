use std::time::Duration;

fn square(x: u64) -> u64 {
    x * x
}
fn boom(_: ()) -> u32 {
    panic!("kaboom")
}
fn sleepy(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}
fn die(_: ()) {
    unsafe { libc::abort() }
}
fn started() {
    eprintln!("[{}] start hook", std::process::id());
}
fn ended(r: warden::ExitReason) {
    eprintln!("[{}] exit hook: {r:?}", std::process::id());
}

fn main() -> Result<(), warden::Error> {
    warden::init();
    let pool = warden::Pool::builder()
        .workers(2)
        .on_start(started)
        .on_exit(ended)
        .grace(Duration::from_secs(1))
        .on_event(|e| eprintln!("event: {e:?}"))
        .build()?;
    println!("square: {}", pool.spawn(square, 7)?.join()?);
    let e = pool.spawn(boom, ())?.join().unwrap_err();
    println!("panic: {e} (is_panic={})", e.is_panic());
    let e = pool.spawn(die, ())?.join().unwrap_err();
    println!("abort: {e} (is_crash={}, signal={:?})", e.is_crash(), e.signal());
    let h = pool.spawn_with(sleepy, 5000, warden::TaskOptions { timeout: Some(Duration::from_millis(200)) })?;
    let e = h.join().unwrap_err();
    println!("timeout: {e}");
    println!("square after all that: {}", pool.spawn(square, 9)?.join()?);
    println!("workers: {:?}", pool.workers());
    pool.shutdown();
    println!("done");
    Ok(())
}
