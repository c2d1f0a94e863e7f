/* cfnesa dashboard: the event store. Output events -> plain JS objects, one per call.
 *
 * applyEvent() updates a call and marks it dirty; schedule() asks for one animation
 * frame, in which app.js renders every dirty call (and the detail panel, the alert
 * feed, the counters) in one batch. Events are de-duplicated by event_id, so
 * snapshots that overlap what we already have are harmless.
 *
 * The store draws nothing itself, apart from an emotion's first colour class (the
 * legend, dom.js). What it needs from the views and the connection it calls through
 * `hooks`, which app.js fills in, so no module here imports one that imports it.
 */

import { emoClass } from './dom.js';

export const CONFIG = {
  timelineCells: 60,      // cells per call row (newest at the right)
  utterancesKept: 200,    // per call, for the detail panel
  alertsKept: 100,        // per call
  maxEnded: 100,          // ended calls kept (oldest dropped)
  maxActive: 2000,        // active calls kept (least recently active dropped beyond)
  feedAlerts: 50,         // the recent alerts panel
  shiftMark: 0.5,         // shift.vs_speaker_previous at or above this marks a shift
  backoffMinMs: 250,
  backoffMaxMs: 5000,
  snapshotIdsPerFrame: 200,
  snapshotFrameBytes: 40000, // under the gateway's 64 KiB max_frame_bytes
  snapshotBatchMs: 50,       // gather ids of newly seen calls this long
  idleAfterMs: 5 * 60 * 1000,        // no event for this long: shown as idle
  dropIdleAfterMs: 30 * 60 * 1000,   // ... and dropped after this long (no summary came)
  sortEveryMs: 500,
};
export const SEVERITY_RANK = { low: 1, medium: 2, high: 3 };
const S = window.cfnesaSentiment;
const SENTIMENT_KEPT = 200;

// ------------------------------------------------------------------ state
/** @type {Map<string, object>} */
export const calls = new Map();
export const api = {
  calls,
  eventsSeen: 0,     // distinct events applied
  eventsLive: 0,     // ... of which arrived live (the rest came in snapshots)
  duplicates: 0,     // events dropped as already seen (same event_id)
  connected: false,  // subscribed and receiving
  status: 'idle',
  rows: 0,
  allSnapshot: null, // the last "subscribe all" reply: {active, snapshots, truncated, ended}
  agentView: false,  // the token names one call: the agent view
  perf: { frames: 0, renderMsMax: 0, renderMsTotal: 0, longFrames: 0, longTasks: 0 },
  config: CONFIG,
};
window.__cfnesa = api;

export const dirty = new Set();
const evicted = new Map(); // ids of dropped ended calls, so late repeats do not revive them
export const feed = [];    // [{cid, alert}], newest first
// Read elsewhere, assigned only here (an import is a live, read-only view of these).
export let endedOrder = []; // ended call ids, oldest first
export let alertsTotal = 0;
let arrival = 0;

/** The views' shared state, set by the input handlers and the store, read by the renderers. */
export const ui = {
  selectedId: null,
  sortMode: 'risk',
  filterText: '',
  alertsOnly: false,
  openAlertKey: null, // the detail panel's alert whose evidence is shown ("seq:rule")
  orderDirty: false,
  lastSortAt: 0,
  feedDirty: false,
  detailDirty: false,
  countersDirty: true,
  rate: 0,            // events applied in the last second
};

/** Set by app.js: what the store asks of the rest of the page. */
export const hooks = {
  render: () => {},            // draw one frame (the dirty calls, panels, counters)
  requestSnapshot: () => {},   // (cid) ask the gateway for the call's history
  select: () => {},            // (cid | null) the call shown in the detail panel
};

const marksDone = new Set();
/** performance.mark(`cfnesa:${name}`), once per page. */
export function markOnce(name) {
  if (marksDone.has(name)) return;
  marksDone.add(name);
  performance.mark(`cfnesa:${name}`);
}

let rafPending = false;
export function schedule() {
  if (!rafPending) {
    rafPending = true;
    requestAnimationFrame(frame);
  }
}
function frame() {
  rafPending = false;
  hooks.render();
}

