"""The promotion gate: move the serving alias (``champion``) to a candidate version only when it
beats the current holder on the same evaluation data.

    decision = promote("coatnet-demo", "7", val="s3://bucket/in1k/val", margin=0.002)

Both versions are scored on the same data, each with its own preprocessing (``pipeline.evaluate``);
scores are cached in version tags keyed by the data's fingerprint, so re-running evaluates nothing
and changes nothing. The decision, the scores and the margin are tags on the candidate; a replaced
champion is tagged with its successor. A forced promotion records who forced it and why.
"""
from __future__ import annotations

import dataclasses
import getpass
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.evaluate import PRIMARY, evaluate_model
from pipeline.registry import RegistryError, client, is_missing, load_model, resolve_version

# Tag keys on model versions.
TAG_DECISION = "promotion.decision"          # initial | promoted | rejected | forced
TAG_AGAINST = "promotion.against_version"    # champion version compared with ("" when none)
TAG_CAND_SCORE = "promotion.candidate_score"
TAG_CHAMP_SCORE = "promotion.champion_score"
TAG_MARGIN = "promotion.margin"
TAG_METRIC = "promotion.metric"
TAG_DATA = "promotion.data"                  # fingerprint of the evaluation data
TAG_FORCED_BY = "promotion.forced_by"
TAG_FORCE_REASON = "promotion.force_reason"
TAG_TIME = "promotion.time"
TAG_REPLACED_BY = "promotion.replaced_by"    # on a former champion
TAG_EVAL_PREFIX = "eval"                     # eval.<data fingerprint>.<metric> = score


def data_identity(val: str) -> tuple[str, str]:
    """(short stable id of an evaluation split: its index fingerprint, its label type)."""
    from pipeline.data import DataError, ShardIndex

    try:
        idx = ShardIndex.load(val)
    except (DataError, OSError) as e:
        raise RegistryError(f"cannot read evaluation data {val!r}: {e}") from None
    return idx.fingerprint()[:12], idx.label_type



@dataclass
class Decision:
    action: str                      # initial | promoted | rejected | forced | already_champion | unchanged
    candidate: str
    champion_before: str | None
    champion_after: str | None
    candidate_score: float | None = None
    champion_score: float | None = None
    metric: str = "top1"
    margin: float = 0.0
    data: str = ""
    changed: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _version_score(name: str, version: str, val: str, fp: str, metric: str,
                   evaluator: Callable[[str], dict]) -> float:
    """Score of a version on data ``fp``: read from its tags when present, else evaluated and tagged."""
    c = client()
    mv = c.get_model_version(name, version)
    key = f"{TAG_EVAL_PREFIX}.{fp}.{metric}"
    if key in (mv.tags or {}):
        return float(mv.tags[key])
    scores = evaluator(f"models:/{name}/{version}")
    for m, v in scores.items():
        if isinstance(v, float):
            c.set_model_version_tag(name, version, f"{TAG_EVAL_PREFIX}.{fp}.{m}", f"{v:.6f}")
    c.set_model_version_tag(name, version, f"{TAG_EVAL_PREFIX}.{fp}.num_samples", str(scores.get("num_samples", "")))
    return float(f"{scores[metric]:.6f}")


def promote(name: str, candidate: str | None = None, *, val: str | None = None, alias: str = "champion",
            margin: float = 0.0, metric: str | None = None, force: bool = False, reason: str = "",
            batch_size: int = 64, evaluator: Callable[[str], dict] | None = None) -> Decision:
    """Move ``alias`` to ``candidate`` (a version number; default: the newest version) when it beats
    the current holder by ``margin`` on ``val`` (default: the candidate's ``data.val`` tag).

    Both versions are scored on the same data, each with its own preprocessing; scores are cached in
    version tags keyed by the data fingerprint, so re-running evaluates nothing and changes nothing.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.registry import TAG_VAL_DATA

    c = client()
    cand = resolve_version(f"models:/{name}/{candidate}" if candidate else f"models:/{name}/latest")
    cv = str(cand.version)
    try:
        champ = c.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if not is_missing(e):
            raise
        champ = None
    champ_v = str(champ.version) if champ else None
    if champ_v == cv:
        return Decision("already_champion", cv, champ_v, champ_v, metric=metric or "", margin=margin)

    val = val or (cand.tags or {}).get(TAG_VAL_DATA)
    if not val:
        raise RegistryError(f"no evaluation data: give the val split, or tag version {cv} with {TAG_VAL_DATA}")
    fp, label_type = data_identity(val)
    metric = metric or PRIMARY[label_type]
    prev = cand.tags or {}
    if (not force and prev.get(TAG_DECISION) == "rejected" and prev.get(TAG_AGAINST) == (champ_v or "")
            and prev.get(TAG_DATA) == fp and prev.get(TAG_METRIC) == metric
            and float(prev.get(TAG_MARGIN, "nan")) == float(margin)):
        return Decision("unchanged", cv, champ_v, champ_v, float(prev[TAG_CAND_SCORE]),
                        float(prev[TAG_CHAMP_SCORE]), metric, margin, fp)

    if evaluator is None:
        def evaluator(uri):
            model, meta = load_model(uri)
            return evaluate_model(model, meta["spec"], val, batch_size=batch_size)

    cs = _version_score(name, cv, val, fp, metric, evaluator)
    hs = _version_score(name, champ_v, val, fp, metric, evaluator) if champ_v else None
    if champ_v is None:
        action = "initial"
    elif cs > hs and cs - hs >= margin:
        action = "promoted"
    elif force:
        action = "forced"
    else:
        action = "rejected"
    tags = {TAG_DECISION: action, TAG_AGAINST: champ_v or "", TAG_CAND_SCORE: f"{cs:.6f}",
            TAG_CHAMP_SCORE: "" if hs is None else f"{hs:.6f}", TAG_MARGIN: str(float(margin)),
            TAG_METRIC: metric, TAG_DATA: fp, TAG_TIME: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if action == "forced":
        tags[TAG_FORCED_BY] = _user()
        tags[TAG_FORCE_REASON] = reason or "forced (no reason given)"
    for k, v in tags.items():
        c.set_model_version_tag(name, cv, k, v)
    if action in ("initial", "promoted", "forced"):
        c.set_registered_model_alias(name, alias, cv)
        if champ_v:
            c.set_model_version_tag(name, champ_v, TAG_REPLACED_BY, cv)
        after = cv
    else:
        after = champ_v
    return Decision(action, cv, champ_v, after, cs, hs, metric, margin, fp, changed=after != champ_v)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"
