// Legion's web console: the public API only (/v1/models, /v1/agents, /v1/cache, and
// POST /v1/tasks with "stream": true as server-sent events). Charts are plain SVG.
// An API key, when the server needs one, lives in this tab's sessionStorage and nowhere else.
"use strict";

const BASE = new URL("..", window.location.href); // the app's root, under any route prefix
const KEY_SLOT = "legion.apiKey";
const RECENT_SLOT = "legion.recent";
const RECENT_MAX = 20;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_SLOT) || "";
let watchingAgents = false;
let lastAgents = [];
let trustResult = null; // the task whose trust weights the chart shows beside the current ones

// ------------------------------------------------------------------ HTTP
class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || err.type || "";
  }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h["Authorization"] = `Bearer ${apiKey}`;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const r = await fetch(new URL(path, BASE), opts);
  if (r.status === 401) askForKey();
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, body);
  }
  return r;
}

// ------------------------------------------------------------------ API key
function askForKey(message) {
  $("key-form").hidden = false;
  $("key-input").focus();
  setStatus(message || "This server needs an API key: enter one above (it stays in this tab).", true);
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("key-input").value.trim();
  $("key-input").value = "";
  if (apiKey) sessionStorage.setItem(KEY_SLOT, apiKey);
  $("key-form").hidden = true;
  $("key-forget").hidden = !apiKey;
  setStatus("");
  refreshAll();
});

$("key-forget").addEventListener("click", () => {
  apiKey = "";
  sessionStorage.removeItem(KEY_SLOT);
  $("key-forget").hidden = true;
});

// ------------------------------------------------------------------ small DOM helpers
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

function fmt(x, digits) {
  return typeof x === "number" ? x.toFixed(digits === undefined ? 2 : digits) : "–";
}

// ------------------------------------------------------------------ charts (plain SVG)
// A horizontal bar chart: one bar per [label, value]; `highlight` names the winning label,
// `name(label)` the text shown for it (the bar's data-label keeps the label itself).
function barChart(title, entries, opts) {
  const o = Object.assign({ highlight: null, digits: 2, width: 440, name: (l) => l }, opts || {});
  const wrap = el("figure", { class: "bar-chart" }, el("figcaption", {}, title));
  const rowH = 24, labelW = 130, valueW = 60;
  const height = entries.length * rowH + 4;
  const plotW = o.width - labelW - valueW;
  const values = entries.map(([, v]) => v);
  const lo = Math.min(0, ...values), hi = Math.max(0, ...values);
  const span = hi - lo || 1;
  const x0 = labelW + ((0 - lo) / span) * plotW;
  const chart = svg("svg", { width: o.width, height, viewBox: `0 0 ${o.width} ${height}`, role: "img" });
  const caption = svg("title");
  caption.textContent = title;
  chart.append(caption);
  entries.forEach(([label, value], i) => {
    const y = i * rowH + 2;
    const x1 = labelW + ((value - lo) / span) * plotW;
    const shown = String(o.name(label));
    const name = svg("text", { x: labelW - 6, y: y + rowH * 0.65, "text-anchor": "end", class: "label" });
    name.textContent = shown.length > 18 ? shown.slice(0, 17) + "…" : shown || "(empty)";
    const full = svg("title");
    full.textContent = `${shown}: ${value}`;
    const bar = svg("rect", {
      x: Math.min(x0, x1), y: y + 3, width: Math.max(1, Math.abs(x1 - x0)), height: rowH - 8,
      class: "bar" + (label === o.highlight ? " winner" : ""), "data-label": label, "data-value": value,
    });
    bar.append(full);
    const num = svg("text", { x: labelW + plotW + 6, y: y + rowH * 0.65, class: "value" });
    num.textContent = fmt(value, o.digits);
    chart.append(name, bar, num);
  });
  chart.append(svg("line", { x1: x0, x2: x0, y1: 0, y2: height, class: "axis" }));
  wrap.append(chart);
  return wrap;
}

