#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets into fuzz/corpus/<target>/.

    pip install zstandard msgpack   # once; both from PyPI
    python3 fuzz/make_corpus.py

Seeds are small, valid inputs and deliberate edge cases. Re-running overwrites the seeds named
here and leaves any other file (inputs a fuzzing run found and someone kept) alone. zstd output
may differ in its bytes between zstandard versions; the content does not.
"""

import io
import json
import os
import struct

import msgpack
import zstandard

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
MASK = bytes([0x37, 0xFA, 0x21, 0x3D])


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# http_head

UPGRADE = (
    "GET /ws?token=eyJhbGciOiJIUzI1NiJ9.e30.sig HTTP/1.1\r\n"
    "Host: chat.example.com\r\n"
    "Upgrade: websocket\r\n"
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Protocol: ringhub.msgpack, ringhub.json\r\n"
    "Origin: https://chat.example.com\r\n"
    "\r\n"
)
write("http_head", "upgrade_websocket.http", UPGRADE)
write(
    "http_head",
    "upgrade_socketio.http",
    "GET /socket.io/?EIO=4&transport=websocket&token=a%2Bb HTTP/1.1\r\n"
    "Host: localhost:8080\r\n"
    "Connection: keep-alive, Upgrade\r\n"
    "Upgrade: websocket\r\n"
    "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "\r\n",
)
write(
    "http_head",
    "post_json_with_body.http",
    "POST /api/rooms/lobby/publish HTTP/1.1\r\n"
    "Host: localhost\r\n"
    "Authorization: Bearer t0k3n\r\n"
    "Content-Type: application/json\r\n"
    "Content-Length: 15\r\n"
    "\r\n"
    '{"text":"hi!"}\n',
)
write(
    "http_head",
    "http10_keep_alive.http",
    "GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
)
write(
    "http_head",
    "pipelined_two_gets.http",
    "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n\r\n",
)
write("http_head", "incomplete_head.http", "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgr")
write(
    "http_head",
    "transfer_encoding_chunked.http",
    "POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
)
write(
    "http_head",
    "conflicting_content_length.http",
    "POST /api/x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
)
write(
    "http_head",
    "content_length_over_limit.http",
    "POST /api/x HTTP/1.1\r\nContent-Length: 999999999999999999999\r\n\r\n",
)
write("http_head", "bare_lf_line_endings.http", "GET /ws HTTP/1.1\nHost: a\nUpgrade: websocket\n\n")
write(
    "http_head",
    "too_many_headers.http",
    "GET / HTTP/1.1\r\n" + "".join(f"X-H{i}: {i}\r\n" for i in range(20)) + "\r\n",
)
write("http_head", "http2_preface.http", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
write(
    "http_head",
    "non_utf8_header_value.http",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nX-Name: caf\xe9\xff\r\n\r\n",
)

# ---------------------------------------------------------------------------------------------
# http_chunked: the bytes after a head with `Transfer-Encoding: chunked` (RFC 9112 §7.1)

write("http_chunked", "two_chunks.bin", "4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n")
write("http_chunked", "extensions.bin", "4;name=value;x\r\nWiki\r\n0;last\r\n\r\n")
write("http_chunked", "trailers.bin", "3\r\nabc\r\n0\r\nX-Checksum: 1\r\nX-More: 2\r\n\r\n")
write("http_chunked", "next_request_follows.bin", "1\r\na\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n")
write("http_chunked", "uppercase_hex_and_space.bin", "A \r\n0123456789\r\n0\r\n\r\n")
write("http_chunked", "empty_body.bin", "0\r\n\r\n")
write("http_chunked", "over_the_bound.bin", "401\r\n" + "x" * 16 + "\r\n")
write("http_chunked", "huge_size.bin", "ffffffffffffffffff\r\n")
write("http_chunked", "bare_lf.bin", "3\nabc\n0\n\n")
write("http_chunked", "data_longer_than_size.bin", "2\r\nabc\r\n0\r\n\r\n")
write("http_chunked", "not_hex.bin", "zz\r\nab\r\n")
write("http_chunked", "incomplete.bin", "5\r\nab")

# ---------------------------------------------------------------------------------------------
# ws_frame: client frames, masked (RFC 6455 §5.3)


def frame(opcode, payload, fin=True, mask=MASK, rsv=0):
    if isinstance(payload, str):
        payload = payload.encode()
    out = bytearray([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        out.append(bit | n)
    elif n < 1 << 16:
        out.append(bit | 126)
        out += struct.pack(">H", n)
    else:
        out.append(bit | 127)
        out += struct.pack(">Q", n)
    if mask is None:
        return bytes(out) + payload
    out += mask
    out += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out)


TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10

# RFC 6455 §5.7, byte for byte.
write("ws_frame", "rfc6455_masked_text_hello.bin", bytes.fromhex("818537fa213d7f9f4d5158"))
write(
    "ws_frame",
    "text_join_then_publish.bin",
    frame(TEXT, '{"op":"join","room":"lobby","id":1}')
    + frame(TEXT, '{"op":"publish","room":"lobby","id":2,"data":{"text":"hi"}}'),
)
write("ws_frame", "binary_300b_len16.bin", frame(BINARY, bytes(range(256)) + b"x" * 44))
write(
    "ws_frame",
    "fragmented_text_with_ping.bin",
    frame(TEXT, "Hel", fin=False) + frame(PING, "x") + frame(CONT, "lo"),
)
write(
    "ws_frame",
    "fragmented_utf8_split.bin",
    frame(TEXT, b"\xe2", fin=False) + frame(CONT, b"\x82", fin=False) + frame(CONT, b"\xac"),
)
write("ws_frame", "ping_then_pong.bin", frame(PING, "probe") + frame(PONG, "probe"))
write("ws_frame", "close_1000_reason.bin", frame(CLOSE, struct.pack(">H", 1000) + b"bye"))
write("ws_frame", "close_empty.bin", frame(CLOSE, b""))
write("ws_frame", "close_invalid_code_1005.bin", frame(CLOSE, struct.pack(">H", 1005)))
write("ws_frame", "unmasked_text.bin", frame(TEXT, "Hello", mask=None))
write("ws_frame", "rsv1_set_compressed.bin", frame(TEXT, "Hello", rsv=0x40))
write("ws_frame", "text_invalid_utf8.bin", frame(TEXT, b"a\xff"))
write(
    "ws_frame",
    "len64_huge_header.bin",
    bytes([0x82, 0xFF]) + struct.pack(">Q", (1 << 63) - 1) + MASK,
)
write("ws_frame", "truncated_frame.bin", frame(BINARY, b"0123456789")[:9])

# ---------------------------------------------------------------------------------------------
# envelope_json / envelope_msgpack: the same requests in both formats

VALID = {
    "join": {"op": "join", "room": "lobby", "id": 1},
    "leave": {"op": "leave", "room": "team.chat@2026:x_y-z", "id": 2},
    "publish": {
        "op": "publish",
        "room": "lobby",
        "id": 3,
        "data": {"text": "hello <b>world</b>", "n": -3, "f": 1.5, "ok": True, "tags": ["a", None]},
    },
    "presence": {"op": "presence", "room": "user:u1"},
    "history": {"op": "history", "room": "lobby", "since": 42, "limit": 100, "id": 5},
    "resume": {
        "op": "resume",
        "session": "c_9f2b",
        "rooms": {"lobby": {"seq": 7, "epoch": "e1"}, "user:u1": {"seq": 0, "epoch": "e2"}},
        "id": 6,
    },
    "refresh": {"op": "refresh", "token": "eyJhbGciOiJIUzI1NiJ9.e30.sig", "id": 7},
    "ping": {"op": "ping", "id": 9007199254740991},
}
INVALID = {
    "unknown_op": {"op": "dance", "id": 4},
    "bad_room_id": {"op": "join", "room": "-bad room", "id": 3},
    "history_limit_101": {"op": "history", "room": "a", "limit": 101},
    "deep_data": {"op": "publish", "room": "a", "data": json.loads("[" * 40 + "]" * 40)},
}
# Valid: C0 controls other than tab, CR and LF are stripped from keys and strings.
VALID["publish_c0_controls"] = {
    "op": "publish",
    "room": "a",
    "data": {"k\u0001": "hi\u0007\u001b[31m\t\r\n"},
}

for name, msg in VALID.items():
    write("envelope_json", f"{name}.json", json.dumps(msg, separators=(",", ":")))
    write("envelope_msgpack", f"{name}.msgpack", msgpack.packb(msg))
for name, msg in INVALID.items():
    write("envelope_json", f"invalid_{name}.json", json.dumps(msg, separators=(",", ":")))
    if name != "history_limit_101":  # same check in both formats; keeps the seed count at 15
        write("envelope_msgpack", f"invalid_{name}.msgpack", msgpack.packb(msg))

write("envelope_json", "invalid_trailing_bytes.json", '{"op":"ping"} x')
write("envelope_json", "invalid_duplicate_op.json", '{"op":"ping","op":"join","room":"a"}')

PUBLISH_HEAD = msgpack.packb("op") + msgpack.packb("publish") + msgpack.packb("room") + b"\xa1a"
write(
    "envelope_msgpack",
    "invalid_bin_data.msgpack",
    b"\x83" + PUBLISH_HEAD + msgpack.packb("data") + msgpack.packb(b"\x00\x01", use_bin_type=True),
)
write(
    "envelope_msgpack",
    "invalid_huge_array_header.msgpack",
    b"\x83" + PUBLISH_HEAD + msgpack.packb("data") + b"\xdd\xff\xff\xff\xff",
)
write(
    "envelope_msgpack",
    "invalid_ext_then_int_key.msgpack",
    b"\x83"
    + PUBLISH_HEAD
    + msgpack.packb("data")
    + b"\x82\xa1e"
    + msgpack.packb(msgpack.ExtType(1, b"\x00" * 4))
    + b"\x01\xc0",
)

# ---------------------------------------------------------------------------------------------
# zstd: one frame per message

PUBLISH_JSON = json.dumps(VALID["publish"], separators=(",", ":")).encode()
CHATTY = json.dumps(
    {
        "op": "message",
        "room": "lobby",
        "seq": 7,
        "from": "u1",
        "name": "alice",
        "ts": 1700000000000,
        "data": {"text": "hello hello hello hello, the quick brown fox " * 8},
    },
    separators=(",", ":"),
).encode()


def zstd_no_size(data, level=3, checksum=False):
    buf = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=False, write_checksum=checksum)
    with cctx.stream_writer(buf, closefd=False) as w:
        w.write(data)
    return buf.getvalue()


write("zstd", "json_publish_level3.zst", zstandard.ZstdCompressor(level=3).compress(PUBLISH_JSON))
write("zstd", "json_message_no_content_size.zst", zstd_no_size(CHATTY))
write(
    "zstd",
    "json_message_with_checksum.zst",
    zstandard.ZstdCompressor(level=1, write_checksum=True).compress(CHATTY),
)
write("zstd", "msgpack_publish.zst", zstandard.ZstdCompressor(level=3).compress(msgpack.packb(VALID["publish"])))
write("zstd", "empty_content.zst", zstandard.ZstdCompressor().compress(b""))
# Frame header (single segment, 1-byte content size 5) and one raw last block: stored "hello".
write("zstd", "raw_block_hello.zst", bytes.fromhex("28b52ffd2005") + bytes([0x29, 0x00, 0x00]) + b"hello")
write("zstd", "bomb_1mib_zeros_no_size.zst", zstd_no_size(bytes(1 << 20), level=19))
write("zstd", "declares_1mib_content.zst", zstandard.ZstdCompressor(level=19).compress(bytes(1 << 20)))
two = zstandard.ZstdCompressor().compress(b"a")
write("zstd", "two_frames_trailing.zst", two + two)
write("zstd", "truncated_frame.zst", zstandard.ZstdCompressor().compress(CHATTY)[:-3])
write("zstd", "skippable_frame.zst", bytes.fromhex("50 2a 4d 18") + struct.pack("<I", 3) + b"abc")

# ---------------------------------------------------------------------------------------------
# socketio: one Engine.IO packet per WebSocket text message

for name, text in {
    "engine_open.txt": '0{"sid":"x","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":65536}',
    "engine_ping_probe.txt": "2probe",
    "engine_pong.txt": "3",
    "connect_plain.txt": "40",
    "connect_token.txt": '40{"token":"x"}',
    "event_join.txt": '42["join",{"room_id":"lobby"}]',
    "event_message_ack1.txt": '421["message",{"room_id":"a","message":"hi"}]',
    "event_leave_ack17_explicit_ns.txt": '42/,17["leave",{"room_id":"lobby"}]',
    "event_presence_ack_max.txt": '429007199254740991["presence",{"room_id":"user:u1"}]',
    "event_message_nested.txt": '423["message",{"room_id":"a","message":{"text":"x","tags":[1,2.5,null,true]}}]',
    "ack_ok.txt": '437[{"ok":true}]',
    "event_unknown_name.txt": '42["dance",{}]',
    "other_namespace.txt": '42/admin,1["join",{"room_id":"a"}]',
    "binary_event.txt": '451-["message",{"_placeholder":true,"num":0}]',
    "ack_id_too_large.txt": '4299999999999999999999["join",{"room_id":"a"}]',
}.items():
    write("socketio", name, text)

for target in sorted(os.listdir(ROOT)):
    print(f"{target}: {len(os.listdir(os.path.join(ROOT, target)))} files")
