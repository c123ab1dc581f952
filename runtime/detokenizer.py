"""Incremental detokenization and stop strings, per sequence (plain Python).

Decoding token by token breaks multi-byte characters and, for SentencePiece tokenizers, the
spaces between words. So each new piece is decoded with a few tokens of context (from
`prefix` on) and emitted only once it no longer ends in an incomplete character (U+FFFD):

    tokens:  ... | prefix ... read | new ...
    text  += decode(tokens[prefix:]) minus decode(tokens[prefix:read])

Stop strings are searched in the text; a match ends the sequence and is cut off with what
follows. While a stop string could still be completing, its possible beginning is held back
from streaming, so the chunks emitted always concatenate to the final text.
"""

from __future__ import annotations

_CONTEXT = 5


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: list[str] = (), lazy: bool = False):
        """lazy: nobody reads the text before the sequence ends (no streaming) and there are no
        stop strings, so `push` only collects tokens and `flush` decodes them once."""
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""          # the sequence's output text so far (stop string removed)
        self.sent = 0           # how much of it has been handed out as deltas
        self.stop = list(stop)
        self.stopped = False    # a stop string matched
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.lazy = lazy and not self.stop

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int, check_stop: bool = True) -> bool:
        """Add a generated token; returns True when a stop string matched (the text is then cut
        before it). With check_stop False (min_tokens not reached) stop strings are ignored."""
        if self.tokenizer is None:
            return False
        self.ids.append(token)
        if self.lazy:
            return False
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return False  # an incomplete character (or nothing visible yet): wait for more bytes
        start = len(self.text)
        self.text += after[len(before):]
        self.prefix, self.read = max(self.read - _CONTEXT, 0), len(self.ids)
        if len(self.ids) > 4 * _CONTEXT:  # keep the window short
            drop = self.prefix
            self.ids, self.prefix, self.read = self.ids[drop:], 0, self.read - drop
        return check_stop and self._check_stop(start)

    def _check_stop(self, start: int) -> bool:
        for s in self.stop:
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i >= 0:
                self.text = self.text[:i]
                self.stopped = True
                return True
        return False

    def flush(self) -> None:
        """The sequence ended: whatever was held back (an incomplete tail, a possible stop
        string's beginning) becomes text, unless a stop string already cut it."""
        self._hold = 0
        if self.tokenizer is None or self.stopped:
            return
        if self.lazy:  # everything since the prompt's tail, decoded once with that tail as context
            self.text = self._decode(self.ids)[len(self._decode(self.ids[:self.read])):]
            self.lazy = False
            self.prefix = self.read = len(self.ids)
            return
        rest = self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        if rest:
            start = len(self.text)
            self.text += rest
            self._check_stop(start)

    def delta(self) -> str:
        """Text not handed out yet, minus a tail that might still become a stop string."""
        end = max(self.sent, len(self.text) - self._hold)
        out, self.sent = self.text[self.sent:end], end
        return out
