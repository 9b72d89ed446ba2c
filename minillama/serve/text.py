"""One answer's text as its tokens arrive: UTF-8-safe incremental decoding, cut at the first stop string."""

from __future__ import annotations

from ..tokenizer.tokenizer import StreamDecoder


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is the start of some stop string (it may still become one)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """push(token) returns the text that is now final; a possible stop-string start is held back until known.

    The pieces concatenate to the answer's text up to (not including) the first stop string.
    """

    def __init__(self, tok, stops: list[str] = ()):
        self.decoder = StreamDecoder(tok)
        self.stops = [s for s in stops if s]
        self.pending = ""  # decoded text not yet handed out: it may be the start of a stop string
        self.text = ""  # everything handed out
        self.stopped = False  # a stop string was found; nothing more comes out

    def push(self, token: int) -> str:
        return self._emit(self.decoder.push(token), final=False)

    def finish(self, cut: bool) -> str:
        """The held-back rest. cut: the answer ran out of tokens, so an incomplete last character is dropped
        (decoding it would give U+FFFD)."""
        return self._emit("" if cut else self.decoder.flush(), final=True)

    def _emit(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        buf = self.pending + new
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = buf[:min(hits)], "", True
        else:
            keep = 0 if final else _held_back(buf, self.stops)
            out, self.pending = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out
