/* cfnesa dashboard: the connection to the gateway, its protocol, and the page's status.
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
 * subscription keeps the live events coming). A token without "all" falls back to
 * the calls it names (or ?calls=id1,id2); one that names exactly one call opens the
 * agent view (agent.js).
 */

import { el } from './dom.js';
import { plural } from './format.js';
import { CONFIG, api, calls, applyEvent, markOnce } from './store.js';

export const conn = {
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

/** The token (address bar or this tab's storage), its claims, and the calls it names. */
export function readToken() {
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

/** Give up for good, saying why in the banner. */
export function stop(text) {
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

export function connect() {
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
  markOnce('connected');
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

/** Queue a call for a snapshot by id (sent in batches, one request at a time). */
export function requestSnapshot(cid) {
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
  markOnce('all-snapshot');
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
