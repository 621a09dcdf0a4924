import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { useApi, useStream } from '../lib/hooks.js';
import { link } from '../lib/route.js';
import { count, percent, relative } from '../lib/format.js';
import { ErrorBox, Legend, LiveBadge, Loading, ProgressBar, StateBadge, Table } from '../components.js';

const states = ['', 'running', 'waiting_approval', 'converging', 'paused', 'completed', 'aborted', 'rolling_back', 'rolled_back'];

export function Campaigns({ params }) {
  const state = params.get('state') || '';
  const [cursors, setCursors] = useState([]);
  const after = cursors.length ? cursors[cursors.length - 1] : '';
  const q = new URLSearchParams();
  if (state) q.set('state', state);
  if (after) q.set('after', after);
  q.set('limit', '20');
  const first = useApi(`/v1/views/campaigns?${q}`);
  // The stream carries the newest 20 campaigns: live rows replace the page's rows by id.
  const { snapshot, status } = useStream('campaigns');
  const live = new Map((snapshot?.items || []).map((c) => [c.id, c]));
  const page = first.data;
  return html`
    <div class="page-head"><h1>Campaigns</h1><${LiveBadge} status=${status} /></div>
    <form class="filters" aria-label="Campaign filter" onSubmit=${(e) => e.preventDefault()}>
      <div class="field"><label for="cs-state">State</label>
        <select id="cs-state" value=${state} onChange=${(e) => { setCursors([]); window.location.hash = link('/campaigns', { state: e.target.value }); }}>
          ${states.map((s) => html`<option value=${s}>${s ? s.replace(/_/g, ' ') : 'any'}</option>`)}
        </select></div>
    </form>
    <${ErrorBox} error=${first.error} />
    ${!page && !first.error && html`<${Loading} what="campaigns" />`}
    ${page && page.items.length === 0 && html`<p class="muted">No campaign${state ? ` is ${state}` : ''}.</p>`}
    ${page && page.items.length > 0 && html`
      <${Legend} />
      <${Table} caption="Campaigns" head=${['Campaign', 'State', 'Bundle', 'Progress', 'Applied', 'Failed', 'Created']}>
        ${page.items.map((c0) => {
          const c = live.get(c0.id) || c0;
          return html`<tr>
            <td><a href=${`#/campaigns/${c.id}`}>${c.name || c.id}</a><div class="muted mono">${c.id}</div></td>
            <td><${StateBadge} state=${c.state} /></td>
            <td>${c.bundle.name} v${c.bundle.version}</td>
            <td class="progress-cell"><${ProgressBar} counts=${c.counts} label=${c.name || c.id} /></td>
            <td>${count(c.counts.applied)} <span class="muted">${percent(c.counts.applied, c.counts.total)}</span></td>
            <td>${c.counts.failed + c.counts.rollback_failed > 0 ? html`<span class="bad">${count(c.counts.failed + c.counts.rollback_failed)}</span>` : '0'}</td>
            <td title=${c.created_at}>${relative(c.created_at)}</td>
          </tr>`;
        })}
      <//>
      <div class="pager">
        <button type="button" class="secondary" disabled=${cursors.length === 0} onClick=${() => setCursors(cursors.slice(0, -1))}>Previous page</button>
        <button type="button" class="secondary" disabled=${!page.next} onClick=${() => setCursors([...cursors, page.next])}>Next page</button>
      </div>`}`;
}
