// chatd web client: accounts, friends, groups, private and group chat, images.
//
// Talks to the HTTP API of the origin it was served from and to the chat
// websocket on the same host name, chat port (from /config.json), through
// the client library /static/chatd.js. Nothing received is ever put into the
// page as HTML: text goes in with textContent, images only from this server.
//
// The token lives in memory and sessionStorage (this tab; it survives a
// reload, not the tab), never in the page's URL. Per user, sessionStorage
// also keeps the resume point (last id), the conversations with their unread
// counts, and the messages not acked yet (sent again, same cid, after a reload).

import { ChatClient, CMD, MEDIA, newCid, STATE, wsUrlFor } from "./chatd.js";

const $ = (id) => document.getElementById(id);
const SESSION_KEY = "chatd.session";
const HISTORY_PAGE = 30;
const EMOJI = ["😀", "😂", "😊", "😍", "😎", "🤔", "😢", "😡", "👍", "👎", "👏", "🙏", "💪", "🎉",
  "❤️", "🔥", "✨", "🌟", "☕", "🍕", "🍺", "🎂", "🚀", "👋"];

/** The app's state; one object so that reading the code shows what is kept. */
const S = {
  me: null, // {id, nickname, ...}
  token: "",
  chat: null, // ChatClient
  convs: new Map(), // "u:ID" | "g:ID" -> conversation
  active: null, // key of the open conversation
  users: new Map(), // uid -> {id, nickname}
  lookups: new Map(), // uid -> Promise of a /user/find
  groups: new Map(), // gid -> group
  registering: false,
};

// --- the HTTP API ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, msg) {
    super(msg || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, fields = {}) {
  const headers = { "Content-Type": "application/json" };
  if (S.token) headers.Authorization = `Bearer ${S.token}`;
  let resp;
  try {
    resp = await fetch(path, { method: "POST", headers, body: JSON.stringify(fields) });
  } catch {
    throw new ApiError(0, "the server cannot be reached");
  }
  let body = null;
  try {
    body = await resp.json();
  } catch { /* not JSON: said below */ }
  if (!body || body.code !== 0) throw new ApiError(resp.status, body ? body.msg : resp.statusText);
  return body;
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file);
  let resp;
  try {
    resp = await fetch("/attach/upload", {
      method: "POST", headers: { Authorization: `Bearer ${S.token}` }, body: form });
  } catch {
    throw new ApiError(0, "the server cannot be reached");
  }
  const body = await resp.json().catch(() => null);
  if (!body || body.code !== 0) throw new ApiError(resp.status, body ? body.msg : "upload failed");
  return body;
}

// --- names -------------------------------------------------------------------------

function remember(user) {
  S.users.set(user.id, user);
  for (const el of document.querySelectorAll(`[data-uid="${user.id}"]`)) el.textContent = label(user.id);
}

function label(uid) {
  const user = S.users.get(uid);
  return user && user.nickname ? user.nickname : `user ${uid}`;
}

function lookUp(uid) {
  if (S.users.has(uid) || S.lookups.has(uid)) return;
  S.lookups.set(uid, api("/user/find", { id: uid }).then((r) => remember(r.data), () => {}));
}

function nameEl(uid, tag = "span", cls = "name") {
  const el = document.createElement(tag);
  el.className = cls;
  el.dataset.uid = uid;
  el.textContent = label(uid);
  lookUp(uid);
  return el;
}

function convTitle(conv) {
  if (conv.kind === "g") {
    const g = S.groups.get(conv.id);
    return g ? `${g.name} (#${g.id})` : `group #${conv.id}`;
  }
  return label(conv.id);
}

// --- session -------------------------------------------------------------------------

function stateKey() { return `chatd.state.${S.me.id}`; }

function saveSession() {
  sessionStorage.setItem(SESSION_KEY, JSON.stringify({ me: S.me, token: S.token }));
}

let saveQueued = false;
function saveState() {
  if (saveQueued || !S.me) return;
  saveQueued = true;
  queueMicrotask(() => {
    saveQueued = false;
    if (!S.me || !S.chat) return;
    const convs = [...S.convs.values()].sort((a, b) => b.touched - a.touched)
      .map((c) => ({ key: c.key, unread: c.unread, readUpTo: c.readUpTo }));
    sessionStorage.setItem(stateKey(), JSON.stringify({ last: S.chat.last, convs,
      outbox: S.chat.pendingMessages(), active: S.active }));
  });
}

