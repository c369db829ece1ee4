// An unmodified socket.io-client (v4) for ringhub's black-box tests: same steps as sio_python.py.
const { io } = require("socket.io-client");

const { URL: url, TOKEN: token, ROOM: room } = process.env;
const seen = [];
const socket = io(url, { transports: ["websocket"], auth: { token }, reconnection: false });
const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: "timeout", received: seen }));
  process.exit(1);
}, 15000);

socket.on("connect_error", (err) => {
  console.log(JSON.stringify({ error: err.message }));
  process.exit(1);
});
socket.on("message", (data) => {
  seen.push(data);
  if (data.message === "from native") {
    clearTimeout(timer);
    socket.disconnect();
    console.log(JSON.stringify({ joined, published, received: seen }));
    process.exit(0);
  }
});
let joined;
let published;
socket.on("connect", async () => {
  joined = await socket.emitWithAck("join", { room_id: room });
  console.log("JOINED " + JSON.stringify(joined));
  published = await socket.emitWithAck("message", { room_id: room, message: "from node" });
});
