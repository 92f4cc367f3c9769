// The JavaScript client library against a real chatd node, with node's test
// runner and its WebSocket (node 20: --experimental-websocket). Run by
// tests/integration/test_js_client.py, which starts `chatd serve` and sets
// CHATD_API (the api base URL), CHATD_CHAT_PORT and CHATD_TEST_UNIT.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  ChatClient, ClosedError, msgpackDecode, SendError, STATE,
} from "../../src/chatd/web/chatd.js";

const API = process.env.CHATD_API;
const CHAT_URL = `ws://127.0.0.1:${process.env.CHATD_CHAT_PORT}/chat`;
const UNIT = Number(process.env.CHATD_TEST_UNIT || "1");
const WAIT_MS = 10_000 * UNIT;
let mobiles = 0;

async function api(path, fields, token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(API + path, { method: "POST", headers, body: JSON.stringify(fields) });
  const body = await resp.json();
  assert.equal(body.code, 0, `${path}: ${resp.status} ${body.msg}`);
  return body.data;
}

async function register(nickname) {
  mobiles += 1;
  return api("/user/register", { mobile: `1370000${process.pid % 1000}${mobiles}`,
    passwd: "secret1", nickname });
}

function chatFor(user, extra = {}) {
  return new ChatClient({ url: CHAT_URL, uid: user.id, token: user.token, ...extra });
}

