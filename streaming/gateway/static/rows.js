/* cfnesa dashboard: the call lists. One row per call (state, role and emotion chips,
 * sentiment sparkline, emotion timeline, latest shift, alert badge, summary), the
 * filter, the order (risk by default, re-sorted at most every CONFIG.sortEveryMs) and
 * the counters. Also the pieces the detail panel and the agent view draw the same way
 * (role chip, sparkline, summary line).
 */

import { el, h, emoClass } from './dom.js';
import { pct, num2, duration, plural, speakerOrder, alertText } from './format.js';
import {
  CONFIG, calls, ui, endedOrder, alertsTotal, callerTrend, riskOf,
} from './store.js';

const S = window.cfnesaSentiment;
const SPARK_POINTS = 40;   // caller-side sentiments drawn per row

function createRow(call) {
  const row = h('li', 'call');
  row.tabIndex = 0;
  row.dataset.id = call.id;
  row.setAttribute('aria-current', 'false');
  const id = h('div', 'c-id');
  const name = h('span', 'id', call.id);
  name.title = call.id;
  const state = h('span', 'state', 'live');
  id.append(name, state);
  const chips = h('div', 'c-chips');
  const spark = h('div', 'c-spark');
  const timeline = h('div', 'c-timeline');
  timeline.setAttribute('aria-hidden', 'true'); // the chips and the detail panel say it in words
  const shift = h('div', 'c-shift');
  shift.title = 'latest shift probability (vs the speaker\'s previous utterance)';
  const shiftVal = h('span', 'val', '–');
  shift.append(h('span', 'lbl', 'shift '), shiftVal);
  const alerts = h('div', 'c-alerts');
  const summary = h('div', 'c-summary');
  summary.hidden = true;
  row.append(id, chips, spark, timeline, shift, alerts, summary);
  call.view = {
    row, state, chips, spark, timeline, shiftVal, alerts, summary,
    cells: [], cellSeqs: [], version: -1, ended: false, flashOdd: false, idle: false,
  };
  row.hidden = !visible(call);
  if (call.ended) {
    el.ended.prepend(row);
  } else {
    el.active.appendChild(row);
  }
  if (call.id === ui.selectedId) markSelected(row, true);
  ui.countersDirty = true;
}

/** Bring a call's row up to date with the call (creating it on first use). */
export function renderCall(call) {
  if (!calls.has(call.id)) return;
  if (!call.view) createRow(call);
  const v = call.view;
  if (call.ended && !v.ended) {
    v.ended = true;
    v.row.classList.add('ended');
    v.state.textContent = 'ended';
    el.ended.prepend(v.row);
    renderSummaryLine(call);
    ui.countersDirty = true;
  } else if (call.ended) {
    renderSummaryLine(call);
  }
  if (call.idle !== v.idle && !call.ended) {
    v.idle = call.idle;
    v.row.classList.toggle('idle', call.idle);
    v.state.textContent = call.idle ? 'idle' : 'live';
  }
  if (call.chipsDirty) {
    call.chipsDirty = false;
    const chips = [];
    for (const spk of [...call.speakers.keys()].sort(speakerOrder)) {
      const s = call.speakers.get(spk);
      const chip = h('span', `chip ${emoClass(s.emotion)}`);
      chip.append(h('span', 'spk', `${spk}:`), ` ${s.emotion}`);
      chip.title = `${spk}: ${s.emotion} (${pct(s.confidence)})`;
      // a speaker's role and emotion stay together when the chips wrap
      const group = h('span', 'spk-group');
      group.append(roleChip(spk, call.roles.get(spk)), chip);
      chips.push(group);
    }
    v.chips.replaceChildren(...chips);
  }
  if (call.sparkDirty) {
    call.sparkDirty = false;
    v.spark.replaceChildren(sparkOf(call, 96, 24));
    const now = call.sentiment[call.sentiment.length - 1].s;
    v.row.dataset.sentiment = now.toFixed(2);
  }
  renderTimeline(call);
  const shiftText = num2(call.lastShift);
  if (v.shiftVal.textContent !== shiftText) {
    v.shiftVal.textContent = shiftText;
    v.shiftVal.classList.toggle('high', (call.lastShift ?? 0) >= CONFIG.shiftMark);
  }
  if (call.alertsDirty) {
    call.alertsDirty = false;
    if (call.alertCount) {
      const last = call.alerts[call.alerts.length - 1];
      const badge = h('span', `badge sev-${last.severity}`, `⚠ ${plural(call.alertCount, 'alert')}`);
      badge.title = `${last.severity}: ${alertText(last)}`;
      v.alerts.replaceChildren(badge);
      v.row.classList.add('has-alert');
      v.row.dataset.severity = last.severity;
      if (ui.alertsOnly) v.row.hidden = !visible(call);
    }
  }
  if (call.flash) {
    call.flash = false;
    // Two identical animations under two names: switching restarts it, no reflow needed.
    v.flashOdd = !v.flashOdd;
    v.row.classList.remove(v.flashOdd ? 'flash-b' : 'flash-a');
    v.row.classList.add(v.flashOdd ? 'flash-a' : 'flash-b');
  }
}