function loadState() {
  try {
    return JSON.parse(sessionStorage.getItem(stateKey()) || "null");
  } catch {
    return null;
  }
}

// --- conversations -------------------------------------------------------------------

function convKeyOf(m) {
  if (m.cmd === CMD.GROUP) return `g:${m.dstid}`;
  return m.userid && m.userid !== S.me.id ? `u:${m.userid}` : `u:${m.dstid}`;
}

function conv(key) {
  let c = S.convs.get(key);
  if (!c) {
    const [kind, id] = key.split(":");
    c = { key, kind, id: Number(id), msgs: new Map(), pending: new Map(), unread: 0,
      readUpTo: 0, more: true, loading: false, historyLoaded: false, touched: 0 };
    S.convs.set(key, c);
    if (kind === "u") lookUp(c.id);
  }
  return c;
}

let touches = 0;

/** The conversation had news: it goes to the top of the list. */
function touch(c) {
  touches += 1;
  c.touched = touches;
}

function renderConvList() {
  const list = $("conv-list");
  list.replaceChildren();
  const convs = [...S.convs.values()].sort((a, b) => b.touched - a.touched);
  let total = 0;
  for (const c of convs) {
    const li = document.createElement("li");
    li.dataset.key = c.key;
    if (c.key === S.active) li.classList.add("active");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = convTitle(c);
    if (c.kind === "u") name.dataset.uid = c.id;
    li.append(name);
    if (c.unread > 0) {
      const badge = document.createElement("span");
      badge.className = "badge unread";
      badge.textContent = String(c.unread);
      li.append(badge);
    }
    total += c.unread;
    li.addEventListener("click", () => openConv(c.key));
    list.append(li);
  }
  $("no-convs").hidden = convs.length > 0;
  const badge = $("total-unread");
  badge.hidden = total === 0;
  badge.textContent = String(total);
  document.title = total ? `(${total}) chatd` : "chatd";
}

function markRead(c) {
  let top = c.readUpTo;
  for (const id of c.msgs.keys()) if (id > top) top = id;
  if (c.unread === 0 && top === c.readUpTo) return;
  c.unread = 0;
  c.readUpTo = top;
  renderConvList();
  saveState();
}

function visible(c) {
  return S.active === c.key && document.visibilityState === "visible";
}

/** A message from the server (live, replayed or from history) into its conversation. */
function addMessage(m, { fromHistory = false } = {}) {
  const c = conv(convKeyOf(m));
  if (!m.id || c.msgs.has(m.id)) return;
  if (m.userid === S.me.id && m.cid && c.pending.has(m.cid)) {
    // our own message, stored already: this copy stands for the pending one
    c.pending.delete(m.cid);
    document.querySelector(`#msg-list li[data-cid="${CSS.escape(m.cid)}"]:not([data-id])`)?.remove();
  }
  c.msgs.set(m.id, m);
  if (!fromHistory) touch(c);
  if (!fromHistory && m.userid !== S.me.id && m.id > c.readUpTo) {
    if (visible(c)) c.readUpTo = m.id;
    else c.unread += 1;
  }
  if (S.active === c.key) insertMessage(m);
  renderConvList();
  saveState();
}

function onAck(c, msg, ack) {
  const el = document.querySelector(`#msg-list li[data-cid="${CSS.escape(msg.cid)}"]:not([data-id])`);
  c.pending.delete(msg.cid);
  if (c.msgs.has(ack.id)) {
    if (S.active === c.key) el?.remove();
  } else {
    const stored = { ...msg, id: ack.id, ts: ack.ts, userid: S.me.id };
    c.msgs.set(ack.id, stored);
    if (S.active === c.key) {
      el?.remove();
      insertMessage(stored);
    }
  }
  if (ack.id > c.readUpTo) c.readUpTo = ack.id;
  renderConn();
  renderConvList();
  saveState();
}

/** Queue one message of ours; it shows at once as "sending" and settles with its ack. */
function sendMessage(c, fields, cid = newCid()) {
  const msg = { cmd: c.kind === "g" ? CMD.GROUP : CMD.PRIVATE, dstid: c.id, ...fields, cid };
  c.pending.set(cid, msg);
  touch(c);
  if (S.active === c.key) insertMessage(msg, true);
  S.chat.send(msg).then((ack) => onAck(c, msg, ack), (err) => {
    c.pending.delete(cid);
    const el = document.querySelector(`#msg-list li[data-cid="${CSS.escape(cid)}"]:not([data-id])`);
    if (el) {
      el.classList.remove("pending");
      el.classList.add("failed");
      el.querySelector(".meta").textContent = `not sent: ${err.message}`;
    }
    renderConn();
    saveState();
  });
  renderConn();
  renderConvList();
  saveState();
}

