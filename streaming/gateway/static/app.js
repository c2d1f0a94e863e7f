/* cfnesa live dashboard: plain JS, no framework, no build step. The entry point.
 *
 * Data flow:
 *   WebSocket message -> JSON.parse -> applyEvent() updates plain JS objects (one per call)
 *   and marks the call dirty -> one requestAnimationFrame callback (frame() here) renders
 *   every dirty call's row (and the detail panel, the alert feed, the counters) in one batch.
 *
 * The files (native ES modules, loaded by index.html after sentiment.js):
 *   app.js         this: the frame, the once-a-second housekeeping, user input, start-up
 *   connection.js  the WebSocket, the gateway protocol and snapshots, status and banner
 *   store.js       events -> calls (the state), CONFIG, window.__cfnesa
 *   rows.js        the call lists: rows (chips, sparkline, timeline), filter, risk order, counters
 *   detail.js      the side panel: recent alerts feed, a call's details, alert evidence
 *   agent.js       the agent view (a token scoped to one call)
 *   dom.js         the page's elements, element creation, emotion colour classes
 *   format.js      numbers, times and alerts as text
 *   sentiment.js   (a plain script) roles, sentiment, trend and risk: the definitions
 */

import { el, bindDom } from './dom.js';
import {
  CONFIG, api, calls, dirty, ui, hooks, schedule, markOnce, applyEvent, dropCall, markDirty,
} from './store.js';
import { conn, readToken, stop, connect, requestSnapshot } from './connection.js';
import { renderCall, applyOrder, refilter, renderCounters } from './rows.js';
import { renderFeed, renderDetail, select, openEvidence } from './detail.js';
import { showAgentView, renderAgent } from './agent.js';

const ROW_MARKS = [1, 50, 100, 200, 500, 1000];
let sortTimer = null;
let ratePrev = 0;

// ------------------------------------------------------------------ rendering
function frame() {
  const t0 = performance.now();
  for (const call of dirty) {
    renderCall(call);
    if (api.agentView && call.id === conn.named[0]) renderAgent(call);
  }
  dirty.clear();
  if (ui.orderDirty && t0 - ui.lastSortAt >= CONFIG.sortEveryMs) {
    applyOrder();
  } else if (ui.orderDirty && !sortTimer) {
    // Re-sort at most every sortEveryMs, so rows do not jump on every event.
    sortTimer = setTimeout(() => { sortTimer = null; schedule(); }, CONFIG.sortEveryMs);
  }
  if (ui.detailDirty) renderDetail();
  if (ui.feedDirty) renderFeed();
  if (ui.countersDirty) renderCounters();
  const rows = el.active.childElementCount + el.ended.childElementCount;
  api.rows = rows;
  for (const n of ROW_MARKS) if (rows >= n) markOnce(`rows-${n}`);
  const spent = performance.now() - t0;
  const perf = api.perf;
  perf.frames++;
  perf.renderMsTotal += spent;
  if (spent > perf.renderMsMax) perf.renderMsMax = spent;
  if (spent > 16) perf.longFrames++;
}

// ------------------------------------------------------------------ housekeeping
function tick() {
  ui.rate = api.eventsSeen - ratePrev;
  ratePrev = api.eventsSeen;
  ui.countersDirty = true;
  const now = Date.now();
  let active = 0;
  const idleCandidates = [];
  for (const call of calls.values()) {
    if (call.ended) continue;
    active++;
    const quiet = now - call.lastActivity;
    if (quiet > CONFIG.dropIdleAfterMs) {
      dropCall(call.id);
      active--;
      continue;
    }
    if (!call.idle && quiet > CONFIG.idleAfterMs) {
      call.idle = true;
      markDirty(call);
    }
    idleCandidates.push(call);
  }
  if (active > CONFIG.maxActive) {
    idleCandidates.sort((a, b) => a.lastActivity - b.lastActivity);
    for (const call of idleCandidates.slice(0, active - CONFIG.maxActive)) dropCall(call.id);
  }
  schedule();
}

// ------------------------------------------------------------------ user input
function rowOf(target) {
  const row = target.closest && target.closest('li.call');
  return row && row.dataset.id ? row : null;
}

function bindInput() {
  const onClick = (e) => {
    const row = rowOf(e.target);
    if (row) select(row.dataset.id === ui.selectedId ? null : row.dataset.id);
  };
  const onKey = (e) => {
    const row = rowOf(e.target);
    if (!row) return;
    if (e.key === 'Enter' || e.key === ' ') {
      e.preventDefault();
      select(row.dataset.id);
    } else if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      const rows = [...el.active.children, ...el.ended.children].filter((r) => !r.hidden);
      const next = rows[rows.indexOf(row) + (e.key === 'ArrowDown' ? 1 : -1)];
      if (next) next.focus();
    }
  };
  for (const list of [el.active, el.ended]) {
    list.addEventListener('click', onClick);
    list.addEventListener('keydown', onKey);
  }
  el.feed.addEventListener('click', (e) => {
    const btn = e.target.closest('button[data-id]');
    if (!btn) return;
    const id = btn.dataset.id;
    select(id);
    ui.openAlertKey = null;
    openEvidence(btn.dataset.key); // the feed's alert opens with its evidence
    const call = calls.get(id);
    if (call && call.view) call.view.row.scrollIntoView({ block: 'nearest' });
  });
  el['detail-alerts'].addEventListener('click', (e) => {
    const btn = e.target.closest('button.alert-open');
    if (btn) openEvidence(btn.dataset.key);
  });
  el['detail-close'].addEventListener('click', () => {
    const id = ui.selectedId;
    select(null);
    calls.get(id)?.view?.row.focus();
  });
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && ui.selectedId) select(null);
  });
  el.filter.addEventListener('input', () => {
    ui.filterText = el.filter.value.trim().toLowerCase();
    refilter();
  });
  el['alerts-only'].addEventListener('change', () => {
    ui.alertsOnly = el['alerts-only'].checked;
    refilter();
  });
  el.sort.addEventListener('change', () => {
    ui.sortMode = el.sort.value;
    ui.orderDirty = true;
    ui.lastSortAt = 0;
    schedule();
  });
  window.addEventListener('online', () => {
    if (!conn.ws && !conn.stopped) connect();
  });
}

function observeLongTasks() {
  try {
    new PerformanceObserver((list) => { api.perf.longTasks += list.getEntries().length; })
      .observe({ type: 'longtask', buffered: true });
  } catch { /* not supported */ }
}

function start() {
  bindDom();
  el['max-ended'].textContent = String(CONFIG.maxEnded);
  bindInput();
  observeLongTasks();
  readToken();
  if (api.agentView) showAgentView(conn.named[0]);
  setInterval(tick, 1000);
  if (!conn.token) {
    stop('No token: open this page as /?token=… (mint one with: cfnesa token --tenant TENANT --all).');
    return;
  }
  connect();
}

// The store calls out through these (it imports none of the modules above).
hooks.render = frame;
hooks.requestSnapshot = requestSnapshot;
hooks.select = select;

// Exposed for tests and for the console.
api.select = (cid) => select(cid);
api.applyEvent = (ev) => applyEvent(ev, false);

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
