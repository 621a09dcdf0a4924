import { html } from 'htm/preact';
import { useEffect, useState } from 'preact/hooks';
import { api } from '../lib/api.js';
import { deviceQuery, link } from '../lib/route.js';
import { count, relative } from '../lib/format.js';
import { ErrorBox, Loading, StateBadge, Table } from '../components.js';

const states = ['', 'idle', 'verifying', 'downloading', 'staging', 'installing', 'restarting', 'health_check', 'applied',
  'failed', 'rolling_back', 'rolled_back', 'refused', 'enrolled', 'decommissioned'];

function Filters({ params }) {
  const [form, setForm] = useState({});
  useEffect(() => {
    const f = {};
    for (const k of ['selector', 'state', 'online', 'bundle', 'version', 'k3s', 'q', 'cert_within_days', 'sort', 'order']) {
      f[k] = params.get(k) || '';
    }
    setForm(f);
  }, [params.toString()]);
  const set = (k) => (e) => setForm({ ...form, [k]: e.target.value });
  const submit = (e) => {
    e.preventDefault();
    window.location.hash = link('/devices', form);
  };
  const field = (k, label, props = {}) => html`<div class="field">
    <label for=${`f-${k}`}>${label}</label>
    <input id=${`f-${k}`} value=${form[k] || ''} onInput=${set(k)} ...${props} />
  </div>`;
  return html`<form class="filters" onSubmit=${submit} aria-label="Device filters">
    ${field('q', 'Hostname or id starts with', { type: 'search', placeholder: 'shop-12 or d-3f…' })}
    ${field('selector', 'Label selector', { placeholder: 'region=eu,tier!=db' })}
    <div class="field"><label for="f-state">State</label>
      <select id="f-state" value=${form.state || ''} onChange=${set('state')}>
        ${states.map((s) => html`<option value=${s}>${s ? s.replace(/_/g, ' ') : 'any'}</option>`)}
      </select></div>
    <div class="field"><label for="f-online">Presence</label>
      <select id="f-online" value=${form.online || ''} onChange=${set('online')}>
        <option value="">any</option><option value="true">online</option><option value="false">offline</option>
      </select></div>
    ${field('bundle', 'Bundle', { placeholder: 'edge-base (- = none)' })}
    ${field('version', 'Version', { inputmode: 'numeric', pattern: '[0-9]*' })}
    ${field('k3s', 'k3s version', { placeholder: 'v1.30.4+k3s1' })}
    ${field('cert_within_days', 'Cert expires within (days)', { inputmode: 'numeric', pattern: '[0-9]*' })}
    <div class="field"><label for="f-sort">Order by</label>
      <select id="f-sort" value=${form.sort || ''} onChange=${set('sort')}>
        <option value="">device id</option><option value="hostname">hostname</option>
        <option value="enrolled">enrollment time</option><option value="cert_expiry">certificate expiry</option>
      </select></div>
    <div class="field"><label for="f-order">Direction</label>
      <select id="f-order" value=${form.order || ''} onChange=${set('order')}>
        <option value="">ascending</option><option value="desc">descending</option>
      </select></div>
    <div class="field buttons">
      <button type="submit" class="primary">Apply filters</button>
      <a class="button secondary" href="#/devices">Clear</a>
    </div>
  </form>`;
}

// What the page holds, and whether the hub searched the whole fleet for it
// (a filter no index serves is searched a bounded stretch at a time).
function status(page, pageIndex) {
  const n = page.items.length;
  const where = pageIndex ? ` (page ${pageIndex + 1})` : '';
  if (n === 0 && page.complete) return `No device matches${pageIndex ? ' after the previous page' : ''}.`;
  if (n === 0) return `No match among the ${count(page.scanned)} devices searched so far; more may match further on.`;
  const more = page.complete ? '' : page.next ? ' More may follow.' : '';
  return `${count(n)} device${n === 1 ? '' : 's'} on this page${where}.${more}`;
}

export function Devices({ params }) {
  // Keyset pages: the cursors of the pages before this one, to go back.
  const [cursors, setCursors] = useState([]);
  const [page, setPage] = useState(null);
  const [error, setError] = useState(null);
  const query = deviceQuery(params);
  const after = cursors.length ? cursors[cursors.length - 1] : '';
  useEffect(() => setCursors([]), [query]);
  useEffect(() => {
    let live = true;
    setError(null);
    const qs = deviceQuery(params, after);
    api(`/v1/views/devices${qs ? `?${qs}` : ''}`).then((p) => live && setPage(p), (e) => live && (setError(e), setPage(null)));
    return () => {
      live = false;
    };
  }, [query, after]);
  return html`
    <h1>Devices</h1>
    <${Filters} params=${params} />
    <${ErrorBox} error=${error} />
    ${!page && !error && html`<${Loading} what="devices" />`}
    ${page && html`
      <p class="muted" role="status" data-testid="devices-status">${status(page, cursors.length)}</p>
      <${Table} caption="Devices" head=${['Device', 'Hostname', 'State', 'Presence', 'Bundle', 'k3s', 'Last seen', 'Last failure']}>
        ${page.items.map((d) => html`<tr>
          <td><a href=${`#/devices/${encodeURIComponent(d.id)}`}>${d.id}</a></td>
          <td>${d.hostname}</td>
          <td><${StateBadge} state=${d.state} /></td>
          <td>${d.online ? 'online' : html`<span class="offline">offline</span>`}</td>
          <td>${d.applied_bundle ? `${d.applied_bundle} v${d.applied_version}` : html`<span class="muted">none</span>`}</td>
          <td>${d.k3s_version || html`<span class="muted">–</span>`}</td>
          <td title=${d.last_seen_at}>${relative(d.last_seen_at) || html`<span class="muted">never</span>`}</td>
          <td>${d.last_reason ? html`<span class="bad">${d.last_reason}</span>` : ''}</td>
        </tr>`)}
      <//>
      <div class="pager">
        <button type="button" class="secondary" disabled=${cursors.length === 0} onClick=${() => setCursors(cursors.slice(0, -1))}>Previous page</button>
        <button type="button" class="secondary" disabled=${!page.next} onClick=${() => setCursors([...cursors, page.next])}>
          ${page.items.length === 0 && page.next ? 'Search further' : 'Next page'}</button>
      </div>`}`;
}
