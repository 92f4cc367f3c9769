// Unit tests of the JavaScript client library (src/chatd/web/chatd.js) with
// node's own test runner: `node --test tests/js/`. The WebSocket is a
// scripted stand-in for the platform's class (the library takes it as an
// option), so the tests decide when a socket opens, what it receives and
// when it drops; the timers and the clock are node's mock timers.
// The library against a real chatd: chatd_live.test.mjs.

import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";

import {
  backoffDelay,
  ChatClient,
  ClosedError,
  mayReconnect,
  MsgpackError,
  newCid,
  msgpackDecode,
  msgpackEncode,
  SendError,
  STATE,
  wsUrlFor,
} from "../../src/chatd/web/chatd.js";

/** A WebSocket class whose instances the test drives; `sockets` lists them in order. */
function scriptedSockets() {
  const sockets = [];
  class ScriptedSocket {
    constructor(url) {
      this.url = url;
      this.sent = [];
      this.closedWith = null;
      this.kinds = []; // "text" or "binary", one per frame sent
      this.binaryType = "blob"; // the platform's default
      sockets.push(this);
    }
    send(data) {
      this.kinds.push(typeof data === "string" ? "text" : "binary");
      this.sent.push(typeof data === "string" ? JSON.parse(data) : msgpackDecode(data));
    }
    close(code, reason) { this.closedWith = { code, reason }; }
    // the test's side
    open() { this.onopen({}); }
    receive(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
    /** A binary frame, as a browser delivers it with binaryType "arraybuffer". */
    receiveBinary(frame) { this.onmessage({ data: msgpackEncode(frame).buffer }); }
    drop(code = 1006, reason = "") { this.onclose({ code, reason }); }
    params() { return Object.fromEntries(new URL(this.url).searchParams); }
  }
  return { ScriptedSocket, sockets };
}

function client(WebSocket, extra = {}) {
  return new ChatClient({
    url: "ws://chat.example:8080/chat", uid: 7, token: "7.99.0.sig", WebSocket,
    random: () => 0.5, ...extra,
  });
}

function events(target, type) {
  const got = [];
  target.addEventListener(type, (ev) => got.push(ev.detail));
  return got;
}

beforeEach(() => mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] }));
afterEach(() => mock.timers.reset());

test("messages written before connecting wait and go out in order, each with a cid", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  chat.sendText(2, "one");
  chat.sendText(2, "two");
  chat.sendText(5, "three", { group: true });
  assert.equal(chat.pending, 3);
  assert.equal(sockets.length, 0);
  chat.start();
  assert.equal(sockets.length, 1);
  assert.deepEqual(sockets[0].params(), { id: "7", token: "7.99.0.sig", last: "0" });
  assert.equal(sockets[0].sent.length, 0, "nothing is written before the socket opens");
  sockets[0].open();
  const sent = sockets[0].sent;
  assert.deepEqual(sent.map((m) => [m.cmd, m.dstid, m.content]),
    [[10, 2, "one"], [10, 2, "two"], [11, 5, "three"]]);
  assert.equal(new Set(sent.map((m) => m.cid)).size, 3);
  for (const m of sent) assert.match(m.cid, /^[0-9a-f]{32}$/);
});

test("the ack resolves the send, moves the resume point and empties the queue", async () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  chat.start();
  sockets[0].open();
  const sending = chat.sendText(2, "hi", { cid: "c1" });
  assert.equal(sockets[0].sent[0].cid, "c1");
  sockets[0].receive({ cmd: 1, id: 41, cid: "c1", ts: 1000 });
  assert.deepEqual(await sending, { cmd: 1, id: 41, cid: "c1", ts: 1000 });
  assert.equal(chat.last, 41);
  assert.equal(chat.pending, 0);
});

