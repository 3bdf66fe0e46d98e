// renderfarm web UI: one page, no build step. Talks to the REST API with an access token kept in
// memory only; the refresh token is an httpOnly, SameSite=Strict cookie this script cannot read.
// Everything shown is set with textContent (never innerHTML), so nothing a user typed runs.

const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#main");
const POLL_MS = 2000; // fallback polling, never faster than every 2 s

// ------------------------------------------------------------------ API client

const auth = { token: null, me: null };

class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

// One refresh at a time across tabs: presenting a refresh token twice counts as reuse and ends
// the whole login, so tabs take turns (Web Locks), and a tab that waited reuses a fresh token.
async function refresh() {
  if (navigator.locks) return navigator.locks.request("renderfarm-refresh", refreshNow);
  // Web Locks exist only in secure contexts (https, localhost): over plain http on a LAN name
  // the tabs take turns through a short lease in localStorage (a time stamp, never a token)
  const sleep = (ms) => new Promise((res) => setTimeout(res, ms));
  for (let i = 0; i < 60; i += 1) {
    const held = Number(localStorage.getItem("renderfarm-refresh-lease") || 0);
    if (Date.now() - held > 5000) {
      const mine = `${Date.now()}-${Math.random()}`;
      localStorage.setItem("renderfarm-refresh-lease", String(Date.now()));
      localStorage.setItem("renderfarm-refresh-owner", mine);
      await sleep(60); // a tab that wrote after us owns the lease
      if (localStorage.getItem("renderfarm-refresh-owner") === mine) {
        try { return await refreshNow(); } finally { localStorage.removeItem("renderfarm-refresh-lease"); }
      }
    }
    await sleep(100 + Math.random() * 150);
  }
  return refreshNow();
}

async function refreshNow() {
  const r = await fetch("/api/auth/refresh", {
    method: "POST",
    credentials: "same-origin",
    headers: { "X-Requested-With": "renderfarm", "Content-Type": "application/json" },
    body: "{}",
  });
  if (!r.ok) return false;
  const body = await r.json();
  auth.token = body.access_token;
  return true;
}

async function api(method, path, body, { raw = false, retry = true } = {}) {
  const headers = { Accept: "application/json" };
  if (auth.token) headers.Authorization = `Bearer ${auth.token}`;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  if (r.status === 401 && retry && (await refresh())) return api(method, path, body, { raw, retry: false });
  if (r.status === 401) {
    auth.token = null;
    go("#/login");
    throw new ApiError(401, "your session ended: log in again");
  }
  if (!r.ok) {
    let message = `${r.status} ${r.statusText}`;
    let field;
    try {
      const err = (await r.json()).error || {};
      message = err.message || message;
      field = err.field;
    } catch (e) { /* not JSON */ }
    throw new ApiError(r.status, message, field);
  }
  if (raw) return r;
  return r.status === 204 ? null : r.json();
}

// ------------------------------------------------------------------ small DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return node;
}

// What others wrote (log lines, file names) shown with control and bidirectional characters as
// escapes, so a line cannot pose as something else or drive the terminal-like view.
function printable(text) {
  // C0/C1 controls, format characters (Unicode category Cf: bidi marks and overrides, zero-width
  // characters, word joiners, tags...) and line/paragraph separators
  return String(text ?? "").replace(/[\p{Cc}\p{Cf}\u2028\u2029]/gu, (c) => (c === "\n" || c === "\t" ? c
    : `\\u{${c.codePointAt(0).toString(16)}}`));
}

// Runs fn with the button disabled (no double submit), clearing the status line first.
async function busy(button, fn) {
  if (button.disabled) return undefined;
  button.disabled = true;
  say("");
  try {
    return await fn();
  } finally {
    button.disabled = false;
  }
}

// Keeps the keyboard's place across a redraw of `holder` (elements carry data-key).
function keepFocus(holder, redraw) {
  const a = document.activeElement;
  const key = a && holder.contains(a) && a.dataset ? a.dataset.key : null;
  redraw();
  if (key) {
    const again = [...holder.querySelectorAll("[data-key]")].find((n) => n.dataset.key === key);
    if (again) again.focus();
  }
}

function say(message, bad = false) {
  const s = $("#status");
  s.textContent = message;
  s.className = bad ? "error" : "muted";
}

function table(columns, rows, caption) {
  const t = el("table", {}, el("caption", { class: "muted", text: caption || "" }));
  t.append(el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { scope: "col" }, c)))));
  const tb = el("tbody");
  for (const r of rows) tb.append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
  t.append(tb);
  return t;
}

