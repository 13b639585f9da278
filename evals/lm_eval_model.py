"""The `tide` model for lm-evaluation-harness: our decoder under any placement policy, lm-eval 0.4 conventions.

Built by lm-eval's CLI (`tide-lm-eval --model tide --model_args pretrained=DIR,policy=tide,gpu_budget=128/layer`)
or handed a loaded engine (`tide eval`). lm-eval's own `batch_size`, `max_batch_size` and `device` are accepted
(`batch_size`: generate_until's requests per forward, continuously batched; `auto` is 1; likelihoods run one
at a time; `device` places the model: a CUDA device on a machine without CUDA falls back
to the CPU with a warning, as lm-eval's HF model does). Unknown model_args are an error naming the known ones.

generate_until: the block-diffusion decoder, cut at the first stop string. Decode settings per request: the
task's gen_kwargs (`max_gen_toks`, `do_sample`, `temperature`, `top_p`, `top_k`) over the model_args, unless
`decode_from=model`, where the model_args govern and the task contributes only `until` (the paper's harness
does this: its gen length and sampling come from the model). `do_sample=True` with temperature 0 samples at
temperature 1, as Hugging Face's `generate` and the paper's harness do. Sampling is seeded per request from the
prompt, so every policy draws the same numbers and their tokens can be compared.

loglikelihood: lm-eval's TemplateLM encoding of (context, continuation), scored by the masked-diffusion bound
LLaDA-style models use: for a continuation of L tokens, E over l ~ U{1..L} and a uniform l-subset S of it of
(L / l) * sum_{i in S} log p(x_i | context, continuation with S masked) (LLaDA eq. 6), under the decoder's
block-causal mask. When 2^L - 1 <= mc_samples the expectation is computed exactly over every subset; otherwise
by mc_samples draws with stratified l (LLaDA's low-discrepancy trick) and common random numbers: the draws
depend on the context only, so the choices of one question are scored on the same masks.
"""

from __future__ import annotations

import logging
import math
import zlib
from itertools import combinations
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from tide.config import DecodeConfig
from tide.decode import Request
from tide.engine import Engine
from tide.model import block_causal_mask
from tide.policy import StepInfo

MC_SAMPLES = 16  # see the README ("Monte Carlo likelihoods") for the accuracy measured at 4..32
DECODE_FIELDS = ("gen_length", "block_length", "steps", "threshold", "temperature", "top_p", "top_k", "regime")
DEFAULT_GEN_LENGTH = 256  # lm-eval's default max_gen_toks


