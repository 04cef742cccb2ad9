"""The promotion gate: move the serving alias (``champion``) to a candidate version only when it
beats the current holder on the same evaluation data, by a margin and significantly.

    decision = promote("coatnet-demo", "7", val="s3://bucket/in1k/val", margin=0.002, significance=0.05)

Both versions are scored on the same samples, each with its own preprocessing (``pipeline.evaluate``).
Besides the margin, the candidate must win a paired test: McNemar's exact test on per-sample top-1
correctness (b = samples only the candidate gets right, c = only the champion; one-sided p of b or
more of b + c fair coin flips) below ``significance``. Scores are cached in version tags and the
per-sample results as an artifact of the version's run, keyed by the data's fingerprint, so
re-running evaluates nothing and changes nothing. The decision, scores, margin, test, statistic and
p are tags on the candidate; a replaced champion is tagged with its successor. MLflow keeps no
history of an alias, so every move is also recorded on the registered model
(``alias.<alias>.history.<n>``: when, who, from which version to which, why).
"""
from __future__ import annotations

import dataclasses
import getpass
import json
import math
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.evaluate import PRIMARY, evaluate_model
from pipeline.evaluate_ray import cluster_evaluator
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
TAG_TEST = "promotion.test"                  # mcnemar-exact | none (why)
TAG_STATISTIC = "promotion.statistic"        # b=<only candidate right>,c=<only champion right>
TAG_P = "promotion.p_value"
TAG_SIGNIFICANCE = "promotion.significance"
PAIRED_METRICS = ("top1", "precision_at_1")  # metrics whose per-sample form is the top-1 hit


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
    test: str = ""
    statistic: str = ""
    p_value: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def mcnemar_exact(b: int, c: int) -> float:
    """One-sided exact McNemar p: P(X >= b) for X ~ Binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
            for k in range(b, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def paired_counts(candidate: dict[str, bool], champion: dict[str, bool]) -> tuple[int, int]:
    """(only the candidate right, only the champion right) over the samples both were scored on."""
    common = candidate.keys() & champion.keys()
    b = sum(1 for k in common if candidate[k] and not champion[k])
    c = sum(1 for k in common if champion[k] and not candidate[k])
    return b, c


@dataclass
class VersionScore:
    score: float
    correct: dict[str, bool] | None      # per-sample top-1 hit, when known


def _version_score(name: str, version: str, fp: str, metric: str, evaluator: Callable[[str], dict],
                   per_sample: bool) -> VersionScore:
    """A version's score on data ``fp`` (and per-sample results when ``per_sample``): read from its
    tags and its run's artifact when present, else evaluated and cached there."""
    import mlflow

    c = client()
    mv = c.get_model_version(name, version)
    key = f"{TAG_EVAL_PREFIX}.{fp}.{metric}"
    artifact = f"promotion/eval-{fp}.json"
    correct = None
    if per_sample and mv.run_id:
        try:
            correct = json.loads(mlflow.artifacts.load_text(f"runs:/{mv.run_id}/{artifact}"))
        except Exception:  # noqa: BLE001 - not cached yet
            correct = None
    if key in (mv.tags or {}) and (correct is not None or not per_sample):
        return VersionScore(float(mv.tags[key]), correct)
    scores = evaluator(f"models:/{name}/{version}")
    for m, v in scores.items():
        if isinstance(v, float):
            c.set_model_version_tag(name, version, f"{TAG_EVAL_PREFIX}.{fp}.{m}", f"{v:.6f}")
    c.set_model_version_tag(name, version, f"{TAG_EVAL_PREFIX}.{fp}.num_samples", str(scores.get("num_samples", "")))
    correct = scores.get("correct")
    if correct is not None and mv.run_id:
        c.log_text(mv.run_id, json.dumps(correct), artifact)
    return VersionScore(float(f"{scores[metric]:.6f}"), correct)


def _record_alias_move(name: str, alias: str, before: str | None, after: str, action: str, reason: str) -> None:
    c = client()
    prefix = f"alias.{alias}.history."
    n = sum(1 for k in (c.get_registered_model(name).tags or {}) if k.startswith(prefix))
    c.set_registered_model_tag(name, f"{prefix}{n + 1:04d}", json.dumps(
        {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by": _user(), "from": before,
         "to": after, "action": action, "reason": reason}))


