// The Usher page: who is signed in, access requests (ask, review, revoke), commands waiting
// for approval inside sessions (approve, deny, watch the session live) and the recorded
// sessions (search, replay, and the request each one came from). Everything goes through
// the JSON API with the session cookie; whatever changes state also carries the CSRF token
// the server rendered into the page.
"use strict";

const csrfMeta = document.querySelector('meta[name="usher-csrf"]');
const csrf = csrfMeta ? csrfMeta.content : "";
const params = new URLSearchParams(location.search);
let me = null;
let player = null;
let refresh = null;
let shown = { id: null, stream: null, data: null, next: null };

class ApiError extends Error {
  constructor(path, status, message) {
    super(message + " (" + status + ")");
    this.status = status;
    this.path = path;
  }
}

async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-Usher-CSRF"] = csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) {
    let message = r.statusText;
    try { message = (await r.json()).error || message; } catch (_) { /* not JSON */ }
    throw new ApiError(path, r.status, message);
  }
  return r;
}
const getJson = async (path) => (await call("GET", path)).json();
const postJson = async (path, body) => (await call("POST", path, body)).json();

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value == null ? "" : String(value);
  if (cls) el.className = cls;
  return el;
}

function cell(tr, value, cls) {
  const td = text("td", value, cls);
  tr.appendChild(td);
  return td;
}

function say(message, isError) {
  const el = document.getElementById("message");
  el.textContent = message || "";
  el.className = isError ? "error" : "";
}

function when(unix) {
  return unix ? new Date(unix * 1000).toISOString().replace(".000Z", "Z") : "";
}

function duration(secs) {
  if (secs % 3600 === 0) return secs / 3600 + "h";
  if (secs % 60 === 0) return secs / 60 + "m";
  return secs + "s";
}

// "1h", "90m", "1h30m", "45s"; a bare number is minutes.
function parseDuration(value) {
  const v = value.trim();
  if (/^\d+$/.test(v)) return Number(v) * 60;
  const units = { s: 1, m: 60, h: 3600, d: 86400 };
  let total = 0;
  const rest = v.replace(/(\d+)\s*([smhd])/g, (_, n, u) => { total += Number(n) * units[u]; return ""; });
  if (rest.trim() !== "" || total === 0) throw new Error("a duration is like 1h, 30m or 1h30m");
  return total;
}

function hasRole(role) {
  return !!me && (me.roles.includes(role) || me.roles.includes("admin"));
}

function reviewsText(r) {
  return (r.reviews || []).map((v) => v.name + " " + (v.decision === "approve" ? "approved" : "denied") +
    (v.comment ? ": " + v.comment : "")).join("; ") + (r.auto_approved ? "approved automatically (" + r.auto_approved + ")" : "");
}

function button(label, cls, onClick) {
  const b = text("button", label, cls);
  b.type = "button";
  b.addEventListener("click", async () => {
    b.disabled = true;
    try { await onClick(); } catch (e) { say(e.message, true); } finally { b.disabled = false; }
  });
  return b;
}

// ---- who am I --------------------------------------------------------------------------

async function whoAmI() {
  try {
    me = await getJson("/api/v1/me");
  } catch (e) {
    if (e.status !== 401) say(e.message, true);
    me = null;
  }
  document.getElementById("signed-out").hidden = !!me;
  document.getElementById("signed-in").hidden = !me;
  if (!me) {
    document.body.dataset.me = "";
    return;
  }
  document.getElementById("me-name").textContent = me.name;
  document.getElementById("me-roles").textContent = me.roles.length ? "(" + me.roles.join(", ") + ")" : "(no role)";
  document.body.dataset.me = me.name;
  document.body.dataset.roles = me.roles.join(" ");
}

async function signOut() {
  await call("POST", "/logout");
  location.assign("/");
}

// ---- requests --------------------------------------------------------------------------

