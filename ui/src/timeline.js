// The campaign's applied and failed devices over time, from the hub's samples
// (and the live counts after them). The chart is a picture for sighted
// users; the same numbers are in a table below it.
import { html } from 'htm/preact';
import { useEffect, useRef } from 'preact/hooks';
import uPlot from 'uplot';
import { count, datetime } from './lib/format.js';

const steps = uPlot.paths.stepped({ align: 1 });

function columns(points) {
  return [
    points.map((p) => p.t / 1000),
    points.map((p) => p.applied),
    points.map((p) => p.failed),
    points.map((p) => p.in_flight),
  ];
}

export function Timeline({ points }) {
  const box = useRef(null);
  const plot = useRef(null);
  useEffect(() => {
    const el = box.current;
    if (!el) return undefined;
    const width = () => Math.max(280, el.clientWidth);
    plot.current = new uPlot({
      width: width(),
      height: 240,
      scales: { x: { time: true } },
      axes: [{ space: 90 }, { label: 'devices' }],
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
      // Steps, not slopes: a count holds until the next sample says otherwise.
      series: [
        {},
        { label: 'applied', stroke: '#1b7a3a', width: 2, paths: steps },
        { label: 'failed', stroke: '#b3261e', width: 2, paths: steps },
        { label: 'in flight', stroke: '#1f5fa8', width: 1, dash: [6, 4], paths: steps },
      ],
    }, columns(points), el);
    const ro = new ResizeObserver(() => plot.current && plot.current.setSize({ width: width(), height: 240 }));
    ro.observe(el);
    return () => {
      ro.disconnect();
      plot.current.destroy();
      plot.current = null;
    };
  }, []);
  useEffect(() => {
    if (plot.current) plot.current.setData(columns(points));
  }, [points]);
  const recent = points.slice(-8).reverse();
  return html`<div class="timeline">
    <div ref=${box} class="chart" aria-hidden="true" data-testid="timeline-chart"></div>
    <details>
      <summary>The timeline as a table (${count(points.length)} points)</summary>
      <table>
        <caption class="sr-only">Applied and failed devices over time, newest first</caption>
        <thead><tr><th scope="col">Time</th><th scope="col">Applied</th><th scope="col">Failed</th><th scope="col">In flight</th></tr></thead>
        <tbody>${recent.map((p) => html`<tr><td>${datetime(new Date(p.t).toISOString())}</td><td>${count(p.applied)}</td>
          <td>${count(p.failed)}</td><td>${count(p.in_flight)}</td></tr>`)}</tbody>
      </table>
    </details>
  </div>`;
}
