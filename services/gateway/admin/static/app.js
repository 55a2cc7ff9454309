// The operator's dashboard: plain DOM and inline SVG, no library, nothing fetched from elsewhere.
"use strict";

const $ = (selector) => document.querySelector(selector);
const SVG = "http://www.w3.org/2000/svg";
let token = sessionStorage.getItem("admin_token");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function table(target, headers, rows) {
  const head = el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label ?? h)));
  target.replaceChildren(el("thead", {}, head), el("tbody", {}, rows.length ? rows : [
    el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "Nothing yet")),
  ]));
}

function flash(message, bad = false) {
  const box = $("#flash");
  box.textContent = message;
  box.className = bad ? "flash bad" : "flash";
  box.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { box.hidden = true; }, 6000);
}

async function api(method, path, body, headers = {}) {
  const response = await fetch(path, {
    method,
    headers: { ...(token ? { Authorization: `Bearer ${token}` } : {}), ...(body ? { "Content-Type": "application/json" } : {}), ...headers },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (response.status === 403 && path !== "/admin/api/login") signOut();
  if (!response.ok) throw new Error(data.detail || `HTTP ${response.status}`);
  return data;
}

const sats = (msat) => (msat / 1000).toLocaleString(undefined, { maximumFractionDigits: 3 });

// ---- charts: bars per hour, drawn as SVG ----
function barChart(target, points, series) {
  const width = 600, height = 180, pad = 28;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const max = Math.max(1, ...points.flatMap((p) => series.map((s) => p[s.key])));
  const slot = (width - pad) / Math.max(points.length, 1);
  const add = (name, attrs, text) => {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  add("line", { x1: pad, y1: height - pad, x2: width, y2: height - pad, stroke: "#2a2f3a" });
  add("text", { x: 2, y: 12 }, max.toLocaleString());
  add("text", { x: 2, y: height - pad }, "0");
  points.forEach((point, i) => {
    series.forEach((s, j) => {
      const h = ((height - pad - 8) * point[s.key]) / max;
      const w = Math.max((slot - 4) / series.length, 1);
      add("rect", { x: pad + i * slot + 2 + j * w, y: height - pad - h, width: w, height: h, fill: s.color, rx: 1 },
        undefined);
      svg.lastChild.append(Object.assign(document.createElementNS(SVG, "title"),
        { textContent: `${point.hour}: ${point[s.key]} ${s.label}` }));
    });
    if (points.length <= 12 || i % Math.ceil(points.length / 8) === 0) {
      add("text", { x: pad + i * slot + 2, y: height - 10 }, point.hour.slice(11, 16) || point.hour);
    }
  });
  if (!points.length) add("text", { x: width / 2 - 30, y: height / 2 }, "no calls yet");
  target.replaceChildren(svg);
}

// ---- views ----
async function showOverview() {
  const hours = $("#hours").value;
  const data = await api("GET", `/admin/api/usage/dashboard?hours=${hours}`);
  const s = data.summary;
  $("#cards").replaceChildren(...[
    ["Revenue", `${sats(s.revenue_msats)} sats`], ["Calls", s.total_requests], ["Errors", s.failed_requests],
    ["Tokens", s.total_tokens.toLocaleString()], ["Keys", s.unique_keys], ["Avg latency", `${s.avg_latency_ms} ms`],
  ].map(([label, value]) => el("div", { class: "stat" }, label, el("b", {}, value))));
  const hourly = data.hourly.map((h) => ({ ...h, revenue: h.revenue_msats / 1000 }));
  barChart($("#chart-revenue"), hourly, [{ key: "revenue", color: "#f7931a", label: "sats" }]);
  barChart($("#chart-calls"), hourly, [{ key: "requests", color: "#58a6ff", label: "calls" },
    { key: "errors", color: "#e5534b", label: "errors" }]);
  table($("#by-model"), ["Model", { label: "Calls", num: 1 }, { label: "Errors", num: 1 }, { label: "Revenue (sats)", num: 1 }],
    data.revenue_by_model.map((m) => el("tr", {}, el("td", {}, m.model), el("td", { class: "num" }, m.requests),
      el("td", { class: "num" }, m.errors), el("td", { class: "num" }, sats(m.revenue_msats)))));
}

let models = [];
async function showModels() {
  const [providers, types, list] = await Promise.all([api("GET", "/admin/api/upstream-providers"),
    api("GET", "/admin/api/provider-types"), api("GET", "/admin/api/models")]);
  models = list;
  const rows = providers.map((p) => el("tr", { "data-provider": p.slug }, el("td", {}, p.slug), el("td", {}, p.provider_type),
    el("td", {}, p.base_url), el("td", { class: "num" }, p.priority ?? 0), el("td", {}, `×${p.provider_fee ?? "default"}`),
    el("td", {}, el("input", { type: "checkbox", checked: p.enabled, "aria-label": `${p.slug} enabled`,
      onchange: (e) => editProvider(p.slug, { enabled: e.target.checked }) })),
    el("td", {}, el("button", { type: "button", class: "link", onclick: () => deleteProvider(p.slug) }, "Remove"))));
  const form = el("form", { class: "inline", id: "provider-form" },
    el("label", {}, "Type", el("select", { name: "provider_type" }, types.map((t) => el("option", { value: t.id }, t.name)))),
    el("label", {}, "Slug", el("input", { name: "slug", placeholder: "optional" })),
    el("label", {}, "Base URL", el("input", { name: "base_url", placeholder: "https://…/v1" })),
    el("label", {}, "API key", el("input", { name: "api_key", type: "password" })),
    el("button", { type: "submit" }, "Add provider"));
  form.addEventListener("submit", addProvider);
  const list_ = el("table");
  table(list_, ["Slug", "Type", "Base URL", { label: "Priority", num: 1 }, "Fee", "On", ""], rows);
  $("#providers").replaceChildren(el("h3", {}, "Upstream providers"), list_, form);
  renderModels();
}

async function addProvider(event) {
  event.preventDefault();
  const body = Object.fromEntries([...new FormData(event.target)].filter(([, v]) => v !== ""));
  try {
    const created = await api("POST", "/admin/api/upstream-providers", body);
    flash(`Added provider ${created.slug}`);
    await showModels();
  } catch (error) {
    flash(error.message, true);
  }
}

async function editProvider(slug, changes) {
  try {
    await api("PATCH", `/admin/api/upstream-providers/${slug}`, changes);
    flash(`Saved provider ${slug}`);
    await showModels();
  } catch (error) {
    flash(error.message, true);
  }
}

async function deleteProvider(slug) {
  try {
    await api("DELETE", `/admin/api/upstream-providers/${slug}`);
    flash(`Removed provider ${slug}`);
    await showModels();
  } catch (error) {
    flash(error.message, true);
  }
}

function renderModels() {
  const filter = $("#model-filter").value.toLowerCase();
  const rows = models.filter((m) => m.id.toLowerCase().includes(filter)).map((m) => {
    const price = (field) => el("input", { class: "price", "data-field": field, value: m.pricing[field] ?? "",
      "aria-label": `${m.id} ${field} price` });
    const row = el("tr", { "data-model": m.id },
      el("td", {}, el("input", { type: "checkbox", "data-field": "enabled", checked: m.enabled, "aria-label": `${m.id} enabled` })),
      el("td", {}, m.id, m.enabled ? "" : el("span", { class: "status-bad", title: m.disabled_reason }, " (not sold)")),
      el("td", {}, price("prompt")), el("td", {}, price("completion")), el("td", {}, price("request")),
      el("td", {}, el("input", { class: "alias", "data-field": "alias_ids", value: m.alias_ids.join(", "), "aria-label": `${m.id} aliases` })),
      el("td", {}, el("input", { class: "alias", "data-field": "forwarded_model_id", value: m.forwarded_model_id ?? "",
        "aria-label": `${m.id} forwarded id` })),
      el("td", {}, el("button", { type: "button", onclick: () => saveModel(row, m) }, "Save")));
    return row;
  });
  table($("#models"), ["On", "Model", "Prompt $/token", "Completion $/token", "Request $", "Aliases", "Forwarded id", ""], rows);
}

async function saveModel(row, model) {
  const field = (name) => row.querySelector(`[data-field="${name}"]`);
  const pricing = {};
  for (const name of ["prompt", "completion", "request"]) {
    if (field(name).value.trim() !== "") pricing[name] = field(name).value.trim();
  }
  const forwarded = field("forwarded_model_id").value.trim();
  const body = {
    enabled: field("enabled").checked, pricing,
    alias_ids: field("alias_ids").value.split(",").map((a) => a.trim()).filter(Boolean),
    forwarded_model_id: forwarded || null,
  };
  try {
    const saved = await api("PATCH", `/admin/api/models/${model.id}`, body);
    models = models.map((m) => (m.id === saved.id ? saved : m));
    flash(`Saved ${saved.id}`);
  } catch (error) {
    flash(error.message, true);
  }
}

async function showMoney() {
  const [balances, ledger, keys] = await Promise.all([
    api("GET", "/admin/api/balances"), api("GET", "/admin/api/transactions?limit=50"),
    api("GET", "/admin/api/temporary-balances?limit=50"),
  ]);
  table($("#balances"), ["Mint", { label: "Wallet (sats)", num: 1 }, { label: "Owed to users", num: 1 },
    { label: "Operator's", num: 1 }, ""], balances.map((b) => el("tr", {}, el("td", {}, b.mint_url),
    el("td", { class: "num" }, sats(b.wallet_balance)), el("td", { class: "num" }, sats(b.user_balance)),
    el("td", { class: "num owner-balance" }, sats(b.owner_balance)), el("td", { class: "status-bad" }, b.error ?? ""))));
  table($("#transactions"), ["When", "Type", "From", "To", { label: "Sats", num: 1 }, "Status"],
    ledger.transactions.map((t) => el("tr", { class: `tx-${t.type}` }, el("td", {}, t.created_at.slice(0, 19).replace("T", " ")),
      el("td", {}, t.type), el("td", {}, t.from_account), el("td", {}, t.to_account),
      el("td", { class: "num" }, sats(t.amount)), el("td", {}, t.status))));
  table($("#keys"), ["Key hash", { label: "Balance (sats)", num: 1 }, { label: "Spent", num: 1 }, { label: "Calls", num: 1 }],
    keys.balances.map((k) => el("tr", {}, el("td", {}, `${k.hashed_key.slice(0, 16)}…`),
      el("td", { class: "num" }, sats(k.balance)), el("td", { class: "num" }, sats(k.total_spent)),
      el("td", { class: "num" }, k.total_requests))));
}

async function withdraw(event) {
  event.preventDefault();
  const amount = Number($("#withdraw-amount").value);
  const address = $("#withdraw-address").value.trim();
  const key = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  try {
    const result = await api("POST", "/admin/withdraw", { amount, unit: "sat", ...(address ? { lightning_address: address } : {}) },
      { "Idempotency-Key": key });
    if (result.token) {
      $("#withdraw-token").value = result.token;
      $("#withdraw-token").hidden = false;
    }
    flash(`Withdrew ${result.amount} sats (${result.status})`);
    await showMoney();
  } catch (error) {
    flash(error.message, true);
  }
}

async function showLogs(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams();
  for (const [name, value] of new FormData($("#log-filters"))) if (value) params.set(name, value);
  const data = await api("GET", `/admin/api/logs?${params}`);
  table($("#logs"), ["When", "Request id", "Key", "Model", "Provider", { label: "Tries", num: 1 }, { label: "Tokens", num: 1 },
    { label: "Cost (sats)", num: 1 }, "Status", { label: "Latency", num: 1 }], data.logs.map((r) => el("tr", {},
    el("td", {}, r.timestamp.slice(0, 19).replace("T", " ")), el("td", {}, r.request_id), el("td", {}, r.key_hash_prefix),
    el("td", {}, r.model), el("td", {}, r.provider || "—"), el("td", { class: "num" }, r.attempts),
    el("td", { class: "num" }, r.prompt_tokens + r.completion_tokens),
    el("td", { class: "num" }, sats(r.cost_msats)),
    el("td", { class: r.status >= 400 ? "status-bad" : "status-ok" }, r.status), el("td", { class: "num" }, `${r.latency_ms} ms`))));
}

async function showSettings() {
  const settings = await api("GET", "/admin/api/settings");
  const form = $("#live-settings");
  form.replaceChildren(el("h3", {}, "Change while running"),
    ...settings.runtime_settings.map((name) => el("label", {}, name, el("input", { name, value: settings[name] ?? "" }))),
    el("button", { type: "submit" }, "Save"));
  table($("#settings"), ["Setting", "Value", ""], Object.entries(settings).filter(([k]) => k !== "runtime_settings")
    .map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, Array.isArray(v) ? v.join(", ") : String(v)),
      el("td", { class: "muted" }, settings.runtime_settings.includes(k) ? "live" : "restart"))));
}