async function submitRequest(ev) {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const value = (k) => (form.get(k) || "").toString().trim();
  try {
    const body = {
      host: value("host"),
      login: value("login"),
      duration_secs: parseDuration(value("duration")),
      reason: value("reason"),
    };
    if (value("profile")) body.profile = value("profile");
    if (value("ssh_key")) body.ssh_key = value("ssh_key");
    const r = await postJson("/api/v1/requests", body);
    say("Request " + r.id + " is " + r.state + ".");
    document.body.dataset.requested = r.id;
    await loadRequests();
  } catch (e) {
    say(e.message, true);
  }
}

async function review(id, decision, comment) {
  const r = await postJson("/api/v1/requests/" + encodeURIComponent(id) + "/review", { decision, comment });
  say("Request " + r.id + " is " + r.state + ".");
  document.body.dataset.reviewed = r.id + " " + r.state;
  await loadRequests();
}

async function revoke(grantId, reason) {
  const r = await postJson("/api/v1/grants/" + encodeURIComponent(grantId) + "/revoke", { reason });
  say("The grant of request " + r.id + " is revoked.");
  await loadRequests();
}

async function cancel(id) {
  const r = await postJson("/api/v1/requests/" + encodeURIComponent(id) + "/cancel");
  say("Request " + r.id + " is " + r.state + ".");
  await loadRequests();
}

function sessionsLink(r) {
  const q = new URLSearchParams({ host: r.host, login: r.login, from: when(r.created_at) });
  const a = text("a", "sessions");
  a.href = "/?" + q.toString();
  a.className = "sessions-link";
  return a;
}

function pendingRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.id = r.id;
  for (const v of [when(r.created_at), r.requester.name, r.host, r.login, r.profile || "", duration(r.duration_secs), r.reason]) cell(tr, v);
  cell(tr, (r.reviews || []).length + " of " + r.approvals_needed);
  const comment = document.createElement("input");
  comment.className = "comment";
  comment.placeholder = "comment";
  tr.appendChild(document.createElement("td")).appendChild(comment);
  const actions = tr.appendChild(document.createElement("td"));
  if (me && r.requester.sub === me.sub) {
    actions.appendChild(text("span", "yours"));
  } else {
    actions.appendChild(button("Approve", "approve", () => review(r.id, "approve", comment.value)));
    actions.appendChild(button("Deny", "deny", () => review(r.id, "deny", comment.value)));
  }
  return tr;
}

async function mineRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.id = r.id;
  for (const v of [when(r.created_at), r.host, r.login, duration(r.duration_secs), r.reason]) cell(tr, v);
  cell(tr, r.state, "state state-" + r.state);
  cell(tr, reviewsText(r));
  const grantCell = tr.appendChild(document.createElement("td"));
  const actions = tr.appendChild(document.createElement("td"));
  if (r.state === "approved") {
    // The grant itself is only in the single request's answer, and only for its requester.
    const full = await getJson("/api/v1/requests/" + encodeURIComponent(r.id)).catch(() => r);
    if (full.grant) {
      const area = text("textarea", full.grant, "grant");
      area.readOnly = true;
      area.title = "paste at the password prompt";
      grantCell.appendChild(area);
      grantCell.appendChild(text("div", "until " + when(full.expires_at)));
    }
    if (r.grant_id) actions.appendChild(button("Revoke", "revoke", () => revoke(r.grant_id, "revoked by its holder")));
  } else if (r.state === "pending") {
    actions.appendChild(button("Cancel", "cancel", () => cancel(r.id)));
  }
  if (r.grant_id) actions.appendChild(sessionsLink(r));
  return tr;
}

function grantRow(r) {
  const tr = document.createElement("tr");
  tr.dataset.id = r.id;
  const approvers = (r.reviews || []).filter((v) => v.decision === "approve").map((v) => v.name).join(", ") ||
    (r.auto_approved ? "automatic (" + r.auto_approved + ")" : "");
  for (const v of [r.requester.name, r.host, r.login, when(r.expires_at), r.reason, approvers]) cell(tr, v);
  const actions = tr.appendChild(document.createElement("td"));
  const reason = document.createElement("input");
  reason.className = "revoke-reason";
  reason.placeholder = "why";
  actions.appendChild(reason);
  actions.appendChild(button("Revoke", "revoke", () => revoke(r.grant_id, reason.value)));
  if (hasRole("auditor")) actions.appendChild(sessionsLink(r));
  return tr;
}

