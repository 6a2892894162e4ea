//! Property-based fuzzing of the wire protocol's decoders, the code both
//! sides run on bytes from the other: the server on every request a backend
//! sends, the extension on every reply. Whatever the bytes (random, a valid
//! frame with bytes flipped, cut short, or with a lying length), decoding
//! returns a value or an error: it never panics and never allocates more
//! than the frame limit. Valid messages survive a round trip.
//!
//! `PROPTEST_CASES` sets the number of cases per property (256 by default);
//! `scripts/test.sh` runs the default.

use kvembed_proto::*;
use proptest::prelude::*;
use std::io;

fn any_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Document), Just(Role::Query)]
}

fn any_options() -> impl Strategy<Value = EmbedOptions> {
    (
        proptest::option::of("[a-z-]{0,12}"),
        proptest::option::of(proptest::collection::vec(0usize..64, 0..6)),
        proptest::option::of(-10.0f32..10.0),
        proptest::option::of(".{0,40}"),
        proptest::option::of(1usize..100_000),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            |(method, layers, bias, prompt, max_tokens, truncate)| EmbedOptions {
                method,
                layers,
                bias,
                document_prompt: prompt.clone(),
                query_prompt: prompt,
                max_tokens,
                truncate,
                ..Default::default()
            },
        )
}

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u32>().prop_map(|version| Request::Hello { version }),
        (
            proptest::collection::vec(".{0,60}", 0..8),
            any_role(),
            any_options()
        )
            .prop_map(|(texts, role, options)| Request::Embed {
                texts,
                role,
                options,
                caller: Caller {
                    database: "db".into(),
                    role: "rôle".into(),
                },
            }),
        (
            proptest::collection::vec(".{0,30}", 0..8),
            proptest::option::of(1usize..9)
        )
            .prop_map(|(texts, window)| Request::SelectLayers {
                texts,
                options: SelectOptions {
                    window,
                    ..Default::default()
                },
                caller: Default::default(),
            }),
        Just(Request::Status),
        (".{0,200}", any::<usize>(), any::<usize>()).prop_map(|(text, max_tokens, overlap)| {
            Request::Chunk {
                text,
                max_tokens,
                overlap,
                caller: Default::default(),
                model: None,
            }
        }),
        any::<bool>().prop_map(|reset| Request::Stats { reset }),
        Just(Request::Shutdown),
        (0u64..100_000).prop_map(|ms| Request::Fault {
            fault: Fault::Stall { ms }
        }),
    ]
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    write_frame(&mut buf, payload).unwrap();
    buf
}

/// Every decoder a peer runs, on the same bytes; none may panic.
fn decode_all(bytes: &[u8]) {
    let _ = read_frame(&mut &bytes[..]);
    let _ = read_json::<_, Request>(&mut &bytes[..]);
    let _ = read_json::<_, Response>(&mut &bytes[..]);
    for expected in [0, 1, 3, 1 << 20, usize::MAX / 4] {
        let _ = read_f32s_exact(&mut &bytes[..], expected);
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn random_payloads_in_valid_frames_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&frame(&payload));
    }

    #[test]
    fn requests_round_trip(request in any_request()) {
        let mut buf = Vec::new();
        write_json(&mut buf, &request).unwrap();
        let back: Request = read_json(&mut &buf[..]).unwrap();
        prop_assert_eq!(back, request);
    }

    #[test]
    fn mutated_requests_decode_or_fail_cleanly(
        request in any_request(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = Vec::new();
        write_json(&mut buf, &request).unwrap();
        let mut mutated = buf.clone();
        for (at, byte) in &flips {
            let i = at.index(mutated.len());
            mutated[i] ^= byte | 1;
        }
        decode_all(&mutated);
        decode_all(&buf[..cut.index(buf.len())]);
    }

    #[test]
    fn a_lying_length_is_refused_before_allocating(len in (MAX_FRAME as u32 + 1)..=u32::MAX, tail in proptest::collection::vec(any::<u8>(), 0..16)) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let err = read_frame(&mut &bytes[..]).unwrap_err();
        prop_assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn f32_frames_of_any_shape_are_checked(values in proptest::collection::vec(any::<f32>(), 0..64), claimed in 0usize..80) {
        let mut buf = Vec::new();
        write_f32s(&mut buf, &values).unwrap();
        match read_f32s_exact(&mut &buf[..], claimed) {
            Ok(back) => {
                prop_assert_eq!(claimed, values.len());
                prop_assert!(back.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            Err(e) => {
                prop_assert!(claimed != values.len());
                prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            }
        }
    }
}