@register_model("tide")
class TideLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, policy: str = "reference", gpu_budget: str | None = None,
                 regime: str = "block-kv", gen_length: int | None = None, block_length: int = 32, steps: int = 32,
                 threshold: float = 0.95, temperature: float | None = None, do_sample: bool | None = None,
                 top_p: float | None = None, top_k: int | None = None, decode_from: str = "task", seed: int = 0,
                 mc_samples: int = MC_SAMPLES, dtype: str | None = None, device: str | None = "cpu",
                 cpu_threads: int = 1, refresh_interval: int | str = "auto", rank_by: str = "step",
                 cost_fetch: bool = False, prefetch: bool = False, profile: str | None = None,
                 host_kernel: str = "auto", batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 trust_remote_code: bool = False,
                 engine: Engine | None = None, progress: bool = True, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"tide: unknown model_args {sorted(unknown)}; known: pretrained, policy, gpu_budget, "
                             f"regime, {', '.join(DECODE_FIELDS[:-1])}, do_sample, decode_from, seed, mc_samples, "
                             "dtype, cpu_threads, refresh_interval, rank_by, cost_fetch, prefetch, profile, "
                             "host_kernel")
        if decode_from not in ("task", "model"):
            raise ValueError(f"tide: decode_from must be 'task' or 'model', got {decode_from!r}")
        self.name = str(pretrained or "built-in")
        if engine is None:
            engine = _load_engine(pretrained, policy, gpu_budget, device or "cpu", dtype, int(cpu_threads),
                                  refresh_interval, rank_by, bool(cost_fetch), bool(prefetch), profile, host_kernel)
        if engine.tokenizer is None:
            raise ValueError("tide: the lm-eval model needs a checkpoint with a tokenizer")
        self.engine, self.policy, self.tokenizer = engine, policy, engine.tokenizer
        self.model_decode = {k: v for k, v in dict(
            gen_length=gen_length, block_length=block_length, steps=steps, threshold=threshold,
            temperature=temperature, top_p=top_p, top_k=top_k, regime=regime).items() if v is not None}
        try:  # every model_arg checked here, with the CLI's rules, before any request runs
            DecodeConfig(**self.model_decode)
        except (TypeError, ValueError) as err:
            raise ValueError(f"tide: model_args: {err}") from None
        for name, value in (("mc_samples", mc_samples), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool) or (name == "mc_samples" and value < 1):
                raise ValueError(f"tide: model_args {name}={value!r}: expected an integer"
                                 + (" >= 1" if name == "mc_samples" else ""))
        self.do_sample, self.decode_from, self.seed = do_sample, decode_from, seed
        self.mc_samples, self.progress = mc_samples, progress
        self.batch_size, self.batch = batch_size, _batch_size(batch_size)  # generate_until's requests per forward
        self._rank, self._world_size = 0, 1
        self.records: list[dict[str, Any]] = []  # per request: task, doc, index, kind, output, stats

    # ---- lm-eval conventions -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if self.engine.eos_id is None:
            raise ValueError("tide: this checkpoint has no EOS id, needed to score an empty context")
        return self.engine.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.name).replace("/", "__")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TideLM:
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> TideLM:
        """lm-eval's constructor paths (its CLI hands model_args over as a dict, the Python API as a string), with
        model_args winning over lm-eval's own settings of the same name (`device=cpu` in model_args against
        lm-eval's --device default of cuda:0), where lm-eval's base class passes both and fails with a TypeError."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"tide: {self.name}: the tokenizer has no chat template ('chat_template' in "
                             "tokenizer_config.json, or a chat_template.jinja beside it); run without "
                             "--apply_chat_template")
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise ValueError(f"tide: chat template {name!r} not found; the tokenizer has {sorted(template)}")
            return template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from tide.engine import apply_chat_template

        self.chat_template(True)  # a clear error when there is none
        return apply_chat_template(self.tokenizer, chat_history, add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {"model": self.name, "policy": self.policy, "slots_per_layer": self.engine.store.slots,
                "decode": self.model_decode, "decode_from": self.decode_from, "mc_samples": self.mc_samples}

    # ---- generation ----------------------------------------------------------------------------------
    def decode_config(self, gen_kwargs: dict[str, Any], prompt: list[int]) -> DecodeConfig:
        """The decode settings of one request (see the module docstring for who governs)."""
        task = {"gen_length": gen_kwargs.get("max_gen_toks"), "temperature": gen_kwargs.get("temperature"),
                "top_p": gen_kwargs.get("top_p"), "top_k": gen_kwargs.get("top_k")}
        task = {k: v for k, v in task.items() if v is not None}
        first, second = (self.model_decode, task) if self.decode_from == "model" else (task, self.model_decode)
        settings = {**self.engine.decode_defaults, **second, **first}  # generation_config.json lowest
        do_sample = (self.do_sample if self.decode_from == "model" and self.do_sample is not None
                     else gen_kwargs.get("do_sample", self.do_sample))
        temperature = float(settings.get("temperature", 0.0))
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        seed = (self.seed + zlib.crc32(repr(prompt).encode())) & 0x7FFFFFFF
        return DecodeConfig(gen_length=int(settings.get("gen_length", DEFAULT_GEN_LENGTH)),
                            block_length=int(settings.get("block_length", 32)), steps=int(settings.get("steps", 32)),
                            threshold=float(settings.get("threshold", 0.95)), temperature=temperature,
                            top_p=settings.get("top_p"), top_k=settings.get("top_k"),
                            regime=settings.get("regime", "block-kv"), seed=seed)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request decoded with its own settings and seed; `batch` of them per forward, continuously batched
        within chunks of 4 x batch requests (the progress bar moves per chunk). A request's stats are its share, by
        generated tokens, of its chunk's totals (so sums over requests are the runs' totals)."""
        items = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            prompt = self.tok_encode(context)
            items.append((req, [until] if isinstance(until, str) else list(until),
                          Request(prompt, self.decode_config(gen_kwargs, prompt))))
        out = []
        tokens_total, seconds_total = 0, 0.0
        bar = tqdm(total=len(items), desc=f"tide {self.policy}: generate", unit="req",
                   disable=disable_tqdm or not self.progress)
        chunk = 1 if self.batch == 1 else 4 * self.batch
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            result = self.engine.run_batch([r for _, _, r in part], self.batch)
            stats = result["stats"]
            for (req, until, _), tokens in zip(part, result["tokens"], strict=True):
                text = self.engine.decode(tokens)
                cuts = [text.index(stop) for stop in until if stop and stop in text]
                share = len(tokens) / stats["generated_tokens"] if stats["generated_tokens"] else 1 / len(part)
                mine = {**{k: stats[k] * share for k in ("seconds", "forwards", "bytes_h2d", "pairs_gpu", "pairs_cpu")},
                        "generated_tokens": len(tokens)}
                self.records.append(record(req, "generate", tokens, mine if len(part) > 1 else stats))
                out.append(text[: min(cuts)] if cuts else text)
            tokens_total, seconds_total = tokens_total + stats["generated_tokens"], seconds_total + stats["seconds"]
            bar.update(len(part))
            bar.set_postfix_str(f"{tokens_total / max(seconds_total, 1e-9):.2f} tok/s")
        bar.close()
        return out

    # ---- likelihoods ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = []
        for _, context_enc, continuation_enc in tqdm(
                requests, desc=f"tide {self.policy}: loglikelihood", unit="req",
                disable=disable_tqdm or not self.progress):
            self.engine.executor.counters.clear()
            result = self.score(context_enc, continuation_enc)
            stats = {"forwards": self.forwards(len(continuation_enc)) + 1, **_traffic(self.engine)}
            self.records.append({"kind": "loglikelihood", "output": result, "stats": stats})
            out.append(result)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = super().loglikelihood(requests, disable_tqdm)
        for req, rec in zip(requests, self.records[-len(requests):], strict=True):  # tag with lm-eval's ids
            rec.update(record(req, "loglikelihood", rec["output"], rec["stats"]))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("tide: rolling log-likelihood (perplexity tasks) is not implemented")

    def exact(self, length: int) -> bool:
        """Whether a continuation of `length` tokens is scored over every subset (no more than mc_samples)."""
        return length < 31 and 2 ** length - 1 <= self.mc_samples

    def forwards(self, length: int) -> int:
        """Forwards the bound takes for a continuation of `length` tokens."""
        return 2 ** length - 1 if self.exact(length) else self.mc_samples

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(the bound on log p(continuation | context), whether greedy decoding of it from all-masked matches)."""
        engine, L = self.engine, len(continuation)
        if not context or not L:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        device = next(engine.model.parameters()).device
        ids = torch.tensor(context + continuation, device=device)
        T, P = len(ids), len(context)
        mask = block_causal_mask(T, self.model_decode.get("block_length", 32), device)
        block = T // self.model_decode.get("block_length", 32)

        def masked_logp(where: list[int], i: int) -> float:
            noisy = ids.clone()
            noisy[where] = engine.mask_id
            logits = engine.model(noisy[None], 0, mask, at=StepInfo(block, i))[0]
            picked = torch.log_softmax(logits[where].float(), dim=-1).gather(1, ids[where][:, None])
            return float(picked.sum())

        if self.exact(L):  # P(l) = 1/L, P(S | l) = 1/C(L, l), factor L/l: each subset weighs 1 / (l C(L, l))
            estimate = 0.0
            for i, subset in enumerate(s for n in range(1, L + 1) for s in combinations(range(L), n)):
                n = len(subset)
                estimate += masked_logp([P + j for j in subset], i) / (n * math.comb(L, n))
        else:
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(repr(context).encode()))
            offset = float(torch.rand((), generator=gen)) * L
            total = 0.0
            for i in range(self.mc_samples):
                n = int(offset + i * L / self.mc_samples) % L + 1  # stratified over 1..L
                where = (P + torch.randperm(L, generator=gen)[:n]).tolist()
                total += masked_logp(where, i) * L / n
            estimate = total / self.mc_samples
        all_masked = ids.clone()
        all_masked[P:] = engine.mask_id
        logits = engine.model(all_masked[None], 0, mask, at=StepInfo(block, self.mc_samples))[0]
        greedy = bool((logits[P:].argmax(-1) == ids[P:]).all())
        return estimate, greedy


def _traffic(engine: Engine) -> dict[str, Any]:
    totals = engine.executor.finish().totals()
    return {k: totals[k] for k in ("bytes_h2d", "pairs_gpu", "pairs_cpu")}


def _batch_size(value: Any) -> int:
    """lm-eval's batch_size (an int, its string, or 'auto'/'auto:N', read as 1) as requests per forward."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 1
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"tide: batch_size={value!r}: expected an integer >= 1 (or auto)")
    return size


