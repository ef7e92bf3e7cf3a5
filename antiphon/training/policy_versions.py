"""Versioned switcher checkpoints: every candidate the online trainer produces is kept with
its provenance, a promotion gate decides which one is served, and serving can roll back.

Layout of a store (`root`):

    root/versions/<version>/        a candidate's checkpoint files (HF format) + provenance.json
    root/served.json                the served version, the rollback stack, the change log
    root/served -> versions/<v>     a link to the served version's directory: serving points
                                    its switcher_path here and reloads, never a new path
    root/.lock                      advisory lock taken by every change

A version id is `f"{step:06d}-{weights_fingerprint[:12]}"`: adding the same weights at the same
step again returns the existing version. Every write is atomic (a temp file or directory in
the same parent, fsynced, then renamed), so a crash leaves either the old state or the new,
never half a version or half a pointer; a crashed add leaves only a `.tmp-*` directory,
which no listing shows. `served.json` is the authority on what is served (and so on which
versions are "promoted" or "retired"); the status copied into each provenance.json is for
people reading the directory.

    store = PolicyStore("runs/policy")
    info = store.add_candidate(ckpt_dir, step=1200, provenance={"log_offsets": [0, 8192]})
    decision = promotion_decision(candidate_dev_scores, served_dev_scores, seed=0)
    store.record_evaluation(info.version, decision.candidate)
    (store.promote if decision.promote else store.refuse)(info.version, decision.reason)
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from antiphon.checkpoint import weights_fingerprint
from antiphon.errors import InvalidRequest, NotFound
from antiphon.training.durable import TMP_PREFIX, fsync_dir, replace_link, write_json_atomic
from antiphon.zoo.evaluate import bootstrap_interval

Status = Literal["candidate", "promoted", "refused", "retired"]

VERSIONS = "versions"
SERVED = "served.json"
SERVED_LINK = "served"
PROVENANCE = "provenance.json"
LOCK = ".lock"
# Keys the store writes into provenance.json; a caller's provenance may not use them.
RESERVED = frozenset({"version", "step", "created", "status", "dev_score", "reason"})


@dataclass(frozen=True)
class Score:
    """A mean over n dev items with its 95% percentile-bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.2f} ({self.low:.2f} to {self.high:.2f})"


@dataclass(frozen=True)
class VersionInfo:
    """One stored version: where it is, what the store decided about it, and its provenance
    (the caller's fields: log offsets, examples, trainer, parent, ...)."""

    version: str
    step: int
    path: Path
    status: Status
    created: float
    dev_score: Score | None
    reason: str
    provenance: dict[str, Any]


