// The dashboard's time views, drawn with vis-timeline (shipped in the package under
// /static/vendor: build machines are often offline, so nothing comes from the internet):
//  - Timeline: a lane per node (expandable to a lane per core slot), a bar per attempt;
//  - Tree: one tree's tasks in time, the wait before each start against the run, the
//    critical path outlined;
//  - Farm: queue depth, starts per minute, cores and memory used per node (Graph2d).
// Each view asks the dashboard's /api/* every 2 s while it is shown, never otherwise.
// Uses `esc`, `snap`, `nodeState` and `openTask` of the page's own script.
"use strict";
(() => {
const REFRESH_MS = 2000, MINUTE = 60 * 1000, WINDOW_MS = 15 * MINUTE, HOUR = 60 * MINUTE;
const views = {};  // name -> {show(arg), hide(), refresh()}
let current = null, timer = null;

const ms = seconds => new Date(seconds * 1000);
function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "?";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${s} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}
function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text != null) el.textContent = text;
  return el;
}
async function getJSON(url) {
  const reply = await fetch(url);
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.error || reply.statusText);
  return body;
}
// Replace a DataSet's content with `rows`, keeping the ids that stay (no flicker).
function replaceAll(set, rows) {
  const keep = new Set(rows.map(r => r.id));
  set.remove(set.getIds().filter(id => !keep.has(id)));
  set.update(rows);
}

// ---- one attempt as a bar -------------------------------------------------------------
function marks(a) {
  return [a.outcome === "lost" ? "✕ lost" : "", a.late ? "⚠ late" : ""].filter(Boolean);
}
function attemptTitle(a, now) {
  const end = a.end ?? now, waited = a.queued == null ? null : a.start - a.queued;
  return [`${a.task} — attempt ${a.attempt}`, `node ${a.node}${a.cores ? `, ${a.cores} cores` : ""}`,
    `waited ${duration(waited)} before start`,
    `ran ${duration(end - a.start)}${a.end == null ? " so far" : ""}`,
    `outcome ${a.outcome}${a.late ? " (its node reported late)" : ""}${a.why ? ": " + a.why : ""}`,
  ].join("\n");
}
function attemptBar(a, group, now, extraClass = "") {
  // A bar of no length (a task that failed at once) still gets a sliver to be clicked.
  const end = Math.max(a.end ?? now, a.start + 0.05);
  return {id: `${a.task}\u0000${a.attempt}`, group, start: ms(a.start), end: ms(end),
    className: `attempt outcome-${a.outcome}${a.late ? " late" : ""}${extraClass}`,
    title: attemptTitle(a, now), label: a.label || a.task, marks: marks(a),
    task: a.task, attempt: a.attempt, node: a.node, outcome: a.outcome};
}
function barContent(item) {
  const el = element("span");
  for (const mark of item.marks || []) el.append(element("span", "mark", mark));
  el.append(item.label);
  return el;
}
const ITEM_OPTIONS = {template: barContent, dataAttributes: ["task", "attempt", "node", "outcome"],
  tooltip: {followMouse: true, delay: 100}, stack: false, selectable: true,
  zoomMin: 2000, zoomMax: 12 * HOUR, orientation: {axis: "top"}};

// ---- the farm timeline ----------------------------------------------------------------
const farm = {chart: null, items: new vis.DataSet(), groups: new vis.DataSet(), expanded: new Set(),
  follow: true, skew: 0, lanes: "", since: null};
const slotId = (node, slot) => `${node}\u0000slot ${slot}`;