export function markSelected(row, on) {
  row.classList.toggle('selected', on);
  row.setAttribute('aria-current', on ? 'true' : 'false');
}

export function roleChip(speaker, role) {
  const r = role || 'unknown';
  const chip = h('span', `role role-${r}`, r);
  chip.title = r === 'unknown' ? `${speaker}: role unknown (shown as the caller's side)` : `${speaker} is the ${r}`;
  return chip;
}

/** The call's caller-side sentiment sparkline, labelled with its latest value and trend. */
export function sparkOf(call, width, height) {
  const values = call.sentiment.slice(-SPARK_POINTS).map((p) => p.s);
  const t = S.trendWord(callerTrend(call));
  const side = call.caller && call.caller.role === 'unknown' ? 'caller (role unknown)' : 'customer';
  const label = values.length
    ? `${side} sentiment ${S.signed(values[values.length - 1])}, ${t.word} ${t.arrow}`
    : `no ${side} sentiment yet`;
  return S.sparkline(values, width, height, label);
}

function makeCell(u) {
  let cls = `cell ${emoClass(u.emotion)}`;
  if ((u.shiftSpeaker ?? 0) >= CONFIG.shiftMark) cls += ' shift';
  if (u.gap) cls += ' gap';
  if (u.alerts.length) cls += ' alerted';
  const cell = h('span', cls);
  cell.title = `#${u.seq} ${u.speaker}: ${u.emotion} ${pct(u.confidence)}`
    + (u.shiftSpeaker !== null ? `, shift ${num2(u.shiftSpeaker)}` : '');
  return cell;
}

function renderTimeline(call) {
  const v = call.view;
  const list = call.utterances;
  const n = CONFIG.timelineCells;
  const lastSeq = v.cellSeqs.length ? v.cellSeqs[v.cellSeqs.length - 1] : -1;
  if (v.version !== call.version) {
    v.version = call.version;
    const start = Math.max(0, list.length - n);
    v.cells = [];
    v.cellSeqs = [];
    for (let i = start; i < list.length; i++) {
      v.cells.push(makeCell(list[i]));
      v.cellSeqs.push(list[i].seq);
    }
    v.timeline.replaceChildren(...v.cells);
    call.newAlertSeqs.length = 0;
    return;
  }
  // Appended utterances only: add their cells, drop the oldest beyond the cap.
  let i = list.length;
  while (i > 0 && list[i - 1].seq > lastSeq) i--;
  i = Math.max(i, list.length - n);
  if (i < list.length) {
    const frag = document.createDocumentFragment();
    for (; i < list.length; i++) {
      const cell = makeCell(list[i]);
      v.cells.push(cell);
      v.cellSeqs.push(list[i].seq);
      frag.appendChild(cell);
    }
    v.timeline.appendChild(frag);
    const extra = v.cells.length - n;
    if (extra > 0) {
      for (const cell of v.cells.splice(0, extra)) cell.remove();
      v.cellSeqs.splice(0, extra);
    }
  }
  for (const seq of call.newAlertSeqs) {
    for (let k = v.cellSeqs.length - 1; k >= 0; k--) {
      if (v.cellSeqs[k] === seq) {
        v.cells[k].classList.add('alerted');
        break;
      }
      if (v.cellSeqs[k] < seq) break;
    }
  }
  call.newAlertSeqs.length = 0;
}