async function loadRequests() {
  if (!me) return;
  const requester = hasRole("requester");
  const approver = hasRole("approver");
  document.getElementById("request-section").hidden = !requester;
  document.getElementById("mine-section").hidden = !requester;
  document.getElementById("pending-section").hidden = !approver;
  document.getElementById("grants-section").hidden = !approver;
  if (requester) {
    const mine = await getJson("/api/v1/requests?mine=1");
    const rows = await Promise.all(mine.map(mineRow));
    document.getElementById("mine").replaceChildren(...rows);
    document.body.dataset.mine = mine.length;
  }
  if (approver) {
    const pending = await getJson("/api/v1/requests?state=pending");
    document.getElementById("pending").replaceChildren(...pending.map(pendingRow));
    document.body.dataset.pending = pending.length;
    const live = await getJson("/api/v1/requests?state=approved");
    document.getElementById("grants").replaceChildren(...live.filter((r) => r.grant_id).map(grantRow));
  }
}

// ---- commands waiting for approval inside sessions -------------------------------------

async function reviewCommand(id, decision, comment) {
  const c = await postJson("/api/v1/commands/" + encodeURIComponent(id) + "/review", { decision, comment });
  say("Command " + c.request.id + " is " + c.state + ".");
  document.body.dataset.commandReviewed = c.request.id + " " + c.state;
  await loadCommands();
}

// The session's page: its live replay, found by host and session id.
function liveLink(r) {
  const a = text("a", "watch");
  a.href = "/?" + new URLSearchParams({ host: r.host, play: r.session_id }).toString();
  a.className = "session-link";
  a.title = r.session_id;
  return a;
}

function commandRow(c) {
  const r = c.request;
  const tr = document.createElement("tr");
  tr.dataset.id = r.id;
  for (const v of [when(r.requested_at), r.sub, r.login + "@" + r.host]) cell(tr, v);
  const cmd = cell(tr, r.command, "command");
  if (r.program && r.program !== r.command) cmd.title = r.program;
  cell(tr, (c.decisions || []).filter((d) => d.approve).length + " of " + r.required);
  cell(tr, when(r.expires_at));
  tr.appendChild(document.createElement("td")).appendChild(liveLink(r));
  const comment = document.createElement("input");
  comment.className = "comment";
  comment.placeholder = "comment";
  tr.appendChild(document.createElement("td")).appendChild(comment);
  const actions = tr.appendChild(document.createElement("td"));
  if (me && r.sub === me.sub) {
    actions.appendChild(text("span", "yours"));
  } else {
    actions.appendChild(button("Approve", "approve", () => reviewCommand(r.id, "approve", comment.value)));
    actions.appendChild(button("Deny", "deny", () => reviewCommand(r.id, "deny", comment.value)));
  }
  return tr;
}

async function loadCommands() {
  if (!me) return;
  const approver = hasRole("approver");
  document.getElementById("commands-section").hidden = !approver;
  if (!approver) return;
  const pending = await getJson("/api/v1/commands?state=pending");
  document.getElementById("commands").replaceChildren(...pending.map(commandRow));
  document.body.dataset.commands = pending.length;
}

// ---- recordings ------------------------------------------------------------------------

async function search(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams();
  for (const [k, v] of new FormData(document.getElementById("search"))) if (v) q.set(k, v);
  document.getElementById("sessions").replaceChildren();
  // Set again once the rows are there (what a test waits for).
  delete document.body.dataset.found;
  await showSessions(q);
}

