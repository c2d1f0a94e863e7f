/* cfnesa live dashboard: plain JS, no framework, no build step.
 *
 * Data flow:
 *   WebSocket message -> JSON.parse -> applyEvent() updates plain JS objects (one per call)
 *   and marks the call dirty -> one requestAnimationFrame callback renders every dirty
 *   call's row (and the detail panel, the alert feed, the counters) in one batch.
 *
 * Gateway protocol (docs/gateway.md): ws://HOST/ws?token=...; we send
 *   {"op":"subscribe","all":true}; the server replies with how many snapshots follow
 *   (one per call in progress, up to its bound, then the recently ended calls), sends
 *   them, then live events (emotion | alert | summary). The snapshots are applied in
 *   one go, so a page opened mid-shift shows the calls in progress at once.
 * Other history comes from snapshots asked for by id:
 *   - a call first seen in the middle (its first event is not utterance 0), e.g. one
 *     left out of the "all" snapshot by its bound,
 *   - every call still active after a reconnect that the "all" snapshot did not cover,
 * and those id subscriptions are dropped again once the snapshot arrived (the "all"
 * subscription keeps the live events coming). Events are de-duplicated by event_id,
 * so snapshots that overlap what we already have are harmless.
 *
 * A token scoped to exactly one call (no "all", one id without wildcards) opens the
 * agent view: that call alone, large, with the customer's current emotion, sentiment
 * and trend, and no agent emotions. Roles, sentiment, trend and risk: sentiment.js.
 */
'use strict';

