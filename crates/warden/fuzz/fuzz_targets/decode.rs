//! Feeds arbitrary bytes, cut at arbitrary points, to the frame reader: it must
//! never panic, never hold more than what arrived plus one growth step, and
//! stay failed after its first error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden::frontend::wire::{FrameReader, MAX_GROWTH_STEP};

const MAX_FRAME: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let cut = usize::from(cut).max(1);
    let mut reader = FrameReader::new(MAX_FRAME);
    let mut failed = None;
    for chunk in bytes.chunks(cut) {
        reader.push(chunk);
        loop {
            match reader.next_message() {
                Ok(Some(msg)) => {
                    let _ = msg.name();
                }
                Ok(None) => break,
                Err(e) => {
                    if let Some(first) = &failed {
                        assert_eq!(first, &e, "errors are sticky");
                    }
                    failed = Some(e);
                    break;
                }
            }
        }
        assert!(reader.capacity() <= 2 * bytes.len() + MAX_GROWTH_STEP + (64 << 10));
    }
});