// --- rendering messages ----------------------------------------------------------------

/** Only images this server stores are shown inline (img-src 'self'); others are links. */
function ownUrl(u) {
  return typeof u === "string" && u.startsWith("/") && !u.startsWith("//");
}

function safeLink(u) {
  return typeof u === "string" && /^(https?:\/\/|\/(?!\/))/.test(u);
}

function messageEl(m, pending) {
  const mine = m.userid === S.me.id || pending;
  const li = document.createElement("li");
  li.className = `msg ${mine ? "mine" : "theirs"}${pending ? " pending" : ""}`;
  if (m.id) li.dataset.id = m.id;
  if (m.cid) li.dataset.cid = m.cid;
  if (m.cmd === CMD.GROUP && !mine) li.append(nameEl(m.userid, "span", "author"));
  li.append(bodyEl(m));
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = m.ts ? new Date(m.ts).toLocaleTimeString([], { hour: "2-digit",
    minute: "2-digit" }) : "";
  li.append(meta);
  return li;
}

function bodyEl(m) {
  const media = m.media || MEDIA.TEXT;
  if (media === MEDIA.IMAGE && (ownUrl(m.pic) || ownUrl(m.url))) {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "thumb";
    const img = document.createElement("img");
    img.src = ownUrl(m.pic) ? m.pic : m.url;
    img.alt = "an image";
    btn.append(img);
    btn.addEventListener("click", () => showOriginal(ownUrl(m.url) ? m.url : img.src));
    return btn;
  }
  const span = document.createElement("span");
  if (media === MEDIA.EMOJI) {
    span.className = "emoji";
    span.textContent = m.content || "";
    return span;
  }
  span.className = "text";
  if (m.content) {
    span.textContent = m.content;
  } else if (safeLink(m.url)) {
    const a = document.createElement("a");
    a.href = m.url;
    a.rel = "noopener noreferrer";
    a.target = "_blank";
    a.textContent = m.memo || m.url;
    span.append(a);
  } else {
    span.textContent = `[a message of type ${media}]`;
  }
  return span;
}

/** Into the open conversation's list: stored ones by id, then the pending in send order. */
function insertMessage(m, pending = false) {
  const list = $("msg-list");
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
  const el = messageEl(m, pending);
  if (pending) {
    list.append(el);
  } else {
    let before = null;
    for (const child of list.children) {
      if (!child.dataset.id || Number(child.dataset.id) > m.id) {
        before = child;
        break;
      }
    }
    list.insertBefore(el, before);
  }
  if (atBottom || pending) box.scrollTop = box.scrollHeight;
}