(() => {
  const CONFIG = {
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
  const SEVERITY_RANK = { low: 1, medium: 2, high: 3 };
  // Colours of these live in style.css (.e-<name>); other labels get a generated hue.
  const KNOWN_EMOTIONS = new Set([
    'neutral', 'joy', 'happy', 'excited', 'surprise', 'sadness', 'sad', 'fear', 'disgust',
    'anger', 'angry', 'frustrated', 'frustration', 'positive', 'negative',
  ]);
  const ROW_MARKS = [1, 50, 100, 200, 500, 1000];
  const S = window.cfnesaSentiment;
  const SPARK_POINTS = 40;   // caller-side sentiments drawn per row
  const SENTIMENT_KEPT = 200;

  // ------------------------------------------------------------------ state
  /** @type {Map<string, object>} */
  const calls = new Map();
  const api = {
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

  const dirty = new Set();
  const evicted = new Map(); // ids of dropped ended calls, so late repeats do not revive them
  const feed = [];           // [{cid, alert}], newest first
  let endedOrder = [];       // ended call ids, oldest first
  let arrival = 0;
  let alertsTotal = 0;
  let selectedId = null;
  let rafPending = false;
  let orderDirty = false;
  let lastSortAt = 0;
  let sortTimer = null;
  let feedDirty = false;
  let detailDirty = false;
  let countersDirty = true;
  let filterText = '';
  let alertsOnly = false;
  let sortMode = 'risk';
  let openAlertKey = null; // the detail panel's alert whose evidence is shown ("seq:rule")
  let ratePrev = 0;
  let rate = 0;
  const rowMarksDone = new Set();

  // ------------------------------------------------------------------ DOM
  const $ = (id) => document.getElementById(id);
  const el = {};
  function bindDom() {
    for (const id of ['status', 'status-text', 'n-active', 'n-ended', 'n-alerts', 'n-rate',
      'filter', 'alerts-only', 'sort', 'banner', 'legend', 'empty-active', 'active', 'ended',
      'max-ended', 'detail', 'detail-title', 'detail-close', 'detail-meta', 'detail-alerts',
      'detail-count', 'detail-utterances', 'feed', 'empty-feed', 'agent', 'agent-call',
      'agent-state', 'agent-emotion', 'agent-sentiment', 'agent-trend', 'agent-spark',
      'agent-alerts', 'main']) {
      el[id] = $(id);
    }
    el['max-ended'].textContent = String(CONFIG.maxEnded);
  }

  function h(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------------ emotion colours
  const emoClassCache = new Map();
  let dynamicSheet = null;
  function emoClass(name) {
    let cls = emoClassCache.get(name);
    if (cls) return cls;
    const key = String(name).toLowerCase();
    if (KNOWN_EMOTIONS.has(key)) {
      cls = `e-${key}`;
    } else {
      cls = `e-x${hash(key).toString(36)}`;
      if (!dynamicSheet) {
        const style = document.createElement('style');
        document.head.appendChild(style);
        dynamicSheet = style.sheet;
      }
      const hue = hash(key) % 360;
      dynamicSheet.insertRule(`.${cls}{--c:hsl(${hue} 65% 68%)}`, dynamicSheet.cssRules.length);
    }
    emoClassCache.set(name, cls);
    addLegend(name, cls);
    return cls;
  }
  function hash(text) {
    let x = 2166136261;
    for (let i = 0; i < text.length; i++) {
      x ^= text.charCodeAt(i);
      x = Math.imul(x, 16777619);
    }
    return x >>> 0;
  }
  function addLegend(name, cls) {
    const chip = h('span', `chip ${cls}`, name);
    el.legend.appendChild(chip);
  }

  // ------------------------------------------------------------------ formatting
  const pct = (p) => (typeof p === 'number' ? `${Math.round(p * 100)}%` : '–');
  const num2 = (p) => (typeof p === 'number' ? p.toFixed(2) : '–');
  function clock(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? '' : d.toTimeString().slice(0, 8);
  }
  function duration(seconds) {
    if (typeof seconds !== 'number' || !Number.isFinite(seconds)) return '–';
    const s = Math.round(seconds);
    const m = Math.floor(s / 60);
    return m ? `${m}m ${String(s % 60).padStart(2, '0')}s` : `${s}s`;
  }
  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
  function speakerOrder(a, b) {
    const rank = (s) => (s === 'agent' ? 0 : s === 'customer' ? 1 : 2);
    return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
  }
  function alertText(a) {
    const move = a.from || a.to ? ` ${a.from ?? '?'}→${a.to ?? '?'}` : '';
    const p = typeof a.p_shift === 'number' ? ` p=${num2(a.p_shift)}` : '';
    return `${a.rule.replace(/_/g, ' ')} · ${a.speaker}${move}${p}`;
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
    if (sortMode !== 'arrival') orderDirty = true;
    return call;
  }

  function utteranceIndex(list, seq) {
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
  function applyEvent(ev, fromSnapshot) {
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
      if (isNew && !(ev.type === 'emotion' && seq === 0)) requestSnapshot(cid);
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
    if (sortMode === 'risk') orderDirty = true; // open alerts age with every utterance
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
    if (sortMode === 'risk') orderDirty = true;
  }

  function callerTrend(call) {
    return S.trend(call.sentiment.map((p) => p.s));
  }

  function riskOf(call) {
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
    const ui = utteranceIndex(utterances, a.seq);
    if (ui < utterances.length && utterances[ui].seq === a.seq) utterances[ui].alerts.push(a);
    call.newAlertSeqs.push(a.seq);
    call.alertsDirty = true;
    if (!fromSnapshot) call.flash = true;
    // The feed is newest first by emission time (snapshot alerts slot in by time).
    let fi = 0;
    while (fi < feed.length && feed[fi].alert.at > a.at) fi++;
    if (fi < CONFIG.feedAlerts) {
      feed.splice(fi, 0, { cid: call.id, alert: a });
      if (feed.length > CONFIG.feedAlerts) feed.pop();
      feedDirty = true;
    }
    countersDirty = true;
    if (sortMode === 'alerts' || sortMode === 'risk') orderDirty = true;
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
      countersDirty = true;
      while (endedOrder.length > CONFIG.maxEnded) dropCall(endedOrder[0]);
    }
  }

  function dropCall(cid) {
    const call = calls.get(cid);
    if (!call) return;
    calls.delete(cid);
    dirty.delete(call);
    if (call.ended) endedOrder = endedOrder.filter((id) => id !== cid);
    if (call.view) call.view.row.remove();
    evicted.set(cid, true);
    if (evicted.size > 5000) evicted.delete(evicted.keys().next().value);
    if (selectedId === cid) select(null);
    countersDirty = true;
  }

  function markDirty(call) {
    dirty.add(call);
    if (call.id === selectedId) detailDirty = true;
    schedule();
  }

  function schedule() {
    if (!rafPending) {
      rafPending = true;
      requestAnimationFrame(frame);
    }
  }

  // ------------------------------------------------------------------ rendering
  function frame() {
    rafPending = false;
    const t0 = performance.now();
    for (const call of dirty) {
      renderCall(call);
      if (api.agentView && call.id === conn.named[0]) renderAgent(call);
    }
    dirty.clear();
    if (orderDirty && t0 - lastSortAt >= CONFIG.sortEveryMs) {
      applyOrder();
    } else if (orderDirty && !sortTimer) {
      // Re-sort at most every sortEveryMs, so rows do not jump on every event.
      sortTimer = setTimeout(() => { sortTimer = null; schedule(); }, CONFIG.sortEveryMs);
    }
    if (detailDirty) renderDetail();
    if (feedDirty) renderFeed();
    if (countersDirty) renderCounters();
    const rows = el.active.childElementCount + el.ended.childElementCount;
    api.rows = rows;
    for (const n of ROW_MARKS) {
      if (rows >= n && !rowMarksDone.has(n)) {
        rowMarksDone.add(n);
        performance.mark(`cfnesa:rows-${n}`);
      }
    }
    const spent = performance.now() - t0;
    const perf = api.perf;
    perf.frames++;
    perf.renderMsTotal += spent;
    if (spent > perf.renderMsMax) perf.renderMsMax = spent;
    if (spent > 16) perf.longFrames++;
  }

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
    if (call.id === selectedId) markSelected(row, true);
    countersDirty = true;
  }

  function renderCall(call) {
    if (!calls.has(call.id)) return;
    if (!call.view) createRow(call);
    const v = call.view;
    if (call.ended && !v.ended) {
      v.ended = true;
      v.row.classList.add('ended');
      v.state.textContent = 'ended';
      el.ended.prepend(v.row);
      renderSummaryLine(call);
      countersDirty = true;
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
        if (alertsOnly) v.row.hidden = !visible(call);
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

  function roleChip(speaker, role) {
    const r = role || 'unknown';
    const chip = h('span', `role role-${r}`, r);
    chip.title = r === 'unknown' ? `${speaker}: role unknown (shown as the caller's side)` : `${speaker} is the ${r}`;
    return chip;
  }

  function sparkOf(call, width, height) {
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

  function summaryText(call) {
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
    if (filterText && !call.id.toLowerCase().includes(filterText)) return false;
    if (alertsOnly && !call.alertCount) return false;
    return true;
  }

  function refilter() {
    for (const call of calls.values()) if (call.view) call.view.row.hidden = !visible(call);
  }

  function compareCalls(a, b) {
    if (sortMode === 'risk') return b.risk - a.risk || a.arrival - b.arrival;
    if (sortMode === 'alerts') {
      return b.maxSeverity - a.maxSeverity || b.alertCount - a.alertCount || a.arrival - b.arrival;
    }
    if (sortMode === 'id') return collator.compare(a.id, b.id);
    return a.arrival - b.arrival;
  }
  const collator = new Intl.Collator(undefined, { numeric: true });

  function applyOrder() {
    orderDirty = false;
    lastSortAt = performance.now();
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

  function renderCounters() {
    countersDirty = false;
    const ended = endedOrder.length;
    const active = calls.size - ended;
    el['n-active'].textContent = String(active);
    el['n-ended'].textContent = String(ended);
    el['n-alerts'].textContent = String(alertsTotal);
    el['n-rate'].textContent = String(rate);
    el['empty-active'].hidden = active > 0;
  }

  function renderFeed() {
    feedDirty = false;
    const items = feed.map(({ cid, alert }) => {
      const li = h('li', `alert sev-${alert.severity}`);
      const btn = h('button', 'link');
      btn.type = 'button';
      btn.dataset.id = cid;
      btn.dataset.key = `${alert.seq}:${alert.rule}`;
      btn.append(h('span', `badge sev-${alert.severity}`, alert.severity),
        h('span', 'cid', cid), h('span', 'what', alertText(alert)),
        h('time', 'when', clock(alert.at)));
      li.appendChild(btn);
      return li;
    });
    el.feed.replaceChildren(...items);
    el['empty-feed'].hidden = feed.length > 0;
  }

  // ------------------------------------------------------------------ detail panel
  const detailView = { cid: null, version: -1, seqs: [], scrollTo: false };

  function select(cid) {
    if (selectedId && calls.get(selectedId)?.view) markSelected(calls.get(selectedId).view.row, false);
    if (cid !== selectedId) openAlertKey = null;
    selectedId = cid;
    detailView.cid = null;
    if (cid && calls.get(cid)?.view) markSelected(calls.get(cid).view.row, true);
    detailDirty = true;
    schedule();
  }

  function markSelected(row, on) {
    row.classList.toggle('selected', on);
    row.setAttribute('aria-current', on ? 'true' : 'false');
  }

  function utteranceItem(u) {
    const li = h('li', 'utt');
    li.dataset.seq = String(u.seq);
    const shifted = (u.shiftSpeaker ?? 0) >= CONFIG.shiftMark;
    if (shifted) li.classList.add('shift');
    if (u.alerts.length) li.classList.add('alerted');
    const head = h('div', 'u-head');
    head.append(h('span', 'seq', `#${u.seq}`), h('span', 'spk', u.speaker), roleChip(u.speaker, u.role),
      h('span', `chip ${emoClass(u.emotion)}`, `${u.emotion} ${pct(u.confidence)}`));
    if (u.sentiment !== null) head.append(h('span', 'sent', `sentiment ${S.signed(u.sentiment)}`));
    if (shifted) head.append(h('span', 'mark shiftmark', `▲ shift ${num2(u.shiftSpeaker)}`));
    if (u.gap) head.append(h('span', 'mark gapmark', 'gap before'));
    for (const a of u.alerts) head.append(h('span', `badge sev-${a.severity}`, a.rule.replace(/_/g, ' ')));
    head.append(h('time', 'when', clock(u.ts)));
    li.appendChild(head);
    if (u.text) li.appendChild(h('p', 'u-text', u.text));
    const probs = h('div', 'probs');
    for (const [label, p] of Object.entries(u.probabilities)) {
      if (typeof p !== 'number') continue;
      const row = h('div', 'p');
      const bar = h('span', 'bar');
      const fill = h('span', `fill ${emoClass(label)}`);
      fill.style.width = `${Math.max(0, Math.min(100, p * 100)).toFixed(1)}%`;
      bar.appendChild(fill);
      row.append(h('span', 'pl', label), bar, h('span', 'pv', pct(p)));
      if (label === u.emotion) row.classList.add('best');
      probs.appendChild(row);
    }
    li.appendChild(probs);
    return li;
  }

  function renderDetail() {
    detailDirty = false;
    const call = selectedId ? calls.get(selectedId) : null;
    if (!call) {
      el.detail.hidden = true;
      detailView.cid = null;
      return;
    }
    el.detail.hidden = false;
    el['detail-title'].textContent = call.id;
    // meta: state, speakers now, latest shift, summary
    const meta = [];
    const stateLine = h('p', 'meta-line');
    stateLine.append(h('span', `state-pill ${call.ended ? 'ended' : call.idle ? 'idle' : 'live'}`,
      call.ended ? 'ended' : call.idle ? 'idle' : 'live'));
    if (call.tenant) stateLine.append(` tenant ${call.tenant}`);
    stateLine.append(` · latest shift ${num2(call.lastShift)}`);
    meta.push(stateLine);
    const chips = h('p', 'meta-line');
    for (const spk of [...call.speakers.keys()].sort(speakerOrder)) {
      const s = call.speakers.get(spk);
      const chip = h('span', `chip ${emoClass(s.emotion)}`);
      chip.append(h('span', 'spk', `${spk}:`), ` ${s.emotion} ${pct(s.confidence)}`);
      chips.append(chip, ' ');
    }
    meta.push(chips);
    if (call.sentiment.length) {
      const t = S.trendWord(callerTrend(call));
      const line = h('p', 'meta-line sentiment');
      line.append(sparkOf(call, 160, 32),
        ` caller sentiment ${S.signed(call.sentiment[call.sentiment.length - 1].s)} · ${t.word} ${t.arrow}`);
      meta.push(line);
    }
    if (call.summary) meta.push(h('p', 'meta-line summary', `Summary: ${summaryText(call)}`));
    el['detail-meta'].replaceChildren(...meta);
    // alerts, newest first
    let evidenceSeqs = new Set();
    const alerts = call.alerts.slice().reverse().map((a) => {
      const li = h('li', `alert sev-${a.severity}`);
      const key = `${a.seq}:${a.rule}`;
      const btn = h('button', 'alert-open');
      btn.type = 'button';
      btn.dataset.key = key;
      btn.setAttribute('aria-expanded', String(openAlertKey === key));
      btn.title = 'show the utterances that raised it';
      btn.append(h('span', `badge sev-${a.severity}`, a.severity), h('span', 'seq', `#${a.seq}`),
        h('span', 'what', alertText(a)), h('time', 'when', clock(a.at)));
      li.appendChild(btn);
      if (a.detail) li.title = a.detail;
      if (openAlertKey === key) {
        li.classList.add('open');
        li.appendChild(evidenceList(a));
        evidenceSeqs = new Set(a.evidence.length ? a.evidence.map((e) => e.seq) : [a.seq]);
      }
      return li;
    });
    if (!alerts.length) alerts.push(h('li', 'none', 'none'));
    el['detail-alerts'].replaceChildren(...alerts);
    // utterances: append when only appended, else rebuild
    const list = el['detail-utterances'];
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const utt = call.utterances;
    if (detailView.cid !== call.id || detailView.version !== call.version) {
      detailView.cid = call.id;
      detailView.version = call.version;
      detailView.seqs = utt.map((u) => u.seq);
      list.replaceChildren(...utt.map(utteranceItem));
      list.scrollTop = list.scrollHeight;
    } else {
      const lastSeq = detailView.seqs.length ? detailView.seqs[detailView.seqs.length - 1] : -1;
      let i = utt.length;
      while (i > 0 && utt[i - 1].seq > lastSeq) i--;
      const frag = document.createDocumentFragment();
      for (; i < utt.length; i++) {
        frag.appendChild(utteranceItem(utt[i]));
        detailView.seqs.push(utt[i].seq);
      }
      list.appendChild(frag);
      while (detailView.seqs.length > utt.length) {
        detailView.seqs.shift();
        list.firstElementChild.remove();
      }
      // alerts that arrived after their utterance was drawn: redraw those items
      for (const item of list.querySelectorAll('li.utt:not(.alerted)')) {
        const seq = Number(item.dataset.seq);
        const k = utteranceIndex(utt, seq);
        if (k < utt.length && utt[k].seq === seq && utt[k].alerts.length) {
          item.replaceWith(utteranceItem(utt[k]));
        }
      }
      if (atBottom) list.scrollTop = list.scrollHeight;
    }
    el['detail-count'].textContent = `(${utt.length}${utt.length >= CONFIG.utterancesKept ? ', latest' : ''})`;
    let first = null;
    for (const item of list.children) {
      const on = evidenceSeqs.has(Number(item.dataset.seq));
      item.classList.toggle('evidence', on);
      if (on && !first) first = item;
    }
    if (first && detailView.scrollTo) first.scrollIntoView({ block: 'nearest' });
    detailView.scrollTo = false;
  }

  function evidenceList(a) {
    const ol = h('ol', 'evidence');
    ol.setAttribute('aria-label', 'evidence');
    if (!a.evidence.length) {
      ol.appendChild(h('li', 'none', `no evidence listed (the utterance #${a.seq} raised it)`));
      return ol;
    }
    for (const e of a.evidence) {
      const li = h('li', 'ev');
      li.dataset.seq = String(e.seq);
      li.append(h('span', 'seq', `#${e.seq}`),
        h('span', `chip ${emoClass(String(e.emotion ?? '?'))}`, `${e.emotion ?? '?'} ${pct(e.probability)}`),
        h('span', 'sent', `sentiment ${S.signed(e.sentiment)}`));
      ol.appendChild(li);
    }
    return ol;
  }

  function openEvidence(key) {
    openAlertKey = openAlertKey === key ? null : key;
    detailView.scrollTo = openAlertKey !== null;
    detailDirty = true;
    schedule();
  }

  // ------------------------------------------------------------------ agent view
  function renderAgent(call) {
    const caller = call.caller;
    const side = caller && caller.role === 'unknown' ? 'caller (role unknown)' : 'customer';
    el['agent-state'].textContent = call.ended ? 'ended' : call.idle ? 'idle' : 'live';
    el['agent-state'].className = `state-pill ${call.ended ? 'ended' : call.idle ? 'idle' : 'live'}`;
    el.agent.querySelectorAll('.side-name').forEach((n) => { n.textContent = side; });
    if (!caller) {
      el['agent-emotion'].className = 'big';
      el['agent-emotion'].textContent = `waiting for the ${side} to speak`;
    } else {
      el['agent-emotion'].className = `big chip ${emoClass(caller.emotion)}`;
      el['agent-emotion'].textContent = `${caller.emotion} ${pct(caller.confidence)}`;
    }
    const now = call.sentiment.length ? call.sentiment[call.sentiment.length - 1].s : null;
    el['agent-sentiment'].textContent = now === null ? '–' : `${S.signed(now)} ${S.sentimentWord(now)}`;
    el['agent-sentiment'].dataset.value = now === null ? '' : now.toFixed(2);
    const t = callerTrend(call);
    const tw = S.trendWord(call.sentiment.length > 1 ? t : NaN);
    el['agent-trend'].textContent = call.sentiment.length > 1 ? `${tw.arrow} ${tw.word} (${S.signed(t)})` : '–';
    el['agent-trend'].dataset.word = tw.word;
    el['agent-spark'].replaceChildren(sparkOf(call, 480, 96));
    const open = S.openAlerts(call.alerts, call.maxSeq, call.ended);
    el['agent-alerts'].textContent = open.length
      ? `⚠ ${plural(open.length, 'open alert')}: ${alertText(open[open.length - 1])}` : '';
    el['agent-alerts'].hidden = !open.length;
  }

  // ------------------------------------------------------------------ connection
  const conn = {
    token: null,
    claims: null,
    ws: null,
    attempt: 0,
    openedAt: 0,
    timer: null,
    stopped: false,
    mode: null,         // 'all' | 'named' once subscribed
    named: [],          // ids to subscribe to when "all" is not granted
    snapQueue: new Set(),
    snapInflight: null, // {id, ids, remaining: Set, keep, sentAt}
    snapTimer: null,
    requestSeq: 0,
    allSnap: null,      // {left, msgs}: the "all" snapshots still to come, gathered
  };

  function readToken() {
    const params = new URLSearchParams(location.search);
    let token = params.get('token');
    const named = (params.get('calls') || '').split(',').map((s) => s.trim()).filter(Boolean);
    if (token) {
      // Out of the address bar (history, screen shares); this tab keeps it for reloads.
      try { sessionStorage.setItem('cfnesa.token', token); } catch { /* storage off */ }
      params.delete('token');
      const rest = params.toString();
      history.replaceState(null, '', location.pathname + (rest ? `?${rest}` : '') + location.hash);
    } else {
      try { token = sessionStorage.getItem('cfnesa.token'); } catch { token = null; }
    }
    conn.token = token;
    conn.claims = token ? decodeClaims(token) : null;
    const fromToken = conn.claims && Array.isArray(conn.claims.conversations)
      ? conn.claims.conversations.filter((p) => typeof p === 'string' && !/[*?[]/.test(p)) : [];
    conn.named = [...new Set([...named, ...fromToken])];
    // A token for one call alone (an agent's): that call, large, and nothing else.
    const c = conn.claims;
    api.agentView = Boolean(c && c.all !== true && Array.isArray(c.conversations)
      && c.conversations.length === 1 && fromToken.length === 1 && !named.length);
    if (api.agentView) conn.named = fromToken;
  }

  function decodeClaims(token) {
    // The payload is readable by design (auth.py); only the server can verify it.
    try {
      const seg = token.split('.')[0].replace(/-/g, '+').replace(/_/g, '/');
      const json = atob(seg + '='.repeat((4 - (seg.length % 4)) % 4));
      const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(json, (c) => c.charCodeAt(0))));
      return claims && typeof claims === 'object' ? claims : null;
    } catch {
      return null;
    }
  }

  function setStatus(state, text) {
    api.status = state;
    el.status.dataset.state = state;
    el['status-text'].textContent = text;
    document.body.classList.toggle('stale', state !== 'live');
  }

  function banner(text, kind = 'error', key = '') {
    el.banner.dataset.key = key;
    if (!text) {
      el.banner.hidden = true;
      return;
    }
    el.banner.hidden = false;
    el.banner.dataset.kind = kind;
    el.banner.textContent = text;
  }

  function stop(text) {
    conn.stopped = true;
    clearTimeout(conn.timer);
    api.connected = false;
    setStatus('stopped', 'not connected');
    banner(text);
  }

  function tokenExpired() {
    const exp = conn.claims && typeof conn.claims.exp === 'number' ? conn.claims.exp : null;
    return exp !== null && exp * 1000 <= Date.now();
  }

  function connect() {
    clearTimeout(conn.timer);
    if (conn.stopped || conn.ws) return;
    if (tokenExpired()) {
      stop('The token has expired: open the page again with a fresh ?token= (cfnesa token --tenant TENANT --all).');
      return;
    }
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const url = `${scheme}//${location.host}/ws?token=${encodeURIComponent(conn.token)}`;
    setStatus(conn.attempt ? 'reconnecting' : 'connecting',
      conn.attempt ? `reconnecting (attempt ${conn.attempt + 1})…` : 'connecting…');
    let ws;
    try {
      ws = new WebSocket(url);
    } catch {
      scheduleReconnect();
      return;
    }
    conn.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      conn.openedAt = Date.now();
      setStatus('subscribing', 'subscribing…');
      if (api.agentView) {
        subscribeNamed();
        return;
      }
      // Always ask for "all": the gateway decides (a "forbidden" error falls back to named calls).
      send({ op: 'subscribe', all: true, id: 'all' });
    };
    ws.onmessage = (m) => onMessage(m.data);
    ws.onerror = () => { /* a close event follows */ };
    ws.onclose = (ev) => {
      if (conn.ws !== ws) return;
      conn.ws = null;
      api.connected = false;
      conn.mode = null;
      conn.snapInflight = null;
      conn.snapQueue.clear();
      conn.allSnap = null;
      onClosed(ev, opened);
    };
  }

  async function onClosed(ev, opened) {
    if (conn.stopped) return;
    if (ev.code === 4001) {
      stop('The token has expired (the gateway closed the connection): open the page with a fresh ?token=.');
      return;
    }
    if (opened && Date.now() - conn.openedAt > 10000) conn.attempt = 0;
    if (ev.code === 4008) {
      banner('The dashboard fell behind the event stream (closed with 4008, too slow); '
        + 'reconnecting and resyncing.', 'warn', 'behind');
    }
    if (!opened) {
      // The browser hides a refused handshake's HTTP status; ask for it once.
      const reason = await refusedReason();
      if (reason) {
        stop(`The gateway refused the token (${reason}). Mint a new one (cfnesa token --tenant TENANT --all) and open /?token=….`);
        return;
      }
    }
    scheduleReconnect();
  }

  async function refusedReason() {
    try {
      const res = await fetch(`/ws?token=${encodeURIComponent(conn.token)}`, { cache: 'no-store' });
      if (res.status !== 401) return null;
      const body = await res.json().catch(() => ({}));
      return body.reason || 'unauthorized';
    } catch {
      return null; // the gateway is down: keep trying
    }
  }

  function scheduleReconnect() {
    if (conn.stopped) return;
    const base = Math.min(CONFIG.backoffMaxMs, CONFIG.backoffMinMs * 2 ** conn.attempt);
    const delay = Math.min(CONFIG.backoffMaxMs, base * (0.8 + 0.4 * Math.random()));
    conn.attempt++;
    setStatus('reconnecting', `reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${conn.attempt})…`);
    clearTimeout(conn.timer);
    conn.timer = setTimeout(connect, delay);
  }

  function send(obj) {
    if (conn.ws && conn.ws.readyState === WebSocket.OPEN) {
      conn.ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  function goLive() {
    api.connected = true;
    const scope = conn.mode === 'all' ? 'all calls'
      : api.agentView ? `call ${conn.named[0]}` : plural(conn.named.length, 'call');
    const tenant = conn.claims && typeof conn.claims.tenant === 'string' ? ` · tenant ${conn.claims.tenant}` : '';
    setStatus('live', `live · ${scope}${tenant}`);
    if (!rowMarksDone.has('connected')) {
      rowMarksDone.add('connected');
      performance.mark('cfnesa:connected');
    }
    if (el.banner.dataset.key === 'behind') banner(null);
  }

  function subscribeNamed() {
    conn.mode = 'named';
    if (!conn.named.length) {
      stop('This token does not allow subscribing to all calls (forbidden), and names no call ids '
        + 'that can be listed. Mint a token with --all, or add ?calls=id1,id2 to the address.');
      return;
    }
    goLive();
    for (const cid of conn.named) requestSnapshot(cid);
    flushSnapshots();
  }

  function onMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'emotion':
      case 'alert':
      case 'summary':
        applyEvent(msg, false);
        break;
      case 'snapshot':
        onSnapshot(msg);
        break;
      case 'subscribed':
        if (msg.all) onSubscribedAll(msg);
        break;
      case 'error':
        onServerError(msg);
        break;
      default:
        break; // unsubscribed, and anything newer
    }
  }

  function onServerError(msg) {
    const inflight = conn.snapInflight;
    if (msg.id === 'all' && msg.code === 'forbidden') {
      const patterns = conn.claims && Array.isArray(conn.claims.conversations)
        ? conn.claims.conversations.filter((p) => /[*?[]/.test(p)) : [];
      const shown = conn.named.length ? `showing only the calls it names (${conn.named.join(', ')})` : '';
      const hidden = patterns.length ? `; its patterns (${patterns.join(', ')}) cannot be listed` : '';
      if (conn.named.length) {
        banner(`This token does not allow subscribing to all calls (forbidden): ${shown}${hidden}. `
          + 'For every call, mint a token with --all.', 'warn', 'forbidden');
      }
      subscribeNamed();
      return;
    }
    if (inflight && msg.id === inflight.id) {
      conn.snapInflight = null;
      if (msg.code === 'unavailable') {
        for (const cid of inflight.ids) conn.snapQueue.add(cid); // Redis hiccup: ask again
        clearTimeout(conn.snapTimer);
        conn.snapTimer = setTimeout(flushSnapshots, 2000);
      } else {
        flushSnapshots();
      }
      if (msg.code === 'forbidden' && conn.mode === 'named') {
        banner(`The token does not cover ${(msg.conversations || []).join(', ') || 'some calls'} (forbidden).`);
      }
      return;
    }
    console.warn('gateway error', msg);
  }

  function requestSnapshot(cid) {
    const inflight = conn.snapInflight;
    if (conn.snapQueue.has(cid) || (inflight && inflight.remaining.has(cid))) return;
    conn.snapQueue.add(cid);
    if (!conn.snapTimer) conn.snapTimer = setTimeout(flushSnapshots, CONFIG.snapshotBatchMs);
  }

  function flushSnapshots() {
    clearTimeout(conn.snapTimer);
    conn.snapTimer = null;
    const inflight = conn.snapInflight;
    if (inflight && Date.now() - inflight.sentAt < 15000) return; // one request at a time
    if (!conn.mode || !conn.snapQueue.size) return;
    const ids = [];
    let bytes = 64;
    for (const cid of conn.snapQueue) {
      const size = new Blob([cid]).size + 3;
      if (ids.length && (ids.length >= CONFIG.snapshotIdsPerFrame || bytes + size > CONFIG.snapshotFrameBytes)) break;
      ids.push(cid);
      bytes += size;
    }
    for (const cid of ids) conn.snapQueue.delete(cid);
    const id = `snap-${++conn.requestSeq}`;
    conn.snapInflight = { id, ids, remaining: new Set(ids), keep: conn.mode === 'named', sentAt: Date.now() };
    if (!send({ op: 'subscribe', conversations: ids, id })) conn.snapInflight = null;
  }

  function onSubscribedAll(msg) {
    conn.mode = 'all';
    const count = (n) => (typeof n === 'number' && n > 0 ? n : 0);
    api.allSnapshot = {
      active: count(msg.active), snapshots: count(msg.snapshots),
      truncated: msg.truncated === true, ended: count(msg.ended),
    };
    const left = api.allSnapshot.snapshots + api.allSnapshot.ended;
    if (left) {
      conn.allSnap = { left, msgs: [] }; // applied together once all are in
    } else {
      afterAllSnapshot(new Set());
    }
    if (api.allSnapshot.truncated) {
      banner(`Showing the ${api.allSnapshot.snapshots} most recently active of ${api.allSnapshot.active} `
        + 'calls in progress; the others appear when they next speak.', 'warn', 'truncated');
    } else if (el.banner.dataset.key === 'truncated') {
      banner(null);
    }
  }

  function applyAllSnapshot() {
    const { msgs } = conn.allSnap;
    conn.allSnap = null;
    const covered = new Set();
    // Calls in progress come most recently active first; ended ones latest first, so
    // they are applied oldest first (each ended row goes on top of the list).
    const live = msgs.filter((m) => m.ended !== true);
    const ended = msgs.filter((m) => m.ended === true).reverse();
    for (const m of [...live, ...ended]) {
      covered.add(m.conversation_id);
      if (Array.isArray(m.events)) for (const ev of m.events) applyEvent(ev, true);
    }
    afterAllSnapshot(covered);
  }

  function afterAllSnapshot(covered) {
    goLive();
    if (!rowMarksDone.has('all-snapshot')) {
      rowMarksDone.add('all-snapshot');
      performance.mark('cfnesa:all-snapshot');
    }
    // Resume: a call still active that the snapshot did not cover may have missed events.
    for (const call of calls.values()) if (!call.ended && !covered.has(call.id)) requestSnapshot(call.id);
    flushSnapshots();
  }

  function onSnapshot(msg) {
    if (conn.allSnap) {
      conn.allSnap.msgs.push(msg);
      if (--conn.allSnap.left === 0) applyAllSnapshot();
      return;
    }
    const cid = msg.conversation_id;
    if (Array.isArray(msg.events)) {
      for (const ev of msg.events) applyEvent(ev, true);
    }
    const inflight = conn.snapInflight;
    if (!inflight || !inflight.remaining.delete(cid) || inflight.remaining.size) return;
    conn.snapInflight = null;
    if (!inflight.keep) {
      // "all" carries the live events; the id subscriptions were only for the snapshots.
      send({ op: 'unsubscribe', conversations: inflight.ids, id: `un-${inflight.id}` });
    }
    flushSnapshots();
  }

  // ------------------------------------------------------------------ housekeeping
  function tick() {
    rate = api.eventsSeen - ratePrev;
    ratePrev = api.eventsSeen;
    countersDirty = true;
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
      if (row) select(row.dataset.id === selectedId ? null : row.dataset.id);
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
      openAlertKey = null;
      openEvidence(btn.dataset.key); // the feed's alert opens with its evidence
      const call = calls.get(id);
      if (call && call.view) call.view.row.scrollIntoView({ block: 'nearest' });
    });
    el['detail-alerts'].addEventListener('click', (e) => {
      const btn = e.target.closest('button.alert-open');
      if (btn) openEvidence(btn.dataset.key);
    });
    el['detail-close'].addEventListener('click', () => {
      const id = selectedId;
      select(null);
      calls.get(id)?.view?.row.focus();
    });
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && selectedId) select(null);
    });
    el.filter.addEventListener('input', () => {
      filterText = el.filter.value.trim().toLowerCase();
      refilter();
    });
    el['alerts-only'].addEventListener('change', () => {
      alertsOnly = el['alerts-only'].checked;
      refilter();
    });
    el.sort.addEventListener('change', () => {
      sortMode = el.sort.value;
      orderDirty = true;
      lastSortAt = 0;
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
    bindInput();
    observeLongTasks();
    readToken();
    if (api.agentView) {
      document.body.classList.add('agent-mode');
      el.main.hidden = true;
      el.agent.hidden = false;
      el['agent-call'].textContent = conn.named[0];
    }
    setInterval(tick, 1000);
    if (!conn.token) {
      stop('No token: open this page as /?token=… (mint one with: cfnesa token --tenant TENANT --all).');
      return;
    }
    connect();
  }

  // Exposed for tests and for the console.
  api.select = (cid) => select(cid);
  api.applyEvent = (ev) => applyEvent(ev, false);

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