test("an error frame rejects its send; 500 and 503 send it again later, same cid", async () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { minBackoffMs: 100 });
  chat.start();
  sockets[0].open();
  const refused = chat.sendText(999, "to nobody", { cid: "bad" });
  const busy = chat.sendText(2, "later", { cid: "busy" });
  sockets[0].receive({ cmd: 5, amount: 404, memo: "no such user", cid: "bad" });
  await assert.rejects(refused, (err) => err instanceof SendError && err.code === 404
    && err.message === "no such user" && err.cid === "bad");
  sockets[0].receive({ cmd: 5, amount: 503, memo: "server busy", cid: "busy" });
  assert.equal(chat.pending, 1);
  assert.equal(sockets[0].sent.length, 2);
  mock.timers.tick(100); // backoffDelay(0, 100, ...) with random 0.5 is 75 ms
  assert.deepEqual(sockets[0].sent.map((m) => m.cid), ["bad", "busy", "busy"]);
  sockets[0].receive({ cmd: 1, id: 3, cid: "busy" });
  assert.equal((await busy).id, 3);
  // an error frame about no pending send is an event, not a crash
  const errors = events(chat, "error");
  sockets[0].receive({ cmd: 5, amount: 422, memo: "unknown cmd" });
  assert.deepEqual(errors, [{ error: { cmd: 5, amount: 422, memo: "unknown cmd" } }]);
});

test("a dropped connection comes back with last= and sends the unacked again, in order", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { minBackoffMs: 1000 });
  const states = events(chat, "state");
  chat.start();
  sockets[0].open();
  for (const c of ["a", "b", "c"]) chat.sendText(2, c, { cid: c });
  sockets[0].receive({ cmd: 10, id: 50, userid: 2, dstid: 7, media: 1, content: "hey" });
  sockets[0].receive({ cmd: 1, id: 51, cid: "a" });
  sockets[0].drop(1001, "server going away");
  assert.equal(chat.state, STATE.WAITING);
  assert.deepEqual(states.at(-1), { state: "waiting", attempt: 1, delayMs: 750, code: 1001,
    reason: "server going away" });
  chat.sendText(2, "d", { cid: "d" }); // written while disconnected
  mock.timers.tick(749);
  assert.equal(sockets.length, 1, "the backoff is waited out");
  mock.timers.tick(1);
  assert.equal(sockets.length, 2);
  assert.equal(sockets[1].params().last, "51");
  sockets[1].open();
  assert.deepEqual(sockets[1].sent.map((m) => m.cid), ["b", "c", "d"]);
});

test("a message that comes twice (replayed after a reconnect) is delivered once", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  const got = events(chat, "message");
  chat.start();
  sockets[0].open();
  const m = { cmd: 11, id: 9, userid: 3, dstid: 4, media: 1, content: "x" };
  sockets[0].receive(m);
  sockets[0].drop();
  mock.timers.tick(1000);
  sockets[1].open();
  sockets[1].receive(m);
  sockets[1].receive({ ...m, id: 10 });
  assert.deepEqual(got.map((d) => d.message.id), [9, 10]);
});

test("backoff doubles up to the cap with jitter, and resets after a whole replay", () => {
  for (let attempt = 0; attempt < 12; attempt += 1) {
    const cap = Math.min(30_000, 500 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, 500, 30_000, () => 0), cap / 2);
    assert.equal(backoffDelay(attempt, 500, 30_000, () => 0.999999), cap / 2 + 0.999999 * cap / 2);
  }
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { minBackoffMs: 100, maxBackoffMs: 1000, random: () => 0 });
  const states = events(chat, "state");
  chat.start();
  for (let i = 0; i < 6; i += 1) {
    sockets.at(-1).drop(); // refused: never opened
    mock.timers.tick(states.at(-1).delayMs);
  }
  const delays = states.filter((s) => s.state === "waiting").map((s) => s.delayMs);
  assert.deepEqual(delays, [50, 100, 200, 400, 500, 500]);
  sockets.at(-1).open();
  sockets.at(-1).receive({ cmd: 4, id: 0 });
  sockets.at(-1).drop();
  assert.equal(states.at(-1).delayMs, 50, "a connection that worked starts the backoff again");
});