// One page of the search (newest first); "more" asks for the next one, where this one ended.
async function showSessions(q) {
  const page = await getJson("/api/v1/sessions?" + q);
  const body = document.getElementById("sessions");
  for (const s of page.sessions) {
    const tr = document.createElement("tr");
    tr.className = "session";
    tr.dataset.id = s.id;
    for (const v of [s.started_at, s.sub, s.host, s.login, s.commands]) cell(tr, v);
    cell(tr, s.status + (s.problem ? " (" + s.problem + ")" : "") + (s.hold ? " (legal hold)" : ""), "status-" + s.status);
    cell(tr, s.id);
    cell(tr, s.desktop ? "desktop" : "terminal", "recording");
    tr.addEventListener("click", () => replay(s.id).catch((e) => say(e.message, true)));
    body.appendChild(tr);
  }
  const more = document.getElementById("more-sessions");
  more.hidden = !page.next_cursor;
  more.onclick = () => {
    const next = new URLSearchParams(q);
    next.set("cursor", page.next_cursor);
    showSessions(next).catch((e) => say(e.message, true));
  };
  document.body.dataset.found = Number(document.body.dataset.found || 0) + page.sessions.length;
}

// The request a session's grant answered: named in its metadata (`grant.request`), or
// found by the grant's id.
async function requestOf(meta) {
  const grant = (meta && meta.grant) || {};
  if (grant.request) return getJson("/api/v1/requests/" + encodeURIComponent(grant.request));
  if (!grant.jti) return null;
  const all = await getJson("/api/v1/requests");
  return all.find((r) => r.grant_id === grant.jti) || null;
}

function showRequest(r, meta) {
  const el = document.getElementById("session-request");
  el.replaceChildren();
  el.hidden = false;
  if (!r) {
    const grant = (meta && meta.grant) || {};
    el.appendChild(text("p", "This session's grant did not come from a request here" +
      (grant.iss ? " (issued by " + grant.iss + ")" : "") + "."));
    document.body.dataset.request = "";
    return;
  }
  el.appendChild(text("h3", "Request " + r.id));
  const dl = document.createElement("dl");
  const row = (label, value, cls) => {
    dl.appendChild(text("dt", label));
    dl.appendChild(text("dd", value, cls));
  };
  row("requested by", r.requester.name, "requester");
  row("requested at", when(r.created_at), "requested-at");
  row("why", r.reason, "reason");
  row("asked for", r.login + "@" + r.host + " for " + duration(r.duration_secs) + (r.profile ? ", profile " + r.profile : ""));
  for (const v of r.reviews || []) {
    row(v.decision === "approve" ? "approved by" : "denied by", v.name, v.decision === "approve" ? "approver" : "denier");
    row("at", when(v.at), "reviewed-at");
    if (v.comment) row("comment", v.comment, "comment");
  }
  if (r.auto_approved) row("approved", "automatically by rule " + r.auto_approved, "approver");
  row("state", r.state, "state state-" + r.state);
  if (r.revoked) row("revoked by", r.revoked.by.name + " at " + when(r.revoked.at) + (r.revoked.reason ? ": " + r.revoked.reason : ""), "revoked");
  el.appendChild(dl);
  document.body.dataset.request = r.id;
}

// ---- desktop player --------------------------------------------------------------------

// Plays a desktop recording (agent-rdp/README.md, "Recording format": JSON lines, PNG
// keyframes and changed rectangles) on a canvas, the cursor on a canvas above it. Seeking
// to t draws the last keyframe at or before t and the rectangles after it up to t. It
// answers what the timeline and the tests ask of asciinema's player: getCurrentTime, seek,
// play, pause, dispose.
class DesktopPlayer {
  constructor(text, el, startAt) {
    const lines = text.split("\n").filter((l) => l.trim() !== "");
    this.header = JSON.parse(lines[0]);
    this.events = [];
    for (const line of lines.slice(1)) {
      try {
        const e = JSON.parse(line);
        if (Array.isArray(e) && typeof e[0] === "number" && typeof e[1] === "string") this.events.push(e);
      } catch (_) { /* a line cut short: skipped */ }
    }
    this.keyframes = [];
    this.events.forEach((e, i) => { if (e[1] === "k") this.keyframes.push(i); });
    this.duration = this.events.length ? this.events[this.events.length - 1][0] : 0;
    this.time = Math.min(Math.max(0, startAt || 0), this.duration);
    this.target = this.time;
    this.playing = false;
    this.speed = 1;
    this.pos = 0; // events before pos are on the screen
    this.drawn = -1; // the time the screen shows
    this.busy = false;
    this.cursor = null; // {image, hotX, hotY} or "hidden" or "default"
    this.pointer = null;
    this.build(el);
    this.resize(this.header.width, this.header.height);
    this.render();
  }

