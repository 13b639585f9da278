"""The `tide` model for lm-evaluation-harness: our decoder under any placement policy, lm-eval 0.4 conventions.

Built by lm-eval's CLI (`tide-lm-eval --model tide --model_args pretrained=DIR,policy=tide,gpu_budget=128/layer`)
or handed a loaded engine (`tide eval`). lm-eval's own `batch_size`, `max_batch_size` and `device` are accepted
(`batch_size`: generate_until's requests per forward, continuously batched, and loglikelihood's masked copies per
forward; `auto` (or `auto:N`) picks, for each call, the largest batch up to `max_batch_size` (default 64) whose
requests' KV caches and activations fit the device's free memory then, and logs it; `device` places the model:
a CUDA device on a machine without CUDA falls back to the CPU with a warning, as lm-eval's HF model does).
Unknown model_args are an error naming the known ones.

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
from tide.evals.distributed import ONE, Group, all_gather, barrier, gather_object, join, rank_device, shared_master
from tide.model import Part, block_causal_mask
from tide.policy import StepInfo

MC_SAMPLES = 16  # see the README ("Monte Carlo likelihoods") for the accuracy measured at 4..32
DECODE_FIELDS = ("gen_length", "block_length", "steps", "threshold", "temperature", "top_p", "top_k", "regime")
DEFAULT_GEN_LENGTH = 256  # lm-eval's default max_gen_toks
AUTO_MAX_BATCH = 64  # lm-eval's default max_batch_size


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
                 trust_remote_code: bool = False, engine: Engine | None = None, progress: bool = True,
                 group: Group | None = None, shm_dir: str | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"tide: unknown model_args {sorted(unknown)}; known: pretrained, policy, gpu_budget, "
                             f"regime, {', '.join(DECODE_FIELDS[:-1])}, do_sample, decode_from, seed, mc_samples, "
                             "dtype, cpu_threads, refresh_interval, rank_by, cost_fetch, prefetch, profile, "
                             "host_kernel, batch_size, max_batch_size, shm_dir")
        if decode_from not in ("task", "model"):
            raise ValueError(f"tide: decode_from must be 'task' or 'model', got {decode_from!r}")
        self.name = str(pretrained or "built-in")
        self.group = group or ONE  # a loaded engine comes with its data-parallel group (tide eval --nproc)
        if engine is None:  # lm-eval's CLI: under torchrun / accelerate launch, one rank of a data-parallel run
            self.group = join(device or "cpu")
            device = rank_device(device or "cpu", self.group)
            engine = _load_engine(pretrained, policy, gpu_budget, device or "cpu", dtype, int(cpu_threads),
                                  refresh_interval, rank_by, bool(cost_fetch), bool(prefetch), profile, host_kernel,
                                  _batch_size(batch_size), self.group, shm_dir)
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
        self.batch_size, self.batch = batch_size, _batch_size(batch_size)  # requests (or copies) per forward
        self.auto = isinstance(batch_size, str) and batch_size.startswith("auto")
        self.max_batch_size = _batch_size(max_batch_size or AUTO_MAX_BATCH)
        self._rank, self._world_size = self.group.rank, self.group.world_size
        self.records: list[dict[str, Any]] = []  # per request: task, doc, index, kind, output, stats
        self.chosen_batch_sizes: list[int] = []  # what batch_size=auto picked, per call

    # ---- lm-eval conventions -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        if self.engine.eos_id is None:
            raise ValueError("tide: this checkpoint has no EOS id, needed to score an empty context")
        return self.engine.eos_id

    @property
    def device(self) -> torch.device:
        return self.engine.store.device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather(tensor, self.group)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        return gather_object(obj, self.group, dst)

    def barrier(self) -> None:
        barrier(self.group)

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
        batch = self.pick_batch([r for _, _, r in items])
        chunk = 1 if batch == 1 else 4 * batch
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            result = self.engine.run_batch([r for _, _, r in part], batch)
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

    def pick_batch(self, requests: list[Request]) -> int:
        """The batch size for these requests: the given one, or with `auto` the largest that fits now."""
        if not self.auto or not requests:
            return self.batch
        batch = max(1, self.engine.largest_batch(requests, self.max_batch_size))
        logging.getLogger("tide").info("tide: batch_size=auto: %d (of at most %d) for %d requests", batch,
                                       self.max_batch_size, len(requests))
        self.chosen_batch_sizes.append(batch)
        return batch

    # ---- likelihoods ---------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Each request's bound; with batch > 1, `batch` of the bound's masked copies per forward (one request's
        copies and the next one's packed alike), in chunks of 4 x batch requests. A request's stats are its share,
        by forwards of its own, of its chunk's packed forwards and traffic."""
        out = []
        bar = tqdm(total=len(requests), desc=f"tide {self.policy}: loglikelihood", unit="req",
                   disable=disable_tqdm or not self.progress)
        L = self.model_decode.get("block_length", 32)  # a masked copy holds its whole sequence, no KV cache
        batch = self.pick_batch([Request(c, DecodeConfig(gen_length=len(x), block_length=L, regime="full"))
                                 for _, c, x in requests if c and x])
        chunk = 1 if batch == 1 else 4 * batch
        for start in range(0, len(requests), chunk):
            pairs = [(c, x) for _, c, x in requests[start:start + chunk]]
            self.engine.executor.counters.clear()
            results = [self.score(*pairs[0])] if batch == 1 else self.score_batch(pairs, batch)
            traffic = _traffic(self.engine)
            own = [self.forwards(len(x)) + 1 for _, x in pairs]
            packed = sum(own) if batch == 1 else -(-sum(own) // batch)
            for result, n in zip(results, own, strict=True):
                share = n / sum(own)
                stats = {"forwards": packed * share, **{k: v * share for k, v in traffic.items()}}
                self.records.append({"kind": "loglikelihood", "output": result, "stats": stats})
                out.append(result)
            bar.update(len(pairs))
        bar.close()
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

    def masks(self, context: list[int], continuation: list[int]) -> tuple[list[tuple[list[int], int, int]], int]:
        """The bound's forwards for one request: ([masked continuation offsets], num, den) each, a forward adding
        log p(masked | rest) * num / den, and the divisor of the sum (see the module docstring)."""
        L = len(continuation)
        if self.exact(L):  # P(l) = 1/L, P(S | l) = 1/C(L, l), factor L/l: each subset weighs 1 / (l C(L, l))
            return [(list(s), 1, n * math.comb(L, n)) for n in range(1, L + 1) for s in combinations(range(L), n)], 1
        gen = torch.Generator().manual_seed(self.seed + zlib.crc32(repr(context).encode()))
        offset = float(torch.rand((), generator=gen)) * L
        out = []
        for i in range(self.mc_samples):
            n = int(offset + i * L / self.mc_samples) % L + 1  # stratified over 1..L
            out.append((torch.randperm(L, generator=gen)[:n].tolist(), L, n))
        return out, self.mc_samples

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(the bound on log p(continuation | context), whether greedy decoding of it from all-masked matches)."""
        return self.score_batch([(context, continuation)], 1)[0]

    @torch.no_grad()
    def score_batch(self, pairs: list[tuple[list[int], list[int]]], batch: int) -> list[tuple[float, bool]]:
        """score() of each (context, continuation), `batch` masked copies per forward (packed: attention per copy,
        the MoE layers routing all of them at once). Batch 1 is one copy per forward at the request's own clock
        (block of its end, step = copy index; the all-masked copy last, at step mc_samples); a batch runs on the
        batch's clock (forward f is block f // (mc_samples + 1), step f % (mc_samples + 1))."""
        engine = self.engine
        device = next(engine.model.parameters()).device
        L_block = self.model_decode.get("block_length", 32)
        copies, divisors = [], []  # copies: (request, ids, noisy ids, masked positions, num, den, step)
        for r, (context, continuation) in enumerate(pairs):
            if not context or not continuation:
                raise ValueError("loglikelihood needs a non-empty context and continuation")
            ids, P = torch.tensor(context + continuation, device=device), len(context)
            jobs, divisor = self.masks(context, continuation)
            divisors.append(divisor)
            for i, (offsets, num, den) in enumerate([*jobs, (list(range(len(continuation))), 0, 0)]):
                where = [P + j for j in offsets]
                noisy = ids.clone()
                noisy[where] = engine.mask_id
                copies.append((r, ids, noisy, where, num, den, self.mc_samples if den == 0 else i))
        masks: dict[int, torch.Tensor] = {}
        sums, greedy = [0.0] * len(pairs), [False] * len(pairs)
        window = self.mc_samples + 1
        for f, start in enumerate(range(0, len(copies), batch)):
            pack = copies[start:start + batch]
            parts = []
            for _, ids, noisy, _, _, _, _ in pack:
                T = len(ids)
                if T not in masks:
                    masks[T] = block_causal_mask(T, L_block, device)
                parts.append(Part(noisy, 0, masks[T]))
            if batch == 1:
                _, ids, noisy, _, _, _, step = pack[0]
                logits = [engine.model(noisy[None], 0, parts[0].mask, at=StepInfo(len(ids) // L_block, step))[0]]
            else:
                logits = engine.model.forward_packed(parts, StepInfo(f // window, f % window, requests=len(pack)))
            for (r, ids, _, where, num, den, _), lg in zip(pack, logits, strict=True):
                if den == 0:  # the all-masked copy: greedy decoding of the continuation from nothing
                    P = len(ids) - len(pairs[r][1])
                    greedy[r] = bool((lg[P:].argmax(-1) == ids[P:]).all())
                    continue
                picked = torch.log_softmax(lg[where].float(), dim=-1).gather(1, ids[where][:, None])
                sums[r] += float(picked.sum()) * num / den
        return [(s / d, g) for s, d, g in zip(sums, divisors, greedy, strict=True)]


def _traffic(engine: Engine) -> dict[str, Any]:
    totals = engine.executor.finish().totals()
    return {k: totals[k] for k in ("bytes_h2d", "pairs_gpu", "pairs_cpu")}


def _batch_size(value: Any) -> int:
    """lm-eval's batch_size (an int, its string, or 'auto'/'auto:N', read here as 1: TideLM.pick_batch decides
    per call) as requests per forward."""
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
                 profile: str | None, host_kernel: str = "auto", batch_size: int = 1, group: Group = ONE,
                 shm_dir: str | None = None) -> Engine:
    """An engine built from model_args (lm-eval's CLI path); the local ranks of a data-parallel run share one host
    master (evals/distributed.py)."""
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
                cpu_threads=cpu_threads, host_kernel=host_kernel, profile_batch=batch_size,
                host_master=shared_master(group, path, dtype, shm_dir), **options)
