"""Per-sequence stop conditions and incremental text: eos, stop token ids, stop strings,
max_tokens, the context length, min_tokens."""
from __future__ import annotations

from atom_jax.sequence import Sequence
from atom_jax.tokenizer import IncrementalDetokenizer


class SequenceOutput:
    def __init__(self, seq: Sequence, tokenizer, eos_token_ids, max_model_len: int):
        self.seq = seq
        self.params = seq.params
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.detok = IncrementalDetokenizer(tokenizer, seq.token_ids, seq.params.skip_special_tokens)
        self.text = ""
        self.sent = 0  # characters of text already handed out
        # Hold back enough characters that a stop string split across steps is never streamed.
        self.holdback = max((len(s) for s in self.params.stop), default=1) - 1

    def append(self, token: int, index: int) -> tuple[str, str | None, int | str | None]:
        """Account for the token at position `index` of the sequence (later ones may still be
        in flight): -> (new text to hand out, finish reason, stop reason)."""
        seq, p = self.seq, self.params
        n_out = index + 1 - seq.num_prompt_tokens
        can_stop = n_out >= p.min_tokens
        reason, stop_reason = None, None
        if can_stop and not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif can_stop and token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        if reason is None:
            self.text += self.detok.add(token)
            if can_stop and p.stop:
                reason, stop_reason = self._check_stop_strings()
        if reason is None and (n_out >= seq.max_tokens or index + 1 >= self.max_model_len):
            reason = "length"
            self.text += self.detok.flush()
        return self._take(final=reason is not None), reason, stop_reason

    def _check_stop_strings(self):
        for stop in self.params.stop:
            # A new match can only start in the tail the last token could have touched.
            start = max(0, self.sent - len(stop))
            idx = self.text.find(stop, start)
            if idx != -1:
                end = idx + len(stop) if self.params.include_stop_str_in_output else idx
                self.text = self.text[:end]
                return "stop", stop
        return None, None

    def _take(self, final: bool) -> str:
        upto = len(self.text) if final else max(self.sent, len(self.text) - self.holdback)
        new, self.sent = self.text[self.sent:upto], upto
        return new
