// Shared pieces of the pages.
import { html } from 'htm/preact';
import { useEffect, useRef } from 'preact/hooks';
import { count, percent, segments } from './lib/format.js';

export function ErrorBox({ error }) {
  if (!error) return null;
  return html`<p class="error" role="alert">${error.message || String(error)}</p>`;
}

export function Loading({ what }) {
  return html`<p class="muted" role="status">Loading ${what}…</p>`;
}

// Whether the page follows the hub live (announced politely to screen readers).
export function LiveBadge({ status }) {
  const text = { live: 'Live', connecting: 'Connecting…', reconnecting: 'Reconnecting…', ended: 'Not live' }[status] ||
    status;
  return html`<span class=${`live live-${status}`} role="status" aria-live="polite" data-testid="live-status">${text}</span>`;
}

export function StateBadge({ state }) {
  return html`<span class=${`badge state-${state}`}>${state ? state.replace(/_/g, ' ') : '–'}</span>`;
}

// A measured progress bar: each segment is a count the hub reported, never an
// estimate. The numbers are also in the label for screen readers.
export function ProgressBar({ counts, label }) {
  const total = counts?.total || 0;
  const segs = segments(counts).filter((s) => s.n > 0);
  const text = total === 0 ? 'no devices' :
    segs.map((s) => `${count(s.n)} ${s.label}`).join(', ') + ` of ${count(total)}`;
  return html`
    <div class="progress" role="img" aria-label=${`${label ? `${label}: ` : ''}${text}`}>
      ${segs.map((s) => html`<span class=${`seg seg-${s.key}`} style=${{ width: `${(100 * s.n) / total}%` }}></span>`)}
    </div>`;
}

export function Legend() {
  return html`<ul class="legend" aria-hidden="true">
    ${segments({}).map((s) => html`<li><span class=${`swatch seg-${s.key}`}></span>${s.label}</li>`)}
  </ul>`;
}

// Bars of a fleet dimension; each row a link to the filtered device list.
export function CountList({ items, total, href, name, empty }) {
  if (!items || items.length === 0) return html`<p class="muted">${empty || 'none reported'}</p>`;
  return html`<ul class="counts">
    ${items.map((it) => html`<li>
      <a href=${href(it.value)}>
        <span class="count-name">${name ? name(it.value) : it.value}</span>
        <span class="count-bar" aria-hidden="true"><span style=${{ width: `${total ? (100 * it.count) / total : 0}%` }}></span></span>
        <span class="count-n">${count(it.count)}<span class="sr-only"> devices, ${percent(it.count, total)}</span></span>
      </a></li>`)}
  </ul>`;
}

// A modal confirmation that says what will happen; Escape or Cancel closes it.
export function Confirm({ open, title, children, confirmLabel, danger, onConfirm, onCancel, busy }) {
  const ref = useRef(null);
  useEffect(() => {
    const d = ref.current;
    if (!d) return;
    if (open && !d.open) d.showModal();
    if (!open && d.open) d.close();
  }, [open]);
  return html`
    <dialog ref=${ref} class="confirm" aria-labelledby="confirm-title" onCancel=${(e) => { e.preventDefault(); onCancel(); }}>
      <form method="dialog" onSubmit=${(e) => { e.preventDefault(); onConfirm(); }}>
        <h2 id="confirm-title">${title}</h2>
        <div class="confirm-body">${children}</div>
        <div class="actions">
          <button type="button" class="secondary" onClick=${onCancel} disabled=${busy}>Cancel</button>
          <button type="submit" class=${danger ? 'danger' : 'primary'} disabled=${busy}>${confirmLabel}</button>
        </div>
      </form>
    </dialog>`;
}

export function Table({ caption, children, head }) {
  return html`<div class="table-wrap" tabindex="0" role="region" aria-label=${caption}>
    <table>
      <caption class="sr-only">${caption}</caption>
      <thead><tr>${head.map((h) => html`<th scope="col">${h}</th>`)}</tr></thead>
      <tbody>${children}</tbody>
    </table>
  </div>`;
}
