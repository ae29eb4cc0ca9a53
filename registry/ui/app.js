// Meshwork's web admin UI: plain JavaScript, no build step, served from
// the registry binary. Every page reads the registry's HTTP API (the same
// one Consul clients use) with the token from the login box (kept in this
// tab's session storage, sent as X-Consul-Token, never in a URL or a
// cookie) and follows it with blocking queries: what changes shows without
// a reload, with the index it came at. Nothing is written as HTML: every
// value from the API goes in as text.

const main = document.getElementById('main');
const statusLine = document.getElementById('status');
const TOKEN_KEY = 'meshwork-token';

class ApiError extends Error {
  constructor(status, text) {
    super(text || `HTTP ${status}`);
    this.status = status;
  }
}

/** An element: `h('a', {href: '#/x'}, 'text', child)`. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'on') {
      for (const [event, fn] of Object.entries(v)) el.addEventListener(event, fn);
    } else if (k === 'class') {
      el.className = v;
    } else {
      el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

async function api(path, { method = 'GET', body, signal, text = false } = {}) {
  const headers = {};
  if (token()) headers['X-Consul-Token'] = token();
  const r = await fetch(path, { method, headers, body, signal, credentials: 'omit', cache: 'no-store' });
  const index = Number(r.headers.get('X-Consul-Index') || 0);
  if (!r.ok) throw new ApiError(r.status, (await r.text()).trim());
  const raw = await r.text();
  const data = text ? raw : raw ? JSON.parse(raw) : null;
  return { data, index };
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); });
  });

function setStatus(text) {
  statusLine.textContent = text;
}

function errorBox(e) {
  const why = e.status === 403 ? 'Permission denied — does your token allow this? ' : '';
  return h('p', { class: 'error', role: 'alert' }, why + e.message);
}

/** The page's lifetime: aborted when the user navigates away. */
let page = new AbortController();

/**
 * Follows `path` with blocking queries: `render(data, index)` at once and
 * after every change, until the page changes. A 404 renders `null`.
 * Endpoints that do not block (no X-Consul-Index) are polled every 2 s.
 */
function follow(path, render) {
  const { signal } = page;
  (async () => {
    let index = 0;
    while (!signal.aborted) {
      const sep = path.includes('?') ? '&' : '?';
      const url = index > 0 ? `${path}${sep}index=${index}&wait=30s` : path;
      try {
        const { data, index: next } = await api(url, { signal });
        if (signal.aborted) return;
        render(data, next);
        setStatus(next ? `Live · index ${next}` : 'Live (polled)');
        if (!next) {
          await sleep(2000, signal);
        }
        // An index that went back (a restored snapshot): start over.
        index = next < index ? 0 : next;
      } catch (e) {
        if (signal.aborted) return;
        if (e.status === 404) {
          render(null, 0);
          setStatus('Live · not found');
          await sleep(2000, signal);
          continue;
        }
        setStatus(`Error: ${e.message}`);
        if (e.status === 403 && !document.getElementById('denied')) {
          main.prepend(h('p', { class: 'error', role: 'alert', id: 'denied' },
            `Permission denied: ${e.message}. ${token() ? 'Your token does not allow this.' : 'Paste an ACL token in the box above.'}`));
        }
        await sleep(2000, signal);
      }
    }
  })();
}

function healthOf(counts) {
  if (counts.critical) return 'critical';
  if (counts.warning) return 'warning';
  return 'passing';
}

// ---- Services -------------------------------------------------------