test("a heartbeat (cmd 0) goes out after heartbeatMs without sending", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { heartbeatMs: 30_000 });
  chat.start();
  sockets[0].open();
  mock.timers.tick(29_999);
  assert.deepEqual(sockets[0].sent, []);
  mock.timers.tick(1);
  assert.deepEqual(sockets[0].sent, [{ cmd: 0 }]);
  mock.timers.tick(20_000);
  chat.sendText(2, "x", { cid: "x" }); // a message resets the clock
  sockets[0].receive({ cmd: 1, id: 1, cid: "x" });
  mock.timers.tick(29_999);
  assert.equal(sockets[0].sent.length, 2);
  mock.timers.tick(1);
  assert.deepEqual(sockets[0].sent.at(-1), { cmd: 0 });
});

test("a connection silent past ackTimeoutMs with a message in flight is replaced", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { ackTimeoutMs: 4000, minBackoffMs: 100 });
  chat.start();
  sockets[0].open();
  chat.sendText(2, "lost?", { cid: "q" });
  mock.timers.tick(3000);
  assert.equal(sockets[0].closedWith, null);
  mock.timers.tick(1000);
  assert.deepEqual(sockets[0].closedWith, { code: 4000, reason: "no ack" });
  assert.equal(chat.state, STATE.WAITING);
  sockets[0].drop(4000); // the old socket's late close changes nothing
  mock.timers.tick(100);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent.map((m) => m.cid), ["q"]);
});

test("frames keep a connection alive while its acks wait behind a replay", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { ackTimeoutMs: 4000 });
  chat.start();
  sockets[0].open();
  chat.sendText(2, "mine", { cid: "m" });
  for (let id = 1; id <= 10; id += 1) {
    mock.timers.tick(1000);
    sockets[0].receive({ cmd: 10, id, userid: 2, dstid: 7, media: 1, content: "old" });
  }
  assert.equal(sockets[0].closedWith, null);
  assert.equal(sockets.length, 1);
});

test("close codes 4500-4999 are final: no reconnect, pending sends reject", async () => {
  assert.equal(mayReconnect(4501), false);
  assert.equal(mayReconnect(4502), false);
  assert.equal(mayReconnect(4009), true);
  assert.equal(mayReconnect(1001), true);
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  const fatal = events(chat, "fatal");
  chat.start();
  sockets[0].open();
  const sending = chat.sendText(2, "x", { cid: "x" });
  sockets[0].drop(4501, "token revoked");
  await assert.rejects(sending, (err) => err instanceof ClosedError && err.code === 4501);
  assert.equal(chat.state, STATE.CLOSED);
  assert.deepEqual(fatal.map((f) => [f.code, f.unsent.map((m) => m.cid)]), [[4501, ["x"]]]);
  mock.timers.tick(120_000);
  assert.equal(sockets.length, 1);
  await assert.rejects(chat.sendText(2, "y"), ClosedError);
});

test("close() stops for good and rejects what is pending", async () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  chat.start();
  sockets[0].open();
  const sending = chat.sendText(2, "x", { cid: "x" });
  chat.close();
  assert.deepEqual(sockets[0].closedWith, { code: 1000, reason: "bye" });
  await assert.rejects(sending, ClosedError);
  assert.deepEqual(chat.pendingMessages().map((m) => m.cid), ["x"]);
  sockets[0].drop(1000);
  mock.timers.tick(60_000);
  assert.equal(sockets.length, 1);
  assert.equal(chat.state, STATE.CLOSED);
});

test("close() while waiting out the backoff cancels the reconnect", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  chat.start();
  sockets[0].drop();
  assert.equal(chat.state, STATE.WAITING);
  chat.close();
  mock.timers.tick(60_000);
  assert.equal(sockets.length, 1);
  assert.equal(chat.state, STATE.CLOSED);
  chat.reconnectNow();
  assert.equal(sockets.length, 1);
});

test("the same cid while pending is the same send; bad cids are refused", async () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  const first = chat.sendText(2, "x", { cid: "same" });
  assert.equal(chat.sendText(2, "x", { cid: "same" }), first);
  assert.equal(chat.pending, 1);
  await assert.rejects(chat.send({ cmd: 10, dstid: 2, media: 1, content: "x",
    cid: "c".repeat(65) }), TypeError);
  chat.start();
  sockets[0].open();
  assert.equal(sockets[0].sent.length, 1);
});