// Grouped bars: for each label, one bar per series ([name, values aligned with labels]);
// `nameOf(label)` is the text shown for a label.
function groupedChart(title, labels, series, highlight, nameOf) {
  const shown = (l) => String(nameOf ? nameOf(l) : l);
  const wrap = el("figure", { class: "bar-chart" }, el("figcaption", {}, title));
  const width = 520, labelW = 130, barH = 9, gap = 10;
  const groupH = series.length * barH + gap;
  const height = labels.length * groupH + 22;
  const plotW = width - labelW - 20;
  const hi = Math.max(1e-9, ...series.flatMap(([, vs]) => vs));
  const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  labels.forEach((label, i) => {
    const y = i * groupH + 2;
    const name = svg("text", { x: labelW - 6, y: y + groupH / 2, "text-anchor": "end", class: "label" });
    name.textContent = shown(label).length > 18 ? shown(label).slice(0, 17) + "…" : shown(label);
    chart.append(name);
    series.forEach(([sname, vs], j) => {
      const bar = svg("rect", {
        x: labelW, y: y + j * barH, width: Math.max(1, (vs[i] / hi) * plotW), height: barH - 1,
        class: `bar series-${j}` + (label === highlight ? " winner" : ""),
      });
      const t = svg("title");
      t.textContent = `${sname} · ${shown(label)}: ${fmt(vs[i], 4)}`;
      bar.append(t);
      chart.append(bar);
    });
  });
  series.forEach(([sname], j) => {
    const x = labelW + j * 95;
    chart.append(svg("rect", { x, y: height - 14, width: 10, height: 10, class: `bar series-${j}` }));
    const t = svg("text", { x: x + 14, y: height - 5, class: "legend" });
    t.textContent = sname;
    chart.append(t);
  });
  wrap.append(chart);
  return wrap;
}

// ------------------------------------------------------------------ task stream
// `joins` (from answerJoins) says how the card's answer joined its group, when it did; `choice`
// is the result's, for a task with choices (a card's group is then the index of its pick).
function candidateCard(c, joins, choice) {
  const ok = !c.error;
  const join = joins && joins[c.agent];
  const key = c.group || c.normalized; // the API's field, or a trace event's
  const group = ok && joins && key
    ? el("p", { class: "group small", "data-group": key, title: "the answer group this candidate votes in" },
      choice ? `picks ${choiceName(choice, key)}` : `group “${key}”`,
      join && join.via ? ` · ${joinedBy(join)}` : "")
    : "";
  return el(
    "article",
    { class: "candidate" + (ok ? "" : " failed"), "data-agent": c.agent },
    el("header", {}, el("strong", {}, c.agent), " ", el("span", { class: "role" }, c.role || "")),
    el("p", { class: "text" }, ok ? c.text || "(empty answer)" : c.error),
    group,
    el("footer", { class: "muted small" },
      `score ${fmt(c.score, 3)} · ${fmt(c.latency_ms, 0)} ms`),
  );
}

function showCandidate(c) {
  const box = $("candidates");
  const old = box.querySelector(`[data-agent="${CSS.escape(c.agent)}"]`);
  const card = candidateCard(c);
  if (old) old.replaceWith(card); else box.append(card);
}

// What joined an answer to its group: a rule, or a fallback with its evidence.
function joinedBy(m) {
  if (m.via === "embedding") return `joined by embedding (similarity ${fmt(m.score, 2)})`;
  if (m.via === "judge") return `joined by the agents (P(yes) ${fmt(m.score, 2)})`;
  return `joined by rule: ${m.via}`;
}

// An equivalent_answers event's groups (a list; traces older than it carried a mapping: none).
function mergedGroups(ev) {
  return ev && Array.isArray(ev.data.groups) ? ev.data.groups : [];
}

// The fan-out's answer groups (the first equivalent_answers trace event), by agent.
function answerJoins(result) {
  const ev = result.trace.find((e) => e.step === "equivalent_answers" && e.data.during === "fanout");
  const joins = {};
  for (const g of mergedGroups(ev)) for (const m of g.members) joins[m.agent] = m;
  return joins;
}

function traceItem(ev) {
  const data = JSON.stringify(ev.data);
  return el("li", {},
    el("span", { class: "step" }, ev.step), " ",
    el("span", { class: "muted small" }, `${fmt(ev.at_ms, 0)} ms`), " ",
    el("code", {}, data.length > 300 ? data.slice(0, 299) + "…" : data));
}

// Parses a fetch body of server-sent events; calls onEvent(name, data) for each one.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message";
      const lines = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) lines.push(line.slice(5).trimStart());
      }
      if (lines.length) onEvent(name, JSON.parse(lines.join("\n")));
    }
  }
}

