"""A scripted `SessionModel` for coordinator tests whose outcome must be known in advance.

`ScriptedModel` keeps real sessions (token lists: open, append, fork, truncate, close behave
as the engine's do) but writes what its script says and scores what its scorer says, over
the zoo's character tokenizer (one token per character). So a test can decide who writes
what, where a gate fires, and which search beam the guides prefer, and assert it exactly.

    writer = ScriptedModel("w", text="Hello there")       # writes the text, then its end token
    pauser = ScriptedModel("w", text="Hello| there|")     # "|": an end token mid-text
    seeded = ScriptedModel("p", chunk=lambda seed: "ab"[seed % 2] * 4)  # a chunk per seed
    guide = ScriptedModel("g", score=lambda text: 1.0 if "a" in text else 0.0)
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable

from antiphon.checkpoint import tokenizer_fingerprint
from antiphon.errors import InvalidRequest, PromptTooLong, SessionLost
from antiphon.messages import Generation, ModelInfo, SamplingParams, SessionInfo
from antiphon.zoo.tokenizer import build_char_tokenizer

TOKENIZER = build_char_tokenizer()
PROMPT = "Once upon a time, "  # the prompt of `tests.factories.make_request`
EOS = TOKENIZER.eos_token_id
_ids = itertools.count()


def encode(text: str) -> list[int]:
    return list(TOKENIZER(text, add_special_tokens=False)["input_ids"])


def decode(ids: list[int] | tuple[int, ...]) -> str:
    return TOKENIZER.decode(list(ids), skip_special_tokens=True)


class ScriptedModel:
    """A `SessionModel` that writes from a script. `text`: every write continues this text
    where the response written so far (all writers) has got to, up to the next "|" (an end
    token, not a character of the response) or the end (then an end token);
    `chunk(seed)`: every write is this text (cut to the call's budget), whatever came before;
    `gate(text_so_far)`: the gate value before each token (stop at the threshold);
    `score(text)`: log p of a scored continuation (spread evenly over its tokens)."""

    def __init__(
        self,
        name: str,
        *,
        text: str | None = None,
        chunk: Callable[[int | None], str] | None = None,
        gate: Callable[[str], float] | None = None,
        score: Callable[[str], float] | None = None,
        max_context: int = 512,
        prompt: str = PROMPT,
    ) -> None:
        self.name = name
        self.prompt = prompt  # what every session starts with; the response follows it
        self.text, self.chunk, self.gate, self.scorer = text, chunk, gate, score
        self.max_context = max_context
        self.sessions: dict[str, list[int]] = {}
        self.calls: Counter[str] = Counter()

    async def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            vocab_size=len(TOKENIZER),
            max_context=self.max_context,
            eos_token_ids=(EOS,),
            tokenizer_fingerprint=tokenizer_fingerprint(TOKENIZER),
            device="cpu",
            dtype="float32",
            gate_fingerprint="" if self.gate is None else f"fake-gate-{self.name}",
        )

    def _tokens(self, session_id: str) -> list[int]:
        if session_id not in self.sessions:
            raise SessionLost(f"unknown session {session_id!r} on {self.name!r}")
        return self.sessions[session_id]

    def _new(self, ids: list[int]) -> str:
        if not ids:
            raise InvalidRequest("prompt is empty")
        if len(ids) > self.max_context:
            raise PromptTooLong(f"{len(ids)} tokens > {self.max_context}")
        sid = f"{self.name}-{next(_ids)}"
        self.sessions[sid] = list(ids)
        return sid

    async def open(self, prompt: list[int] | str) -> SessionInfo:
        self.calls["open"] += 1
        ids = list(TOKENIZER(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
        return SessionInfo(self._new(ids), len(ids))

    async def append(self, session_id: str, token_ids: list[int]) -> SessionInfo:
        self.calls["append"] += 1
        tokens = self._tokens(session_id)
        tokens += token_ids
        return SessionInfo(session_id, len(tokens))

    async def generate(
        self, session_id: str | None, params: SamplingParams, prefix_ids: list[int] = ()
    ) -> Generation:
        self.calls["generate"] += 1
        if session_id is None:
            session_id = self._new(list(prefix_ids))
        else:
            self._tokens(session_id).extend(prefix_ids)
        tokens = self.sessions[session_id]
        plan = self._plan(session_id, params)
        written: list[int] = []
        gates: list[float] = []
        finish = "length"
        for token in plan:
            if self.gate is not None:
                gates.append(self.gate(self._response(session_id)))
                threshold = params.gate_threshold_at(len(written))
                if threshold is not None and threshold < 1.0 and gates[-1] >= threshold:
                    finish = "gate"
                    break
            tokens.append(token)
            written.append(token)
            if token == EOS and not params.ignore_eos:
                finish = "eos"
                break
            if len(written) >= params.max_new_tokens or len(tokens) >= self.max_context:
                break
        return Generation(
            session_id=session_id,
            token_ids=tuple(written),
            text=decode(written),
            logprobs=tuple(-1.0 for _ in written),
            gates=tuple(gates),
            finish_reason=finish,
            length=len(tokens),
        )

    def _plan(self, session_id: str, params: SamplingParams) -> list[int]:
        """The tokens this write would produce, before gates, budget and end checks."""
        if self.chunk is not None:
            return encode(self.chunk(params.seed))
        response = self._response(session_id)
        assert self.text is not None and self.text.replace("|", "").startswith(response)
        i = seen = 0  # i: where the response ends in the marked-up text
        while seen < len(response):
            seen += self.text[i] != "|"
            i += 1
        rest = self.text[i:].lstrip("|") if i and self.text[i - 1] != "|" else self.text[i:]
        piece = rest.split("|", 1)[0]
        return encode(piece) + [EOS]

    def _response(self, session_id: str) -> str:
        """The session's text after the prompt: what the writers have written so far."""
        text = decode(self.sessions[session_id])
        assert text.startswith(self.prompt), (text, self.prompt)
        return text[len(self.prompt) :]

    async def score(self, session_id: str, token_ids: list[int], keep: bool = False) -> list[float]:
        self.calls["score"] += 1
        tokens = self._tokens(session_id)
        total = self.scorer(decode(token_ids)) if self.scorer is not None else 0.0
        if keep:
            tokens.extend(token_ids)
        return [total / max(1, len(token_ids))] * len(token_ids)

    async def fork(self, session_id: str, n: int, length: int | None = None) -> list[str]:
        self.calls["fork"] += 1
        tokens = self._tokens(session_id)
        return [self._new(list(tokens[:length])) for _ in range(n)]

    async def truncate(self, session_id: str, length: int) -> SessionInfo:
        self.calls["truncate"] += 1
        del self._tokens(session_id)[length:]
        return SessionInfo(session_id, length)

    async def close(self, session_id: str) -> None:
        self.calls["close"] += 1
        self.sessions.pop(session_id, None)
