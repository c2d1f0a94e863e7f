/* cfnesa dashboard: the side panel. The recent alerts feed, and the selected call's
 * details: state, speakers, sentiment, summary, its alerts (each a button that lists
 * the alert's evidence and marks those utterances) and its utterances.
 */

import { el, h, emoClass } from './dom.js';
import { pct, num2, clock, speakerOrder, alertText } from './format.js';
import {
  CONFIG, calls, feed, ui, schedule, callerTrend, utteranceIndex,
} from './store.js';
import { markSelected, roleChip, sparkOf, summaryText } from './rows.js';

const S = window.cfnesaSentiment;

export function renderFeed() {
  ui.feedDirty = false;
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

/** Show a call in the detail panel (null closes it). */
export function select(cid) {
  if (ui.selectedId && calls.get(ui.selectedId)?.view) markSelected(calls.get(ui.selectedId).view.row, false);
  if (cid !== ui.selectedId) ui.openAlertKey = null;
  ui.selectedId = cid;
  detailView.cid = null;
  if (cid && calls.get(cid)?.view) markSelected(calls.get(cid).view.row, true);
  ui.detailDirty = true;
  schedule();
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

export function renderDetail() {
  ui.detailDirty = false;
  const call = ui.selectedId ? calls.get(ui.selectedId) : null;
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
    btn.setAttribute('aria-expanded', String(ui.openAlertKey === key));
    btn.title = 'show the utterances that raised it';
    btn.append(h('span', `badge sev-${a.severity}`, a.severity), h('span', 'seq', `#${a.seq}`),
      h('span', 'what', alertText(a)), h('time', 'when', clock(a.at)));
    li.appendChild(btn);
    if (a.detail) li.title = a.detail;
    if (ui.openAlertKey === key) {
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

/** Show (or, when it is open, hide) an alert's evidence in the detail panel. */
export function openEvidence(key) {
  ui.openAlertKey = ui.openAlertKey === key ? null : key;
  detailView.scrollTo = ui.openAlertKey !== null;
  ui.detailDirty = true;
  schedule();
}
