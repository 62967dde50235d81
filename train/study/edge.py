"""The edge stage: a model of the study on an edge device. A GGUF file per pipeline.edge.quants,
its size, llama.cpp's prompt and generation speed and peak RSS at each thread count, and the CSQA
accuracy of the quantised weights (read back through our GGUF loader, scored by our OLMES eval).

llama.cpp runs in a fresh process; while it runs, the load other processes put on the machine is
recorded (`other_cpu_cores`, olmo_jax/cpuload.py), as the benchmarks do. A contended timing is
measured again once the machine is idle (up to pipeline.edge.repeats times), the least contended
kept, and a row still contended is flagged (`contended`: the report marks it)."""
from __future__ import annotations

import os

import olmo_jax
from olmo_jax.config import OlmoJaxError
from olmo_jax.cpuload import CONTENDED_CORES, OtherLoad, wait_idle
from olmo_jax.distributed import is_primary
from olmo_jax.edge import llamacpp_bench
from train.study import models

EDGE_PROMPT = ("Question: The fox walked from the city into the forest, what was it looking for?\nAnswer: "
               "natural habitat\n\nQuestion: Where would you put a plate after washing it?\nAnswer:")


def edge(study, out: str, inputs: dict, *, model_stage: str) -> dict:
    e = study.settings.pipeline.edge
    model = models.load(study.settings, models.model_path(study.store.path(model_stage)), study.mesh)
    rows = [_row(study, model, out, quant, tuple(e.threads)) for quant in e.quants]
    return {"model_stage": model_stage, "intermediate_size": model.config.intermediate_size, "quants": rows}


def timed(path: str, gen_tokens: int, threads: int, repeats: int) -> dict:
    """llama.cpp's timings with the other processes' load; re-measured while contended."""
    best = None
    for attempt in range(max(1, repeats)):
        if attempt:
            wait_idle(CONTENDED_CORES, 60.0)
        with OtherLoad() as load:
            t = llamacpp_bench(path, prompt=EDGE_PROMPT, n_gen=gen_tokens, threads=threads)
        t = dict(t, other_cpu_cores=load.cores, attempts=attempt + 1)
        if best is None or (load.cores or 0.0) < (best["other_cpu_cores"] or 0.0):
            best = t
        if load.cores is None or load.cores <= CONTENDED_CORES:
            break
    best["contended"] = best["other_cpu_cores"] is not None and best["other_cpu_cores"] > CONTENDED_CORES
    return best


def _row(study, model, out: str, quant: str, threads: tuple[int, ...]) -> dict:
    e = study.settings.pipeline.edge
    path = os.path.join(out, f"model-{quant}.gguf")
    try:
        olmo_jax.save_gguf(model, path, quant=quant, tokenizer_src=study.dense_path, overwrite=True)
    except OlmoJaxError as err:  # e.g. an architecture GGUF has no names for: the row says why
        return {"quant": quant, "error": str(err)}
    row = {"quant": quant, "file_mb": os.path.getsize(path) / 1e6, "llamacpp": {}}
    try:
        for t in threads:
            row["llamacpp"][str(t)] = timed(path, int(e.gen_tokens), t, int(e.repeats))
    except OlmoJaxError as err:  # llama.cpp not installed: sizes and accuracy still measured
        if is_primary() and not row["llamacpp"]:
            print(f"edge: {err}; llama.cpp speed columns skipped", flush=True)
        row["llamacpp_error"] = str(err)
    try:  # transformers' GGUF reader dequantises the file (it has no olmo2 GGUF reader)
        back = olmo_jax.from_pretrained(path, dtype="float32", mesh=study.mesh, cache=False)
    except Exception as err:  # noqa: BLE001 - transformers raises several types; the row says which
        row["eval_error"] = " ".join(str(err).split())[:300]
        return row
    row["eval"] = study.evaluator.csqa(back, out, limit=e.eval_limit or None, name=f"eval-{quant}.json")
    return row
