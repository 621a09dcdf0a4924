import { html } from 'htm/preact';
import { useApi, useStream } from '../lib/hooks.js';
import { bytes, datetime, relative } from '../lib/format.js';
import { ErrorBox, LiveBadge, Loading, StateBadge, Table } from '../components.js';

export function Device({ id }) {
  const first = useApi(`/v1/views/devices/${encodeURIComponent(id)}`);
  const { snapshot, status } = useStream('device', id);
  const d = snapshot || first.data;
  if (!d) return first.error ? html`<h1>Device</h1><${ErrorBox} error=${first.error} />` : html`<${Loading} what="the device" />`;
  const inv = d.inventory;
  return html`
    <div class="page-head">
      <h1>Device <span class="mono">${d.id}</span></h1>
      <${LiveBadge} status=${status} />
    </div>
    ${d.last_reason && html`<div class="failure" role="note" aria-label="Last failure" data-testid="device-failure">
      <h2>Last failure: <span data-testid="device-failure-reason">${d.last_reason}</span></h2>
      <p data-testid="device-failure-message">${d.last_message}</p>
    </div>`}
    <div class="cards">
      <section class="card" aria-labelledby="d-now"><h2 id="d-now">Now</h2>
        <dl>
          <dt>State</dt><dd><${StateBadge} state=${d.state} /></dd>
          <dt>Presence</dt><dd>${d.online ? 'online' : html`<span class="offline">offline</span>`}</dd>
          <dt>Last seen</dt><dd title=${d.last_seen_at}>${relative(d.last_seen_at) || 'never'}</dd>
          <dt>Running</dt><dd>${d.applied_bundle ? `${d.applied_bundle} v${d.applied_version}` : 'no bundle yet'}</dd>
          <dt>Campaign</dt><dd>${d.campaign_id ? html`<a href=${`#/campaigns/${d.campaign_id}`}>${d.campaign_id}</a>` : '–'}</dd>
          <dt>Last report</dt><dd>#${d.last_seq}</dd>
          <dt>Project</dt><dd>${d.project}</dd>
          ${d.gateway && html`<dt>Gateway</dt><dd><a href=${`#/devices/${d.gateway}`}>${d.gateway}</a></dd>`}
        </dl>
      </section>
      <section class="card" aria-labelledby="d-inv"><h2 id="d-inv">Inventory</h2>
        <dl>
          <dt>Hostname</dt><dd>${d.hostname || '–'}</dd>
          <dt>Architecture</dt><dd>${d.arch || '–'}</dd>
          <dt>Agent</dt><dd>${d.agent_version || '–'}</dd>
          <dt>k3s</dt><dd>${d.k3s_version || 'not reported'}${d.k3s_version ? (d.node_ready ? ' · node Ready' : ' · node not Ready') : ''}</dd>
          <dt>OS</dt><dd>${inv?.os || 'not reported'}</dd>
          <dt>k3s certificate</dt><dd>${inv?.k3s_cert_expires_at ? html`expires ${relative(inv.k3s_cert_expires_at)}
            <span class="muted">(${datetime(inv.k3s_cert_expires_at)})</span>` : 'not reported'}</dd>
          <dt>Disk free</dt><dd>${bytes(inv?.disk_free_bytes)}</dd>
          <dt>Memory free</dt><dd>${bytes(inv?.mem_free_bytes)}</dd>
          <dt>Enrolled</dt><dd>${datetime(d.enrolled_at)}</dd>
        </dl>
      </section>
      <section class="card" aria-labelledby="d-labels"><h2 id="d-labels">Labels</h2>
        ${Object.keys(d.labels || {}).length === 0 ? html`<p class="muted">none</p>` :
          html`<ul class="labels">${Object.entries(d.labels).map(([k, v]) => html`<li><code>${k}=${v}</code></li>`)}</ul>`}
      </section>
    </div>
    <h2>Recent failures</h2>
    ${d.recent_failures.length === 0 ? html`<p class="muted">No failure reported (the hub keeps the last 10).</p>` :
      html`<${Table} caption="Recent failures" head=${['When', 'State', 'Reason', 'Message', 'Campaign', 'Running']}>
        ${d.recent_failures.map((o) => html`<tr>
          <td title=${o.time}>${relative(o.time)}</td>
          <td><${StateBadge} state=${o.state} /></td>
          <td>${o.reason ? html`<span class="bad">${o.reason}</span>` : ''}</td>
          <td class="wrap">${o.message}</td>
          <td>${o.campaign_id ? html`<a href=${`#/campaigns/${o.campaign_id}`}>${o.campaign_id}</a>` : ''}</td>
          <td>${o.applied_bundle ? `${o.applied_bundle} v${o.applied_version}` : ''}</td>
        </tr>`)}
      <//>`}
    <h2>Campaign history</h2>
    ${d.campaigns.length === 0 ? html`<p class="muted">This device has been in no campaign.</p>` :
      html`<${Table} caption="Campaign history" head=${['Campaign', 'Bundle', 'Wave', 'Status', 'Reason', 'Released', 'Updated']}>
        ${d.campaigns.map((c) => html`<tr>
          <td><a href=${`#/campaigns/${c.campaign_id}`}>${c.campaign_name || c.campaign_id}</a>
            <span class="muted"> (${c.campaign_state})</span></td>
          <td>${c.bundle} v${c.bundle_version}</td>
          <td>${c.wave}</td>
          <td><${StateBadge} state=${c.status} /></td>
          <td class="wrap">${c.reason ? html`<span class="bad">${c.reason}</span> ${c.message}` : ''}</td>
          <td>${relative(c.released_at)}</td>
          <td>${relative(c.updated_at)}</td>
        </tr>`)}
      <//>`}`;
}