/** Resolves with the first `n` details of event `type`, or rejects after WAIT_MS. */
function collect(target, type, n, pred = () => true) {
  const got = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${got.length} of ${n} ${type} events`)),
      WAIT_MS);
    target.addEventListener(type, (ev) => {
      if (!pred(ev.detail)) return;
      got.push(ev.detail);
      if (got.length === n) {
        clearTimeout(timer);
        resolve(got);
      }
    });
  });
}

function within(promise, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), WAIT_MS);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

test("queued messages go out in order once connected; the peer gets each once", async () => {
  const alice = await register("alice");
  const bob = await register("bob");
  const bobChat = chatFor(bob);
  const bobSynced = collect(bobChat, "synced", 1);
  bobChat.start();
  await bobSynced;
  const aliceChat = chatFor(alice);
  const sends = [1, 2, 3, 4, 5].map((i) => aliceChat.sendText(bob.id, `m${i}`));
  assert.equal(aliceChat.pending, 5);
  const arriving = collect(bobChat, "message", 5);
  aliceChat.start();
  const acks = await within(Promise.all(sends), "acks");
  const ids = acks.map((a) => a.id);
  assert.deepEqual([...ids].sort((a, b) => a - b), ids, "acked in the order sent");
  assert.equal(new Set(ids).size, 5);
  const got = (await arriving).map((d) => d.message);
  assert.deepEqual(got.map((m) => m.content), ["m1", "m2", "m3", "m4", "m5"]);
  assert.deepEqual(got.map((m) => m.id), ids);
  assert.ok(got.every((m) => m.userid === alice.id && m.dstid === bob.id && m.ts > 0));
  assert.equal(bobChat.last, ids[4]);
  aliceChat.close();
  bobChat.close();
});

test("a new client resumes from last=: exactly what it missed, then the sync end", async () => {
  const alice = await register("alice");
  const bob = await register("bob");
  const aliceChat = chatFor(alice);
  aliceChat.start();
  const bobChat = chatFor(bob);
  const first = collect(bobChat, "message", 1);
  bobChat.start();
  await within(aliceChat.sendText(bob.id, "before"), "ack");
  const [{ message: seen }] = await first;
  bobChat.close();
  const missed = [];
  for (const text of ["while away 1", "while away 2", "while away 3"]) {
    missed.push((await within(aliceChat.sendText(bob.id, text), "ack")).id);
  }
  const again = chatFor(bob, { last: bobChat.last });
  assert.equal(bobChat.last, seen.id);
  const events = [];
  for (const type of ["message", "synced"]) {
    again.addEventListener(type, (ev) => events.push([type, ev.detail]));
  }
  const synced = collect(again, "synced", 1);
  again.start();
  await synced;
  assert.deepEqual(events.map(([type, d]) => (type === "message" ? d.message.id : "end")),
    [...missed, "end"]);
  assert.equal(again.last, missed[2]);
  again.close();
  aliceChat.close();
});

test("an error frame rejects the send; a retried cid is stored once", async () => {
  const alice = await register("alice");
  const bob = await register("bob");
  const aliceChat = chatFor(alice);
  aliceChat.start();
  await assert.rejects(within(aliceChat.sendText(99_999_999, "nobody"), "error"),
    (err) => err instanceof SendError && err.code === 404);
  const bobChat = chatFor(bob);
  const bobGot = [];
  bobChat.addEventListener("message", (ev) => bobGot.push(ev.detail.message));
  const bobSynced = collect(bobChat, "synced", 1);
  bobChat.start();
  await bobSynced;
  const first = await within(aliceChat.sendText(bob.id, "once", { cid: "dup-1" }), "ack");
  // the same cid from a second device of alice: the server acks the stored one again
  const second = chatFor(alice);
  second.start();
  const again = await within(second.sendText(bob.id, "once", { cid: "dup-1" }), "re-ack");
  assert.equal(again.id, first.id);
  // a later message shows that bob's stream went on, with the first only once
  const after = collect(bobChat, "message", 1, (d) => d.message.content === "after");
  await within(aliceChat.sendText(bob.id, "after"), "ack");
  await after;
  assert.deepEqual(bobGot.map((m) => m.content), ["once", "after"]);
  for (const c of [aliceChat, second, bobChat]) c.close();
});

test("a revoked token closes with 4501: no reconnect, pending sends reject", async () => {
  const alice = await register("alice");
  const aliceChat = chatFor(alice, { minBackoffMs: 50 });
  const synced = collect(aliceChat, "synced", 1);
  const fatal = collect(aliceChat, "fatal", 1);
  aliceChat.start();
  await synced;
  await api("/user/revoke", {}, alice.token);
  const [{ code }] = await fatal;
  assert.equal(code, 4501);
  assert.equal(aliceChat.state, STATE.CLOSED);
  await assert.rejects(aliceChat.sendText(alice.id, "x"), ClosedError);
});

// --- MessagePack -------------------------------------------------------------------------

/**
 * A WebSocket class that logs what crosses it: {out: "text"|"binary"} for each frame
 * sent, {kind, frame} (decoded) for each received, in order.
 */
function recordingSocket(log) {
  return class RecordingSocket extends WebSocket {
    constructor(url) {
      super(url);
      this.addEventListener("message", (ev) => {
        const text = typeof ev.data === "string";
        log.push({ kind: text ? "text" : "binary",
          frame: text ? JSON.parse(ev.data) : msgpackDecode(ev.data) });
      });
    }

    send(data) {
      log.push({ out: typeof data === "string" ? "text" : "binary" });
      super.send(data);
    }
  };
}

function msgpackChatFor(user, log, extra = {}) {
  return chatFor(user, { encoding: "msgpack", WebSocket: recordingSocket(log), ...extra });
}

/** The received frames of `log` that `pred` picks, as [kind, frame]. */
function received(log, pred) {
  return log.filter((e) => e.frame && pred(e.frame)).map((e) => [e.kind, e.frame]);
}

test("msgpack: queued messages go out in order; acks and deliveries are binary", async () => {
  const alice = await register("alice");
  const bob = await register("bob");
  const bobLog = [];
  const bobChat = msgpackChatFor(bob, bobLog);
  const bobSynced = collect(bobChat, "synced", 1);
  bobChat.start();
  await bobSynced;
  // once bob's first binary frame is read, the server writes to bob in MessagePack
  const ready = await within(bobChat.sendText(alice.id, "ready"), "bob's ack");
  assert.deepEqual(received(bobLog, (f) => f.cmd === 1), [["binary", ready]]);
  const aliceLog = [];
  const aliceChat = msgpackChatFor(alice, aliceLog);
  // past str8 and str16 sizes in utf-8, with characters of 2, 3 and 4 bytes
  const texts = ["m1", "é".repeat(200) + "😀".repeat(50), "m3", "中".repeat(8000), "m5 👩‍👩‍👧"];
  const sends = texts.map((t) => aliceChat.sendText(bob.id, t));
  const arriving = collect(bobChat, "message", 5);
  aliceChat.start();
  const acks = await within(Promise.all(sends), "acks");
  const ids = acks.map((a) => a.id);
  assert.deepEqual([...ids].sort((a, b) => a - b), ids, "acked in the order sent");
  assert.equal(new Set(ids).size, 5);
  assert.ok(ids.every((id) => Number.isSafeInteger(id) && id > ready.id));
  const got = (await arriving).map((d) => d.message);
  assert.deepEqual(got.map((m) => m.content), texts);
  assert.deepEqual(got.map((m) => m.id), ids);
  assert.ok(got.every((m) => m.userid === alice.id && m.dstid === bob.id && m.ts > 0));
  assert.equal(bobChat.last, ids[4]);
  // every frame either client wrote was binary, and so was everything about these five
  assert.ok(aliceLog.some((e) => e.out) && bobLog.some((e) => e.out));
  assert.ok([...aliceLog, ...bobLog].every((e) => !e.out || e.out === "binary"));
  const cids = new Set(acks.map((a) => a.cid));
  assert.deepEqual(received(aliceLog, (f) => f.cmd === 1 && cids.has(f.cid)).map(([k]) => k),
    ["binary", "binary", "binary", "binary", "binary"]);
  assert.deepEqual(received(bobLog, (f) => f.cmd === 10 && ids.includes(f.id)),
    got.map((m) => ["binary", m]));
  aliceChat.close();
  bobChat.close();
});

test("msgpack: a resumed client gets exactly what it missed; errors come binary", async () => {
  const alice = await register("alice");
  const bob = await register("bob");
  const aliceChat = msgpackChatFor(alice, []);
  aliceChat.start();
  const bobChat = msgpackChatFor(bob, []);
  const first = collect(bobChat, "message", 1);
  bobChat.start();
  await within(aliceChat.sendText(bob.id, "before"), "ack");
  const [{ message: seen }] = await first;
  bobChat.close();
  const missed = [];
  for (const text of ["while away 1", "while away 2 ✓", "while away 3"]) {
    missed.push((await within(aliceChat.sendText(bob.id, text), "ack")).id);
  }
  assert.equal(bobChat.last, seen.id);
  const log = [];
  const again = msgpackChatFor(bob, log, { last: bobChat.last });
  const events = [];
  for (const type of ["message", "synced"]) {
    again.addEventListener(type, (ev) => events.push([type, ev.detail]));
  }
  const synced = collect(again, "synced", 1);
  again.start();
  await synced;
  // the replay may start in JSON (before the server reads the client's first
  // frame): what counts is that each missed message comes once, in order
  assert.deepEqual(events.map(([type, d]) => (type === "message" ? d.message.id : "end")),
    [...missed, "end"]);
  assert.deepEqual(events.slice(0, 3).map(([, d]) => d.message.content),
    ["while away 1", "while away 2 ✓", "while away 3"]);
  assert.equal(again.last, missed[2]);
  await assert.rejects(within(again.sendText(99_999_999, "nobody", { cid: "nobody-1" }), "error"),
    (err) => err instanceof SendError && err.code === 404 && err.cid === "nobody-1");
  const errors = received(log, (f) => f.cmd === 5);
  assert.equal(errors.length, 1);
  assert.equal(errors[0][0], "binary");
  assert.equal(errors[0][1].amount, 404);
  // the same cid from another device is acked with the stored id, stored once
  const once = await within(again.sendText(alice.id, "once", { cid: "dup-mp" }), "ack");
  const other = msgpackChatFor(bob, []);
  other.start();
  assert.equal((await within(other.sendText(alice.id, "once", { cid: "dup-mp" }), "re-ack")).id,
    once.id);
  for (const c of [again, other, aliceChat]) c.close();
});