test("the websocket URL is the page's host name on the chat port", () => {
  assert.equal(wsUrlFor({ protocol: "http:", hostname: "chat.example" }, 8080),
    "ws://chat.example:8080/chat");
  assert.equal(wsUrlFor({ protocol: "https:", hostname: "[::1]" }, 9000),
    "wss://[::1]:9000/chat");
  assert.throws(() => new ChatClient({ url: "ws://x/chat", uid: 1 }), TypeError);
});

// --- MessagePack ----------------------------------------------------------------------

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const fromHex = (text) => new Uint8Array(Buffer.from(text, "hex"));

test("ints go out in the smallest form and come back equal, at every boundary", () => {
  const cases = [
    [0, "00"], [1, "01"], [127, "7f"], [128, "cc80"], [255, "ccff"], [256, "cd0100"],
    [65535, "cdffff"], [65536, "ce00010000"], [2 ** 32 - 1, "ceffffffff"],
    [2 ** 32, "cf0000000100000000"], [2 ** 53 - 1, "cf001fffffffffffff"],
    [-1, "ff"], [-32, "e0"], [-33, "d0df"], [-128, "d080"], [-129, "d1ff7f"],
    [-32768, "d18000"], [-32769, "d2ffff7fff"], [-(2 ** 31), "d280000000"],
    [-(2 ** 31) - 1, "d3ffffffff7fffffff"], [-(2 ** 53 - 1), "d3ffe0000000000001"],
  ];
  for (const [n, bytes] of cases) {
    assert.equal(hex(msgpackEncode(n)), bytes, `encode ${n}`);
    assert.equal(msgpackDecode(fromHex(bytes)), n, `decode ${bytes}`);
    // a BigInt of the same value has the same form, and decodes as a Number
    assert.equal(hex(msgpackEncode(BigInt(n))), bytes, `encode ${n}n`);
  }
  // every int form decodes, the wider ones too, whatever the writer chose
  for (const [bytes, n] of [["cc05", 5], ["cd0005", 5], ["ce00000005", 5],
    ["cf0000000000000005", 5], ["d0fb", -5], ["d1fffb", -5], ["d2fffffffb", -5],
    ["d3fffffffffffffffb", -5], ["d005", 5]]) {
    assert.equal(msgpackDecode(fromHex(bytes)), n, bytes);
  }
});

test("ints past 2^53 decode as BigInt, never rounded; int64/uint64 are the limits", () => {
  for (const b of [2n ** 53n, 2n ** 53n + 1n, 2n ** 63n - 1n, 2n ** 64n - 1n,
    -(2n ** 53n), -(2n ** 53n) - 1n, -(2n ** 63n)]) {
    const back = msgpackDecode(msgpackEncode(b));
    assert.equal(typeof back, "bigint", String(b));
    assert.equal(back, b);
  }
  assert.equal(hex(msgpackEncode(2n ** 64n - 1n)), "cfffffffffffffffff");
  assert.equal(hex(msgpackEncode(-(2n ** 63n))), "d38000000000000000");
  assert.throws(() => msgpackEncode(2n ** 64n), MsgpackError);
  assert.throws(() => msgpackEncode(-(2n ** 63n) - 1n), MsgpackError);
  // a Number integer past 2^53 goes out as the exact int the double holds
  assert.equal(msgpackDecode(msgpackEncode(2 ** 60)), 2n ** 60n);
  // Numbers that are not ints are float64; float32 decodes too
  assert.equal(hex(msgpackEncode(1.5)), "cb3ff8000000000000");
  assert.equal(msgpackDecode(fromHex("ca3fc00000")), 1.5);
  assert.equal(msgpackDecode(msgpackEncode(2 ** 64)), 2 ** 64);
  assert.ok(Number.isNaN(msgpackDecode(msgpackEncode(NaN))));
});

