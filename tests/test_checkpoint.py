"""Which checkpoint of a run a re-run resumes from (pipeline.checkpoint), without Ray's snapshot."""
from __future__ import annotations



def test_latest_checkpoint_never_picks_an_interrupted_save(tmp_path):
    """Without Ray's snapshot (copied folders), the newest COMPLETE checkpoint is resumed from:
    a folder where a kill left only some ranks' files is passed over until it is whole."""
    import json

    from pipeline.checkpoint import STATE_FILE, latest_complete, registered_checkpoint

    def write(step: int, ranks: list[int], world: int = 2) -> None:
        d = tmp_path / f"checkpoint_{step:08d}"
        (d / "ds").mkdir(parents=True, exist_ok=True)
        (d / STATE_FILE).write_text(json.dumps({"step": step, "world_size": world, "format": 2}))
        for r in ranks:
            (d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
            (d / "ds" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")

    assert latest_complete(str(tmp_path)) is None and registered_checkpoint(str(tmp_path)) is None
    write(2, [0, 1])
    write(4, [0])                                   # rank 1 died during the save of step 4
    assert latest_complete(str(tmp_path)).endswith("checkpoint_00000002")
    (tmp_path / "checkpoint_00000006").mkdir()      # a save that wrote nothing yet
    assert latest_complete(str(tmp_path)).endswith("checkpoint_00000002")
    write(4, [1])                                   # the re-done save completes it
    assert latest_complete(str(tmp_path)).endswith("checkpoint_00000004")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_00000002"}}))
    assert registered_checkpoint(str(tmp_path)).endswith("checkpoint_00000002")   # Ray's record, read first
    assert latest_complete(str(tmp_path)).endswith("checkpoint_00000004")        # (the fallback without it)


def test_a_resumed_attempt_clears_the_saves_it_will_redo(tmp_path):
    """One save per folder: the folders of steps after the resume point (a save a kill interrupted,
    at another world size) are removed before this attempt saves there; earlier ones are kept."""
    from pipeline.checkpoint import clear_unfinished_saves

    run = tmp_path / "run"
    for step, ranks in ((2, (0, 1)), (4, (0, 1)), (6, (2, 3)), (8, ())):
        d = run / f"checkpoint_{step:08d}" / "ds"
        d.mkdir(parents=True)
        for r in ranks:
            (d / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    said = []
    removed = clear_unfinished_saves(str(tmp_path), "run", after_step=4, timeout_s=0, say=said.append)
    assert removed == ["checkpoint_00000006", "checkpoint_00000008"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_00000002", "checkpoint_00000004",
                                                     "checkpoint_manager_snapshot.json"]
    assert clear_unfinished_saves(str(tmp_path), "new_run", after_step=0, timeout_s=0) == [] and not said


def test_universal_conversion_from_a_training_process_with_busy_threads(tmp_path):
    """The reshard's conversion from a process whose torch CPU thread pool has run (every training
    worker's): DeepSpeed's converter forks its pools, and such a fork hung in OpenMP's barrier when
    the converter ran inside the worker. It runs as a process of its own now; the universal files
    hold exactly the values of a synthetic 4-rank ZeRO-3 checkpoint in DeepSpeed's real format."""
    import sys
    import threading

    import torch

    from helpers import ROOT
    from pipeline.checkpoint import to_universal

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from universal_conversion import Layout, train_config, verify_universal, write_checkpoint

    torch.set_num_threads(2)
    a = torch.randn(1024, 1024)
    for _ in range(4):
        a = torch.tanh(a @ a.T / 1024)                         # the intra-op pool has run
    cfg = train_config("coatnet_pico", 4)
    layout = Layout("coatnet_pico", 4, cfg)
    write_checkpoint(str(tmp_path / "ck"), layout, cfg, say=lambda *_: None)
    done = []
    worker = threading.Thread(target=lambda: done.append(to_universal(str(tmp_path / "ck"), str(tmp_path / "u"),
                                                                      workers=2)), daemon=True)
    worker.start()
    worker.join(timeout=240)
    assert done, "the conversion did not finish in 240 s"
    assert verify_universal(done[0], layout) == 3 * len(layout.names())
    assert not (tmp_path / "u" / "input").exists()              # the view of the save's ranks is gone