function clearResult() {
  $("candidates").replaceChildren();
  $("trace").replaceChildren();
  for (const id of ["votes-chart", "answer-groups", "equilibrium-chart", "debate", "trust-chart"]) {
    $(id).replaceChildren();
  }
  trustResult = null;
  $("decision-strategy").textContent = "";
  $("answer-box").hidden = true;
  $("choice-result").hidden = true;
}

$("task-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const task = $("task-input").value.trim();
  if (!task) return;
  const body = { task, stream: true, cache: $("use-cache").checked };
  if ($("strategy").value) body.strategy = $("strategy").value;
  if ($("fanout").value) body.fanout = $("fanout").value;
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  if ($("use-rag").checked) body.use_rag = true;
  // One choice per line; blank lines are layout, not choices. The server checks the rest.
  const choices = $("choices-input").value.split("\n").map((c) => c.trim()).filter((c) => c);
  if (choices.length) body.choices = choices;
  if ($("min-confidence").value !== "") body.min_confidence = Number($("min-confidence").value);
  clearResult();
  $("run").disabled = true;
  setStatus("Asking the agents…");
  const t0 = performance.now();
  let result = null;
  try {
    const r = await api("v1/tasks", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
    });
    await readEvents(r, (name, data) => {
      if (name === "candidate") {
        showCandidate(data);
        setStatus(`${$("candidates").children.length} candidate(s) in, ${fmt(performance.now() - t0, 0)} ms…`);
      } else if (name === "trace") {
        $("trace").append(traceItem(data));
        if (data.step === "debate_round") setStatus(`debate round ${data.data.round}…`);
      } else if (name === "result") {
        result = data;
      } else if (name === "error") {
        throw new ApiError(0, data);
      }
    });
    if (!result) throw new Error("the stream ended without a result");
    showResult(result);
    remember(task, result);
    setStatus(`Done in ${fmt(result.latency_ms, 0)} ms${result.cached ? " (from the cache)" : ""}.`);
  } catch (err) {
    setStatus(err.status === 401 ? "This server needs an API key: enter one above." : `Error: ${err.message}`, true);
  } finally {
    $("run").disabled = false;
    loadAgents();
    loadCacheStats();
  }
});

// ------------------------------------------------------------------ the decision
function showResult(result) {
  $("answer").textContent = answerText(result);
  $("answer-meta").textContent =
    `${result.strategy} · ${fmt(result.latency_ms, 0)} ms` +
    (result.cached ? " · cached" : "") +
    (result.missing_agents.length ? ` · missing: ${result.missing_agents.join(", ")}` : "") +
    (result.fanout === "adaptive"
      ? ` · adaptive: ${result.agents_asked} asked, risk ${fmt(result.adaptive_risk, 3)}` +
        (result.skipped_agents.length ? ` · skipped: ${result.skipped_agents.join(", ")}` : "")
      : "");
  $("answer-box").hidden = false;
  const joins = answerJoins(result);
  $("candidates").replaceChildren(...result.candidates.map((c) => candidateCard(c, joins, result.choice)));
  $("trace").replaceChildren(...result.trace.map(traceItem));
  $("decision-strategy").textContent = result.strategy;
  const decision = result.trace.find((e) => e.step === "decision");
  const winner = decision ? decision.data.winner : null;
  const votes = Object.entries(result.votes || {}).sort((a, b) => b[1] - a[1]);
  const isEq = decision && Array.isArray(decision.data.generator);
  const name = (key) => (result.choice ? choiceName(result.choice, key) : key);
  $("votes-chart").replaceChildren(
    votes.length
      ? barChart(isEq ? "Equilibrium ranking score per answer" : "Votes per answer", votes,
        { highlight: winner, digits: isEq ? 3 : 2, name })
      : el("p", { class: "muted" }, "No votes (every agent abstained)."));
  $("equilibrium-chart").replaceChildren();
  if (isEq) {
    const labels = Object.keys(result.votes);
    const d = decision.data;
    $("equilibrium-chart").append(groupedChart(
      "Consensus game: P(correct) policies, initial and at equilibrium", labels,
      [["generator₀", d.generator_init], ["discrim.₀", d.discriminator_init],
        ["generator", d.generator], ["discriminator", d.discriminator]], winner, name));
  }
  showChoice(result);
  showGroups(result);
  showDebate(result);
  showTrust(result);
}

// The answer as a person reads it: a task with choices may have abstained (answer null).
function answerText(result) {
  if (result.answer !== null && result.answer !== undefined && result.answer !== "") return result.answer;
  return result.choice && result.choice.abstained ? "(abstained)" : "(no answer)";
}