// ------------------------------------------------------------------ events -> state
function newCall(cid) {
  const call = {
    id: cid,
    arrival: arrival++,
    tenant: null,
    ids: new Map(),        // event_id -> seq (de-duplication)
    utterances: [],        // sorted by seq, at most utterancesKept
    speakers: new Map(),   // speaker -> {emotion, confidence, seq}
    roles: new Map(),      // speaker -> "customer" | "agent" | "other" | "unknown"
    sentiment: [],         // caller-side {seq, s}, sorted by seq
    caller: null,          // the caller side's latest {emotion, confidence, seq, sentiment, role}
    risk: 0,
    sparkDirty: false,
    alerts: [],            // sorted by seq
    alertCount: 0,
    maxSeverity: 0,
    lastSeverity: null,
    lastShift: null,
    maxSeq: -1,
    summary: null,
    ended: false,
    endedAt: 0,
    idle: false,
    lastActivity: Date.now(),
    version: 0,            // bumped when utterances change other than by appending
    flash: false,
    chipsDirty: true,
    alertsDirty: true,
    newAlertSeqs: [],
    view: null,
  };
  calls.set(cid, call);
  if (ui.sortMode !== 'arrival') ui.orderDirty = true;
  return call;
}

export function utteranceIndex(list, seq) {
  // first index whose seq >= seq (binary search; list sorted by seq)
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid].seq < seq) lo = mid + 1; else hi = mid;
  }
  return lo;
}

/** Apply one output event. Returns false when it was a repeat or not for us. */
export function applyEvent(ev, fromSnapshot) {
  if (!ev || typeof ev !== 'object') return false;
  const cid = ev.conversation_id;
  const seq = ev.seq;
  if (typeof cid !== 'string' || typeof seq !== 'number') return false;
  if (ev.type !== 'emotion' && ev.type !== 'alert' && ev.type !== 'summary') return false;
  if (evicted.has(cid)) return false;
  let call = calls.get(cid);
  const isNew = !call;
  if (isNew) call = newCall(cid);
  const eid = typeof ev.event_id === 'string' && ev.event_id
    ? ev.event_id : `${cid}:${seq}:${ev.type}:${ev.rule ?? ''}`;
  if (call.ids.has(eid)) {
    api.duplicates++;
    return false;
  }
  const list = call.utterances;
  if (ev.type !== 'summary' && list.length >= CONFIG.utterancesKept && seq < list[0].seq) {
    return false; // older than everything we keep
  }
  call.ids.set(eid, seq);
  api.eventsSeen++;
  if (!fromSnapshot) api.eventsLive++;
  if (ev.tenant) call.tenant = ev.tenant;
  if (ev.type === 'emotion') applyEmotion(call, ev);
  else if (ev.type === 'alert') applyAlert(call, ev, fromSnapshot);
  else applySummary(call, ev);
  if (!fromSnapshot) {
    call.lastActivity = Date.now();
    // A call met mid-way: its history is in the gateway's snapshot.
    if (isNew && !(ev.type === 'emotion' && seq === 0)) hooks.requestSnapshot(cid);
  }
  if (call.idle) call.idle = false;
  markDirty(call);
  return true;
}

function applyEmotion(call, ev) {
  const shift = ev.shift || {};
  const u = {
    seq: ev.seq,
    speaker: String(ev.speaker ?? '?'),
    role: S.role(ev.role),
    sentiment: typeof ev.sentiment === 'number' && Number.isFinite(ev.sentiment) ? ev.sentiment : null,
    emotion: String(ev.emotion ?? '?'),
    confidence: ev.confidence,
    probabilities: ev.probabilities && typeof ev.probabilities === 'object' ? ev.probabilities : {},
    shiftSpeaker: typeof shift.vs_speaker_previous === 'number' ? shift.vs_speaker_previous : null,
    shiftPrevious: typeof shift.vs_previous === 'number' ? shift.vs_previous : null,
    text: typeof ev.text === 'string' ? ev.text : null,
    ts: ev.ts || ev.emitted_at || null,
    gap: ev.gap === true,
    alerts: [],
  };
  const list = call.utterances;
  if (!list.length || list[list.length - 1].seq < u.seq) {
    list.push(u);
  } else {
    const at = utteranceIndex(list, u.seq);
    if (at < list.length && list[at].seq === u.seq) return; // same utterance, other id
    list.splice(at, 0, u);
    call.version++;
  }
  for (const a of call.alerts) if (a.seq === u.seq) u.alerts.push(a);
  if (list.length > CONFIG.utterancesKept) {
    list.splice(0, list.length - CONFIG.utterancesKept);
    pruneIds(call);
  }
  const sp = call.speakers.get(u.speaker);
  if (!sp || u.seq >= sp.seq) {
    call.speakers.set(u.speaker, { emotion: u.emotion, confidence: u.confidence, seq: u.seq });
    if (call.roles.get(u.speaker) !== u.role) call.roles.set(u.speaker, u.role);
    call.chipsDirty = true;
  }
  if (S.callerSide(u.role)) applyCallerSide(call, u);
  if (ui.sortMode === 'risk') ui.orderDirty = true; // open alerts age with every utterance
  if (u.seq >= call.maxSeq) {
    call.maxSeq = u.seq;
    call.lastShift = u.shiftSpeaker ?? u.shiftPrevious;
  }
  emoClass(u.emotion);
}

