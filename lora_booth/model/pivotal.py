"""Pivotal tuning: the trigger word becomes new tokens <s0><s1>... whose embedding rows train by
textual inversion (Gal et al. 2022) while the LoRA trains — as in the diffusers "advanced"
DreamBooth-LoRA script and cloneofsimo's lora. Works over every (tokenizer, text encoder) pair of
the base: one for SD 1.x/2.x, two for SDXL.

The existing embedding matrix is never touched: each encoder's token embedding is wrapped so that
the new ids read from a small trainable (n, D) tensor and every other id reads the frozen matrix.
The optimizer sees only the new rows, so weight decay or momentum cannot move the old ones."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .. import families
from ..families.base import TOKENIZERS
from ..io import atomic
from ..config.sections import PivotalConfig
from ..config.checks import trigger_pattern
from ..data.rows import Row, derived_generator
from ..io.errors import ConfigError, DataError

FILE_NAME = "embeddings.safetensors"
# (tokenizer, text encoder) attributes of a Base or a diffusers pipeline, for every text encoder any family has
PAIRS = tuple((TOKENIZERS[part], part) for part in families.text_parts())


def new_tokens(cfg: PivotalConfig) -> list[str]:
    return [f"<s{index}>" for index in range(cfg.tokens)]


def rewrite(prompt: str, cfg: PivotalConfig) -> str:
    """The prompt with the trigger replaced by the new tokens ("a photo of sks dog" →
    "a photo of <s0><s1> dog"); unchanged when pivotal tuning is off."""
    if not cfg.enabled:
        return prompt
    return trigger_pattern(cfg.trigger).sub("".join(new_tokens(cfg)), prompt)


def rewrite_rows(rows: list[Row], cfg: PivotalConfig, report=print) -> list[Row]:
    if not cfg.enabled:
        return rows
    missing = sorted({row.path.name for row in rows if not trigger_pattern(cfg.trigger).search(row.prompt)})
    if missing:
        report(f"warning: the captions of {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} lack the "
               f"trigger {cfg.trigger!r}; the new tokens do not train on them")
    return [replace(row, prompt=rewrite(row.prompt, cfg)) for row in rows]


class EmbeddingWithNewRows(torch.nn.Module):
    """A token embedding whose ids `ids` read from `rows` (trainable) and all others from the
    untouched frozen embedding. `rows` is held outside the module's parameters, so adapter
    state dicts and the frozen encoder's parameter list stay exactly as they were."""

    def __init__(self, frozen: torch.nn.Embedding, ids: list[int], rows: torch.nn.Parameter) -> None:
        super().__init__()
        self.frozen = frozen
        self.ids = ids
        self.new_rows = [rows]  # a list: not registered as a parameter of the text encoder

    @property
    def weight(self) -> torch.nn.Parameter:  # what callers of get_input_embeddings().weight expect
        return self.frozen.weight

    @property
    def num_embeddings(self) -> int:
        return self.frozen.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in self.ids:
            is_new |= input_ids == token_id
        hidden = self.frozen(torch.where(is_new, torch.zeros_like(input_ids), input_ids))  # (B, T, D)
        rows = self.new_rows[0].to(hidden.device, hidden.dtype)
        for index, token_id in enumerate(self.ids):
            hidden = torch.where((input_ids == token_id).unsqueeze(-1), rows[index], hidden)
        return hidden


@dataclass
class Encoder:
    """One text encoder's new tokens."""
    key: str                 # its tensor's name in embeddings.safetensors
    ids: list[int]
    rows: torch.nn.Parameter  # (n, D) fp32


class Pivotal:
    """The new rows of every text encoder of a base, installed in place."""

    def __init__(self, encoders: list[Encoder], tokens: list[str]) -> None:
        self.encoders, self.tokens = encoders, tokens

    def parameters(self) -> list[torch.nn.Parameter]:
        return [encoder.rows for encoder in self.encoders]

    def state(self) -> dict[str, torch.Tensor]:
        return {encoder.key: encoder.rows.detach().cpu().contiguous() for encoder in self.encoders}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {encoder.key: encoder.rows for encoder in self.encoders}
        if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
            raise ValueError(f"pivotal embeddings do not match: checkpoint {sorted(tensors)}, run {sorted(own)}")
        with torch.no_grad():
            for key, rows in own.items():
                rows.copy_(tensors[key])

    def save(self, out: Path, trigger: str, dtype: torch.dtype = torch.float32) -> Path:
        """embeddings.safetensors: "emb_params" (one encoder: the A1111/ComfyUI embedding format
        for SD 1.x/2.x) or "clip_l" + "clip_g" (SDXL's A1111/ComfyUI format). diffusers reads
        each tensor with pipe.load_textual_inversion(tensor, token=[...]) (see load_into)."""
        metadata = {"lora_booth.tokens": ",".join(self.tokens), "lora_booth.trigger": trigger}
        tensors = {key: rows.to(dtype) for key, rows in self.state().items()}
        atomic.save_safetensors(out / FILE_NAME, tensors, metadata)
        return out / FILE_NAME