const letter = (i) => String.fromCharCode(65 + i); // the API allows at most 26 choices

// A choice by its key (its index as the votes and the candidates' groups hold it): "B. Lyon".
function choiceName(choice, key) {
  const i = Number(key);
  return Number.isInteger(i) && i >= 0 && i < choice.choices.length ? `${letter(i)}. ${choice.choices[i]}` : key;
}

const SOURCES = {
  profile: "the profile's fitted combination of the members' scores",
  mean: "the mean of each member's own distribution over the choices",
  uniform: "uniform (no member scored the choices)",
};

// A task with choices: each choice's probability as a bar, the decided one marked, and the
// members that picked it; an abstained answer says why.
function showChoice(result) {
  const c = result.choice;
  $("choice-result").hidden = !c;
  $("choice-list").replaceChildren();
  $("choice-meta").textContent = "";
  $("choice-abstained").hidden = true;
  if (!c) return;
  const pickers = c.choices.map(() => []);
  for (const [member, i] of Object.entries(c.picks || {})) if (pickers[i]) pickers[i].push(member);
  $("choice-list").replaceChildren(...c.choices.map((text, i) => {
    const p = c.probabilities[i];
    const decided = i === c.index;
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, p || 0)) * 100}%`;
    const who = pickers[i].flatMap((m, j) => [j ? ", " : "", el("span", { class: "picker", "data-member": m }, m)]);
    return el("li", { class: "choice" + (decided ? " decided" : ""), "data-index": i, "data-probability": p },
      el("span", { class: "letter" }, letter(i)),
      el("span", { class: "text" }, text, decided ? el("span", { class: "mark" }, " ✓ decided") : ""),
      el("span", { class: "prob", title: `P(${letter(i)}) = ${p}` }, fill),
      el("span", { class: "value" }, `${fmt(100 * p, 1)}%`),
      el("span", { class: "pickers small muted" }, ...(who.length ? ["picked by ", ...who] : ["picked by no member"])));
  }));
  if (c.abstained) {
    $("choice-abstained").textContent = `Abstained: ${c.abstained}`;
    $("choice-abstained").hidden = false;
  }
  $("choice-meta").textContent =
    (c.confidence === null || c.confidence === undefined ? "" : `confidence ${fmt(c.confidence, 3)} · `) +
    `probabilities: ${SOURCES[c.probability_source] || c.probability_source}`;
}

// Answers that said the same thing and voted as one, per round, with what joined each member.
function showGroups(result) {
  const events = result.trace.filter((e) => e.step === "equivalent_answers" && mergedGroups(e).length);
  const failed = result.trace.filter((e) => e.step === "equivalence_fallback_failed");
  const box = $("answer-groups");
  box.replaceChildren();
  if (!events.length && !failed.length) return;
  const member = (m) => el("li", {}, `${m.agent}: “${m.text}” `,
    el("span", { class: "muted small" }, m.via ? joinedBy(m) : "first"));
  const items = events.flatMap((e) => e.data.groups.map((g) => el("li", { "data-group": g.key },
    el("strong", {}, g.key),
    events.length > 1 ? el("span", { class: "muted small" }, ` (${e.data.during})`) : "",
    el("ul", {}, ...g.members.map(member)))));
  const notes = failed.map((e) => el("p", { class: "error small" },
    `${e.data.fallback} fallback unavailable (${e.data.during}): ${e.data.error}; grouped by the rules only`));
  box.append(el("figure", { class: "answer-groups" }, el("figcaption", {}, "Answer groups"),
    items.length ? el("ul", {}, ...items) : el("p", { class: "muted small" }, "No answers joined."), ...notes));
}

function showDebate(result) {
  const rounds = result.trace.filter((e) => e.step === "debate_round");
  const box = $("debate");
  box.replaceChildren();
  if (!rounds.length) return;
  const agents = result.candidates.map((c) => c.agent);
  const first = Object.fromEntries(result.candidates.map((c) => [c.agent, c.error ? "(failed)" : c.text]));
  const head = el("tr", {}, el("th", {}, "agent"), el("th", {}, "first answer"),
    ...rounds.map((r) => el("th", {}, `round ${r.data.round}${r.data.agreed ? " ✓" : ""}`)));
  const rows = agents.map((a) => el("tr", {}, el("td", {}, a), el("td", {}, first[a] || ""),
    ...rounds.map((r) => el("td", {}, (r.data.answers || {})[a] || ""))));
  box.append(el("figure", { class: "debate" }, el("figcaption", {}, "Debate rounds side by side"),
    el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows))));
}

// The weights now (they follow the agents table), beside those a task used when it traced them.
function showTrust(result) {
  if (result !== undefined) trustResult = result;
  const traced = trustResult && trustResult.trace.find((e) => e.step === "trust");
  const now = {}; // every panel member's weight: an agent with views votes as its views
  for (const a of lastAgents) {
    if (a.trust) now[a.name] = a.trust.weight;
    for (const v of a.views || []) if (v.trust) now[v.name] = v.trust.weight;
  }
  $("trust-chart").replaceChildren();
  if (traced) {
    const labels = Object.keys(traced.data.weights);
    $("trust-chart").append(groupedChart("Trust weights: used for this task, and now", labels,
      [["this task", labels.map((a) => traced.data.weights[a])], ["now", labels.map((a) => now[a] || 0)]]));
  } else if (Object.keys(now).length) {
    $("trust-chart").append(barChart("Trust weights (now)", Object.entries(now), { digits: 3 }));
  }
}

// ------------------------------------------------------------------ recent tasks (this tab)
function recent() {
  try { return JSON.parse(sessionStorage.getItem(RECENT_SLOT) || "[]"); } catch (_) { return []; }
}

function remember(task, result) {
  const list = [{ task, at: new Date().toISOString(), result }, ...recent()].slice(0, RECENT_MAX);
  try {
    sessionStorage.setItem(RECENT_SLOT, JSON.stringify(list));
  } catch (_) {
    sessionStorage.setItem(RECENT_SLOT, JSON.stringify(list.slice(0, 3))); // over the quota
  }
  showRecent();
}

function showRecent() {
  $("recent").replaceChildren(...recent().map((item) => {
    const li = el("li", {},
      el("button", { type: "button", class: "link" }, item.task), " → ",
      el("strong", {}, answerText(item.result)), " ",
      el("span", { class: "muted small" },
        `${item.result.strategy}${item.result.cached ? " · cached" : ""} · ${new Date(item.at).toLocaleTimeString()}`));
    li.querySelector("button").addEventListener("click", () => {
      $("task-input").value = item.task;
      showResult(item.result);
      setStatus("Showing a recent task (its stored answer and trace).");
    });
    return li;
  }));
}

async function loadCacheStats() {
  try {
    const s = await (await api("v1/cache")).json();
    $("cache-stats").textContent = s.enabled
      ? `Result cache: ${s.entries} entries, hit rate ${fmt(100 * s.hit_rate, 0)}%`
      : "Result cache: off";
  } catch (_) {
    $("cache-stats").textContent = "";
  }
}

// ------------------------------------------------------------------ agents and models
// The Arbiter profile (legion calibrate) the learned strategy weighs the agents with.
function showProfile(profile) {
  $("agents-profile").textContent = profile
    ? `Profile ${profile.path || ""}: ${profile.method}, ${profile.items} items, held-out accuracy ` +
      `${fmt(profile.cv_accuracy, 3)} (best agent alone ${profile.best_single} ${fmt(profile.best_single_accuracy, 3)}); ` +
      "weights " + Object.entries(profile.weights).map(([a, w]) => `${a} ${fmt(w, 2)}`).join(", ")
    : "";
}

// The panel members an agent speaks as, in a row under its own; none for an agent without
// views (its one member is itself, which its own row shows).
function viewsRow(a) {
  const views = a.views || [];
  if (!views.length || (views.length === 1 && views[0].name === a.name)) return null;
  const head = el("tr", {},
    ...["view", "role", "form · scoring", "few-shot", "trust", "profile weight"].map((h) => el("th", {}, h)));
  const weight = (w) => (typeof w === "number" ? fmt(w, 3) : "–");
  const rows = views.map((v) => el("tr", { class: "view", "data-member": v.name },
    el("td", { class: "name" }, v.name),
    el("td", { class: "role" }, v.role),
    el("td", { class: "form" }, `${v.prompt_form} · ${v.scoring}`),
    el("td", { class: "few-shot" }, v.few_shot),
    el("td", {
      class: "trust", "data-weight": v.trust ? v.trust.weight : "",
      title: v.trust ? `${v.trust.updates} updates, ${v.trust.agreements} agreements` : "no vote yet",
    }, weight(v.trust && v.trust.weight)),
    el("td", {
      class: "profile-weight", "data-weight": typeof v.profile_weight === "number" ? v.profile_weight : "",
      "data-factor": typeof v.adaptation_factor === "number" ? v.adaptation_factor : "",
      title: typeof v.profile_weight !== "number" ? "not in a profile"
        : typeof v.adaptation_factor === "number"
          ? `its weight in the Arbiter profile, times ${fmt(v.adaptation_factor, 3)} learned from the panel's agreement (arbiter.adapt)`
          : "its weight in the Arbiter profile",
    }, weight(v.profile_weight) +
      (typeof v.adaptation_factor === "number" ? ` ×${fmt(v.adaptation_factor, 2)}` : ""))));
  return el("tr", { class: "views", "data-agent": a.name },
    el("td", { colspan: 9 }, el("table", { class: "views" }, el("thead", {}, head), el("tbody", {}, ...rows))));
}

