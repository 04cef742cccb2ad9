"""pretrain -> finetune -> evaluate -> register -> promote, as one MLflow parent run.

    python jobs/workflow.py                                        # embedded demo chain (local Ray, minutes)
    python jobs/workflow.py --config configs/workflow_demo.yaml name=try2 promote.margin=0.01
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/workflow.py --config configs/<workflow>.yaml

Re-running the same command after a failure skips completed stages (matched by a hash of their
config and inputs, recorded as MLflow tags) and resumes an interrupted training stage from its
last checkpoint. Overrides are dotted keys of the workflow config (see pipeline/workflow.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "workflow_demo.yaml"))
    p.add_argument("--summary", default=None, help="also write the result as JSON to this file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)

    from pipeline.console import run_job, say

    def body() -> int:
        from pipeline.workflow import load_workflow, run_workflow

        wf, base = load_workflow(a.config, a.overrides)
        result = run_workflow(wf, base)
        if a.summary:
            with open(a.summary, "w") as f:
                json.dump(result.to_dict(), f, indent=1, default=str)
        reg = result.outputs("register")
        pr = result.outputs("promote") if "promote" in result.stages else {}
        say(f"\n== workflow finished ==\nparent run     {result.parent_run_id}\n"
            f"skipped        {', '.join(result.skipped) or 'none'}\n"
            f"registered     {reg['name']} v{reg['version']}\n"
            f"promotion      {pr.get('action', 'off')} (champion: v{pr.get('champion_after')})")
        return 0

    return run_job("workflow", body)


if __name__ == "__main__":
    sys.exit(main())
