import { html } from 'htm/preact';
import { useApi, useStream } from '../lib/hooks.js';
import { link } from '../lib/route.js';
import { count, percent, datetime } from '../lib/format.js';
import { CountList, ErrorBox, LiveBadge, Loading } from '../components.js';

const dev = (params) => link('/devices', params);

function Card({ title, children, id }) {
  return html`<section class="card" aria-labelledby=${id}><h2 id=${id}>${title}</h2>${children}</section>`;
}

export function Fleet() {
  // The first answer by request, then the stream's snapshots.
  const first = useApi('/v1/views/fleet');
  const { snapshot, status } = useStream('fleet');
  const f = snapshot || first.data;
  if (!f) return first.error ? html`<${ErrorBox} error=${first.error} />` : html`<${Loading} what="the fleet" />`;
  const total = f.total;
  // Two expiries, counted the same way (fleet_counts, by UTC day): the k3s
  // serving certificate each agent reports in its inventory, and the broker
  // client certificate the hub's device CA issued (each device's latest
  // unrevoked one; agents renew it by themselves at 55-66 % of its lifetime,
  // so one that comes close to its end belongs to a device that is away).
  const certs = f.certificates;
  const broker = f.broker_certificates || { expired: 0, within_7_days: 0, within_30_days: 0, later: 0, none: total };
  return html`
    <div class="page-head">
      <h1>Fleet</h1>
      <${LiveBadge} status=${status} />
    </div>
    <p class="muted">Counted by the hub${f.project !== '*' ? ` for project ${f.project}` : ''} at ${datetime(f.generated_at)}.
      Every figure links to the devices it counts.</p>
    <div class="cards">
      <${Card} title="Devices" id="c-devices">
        <p class="big"><a href=${dev({})} data-testid="fleet-total">${count(total)}</a></p>
        <ul class="pairs">
          <li><a href=${dev({ online: 'true' })}>Online <strong data-testid="fleet-online">${count(f.online)}</strong></a>
            <span class="muted">${percent(f.online, total)}</span></li>
          <li><a href=${dev({ online: 'false' })}>Offline <strong data-testid="fleet-offline">${count(f.offline)}</strong></a>
            <span class="muted">${percent(f.offline, total)}</span></li>
          ${f.decommissioned > 0 && html`<li><a href=${dev({ state: 'decommissioned' })}>Decommissioned
            <strong>${count(f.decommissioned)}</strong></a></li>`}
        </ul>
      <//>
      <${Card} title="By state" id="c-state">
        <${CountList} items=${f.states.items} total=${total} href=${(v) => dev({ state: v })} />
      <//>
      <${Card} title="Bundle version" id="c-version">
        <${CountList} items=${f.versions.items} total=${total}
          name=${(v) => v || 'none applied'}
          href=${(v) => {
            if (!v) return dev({ bundle: '-' });
            const i = v.lastIndexOf(':');
            return dev({ bundle: v.slice(0, i), version: v.slice(i + 1) });
          }} />
      <//>
      <${Card} title="k3s version" id="c-k3s">
        <${CountList} items=${f.k3s_versions.items} total=${total} name=${(v) => v || 'not reported'}
          href=${(v) => dev({ k3s: v || '-' })} />
      <//>
      <${Card} title="Certificates (k3s serving)" id="c-certs">
        <ul class="pairs">
          <li><a href=${dev({ cert_within_days: 0 })}>Expired <strong class=${certs.expired ? 'bad' : ''}>${count(certs.expired)}</strong></a></li>
          <li><a href=${dev({ cert_within_days: 7 })}>Within 7 days <strong class=${certs.within_7_days ? 'warn' : ''}>${count(certs.within_7_days)}</strong></a></li>
          <li><a href=${dev({ cert_within_days: 30 })}>Within 30 days <strong>${count(certs.within_30_days)}</strong></a></li>
          <li><a href=${dev({ sort: 'cert_expiry' })}>Later <strong>${count(certs.later)}</strong></a></li>
          <li>Not reported <strong>${count(certs.not_reported)}</strong></li>
        </ul>
        <p class="muted small">The k3s serving certificate each agent reports. Devices' broker certificates are counted in their own card.</p>
      <//>
      <${Card} title="Broker certificates" id="c-broker-certs">
        <ul class="pairs">
          <li>Expired <strong class=${broker.expired ? 'bad' : ''} data-testid="broker-certs-expired">${count(broker.expired)}</strong></li>
          <li>Within 7 days <strong class=${broker.within_7_days ? 'warn' : ''} data-testid="broker-certs-7">${count(broker.within_7_days)}</strong></li>
          <li>Within 30 days <strong data-testid="broker-certs-30">${count(broker.within_30_days)}</strong></li>
          <li>Later <strong data-testid="broker-certs-later">${count(broker.later)}</strong></li>
          <li>None <strong data-testid="broker-certs-none">${count(broker.none)}</strong></li>
        </ul>
        <p class="muted small">Each device's broker client certificate from the hub's device CA. Agents renew theirs before two thirds of its lifetime; "none" are devices behind a gateway or still on a password.</p>
      <//>
      <${Card} title="Regions" id="c-region">
        <${CountList} items=${f.regions.items} total=${total} empty="No device has a region label."
          href=${(v) => dev({ selector: `region=${v}` })} />
      <//>
      <${Card} title="Cells" id="c-cell">
        <${CountList} items=${f.cells.items} total=${total} empty="No device has a cell label."
          href=${(v) => dev({ selector: `cell=${v}` })} />
      <//>
      <${Card} title="Agent version" id="c-agent">
        <${CountList} items=${f.agent_versions.items} total=${total} name=${(v) => v || 'not reported'}
          href=${() => dev({})} />
      <//>
    </div>`;
}