function age(iso) {
  if (!iso) return "-";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function can(what) {
  const me = auth.me;
  if (!me) return false;
  if (me.is_admin) return true;
  const roles = (me.projects || []).map((p) => p.role);
  if (what === "submit") return roles.some((r) => r === "artist" || r === "manager");
  return false;
}

// What the caller may do to a job (the server's permission table: managers any job of their
// project, artists their own, viewers nothing); a control the role lacks is not shown.
function canOnJob(job) {
  const me = auth.me;
  if (!me) return false;
  if (me.is_admin) return true;
  const p = (me.projects || []).find((x) => x.id === job.project_id);
  if (!p) return false;
  return p.role === "manager" || (p.role === "artist" && job.owner === me.username);
}

// ------------------------------------------------------------------ live events

// Reads server-sent events with fetch (an EventSource cannot send the Authorization header);
// calls onEvent(obj) per event; falls back to polling `poll` every POLL_MS when the stream breaks.
// The stream is opened again when it ends (an access token expiring ends it with an error
// event; api() refreshes the token), after POLL_MS; while it cannot be opened at all, `poll` runs
// every POLL_MS instead.
function live(path, onEvent, poll, { once = false } = {}) {
  let stopped = false;
  let reader = null;
  const wait = (ms) => new Promise((res) => setTimeout(res, ms));
  (async () => {
    while (!stopped) {
      let opened = false;
      try {
        const r = await api("GET", path, undefined, { raw: true });
        opened = true;
        reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done || stopped) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, i);
            buf = buf.slice(i + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
            if (data) {
              try { onEvent(JSON.parse(data)); } catch (e) { /* a malformed event is skipped */ }
            }
          }
        }
      } catch (e) { /* refused or broken */ }
      if (stopped || (once && opened)) break;
      if (!opened && poll) {
        try { await poll(); } catch (e) { /* next time */ }
      }
      await wait(POLL_MS);
    }
  })();
  return () => { stopped = true; if (reader) reader.cancel().catch(() => {}); };
}

// ------------------------------------------------------------------ pages

let leave = () => {};

function go(hash) {
  if (location.hash !== hash) location.hash = hash;
  else route();
}

async function route() {
  leave();
  leave = () => {};
  say("");
  const hash = location.hash || "#/jobs";
  const m = main();
  m.replaceChildren();
  if (!auth.token && hash !== "#/login") {
    if (!(await refresh())) return go("#/login");
  }
  if (auth.token && !auth.me) await loadMe();
  try {
    if (hash === "#/login") return await loginPage(m);
    if (hash === "#/jobs") return await jobsPage(m);
    if (hash === "#/submit") return await submitPage(m);
    if (hash.startsWith("#/jobs/")) return await jobPage(m, decodeURIComponent(hash.slice(7)));
    if (hash === "#/nodes") return await nodesPage(m);
    if (hash === "#/admin") return await adminPage(m);
    if (hash === "#/audit") return await auditPage(m);
    m.append(el("h1", { text: "Not found" }), el("p", {}, el("a", { href: "#/jobs", text: "Jobs" })));
  } catch (e) {
    say(e.message, true);
  }
}

async function loadMe() {
  auth.me = await api("GET", "/api/me");
  auth.projects = (await api("GET", "/api/projects")).projects; // an admin: every project
  $("#nav").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `${auth.me.username}${auth.me.is_admin ? " (admin)" : ""}`;
  for (const a of document.querySelectorAll("#nav [data-needs]")) a.hidden = !can(a.dataset.needs);
}

function loginPage(m) {
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  const err = el("p", { class: "error", role: "alert" });
  const form = el("form", { class: "card", "aria-labelledby": "login-h" },
    el("h1", { id: "login-h", text: "Log in" }),
    el("label", { for: "username", text: "User name" }),
    el("input", { id: "username", name: "username", type: "text", autocomplete: "username", required: true }),
    el("label", { for: "password", text: "Password" }),
    el("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true }),
    el("p", {}, el("button", { class: "primary", type: "submit", text: "Log in" })),
    err);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    const r = await fetch("/api/auth/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-Requested-With": "renderfarm" },
      body: JSON.stringify({ username: form.username.value, password: form.password.value, cookie: true }),
    });
    form.password.value = "";
    if (!r.ok) {
      let message = `${r.status}`;
      try { message = (await r.json()).error.message; } catch (e) { /* keep status */ }
      err.textContent = message;
      return;
    }
    auth.token = (await r.json()).access_token;
    await loadMe();
    if (location.hash === "#/login" || !location.hash) go("#/jobs");
    else route();
  });
  m.append(form);
  $("#username").focus();
}

function stateCell(state) {
  return el("span", { class: `state-${state}`, text: state });
}

function progressCell(job) {
  return el("span", {}, el("progress", { max: 100, value: job.progress, "aria-label": `progress of ${job.name}` }),
    ` ${Math.round(job.progress)}%`);
}

