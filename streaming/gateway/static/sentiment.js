/* cfnesa dashboard: roles, the customer's sentiment and a call's risk. Plain functions
 * (no state of their own), a plain script loaded before the dashboard's modules (app.js and
 * the files it imports), which use them as window.cfnesaSentiment.
 *
 * Definitions (docs/gateway.md, "The dashboard"):
 * - role: an emotion event's "role" ("agent" | "customer" | "other"); null or absent is
 *   "unknown" (producers older than roles). The caller's side, whose sentiment is drawn,
 *   is "customer" and "unknown".
 * - sentiment: the event's "sentiment", in [-1, 1]; events without one add no point.
 * - trend: the mean of the last TREND_WINDOW caller-side sentiments minus the mean of
 *   the TREND_WINDOW before them (fewer when the call is short); |trend| < TREND_FLAT
 *   is "steady".
 * - open alert: an alert of a call still in progress whose seq is among the call's last
 *   OPEN_ALERT_UTTERANCES utterances (alerts are not acknowledged; they age out).
 * - risk: the open alerts' weights (high 2, medium 1, low 0.5) plus the caller's current
 *   sentiment mapped to [0, 1] ((1 - sentiment) / 2: 1 at -1, 0.5 when unknown or
 *   neutral, 0 at +1). Calls in progress are ordered by risk, highest first (ties: the
 *   order they were first seen in).
 */
'use strict';

(() => {
  const TREND_WINDOW = 5;
  const TREND_FLAT = 0.1;
  const OPEN_ALERT_UTTERANCES = 10;
  const SEVERITY_WEIGHT = { low: 0.5, medium: 1, high: 2 };
  const SVG = 'http://www.w3.org/2000/svg';

  function role(value) {
    return value === 'customer' || value === 'agent' || value === 'other' ? value : 'unknown';
  }

  const callerSide = (r) => r === 'customer' || r === 'unknown';

  function mean(values) {
    let sum = 0;
    for (const v of values) sum += v;
    return values.length ? sum / values.length : 0;
  }

  /** Recent mean minus the mean before it; 0 with fewer than two values. */
  function trend(values) {
    if (values.length < 2) return 0;
    const k = Math.min(TREND_WINDOW, Math.floor(values.length / 2));
    const recent = values.slice(values.length - k);
    const before = values.slice(Math.max(0, values.length - 2 * k), values.length - k);
    return mean(recent) - mean(before);
  }

  function trendWord(t) {
    if (typeof t !== 'number' || !Number.isFinite(t)) return { word: 'unknown', arrow: '·' };
    if (t >= TREND_FLAT) return { word: 'improving', arrow: '↗' };
    if (t <= -TREND_FLAT) return { word: 'worsening', arrow: '↘' };
    return { word: 'steady', arrow: '→' };
  }

  function sentimentWord(s) {
    if (typeof s !== 'number') return 'no sentiment yet';
    if (s >= 0.2) return 'positive';
    if (s <= -0.2) return 'negative';
    return 'neutral';
  }

  const signed = (s) => (typeof s === 'number' ? `${s > 0 ? '+' : s < 0 ? '−' : ''}${Math.abs(s).toFixed(2)}` : '–');

  /** Alerts (sorted by seq) still open at the call's newest seq. */
  function openAlerts(alerts, maxSeq, ended) {
    if (ended) return [];
    return alerts.filter((a) => a.seq > maxSeq - OPEN_ALERT_UTTERANCES);
  }

  function risk(sentimentNow, open) {
    let score = 0;
    for (const a of open) score += SEVERITY_WEIGHT[a.severity] ?? SEVERITY_WEIGHT.low;
    const s = typeof sentimentNow === 'number' ? Math.max(-1, Math.min(1, sentimentNow)) : 0;
    return score + (1 - s) / 2;
  }

  /** An inline SVG line of sentiments (oldest first) in [-1, 1], with the zero line. */
  function sparkline(values, width, height, label) {
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
    svg.setAttribute('width', String(width));
    svg.setAttribute('height', String(height));
    svg.setAttribute('class', 'spark');
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', label);
    const title = document.createElementNS(SVG, 'title');
    title.textContent = label;
    svg.appendChild(title);
    const pad = 2;
    const y = (s) => pad + ((1 - Math.max(-1, Math.min(1, s))) / 2) * (height - 2 * pad);
    const zero = document.createElementNS(SVG, 'line');
    zero.setAttribute('class', 'zero');
    zero.setAttribute('x1', '0');
    zero.setAttribute('x2', String(width));
    zero.setAttribute('y1', y(0).toFixed(1));
    zero.setAttribute('y2', y(0).toFixed(1));
    svg.appendChild(zero);
    if (!values.length) return svg;
    const step = values.length > 1 ? (width - 2 * pad) / (values.length - 1) : 0;
    const points = values.map((s, i) => `${(pad + i * step).toFixed(1)},${y(s).toFixed(1)}`);
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('class', 'line');
    line.setAttribute('points', points.join(' '));
    svg.appendChild(line);
    const last = values[values.length - 1];
    const dot = document.createElementNS(SVG, 'circle');
    dot.setAttribute('class', `dot ${last < -0.2 ? 'neg' : last > 0.2 ? 'pos' : 'mid'}`);
    dot.setAttribute('cx', (pad + (values.length - 1) * step).toFixed(1));
    dot.setAttribute('cy', y(last).toFixed(1));
    dot.setAttribute('r', '2.5');
    svg.appendChild(dot);
    return svg;
  }

  window.cfnesaSentiment = {
    TREND_WINDOW, TREND_FLAT, OPEN_ALERT_UTTERANCES, SEVERITY_WEIGHT,
    role, callerSide, trend, trendWord, sentimentWord, signed, openAlerts, risk, sparkline,
  };
})();
