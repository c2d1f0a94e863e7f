/* cfnesa dashboard: the agent view. A token scoped to exactly one call opens that call
 * alone, large: the customer's current emotion, sentiment and trend, a large sparkline
 * and the open alerts; no agent emotions.
 */

import { el, emoClass } from './dom.js';
import { pct, plural, alertText } from './format.js';
import { callerTrend } from './store.js';
import { sparkOf } from './rows.js';

const S = window.cfnesaSentiment;

/** Swap the call lists for the agent view of one call. */
export function showAgentView(cid) {
  document.body.classList.add('agent-mode');
  el.main.hidden = true;
  el.agent.hidden = false;
  el['agent-call'].textContent = cid;
}

export function renderAgent(call) {
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
