"""Small models actually trained on the Python standard library, with a BPE tokenizer saved beside them.

Used by scripts/shrink_report.py and by the shrink training-evidence test (tests/conftest.py puts scripts/ on the path): a shrinking method only
promises a better starting point for training, and that can only be shown on a model that knows
something. Everything is deterministic (fixed files, seeds, batches)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grow.plan import torch_threads
from grow.training import (HELD_OUT_FILES, STDLIB, Shape, adamw, encode, held_out_windows, llama_config, step,
                           train_tokenizer)
from grow.training import loss as _loss


@dataclass(frozen=True)
class Setup(Shape):
    steps: int = 300  # training of the source
    lr: float = 3e-3
    train_chars: int = 1_500_000
    eval_windows: int = 64  # held-out windows the loss is measured on
    masked_lm_steps: int = 0  # a masked LM's source: these steps as a masked LM after `steps` as a causal LM
    masked_lm_lr: float = 1e-3


# tests/test_shrink.py: at 150 steps (source seeds 0-2) the source is 0.79-0.83 nats below the random init
# after 50 steps, the shrunk models start 0.89-1.05 ahead and finish 0.69-0.71 ahead (it asks 0.5, 0.5, 0.3)
TEST = Setup(steps=150)
REPORT = Setup(hidden=128, layers=6, heads=8, kv_heads=4, ffn=384, vocab=1024, seq=128, batch=16, steps=600,
               train_chars=3_000_000)


def train_files(chars: int) -> list[Path]:
    out, total = [], 0
    for p in sorted(STDLIB.glob("*.py")):
        if p.name in HELD_OUT_FILES:
            continue
        out.append(p)
        total += p.stat().st_size
        if total >= chars:
            break
    return out


@dataclass(frozen=True)
class Task:
    """What a model trains and is measured on: its objective (grow.training.objective_loss), the
    training data (a token stream, or images and their classes) and the held-out examples."""

    objective: str
    train: object
    held_out: object
    mask_token_id: int | None = None  # masked_lm: the token that hides a position

    def batches(self, setup: Setup, steps: int, seed: int):
        """The same `steps` batches for every model trained with this seed: random windows of the
        stream (for a masked LM with 15% of the positions masked), or random images with their classes."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            if self.objective == "classes":
                images, classes = self.train
                pick = torch.randint(0, len(classes), (setup.batch,), generator=gen)
                yield images[pick], classes[pick]
                continue
            starts = torch.randint(0, self.train.numel() - setup.seq, (setup.batch,), generator=gen)
            ids = torch.stack([self.train[s: s + setup.seq] for s in starts.tolist()])
            if self.objective == "masked_lm":
                hidden = torch.rand(ids.shape, generator=gen) < 0.15
                yield torch.where(hidden, self.mask_token_id, ids), torch.where(hidden, ids, -100)
            else:
                yield ids


def language_task(folder: Path, setup: Setup, objective: str = "causal_lm") -> Task:
    """Training text and held-out windows through the tokenizer saved in `folder`; a masked LM is
    measured on the held-out windows with every 7th token masked."""
    from transformers import AutoTokenizer

    from grow.calibrate import masked_lm_inputs

    tok = AutoTokenizer.from_pretrained(str(folder))
    held_out = held_out_windows(tok, setup.seq, setup.eval_windows)
    if objective == "masked_lm":
        held_out = masked_lm_inputs(held_out, tok.mask_token_id)
    return Task(objective, encode(tok, train_files(setup.train_chars)), held_out, tok.mask_token_id)


# Training, losses and shrinking of these models run their torch ops on one thread: tiny matrices gain
# nothing from a second, which only waits, and on a busy machine makes every op 10-30 times slower.

def train(model, task: Task, setup: Setup, steps: int, seed: int, lr: float | None = None) -> None:
    """AdamW, linear warmup then cosine decay; the same schedule and batches for every model."""
    lr = lr or setup.lr
    torch.manual_seed(seed)
    with torch_threads():
        _train(model, task, setup, steps, seed, lr)


