"""Token ids to text as they arrive: the new text of each token, held back while it might still become a stop
string or an incomplete UTF-8 character, and cut at the first stop string."""

from __future__ import annotations


class IncrementalText:
    """Feed generated token ids one at a time; each `push` returns the text that is final so far and whether a
    stop string ended the generation. Decodes the whole generation each time (outputs are short; this keeps the
    tokenizer's own joining rules, e.g. SentencePiece's leading spaces, exactly as in a one-shot decode)."""

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""  # the final text once stopped or finished
        self.stopped = False

    def decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """-> (new final text, stopped by a stop string)."""
        if self.stopped:
            return "", True
        self.ids.append(token)
        text = self.decode()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self.take(text[:cut]), True
        hold = 1 if text.endswith("\ufffd") else 0  # an incomplete multi-byte character
        for s in self.stop:  # the longest tail of the text that begins a stop string
            hold = max(hold, next((n for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])), 0))
        return self.take(text[:len(text) - hold], final=False), False

    def finish(self) -> str:
        """The rest of the text when the generation ended without a stop string."""
        return "" if self.stopped else self.take(self.decode())

    def take(self, text: str, final: bool = True) -> str:
        if final:
            self.text = text
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new
