"""The AOT report: every program of a study compiled for a topology, per chip: bytes, fit, FLOPs."""
from __future__ import annotations

import os
from typing import Any

import olmo_jax
from olmo_jax.config import ModelConfig, OlmoJaxError
from train.aot import hardware, programs
from train.aot.hardware import GIB, Hardware
from train.settings import Settings


def model_config(s: Settings, layers: int | None = None) -> ModelConfig:
    """The dense model of a study: its config.json when the weights are here, else the released
    model's shapes the settings carry (`model.hf_config`), in the study's dtypes."""
    src = s.model.src
    if src == "smollm2" or os.path.exists(src):
        cfg = olmo_jax.load_config(src)
    elif s.model.hf_config:
        cfg = ModelConfig.from_hf(dict(s.model.hf_config))
    else:
        raise OlmoJaxError(f"model.src {src!r} is not here and the config has no model.hf_config to compile for")
    cfg = cfg.replace(param_dtype=s.model.dtype, compute_dtype=s.model.compute_dtype)
    return cfg.replace(num_layers=layers) if layers else cfg


def aot_report(s: Settings, hw: Hardware, *, layers: int | None = None, headroom: float = 0.10,
               only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Compiles the study's programs (`only`: those named) for `hw`; per program its memory and fit."""
    dense = model_config(s, layers)
    mesh = programs.mesh_for(s, hardware.devices(hw))
    budget = hw.chip.hbm_bytes
    study = programs.study_programs(s, dense, mesh)
    unknown = sorted(set(only) - {p.name for p in study})
    if unknown:
        raise OlmoJaxError(f"unknown program {', '.join(unknown)}; choose from {', '.join(p.name for p in study)}")
    rows = []
    for prog in (p for p in study if not only or p.name in only):
        got = programs.compile_program(prog)
        # XLA's cost analysis counts a loop body once (the layer scan, the micro-batch scan), so the
        # FLOPs per step come from the model's formula; the compiler's figure is kept beside it.
        flops = prog.model_flops / mesh.size
        row = {"name": prog.name, "attention": prog.attention, "model_flops": prog.model_flops, "flops": flops,
               "note": prog.note} | got
        if got["compiled"]:
            total = got["per_device_bytes"]["total"]
            row |= {"fits": total <= (1.0 - headroom) * budget, "headroom": 1.0 - total / budget,
                    "step_time_lower_bound_s": flops * hw.step_floor_s}
        else:
            row |= {"fits": False, "headroom": None, "step_time_lower_bound_s": None}
        rows.append(row)
    return {"topology": hw.name, "compiled_for": hw.topology or "host CPU (one device)", "chips": hw.chips,
            "devices": mesh.size, "mesh": dict(mesh.shape), "hbm_bytes_per_chip": budget,
            "peak_flops_per_chip": hw.chip.peak_flops, "required_headroom": headroom,
            "model": {"arch": dense.arch, "layers": dense.num_layers, "hidden": dense.hidden_size,
                      "params": dense.num_params()["total"], "param_dtype": dense.param_dtype,
                      "compute_dtype": dense.compute_dtype},
            "programs": rows}


def fits_all(report: dict) -> bool:
    return all(p["fits"] for p in report["programs"])


def table(report: dict) -> str:
    m = report["model"]
    lines = [f"{report['topology']} ({report['compiled_for']}): {report['devices']} devices, mesh {report['mesh']}, "
             f"{report['hbm_bytes_per_chip'] / GIB:.2f} GiB HBM per chip; {m['arch']} {m['layers']} layers, "
             f"{m['params'] / 1e9:.2f} B params ({m['param_dtype']}, compute {m['compute_dtype']})",
             "| program | attention | args GiB | out GiB | temp GiB | resident GiB | total GiB | headroom | fits | TFLOP/device | step >= ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["programs"]:
        if not p["compiled"]:
            lines.append(f"| {p['name']} | {p['attention']} | | | | | | | NO | | | {p['error'][:160]}")
            continue
        b = {k: v / GIB for k, v in p["per_device_bytes"].items()}
        lines.append(f"| {p['name']} | {p['attention']} | {b['arguments']:.2f} | {b['outputs']:.2f} | {b['temporaries']:.2f} | "
                     f"{b['resident']:.2f} | {b['total']:.2f} | {100 * p['headroom']:.0f}% | {'yes' if p['fits'] else 'NO'} | "
                     f"{p['flops'] / 1e12:.2f} | {1e3 * p['step_time_lower_bound_s']:.1f} |")
    return "\n".join(lines)