async function jobsPage(m) {
  const jobs = new Map();
  const stateFilter = el("select", { id: "f-state", "aria-label": "Filter by state" },
    ...["", "queued", "running", "completed", "failed", "canceled"].map((s) => el("option", { value: s, text: s || "any state" })));
  const textFilter = el("input", { id: "f-text", type: "text", placeholder: "name, owner or project", "aria-label": "Filter by text" });
  const cancelBtn = el("button", { type: "button", id: "bulk-cancel", text: "Cancel selected", hidden: true });
  const holder = el("div");
  m.append(el("h1", { text: "Jobs" }),
    el("div", { class: "row" }, el("label", { for: "f-state", text: "State" }), stateFilter,
      el("label", { for: "f-text", text: "Search" }), textFilter, cancelBtn),
    holder);
  const projects = new Map((auth.projects || []).map((p) => [p.id, p.name]));
  const selected = new Set();
  let visible = new Set();
  const draw = () => {
    const want = stateFilter.value;
    const text = textFilter.value.trim().toLowerCase();
    const rows = [...jobs.values()]
      .filter((j) => !want || j.state === want)
      .filter((j) => !text || `${j.name} ${j.owner} ${projects.get(j.project_id) || ""}`.toLowerCase().includes(text))
      .sort((a, b) => (a.created_at < b.created_at ? 1 : -1))
      .map((j) => {
        const cancellable = canOnJob(j) && !["completed", "failed", "canceled"].includes(j.state);
        const box = cancellable ? el("input", { type: "checkbox", "aria-label": `select ${j.name}`, checked: selected.has(j.id), "data-key": `sel-${j.id}` }) : "";
        if (box) box.addEventListener("change", () => (box.checked ? selected.add(j.id) : selected.delete(j.id)));
        if (!cancellable) selected.delete(j.id);
        return [box, el("a", { href: `#/jobs/${encodeURIComponent(j.id)}`, text: printable(j.name || j.id), "data-key": `job-${j.id}` }), stateCell(j.state),
          progressCell(j), `${j.frames_done}/${j.frame_count}`, printable(j.owner), projects.get(j.project_id) || j.project_id || "-",
          String(j.priority), age(j.created_at)];
      });
    keepFocus(holder, () => { // a live update must not take the keyboard's place away
      holder.replaceChildren(table(["", "Job", "State", "Progress", "Frames", "Owner", "Project", "Priority", "Age"], rows,
        `${rows.length} of ${jobs.size} jobs`));
      holder.querySelector("table").id = "jobs";
    });
    visible = new Set(rows.map((r) => r[0] && r[0].getAttribute ? r[0].getAttribute("data-key").slice(4) : null).filter(Boolean));
    cancelBtn.hidden = visible.size === 0;
  };
  stateFilter.addEventListener("change", draw);
  textFilter.addEventListener("input", draw);
  cancelBtn.addEventListener("click", () => busy(cancelBtn, async () => {
    const ids = [...selected].filter((id) => visible.has(id)); // never a job the filter hides
    if (!ids.length) { say("select the jobs to cancel first"); return; }
    if (!confirm(`Cancel ${ids.length} job(s)?`)) return;
    let done = 0;
    const errors = [];
    for (const id of ids) {
      try { jobs.set(id, await api("POST", `/api/jobs/${encodeURIComponent(id)}/cancel`)); done += 1; } catch (e) { errors.push(e.message); }
    }
    selected.clear();
    draw();
    if (errors.length) say(`${done} job(s) canceled; ${errors.length} not: ${errors[0]}`, true);
    else say(`${done} job(s) canceled`);
  }));
  const load = async () => {
    for (const j of (await api("GET", "/api/jobs?limit=200")).jobs) jobs.set(j.id, j);
    draw();
  };
  await load();
  leave = live("/api/events", (ev) => {
    if (ev.type === "job" && ev.job) {
      jobs.set(ev.job.id, ev.job);
      draw();
    }
  }, load);
}

