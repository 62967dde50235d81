"""Running an exported GGUF in llama.cpp (the `xllamacpp` wheel: `pip install -e ".[edge]"`).

    LlamaCpp(gguf_path, threads=2)        an in-process llama.cpp server on one GGUF file:
        .generate(prompt, n_new)          greedy token ids (prompt: token ids or text)
        .top_logprobs(prompt_ids, k)      the k most likely next tokens with their log-probabilities
        .tokenize(text)                   llama.cpp's token ids for text (no BOS/EOS added)
    llamacpp_generate(gguf_path, prompt, n_new, threads)           the same greedy ids, one call
    llamacpp_bench(gguf_path, prompt=..., n_gen=..., threads=...)  tokens/s and peak RSS, measured
                                                                    in a fresh process

Greedy means temperature 0 (llama.cpp then takes the argmax) with EOS ignored, so `generate`
returns exactly n_new ids, as `olmo_jax.generate.greedy` does.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

from olmo_jax.config import OlmoJaxError

INSTALL_HINT = 'llama.cpp (xllamacpp) is not installed: pip install -e ".[edge]"'


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError as e:
        raise OlmoJaxError(INSTALL_HINT) from e
    return xllamacpp


def _params(xlc, gguf_path: str, threads: int | None, n_ctx: int, precise: bool = False):
    p = xlc.CommonParams()
    p.model.path = gguf_path
    p.n_ctx = n_ctx
    p.n_parallel = 1  # one slot: the whole context and the prompt cache serve our requests
    if threads:
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
    if precise:  # llama.cpp's defaults keep the KV cache in F16 and its CPU flash attention works in F16
        p.cache_type_k = p.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    p.warmup = False
    p.verbosity = -1  # llama.cpp logs nothing unless something fails
    return p


class LlamaCpp:
    """llama.cpp (in this process) serving one GGUF file; requests reuse the cached prompt prefix.

    precise: an F32 KV cache and no flash attention, so an F32 file computes in F32 throughout
      (parity checks); default: llama.cpp's own settings (F16 KV cache, flash attention on CPU), which
      moved log-probabilities of a pruned SmolLM2 by up to 0.1 where precise stayed within 4e-4.
    """

    def __init__(self, gguf_path: str, *, threads: int | None = None, n_ctx: int = 2048,
                 precise: bool = False):
        xlc = _xllamacpp()
        params = _params(xlc, gguf_path, threads, n_ctx, precise)
        try:
            self._server = xlc.Server(params)
        except Exception as e:  # llama.cpp refuses a file it cannot load (details go to its log)
            reason = str(e).strip("'\"")
            raise OlmoJaxError(f"llama.cpp cannot load {gguf_path}: {reason}") from e

    def _post(self, endpoint: str, body: dict) -> dict:
        """llama.cpp's native HTTP endpoints (this process's own server): unlike the OpenAI-style
        `handle_completions`, /completion returns every generated token id."""
        request = urllib.request.Request(self._server.listening_address + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            raise OlmoJaxError(f"llama.cpp {endpoint}: {e.read().decode(errors='replace')[:300]}") from e

    def _complete(self, prompt, n_new: int, n_probs: int = 0) -> dict:
        return self._post("/completion", {"prompt": prompt, "n_predict": n_new, "temperature": 0.0, "top_k": 1,
                                          "ignore_eos": True, "n_probs": n_probs, "return_tokens": True,
                                          "cache_prompt": True})

    def generate(self, prompt: list[int] | str, n_new: int) -> list[int]:
        """Greedy continuation: n_new token ids."""
        return self._complete(prompt if isinstance(prompt, str) else list(prompt), n_new)["tokens"]

    def top_logprobs(self, prompt_ids: list[int], k: int) -> list[tuple[int, float]] | None:
        """The k most likely next tokens after prompt_ids, as (id, log-probability), best first; None
        when the most likely one is an incomplete UTF-8 piece (its probabilities are withheld by
        llama.cpp's server, which reports text-complete tokens only; `generate` still returns it)."""
        steps = self._complete(list(prompt_ids), 1, k).get("completion_probabilities") or []
        return [(c["id"], c["logprob"]) for c in steps[0]["top_logprobs"]] if steps else None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenisation of text (special tokens parsed, no BOS/EOS added)."""
        return self._post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]


def llamacpp_generate(gguf_path: str, prompt: list[int] | str, n_new: int, threads: int | None = None, *,
                      n_ctx: int = 2048, precise: bool = False) -> list[int]:
    """Greedy (deterministic) continuation of prompt (token ids or text) by llama.cpp: n_new ids."""
    return LlamaCpp(gguf_path, threads=threads, n_ctx=n_ctx, precise=precise).generate(prompt, n_new)


# Runs in a fresh interpreter that imports nothing but xllamacpp, so its peak RSS is llama.cpp's
# and the model's (plus a bare Python), not JAX's or torch's. The peak is /proc's VmHWM: on Linux
# getrusage's ru_maxrss keeps the parent's peak across fork + exec (a JAX parent's gigabytes).
_BENCH_CHILD = r"""
import json, resource, sys
import xllamacpp as xlc

def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 2**20 if sys.platform == "darwin" else r / 1024

a = json.loads(sys.argv[1])
p = xlc.CommonParams()
p.model.path = a["gguf_path"]; p.n_ctx = a["n_ctx"]; p.n_parallel = 1; p.verbosity = -1
p.cpuparams.n_threads = a["threads"]; p.cpuparams_batch.n_threads = a["threads"]
python_rss_mb = peak_rss_mb()
server = xlc.Server(p)
request = {"prompt": a["prompt"], "max_tokens": a["n_gen"], "temperature": 0.0, "top_k": 1,
           "ignore_eos": True, "cache_prompt": False}
server.handle_completions(dict(request, max_tokens=4))  # warm-up: first-call allocations
t = server.handle_completions(request)["timings"]
print(json.dumps({"prompt_tokens_per_s": t["prompt_per_second"], "gen_tokens_per_s": t["predicted_per_second"],
                  "prompt_tokens": t["prompt_n"], "gen_tokens": t["predicted_n"],
                  "peak_rss_mb": peak_rss_mb(), "python_rss_mb": python_rss_mb}))
"""


def llamacpp_bench(gguf_path: str, *, prompt: list[int] | str, n_gen: int, threads: int,
                   n_ctx: int = 2048, timeout_s: float = 1800) -> dict:
    """llama.cpp's own timings for one prompt pass and n_gen greedy tokens, in a fresh process.

    Returns prompt_tokens_per_s, gen_tokens_per_s, peak_rss_mb (the child's peak resident set:
    model, KV cache and a bare interpreter; python_rss_mb is that interpreter before loading),
    prompt_tokens, gen_tokens."""
    _xllamacpp()  # the hint here, not a traceback from the child
    args = json.dumps({"gguf_path": gguf_path, "prompt": prompt if isinstance(prompt, str) else list(prompt),
                       "n_gen": n_gen, "threads": threads, "n_ctx": n_ctx})
    run = subprocess.run([sys.executable, "-c", _BENCH_CHILD, args], capture_output=True, text=True,
                         timeout=timeout_s)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise OlmoJaxError(f"llama.cpp benchmark of {gguf_path} failed (exit {run.returncode}): {tail}")
    return json.loads(run.stdout.strip().splitlines()[-1])
