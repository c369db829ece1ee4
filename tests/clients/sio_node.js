// An unmodified socket.io-client (v4) for ringhub's black-box tests: same steps as sio_python.py.
const { io } = require("socket.io-client");

const { URL: url, TOKEN: token, ROOM: room } = process.env;
const seen = [];
const events = [];
const socket = io(url, { transports: ["websocket"], auth: { token }, reconnection: false });
const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: "timeout", received: seen, events }));
  process.exit(1);
}, 15000);

let gotMessage = false;
let gotEvent = false;
function maybeDone() {
  if (!(gotMessage && gotEvent && cheered !== undefined)) return;
  clearTimeout(timer);
  socket.disconnect();
  console.log(JSON.stringify({ joined, published, cheered, received: seen, events }));
  process.exit(0);
}

socket.on("connect_error", (err) => {
  console.log(JSON.stringify({ error: err.message }));
  process.exit(1);
});
socket.on("message", (data) => {
  seen.push(data);
  if (data.message === "from native") {
    gotMessage = true;
    maybeDone();
  }
});
// A custom event published by the native client (`publish` with `event: "wave"`).
socket.on("wave", (data) => {
  events.push(data);
  gotEvent = true;
  maybeDone();
});
let joined;
let published;
let cheered;
socket.on("connect", async () => {
  joined = await socket.emitWithAck("join", { room_id: room });
  console.log("JOINED " + JSON.stringify(joined));
  published = await socket.emitWithAck("message", { room_id: room, message: "from node" });
  cheered = await socket.emitWithAck("cheer", { room_id: room, level: 3 });
  maybeDone();
});
