"""The learned switcher of Switch Generation (`switch`): before each segment a causal LM reads
the query and the trace so far, each segment tagged with the model that wrote it, and the
next-token probabilities of the index tokens "0".."n-1" after the prompt give the
distribution over the n models of the ensemble (Feng et al., 2025).

    policy = build_policy("switch", {"switcher_path": "runs/switcher", "segment_len": 16},
                          ensemble=("base", "sft", "aligned"))

The switcher model runs in its own model deployment (`switcher_deployment`: any HF causal LM,
e.g. an 8B instruct model with a merged LoRA on its own GPU, served by
`antiphon.actors.server.build_model_deployment`), or, without one, in an engine in this
process (tests, local experiments). Each turn costs one model call:
`prompt_next_token_logprobs(prompt_ids, index_ids)`.

The pure part (prompt, tags, index-token ids, selection from a distribution) is plain
functions, used unchanged by the rollout labeller and the switcher trainer.

Stop at end of sequence is a parameter (`stop_at_eos`, default on): a writer's end token ends
the response. Off, it ends only the writer's segment and the switcher picks the next writer,
as in the reference code (which then produced empty segments; here a writer with nothing but
its end token to add ends the response).
"""

from __future__ import annotations

import math
import os
import random
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar, Literal, Protocol

from pydantic import Field
from transformers import PreTrainedTokenizerBase

from antiphon.checkpoint import load_tokenizer, resolve_checkpoint_path, weights_fingerprint
from antiphon.errors import InvalidRequest
from antiphon.messages import ModelInfo
from antiphon.policies.base import Decision, WriteSegment
from antiphon.policies.baselines import PolicyParams
from antiphon.sequence import SequenceView

MAX_CANDIDATES = 10  # index tokens are the single digits "0".."9"

# The switcher prompt. The suffix is the paper's ending; the rest is kept short because the
# zoo's switcher reads characters.
HEADER = "Models take turns writing one answer. Choose who writes the next part.\nQuery: {query}\n"
TRACE = "Answer so far: {trace}\n"
SUFFIX = "Respond with a number from 0 to {last}. The answer is model "


def tag_segment(index: int, text: str) -> str:
    """One segment of the trace, tagged with the index of the model that wrote it."""
    return f"<model {index} begins>{text}<model {index} ends>"


def tagged_trace(segments: Sequence[tuple[int, str]]) -> str:
    """The trace so far: (model index, text) per segment, in order."""
    return "".join(tag_segment(i, text) for i, text in segments)


def switcher_prompt(query: str, segments: Sequence[tuple[int, str]], n: int) -> str:
    """The whole switcher prompt as text (what `switcher_prompt_ids` tokenizes)."""
    _check_n(n)
    return (
        HEADER.format(query=query)
        + TRACE.format(trace=tagged_trace(segments))
        + SUFFIX.format(last=n - 1)
    )


def switcher_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    query: str,
    segments: Sequence[tuple[int, str]],
    n: int,
    max_len: int,
) -> list[int]:
    """Token ids of the switcher prompt, at most max_len of them: when it is too long the trace
    loses its oldest tokens (the query and the most recent segments are what decide)."""
    _check_n(n)
    head = tokenizer(HEADER.format(query=query))["input_ids"]  # with the bos token, if any
    trace = _encode(tokenizer, TRACE.format(trace=tagged_trace(segments)))
    tail = _encode(tokenizer, SUFFIX.format(last=n - 1))
    room = max_len - len(head) - len(tail)
    if room < 0:
        raise InvalidRequest(
            f"switcher prompt: the query alone takes {len(head) + len(tail)} tokens, more than "
            f"the switcher's context of {max_len}"
        )
    if len(trace) > room:
        trace = trace[len(trace) - room :] if room else []
    return head + trace + tail


def view_segments(view: SequenceView) -> list[tuple[int, str]]:
    """The view's committed segments as (index of the writer in the ensemble, text)."""
    return [(view.models.index(s.model), s.text) for s in view.segments]


def index_token_ids(tokenizer: PreTrainedTokenizerBase, n: int) -> list[int]:
    """Ids of the index tokens "0".."n-1"; each must be one token of the switcher's tokenizer."""
    _check_n(n)
    ids = []
    for i in range(n):
        enc = _encode(tokenizer, str(i))
        if len(enc) != 1:
            raise InvalidRequest(f"switcher tokenizer: index {i} is not a single token ({enc})")
        ids.append(enc[0])
    return ids


