"""The demo's base model: a small Llama pretrained from scratch at a native context of 256 tokens.

`make demo` extends this model; it ships as a checkpoint in ``examples/demo_base/`` (safetensors) because
pretraining it takes longer than the demo's 10 minutes. This script made that checkpoint and rebuilds it
(``python examples/demo.py --rebuild-base``, or ``python examples/demo_base.py --out DIR``) with fixed seeds.

What it learns, at 256 tokens only (``max_position_embeddings=256``, RoPE as trained):

- English prose about Python: ``pydoc_data/topics.py``, which ships with every CPython, without its last 5%;
- Python code: random windows of the standard library's long source files, without the last ``CODE_HELD_OUT``
  (the demo's held-out text: code refers back to names defined far earlier, so a longer context has something
  to find);
- retrieval, as LLMs acquire it in pretraining from text that refers back: a share of the blocks are passkey
  prompts with their answer, the needle hidden in the filler sentences or in prose
  (:func:`hf_longlora.data.passkey_documents`), with keys from other seeds than the evaluation's.

Numbers split into one token per digit (``train_bpe_tokenizer(individual_digits=True)``), as in Llama's tokenizer.
The model retrieves at 256 tokens and does not at 1,024 (the positions beyond 256 were never seen); that is what
the demo's LongLoRA fixes. Training uses bf16 autocast where the CPU has native bf16 (AVX-512), else fp32, so a
rebuild on another kind of CPU gives a close but not bit-identical checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

from hf_longlora.data import passkey_documents, pydoc_topics_text, train_bpe_tokenizer
from hf_longlora.data.tokenizer import chunks

CHECKPOINT = Path(__file__).resolve().parent / "demo_base"
SETTINGS_FILE = "demo_base_settings.json"
HELD_OUT = 0.05  # the last 5% of pydoc's prose is the demo's evaluation text
DEFAULTS = {
    "native": 256,
    "layers": 4,
    "hidden": 256,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 2048,
    "steps": 3600,
    "batch": 16,
    "lr": 2e-3,
    "passkey_share": 0.5,
    "code_share": 0.3,
    "seed": 0,
}
CODE_HELD_OUT = 8  # the standard library's last 8 long files are never trained on (the demo's held-out code)


def pydoc_split() -> tuple[str, str]:
    """pydoc's prose: (training text, held-out text), the held-out part being the last 5%."""
    text = pydoc_topics_text()
    split = int((1 - HELD_OUT) * len(text))
    return text[:split], text[split:]


def stdlib_split() -> tuple[list[str], list[str]]:
    """The standard library's long source files: (training files, the last ``CODE_HELD_OUT`` held out)."""
    from hf_longlora.data import stdlib_documents

    files = stdlib_documents()
    return files[:-CODE_HELD_OUT], files[-CODE_HELD_OUT:]


def native_bf16() -> bool:
    """bf16 autocast pays only where the CPU has native bf16 (AVX-512 BF16/AMX); elsewhere it is ~60x slower."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def training_blocks(tokenizer, train_text: str, settings: dict, code: list[str] = ()) -> list[list[int]]:
    """``steps * batch`` blocks of ``native`` tokens, shuffled (seeded).

    A share ``passkey_share`` are packed passkey prompts, ``code_share`` are random windows of the standard
    library's training files, the rest are prose blocks.
    """
    native = settings["native"]
    rng = random.Random(settings["seed"])
    ids = tokenizer(train_text, add_special_tokens=False)["input_ids"]
    prose = [ids[i : i + native] for i in range(0, len(ids) - native + 1, native)]
    total = settings["steps"] * settings["batch"]
    n_passkey = round(settings["passkey_share"] * total)
    n_code = round(settings["code_share"] * total) if code else 0
    code_ids = [tokenizer(f, add_special_tokens=False)["input_ids"] for f in code]
    code_ids = [f for f in code_ids if len(f) > native]
    code_blocks = []
    for _ in range(n_code):
        f = code_ids[rng.randrange(len(code_ids))]
        start = rng.randrange(len(f) - native + 1)
        code_blocks.append(f[start : start + native])
    # passkey prompts of 48..native tokens, several packed (EOS-separated) into each block
    documents = passkey_documents(
        tokenizer,
        2 * n_passkey,
        48,
        native,
        haystacks=[train_text[i : i + 20_000] for i in range(0, len(train_text), 20_000)],
        seed=settings["seed"] + 1,
    )
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    passkey = [stream[i : i + native] for i in range(0, len(stream) - native + 1, native)][:n_passkey]
    rest = total - len(passkey) - len(code_blocks)
    blocks = passkey + code_blocks + [prose[rng.randrange(len(prose))] for _ in range(rest)]
    rng.shuffle(blocks)
    return blocks


def build_base(out: Path, settings: dict | None = None) -> Path:
    """Pretrain the base into ``out`` (replaced). Returns ``out``."""
    settings = {**DEFAULTS, **(settings or {})}
    started = time.perf_counter()
    torch.manual_seed(settings["seed"])
    train_text, _ = pydoc_split()
    code = stdlib_split()[0] if settings["code_share"] > 0 else []
    code_text = "".join(code)[: len(train_text)]  # as much code as prose for the tokenizer's merges
    tokenizer = train_bpe_tokenizer(
        chunks(train_text, 10_000) + chunks(code_text, 10_000), settings["vocab"], individual_digits=True
    )
    blocks = training_blocks(tokenizer, train_text, settings, code)
    hidden = settings["hidden"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=8 * hidden // 3 // 32 * 32,
        num_hidden_layers=settings["layers"],
        num_attention_heads=settings["heads"],
        num_key_value_heads=settings["kv_heads"],
        max_position_embeddings=settings["native"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    bf16 = native_bf16()
    print(
        f"pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama from scratch at "
        f"{settings['native']} tokens: {settings['steps']} steps of {settings['batch']} blocks, "
        f"{settings['passkey_share']:.0%} passkey prompts, {settings['code_share']:.0%} code, "
        f"{'bf16 autocast' if bf16 else 'fp32'}"
    )
    work = out.with_name(out.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work / "trainer"),
            max_steps=settings["steps"],
            per_device_train_batch_size=settings["batch"],
            learning_rate=settings["lr"],
            adam_beta2=0.95,
            weight_decay=0.1,
            max_grad_norm=1.0,
            warmup_steps=settings["steps"] // 20,
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            logging_steps=max(1, settings["steps"] // 20),
            save_strategy="steps",  # checkpoints in <out>.building/trainer, deleted once the model is saved
            save_steps=500,
            save_total_limit=2,
            report_to=[],
            use_cpu=True,
            bf16=bf16,
            seed=settings["seed"],
            data_seed=settings["seed"],
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_dict({"input_ids": blocks, "labels": blocks}),
        data_collator=default_data_collator,
        processing_class=tokenizer,
    ).train()
    shutil.rmtree(work / "trainer", ignore_errors=True)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    record = {
        **settings,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_autocast": bf16,
        "seconds": round(time.perf_counter() - started),
    }
    (work / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # replaced only once the new one is complete
    work.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(CHECKPOINT), help="where to write the checkpoint")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    settings = {key: getattr(args, key) for key in DEFAULTS}
    print(f"wrote {build_base(Path(args.out), settings)}")


if __name__ == "__main__":
    main()
