import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { useApi } from '../lib/hooks.js';
import { datetime } from '../lib/format.js';
import { ErrorBox, Loading, Table } from '../components.js';

export function Audit() {
  const [befores, setBefores] = useState([]);
  const before = befores.length ? befores[befores.length - 1] : 0;
  const { data, error } = useApi(`/v1/views/audit?limit=50${before ? `&before=${before}` : ''}`);
  return html`
    <h1>Audit log</h1>
    <p class="muted">Every change made through the API (and every refused attempt), newest first. The hub keeps it
      append-only.</p>
    <${ErrorBox} error=${error} />
    ${!data && !error && html`<${Loading} what="the audit log" />`}
    ${data && html`
      <${Table} caption="Audit log" head=${['When', 'Who', 'Role', 'Call', 'Status', 'Detail', 'From']}>
        ${data.items.map((a) => html`<tr>
          <td>${datetime(a.time)}</td>
          <td>${a.actor_name || a.actor}<div class="muted mono">${a.actor}</div></td>
          <td>${a.role}</td>
          <td class="mono">${a.method} ${a.path}</td>
          <td>${a.status >= 400 ? html`<span class="bad">${a.status}</span>` : a.status}</td>
          <td class="wrap">${a.detail}</td>
          <td>${a.peer}</td>
        </tr>`)}
      <//>
      <div class="pager">
        <button type="button" class="secondary" disabled=${befores.length === 0} onClick=${() => setBefores(befores.slice(0, -1))}>Newer</button>
        <button type="button" class="secondary" disabled=${!data.next_before} onClick=${() => setBefores([...befores, data.next_before])}>Older</button>
      </div>`}`;
}