function laneLabel(lane) {
  const state = nodeState({accepting: lane.alive && !lane.draining, left: lane.left,
    alive: lane.alive, draining: lane.draining});
  const el = element("span", `lane ${state}`);
  el.dataset.node = lane.name;
  el.append(element("b", "lane-name", lane.name),
            element("small", null, `${lane.cores || "?"} cores · ${state}`));
  return el;
}
function laneGroups(lanes, attempts) {
  const groups = [];
  for (const lane of lanes) {
    const used = attempts.filter(a => a.node === lane.name).map(a => a.slot + 1);
    const slots = Math.max(Math.ceil(lane.cores), 1, ...used), open = farm.expanded.has(lane.name);
    const nested = [...Array(slots).keys()].map(i => slotId(lane.name, i));
    // Closed, the lane still gives each slot a row of its own (subgroups): bars never hide
    // each other; opened, each slot gets a lane with its label.
    groups.push({id: lane.name, content: laneLabel(lane), nestedGroups: nested, showNested: open,
                 className: "node-lane", subgroupOrder: "slot"});
    // A slot past the node's cores holds an attempt that ran on cores a waiting parent lent.
    nested.forEach((id, i) => groups.push({id, visible: open, treeLevel: 1, className: "slot-lane",
      content: i < lane.cores ? `core slot ${i + 1}` : `slot ${i + 1} (lent)`}));
  }
  return groups;
}
function drawFarm(data) {
  const now = data.now, lanesKey = JSON.stringify(data.nodes) + [...farm.expanded].join();
  const groups = laneGroups(data.nodes, data.attempts);
  if (lanesKey !== farm.lanes) {  // only when they change: a redraw resets hover and focus
    farm.lanes = lanesKey;
    replaceAll(farm.groups, groups);
  }
  replaceAll(farm.items, data.attempts.map(a => {
    // A bar that changes lane or slot is a new item: the library fails on an item moved
    // between a lane's subgroups and another lane.
    const open = farm.expanded.has(a.node), bar = attemptBar(a, open ? slotId(a.node, a.slot)
                                                                   : a.node, now);
    const id = `${bar.id}\u0000${open ? "open" : "closed"} ${a.slot}`;
    return open ? {...bar, id} : {...bar, id, subgroup: `slot ${a.slot}`, slot: a.slot};
  }));
  farm.skew = now * 1000 - Date.now();
  farm.chart.setCurrentTime(ms(now));
  if (farm.follow) {  // live: keep now at the right edge, keep the width the user chose
    const w = farm.chart.getWindow(), width = w.end - w.start, end = now * 1000 + 0.03 * width;
    farm.chart.setWindow(new Date(end - width), new Date(end), {animation: false});
  }
  const counts = {};
  for (const a of data.attempts) counts[a.outcome] = (counts[a.outcome] || 0) + 1;
  document.getElementById("timeline-note").textContent = `${data.attempts.length} attempts · ` +
    Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") +
    (data.truncated ? " · more than shown: zoom in" : "") + (farm.follow ? " · live" : " · paused");
  document.getElementById("timeline-now").hidden = farm.follow;
}
function makeFarmTimeline(width) {
  const now = Date.now();
  farm.chart = new vis.Timeline(document.getElementById("timeline"), farm.items, farm.groups, {
    ...ITEM_OPTIONS, start: new Date(now - width), end: new Date(now + 0.03 * width),
    groupOrder: (a, b) => String(a.id).localeCompare(String(b.id)), maxHeight: 560,
    verticalScroll: true});
  farm.chart.on("click", props => { const item = props.item && farm.items.get(props.item);
    if (item) openTask(item.task); });
  farm.chart.on("rangechanged", props => { if (!props.byUser) return;
    // Back at now follows again; panned into the past stays where the user put it.
    farm.follow = props.end.getTime() >= Date.now() + farm.skew - 2000; refreshSoon(); });
  // The library opens and closes a node's slot lanes; its bars move there and back.
  farm.groups.on("update", (event, props) => {
    for (const g of props.data) {
      if (!("nestedGroups" in g) || g.showNested === undefined) continue;
      if (g.showNested === farm.expanded.has(g.id)) continue;
      if (g.showNested) farm.expanded.add(g.id); else farm.expanded.delete(g.id);
      refreshSoon();
    }
  });
}
// Paused in the past, one click brings the window back to now, as wide as it is.
document.getElementById("timeline-now").addEventListener("click", () => {
  farm.follow = true;
  refreshSoon();
});
views.timeline = {
  show(minutes) {  // #timeline/5: the last five minutes
    const width = Number(minutes) > 0 ? Number(minutes) * MINUTE : WINDOW_MS;
    if (!farm.chart) {
      makeFarmTimeline(width);
    } else if (minutes) {
      const end = Date.now() + farm.skew;
      farm.follow = true;
      farm.chart.setWindow(new Date(end - width), new Date(end + 0.03 * width), {animation: false});
    }
  },
  async refresh() {
    const w = farm.chart.getWindow(), margin = 60 * 1000;
    const since = Math.max(0, (w.start.getTime() - margin) / 1000);
    const until = farm.follow ? "" : (w.end.getTime() + margin) / 1000;
    drawFarm(await getJSON(`/api/timeline?since=${since}&until=${until}`));
  },
};

// ---- a tree in time -------------------------------------------------------------------
const tree = {chart: null, items: new vis.DataSet(), groups: new vis.DataSet(), root: null,
  moved: false, key: ""};

