"""The planner's predictions next to measurements: CPU DeepSpeed steps and the H100 rows in benchmarks/results.

CPU: 2 gloo workers train ViT-tiny (micro-batch 32, fp32) under ZeRO 1/2/3 with and without gradient
checkpointing, DeepSpeed's buckets at 1e6 elements, plus ZeRO-1 with DeepSpeed's default 5e8-element bucket
and LiT-style runs with a locked tower (image or text, ZeRO 1/2/3; the ZeRO-1 and ZeRO-3 CPU peaks move by up
to 20 MB between identical runs, cause not found, so read those rows as noisy);
the peak is the allocator-level one of ``harness.measure`` (the cases are ``harness.plan_cases``). GPU: every row of
``benchmarks/results/gpu_step_h100.jsonl`` run eagerly through DeepSpeed (``torch.compile`` changes what is
saved, and the plain-PyTorch baseline has no ZeRO optimizer: the planner models neither), predicted peak vs ``peak_mem_gib`` (its step time at the measured MFU would be
circular). Rows go to ``benchmarks/results/plan_check.jsonl``.

    python benchmarks/plan_check.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from harness.plan_cases import BUCKET, measured, predicted_shape
from models import get_model_spec
from orchestrator.plan import GIB, StepShape, estimate_memory
from orchestrator.plan.timing import MEASUREMENTS

RESULTS = Path(__file__).resolve().parent / "results" / "plan_check.jsonl"


def cpu_rows(folder: str) -> list[dict]:
    rows = []
    cases = [(z, c, BUCKET, None) for z in (1, 2, 3) for c in (False, True)] + [(1, False, None, None)]
    cases += [(z, c, BUCKET, lock) for z, c, lock in [(1, False, "image"), (2, False, "image"), (3, True, "image"),
                                                    (1, False, "text"), (3, True, "text")]]
    for zero_stage, checkpointing, bucket, lock in cases:
        result = measured(zero_stage, checkpointing, folder, bucket=bucket, lock=lock)
        shape = predicted_shape(zero_stage, checkpointing, bucket=bucket or int(5e8), lock=lock)
        predicted = estimate_memory(shape).allocated
        rows.append({"where": "cpu, 2 gloo workers", "model": "ViT-tiny", "micro_batch": shape.micro_batch,
                     "zero_stage": zero_stage, "grad_checkpointing": checkpointing, "precision": "fp32",
                     "recipe": f"{lock} tower locked" if lock else "none",
                     "bucket": bucket or "default 5e8", "predicted_mib": round(predicted / 2**20, 1),
                     "measured_mib": round(result["peak_bytes"] / 2**20, 1),
                     "ratio": round(predicted / result["peak_bytes"], 3)})
        print(_line(rows[-1], "mib"), flush=True)
    return rows


def gpu_rows() -> list[dict]:
    rows = []
    for line in MEASUREMENTS.read_text().splitlines():
        row = json.loads(line)
        if row["compile"] or row.get("deepspeed") is False:  # the planner models DeepSpeed's eager step
            continue
        precision = "autocast" if row.get("precision") == "autocast" else "bf16"  # rows without it: bf16 weights
        shape = StepShape(spec=get_model_spec(row["model"]), world_size=1, zero_stage=row["zero_stage"],
                          precision=precision, micro_batch=row["batch"], worker_batch=row["batch"],
                          global_batch=row["batch"], grad_checkpointing=row["grad_checkpointing"], text_tokens=20,
                          patch_dropout=row.get("patch_dropout", 0.0))
        predicted = estimate_memory(shape).allocated / GIB
        rows.append({"where": row["device"],
                     "model": row["model"], "micro_batch": row["batch"], "zero_stage": row["zero_stage"],
                     "grad_checkpointing": row["grad_checkpointing"], "precision": precision,
                     "recipe": f"patch dropout {row['patch_dropout']}" if row.get("patch_dropout") else "none",
                     "predicted_gib": round(predicted, 2), "measured_gib": row["peak_mem_gib"],
                     "ratio": round(predicted / row["peak_mem_gib"], 3)})
        print(_line(rows[-1], "gib"), flush=True)
    return rows


def _line(row: dict, unit: str) -> str:
    return (f"{row['where']:34s} {row['model']:9s} micro {row['micro_batch']:4d} ZeRO-{row['zero_stage']} "
            f"ckpt {'on ' if row['grad_checkpointing'] else 'off'} {row['precision']:8s} "
            f"{row['recipe'] if row['recipe'] != 'none' else '':18s} predicted "
            f"{row['predicted_' + unit]:8.2f} measured {row['measured_' + unit]:8.2f} {unit.upper()}  ratio {row['ratio']:.3f}")


def main() -> None:
    print("predicted vs measured peak allocated memory per GPU/worker")
    rows = gpu_rows()
    with tempfile.TemporaryDirectory() as folder:
        rows += cpu_rows(folder)
    RESULTS.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