  build(el) {
    const root = document.createElement("div");
    root.className = "desktop-player";
    const stage = root.appendChild(document.createElement("div"));
    stage.className = "desktop-stage";
    this.screen = stage.appendChild(document.createElement("canvas"));
    this.screen.id = "desktop-screen";
    this.overlay = stage.appendChild(document.createElement("canvas"));
    this.overlay.id = "desktop-cursor";
    const controls = root.appendChild(document.createElement("div"));
    controls.className = "desktop-controls";
    this.playButton = controls.appendChild(text("button", "Play", "desktop-play"));
    this.playButton.type = "button";
    this.playButton.id = "desktop-play";
    this.playButton.addEventListener("click", () => (this.playing ? this.pause() : this.play()));
    this.slider = controls.appendChild(document.createElement("input"));
    this.slider.type = "range";
    this.slider.id = "desktop-seek";
    this.slider.min = "0";
    this.slider.max = String(this.duration);
    this.slider.step = "0.1";
    this.slider.addEventListener("input", () => this.seek(Number(this.slider.value)));
    const speed = controls.appendChild(document.createElement("select"));
    speed.id = "desktop-speed";
    for (const s of [1, 2, 4, 8]) speed.appendChild(text("option", s + "×")).value = String(s);
    speed.addEventListener("change", () => { this.setClock(); this.speed = Number(speed.value); });
    this.label = controls.appendChild(text("span", "", "desktop-time"));
    el.appendChild(root);
  }

  resize(w, h) {
    // A recording is what the session showed, and its user may be the attacker: a screen
    // size is believed only within what a recorder writes (8192 x 8192).
    if (!(Number.isInteger(w) && Number.isInteger(h) && w > 0 && h > 0 && w * h <= 8192 * 8192)) {
      throw new Error("a screen of " + w + "x" + h + " is not played");
    }
    for (const c of [this.screen, this.overlay]) { c.width = w; c.height = h; }
    const ctx = this.screen.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
  }

  getCurrentTime() { return this.time; }

  setClock() { this.clockTime = this.time; this.clockWall = performance.now(); }

  play() {
    if (this.playing) return;
    if (this.time >= this.duration) this.seek(0);
    this.playing = true;
    this.playButton.textContent = "Pause";
    this.setClock();
    const tick = () => {
      if (!this.playing) return;
      this.time = Math.min(this.duration, this.clockTime + (performance.now() - this.clockWall) / 1000 * this.speed);
      this.render();
      if (this.time >= this.duration) { this.pause(); return; }
      this.frame = requestAnimationFrame(tick);
    };
    this.frame = requestAnimationFrame(tick);
  }

  pause() {
    this.playing = false;
    this.playButton.textContent = "Play";
    if (this.frame) cancelAnimationFrame(this.frame);
  }

  seek(t) {
    this.time = Math.min(Math.max(0, t), this.duration);
    this.setClock();
    this.render();
  }

  dispose() { this.pause(); this.disposed = true; }

  render() {
    this.target = this.time;
    this.slider.value = String(this.time);
    this.label.textContent = this.time.toFixed(1) + " / " + this.duration.toFixed(1) + " s";
    this.pump().catch((e) => say("the desktop recording: " + e.message, true));
  }

