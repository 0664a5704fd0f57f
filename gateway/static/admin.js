// Control plane page: agents and their configuration, scans, discovered devices, and a
// page per device (live values, state changes, writes). It needs an admin or operator
// token, taken from the URL fragment (#token=...) so it never reaches server logs.
"use strict";

(function () {
  const KEY = "iiot-admin-token";
  const OVERVIEW_MS = 3000;
  const DEVICE_MS = 2000;
  let token = null;
  let timer = null;
  let device = null; // {ent, id, profile} while a device page is open
  let discoveredSig = "";
  const scanNotes = {}; // agent key -> what the last scan request answered

  function readToken() {
    const frag = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const fromUrl = frag.get("token");
    if (fromUrl) {
      sessionStorage.setItem(KEY, fromUrl);
      return fromUrl;
    }
    const stored = sessionStorage.getItem(KEY);
    if (stored) return stored;
    const asked = window.prompt("请输入管理或操作员令牌 Enter an admin or operator token");
    if (asked) sessionStorage.setItem(KEY, asked);
    return asked;
  }

  function setStatus(text, isError) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = isError ? "error" : "";
  }

  // One element with attributes and children (strings become text, never HTML).
  function h(tag, attrs) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (let i = 2; i < arguments.length; i++) {
      const c = arguments[i];
      if (c === null || c === undefined) continue;
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return node;
  }

  function fill(tbody, rows, cols, emptyText) {
    tbody.replaceChildren();
    if (rows.length === 0) {
      tbody.appendChild(h("tr", {}, h("td", { colspan: cols, class: "empty" }, emptyText)));
      return;
    }
    rows.forEach(function (r) { tbody.appendChild(r); });
  }

  function detail(data) {
    if (!data) return "";
    const d = data.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map(function (x) { return x.msg || JSON.stringify(x); }).join("; ");
    return data.reason || "";
  }

  async function api(method, path, body) {
    const opts = { method: method, headers: { Authorization: "Bearer " + token } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(path, opts);
    if (res.status === 401) {
      sessionStorage.removeItem(KEY);
      throw new Error("令牌无效 Token not accepted (401)");
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    return { status: res.status, ok: res.ok, data: data };
  }

  async function get(path) {
    const r = await api("GET", path);
    if (!r.ok) throw new Error("HTTP " + r.status + " " + path + ": " + detail(r.data));
    return r.data;
  }

  function seg(s) { return encodeURIComponent(s); }

  function when(ms) {
    if (!ms) return "—";
    const d = new Date(ms);
    const p = function (n) { return String(n).padStart(2, "0"); };
    return d.getFullYear() + "-" + p(d.getMonth() + 1) + "-" + p(d.getDate()) + " " +
      p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function show(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "number" && !Number.isInteger(v)) return String(Math.round(v * 1000) / 1000);
    return String(v);
  }

  function onlineBadge(online) {
    return h("span", { class: online ? "ok" : "bad" }, online ? "在线 online" : "离线 offline");
  }

  function deviceLink(ent, id) {
    return h("a", { href: "#device=" + seg(ent) + "/" + seg(id), class: "dev-link", "data-device": id }, id);
  }

  // ----------------------------------------------------------------- overview

  function configCell(view) {
    const cell = h("td", { class: "config" });
    const d = view.desired;
    const r = view.reported;
    if (view.error) {
      cell.appendChild(h("span", { class: "bad" }, view.error));
      return cell;
    }
    if (!d) {
      cell.appendChild(h("span", { class: "muted" }, "未下发 no desired configuration"));
    } else if (view.in_sync) {
      cell.appendChild(h("span", { class: "ok" }, "已同步 in sync"));
    } else if (r && r.version === d.version && !r.applied) {
      cell.appendChild(h("span", { class: "bad" }, "已拒绝 refused v" + d.version));
    } else {
      cell.appendChild(h("span", { class: "warn" }, "等待应用 waiting for the agent"));
    }
    const errors = Object.entries((r && r.errors) || {});
    if (errors.length) {
      const ul = h("ul", { class: "errors" });
      errors.forEach(function (e) { ul.appendChild(h("li", {}, e[0] + ": " + e[1])); });
      cell.appendChild(ul);
    }
    return cell;
  }

  function agentRow(a, view, deviceIds) {
    const key = a.enterprise + "/" + a.id;
    const d = view.desired;
    const r = view.reported;
    const reported = r ? "v" + r.running_version + (r.applied ? "" : " (v" + r.version + " 未应用 not applied)") : "—";
    const devs = h("td", { class: "devices" });
    deviceIds.forEach(function (id, i) {
      if (i) devs.appendChild(document.createTextNode(" "));
      devs.appendChild(deviceLink(a.enterprise, id));
    });
    const scan = h("button", { type: "button", class: "scan", "data-agent": key, onclick: function () { doScan(a); } },
      "扫描 Scan");
    return h("tr", { "data-agent": key },
      h("td", {}, a.enterprise),
      h("td", {}, a.id),
      h("td", {}, onlineBadge(a.online)),
      h("td", { class: "num" }, d ? "v" + d.version + (d.published ? "" : " (未发布 unpublished)") : "—"),
      h("td", { class: "num" }, reported),
      configCell(view),
      devs,
      h("td", {}, scan, h("div", { class: "note" }, scanNotes[key] || "")));
  }

  async function doScan(a) {
    const key = a.enterprise + "/" + a.id;
    scanNotes[key] = "…";
    const r = await api("POST", "/api/v1/agents/" + seg(a.enterprise) + "/" + seg(a.id) + "/scan");
    scanNotes[key] = r.ok
      ? "已发送 scan sent; 有效至 runs until " + when(r.data.expires_ms).slice(11)
      : "失败 refused (" + r.status + "): " + detail(r.data);
    refresh();
  }

  // What answered the scan, one "key: value" per line; nested objects flattened.
  function answeredText(ans) {
    const lines = [];
    Object.entries(ans || {}).forEach(function (e) {
      if (e[1] && typeof e[1] === "object" && !Array.isArray(e[1])) {
        Object.entries(e[1]).forEach(function (f) { lines.push(f[0] + ": " + f[1]); });
      } else {
        lines.push(e[0] + ": " + (Array.isArray(e[1]) ? e[1].join(", ") : e[1]));
      }
    });
    return lines.join("\n");
  }

  function addressText(p) {
    const a = (p.address || {})[p.protocol] || p.address || {};
    if (p.protocol === "modbus") {
      const where = a.host ? a.host + ":" + (a.port || 502) : (a.port || "");
      return "modbus " + where + " unit " + a.unit;
    }
    if (a.endpoint) return p.protocol + " " + a.endpoint;
    return p.protocol + " " + JSON.stringify(a);
  }

  function discoveredRow(p) {
    const best = (p.candidates && p.candidates[0]) ? p.candidates[0].profile : "";
    const common = [
      h("td", {}, p.enterprise + "/" + p.agent),
      h("td", { class: "address" }, addressText(p)),
      h("td", { class: "small answered" }, answeredText(p.answered)),
    ];
    if (p.status !== "new") {
      return h("tr", { "data-proposal": p.id, class: "done" }, ...common,
        h("td", {}, p.device_id ? deviceLink(p.enterprise, p.device_id) : "—"),
        h("td", { colspan: 3 }, p.status === "approved" ? "已批准 approved" : "已拒绝 rejected"));
    }
    const listId = "cands-" + p.id;
    const list = h("datalist", { id: listId });
    (p.candidates || []).forEach(function (c) {
      list.appendChild(h("option", { value: c.profile }, c.profile + " (" + c.score.toFixed(2) + ")"));
    });
    const scores = (p.candidates || []).map(function (c) { return c.profile + " " + c.score.toFixed(2); }).join(", ");
    const idIn = h("input", { class: "dev-id", size: 12, placeholder: "kiln-2", "aria-label": "device id" });
    const profIn = h("input", { class: "profile", list: listId, size: 18, value: best, "aria-label": "profile" });
    const pollIn = h("input", { class: "poll", type: "number", min: "0.1", step: "any", size: 5, placeholder: "5", "aria-label": "poll interval" });
    const note = h("div", { class: "note" });
    const approve = h("button", { type: "button", class: "approve", onclick: function () {
      const body = { device_id: idIn.value.trim() };
      if (profIn.value.trim() && profIn.value.trim() !== best) body.profile = profIn.value.trim();
      if (pollIn.value) body.poll_interval = Number(pollIn.value);
      decide(p, "approve", body, note);
    } }, "批准 Approve");
    const reject = h("button", { type: "button", class: "reject", onclick: function () {
      decide(p, "reject", undefined, note);
    } }, "拒绝 Reject");
    return h("tr", { "data-proposal": p.id }, ...common,
      h("td", {}, idIn),
      h("td", {}, profIn, list, h("div", { class: "small muted" }, scores)),
      h("td", {}, pollIn, " 秒 s"),
      h("td", {}, approve, " ", reject, note));
  }

  async function decide(p, action, body, note) {
    note.textContent = "…";
    const r = await api("POST", "/api/v1/discovered/" + p.id + "/" + action, body);
    if (!r.ok) {
      note.textContent = "失败 refused (" + r.status + "): " + detail(r.data);
      note.className = "note bad";
      return;
    }
    discoveredSig = "";
    refresh();
  }

  async function refreshOverview() {
    const agents = (await get("/api/v1/agents")).slice(0, 500);
    const views = await Promise.all(agents.map(function (a) {
      return get("/api/v1/agents/" + seg(a.enterprise) + "/" + seg(a.id) + "/config")
        .catch(function (e) { return { error: e.message }; });
    }));
    const ents = Array.from(new Set(agents.map(function (a) { return a.enterprise; })));
    const lists = await Promise.all(ents.map(function (e) {
      return get("/api/v1/devices?limit=1000&enterprise=" + seg(e));
    }));
    const byAgent = {};
    lists.forEach(function (l) {
      l.items.forEach(function (d) {
        if (!d.agent) return;
        const k = d.enterprise + "/" + d.agent;
        (byAgent[k] = byAgent[k] || new Set()).add(d.device_id || d.id);
      });
    });
    const rows = agents.map(function (a, i) {
      const k = a.enterprise + "/" + a.id;
      const ids = byAgent[k] || new Set();
      const desired = views[i].desired;
      ((desired && desired.config.devices) || []).forEach(function (d) { ids.add(d.id); });
      return agentRow(a, views[i], Array.from(ids).sort());
    });
    fill(document.querySelector("#agents tbody"), rows, 8, "暂无采集网关 No agents yet");

    const found = await get("/api/v1/discovered");
    // Rebuilt only when something changed, so typing in a row is not wiped by a refresh.
    const sig = JSON.stringify(found.map(function (p) { return [p.id, p.status, p.last_seen_ms]; }));
    if (sig !== discoveredSig) {
      discoveredSig = sig;
      fill(document.querySelector("#discovered tbody"), found.map(discoveredRow), 7,
        "暂无发现 Nothing discovered; scan an agent");
    }
  }

  // ------------------------------------------------------------------ device page

  function pointsOf(profile) {
    const out = {};
    ((profile && profile.points) || []).forEach(function (p) { out[p.name] = p; });
    return out;
  }

  async function openDevice(ent, id) {
    const dev = await get("/api/v1/devices/" + seg(ent) + "/" + seg(id));
    let profile = null;
    if (dev.profile) {
      profile = await get("/api/v1/profiles/" + seg(dev.profile)).catch(function () { return null; });
    }
    device = { ent: ent, id: id, profile: profile, points: pointsOf(profile) };
    document.getElementById("dev-title").textContent = " " + ent + " / " + id + (dev.name ? " — " + dev.name : "");
    document.getElementById("dev-profile").textContent = profile
      ? profile.id + " (" + profile.name_zh + " " + profile.name + ")" : (dev.profile || "—");
    const select = document.getElementById("write-point");
    select.replaceChildren();
    const writable = ((profile && profile.points) || []).filter(function (p) { return p.access === "rw"; });
    writable.forEach(function (p) {
      const range = p.range ? " [" + p.range[0] + "…" + p.range[1] + "]" : "";
      select.appendChild(h("option", { value: p.name }, p.name + (p.unit ? " (" + p.unit + ")" : "") + range));
    });
    document.getElementById("write-submit").disabled = writable.length === 0;
    document.getElementById("write-hint").textContent = writable.length
      ? "可写数据点 " + writable.length + " writable points; 开关量填 true/false (bool: true or false)"
      : "此设备没有可写数据点 This device has no writable points";
    document.getElementById("write-result").replaceChildren();
    await refreshDevice();
  }

  async function refreshDevice() {
    const path = "/api/v1/devices/" + seg(device.ent) + "/" + seg(device.id);
    const dev = await get(path);
    const hist = await get(path + "/history?limit=20");
    document.getElementById("dev-online").replaceChildren(onlineBadge(dev.online));
    document.getElementById("dev-reason").textContent = dev.state_reason || "—";
    document.getElementById("dev-agent").textContent = dev.agent || "—";
    document.getElementById("dev-last").textContent = when(dev.latest_ts);
    const names = Object.keys(device.points).filter(function (n) { return n in dev.latest; });
    Object.keys(dev.latest).forEach(function (n) { if (!(n in device.points)) names.push(n); });
    fill(document.querySelector("#values tbody"), names.map(function (n) {
      const p = device.points[n] || {};
      return h("tr", { "data-point": n },
        h("td", { title: p.description || "" }, n, p.access === "rw" ? h("span", { class: "tag" }, "rw") : null),
        h("td", { class: "num value" }, show(dev.latest[n])),
        h("td", {}, p.unit || ""));
    }), 3, "暂无数据 No values yet");
    fill(document.querySelector("#history tbody"), hist.items.map(function (c) {
      return h("tr", {},
        h("td", { class: "num" }, when(c.ts)),
        h("td", {}, onlineBadge(c.online)),
        h("td", {}, c.reason || "—"),
        h("td", {}, c.source === "agent" ? "采集网关 agent" : "设备 device"));
    }), 4, "暂无变化 No changes seen since the gateway started");
    await refreshWrites();
  }

  async function refreshWrites() {
    const tbody = document.querySelector("#writes tbody");
    const r = await api("GET", "/api/v1/writes?limit=50&enterprise=" + seg(device.ent) + "&device=" + seg(device.id));
    if (!r.ok) {
      fill(tbody, [], 7, "需要管理或操作员令牌 Needs an admin or operator token (" + r.status + ")");
      return;
    }
    fill(tbody, r.data.map(function (w) {
      return h("tr", { "data-write": w.id },
        h("td", { class: "num" }, when(w.requested_ms)),
        h("td", {}, w.point),
        h("td", { class: "num" }, show(w.value)),
        h("td", { class: "num" }, show(w.previous)),
        h("td", { class: "num" }, show(w.read_back)),
        h("td", { class: w.status === "ok" ? "ok" : "bad" }, w.status + (w.reason ? ": " + w.reason : "")),
        h("td", { class: "small" }, w.role + " " + w.token_label));
    }), 7, "暂无写入 No writes yet");
  }

  function parseValue(point, text) {
    const t = text.trim();
    if (point && point.type === "bool") {
      if (/^(true|1|on|开)$/i.test(t)) return true;
      if (/^(false|0|off|关)$/i.test(t)) return false;
      throw new Error("开关量填 true 或 false — a bool point takes true or false");
    }
    if (point && point.type === "string") return t;
    const n = Number(t);
    if (t === "" || !Number.isFinite(n)) throw new Error("请填数字 — not a number: " + t);
    return n;
  }

  async function submitWrite(ev) {
    ev.preventDefault();
    const out = document.getElementById("write-result");
    const name = document.getElementById("write-point").value;
    let value;
    try {
      value = parseValue(device.points[name], document.getElementById("write-value").value);
    } catch (e) {
      out.replaceChildren(h("span", { class: "bad" }, e.message));
      return;
    }
    out.replaceChildren(h("span", { class: "muted" }, "写入中 writing " + name + " = " + value + " …"));
    const path = "/api/v1/devices/" + seg(device.ent) + "/" + seg(device.id) + "/write";
    const r = await api("POST", path, { point: name, value: value });
    const w = r.data || {};
    const ok = r.ok && w.status === "ok";
    out.replaceChildren(
      h("div", { class: ok ? "ok" : "bad", id: "write-status", "data-status": w.status || r.status },
        "结果 Result: " + (w.status || "HTTP " + r.status) + (w.reason || detail(r.data) ? " — " + (w.reason || detail(r.data)) : "")),
      h("div", {}, "原值 Previous: ", h("b", {}, show(w.previous)),
        " · 写入 Written: ", h("b", {}, show(value)),
        " · 回读 Read back: ", h("b", { id: "write-readback" }, show(w.read_back))));
    await refreshWrites();
  }

  // ------------------------------------------------------------------ routing

  function route() {
    const frag = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const dev = frag.get("device");
    if (dev && dev.indexOf("/") > 0) {
      const cut = dev.indexOf("/");
      return { ent: dev.slice(0, cut), id: dev.slice(cut + 1) };
    }
    return null;
  }

  async function refresh() {
    try {
      if (device) await refreshDevice();
      else await refreshOverview();
      setStatus("更新于 updated " + when(Date.now()), false);
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  async function navigate() {
    const where = route();
    document.getElementById("overview").hidden = where !== null;
    document.getElementById("device").hidden = where === null;
    clearInterval(timer);
    device = null;
    discoveredSig = "";
    try {
      if (where) await openDevice(where.ent, where.id);
      else await refreshOverview();
      setStatus("更新于 updated " + when(Date.now()), false);
    } catch (e) {
      setStatus(e.message, true);
    }
    timer = setInterval(refresh, where ? DEVICE_MS : OVERVIEW_MS);
  }

  async function showRole() {
    const r = await api("GET", "/api/v1/writes?limit=1");
    if (r.status === 403) {
      document.getElementById("role").textContent = "只读令牌：操作会被拒绝 read-only token: actions will be refused";
      return;
    }
    document.getElementById("role").textContent = r.ok ? "令牌可用 token accepted" : "HTTP " + r.status;
  }

  token = readToken();
  if (!token) {
    setStatus("需要令牌 A token is needed", true);
    return;
  }
  document.getElementById("write-form").addEventListener("submit", submitWrite);
  window.addEventListener("hashchange", navigate);
  showRole().catch(function (e) { setStatus(e.message, true); });
  navigate();
})();