function waitedFor(task) { return task.waiting_reason || task.waited_for || ""; }
// The waits of a task as `vespid timeline` draws them: before each attempt, and the wait
// going on now for a task not started (since its creation or its last attempt's end).
function waits(task, now) {
  const spans = task.attempts.filter(a => a.queued != null && a.queued < a.start)
    .map(a => ({begin: a.queued, end: a.start, attempt: a.attempt, node: a.node}));
  if (task.status == null) {
    const ends = task.attempts.map(a => a.end).filter(t => t != null);
    spans.push({begin: Math.max(task["time-create"] ?? now, ...ends), end: now, attempt: 0, node: ""});
  }
  return spans;
}
function taskTimes(task, now) {
  const waited = waits(task, now).reduce((sum, w) => sum + w.end - w.begin, 0);
  const ran = task.attempts.reduce((sum, a) => sum + (a.end ?? now) - a.start, 0);
  return {waited, ran};
}
function treeLabel(task, depth, critical, now) {
  const {waited, ran} = taskTimes(task, now), why = waitedFor(task);
  const el = element("span", `tree-label${critical ? " critical" : ""}`);
  el.dataset.task = task.name;
  el.style.paddingLeft = `${depth * 12}px`;
  el.title = `${task.name}\nwaited ${duration(waited)}${why ? ` (${why})` : ""}\nran ${duration(ran)}`;
  el.append(element("b", null, task.label || task.name),
            element("small", null, `waited ${duration(waited)} · ran ${duration(ran)}` +
                                   (why ? ` · ${why}` : "")));
  return el;
}
function waitBar(task, wait, critical) {
  const why = waitedFor(task);
  return {id: `wait\u0000${task.name}\u0000${wait.attempt}`, group: task.name,
    start: ms(wait.begin), end: ms(Math.max(wait.end, wait.begin + 0.05)),
    className: `wait${critical ? " critical" : ""}`, label: why ? `waits: ${why}` : "waits",
    task: task.name, attempt: wait.attempt, node: wait.node, outcome: "waiting",
    title: `${task.name} ${wait.attempt ? "waited" : "waiting for"} ${duration(wait.end - wait.begin)}` +
           (why ? `\nfor: ${why}` : "")};
}
// The coordinator lists a tree level by level; rows go depth first, each task followed by
// its subtree (as `vespid timeline` draws it). A task whose parent was cut by the limit
// starts a subtree of its own.
function depthFirst(tasks, root) {
  const kids = {}, known = new Set(tasks.map(t => t.name)), rows = [];
  for (const t of tasks) if (t.name !== root && known.has(t.parent)) (kids[t.parent] ||= []).push(t);
  const tops = tasks.filter(t => t.name === root || !known.has(t.parent));
  const stack = tops.reverse().map(t => [t, 0]);
  while (stack.length) {
    const [task, depth] = stack.pop();
    rows.push([task, depth]);
    for (const kid of [...(kids[task.name] || [])].reverse()) stack.push([kid, depth + 1]);
  }
  return rows;
}
function drawTree(data) {
  const now = data.now, critical = new Set(data.critical);
  const groups = [], items = [];
  depthFirst(data.tasks, data.root).forEach(([task, depth], order) => {
    const hot = critical.has(task.name);
    groups.push({id: task.name, order, content: treeLabel(task, depth, hot, now),
                 className: hot ? "critical" : ""});
    items.push(...waits(task, now).map(w => waitBar(task, w, hot)),
               ...task.attempts.map(a => attemptBar(a, task.name, now, hot ? " critical" : "")));
  });
  const key = JSON.stringify(groups.map(g => [g.id, g.className, g.content.textContent]));
  if (key !== tree.key) { tree.key = key; replaceAll(tree.groups, groups); }
  replaceAll(tree.items, items);
  tree.chart.setCurrentTime(ms(now));
  // The whole tree stays in view as it grows, until the user zooms or pans.
  if (!tree.moved && items.length) tree.chart.fit({animation: false});
  const label = Object.fromEntries(data.tasks.map(t => [t.name, t.label || t.name]));
  document.getElementById("tree-note").textContent = `${label[data.root] || data.root}: ` +
    `${data.total} tasks · critical path ${data.critical.map(n => label[n] || n).join(" → ")}` + (data.total > data.tasks.length ? ` · first ${data.tasks.length} shown` : "");
}
function makeTreeChart() {
  tree.chart = new vis.Timeline(document.getElementById("tree-chart"), tree.items, tree.groups, {
    ...ITEM_OPTIONS, groupOrder: "order", maxHeight: 600, verticalScroll: true});
  tree.chart.on("click", props => { const item = props.item && tree.items.get(props.item);
    if (item) openTask(item.task); });
  tree.chart.on("rangechanged", props => { if (props.byUser) tree.moved = true; });
}
function fillRoots() {
  const names = new Set((snap.tasks || []).map(t => t.name));
  document.getElementById("tree-roots").innerHTML = (snap.tasks || [])
    .filter(t => !names.has(t.parent)).map(t => `<option value="${esc(t.name)}">`).join("");
}
views.tree = {
  show(root) {
    if (!tree.chart) makeTreeChart();
    fillRoots();
    if (root && root !== tree.root) {
      tree.root = root; tree.moved = false; tree.key = "";
      tree.items.clear(); tree.groups.clear();
      document.getElementById("tree-root").value = root;
    }
  },
  async refresh() {
    if (!tree.root) {
      document.getElementById("tree-note").textContent = "name a root task";
      return;
    }
    drawTree(await getJSON(`/api/tree/${encodeURIComponent(tree.root)}`));
  },
};
document.getElementById("tree-form").addEventListener("submit", e => {
  e.preventDefault();
  const root = document.getElementById("tree-root").value.trim();
  if (root) location.hash = `#tree/${encodeURIComponent(root)}`;
});

