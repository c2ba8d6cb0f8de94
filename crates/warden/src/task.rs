//! Rust functions as tasks: how a `fn` reaches a re-executed copy of the program.
//!
//! Workers of a Rust pool run the same executable as the parent
//! (`/proc/self/exe`). A task names its function by its address relative to an
//! anchor function in the same image, which is the same in every process that
//! runs this executable even with address-space randomisation (the whole image
//! moves together). With it travels a monomorphised *trampoline* that decodes
//! the arguments, calls the function, and encodes the result, all with
//! `postcard`.
//!
//! # Caveats
//!
//! * Only plain `fn` items and closures that capture nothing can be sent: they
//!   are the things that exist, at the same place, in every copy of the program.
//! * The worker trusts the addresses it is sent: the channel is a private
//!   socketpair between a parent and the child it spawned from its own
//!   executable, and the handshake checks a fingerprint of the image
//!   ([`identity`]) before any task is sent. A pool pointed at another program
//!   with [`crate::Builder::command`] must not use these typed calls.
//! * Everything before [`crate::init`] in `main` runs in workers too.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::wire::{ExitReason, RemoteError, RemoteErrorKind};
use crate::worker::{ExitHook, ExitHookOutcome, Handler, WorkerInfo};

#[inline(never)]
fn anchor() -> u64 {
    // A body that cannot be folded together with another function's.
    0x7761_7264_656e_0001
}

fn base() -> i64 {
    anchor as fn() -> u64 as usize as i64
}

pub(crate) fn offset_of(addr: usize) -> i64 {
    (addr as i64).wrapping_sub(base())
}

fn address_of(offset: i64) -> usize {
    base().wrapping_add(offset) as usize
}

type Trampoline = fn(usize, &[u8]) -> Result<Vec<u8>, RemoteError>;

fn trampoline<A: DeserializeOwned, R: Serialize>(func: usize, args: &[u8]) -> Result<Vec<u8>, RemoteError> {
    // SAFETY: `func` is the address of a `fn(A) -> R` in this executable image:
    // `Call::new::<A, R>` took it from such a pointer and paired it with this
    // very instantiation of the trampoline.
    let f = unsafe { std::mem::transmute::<usize, fn(A) -> R>(func) };
    let args: A = postcard::from_bytes(args).map_err(|e| {
        RemoteError::new(RemoteErrorKind::Codec, "DecodeError", format!("cannot decode the task's arguments: {e}"))
    })?;
    let value = f(args);
    postcard::to_allocvec(&value).map_err(|e| {
        RemoteError::new(RemoteErrorKind::Codec, "EncodeError", format!("cannot encode the task's result: {e}"))
    })
}

/// An encoded call of a Rust function: what a Rust task's payload holds,
/// its arguments' encoding after it (not inside it: encoded in place and
/// decoded where they lie, the arguments are copied once less each way).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Call {
    trampoline: i64,
    func: i64,
}

impl Call {
    /// Encodes a call of `f(args)`.
    pub(crate) fn encode<A: Serialize + DeserializeOwned, R: Serialize + DeserializeOwned>(
        f: fn(A) -> R,
        args: &A,
    ) -> Result<Vec<u8>, postcard::Error> {
        let call =
            Call { trampoline: offset_of(trampoline::<A, R> as Trampoline as usize), func: offset_of(f as usize) };
        postcard::to_extend(args, postcard::to_stdvec(&call)?)
    }
}

/// The hooks of a Rust pool, as sent in `Init`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RustInit {
    pub on_start: Option<i64>,
    pub on_exit: Option<i64>,
}

impl RustInit {
    pub(crate) fn new(on_start: Option<fn()>, on_exit: Option<fn(ExitReason)>) -> Self {
        RustInit { on_start: on_start.map(|f| offset_of(f as usize)), on_exit: on_exit.map(|f| offset_of(f as usize)) }
    }
}

/// A fingerprint of this executable image: the relative positions of a few
/// functions, which differ between any two builds that differ in code layout.
pub fn identity() -> u64 {
    let points = [
        offset_of(trampoline::<(), ()> as Trampoline as usize),
        offset_of(identity as fn() -> u64 as usize),
        offset_of(crate::worker::serve::<RustHandler> as fn(_, _) -> _ as usize),
    ];
    // FNV-1a over the offsets.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in points {
        for b in p.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Runs Rust tasks in a worker started by [`crate::init`].
#[derive(Debug, Default)]
pub struct RustHandler;

impl Handler for RustHandler {
    fn identity(&self) -> u64 {
        identity()
    }

    fn init(&mut self, _info: &WorkerInfo, payload: &[u8]) -> Result<Option<ExitHook>, RemoteError> {
        let init: RustInit = postcard::from_bytes(payload).map_err(|e| {
            RemoteError::new(RemoteErrorKind::Codec, "DecodeError", format!("cannot decode the pool's hooks: {e}"))
        })?;
        if let Some(offset) = init.on_start {
            // SAFETY: the parent took this offset from a `fn()` in this image
            // (`RustInit::new`), and the handshake checked the image identity.
            let f = unsafe { std::mem::transmute::<usize, fn()>(address_of(offset)) };
            f();
        }
        Ok(init.on_exit.map(|offset| {
            // SAFETY: as above, for a `fn(ExitReason)`.
            let f = unsafe { std::mem::transmute::<usize, fn(ExitReason)>(address_of(offset)) };
            Arc::new(move |reason: &ExitReason| {
                f(*reason);
                ExitHookOutcome::default()
            }) as ExitHook
        }))
    }

    fn run(&mut self, payload: &[u8]) -> Result<Vec<u8>, RemoteError> {
        let (call, args): (Call, &[u8]) = postcard::take_from_bytes(payload).map_err(|e| {
            RemoteError::new(RemoteErrorKind::Codec, "DecodeError", format!("cannot decode the task: {e}"))
        })?;
        // SAFETY: the parent took this offset from a `Trampoline` in this image
        // (`Call::encode`), and the handshake checked the image identity.
        let t = unsafe { std::mem::transmute::<usize, Trampoline>(address_of(call.trampoline)) };
        t(address_of(call.func), args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u32) -> u32 {
        x * 2
    }

    #[test]
    fn a_call_round_trips_through_the_handler_in_process() {
        let payload = Call::encode(double, &21).unwrap();
        let out = RustHandler.run(&payload).unwrap();
        assert_eq!(postcard::from_bytes::<u32>(&out).unwrap(), 42);
    }

    #[test]
    fn undecodable_arguments_are_a_codec_error() {
        let call = Call {
            trampoline: offset_of(trampoline::<String, u32> as Trampoline as usize),
            func: offset_of((|s: String| s.len() as u32) as fn(String) -> u32 as usize),
        };
        let mut payload = postcard::to_allocvec(&call).unwrap();
        payload.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = RustHandler.run(&payload).unwrap_err();
        assert_eq!(err.kind, RemoteErrorKind::Codec);
    }
}
