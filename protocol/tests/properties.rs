//! Property tests of every codec: encode → decode is the identity, JSON and MessagePack agree,
//! and no input makes a parser panic.

use proptest::prelude::*;
use protocol::compression::{Compressor, Decompressor};
use protocol::envelope::{
    DecodeLimits, EventName, Format, Op, Request, ResumePoint, RoomId, Value, decode_request,
    decode_value, encode_request, encode_value, strip_c0,
};
use protocol::http::{HttpLimits, parse_request_head};
use protocol::socketio;
use protocol::ws::{self, Message, MessageDecoder};

const LIMITS: DecodeLimits = DecodeLimits {
    max_message_bytes: 1 << 20,
    max_depth: 32,
    max_resume_rooms: 128,
};

/// Strings as the decoder produces them: banned C0 controls already removed.
fn clean_string() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| strip_c0(&s).into_owned())
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (i64::MIN..0i64).prop_map(Value::Int),
        any::<u64>().prop_map(Value::UInt),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        clean_string().prop_map(Value::Str),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((clean_string(), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

fn room() -> impl Strategy<Value = RoomId> {
    "[A-Za-z0-9][A-Za-z0-9_.:@-]{0,20}"
        .prop_map(|s| RoomId::parse(&s).expect("valid by construction"))
}

fn request() -> impl Strategy<Value = Request> {
    let op = prop_oneof![
        room().prop_map(|room| Op::Join { room }),
        room().prop_map(|room| Op::Leave { room }),
        room().prop_map(|room| Op::Presence { room }),
        (
            room(),
            value(),
            prop::option::of("[a-z][a-z0-9_.:-]{0,20}x")
        )
            .prop_map(|(room, data, event)| Op::Publish {
                room,
                data,
                event: event.map(|e| EventName::parse(&e).expect("valid by construction")),
            }),
        (room(), any::<u64>(), 0..=100u64).prop_map(|(room, since, limit)| Op::History {
            room,
            since,
            limit
        }),
        (
            "[a-z0-9_]{1,40}",
            prop::collection::vec((room(), any::<u64>(), "[a-z0-9]{0,16}"), 0..5)
        )
            .prop_map(|(session, rooms)| {
                let mut seen = Vec::new();
                let rooms = rooms
                    .into_iter()
                    .filter(|(r, _, _)| {
                        let fresh = !seen.contains(r);
                        seen.push(r.clone());
                        fresh
                    })
                    .map(|(r, seq, epoch)| (r, ResumePoint { seq, epoch }))
                    .collect();
                Op::Resume { session, rooms }
            }),
        "[A-Za-z0-9._-]{1,200}".prop_map(|token| Op::Refresh { token }),
        Just(Op::Ping),
    ];
    (prop::option::of(0..=protocol::envelope::MAX_ID), op).prop_map(|(id, op)| Request { id, op })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn values_round_trip_and_formats_agree(v in value()) {
        let json = encode_value(&v, Format::Json).unwrap();
        let msgpack = encode_value(&v, Format::MsgPack).unwrap();
        let from_json = decode_value(&json, Format::Json, &LIMITS).unwrap();
        let from_msgpack = decode_value(&msgpack, Format::MsgPack, &LIMITS).unwrap();
        prop_assert_eq!(&from_json, &v);
        prop_assert_eq!(&from_msgpack, &v);
    }

    #[test]
    fn requests_round_trip_in_both_formats(req in request()) {
        for format in Format::ALL {
            let bytes = encode_request(&req, format);
            prop_assert_eq!(decode_request(&bytes, format, &LIMITS).unwrap(), req.clone());
        }
    }

    #[test]
    fn decoders_never_panic_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for format in Format::ALL {
            let _ = decode_request(&bytes, format, &LIMITS);
            let _ = decode_value(&bytes, format, &LIMITS);
        }
    }

    #[test]
    fn decoders_never_panic_on_near_json(s in r#"\{("(op|id|room|data|since|limit|rooms|session|token)":[\[\]{}0-9a-z",:.-]{0,12},?){0,6}\}"#) {
        let _ = decode_request(s.as_bytes(), Format::Json, &LIMITS);
    }

    #[test]
    fn strip_c0_is_idempotent_and_leaves_no_control(s in any::<String>()) {
        let once = strip_c0(&s).into_owned();
        prop_assert!(once.chars().all(|c| c >= ' ' || matches!(c, '\t' | '\r' | '\n')));
        prop_assert_eq!(strip_c0(&once).into_owned(), once);
    }

    #[test]
    fn frames_round_trip_with_any_mask_and_fragmentation(
        payload in prop::collection::vec(any::<u8>(), 0..3000),
        mask in any::<[u8; 4]>(),
        cuts in prop::collection::vec(0usize..3000, 0..4),
        text in any::<bool>(),
    ) {
        let payload = if text { String::from_utf8_lossy(&payload).into_owned().into_bytes() } else { payload };
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(payload.len())).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(payload.len());
        bounds.dedup();
        if bounds.len() == 1 { bounds.push(0); }
        let mut wire = Vec::new();
        let pieces: Vec<&[u8]> = bounds.windows(2).map(|w| &payload[w[0]..w[1]]).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let opcode = if i > 0 { ws::frame::CONTINUE } else if text { ws::frame::TEXT } else { ws::frame::BINARY };
            ws::encode_masked_frame(&mut wire, opcode, i + 1 == pieces.len(), piece, mask);
        }
        let mut decoder = MessageDecoder::new();
        let mut offset = 0;
        let mut got = None;
        while offset < wire.len() {
            let d = decoder.decode(&mut wire[offset..], 1 << 16).unwrap();
            prop_assert!(d.consumed > 0);
            offset += d.consumed;
            if let Some(m) = d.message {
                got = Some(match m {
                    Message::Text(p) => { prop_assert!(text); p.as_bytes().to_vec() }
                    Message::Binary(p) => { prop_assert!(!text); p.as_bytes().to_vec() }
                    other => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
                });
            }
        }
        prop_assert_eq!(got, Some(payload));
    }

    #[test]
    fn frame_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut buf = bytes;
        let mut decoder = MessageDecoder::new();
        let mut offset = 0;
        while let Ok(d) = decoder.decode(&mut buf[offset..], 256) {
            if d.consumed == 0 { break; }
            offset += d.consumed;
        }
    }

    #[test]
    fn zstd_round_trips_and_never_panics(data in prop::collection::vec(any::<u8>(), 0..4096), junk in prop::collection::vec(any::<u8>(), 0..256)) {
        let frame = Compressor::new(3).unwrap().compress(&data).unwrap();
        let mut d = Decompressor::new().unwrap();
        prop_assert_eq!(d.decompress(&frame, 4096).unwrap(), data);
        let mut tampered = protocol::compression::ZSTD_MAGIC.to_vec();
        tampered.extend_from_slice(&junk);
        let _ = d.decompress(&tampered, 4096);
        let _ = d.decompress(&junk, 4096);
    }

    #[test]
    fn http_heads_never_panic_and_valid_ones_keep_their_headers(
        junk in prop::collection::vec(any::<u8>(), 0..400),
        headers in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,30}"), 0..10),
    ) {
        let _ = parse_request_head(&junk, &HttpLimits::default());
        let mut raw = b"GET /x?y=1 HTTP/1.1\r\n".to_vec();
        for (name, value) in &headers {
            let name = if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding") { "X-Other" } else { name };
            raw.extend_from_slice(format!("{name}: {}\r\n", value.trim()).as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let head = parse_request_head(&raw, &HttpLimits::default()).unwrap().unwrap();
        prop_assert_eq!(head.headers.len(), headers.len());
        prop_assert_eq!(head.head_len, raw.len());
    }

    #[test]
    fn socketio_parsers_never_panic_and_acks_round_trip(s in any::<String>(), id in 0..=socketio::MAX_ACK_ID) {
        if let Ok(socketio::EnginePacket::Message(inner)) = socketio::parse_engine_packet(&s)
            && let Ok(p) = socketio::parse_socket_packet(inner)
        {
            let _ = socketio::decode_event(&p, &LIMITS);
        }
        let ack = socketio::encode_ack(id, &socketio::AckPayload::Published { seq: id });
        let Ok(socketio::EnginePacket::Message(inner)) = socketio::parse_engine_packet(&ack) else {
            return Err(TestCaseError::fail("ack is not a message packet"));
        };
        let packet = socketio::parse_socket_packet(inner).unwrap();
        prop_assert_eq!(packet.kind, socketio::PacketType::Ack);
        prop_assert_eq!(packet.ack_id, Some(id));
    }
}
