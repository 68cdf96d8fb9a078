"""The default save-error policy written in Python: the same settings and the same decisions
as plugins/default-policy (Rust). Built into a component with componentize-py:

    componentize-py -d ../../wit -w save-error-policy componentize app -o policy.wasm

and tested with the same scenarios as the Rust policy:

    parley plugin test policy.wasm --scenario ../../plugins/default-policy/scenarios/close.toml
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.policy import Decision_Close, Decision_Continue, Decision_Retry, ErrorKind
from wit_world.imports.log import Level, log

RULES = {"resend_attempts": 2, "resend_delay_ms": 500, "close": True}


class Policy(exports.Policy):
    def configure(self, settings):
        for key, value in settings:
            if key in ("resend_attempts", "resend_delay_ms"):
                try:
                    RULES[key] = int(value)
                except ValueError:
                    raise Err(f"{key}: not a number: {value}")
            elif key == "on_error":
                if value not in ("close", "continue"):
                    raise Err(f'on_error: expected "close" or "continue", got "{value}"')
                RULES["close"] = value == "close"
            else:
                raise Err(f'unknown setting "{key}"')

    def decide(self, failures):
        decisions = []
        for f in failures:
            retryable = f.error_kind not in (ErrorKind.INVALID, ErrorKind.STALE_EPOCH)
            if retryable and f.attempt <= RULES["resend_attempts"]:
                decisions.append(Decision_Retry(RULES["resend_delay_ms"]))
            elif RULES["close"]:
                log(Level.WARN, f"closing chat {f.chat_id} after {f.attempt} failed saves: {f.message}")
                decisions.append(Decision_Close(f"The transcript could not be saved ({f.message})."))
            else:
                decisions.append(Decision_Continue(f"The transcript could not be saved ({f.message}); please resend."))
        return decisions
