"""The `tide` model for lm-evaluation-harness: generation through our decoder, likelihoods by Monte Carlo.

generate_until: the block-diffusion decoder under the chosen policy, cut at the first stop string.
loglikelihood: the masked-diffusion Monte Carlo estimate LLaDA-style models use. For a continuation of L
tokens, each of `mc_samples` draws masks l ~ U{1..L} of its tokens (uniformly chosen) and scores
(L / l) * sum over masked tokens of log p(token | the rest); the estimate is the mean over draws (an
ELBO-style bound on log p(continuation | context), LLaDA eq. 6). The forward sees the block-causal mask the
decoder uses. Draws are seeded from `seed` and the request, so the estimate is deterministic. is_greedy:
one forward with the whole continuation masked reproduces it by argmax.
Every output's token ids are kept (`records`), so the harness can compare policies sample by sample.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tide.config import DecodeConfig
from tide.engine import Engine
from tide.model import block_causal_mask
from tide.policy import StepInfo


@register_model("tide")
class TideLM(LM):
    def __init__(self, model: str | None = None, policy: str = "reference", gpu_budget: str | None = None,
                 regime: str = "block-kv", gen_length: int = 64, block_length: int = 32, steps: int = 32,
                 threshold: float = 0.95, device: str = "cpu", dtype: str | None = None, cpu_threads: int = 1,
                 mc_samples: int = 8, seed: int = 0, engine: Engine | None = None, **policy_options: Any) -> None:
        super().__init__()
        if engine is None:
            import baselines  # noqa: F401  (registers the baseline policies)
            import tide.refresh  # noqa: F401
            from tide.checkpoint import resolve_model
            from tide.engine import load

            engine = load(resolve_model(model), policy=policy, gpu_budget=gpu_budget, device=device, dtype=dtype,
                          cpu_threads=int(cpu_threads), **policy_options)
        if engine.tokenizer is None:
            raise ValueError("the tide lm-eval model needs a checkpoint with a tokenizer")
        self.engine, self.policy = engine, policy
        self.cfg = DecodeConfig(gen_length=int(gen_length), block_length=int(block_length), steps=int(steps),
                                threshold=float(threshold), regime=regime, seed=int(seed))
        self.mc_samples, self.seed = int(mc_samples), int(seed)
        self.records: list[dict[str, Any]] = []  # per request: task, doc, request index, kind, output

    # ---- generation ----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = self.cfg
            if kwargs.get("max_gen_toks"):
                cfg = DecodeConfig(**{**vars(cfg), "gen_length": int(kwargs["max_gen_toks"])})
            tokens = self.engine.generate(self.engine.encode(context), cfg).tokens
            text = self.engine.decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.records.append(record(req, "generate", tokens))
            out.append(text)
        return out

    # ---- likelihoods ---------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            result = self.score(self.engine.encode(context), self.engine.encode(continuation))
            self.records.append(record(req, "loglikelihood", result))
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("tide: rolling log-likelihood (perplexity tasks) is not implemented")

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        engine, L = self.engine, len(continuation)
        if not context or not L:
            raise ValueError("loglikelihood needs a non-empty context and continuation")
        device = next(engine.model.parameters()).device
        ids = torch.tensor(context + continuation, device=device)
        T, P = len(ids), len(context)
        mask = block_causal_mask(T, self.cfg.block_length, device)
        gen = torch.Generator().manual_seed(self.seed + zlib.crc32(str((context, continuation)).encode()))
        total = 0.0
        for i in range(self.mc_samples):
            n_masked = int(torch.randint(1, L + 1, (1,), generator=gen))
            where = P + torch.randperm(L, generator=gen)[:n_masked]
            noisy = ids.clone()
            noisy[where] = engine.mask_id
            logits = engine.model(noisy[None], 0, mask, at=StepInfo(T // self.cfg.block_length, i))[0]
            logp = torch.log_softmax(logits[where.to(device)], dim=-1)
            total += float(logp.gather(1, ids[where.to(device)][:, None]).sum()) * L / n_masked
        masked = ids.clone()
        masked[P:] = engine.mask_id
        logits = engine.model(masked[None], 0, mask, at=StepInfo(T // self.cfg.block_length, self.mc_samples))[0]
        greedy = bool((logits[P:].argmax(-1) == ids[P:]).all())
        return total / self.mc_samples, greedy


def record(req: Any, kind: str, output: Any) -> dict[str, Any]:
    return {"task": getattr(req, "task_name", None), "doc_id": getattr(req, "doc_id", None),
            "idx": getattr(req, "idx", 0), "kind": kind, "output": output}
