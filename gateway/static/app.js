// Dashboard: reads the ratios API with a read-only token and draws SVG charts.
// The token comes from the URL fragment (#token=...) so it never reaches server logs.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const REFRESH_MS = 10000;
  let token = null;

  function readToken() {
    const frag = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const fromUrl = frag.get("token");
    if (fromUrl) {
      sessionStorage.setItem("iiot-token", fromUrl);
      return fromUrl;
    }
    const stored = sessionStorage.getItem("iiot-token");
    if (stored) return stored;
    const asked = window.prompt("请输入只读令牌 Enter the read-only access token");
    if (asked) sessionStorage.setItem("iiot-token", asked);
    return asked;
  }

  function setStatus(text, isError) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = isError ? "error" : "";
  }

  async function api(path) {
    const res = await fetch(path, { headers: { Authorization: "Bearer " + token } });
    if (res.status === 401) {
      sessionStorage.removeItem("iiot-token");
      throw new Error("令牌无效 Token not accepted (401)");
    }
    if (!res.ok) throw new Error("HTTP " + res.status + " " + path);
    return res.json();
  }

  function pct(x) {
    return (x * 100).toFixed(1) + "%";
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // Approximate rendered width at 13 px: CJK glyphs are about twice as wide as Latin.
  function textWidth(text) {
    let w = 0;
    for (const ch of text) w += ch.charCodeAt(0) > 0x2e80 ? 13 : 7;
    return w;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // Horizontal bars: label | connected-ratio bar with online overlay | value.
  function drawBars(svg, groups) {
    clear(svg);
    const width = Math.max(svg.clientWidth || 0, 560);
    const longest = groups.reduce(function (m, g) { return Math.max(m, textWidth(g.label)); }, 0);
    const labelW = Math.max(120, Math.min(longest + 12, width * 0.45));
    const valueW = 150;
    const barW = width - labelW - valueW - 16;
    const rowH = 32;
    const height = Math.max(1, groups.length) * rowH + 26;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("height", height);
    if (groups.length === 0) {
      svg.appendChild(el("text", { x: 8, y: 20, class: "muted" }, "暂无数据 No devices yet"));
      return;
    }
    groups.forEach(function (g, i) {
      const y = i * rowH + 4;
      const row = el("g", { class: "row", "data-key": g.key });
      if (textWidth(g.label) <= labelW - 8) {
        row.appendChild(el("text", { x: 0, y: y + 16 }, g.label));
      } else {
        // Too long for one line: Chinese name above, English name below.
        const cut = g.label.indexOf(" ");
        row.appendChild(el("text", { x: 0, y: y + 9 }, g.label.slice(0, cut)));
        row.appendChild(el("text", { x: 0, y: y + 23, class: "muted small" }, g.label.slice(cut + 1)));
      }
      row.appendChild(el("rect", { class: "track", x: labelW, y: y, width: barW, height: 20, rx: 3 }));
      row.appendChild(
        el("rect", { class: "bar", x: labelW, y: y, width: Math.max(0, barW * g.ratio), height: 20, rx: 3 })
      );
      row.appendChild(
        el("rect", {
          class: "bar-online",
          x: labelW,
          y: y + 14,
          width: Math.max(0, barW * g.online_ratio),
          height: 6,
        })
      );
      row.appendChild(
        el("text", { x: labelW + barW + 8, y: y + 16 }, pct(g.ratio) + "  " + g.connected + "/" + g.total + " 台")
      );
      const tip = el("title", {}, g.label + ": 联网 connected " + g.connected + ", 在线 online " +
        g.online + ", 总量 total " + g.total);
      row.appendChild(tip);
      svg.appendChild(row);
    });
    const y = groups.length * rowH + 18;
    svg.appendChild(el("rect", { class: "bar", x: labelW, y: y - 9, width: 12, height: 10 }));
    svg.appendChild(el("text", { x: labelW + 16, y: y, class: "muted" }, "联网率 connected"));
    svg.appendChild(el("rect", { class: "bar-online", x: labelW + 150, y: y - 6, width: 12, height: 6 }));
    svg.appendChild(el("text", { x: labelW + 166, y: y, class: "muted" }, "在线率 online now"));
  }

  function drawTrend(svg, series) {
    clear(svg);
    const width = Math.max(svg.clientWidth || 0, 560);
    const height = 220;
    const left = 48, right = 16, top = 12, bottom = 34;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("height", height);
    const points = series && series.points ? series.points : [];
    if (points.length === 0) {
      svg.appendChild(el("text", { x: 8, y: 24, class: "muted" },
        "尚无快照 No snapshots yet (taken every hour)"));
      return;
    }
    const t0 = points[0].ts, t1 = points[points.length - 1].ts;
    const span = Math.max(1, t1 - t0);
    const x = function (ts) { return left + ((ts - t0) / span) * (width - left - right); };
    const y = function (r) { return top + (1 - r) * (height - top - bottom); };
    [0, 0.25, 0.5, 0.75, 1].forEach(function (r) {
      svg.appendChild(el("line", { class: "grid", x1: left, x2: width - right, y1: y(r), y2: y(r) }));
      svg.appendChild(el("text", { x: 4, y: y(r) + 4, class: "muted" }, Math.round(r * 100) + "%"));
    });
    const line = function (key, cls) {
      const pts = points.map(function (p) { return x(p.ts).toFixed(1) + "," + y(p[key]).toFixed(1); });
      if (pts.length === 1) pts.push((x(t0) + 4).toFixed(1) + "," + y(points[0][key]).toFixed(1));
      svg.appendChild(el("polyline", { class: cls, points: pts.join(" ") }));
    };
    line("ratio", "connected");
    line("online_ratio", "online");
    const fmt = function (ts) { return new Date(ts).toLocaleString("zh-CN", { hour12: false }); };
    svg.appendChild(el("text", { x: left, y: height - 10, class: "muted" }, fmt(t0)));
    svg.appendChild(el("text", { x: width - right, y: height - 10, class: "muted", "text-anchor": "end" }, fmt(t1)));
  }

  function drawOffline(items) {
    const body = document.querySelector("#offline tbody");
    body.textContent = "";
    if (items.length === 0) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = 5;
      td.className = "empty";
      td.textContent = "没有掉线设备 No device has dropped offline";
      return;
    }
    for (const d of items) {
      const tr = body.insertRow();
      const when = d.offline_since_ms ? new Date(d.offline_since_ms).toLocaleString("zh-CN", { hour12: false }) : "—";
      [when, d.enterprise_name || d.enterprise, (d.name ? d.name + " " : "") + "(" + d.id + ")", d.region_label, d.state_reason || "—"]
        .forEach(function (text) { tr.insertCell().textContent = text; });
    }
  }

  function ratioText(g) {
    return g ? pct(g.ratio) + "  " + g.connected + "/" + g.total + " 台" : "—";
  }

  // One row per region of the level: devices, products, enterprises on the cloud, target.
  function drawRegions(devices, products, onCloud) {
    const body = document.querySelector("#regions tbody");
    body.textContent = "";
    const rows = new Map();
    const row = function (g) {
      if (!rows.has(g.key)) rows.set(g.key, { key: g.key, label: g.label });
      return rows.get(g.key);
    };
    devices.groups.forEach(function (g) { row(g).devices = g; });
    products.groups.forEach(function (g) { row(g).products = g; });
    onCloud.groups.forEach(function (g) { row(g).ent = g; });
    const keys = Array.from(rows.keys()).sort();
    if (keys.length === 0) {
      const td = body.insertRow().insertCell();
      td.colSpan = 6;
      td.className = "empty";
      td.textContent = "暂无数据 No data yet";
      return;
    }
    for (const key of keys) {
      const r = rows.get(key);
      const tr = body.insertRow();
      tr.dataset.key = key;
      tr.insertCell().textContent = r.label;
      const cells = [
        ratioText(r.devices),
        ratioText(r.products),
        r.ent ? r.ent.on_cloud + "/" + r.ent.registered + " 家" : "—",
        r.ent && r.ent.target !== null ? r.ent.target + " 家" : "—",
      ];
      for (const text of cells) {
        const td = tr.insertCell();
        td.className = "num";
        td.textContent = text;
      }
      const td = tr.insertCell();
      td.className = "num progress-cell";
      if (r.ent && r.ent.progress !== null) {
        const bar = document.createElement("span");
        bar.className = "progress";
        const fill = document.createElement("span");
        fill.style.width = Math.min(100, r.ent.progress * 100).toFixed(1) + "%";
        bar.appendChild(fill);
        td.appendChild(bar);
        td.appendChild(document.createTextNode(pct(r.ent.progress)));
      } else {
        td.textContent = "—";
      }
    }
  }

  function drawCards(products, onCloud, provinces) {
    const p = products.overall;
    document.getElementById("ratio-products").textContent = p.total ? pct(p.ratio) : "—";
    document.getElementById("count-products").textContent =
      "联网产品 " + p.connected + " 台 / 生产产品 " + p.total + " 台 (connected / made)";
    const e = onCloud.overall;
    document.getElementById("on-cloud").textContent = String(e.on_cloud);
    document.getElementById("on-cloud-detail").textContent =
      "上云企业 " + e.on_cloud + " 家 / 登记企业 " + e.registered + " 家 (" + pct(e.ratio) + ")";
    document.getElementById("min-devices").textContent = String(onCloud.min_connected_devices);
    // A provincial platform has one province: its target is the headline one.
    const prov = provinces.groups.length === 1 ? provinces.groups[0] : null;
    document.getElementById("on-cloud-target").textContent =
      prov && prov.target !== null
        ? onCloud.year + " 年目标 target " + prov.target + " 家 · 完成 progress " + pct(prov.progress)
        : "";
  }

  async function refresh() {
    const win = document.getElementById("window").value;
    const level = document.getElementById("level").value;
    try {
      const [city, cat, hist, offline, devs, prods, ents, provinces] = await Promise.all([
        api("/api/v1/ratios?group_by=city&window=" + win),
        api("/api/v1/ratios?group_by=category&window=" + win),
        api("/api/v1/ratios/history?group_by=overall&step=1h"),
        api("/api/v1/devices/offline?limit=15"),
        api("/api/v1/ratios?group_by=" + level + "&window=" + win),
        api("/api/v1/ratios?kind=product&group_by=" + level + "&window=" + win),
        api("/api/v1/enterprises/on-cloud?group_by=" + level + "&window=" + win),
        api("/api/v1/enterprises/on-cloud?group_by=province&window=" + win),
      ]);
      const o = city.overall;
      document.getElementById("ratio-connected").textContent = pct(o.ratio);
      document.getElementById("count-connected").textContent =
        "联网设备 " + o.connected + " 台 / 设备总量 " + o.total + " 台 (connected / total)";
      document.getElementById("ratio-online").textContent = pct(o.online_ratio);
      document.getElementById("count-online").textContent =
        "在线设备 " + o.online + " 台 / 设备总量 " + o.total + " 台 (online / total)";
      document.getElementById("total").textContent = String(o.total);
      document.getElementById("asof").textContent =
        "数据时间 As of " + new Date(city.as_of).toLocaleString("zh-CN", { hour12: false });
      drawBars(document.getElementById("chart-city"), city.groups);
      drawBars(document.getElementById("chart-category"), cat.groups);
      drawTrend(document.getElementById("chart-trend"), hist.series[0]);
      drawOffline(offline.items);
      drawCards(prods, ents, provinces);
      drawRegions(devs, prods, ents);
      setStatus("", false);
    } catch (err) {
      setStatus(String(err.message || err), true);
    }
  }

  token = readToken();
  document.getElementById("window").addEventListener("change", refresh);
  document.getElementById("level").addEventListener("change", refresh);
  refresh();
  window.setInterval(refresh, REFRESH_MS);
})();