  // The last keyframe at or before t, or -1.
  keyframeAt(t) {
    let lo = 0;
    let hi = this.keyframes.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.events[this.keyframes[mid]][0] <= t) lo = mid + 1; else hi = mid;
    }
    return lo === 0 ? -1 : this.keyframes[lo - 1];
  }

  // Starts again from keyframe k (or the start): the screen size, cursor and pointer as
  // the events before it left them.
  async restart(k) {
    let size = null;
    let cursor = null;
    let pointer = null;
    for (let i = k - 1; i >= 0 && !(size && cursor && pointer); i--) {
      const e = this.events[i];
      if (e[1] === "s" && !size) size = [e[2], e[3]];
      else if (e[1] === "c" && !cursor) cursor = e;
      else if (e[1] === "p" && !pointer) pointer = [e[2], e[3]];
    }
    size = size || [this.header.width, this.header.height];
    this.cursor = null;
    this.pointer = pointer;
    if (cursor) await this.apply(cursor);
    if (k < 0 || this.screen.width !== size[0] || this.screen.height !== size[1]) this.resize(size[0], size[1]);
    this.pos = Math.max(k, 0);
  }

  // One renderer at a time; a seek while it works is picked up when it is done.
  async pump() {
    if (this.busy || this.disposed) return;
    this.busy = true;
    try {
      while (!this.disposed) {
        const t = this.target;
        const k = this.keyframeAt(t);
        if (t < this.drawn || k >= this.pos) await this.restart(k);
        while (this.pos < this.events.length && this.events[this.pos][0] <= t) {
          await this.apply(this.events[this.pos]);
          this.pos++;
          if (this.target < t) break;
        }
        this.drawn = this.target < t ? -1 : t;
        this.drawCursor();
        if (this.target === t) break;
      }
    } finally {
      this.busy = false;
    }
    document.body.dataset.desktopDrawn = String(this.drawn);
  }

  async apply(e) {
    switch (e[1]) {
      case "k":
      case "f": {
        const image = await decodePng(e[6]);
        this.screen.getContext("2d").drawImage(image, e[2], e[3]);
        image.close();
        break;
      }
      case "s": this.resize(e[2], e[3]); break;
      case "p": this.pointer = [e[2], e[3]]; break;
      case "c":
        if (e[2] === "hidden" || e[2] === "default") this.cursor = e[2];
        else this.cursor = { image: await decodePng(e[6]), hotX: e[2], hotY: e[3] };
        break;
      default: break; // input and markers are not drawn
    }
  }

  drawCursor() {
    const ctx = this.overlay.getContext("2d");
    ctx.clearRect(0, 0, this.overlay.width, this.overlay.height);
    if (!this.pointer || this.cursor === "hidden") return;
    const [x, y] = this.pointer;
    if (this.cursor && this.cursor.image) {
      ctx.drawImage(this.cursor.image, x - this.cursor.hotX, y - this.cursor.hotY);
      return;
    }
    // The client's default arrow.
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x, y + 16);
    ctx.lineTo(x + 4, y + 12);
    ctx.lineTo(x + 11, y + 11);
    ctx.closePath();
    ctx.fillStyle = "#fff";
    ctx.strokeStyle = "#000";
    ctx.fill();
    ctx.stroke();
  }
}

async function decodePng(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return createImageBitmap(new Blob([bytes], { type: "image/png" }),
    { premultiplyAlpha: "none", colorSpaceConversion: "none" });
}