test("strings round trip as utf-8 in every str form, unicode included", () => {
  for (const [bytes, head] of [[0, "a0"], [31, "bf"], [32, "d920"], [255, "d9ff"],
    [256, "da0100"], [65535, "daffff"], [65536, "db00010000"], [70_000, "db00011170"]]) {
    const text = "x".repeat(bytes);
    const encoded = msgpackEncode(text);
    assert.equal(hex(encoded.subarray(0, head.length / 2)), head, `${bytes} bytes`);
    assert.equal(encoded.length, head.length / 2 + bytes);
    assert.equal(msgpackDecode(encoded), text);
  }
  // lengths count utf-8 bytes, not characters: 8 emoji are 32 bytes, a str8
  const emoji = "😀".repeat(8);
  assert.equal(hex(msgpackEncode(emoji).subarray(0, 2)), "d920");
  for (const text of ["é", "héllo 😀", "中文字符", "👩‍👩‍👧", "é".repeat(200), "中".repeat(30_000),
    "a\u0000b", ""]) {
    assert.equal(msgpackDecode(msgpackEncode(text)), text);
  }
  assert.equal(msgpackDecode(fromHex("a568c3a96c6c")), "héll");
});

test("nil, bools, bin, arrays and maps in each of their forms", () => {
  assert.equal(hex(msgpackEncode(null)), "c0");
  assert.equal(hex(msgpackEncode(true)), "c3");
  assert.equal(hex(msgpackEncode(false)), "c2");
  assert.equal(msgpackDecode(fromHex("c0")), null);
  assert.equal(msgpackDecode(fromHex("c3")), true);
  assert.equal(msgpackDecode(fromHex("c2")), false);
  for (const [n, head] of [[0, "c400"], [255, "c4ff"], [256, "c50100"], [65536, "c600010000"]]) {
    const bytes = new Uint8Array(n).map((_, i) => i % 251);
    const encoded = msgpackEncode(bytes);
    assert.equal(hex(encoded.subarray(0, head.length / 2)), head);
    assert.deepEqual(msgpackDecode(encoded), bytes);
  }
  for (const [n, head] of [[0, "90"], [15, "9f"], [16, "dc0010"], [65536, "dd00010000"]]) {
    const list = Array.from({ length: n }, (_, i) => i);
    const encoded = msgpackEncode(list);
    assert.equal(hex(encoded.subarray(0, head.length / 2)), head);
    assert.deepEqual(msgpackDecode(encoded), list);
  }
  for (const [n, head] of [[0, "80"], [15, "8f"], [16, "de0010"], [65536, "df00010000"]]) {
    const map = Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, i]));
    const encoded = msgpackEncode(map);
    assert.equal(hex(encoded.subarray(0, head.length / 2)), head);
    assert.deepEqual(msgpackDecode(encoded), map);
  }
  const nested = { a: [1, "two", { three: [null, true, -4.25] }], b: {} };
  assert.deepEqual(msgpackDecode(msgpackEncode(nested)), nested);
  // a property that is undefined is left out, as JSON.stringify does
  assert.deepEqual(msgpackDecode(msgpackEncode({ cmd: 10, cid: undefined })), { cmd: 10 });
  // "__proto__" is an own key, not the object's prototype
  const tricky = msgpackDecode(msgpackEncode(JSON.parse('{"__proto__": {"polluted": 1}}')));
  assert.equal(tricky.polluted, undefined);
  assert.deepEqual(Object.keys(tricky), ["__proto__"]);
  assert.equal(Object.getPrototypeOf(tricky), Object.prototype);
});