// ---- farm charts ----------------------------------------------------------------------
const charts = {made: false, graphs: {}, sets: {}, groups: {}, follow: true};
const CHARTS = ["queue", "started", "cores", "memory"];
function makeCharts() {
  const now = Date.now();
  for (const name of CHARTS) {
    charts.sets[name] = new vis.DataSet();
    charts.groups[name] = new vis.DataSet();
    charts.graphs[name] = new vis.Graph2d(document.getElementById(`chart-${name}`), charts.sets[name],
      charts.groups[name], {height: "210px", start: new Date(now - WINDOW_MS), end: new Date(now),
        zoomMin: 10000, zoomMax: 12 * HOUR, legend: {enabled: true, left: {position: "top-left"}},
        dataAxis: {left: {range: {min: 0}}}, drawPoints: false,
        style: name === "started" ? "bar" : "line", barChart: {width: 8, align: "right"},
        interpolation: false});
  }
  // One time axis for the four: panning or zooming one moves the others.
  for (const name of CHARTS) {
    charts.graphs[name].on("rangechanged", props => {
      if (!props.byUser) return;
      charts.follow = props.end.getTime() >= Date.now() - 2000;
      for (const other of CHARTS) if (other !== name) charts.graphs[other].setWindow(props.start, props.end,
        {animation: false});
    });
  }
  charts.made = true;
}
function series(name, rows) {
  const ids = [...new Set(rows.map(r => r.group))];
  replaceAll(charts.groups[name], ids.map(id => ({id, content: id})));
  replaceAll(charts.sets[name], rows.map((r, i) => ({id: i, ...r})));
}
function drawCharts(data) {
  const samples = data.samples, perMinute = 60 / (data.interval || 1), rows = {queue: [], started: [],
    cores: [], memory: []};
  for (const s of samples) {
    const x = ms(s.time);
    rows.queue.push({x, y: s.queued, group: "queued"}, {x, y: s.running, group: "running"});
    rows.started.push({x, y: s.started * perMinute, group: "started per minute"});
    for (const [node, use] of Object.entries(s.nodes)) {
      rows.cores.push({x, y: use.cores_used, group: node});
      rows.memory.push({x, y: use.memory_used, group: node});
    }
  }
  for (const name of CHARTS) series(name, rows[name]);
  if (charts.follow && samples.length) {
    const end = samples[samples.length - 1].time * 1000, w = charts.graphs.queue.getWindow();
    const width = w.end - w.start;
    for (const name of CHARTS) charts.graphs[name].setWindow(new Date(end - width), new Date(end),
      {animation: false});
  }
  const last = samples[samples.length - 1];
  document.getElementById("farm-note").textContent = last ? `a sample every ${data.interval} s · ` +
    `now ${last.queued} queued, ${last.running} running` : "no samples yet";
}
views.farm = {
  show() { if (!charts.made) makeCharts(); },
  async refresh() {
    drawCharts(await getJSON(`/api/history?since=${Date.now() / 1000 - 12 * 3600}`));
  },
};

// ---- which view is shown: the address says (#timeline, #tree/ROOT, #farm, #lists) --------
// One refresh at a time: a request asked for while one runs follows it at once.
let busy = false, again = false;
function refreshSoon() { clearTimeout(timer); timer = setTimeout(tick, 50); }
async function tick() {
  clearTimeout(timer);
  if (busy) { again = true; return; }
  const view = views[current];
  if (!view) return;
  busy = true;
  try {
    await view.refresh();
  } catch (err) {
    const note = document.getElementById(`${current}-note`);
    if (note) note.textContent = `(${err.message})`;
  } finally {
    busy = false;
  }
  timer = setTimeout(tick, again ? 0 : REFRESH_MS);
  again = false;
}
function route() {
  const [name, ...rest] = location.hash.slice(1).split("/");
  const view = ["timeline", "tree", "farm"].includes(name) ? name : "lists";
  for (const section of document.querySelectorAll("main > section[data-view]"))
    section.hidden = section.dataset.view !== view;
  for (const link of document.querySelectorAll("#views a"))
    link.classList.toggle("active", link.dataset.view === view);
  current = view;
  if (views[view]) views[view].show(rest.length ? decodeURIComponent(rest.join("/")) : null);
  refreshSoon();
}
window.addEventListener("hashchange", route);
route();
})();
