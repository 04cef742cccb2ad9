"""Probes the end-to-end tests install in the training workers through ``train.callbacks``
(the production loop has no test-only knobs). Each is built in every worker from its kwargs."""
from __future__ import annotations

import json
import os
import signal
import time

import torch

from pipeline.train import Callback


def override(*callbacks: tuple[str, dict]) -> str:
    """``train.callbacks=[...]`` for a job's command line: (class name in this module, kwargs)."""
    specs = [{"target": f"tests.train_callbacks:{name}", "kwargs": kwargs} for name, kwargs in callbacks]
    return "train.callbacks=" + json.dumps(specs)


class DieDuringSave(Callback):
    """Rank ``rank`` SIGKILLs itself inside checkpoint ``step``'s save (its part written locally,
    not uploaded; the other ranks are uploading or waiting in the report barrier), once per
    ``marker`` file: the restarted group must not die again."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker, self.my_rank = step, rank, marker, None

    def on_start(self, *, rank: int, world_size: int) -> None:
        self.my_rank = rank

    def on_save(self, step: int, folder: str) -> None:
        if step == self.step and self.my_rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(json.dumps({"step": step, "folder": folder, "pid": os.getpid()}))
            os.kill(os.getpid(), signal.SIGKILL)


class KeysLog(Callback):
    """Each rank appends {"step", "keys", "world", "start"} per optimizer step to
    ``<dir>/keys.rank<r>.jsonl`` ("start": the step this attempt of the group resumed from)."""

    def __init__(self, dir: str) -> None:
        self.dir, self.file, self.world, self.start = dir, None, None, None

    def on_start(self, *, rank: int, world_size: int) -> None:
        os.makedirs(self.dir, exist_ok=True)
        self.file = open(os.path.join(self.dir, f"keys.rank{rank}.jsonl"), "a")
        self.world = world_size

    def on_train_start(self, engine, *, step: int, rank: int, ema=None) -> None:
        self.start = step

    def on_step(self, step: int, keys: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "keys": keys, "world": self.world, "start": self.start,
                                    "t": time.time()}) + "\n")
        self.file.flush()

    def on_end(self, engine, *, rank: int) -> None:
        self.file.close()


class StepSleep(Callback):
    """Sleep after every step, so that a test can act between steps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step(self, step: int, keys: list[str]) -> None:
        time.sleep(self.seconds)


class DumpWeights(Callback):
    """At the end: rank 0 saves the gathered live parameters to ``path``; every rank writes the
    size of its ZeRO-3 partition to ``<path>.rank<r>.json``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_end(self, engine, *, rank: int) -> None:
        import deepspeed

        from pipeline.engine import partitions

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            if rank == 0:
                torch.save({"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}},
                           self.path)
        with open(f"{self.path}.rank{rank}.json", "w") as f:
            json.dump({"partition_numel": sum(t.numel() for t in partitions(engine.module)),
                       "total_numel": sum(p.ds_numel for p in params)}, f)


class StartState(Callback):
    """When training (re)starts: each rank writes to ``<dir>/start.s<step>.rank<r>.json`` the step,
    its optimizer's Adam step count and moment norm (0 for a fresh optimizer), its parameter groups'
    hyperparameters, the sum of squares of its EMA partitions, and rank 0 adds the sum of squares of
    all gathered parameters (to compare with the checkpoint it came from)."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_train_start(self, engine, *, step: int, rank: int, ema=None) -> None:
        import deepspeed

        os.makedirs(self.dir, exist_ok=True)
        states = [s for s in engine.optimizer.optimizer.state.values() if "exp_avg_sq" in s]
        out = {"step": step, "world_size": engine.world_size if hasattr(engine, "world_size") else None,
               "adam_steps": sorted({int(s["step"]) for s in states}),
               "exp_avg_sq_norm": float(sum(s["exp_avg_sq"].float().norm() ** 2 for s in states)) ** 0.5,
               "grad_accum": engine.gradient_accumulation_steps(),
               "groups": [{"weight_decay": g["weight_decay"], "betas": list(g["betas"])}
                          for g in engine.optimizer.optimizer.param_groups],
               "ema_sq_sum": float(sum(e.double().pow(2).sum() for e in ema)) if ema else None}
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            if rank == 0:
                out["param_sq_sum"] = float(sum(p.detach().double().pow(2).sum() for p in params))
        with open(os.path.join(self.dir, f"start.s{step}.rank{rank}.json"), "w") as f:
            json.dump(out, f)


class SigtermAt(Callback):
    """Rank ``rank`` sends SIGTERM to its own process after step ``step``, once per ``marker`` file
    (as a spot reclaim or a node shutdown would)."""

    def __init__(self, step: int, rank: int, marker: str) -> None:
        self.step, self.rank, self.marker, self.my_rank = step, rank, marker, None

    def on_start(self, *, rank: int, world_size: int) -> None:
        self.my_rank = rank

    def on_step(self, step: int, keys: list[str]) -> None:
        if step == self.step and self.my_rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(json.dumps({"step": step, "pid": os.getpid()}))
            os.kill(os.getpid(), signal.SIGTERM)


class Gate(Callback):
    """Rank ``rank`` holds after step ``step`` until the file ``release`` exists (the other ranks then
    wait in the next collective), having written ``<release>.held``: a test acts on a run at a known
    step. A later attempt reaching the step again passes (the file exists by then)."""

    def __init__(self, step: int, rank: int, release: str) -> None:
        self.step, self.rank, self.release, self.my_rank = step, rank, release, None

    def on_start(self, *, rank: int, world_size: int) -> None:
        self.my_rank = rank

    def on_step(self, step: int, keys: list[str]) -> None:
        if step == self.step and self.my_rank == self.rank and not os.path.exists(self.release):
            with open(f"{self.release}.held", "w") as f:
                f.write(json.dumps({"step": step, "pid": os.getpid()}))
            while not os.path.exists(self.release):
                time.sleep(0.1)