test("frames msgspec encodes decode to the same fields; the same fields encode to its bytes", () => {
  // made by chatd.wire.encode_msgpack (msgspec) from chatd.wire.Message
  const vectors = [
    ["88a26964cf00000002dfdc1c35a675736572696407a3636d640aa5647374696402a56d6564696101"
      + "a7636f6e74656e74ab68c3a96c6c6f20f09f9880a3636964a3616263a27473cf0000018bcfe5687b",
    { id: 12345678901, userid: 7, cmd: 10, dstid: 2, media: 1, content: "héllo 😀",
      cid: "abc", ts: 1700000000123 }],
    ["84a2696429a3636d6401a3636964a26331a27473cd03e8", { id: 41, cmd: 1, cid: "c1", ts: 1000 }],
    ["84a3636d6405a46d656d6fac6e6f20737563682075736572a6616d6f756e74cd0194a3636964a3626164",
      { cmd: 5, memo: "no such user", amount: 404, cid: "bad" }],
    ["82a3636d6405a6616d6f756e74ff", { cmd: 5, amount: -1 }],
  ];
  for (const [bytes, fields] of vectors) {
    assert.deepEqual(msgpackDecode(fromHex(bytes)), fields);
    assert.equal(hex(msgpackEncode(fields)), bytes);
  }
  // ArrayBuffers and other views of the bytes decode the same
  const [bytes, fields] = vectors[1];
  assert.deepEqual(msgpackDecode(fromHex(bytes).buffer), fields);
  assert.deepEqual(msgpackDecode(new DataView(fromHex(`00${bytes}`).buffer, 1)), fields);
});

test("bytes that are not exactly one value raise MsgpackError, never anything else", () => {
  const good = msgpackEncode({ cmd: 10, dstid: 2, content: "é".repeat(40), list: [1, 2 ** 40],
    bin: new Uint8Array(3) });
  for (let n = 0; n < good.length; n += 1) {
    assert.throws(() => msgpackDecode(good.subarray(0, n)), MsgpackError, `prefix ${n}`);
  }
  const bad = [
    ["c0c0", "bytes left over"], ["c1", "0xc1"], ["d40100", "ext"], ["c70101ff", "ext"],
    ["a2c328", "invalid utf-8"], ["8101c0", "not a str"], ["dbffffffff", "truncated"],
    ["ddffffffff", "truncated"], ["dfffffffff00", "truncated"], ["91".repeat(100) + "c0", "deep"],
  ];
  for (const [bytes, what] of bad) {
    assert.throws(() => msgpackDecode(fromHex(bytes)), MsgpackError, what);
  }
  assert.throws(() => msgpackDecode("c0"), TypeError);
  assert.throws(() => msgpackEncode(() => 1), MsgpackError);
  assert.throws(() => msgpackEncode(Symbol("s")), MsgpackError);
  const cycle = { a: 1 };
  cycle.self = cycle;
  assert.throws(() => msgpackEncode(cycle), MsgpackError);
});

test("random bytes decode to a value or raise MsgpackError, nothing else", () => {
  // a fixed xorshift stream, so that a failure can be replayed
  let x = 0x9e3779b9;
  const next = () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x;
  };
  const seed = msgpackEncode({ cmd: 10, id: 2 ** 40, content: "é😀", list: [1, -300, null] });
  let values = 0;
  for (let i = 0; i < 20_000; i += 1) {
    let bytes;
    if (i % 2) { // a valid frame with a few bytes changed
      bytes = seed.slice();
      for (let k = next() % 4; k >= 0; k -= 1) bytes[next() % bytes.length] = next() & 0xff;
    } else {
      bytes = new Uint8Array(next() % 24).map(() => next() & 0xff);
    }
    try {
      msgpackDecode(bytes);
      values += 1;
    } catch (err) {
      assert.ok(err instanceof MsgpackError, `${hex(bytes)}: ${err}`);
    }
  }
  assert.ok(values > 0);
});

// --- a ChatClient speaking MessagePack --------------------------------------------------

test("a msgpack client writes binary frames: a heartbeat first, then the queue", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { encoding: "msgpack" });
  assert.equal(chat.encoding, "msgpack");
  chat.sendText(2, "héllo 😀", { cid: "a" });
  chat.sendImage(2, { url: "/media/x.png", pic: "/media/x.pic.png" }, { cid: "b" });
  chat.start();
  assert.equal(sockets[0].binaryType, "arraybuffer");
  sockets[0].open();
  assert.deepEqual(sockets[0].kinds, ["binary", "binary", "binary"]);
  assert.deepEqual(sockets[0].sent, [
    { cmd: 0 },
    { cmd: 10, dstid: 2, media: 1, content: "héllo 😀", cid: "a" },
    { cmd: 10, dstid: 2, media: 4, url: "/media/x.png", pic: "/media/x.pic.png", cid: "b" },
  ]);
  sockets[0].receiveBinary({ cmd: 1, id: 1, cid: "a" });
  sockets[0].receiveBinary({ cmd: 1, id: 2, cid: "b" });
  mock.timers.tick(30_000);
  assert.equal(sockets[0].sent.length, 4);
  assert.deepEqual(sockets[0].sent.at(-1), { cmd: 0 });
  assert.equal(sockets[0].kinds.at(-1), "binary");
});

