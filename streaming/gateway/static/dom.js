/* cfnesa dashboard: the page's elements, element creation and the emotion colour classes
 * (a label's first use adds its class, and its chip in the legend).
 */

// ------------------------------------------------------------------ DOM
const $ = (id) => document.getElementById(id);

/** The page's elements by id, filled in by bindDom(). */
export const el = {};

export function bindDom() {
  for (const id of ['status', 'status-text', 'n-active', 'n-ended', 'n-alerts', 'n-rate',
    'filter', 'alerts-only', 'sort', 'banner', 'legend', 'empty-active', 'active', 'ended',
    'max-ended', 'detail', 'detail-title', 'detail-close', 'detail-meta', 'detail-alerts',
    'detail-count', 'detail-utterances', 'feed', 'empty-feed', 'agent', 'agent-call',
    'agent-state', 'agent-emotion', 'agent-sentiment', 'agent-trend', 'agent-spark',
    'agent-alerts', 'main']) {
    el[id] = $(id);
  }
}

export function h(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------ emotion colours
// Colours of these live in style.css (.e-<name>); other labels get a generated hue.
const KNOWN_EMOTIONS = new Set([
  'neutral', 'joy', 'happy', 'excited', 'surprise', 'sadness', 'sad', 'fear', 'disgust',
  'anger', 'angry', 'frustrated', 'frustration', 'positive', 'negative',
]);
const emoClassCache = new Map();
let dynamicSheet = null;

/** The class that colours an emotion label; a label's first use adds it to the legend. */
export function emoClass(name) {
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