/** An ended call's summary in one line. */
export function summaryText(call) {
  const s = call.summary;
  const dominant = Object.keys(s.dominant).sort(speakerOrder)
    .map((spk) => `${spk}: ${s.dominant[spk]}`).join(', ');
  const side = s.roles.customer ? 'customer' : s.roles.unknown ? 'unknown' : null;
  const fig = side ? s.roles[side] : null;
  const feel = fig && typeof fig.sentiment_mean === 'number'
    ? `${side === 'unknown' ? 'caller (unknown)' : 'customer'} sentiment ${S.signed(fig.sentiment_mean)}`
      + (typeof fig.sentiment_trend === 'number'
        ? ` ${S.trendWord(fig.sentiment_trend).arrow} trend ${S.signed(fig.sentiment_trend)}` : '')
    : null;
  return [
    plural(s.utterances ?? 0, 'utterance'),
    plural(s.shifts ?? 0, 'shift'),
    plural(s.alerts ?? 0, 'alert'),
    dominant ? `dominant ${dominant}` : null,
    feel,
    `duration ${duration(s.duration_s)}`,
  ].filter(Boolean).join(' · ');
}

function renderSummaryLine(call) {
  const v = call.view;
  if (!call.summary) return;
  v.summary.hidden = false;
  v.summary.textContent = summaryText(call);
}

function visible(call) {
  if (ui.filterText && !call.id.toLowerCase().includes(ui.filterText)) return false;
  if (ui.alertsOnly && !call.alertCount) return false;
  return true;
}

/** Show or hide every row after the filter or "alerts only" changed. */
export function refilter() {
  for (const call of calls.values()) if (call.view) call.view.row.hidden = !visible(call);
}

function compareCalls(a, b) {
  if (ui.sortMode === 'risk') return b.risk - a.risk || a.arrival - b.arrival;
  if (ui.sortMode === 'alerts') {
    return b.maxSeverity - a.maxSeverity || b.alertCount - a.alertCount || a.arrival - b.arrival;
  }
  if (ui.sortMode === 'id') return collator.compare(a.id, b.id);
  return a.arrival - b.arrival;
}
const collator = new Intl.Collator(undefined, { numeric: true });

/** Re-sort the active calls' rows (risks recomputed), moving only rows out of place. */
export function applyOrder() {
  ui.orderDirty = false;
  ui.lastSortAt = performance.now();
  const rows = [];
  for (const call of calls.values()) {
    if (!call.view || call.ended) continue;
    call.risk = riskOf(call);
    call.view.row.dataset.risk = call.risk.toFixed(2);
    rows.push(call);
  }
  rows.sort(compareCalls);
  const list = el.active;
  // Moving a node blurs it: a keyboard user keeps the row they are on.
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  let node = list.firstElementChild;
  for (const call of rows) {
    const row = call.view.row;
    if (node === row) {
      node = node.nextElementSibling;
    } else {
      list.insertBefore(row, node); // only rows out of place move
    }
  }
  if (focused && document.activeElement !== focused) focused.focus({ preventScroll: true });
}

export function renderCounters() {
  ui.countersDirty = false;
  const ended = endedOrder.length;
  const active = calls.size - ended;
  el['n-active'].textContent = String(active);
  el['n-ended'].textContent = String(ended);
  el['n-alerts'].textContent = String(alertsTotal);
  el['n-rate'].textContent = String(ui.rate);
  el['empty-active'].hidden = active > 0;
}
