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
    const height = 240;
    const left = 48, right = 16, top = 12, bottom = 54;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("height", height);
    const points = series && series.points ? series.points : [];
    if (points.length === 0) {
      svg.appendChild(el("text", { x: 8, y: 24, class: "muted" },
        "尚无快照 No snapshots yet"));
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
      // A snapshot stored before its quality count was has none (null): no point drawn.
      const kept = points.filter(function (p) { return p[key] !== null && p[key] !== undefined; });
      if (kept.length === 0) return;
      const pts = kept.map(function (p) { return x(p.ts).toFixed(1) + "," + y(p[key]).toFixed(1); });
      // One snapshot so far: draw it across the chart as a level line, not a dot.
      if (pts.length === 1) pts.push((width - right).toFixed(1) + "," + y(kept[0][key]).toFixed(1));
      svg.appendChild(el("polyline", { class: cls, points: pts.join(" ") }));
    };
    line("ratio", "connected");
    line("quality_ratio", "quality");
    line("online_ratio", "online");
    // What each line is, drawn as it is drawn.
    [["connected", "联网率 connected"], ["quality", "数据达标率 quality"], ["online", "在线率 online"]]
      .forEach(function (entry, i) {
        const lx = left + i * 170, ly = height - 30;
        svg.appendChild(el("polyline", { class: entry[0] + " key", points: lx + "," + ly + " " + (lx + 22) + "," + ly }));
        svg.appendChild(el("text", { x: lx + 28, y: ly + 4, class: "muted" }, entry[1]));
      });
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
        api("/api/v1/ratios/history?group_by=overall&step=5m"),
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
      document.getElementById("ratio-quality").textContent = pct(o.quality_ratio);
      document.getElementById("count-quality").textContent =
        "数据达标 " + o.quality_connected + " 台 / 设备总量 " + o.total + " 台 (good data / total)";
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

  // ---- Drill-down, reconciliation, grades and the device page ---------------------------
  // The view lives in the URL fragment beside the token (#tab=..&region=..&industry=..), so
  // every bar, row and breadcrumb is a plain link and the browser's back button goes up.

  function readState() {
    const f = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    const get = function (k) { return f.get(k) || ""; };
    return {
      tab: get("tab") || "overview",
      region: get("region"),
      industry: get("industry"),
      category: get("category"),
      ent: get("ent"),
      dev: get("dev"),
      sort: get("sort"),
    };
  }

  // A link to the state with ``changes`` applied (the token is not repeated in links).
  function link(state, changes) {
    const next = Object.assign({}, state, changes);
    const f = new URLSearchParams();
    for (const k of ["tab", "region", "industry", "category", "ent", "dev", "sort"]) {
      if (next[k] && !(k === "tab" && next[k] === "overview")) f.set(k, next[k]);
    }
    return "#" + f.toString();
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
    return q.toString();
  }

  function regionLevel(code) {
    if (!code) return "province";
    return code.length <= 2 ? "province" : code.length <= 4 ? "city" : "county";
  }

  // What the overview shows for a state: the grouping below the current level.
  function drillGroup(state) {
    if (state.ent) return null; // devices of one enterprise
    const level = regionLevel(state.region);
    return level === "province" ? "city" : level === "city" ? "county" : "enterprise";
  }

  function anchor(href, text, cls) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (cls) a.className = cls;
    return a;
  }

  function drawCrumbs(nav, state, names) {
    nav.textContent = "";
    const parts = [[link(state, { region: "", ent: "", dev: "", tab: "overview" }), "全省 Province"]];
    const r = state.region;
    if (r) {
      if (r.length >= 4) parts.push([link(state, { region: r.slice(0, 4), ent: "", dev: "", tab: "overview" }), names.city || r.slice(0, 4)]);
      if (r.length >= 6) parts.push([link(state, { region: r, ent: "", dev: "", tab: "overview" }), names.county || r]);
    }
    if (state.ent) parts.push([link(state, { dev: "", tab: "overview" }), names.ent || state.ent]);
    if (state.dev) parts.push([link(state, {}), names.dev || state.dev]);
    parts.forEach(function (p, i) {
      if (i > 0) nav.appendChild(document.createTextNode(" › "));
      nav.appendChild(anchor(p[0], p[1], i === parts.length - 1 ? "here" : ""));
    });
  }

  function fillSelect(select, groups, value) {
    const keep = select.options[0];
    select.textContent = "";
    select.appendChild(keep);
    for (const g of groups) {
      const o = document.createElement("option");
      o.value = g.key;
      o.textContent = g.label === g.key ? g.key : g.key + " " + g.label;
      select.appendChild(o);
    }
    if (value && !groups.some(function (g) { return g.key === value; })) {
      const o = document.createElement("option");
      o.value = value;
      o.textContent = value;
      select.appendChild(o);
    }
    select.value = value;
    for (const o of select.options) {
      if (o.value === value) o.setAttribute("selected", ""); else o.removeAttribute("selected");
    }
  }

  function setHead(table, labels, sortHref) {
    const tr = table.querySelector("thead tr");
    tr.textContent = "";
    labels.forEach(function (label) {
      const th = document.createElement("th");
      if (label.sort && sortHref) {
        th.appendChild(anchor(sortHref, label.text, "sort"));
        th.id = "sort-ratio";
      } else {
        th.textContent = label.text;
      }
      tr.appendChild(th);
    });
  }

  function emptyRow(body, cols, text) {
    const td = body.insertRow().insertCell();
    td.colSpan = cols;
    td.className = "empty";
    td.textContent = text;
  }

  function fmtTime(ts) {
    return ts ? new Date(ts).toLocaleString("zh-CN", { hour12: false }) : "—";
  }

  function exportLinks(csvEl, xlsxEl, report, params) {
    const q = query(params);
    csvEl.href = "/api/v1/reports/" + report + ".csv" + (q ? "?" + q : "");
    xlsxEl.href = "/api/v1/reports/" + report + ".xlsx" + (q ? "?" + q : "");
  }

  // Links carry no token: the export buttons fetch with it and save the file.
  function wireDownload(a) {
    if (a.dataset.wired) return;
    a.dataset.wired = "1";
    a.addEventListener("click", async function (ev) {
      ev.preventDefault();
      try {
        const res = await fetch(a.href, { headers: { Authorization: "Bearer " + token } });
        if (!res.ok) throw new Error("HTTP " + res.status + " " + a.href);
        const url = URL.createObjectURL(await res.blob());
        const save = document.createElement("a");
        save.href = url;
        save.download = a.href.split("?")[0].split("/").pop();
        document.body.appendChild(save);
        save.click();
        save.remove();
        URL.revokeObjectURL(url);
      } catch (err) {
        setStatus(String(err.message || err), true);
      }
    });
  }

  // The names of the city and county of a region code, for the breadcrumbs.
  async function regionNames(r) {
    const names = {};
    const label = async function (level, code) {
      const groups = (await api("/api/v1/ratios?group_by=" + level + "&region=" + code)).groups;
      return groups.length ? groups[0].label : code;
    };
    if (r.length >= 4) names.city = await label("city", r.slice(0, 4));
    if (r.length >= 6) names.county = await label("county", r);
    return names;
  }

  async function renderDrill(state, win) {
    const scope = { region: state.region, industry: state.industry, category: state.category, window: win };
    const group = drillGroup(state);
    const [industries, categories] = await Promise.all([
      api("/api/v1/ratios?group_by=industry&window=" + win),
      api("/api/v1/ratios?group_by=category&window=" + win),
    ]);
    fillSelect(document.getElementById("f-industry"), industries.groups, state.industry);
    fillSelect(document.getElementById("f-category"), categories.groups, state.category);
    const names = await regionNames(state.region);
    const title = document.getElementById("drill-title");
    const table = document.getElementById("drill-table");
    const body = table.querySelector("tbody");
    body.textContent = "";
    if (group) {
      const data = await api("/api/v1/ratios?" + query(Object.assign({ group_by: group }, scope)));
      const rows = data.groups.slice();
      if (state.sort === "ratio") rows.sort(function (a, b) { return b.ratio - a.ratio || a.key.localeCompare(b.key); });
      if (state.sort === "ratio-asc") rows.sort(function (a, b) { return a.ratio - b.ratio || a.key.localeCompare(b.key); });
      const down = function (g) {
        return group === "enterprise" ? link(state, { ent: g.key }) : link(state, { region: g.key.slice(0, group === "city" ? 4 : 6) });
      };
      const levelName = { city: "各市 Cities", county: "各县区 Counties", enterprise: "各企业 Enterprises" }[group];
      title.textContent = levelName + " · 联网设备 " + data.overall.connected + " / " + data.overall.total + " 台 (" + pct(data.overall.ratio) + ")";
      drawBars(document.getElementById("drill-chart"), rows);
      document.querySelectorAll("#drill-chart g.row").forEach(function (row) {
        const g = rows.find(function (x) { return x.key === row.getAttribute("data-key"); });
        const a = el("a", { href: down(g), class: "drill" });
        row.parentNode.insertBefore(a, row);
        a.appendChild(row);
      });
      const sortHref = link(state, { sort: state.sort === "ratio" ? "ratio-asc" : "ratio" });
      setHead(table, [
        { text: "名称 Name" }, { text: "联网 Connected" }, { text: "数据达标 Good data" },
        { text: "总量 Total" }, { text: "联网率 Ratio" + (state.sort === "ratio" ? " ▼" : state.sort === "ratio-asc" ? " ▲" : ""), sort: true },
      ], sortHref);
      if (rows.length === 0) emptyRow(body, 5, "暂无数据 No devices in this view");
      for (const g of rows) {
        const tr = body.insertRow();
        tr.dataset.key = g.key;
        tr.insertCell().appendChild(anchor(down(g), g.label));
        [g.connected, g.quality_connected, g.total, pct(g.ratio)].forEach(function (v) {
          const td = tr.insertCell();
          td.className = "num";
          td.textContent = String(v);
        });
      }
      exportLinks(document.getElementById("export-csv"), document.getElementById("export-xlsx"), "ratios",
        Object.assign({ group_by: group }, scope));
      drawCrumbs(document.getElementById("crumbs"), state, names);
    } else {
      const [ent, devs] = await Promise.all([
        api("/api/v1/ratios?" + query(Object.assign({ enterprise: state.ent }, scope))),
        api("/api/v1/devices?" + query({ enterprise: state.ent, category: state.category, limit: "1000" })),
      ]);
      names.ent = devs.items.length ? devs.items[0].enterprise_name : state.ent;
      title.textContent = names.ent + " · 设备 Devices · 联网 " + ent.overall.connected + " / " + ent.overall.total + " 台 (" + pct(ent.overall.ratio) + ")";
      clear(document.getElementById("drill-chart"));
      document.getElementById("drill-chart").setAttribute("height", 0);
      setHead(table, [{ text: "设备 Device" }, { text: "类别 Category" }, { text: "状态 State" }, { text: "最后数据 Last sample" }, { text: "原因 Reason" }], "");
      if (devs.items.length === 0) emptyRow(body, 5, "暂无设备 No devices");
      for (const d of devs.items) {
        const tr = body.insertRow();
        tr.dataset.key = d.id;
        tr.insertCell().appendChild(anchor(link(state, { dev: d.id, tab: "device" }), (d.name ? d.name + " " : "") + "(" + d.id + ")"));
        tr.insertCell().textContent = d.category;
        tr.insertCell().textContent = d.online ? "在线 online" : "离线 offline";
        tr.insertCell().textContent = fmtTime(d.last_seen_ms);
        tr.insertCell().textContent = d.online ? "" : (d.state_reason || (d.last_seen_ms ? "—" : "从未上报 never reported"));
      }
      exportLinks(document.getElementById("export-csv"), document.getElementById("export-xlsx"), "ratios",
        Object.assign({ group_by: "category", enterprise: state.ent }, scope));
      drawCrumbs(document.getElementById("crumbs"), state, names);
    }
    await renderDrillTrend(state, industries.as_of);
  }

  // The stored snapshots of the grouping that matches the view; filters without a region
  // use the industry or category series.
  async function renderDrillTrend(state, asOf) {
    let group = "overall", key = "all", what = "全省 province";
    if (state.ent) { group = "enterprise"; key = state.ent; what = state.ent; }
    else if (state.region) { group = regionLevel(state.region); key = state.region.padEnd(6, "0"); what = key; }
    else if (state.industry) { group = "industry"; key = state.industry; what = state.industry; }
    else if (state.category) { group = "category"; key = state.category; what = state.category; }
    document.getElementById("drill-trend-what").textContent = "(" + group + " " + what + ")";
    // The last day by minute: a short snapshot interval (the demo's) draws a line within minutes.
    const hist = await api("/api/v1/ratios/history?" + query({
      group_by: group, key: group === "overall" ? "" : key, step: "1m",
      from: String(asOf - 24 * 3600e3), to: String(asOf),
    }));
    drawTrend(document.getElementById("drill-trend"), hist.series[0]);
  }

  function recRow(body, cells) {
    const tr = body.insertRow();
    cells.forEach(function (c) {
      const td = tr.insertCell();
      if (c instanceof Node) td.appendChild(c); else td.textContent = c;
    });
    return tr;
  }

  async function renderReconciliation(state, win) {
    const data = await api("/api/v1/reconciliation?window=" + win);
    const c = data.counts;
    document.getElementById("rec-summary").textContent =
      "未入台账 " + c.not_in_ledger + " · 从未上报 " + c.never_seen + " · 窗口内未上报 " +
      c.not_seen_in_window + " · 序列号重复 " + c.duplicate_serials +
      " (not in the ledger · never seen · not seen within the window · duplicate serials)";
    const devHead = [{ text: "企业 Enterprise" }, { text: "设备 Device" }, { text: "地区 Region" }, { text: "最后上报 Last seen" }];
    for (const field of ["not_in_ledger", "never_seen", "not_seen_in_window"]) {
      const table = document.getElementById("rec-" + field);
      setHead(table, devHead, "");
      const body = table.querySelector("tbody");
      body.textContent = "";
      if (data[field].length === 0) emptyRow(body, 4, "无 None");
      for (const d of data[field]) {
        const href = link(state, { tab: "device", ent: d.enterprise, dev: d.device_id, region: "" });
        recRow(body, [d.enterprise_name, anchor(href, (d.name ? d.name + " " : "") + "(" + d.device_id + ")"),
          d.region_label, fmtTime(d.last_seen_ms)]).dataset.key = d.device_id;
      }
    }
    const dup = document.getElementById("rec-duplicate_serials");
    setHead(dup, [{ text: "序列号 Serial" }, { text: "企业 Enterprise" }, { text: "设备 Device" }], "");
    const body = dup.querySelector("tbody");
    body.textContent = "";
    if (data.duplicate_serials.length === 0) emptyRow(body, 3, "无 None");
    for (const d of data.duplicate_serials) {
      for (const claim of d.claims) {
        recRow(body, [d.serial, claim.enterprise_name, claim.device_id]).dataset.key = d.serial;
      }
    }
    exportLinks(document.getElementById("rec-csv"), document.getElementById("rec-xlsx"), "reconciliation", { window: win });
  }

  async function renderGrades(state, win) {
    const data = await api("/api/v1/grades?" + query({ window: win, region: state.region, industry: state.industry }));
    document.getElementById("grades-rubric").textContent = "(" + data.rubric + ")";
    document.getElementById("grades-counts").textContent = Object.entries(data.counts)
      .map(function (kv) { return (kv[0] === "none" ? "未达 L1 none" : kv[0]) + ": " + kv[1] + " 家"; }).join(" · ");
    const body = document.querySelector("#grades tbody");
    body.textContent = "";
    if (data.items.length === 0) emptyRow(body, 5, "暂无企业 No enterprises");
    for (const it of data.items) {
      const evidence = it.levels.map(function (lv) {
        return lv.level + (lv.met ? " ✓ " : " ✗ ") + lv.evidence.map(function (e) {
          const actual = Array.isArray(e.actual) ? e.actual.join("/") || "—" :
            typeof e.actual === "object" ? Object.entries(e.actual).map(function (kv) { return kv[0] + " " + kv[1]; }).join(", ") || "0" :
            typeof e.actual === "number" && e.criterion.indexOf("ratio") >= 0 ? pct(e.actual) : String(e.actual);
          return e.criterion + " " + actual + (e.missing && e.missing.length ? " (缺 missing " + e.missing.join("/") + ")" : "");
        }).join(", ");
      }).join("; ");
      const tr = recRow(body, [
        anchor(link(state, { tab: "overview", ent: it.enterprise, region: it.region }), it.name),
        it.region_label, it.grade || "—",
        it.connected + " / " + it.quality_connected + " / " + it.total, evidence,
      ]);
      tr.dataset.key = it.enterprise;
    }
    exportLinks(document.getElementById("grades-csv"), document.getElementById("grades-xlsx"), "grades",
      { window: win, region: state.region, industry: state.industry });
  }

  function drawSeries(svg, points, name) {
    clear(svg);
    const width = Math.max(svg.clientWidth || 0, 560), height = 140;
    const left = 56, right = 12, top = 10, bottom = 24;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("height", height);
    const vals = points.map(function (p) { return p.v; });
    let lo = Math.min.apply(null, vals), hi = Math.max.apply(null, vals);
    if (hi === lo) { hi += 1; lo -= 1; }
    const t0 = points[0].ts, t1 = points[points.length - 1].ts, span = Math.max(1, t1 - t0);
    const x = function (ts) { return left + ((ts - t0) / span) * (width - left - right); };
    const y = function (v) { return top + (1 - (v - lo) / (hi - lo)) * (height - top - bottom); };
    svg.appendChild(el("text", { x: 4, y: y(hi) + 4, class: "muted" }, hi.toPrecision(4)));
    svg.appendChild(el("text", { x: 4, y: y(lo) + 4, class: "muted" }, lo.toPrecision(4)));
    const pts = points.map(function (p) { return x(p.ts).toFixed(1) + "," + y(p.v).toFixed(1); });
    if (pts.length === 1) pts.push((width - right).toFixed(1) + "," + y(points[0].v).toFixed(1));
    svg.appendChild(el("polyline", { class: "connected", points: pts.join(" ") }));
    svg.appendChild(el("text", { x: left, y: height - 6, class: "muted" }, name + " · " + fmtTime(t0) + " – " + fmtTime(t1)));
  }

  async function renderDevice(state) {
    const path = encodeURIComponent(state.ent) + "/" + encodeURIComponent(state.dev);
    const [d, t] = await Promise.all([
      api("/api/v1/devices/" + path),
      api("/api/v1/devices/" + path + "/telemetry?hours=6"),
    ]);
    const names = await regionNames(state.region);
    names.ent = d.enterprise_name;
    names.dev = d.name || d.id;
    drawCrumbs(document.getElementById("dev-crumbs"), state, names);
    document.getElementById("dev-title").textContent = (d.name ? d.name + " " : "") + "(" + d.id + ") · " + d.enterprise_name;
    const facts = document.querySelector("#dev-facts tbody");
    facts.textContent = "";
    const q = t.quality;
    [
      ["状态 State", d.online ? "在线 online" : "离线 offline"],
      ["离线原因 Reason offline", d.online ? "—" : (d.state_reason || (d.last_seen_ms ? "—" : "从未上报 never reported"))],
      ["最后数据 Last sample", fmtTime(d.last_seen_ms)],
      ["最后有效数据 Last good sample", fmtTime(d.last_good_ms)],
      ["地区 Region", d.region_label],
      ["类别 Category", d.category + " · " + d.family],
      ["数据质量 Data quality (24 h)", q.samples + " / " + q.expected + " 次 samples" + (q.frozen ? " · 数值冻结 frozen" : "") + (q.passes ? " · 达标 passes" : " · 未达标 fails")],
    ].forEach(function (kv) { recRow(facts, kv); });
    const latest = document.querySelector("#dev-latest tbody");
    latest.textContent = "";
    const entries = Object.entries(d.latest || {});
    if (entries.length === 0) emptyRow(latest, 2, "暂无数据 No values yet");
    for (const [k, v] of entries) recRow(latest, [k, String(v)]).dataset.key = k;
    const charts = document.getElementById("dev-charts");
    charts.textContent = "";
    const numeric = entries.filter(function (kv) { return typeof kv[1] === "number"; }).map(function (kv) { return kv[0]; }).slice(0, 8);
    for (const name of numeric) {
      const pts = t.points.filter(function (p) { return typeof p.values[name] === "number"; })
        .map(function (p) { return { ts: p.ts, v: p.values[name] }; });
      if (pts.length === 0) continue;
      const svg = el("svg", { class: "trend series", "data-point": name, role: "img", "aria-label": name });
      charts.appendChild(svg);
      drawSeries(svg, pts, name);
    }
    exportLinks(document.getElementById("dev-csv"), document.getElementById("dev-xlsx"), "telemetry",
      { enterprise: state.ent, device: state.dev, hours: "6" });
    const fromDb = t.source === "victoria-metrics";
    if (!charts.firstChild) charts.textContent = fromDb ? "近 6 小时无数据 No samples in the last 6 h" : "网关启动后尚无数据 No samples since the gateway started";
    document.getElementById("dev-source").textContent = "数据来源 Source: " + t.source +
      (t.capped_from_ms ? " · 仅最新数据，自 latest only, from " + fmtTime(t.capped_from_ms) : "");
    const states = document.querySelector("#dev-states tbody");
    states.textContent = "";
    if (t.states.length === 0) emptyRow(states, 3, "网关启动后无状态变化 No state change since the gateway started");
    for (const s of t.states) recRow(states, [fmtTime(s.ts), s.online ? "在线 online" : "离线 offline", s.reason || "—"]);
  }

  function showTab(tab) {
    for (const name of ["overview", "reconciliation", "grades", "device"]) {
      document.getElementById("view-" + name).hidden = name !== tab;
      const t = document.getElementById("tab-" + name);
      if (t) t.className = name === tab ? "active" : "";
    }
  }

  async function render() {
    const state = readState();
    const tab = state.tab === "device" && !(state.ent && state.dev) ? "overview" : state.tab;
    showTab(tab);
    const win = document.getElementById("window").value;
    try {
      if (tab === "overview") {
        await Promise.all([refresh(), renderDrill(state, win)]);
      } else if (tab === "reconciliation") {
        await renderReconciliation(state, win);
      } else if (tab === "grades") {
        await renderGrades(state, win);
      } else {
        await renderDevice(state);
      }
    } catch (err) {
      setStatus(String(err.message || err), true);
    }
  }

  function onFilter(name) {
    return function (ev) {
      const change = {};
      change[name] = ev.target.value;
      window.location.hash = link(readState(), change).slice(1);
    };
  }

  token = readToken();
  for (const id of ["export-csv", "export-xlsx", "rec-csv", "rec-xlsx", "grades-csv", "grades-xlsx", "dev-csv", "dev-xlsx"]) {
    wireDownload(document.getElementById(id));
  }
  document.getElementById("f-industry").addEventListener("change", onFilter("industry"));
  document.getElementById("f-category").addEventListener("change", onFilter("category"));
  document.getElementById("window").addEventListener("change", render);
  document.getElementById("level").addEventListener("change", refresh);
  window.addEventListener("hashchange", render);
  render();
  window.setInterval(render, REFRESH_MS);
})();