async function jobPage(m, id) {
  const head = el("div");
  const actions = el("div", { class: "row" });
  const tasksHolder = el("div");
  const gallery = el("div", { class: "gallery", id: "gallery" });
  const viewer = el("dialog", { id: "viewer" });
  m.append(head, actions, el("h2", { text: "Tasks" }), tasksHolder, el("h2", { text: "Frames" }), gallery, viewer);
  let job = await api("GET", `/api/jobs/${encodeURIComponent(id)}`);
  const shown = new Set();
  const openLogs = new Set(); // log tails the user opened stay open across live redraws
  const drawHead = () => {
    head.replaceChildren(el("h1", {}, `${printable(job.name)} `, stateCell(job.state)),
      el("p", {}, progressCell(job), ` ${job.frames_done} of ${job.frame_count} frames · owner ${job.owner} · priority ${job.priority}`,
        job.message ? el("span", { class: "muted", text: ` · ${job.message}` }) : ""));
  };
  const act = (fn, done) => async (ev) => busy(ev.currentTarget, async () => {
    try {
      job = await fn();
      say(done);
    } catch (e) {
      say(e.message, true);
      if (e.status === 403) await loadMe(); // a role taken away: the controls follow
    }
    drawHead();
    drawActions();
  });
  const jobPath = `/api/jobs/${encodeURIComponent(id)}`;
  let actionsFor = "";
  const drawActions = () => {
    // rebuilt only when what the controls depend on changed, so a live event neither undoes a
    // busy button nor wipes a priority being typed
    const key = `${job.state}|${job.priority}|${(job.tasks || {}).failed || 0}|${job.frames_done > 0}|${canOnJob(job)}`;
    if (key === actionsFor) return;
    actionsFor = key;
    const items = job.frames_done ? [el("a", { href: `${jobPath}/outputs.zip`, id: "zip", text: "Download all (zip)", onclick: downloadZip })] : [];
    if (canOnJob(job)) { // what the role may not do is not shown (and the server refuses it anyway)
      const open = !["completed", "failed", "canceled"].includes(job.state);
      const prio = el("input", { id: "priority", type: "number", min: -100, max: 100, value: job.priority, "data-key": "priority" });
      if (open) items.push(el("button", { type: "button", id: "cancel", "data-key": "cancel", text: "Cancel job", onclick: act(() => api("POST", `${jobPath}/cancel`), "job canceled") }));
      if ((job.tasks || {}).failed) items.push(el("button", { type: "button", id: "retry", text: "Retry failed tasks", onclick: act(() => api("POST", `${jobPath}/retry`), "failed tasks queued again") }));
      if (open) items.push(el("label", { for: "priority", text: "Priority" }), prio,
        el("button", { type: "button", text: "Set priority", onclick: act(() => {
          if (!/^-?[0-9]+$/.test(prio.value.trim())) throw new ApiError(400, "priority must be a whole number from -100 to 100");
          return api("PATCH", jobPath, { priority: Number(prio.value) });
        }, "priority set") }));
    }
    keepFocus(actions, () => actions.replaceChildren(...items));
  };
  drawActions();
  const blockHolder = el("div");
  m.insertBefore(blockHolder, viewer);
  const drawBlocklist = async () => {
    const agents = (await api("GET", `${jobPath}/blocklist`)).agents || [];
    if (!agents.length) { blockHolder.replaceChildren(); return; }
    keepFocus(blockHolder, () => blockHolder.replaceChildren(el("h2", { text: "Blocklisted agents" }), table(["Agent", ""], agents.map((a) => {
      const name = typeof a === "string" ? a : a.agent || a.name;
      return [printable(name), canOnJob(job) ? el("button", { type: "button", "data-key": `clear-${name}`, text: `Clear ${name}`, onclick: (ev) => busy(ev.currentTarget, async () => {
        try { await api("DELETE", `${jobPath}/blocklist/${encodeURIComponent(name)}`); say(`${name} may take this job's tasks again`); } catch (e) { say(e.message, true); }
        await drawBlocklist();
      }) }) : ""];
    }))));
  };
  async function downloadZip(ev) {
    ev.preventDefault();
    let r;
    try {
      r = await api("GET", `/api/jobs/${encodeURIComponent(id)}/outputs.zip`, undefined, { raw: true });
    } catch (e) { say(e.message, true); return; }
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: `job-${id}.zip` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }
  const drawTasks = async () => {
    const tasks = (await api("GET", `/api/jobs/${encodeURIComponent(id)}/tasks`)).tasks;
    const lines = (t) => t.log_tail.flatMap((l) => String(l).split(/\r?\n|\r/)).map(printable);
    keepFocus(tasksHolder, () => tasksHolder.replaceChildren(table(["#", "Frames", "State", "Agent", "Attempts", "Render s", "Message", "Log"], tasks.map((t) => [
      String(t.index), t.frames.length > 3 ? `${t.frames[0]}…${t.frames[t.frames.length - 1]}` : t.frames.join(","),
      stateCell(t.state), t.agent || "-", String(t.attempts), t.render_seconds.toFixed(1),
      printable([t.failure_kind, t.message].filter(Boolean).join(": ") || "-"),
      el("details", { "data-key": `log-${t.id}`, open: openLogs.has(t.id) ? true : undefined,
        ontoggle: (ev) => (ev.currentTarget.open ? openLogs.add(t.id) : openLogs.delete(t.id)) },
      el("summary", { text: `${lines(t).length} lines`, "data-key": `sum-${t.id}` }), el("pre", { class: "log", text: lines(t).join("\n") })),
    ]))));
  };
  const drawFrames = async () => {
    const outs = (await api("GET", `/api/jobs/${encodeURIComponent(id)}/outputs`)).frames;
    for (const f of outs) {
      if (shown.has(f.frame)) continue;
      shown.add(f.frame);
      const img = el("img", { alt: `frame ${f.frame}` });
      const fig = el("figure", {}, el("button", { type: "button", "aria-label": `open frame ${f.frame}`, onclick: () => openFrame(f.frame) }, img),
        el("figcaption", { text: `frame ${f.frame}` }));
      gallery.append(fig);
      try {
        const r = await api("GET", `/api/jobs/${encodeURIComponent(id)}/outputs/${f.frame}/thumbnail?size=256`, undefined, { raw: true });
        img.src = URL.createObjectURL(await r.blob());
      } catch (e) { img.alt = `frame ${f.frame} (no preview)`; }
    }
  };
  async function openFrame(frame) {
    let r;
    try {
      r = await api("GET", `/api/jobs/${encodeURIComponent(id)}/outputs/${frame}`, undefined, { raw: true });
    } catch (e) { say(e.message, true); return; }
    viewer.replaceChildren(el("img", { alt: `frame ${frame}`, src: URL.createObjectURL(await r.blob()) }),
      el("p", {}, el("button", { type: "button", text: "Close", onclick: () => viewer.close() })));
    viewer.showModal();
  }
  drawHead();
  await Promise.all([drawTasks(), drawFrames(), drawBlocklist()]);
  let pending = null;
  const refreshAll = async () => {
    job = await api("GET", `/api/jobs/${encodeURIComponent(id)}`);
    drawHead();
    drawActions();
    await Promise.all([drawTasks(), drawFrames(), drawBlocklist()]);
  };
  const FINISHED = ["completed", "failed", "canceled"];
  const stop = live(`/api/jobs/${encodeURIComponent(id)}/events`, (ev) => {
    if (ev.type === "job" && ev.job) { job = ev.job; drawHead(); drawActions(); }
    if (!pending) pending = setTimeout(async () => { pending = null; await Promise.all([drawTasks(), drawFrames(), drawBlocklist()]); }, 500);
    if (ev.type === "job" && FINISHED.includes(job.state)) stop(); // the server ends the stream too
  }, refreshAll);
  leave = stop;
}