def normalise(logprobs: Sequence[float]) -> list[float]:
    """Probabilities over the candidates (the index tokens' probabilities, renormalised)."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def select(
    probs: Sequence[float], selection: Literal["argmax", "top_p"], top_p: float, rng: random.Random
) -> int:
    """The chosen index: the most likely (first of equals), or a draw from the smallest set of
    most likely candidates whose mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    if selection == "argmax":
        return order[0]
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return rng.choices(kept, weights=[probs[i] for i in kept])[0]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_n(n: int) -> None:
    if not 2 <= n <= MAX_CANDIDATES:
        raise InvalidRequest(f"the switcher picks among 2 to {MAX_CANDIDATES} models, got {n}")


# ----- the policy ------------------------------------------------------------------------


class IndexScorer(Protocol):
    """What the switcher needs from its model: the engine and the Serve client both have it."""

    async def info(self) -> ModelInfo: ...

    async def prompt_next_token_logprobs(
        self, prompt: list[int] | str, candidate_ids: list[int]
    ) -> list[float]: ...


class SwitchParams(PolicyParams):
    config_only: ClassVar[frozenset[str]] = frozenset(
        {"switcher_path", "switcher_deployment", "switcher_app"}
    )

    switcher_path: str = Field(
        min_length=1,
        description="The switcher checkpoint (local HF dir or 'zoo:NAME'); its tokenizer is "
        "loaded by the policy, its weights by the switcher's model deployment.",
    )
    switcher_deployment: str | None = Field(
        default=None,
        description="Serve deployment serving the switcher checkpoint (in an app config: the "
        "name of one of its models); None: an engine in this process (one per checkpoint).",
    )
    switcher_app: str | None = Field(
        default=None,
        min_length=1,
        description="Serve application of that deployment; None: the application the policy "
        "runs in (the switcher listed as a model of the same app config).",
    )
    segment_len: int = Field(default=32, ge=1, description="Tokens per segment.")
    selection: Literal["argmax", "top_p"] = Field(
        default="argmax", description="Take the most likely model, or sample (nucleus top_p)."
    )
    top_p: float = Field(default=0.9, gt=0.0, le=1.0, description="Mass kept when sampling.")
    seed: int | None = Field(
        default=None, description="Seed of the draws; default: the request's seed (else 0)."
    )
    first_model: str | None = Field(
        default=None, description="If set, this model writes the first segment."
    )
    last_model: str | None = Field(
        default=None, description="If set, this model writes the segment that ends the budget."
    )
    stop_at_eos: bool = Field(
        default=True,
        description="A writer's end token ends the response; False: it ends only that "
        "segment and the switcher picks the next writer (the reference code's behaviour).",
    )
    speculate: bool = Field(
        default=True,
        description="While the switcher decides, the last writer drafts the next segment; "
        "kept if it is chosen again, cut off otherwise (the response is the same either way).",
    )

    def referenced_models(self) -> tuple[str, ...]:
        return tuple(m for m in (self.first_model, self.last_model) if m is not None)

    def referenced_deployments(self) -> tuple[str, ...]:
        if self.switcher_deployment is None or self.switcher_app is not None:
            return ()
        return (self.switcher_deployment,)


# Switcher models kept loaded though no policy holds them: an online trainer promotes a new
# checkpoint now and then and judges candidates through serving, each one an engine here
MAX_UNUSED_SWITCHERS = 2


