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
 *  - Frames are JSON text (the server answers in kind). MessagePack would
 *    need a codec library here; JSON is what this client speaks.
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

/** A fresh client id for a message: 24 hex digits from the platform's CSPRNG. */
export function newCid() {
  const bytes = new Uint8Array(12);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
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

const DEFAULTS = Object.freeze({
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
   * @param {number} [options.last=0]  resume after this message id (the highest one the caller has)
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
    this.#o = o;
    this.#last = Number(o.last) || 0;
  }

  /** One of STATE. */
  get state() { return this.#state; }
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
    ws.onopen = () => { if (serial === this.#serial) this.#opened(); };
    ws.onmessage = (ev) => { if (serial === this.#serial) this.#frame(ev.data); };
    ws.onclose = (ev) => { if (serial === this.#serial) this.#lost(serial, ev.code, ev.reason); };
    ws.onerror = () => { /* a close event follows */ };
  }

  #opened() {
    this.#heardAt = Date.now();
    this.#setState(STATE.OPEN, { attempt: this.#attempt });
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
    this.#ws.send(JSON.stringify(obj));
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
    if (typeof data !== "string") return; // this client speaks JSON; it sends no binary
    let f;
    try {
      f = JSON.parse(data);
    } catch {
      return;
    }
    if (f === null || typeof f !== "object") return;
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
    if (typeof id === "number" && id > this.#last) this.#last = id;
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
