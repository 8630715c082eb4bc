"""METEOR as captioning papers report it: METEOR 1.5, coco-caption's ``meteor-1.5.jar``.

pycocoevalcap (the ``[metrics]`` extra) ships the jar with its English paraphrase table; a Java
runtime runs it, offline. The jar takes seconds to start, so one :class:`MeteorJar` serves a
whole evaluation (one batch per decoding setting) and its java process is always stopped at the
end. Without Java or pycocoevalcap the score is None and the note is one line saying why and
the command that adds it. (nltk's ``meteor_score`` is a different METEOR with other numbers;
it is not used.)
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from captioner.evaluation.metrics import Hypotheses, References, check_ids

METEOR_HEADER = "METEOR 1.5"  # the column header: which METEOR it is
METEOR_NOTE = (
    "METEOR is METEOR 1.5 as coco-caption computes it (the METEOR of the captioning papers): "
    "pycocoevalcap's meteor-1.5.jar with its English paraphrase table (-l en -norm), run on "
    "Java over the same cleaned, whitespace-split captions as the other metrics; the split's "
    "score is the jar's own aggregate, not the mean of the per-image scores. nltk's "
    "meteor_score is another METEOR with other numbers."
)
INSTALL_JAVA = "apt-get install default-jre-headless"
INSTALL_PYCOCO = 'pip install -e ".[metrics]"'
NO_PYCOCO = (
    "METEOR n/a: pycocoevalcap (which ships coco-caption's meteor-1.5.jar) is not installed; "
    f"add it with `{INSTALL_PYCOCO}` and evaluate again."
)
NO_JAVA = (
    "METEOR n/a: no Java runtime (`java` is not on PATH) to run coco-caption's meteor-1.5.jar; "
    f"add one with `{INSTALL_JAVA}` and evaluate again."
)
NOT_COMPUTED = "METEOR n/a: it was not computed for this report."


@dataclass(frozen=True)
class MeteorScore:
    """The split's METEOR 1.5 (None when it could not be computed), per image, and the note:
    which METEOR it is, or the one line saying why it is missing."""

    score: float | None
    per_image: dict[str, float] = field(default_factory=dict)
    note: str = METEOR_NOTE

    def add_to(self, scores: dict[str, Any]) -> None:
        """Record it in an ``evaluate_all`` result: ``"METEOR"``, ``"meteor_note"`` and the
        ``"METEOR"`` of each ``per_image`` row."""
        scores["METEOR"] = self.score
        scores["meteor_note"] = self.note
        for name, value in self.per_image.items():
            scores.setdefault("per_image", {}).setdefault(name, {})["METEOR"] = value


def missing_line(scores: Iterable[dict[str, Any]]) -> str | None:
    """The first reason one of the sections' ``scores`` has no METEOR, or None when all have it."""
    for section in scores:
        if section.get("METEOR") is None:
            return section.get("meteor_note") or NOT_COMPUTED
    return None


def report_note(scores: Iterable[dict[str, Any]]) -> str:
    """The report's METEOR note: which METEOR it is, or why it is missing."""
    return missing_line(scores) or METEOR_NOTE


def find_java() -> str | None:
    """The ``java`` executable on PATH, or None."""
    return shutil.which("java")


def missing_reason() -> str | None:
    """Why METEOR 1.5 cannot run here (one line with the command that adds it), or None."""
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return NO_PYCOCO
    return NO_JAVA if find_java() is None else None


def jar_text(text: str) -> str:
    """``text`` as the jar gets it: the whitespace tokens the other metrics count, joined by one
    space, without the ``|||`` that separates fields in the jar's protocol."""
    return " ".join(text.replace("|||", " ").split())


@functools.cache
def _jar_class() -> type:
    """pycocoevalcap's ``Meteor`` with a ``close()`` that always stops java (also after a failed
    start or a failed batch, when ``Meteor.__del__`` would fail or wait on its lock forever)."""
    from pycocoevalcap.meteor.meteor import Meteor

    class Jar(Meteor):
        def close(self) -> str:
            """Stop java (idempotent); what it wrote on stderr."""
            proc = self.__dict__.pop("meteor_p", None)
            if proc is None:
                return ""
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.kill()
            proc.wait()
            err = proc.stderr.read().decode(errors="replace")
            proc.stdout.close()
            proc.stderr.close()
            return err

        def __del__(self) -> None:
            self.close()

    return Jar


class MeteorJar:
    """One ``meteor-1.5.jar`` process for a whole evaluation: started by the first
    :meth:`score`, stopped by :meth:`close` (or the end of a ``with`` block)."""

    def __init__(self) -> None:
        self.missing = missing_reason()
        self._jar: Any = None

    def __enter__(self) -> MeteorJar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, references: References, hypotheses: Hypotheses) -> MeteorScore:
        """METEOR 1.5 of ``hypotheses`` against ``references`` in one batch, x1 (in [0, 1])."""
        ids = check_ids(references, hypotheses)
        if self.missing:
            return MeteorScore(None, {}, self.missing)
        gts = {i: [jar_text(r) for r in references[i]] for i in ids}
        res = {i: [jar_text(hypotheses[i])] for i in ids}
        try:
            if self._jar is None:
                self._jar = _jar_class()()
            total, scores = self._jar.compute_score(gts, res)
        except (OSError, ValueError) as exc:
            self.missing = self._failed(exc)
            return MeteorScore(None, {}, self.missing)
        per_image = {i: float(s) for i, s in zip(ids, scores, strict=True)}
        return MeteorScore(float(total), per_image)

    def _failed(self, exc: Exception) -> str:
        """Stop the broken process; the one line saying what java reported."""
        err = self.close() or str(exc) or type(exc).__name__
        last = [line.strip() for line in err.splitlines() if line.strip()][-1:] or ["no output"]
        return (
            f"METEOR n/a: java could not run coco-caption's meteor-1.5.jar ({last[0][:200]}); "
            f"check `java -version` (Java 8 or newer, 2 GB of memory) or `{INSTALL_JAVA}`."
        )

    def close(self) -> str:
        """Stop the java process, if one runs; what it wrote on stderr."""
        jar, self._jar = self._jar, None
        return jar.close() if jar is not None else ""


def meteor(references: References, hypotheses: Hypotheses) -> MeteorScore:
    """METEOR 1.5 of one set of captions (starts and stops its own java process)."""
    with MeteorJar() as jar:
        return jar.score(references, hypotheses)