class _Switchers:
    """The switcher models and tokenizers of this process, shared by every `switch` policy
    over the same checkpoint: policies differ by their parameters (a seed per request, a
    segment length) and are cheap; a switcher model is an engine or a deployment client.

    Keyed by the fingerprint of the weights too, so a checkpoint rewritten in place gets a
    new engine, and a policy's version always names the weights its model loaded. Each
    model knows the policies that hold it (weakly): beyond the newest MAX_UNUSED_SWITCHERS,
    a model no live policy holds is dropped and its engine stopped."""

    def __init__(self) -> None:
        # (path, version, switcher_deployment, switcher_app) -> model, least recent first
        self.models: OrderedDict[tuple, IndexScorer] = OrderedDict()
        self.users: dict[tuple, weakref.WeakSet] = {}
        self.tokenizers: dict[tuple[str, str], PreTrainedTokenizerBase] = {}

    def model(self, params: SwitchParams, path: str, version: str, user: object) -> IndexScorer:
        """The switcher model of the weights at `path` (links resolved: `switcher_checkpoint`),
        held by `user` (its policy) for as long as that lives."""
        key = (path, version, params.switcher_deployment, params.switcher_app)
        if key not in self.models:
            self.models[key], self.users[key] = _connect(params, path), weakref.WeakSet()
        self.models.move_to_end(key)
        self.users[key].add(user)
        self._drop_unused()
        return self.models[key]

    def _drop_unused(self) -> None:
        unused = [key for key in self.models if not self.users[key]]
        for key in unused[: max(0, len(unused) - MAX_UNUSED_SWITCHERS)]:
            model = self.models.pop(key)
            del self.users[key]
            self.tokenizers.pop(key[:2], None)
            stop = getattr(model, "stop", None)  # an engine's worker; a client holds nothing
            if stop is not None:
                stop()

    def tokenizer(self, path: str, version: str) -> PreTrainedTokenizerBase:
        if (path, version) not in self.tokenizers:
            self.tokenizers[path, version] = load_tokenizer(path)
        return self.tokenizers[path, version]


def switcher_checkpoint(params: SwitchParams) -> str:
    """The directory the switcher's weights are read from, links followed: a policy store's
    `served` link names other weights after each promotion, and a policy built before one
    must keep naming (and loading) the weights it was built with. A hub id stays as it is."""
    where = resolve_checkpoint_path(params.switcher_path)
    return os.path.realpath(where) if os.path.exists(where) else where


def _connect(params: SwitchParams, path: str) -> IndexScorer:
    """The switcher's model: a client of its deployment, or an engine in this process."""
    if params.switcher_deployment is not None:
        from ray import serve

        from antiphon.actors.client import ServeModelClient

        handle = serve.get_deployment_handle(params.switcher_deployment, params.switcher_app)
        return ServeModelClient(handle)
    from antiphon.actors.engine import ModelEngine
    from antiphon.config import ModelSpec

    return ModelEngine(ModelSpec(name="switcher", path=path))


SWITCHERS = _Switchers()


class Switch:
    """Before each segment, the switcher's distribution over the ensemble picks the writer.

    Built once per parameters (the coordinator's `PolicyCache`); its model and tokenizer
    come from `SWITCHERS` (one per checkpoint), and its version is the fingerprint of the
    weights that model loaded."""

    name = "switch"

    def __init__(
        self,
        params: SwitchParams,
        model: IndexScorer | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.params = params
        # the link is read once: the version, the engine and the tokenizer all name the
        # weights it pointed at then, whatever a promotion moves it to meanwhile
        path = switcher_checkpoint(params)
        self.version = weights_fingerprint(path)
        self.model = (
            model if model is not None else SWITCHERS.model(params, path, self.version, self)
        )
        self.tokenizer = tokenizer or SWITCHERS.tokenizer(path, self.version)
        self._max_context: int | None = None  # the switcher model's, fetched on first use

    async def distribution(self, view: SequenceView) -> list[float]:
        """The switcher's probabilities of the ensemble's models writing the next segment."""
        n = len(view.models)
        if self._max_context is None:
            self._max_context = (await self.model.info()).max_context
        ids = switcher_prompt_ids(
            self.tokenizer, view.prompt, view_segments(view), n, self._max_context
        )
        logprobs = await self.model.prompt_next_token_logprobs(
            ids, index_token_ids(self.tokenizer, n)
        )
        return normalise(logprobs)

    async def decide(self, view: SequenceView) -> Decision:
        p = self.params
        if p.first_model is not None and view.turn == 0:
            writer = p.first_model
        elif p.last_model is not None and view.tokens_left <= p.segment_len:
            writer = p.last_model
        else:
            probs = await self.distribution(view)
            seed = p.seed if p.seed is not None else (view.seed or 0)
            rng = random.Random(f"switch:{seed}:{view.turn}")
            writer = view.models[select(probs, p.selection, p.top_p, rng)]
        return WriteSegment(writer, p.segment_len, end_on_eos=p.stop_at_eos, speculate=p.speculate)
