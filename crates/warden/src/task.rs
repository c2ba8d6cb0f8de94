//! Rust functions as tasks: how a `fn` reaches a re-executed copy of the program.
//!
//! Workers of a Rust pool run the same executable as the parent
//! (`/proc/self/exe`). A task names its function by its [`Place`]: its
//! address relative to an anchor function when it is in the anchor's image
//! (warden's own: the executable, or the Rust `dylib` warden is linked into),
//! which is the same in every process that runs this executable even with
//! address-space randomisation (the whole image moves together); else
//! relative to the load address of the shared object that holds it, named
//! by a hash of its name as the dynamic loader gives it (a task function in
//! a `dylib` crate the program links). With it travels a monomorphised
//! *trampoline* that decodes the arguments, calls the function, and encodes
//! the result, all with `postcard`.
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
//! * A function in a shared object the program loads at run time (`dlopen`,
//!   a plugin) can be sent only to workers that have loaded the same object
//!   by then, under the same name; elsewhere its task fails with a codec
//!   error naming the object, instead of jumping to an address.

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

fn offset_of(addr: usize) -> i64 {
    (addr as i64).wrapping_sub(base())
}

/// Where a function is, as every process running this executable reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Place {
    /// 0: the anchor's image, and `offset` is from the anchor; else the
    /// hash ([`images::name_hash`]) of the name of the shared object that
    /// holds it, and `offset` is from that object's load address.
    image: u64,
    offset: i64,
}

impl Place {
    pub(crate) fn of(addr: usize) -> Place {
        match images::outside_the_anchors(addr) {
            Some((image, bias)) => Place { image, offset: (addr as i64).wrapping_sub(bias as i64) },
            None => Place { image: 0, offset: offset_of(addr) },
        }
    }

    /// The address in this process, or an error naming the object that
    /// this process has not loaded.
    fn address(self) -> Result<usize, RemoteError> {
        if self.image == 0 {
            return Ok(base().wrapping_add(self.offset) as usize);
        }
        match images::load_address(self.image) {
            Some(bias) => Ok((bias as i64).wrapping_add(self.offset) as usize),
            None => Err(RemoteError::new(
                RemoteErrorKind::Codec,
                "DecodeError",
                format!(
                    "the task's function is in a shared object this worker has not loaded (its name hashes to \
                     {:#x}): one the program loads at run time must be loaded in the worker too",
                    self.image
                ),
            )),
        }
    }
}

/// The shared objects of this process, as the dynamic loader lists them
/// (`dl_iterate_phdr`): which holds an address, and where one is loaded.
mod images {
    use std::ffi::CStr;
    use std::sync::OnceLock;

    /// One loaded object: the hash of its name, its load address (bias),
    /// and the address ranges of its loaded segments.
    struct Image {
        hash: u64,
        bias: usize,
        ranges: Vec<(usize, usize)>,
    }

    impl Image {
        fn holds(&self, addr: usize) -> bool {
            self.ranges.iter().any(|&(lo, hi)| (lo..hi).contains(&addr))
        }
    }

    /// The address ranges of the anchor's own image, found once (it holds
    /// warden: it is never unloaded). Other objects are listed anew for each
    /// lookup, since one may be unloaded and another loaded in its place.
    static ANCHORS: OnceLock<Vec<(usize, usize)>> = OnceLock::new();

    /// FNV-1a of an object's name, never 0 (the anchor's image).
    pub(super) fn name_hash(name: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in name {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h.max(1)
    }

    fn list() -> Vec<Image> {
        unsafe extern "C" fn each(
            info: *mut libc::dl_phdr_info,
            _size: libc::size_t,
            out: *mut libc::c_void,
        ) -> libc::c_int {
            // SAFETY: the loader passes a valid entry for the duration of
            // the call, and `out` is the `Vec` that `list` passed.
            let (info, out) = unsafe { (&*info, &mut *out.cast::<Vec<Image>>()) };
            let name = if info.dlpi_name.is_null() {
                &[][..]
            } else {
                // SAFETY: a non-null name is a NUL-terminated string of the loader's.
                unsafe { CStr::from_ptr(info.dlpi_name) }.to_bytes()
            };
            let bias = info.dlpi_addr as usize;
            let headers: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
                &[]
            } else {
                // SAFETY: `dlpi_phnum` program headers start at `dlpi_phdr`.
                unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
            };
            let ranges = headers
                .iter()
                .filter(|h| h.p_type == libc::PT_LOAD)
                .map(|h| {
                    let lo = bias.wrapping_add(h.p_vaddr as usize);
                    (lo, lo.wrapping_add(h.p_memsz as usize))
                })
                .collect();
            out.push(Image { hash: name_hash(name), bias, ranges });
            0
        }
        let mut out: Vec<Image> = Vec::new();
        // SAFETY: `each` only reads the entries it is given and pushes to `out`.
        unsafe { libc::dl_iterate_phdr(Some(each), (&mut out as *mut Vec<Image>).cast()) };
        out
    }

