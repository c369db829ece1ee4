//! Micro-benchmarks of the wire codecs on the hot path of a chat message:
//!
//! - `envelope/decode_publish/<format>/<payload>`: a client `publish` request decoded from JSON or
//!   MessagePack (`decode_request`), and `envelope/decode_publish_zstd/...` the same after zstd
//!   decompression of its frame (`Decompressor::decompress` + `decode_request`);
//! - `envelope/encode_message/<format>/<payload>`: the server `message` push encoded once per
//!   broadcast (`encode_push`), and `envelope/encode_message_zstd/...` followed by zstd compression
//!   at `DEFAULT_LEVEL` (`Compressor::compress`);
//! - `ws/encode_frame/<size>`: an unmasked server frame (`frame_bytes`);
//! - `ws/decode_frame/<text|binary>/<size>`: a masked client frame (`MessageDecoder::decode`, which
//!   unmasks in place, so each iteration gets a fresh copy of the input, outside the timing).
//!
//! Payloads: `64B` and `4KiB` are a `data` map `{"text": <string of that many bytes>}` of
//! word-like text (so that zstd sees realistic redundancy, not one repeated byte); `chat` is a
//! realistic message with a few fields. Throughput is in bytes of the uncompressed envelope
//! (decode: the request; encode: the push), so compressed and plain variants compare directly.
//!
//! Run: `cargo bench -p ringhub-benches --bench codec -- --warm-up-time 1 --measurement-time 3`.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use protocol::compression::{Compressor, DEFAULT_LEVEL, Decompressor};
use protocol::envelope::{
    DecodeLimits, Format, MessageRecord, Op, Push, Request, RoomId, Value, decode_request,
    encode_push, encode_request,
};
use protocol::ws::frame::{BINARY, TEXT};
use protocol::ws::{MessageDecoder, encode_masked_frame, frame_bytes};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Deterministic word-like ASCII text of exactly `len` bytes.
fn text(len: usize) -> String {
    const WORDS: [&str; 24] = [
        "hello", "the", "room", "is", "quiet", "today", "meet", "at", "noon", "by", "window",
        "ship", "it", "after", "review", "thanks", "see", "you", "soon", "lunch", "deploy",
        "green", "build", "ok",
    ];
    let mut state: u32 = 0x2545_f491;
    let mut out = String::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        out.push_str(WORDS[(state >> 16) as usize % WORDS.len()]);
        out.push(' ');
    }
    out.truncate(len);
    out
}

/// The benchmarked payloads: (label, `data`).
fn payloads() -> Vec<(&'static str, Value)> {
    let chat = Value::map([
        (
            "text",
            Value::str("on my way, be there in 10 — grab a table by the window?"),
        ),
        ("client_id", Value::str("m_01J9ZQ8W6X3T")),
        (
            "mentions",
            Value::Array(vec![Value::str("u_42"), Value::str("u_77")]),
        ),
        ("reply_to", Value::UInt(18_231)),
        ("edited", Value::Bool(false)),
    ]);
    vec![
        ("64B", Value::map([("text", Value::Str(text(64)))])),
        ("4KiB", Value::map([("text", Value::Str(text(4096)))])),
        ("chat", chat),
    ]
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::MsgPack => "msgpack",
    }
}

fn bytes_of(len: usize) -> Throughput {
    Throughput::Bytes(len as u64)
}

