import { html } from 'htm/preact';
import { useEffect } from 'preact/hooks';
import { useApi } from '../lib/hooks.js';
import { count } from '../lib/format.js';
import { ErrorBox, Loading, Table } from '../components.js';

// The hub's cells (GET /v1/cells): each cell's broker and whether it is up,
// whether it drains, and its devices (of the caller's project). Read only:
// draining moves every project's devices and stays with the CLI and the API
// listener (flotilla cell drain / undrain).
const brokerText = {
  up: ['up', ''],
  restarting: ['restarting', 'warn'],
  external: ['external', 'muted'],
};

export function Cells() {
  const { data, error, reload } = useApi('/v1/cells');
  // Broker restarts and drains change by the second: read again every 5 s.
  useEffect(() => {
    const t = setInterval(reload, 5000);
    return () => clearInterval(t);
  }, [reload]);
  const items = data ? data.items : [];
  return html`
    <h1>Cells</h1>
    <p class="muted">A cell is one MQTT broker and the hub's controller for the devices on it. New devices join the
      least loaded cell that is not draining. Draining a cell moves its devices to the others
      (<code>flotilla cell drain ID</code>; <code>flotilla cell undrain ID</code> stops it). Device counts are of
      your project.</p>
    <${ErrorBox} error=${error} />
    ${!data && !error && html`<${Loading} what="cells" />`}
    ${data && html`
      <${Table} caption="Cells" head=${['Cell', 'Broker', 'Broker URL devices are told', 'Draining', 'Devices', 'Online']}>
        ${items.map((c) => {
          const [text, cls] = brokerText[c.broker] || [c.broker, 'bad'];
          return html`<tr data-testid=${`cell-${c.id}`}>
            <td>${c.id}</td>
            <td><span class=${cls}>${text}</span></td>
            <td class="mono">${c.broker_url}</td>
            <td>${c.draining ? html`<span class="warn">draining</span>` : 'no'}</td>
            <td>${count(c.devices_total)}</td>
            <td>${count(c.devices_online)}</td>
          </tr>`;
        })}
      <//>`}`;
}
