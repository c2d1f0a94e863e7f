/* cfnesa dashboard: numbers, times and alerts as short text. Pure functions. */

export const pct = (p) => (typeof p === 'number' ? `${Math.round(p * 100)}%` : '–');
export const num2 = (p) => (typeof p === 'number' ? p.toFixed(2) : '–');
export function clock(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? '' : d.toTimeString().slice(0, 8);
}
export function duration(seconds) {
  if (typeof seconds !== 'number' || !Number.isFinite(seconds)) return '–';
  const s = Math.round(seconds);
  const m = Math.floor(s / 60);
  return m ? `${m}m ${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}
export const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;
/** Speakers in a stable order: the agent, the customer, then the others by name. */
export function speakerOrder(a, b) {
  const rank = (s) => (s === 'agent' ? 0 : s === 'customer' ? 1 : 2);
  return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
}
export function alertText(a) {
  const move = a.from || a.to ? ` ${a.from ?? '?'}→${a.to ?? '?'}` : '';
  const p = typeof a.p_shift === 'number' ? ` p=${num2(a.p_shift)}` : '';
  return `${a.rule.replace(/_/g, ' ')} · ${a.speaker}${move}${p}`;
}