function renderMessages(c) {
  const list = $("msg-list");
  list.replaceChildren();
  const ids = [...c.msgs.keys()].sort((a, b) => a - b);
  for (const id of ids) list.append(messageEl(c.msgs.get(id), false));
  for (const m of c.pending.values()) list.append(messageEl(m, true));
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function historyStatus(c) {
  $("history-status").textContent = c.loading ? "loading…"
    : c.more ? "scroll up for older messages" : "the beginning of the conversation";
}

async function loadOlder(c) {
  if (c.loading || !c.more) return;
  c.loading = true;
  historyStatus(c);
  const fields = c.kind === "g" ? { gid: c.id } : { dstid: c.id };
  fields.limit = HISTORY_PAGE;
  const ids = [...c.msgs.keys()];
  if (ids.length) fields.before = Math.min(...ids);
  try {
    const { data } = await api("/chat/history", fields);
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    for (const m of data.rows) addMessage(m, { fromHistory: true });
    c.more = data.more;
    c.historyLoaded = true;
    if (S.active === c.key) box.scrollTop = box.scrollHeight - fromBottom;
    // a short page leaves nothing to scroll: fetch on until it can
    if (c.more && S.active === c.key && box.scrollHeight <= box.clientHeight) {
      queueMicrotask(() => loadOlder(c));
    }
  } catch (err) {
    $("chat-error").textContent = `history: ${err.message}`;
  } finally {
    c.loading = false;
    if (S.active === c.key) historyStatus(c);
  }
}

// --- opening a conversation -------------------------------------------------------------

function openConv(key) {
  const c = conv(key);
  S.active = key;
  document.body.classList.add("in-chat");
  $("chat-title").textContent = convTitle(c);
  if (c.kind === "u") $("chat-title").dataset.uid = c.id;
  else delete $("chat-title").dataset.uid;
  $("composer").hidden = false;
  $("members").hidden = true;
  $("members-btn").hidden = c.kind !== "g";
  const g = c.kind === "g" ? S.groups.get(c.id) : null;
  $("leave-btn").hidden = !(g && g.ownerid !== S.me.id);
  $("chat-error").textContent = "";
  $("emoji-panel").hidden = true;
  renderMessages(c);
  historyStatus(c);
  markRead(c);
  renderConvList();
  saveState();
  if (!c.historyLoaded) loadOlder(c);
  $("text").focus();
}

function closeConv() {
  document.body.classList.remove("in-chat");
}

// --- side panels ----------------------------------------------------------------------

function showPanel(name) {
  for (const tab of document.querySelectorAll(".side .tab")) {
    tab.classList.toggle("active", tab.dataset.panel === name);
  }
  for (const p of ["chats", "friends", "groups"]) $(`panel-${p}`).hidden = p !== name;
  if (name === "friends") loadFriends();
  if (name === "groups") loadGroups();
}

async function loadFriends() {
  try {
    const { data } = await api("/contact/loadfriend");
    const list = $("friend-list");
    list.replaceChildren();
    for (const f of data.rows) {
      remember(f);
      const li = document.createElement("li");
      li.dataset.friend = f.id;
      li.append(nameEl(f.id));
      const sub = document.createElement("span");
      sub.className = "sub";
      sub.textContent = `#${f.id}`;
      li.append(sub);
      li.addEventListener("click", () => openConv(`u:${f.id}`));
      list.append(li);
    }
  } catch (err) {
    $("friends-error").textContent = err.message;
  }
}

async function loadGroups() {
  try {
    const { data } = await api("/contact/loadcommunity");
    S.groups = new Map(data.rows.map((g) => [g.id, g]));
    const list = $("group-list");
    list.replaceChildren();
    for (const g of data.rows) {
      const li = document.createElement("li");
      li.dataset.gid = g.id;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = g.name;
      const sub = document.createElement("span");
      sub.className = "sub";
      sub.textContent = `#${g.id}`;
      li.append(name, sub);
      li.addEventListener("click", () => openConv(`g:${g.id}`));
      list.append(li);
    }
    renderConvList();
  } catch (err) {
    $("groups-error").textContent = err.message;
  }
}

let found = null;

async function onFind(ev) {
  ev.preventDefault();
  $("friends-error").textContent = "";
  $("found").hidden = true;
  const id = Number($("find-id").value.trim());
  if (!Number.isInteger(id) || id <= 0) {
    $("friends-error").textContent = "a user id is a positive number";
    return;
  }
  try {
    found = (await api("/user/find", { id })).data;
    remember(found);
    $("found-name").textContent = `${found.nickname || "(no nickname)"} #${found.id}`;
    $("found").hidden = false;
    $("add-friend").hidden = found.id === S.me.id;
  } catch (err) {
    $("friends-error").textContent = err.message;
  }
}

async function onAddFriend() {
  if (!found) return;
  try {
    await api("/contact/addfriend", { dstid: found.id });
    $("found").hidden = true;
    $("find-id").value = "";
    await loadFriends();
  } catch (err) {
    $("friends-error").textContent = err.message;
  }
}

async function onCreateGroup(ev) {
  ev.preventDefault();
  $("groups-error").textContent = "";
  const name = $("group-name").value.trim();
  if (!name) {
    $("groups-error").textContent = "give the group a name";
    return;
  }
  try {
    await api("/contact/createcommunity", { name });
    $("group-name").value = "";
    await loadGroups();
  } catch (err) {
    $("groups-error").textContent = err.message;
  }
}

async function onJoinGroup(ev) {
  ev.preventDefault();
  $("groups-error").textContent = "";
  const id = Number($("join-id").value.trim());
  if (!Number.isInteger(id) || id <= 0) {
    $("groups-error").textContent = "a group id is a positive number";
    return;
  }
  try {
    await api("/contact/joincommunity", { dstid: id });
    $("join-id").value = "";
    await loadGroups();
  } catch (err) {
    $("groups-error").textContent = err.message;
  }
}

async function onMembers() {
  const c = S.convs.get(S.active);
  const box = $("members");
  if (!c || c.kind !== "g") return;
  if (!box.hidden) {
    box.hidden = true;
    return;
  }
  try {
    const { data } = await api("/contact/members", { dstid: c.id });
    box.replaceChildren();
    for (const u of data.rows) {
      remember(u);
      box.append(nameEl(u.id, "li", "member"));
    }
    box.hidden = false;
  } catch (err) {
    $("chat-error").textContent = err.message;
  }
}

async function onLeave() {
  const c = S.convs.get(S.active);
  if (!c || c.kind !== "g") return;
  try {
    await api("/contact/quitcommunity", { dstid: c.id });
    S.convs.delete(c.key);
    S.active = null;
    $("chat-title").textContent = "Pick a conversation";
    $("msg-list").replaceChildren();
    $("composer").hidden = true;
    $("members-btn").hidden = $("leave-btn").hidden = $("members").hidden = true;
    closeConv();
    await loadGroups();
    saveState();
  } catch (err) {
    $("chat-error").textContent = err.message;
  }
}

// --- composer ------------------------------------------------------------------------

function onCompose(ev) {
  ev.preventDefault();
  const c = S.convs.get(S.active);
  const text = $("text").value;
  if (!c || !text.trim()) return;
  sendMessage(c, { media: MEDIA.TEXT, content: text });
  $("text").value = "";
  $("text").focus();
}

async function onFile() {
  const input = $("file");
  const file = input.files[0];
  const c = S.convs.get(S.active);
  input.value = "";
  if (!file || !c) return;
  $("chat-error").textContent = "uploading…";
  try {
    const up = await upload(file);
    $("chat-error").textContent = "";
    sendMessage(c, { media: MEDIA.IMAGE, url: up.url, pic: up.pic });
  } catch (err) {
    $("chat-error").textContent = `upload: ${err.message}`;
  }
}

function buildEmojiPanel() {
  const panel = $("emoji-panel");
  for (const e of EMOJI) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = e;
    b.addEventListener("click", () => {
      const c = S.convs.get(S.active);
      if (c) sendMessage(c, { media: MEDIA.EMOJI, content: e });
      panel.hidden = true;
    });
    panel.append(b);
  }
}