// Replays a session; `keepPosition` (a live session's refresh) resumes where the viewer was.
async function replay(id, keepPosition) {
  if (refresh) { clearTimeout(refresh); refresh = null; }
  const s = await getJson("/api/v1/sessions/" + encodeURIComponent(id));
  const desktop = (s.streams || []).includes("desktop");
  const stream = desktop ? "desktop" : "cast";
  const path = "/api/v1/sessions/" + encodeURIComponent(id) + "/" + stream;
  // A live session's refresh asks only for the chunks after those it holds
  // (X-Usher-Next-Chunk says where the next read resumes) and appends them.
  const growing = keepPosition && shown.id === id && shown.stream === stream && shown.next !== null;
  const r = await call("GET", growing ? path + "?from=" + shown.next : path);
  const received = await r.text();
  const data = growing ? shown.data + received : received;
  const nextHeader = Number.parseInt(r.headers.get("X-Usher-Next-Chunk"), 10);
  const next = Number.isInteger(nextHeader) && nextHeader >= 0 ? nextHeader : null;
  const start = data ? JSON.parse(data.split("\n")[0]).timestamp : 0;
  const el = document.getElementById("player");
  if (!(keepPosition && shown.id === id && shown.stream === stream && shown.data === data)) {
    let at = 0;
    let wasPlaying = true;
    if (keepPosition && player && shown.id === id) {
      at = await player.getCurrentTime();
      // A live desktop followed to its end goes on with what arrived since.
      if (player instanceof DesktopPlayer) wasPlaying = player.playing || at >= player.duration;
    }
    if (player) { player.dispose(); player = null; }
    el.replaceChildren();
    if (!data) { el.appendChild(text("p", "This session has no " + (desktop ? "desktop" : "terminal") + " recording yet.")); }
    else if (desktop) {
      player = new DesktopPlayer(data, el, at);
      if (wasPlaying) player.play();
    } else {
      player = AsciinemaPlayer.create({ data }, el,
        { autoPlay: true, idleTimeLimit: 1, speed: 4, fit: "width", startAt: at });
    }
    shown = { id, stream, data, next };
  }
  shown.next = next;
  const tl = document.getElementById("timeline");
  tl.replaceChildren(text("h3", "Commands"));
  for (const c of s.commands) {
    const at = Math.max(0, (c.time || start) - start);
    const row = text("div", at.toFixed(1) + "s " + c.verdict + " " + (c.argv || c.path) + (c.rule ? " [" + c.rule + "]" : ""), c.verdict);
    row.addEventListener("click", () => { if (player) { player.seek(at); player.play(); } });
    tl.appendChild(row);
  }
  if (!keepPosition) {
    try { showRequest(await requestOf(s.meta), s.meta); } catch (e) { say("the session's request: " + e.message, true); }
  }
  document.body.dataset.playing = id;
  document.body.dataset.status = s.status;
  // A live session is watched: its recording is fetched again as it grows.
  if (s.status === "live") refresh = setTimeout(() => replay(id, true).catch(() => {}), 2000);
}

async function loadRecordings() {
  const auditor = hasRole("auditor");
  document.getElementById("recordings-section").hidden = !auditor;
  if (!auditor) return;
  // The search can come in the address: ?sub=…&host=…&login=…&command=…&recording=desktop
  // &play=<session id>.
  for (const input of document.querySelectorAll("#search input, #search select")) {
    if (params.get(input.name)) input.value = params.get(input.name);
  }
  await search();
  const want = params.get("play");
  if (want) await replay(want);
}

// ---- start -----------------------------------------------------------------------------

document.getElementById("sign-out").addEventListener("click", () => signOut().catch((e) => say(e.message, true)));
document.getElementById("request-form").addEventListener("submit", submitRequest);
document.getElementById("search").addEventListener("submit", (ev) => search(ev).catch((e) => say(e.message, true)));

(async () => {
  await whoAmI();
  if (!me) { document.body.dataset.ready = "yes"; return; }
  await Promise.all([
    loadRequests().catch((e) => say(e.message, true)),
    loadCommands().catch((e) => say(e.message, true)),
    loadRecordings().catch((e) => say(e.message, true)),
  ]);
  // A command waits for a person while its session's user does: keep the list fresh.
  // Not while an approver is typing a comment in it.
  if (hasRole("approver")) {
    setInterval(() => {
      const typing = document.activeElement && document.activeElement.closest("#commands");
      if (!typing) loadCommands().catch(() => {});
    }, 5000);
  }
  document.body.dataset.ready = "yes";
})();