function showAgents(agents, profile) {
  showProfile(profile);
  lastAgents = agents;
  $("agents").querySelector("tbody").replaceChildren(...agents.flatMap((a) => {
    const h = a.health || {};
    const s = a.stats || {};
    const replicas = (a.pool && a.pool.replicas) || [];
    const inFlight = replicas.reduce((n, r) => n + (r.in_flight || 0), 0);
    const state = h.state === "failed" ? "failed" : h.loaded ? "loaded" : h.error ? "down" : "loading";
    const views = viewsRow(a); // its members vote and earn trust, not the agent
    const row = el("tr", { class: "agent", "data-agent": a.name },
      el("td", {}, a.name), el("td", {}, a.role),
      el("td", { class: "model", title: h.model ? `${h.model.path} · ${h.model.n_params} parameters` : "" },
        h.model ? `${h.model.file} (${h.model.description}, ${fmt(h.model.size_bytes / 2 ** 20, 0)} MiB)`
          : (a.pool && a.pool.model_file) || "–"),
      el("td", { class: `state ${state}`, title: h.error || h.node || "" }, state),
      el("td", {}, inFlight), el("td", {}, replicas.length),
      el("td", {}, fmt(s.tokens_per_s, 1)), el("td", {}, s.requests === undefined ? "–" : s.requests),
      el("td", {}, a.trust ? fmt(a.trust.weight, 3) : views ? "per view" : "–"));
    return views ? [row, views] : [row];
  }));
  $("agents-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  showTrust();
}

async function loadAgents() {
  try {
    const body = await (await api("v1/agents")).json();
    showAgents(body.agents, body.profile);
  } catch (err) {
    $("agents-updated").textContent = `(${err.message})`;
  }
}

// The table follows one long request that the server answers every 3 s for a few minutes,
// then another: one audit record per watch, not one per refresh.
async function watchAgents() {
  if (watchingAgents) return;
  watchingAgents = true;
  try {
    for (;;) {
      try {
        const r = await api("v1/agents?watch_s=3", { headers: { Accept: "text/event-stream" } });
        await readEvents(r, (name, data) => {
          if (name === "agents") showAgents(data.agents, data.profile);
          else if (name === "error") $("agents-updated").textContent = `(${data.error.message})`;
        });
      } catch (err) {
        $("agents-updated").textContent = `(${err.message})`;
        if (err.status === 401) return; // until a key is entered (refreshAll watches again)
      }
      await new Promise((done) => setTimeout(done, 3000));
    }
  } finally {
    watchingAgents = false;
  }
}

async function loadModels() {
  try {
    const models = (await (await api("v1/models")).json()).data;
    const select = $("strategy");
    select.replaceChildren(el("option", { value: "" }, "default"));
    for (const m of models) {
      const name = m.id.startsWith("legion:") ? m.id.split(":")[1] : null; // not the agents' models
      if (name) select.append(el("option", { value: name }, name));
    }
  } catch (err) {
    if (err.status !== 401) setStatus(`Could not list the strategies: ${err.message}`, true);
  }
}

function refreshAll() {
  loadModels();
  loadCacheStats();
  watchAgents();
}

// The Ray dashboard listens on its own port of the head node (8265 unless configured);
// ?dashboard=URL points the link elsewhere.
const asked = new URLSearchParams(window.location.search).get("dashboard") || "";
$("dashboard-link").href = /^https?:\/\//.test(asked) // only web links, never javascript:
  ? asked
  : `${window.location.protocol}//${window.location.hostname}:8265`;
$("key-forget").hidden = !apiKey;
showRecent();
refreshAll();
