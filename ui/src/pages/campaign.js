import { html } from 'htm/preact';
import { useEffect, useState } from 'preact/hooks';
import { api } from '../lib/api.js';
import { useApi, useStream } from '../lib/hooks.js';
import { count, percent, relative } from '../lib/format.js';
import { Confirm, ErrorBox, Legend, LiveBadge, Loading, ProgressBar, StateBadge, Table } from '../components.js';
import { Timeline } from '../timeline.js';

// What each action does, in the words of the engine (campaign_engine.cpp).
function explain(action, c) {
  const n = c.counts;
  const inFlight = n.pending + n.in_progress;
  const bundle = `${c.bundle.name} v${c.bundle.version}`;
  switch (action) {
    case 'pause':
      return { label: 'Pause campaign', title: 'Pause this campaign?',
        text: `The hub stops releasing devices. The ${count(inFlight)} device(s) applying now finish; nothing is rolled back. Resume it later to carry on.` };
    case 'resume':
      return { label: 'Resume campaign', title: 'Resume this campaign?',
        text: `The hub releases devices again. The ${count(n.failed)} failure(s) so far are accepted: the failure threshold judges only what happens from now on.` };
    case 'approve': {
      const next = c.waves.find((w) => w.name === c.waiting_for_approval);
      return { label: `Approve ${c.waiting_for_approval}`, title: `Approve ${c.waiting_for_approval}?`,
        text: `The gate opens: the hub starts releasing the ${count(next ? next.counts.waiting : n.waiting)} device(s) of ${c.waiting_for_approval}. A later gate waits for approval again.` };
    }
    case 'abort':
      return { label: 'Abort campaign', title: 'Abort this campaign?', danger: true,
        text: `The ${count(n.waiting)} device(s) not yet released are skipped and never get ${bundle}. The ${count(n.applied)} device(s) that applied it keep it. An aborted campaign cannot be resumed.` };
    case 'rollback':
      return { label: 'Roll back campaign', title: 'Roll this campaign back?', danger: true,
        text: `The ${count(n.applied + inFlight)} device(s) that took (or are taking) ${bundle} are sent back to the bundle each ran before; the ${count(n.waiting)} waiting device(s) are skipped. Devices that failed already restored their previous state. This cannot be undone.` };
    default:
      return { label: action, title: action, text: '' };
  }
}

const buttonName = { pause: 'Pause', resume: 'Resume', approve: 'Approve', abort: 'Abort', rollback: 'Roll back' };

function Actions({ c, onDone }) {
  const [pending, setPending] = useState(null);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  // What the last action did, shown while the campaign is still in that state.
  const [done, setDone] = useState(null);
  if (c.actions.length === 0) return null;
  const info = pending ? explain(pending, c) : null;
  const run = async () => {
    setBusy(true);
    setError(null);
    try {
      const after = await api(`/v1/campaigns/${encodeURIComponent(c.id)}/${pending}`, { method: 'POST' });
      setDone({ state: after.state, text: `Done: the campaign is ${after.state.replace(/_/g, ' ')}.` });
      onDone();
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
      setPending(null);
    }
  };
  return html`<section class="campaign-actions" aria-label="Campaign actions">
    ${c.actions.map((a) => html`<button type="button" class=${a === 'abort' || a === 'rollback' ? 'danger' : 'primary'}
      onClick=${() => { setDone(null); setPending(a); }}>${a === 'approve' ? `Approve ${c.waiting_for_approval}` : buttonName[a]}</button>`)}
    <${ErrorBox} error=${error} />
    ${done && done.state === c.state && html`<p class="notice" role="status">${done.text}</p>`}
    <${Confirm} open=${!!pending} title=${info?.title} confirmLabel=${info?.label} danger=${info?.danger} busy=${busy}
      onConfirm=${run} onCancel=${() => setPending(null)}>
      <p>${info?.text}</p>
    <//>
  </section>`;
}

function Counts({ n }) {
  const rows = [['applied', n.applied], ['failed', n.failed], ['rollback failed', n.rollback_failed],
    ['rolled back', n.rolled_back], ['rolling back', n.rolling_back], ['in progress', n.in_progress],
    ['pending', n.pending], ['waiting', n.waiting], ['superseded', n.superseded], ['skipped', n.skipped],
    ['offline (unfinished)', n.offline]];
  return html`<dl class="counts-grid" data-testid="campaign-counts">
    <div><dt>total</dt><dd data-testid="count-total">${count(n.total)}</dd></div>
    ${rows.map(([k, v]) => html`<div class=${v ? '' : 'zero'}><dt>${k}</dt>
      <dd data-testid=${`count-${k.replace(/[ ()]+/g, '-').replace(/-$/, '')}`}>${count(v)}</dd></div>`)}
  </dl>`;
}