function showOriginal(url) {
  $("lightbox-img").src = url;
  $("lightbox-open").href = url;
  $("lightbox").hidden = false;
}

// --- connection state -------------------------------------------------------------------

const STATE_TEXT = {
  [STATE.IDLE]: "not connected",
  [STATE.CONNECTING]: "connecting…",
  [STATE.OPEN]: "online",
  [STATE.WAITING]: "offline, reconnecting…",
  [STATE.CLOSED]: "disconnected",
};

let refreshing = false;
let connDetail = { state: STATE.IDLE };

/** The connection badge: the client's state, and how many messages wait. */
function renderConn() {
  const detail = connDetail;
  const el = $("conn");
  el.dataset.state = detail.state;
  let text = STATE_TEXT[detail.state] ?? detail.state;
  if (detail.state === STATE.WAITING && detail.delayMs) {
    text = `offline, retrying in ${Math.max(1, Math.round(detail.delayMs / 1000))} s`;
  }
  const queued = S.chat ? S.chat.pending : 0;
  el.textContent = queued && detail.state !== STATE.OPEN ? `${text} (${queued} queued)` : text;
}

function onState(detail) {
  connDetail = detail;
  renderConn();
  // a browser does not show why a websocket handshake failed: after a few
  // failures, ask the API whether the token still works (and renew it)
  if (detail.state === STATE.WAITING && detail.attempt % 3 === 0 && !refreshing) {
    refreshing = true;
    api("/user/refresh").then(({ data }) => {
      S.token = data.token;
      S.chat?.setToken(data.token);
      saveSession();
    }, (err) => {
      if (err.status === 401 || err.status === 403) logout(`Please log in again (${err.message}).`);
    }).finally(() => { refreshing = false; });
  }
}

// --- log in and out -----------------------------------------------------------------------

function showAuth(message = "") {
  $("main").hidden = true;
  $("logout").hidden = true;
  $("me").textContent = "";
  $("auth").hidden = false;
  $("auth-error").textContent = message;
  connDetail = { state: STATE.IDLE };
  renderConn();
}

function setAuthMode(register) {
  S.registering = register;
  $("tab-login").classList.toggle("active", !register);
  $("tab-register").classList.toggle("active", register);
  $("nickname-row").hidden = !register;
  $("auth-submit").textContent = register ? "Register" : "Log in";
  $("passwd").autocomplete = register ? "new-password" : "current-password";
}

