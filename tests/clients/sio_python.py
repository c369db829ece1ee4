"""An unmodified python-socketio client for ringhub's black-box tests.

Connects over WebSocket with the token in the CONNECT auth payload, joins ROOM, prints JOINED,
emits one message and one custom event (`cheer`) with acks, waits for a message and a custom
event (`wave`) from the native client, and prints a JSON summary line. Exits non-zero on any
failure or after 15 s.
"""
import json
import os
import sys
import threading

import socketio

url, token, room = os.environ["URL"], os.environ["TOKEN"], os.environ["ROOM"]
got = threading.Event()
waved = threading.Event()
seen = []
events = []
sio = socketio.Client(reconnection=False)


@sio.on("message")
def on_message(data):
    seen.append(data)
    if data.get("message") == "from native":
        got.set()


@sio.on("wave")
def on_wave(data):
    events.append(data)
    waved.set()


sio.connect(url, auth={"token": token}, transports=["websocket"], wait_timeout=10)
joined = sio.call("join", {"room_id": room}, timeout=10)
print("JOINED", json.dumps(joined), flush=True)
published = sio.call("message", {"room_id": room, "message": "from python"}, timeout=10)
cheered = sio.call("cheer", {"room_id": room, "level": 3}, timeout=10)
ok = got.wait(15) and waved.wait(15)
summary = {"joined": joined, "published": published, "cheered": cheered, "received": seen}
summary["events"] = events
print(json.dumps(summary), flush=True)
sio.disconnect()
sys.exit(0 if ok else 1)
