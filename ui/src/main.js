// The Flotilla dashboard: sign in with an API token, then the fleet, its
// devices, campaigns, bundles and (for admins) the audit log. Every figure
// comes from the hub's aggregates; pages follow the hub over one event
// stream each.
import { html } from 'htm/preact';
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import 'uplot/dist/uPlot.min.css';
import './style.css';

import { api, hasToken, onSignedOut, setToken, signOut } from './lib/api.js';
import { parseHash } from './lib/route.js';
import { SignIn } from './pages/signin.js';
import { Fleet } from './pages/fleet.js';
import { Devices } from './pages/devices.js';
import { Device } from './pages/device.js';
import { Campaigns } from './pages/campaigns.js';
import { Campaign } from './pages/campaign.js';
import { Bundles } from './pages/bundles.js';
import { Audit } from './pages/audit.js';
import { Cells } from './pages/cells.js';

function useHash() {
  const [hash, setHash] = useState(window.location.hash);
  useEffect(() => {
    const f = () => setHash(window.location.hash);
    window.addEventListener('hashchange', f);
    return () => window.removeEventListener('hashchange', f);
  }, []);
  return hash;
}

function Nav({ me, current }) {
  const items = [
    ['fleet', 'Fleet'],
    ['devices', 'Devices'],
    ['campaigns', 'Campaigns'],
    ['bundles', 'Bundles'],
  ];
  if (me.may.cells) items.push(['cells', 'Cells']);
  if (me.may.audit) items.push(['audit', 'Audit log']);
  return html`<nav aria-label="Main">
    <ul>${items.map(([k, label]) => html`<li>
      <a href=${`#/${k}`} aria-current=${current === k || (k === 'devices' && current === 'device') ||
        (k === 'campaigns' && current === 'campaign') ? 'page' : undefined}>${label}</a></li>`)}
    </ul>
  </nav>`;
}

function Page({ me, route }) {
  const [a, b] = route.parts;
  if (a === 'devices' && b) return html`<${Device} me=${me} id=${b} />`;
  if (a === 'devices') return html`<${Devices} me=${me} params=${route.params} />`;
  if (a === 'campaigns' && b) return html`<${Campaign} me=${me} id=${b} key=${b} />`;
  if (a === 'campaigns') return html`<${Campaigns} me=${me} params=${route.params} />`;
  if (a === 'bundles') return html`<${Bundles} me=${me} />`;
  if (a === 'cells' && me.may.cells) return html`<${Cells} />`;
  if (a === 'audit' && me.may.audit) return html`<${Audit} me=${me} />`;
  return html`<${Fleet} me=${me} />`;
}

function App() {
  const hash = useHash();
  const [me, setMe] = useState(null);
  const [checking, setChecking] = useState(hasToken());
  const [notice, setNotice] = useState('');

  useEffect(() => onSignedOut((reason) => {
    setMe(null);
    setNotice(reason || '');
  }), []);

  // A token kept from earlier in this tab: ask the hub who it is.
  useEffect(() => {
    if (!hasToken()) return;
    api('/v1/whoami').then((w) => setMe(w), () => setMe(null)).finally(() => setChecking(false));
  }, []);

  const route = parseHash(hash);
  const current = route.parts[0] === 'devices' && route.parts[1] ? 'device' :
    route.parts[0] === 'campaigns' && route.parts[1] ? 'campaign' : route.parts[0] || 'fleet';

  useEffect(() => {
    const titles = { fleet: 'Fleet', devices: 'Devices', device: 'Device', campaigns: 'Campaigns', campaign: 'Campaign',
      bundles: 'Bundles', audit: 'Audit log' };
    document.title = me ? `${titles[current] || 'Fleet'} · Flotilla` : 'Sign in · Flotilla';
  }, [current, me]);

  if (checking) return html`<main id="main"><p role="status">Checking your session…</p></main>`;
  if (!me) {
    return html`<${SignIn} notice=${notice} onSignedIn=${(token, w) => {
      setToken(token);
      setNotice('');
      setMe(w);
    }} />`;
  }
  return html`
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.getElementById('main')?.focus(); }}>Skip to content</a>
    <header class="top">
      <a class="brand" href="#/fleet">Flotilla</a>
      <${Nav} me=${me} current=${current} />
      <div class="who">
        <span data-testid="whoami">${me.name} · ${me.role}${me.project !== '*' ? ` · project ${me.project}` : ''}</span>
        <button type="button" class="secondary" onClick=${() => signOut('')}>Sign out</button>
      </div>
    </header>
    <main id="main" tabindex="-1"><${Page} me=${me} route=${route} /></main>`;
}

render(html`<${App} />`, document.getElementById('app'));
