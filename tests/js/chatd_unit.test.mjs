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
      sockets.push(this);
    }
    send(data) { this.sent.push(JSON.parse(data)); }
    close(code, reason) { this.closedWith = { code, reason }; }
    // the test's side
    open() { this.onopen({}); }
    receive(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
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
  for (const m of sent) assert.match(m.cid, /^[0-9a-f]{24}$/);
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