async function onAuth(ev) {
  ev.preventDefault();
  $("auth-error").textContent = "";
  const fields = { mobile: $("mobile").value.trim(), passwd: $("passwd").value };
  if (S.registering) fields.nickname = $("nickname").value.trim();
  S.token = "";
  try {
    const { data } = await api(S.registering ? "/user/register" : "/user/login", fields);
    $("passwd").value = "";
    const { token, ...me } = data;
    S.me = me;
    S.token = token;
    saveSession();
    await enter();
  } catch (err) {
    $("auth-error").textContent = err.message;
  }
}

function logout(message = "") {
  S.chat?.close();
  if (S.me) sessionStorage.removeItem(stateKey());
  sessionStorage.removeItem(SESSION_KEY);
  Object.assign(S, { me: null, token: "", chat: null, active: null });
  S.convs.clear();
  $("msg-list").replaceChildren();
  $("conv-list").replaceChildren();
  document.body.classList.remove("in-chat");
  showAuth(message);
}

async function enter() {
  $("auth").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = `${S.me.nickname || "me"} #${S.me.id}`;
  remember(S.me);
  let cfg;
  try {
    cfg = await (await fetch("/config.json")).json();
  } catch {
    cfg = { chat_port: 8080, ws_path: "/chat" };
  }
  const saved = loadState();
  const chat = new ChatClient({ url: wsUrlFor(location, cfg.chat_port, cfg.ws_path),
    uid: S.me.id, token: S.token, last: saved ? saved.last : 0 });
  S.chat = chat;
  for (const c of saved ? [...saved.convs].reverse() : []) {
    const restored = conv(c.key);
    restored.unread = c.unread;
    restored.readUpTo = c.readUpTo;
    touch(restored);
  }
  chat.addEventListener("state", (ev) => onState(ev.detail));
  chat.addEventListener("message", (ev) => addMessage(ev.detail.message));
  chat.addEventListener("synced", () => saveState());
  chat.addEventListener("fatal", (ev) => logout(ev.detail.code === 4502
    ? "This account is banned." : "Your session ended; please log in again."));
  // what was written but not acked before a reload goes again, same cid
  for (const m of saved ? saved.outbox : []) sendMessage(conv(convKeyOf({ ...m, userid: S.me.id })), m, m.cid);
  await loadGroups();
  renderConvList();
  chat.start();
  if (saved && saved.active) openConv(saved.active);
}

function boot() {
  $("tab-login").addEventListener("click", () => setAuthMode(false));
  $("tab-register").addEventListener("click", () => setAuthMode(true));
  $("auth-form").addEventListener("submit", onAuth);
  // this tab forgets the token; /user/revoke would end every device's session
  $("logout").addEventListener("click", () => logout());
  for (const tab of document.querySelectorAll(".side .tab")) {
    tab.addEventListener("click", () => showPanel(tab.dataset.panel));
  }
  $("find-form").addEventListener("submit", onFind);
  $("add-friend").addEventListener("click", onAddFriend);
  $("found-chat").addEventListener("click", () => found && openConv(`u:${found.id}`));
  $("create-group-form").addEventListener("submit", onCreateGroup);
  $("join-group-form").addEventListener("submit", onJoinGroup);
  $("members-btn").addEventListener("click", onMembers);
  $("leave-btn").addEventListener("click", onLeave);
  $("back").addEventListener("click", closeConv);
  $("composer").addEventListener("submit", onCompose);
  $("file").addEventListener("change", onFile);
  $("emoji-btn").addEventListener("click", () => { $("emoji-panel").hidden = !$("emoji-panel").hidden; });
  $("lightbox").addEventListener("click", (ev) => {
    if (ev.target !== $("lightbox-open")) $("lightbox").hidden = true;
  });
  $("messages").addEventListener("scroll", () => {
    const c = S.convs.get(S.active);
    if (c && $("messages").scrollTop < 40) loadOlder(c);
  });
  document.addEventListener("visibilitychange", () => {
    const c = S.convs.get(S.active);
    if (c && document.visibilityState === "visible") markRead(c);
    if (document.visibilityState === "visible") S.chat?.reconnectNow();
  });
  window.addEventListener("online", () => S.chat?.reconnectNow());
  buildEmojiPanel();
  let session = null;
  try {
    session = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
  } catch { /* start over */ }
  if (session && session.me && session.token) {
    S.me = session.me;
    S.token = session.token;
    enter();
  } else {
    setAuthMode(false);
    showAuth();
  }
}

boot();
