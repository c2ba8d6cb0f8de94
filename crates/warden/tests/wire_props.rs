//! Property tests of the frame codec: whatever arrives on the wire, decoding
//! never panics, never allocates beyond what arrived (and the limit), and every
//! message we encode comes back unchanged however the stream is cut.

use proptest::prelude::*;
use warden::frontend::wire::{
    encode, ExitPathReport, ExitReason, FrameReader, Message, RemoteError, RemoteErrorKind, RetireReason, WireError,
    WireOutcome, HEADER_LEN, MAGIC, MAX_GROWTH_STEP, PROTOCOL_VERSION,
};

/// An owned message, so proptest can generate and shrink it.
#[derive(Debug, Clone)]
enum Owned {
    Hello(u32, u64),
    Init(u64, Vec<u8>),
    Ready,
    InitFailed(String, String),
    Task(u64, Vec<u8>),
    Value(u64, Vec<u8>),
    Error(u64, String, Vec<u8>),
    Skipped(u64),
    Cancel(u64),
    Retire(u8),
    Goodbye(i32, bool, Option<String>, u32, Option<u64>),
    Record(Vec<u8>),
}

impl Owned {
    fn message(&self) -> Message<'_> {
        match self {
            Owned::Hello(pid, identity) => Message::Hello { pid: *pid, identity: *identity },
            Owned::Init(worker, payload) => Message::Init { worker: *worker, grace_ms: *worker ^ 0x5a5a, payload },
            Owned::Ready => Message::Ready,
            Owned::InitFailed(t, m) => Message::InitFailed { error: RemoteError::new(RemoteErrorKind::Raised, t, m) },
            Owned::Task(id, payload) => Message::Task { id: *id, payload },
            Owned::Value(id, v) => Message::Result { id: *id, outcome: WireOutcome::Value(v) },
            Owned::Error(id, m, data) => Message::Result {
                id: *id,
                outcome: WireOutcome::Error(RemoteError {
                    kind: RemoteErrorKind::Panicked,
                    type_name: "panic".into(),
                    message: m.clone(),
                    traceback: String::new(),
                    data: data.clone(),
                }),
            },
            Owned::Skipped(id) => Message::Result { id: *id, outcome: WireOutcome::Skipped },
            Owned::Cancel(id) => Message::Cancel { id: *id },
            Owned::Retire(r) => Message::Retire {
                reason: match r % 4 {
                    0 => RetireReason::Shutdown,
                    1 => RetireReason::MaxTasks,
                    2 => RetireReason::MaxMemory,
                    _ => RetireReason::Done,
                },
            },
            Owned::Goodbye(sig, ran, err, n, last) => Message::Goodbye {
                reason: ExitReason::Signal(*sig),
                report: ExitPathReport {
                    hook_ran: *ran,
                    hook_error: err.clone(),
                    finalizers_run: *n,
                    finalizers_failed: 0,
                    finalizers_skipped: 0,
                },
                last_task: *last,
            },
            Owned::Record(data) => Message::Record { data },
        }
    }
}

fn owned() -> impl Strategy<Value = Owned> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..2048);
    prop_oneof![
        (any::<u32>(), any::<u64>()).prop_map(|(a, b)| Owned::Hello(a, b)),
        (any::<u64>(), bytes()).prop_map(|(a, b)| Owned::Init(a, b)),
        Just(Owned::Ready),
        (".{0,40}", ".{0,200}").prop_map(|(a, b)| Owned::InitFailed(a, b)),
        (any::<u64>(), bytes()).prop_map(|(a, b)| Owned::Task(a, b)),
        (any::<u64>(), bytes()).prop_map(|(a, b)| Owned::Value(a, b)),
        (any::<u64>(), ".{0,100}", bytes()).prop_map(|(a, b, c)| Owned::Error(a, b, c)),
        any::<u64>().prop_map(Owned::Skipped),
        any::<u64>().prop_map(Owned::Cancel),
        any::<u8>().prop_map(Owned::Retire),
        (any::<i32>(), any::<bool>(), proptest::option::of(".{0,50}"), any::<u32>(), any::<Option<u64>>())
            .prop_map(|(a, b, c, d, e)| Owned::Goodbye(a, b, c, d, e)),
        bytes().prop_map(Owned::Record),
    ]
}