function servicesPage() {
  const filter = h('input', { type: 'search', id: 'service-filter', placeholder: 'name or tag' });
  const body = h('tbody');
  let last = [];
  const draw = () => {
    const q = filter.value.trim().toLowerCase();
    const rows = last.filter((s) => !q || s.Name.toLowerCase().includes(q) || (s.Tags || []).some((t) => t.toLowerCase().includes(q)));
    body.replaceChildren(...rows.map((s) => {
      const health = healthOf({ critical: s.ChecksCritical, warning: s.ChecksWarning });
      return h('tr', { 'data-service': s.Name },
        h('td', {}, h('a', { href: `#/services/${encodeURIComponent(s.Name)}` }, s.Name)),
        h('td', {}, s.Kind || ''),
        h('td', {}, (s.Tags || []).map((t) => h('span', { class: 'tag' }, t))),
        h('td', { class: 'instances' }, s.InstanceCount),
        h('td', { class: `health ${health}` },
          `${s.ChecksPassing} passing, ${s.ChecksWarning} warning, ${s.ChecksCritical} critical`));
    }));
    if (!rows.length) body.append(h('tr', {}, h('td', { colspan: 5 }, last.length ? 'No service matches.' : 'No services.')));
  };
  filter.addEventListener('input', draw);
  main.replaceChildren(
    h('h1', {}, 'Services'),
    h('div', { class: 'actions' }, h('label', { for: 'service-filter' }, 'Filter'), filter),
    h('table', {}, h('caption', { class: 'skip' }, 'Services and their health'),
      h('thead', {}, h('tr', {}, ['Name', 'Kind', 'Tags', 'Instances', 'Checks'].map((c) => h('th', { scope: 'col' }, c)))),
      body));
  follow('/v1/internal/ui/services', (data) => { last = data || []; draw(); });
}

