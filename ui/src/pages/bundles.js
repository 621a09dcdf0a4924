import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { useApi } from '../lib/hooks.js';
import { datetime, relative } from '../lib/format.js';
import { ErrorBox, Loading, Table } from '../components.js';

export function Bundles() {
  const [cursors, setCursors] = useState([]);
  const after = cursors.length ? cursors[cursors.length - 1] : '';
  const { data, error } = useApi(`/v1/views/bundles?limit=50${after ? `&after=${encodeURIComponent(after)}` : ''}`);
  return html`
    <h1>Bundles</h1>
    <p class="muted">Signed bundles the hub holds, newest first. Devices check every signature themselves against the keys
      pinned on them; an expired bundle is refused by every device.</p>
    <${ErrorBox} error=${error} />
    ${!data && !error && html`<${Loading} what="bundles" />`}
    ${data && data.items.length === 0 && html`<p class="muted">No bundle uploaded yet (<code>flotilla bundle push</code>).</p>`}
    ${data && data.items.length > 0 && html`
      <${Table} caption="Bundles" head=${['Bundle', 'Version', 'Channel', 'Signatures', 'Expires', 'Uploaded', 'Id']}>
        ${data.items.map((b) => html`<tr>
          <td>${b.name}</td>
          <td>${b.version}</td>
          <td>${b.channel}</td>
          <td>${b.signatures}</td>
          <td title=${datetime(b.expires_at)}>${b.expired ? html`<span class="bad">expired ${relative(b.expires_at)}</span>` :
            b.expires_in_s < 7 * 86400 ? html`<span class="warn">${relative(b.expires_at)}</span>` : relative(b.expires_at)}</td>
          <td title=${datetime(b.uploaded_at)}>${relative(b.uploaded_at)}</td>
          <td class="mono">${b.id}</td>
        </tr>`)}
      <//>
      <div class="pager">
        <button type="button" class="secondary" disabled=${cursors.length === 0} onClick=${() => setCursors(cursors.slice(0, -1))}>Previous page</button>
        <button type="button" class="secondary" disabled=${!data.next} onClick=${() => setCursors([...cursors, data.next])}>Next page</button>
      </div>`}`;
}
