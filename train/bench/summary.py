"""The bench's console summary: one line per timing, the ratios and the goals."""
from __future__ import annotations


def _timing_line(group: str, name: str, t: dict) -> str:
    if "error" in t:
        return f"{group}/{name}: ERROR {t['error']}"
    mfu = f"  MFU {100 * t['mfu']:.1f}%" if t.get("mfu") is not None else ""
    if t.get("mfu_datasheet") is not None:
        mfu += f" (datasheet {100 * t['mfu_datasheet']:.1f}%)"
    oth = t.get("other_cpu_cores")
    oth = f"  (other procs {oth:.2f} cores)" if oth is not None else ""
    if t.get("cpu_s_per_step") is not None:
        oth = f"  cpu {t['cpu_s_per_step'] * 1e3:.0f} ms/step" + oth
    return (f"{group}/{name}: median {t['median_s'] * 1e3:.1f} ms  {t['tokens_per_s']:.0f} tok/s  "
            f"{t['achieved_flops'] / 1e9:.1f} GFLOP/s{mfu}{oth}")


def summary_text(res: dict) -> str:
    lines = [f"variant {res['variant']}  machine {res['machine']['cpu_model']} x{res['machine']['cpu_count']}"
             f"  jax {res['machine']['jax_backend']}"]
    pk = res["peak"]
    if pk:
        lines.append(f"matmul peak: jax {pk['jax_matmul_flops'] / 1e9:.1f} GFLOP/s, torch "
                     f"{pk['torch_matmul_flops'] / 1e9:.1f} GFLOP/s")
    lines += [_timing_line(group, name, t) for group in ("train", "forward") for name, t in res[group].items()]
    if res["loss_check"]:
        lc = res["loss_check"]
        lines.append(f"initial loss: jax {lc['jax_initial_loss']:.6f} torch {lc['torch_initial_loss']:.6f} "
                     f"rel diff {lc['rel_diff']:.2e}")
    if res["prune"]:
        p = res["prune"]
        lines.append(f"prune {p['ratio']}: masked {p['masked']['median_s'] * 1e3:.1f} ms, compact "
                     f"{p['compact']['median_s'] * 1e3:.1f} ms, speed-up {p['speedup_compact_vs_masked']:.2f}x "
                     f"(FLOP ratio {p['flop_ratio_dense_vs_compact']:.2f}x)")
    if res["decode"]:
        d = res["decode"]
        lines.append(f"decode ms/token: torch dense {d['torch_dense_ms_per_token']:.2f} compact "
                     f"{d['torch_compact_ms_per_token']:.2f} | jax dense {d['jax_dense_ms_per_token']:.2f} compact "
                     f"{d['jax_compact_ms_per_token']:.2f}")
    lines += [f"{k}: {v:.3f}" for k, v in res["ratios"].items()]
    lines += [f"goal {k}: {'MET' if v else 'MISSED'}" for k, v in res["goals"].items()]
    return "\n".join(lines)
