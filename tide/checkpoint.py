"""Hugging Face checkpoint directories: lazy reading, random writing, tokenizers.

Owns files: config.json, `model.safetensors` or sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, tokenizer.json. Tensors are read one at a time through safetensors'
`safe_open` (memory-mapped), converted once and copied into their final home (a model parameter or an
expert store row), so a 30 GB checkpoint is never held in memory twice. Every error names the file or
tensor. Knows nothing about placement policies or decoding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from tide.config import ModelConfig
from tide.experts.store import ExpertStore
from tide.model import LLaDA2Model

INDEX = "model.safetensors.index.json"
LAYER = re.compile(r"model\.layers\.(\d+)\.")
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    pass


def expert_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


# Largest weight magnitude accepted: squares of larger values summed over a hidden size of 8192 overflow fp32
# (RMSNorm computes in fp32); trained weights are many orders of magnitude below it.
MAX_WEIGHT = 1e16


class CheckpointReader:
    """Maps tensor names to shards and opens each shard lazily, once. Every tensor read is checked: a floating
    dtype, and (unless check_finite=False) no NaN or infinity, so broken weights fail at load, naming the tensor."""

    def __init__(self, path: str | Path, check_finite: bool = True) -> None:
        self.path, self.check_finite = Path(path), check_finite
        self._handles: dict[str, object] = {}
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory (expected a Hugging Face checkpoint directory)")
        self.config = ModelConfig.from_json(self.path / "config.json")
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{index}: not a safetensors index ({err!r})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must map each tensor name to its shard's file name")
        elif (self.path / SINGLE).is_file():
            weight_map = {name: SINGLE for name in self._open(SINGLE).keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {INDEX} nor {SINGLE} found")
        self.weight_map: dict[str, str] = weight_map
        for shard in sorted(set(weight_map.values())):
            if not (self.path / shard).is_file():
                raise FileNotFoundError(f"{self.path / shard}: shard listed in {INDEX} is missing")
        layers = [int(m.group(1)) for n in weight_map if (m := LAYER.match(n))]
        if layers and max(layers) >= self.config.num_hidden_layers:
            raise CheckpointError(f"{self.path}: the checkpoint holds model.layers.{max(layers)} but config.json says "
                                  f"num_hidden_layers = {self.config.num_hidden_layers}; those layers would be dropped "
                                  "(fix config.json, or write a truncated checkpoint with tide make-checkpoint)")
        if max(layers, default=-1) + 1 < self.config.num_hidden_layers:  # checked before any model is built
            raise CheckpointError(f"{self.path}: config.json says num_hidden_layers = "
                                  f"{self.config.num_hidden_layers} but the checkpoint holds "
                                  f"{max(layers, default=-1) + 1} layer(s)")

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{self.path / shard}: unreadable safetensors file ({err})") from None
        return self._handles[shard]

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> Tensor:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        handle = self._open(shard)
        try:
            tensor = handle.get_tensor(name)
        except (SafetensorError, KeyError) as err:
            raise CheckpointError(f"{self.path / shard}: tensor {name!r} missing or unreadable ({err})") from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{self.path / shard}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(shape)}")
        if not tensor.is_floating_point() or tensor.element_size() == 1:  # fp8 is quantised too
            raise CheckpointError(f"{self.path / shard}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}"
                                  ", expected a floating-point dtype (quantised checkpoints are not supported)")
        if self.check_finite and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self.path / shard}: tensor {name!r} holds NaN or infinite values (weights must be "
                                  "finite; --no-check-finite skips this check)")
        if self.check_finite and bool((tensor.abs() > MAX_WEIGHT).any()):
            raise CheckpointError(f"{self.path / shard}: tensor {name!r} holds values beyond {MAX_WEIGHT:g} in "
                                  "magnitude: the forward would overflow (an RMSNorm's sum of squares reaches inf and "
                                  "the layer outputs zeros); --no-check-finite skips this check")
        return tensor


    def check_no_unused(self) -> None:
        """Before anything loads, refuse tensors no parameter of config.json's model takes (an extra expert, q/k
        norms with use_qk_norm false, shared experts with num_shared_experts 0): config.json and the weights
        disagree, and the model would silently differ. A tied lm_head and derived rotary buffers are not weights
        of their own."""
        expected = {name for name, _ in tensor_shapes(self.config)}
        if self.config.tie_word_embeddings:
            expected.add("lm_head.weight")
        unused = sorted(n for n in self.weight_map if n not in expected and not n.endswith("rotary_emb.inv_freq"))
        if unused:
            shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
            raise CheckpointError(f"{self.path}: {len(unused)} tensor(s) that no parameter of this config.json uses: "
                                  f"{shown} (does config.json describe these weights?)")


def load_model(reader: CheckpointReader, device: torch.device | str, dtype: torch.dtype) -> LLaDA2Model:
    """Build the model's non-expert part on `device` in `dtype`, filled tensor by tensor from the checkpoint
    (the memory was checked by tide.engine.check_memory before this allocates)."""
    with torch.device("meta"):
        model = LLaDA2Model(reader.config)
    model.to(dtype)  # on meta: the weights are materialised in `dtype` directly, never as a transient fp32 copy
    for moe in model.moe_layers():
        moe.gate.expert_bias.data = moe.gate.expert_bias.data.float()
    model.to_empty(device=device)
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, target in tqdm(expected.items(), desc="loading weights", unit="tensor", leave=False,
                             disable=len(expected) < 200):
        src = reader.get(name, tuple(target.shape))
        with torch.no_grad():
            # expert_bias stays fp32: it decides routing, and rounding it could flip a selection.
            target.copy_(src.to(torch.float32 if name.endswith("expert_bias") else dtype))
    model.eval()
    model.requires_grad_(False)  # inference weights: no autograd graph, whatever grad mode the caller is in
    return model


def fill_store(reader: CheckpointReader, store: ExpertStore) -> None:
    """Copy every routed expert from the checkpoint into the store's host master, unless another process fills it (a
    master shared by the ranks of one machine: tide.experts.masters); then the master is shared."""
    cfg = reader.config
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    jobs = [(layer, e) for layer in store.layers for e in range(cfg.num_experts)] if store.master.fills else []
    for layer, e in tqdm(jobs, desc="loading experts", unit="expert", leave=False, disable=len(jobs) < 2000):
        store.put(layer, e, reader.get(expert_name(layer, e, "gate_proj"), (I, H)),
                  reader.get(expert_name(layer, e, "up_proj"), (I, H)),
                  reader.get(expert_name(layer, e, "down_proj"), (H, I)))
    store.master.filled()


# ---- writing random checkpoints ------------------------------------------------------------------------
def tensor_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the official layout, with its shape, in file order."""
    with torch.device("meta"):
        model = LLaDA2Model(cfg)
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    for layer_idx in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer_idx}."
        if layer_idx == 0:
            yield "model.word_embeddings.weight", (cfg.vocab_size, H)
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.startswith(prefix):
                yield name, tuple(p.shape)
        if layer_idx >= cfg.first_k_dense_replace:
            for e in range(cfg.num_experts):
                for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                    yield expert_name(layer_idx, e, proj), shape
    yield "model.norm.weight", (H,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, H)


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape)
    if name.endswith("expert_bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) * std


def write_checkpoint(cfg: ModelConfig, out: str | Path, tensors: Iterator[tuple[str, Tensor]],
                     max_shard_bytes: int = 2 << 30, total_bytes: int | None = None) -> Path:
    """Write config.json + safetensors shards + index from a stream of (name, tensor), in cfg.dtype."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    shards: list[list[str]] = []  # tensor names per written shard
    shard: dict[str, Tensor] = {}
    size = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="writing", leave=False,
               disable=not total_bytes or total_bytes < (1 << 30))

    def flush() -> None:
        save_file(shard, str(out / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        tensor = tensor.to(torch.float32 if name.endswith("expert_bias") else dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size += nbytes
        bar.update(nbytes)
    flush()
    bar.close()
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"  # the official shard naming
        (out / f"shard-{i:05d}.tmp").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes or 0}, "weight_map": weight_map},
                                        indent=2, sort_keys=True))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def write_random_checkpoint(cfg: ModelConfig, out: str | Path, seed: int = 0, max_shard_bytes: int = 2 << 30,
                            tokenizer: bool = True) -> Path:
    gen = torch.Generator().manual_seed(seed)
    shapes = list(tensor_shapes(cfg))
    itemsize = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    total = sum(math.prod(s) for _, s in shapes) * itemsize
    path = write_checkpoint(cfg, out, ((n, random_tensor(n, s, gen)) for n, s in shapes), max_shard_bytes, total)
    if tokenizer:
        write_byte_tokenizer(path, cfg)
    return path


# ---- tokenizers --------------------------------------------------------------------------------------------
SPECIALS = {"pad_token": "<|pad|>", "eos_token": "<|endoftext|>", "mask_token": "<|mask|>"}


def write_byte_tokenizer(path: str | Path, cfg: ModelConfig) -> None:
    """A byte-level tokenizer for random checkpoints of any vocabulary: ids 0..255 are bytes; eos/mask (and pad,
    unless it is the eos) get the config's ids (>= 256); other generated ids decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ids = {"pad_token": cfg.pad_token_id, "eos_token": cfg.eos_token_id, "mask_token": cfg.mask_token_id}
    if any(i is None or i < 256 for i in ids.values()) or cfg.vocab_size < 259:
        raise ValueError("a byte tokenizer needs vocab_size >= 259 and pad/eos/mask token ids >= 256")
    specials = dict(SPECIALS)
    if cfg.pad_token_id == cfg.eos_token_id:  # LLaDA2.0 pads with its EOS id
        specials["pad_token"] = specials["eos_token"]
    vocab = {char: b for b, char in enumerate(_bytes_to_unicode())}
    for key, token in specials.items():
        vocab[token] = ids[key]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(dict.fromkeys(specials.values())))
    save_tokenizer(tok, path, specials)