function submitPage(m) {
  if (!can("submit")) {
    m.append(el("h1", { text: "Submit a job" }), el("p", { text: "Your roles do not allow submitting jobs: ask a project manager for the artist role." }));
    return;
  }
  const out = el("div");
  const file = el("input", { id: "file", type: "file", accept: ".blend,.zip", required: true });
  const bar = el("progress", { id: "upload-progress", max: 100, value: 0, "aria-label": "Upload progress" });
  const mine = new Map((auth.me.projects || []).map((p) => [p.id, p.role]));
  const projectSel = el("select", { id: "project" },
    ...(auth.projects || []).filter((p) => auth.me.is_admin || ["artist", "manager"].includes(mine.get(p.id)))
      .map((p) => el("option", { value: p.name, text: p.name })));
  const mainBlend = el("input", { id: "main-blend", type: "text", placeholder: "shots/010.blend" });
  const form = el("form", { class: "card" }, el("h1", { text: "Submit a job" }),
    el("label", { for: "project", text: "Project" }), projectSel,
    el("label", { for: "file", text: ".blend or .zip" }), file,
    el("label", { for: "main-blend", text: "The .blend to render, inside a .zip (if it holds several)" }), mainBlend,
    el("p", {}, el("button", { type: "submit", class: "primary", text: "Upload" }), " ", bar), out);
  m.append(form);
  const uploadBtn = () => form.querySelector("button[type=submit]");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = file.files[0];
    if (!f || uploadBtn().disabled) return;
    uploadBtn().disabled = true;
    out.replaceChildren();
    bar.value = 0;
    const xhr = new XMLHttpRequest(); // fetch cannot report upload progress
    const q = new URLSearchParams({ filename: f.name, project: projectSel.value });
    if (mainBlend.value.trim()) q.set("main", mainBlend.value.trim());
    xhr.open("POST", `/api/models?${q}`);
    xhr.setRequestHeader("Authorization", `Bearer ${auth.token}`);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
    xhr.onloadend = () => { uploadBtn().disabled = false; };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (xhr.status >= 400) {
        out.replaceChildren(el("p", { class: "error", role: "alert", text: (body.error && body.error.message) || `${xhr.status}` }));
        return;
      }
      bar.value = 100;
      modelForm(out, body);
    };
    xhr.onerror = () => out.replaceChildren(el("p", { class: "error", role: "alert", text: "the upload failed" }));
    xhr.send(f);
  });
}

