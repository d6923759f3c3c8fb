// The caregiver annotation page: vanilla JS, no network beyond this device.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const COLORS = ["#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4", "#ff7f0e", "#7f7f7f"];
  const SVG = "http://www.w3.org/2000/svg";
  let classes = [];
  let items = [];
  const skipped = new Set();
  let busy = false;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function say(text, isError) {
    const m = document.getElementById("message");
    m.textContent = text;
    m.classList.toggle("error", !!isError);
  }

  function showStatus(s) {
    document.getElementById("head-version").textContent = s.head_version;
    document.getElementById("queue-count").textContent = s.queue;
    document.getElementById("labels-count").textContent = s.counters.labels;
    document.getElementById("updates-count").textContent = s.counters.updates;
    if (s.camera) document.getElementById("camera-learned").textContent = cameraText(s.camera);
  }

  // What the camera learned on top of the fleet's model: its class mix (when the guard lets it in) and the labels given.
  function cameraText(cam) {
    const labels = Object.entries(cam.labels).filter(([, n]) => n > 0).map(([c, n]) => c + " " + n).join(", ");
    if (cam.level === "shared") return "this camera: the fleet's model as it is" + (labels ? " (labels so far: " + labels + ")" : "");
    const mix = Object.entries(cam.prior).sort((a, b) => b[1] - a[1]).filter(([, p]) => p >= 0.05)
      .map(([c, p]) => c + " " + Math.round(100 * p) + "%").join(", ");
    return "this camera has learned its baby's mix: " + mix + " · labels: " + labels;
  }

  function visible() {
    const fresh = items.filter(i => !skipped.has(i.id));
    return fresh.concat(items.filter(i => skipped.has(i.id)));  // skipped ones go to the back
  }

  function card(item, index) {
    const c = el("article", "card" + (index === 0 ? " current" : ""));
    c.dataset.id = item.id;
    const img = el("img");
    img.src = "crop/" + encodeURIComponent(item.id) + ".png";
    img.alt = "face crop";
    c.appendChild(img);
    c.appendChild(el("div", "guess", "looks " + item.predicted));
    c.appendChild(el("div", "hint", "unsure: " + Math.round(item.uncertainty * 100) + "%" + (item.face_found ? "" : " · no face found")));
    const bars = el("div", "bars");
    classes.forEach((name, k) => {
      const p = item.probabilities[k] || 0;
      const b = el("div", "bar");
      b.appendChild(el("span", "name", name));
      const track = el("span", "track");
      const fill = el("span", "fill");
      fill.style.width = (p * 100).toFixed(1) + "%";
      fill.style.background = COLORS[k % COLORS.length];
      track.appendChild(fill);
      b.appendChild(track);
      b.appendChild(el("span", "pct", Math.round(p * 100) + "%"));
      bars.appendChild(b);
    });
    c.appendChild(bars);
    const buttons = el("div", "buttons");
    classes.forEach((name, k) => {
      const btn = el("button", "label", (k + 1) + " " + name);
      btn.type = "button";
      btn.dataset.label = name;
      btn.addEventListener("click", () => label(item.id, name));
      buttons.appendChild(btn);
    });
    const skip = el("button", "other skip", "s skip");
    skip.type = "button";
    skip.addEventListener("click", () => skipItem(item.id));
    const notFace = el("button", "other not-face", "x not a face");
    notFace.type = "button";
    notFace.addEventListener("click", () => dismiss(item.id));
    buttons.appendChild(skip);
    buttons.appendChild(notFace);
    c.appendChild(buttons);
    return c;
  }

  function renderCards() {
    const box = document.getElementById("cards");
    box.replaceChildren(...visible().map(card));
    document.getElementById("empty").hidden = items.length > 0;
  }

  function renderTimeline(rows) {
    const W = 900, H = 40 + 26 * classes.length, left = 90, right = 20, top = 10;
    const now = Date.now() / 1000;
    const t0 = Math.min(now - 3600, ...rows.map(r => r.t));
    const span = Math.max(now - t0, 60);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "expressions over time");
    const x = t => left + (W - left - right) * (t - t0) / span;
    const y = k => top + 26 * k + 13;
    function add(tag, attrs, text) {
      const e = document.createElementNS(SVG, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      if (text !== undefined) e.textContent = text;
      svg.appendChild(e);
      return e;
    }
    classes.forEach((name, k) => {
      add("text", { x: left - 8, y: y(k) + 4, "text-anchor": "end", "font-size": 12, fill: "#444" }, name);
      add("line", { x1: left, x2: W - right, y1: y(k), y2: y(k), stroke: "#eee" });
    });
    const axisY = top + 26 * classes.length + 8;
    for (let i = 0; i <= 4; i++) {
      const t = t0 + span * i / 4;
      const d = new Date(t * 1000);
      add("text", { x: x(t), y: axisY + 12, "text-anchor": "middle", "font-size": 11, fill: "#666" },
        d.getHours().toString().padStart(2, "0") + ":" + d.getMinutes().toString().padStart(2, "0"));
    }
    rows.forEach(r => {
      const name = r.label && classes.includes(r.label) ? r.label : r.predicted;
      const k = classes.indexOf(name);
      if (k < 0) return;
      const labelled = !!r.label && r.label !== "not a face";
      const dot = add("circle", { cx: x(r.t), cy: y(k), r: 5, stroke: COLORS[k % COLORS.length], "stroke-width": 2,
        fill: labelled ? COLORS[k % COLORS.length] : "#fff", class: labelled ? "dot labelled" : "dot" });
      const tip = document.createElementNS(SVG, "title");
      tip.textContent = new Date(r.t * 1000).toLocaleTimeString() + ": " + (r.label ? "labelled " + r.label : "looks " + r.predicted);
      dot.appendChild(tip);
    });
    document.getElementById("timeline").replaceChildren(svg);
  }

  async function refresh() {
    const r = await fetch("api/state", { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!r.ok) { say("could not load the queue (" + r.status + ")", true); return; }
    const data = await r.json();
    classes = data.classes;
    items = data.items;
    showStatus(data.status);
    renderCards();
    renderTimeline(data.timeline);
  }

  async function post(path, body) {
    if (busy) return null;
    busy = true;
    try {
      const r = await fetch(path, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body),
      });
      const data = await r.json().catch(() => ({}));
      if (!r.ok) { say(data.error || ("refused (" + r.status + ")"), true); return null; }
      return data;
    } catch (e) {
      say("the device did not answer: " + e, true);
      return null;
    } finally {
      busy = false;
    }
  }

  async function label(id, name) {
    const data = await post("api/label", { id: id, label: name });
    if (data) say(name + ": " + data.outcome + " (head version " + data.status.head_version + ")");
    await refresh();
  }

  async function dismiss(id) {
    const data = await post("api/dismiss", { id: id });
    if (data) say("removed: not a face");
    await refresh();
  }

  function skipItem(id) {
    skipped.add(id);
    say("skipped");
    renderCards();
  }

  document.addEventListener("keydown", ev => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const first = visible()[0];
    if (!first) return;
    const n = parseInt(ev.key, 10);
    if (n >= 1 && n <= classes.length) { ev.preventDefault(); label(first.id, classes[n - 1]); }
    else if (ev.key === "s") { ev.preventDefault(); skipItem(first.id); }
    else if (ev.key === "x") { ev.preventDefault(); dismiss(first.id); }
  });

  refresh();
  setInterval(() => { if (!busy) refresh(); }, 15000);
})();