    /// `(name hash, load address)` of the object holding `addr`, if it is
    /// not the anchor's image (and is a loaded object at all).
    pub(super) fn outside_the_anchors(addr: usize) -> Option<(u64, usize)> {
        let anchors = ANCHORS.get_or_init(|| {
            let anchor = super::base() as usize;
            list().into_iter().find(|i| i.holds(anchor)).map(|i| i.ranges).unwrap_or_default()
        });
        if anchors.is_empty() || anchors.iter().any(|&(lo, hi)| (lo..hi).contains(&addr)) {
            return None;
        }
        list().into_iter().find(|i| i.holds(addr)).map(|i| (i.hash, i.bias))
    }

    /// The load address of the object whose name hashes to `hash`.
    pub(super) fn load_address(hash: u64) -> Option<usize> {
        list().into_iter().find(|i| i.hash == hash).map(|i| i.bias)
    }
}

type Trampoline = fn(usize, &[u8]) -> Result<Vec<u8>, RemoteError>;

fn trampoline<A: DeserializeOwned, R: Serialize>(func: usize, args: &[u8]) -> Result<Vec<u8>, RemoteError> {
    // SAFETY: `func` is the address of a `fn(A) -> R` in this program:
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
    trampoline: Place,
    func: Place,
}

impl Call {
    /// Encodes a call of `f(args)`.
    pub(crate) fn encode<A: Serialize + DeserializeOwned, R: Serialize + DeserializeOwned>(
        f: fn(A) -> R,
        args: &A,
    ) -> Result<Vec<u8>, postcard::Error> {
        let call =
            Call { trampoline: Place::of(trampoline::<A, R> as Trampoline as usize), func: Place::of(f as usize) };
        postcard::to_extend(args, postcard::to_stdvec(&call)?)
    }
}

/// The hooks of a Rust pool, as sent in `Init`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RustInit {
    pub on_start: Option<Place>,
    pub on_exit: Option<Place>,
}

impl RustInit {
    pub(crate) fn new(on_start: Option<fn()>, on_exit: Option<fn(ExitReason)>) -> Self {
        RustInit { on_start: on_start.map(|f| Place::of(f as usize)), on_exit: on_exit.map(|f| Place::of(f as usize)) }
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
        let on_exit = init.on_exit.map(Place::address).transpose()?;
        if let Some(place) = init.on_start {
            // SAFETY: the parent took this place from a `fn()` of this program
            // (`RustInit::new`), and the handshake checked the image identity.
            let f = unsafe { std::mem::transmute::<usize, fn()>(place.address()?) };
            f();
        }
        Ok(on_exit.map(|addr| {
            // SAFETY: as above, for a `fn(ExitReason)`.
            let f = unsafe { std::mem::transmute::<usize, fn(ExitReason)>(addr) };
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
        let (trampoline, func) = (call.trampoline.address()?, call.func.address()?);
        // SAFETY: the parent took this place from a `Trampoline` of this
        // program (`Call::encode`), and the handshake checked the image identity.
        let t = unsafe { std::mem::transmute::<usize, Trampoline>(trampoline) };
        t(func, args)
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
            trampoline: Place::of(trampoline::<String, u32> as Trampoline as usize),
            func: Place::of((|s: String| s.len() as u32) as fn(String) -> u32 as usize),
        };
        let mut payload = postcard::to_allocvec(&call).unwrap();
        payload.extend_from_slice(&[0xff, 0xff, 0xff]);
        let err = RustHandler.run(&payload).unwrap_err();
        assert_eq!(err.kind, RemoteErrorKind::Codec);
    }
}