function modelForm(out, model) {
  const info = model.info || {};
  const scenes = info.scenes || [];
  const scene = scenes.find((x) => x.name === info.active_scene) || scenes[0] || {};
  const missing = info.missing || [];
  const field = (id, label, input) => [el("label", { for: id, text: label }), input];
  const frames = el("input", { id: "frames", type: "text", value: scene.frame_start !== undefined ? `${scene.frame_start}-${scene.frame_end}` : "1", required: true });
  const chunk = el("input", { id: "chunk", type: "number", min: 1, max: 10000, value: 1, required: true });
  const device = el("select", { id: "device" }, ...["any", "cpu", "gpu"].map((d) => el("option", { value: d, text: d })));
  const samples = el("input", { id: "samples", type: "number", min: 0, value: 0 });
  const fmt = el("select", { id: "format" }, ...["PNG", "OPEN_EXR", "JPEG"].map((d) => el("option", { value: d, text: d })));
  const allow = el("input", { id: "allow-missing", type: "checkbox" });
  const err = el("p", { class: "error", role: "alert" });
  const form = el("form", {},
    el("h2", { text: `Model ${model.filename}${model.kind === "zip" ? ` (renders ${model.main})` : ""}` }),
    el("p", { class: "muted", text: `Blender ${Array.isArray(info.blender_version) ? info.blender_version.join(".") : info.blender_version || "?"} · scenes: ${(info.scenes || []).map((s) => s.name).join(", ") || "-"} · camera: ${scene.camera || "none"} · ${scene.resolution_x || "?"}×${scene.resolution_y || "?"} · engine ${scene.engine || "?"}` }),
    missing.length ? el("div", {}, el("p", { class: "error", text: `${missing.length} missing file(s):` }), el("ul", {}, ...missing.map((p) => el("li", { text: printable(p) })))) : el("p", { class: "muted", text: "no missing files" }),
    ...field("frames", "Frames", frames), ...field("chunk", "Frames per task", chunk), ...field("device", "Device", device),
    ...field("samples", "Samples (0: the file's)", samples), ...field("format", "Format", fmt),
    el("label", {}, allow, " render although files are missing"),
    el("p", {}, el("button", { type: "submit", class: "primary", id: "create-job", text: "Submit job" })), err);
  out.replaceChildren(form);
  const submitBtn = () => form.querySelector("#create-job");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submitBtn(), async () => {
      err.textContent = "";
      try {
        const job = await api("POST", "/api/jobs", {
          model_id: model.id, scene: scene.name || null, frames: frames.value, chunk_size: Number(chunk.value || 1), device: device.value,
          samples: Number(samples.value) || null, output_format: fmt.value, allow_missing: allow.checked,
        });
        go(`#/jobs/${encodeURIComponent(job.id)}`);
      } catch (e) {
        err.textContent = e.message; // the server's message names the field
      }
    });
  });
  form.addEventListener("invalid", () => { err.textContent = ""; }, true);
}

async function nodesPage(m) {
  const holder = el("div");
  m.append(el("h1", { text: "Nodes" }), holder);
  // each unfinished job's summary names the agents blocklisted for it: gathered per agent, and
  // fetched every 30 s at most (the agents' own state is redrawn every 5 s)
  let blocked = new Map();
  let blockedAt = 0;
  const loadBlocked = async () => {
    const next = new Map();
    for (const state of ["running", "queued"]) {
      for (const j of (await api("GET", `/api/jobs?state=${state}&limit=200`)).jobs) {
        for (const name of j.blocklist || []) {
          if (!next.has(name)) next.set(name, []);
          next.get(name).push(j);
        }
      }
    }
    blocked = next;
    blockedAt = Date.now();
  };
  const draw = async () => {
    const agents = (await api("GET", "/api/agents")).agents;
    if (Date.now() - blockedAt > 30000) await loadBlocked();
    const blockCell = (name) => {
      const js = blocked.get(name) || [];
      if (!js.length) return "-";
      return el("span", {}, ...js.flatMap((j, i) => [i ? ", " : "", el("a", { href: `#/jobs/${encodeURIComponent(j.id)}`, text: printable(j.name || j.id), "data-key": `bl-${name}-${j.id}` })]));
    };
    keepFocus(holder, () => holder.replaceChildren(table(["Agent", "State", "Pool / route", "Capabilities", "Current task", "Last heartbeat", "Blocklisted for", ""], agents.map((a) => {
      const caps = a.capabilities || {};
      const gpus = (caps.gpus || []).map((g) => g.name || g).join(", ");
      const state = `${a.online ? "online" : "offline"}${a.enabled === false ? ", disabled" : ""}`;
      const toggle = auth.me.is_admin ? el("button", { type: "button", "data-key": `toggle-${a.name}`, text: a.enabled === false ? `Enable ${a.name}` : `Disable ${a.name}`,
        onclick: (ev) => busy(ev.currentTarget, async () => {
          if (a.enabled !== false && !confirm(`Disable ${a.name}? It takes no new task (one it renders runs to its end).`)) return;
          try {
            await api("PATCH", `/api/agents/${encodeURIComponent(a.name)}`, { enabled: a.enabled === false });
            say(`${a.name} ${a.enabled === false ? "enabled" : "disabled: it takes no new task"}`);
          } catch (e) { say(e.message, true); }
          await draw();
        }) }) : "";
      const mem = caps.memory_bytes ? `, ${(caps.memory_bytes / 2 ** 30).toFixed(0)} GiB` : "";
      return [a.name, state, a.route || a.pool, `${caps.cpu_cores || caps.cpu_count || "?"} cores${mem}${gpus ? `, ${gpus}` : ""}${(a.backends || []).length ? ` (${a.backends.join(", ")})` : ""}`,
        a.online && a.current_task_id ? a.current_task_id : "-", `${age(a.last_seen_at)} ago`, blockCell(a.name), toggle];
    }), "agents")));
  };
  await draw();
  const timer = setInterval(() => draw().catch(() => {}), 5000); // heartbeats are every 5 s
  leave = () => clearInterval(timer);
}

