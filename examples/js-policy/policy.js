// The default save-error policy written in JavaScript: the same settings and the same
// decisions as plugins/default-policy (Rust). `node build.mjs policy.wasm` builds the
// component with componentize-js; `parley plugin test policy.wasm --scenario
// ../../plugins/default-policy/scenarios/close.toml` checks it.

import { log } from 'parley:plugin/log@0.1.0';

const rules = { resendAttempts: 2, resendDelayMs: 500, close: true };

function number(key, value) {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw `${key}: not a number: ${value}`;
  return n;
}

export const policy = {
  configure(settings) {
    for (const [key, value] of settings) {
      if (key === 'resend_attempts') rules.resendAttempts = number(key, value);
      else if (key === 'resend_delay_ms') rules.resendDelayMs = number(key, value);
      else if (key === 'on_error') {
        if (value !== 'close' && value !== 'continue') throw `on_error: expected "close" or "continue", got "${value}"`;
        rules.close = value === 'close';
      } else throw `unknown setting "${key}"`;
    }
  },

  decide(failures) {
    return failures.map((f) => {
      const retryable = f.errorKind !== 'invalid' && f.errorKind !== 'stale-epoch';
      if (retryable && f.attempt <= rules.resendAttempts) return { tag: 'retry', val: rules.resendDelayMs };
      if (rules.close) {
        log('warn', `closing chat ${f.chatId} after ${f.attempt} failed saves: ${f.message}`);
        return { tag: 'close', val: `The transcript could not be saved (${f.message}).` };
      }
      return { tag: 'continue', val: `The transcript could not be saved (${f.message}); please resend.` };
    });
  },
};
