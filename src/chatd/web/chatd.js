/**
 * chatd.js — the chatd chat websocket client, one ES module, no dependencies.
 *
 * Served by chatd at /static/chatd.js. Works wherever a standard WebSocket
 * exists (browsers; node 22, or node 20 with --experimental-websocket).
 *
 *   import { ChatClient, wsUrlFor } from "/static/chatd.js";
 *   const cfg = await (await fetch("/config.json")).json();
 *   const chat = new ChatClient({ url: wsUrlFor(location, cfg.chat_port), uid, token });
 *   chat.addEventListener("message", (ev) => show(ev.detail.message));
 *   chat.start();
 *   const ack = await chat.sendText(bob, "hi");   // resolves with the ack {id, cid, ts}
 *
 * Semantics (docs/clients.md has the whole story):
 *  - send() queues: a message written while disconnected waits and goes out,
 *    in order, when the connection opens. Each carries a cid (made here if the
 *    caller gives none); a message not acked when its connection drops is sent
 *    again with the same cid on the next one, and the server stores it once.
 *  - The promise of send() resolves with the ack (cmd 1, matched by cid) and
 *    rejects with a SendError on an error frame (cmd 5) for that cid, except
 *    500/503 (not stored, try later): those are sent again, same cid, later.
 *  - Reconnect with exponential backoff and jitter; resume with last= (the
 *    highest id received) on every connect, so nothing is missed; messages are
 *    deduplicated by id, so nothing shows twice.
 *  - Heartbeat (cmd 0) after heartbeatMs without sending anything (the seed: 30 s).
 *  - A connection that leaves a sent message unacked for ackTimeoutMs, with
 *    no frame at all meanwhile, is presumed dead: dropped and replaced.
 *  - Close codes 4500-4999 (revoked, banned) are final: no reconnect, every
 *    pending send rejects with a ClosedError, a "fatal" event says why.
 *  - Frames are JSON text, or MessagePack binary with {encoding: "msgpack"}
 *    (the codec is below: msgpackEncode/msgpackDecode). The server answers in
 *    the encoding the client last used, so a msgpack client's first frame on
 *    each connection is a heartbeat; what came before it (the start of the
 *    replay) is JSON, and the client reads both kinds whatever it sends.
 *    Ints past ±(2^53 - 1) decode as BigInt (see the MessagePack section).
 *
 * Events (CustomEvent, data in .detail): "state" {state, attempt, delayMs, code,
 * reason}, "message" {message}, "ack" {ack, message}, "synced" {id},
 * "error" {error} (an error frame with no pending send), "fatal" {code, reason, unsent}.
 */

export const CMD = Object.freeze({
  HEARTBEAT: 0, ACK: 1, GROUP_ENTER: 2, GROUP_LEAVE: 3, SYNC: 4, ERROR: 5,
  PRIVATE: 10, GROUP: 11,
});

export const MEDIA = Object.freeze({
  TEXT: 1, NEWS: 2, VOICE: 3, IMAGE: 4, REDPACKET: 5, EMOJI: 6, LINK: 7, VIDEO: 8,
  CARD: 9, APP: 100,
});

export const STATE = Object.freeze({
  /** not started yet */
  IDLE: "idle",
  /** a websocket is being opened */
  CONNECTING: "connecting",
  /** connected: sends go out at once */
  OPEN: "open",
  /** disconnected, waiting out the backoff before the next try */
  WAITING: "waiting",
  /** stopped: close() was called, or the server said not to come back */
  CLOSED: "closed",
});

/** Error codes (cmd 5 amount) that mean "not stored, send it again later". */
export const RETRY_LATER = Object.freeze(new Set([500, 503]));
export const MAX_CID_CHARS = 64;

/** An error frame (cmd 5) refused this message; code is the frame's amount. */
export class SendError extends Error {
  constructor(code, reason, cid) {
    super(reason || `refused with code ${code}`);
    this.name = "SendError";
    this.code = code;
    this.cid = cid;
  }
}

/** The client stopped (close(), or a final close code) before the message was acked. */
export class ClosedError extends Error {
  constructor(code, reason) {
    super(reason || `closed with code ${code}`);
    this.name = "ClosedError";
    this.code = code;
  }
}

/**
 * A fresh client id for a message: the time in ms (12 hex digits), then 20 hex
 * digits from the platform's CSPRNG. Leading with the time puts each new cid at
 * the end of the server's index of cids, not at a random place in it (cheaper
 * to store: docs/protocol.md, "cid").
 */