async function adminPage(m) {
  if (!auth.me.is_admin) { m.append(el("h1", { text: "Admins only" })); return; }
  const users = el("div");
  const projects = el("div");
  const tokens = el("div");
  m.append(el("h1", { text: "Admin" }), el("h2", { text: "Users" }), users, el("h2", { text: "Projects" }), projects,
    el("h2", { text: "Tokens" }), tokens);
  // runs an admin action: confirmation for destructive ones, success or the server's message
  const guard = (fn, done, ask) => async (ev) => {
    if (ev) ev.preventDefault();
    const button = ev && (ev.submitter || (ev.currentTarget instanceof HTMLButtonElement ? ev.currentTarget : null));
    const run = async () => {
      if (ask && !confirm(ask)) return;
      try {
        await fn();
      } catch (e) {
        say(e.message, true); // the form keeps what was typed
        return;
      }
      await drawAll();
      await loadMe(); // a new project shows in Submit and the jobs table at once
      say(done);
    };
    if (button) await busy(button, run);
    else { say(""); await run(); }
  };
  const drawUsers = async () => {
    const list = (await api("GET", "/api/users")).users;
    const name = el("input", { id: "new-user", type: "text", autocomplete: "off" });
    const pw = el("input", { id: "new-user-password", type: "password", autocomplete: "new-password" });
    const form = el("form", { class: "row" }, el("label", { for: "new-user", text: "New user" }), name,
      el("label", { for: "new-user-password", text: "Password" }), pw, el("button", { type: "submit", text: "Create user" }));
    form.addEventListener("submit", guard(() => api("POST", "/api/users", { username: name.value, password: pw.value }), `user ${name.value || "?"} created`));
    users.replaceChildren(table(["User", "Admin", "State", "Projects", ""], list.map((u) => [u.username, u.is_admin ? "admin" : "",
      u.disabled ? "disabled" : "active", u.projects.map((p) => `${p.name || p.project}: ${p.role}`).join(", "),
      u.username === auth.me.username ? "" : el("button", { type: "button", text: `${u.disabled ? "Enable" : "Disable"} ${u.username}`,
        onclick: guard(() => api("PATCH", `/api/users/${encodeURIComponent(u.id)}`, { disabled: !u.disabled }),
          `${u.username} ${u.disabled ? "enabled" : "disabled"}`, u.disabled ? null : `Disable ${u.username}? Their tokens stop working at once.`) })])), form);
  };
  const drawProjects = async () => {
    const list = (await api("GET", "/api/projects")).projects;
    const pname = el("input", { id: "new-project", type: "text" });
    const pform = el("form", { class: "row" }, el("label", { for: "new-project", text: "New project" }), pname, el("button", { type: "submit", text: "Create project" }));
    pform.addEventListener("submit", guard(() => api("POST", "/api/projects", { name: pname.value }), "project created"));
    const who = el("input", { id: "member-user", type: "text" });
    const where = el("select", { id: "member-project" }, ...list.map((p) => el("option", { value: p.id, text: p.name })));
    const role = el("select", { id: "member-role" }, ...["artist", "manager", "viewer"].map((r) => el("option", { value: r, text: r })));
    const mform = el("form", { class: "row" }, el("label", { for: "member-user", text: "User" }), who, el("label", { for: "member-project", text: "Project" }), where,
      el("label", { for: "member-role", text: "Role" }), role, el("button", { type: "submit", text: "Set role" }));
    mform.addEventListener("submit", guard(() => {
      if (!who.value.trim()) throw new ApiError(400, "give the user whose role to set");
      return api("PUT", `/api/projects/${encodeURIComponent(where.value)}/members/${encodeURIComponent(who.value.trim())}`, { role: role.value });
    }, "role set"));
    projects.replaceChildren(table(["Project", "Members"], list.map((p) => [p.name, p.members.map((x) => `${x.user}: ${x.role}`).join(", ") || "-"])), pform, mform);
  };
  const drawTokens = async () => {
    const mine = await api("GET", "/api/tokens?all=1"); // every user's personal tokens
    const agents = await api("GET", "/api/tokens?kind=agent");
    const list = [...(mine.tokens || []), ...(agents.tokens || [])].filter((t) => !t.revoked_at);
    const shown = el("p", { id: "new-token", class: "muted" });
    const aname = el("input", { id: "agent-name", type: "text" });
    const aform = el("form", { class: "row" }, el("label", { for: "agent-name", text: "Agent token for" }), aname, el("button", { type: "submit", text: "Create agent token" }));
    aform.addEventListener("submit", (ev) => {
      ev.preventDefault();
      busy(ev.submitter || aform.querySelector("button"), async () => {
        try {
          const t = await api("POST", "/api/agent-tokens", { agent_name: aname.value });
          await drawTokens();
          tokens.querySelector("#new-token").textContent = `token for ${t.agent_name} (shown once): ${t.token}`;
          say("agent token created: copy it now");
        } catch (e) { say(e.message, true); }
      });
    });
    const pname = el("input", { id: "token-name", type: "text" });
    const pform = el("form", { class: "row" }, el("label", { for: "token-name", text: "Personal API token named" }), pname,
      el("button", { type: "submit", text: "Create API token" }));
    pform.addEventListener("submit", (ev) => {
      ev.preventDefault();
      busy(ev.submitter || pform.querySelector("button"), async () => {
        try {
          const t = await api("POST", "/api/tokens", { name: pname.value });
          await drawTokens();
          tokens.querySelector("#new-token").textContent = `token ${t.name} (shown once): ${t.token}`;
          say("API token created: copy it now");
        } catch (e) { say(e.message, true); }
      });
    });
    tokens.replaceChildren(table(["Token", "Kind", "For", "Expires", "Last used", ""], list.map((t) => [t.name || t.id, t.kind, t.agent_name || t.user || "-",
      t.expires_at ? t.expires_at.slice(0, 10) : "never", t.last_used_at ? `${age(t.last_used_at)} ago` : "never",
      el("button", { type: "button", text: `Revoke ${t.name || t.id}`, onclick: guard(() => api("DELETE", `/api/tokens/${encodeURIComponent(t.id)}`),
        "token revoked", `Revoke ${t.name || t.id}? What uses it stops working at once.`) })])), pform, aform, shown);
  };
  const drawAll = () => Promise.all([drawUsers(), drawProjects(), drawTokens()]);
  await drawAll();
}