def promote(name: str, candidate: str | None = None, *, val: str | None = None, alias: str = "champion",
            margin: float = 0.0, metric: str | None = None, significance: float | None = 0.05,
            force: bool = False, reason: str = "", batch_size: int = 64,
            eval_options: dict | None = None, evaluator: Callable[[str], dict] | None = None) -> Decision:
    """Move ``alias`` to ``candidate`` (a version number; default: the newest version) when it beats
    the current holder on ``val`` (default: the candidate's ``data.val`` tag) by ``margin`` and, with
    ``significance`` set, in McNemar's paired test at that level (None: margin only).
    ``eval_options``: score on the cluster's workers (``pipeline.evaluate_ray.evaluate_on_cluster``'s
    options: ``workers``, ``use_gpu``, ``precision``...; each worker fetches the version's files, the
    driver only merges); None or ``workers: 0``: in this process.
    ``evaluator(model_uri) -> {metric: score, ..., "correct": {key: hit}}`` replaces the evaluation
    (tests)."""
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
            and float(prev.get(TAG_MARGIN, "nan")) == float(margin)
            and prev.get(TAG_SIGNIFICANCE, "") == ("" if significance is None else str(significance))):
        return Decision("unchanged", cv, champ_v, champ_v, float(prev[TAG_CAND_SCORE]),
                        float(prev[TAG_CHAMP_SCORE]), metric, margin, fp)

    opts = dict(eval_options or {})
    if evaluator is None and opts.get("workers", 0) > 0:
        evaluator = cluster_evaluator(val, batch_size=batch_size, **opts)
    elif evaluator is None:
        def evaluator(uri):
            model, meta = load_model(uri)
            return evaluate_model(model, meta["spec"], val, batch_size=batch_size, per_sample=True,
                                  precision=opts.get("precision", "fp32"))

    paired = significance is not None and metric in PAIRED_METRICS and champ_v is not None
    cand_s = _version_score(name, cv, fp, metric, evaluator, per_sample=paired)
    champ_s = _version_score(name, champ_v, fp, metric, evaluator, per_sample=paired) if champ_v else None
    cs, hs = cand_s.score, champ_s.score if champ_s else None
    test, statistic, p = "none", "", None
    if paired and cand_s.correct is not None and champ_s.correct is not None:
        b, c_ = paired_counts(cand_s.correct, champ_s.correct)
        test, statistic, p = "mcnemar-exact", f"b={b},c={c_}", mcnemar_exact(b, c_)
    elif champ_v is not None:
        test = ("none (significance off)" if significance is None else
                f"none ({metric} has no per-sample form)" if metric not in PAIRED_METRICS else
                "none (no per-sample scores)")
    better = champ_v is not None and cs > hs and cs - hs >= margin and (p is None or p < significance)
    if champ_v is None:
        action = "initial"
    elif better:
        action = "promoted"
    elif force:
        action = "forced"
    else:
        action = "rejected"
    tags = {TAG_DECISION: action, TAG_AGAINST: champ_v or "", TAG_CAND_SCORE: f"{cs:.6f}",
            TAG_CHAMP_SCORE: "" if hs is None else f"{hs:.6f}", TAG_MARGIN: str(float(margin)),
            TAG_METRIC: metric, TAG_DATA: fp, TAG_TIME: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            TAG_TEST: test, TAG_STATISTIC: statistic, TAG_P: "" if p is None else f"{p:.3g}",
            TAG_SIGNIFICANCE: "" if significance is None else str(significance)}
    if action == "forced":
        tags[TAG_FORCED_BY] = _user()
        tags[TAG_FORCE_REASON] = reason or "forced (no reason given)"
    for k, v in tags.items():
        c.set_model_version_tag(name, cv, k, v)
    if action in ("initial", "promoted", "forced"):
        c.set_registered_model_alias(name, alias, cv)
        if champ_v:
            c.set_model_version_tag(name, champ_v, TAG_REPLACED_BY, cv)
        why = tags.get(TAG_FORCE_REASON) or (f"{metric} {cs:.4f} vs {hs:.4f}, margin {margin}"
                                             + (f", {test} p={p:.3g}" if p is not None else "")
                                             if hs is not None else f"first version with {metric} {cs:.4f}")
        _record_alias_move(name, alias, champ_v, cv, action, why)
        after = cv
    else:
        after = champ_v
    return Decision(action, cv, champ_v, after, cs, hs, metric, margin, fp, changed=after != champ_v,
                    test=test, statistic=statistic, p_value=p)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return "unknown"