export function newCid() {
  const bytes = new Uint8Array(10);
  globalThis.crypto.getRandomValues(bytes);
  return (
    Date.now().toString(16).padStart(12, "0") +
    Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")
  );
}

/**
 * The wait before reconnect number attempt (0 first): "equal jitter", half
 * of min(maxMs, minMs * 2^attempt) plus a random part of the other half, so
 * that clients dropped together do not all come back together.
 */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 30));
  return cap / 2 + random() * (cap / 2);
}

/** Whether a close code lets the client reconnect (4500-4999: it must not). */
export function mayReconnect(code) {
  return !(code >= 4500 && code <= 4999);
}

/** The chat websocket's URL for a page at location loc: same host name, the chat port. */
export function wsUrlFor(loc, chatPort, path = "/chat") {
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.hostname}:${chatPort}${path}`;
}

/** The frame encodings a ChatClient speaks. */
export const ENCODINGS = Object.freeze(["json", "msgpack"]);

const DEFAULTS = Object.freeze({
  encoding: "json",
  last: 0,
  heartbeatMs: 30_000,
  ackTimeoutMs: 10_000,
  minBackoffMs: 500,
  maxBackoffMs: 30_000,
  dedupeWindow: 10_000,
});

export class ChatClient extends EventTarget {
  #o;
  #ws = null;
  #serial = 0; // the current connection's number; events of older ones are ignored
  #state = STATE.IDLE;
  #attempt = 0;
  #last;
  #outbox = []; // entries {msg, resolve, reject, promise, sentOn, sentAt, tries}, in send order
  #byCid = new Map();
  #seen = new Set();
  #seenOrder = [];
  #retryTimer = null;
  #resendTimer = null;
  #beatTimer = null;
  #ackTimer = null;
  #fatal = null;
  #heardAt = 0;

  /**
   * @param {object} options
   * @param {string} options.url  the chat websocket, e.g. "ws://host:8080/chat"
   * @param {number} options.uid  the user's id
   * @param {string} options.token  the user's token (it rides in the URL: the protocol's form)
   * @param {number|bigint} [options.last=0]  resume after this message id (the highest one held)
   * @param {"json"|"msgpack"} [options.encoding="json"]  JSON text or MessagePack binary frames
   * @param {number} [options.heartbeatMs=30000]
   * @param {number} [options.ackTimeoutMs=10000]
   * @param {number} [options.minBackoffMs=500]
   * @param {number} [options.maxBackoffMs=30000]
   * @param {number} [options.dedupeWindow=10000]  how many message ids are remembered
   * @param {Function} [options.WebSocket]  the WebSocket class (default: the global one)
   * @param {Function} [options.random]  jitter source (default Math.random)
   */
  constructor(options) {
    super();
    const o = { ...DEFAULTS, WebSocket: globalThis.WebSocket, random: Math.random, ...options };
    if (!o.url || !o.uid || !o.token) throw new TypeError("url, uid and token are required");
    if (typeof o.WebSocket !== "function") throw new TypeError("no WebSocket class here");
    if (!ENCODINGS.includes(o.encoding)) {
      throw new TypeError(`encoding must be one of ${ENCODINGS.join(", ")}`);
    }
    this.#o = o;
    this.#last = typeof o.last === "bigint" ? o.last : Number(o.last) || 0;
  }

  /** One of STATE. */
  get state() { return this.#state; }
  /** "json" or "msgpack": what this client writes. */
  get encoding() { return this.#o.encoding; }
  /** The highest message id received: the resume point. */
  get last() { return this.#last; }
  /** Messages sent but not acked yet (queued or in flight). */
  get pending() { return this.#outbox.length; }
  /** Failed connects in a row (reset when a connection completes its replay). */
  get attempt() { return this.#attempt; }
  /** The final close, {code, reason}, or null. */
  get fatal() { return this.#fatal; }

  /** Copies of the unacked messages, in order, cid included (to keep them over a reload). */
  pendingMessages() { return this.#outbox.map((e) => ({ ...e.msg })); }

  /** Use this token from the next connect on (e.g. after /user/refresh). */
  setToken(token) { this.#o.token = token; }

  /** Connect, and stay connected until close(). */
  start() {
    if (this.#state === STATE.IDLE) this.#connect();
  }

  /** Try now instead of waiting out the backoff (e.g. the browser went online). */
  reconnectNow() {
    if (this.#state === STATE.WAITING) this.#connect();
  }

  /** Stop for good. Unacked sends reject with a ClosedError (pendingMessages() keeps them). */
  close() {
    if (this.#state === STATE.CLOSED) return;
    const ws = this.#ws;
    this.#serial += 1;
    this.#ws = null;
    this.#stopTimers();
    if (ws) try { ws.close(1000, "bye"); } catch { /* already closing */ }
    this.#setState(STATE.CLOSED, { code: 1000, reason: "closed by the client" });
    for (const e of this.#outbox) e.reject(new ClosedError(1000, "closed by the client"));
  }

  /**
   * Queue a message (cmd 10 or 11 fields) and send it as soon as connected;
   * resolves with its ack, rejects with a SendError (refused) or ClosedError.
   * Sending the same cid again while it is pending returns the same promise.
   */
  send(fields) {
    const msg = { ...fields };
    if (msg.cid === undefined || msg.cid === "") msg.cid = newCid();
    if (typeof msg.cid !== "string" || msg.cid.length > MAX_CID_CHARS) {
      return Promise.reject(new TypeError(`cid must be text of at most ${MAX_CID_CHARS} chars`));
    }
    const known = this.#byCid.get(msg.cid);
    if (known) return known.promise;
    if (this.#state === STATE.CLOSED) {
      return Promise.reject(new ClosedError(this.#fatal?.code ?? 1000, "the client is closed"));
    }
    const entry = { msg, sentOn: 0, sentAt: 0, tries: 0 };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    this.#outbox.push(entry);
    this.#byCid.set(msg.cid, entry);
    if (this.#state === STATE.OPEN) this.#transmit(entry);
    return entry.promise;
  }

  /** A text message to user dstid (or to group dstid with {group: true}). */
  sendText(dstid, content, { group = false, cid } = {}) {
    return this.send({ cmd: group ? CMD.GROUP : CMD.PRIVATE, dstid, media: MEDIA.TEXT,
      content, cid });
  }

  /** An emoji message (media 6): content is the emoji. */
  sendEmoji(dstid, emoji, { group = false, cid } = {}) {
    return this.send({ cmd: group ? CMD.GROUP : CMD.PRIVATE, dstid, media: MEDIA.EMOJI,
      content: emoji, cid });
  }

  /** An image message (media 4) from an upload's {url, pic}. */
  sendImage(dstid, { url, pic = "" }, { group = false, cid } = {}) {
    return this.send({ cmd: group ? CMD.GROUP : CMD.PRIVATE, dstid, media: MEDIA.IMAGE,
      url, pic, cid });
  }

  // --- the connection -------------------------------------------------------------

  #connect() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const serial = ++this.#serial;
    const o = this.#o;
    const url = `${o.url}?id=${encodeURIComponent(o.uid)}&token=${encodeURIComponent(o.token)}`
      + `&last=${this.#last}`;
    this.#setState(STATE.CONNECTING, { attempt: this.#attempt });
    let ws;
    try {
      ws = new o.WebSocket(url);
    } catch (err) {
      this.#lost(serial, 1006, String(err));
      return;
    }
    this.#ws = ws;
    ws.binaryType = "arraybuffer"; // MessagePack frames decode from bytes, at once, in order
    ws.onopen = () => { if (serial === this.#serial) this.#opened(); };
    ws.onmessage = (ev) => { if (serial === this.#serial) this.#frame(ev.data); };
    ws.onclose = (ev) => { if (serial === this.#serial) this.#lost(serial, ev.code, ev.reason); };
    ws.onerror = () => { /* a close event follows */ };
  }

  #opened() {
    this.#heardAt = Date.now();
    this.#setState(STATE.OPEN, { attempt: this.#attempt });
    // the server answers in the encoding of the client's last frame: say it at once
    if (this.#o.encoding === "msgpack") this.#write({ cmd: CMD.HEARTBEAT });
    for (const e of this.#outbox) this.#transmit(e);
    this.#armHeartbeat();
    const every = Math.max(50, this.#o.ackTimeoutMs / 4);
    this.#ackTimer = setInterval(() => this.#checkAcks(), every);
  }

  #lost(serial, code, reason) {
    if (serial !== this.#serial) return;
    this.#ws = null;
    this.#stopTimers();
    for (const e of this.#outbox) e.sentOn = 0; // all go again on the next connection
    if (!mayReconnect(code)) {
      this.#fatal = { code, reason };
      const unsent = this.pendingMessages();
      const err = new ClosedError(code, reason || "the server closed the connection for good");
      for (const e of this.#outbox) e.reject(err);
      this.#outbox = [];
      this.#byCid.clear();
      this.#setState(STATE.CLOSED, { code, reason });
      this.#emit("fatal", { code, reason, unsent });
      return;
    }
    const o = this.#o;
    const delayMs = backoffDelay(this.#attempt, o.minBackoffMs, o.maxBackoffMs, o.random);
    this.#attempt += 1;
    this.#setState(STATE.WAITING, { attempt: this.#attempt, delayMs, code, reason });
    this.#retryTimer = setTimeout(() => this.#connect(), delayMs);
  }

  /** Give up on the current socket (it looks dead) and reconnect. */
  #abandon(reason) {
    const ws = this.#ws;
    this.#lost(this.#serial, 4000, reason);
    this.#serial += 1; // the old socket's late events are ignored from now on
    if (ws) try { ws.close(4000, reason); } catch { /* already closing */ }
  }

  #stopTimers() {
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#beatTimer);
    clearTimeout(this.#resendTimer);
    clearInterval(this.#ackTimer);
    this.#retryTimer = this.#beatTimer = this.#resendTimer = this.#ackTimer = null;
  }

  #transmit(entry) {
    entry.sentOn = this.#serial;
    entry.sentAt = Date.now();
    this.#write(entry.msg);
  }

  #write(obj) {
    this.#ws.send(this.#o.encoding === "msgpack" ? msgpackEncode(obj) : JSON.stringify(obj));
    this.#armHeartbeat();
  }

  #armHeartbeat() {
    clearTimeout(this.#beatTimer);
    this.#beatTimer = setTimeout(() => {
      if (this.#state === STATE.OPEN) this.#write({ cmd: CMD.HEARTBEAT });
    }, this.#o.heartbeatMs);
  }

  #checkAcks() {
    // dead: the oldest message in flight waits too long, and nothing else comes
    // either (a long replay holds acks back, but its frames show life)
    const serial = this.#serial;
    const oldest = this.#outbox.find((e) => e.sentOn === serial);
    const now = Date.now();
    const limit = this.#o.ackTimeoutMs;
    if (oldest && now - oldest.sentAt >= limit && now - this.#heardAt >= limit) {
      this.#abandon("no ack");
    }
  }

  // --- frames -----------------------------------------------------------------------

  #frame(data) {
    this.#heardAt = Date.now();
    let f;
    try {
      // text is JSON, binary is MessagePack, whatever this client writes (a
      // replay starts before the server has seen the client's first frame)
      f = typeof data === "string" ? JSON.parse(data) : msgpackDecode(data);
    } catch {
      return; // not a frame of chatd's; the server sends none such
    }
    if (f === null || typeof f !== "object" || Array.isArray(f)) return;
    const cmd = f.cmd ?? 0;
    const id = f.id ?? 0;
    switch (cmd) {
      case CMD.ACK: {
        this.#bump(id);
        const entry = this.#take(f.cid);
        if (entry) entry.resolve(f);
        this.#emit("ack", { ack: f, message: entry ? entry.msg : null });
        break;
      }
      case CMD.SYNC:
        this.#bump(id);
        this.#attempt = 0; // a whole replay went through: the connection works
        this.#emit("synced", { id });
        break;
      case CMD.ERROR:
        this.#onError(f);
        break;
      case CMD.PRIVATE:
      case CMD.GROUP:
        if (id) {
          if (this.#seen.has(id)) return;
          this.#remember(id);
          this.#bump(id);
        }
        this.#emit("message", { message: f });
        break;
      default:
        break; // heartbeats, and cmds this client does not know
    }
  }

  #onError(f) {
    const code = f.amount ?? 0;
    const entry = f.cid ? this.#byCid.get(f.cid) : undefined;
    if (!entry) {
      this.#emit("error", { error: f });
      return;
    }
    if (RETRY_LATER.has(code)) {
      // not stored: the same cid goes again after a backoff (and on any reconnect)
      entry.sentOn = 0;
      const o = this.#o;
      const delay = backoffDelay(entry.tries++, o.minBackoffMs, o.maxBackoffMs, o.random);
      if (this.#resendTimer === null) {
        this.#resendTimer = setTimeout(() => this.#resend(), delay);
      }
      return;
    }
    this.#take(f.cid);
    entry.reject(new SendError(code, f.memo ?? "", f.cid));
  }

  #resend() {
    this.#resendTimer = null;
    if (this.#state !== STATE.OPEN) return;
    for (const e of this.#outbox) if (e.sentOn === 0) this.#transmit(e);
  }

  #take(cid) {
    const entry = cid ? this.#byCid.get(cid) : undefined;
    if (!entry) return undefined;
    this.#byCid.delete(cid);
    this.#outbox.splice(this.#outbox.indexOf(entry), 1);
    return entry;
  }

  #bump(id) {
    if ((typeof id === "number" || typeof id === "bigint") && id > this.#last) this.#last = id;
  }

  #remember(id) {
    this.#seen.add(id);
    this.#seenOrder.push(id);
    if (this.#seenOrder.length > this.#o.dedupeWindow) {
      this.#seen.delete(this.#seenOrder.shift());
    }
  }

  #setState(state, detail = {}) {
    this.#state = state;
    this.#emit("state", { state, ...detail });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// --- MessagePack ----------------------------------------------------------------------
//
// The subset of MessagePack (github.com/msgpack/msgpack/blob/master/spec.md) that a
// chatd Message needs, both ways, so the library stays one module with no
// dependencies. Encoded: null/undefined (nil), booleans, numbers, BigInts, strings
// (utf-8), Uint8Array/ArrayBuffer (bin), arrays, and plain objects (maps with str
// keys; a property whose value is undefined is left out, as JSON.stringify does).
// Decoded: every nil, bool, int, float, str, bin, array and map form; ext types
// (which chatd never sends) and anything malformed raise a MsgpackError.
//
// Integers: chatd's are int64. A Number that is an integer goes out in the
// smallest int form that holds it; other Numbers as float64. A decoded int within
// ±(2^53 − 1) (Number.MAX_SAFE_INTEGER) is a Number; one outside is a BigInt, so it
// is never silently rounded. chatd's ids, user ids and timestamps stay far below
// 2^53 in practice, so a client sees Numbers; pass a BigInt to send an int past it.

/** A MessagePack value that cannot be encoded or bytes that are not one MessagePack value. */
export class MsgpackError extends Error {
  constructor(message) {
    super(message);
    this.name = "MsgpackError";
  }
}

/** How deep arrays and maps may nest (a Message has none; bounds the recursion). */
const MSGPACK_MAX_DEPTH = 64;
const UINT64_LIMIT = 2n ** 64n;
const INT64_MIN = -(2n ** 63n);
const UTF8_ENCODER = new TextEncoder();
const UTF8_DECODER = new TextDecoder("utf-8", { fatal: true });

class MsgpackWriter {
  #buf = new Uint8Array(128);
  #view = new DataView(this.#buf.buffer);
  #pos = 0;

  bytes() { return this.#buf.slice(0, this.#pos); }

  #room(n) {
    if (this.#pos + n <= this.#buf.length) return;
    let size = this.#buf.length * 2;
    while (size < this.#pos + n) size *= 2;
    const bigger = new Uint8Array(size);
    bigger.set(this.#buf.subarray(0, this.#pos));
    this.#buf = bigger;
    this.#view = new DataView(bigger.buffer);
  }

  #u8(b) { this.#room(1); this.#buf[this.#pos++] = b; }

  #head(type, n, size) { // a type byte, then n as a big-endian int of size bytes
    this.#room(1 + size);
    const at = this.#pos;
    this.#buf[at] = type;
    const v = this.#view;
    if (type >= 0xd0 && type <= 0xd2) { // int8, int16, int32: signed
      if (size === 1) v.setInt8(at + 1, n);
      else if (size === 2) v.setInt16(at + 1, n);
      else v.setInt32(at + 1, n);
    } else if (size === 1) v.setUint8(at + 1, n);
    else if (size === 2) v.setUint16(at + 1, n);
    else v.setUint32(at + 1, n);
    this.#pos = at + 1 + size;
  }

  #raw(bytes) {
    this.#room(bytes.length);
    this.#buf.set(bytes, this.#pos);
    this.#pos += bytes.length;
  }

  #int(n) { // an integer Number in [-2^63, 2^64)
    if (n >= 0) {
      if (n < 0x80) this.#u8(n);
      else if (n < 0x100) this.#head(0xcc, n, 1);
      else if (n < 0x10000) this.#head(0xcd, n, 2);
      else if (n < 0x100000000) this.#head(0xce, n, 4);
      else this.#int64(BigInt(n));
    } else if (n >= -32) this.#u8(n & 0xff);
    else if (n >= -0x80) this.#head(0xd0, n, 1);
    else if (n >= -0x8000) this.#head(0xd1, n, 2);
    else if (n >= -0x80000000) this.#head(0xd2, n, 4);
    else this.#int64(BigInt(n));
  }

  #big(b) { // a BigInt: the same forms as the Number of the same value
    if (b >= -0x80000000n && b < 0x100000000n) this.#int(Number(b));
    else this.#int64(b);
  }

  #int64(b) { // a BigInt past 32 bits: uint64 if positive, int64 if negative
    if (b >= UINT64_LIMIT || b < INT64_MIN) {
      throw new MsgpackError(`${b} is past MessagePack's ints (-2^63 to 2^64 - 1)`);
    }
    this.#room(9);
    const at = this.#pos;
    if (b >= 0n) {
      this.#buf[at] = 0xcf;
      this.#view.setBigUint64(at + 1, b);
    } else {
      this.#buf[at] = 0xd3;
      this.#view.setBigInt64(at + 1, b);
    }
    this.#pos = at + 9;
  }

  #float(x) {
    this.#room(9);
    this.#buf[this.#pos] = 0xcb;
    this.#view.setFloat64(this.#pos + 1, x);
    this.#pos += 9;
  }

  #sized(n, fix, fixMax, t8, t16, t32) { // the header of a str, bin, array or map of n
    if (fix !== null && n <= fixMax) this.#u8(fix | n);
    else if (t8 !== null && n < 0x100) this.#head(t8, n, 1);
    else if (n < 0x10000) this.#head(t16, n, 2);
    else if (n <= 0xffffffff) this.#head(t32, n, 4);
    else throw new MsgpackError(`${n} items or bytes is past MessagePack's 2^32 - 1`);
  }

  value(v, depth) {
    switch (typeof v) {
      case "undefined":
        this.#u8(0xc0);
        return;
      case "boolean":
        this.#u8(v ? 0xc3 : 0xc2);
        return;
      case "number":
        if (Number.isInteger(v) && v >= -(2 ** 63) && v < 2 ** 64) this.#int(v);
        else this.#float(v);
        return;
      case "bigint":
        this.#big(v);
        return;
      case "string": {
        const bytes = UTF8_ENCODER.encode(v);
        this.#sized(bytes.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
        this.#raw(bytes);
        return;
      }
      case "object":
        break;
      default:
        throw new MsgpackError(`a ${typeof v} has no MessagePack form`);
    }
    if (v === null) {
      this.#u8(0xc0);
      return;
    }
    if (depth >= MSGPACK_MAX_DEPTH) throw new MsgpackError("nested too deep (or a cycle)");
    if (v instanceof ArrayBuffer || ArrayBuffer.isView(v)) {
      const bytes = v instanceof ArrayBuffer ? new Uint8Array(v)
        : new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
      this.#sized(bytes.length, null, 0, 0xc4, 0xc5, 0xc6);
      this.#raw(bytes);
    } else if (Array.isArray(v)) {
      this.#sized(v.length, 0x90, 15, null, 0xdc, 0xdd);
      for (const item of v) this.value(item, depth + 1);
    } else {
      const keys = Object.keys(v).filter((k) => v[k] !== undefined);
      this.#sized(keys.length, 0x80, 15, null, 0xde, 0xdf);
      for (const k of keys) {
        this.value(k, depth + 1);
        this.value(v[k], depth + 1);
      }
    }
  }
}

class MsgpackReader {
  #bytes;
  #view;
  #pos = 0;

  constructor(bytes) {
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  get done() { return this.#pos === this.#bytes.length; }

  #take(n) { // the offset of the next n bytes, which must be there
    const at = this.#pos;
    if (at + n > this.#bytes.length) throw new MsgpackError(`truncated at byte ${at}`);
    this.#pos = at + n;
    return at;
  }

  #u8() { return this.#view.getUint8(this.#take(1)); }
  #u16() { return this.#view.getUint16(this.#take(2)); }
  #u32() { return this.#view.getUint32(this.#take(4)); }

  #str(n) {
    const at = this.#take(n);
    try {
      return UTF8_DECODER.decode(this.#bytes.subarray(at, at + n));
    } catch {
      throw new MsgpackError(`invalid utf-8 in the str at byte ${at}`);
    }
  }

  #bin(n) {
    const at = this.#take(n);
    return this.#bytes.slice(at, at + n);
  }

  #count(n, minBytesEach) { // a length that the bytes left can hold at all
    if (n * minBytesEach > this.#bytes.length - this.#pos) {
      throw new MsgpackError(`truncated: ${n} items cannot fit in what is left`);
    }
    return n;
  }

  #array(n, depth) {
    this.#count(n, 1);
    const out = [];
    for (let i = 0; i < n; i += 1) out.push(this.value(depth + 1));
    return out;
  }

  #map(n, depth) {
    this.#count(n, 2);
    const out = {};
    for (let i = 0; i < n; i += 1) {
      const key = this.value(depth + 1);
      if (typeof key !== "string") throw new MsgpackError("a map key is not a str");
      const val = this.value(depth + 1);
      // "__proto__" as an own property, not the object's prototype (as JSON.parse does)
      if (key === "__proto__") {
        Object.defineProperty(out, key, { value: val, enumerable: true, writable: true,
          configurable: true });
      } else {
        out[key] = val;
      }
    }
    return out;
  }

  static #safe(b) { // an int64/uint64 BigInt as a Number when that is exact
    return b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(b) : b;
  }

  value(depth) {
    if (depth > MSGPACK_MAX_DEPTH) throw new MsgpackError("nested too deep");
    const at = this.#pos;
    const t = this.#u8();
    if (t < 0x80) return t;
    if (t >= 0xe0) return t - 0x100;
    if (t < 0x90) return this.#map(t & 0x0f, depth);
    if (t < 0xa0) return this.#array(t & 0x0f, depth);
    if (t < 0xc0) return this.#str(t & 0x1f);
    const v = this.#view;
    switch (t) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.#bin(this.#u8());
      case 0xc5: return this.#bin(this.#u16());
      case 0xc6: return this.#bin(this.#u32());
      case 0xca: return v.getFloat32(this.#take(4));
      case 0xcb: return v.getFloat64(this.#take(8));
      case 0xcc: return this.#u8();
      case 0xcd: return this.#u16();
      case 0xce: return this.#u32();
      case 0xcf: return MsgpackReader.#safe(v.getBigUint64(this.#take(8)));
      case 0xd0: return v.getInt8(this.#take(1));
      case 0xd1: return v.getInt16(this.#take(2));
      case 0xd2: return v.getInt32(this.#take(4));
      case 0xd3: return MsgpackReader.#safe(v.getBigInt64(this.#take(8)));
      case 0xd9: return this.#str(this.#u8());
      case 0xda: return this.#str(this.#u16());
      case 0xdb: return this.#str(this.#u32());
      case 0xdc: return this.#array(this.#u16(), depth);
      case 0xdd: return this.#array(this.#u32(), depth);
      case 0xde: return this.#map(this.#u16(), depth);
      case 0xdf: return this.#map(this.#u32(), depth);
      default: // 0xc1 (never used), 0xc7-0xc9 and 0xd4-0xd8 (ext)
        throw new MsgpackError(`type byte 0x${t.toString(16)} at byte ${at} is not supported`);
    }
  }
}

/** `value` as MessagePack bytes (a Uint8Array); throws a MsgpackError if it has no form. */
export function msgpackEncode(value) {
  const w = new MsgpackWriter();
  w.value(value, 0);
  return w.bytes();
}

/**
 * The one MessagePack value in `data` (a Uint8Array, another ArrayBuffer view, or an
 * ArrayBuffer); throws a MsgpackError if the bytes are not exactly one value.
 */
export function msgpackDecode(data) {
  let bytes;
  if (data instanceof Uint8Array) bytes = data;
  else if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
  else if (ArrayBuffer.isView(data)) {
    bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  }
  else throw new TypeError("msgpackDecode takes bytes (a Uint8Array or an ArrayBuffer)");
  const r = new MsgpackReader(bytes);
  const value = r.value(0);
  if (!r.done) throw new MsgpackError("bytes left over after the value");
  return value;
}