function applyCallerSide(call, u) {
  if (!call.caller || u.seq >= call.caller.seq) {
    call.caller = { emotion: u.emotion, confidence: u.confidence, seq: u.seq, sentiment: u.sentiment, role: u.role };
  }
  if (u.sentiment === null) return;
  const points = call.sentiment;
  let at = points.length;
  while (at > 0 && points[at - 1].seq > u.seq) at--;
  points.splice(at, 0, { seq: u.seq, s: u.sentiment });
  if (points.length > SENTIMENT_KEPT) points.shift();
  call.sparkDirty = true;
  if (ui.sortMode === 'risk') ui.orderDirty = true;
}

export function callerTrend(call) {
  return S.trend(call.sentiment.map((p) => p.s));
}

export function riskOf(call) {
  const now = call.sentiment.length ? call.sentiment[call.sentiment.length - 1].s : null;
  return S.risk(now, S.openAlerts(call.alerts, call.maxSeq, call.ended));
}

function pruneIds(call) {
  if (call.ids.size < 4 * CONFIG.utterancesKept) return;
  const floor = call.utterances[0].seq;
  for (const [id, seq] of call.ids) if (seq < floor) call.ids.delete(id);
}

function applyAlert(call, ev, fromSnapshot) {
  const a = {
    seq: ev.seq,
    speaker: String(ev.speaker ?? '?'),
    rule: String(ev.rule ?? 'alert'),
    severity: SEVERITY_RANK[ev.severity] ? ev.severity : 'low',
    from: ev.from ?? null,
    to: ev.to ?? null,
    p_shift: ev.p_shift,
    detail: ev.detail || '',
    at: ev.emitted_at || ev.ts || '',
    role: S.role(ev.role),
    evidence: Array.isArray(ev.evidence) ? ev.evidence.filter((e) => e && typeof e.seq === 'number') : [],
  };
  const list = call.alerts;
  let at = list.length;
  while (at > 0 && list[at - 1].seq > a.seq) at--;
  list.splice(at, 0, a);
  if (list.length > CONFIG.alertsKept) list.shift();
  call.alertCount++;
  alertsTotal++;
  call.maxSeverity = Math.max(call.maxSeverity, SEVERITY_RANK[a.severity]);
  if (at === list.length - 1) call.lastSeverity = a.severity;
  const utterances = call.utterances;
  const uttAt = utteranceIndex(utterances, a.seq);
  if (uttAt < utterances.length && utterances[uttAt].seq === a.seq) utterances[uttAt].alerts.push(a);
  call.newAlertSeqs.push(a.seq);
  call.alertsDirty = true;
  if (!fromSnapshot) call.flash = true;
  // The feed is newest first by emission time (snapshot alerts slot in by time).
  let fi = 0;
  while (fi < feed.length && feed[fi].alert.at > a.at) fi++;
  if (fi < CONFIG.feedAlerts) {
    feed.splice(fi, 0, { cid: call.id, alert: a });
    if (feed.length > CONFIG.feedAlerts) feed.pop();
    ui.feedDirty = true;
  }
  ui.countersDirty = true;
  if (ui.sortMode === 'alerts' || ui.sortMode === 'risk') ui.orderDirty = true;
}

function applySummary(call, ev) {
  call.summary = {
    utterances: ev.utterances,
    shifts: ev.shifts,
    alerts: ev.alerts,
    gaps: ev.gaps,
    duration_s: ev.duration_s,
    dominant: ev.dominant && typeof ev.dominant === 'object' ? ev.dominant : {},
    speakers: ev.speakers && typeof ev.speakers === 'object' ? ev.speakers : {},
    roles: ev.roles && typeof ev.roles === 'object' ? ev.roles : {},
  };
  if (!call.ended) {
    call.ended = true;
    call.endedAt = Date.now();
    endedOrder.push(call.id);
    ui.countersDirty = true;
    while (endedOrder.length > CONFIG.maxEnded) dropCall(endedOrder[0]);
  }
}

export function dropCall(cid) {
  const call = calls.get(cid);
  if (!call) return;
  calls.delete(cid);
  dirty.delete(call);
  if (call.ended) endedOrder = endedOrder.filter((id) => id !== cid);
  if (call.view) call.view.row.remove();
  evicted.set(cid, true);
  if (evicted.size > 5000) evicted.delete(evicted.keys().next().value);
  if (ui.selectedId === cid) hooks.select(null);
  ui.countersDirty = true;
}

export function markDirty(call) {
  dirty.add(call);
  if (call.id === ui.selectedId) ui.detailDirty = true;
  schedule();
}
