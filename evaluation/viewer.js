// The trajectory viewer (evaluation/viewer.py inlines this file into report.html).
// Every piece of episode text reaches the page through textContent / text nodes (see `h`), never
// innerHTML: model output is arbitrary and must stay text.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const EPISODES = DATA.episodes;
  const TOKEN_CHUNK = 2000;  // token chips rendered per click: a 30k-token turn stays responsive
  const NO_FAMILY = "(none)";
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ DOM and formatting helpers

  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));  // strings become text nodes
    }
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "\u2014";
    if (typeof x === "boolean") return x ? "yes" : "no";
    if (typeof x === "number") return Number.isInteger(x) ? String(x) : x.toFixed(digits === undefined ? 3 : digits);
    if (typeof x === "object") return JSON.stringify(x);
    return String(x);
  }

  function signed(x) {
    return (x > 0 ? "+" : "") + fmt(x, 3);
  }

  function fmtLogprob(x) {
    return x === null || x === undefined ? "-inf" : x.toFixed(2);
  }

  function badge(text, kind) {
    return h("span", {class: "badge " + (kind || "plain"), text});
  }

  function textOf(content) {
    if (content === null || content === undefined) return "";
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.map((part) => typeof part === "string" ? part : (part && part.type === "text" ? part.text : "")).join("");
    }
    return JSON.stringify(content);
  }

  function expandRuns(runs) {
    const out = [];
    for (const [value, count] of runs || []) for (let i = 0; i < count; i++) out.push(value);
    return out;
  }

  function familyOf(ep) {
    return ep.family === null || ep.family === undefined ? NO_FAMILY : String(ep.family);
  }

  const naturalOrder = (a, b) => String(a).localeCompare(String(b), undefined, {numeric: true});

  // ------------------------------------------------------------------ header: title and summary

  function renderHeader() {
    $("title").textContent = DATA.title;
    const summary = $("summary");
    for (const [key, value] of Object.entries(DATA.summary || {})) {
      summary.append(h("div", {}, h("dt", {text: key}), h("dd", {text: fmt(value)})));
    }
  }

  // ------------------------------------------------------------------ the episode list

  const COLUMNS = [
    {key: "task_id", label: "task", get: (e) => e.task_id},
    {key: "sample", label: "sample", get: (e) => e.sample, num: true},
    {key: "family", label: "family", get: (e) => familyOf(e)},
    {key: "resolved", label: "outcome", get: (e) => (e.resolved ? 1 : 0),
      cell: (e) => e.resolved ? badge("resolved", "ok") : badge("unresolved", "bad")},
    {key: "score", label: "score", get: (e) => e.score, num: true, show: (e) => fmt(e.score, 2)},
    {key: "return", label: "return", get: (e) => e.return, num: true, show: (e) => fmt(e.return, 3)},
    {key: "turns", label: "turns", get: (e) => e.turns, num: true},
    {key: "tokens", label: "tokens", get: (e) => e.tokens, num: true},
    {key: "wall_s", label: "wall s", get: (e) => e.wall_s, num: true, show: (e) => fmt(e.wall_s, 1)},
    {key: "exit_reason", label: "exit", get: (e) => e.exit_reason},
    {key: "errors", label: "errors", get: (e) => (e.error ? 1e9 : 0) + e.tool_errors, cls: "err",
      show: (e) => [e.error, e.tool_errors ? e.tool_errors + " tool error" + (e.tool_errors > 1 ? "s" : "") : ""]
        .filter(Boolean).join(" \u00b7 ")},
  ];
  const sort = {key: null, desc: false};
  let selected = -1;

  function renderColumns() {
    const row = $("columns");
    for (const col of COLUMNS) {
      row.append(h("th", {"data-key": col.key, text: col.label, title: "sort by " + col.label,
        onclick: () => { sort.desc = sort.key === col.key ? !sort.desc : false; sort.key = col.key; renderList(); }}));
    }
  }

  function renderFamilies() {
    const families = [...new Set(EPISODES.map(familyOf))].sort(naturalOrder);
    for (const family of families) $("f-family").append(h("option", {value: family, text: family}));
  }

  function matches(ep) {
    const outcome = $("f-outcome").value;
    if (outcome === "resolved" && !ep.resolved) return false;
    if (outcome === "unresolved" && ep.resolved) return false;
    const family = $("f-family").value;
    if (family && familyOf(ep) !== family) return false;
    const errors = $("f-errors").value;
    const failed = Boolean(ep.error), toolErrors = ep.tool_errors > 0;
    if (errors === "any" && !(failed || toolErrors)) return false;
    if (errors === "episode" && !failed) return false;
    if (errors === "tool" && !toolErrors) return false;
    if (errors === "none" && (failed || toolErrors)) return false;
    const query = $("f-task").value.trim().toLowerCase();
    return !query || ep.task_id.toLowerCase().includes(query);
  }

  function renderList() {
    let shown = EPISODES.map((ep, index) => ({ep, index})).filter(({ep}) => matches(ep));
    const col = COLUMNS.find((c) => c.key === sort.key);
    if (col) {
      shown.sort((a, b) => {
        const x = col.get(a.ep), y = col.get(b.ep);
        const order = col.num ? (x ?? -Infinity) - (y ?? -Infinity) : naturalOrder(x, y);
        return sort.desc ? -order : order;
      });
    }
    for (const th of $("columns").children) {
      th.classList.toggle("sorted", th.dataset.key === sort.key);
      th.classList.toggle("desc", th.dataset.key === sort.key && sort.desc);
    }
    const rows = shown.map(({ep, index}) => h("tr",
      {"data-index": index, tabindex: 0, class: index === selected ? "selected" : null,
        onclick: () => showEpisode(index), onkeydown: (ev) => { if (ev.key === "Enter") showEpisode(index); }},
      COLUMNS.map((c) => h("td", {class: c.cls || (c.num ? "num" : null)},
        c.cell ? c.cell(ep) : (c.show ? c.show(ep) : fmt(c.get(ep)))))));
    const body = $("episodes").tBodies[0];
    body.replaceChildren(...rows);
    if (!rows.length) {
      body.append(h("tr", {}, h("td", {colspan: COLUMNS.length, class: "muted",
        text: EPISODES.length ? "No episode matches these filters." : "No episodes."})));
    }
    $("count").textContent = `${shown.length} of ${EPISODES.length} episodes`;
    const resolved = shown.filter(({ep}) => ep.resolved).length;
    $("count-resolved").textContent = shown.length ? `\u00b7 ${resolved} resolved` : "";
  }

  // ------------------------------------------------------------------ one trajectory, turn by turn

  function showEpisode(index) {
    selected = index;
    for (const tr of $("episodes").tBodies[0].rows) tr.classList.toggle("selected", Number(tr.dataset.index) === index);
    const ep = EPISODES[index];
    const detail = $("detail");
    detail.replaceChildren(...renderEpisode(ep));
    detail.hidden = false;
    try { history.replaceState(null, "", "#" + encodeURIComponent(ep.id)); } catch (e) { /* a browser that refuses it on file:// */ }
    detail.scrollIntoView({block: "start"});
  }

  function renderEpisode(ep) {
    const t = ep.trajectory || {};
    const steps = (t.metadata && t.metadata.steps) || [];
    const out = [
      h("h2", {}, ep.task_id, h("span", {class: "muted", text: `  sample ${ep.sample}` + (ep.family !== null && ep.family !== undefined ? ` \u00b7 ${ep.family}` : "")})),
      h("div", {class: "facts"},
        ep.resolved ? badge("resolved", "ok") : badge("unresolved", "bad"),
        badge(`score ${fmt(ep.score, 2)}`), badge(`return ${fmt(ep.return, 3)}`), badge(`exit: ${ep.exit_reason}`),
        badge(`${ep.turns} turns`), badge(`${ep.tokens} tokens`), badge(`wall ${fmt(ep.wall_s, 1)} s`),
        ep.tool_errors ? badge(`${ep.tool_errors} tool errors`, "bad") : null,
        t.metadata && t.metadata.chat_mode ? badge("chat model: ids are our tokenization, log-probs placeholders") : null),
    ];
    if (ep.error) out.push(h("div", {class: "box error"}, h("h3", {text: "episode error"}), h("pre", {text: ep.error})));
    const message = t.metadata && t.metadata.exit_message;
    if (message) out.push(h("div", {class: "box"}, h("h3", {text: "exit message"}), h("pre", {text: message})));
    const verdict = [...steps].reverse().find((s) => s.verification);
    if (verdict) {
      const v = verdict.verification;
      out.push(h("div", {class: "box verdict"}, h("h3", {text: "verification"}),
        h("div", {}, `resolved: ${fmt(v.resolved)} \u00b7 score: ${fmt(v.score, 2)}`),
        v.details ? h("pre", {text: v.details}) : null));
    }
    out.push(h("div", {class: "breakdown"}, h("span", {class: "muted", text: "reward breakdown:"}),
      breakdownParts(ep.reward_breakdown)));
    if (ep.trajectory_omitted) {
      out.push(h("p", {class: "muted", text: `This trajectory (${(ep.trajectory_omitted / 1e6).toFixed(1)} MB) ` +
        `was left out of the page to keep the page small enough to open; trajectories.jsonl holds it ` +
        `(episode ${ep.id}).`}));
    } else if (!t.ids) {
      out.push(h("p", {class: "muted", text: "No trajectory was kept for this episode."}));
    } else {
      out.push(...maskStrip(t), ...renderTurns(t, steps));
      out.push(lazyDetails("Trajectory metadata", () => h("pre", {text: JSON.stringify(t.metadata, null, 2)})));
    }
    if (ep.text) out.push(lazyDetails("Decoded text (what the policy read and wrote)", () => h("pre", {text: ep.text})));
    return out;
  }

  // The non-zero components, then how many are zero (a breakdown has a dozen, most of them 0).
  function breakdownParts(breakdown) {
    const entries = Object.entries(breakdown || {});
    const parts = entries.filter(([, v]) => v !== 0)
      .map(([k, v]) => h("span", {class: v > 0 ? "pos" : "neg", text: ` ${k} ${signed(v)}`}));
    const zero = entries.length - parts.length;
    if (zero) parts.push(h("span", {class: "muted", text: ` (${zero} component${zero > 1 ? "s" : ""} at 0)`}));
    return parts;
  }

  // The loss mask at a glance: one bar per span, its width its share of the tokens.
  function maskStrip(t) {
    const total = t.ids.length || 1;
    const trained = (t.loss_mask || []).reduce((n, [value, count]) => n + (value ? count : 0), 0);
    const strip = h("div", {class: "strip"}, t.spans.map((s) => h("div", {class: "k-" + s.kind,
      style: `flex: ${s.end - s.start} 0 0`, title: `${s.kind} [${s.start}, ${s.end}): ${s.end - s.start} tokens, turn ${s.turn + 1}`})));
    return [strip, h("div", {class: "legend"}, `${trained} of ${t.ids.length} tokens trained on (loss mask 1)`,
      h("i", {class: "k-prompt"}), "prompt", h("i", {class: "k-sampled"}), "sampled (trained)",
      h("i", {class: "k-env"}), "env reply (masked)")];
  }

  // Messages -> the prompt, then one group per sampled turn: the assistant message and the replies after it.
  function splitTurns(messages) {
    const prompt = [], turns = [];
    for (const m of messages || []) {
      if (m.role === "assistant") turns.push({assistant: m, replies: []});
      else if (!turns.length) prompt.push(m);
      else turns[turns.length - 1].replies.push(m);
    }
    return {prompt, turns};
  }

  function renderTurns(t, steps) {
    const {prompt, turns} = splitTurns(t.messages);
    const sampled = t.spans.filter((s) => s.kind === "sampled");
    const count = Math.max(sampled.length, turns.length);
    const out = [renderPrompt(t, prompt)];
    for (let k = 0; k < count; k++) out.push(renderTurn(t, k, turns[k], steps[k]));
    if (!t.messages || !t.messages.length) {
      out.push(h("p", {class: "muted", text: "This trajectory has no message view; open the token view of each turn."}));
    }
    return out;
  }

  function renderPrompt(t, messages) {
    const spans = t.spans.filter((s) => s.kind === "prompt");
    const body = h("div", {class: "body"});
    for (const m of messages) {
      const text = textOf(m.content);
      if (m.role === "system") body.append(lazyDetails(`system prompt (${text.length} characters)`, () => h("pre", {text})));
      else body.append(h("div", {class: "msg"}, h("div", {class: "role", text: m.role}), h("pre", {text})));
    }
    if (t.tools && t.tools.length) {
      const names = t.tools.map((tool) => (tool.function || tool).name).join(", ");
      body.append(lazyDetails(`tools: ${names}`, () => h("pre", {text: JSON.stringify(t.tools, null, 2)})));
    }
    body.append(tokenDetails(t, spans, "prompt tokens"));
    return h("section", {class: "turn prompt"}, h("header", {}, h("h3", {text: "Prompt"}),
      h("span", {class: "muted", text: spanText(spans)})), body);
  }

  function renderTurn(t, k, turn, step) {
    const spans = t.spans.filter((s) => s.turn === k && s.kind !== "prompt");
    const sampled = spans.filter((s) => s.kind === "sampled");
    const reward = t.rewards[k];
    const header = h("header", {}, h("h3", {text: `Turn ${k + 1}`}),
      reward === undefined ? badge("not scored") : badge(`reward ${signed(reward)}`, reward > 0 ? "ok" : (reward < 0 ? "bad" : null)),
      h("span", {class: "muted", text: spanText(spans) + versionText(t, sampled)}));
    const body = h("div", {class: "body"});
    if (turn) {
      body.append(...assistantParts(turn.assistant));
      const results = (step && step.tool_results) || [];
      turn.replies.forEach((m, j) => body.append(replyPart(m, results.length === turn.replies.length ? results[j] : null)));
    } else {
      body.append(h("p", {class: "muted", text: "No message view for this turn."}));
    }
    if (step) {
      for (const e of step.errors || []) {
        body.append(h("div", {class: "box error"}, h("b", {text: e.kind + ": "}), e.message));
      }
      const parts = breakdownParts(step.reward_breakdown);
      if (parts.length) body.append(h("div", {class: "breakdown"}, h("span", {class: "muted", text: "turn reward:"}), parts));
    }
    body.append(tokenDetails(t, spans, "tokens of this turn"));
    return h("section", {class: "turn", "data-turn": k}, header, body);
  }

  function assistantParts(m) {
    let reasoning = m.reasoning_content ?? m.reasoning ?? "";
    let content = textOf(m.content);
    if (!reasoning && content.includes("</think>")) {  // a message whose think block was not split off
      const [head, ...rest] = content.split("</think>");
      reasoning = head.replace(/^\s*<think>/, "").trim();
      content = rest.join("</think>").trim();
    }
    const parts = [];
    if (reasoning) parts.push(h("div", {class: "msg reasoning"}, h("div", {class: "role", text: "reasoning"}), h("pre", {text: reasoning})));
    if (content) parts.push(h("div", {class: "msg assistant"}, h("div", {class: "role", text: "assistant"}), h("pre", {text: content})));
    for (const call of m.tool_calls || []) parts.push(toolCallPart(call));
    if (!parts.length) parts.push(h("div", {class: "msg muted", text: "(empty assistant message)"}));
    return parts;
  }

  function toolCallPart(call) {
    const fn = call.function || call;
    let args = fn.arguments;
    if (typeof args === "string") {
      try { args = JSON.parse(args); } catch (e) { /* shown as the raw string below */ }
    }
    const table = h("table", {class: "args"});
    if (args && typeof args === "object" && !Array.isArray(args)) {
      for (const [key, value] of Object.entries(args)) {
        table.append(h("tr", {}, h("td", {text: key}),
          h("td", {}, h("pre", {text: typeof value === "string" ? value : JSON.stringify(value, null, 2)}))));
      }
    } else if (args !== undefined && args !== null) {
      table.append(h("tr", {}, h("td", {text: "arguments"}), h("td", {}, h("pre", {text: String(args)}))));
    }
    return h("div", {class: "msg tool-call"}, h("div", {class: "role"}, "tool call \u2192 ", h("code", {text: fn.name})), table);
  }

  function replyPart(m, result) {
    if (m.role !== "tool") {
      return h("div", {class: "msg"}, h("div", {class: "role", text: m.role}), h("pre", {text: textOf(m.content)}));
    }
    const failed = result && result.ok === false;
    const role = h("div", {class: "role"}, "tool result", result ? " \u2190 " : "", result ? h("code", {text: result.name}) : null, " ",
      failed ? badge(result.timed_out ? "timed out" : "failed", "bad") : (result ? badge("ok", "ok") : null));
    return h("div", {class: "msg tool-result" + (failed ? " failed" : "")}, role, h("pre", {text: textOf(m.content)}));
  }

  function spanText(spans) {
    return spans.map((s) => `${s.kind} [${s.start}, ${s.end}) ${s.end - s.start} tokens`).join(" \u00b7 ");
  }

  function versionText(t, sampled) {
    if (!sampled.length) return "";
    const versions = expanded(t).versions;
    const seen = new Set();
    for (const s of sampled) for (let i = s.start; i < s.end; i++) seen.add(versions[i]);
    return seen.size ? ` \u00b7 policy version ${[...seen].join(", ")}` : "";
  }

  // ------------------------------------------------------------------ token view, built when opened

  const expandedCache = new WeakMap();
  function expanded(t) {
    if (!expandedCache.has(t)) expandedCache.set(t, {mask: expandRuns(t.loss_mask), versions: expandRuns(t.policy_versions)});
    return expandedCache.get(t);
  }

  function lazyDetails(label, build) {
    const details = h("details", {}, h("summary", {text: label}));
    details.addEventListener("toggle", () => {
      if (details.open && details.children.length === 1) details.append(build());
    });
    return details;
  }

  function tokenDetails(t, spans, label) {
    const total = spans.reduce((n, s) => n + s.end - s.start, 0);
    const details = lazyDetails(`${label}: ${total} ids`, () => tokenList(t, spans));
    details.classList.add("tokens");
    return details;
  }

  function tokenList(t, spans) {
    const x = expanded(t);
    const list = h("div", {class: "token-list"});
    const more = h("button", {type: "button"});
    let s = 0, i = spans.length ? spans[0].start : 0;
    function next() {  // render the next TOKEN_CHUNK chips
      const frag = document.createDocumentFragment();
      for (let n = 0; n < TOKEN_CHUNK && s < spans.length; n++) {
        frag.append(chip(t, x, i, spans[s].kind));
        if (++i >= spans[s].end && ++s < spans.length) i = spans[s].start;
      }
      list.append(frag);
      const left = s < spans.length ? spans.slice(s).reduce((n, sp) => n + sp.end - sp.start, 0) - (i - spans[s].start) : 0;
      more.textContent = `show ${Math.min(left, TOKEN_CHUNK)} more of ${left}`;
      more.hidden = left === 0;
    }
    more.addEventListener("click", next);
    next();
    return h("div", {}, list, more);
  }

  function chip(t, x, i, kind) {
    const mask = x.mask[i];
    const mismatch = (mask === 1) !== (kind === "sampled");
    const title = `#${i} id ${t.ids[i]} \u00b7 ${kind} \u00b7 loss mask ${mask}` +
      (kind === "sampled" ? ` \u00b7 logprob ${fmtLogprob(t.logprobs[i])} \u00b7 policy v${x.versions[i]}` : "");
    const node = h("span", {class: `tok ${kind}` + (mask ? " trained" : "") + (mismatch ? " mismatch" : ""), title},
      h("b", {text: String(t.ids[i])}));
    if (kind === "sampled") node.append(h("i", {text: fmtLogprob(t.logprobs[i])}));
    return node;
  }

  // ------------------------------------------------------------------ start

  renderHeader();
  renderColumns();
  renderFamilies();
  for (const id of ["f-outcome", "f-family", "f-errors"]) $(id).addEventListener("change", renderList);
  $("f-task").addEventListener("input", renderList);
  renderList();
  // report.html#ID opens episode ID (showEpisode keeps the fragment up to date, so links can be shared).
  function openFromFragment() {
    let wanted = null;
    try { wanted = decodeURIComponent(location.hash.slice(1)); } catch (e) { /* a malformed fragment opens nothing */ }
    const index = EPISODES.findIndex((ep) => ep.id === wanted);
    if (index >= 0 && index !== selected) showEpisode(index);
  }
  window.addEventListener("hashchange", openFromFragment);
  openFromFragment();
})();