export function Campaign({ me, id }) {
  const first = useApi(`/v1/views/campaigns/${encodeURIComponent(id)}`);
  const tl = useApi(`/v1/views/campaigns/${encodeURIComponent(id)}/timeline`);
  const { snapshot, status } = useStream('campaign', id);
  const [points, setPoints] = useState([]);
  const c = snapshot || first.data;
  useEffect(() => {
    if (tl.data) setPoints(tl.data.points);
  }, [tl.data]);
  // The live counts extend the sampled timeline.
  useEffect(() => {
    const s = snapshot?.sample;
    if (!s) return;
    setPoints((p) => (p.length && p[p.length - 1].t >= s.t ? p : [...p, s].slice(-2000)));
  }, [snapshot]);
  if (!c) return first.error ? html`<h1>Campaign</h1><${ErrorBox} error=${first.error} />` : html`<${Loading} what="the campaign" />`;
  const n = c.counts;
  return html`
    <div class="page-head">
      <h1>${c.name || 'Campaign'} <span class="mono muted">${c.id}</span></h1>
      <${LiveBadge} status=${status} />
    </div>
    <p class="state-line"><span data-testid="campaign-state"><${StateBadge} state=${c.state} /></span>
      ${c.state_reason && html` <span data-testid="campaign-reason">${c.state_reason}</span>`}
      ${c.waiting_for_approval && !c.state_reason && html` <strong>${c.waiting_for_approval} waits for approval.</strong>`}</p>
    <p class="muted">${c.bundle.name} v${c.bundle.version} (${c.bundle.channel}) to <code>${c.selector || 'every device'}</code>,
      created ${relative(c.created_at)}, project ${c.project}${c.rate_per_minute ? `, at most ${Math.round(c.rate_per_minute)} devices a minute now` : ''}.</p>
    ${me.may.campaign_actions && html`<${Actions} c=${c} onDone=${first.reload} />`}
    <section aria-labelledby="h-progress">
      <h2 id="h-progress">Progress</h2>
      <p><strong data-testid="progress-text">${count(n.applied)} of ${count(n.total)} applied</strong>${' '}
        (${percent(n.applied, n.total)})${n.failed ? html`, <span class="bad">${count(n.failed)} failed</span>` : ''}.
        Measured from the devices' reports.</p>
      <${ProgressBar} counts=${n} label="Whole campaign" />
      <${Legend} />
      <${Counts} n=${n} />
    </section>
    <section aria-labelledby="h-waves">
      <h2 id="h-waves">Waves</h2>
      <ol class="waves">
        ${c.waves.map((w) => html`<li class=${`wave wave-${w.state}`}>
          <div class="wave-head"><strong>${w.name}</strong> <span class="muted">${w.state}${w.needs_approval ? ', needs approval' : ''}</span>
            <span class="wave-n">${count(w.counts.applied)} / ${count(w.counts.total)} applied${w.counts.failed ? `, ${count(w.counts.failed)} failed` : ''}${w.counts.offline ? `, ${count(w.counts.offline)} offline` : ''}</span></div>
          <${ProgressBar} counts=${w.counts} label=${w.name} />
        </li>`)}
      </ol>
    </section>
    <section aria-labelledby="h-timeline">
      <h2 id="h-timeline">Timeline</h2>
      ${points.length === 0 ? html`<p class="muted">No samples yet.</p>` : html`<${Timeline} points=${points} />`}
    </section>
    <section aria-labelledby="h-failures">
      <h2 id="h-failures">Failures</h2>
      ${c.failure_groups.length === 0 ? html`<p class="muted">No device failed.</p>` :
        html`<${Table} caption="Failures by reason" head=${['Reason', 'Devices', 'First devices']}>
          ${c.failure_groups.map((g) => html`<tr>
            <td><span class="bad" data-testid="failure-reason">${g.reason}</span></td>
            <td>${count(g.count)}</td>
            <td><ul class="first">${g.first.map((d) => html`<li><a href=${`#/devices/${encodeURIComponent(d.device_id)}`}>${d.device_id}</a>
              ${d.message && html`<span class="muted"> ${d.message}</span>`}</li>`)}</ul></td>
          </tr>`)}
        <//>`}
    </section>
    ${c.away.length > 0 && html`<section aria-labelledby="h-away">
      <h2 id="h-away">Offline, not finished</h2>
      <p class="muted">Offline devices neither stall nor fail a wave; they finish when they come back. The first ${c.away.length}:</p>
      <ul class="first inline">${c.away.map((d) => html`<li><a href=${`#/devices/${encodeURIComponent(d)}`}>${d}</a></li>`)}</ul>
    </section>`}`;
}
