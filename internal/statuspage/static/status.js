// vpcreach status page. Reads the admin listener's JSON every 2 s while
// the page is visible and rebuilds the tables. Everything from the data is
// added as text (Node.append with strings, textContent), never as markup.
"use strict";

(() => {
  const PERIOD = 2000;      // ms between refreshes
  const TIMEOUT = 5000;     // ms a request may take
  const MAX_ROWS = 500;     // rows shown per table

  let timer = 0;
  let busy = false;
  let refreshes = 0;
  let prev = null;          // last counters and their time, for rates

  // el builds an element; strings and numbers become text nodes.
  function el(tag, cls, ...kids) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    for (const k of kids) {
      if (k === null || k === undefined) continue;
      e.append(k instanceof Node ? k : String(k));
    }
    return e;
  }

  function section(id) {
    const s = document.getElementById(id);
    return { body: s.querySelector(".body"), count: s.querySelector(".count") };
  }

  function table(head, rows, numeric, cls) {
    const num = new Set(numeric || []);
    const tr = el("tr", null, ...head.map((h, i) => el("th", num.has(i) ? "num" : null, h)));
    const body = el("tbody");
    for (const r of rows) body.append(r);
    return el("table", cls || null, el("thead", null, tr), body);
  }

  function row(...cells) {
    return el("tr", null, ...cells.map((c) => (c instanceof HTMLTableCellElement ? c : el("td", null, c))));
  }

  const td = (cls, ...kids) => el("td", cls, ...kids);

  // Generations are nanosecond times above 2^53: keep them exact, as
  // strings, before JSON.parse rounds them.
  function parseJSON(text) {
    return JSON.parse(text.replace(/"generation":\s*(\d+)/g, '"generation":"$1"'));
  }

  async function get(path) {
    const res = await fetch(path, {
      cache: "no-store", credentials: "same-origin", redirect: "error",
      headers: { Accept: "application/json" }, signal: AbortSignal.timeout(TIMEOUT),
    });
    const text = await res.text();
    let body = null;
    try { body = parseJSON(text); } catch (e) { body = null; }
    return { ok: res.ok, status: res.status, body, text };
  }

  // getOK returns the body of a 2xx answer or throws with the reason.
  async function getOK(path) {
    const r = await get(path);
    if (!r.ok) {
      const why = r.body && r.body.error ? r.body.error : r.text.trim().slice(0, 200);
      throw new Error(path + ": " + r.status + (why ? " " + why : ""));
    }
    if (r.body === null) throw new Error(path + ": not JSON");
    return r.body;
  }

  function when(s) {
    const d = new Date(s);
    if (isNaN(d)) return String(s);
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function age(s, now) {
    const d = new Date(s);
    if (isNaN(d)) return "";
    let sec = Math.max(0, Math.round(((now || Date.now()) - d.getTime()) / 1000));
    const parts = [];
    for (const [n, u] of [[86400, "d"], [3600, "h"], [60, "m"], [1, "s"]]) {
      if (sec >= n || (n === 1 && parts.length === 0)) {
        parts.push(Math.floor(sec / n) + u);
        sec %= n;
      }
      if (parts.length === 2) break;
    }
    return parts.join(" ");
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
  }

  const int = (n) => Number(n).toLocaleString("en-US");

  function unavailable(sec, err) {
    sec.body.replaceChildren(el("p", "error", "unavailable: " + (err && err.message ? err.message : String(err))));
    if (sec.count) sec.count.textContent = "";
  }

  function metric(status, name, labels) {
    let sum = null;
    for (const m of status.metrics || []) {
      if (m.name !== name) continue;
      const ls = m.labels || {};
      if (labels && Object.keys(labels).some((k) => ls[k] !== labels[k])) continue;
      sum = (sum || 0) + m.value;
    }
    return sum;
  }

  function renderHeader(st, ready, health) {
    const state = document.getElementById("state");
    if (st.status !== "fulfilled") {
      state.className = "state bad";
      state.textContent = "admin listener unreachable: " + st.reason.message;
      return;
    }
    const s = st.value;
    document.getElementById("member-id").textContent = s.member.id;
    document.title = "vpcreach " + s.member.id;
    const parts = [];
    let bad = false;
    if (ready.status === "fulfilled" && ready.value.body) {
      if (ready.value.ok) parts.push("ready");
      else { bad = true; parts.push("not ready: " + (ready.value.body.reason || ready.value.status)); }
    }
    if (health.status === "fulfilled" && health.value.body) {
      for (const c of health.value.body.checks || []) {
        if (!c.ok) { bad = true; parts.push(c.name + ": " + c.error); }
      }
    }
    parts.push("updated " + when(s.now).slice(11));
    state.className = "state " + (bad ? "bad" : "ok");
    state.textContent = parts.join(" · ");
  }

  function renderMember(st, health) {
    const dl = document.getElementById("member");
    if (st.status !== "fulfilled") return;
    const s = st.value;
    const m = s.member;
    let reg = m.registry || "";
    if (health.status === "fulfilled" && health.value.body) {
      for (const c of health.value.body.checks || []) {
        if (c.name === "registry") reg += c.ok ? " (reachable)" : " (error: " + c.error + ")";
      }
    }
    const facts = [
      ["Server id", m.id], ["Control", m.control], ["Advertised address", m.advertise],
      ["Relay", m.relay], ["Registry", reg],
      ["Up since", when(s.started) + " (" + age(s.started, new Date(s.now).getTime()) + ")"],
    ];
    dl.replaceChildren(...facts.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", null, k), el("dd", "mono", v)]));
  }

  // renderMembers derives the members from the routes: every server id
  // that owns a route, with its relay address.
  function renderMembers(st, routes) {
    const sec = section("members");
    if (routes.status !== "fulfilled") { unavailable(sec, routes.reason); return; }
    const self = st.status === "fulfilled" ? st.value.member : null;
    const by = new Map();
    const add = (id) => {
      if (!by.has(id)) by.set(id, { relays: new Set(), routes: 0, agents: new Set() });
      return by.get(id);
    };
    if (self) add(self.id).relays.add(self.relay || "");
    for (const r of routes.value || []) {
      const m = add(r.server || "");
      if (r.relay) m.relays.add(r.relay);
      m.routes++;
      m.agents.add(r.agent);
    }
    const ids = [...by.keys()].sort((a, b) => (self && a === self.id ? -1 : self && b === self.id ? 1 : a.localeCompare(b)));
    const rows = ids.map((id) => {
      const m = by.get(id);
      const name = td("mono", id || "(none)");
      if (self && id === self.id) name.append(" ", el("span", "self", "this member"));
      return row(name, td("addr", [...m.relays].filter(Boolean).sort().join(", ")),
        td("num", int(m.routes)), td("num", int(m.agents.size)));
    });
    sec.body.replaceChildren(
      table(["Member (server id)", "Relay", "Routes", "Agents"], rows, [2, 3]),
      el("p", "note", "Other members are the servers named in the registry's routes (Redis mode); a member without routes is not seen."));
  }

  function renderTraffic(st, stats) {
    const sec = section("traffic");
    if (stats.status !== "fulfilled") { unavailable(sec, stats.reason); return; }
    const c = stats.value;
    const s = st.status === "fulfilled" ? st.value : { metrics: [] };
    const up = metric(s, "vpcreach_server_bytes_total", { direction: "to_target" });
    const down = metric(s, "vpcreach_server_bytes_total", { direction: "from_target" });
    const now = Date.now();
    const cur = { t: now, up, down, opened: c.streams_opened };
    const rate = (k) => {
      if (!prev || cur[k] === null || prev[k] === null || cur.t <= prev.t) return null;
      return Math.max(0, (cur[k] - prev[k]) / ((cur.t - prev.t) / 1000));
    };
    const tile = (k, v, r) => el("div", "tile", el("div", "k", k), el("div", "v", v), r === null || r === undefined ? null : el("div", "r", r));
    const tiles = el("div", "tiles",
      tile("Tunnels", int(c.tunnels)),
      tile("Streams open", int(c.streams_open)),
      tile("Streams opened", int(c.streams_opened), rate("opened") === null ? null : rate("opened").toFixed(1) + " /s"),
      tile("Bytes to targets", up === null ? "n/a" : bytes(up), rate("up") === null ? null : bytes(Math.round(rate("up"))) + "/s"),
      tile("Bytes from targets", down === null ? "n/a" : bytes(down), rate("down") === null ? null : bytes(Math.round(rate("down"))) + "/s"));
    prev = cur;

    const rows = Object.keys(c).sort().map((k) => row(td("mono", k), td("num", int(c[k]))));
    // Non-zero breakdowns by reason, from the metrics.
    for (const m of s.metrics || []) {
      if (!m.labels || !m.value) continue;
      if (m.name === "vpcreach_server_bytes_total") continue;
      if (!/_(refusals|failures|errors)_total$/.test(m.name)) continue;
      const ls = Object.keys(m.labels).sort().map((k) => k + "=" + m.labels[k]).join(", ");
      rows.push(row(td("mono", m.name.replace(/^vpcreach_/, "") + " {" + ls + "}"), td("num", int(m.value))));
    }
    sec.body.replaceChildren(tiles, table(["Counter", "Value"], rows, [1], "narrow"));
  }

  function renderAgents(st, agents) {
    const sec = section("agents");
    if (agents.status !== "fulfilled") { unavailable(sec, agents.reason); return; }
    const list = agents.value || [];
    sec.count.textContent = "(" + list.length + " on this member)";
    if (list.length === 0) { sec.body.replaceChildren(el("p", "empty", "No agent is connected to this member.")); return; }
    const now = st.status === "fulfilled" ? new Date(st.value.now).getTime() : Date.now();
    const rows = list.slice(0, MAX_ROWS).map((a) => row(
      td("mono", a.agent), td("mono", a.session), td("mono", a.generation), td("addr", a.remote),
      el("td", null, when(a.started), el("div", "muted", age(a.started, now))),
      td("num", a.version), td("num", int(a.streams)), td("num", int(a.yamux_streams)),
      el("td", "addr", el("ul", null, ...(a.routes || []).map((r) => el("li", null, r))))));
    const parts = [table(["Agent", "Session", "Generation", "Remote", "Connected", "Protocol", "Streams", "yamux", "Routes (target -> proxy)"], rows, [5, 6, 7])];
    if (list.length > MAX_ROWS) parts.push(el("p", "note", (list.length - MAX_ROWS) + " more not shown; see /v1/agents."));
    sec.body.replaceChildren(...parts);
  }

  function renderRoutes(st, routes) {
    const sec = section("routes");
    if (routes.status !== "fulfilled") { unavailable(sec, routes.reason); return; }
    const list = (routes.value || []).slice();
    const target = (r) => (r.network ? r.network + "/" : "") + r.target;
    list.sort((a, b) => target(a).localeCompare(target(b)));
    sec.count.textContent = "(" + list.length + ")";
    if (list.length === 0) { sec.body.replaceChildren(el("p", "empty", "No routes.")); return; }
    const self = st.status === "fulfilled" ? st.value.member.id : null;
    const now = st.status === "fulfilled" ? new Date(st.value.now).getTime() : Date.now();
    const rows = list.slice(0, MAX_ROWS).map((r) => {
      const server = td("mono", r.server);
      if (r.server === self) server.className = "mono self";
      return row(td("addr", target(r)), td("addr", r.proxy), td("addr", r.relay), td("mono", r.agent), server,
        td("mono", r.session), td("mono", r.generation),
        el("td", null, when(r.registered), el("div", "muted", age(r.registered, now))));
    });
    const parts = [table(["Target", "Proxy", "Relay", "Agent", "Server", "Session", "Generation", "Registered"], rows)];
    if (list.length > MAX_ROWS) parts.push(el("p", "note", (list.length - MAX_ROWS) + " more not shown; see /v1/routes."));
    sec.body.replaceChildren(...parts);
  }

  function renderRecent(st) {
    const sec = section("recent");
    if (st.status !== "fulfilled") { unavailable(sec, st.reason); return; }
    const rec = st.value.recent;
    if (!rec) {
      sec.count.textContent = "";
      sec.body.replaceChildren(el("p", "note", "Not collected: this server's logger keeps no recent records."));
      return;
    }
    const list = rec.records || [];
    sec.count.textContent = "(" + list.length + " kept of " + rec.total + " since start; last " + rec.kept + ")";
    if (list.length === 0) { sec.body.replaceChildren(el("p", "empty", "None since start.")); return; }
    const rows = list.map((r) => row(
      td("mono", when(r.time)), td("level-" + r.level.replace(/[^A-Z]/g, ""), r.level), td(null, r.msg),
      el("td", "attrs", ...(r.attrs || []).map((a) => el("span", null, el("span", "k", a.key + "="), el("span", "mono", a.value))))));
    sec.body.replaceChildren(table(["Time (UTC)", "Level", "Message", "Attributes"], rows));
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    try {
      const [st, agents, routes, stats, ready, health] = await Promise.allSettled([
        getOK("/ui/status.json"), getOK("/v1/agents"), getOK("/v1/routes"), getOK("/v1/stats"),
        get("/readyz"), get("/healthz"),
      ]);
      renderHeader(st, ready, health);
      renderMember(st, health);
      renderMembers(st, routes);
      renderTraffic(st, stats);
      renderAgents(st, agents);
      renderRoutes(st, routes);
      renderRecent(st);
      refreshes++;
      document.getElementById("status").dataset.refreshes = String(refreshes);
    } catch (e) {
      const state = document.getElementById("state");
      state.className = "state bad";
      state.textContent = "page error: " + e.message;
    } finally {
      busy = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (!document.hidden) timer = setTimeout(refresh, PERIOD);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else refresh();
  });
  refresh();
})();
