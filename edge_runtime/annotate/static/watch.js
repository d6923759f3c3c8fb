// The camera section of the caregiver page: what `infantino-edge watch` records (GET api/watch).
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const VALENCE = [["negative", "#d62728"], ["neutral", "#bbbbbb"], ["positive", "#2ca02c"]];

  function svgEl(svg, tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  }

  function hhmm(t) {
    const d = new Date(t * 1000);
    return d.getHours().toString().padStart(2, "0") + ":" + d.getMinutes().toString().padStart(2, "0");
  }

  function renderNow(data) {
    const now = document.getElementById("watch-now");
    const c = data.current;
    if (!c) { now.textContent = "The camera has not been watched yet (infantino-edge watch)."; return; }
    const ago = Math.round(c.age_s);
    const what = c.face ? c.label + " (" + Math.round(Math.max(...c.p) * 100) + "%)" : "no face in view";
    now.textContent = (data.running ? "Now: " : "Camera not running; last seen: ") + what + ", " + ago + " s ago";
    now.classList.toggle("stale", !data.running);
    document.getElementById("watch-alert").hidden = !data.alert_active;
  }

  function renderStrip(data) {
    const W = 900, H = 90, left = 90, right = 20, top = 10, barH = 50;
    const nowT = Date.now() / 1000;
    const rows = data.minutes;
    const t0 = Math.min(nowT - 3600, ...rows.map(r => r.t));
    const span = Math.max(nowT - t0, 60);
    const x = t => left + (W - left - right) * (t - t0) / span;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "valence per minute, with distress alerts");
    svgEl(svg, "text", { x: left - 8, y: top + barH / 2 + 4, "text-anchor": "end", "font-size": 12, fill: "#444" }, "valence");
    const wMin = Math.max(1, (W - left - right) * 60 / span);
    rows.forEach(r => {
      let y = top;
      VALENCE.forEach(([name, color]) => {
        const h = barH * (r.faces ? (r.valence[name] || 0) : 0);
        if (h > 0) svgEl(svg, "rect", { x: x(r.t), y: y, width: wMin, height: h, fill: color, class: "minute " + name });
        y += h;
      });
      if (!r.faces) svgEl(svg, "rect", { x: x(r.t), y: top + barH - 2, width: wMin, height: 2, fill: "#eee" });
    });
    data.events.filter(e => e.type === "distress").forEach(e => {
      const m = svgEl(svg, "line", { x1: x(e.t), x2: x(e.t), y1: top - 4, y2: top + barH + 4, stroke: "#900", "stroke-width": 3, class: "alert-mark" });
      svgEl(m, "title", {}, "distress alert at " + hhmm(e.t) + " (" + Math.round(e.duration_s) + " s)");
    });
    for (let i = 0; i <= 4; i++) {
      const t = t0 + span * i / 4;
      svgEl(svg, "text", { x: x(t), y: top + barH + 20, "text-anchor": "middle", "font-size": 11, fill: "#666" }, hhmm(t));
    }
    document.getElementById("watch-strip").replaceChildren(svg);
    const alerts = data.events.filter(e => e.type === "distress");
    document.getElementById("watch-alerts").textContent = alerts.length
      ? "Distress alerts: " + alerts.map(e => hhmm(e.t) + " (" + Math.round(e.duration_s) + " s)").join(", ")
      : "No distress alerts in these hours.";
  }

  async function refresh() {
    try {
      const r = await fetch("api/watch", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!r.ok) return;
      const data = await r.json();
      renderNow(data);
      renderStrip(data);
    } catch (e) { /* the page's own status line reports a device that does not answer */ }
  }

  refresh();
  setInterval(refresh, 5000);
})();