def save_tokenizer(tok, path: str | Path, specials: dict[str, str] | None = None) -> None:
    """tokenizer.json and tokenizer_config.json (and special_tokens_map.json) as transformers writes them."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 20,
                            **(specials or SPECIALS)).save_pretrained(str(path))


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable mapping of the 256 byte values, in byte order. Ours, not tokenizers'
    ByteLevel.alphabet(): that gives the same 256 characters unordered, and a vocabulary needs them by byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars


def read_generation_config(path: str | Path) -> dict:
    """generation_config.json of a checkpoint directory as a dict ({} when there is none). Plain JSON, not
    transformers.GenerationConfig: the block-diffusion fields (block_length, steps, threshold) are not its own,
    and we need exactly what the file says (its defaults would hide what the checkpoint did not set)."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable or not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return raw


def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """The checkpoint's fast tokenizer (tokenizer.json), or None when the directory has no tokenizer files. Never
    runs checkpoint code: only tokenizer.json is read (trust_remote_code=False, no auto_map class is imported),
    and a tokenizer whose ids reach beyond `vocab_size` is refused."""
    path = Path(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        if (path / "tokenizer_config.json").is_file():
            raise CheckpointError(f"{path}: tokenizer_config.json but no tokenizer.json; TIDE reads fast tokenizers "
                                  "(tokenizer.json) only and never runs checkpoint code. Save the tokenizer as "
                                  "tokenizer.json with transformers elsewhere, or pass --prompt-ids")
        return None
    from transformers import PreTrainedTokenizerFast

    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # tokenizers raises its own exception types for a corrupt file
        raise CheckpointError(f"{file}: not a readable tokenizer ({type(err).__name__}: {err})") from None
    top = max(tok.get_vocab().values(), default=-1) + 1
    if vocab_size is not None and top > vocab_size:
        raise CheckpointError(f"{file}: the tokenizer's ids reach {top - 1}, beyond the model's vocab_size "
                              f"{vocab_size} (config.json): a tokenizer for another model?")
    return tok


def state_tensors(model: LLaDA2Model, store: ExpertStore) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of a built model and its store under the official names (for writing checkpoints)."""
    yield from ((n, t.detach()) for n, t in model.state_dict().items()
                if not (model.config.tie_word_embeddings and n == "lm_head.weight"))
    for layer in store.layers:
        for e in range(store.num_experts):
            gate_up, down = store.host_weights(layer, e)
            gate, up = gate_up.chunk(2, dim=0)
            yield expert_name(layer, e, "gate_proj"), gate
            yield expert_name(layer, e, "up_proj"), up
            yield expert_name(layer, e, "down_proj"), down