test("binary frames are read: acks, messages, errors; text frames still are", async () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { encoding: "msgpack" });
  const got = events(chat, "message");
  chat.start();
  sockets[0].open();
  // the start of a replay may come as JSON, before the server saw the heartbeat
  sockets[0].receive({ cmd: 10, id: 5, userid: 2, dstid: 7, media: 1, content: "old" });
  sockets[0].receiveBinary({ cmd: 10, id: 6, userid: 2, dstid: 7, media: 1, content: "新" });
  sockets[0].receiveBinary({ cmd: 10, id: 6, userid: 2, dstid: 7, media: 1, content: "新" });
  sockets[0].receiveBinary({ cmd: 4, id: 6 });
  assert.deepEqual(got.map((d) => [d.message.id, d.message.content]), [[5, "old"], [6, "新"]]);
  const sending = chat.sendText(2, "hi", { cid: "c1" });
  const refused = chat.sendText(999, "x", { cid: "c2" });
  sockets[0].receiveBinary({ cmd: 1, id: 70_000, cid: "c1", ts: 1_700_000_000_123 });
  sockets[0].receiveBinary({ cmd: 5, amount: 404, memo: "no such user", cid: "c2" });
  assert.deepEqual(await sending, { cmd: 1, id: 70_000, cid: "c1", ts: 1_700_000_000_123 });
  await assert.rejects(refused, (err) => err instanceof SendError && err.code === 404);
  assert.equal(chat.last, 70_000);
  // garbage in a binary frame is dropped like garbage in a text frame
  sockets[0].onmessage({ data: fromHex("c1").buffer });
  sockets[0].onmessage({ data: fromHex("93010203").buffer });
  assert.equal(got.length, 2);
  sockets[0].drop();
  mock.timers.tick(1000);
  assert.equal(sockets[1].params().last, "70000");
});

test("an id past 2^53 stays exact: a BigInt resume point", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket, { encoding: "msgpack" });
  chat.start();
  sockets[0].open();
  const big = 2n ** 53n + 1n;
  sockets[0].receiveBinary({ cmd: 10, id: big, userid: 2, dstid: 7, media: 1, content: "x" });
  assert.equal(chat.last, big);
  sockets[0].drop();
  mock.timers.tick(1000);
  assert.equal(sockets[1].params().last, "9007199254740993");
  const resumed = client(ScriptedSocket, { last: big });
  resumed.start();
  assert.equal(sockets[2].params().last, "9007199254740993");
});

test("a json client writes text; an unknown encoding is refused", () => {
  const { ScriptedSocket, sockets } = scriptedSockets();
  const chat = client(ScriptedSocket);
  assert.equal(chat.encoding, "json");
  chat.sendText(2, "x", { cid: "x" });
  chat.start();
  sockets[0].open();
  assert.deepEqual(sockets[0].kinds, ["text"]);
  assert.throws(() => client(ScriptedSocket, { encoding: "cbor" }), TypeError);
});

test("a cid starts with the time in ms: later cids sort after earlier ones", () => {
  mock.timers.tick(1_700_000_000_000);
  const first = newCid();
  assert.match(first, /^[0-9a-f]{32}$/);
  assert.equal(first.slice(0, 12), (1_700_000_000_000).toString(16).padStart(12, "0"));
  const same = newCid();
  assert.notEqual(same, first, "the random part tells cids of one ms apart");
  mock.timers.tick(1);
  const later = newCid();
  assert.ok(later > first && later > same, `${later} sorts after ${first} and ${same}`);
});