@dataclass(frozen=True)
class HistoryEntry:
    """One change of the served version: `version` became served by `action`."""

    version: str
    action: Literal["promote", "rollback"]
    at: float
    reason: str
    previous: str | None  # the version served before, if any


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict on a candidate against the served version on the same dev items."""

    promote: bool
    candidate: Score
    current: Score | None
    difference: Score | None  # candidate minus current, item by item
    reason: str


# --- the promotion gate (pure) -------------------------------------------------------------


def promotion_decision(
    candidate: Sequence[float],
    current: Sequence[float] | None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> PromotionDecision:
    """Promote iff nothing is served or the candidate's mean dev score is at least the served
    version's. `candidate[i]` and `current[i]` are the two versions' scores on dev item i.

    The intervals come from the same resampled item sets for both versions and their
    difference (the bootstrap draws are seeded by `seed` alone), so the difference's interval
    is a paired one: the items' own difficulty cancels out. Same inputs and seed, same
    decision and intervals."""
    cand = _checked_scores(candidate, "candidate")
    if resamples < 1:
        raise InvalidRequest(f"resamples must be at least 1, got {resamples}")
    key = f"promotion:{seed}"
    cand_score = _score(cand, key, resamples)
    if current is None:
        reason = f"candidate {cand_score} promoted: no version is served yet"
        return PromotionDecision(True, cand_score, None, None, reason)
    cur = _checked_scores(current, "current")
    if len(cur) != len(cand):
        raise InvalidRequest(
            f"candidate has {len(cand)} dev scores, current {len(cur)}: the gate compares "
            "both versions on the same dev items, in the same order"
        )
    cur_score = _score(cur, key, resamples)
    diff = _score([c - s for c, s in zip(cand, cur, strict=True)], key, resamples)
    promote = cand_score.mean >= cur_score.mean
    reason = (
        f"candidate {cand_score} {'>=' if promote else '<'} served {cur_score}; "
        f"paired difference {diff} over {len(cand)} dev items"
    )
    return PromotionDecision(promote, cand_score, cur_score, diff, reason)


def _checked_scores(scores: Sequence[float], what: str) -> list[float]:
    values = [float(s) for s in scores]
    if not values:
        raise InvalidRequest(f"{what} has no dev scores")
    if not all(math.isfinite(v) for v in values):
        raise InvalidRequest(f"{what} dev scores must be finite numbers (got NaN or inf)")
    return values


def _score(values: Sequence[float], key: str, resamples: int) -> Score:
    """Mean and bootstrap interval of `values`, resampled by the harness's own helper (its
    draws depend only on `key` and n, which is what makes two calls paired)."""
    n = len(values)
    low, high = bootstrap_interval(
        n, lambda idx: sum(values[i] for i in idx) / n, key, resamples=resamples
    )
    return Score(mean=sum(values) / n, low=low, high=high, n=n)


# --- the store -----------------------------------------------------------------------------


class PolicyStore:
    """Versions of a switcher checkpoint under `root` (see the module docstring).

    `create=True` makes the store if `root` is missing or an empty directory; `create=False`
    (for tools that only read or roll back) wants an existing store. Either way a directory
    that holds other things and no `versions/` is not taken for a store."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS
        if self.versions_dir.is_dir():
            served = self._pointer()["served"]
            if (
                served is not None
                and self.served_path.resolve() != self._version_dir(served).resolve()
            ):
                self._link_served(served)  # a crash came between served.json and the link
            return
        if self.root.exists() and not self.root.is_dir():
            raise InvalidRequest(f"policy store {self.root} is a file, not a directory")
        if self.root.is_dir() and any(self.root.iterdir()):
            raise InvalidRequest(
                f"{self.root} is not a policy store: it has no {VERSIONS}/ directory "
                "and is not empty"
            )
        if not create:
            raise NotFound(f"no policy store at {self.root} (no {VERSIONS}/ directory)")
        self.versions_dir.mkdir(parents=True, exist_ok=True)

    # --- adding ---

    def add_candidate(
        self, checkpoint_dir: str | Path, *, step: int, provenance: Mapping[str, Any]
    ) -> VersionInfo:
        """Copy the checkpoint in as a new candidate (the source is only read) and return it;
        the same weights at the same step again return the version already stored."""
        source = Path(checkpoint_dir)
        if not source.is_dir():
            raise NotFound(f"no checkpoint directory at {source}")
        if step < 0:
            raise InvalidRequest(f"step must be >= 0, got {step}")
        extra = _caller_provenance(provenance)
        fingerprint = weights_fingerprint(source)
        if fingerprint == "unknown":
            raise InvalidRequest(f"{source} holds no *.safetensors weights to version")
        version = f"{step:06d}-{fingerprint[:12]}"
        final = self.versions_dir / version
        if final.is_dir():
            return self.info(version)
        # Copied outside the lock: an 8B checkpoint takes minutes, and the rename below is
        # what publishes it (and fails if a concurrent add of the same version won).
        tmp = self.versions_dir / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(source, tmp)
            if weights_fingerprint(tmp) != fingerprint:
                raise InvalidRequest(f"{source} changed while it was being copied; add it again")
            record = {
                "version": version,
                "step": step,
                "created": time.time(),
                "status": "candidate",
                "dev_score": None,
                "reason": "",
                **extra,
            }
            write_json_atomic(tmp / PROVENANCE, record, durable=False)
            _fsync_tree(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                # Lost a race to an identical add: theirs is the version.
            else:
                fsync_dir(self.versions_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.info(version)

    # --- reading ---

    def info(self, version: str) -> VersionInfo:
        """The stored version `version`; NotFound (listing the known ones) if there is none."""
        return self._info(version, self._pointer())

    def versions(self) -> list[VersionInfo]:
        """Every stored version, oldest first (half-written temp directories are not)."""
        pointer = self._pointer()
        found = [self._info(name, pointer) for name in self._version_names()]
        return sorted(found, key=lambda v: (v.created, v.version))

    def served(self) -> VersionInfo | None:
        """The version being served, or None before the first promotion."""
        pointer = self._pointer()
        return None if pointer["served"] is None else self._info(pointer["served"], pointer)

    def history(self) -> list[HistoryEntry]:
        """Every change of the served version, oldest first."""
        return [HistoryEntry(**entry) for entry in self._pointer()["history"]]

    # --- deciding ---

    def record_evaluation(self, version: str, score: Score) -> VersionInfo:
        """Keep the version's dev score (mean, interval, items) in its provenance."""
        with self._locked():
            self._update(version, dev_score=asdict(score))
        return self.info(version)

    def promote(self, version: str, reason: str) -> VersionInfo:
        """Serve `version` (a candidate, or a retired version again); the one served before is
        retired and stays on the rollback stack beneath it."""
        with self._locked():
            pointer = self._pointer()
            target = self._info(version, pointer)
            if target.status == "refused":
                raise InvalidRequest(f"version {version} was refused ({target.reason}); not served")
            if target.status == "promoted":
                raise InvalidRequest(f"version {version} is already served")
            self._serve(pointer, version, "promote", reason, [*pointer["stack"], version])
        return self.info(version)

    def refuse(self, version: str, reason: str) -> VersionInfo:
        """Mark `version` as never to be served; it stays on disk for inspection."""
        with self._locked():
            target = self._info(version, self._pointer())
            if target.status == "promoted":
                raise InvalidRequest(
                    f"version {version} is being served; roll back or promote another first"
                )
            self._update(version, status="refused", reason=reason)
        return self.info(version)

    def rollback(self, to: str | None = None, reason: str = "rollback") -> VersionInfo:
        """Serve the version served before the current one (or `to`, a version that was served
        once and not refused since) and return it; the change goes into the history."""
        with self._locked():
            pointer = self._pointer()
            if pointer["served"] is None:
                raise InvalidRequest("nothing is served yet, so there is nothing to roll back")
            stack = list(pointer["stack"])
            if to is None:
                stack.pop()
                # A version refused after it was retired must not come back this way.
                while stack and self._info(stack[-1], pointer).status == "refused":
                    stack.pop()
                if not stack:
                    raise InvalidRequest(
                        f"no previous version to roll back to from {pointer['served']}"
                    )
            else:
                self._check_rollback_target(to, pointer)
                stack = stack[: len(stack) - stack[::-1].index(to)] if to in stack else [*stack, to]
            self._serve(pointer, stack[-1], "rollback", reason, stack)
        return self.info(stack[-1])

    def _check_rollback_target(self, to: str, pointer: dict[str, Any]) -> None:
        target = self._info(to, pointer)
        if target.status == "refused":
            raise InvalidRequest(f"cannot roll back to {to}: it was refused ({target.reason})")
        if target.status == "promoted":
            raise InvalidRequest(f"cannot roll back to {to}: it is already served")
        if target.status == "candidate":
            raise InvalidRequest(
                f"cannot roll back to {to}: it was never served (a candidate); promote it instead"
            )

    # --- internals ---

    def _serve(
        self, pointer: dict[str, Any], version: str, action: str, reason: str, stack: list[str]
    ) -> None:
        """Make `version` the served one: served.json first (the commit point), then the
        status copies in the two provenance files."""
        previous = pointer["served"]
        entry = {"version": version, "action": action, "at": time.time(), "reason": reason,
                 "previous": previous}  # fmt: skip
        history = [*pointer["history"], entry]
        write_json_atomic(
            self.root / SERVED, {"served": version, "stack": stack, "history": history}
        )
        self._link_served(version)
        if previous is not None:
            self._update(previous, status="retired")
        self._update(version, status="promoted", reason=reason)

    @property
    def served_path(self) -> Path:
        """The link to the served version's directory: a fixed checkpoint path whose
        contents change at each promotion or rollback (a reload picks them up)."""
        return self.root / SERVED_LINK

    def _link_served(self, version: str) -> None:
        """Point the served link at `version` (relative: the store can move as a whole)."""
        replace_link(self.served_path, Path(VERSIONS) / version)

    def _update(self, version: str, **fields: Any) -> None:
        path = self._version_dir(version) / PROVENANCE
        write_json_atomic(path, {**_read_json(path), **fields})

    def _version_dir(self, version: str) -> Path:
        path = self.versions_dir / version
        if version.startswith(".") or "/" in version or not (path / PROVENANCE).is_file():
            known = ", ".join(self._version_names()) or "none"
            raise NotFound(f"no version {version!r} in policy store {self.root}; known: {known}")
        return path

    def _version_names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.versions_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / PROVENANCE).is_file()
        )

    def _info(self, version: str, pointer: dict[str, Any]) -> VersionInfo:
        path = self._version_dir(version)
        record = _read_json(path / PROVENANCE)
        score = record.get("dev_score")
        return VersionInfo(
            version=record["version"],
            step=int(record["step"]),
            path=path,
            status=_status(version, record, pointer),
            created=float(record["created"]),
            dev_score=Score(**score) if score else None,
            reason=record.get("reason", ""),
            provenance={k: v for k, v in record.items() if k not in RESERVED},
        )

    def _pointer(self) -> dict[str, Any]:
        path = self.root / SERVED
        if not path.exists():
            return {"served": None, "stack": [], "history": []}
        return _read_json(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes across processes (the trainer promoting, an operator rolling
        back): each write is atomic alone, but a read-modify-write of served.json is not."""
        with open(self.root / LOCK, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _status(version: str, record: Mapping[str, Any], pointer: Mapping[str, Any]) -> Status:
    """served.json decides promoted and retired (it is written first); a refusal is recorded
    in the version's own provenance."""
    if pointer["served"] == version:
        return "promoted"
    if record.get("status") == "refused":
        return "refused"
    if any(entry["version"] == version for entry in pointer["history"]):
        return "retired"
    return "candidate"


def _caller_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(RESERVED & set(provenance))
    if clash:
        raise InvalidRequest(f"provenance may not set the store's own fields: {', '.join(clash)}")
    try:
        # Round-trip so tuples become lists now, not a surprise on the next read.
        return json.loads(json.dumps(dict(provenance)))
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"provenance must be JSON-serialisable: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"unreadable policy store file {path}: {e}") from e


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so its rename publishes complete files."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))