async function saveSettings(event) {
  event.preventDefault();
  try {
    await api("PATCH", "/admin/api/settings", Object.fromEntries(new FormData($("#live-settings"))));
    flash("Settings saved");
    await showSettings();
  } catch (error) {
    flash(error.message, true);
  }
}

async function changePassword(event) {
  event.preventDefault();
  try {
    const result = await api("PATCH", "/admin/api/password",
      { current_password: $("#current-password").value, new_password: $("#new-password").value });
    flash(result.message);
    event.target.reset();
  } catch (error) {
    flash(error.message, true);
  }
}

const VIEWS = { overview: showOverview, models: showModels, money: showMoney, logs: showLogs, settings: showSettings };

async function route() {
  const name = location.hash.slice(1) in VIEWS ? location.hash.slice(1) : "overview";
  $("#flash").hidden = true;
  for (const view of Object.keys(VIEWS)) $(`#view-${view}`).hidden = view !== name;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
  try {
    await VIEWS[name]();
  } catch (error) {
    flash(error.message, true);
  }
}

function signOut() {
  token = null;
  sessionStorage.removeItem("admin_token");
  $("#app").hidden = true;
  $("#login").hidden = false;
}

async function signIn(event) {
  event.preventDefault();
  try {
    const result = await api("POST", "/admin/api/login", { password: $("#password").value });
    token = result.token;
    sessionStorage.setItem("admin_token", token);
    $("#login-error").textContent = "";
    start();
  } catch (error) {
    $("#login-error").textContent = error.message;
  }
}

function start() {
  $("#login").hidden = true;
  $("#app").hidden = false;
  route();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", signIn);
  $("#logout").addEventListener("click", async () => {
    await api("POST", "/admin/api/logout").catch(() => {});
    signOut();
  });
  $("#hours").addEventListener("change", showOverview);
  $("#model-filter").addEventListener("input", renderModels);
  $("#withdraw-form").addEventListener("submit", withdraw);
  $("#log-filters").addEventListener("submit", showLogs);
  $("#live-settings").addEventListener("submit", saveSettings);
  $("#password-form").addEventListener("submit", changePassword);
  window.addEventListener("hashchange", route);
  if (token) start(); else signOut();
});