const MAX: usize = 1 << 20;

/// Feeds `bytes` to a reader in the given chunk sizes and drains every message.
fn drain(bytes: &[u8], cuts: &[usize], max: usize) -> (Vec<String>, Option<WireError>, usize) {
    let mut reader = FrameReader::new(max);
    let mut out = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    let mut peak = 0;
    while at < bytes.len() {
        let n = (*cut.next().unwrap_or(&1)).clamp(1, bytes.len() - at);
        reader.push(&bytes[at..at + n]);
        at += n;
        loop {
            match reader.next_message() {
                Ok(Some(m)) => out.push(format!("{m:?}")),
                Ok(None) => break,
                Err(e) => return (out, Some(e), peak),
            }
        }
        peak = peak.max(reader.pending());
    }
    (out, None, peak)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_errors_are_sticky(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                                        cuts in proptest::collection::vec(1usize..300, 1..8)) {
        let (_, err, _) = drain(&bytes, &cuts, MAX);
        if let Some(e) = err {
            // After an error the reader stays failed.
            let mut reader = FrameReader::new(MAX);
            reader.push(&bytes);
            let mut first = None;
            for _ in 0..10_000 {
                match reader.next_message() {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => { first = Some(e); break; }
                }
            }
            prop_assert_eq!(first.clone(), Some(e));
            prop_assert_eq!(reader.next_message().err(), first);
        }
    }

    #[test]
    fn garbage_after_a_valid_header_never_panics(len in 0u32..4096, body in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.push(PROTOCOL_VERSION);
        bytes.push(0);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&body);
        let _ = drain(&bytes, &[7, 100, 1], MAX);
    }

    #[test]
    fn a_lying_length_costs_only_what_arrived(len in (MAX as u32 / 2)..u32::MAX, body in proptest::collection::vec(any::<u8>(), 0..10_000)) {
        let mut reader = FrameReader::new(usize::MAX);
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.push(PROTOCOL_VERSION);
        header.push(0);
        header.extend_from_slice(&len.to_le_bytes());
        reader.push(&header);
        reader.push(&body);
        prop_assert!(reader.next_message().unwrap_or(None).is_none());
        // The reader holds and allocates what arrived, not what was announced.
        prop_assert_eq!(reader.pending(), HEADER_LEN + body.len());
        prop_assert!(reader.capacity() <= 2 * (HEADER_LEN + body.len()) + MAX_GROWTH_STEP + 64 * 1024,
                     "allocated {} for {} bytes", reader.capacity(), body.len());
    }

    #[test]
    fn frames_over_the_limit_are_refused(extra in 1usize..1000) {
        let max = 4096;
        let mut bytes = Vec::new();
        let payload = vec![0u8; max + extra];
        let e = encode(&Message::Task { id: 1, payload: &payload }, &mut bytes, max).unwrap_err();
        let is_too_large = matches!(e, WireError::TooLarge { .. });
        prop_assert!(is_too_large);
        encode(&Message::Task { id: 1, payload: &payload }, &mut bytes, usize::MAX).unwrap();
        let (_, err, _) = drain(&bytes, &[512], max);
        let refused = matches!(err, Some(WireError::TooLarge { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn any_sequence_of_messages_round_trips_however_the_stream_is_cut(
        msgs in proptest::collection::vec(owned(), 1..20),
        cuts in proptest::collection::vec(1usize..5000, 1..10)
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            encode(&m.message(), &mut bytes, MAX).unwrap();
        }
        let (got, err, _) = drain(&bytes, &cuts, MAX);
        prop_assert_eq!(err, None);
        let want: Vec<String> = msgs.iter().map(|m| format!("{:?}", m.message())).collect();
        prop_assert_eq!(got, want);
    }
}