def encoder_keys(count: int) -> list[str]:
    return ["emb_params"] if count == 1 else ["clip_l", "clip_g"][:count]


def install(base, cfg: PivotalConfig, class_prompt: str, seed: int) -> Pivotal | None:
    """Add the new tokens to each tokenizer and wrap each encoder's token embedding. The rows
    start from init_word's mean embedding, or random with the existing rows' spread."""
    if not cfg.enabled:
        return None
    tokens = new_tokens(cfg)
    pairs = [(getattr(base, t, None), getattr(base, e, None)) for t, e in PAIRS]
    pairs = [(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]
    word = cfg.init_word.strip() or (class_prompt.split() or [""])[-1]
    encoders = []
    for key, (tokenizer, encoder) in zip(encoder_keys(len(pairs)), pairs):
        clashes = [t for t in tokens if t in tokenizer.get_vocab()]
        if clashes:
            raise ConfigError("pivotal.tokens", f"{clashes} are already in the tokenizer's vocabulary",
                              "train on the base model, not on one that already holds these embeddings")
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        frozen = encoder.get_input_embeddings()
        table = frozen.weight.detach().float()  # (V, D)
        if cfg.init == "word":
            word_ids = tokenizer(word, add_special_tokens=False).input_ids
            if not word_ids:
                raise ConfigError("pivotal.init_word", f"{word!r} gives no tokens", "name a word such as dog")
            start = table[word_ids].mean(dim=0).expand(len(tokens), -1).clone()
        else:
            noise = torch.randn(len(tokens), table.shape[1], generator=derived_generator(seed, f"pivotal-{key}", 0))
            start = noise.to(table.device) * table.std(dim=0)
        rows = torch.nn.Parameter(start.contiguous())
        encoder.set_input_embeddings(EmbeddingWithNewRows(frozen, ids, rows))
        encoders.append(Encoder(key, ids, rows))
    return Pivotal(encoders, tokens)


def install_for_run(cfg, base, num_processes: int, report=print) -> Pivotal | None:
    """install() for a training run: refuses several processes, and says what it did."""
    if not cfg.pivotal.enabled:
        return None
    if num_processes > 1:  # the new rows live outside the DDP-wrapped modules: no gradient sync
        raise ConfigError("pivotal.enabled", f"is not supported with {num_processes} processes yet",
                          "train pivotal runs in one process (launch.processes=1)")
    embeddings = install(base, cfg.pivotal, cfg.prior.class_prompt, cfg.train.seed)
    start = (f"from {(cfg.pivotal.init_word or cfg.prior.class_prompt.split()[-1])!r}" if cfg.pivotal.init == "word"
             else "randomly")
    report(f"pivotal      {cfg.pivotal.trigger!r} → {''.join(embeddings.tokens)} in {len(embeddings.encoders)} text "
           f"encoder(s), initialised {start}; instance prompt {rewrite(cfg.data.instance_prompt, cfg.pivotal)!r}")
    return embeddings


def read(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors and the token names of an embeddings file lora-booth wrote."""
    with safe_open(str(path), framework="pt") as handle:
        tokens = (handle.metadata() or {}).get("lora_booth.tokens", "")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if not tokens:
        raise DataError(f"{path}: no lora_booth.tokens metadata; load it with "
                        "pipe.load_textual_inversion(tensor, token=[...]) and the tokens it was trained with")
    return tensors, tokens.split(",")


def load_into(pipe, path: Path) -> list[str]:
    """diffusers' own loader, one call per text encoder. Returns the tokens a prompt must contain."""
    tensors, tokens = read(path)
    for key, (tokenizer, encoder) in zip(encoder_keys(len(tensors)), PAIRS):
        if key not in tensors:
            raise DataError(f"{path}: no {key!r} tensor for the pipeline's {encoder}")
        pipe.load_textual_inversion(tensors[key], token=tokens, tokenizer=getattr(pipe, tokenizer),
                                    text_encoder=getattr(pipe, encoder))
    return tokens


def usage(out: Path, tokens: list[str], prompt: str) -> list[str]:
    """How to use the embeddings anywhere: the end summary and the model card print it."""
    joined = "".join(tokens)
    return [
        f"embeddings: {out / FILE_NAME} holds the new tokens {joined}; prompts must contain them, e.g. {prompt!r}",
        f"  lora-booth generate lora={out} loads them with the adapter",
        "  diffusers:  from safetensors.torch import load_file; state = load_file('embeddings.safetensors')",
        f"              pipe.load_textual_inversion(state['emb_params'], token={tokens}) "
        "(SDXL: state['clip_l'] for text_encoder/tokenizer, state['clip_g'] for text_encoder_2/tokenizer_2)",
        f"  A1111/ComfyUI: copy it to embeddings/ as NAME.safetensors and write NAME where the prompt has {joined}",
    ]