def record(req: Any, kind: str, output: Any, stats: dict[str, Any]) -> dict[str, Any]:
    keep = ("generated_tokens", "seconds", "forwards", "bytes_h2d", "pairs_gpu", "pairs_cpu")
    return {"task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None),
            "idx": getattr(req, "idx", 0), "kind": kind, "output": output,
            "stats": {k: stats[k] for k in keep if k in stats}}


def _load_engine(pretrained: str | None, policy: str, gpu_budget: str | None, device: str, dtype: str | None,
                 cpu_threads: int, refresh_interval: int | str, rank_by: str, cost_fetch: bool, prefetch: bool,
                 profile: str | None, host_kernel: str = "auto") -> Engine:
    """An engine built from model_args (lm-eval's CLI path)."""
    import tide.baselines  # noqa: F401  (registers the baseline policies)
    import tide.refresh  # noqa: F401
    from tide.config import parse_refresh_interval
    from tide.device import resolve_device
    from tide.engine import load, torch_dtype
    from tide.hub import resolve_model

    if device.startswith("cuda") and not torch.cuda.is_available():  # as lm-eval's own HF model does
        logging.getLogger("tide").warning("tide: device %r, but CUDA is not available here: running on the CPU "
                                          "(lm-eval's --device defaults to cuda:0; --device cpu says so)", device)
        device = "cpu"
    device = str(resolve_device(device))  # indexed, as the engine and the calibration use it
    path = resolve_model(pretrained)
    options: dict[str, Any] = {}
    if policy == "tide":
        options = {"refresh_interval": parse_refresh_interval(refresh_interval),
                   "rank": rank_by, "cost_fetch": cost_fetch, "prefetch_next": prefetch}
        if refresh_interval == "auto" or cost_fetch:
            from tide.calibrate import load_or_calibrate
            from tide.config import ModelConfig

            cfg = ModelConfig.from_json(path / "config.json")
            options["cost"] = load_or_calibrate(profile, cfg.hidden_size, cfg.moe_intermediate_size,
                                                torch_dtype(dtype, cfg), device, cpu_threads, host_kernel)
    budget = None if gpu_budget is None else str(gpu_budget)
    return load(path, policy=policy, gpu_budget=budget, device=device, dtype=None if dtype == "auto" else dtype,
                cpu_threads=cpu_threads, host_kernel=host_kernel, **options)