def _train(model, task: Task, setup: Setup, steps: int, seed: int, lr: float) -> None:
    model.train()
    opt, sched = adamw(model, lr, steps, steps // 10)
    for batch in task.batches(setup, steps, seed):
        step(model, opt, sched, batch, task.objective)
    model.eval()


def loss(model, task: Task) -> float:
    """Mean held-out loss, in one batch."""
    held = task.held_out
    with torch_threads():
        return _loss(model, held, batch=len(held[0] if isinstance(held, tuple) else held), objective=task.objective)


def frequency_loss(task: Task) -> float:
    """The held-out loss of predicting every target by its frequency in the training data (add-half
    smoothing): the level a model reaches by learning nothing but the token (or class) frequencies."""
    if task.objective == "classes":
        train, targets = task.train[1], task.held_out[1]
    else:
        train = task.train
        targets = task.held_out[1] if task.objective == "masked_lm" else task.held_out[:, 1:]
        targets = targets[targets != -100]
    counts = torch.bincount(train, minlength=int(max(train.max(), targets.max())) + 1).double() + 0.5
    return -(counts / counts.sum()).log()[targets].mean().item()


def build_trained(folder: Path, setup: Setup = TEST, seed: int = 0) -> Path:
    """Train a Llama-shaped model (grouped-query attention) on stdlib text and save it with its tokenizer."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder.mkdir(parents=True, exist_ok=True)
    files = train_files(setup.train_chars)
    tok = train_tokenizer(folder, files, setup.vocab)
    cfg = llama_config(setup, tok)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    train(model, language_task(folder, setup), setup, setup.steps, seed)
    model.save_pretrained(str(folder))
    return folder


# ---- one tiny model of every family grow shrinks -----------------------------------------------

# Sources of every family: 64 wide, 4 heads of 16 / 2 kv, FFN 128, 3 layers; shrunk to half the width,
# heads and FFN (head_dim unchanged) and 2 layers. The test trains for fewer steps, measured on fewer windows.
# A masked LM trained as one from scratch at this size stays near the loss of the token frequencies (5.03
# nats against 5.21 after 2,500 steps, still blind to word order): a masked position holds no token of its
# own and the model finds no use for its neighbours. Trained first as a causal LM (the same weights), it
# reaches 5.03 in 200 + 400 steps; the shrunk and random-init models then train as masked LMs alike.
FAMILY = Setup(hidden=64, layers=3, heads=4, kv_heads=2, ffn=128, vocab=512, seq=64, batch=16, steps=200, lr=3e-3,
               train_chars=600_000, masked_lm_steps=400)
FAMILY_TEST = Setup(**{**FAMILY.__dict__, "steps": 100, "eval_windows": 16})


def _decoder(cls: str, **extra):
    def config(setup: Setup, tok):
        import transformers

        return getattr(transformers, cls)(
            vocab_size=len(tok), hidden_size=setup.hidden, num_hidden_layers=setup.layers,
            num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads, intermediate_size=setup.ffn,
            max_position_embeddings=max(128, setup.seq), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, **extra)

    return config


def _head_dim(setup: Setup) -> int:
    return setup.hidden // setup.heads


def _gpt2(setup: Setup, tok):
    import transformers

    return transformers.GPT2Config(vocab_size=len(tok), n_embd=setup.hidden, n_layer=setup.layers, n_head=setup.heads,
                                   n_inner=setup.ffn, n_positions=setup.seq, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, tie_word_embeddings=True)


def _gpt_neox(setup: Setup, tok):
    import transformers

    return transformers.GPTNeoXConfig(vocab_size=len(tok), hidden_size=setup.hidden, num_hidden_layers=setup.layers,
                                      num_attention_heads=setup.heads, intermediate_size=setup.ffn, rotary_pct=0.25,
                                      max_position_embeddings=max(128, setup.seq), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _encoder(cls: str, reserved: int):
    def config(setup: Setup, tok):
        import transformers

        # no dropout: it only slows models this small (shrunk and random-init models train alike without it)
        return getattr(transformers, cls)(
            vocab_size=len(tok), hidden_size=setup.hidden, num_hidden_layers=setup.layers,
            num_attention_heads=setup.heads, intermediate_size=setup.ffn, pad_token_id=tok.pad_token_id,
            max_position_embeddings=setup.seq + reserved, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    return config


@dataclass(frozen=True)
class Family:
    """How the evidence builds one family's tiny model: a transformers config (from the shape and the
    tokenizer) and its auto class, or a timm architecture; what it trains on; how it is shrunk."""

    objective: str = "causal_lm"
    config: object = None  # (Setup, tokenizer) -> transformers config
    auto: str = "AutoModelForCausalLM"
    timm: str | None = None
    causal: str | None = None  # a masked LM's causal-LM class with the same weights, its source's first training
    shrink: tuple = (("hidden", 32), ("heads", 2), ("kv_heads", 1), ("ffn", 64), ("layers", 2))


_MOE = dict(num_experts_per_tok=2, norm_topk_prob=True)
_MOE_SHRINK = (("hidden", 32), ("heads", 2), ("kv_heads", 1), ("layers", 2), ("experts", 2))
_WHOLE_HEADS = (("hidden", 32), ("heads", 2), ("ffn", 64), ("layers", 2))  # head width = hidden / heads
FAMILIES = {
    "llama": Family(config=_decoder("LlamaConfig")),
    "mistral": Family(config=_decoder("MistralConfig", sliding_window=32)),
    "qwen2": Family(config=_decoder("Qwen2Config")),
    "qwen3": Family(config=_decoder("Qwen3Config", head_dim=16)),
    "granite": Family(config=_decoder("GraniteConfig", embedding_multiplier=4.0, residual_multiplier=0.5,
                                      attention_multiplier=1 / 16, logits_scaling=2.0)),
    "gemma": Family(config=_decoder("GemmaConfig", head_dim=16)),
    "gemma2": Family(config=_decoder("Gemma2Config", head_dim=16, sliding_window=32, query_pre_attn_scalar=16)),
    "gemma3": Family(config=_decoder("Gemma3TextConfig", head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                     layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "phi3": Family(config=_decoder("Phi3Config")),
    "olmo2": Family(config=_decoder("Olmo2Config")),
    "gpt_neox": Family(config=_gpt_neox, shrink=_WHOLE_HEADS),
    "gpt2": Family(config=_gpt2, shrink=_WHOLE_HEADS),
    "mixtral": Family(config=_decoder("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
                      shrink=_MOE_SHRINK),
    "olmoe": Family(config=_decoder("OlmoeConfig", num_experts=4, **_MOE), shrink=_MOE_SHRINK),
    "qwen2_moe": Family(config=_decoder("Qwen2MoeConfig", moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                        num_experts=4, num_experts_per_tok=2), shrink=_MOE_SHRINK),
    "qwen3_moe": Family(config=_decoder("Qwen3MoeConfig", moe_intermediate_size=64, num_experts=4, head_dim=16, **_MOE),
                        shrink=_MOE_SHRINK),
    "bert": Family("masked_lm", _encoder("BertConfig", 0), "AutoModelForMaskedLM", causal="BertLMHeadModel",
                   shrink=_WHOLE_HEADS),
    "roberta": Family("masked_lm", _encoder("RobertaConfig", 2), "AutoModelForMaskedLM",  # padding id 1
                      causal="RobertaForCausalLM", shrink=_WHOLE_HEADS),
    "vit": Family("classes", timm="vit_tiny_patch16_224", shrink=_WHOLE_HEADS),
    "deit": Family("classes", timm="deit_tiny_distilled_patch16_224", shrink=_WHOLE_HEADS),
}


# ---- the image task: coloured shapes ------------------------------------------------------------

IMAGE = 32
SHAPES = ("square", "disc", "cross")
COLOURS = ((1.0, 0.1, 0.1), (0.1, 0.8, 0.1), (0.2, 0.3, 1.0))
CLASSES = len(SHAPES) * len(COLOURS)


def shape_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, 32, 32] in [0, 1] and their classes (shape x colour): one shape of random size and
    place on a noisy background of random brightness, the colour's intensity jittered."""
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, CLASSES, (n,), generator=gen)
    centre = torch.rand(n, 2, generator=gen) * (IMAGE - 16) + 8
    radius = torch.rand(n, generator=gen) * 4 + 3
    y, x = torch.meshgrid(torch.arange(IMAGE).float(), torch.arange(IMAGE).float(), indexing="ij")
    dy = (y[None] - centre[:, 0, None, None]).abs()
    dx = (x[None] - centre[:, 1, None, None]).abs()
    r = radius[:, None, None]
    masks = torch.stack([(dy <= r) & (dx <= r), dy ** 2 + dx ** 2 <= r ** 2,
                         ((dy <= r / 3) & (dx <= r)) | ((dx <= r / 3) & (dy <= r))], 1)
    mask = masks[torch.arange(n), classes // len(COLOURS)].float()[:, None]
    colour = torch.tensor(COLOURS)[classes % len(COLOURS)] * (0.7 + 0.3 * torch.rand(n, 1, generator=gen))
    background = torch.rand(n, 1, 1, 1, generator=gen) * 0.4 * torch.rand(n, 3, IMAGE, IMAGE, generator=gen)
    return background * (1 - mask) + colour[:, :, None, None] * mask, classes


def save_images(folder: Path, images: torch.Tensor) -> Path:
    """Images in [0, 1] as PNG files (calibration images for subcloning)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        pixels = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{k:04d}.png")
    return folder


def image_task(mean, std, held_out: int, train: int = 4096) -> Task:
    """The shape images normalised with the model's mean and std (as calibration normalises them)."""
    def normalised(pair):
        images, classes = pair
        return (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1), classes

    return Task("classes", normalised(shape_images(train, 0)), normalised(shape_images(held_out, 1)))


@dataclass
class FamilyData:
    """What every family's model is trained on: one tokenizer (with a mask token for the encoders)
    and its text task per objective, and the image task."""

    tokenizer_dir: Path
    tasks: dict
    image_eval: int  # held-out images


def family_data(folder: Path, setup: Setup) -> FamilyData:
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(tok_dir, train_files(setup.train_chars), setup.vocab, masked_lm=True)
    causal = language_task(tok_dir, setup)
    from grow.calibrate import masked_lm_inputs

    masked = Task("masked_lm", causal.train, masked_lm_inputs(causal.held_out, causal.mask_token_id),
                  causal.mask_token_id)
    return FamilyData(tok_dir, {"causal_lm": causal, "masked_lm": masked}, setup.eval_windows * 8)


def family_task(name: str, data: FamilyData) -> Task:
    """The task the family's model trains on (image tasks normalised as the timm architecture expects)."""
    family = FAMILIES[name]
    if not family.timm:
        return data.tasks[family.objective]
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(family.timm)
    key = ("classes", tuple(cfg.mean), tuple(cfg.std))
    if key not in data.tasks:
        data.tasks[key] = image_task(cfg.mean, cfg.std, data.image_eval)
    return data.tasks[key]


def fresh_model(family: Family, setup: Setup, data: FamilyData, seed: int = 0, causal: bool = False):
    """A randomly initialised model of the family at the given shape (`causal`: a masked LM's causal twin)."""
    import transformers

    torch.manual_seed(seed)
    if family.timm:
        import timm

        return timm.create_model(family.timm, pretrained=False, img_size=IMAGE, patch_size=8, num_classes=CLASSES,
                                 embed_dim=setup.hidden, depth=setup.layers, num_heads=setup.heads,
                                 mlp_ratio=setup.ffn / setup.hidden)
    tok = transformers.AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    config = family.config(setup, tok)
    if causal:
        config.is_decoder = True
        return getattr(transformers, family.causal)(config)
    return getattr(transformers, family.auto).from_config(config)


def build_trained_family(folder: Path, name: str, data: FamilyData, setup: Setup, seed: int = 0) -> Path:
    """Train the family's tiny model on its task (a masked LM first as a causal LM, then `masked_lm_steps`
    as a masked LM) and save it as users have it: save_pretrained with the
    tokenizer beside it, or timm's save_for_hf; a timm model gets calibration images in folder/images."""
    import transformers

    transformers.logging.set_verbosity_error()
    family = FAMILIES[name]
    model = fresh_model(family, setup, data, seed)
    if family.causal:  # a masked LM: first the same weights as a causal LM, as every causal family trains
        twin = fresh_model(family, setup, data, seed, causal=True)
        train(twin, data.tasks["causal_lm"], setup, setup.steps, seed)
        model.load_state_dict(twin.state_dict())
        train(model, family_task(name, data), setup, setup.masked_lm_steps, seed, lr=setup.masked_lm_lr)
    else:
        train(model, family_task(name, data), setup, setup.steps, seed)
    folder.mkdir(parents=True, exist_ok=True)
    if family.timm:
        from timm.models import save_for_hf

        save_for_hf(model, str(folder), safe_serialization=True)
        save_images(folder.parent / f"{folder.name}-images", shape_images(64, 2)[0])
    else:
        model.save_pretrained(str(folder))
        transformers.AutoTokenizer.from_pretrained(str(data.tokenizer_dir)).save_pretrained(str(folder))
    return folder


def shrink_and_train(src: Path, work: Path, name: str, data: FamilyData, setup: Setup, steps: int) -> dict:
    """Shrink a trained source with every method its spec allows (family.shrink sizes), then train each
    shrunk model and a random init of the shrunk config `steps` steps on the same batches. Held-out
    losses: {"source": loss, method or "random": (at step 0, after training)}."""
    import warnings

    import grow
    from grow.arch.view import ModelView
    from grow.checkpoint import Source
    from grow.errors import GrowWarning
    from grow.ops import SHRINK_METHODS
    from grow.verify import load_model

    family = FAMILIES[name]
    task = family_task(name, data)
    framework = "timm" if family.timm else "transformers"
    ops = ModelView(Source(src)).spec.operations
    losses = {"source": loss(load_model(src, framework), task)}
    for method in [m for m in SHRINK_METHODS if ops is None or m in ops.get("shrink", [])]:
        dst = work / method
        options = dict(family.shrink)
        if method == "subclone":
            options["calibration_tokens"] = 1024
            if family.timm:
                options["calibration"] = src.parent / f"{src.name}-images"
        with warnings.catch_warnings(), torch_threads():
            warnings.simplefilter("error", GrowWarning)  # real tokens / images: no random calibration
            grow.shrink(src, dst, method=method, force=True, **options)
        model = load_model(dst, framework)
        start = loss(model, task)
        train(model, task, setup, steps, seed=1)
        losses[method] = (start, loss(model, task))
    model = random_init_like(dst, framework, seed=1)
    start = loss(model, task)
    train(model, task, setup, steps, seed=1)
    losses["random"] = (start, loss(model, task))
    return losses


def family_losses(work: Path, name: str, data: FamilyData, setup: Setup, steps: int) -> dict:
    """The family's source trained (build_trained_family, in work/source), then shrink_and_train: a
    function of its own so that a worker process can run it."""
    src = build_trained_family(work / "source", name, data, setup)
    return shrink_and_train(src, work, name, data, setup, steps)


def random_init_like(path: Path, framework: str, seed: int):
    """A freshly initialised model of the checkpoint's shape and class (the framework's own initialisation)."""
    import json

    from grow.verify import model_entry

    torch.manual_seed(seed)
    if framework == "timm":
        import timm

        cfg = json.loads((path / "config.json").read_text())
        return timm.create_model(cfg["architecture"], pretrained=False, **cfg.get("model_args", {})).float()
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    return getattr(transformers, model_entry(path)["auto_class"]).from_config(config, dtype=torch.float32)