async function auditPage(m) {
  if (!auth.me.is_admin) { m.append(el("h1", { text: "Admins only" })); return; }
  const f = (id, label, attrs = {}) => [el("label", { for: id, text: label }), el("input", { id, type: "text", ...attrs })];
  const outcome = el("select", { id: "a-outcome" }, ...["", "success", "failure", "denied", "throttled"].map((o) => el("option", { value: o, text: o || "any outcome" })));
  const form = el("form", { class: "row" }, ...f("a-actor", "Actor"), ...f("a-action", "Action", { placeholder: "jobs.cancel_job" }),
    ...f("a-target", "Target", { placeholder: "job_id=..." }), el("label", { for: "a-outcome", text: "Outcome" }), outcome,
    el("button", { type: "submit", text: "Filter" }));
  const holder = el("div");
  const more = el("button", { type: "button", text: "Older entries", hidden: true });
  m.append(el("h1", { text: "Audit log" }), form, holder, more);
  let before = null;
  const load = async (append) => {
    const q = new URLSearchParams({ limit: "100" });
    for (const [k, id] of [["actor", "a-actor"], ["action", "a-action"], ["target", "a-target"]]) if ($(`#${id}`).value) q.set(k, $(`#${id}`).value);
    if (outcome.value) q.set("outcome", outcome.value);
    if (append && before) q.set("before", String(before));
    const page = await api("GET", `/api/audit?${q}`);
    before = page.next_before;
    more.hidden = !before;
    const rows = page.entries.map((e) => [e.at.slice(0, 19).replace("T", " "), printable(e.actor), printable(e.action), printable(e.target || "-"),
      e.outcome, String(e.status || "-"), printable(e.ip || "-")]);
    const existing = append ? holder.querySelector("tbody") : null;
    if (existing) for (const r of rows) existing.append(el("tr", {}, ...r.map((c) => el("td", {}, c))));
    else { holder.replaceChildren(table(["When (UTC)", "Actor", "Action", "Target", "Outcome", "Status", "Address"], rows, "newest first")); holder.querySelector("table").id = "audit"; }
  };
  form.addEventListener("submit", (ev) => { ev.preventDefault(); load(false).catch((e) => say(e.message, true)); });
  more.addEventListener("click", () => load(true).catch((e) => say(e.message, true)));
  await load(false);
}

// ------------------------------------------------------------------ start

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  $("#logout").addEventListener("click", async () => {
    try {
      await fetch("/api/auth/logout", { method: "POST", credentials: "same-origin",
        headers: { "X-Requested-With": "renderfarm", "Content-Type": "application/json", Authorization: `Bearer ${auth.token}` }, body: "{}" });
    } finally {
      auth.token = null;
      auth.me = null;
      go("#/login");
    }
  });
  route();
});