function servicePage(name) {
  const instances = h('tbody');
  const routing = h('div');
  const intentions = h('div', { id: 'intentions' });
  const sidecars = h('tbody');
  main.replaceChildren(
    h('p', {}, h('a', { href: '#/services' }, '← Services')),
    h('h1', {}, name),
    h('h2', {}, 'Instances'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Instance', 'Node', 'Address', 'Tags', 'Checks'].map((c) => h('th', { scope: 'col' }, c)))), instances),
    h('h2', {}, 'Traffic policy'),
    routing,
    h('h2', {}, 'Intentions'),
    intentions,
    h('h2', {}, 'Sidecars'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Sidecar', 'Mode', 'Server', 'Applied'].map((c) => h('th', { scope: 'col' }, c)))), sidecars));
  const enc = encodeURIComponent(name);
  follow(`/v1/health/service/${enc}`, (data) => {
    const list = data || [];
    instances.replaceChildren(...list.map((e) => {
      const checks = e.Checks || [];
      return h('tr', { 'data-instance': e.Service.ID },
        h('td', {}, e.Service.ID),
        h('td', {}, e.Node.Node),
        h('td', {}, `${e.Service.Address || e.Node.Address}:${e.Service.Port}`),
        h('td', {}, (e.Service.Tags || []).map((t) => h('span', { class: 'tag' }, t))),
        h('td', {}, h('ul', {}, checks.map((c) => h('li', { class: c.Status },
          h('span', { class: 'check-status' }, c.Status), ` ${c.Name}`,
          c.Output ? h('pre', {}, c.Output) : null)))));
    }));
    if (!list.length) instances.append(h('tr', {}, h('td', { colspan: 5 }, 'No instances.')));
  });
  // What applies to calls to the service: its entries, read once.
  (async () => {
    const kinds = ['service-defaults', 'service-router', 'service-splitter', 'service-resolver', 'service-intentions'];
    const parts = await Promise.all(kinds.map(async (kind) => {
      try {
        const { data } = await api(`/v1/config/${kind}/${enc}`, { signal: page.signal });
        return h('details', {}, h('summary', {}, h('a', { href: `#/config/${kind}/${enc}` }, kind)), h('pre', {}, JSON.stringify(data, null, 2)));
      } catch (e) {
        return e.status === 404 ? h('p', {}, `${kind}: none`) : h('p', { class: 'error' }, `${kind}: ${e.message}`);
      }
    }));
    routing.replaceChildren(...parts);
  })();
  // Who may call it, and whom it may call (`*` rules included).
  follow('/v1/connect/intentions', (data) => {
    const list = data || [];
    const rule = (i, other) => h('li', { class: i.Action === 'deny' ? 'critical' : 'passing' },
      `${other}: ${i.Action || (i.Permissions ? 'by permissions (L7)' : '')}`,
      i.Precedence !== undefined ? ` (precedence ${i.Precedence})` : '');
    const ins = list.filter((i) => i.DestinationName === name || i.DestinationName === '*');
    const outs = list.filter((i) => i.SourceName === name && i.DestinationName !== name);
    intentions.replaceChildren(
      h('h3', {}, 'In (who may call it)'), h('ul', { id: 'intentions-in' }, ins.length ? ins.map((i) => rule(i, i.SourceName)) : [h('li', {}, 'none: the mesh default applies')]),
      h('h3', {}, 'Out (whom it may call)'), h('ul', { id: 'intentions-out' }, outs.length ? outs.map((i) => rule(i, i.DestinationName)) : [h('li', {}, 'none')]));
  });
  follow('/v1/mesh/sidecars', (data) => {
    const list = ((data && data.Sidecars) || []).filter((s) => s.Service === name);
    const index = (data && data.Index) || 0;
    sidecars.replaceChildren(...list.map((s) => h('tr', {},
      h('td', {}, `${s.ServiceID} on ${s.Node}`), h('td', {}, s.Mode || ''), h('td', {}, s.Server || ''),
      h('td', {}, `${s.AppliedIndex ?? '?'} (${lagOf(s, index)})`))));
    if (!list.length) sidecars.append(h('tr', {}, h('td', { colspan: 4 }, 'No sidecar reports for this service.')));
  });
}

// ---- Nodes ----------------------------------------------------------

function nodesPage() {
  const body = h('tbody');
  main.replaceChildren(h('h1', {}, 'Nodes'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Node', 'Address', 'Datacenter'].map((c) => h('th', { scope: 'col' }, c)))), body));
  follow('/v1/catalog/nodes', (data) => {
    body.replaceChildren(...(data || []).map((n) => h('tr', { 'data-node': n.Node },
      h('td', {}, n.Node), h('td', {}, n.Address), h('td', {}, n.Datacenter || ''))));
  });
}

// ---- Key/Value ------------------------------------------------------

function decode(b64) {
  if (b64 === null || b64 === undefined) return '';
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

function kvPath(key) {
  return key.split('/').map(encodeURIComponent).join('/');
}

function kvFolder(prefix) {
  const list = h('ul', { id: 'kv-list' });
  const name = h('input', { type: 'text', id: 'kv-new-key', required: true });
  const value = h('textarea', { id: 'kv-new-value' });
  const result = h('div', { role: 'status' });
  const crumbs = [h('a', { href: '#/kv/' }, 'Key/Value')];
  let at = '';
  for (const part of prefix.split('/').filter(Boolean)) {
    at += `${part}/`;
    crumbs.push(' / ', h('a', { href: `#/kv/${kvPath(at)}` }, part));
  }
  const create = h('form', { id: 'kv-create', on: { submit: async (ev) => {
    ev.preventDefault();
    const key = prefix + name.value;
    try {
      // cas=0: only if the key does not exist yet.
      const { data } = await api(`/v1/kv/${kvPath(key)}?cas=0`, { method: 'PUT', body: value.value, text: true });
      if (data.trim() !== 'true') throw new ApiError(409, `${key} exists already; open it to edit it.`);
      location.hash = `#/kv/${kvPath(key)}`;
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  } } },
  h('h2', {}, 'Create a key'),
  h('div', { class: 'actions' }, h('label', { for: 'kv-new-key' }, `Key under ${prefix || '/'}`), name),
  h('label', { for: 'kv-new-value' }, 'Value'), value,
  h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Create')), result);
  main.replaceChildren(h('h1', {}, ...crumbs), list, create);
  follow(`/v1/kv/${kvPath(prefix)}?keys&separator=/`, (keys) => {
    const items = (keys || []).filter((k) => k !== prefix);
    list.replaceChildren(...items.map((k) => h('li', {},
      h('a', { href: `#/kv/${kvPath(k)}`, 'data-key': k }, k.slice(prefix.length)))));
    if (!items.length) list.append(h('li', {}, 'No keys here.'));
  });
}

function kvKey(key) {
  const view = h('pre', { id: 'kv-value' });
  const meta = h('p', { id: 'kv-meta' });
  const result = h('div', { id: 'kv-result', role: 'status' });
  const editor = h('textarea', { id: 'kv-editor', 'aria-label': 'New value' });
  let current = null; // the entry as last read
  let editingFrom = null; // the ModifyIndex the edit started from
  const save = h('button', { type: 'button', id: 'kv-save', on: { click: async () => {
    try {
      const { data } = await api(`/v1/kv/${kvPath(key)}?cas=${editingFrom}`, { method: 'PUT', body: editor.value, text: true });
      if (data.trim() !== 'true') {
        result.replaceChildren(h('p', { class: 'error', role: 'alert', id: 'kv-conflict' },
          `Not saved: ${key} was changed by someone else after you began (you edited index ${editingFrom}, it is now ${current ? current.ModifyIndex : 'deleted'}). Your text is kept below; copy it, then edit again.`));
        return;
      }
      editingFrom = null;
      result.replaceChildren(h('p', {}, 'Saved.'));
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  } } }, 'Save');
  const edit = h('button', { type: 'button', id: 'kv-edit', on: { click: () => {
    if (!current) return;
    editingFrom = current.ModifyIndex;
    editor.value = decode(current.Value);
    editor.hidden = false; save.hidden = false;
    editor.focus();
  } } }, 'Edit');
  const confirm = h('span', { hidden: true },
    `Delete ${key}? `,
    h('button', { type: 'button', id: 'kv-delete-confirm', on: { click: async () => {
      try {
        const { data } = await api(`/v1/kv/${kvPath(key)}?cas=${current ? current.ModifyIndex : 0}`, { method: 'DELETE', text: true });
        if (data.trim() !== 'true') throw new ApiError(409, `${key} changed meanwhile; not deleted.`);
        const parent = key.includes('/') ? key.slice(0, key.lastIndexOf('/') + 1) : '';
        location.hash = `#/kv/${kvPath(parent)}`;
      } catch (e) {
        result.replaceChildren(errorBox(e));
      }
    } } }, 'Yes, delete'),
    h('button', { type: 'button', on: { click: () => { confirm.hidden = true; } } }, 'Cancel'));
  const del = h('button', { type: 'button', id: 'kv-delete', on: { click: () => { confirm.hidden = false; } } }, 'Delete…');
  editor.hidden = true; save.hidden = true;
  const parent = key.includes('/') ? key.slice(0, key.lastIndexOf('/') + 1) : '';
  main.replaceChildren(
    h('p', {}, h('a', { href: `#/kv/${kvPath(parent)}` }, `← ${parent || 'Key/Value'}`)),
    h('h1', {}, key), meta, view,
    h('div', { class: 'actions' }, edit, del, confirm), editor, h('div', { class: 'actions' }, save), result);
  follow(`/v1/kv/${kvPath(key)}`, (data) => {
    current = data && data[0];
    if (!current) {
      view.textContent = '';
      meta.textContent = 'This key does not exist (any more).';
      return;
    }
    view.textContent = decode(current.Value);
    meta.textContent = `ModifyIndex ${current.ModifyIndex} · Flags ${current.Flags}${current.Session ? ` · locked by session ${current.Session}` : ''}`;
    if (editingFrom !== null && current.ModifyIndex !== editingFrom) {
      result.replaceChildren(h('p', { class: 'notice' }, `Changed by someone else at index ${current.ModifyIndex} while you edit: saving will be refused.`));
    }
  });
}

// ---- Config entries -------------------------------------------------

const KINDS = ['service-defaults', 'proxy-defaults', 'service-router', 'service-splitter', 'service-resolver',
  'service-intentions', 'mesh', 'ingress-gateway', 'jwt-provider', 'terminating-gateway', 'exported-services'];

function configPage() {
  const sections = h('div');
  main.replaceChildren(h('h1', {}, 'Config entries'), sections);
  (async () => {
    const parts = await Promise.all(KINDS.map(async (kind) => {
      try {
        const { data } = await api(`/v1/config/${kind}`, { signal: page.signal });
        const list = data || [];
        return list.length ? h('section', {}, h('h2', {}, kind), h('ul', {}, list.map((e) => h('li', {},
          h('a', { href: `#/config/${kind}/${encodeURIComponent(e.Name)}` }, e.Name))))) : null;
      } catch (e) {
        return h('p', { class: 'error' }, `${kind}: ${e.message}`);
      }
    }));
    const shown = parts.filter(Boolean);
    sections.replaceChildren(...(shown.length ? shown : [h('p', {}, 'No config entries.')]));
  })();
}

function configEntryPage(kind, name) {
  const editor = h('textarea', { id: 'config-editor', 'aria-label': `${kind} ${name} as JSON`, spellcheck: 'false' });
  const result = h('div', { id: 'config-result', role: 'status' });
  let index = 0;
  const save = h('button', { type: 'button', id: 'config-save', on: { click: async () => {
    let body;
    try {
      body = JSON.parse(editor.value);
    } catch (e) {
      result.replaceChildren(h('p', { class: 'error', role: 'alert' }, `Not JSON: ${e.message}`));
      return;
    }
    try {
      const { data } = await api(`/v1/config?cas=${index}`, { method: 'PUT', body: JSON.stringify(body), text: true });
      result.replaceChildren(data.trim() === 'true'
        ? h('p', {}, 'Saved.')
        : h('p', { class: 'error', role: 'alert' }, 'Not saved: the entry was changed by someone else since you opened it. Reload to see it.'));
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  } } }, 'Save');
  main.replaceChildren(
    h('p', {}, h('a', { href: '#/config' }, '← Config entries')),
    h('h1', {}, `${kind} / ${name}`), editor, h('div', { class: 'actions' }, save), result);
  (async () => {
    try {
      const { data } = await api(`/v1/config/${kind}/${encodeURIComponent(name)}`, { signal: page.signal });
      index = data.ModifyIndex || 0;
      const shown = { ...data };
      delete shown.CreateIndex; delete shown.ModifyIndex;
      editor.value = JSON.stringify(shown, null, 2);
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  })();
}

// ---- Sidecars and cluster --------------------------------------------

/** A sidecar's config state: the index it has applied and how far behind
 * the registry's state that is. */
function lagOf(s, index) {
  if (!s.Connected) return 'disconnected';
  if (s.AppliedIndex === undefined || s.AppliedIndex === null) return 'unknown';
  return s.AppliedIndex >= index ? 'current' : `${index - s.AppliedIndex} behind`;
}

function sidecarsPage() {
  const body = h('tbody');
  main.replaceChildren(h('h1', {}, 'Sidecars'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Service', 'Instance', 'Mode', 'Server', 'Applied index', 'Lag', 'Refused', 'Last report', 'Report'].map((c) => h('th', { scope: 'col' }, c)))), body));
  follow('/v1/mesh/sidecars', (data) => {
    const list = (data && data.Sidecars) || [];
    const index = (data && data.Index) || 0;
    body.replaceChildren(...list.map((s) => h('tr', { 'data-sidecar': `${s.ServiceID}@${s.Node}` },
      h('td', {}, s.Service || ''), h('td', {}, `${s.ServiceID} on ${s.Node}`), h('td', {}, s.Mode || ''), h('td', {}, s.Server || ''),
      h('td', {}, s.AppliedIndex ?? ''), h('td', { class: 'lag' }, lagOf(s, index)),
      h('td', {}, (s.Refused || []).length), h('td', {}, `${((s.LastReportMs || 0) / 1000).toFixed(0)} s ago`),
      h('td', {}, h('details', {}, h('summary', {}, 'details'), h('pre', {}, JSON.stringify(s, null, 2)))))));
    if (!list.length) body.append(h('tr', {}, h('td', { colspan: 9 }, 'No sidecar reports.')));
  });
}

function clusterPage() {
  const members = h('tbody');
  const health = h('pre', { id: 'autopilot' });
  const result = h('div', { role: 'status' });
  const download = h('button', { type: 'button', id: 'snapshot', on: { click: async () => {
    try {
      const headers = token() ? { 'X-Consul-Token': token() } : {};
      const r = await fetch('/v1/snapshot', { headers, credentials: 'omit' });
      if (!r.ok) throw new ApiError(r.status, (await r.text()).trim());
      const url = URL.createObjectURL(await r.blob());
      const a = h('a', { href: url, download: `meshwork-${Date.now()}.snap` });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      result.replaceChildren(h('p', {}, 'Snapshot downloaded.'));
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  } } }, 'Download a snapshot');
  main.replaceChildren(h('h1', {}, 'Cluster'),
    h('table', {}, h('thead', {}, h('tr', {}, ['Server', 'Address', 'Leader', 'Voter'].map((c) => h('th', { scope: 'col' }, c)))), members),
    h('h2', {}, 'Autopilot health'), health, h('div', { class: 'actions' }, download), result);
  follow('/v1/operator/raft/configuration', (data) => {
    members.replaceChildren(...((data && data.Servers) || []).map((s) => h('tr', { 'data-server': s.Node },
      h('td', {}, s.Node), h('td', {}, s.Address), h('td', {}, s.Leader ? 'leader' : ''), h('td', {}, s.Voter ? 'yes' : 'no'))));
  });
  follow('/v1/operator/autopilot/health', (data) => {
    health.textContent = JSON.stringify(data, null, 2);
  });
}


// ---- Topology ---------------------------------------------------------

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'on') for (const [e, fn] of Object.entries(v)) el.addEventListener(e, fn);
    else el.setAttribute(k, String(v));
  }
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function stats(e) {
  const ms = (v) => (v === null || v === undefined ? '–' : `${v} ms`);
  return `${e.RequestsPerSecond.toFixed(2)} req/s · ${(e.ErrorRate * 100).toFixed(1)}% errors · p50 ${ms(e.P50Ms)} · p99 ${ms(e.P99Ms)}`;
}

/**
 * Services in columns by their depth from the callers nobody calls
 * (a gateway, a front end), edges between them with their rate, errors
 * and latency over the last minute; polled every 5 s. A node picked
 * (click or keyboard) lists its calls in and out below.
 */
function topologyPage(selected) {
  const picture = h('div', { id: 'topology-graph' });
  const details = h('div', { id: 'topology-details' });
  const table = h('tbody');
  main.replaceChildren(
    h('h1', {}, 'Topology'),
    h('p', {}, 'Observed calls over the last minute, as the sidecars report them (every 10 s).'),
    picture, details,
    h('h2', {}, 'Calls'),
    h('table', {}, h('thead', {}, h('tr', {}, ['From', 'To', 'Requests/s', 'Errors', 'p50', 'p99'].map((c) => h('th', { scope: 'col' }, c)))), table));
  const draw = (data) => {
    const edges = (data && data.Edges) || [];
    const services = (data && data.Services) || [];
    const names = new Set([...services.map((s) => s.Name), ...edges.flatMap((e) => [e.Source, e.Destination])]);
    // Depth: 0 for services nobody calls, else one more than their callers (bounded: cycles).
    const depth = new Map([...names].map((n) => [n, 0]));
    for (let round = 0; round < names.size; round++) {
      for (const e of edges) {
        if (e.Source !== e.Destination && depth.get(e.Destination) <= depth.get(e.Source)) depth.set(e.Destination, Math.min(depth.get(e.Source) + 1, names.size));
      }
    }
    const columns = new Map();
    for (const n of [...names].sort()) {
      const d = depth.get(n);
      if (!columns.has(d)) columns.set(d, []);
      columns.get(d).push(n);
    }
    const width = 960;
    const colCount = Math.max(columns.size, 1);
    const rows = Math.max(1, ...[...columns.values()].map((c) => c.length));
    const height = Math.max(160, rows * 110 + 40);
    const at = new Map();
    [...columns.keys()].sort((a, b) => a - b).forEach((d, ci) => {
      const col = columns.get(d);
      col.forEach((n, ri) => at.set(n, { x: 90 + ci * ((width - 180) / Math.max(colCount - 1, 1)), y: 60 + ri * ((height - 100) / Math.max(col.length - 1, 1)) }));
    });
    const graph = svg('svg', { class: 'topology', viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': `Service graph: ${names.size} services, ${edges.length} observed calls` });
    for (const e of edges) {
      const a = at.get(e.Source); const b = at.get(e.Destination);
      if (!a || !b) continue;
      graph.append(svg('g', { class: `edge${e.ErrorRate > 0 ? ' errors' : ''}`, 'data-edge': `${e.Source}->${e.Destination}` },
        svg('line', { x1: a.x + 28, y1: a.y, x2: b.x - 28, y2: b.y }),
        svg('text', { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 8, 'text-anchor': 'middle' }, `${e.RequestsPerSecond.toFixed(1)}/s · ${(e.ErrorRate * 100).toFixed(1)}% · p99 ${e.P99Ms ?? '–'} ms`)));
    }
    for (const n of names) {
      const p = at.get(n);
      const inbound = services.find((s) => s.Name === n);
      const cls = `node${n === selected ? ' selected' : ''}${inbound && inbound.ErrorRate > 0 ? ' errors' : ''}`;
      graph.append(svg('a', { href: `#/topology/${encodeURIComponent(n)}`, 'aria-label': n, class: cls, 'data-node': n },
        svg('circle', { cx: p.x, cy: p.y, r: 26 }),
        svg('text', { x: p.x, y: p.y + 44, 'text-anchor': 'middle' }, n)));
    }
    picture.replaceChildren(graph);
    table.replaceChildren(...edges.map((e) => h('tr', { 'data-call': `${e.Source}->${e.Destination}` },
      h('td', {}, e.Source), h('td', {}, e.Destination), h('td', { class: 'rate' }, e.RequestsPerSecond.toFixed(2)),
      h('td', {}, `${(e.ErrorRate * 100).toFixed(1)}%`), h('td', {}, e.P50Ms ?? '–'), h('td', {}, e.P99Ms ?? '–'))));
    if (!edges.length) table.append(h('tr', {}, h('td', { colspan: 6 }, 'No calls observed in the last minute.')));
    if (selected) {
      const ins = edges.filter((e) => e.Destination === selected);
      const outs = edges.filter((e) => e.Source === selected);
      const own = services.find((s) => s.Name === selected);
      details.replaceChildren(h('h2', {}, selected),
        own ? h('p', {}, `Into ${selected}: ${stats(own)}`) : null,
        h('h3', {}, 'Called by'), h('ul', { id: 'calls-in' }, ins.length ? ins.map((e) => h('li', {}, `${e.Source}: ${stats(e)}`)) : [h('li', {}, 'nobody (observed)')]),
        h('h3', {}, 'Calls'), h('ul', { id: 'calls-out' }, outs.length ? outs.map((e) => h('li', {}, `${e.Destination}: ${stats(e)}`)) : [h('li', {}, 'nothing (observed)')]));
    } else {
      details.replaceChildren();
    }
    if (data && data.Unreachable && data.Unreachable.length) {
      details.prepend(h('p', { class: 'notice' }, `Servers not answering (their sidecars' traffic is missing): ${data.Unreachable.join(', ')}`));
    }
  };
  follow('/v1/mesh/topology?window=1m', draw);
}

// ---- Routing ----------------------------------------------------------

function route() {
  page.abort();
  page = new AbortController();
  setStatus('');
  const hash = decodeURIComponent(location.hash.slice(1) || '/services');
  const [, section, ...rest] = hash.split('/');
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.section === section) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const tail = rest.join('/');
  if (section === 'services' && tail) servicePage(tail);
  else if (section === 'nodes') nodesPage();
  else if (section === 'topology') topologyPage(tail || null);
  else if (section === 'kv') (tail === '' || tail.endsWith('/') ? kvFolder(tail) : kvKey(tail));
  else if (section === 'config' && rest.length >= 2) configEntryPage(rest[0], rest.slice(1).join('/'));
  else if (section === 'config') configPage();
  else if (section === 'sidecars') sidecarsPage();
  else if (section === 'cluster') clusterPage();
  else servicesPage();
  document.title = `Meshwork · ${section || 'services'}`;
}

document.getElementById('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = document.getElementById('token');
  if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = '';
  route();
});
document.getElementById('logout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  route();
});
window.addEventListener('hashchange', route);
route();
