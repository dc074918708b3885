// recon report renderer: reads the JSON in #report-data and draws tables, SVG histograms, a canvas pair
// matrix/graph and a canvas 3D view (drag to orbit, wheel to zoom). No library, no network.
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("report-data").textContent);
  const app = document.getElementById("app");
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  };
  const section = (title, ...children) => app.append(el("section", {}, el("h2", {}, title), ...children));
  const fmt = (v, digits) => (v === null || v === undefined ? "–" : digits === undefined ? v : v.toFixed(digits));

  function summary() {
    const views = D.views, reg = views.filter((v) => v.registered).length;
    const tally = {};
    for (const v of views) tally[v.reason] = (tally[v.reason] || 0) + 1;
    const items = [
      ["views", `${reg} / ${views.length} registered` + (D.models.length > 1 ? ` in ${D.models.length} models` : "")],
      ["points", `${D.points.total} (${D.points.shown} shown)`],
      ["pairs", `${D.pairs.num_planned} planned, ${D.pairs.num_matched} matched, ${D.pairs.num_verified} verified`],
    ];
    const result = (D.run && D.run.result) || {};
    if (result.engine) items.push(["mapper", `${result.engine}: ${result.engine_reason || ""}`]);
    const timings = (D.run && D.run.timings) || {};
    const total = Object.values(timings).reduce((a, b) => a + b, 0);
    if (total) items.push(["time", Object.entries(timings).map(([k, s]) => `${k} ${s.toFixed(1)} s`).join(", ")
      + ` | total ${total.toFixed(1)} s`]);
    const list = el("dl", { class: "facts" });
    for (const [k, v] of items) list.append(el("dt", {}, k), el("dd", {}, v));
    const reasons = el("ul", { class: "reasons" });
    for (const [code, n] of Object.entries(tally))
      reasons.append(el("li", { class: "r-" + code }, `${n} × ${D.reasons[code].replace("{model}", "sparse/N")}`));
    section("Summary", list, reasons);
  }

  function viewTable() {
    const table = el("table", { class: "views", id: "views" });
    table.append(el("tr", {}, ...["", "view", "status", "reason", "keypoints", "pairs", "verified pairs",
      "observations", "reproj. error (px)"].map((h) => el("th", {}, h))));
    for (const v of D.views) {
      const thumb = v.thumb ? el("img", { src: v.thumb, alt: v.name, loading: "lazy" }) : "";
      const status = v.registered ? (v.model === 0 ? "registered" : `sparse/${v.model}`) : "not registered";
      table.append(el("tr", { class: "r-" + v.reason, "data-name": v.name }, el("td", {}, thumb),
        el("td", {}, v.name), el("td", {}, status), el("td", {}, v.reason_text), el("td", {}, fmt(v.keypoints)),
        el("td", {}, v.pairs), el("td", {}, v.verified), el("td", {}, v.observations), el("td", {}, fmt(v.error, 3))));
    }
    section(`Views (${D.views.length})`, table);
  }

  function heat(t) { // 0..1 → light yellow to dark red
    const r = 255, g = Math.round(240 - 200 * t), b = Math.round(180 - 180 * t);
    return `rgb(${Math.round(r - 90 * t)},${g},${b})`;
  }

  function pairGraph() {
    const n = D.views.length, edges = D.pairs.edges;
    const size = Math.min(720, Math.max(360, n * 8));
    const canvas = el("canvas", { width: size, height: size, id: "pairs" });
    const ctx = canvas.getContext("2d");
    const top = Math.max(1, ...edges.map((e) => e[2]));
    const level = (k) => Math.log(1 + k) / Math.log(1 + top);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, size, size);
    if (D.pairs.layout === "matrix") {
      const cell = size / Math.max(n, 1);
      ctx.strokeStyle = "#eee";
      for (let i = 0; i <= n; i++) { ctx.strokeRect(0, 0, i * cell, i * cell); }
      for (const [i, j, k] of edges) {
        ctx.fillStyle = heat(level(k));
        ctx.fillRect(j * cell, i * cell, cell, cell); ctx.fillRect(i * cell, j * cell, cell, cell);
      }
      D.views.forEach((v, i) => {
        ctx.fillStyle = v.registered ? "#9c9" : "#e88"; ctx.fillRect(i * cell, i * cell, cell, cell);
      });
    } else { // views on a circle in name order, edges drawn faint to strong
      const c = size / 2, r = size / 2 - 10;
      const at = (i) => [c + r * Math.cos(2 * Math.PI * i / n), c + r * Math.sin(2 * Math.PI * i / n)];
      for (const [i, j, k] of edges.slice().reverse()) {
        ctx.strokeStyle = heat(level(k)); ctx.globalAlpha = 0.15 + 0.6 * level(k);
        ctx.beginPath(); ctx.moveTo(...at(i)); ctx.lineTo(...at(j)); ctx.stroke();
      }
      ctx.globalAlpha = 1;
      D.views.forEach((v, i) => {
        ctx.fillStyle = v.registered ? "#393" : "#c33"; ctx.fillRect(at(i)[0] - 2, at(i)[1] - 2, 4, 4);
      });
    }
    const stats = D.pairs.stats
      ? el("pre", {}, JSON.stringify(D.pairs.stats.pairs_by_source || D.pairs.stats, null, 1)) : "not recorded";
    const parts = D.pairs.components || [];
    const split = el("p", {}, parts.length > 1
      ? `The verified pairs form ${parts.length} separate groups (the scene splits before mapping): `
        + parts.map((c) => `${c.size} views (${c.examples.slice(0, 2).join(", ")}${c.size > 2 ? ", …" : ""})`)
          .join("; ")
      : `The verified pairs connect ${parts.length ? parts[0].size : 0} views in one group.`);
    const drawn = edges.length < D.pairs.edges_total ? `, strongest ${edges.length} drawn` : "";
    section(`Verified pairs (${D.pairs.edges_total}${drawn})`, split,
      el("p", { class: "note" }, D.pairs.layout === "matrix"
        ? "Row/column = view in table order; colour = inliers (log scale); diagonal green = registered, red = not."
        : "Views on a circle in table order (green registered, red not); edge colour = inliers (log scale)."),
      canvas, el("h3", {}, "pairs by planner source"), stats);
  }

  function histogramSvg(hist, label) {
    const w = 360, h = 160, pad = 24, counts = hist.counts, top = Math.max(1, ...counts);
    const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h + pad);
    const bw = (w - pad) / Math.max(counts.length, 1);
    counts.forEach((k, i) => {
      const bar = document.createElementNS(ns, "rect"), bh = (h - 10) * k / top;
      bar.setAttribute("x", pad + i * bw); bar.setAttribute("y", h - bh);
      bar.setAttribute("width", Math.max(bw - 1, 1));
      bar.setAttribute("height", bh); bar.setAttribute("fill", "#4a7fb5");
      const tip = document.createElementNS(ns, "title");
      tip.textContent = `${hist.edges[i].toFixed(2)}–${hist.edges[i + 1].toFixed(2)}: ${k}`;
      bar.append(tip); svg.append(bar);
    });
    const text = (x, y, s) => {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = s; svg.append(t);
    };
    if (counts.length) {
      text(pad, h + 16, hist.edges[0].toFixed(1)); text(w - 40, h + 16, hist.edges[counts.length].toFixed(1));
    }
    text(0, 12, top);
    return el("figure", {}, svg, el("figcaption", {}, label));
  }

  function histograms() {
    section("Tracks and errors", el("div", { class: "row" },
      histogramSvg(D.tracks, "track length (views per 3D point)"),
      histogramSvg(D.errors, "mean reprojection error per 3D point (px)")));
  }

  const NS = "http://www.w3.org/2000/svg";
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };

  function matchPair(p) { // two thumbnails side by side, match lines as SVG over them
    const kinds = { strongest: "strongest verified pair", weakest: "weakest verified pair",
      rejected: "rejected: raw matches, no verified geometry" };
    const counts = p.kind === "rejected" ? `${p.matches} raw matches` : `${p.inliers} inliers of ${p.matches} matches`;
    const caption = el("figcaption", {}, `${kinds[p.kind]}: ${p.name0} – ${p.name1}, ${counts}`
      + (p.lines ? ` (${p.lines.length} of ${p.lines_total} lines drawn)` : ""));
    if (!p.thumb0) return el("figure", { class: "pair" }, caption);
    const box = el("div", { class: "pairbox" });
    const img0 = el("img", { src: p.thumb0, alt: p.name0 }), img1 = el("img", { src: p.thumb1, alt: p.name1 });
    box.append(img0, img1);
    const draw = () => {
      const w0 = img0.naturalWidth, w = w0 + img1.naturalWidth, h = Math.max(img0.naturalHeight, img1.naturalHeight);
      const svg = svgEl("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}` });
      const colour = p.kind === "rejected" ? "#e33" : "#3c3";
      for (const [x0, y0, x1, y1] of p.lines)
        svg.append(svgEl("line", { x1: x0, y1: y0, x2: x1 + w0, y2: y1, stroke: colour, "stroke-width": 1,
          "stroke-opacity": 0.8 }));
      box.append(svg);
    };
    let loaded = 0;
    for (const img of [img0, img1]) img.addEventListener("load", () => { if (++loaded === 2) draw(); });
    return el("figure", { class: "pair" }, box, caption);
  }

  function matchPairs() {
    const pairs = D.match_pairs || [];
    if (!pairs.length) return;
    section("Match visualisations", el("p", { class: "note" }, "Green: inliers of COLMAP's two-view geometry; red: "
      + "raw matches of a pair that failed verification (matches.h5)."), el("div", { class: "row" },
      ...pairs.map(matchPair)));
  }

  function lineChart(series, label) { // series: [[name, colour, [[x, y], ...]]]
    const w = 420, h = 180, pad = 30, all = series.flatMap((s) => s[2]).filter((p) => p[1] !== null);
    const svg = svgEl("svg", { width: w, height: h + pad });
    if (!all.length) return el("figure", {}, svg, el("figcaption", {}, label + ": not recorded"));
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const X = (x) => pad + (w - pad - 10) * (x - x0) / Math.max(x1 - x0, 1e-9);
    const Y = (y) => h - 10 - (h - 20) * (y - y0) / Math.max(y1 - y0, 1e-9);
    for (const [name, colour, points] of series) {
      const ok = points.filter((p) => p[1] !== null);
      svg.append(svgEl("polyline", { points: ok.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none",
        stroke: colour, "stroke-width": 1.5, class: "curve-" + name }));
      for (const p of ok) {
        const dot = svgEl("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: colour });
        const tip = svgEl("title", {}); tip.textContent = `${name} step ${p[0]}: ${p[1].toFixed(2)}`;
        dot.append(tip); svg.append(dot);
      }
    }
    const text = (x, y, s) => { const t = svgEl("text", { x, y }); t.textContent = s; svg.append(t); };
    text(0, Y(y1) + 4, y1.toFixed(1)); text(0, Y(y0), y0.toFixed(1));
    text(pad, h + 12, `step ${x0}`); text(w - 70, h + 12, `step ${x1}`);
    return el("figure", {}, svg, el("figcaption", {}, label));
  }

  function splats() {
    const S = D.splat;
    if (!S) return;
    const f = (m, k, d) => fmt(m[k], d);
    const facts = el("p", {}, `held-out PSNR ${f(S.initial, "psnr", 2)} → ${f(S.final, "psnr", 2)} dB, `
      + `SSIM ${f(S.initial, "ssim", 3)} → ${f(S.final, "ssim", 3)}; ${fmt(S.iterations)} iterations, `
      + `${fmt(S.num_gaussians)} Gaussians, ${fmt(S.train_seconds, 1)} s (${S.backend || "?"})`);
    const chart = lineChart([["test", "#d62728", S.curve.map((p) => [p[0], p[2]])],
      ["train", "#1f77b4", S.curve.map((p) => [p[0], p[1]])]], "PSNR (dB) per step: held-out (red), train (blue)");
    const renders = el("div", { class: "row" }, ...S.renders.filter((r) => r.thumb).map((r) =>
      el("figure", { class: "render" }, el("img", { src: r.thumb, alt: r.name }),
        el("figcaption", {}, `${r.name}: ground truth | render`))));
    section("Gaussian splats (recon splat)", facts, chart, renders);
  }

  function viewer3d() {
    const w = 720, h = 480, canvas = el("canvas", { width: w, height: h, id: "view3d" });
    const ctx = canvas.getContext("2d"), P = D.points, n = P.shown;
    const all = [];
    for (let i = 0; i < n; i++) all.push([P.xyz[3 * i], P.xyz[3 * i + 1], P.xyz[3 * i + 2]]);
    for (const c of D.cameras) all.push(c.centre);
    const centre = [0, 1, 2].map((k) => all.length ? all.reduce((a, p) => a + p[k], 0) / all.length : 0);
    const radius = Math.max(1e-6, ...all.map((p) => Math.hypot(p[0] - centre[0], p[1] - centre[1],
      p[2] - centre[2])));
    let yaw = 0.6, pitch = -0.4, zoom = 1, colourBy = D.models.length > 1 ? "model" : "rgb";
    function project(p) { // orbit camera looking at the centre; COLMAP's y points down, so flip it
      const x = p[0] - centre[0], y = -(p[1] - centre[1]), z = p[2] - centre[2];
      const x1 = Math.cos(yaw) * x + Math.sin(yaw) * z, z1 = -Math.sin(yaw) * x + Math.cos(yaw) * z;
      const y2 = Math.cos(pitch) * y - Math.sin(pitch) * z1, z2 = Math.sin(pitch) * y + Math.cos(pitch) * z1;
      const s = 0.45 * Math.min(w, h) * zoom / radius;
      return [w / 2 + s * x1, h / 2 - s * y2, z2];
    }
    function draw() {
      ctx.fillStyle = "#111"; ctx.fillRect(0, 0, w, h);
      for (let i = 0; i < n; i++) {
        const q = project(all[i]);
        ctx.fillStyle = colourBy === "model" ? PALETTE[P.model[i] % PALETTE.length]
          : `rgb(${P.rgb[3 * i]},${P.rgb[3 * i + 1]},${P.rgb[3 * i + 2]})`;
        ctx.fillRect(q[0], q[1], 1.5, 1.5);
      }
      for (const c of D.cameras) {
        const o = project(c.centre), k = c.corners.map(project);
        ctx.strokeStyle = PALETTE[c.model % PALETTE.length]; ctx.lineWidth = 1; ctx.beginPath();
        for (let i = 0; i < 4; i++) { ctx.moveTo(o[0], o[1]); ctx.lineTo(k[i][0], k[i][1]); }
        ctx.moveTo(k[3][0], k[3][1]); for (let i = 0; i < 4; i++) ctx.lineTo(k[i][0], k[i][1]);
        ctx.stroke();
      }
    }
    let drag = null;
    canvas.addEventListener("mousedown", (e) => { drag = [e.clientX, e.clientY]; });
    window.addEventListener("mouseup", () => { drag = null; });
    window.addEventListener("mousemove", (e) => {
      if (!drag) return;
      yaw += (e.clientX - drag[0]) * 0.01; pitch += (e.clientY - drag[1]) * 0.01;
      drag = [e.clientX, e.clientY]; draw();
    });
    canvas.addEventListener("wheel", (e) => {
      e.preventDefault(); zoom *= e.deltaY < 0 ? 1.1 : 1 / 1.1; draw();
    }, { passive: false });
    const toggle = el("button", { type: "button" }, "colour: by model / by RGB");
    toggle.addEventListener("click", () => { colourBy = colourBy === "model" ? "rgb" : "model"; draw(); });
    const legend = el("p", { class: "note" }, "Drag to orbit, wheel to zoom. ", ...D.models.map((m) =>
      el("span", { style: `color:${PALETTE[m.index % PALETTE.length]}` },
        ` ■ sparse/${m.index}: ${m.images} views, ${m.points} points `)));
    section("Cameras and points", legend, toggle, el("br"), canvas);
    draw();
  }

  function runFacts() {
    const run = D.run || {};
    const skipped = (run.skipped || []).length ? el("p", {}, "skipped files: "
      + run.skipped.map((s) => (typeof s === "string" ? s : JSON.stringify(s))).join(", ")) : "";
    const where = `output ${D.out_dir}; images ${D.image_dir || "unknown"}; report written in ${D.seconds} s`;
    const config = run.config ? JSON.stringify(run.config, null, 1) : "not recorded (no run.json)";
    section("Run", el("p", { class: "note" }, where), skipped, el("h3", {}, "inputs read"),
      el("pre", {}, JSON.stringify(D.sources, null, 1)), el("h3", {}, "configuration"), el("pre", {}, config));
  }

  summary(); viewTable(); pairGraph(); histograms(); matchPairs(); viewer3d(); splats(); runFacts();
  document.body.setAttribute("data-rendered", "1");
})();