fn envelope_decode(c: &mut Criterion) {
    let limits = DecodeLimits::default();
    let room = RoomId::parse("lobby").unwrap();
    let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
    let mut decompressor = Decompressor::new().unwrap();

    let mut plain = c.benchmark_group("envelope/decode_publish");
    for (label, data) in payloads() {
        let request = Request {
            id: Some(42),
            op: Op::Publish {
                room: room.clone(),
                data,
                event: None,
            },
        };
        for format in Format::ALL {
            let wire = encode_request(&request, format);
            assert_eq!(decode_request(&wire, format, &limits).unwrap(), request);
            plain.throughput(bytes_of(wire.len()));
            plain.bench_function(format!("{}/{label}", format_name(format)), |b| {
                b.iter(|| decode_request(black_box(&wire), format, &limits).unwrap());
            });
        }
    }
    plain.finish();

    let mut zstd = c.benchmark_group("envelope/decode_publish_zstd");
    for (label, data) in payloads() {
        let request = Request {
            id: Some(42),
            op: Op::Publish {
                room: room.clone(),
                data,
                event: None,
            },
        };
        for format in Format::ALL {
            let wire = encode_request(&request, format);
            let frame = compressor.compress(&wire).unwrap();
            let max = limits.max_message_bytes;
            zstd.throughput(bytes_of(wire.len()));
            zstd.bench_function(format!("{}/{label}", format_name(format)), |b| {
                b.iter(|| {
                    let bytes = decompressor.decompress(black_box(&frame), max).unwrap();
                    decode_request(&bytes, format, &limits).unwrap()
                });
            });
        }
    }
    zstd.finish();
}

fn envelope_encode(c: &mut Criterion) {
    let mut compressor = Compressor::new(DEFAULT_LEVEL).unwrap();
    let records: Vec<(&str, MessageRecord)> = payloads()
        .into_iter()
        .map(|(label, data)| {
            let record = MessageRecord {
                room: RoomId::parse("lobby").unwrap(),
                seq: 1_048_577,
                from: Some("u_42".to_owned()),
                name: "alice".to_owned(),
                ts: 1_767_225_600_000,
                data,
                event: None,
            };
            (label, record)
        })
        .collect();

    let mut plain = c.benchmark_group("envelope/encode_message");
    for (label, record) in &records {
        for format in Format::ALL {
            let len = encode_push(&Push::Message(record), format).unwrap().len();
            plain.throughput(bytes_of(len));
            plain.bench_function(format!("{}/{label}", format_name(format)), |b| {
                b.iter(|| encode_push(&Push::Message(black_box(record)), format).unwrap());
            });
        }
    }
    plain.finish();

    let mut zstd = c.benchmark_group("envelope/encode_message_zstd");
    for (label, record) in &records {
        for format in Format::ALL {
            let len = encode_push(&Push::Message(record), format).unwrap().len();
            zstd.throughput(bytes_of(len));
            zstd.bench_function(format!("{}/{label}", format_name(format)), |b| {
                b.iter(|| {
                    let bytes = encode_push(&Push::Message(black_box(record)), format).unwrap();
                    compressor.compress(&bytes).unwrap()
                });
            });
        }
    }
    zstd.finish();
}

fn ws_frames(c: &mut Criterion) {
    let sizes = [("64B", text(64)), ("4KiB", text(4096))];

    let mut encode = c.benchmark_group("ws/encode_frame");
    for (label, payload) in &sizes {
        let payload = payload.as_bytes();
        encode.throughput(bytes_of(payload.len()));
        encode.bench_function(*label, |b| {
            b.iter(|| frame_bytes(TEXT, black_box(payload)));
        });
    }
    encode.finish();

    let mut decode = c.benchmark_group("ws/decode_frame");
    for (label, payload) in &sizes {
        for (kind, opcode) in [("text", TEXT), ("binary", BINARY)] {
            let mut wire = Vec::new();
            encode_masked_frame(&mut wire, opcode, true, payload.as_bytes(), MASK);
            let mut decoder = MessageDecoder::new();
            {
                let mut check = wire.clone();
                let decoded = decoder.decode(&mut check, 65_536).unwrap();
                assert_eq!(decoded.consumed, wire.len());
                assert!(decoded.message.is_some());
            }
            decode.throughput(bytes_of(payload.len()));
            decode.bench_function(format!("{kind}/{label}"), |b| {
                // Decoding unmasks in place: every iteration gets a fresh masked copy, made
                // outside the measured time.
                b.iter_batched_ref(
                    || wire.clone(),
                    |buf| {
                        let decoded = decoder.decode(buf, 65_536).unwrap();
                        black_box(decoded.message.is_some())
                    },
                    BatchSize::SmallInput,
                );
            });
        }
    }
    decode.finish();
}

criterion_group!(benches, envelope_decode, envelope_encode, ws_frames);
criterion_main!(benches);
